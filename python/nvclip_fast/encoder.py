"""``Encoder``: images and text in, CLIP embeddings out, over TensorRT, ONNX Runtime or PyTorch.

Images go through the native ``BatchQueue``: every caller's images are copied into one staging
ring, batched together (up to ``max_batch`` images or ``max_delay_ms``), preprocessed by
``resize_normalize`` straight into the engine's input and run on one of ``streams`` slots. Text is
tokenized in Python (no torch needed) and run on the text tower synchronously.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _C, metadata, trt_library
from ._C import EngineError
from .images import (
    DECODE_AHEAD_PER_THREAD,
    as_host_pixels,
    as_image_list,
    decode_image,
    is_torch_tensor,
    ordered_map,
)
from .preprocess import PreprocessSpec
from .tokenizer import CLIP_BPE_KIND, DEFAULT_CONTEXT_LENGTH, Tokenizer, load_tokenizer

ON_ERROR = ("raise", "nan")
OUTPUTS = ("numpy", "torch")
MIB = 1 << 20
# Host staging ring: CPU engines need little (a batch of decoded images); CUDA engines keep
# several batches in flight (streams x max_batch x image bytes, plus room to queue the next).
DEFAULT_STAGING_MB = {"cpu": 64, "cuda": 256}
# submit() decodes and queues this many batches' worth of images at a time, so a long list of
# files never holds more than about that many decoded images at once.
CHUNK_BATCHES = 4
DEFAULT_TEMPLATE = "a photo of a {}."
_ENCODED = (str, os.PathLike, bytes, bytearray, memoryview)  # items that need decoding: worth a thread
# Zero-shot logits scale when the bundle has no sidecar: CLIP's learned temperature ends at its cap, 100.
DEFAULT_LOGIT_SCALE = 100.0


class ItemError(ValueError):
    """An image that could not be embedded: ``index`` in the caller's list and ``reason``."""

    def __init__(self, index: int, reason: str):
        super().__init__(reason if reason.startswith(f"images[{index}]") else f"images[{index}]: {reason}")
        self.index = index
        self.reason = reason


