"""Embedding files written by ``nvclip-fast embed``: Parquet or ``.npy``, always atomically.

- ``OUT.parquet``: columns ``path`` (the input's id, see ``sources``: a file path, or
  ``<tar>::<member>``), ``embedding`` (fixed-size list of float32/float16), ``width``, ``height``
  (the image's size as stored); rows in input order; the provenance (``provenance.Provenance`` as
  JSON: model, weights sha256, preprocessing, embed dim, precision, dtype, package version,
  creation time) in the schema metadata under the key ``nvclip_fast``.
- ``OUT.npy``: the ``(N, D)`` embeddings; ``OUT.npy.ids.jsonl`` beside it, the N ids in row order,
  one JSON string per line (JSON escapes every newline and non-ASCII character, so a line is
  exactly one id, whatever the file names hold); ``OUT.npy.provenance.json``, the provenance.
- ``OUT.parquet.errors.jsonl`` / ``OUT.npy.errors.jsonl``: one ``{"path": id, "error": reason}`` line
  per input that has no row of its own (failed, skipped, or a duplicate of an earlier input);
  written only when there is one.

Every file is written to a temporary name in the same directory and renamed into place, so an
interrupted run never leaves a truncated file (for ``.npy`` the ``.npy`` rename comes last, and an
``.npy`` whose ids file disagrees with it is treated as absent). While a run is going, finished
rows are saved in chunks under ``OUT.inprogress/`` (each chunk written atomically too, with the
job's provenance in ``meta.json``); ``--resume`` reads them and the previous ``OUT`` to skip what is
already done, and a finished run removes that folder. Rows are written out block by block, so
memory stays bounded whatever the number of images.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .provenance import PARQUET_KEY, Provenance, ProvenanceError

PARQUET_SUFFIX = ".parquet"
NPY_SUFFIX = ".npy"
OUTPUT_SUFFIXES = (PARQUET_SUFFIX, NPY_SUFFIX)
# Files beside OUT, named OUT + suffix: OUT.npy.ids.jsonl, OUT.parquet.errors.jsonl, ...
IDS_SUFFIX = ".ids.jsonl"
PROVENANCE_SUFFIX = ".provenance.json"
ERRORS_SUFFIX = ".errors.jsonl"
INPROGRESS_SUFFIX = ".inprogress"
# OUT.paths.txt (OUT's stem + this): the ids of .npy outputs of earlier versions, one raw path per
# line, ambiguous for names holding line breaks; never read back.
LEGACY_PATHS_SUFFIX = ".paths.txt"
CHECKPOINT_META = "meta.json"
_CHUNK_PREFIX = "chunk-"
_CHUNK_GLOB = f"{_CHUNK_PREFIX}*.npz"
BLOCK_ROWS = 8192  # rows per Parquet row group, and per block of the final assembly
SEGMENT_CACHE = 4  # stored segments (chunks, row groups) kept loaded while assembling
NO_SIZE = -1  # width/height of rows read back from .npy, which keeps no sizes


class OutputExistsError(FileExistsError):
    """An output (or an interrupted run's rows) is already there and the job was not told to
    replace it (``overwrite``) or add to it (``resume``)."""


@dataclass
class Rows:
    """Embedded images: ids and their embeddings (N, D) and sizes as stored."""

    ids: list[str]
    embeddings: np.ndarray
    widths: np.ndarray
    heights: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not (self.embeddings.shape[0] == len(self.widths) == len(self.heights) == n):
            raise ValueError(
                f"rows disagree: {n} ids, {self.embeddings.shape[0]} embeddings, "
                f"{len(self.widths)} widths, {len(self.heights)} heights"
            )


@dataclass
class Segment:
    """Stored rows read back on demand: their ids now, the rows when ``load`` is called."""

    ids: list[str]
    load: Callable[[], Rows]


def check_output_path(out: str | os.PathLike[str]) -> Path:
    """``out`` as a Path, refused unless ``.parquet`` (pyarrow importable) or ``.npy``."""
    path = Path(out)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {str(path)!r}: expected a {' or '.join(OUTPUT_SUFFIXES)} file name")
    if path.suffix.lower() == PARQUET_SUFFIX:
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f"output {str(path)!r}: Parquet needs pyarrow (pip install 'nvclip-fast[parquet]'); "
                "or write .npy"
            ) from e
    return path


def sibling(out: Path, suffix: str) -> Path:
    """The file beside ``out`` named ``out``'s full name + ``suffix`` (``emb.npy.ids.jsonl``)."""
    return out.with_name(out.name + suffix)


def _is_npy(out: Path) -> bool:
    return out.suffix.lower() == NPY_SUFFIX


@functools.cache
def _file_mode() -> int:
    # mkstemp creates 0600 files; outputs are meant to be shared like any other file: 0666 & ~umask.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_file_mode()  # read the umask once, at import, before any worker thread exists


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary path beside ``final``, renamed onto it only when the block finishes cleanly."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.fchmod(fd, _file_mode())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def existing(out: Path) -> list[Path]:
    """What a job writing ``out`` would replace: OUT, the files beside it, an interrupted run's rows."""
    names = [out, sibling(out, ERRORS_SUFFIX), sibling(out, INPROGRESS_SUFFIX)]
    if _is_npy(out):
        names += [sibling(out, IDS_SUFFIX), sibling(out, PROVENANCE_SUFFIX)]
    return [p for p in names if p.exists()]


# ---------------------------------------------------------------------------------------------------
# Final outputs


def write_output(
    out: Path, ids: Sequence[str], blocks: Iterable[Rows], dim: int, dtype: str, provenance: Provenance
) -> None:
    """Write the rows of ``blocks`` (in order, together exactly ``ids``) to ``out``, atomically and
    one block at a time: Parquet row groups, or an ``.npy`` filled through a memory map."""
    out = check_output_path(out)
    if not _is_npy(out):
        _write_parquet(out, blocks, dim, dtype, provenance)
        return
    with (
        atomic_path(out) as tmp_npy,
        atomic_path(sibling(out, IDS_SUFFIX)) as tmp_ids,
        atomic_path(sibling(out, PROVENANCE_SUFFIX)) as tmp_provenance,
    ):
        array = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=dtype, shape=(len(ids), dim))
        start = 0
        for block in blocks:
            array[start : start + len(block.ids)] = block.embeddings
            start += len(block.ids)
        array.flush()
        del array
        if start != len(ids):
            raise ValueError(f"write_output: got {start} rows for {len(ids)} ids")
        with open(tmp_ids, "w", encoding="ascii") as f:
            for i in ids:
                f.write(json.dumps(i) + "\n")  # ensure_ascii: no raw line separator inside a line
        tmp_provenance.write_text(provenance.to_json() + "\n", encoding="utf-8")
        # Leaving the block renames the provenance, the ids, then the .npy (the commit point); a set
        # left inconsistent by a crash in between is recognized (and ignored) by output_segments.


