"""The bundle cache: a model name and its weights exported once, then reused by every later run.

``Encoder.from_pretrained("ViT-B-32", pretrained="laion2b_s34b_b79k")`` and the commands'
``-m ViT-B-32 --pretrained laion2b_s34b_b79k`` export the model the first time
(:func:`nvclip_fast.export`: ONNX towers checked against open_clip, and TensorRT plans where the
entry is for TensorRT) into an entry of this cache, and load that entry; later runs with the same key
load it at once, without torch or open_clip.

Where: ``$NVCLIP_FAST_CACHE``, else ``$XDG_CACHE_HOME/nvclip-fast``, else ``~/.cache/nvclip-fast``.

An entry is a folder ``<model>-<weights>-<engine>-<precision>-<digest>`` holding the bundle and
``entry.json`` (its key and what was built). The key holds everything that changes the files: the
model name; the weights (an open_clip pretrained tag, the sha256 of a weights file, or the seed of
random weights, which are seeded so that they are the same every time); the image size, precision,
largest batch and whether the text tower is included; the engine (``onnx``, which runs anywhere, or
``tensorrt`` with TensorRT's version and the GPU's name and compute capability); and the versions of
the packages that wrote it (nvclip-fast, torch, open_clip_torch, onnx, onnxscript). The digest is
the sha256 of the key.

An entry is built in a temporary folder beside it and renamed into place, so an entry folder is
always complete; a file lock per entry makes two processes that want the same entry build it once
(the second waits, then loads what the first built). Clearing renames an entry away before
deleting it. The sha256 of a weights file is remembered per (path, size, mtime, inode), so a cached
run does not read a multi-GB checkpoint again.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import extras, metadata

__all__ = [
    "CACHE_ENV",
    "RANDOM_WEIGHTS_SEED",
    "CacheEntry",
    "Request",
    "cache_dir",
    "clear",
    "entries",
    "get",
    "lookup",
]

CACHE_ENV = "NVCLIP_FAST_CACHE"
ENGINES = ("onnx", "tensorrt")
ENTRY_FILE = "entry.json"
RANDOM_WEIGHTS_SEED = 0  # random weights are seeded: the same weights, hence one entry, every time
# The packages whose versions change what an export writes.
KEY_PACKAGES = ("nvclip-fast", "torch", "open_clip_torch", "onnx", "onnxscript")
DIGEST_CHARS = 16
LABEL_CHARS = 40  # longest model or weights name shown in an entry's folder name
_LOCKS = ".locks"
_HASHES = ".sha256"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$NVCLIP_FAST_CACHE``, else ``$XDG_CACHE_HOME/nvclip-fast``, else ``~/.cache/nvclip-fast``."""
    if configured := os.environ.get(CACHE_ENV):
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nvclip-fast"


def _label(text: str) -> str:
    return _UNSAFE.sub("_", text)[:LABEL_CHARS].strip("._") or "_"