@dataclass(frozen=True)
class _Towers:
    """What an Encoder runs: engines, preprocessing and tokenizer, from a bundle or a model. The
    text tower and tokenizer are made on first use (an image-only job never loads them)."""

    image: _C.Engine
    text: Callable[[], _C.Engine] | None
    spec: PreprocessSpec
    tokenizer: Callable[[], Tokenizer] | None
    embed_dim: int
    name: str
    logit_scale: float | None = None
    logit_bias: float | None = None
    meta: metadata.Metadata | None = None


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` -> (kind, index); auto stays ``"auto"``."""
    if device in ("auto", "cpu"):
        return device, 0
    kind, _, index = device.partition(":")
    if kind == "cuda" and (index == "" or index.isdigit()):
        return "cuda", int(index or 0)
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _check_cuda(index: int) -> None:
    count = _C.cuda_device_count()
    if count == 0:
        raise EngineError(
            f"device 'cuda:{index}' requested but no CUDA device is usable: {_C.cuda_unavailable_reason()}"
        )
    if index >= count:
        raise EngineError(f"device 'cuda:{index}' requested but only {count} CUDA device(s) are visible")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (NaN rows stay NaN)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return x / norms


def top_labels(probs: np.ndarray, labels: Sequence[str], top_k: int) -> list[tuple[str, float]]:
    """The ``top_k`` (label, probability) pairs of one row, most probable first; [] for a NaN row."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if np.isnan(probs).any():
        return []
    top = np.argsort(-probs, kind="stable")[:top_k]
    return [(labels[k], float(probs[k])) for k in top]


def _resolve(future: concurrent.futures.Future, compute: Callable[[], Any]) -> None:
    """Settle ``future`` with ``compute()`` or its exception (never leave it pending)."""
    try:
        future.set_result(compute())
    except BaseException as e:  # a bug here must reach the caller, not vanish in a callback
        future.set_exception(e)


class Encoder:
    """CLIP embeddings of images and text.

    ``Encoder("vith.plan")`` runs a TensorRT plan on the GPU; ``Encoder("vith.onnx", device="cpu")``
    ONNX Runtime; ``Encoder.from_open_clip(...)`` the open_clip model in PyTorch. The sidecar
    (``vith.json``) is found by stem; without one the input size is read from the engine and
    open_clip's default preprocessing is used, with a warning.

    Thread-safe: any number of threads may call :meth:`embed` / :meth:`submit` at once, and their
    images are batched together. ``threads``: CPU threads for preprocessing and decoding (and ONNX
    Runtime's intra-op threads); None = every core.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "auto",
        max_batch: int | None = None,
        max_delay_ms: float = 2.0,
        streams: int = 2,
        staging_mb: int | None = None,
        threads: int | None = None,
    ):
        kind, index = parse_device(device)
        towers = _load_bundle(Path(path), kind, index, threads)
        self._start(
            towers,
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            streams=streams,
            staging_mb=staging_mb,
            threads=threads,
        )

    @classmethod
    def from_open_clip(
        cls,
        model: str,
        *,
        weights: str | os.PathLike[str] | None = None,
        pretrained: str | None = None,
        random_weights: bool = False,
        image_size: int | None = None,
        device: str = "auto",
        precision: str = "fp32",
        max_batch: int | None = None,
        max_delay_ms: float = 2.0,
        streams: int = 2,
        staging_mb: int | None = None,
        threads: int | None = None,
    ) -> Encoder:
        """An open_clip model run in PyTorch (GPU without TensorRT, or CPU): exactly one of
        ``weights`` (a checkpoint), ``pretrained`` (an open_clip tag) or ``random_weights``."""
        kind, index = parse_device(device)
        if kind == "auto":
            import torch

            kind = "cuda" if _C.cuda_device_count() > 0 and torch.cuda.is_available() else "cpu"
        towers = _load_open_clip(
            model,
            weights=weights,
            pretrained=pretrained,
            random_weights=random_weights,
            image_size=image_size,
            device=kind,
            index=index,
            precision=precision,
            max_batch=max_batch,
        )
        return cls._over(
            towers,
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            streams=streams,
            staging_mb=staging_mb,
            threads=threads,
        )

    @classmethod
    def from_engine(
        cls,
        image: _C.Engine,
        spec: PreprocessSpec,
        *,
        text: _C.Engine | None = None,
        tokenizer: Callable[[], Tokenizer] | None = None,
        name: str = "custom",
        logit_scale: float | None = None,
        logit_bias: float | None = None,
        max_batch: int | None = None,
        max_delay_ms: float = 2.0,
        streams: int = 2,
        staging_mb: int | None = None,
        threads: int | None = None,
    ) -> Encoder:
        """An Encoder over engines of your own (``_C.Engine`` subclasses or ``_C.TrtEngine``): the
        image engine takes ``[B, 3, S, S]`` (S = ``spec.size``) and returns ``[B, D]``; ``tokenizer``
        makes the text engine's token ids (called once, on first use)."""
        towers = _Towers(
            image,
            (lambda: text) if text is not None else None,
            spec,
            tokenizer,
            image.info.outputs[0].shape[1],
            name,
            logit_scale,
            logit_bias,
        )
        return cls._over(
            towers,
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            streams=streams,
            staging_mb=staging_mb,
            threads=threads,
        )

    @classmethod
    def _over(cls, towers: _Towers, **options: Any) -> Encoder:
        encoder = cls.__new__(cls)
        encoder._start(towers, **options)
        return encoder

    def _start(
        self,
        towers: _Towers,
        *,
        max_batch: int | None,
        max_delay_ms: float,
        streams: int,
        staging_mb: int | None,
        threads: int | None,
    ) -> None:
        self._towers = towers
        device = towers.image.info.device
        stage = _C.ResizeNormalizeStage(towers.spec._params, device, threads or 0)
        staging = (staging_mb if staging_mb is not None else DEFAULT_STAGING_MB[device]) * MIB
        self._queue = _C.BatchQueue(
            towers.image,
            stage,
            max_batch=max_batch or 0,
            max_delay_ms=max_delay_ms,
            streams=streams,
            staging_bytes=staging,
        )
        self._text_lock = threading.Lock()
        self._text_engine: _C.Engine | None = None
        self._text_runner: _C.EngineRunner | None = None
        self._tokenizer: Tokenizer | None = None
        self._label_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], np.ndarray] = {}
        decode_threads = threads or os.cpu_count() or 1
        self._decode_ahead = decode_threads * DECODE_AHEAD_PER_THREAD
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=decode_threads, thread_name_prefix="nvclip-decode"
        )
        self._closed = False

    # -- properties -----------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self._towers.embed_dim

    @property
    def spec(self) -> PreprocessSpec:
        """The preprocessing applied to every image."""
        return self._towers.spec

    @property
    def device(self) -> str:
        info = self._towers.image.info
        return "cpu" if info.device == "cpu" else f"cuda:{info.device_index}"

    @property
    def max_batch(self) -> int:
        return self._queue.max_batch

    def stats(self) -> dict[str, int]:
        """The queue's counters: batches run (and failed), images, requests, the largest batch, ..."""
        return dict(self._queue.stats())

    @property
    def model(self) -> str:
        return self._towers.name

    @property
    def metadata(self) -> metadata.Metadata | None:
        """The bundle's sidecar (None without one, or for from_open_clip)."""
        return self._towers.meta

    @property
    def logit_scale(self) -> float | None:
        return self._towers.logit_scale

    @property
    def logit_bias(self) -> float | None:
        return self._towers.logit_bias

    # -- images ---------------------------------------------------------------------------------

    def submit(
        self, images: Any, *, normalize: bool = True, on_error: str = "raise", output: str = "numpy"
    ) -> concurrent.futures.Future:
        """Queue ``images`` and return a Future of their (N, D) float32 embeddings, in order.

        ``images`` takes what :func:`nvclip_fast.preprocess` takes: a sequence of uint8 numpy arrays
        (H, W, 3) RGB, (H, W) gray, (H, W, 4) RGBA, PIL images, file paths, encoded bytes, uint8
        torch tensors (H, W, C), or an (N, H, W, C) array. Items are decoded here, in parallel, and
        queued a few batches at a time (so memory stays bounded); this call returns once all are
        queued. With ``on_error="raise"`` an undecodable item raises ``ItemError`` (a ValueError
        naming its index) at once, and one refused by preprocessing sets the Future's exception;
        with ``on_error="nan"`` bad items get NaN rows. ``normalize`` L2-normalizes the rows (the
        exported engines already do). ``output``: ``"numpy"`` or ``"torch"``. Callbacks added to the
        Future run on the queue's completion thread: they must not wait on this Encoder.
        """
        self._check_args(on_error, output)
        items = as_image_list(images)
        chunk = max(1, self.max_batch * CHUNK_BATCHES)
        parts = []
        for start in range(0, len(items), chunk):
            pixels = self._decode(items[start : start + chunk], start, on_error)
            parts.append(self._submit_decoded(pixels, start, normalize, on_error))
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        remaining = [len(parts)]
        lock = threading.Lock()

        def gather() -> Any:
            for part in parts:
                if part.exception() is not None:
                    raise part.exception()
            rows = [p.result() for p in parts]
            result = np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)
            return self._convert(result, output)

        def one_done(_: concurrent.futures.Future) -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                _resolve(future, gather)

        if not parts:
            _resolve(future, gather)
        for part in parts:
            part.add_done_callback(one_done)
        return future

    def embed(
        self, images: Any, *, normalize: bool = True, on_error: str = "raise", output: str = "numpy"
    ) -> Any:
        """(N, D) float32 embeddings of ``images``, in order (N = 0 included). See :meth:`submit`."""
        return self.submit(images, normalize=normalize, on_error=on_error, output=output).result()

    def _check_args(self, on_error: str, output: str) -> None:
        if self._closed:
            raise EngineError("this Encoder is closed")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")

    def _decode_one(self, item: Any, index: int) -> np.ndarray:
        if is_torch_tensor(item) and item.is_cuda:
            item = item.cpu()  # the queue stages host memory; on the host RGBA goes through Pillow too
        return as_host_pixels(decode_image(item, index, self.spec))

    def _decode(self, items: list[Any], offset: int, on_error: str) -> list[Any]:
        """Host pixels per item (files and bytes decoded in parallel); None for a bad one with
        on_error="nan", else ItemError naming it. ``offset`` is the caller's index of items[0]."""
        if sum(isinstance(item, _ENCODED) for item in items) > 1:
            futures = ordered_map(
                self._decode_pool,
                lambda item, k: self._decode_one(item, offset + k),
                items,
                self._decode_ahead,
            )
            results: Iterable[Callable[[], Any]] = (f.result for f in futures)
        else:  # arrays, tensors, PIL images: nothing worth a thread hop
            results = (functools.partial(self._decode_one, item, offset + k) for k, item in enumerate(items))
        pixels: list[Any] = []
        try:
            for k, result in enumerate(results):
                try:
                    pixels.append(result())
                except (ValueError, TypeError) as e:
                    if on_error == "raise":
                        raise ItemError(offset + k, str(e)) from e
                    pixels.append(None)
        except (RuntimeError, concurrent.futures.CancelledError) as e:
            if self._closed:  # close() shut the decoding pool down under us
                raise EngineError("this Encoder is closed") from e
            raise
        return pixels

    def submit_pixels(self, pixels: Sequence[np.ndarray]) -> concurrent.futures.Future:
        """Queue decoded host pixels (``decode_image``'s arrays: uint8 (H, W) or (H, W, 3), packed
        pixels) and return a Future of ``(rows, item_errors)``: the engine's (n, D) float32 rows as
        they come out, and per image "" or why preprocessing refused it (its row is NaN). An engine
        failure sets the Future's exception (EngineError)."""
        if self._closed:
            raise EngineError("this Encoder is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        if not pixels:
            future.set_result((np.zeros((0, self.dim), np.float32), []))
            return future

        def done(request: _C.Request) -> None:
            _resolve(future, lambda: (request.result(), list(request.item_errors)))

        self._queue.submit(list(pixels), done)
        return future

    def _submit_decoded(
        self, pixels: list[Any], offset: int, normalize: bool, on_error: str
    ) -> concurrent.futures.Future:
        """Queue the decoded items (None: bad, a NaN row); a Future of their (n, D) rows."""
        n = len(pixels)
        good = [i for i in range(n) if pixels[i] is not None]
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()

        def finish(queued: concurrent.futures.Future) -> np.ndarray:
            rows, item_errors = queued.result()
            failed = [k for k, why in enumerate(item_errors) if why]
            if failed and on_error == "raise":
                raise ItemError(offset + good[failed[0]], item_errors[failed[0]])
            result = np.full((n, self.dim), np.nan, dtype=np.float32)
            result[good] = rows  # refused items' rows are NaN already
            return l2_normalize(result) if normalize else result

        self.submit_pixels([pixels[i] for i in good]).add_done_callback(
            lambda queued: _resolve(future, lambda: finish(queued))
        )
        return future

    @staticmethod
    def _convert(result: np.ndarray, output: str) -> Any:
        if output == "torch":
            import torch

            return torch.from_numpy(result)
        return result

    # -- text -----------------------------------------------------------------------------------

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """open_clip's token ids for ``texts`` (int64, (M, context_length))."""
        if self._towers.tokenizer is None:
            raise EngineError(f"{self.model}: no tokenizer is known for this bundle")
        with self._text_lock:
            if self._tokenizer is None:
                self._tokenizer = self._towers.tokenizer()
        return self._tokenizer(texts)

    def embed_text(self, texts: str | Sequence[str], *, normalize: bool = True, output: str = "numpy") -> Any:
        """(M, D) float32 embeddings of ``texts``, in order."""
        self._check_args("raise", output)
        if self._towers.text is None:
            raise EngineError(f"{self.model}: this bundle has no text tower (exported with --no-text?)")
        ids = self.tokenize(texts)
        parts = []
        with self._text_lock:
            if self._text_runner is None:
                self._text_engine = self._towers.text()
                self._text_runner = _C.EngineRunner(self._text_engine)
            info = self._text_engine.info
            spec_in, spec_out, limit = info.inputs[0], info.outputs[0], info.batch[2]
            if ids.shape[1] != spec_in.shape[1]:
                raise EngineError(
                    f"the tokenizer gives {ids.shape[1]} tokens but the text tower takes {spec_in.shape[1]}"
                )
            ids = ids.astype(spec_in.dtype, copy=False)
            for start in range(0, len(ids), limit):
                parts.append(self._text_runner.run({spec_in.name: ids[start : start + limit]})[spec_out.name])
        result = (
            np.concatenate(parts).astype(np.float32, copy=False)
            if parts
            else np.zeros((0, self.dim), np.float32)
        )
        return self._convert(l2_normalize(result) if normalize else result, output)

    # -- zero-shot classification ---------------------------------------------------------------

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """(L, D) text embeddings of ``labels``, prompt-ensembled: each label's templates embedded,
        averaged, renormalized (CLIP's zero-shot recipe). Cached per (labels, templates)."""
        labels, templates = list(labels), list(templates or [DEFAULT_TEMPLATE])
        if not labels:
            raise ValueError("labels is empty")
        for t in templates:
            if "{}" not in t:
                raise ValueError(f"template {t!r} has no '{{}}' for the label")
        key = (tuple(labels), tuple(templates))
        with self._text_lock:
            cached = self._label_cache.get(key)
        if cached is not None:
            return cached
        prompts = [t.format(label) for label in labels for t in templates]
        per_prompt = self.embed_text(prompts).reshape(len(labels), len(templates), self.dim)
        embeds = l2_normalize(per_prompt.mean(axis=1))
        with self._text_lock:
            self._label_cache[key] = embeds
        return embeds

    def label_probabilities(self, image_embeds: np.ndarray, label_embeds: np.ndarray) -> np.ndarray:
        """(N, L) softmax over labels of ``logit_scale * image @ label.T`` (NaN rows stay NaN)."""
        scale = self.logit_scale if self.logit_scale is not None else DEFAULT_LOGIT_SCALE
        logits = scale * (l2_normalize(np.asarray(image_embeds, np.float32)) @ label_embeds.T)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def classify(
        self,
        images: Any,
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        top_k: int = 5,
        *,
        on_error: str = "raise",
    ) -> list[list[tuple[str, float]]]:
        """Zero-shot: per image, the ``top_k`` (label, probability) pairs, most probable first.
        Text embeddings are computed once per (labels, templates). With ``on_error="nan"`` a bad
        image gets an empty list."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        text = self.label_embeddings(labels, templates)
        probs = self.label_probabilities(self.embed(images, on_error=on_error), text)
        return [top_labels(row, labels, top_k) for row in probs]

    # -- lifetime -------------------------------------------------------------------------------

    def close(self, cancel: bool = False) -> None:
        """Finish the work in flight (``cancel=True``: fail it with an error) and release the engines."""
        if self._closed:
            return
        self._closed = True
        self._queue.close(cancel=cancel)
        with self._text_lock:
            if self._text_runner is not None:
                self._text_runner.close()
                self._text_runner = None
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Encoder({self.model!r}, dim={self.dim}, device={self.device!r}, max_batch={self.max_batch}, "
            f"size={self.spec.size})"
        )


# ---------------------------------------------------------------------------------------------------
# Loading


def _load_bundle(path: Path, kind: str, index: int, threads: int | None) -> _Towers:
    """Engines + preprocessing + tokenizer from an exported bundle (plan, ONNX or sidecar path)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (metadata.PLAN_SUFFIX, metadata.ONNX_SUFFIX, metadata.SIDECAR_SUFFIX):
        raise ValueError(f"{path}: expected a .plan (TensorRT), .onnx (ONNX Runtime) or .json (sidecar) file")
    sidecar = path if suffix == metadata.SIDECAR_SUFFIX else metadata.bundle_paths(path).sidecar
    meta = metadata.load(sidecar) if sidecar.is_file() else None
    if suffix == metadata.SIDECAR_SUFFIX:
        image_tower = meta.towers["image"]
        use_plan = (
            image_tower.plan is not None and kind != "cpu" and (kind == "cuda" or _C.cuda_device_count() > 0)
        )
        path = meta.path(image_tower.plan if use_plan else image_tower.onnx)
        suffix = path.suffix.lower()
    bundle = metadata.bundle_paths(path)

    if suffix == metadata.PLAN_SUFFIX:
        if kind == "cpu":
            raise ValueError(f"{path}: TensorRT plans run on CUDA devices; use the .onnx with device='cpu'")

        def make(p: Path, tower: str) -> _C.Engine:
            return _C.TrtEngine(p, device=index, search_dirs=trt_library.search_dirs())
    else:
        if kind == "auto":
            from .engines import cuda_provider_available

            kind = "cuda" if _C.cuda_device_count() > 0 and cuda_provider_available() else "cpu"
        if kind == "cuda":
            _check_cuda(index)
        precision = meta.precision if meta is not None else "fp32"

        def make(p: Path, tower: str) -> _C.Engine:
            from .engines import OnnxEngine

            batch = meta.towers[tower].batch if meta is not None and tower in meta.towers else None
            return OnnxEngine(
                p, device=kind, device_index=index, precision=precision, threads=threads, batch=batch
            )

    image = make(path, "image")
    text_path: Path | None = (bundle.plan if suffix == metadata.PLAN_SUFFIX else bundle.onnx)["text"]
    if meta is not None:
        text_tower = meta.towers.get("text")
        text_file = (
            None
            if text_tower is None
            else (text_tower.plan if suffix == metadata.PLAN_SUFFIX else text_tower.onnx)
        )
        text_path = meta.path(text_file) if text_file else None
    # Made on first use, once (the tokenizer of a bundle without sidecar reads its context length).
    text = (
        functools.cache(lambda: make(text_path, "text"))
        if text_path is not None and text_path.is_file()
        else None
    )

    engine_size, engine_dim = image.info.inputs[0].shape[-1], image.info.outputs[0].shape[1]
    if meta is not None:
        if (meta.preprocess.size, meta.embed_dim) != (engine_size, engine_dim):
            raise EngineError(
                f"{sidecar} does not describe {path}: it says {meta.preprocess.size} px -> "
                f"{meta.embed_dim}-d, the engine takes {engine_size} px -> {engine_dim}-d (a stale sidecar?)"
            )
        spec = PreprocessSpec(**meta.preprocess.to_dict())
        tokenizer = None
        if meta.tokenizer is not None:
            tok, base = meta.tokenizer.to_dict(), sidecar.parent
            tokenizer = lambda: load_tokenizer(tok, base)  # noqa: E731
        return _Towers(
            image, text, spec, tokenizer, meta.embed_dim, meta.model, meta.logit_scale, meta.logit_bias, meta
        )

    warnings.warn(
        f"{path}: no sidecar {sidecar.name}; preprocessing uses open_clip's defaults at {engine_size} px "
        "(OpenAI mean/std, bicubic, 'shortest') and text, if any, the CLIP BPE tokenizer: check they match",
        UserWarning,
        stacklevel=3,
    )
    tokenizer = None
    if text is not None:

        def tokenizer() -> Tokenizer:
            shape = text().info.inputs[0].shape
            context = shape[1] if len(shape) > 1 else DEFAULT_CONTEXT_LENGTH
            return load_tokenizer({"kind": CLIP_BPE_KIND, "vocab": None, "context_length": context})

    return _Towers(image, text, PreprocessSpec(size=engine_size), tokenizer, engine_dim, path.stem)


def _load_open_clip(
    model: str,
    *,
    weights: Any,
    pretrained: str | None,
    random_weights: bool,
    image_size: int | None,
    device: str,
    index: int,
    precision: str,
    max_batch: int | None,
) -> _Towers:
    import torch

    from . import models
    from .engines import TorchEngine

    if precision not in metadata.PRECISIONS:
        raise ValueError(f"precision must be one of {list(metadata.PRECISIONS)}, got {precision!r}")
    if device == "cuda":
        _check_cuda(index)
        if not torch.cuda.is_available():
            raise EngineError(
                "device='cuda' needs a CUDA build of torch (torch.cuda.is_available() is False)"
            )
    loaded = models.load_model(
        model, weights=weights, pretrained=pretrained, random_weights=random_weights, image_size=image_size
    )
    net = loaded.model_in(precision)
    net = net.to(torch.device(device, index) if device == "cuda" else torch.device("cpu")).eval()
    embed_dim = int(models.model_config(model)["embed_dim"])
    dtype = "float16" if precision == "fp16" else "float32"
    limit = max_batch or metadata.DEFAULT_MAX_BATCH
    common = {
        "embed_dim": embed_dim,
        "device": device,
        "device_index": index,
        "batch": metadata.BatchProfile(1, limit, limit),
    }
    image = TorchEngine(
        net, "image", input_shape=(3, loaded.image_size, loaded.image_size), input_dtype=dtype, **common
    )

    def text() -> _C.Engine:
        return TorchEngine(net, "text", input_shape=(loaded.context_length,), input_dtype="int64", **common)

    spec = PreprocessSpec(**loaded.preprocess.to_dict())
    tok = loaded.tokenizer.to_dict()
    with torch.no_grad():
        scale = float(net.logit_scale.exp()) if getattr(net, "logit_scale", None) is not None else None
        bias = float(net.logit_bias) if getattr(net, "logit_bias", None) is not None else None
    return _Towers(image, text, spec, lambda: load_tokenizer(tok), embed_dim, model, scale, bias)