def _parquet_schema(dim: int, dtype: str, provenance: Provenance) -> Any:
    import pyarrow as pa

    value = pa.float16() if dtype == "float16" else pa.float32()
    schema = pa.schema(
        [
            ("path", pa.string()),
            ("embedding", pa.list_(value, dim)),
            ("width", pa.int32()),
            ("height", pa.int32()),
        ]
    )
    return schema.with_metadata({PARQUET_KEY: provenance.to_json().encode()})


def _write_parquet(out: Path, blocks: Iterable[Rows], dim: int, dtype: str, provenance: Provenance) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _parquet_schema(dim, dtype, provenance)
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for block in blocks:
            values = pa.array(np.ascontiguousarray(block.embeddings, dtype=dtype).reshape(-1))
            table = pa.Table.from_arrays(
                [
                    pa.array(block.ids, type=pa.string()),
                    pa.FixedSizeListArray.from_arrays(values, dim),
                    pa.array(block.widths, type=pa.int32()),
                    pa.array(block.heights, type=pa.int32()),
                ],
                schema=schema,
            )
            writer.write_table(table, row_group_size=BLOCK_ROWS)


def read_ids(path: Path) -> list[str]:
    """The ids of an ``.ids.jsonl`` file: one JSON string per line."""
    ids = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                value = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{number}: not a JSON string: {e}") from e
            if not isinstance(value, str):
                raise ValueError(f"{path}:{number}: expected a JSON string, got {type(value).__name__}")
            ids.append(value)
    return ids