@dataclass(frozen=True)
class Request:
    """What an entry is built from. Exactly one of ``pretrained`` (an open_clip tag), ``weights`` (a
    checkpoint file) or ``random_weights``. ``engine`` is ``"onnx"`` or ``"tensorrt"``; a TensorRT
    entry also names the TensorRT version and the GPU (``"NVIDIA H100 80GB HBM3 (9.0)"``) it is for.
    ``text``: include the text tower."""

    model: str
    pretrained: str | None = None
    weights: Path | None = None
    random_weights: bool = False
    image_size: int | None = None
    precision: str = "fp32"
    max_batch: int = metadata.DEFAULT_MAX_BATCH
    text: bool = True
    engine: str = "onnx"
    tensorrt: str | None = None
    gpu: str | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("pretrained", "weights", "random_weights") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(
                f"model {self.model!r}: give exactly one of pretrained=TAG, weights=FILE or "
                f"random_weights=True, got {given or 'none'}"
            )
        if self.weights is not None:
            object.__setattr__(self, "weights", Path(self.weights).expanduser().resolve())
        if self.precision not in metadata.PRECISIONS:
            raise ValueError(f"precision must be one of {list(metadata.PRECISIONS)}, got {self.precision!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if (self.engine == "tensorrt") != (self.tensorrt is not None and self.gpu is not None):
            raise ValueError("a TensorRT entry names its TensorRT version and GPU, an ONNX entry neither")

    @property
    def source(self) -> dict[str, Any]:
        """How to open the same model again: ``Encoder.from_pretrained(**source)``."""
        from .bundle import model_source

        return model_source(
            self.model,
            pretrained=self.pretrained,
            weights=self.weights,
            random_weights=self.random_weights,
            image_size=self.image_size,
            precision=self.precision,
        )

    def describe(self) -> str:
        """``ViT-B-32 (pretrained laion2b_s34b_b79k)``, ``(weights nvclip.pt)``, ``(random weights)``."""
        if self.pretrained:
            return f"{self.model} (pretrained {self.pretrained})"
        if self.weights:
            return f"{self.model} (weights {self.weights.name})"
        return f"{self.model} (random weights)"

    def key(self, root: Path) -> dict[str, Any]:
        """Everything that changes the files of the entry (hashing a weights file, or recalling its hash)."""
        weights: dict[str, Any] = (
            {"pretrained": self.pretrained}
            if self.pretrained
            else {"sha256": _weights_sha256(self.weights, root)}
            if self.weights
            else {"random_seed": RANDOM_WEIGHTS_SEED}
        )
        return {
            "schema": metadata.SCHEMA_VERSION,
            "model": self.model,
            "weights": weights,
            "image_size": self.image_size,
            "precision": self.precision,
            "max_batch": self.max_batch,
            "text": self.text,
            "engine": self.engine,
            "tensorrt": self.tensorrt,
            "gpu": self.gpu,
            "versions": {name: _version(name) for name in KEY_PACKAGES},
        }

    def folder_name(self, key: Mapping[str, Any]) -> str:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:DIGEST_CHARS]
        weights = (
            self.pretrained
            if self.pretrained
            else self.weights.stem
            if self.weights
            else f"random{RANDOM_WEIGHTS_SEED}"
        )
        text = "" if self.text else "-notext"
        return f"{_label(self.model)}-{_label(weights)}-{self.engine}-{self.precision}{text}-{digest}"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _weights_sha256(path: Path, root: Path) -> str:
    """The sha256 of a weights file, remembered under ``root`` per (path, size, mtime, inode)."""
    try:
        st = path.stat()
    except OSError as e:
        raise FileNotFoundError(f"weights file {str(path)!r}: {e.strerror or e}") from e
    identity = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode()
    memo = root / _HASHES / hashlib.sha256(identity).hexdigest()
    with contextlib.suppress(OSError):
        known = memo.read_text(encoding="ascii").strip()
        if len(known) == metadata.SHA256_HEX_LENGTH:
            return known
    digest = metadata.sha256_file(path)
    with contextlib.suppress(OSError):  # only a memo: a read-only cache still works, slower
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=_TMP_PREFIX)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(digest)
        os.replace(tmp, memo)
    return digest


