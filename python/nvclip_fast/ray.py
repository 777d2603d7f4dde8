"""Embeddings on a Ray cluster: one Encoder per Ray Data actor (the ``ray`` extra: ``ray[data]``).

- :class:`Embedder`: a callable class for ``Dataset.map_batches`` (``batch_format="pyarrow"``): it
  opens one Encoder when its actor starts and maps a batch holding a column of encoded image bytes
  (or file paths) to the same batch plus ``embedding`` (a fixed-size list of float32, the model's
  dimension; null for an image that failed), ``width`` and ``height`` (the image's size as stored;
  null for a failure) and ``error`` (null, or the one-line reason that image failed). A bad image
  never raises and never moves another row: every row keeps its place. The batch's schema metadata
  carries the Encoder's provenance under ``provenance.PARQUET_KEY``, and ``Dataset.write_parquet``
  keeps it, so every part file records what made its numbers.
- :func:`embed_dataset`: ``ds.map_batches(Embedder, ...)`` with a pool of ``actors`` actors, each
  given ``num_gpus`` GPUs and ``num_cpus`` CPUs.
- :func:`embed_with_ray`: ``nvclip-fast embed ... --ray``: the inputs listed as ``embed`` lists them,
  cut into partitions, read and embedded on the cluster, each partition written as one Parquet part
  file of the output folder (``part-<index>-<digest>.parquet``, the digest of the partition's ids)
  with the columns and provenance of ``embed``'s Parquet output.

Inputs as Ray Data reads them: ``ray.data.read_binary_files(paths, include_paths=True)`` (columns
``bytes`` and ``path``), ``ray.data.read_webdataset(shards, decoder=None)`` (each member's bytes
under its extension: ``image_column="jpg"``; without ``decoder=None`` Ray decodes the images
itself), ``ray.data.read_parquet`` of a table with an image-bytes column.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import extras
from .embed_files import DTYPES, Summary, _listed, _read, progress_bar
from .images import Encoded
from .outputs import _parquet_schema, atomic_path, write_errors
from .provenance import PARQUET_KEY, Provenance, ProvenanceError
from .sources import Source

if TYPE_CHECKING:
    import pyarrow as pa

    from .encoder import Encoder

RAY = "ray"  # the extra
# Ray 2.51 deprecated map_batches(concurrency=...) in favour of compute=ActorPoolStrategy(...).
COMPUTE_SINCE = (2, 51)
DEFAULT_BATCH_SIZE = 256  # rows per map_batches call (the Encoder batches them by its own max_batch)
# Images per partition of `embed --ray` (a tar shard's members are never mixed with other inputs):
# what a rerun with --resume redoes at most per interrupted partition.
DEFAULT_PARTITION_IMAGES = 1024
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
# The errors of a part's partition (JSON: [{"path": id, "error": reason}, ...]), in its schema metadata.
ERRORS_KEY = b"nvclip_fast_errors"
# Columns of the dataset `embed --ray` builds from the listed inputs, beside the Embedder's.
ID, FILE, OFFSET, SIZE, PARTITION, IMAGE = "path", "file", "offset", "size", "partition", "bytes"
EMBEDDING, WIDTH, HEIGHT, ERROR = "embedding", "width", "height", "error"


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise extras.missing_extra(RAY, "Ray Data jobs", e) from e
    return ray


def _version(text: str) -> tuple[int, int]:
    major, minor = [*text.split("."), "0"][:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _actor_cpus() -> int:
    """The CPUs Ray gave this actor (its decoding and ONNX Runtime threads), at least 1; every core
    outside a Ray actor."""
    ray = sys.modules.get("ray")  # inside an actor Ray is imported; elsewhere not needed
    context = ray.get_runtime_context() if ray is not None and ray.is_initialized() else None
    if context is None or context.get_actor_id() is None:
        return os.cpu_count() or 1
    return max(1, round(context.get_assigned_resources().get("CPU", 1)))


ModelSource = str | os.PathLike[str] | Callable[[], "Encoder"]


class Embedder:
    """A ``Dataset.map_batches`` callable class (``batch_format="pyarrow"``): one Encoder per actor.

    ``model``: an exported bundle (a path every node can read) or a function that opens the Encoder
    (``functools.partial(Encoder.from_pretrained, "ViT-B-32", pretrained=TAG)``: the bundle cache of
    each node). ``image_column``: encoded image bytes (``binary``), or file paths (``string``: read
    by the actor, regular files only). ``id_column``: when the batch has it, names each image in its
    error. ``device``, ``threads`` (default: the CPUs Ray gave the actor) and ``options`` (the
    Encoder's queue settings: ``max_batch``, ...) open a bundle; a function decides them itself.

    A row that arrives with a non-null ``error`` (an upstream step failed it) keeps that error and
    is not embedded.
    """

    def __init__(
        self,
        model: ModelSource,
        *,
        image_column: str = IMAGE,
        id_column: str | None = ID,
        device: str | Sequence[str] = "auto",
        threads: int | None = None,
        **options: Any,
    ):
        from .encoder import Encoder

        self.threads = threads or _actor_cpus()
        if callable(model):
            self.encoder = model()
        else:
            self.encoder = Encoder(model, device=device, threads=self.threads, **options)
        self.image_column = image_column
        self.id_column = id_column
        self.provenance = self.encoder.provenance()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        n = len(batch)
        if self.image_column not in batch.column_names:
            raise KeyError(f"no column {self.image_column!r} (columns: {batch.column_names})")
        images = batch.column(self.image_column).to_pylist()
        ids = batch.column(self.id_column).to_pylist() if self.id_column in batch.column_names else None
        errors: list[str | None] = (
            batch.column(ERROR).to_pylist() if ERROR in batch.column_names else [None] * n
        )
        todo = [k for k in range(n) if errors[k] is None]

        def load(k: int) -> Encoded:
            name = str(ids[k]) if ids is not None else f"{self.image_column}[{k}]"
            value = images[k]
            if isinstance(value, str):
                return _read(Source(name, value))
            if value is None:
                raise ValueError("no image (null)")
            return _read_bytes(value, name)

        dim = self.encoder.dim
        rows = np.zeros((n, dim), np.float32)
        sizes = np.zeros((n, 2), np.int32)
        ok = np.zeros(n, bool)
        with self.encoder._stream(
            todo, load=load, batch=self.encoder.max_batch, workers=self.threads
        ) as stream:
            for group in stream:
                for item in group:
                    k = todo[item.index]
                    if item.row is None:
                        errors[k] = item.error or "unknown error"
                    else:
                        rows[k], sizes[k], ok[k] = item.row, item.size, True
        failed = pa.array(~ok)
        columns = {
            EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), dim, mask=failed),
            WIDTH: pa.array(sizes[:, 0], pa.int32(), mask=~ok),
            HEIGHT: pa.array(sizes[:, 1], pa.int32(), mask=~ok),
            ERROR: pa.array(errors, pa.string()),
        }
        for name, column in columns.items():
            if name in batch.column_names:
                batch = batch.set_column(batch.column_names.index(name), name, column)
            else:
                batch = batch.append_column(name, column)
        metadata = {**(batch.schema.metadata or {}), PARQUET_KEY: self.provenance.to_json().encode()}
        return batch.replace_schema_metadata(metadata)


def _read_bytes(value: bytes, name: str) -> Encoded:
    if not value:
        raise ValueError("empty file")
    return Encoded(value, name)


def embed_dataset(
    ds: Any,
    model: ModelSource,
    *,
    image_column: str = IMAGE,
    id_column: str | None = ID,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    actors: int | tuple[int, int] = 1,
    device: str | Sequence[str] = "auto",
    embedder: type[Embedder] = Embedder,
    ray_remote_args: dict[str, Any] | None = None,
    **options: Any,
) -> Any:
    """``ds`` mapped by :class:`Embedder` (``embedder``, or a subclass): the same rows plus
    ``embedding``, ``width``, ``height`` and ``error``, the provenance in each block's schema
    metadata (``ds.write_parquet(folder)`` stores it in every part file).

    ``actors``: the pool's size, or ``(min, max)`` to let Ray scale it; each actor loads one Encoder
    and takes ``num_gpus`` GPUs (1: one actor per GPU) and ``num_cpus`` CPUs (its decoding and ONNX
    Runtime threads). ``batch_size`` rows per call (Ray requires one with ``num_gpus``). On Ray
    >= 2.51 the pool is ``compute=ray.data.ActorPoolStrategy(...)``, before that ``concurrency=``.
    ``ray_remote_args`` go to the actors (Ray Data restarts a dead actor and retries its batch by
    default: ``max_restarts=-1``, ``max_task_retries=-1``). ``device`` and ``options`` open a bundle
    (see :class:`Embedder`).
    """
    ray = _ray()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not callable(model):
        model = os.path.abspath(model)  # actors do not share the driver's working directory
    constructor = {"image_column": image_column, "id_column": id_column, "device": device, **options}
    if num_cpus and "threads" not in constructor:
        constructor["threads"] = max(1, round(num_cpus))
    kwargs: dict[str, Any] = {
        "fn_constructor_args": (model,),
        "fn_constructor_kwargs": constructor,
        "batch_size": batch_size,
        "batch_format": "pyarrow",
        **(ray_remote_args or {}),
    }
    if num_gpus:
        kwargs["num_gpus"] = num_gpus
    if num_cpus:
        kwargs["num_cpus"] = num_cpus
    if _version(ray.__version__) >= COMPUTE_SINCE:
        pool = (
            {"size": actors}
            if isinstance(actors, int)
            else dict(zip(("min_size", "max_size"), actors, strict=True))
        )
        kwargs["compute"] = ray.data.ActorPoolStrategy(**pool)
    else:
        kwargs["concurrency"] = actors
    return ds.map_batches(embedder, **kwargs)


# ---------------------------------------------------------------------------------------------------
# nvclip-fast embed --ray: partitions of the listed inputs, one part file each


@dataclass(frozen=True)
class Partition:
    """Consecutive listed inputs, embedded and written together: ``part-<index>-<digest>.parquet``."""

    index: int
    sources: tuple[Source, ...]

    @property
    def name(self) -> str:
        digest = hashlib.sha256("\n".join(json.dumps(s.id) for s in self.sources).encode()).hexdigest()
        return f"{PART_PREFIX}{self.index:06d}-{digest[:16]}{PART_SUFFIX}"


def partitions(sources: Iterable[Source], size: int = DEFAULT_PARTITION_IMAGES) -> list[Partition]:
    """``sources`` cut into partitions of at most ``size``, a new one where a tar shard begins or ends."""
    if size < 1:
        raise ValueError(f"partition size must be >= 1, got {size}")
    cut: list[list[Source]] = []
    shard: str | None = None
    for source in sources:
        here = source.path if source.offset >= 0 else None
        if not cut or len(cut[-1]) >= size or here != shard:
            cut.append([])
        cut[-1].append(source)
        shard = here
    return [Partition(k, tuple(group)) for k, group in enumerate(cut)]


@dataclass
class _Part:
    """A part file found in the output folder."""

    path: Path
    provenance: Provenance
    rows: int
    errors: list[tuple[str, str]]

    @classmethod
    def read(cls, path: Path) -> _Part:
        import pyarrow.parquet as pq

        try:
            file = pq.ParquetFile(path)
        except Exception as e:
            raise ProvenanceError(f"{path}: not a readable Parquet file: {e}") from e
        metadata = file.schema_arrow.metadata or {}
        if PARQUET_KEY not in metadata:
            raise ProvenanceError(f"{path} has no provenance (no {PARQUET_KEY.decode()!r} schema metadata)")
        errors = [(e["path"], e["error"]) for e in json.loads(metadata.get(ERRORS_KEY, b"[]"))]
        return cls(
            path, Provenance.from_json(metadata[PARQUET_KEY], str(path)), file.metadata.num_rows, errors
        )

    def ids(self) -> list[str]:
        """The inputs of its partition: its rows' ids and its failures'."""
        import pyarrow.parquet as pq

        return pq.read_table(self.path, columns=[ID]).column(ID).to_pylist() + [i for i, _ in self.errors]


def _read_sources(batch: pa.Table) -> pa.Table:
    """Ray task: the bytes of each listed input (column ``bytes``), or why they cannot be read."""
    import pyarrow as pa

    data: list[bytes | None] = []
    errors = batch.column(ERROR).to_pylist()
    for k, (image_id, file, offset, size) in enumerate(
        zip(*(batch.column(c).to_pylist() for c in (ID, FILE, OFFSET, SIZE)), strict=True)
    ):
        value = None
        if errors[k] is None:
            try:
                value = _read(Source(image_id, file, offset, size)).data
            except ValueError as e:
                errors[k] = str(e)
        data.append(value)
    batch = batch.set_column(batch.column_names.index(ERROR), ERROR, pa.array(errors, pa.string()))
    return batch.append_column(IMAGE, pa.array(data, pa.binary()))


def _row(source: Source, partition: int) -> dict[str, Any]:
    file = os.path.abspath(source.path) if source.path else ""
    return {
        ID: source.id,
        FILE: file,
        OFFSET: source.offset,
        SIZE: source.size,
        PARTITION: partition,
        ERROR: source.error,
    }


def _another_job(out: Path, why: str) -> ProvenanceError:
    return ProvenanceError(
        f"--resume: {out} holds rows of another job ({why}); resume with the same model and options, or "
        "write to another output (or --overwrite)"
    )


class _Old:
    """The parts of the output folder this job replaces: ``removed`` (all their inputs are in this
    listing, or ``--overwrite``) and ``trimmed`` (some are: rewritten without them, keeping their
    other rows, failures and provenance). Retired once, when the job's rows are known to be of the
    stored model and before any of its parts is written: no row is ever in two parts."""

    def __init__(self, found: dict[str, Path], plan: Sequence[Partition], ids: set[str], overwrite: bool):
        self.ids = ids
        self.removed: list[Path] = []
        self.trimmed: list[Path] = []
        planned = {p.name for p in plan}
        for name, path in found.items():
            if overwrite:
                self.removed.append(path)
            elif name not in planned:  # a planned part is done, or replaced when its partition is
                held = set(_Part.read(path).ids())
                if held <= ids:
                    self.removed.append(path)
                elif held & ids:
                    self.trimmed.append(path)

    def retire(self) -> None:
        while self.trimmed:
            _trim(self.trimmed.pop(), self.ids)
        while self.removed:
            self.removed.pop().unlink(missing_ok=True)


def _trim(path: Path, ids: set[str]) -> None:
    """Rewrite the part ``path`` (atomically, under its name) without the rows and failures of
    ``ids``; its other rows, failures and metadata stay. Its name then no longer matches its rows
    (fewer than the partition it was written for), so no listing takes it as complete."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    metadata = dict(table.schema.metadata or {})
    errors = [e for e in json.loads(metadata.get(ERRORS_KEY, b"[]")) if e["path"] not in ids]
    metadata[ERRORS_KEY] = json.dumps(errors).encode()
    given = pc.is_in(table.column(ID), value_set=pa.array(sorted(ids), pa.string()))
    table = table.filter(pc.invert(given)).replace_schema_metadata(metadata)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


class _Writer:
    """Collects the rows of each partition as they come back and writes the partition's part file
    once every one of its inputs has its row or its error. A row that comes back twice (a retried
    batch) counts once. The parts ``old`` replaces are retired when the first batch is checked."""

    def __init__(
        self, out: Path, todo: Sequence[Partition], dtype: str, stored: Provenance | None, old: _Old
    ):
        self.out, self.dtype, self.stored, self.old = out, dtype, stored, old
        self.todo = {p.index: p for p in todo}
        self.received: dict[int, list[pa.Table]] = {p.index: [] for p in todo}
        self.seen: dict[int, set[str]] = {p.index: set() for p in todo}
        self.provenance: Provenance | None = None
        self.embedded = 0

    def check(self, batch: pa.Table) -> None:
        """The batch's provenance must be the first batch's (every actor opened the same model), and
        the first batch's the stored rows' (ProvenanceError naming the field otherwise)."""
        made = Provenance.from_json(batch.schema.metadata[PARQUET_KEY]).replace(dtype=self.dtype)
        if self.provenance is None:
            if self.stored is not None and (why := self.stored.mismatch(made, also=("dtype",))):
                raise _another_job(self.out, why)
            self.provenance = made
            self.old.retire()
        elif why := self.provenance.mismatch(made, also=("dtype",)):
            raise ProvenanceError(
                f"the actors opened different models ({why}): the model must be the same file at the "
                "same path on every node"
            )

    def take(self, batch: pa.Table) -> None:
        """Take a batch of results (checked first), writing the partitions it completes."""
        import pyarrow.compute as pc

        if not len(batch):
            return  # no rows: nothing to check or write
        self.check(batch)
        for index in pc.unique(batch.column(PARTITION)).to_pylist():
            if index not in self.received:
                continue  # written already: a retried batch's copy
            rows = batch.filter(pc.equal(batch.column(PARTITION), index))
            self.received[index].append(rows.select([ID, EMBEDDING, WIDTH, HEIGHT, ERROR]))
            self.seen[index].update(rows.column(ID).to_pylist())
            if len(self.seen[index]) == len(self.todo[index].sources):
                self._write(self.todo[index], self.received.pop(index))

    def missing(self) -> int:
        """Inputs of partitions not written (0 once the job is through)."""
        return sum(len(self.todo[i].sources) - len(self.seen[i]) for i in self.received)

    def _write(self, partition: Partition, tables: list[pa.Table]) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        assert self.provenance is not None
        table = pa.concat_tables(tables)
        where = {image_id: k for k, image_id in enumerate(table.column(ID).to_pylist())}
        table = table.take([where[s.id] for s in partition.sources])  # input order, each id once
        failed = table.column(ERROR).is_valid()
        errors = [
            {"path": i, "error": e}
            for i, e in zip(table.column(ID).to_pylist(), table.column(ERROR).to_pylist(), strict=True)
            if e is not None
        ]
        good = table.filter(pc.invert(failed))
        dim = self.provenance.embed_dim
        values = good.column(EMBEDDING).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        schema = _parquet_schema(dim, self.dtype, self.provenance)
        schema = schema.with_metadata({**schema.metadata, ERRORS_KEY: json.dumps(errors).encode()})
        rows = pa.Table.from_arrays(
            [
                good.column(ID),
                pa.FixedSizeListArray.from_arrays(pa.array(values.astype(self.dtype)), dim),
                good.column(WIDTH),
                good.column(HEIGHT),
            ],
            schema=schema,
        )
        with atomic_path(self.out / partition.name) as tmp:
            pq.write_table(rows, tmp)
        self.embedded += len(rows)


def check_ray_output(out: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> Path:
    """``out`` as the output folder of ``embed --ray`` (made absolute: ``.`` is the current folder,
    its errors file beside it): refused (ValueError) for the root folder, which has nothing beside
    it; refused (FileExistsError) when it is a file, or holds part files and the job was told
    neither to ``resume`` nor to ``overwrite``."""
    from .outputs import OutputExistsError

    path = Path(os.path.abspath(out))
    if resume and overwrite:
        raise ValueError(
            "resume and overwrite exclude each other: resume adds to the output, overwrite replaces it"
        )
    if not path.name:
        raise ValueError(
            f"{out} is the root folder: -o must name a folder with a parent, for its errors file "
            "beside it (e.g. /embeddings)"
        )
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} is a file: --ray writes a folder of Parquet part files")
    if not resume and not overwrite and path.is_dir() and any(path.glob(f"{PART_PREFIX}*{PART_SUFFIX}")):
        raise OutputExistsError(
            f"{path} holds part files: pass --overwrite to replace them, or --resume to add the missing ones"
        )
    return path


def _on_cpu(device: str | Sequence[str]) -> bool:
    """Whether the actors' ``device`` is the CPU ("cpu", "cpu,cpu", ["cpu", ...]); CUDA devices this
    process cannot see ("cuda:all" on a driver without a GPU) are not."""
    from ._C import EngineError
    from .devices import parse_devices

    try:
        return parse_devices(device).kind == "cpu"
    except EngineError:
        return False


def actor_pool(
    cluster_gpus: float,
    *,
    actors: int | None = None,
    num_gpus: float | None = None,
    device: str | Sequence[str] = "auto",
) -> tuple[int, float | None]:
    """The actor pool of ``embed --ray`` on a cluster with ``cluster_gpus`` GPUs: (actors, GPUs per
    actor, None for none). ``device="cpu"``: no GPU, 1 actor unless given (ValueError for GPUs
    asked with it). Otherwise each actor takes ``num_gpus`` (default 1 where the cluster has GPUs,
    else none) and the pool defaults to one actor per ``num_gpus`` of the cluster's GPUs, else 1."""
    if _on_cpu(device):
        if num_gpus:
            raise ValueError(f"device cpu takes no GPU: {num_gpus} GPUs per actor asked")
        return actors or 1, None
    if num_gpus is None:
        num_gpus = 1 if cluster_gpus else None
    if actors is None:
        actors = max(1, int(cluster_gpus // num_gpus)) if num_gpus else 1
    return actors, num_gpus


def _model_provenance(model: ModelSource, dtype: str, options: dict[str, Any]) -> Provenance:
    """The provenance of ``model`` opened in this process, as an actor opens it (``options``: those
    of :func:`embed_dataset`), without Ray."""
    cls = options.get("embedder", Embedder)
    opened = cls(model, **{k: v for k, v in options.items() if k not in ("embedder", "ray_remote_args")})
    with opened.encoder:
        return opened.provenance.replace(dtype=dtype)


def embed_with_ray(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    model: ModelSource,
    out: str | os.PathLike[str],
    *,
    address: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    actors: int | None = None,
    num_gpus: float | None = None,
    num_cpus: float | None = 1,
    dtype: str = "float32",
    partition_images: int = DEFAULT_PARTITION_IMAGES,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    **embedder: Any,
) -> Summary:
    """``nvclip-fast embed INPUTS -m MODEL -o OUT/ --ray [ADDRESS]``: every image named by ``inputs``
    (listed as ``embed_files`` lists them: files, folders, ``@lists``, tar shards) embedded on a Ray
    cluster into the folder ``out``, one part file per partition of ``partition_images`` inputs.

    Each part (``part-<index>-<digest of its ids>.parquet``) has ``embed``'s Parquet columns
    (``path``, ``embedding``, ``width``, ``height``), rows in input order, the provenance in its
    schema metadata, and its partition's failures in the metadata too; it is written by this process
    (the driver) under a temporary name and renamed, so a part that exists is complete. The failures
    of every partition, inputs given twice (``duplicate``) included, are listed in
    ``OUT.errors.jsonl`` beside the folder (written only when one failed, at the end).

    ``resume`` skips the partitions whose part exists (their failures are not retried: ``overwrite``
    redoes everything). Part files of another listing of the inputs are kept when they hold no id of
    this one, removed when all their ids are in this one, and otherwise rewritten without this
    listing's ids (their images are embedded again in this listing's partitions): rows of inputs not
    given this time are kept, as ``embed`` keeps them. Rows made by another model, preprocessing,
    precision or dtype are refused (ProvenanceError naming the field), by this process before the
    job: the dtype, and with nothing left to do the model too (opened here, without Ray, which is
    then not started); else on the job's first batch. ``overwrite`` replaces the old parts: those of
    this listing's partitions as each is written, the others removed on the job's first batch (a job
    that cannot start leaves the folder as it was). Parts change only once the first batch's rows
    are known to be of the stored model; every batch must be of the first one's (ProvenanceError:
    a node whose model path holds another file).

    Ray: an existing connection is used as it is; else ``ray.init(address=address)`` (None: the
    cluster of ``$RAY_ADDRESS`` or of the last ``ray start`` on this machine, else a local one), shut
    down at the end. The pool is sized by :func:`actor_pool` (``device`` among ``embedder``: with
    ``"cpu"`` no GPU); each actor takes ``num_cpus``; ``embedder``: further :func:`embed_dataset`
    options.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out = check_ray_output(out, resume=resume, overwrite=overwrite)
    ray = _ray()
    start = time.monotonic()
    sources, duplicates = _listed(inputs)
    plan = partitions(sources, partition_images)
    found = {p.name: p for p in out.glob(f"{PART_PREFIX}*{PART_SUFFIX}")} if out.is_dir() else {}
    stored = None if overwrite else _stored_provenance(found.values())
    if stored is not None and stored.dtype != dtype:
        raise _another_job(out, f"dtype differs: {stored.dtype!r} vs {dtype!r}")
    done = [] if overwrite else [p for p in plan if p.name in found and _complete(found[p.name], p)]
    todo = [p for p in plan if p not in done]
    old = _Old(found, plan, {s.id for s in sources}, overwrite)
    writer = _Writer(out, todo, dtype, stored, old)
    if not todo:  # every partition done: the stored rows must still be of this model
        assert stored is not None
        if why := stored.mismatch(_model_provenance(model, dtype, embedder), also=("dtype",)):
            raise _another_job(out, why)
    else:
        out.mkdir(parents=True, exist_ok=True)
        with _connected(ray, address):
            ds = ray.data.from_items(
                [_row(s, p.index) for p in todo for s in p.sources], override_num_blocks=len(todo)
            )
            ds = ds.map_batches(_read_sources, batch_format="pyarrow", batch_size=batch_size)
            actors, num_gpus = actor_pool(
                ray.cluster_resources().get("GPU", 0),
                actors=actors,
                num_gpus=num_gpus,
                device=embedder.get("device", "auto"),
            )
            ds = embed_dataset(
                ds,
                model,
                batch_size=batch_size,
                num_gpus=num_gpus,
                num_cpus=num_cpus,
                actors=actors,
                **embedder,
            ).drop_columns([IMAGE, FILE, OFFSET, SIZE])
            with progress_bar(sum(len(p.sources) for p in todo), progress, unit="img") as bar:
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    writer.take(batch)
                    bar.update(len(batch))
            if writer.missing():
                raise RuntimeError(f"Ray returned no row for {writer.missing()} inputs: rerun with --resume")
    old.retire()
    errors = [e for p in plan for e in _Part.read(out / p.name).errors]
    errors_path = write_errors(out, errors + duplicates)
    return Summary(
        total=len(sources),
        embedded=writer.embedded,
        resumed=sum(len(p.sources) for p in done),
        failed=len(errors),
        duplicates=len(duplicates),
        seconds=time.monotonic() - start,
        out=out,
        errors_path=errors_path,
    )


def job_errors() -> tuple[type[BaseException], ...]:
    """Ray's exceptions a job ends with when a worker fails (a task's or an actor's error, an actor
    that cannot start, a stalled execution); none where Ray is not installed."""
    try:
        import ray.exceptions
    except ImportError:
        return ()
    errors: tuple[type[BaseException], ...] = (ray.exceptions.RayError,)
    with contextlib.suppress(ImportError):
        from ray.data.exceptions import ExecutionTimeoutError

        errors += (ExecutionTimeoutError,)
    return errors


def error_line(error: BaseException) -> str:
    """One line for an error of :func:`job_errors`: the error that started it, ``Type: message``.
    Ray wraps a worker's error with its traceback (``RayTaskError.cause`` holds the error where Ray
    could rebuild it; an actor that died in its constructor keeps only the text, whose error follows
    the traceback's last indented line)."""
    while isinstance(cause := getattr(error, "cause", None), BaseException) and cause is not error:
        error = cause
    lines = _ANSI_CODE.sub("", str(error)).splitlines()
    frames = [k for k, line in enumerate(lines) if line[:1].isspace()]
    message = " ".join(line.strip() for line in lines[frames[-1] + 1 if frames else 0 :] if line.strip())
    return message if frames and message else f"{type(error).__name__}: {message}"


_ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the names in its tracebacks


def _complete(path: Path, partition: Partition) -> bool:
    """A part file that holds its whole partition: a row or an error for each of its inputs."""
    try:
        part = _Part.read(path)
    except ProvenanceError:
        return False
    return part.rows + len(part.errors) == len(partition.sources)


def _stored_provenance(parts: Iterable[Path]) -> Provenance | None:
    """The provenance the output folder's parts share (None when there is none); ProvenanceError when
    a part has none, or two differ."""
    first: _Part | None = None
    for path in sorted(parts):
        part = _Part.read(path)
        if first is None:
            first = part
        elif why := first.provenance.mismatch(part.provenance, also=("dtype",)):
            raise ProvenanceError(f"{first.path} and {part.path} hold rows of different jobs ({why})")
    return first.provenance if first is not None else None


@contextlib.contextmanager
def _connected(ray: Any, address: str | None) -> Iterator[None]:
    """Ray as it is when connected; else ``ray.init(address=...)``, shut down after the block. Ray
    Data's own progress bars are hidden meanwhile."""
    context = ray.data.DataContext.get_current()
    shown, context.enable_progress_bars = context.enable_progress_bars, False  # the job has its own bar
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        context.enable_progress_bars = shown
        if started:
            ray.shutdown()