def output_segments(out: Path) -> list[Segment]:
    """A previously written output as segments (Parquet row groups, or the whole ``.npy`` through
    a memory map); [] when there is none, or when an ``.npy`` and its ids file disagree."""
    out = check_output_path(out)
    if not out.is_file():
        return []
    if not _is_npy(out):
        return _parquet_segments(out)
    ids_path = sibling(out, IDS_SUFFIX)
    embeddings = np.load(out, mmap_mode="r")
    ids = read_ids(ids_path) if ids_path.is_file() else []
    if len(ids) != embeddings.shape[0]:
        warnings.warn(
            f"{out} has {embeddings.shape[0]} rows but {ids_path} lists {len(ids)} ids (a write was "
            "interrupted?): ignoring them, their images will be embedded again",
            UserWarning,
            stacklevel=2,
        )
        return []
    sizes = np.full(len(ids), NO_SIZE, dtype=np.int32)
    return [Segment(ids, lambda: Rows(ids, embeddings, sizes, sizes))]


def _parquet_segments(out: Path) -> list[Segment]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(out)
    segments = []
    for group in range(file.num_row_groups):
        ids = file.read_row_group(group, columns=["path"]).column("path").to_pylist()

        def load(group: int = group, ids: list[str] = ids) -> Rows:
            table = pq.ParquetFile(out).read_row_group(group)
            embedding = table.column("embedding").combine_chunks()
            values = embedding.flatten().to_numpy(zero_copy_only=False)
            return Rows(
                ids,
                values.reshape(len(table), embedding.type.list_size),
                table.column("width").to_numpy().astype(np.int32),
                table.column("height").to_numpy().astype(np.int32),
            )

        segments.append(Segment(ids, load))
    return segments


def read_output(out: str | os.PathLike[str]) -> Rows | None:
    """A whole previously written output in memory (small outputs, tests), or None."""
    segments = output_segments(Path(out))
    if not segments:
        return None
    loaded = [s.load() for s in segments]
    return Rows(
        [i for rows in loaded for i in rows.ids],
        np.concatenate([np.asarray(r.embeddings) for r in loaded]),
        np.concatenate([r.widths for r in loaded]),
        np.concatenate([r.heights for r in loaded]),
    )


def read_provenance(out: str | os.PathLike[str]) -> Provenance | None:
    """The provenance of a previously written output; None when there is no output. Raises
    ProvenanceError for an output that has none (another tool, or an older nvclip-fast)."""
    out = check_output_path(out)
    if not out.is_file():
        return None
    if not _is_npy(out):
        import pyarrow.parquet as pq

        stored = (pq.read_schema(out).metadata or {}).get(PARQUET_KEY)
        if stored is None:
            raise ProvenanceError(f"{out} has no provenance (no {PARQUET_KEY.decode()!r} schema metadata)")
        return Provenance.from_json(stored, str(out))
    path = sibling(out, PROVENANCE_SUFFIX)
    if not path.is_file():
        legacy = out.with_name(out.stem + LEGACY_PATHS_SUFFIX)
        older = f" (it has {legacy.name}: an older nvclip-fast wrote it)" if legacy.is_file() else ""
        raise ProvenanceError(f"{out} has no provenance: {path.name} is missing{older}")
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ProvenanceError(f"{path}: unreadable: {e}") from e
    return Provenance.from_json(text, str(path))