@dataclass(frozen=True)
class CacheEntry:
    """One entry: its folder, key and the bundle in it (``bundle``: the file to open, the image
    tower's ``.plan`` or ``.onnx``)."""

    path: Path
    key: Mapping[str, Any]
    bundle: Path
    created: str
    seconds: float  # how long building it took

    @property
    def sidecar(self) -> Path:
        return self.bundle.with_suffix(metadata.SIDECAR_SUFFIX)

    @property
    def model(self) -> str:
        return str(self.key["model"])

    @property
    def text(self) -> bool:
        return bool(self.key["text"])

    def size(self) -> int:
        """Bytes on disk."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def describe(self) -> str:
        """One line: model, weights, engine, precision, image size, text tower."""
        w = self.key["weights"]
        weights = (
            f"pretrained {w['pretrained']}"
            if "pretrained" in w
            else f"weights sha256 {w['sha256'][:12]}"
            if "sha256" in w
            else "random weights"
        )
        engine = self.key["engine"]
        if self.key["gpu"]:
            engine += f" {self.key['tensorrt']} on {self.key['gpu']}"
        size = f", {self.key['image_size']} px" if self.key["image_size"] else ""
        text = "" if self.text else ", image tower only"
        return f"{self.model} ({weights}), {engine}, {self.key['precision']}{size}{text}"

    @classmethod
    def read(cls, folder: Path) -> CacheEntry:
        """The entry in ``folder``; ValueError when it is not one (or was written by another schema)."""
        try:
            record = json.loads((folder / ENTRY_FILE).read_text(encoding="utf-8"))
            return cls(
                path=folder,
                key=record["key"],
                bundle=folder / record["bundle"],
                created=record["created"],
                seconds=float(record["seconds"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{folder}: not a cache entry ({e})") from e


def lookup(request: Request, root: Path | None = None) -> tuple[CacheEntry | None, Path]:
    """The entry of ``request`` if it is in the cache, and the folder it has (or would have)."""
    root = cache_dir() if root is None else root
    folder = root / request.folder_name(request.key(root))
    if not folder.is_dir():
        return None, folder
    return CacheEntry.read(folder), folder


@contextlib.contextmanager
def _locked(root: Path, name: str, what: str) -> Iterator[None]:
    """An exclusive lock on entry ``name`` (across processes), saying so when another holds it."""
    try:
        from filelock import FileLock, Timeout
    except ImportError as e:
        raise extras.missing_extra(extras.EXPORT, "building a bundle into the cache", e) from e
    lock_dir = root / _LOCKS
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_dir / f"{name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process that is building %s", what)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def get(
    request: Request, root: Path | None = None, *, progress: bool | None = None
) -> tuple[CacheEntry, bool]:
    """The entry of ``request``: (entry, False) from the cache, or built now, (entry, True).

    Building exports the model (the ``export`` extra: torch, open_clip, onnx) into a temporary folder
    under the same lock as every other process building this entry, then renames it into place.
    ``progress``: the exporter's stage lines and bar (None: tqdm's choice, False: silent)."""
    root = cache_dir() if root is None else root
    entry, folder = lookup(request, root)
    if entry is not None:
        log.info("%s from the cache: %s", request.describe(), folder)
        return entry, False
    try:
        from .exporter import export
    except ImportError as e:
        raise extras.missing_extra(
            extras.EXPORT, f"building a bundle from the model name {request.model!r}", e
        ) from e
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root, folder.name, request.describe()):
        if folder.is_dir():  # another process built it while this one waited
            log.info("%s from the cache: %s (built by another process)", request.describe(), folder)
            return CacheEntry.read(folder), False
        for stale in root.glob(f"{_TMP_PREFIX}{folder.name}-*"):  # left by a build that died
            shutil.rmtree(stale, ignore_errors=True)
        log.info("building %s into the cache (once; later runs reuse it): %s", request.describe(), folder)
        entry = _build(export, request, folder, progress)
        log.info("built %s in %.1f s", folder, entry.seconds)
        return entry, True


def _build(export: Any, request: Request, folder: Path, progress: bool | None) -> CacheEntry:
    key = request.key(folder.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{folder.name}-", dir=folder.parent))
    try:
        suffix = metadata.PLAN_SUFFIX if request.engine == "tensorrt" else metadata.ONNX_SUFFIX
        target = tmp / f"{_label(request.model)}{suffix}"
        start = time.perf_counter()
        with warnings.catch_warnings():
            # The Encoder that loads the entry warns of random weights; the export need not say it too.
            warnings.simplefilter("ignore", metadata.RandomWeightsWarning)
            export(
                request.model,
                target,
                weights=request.weights,
                pretrained=request.pretrained,
                random_weights=request.random_weights,
                image_size=request.image_size,
                precision=request.precision,
                max_batch=request.max_batch,
                text=request.text,
                seed=RANDOM_WEIGHTS_SEED,
                quiet=progress is False,
            )
        record = {
            "key": key,
            "bundle": target.name,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - start, 3),
        }
        (tmp / ENTRY_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; an entry is shared like any cache
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CacheEntry.read(folder)


def entries(root: Path | None = None) -> list[CacheEntry]:
    """Every entry in the cache, by model then creation time."""
    root = cache_dir() if root is None else root
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.is_dir() and not folder.name.startswith("."):
            with contextlib.suppress(ValueError):
                found.append(CacheEntry.read(folder))
    return sorted(found, key=lambda e: (e.model, e.created))


def clear(model: str | None = None, root: Path | None = None) -> list[CacheEntry]:
    """Remove every entry (or those of ``model``); returns the removed ones. An entry is renamed away
    before it is deleted, so no process ever sees half of one. Clearing everything also removes what
    dead builds left and the remembered weights hashes (builds in progress are left alone)."""
    root = cache_dir() if root is None else root
    removed = [e for e in entries(root) if model is None or e.model == model]
    for entry in removed:
        trash = root / f"{_TRASH_PREFIX}{entry.path.name}-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):  # another process cleared it first
            os.rename(entry.path, trash)
            shutil.rmtree(trash, ignore_errors=True)
    if model is None and root.is_dir():
        for leftover in [*root.glob(f"{_TRASH_PREFIX}*"), root / _HASHES]:
            shutil.rmtree(leftover, ignore_errors=True)
        for build in root.glob(f"{_TMP_PREFIX}*"):
            _remove_dead_build(root, build)
    return removed


def _remove_dead_build(root: Path, build: Path) -> None:
    """Remove the temporary folder of a build unless a process holds its entry's lock (building it)."""
    try:
        from filelock import FileLock, Timeout
    except ImportError:  # no builds can have run without the export extra
        return
    name = build.name.removeprefix(_TMP_PREFIX).rsplit("-", 1)[0]
    lock = FileLock(root / _LOCKS / f"{name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return
    try:
        shutil.rmtree(build, ignore_errors=True)
    finally:
        lock.release()