def assemble(
    order: Sequence[str], segments: Sequence[Segment], block_rows: int = BLOCK_ROWS
) -> Iterator[Rows]:
    """The stored rows of ``order`` (ids), in that order, ``block_rows`` at a time. An id stored in
    several segments comes from the last one. Segments are loaded on demand, a few at a time."""
    where: dict[str, tuple[int, int]] = {}
    for s, segment in enumerate(segments):
        for r, image_id in enumerate(segment.ids):
            where[image_id] = (s, r)
    cache: OrderedDict[int, Rows] = OrderedDict()

    def rows_of(s: int) -> Rows:
        if s in cache:
            cache.move_to_end(s)
        else:
            cache[s] = segments[s].load()
            if len(cache) > SEGMENT_CACHE:
                cache.popitem(last=False)
        return cache[s]

    for start in range(0, len(order), block_rows):
        ids = list(order[start : start + block_rows])
        located = [where[i] for i in ids]
        first = rows_of(located[0][0])
        embeddings = np.empty((len(ids), first.embeddings.shape[1]), dtype=first.embeddings.dtype)
        widths = np.empty(len(ids), np.int32)
        heights = np.empty(len(ids), np.int32)
        for k, (s, r) in enumerate(located):
            rows = rows_of(s)
            embeddings[k] = rows.embeddings[r]
            widths[k] = rows.widths[r]
            heights[k] = rows.heights[r]
        yield Rows(ids, embeddings, widths, heights)


def write_errors(out: Path, errors: Sequence[tuple[str, str]]) -> Path | None:
    """``OUT.<ext>.errors.jsonl``: one line per input without a row of its own; written only when
    there is one (a stale file from an earlier run is removed). Returns its path, or None."""
    path = sibling(out, ERRORS_SUFFIX)
    if not errors:
        path.unlink(missing_ok=True)
        return None
    with atomic_path(path) as tmp:
        tmp.write_text(
            "".join(json.dumps({"path": i, "error": e}) + "\n" for i, e in errors), encoding="utf-8"
        )
    return path


# ---------------------------------------------------------------------------------------------------
# Checkpoint of an unfinished run


class Checkpoint:
    """Rows finished by a run that has not written OUT yet: chunk files in ``OUT.inprogress/``,
    with the job's provenance in ``meta.json`` so that a resume can check it is the same job."""

    def __init__(self, out: Path):
        self.dir = sibling(out, INPROGRESS_SUFFIX)

    def exists(self) -> bool:
        return self.dir.is_dir()

    def _chunks(self) -> list[Path]:
        return sorted(self.dir.glob(_CHUNK_GLOB)) if self.exists() else []

    def provenance(self) -> Provenance | None:
        """The provenance of the rows saved here; None when nothing is saved. ProvenanceError when
        rows are saved without one (an older nvclip-fast)."""
        path = self.dir / CHECKPOINT_META
        if not path.is_file():
            if self._chunks():
                raise ProvenanceError(
                    f"{self.dir} holds rows without provenance ({CHECKPOINT_META} is missing)"
                )
            return None
        return Provenance.from_json(path.read_bytes(), str(path))

    def start(self, provenance: Provenance) -> None:
        """Create the folder for a job of ``provenance`` (kept when resuming the same job)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.dir / CHECKPOINT_META) as tmp:
            tmp.write_text(provenance.to_json(), encoding="utf-8")

    def segments(self) -> list[Segment]:
        segments = []
        for chunk in self._chunks():
            with np.load(chunk, allow_pickle=False) as data:
                ids = [str(i) for i in data["ids"]]

            def load(chunk: Path = chunk, ids: list[str] = ids) -> Rows:
                with np.load(chunk, allow_pickle=False) as data:
                    return Rows(ids, data["embeddings"], data["widths"], data["heights"])

            segments.append(Segment(ids, load))
        return segments

    def rows(self) -> int:
        """How many rows are saved here."""
        return sum(len(s.ids) for s in self.segments())

    def append(self, rows: Rows) -> None:
        if not rows.ids:
            return
        chunks = self._chunks()
        number = int(chunks[-1].stem.removeprefix(_CHUNK_PREFIX)) + 1 if chunks else 0
        with atomic_path(self.dir / f"{_CHUNK_PREFIX}{number:06d}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                ids=np.array(rows.ids, dtype=str),
                embeddings=rows.embeddings,
                widths=rows.widths,
                heights=rows.heights,
            )

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
