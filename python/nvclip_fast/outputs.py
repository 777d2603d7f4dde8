"""Embedding files written by ``nvclip-fast embed``: Parquet or ``.npy``, always atomically.

- ``OUT.parquet``: columns ``path`` (file path, or ``<tar>::<member>``), ``embedding`` (fixed-size
  list of float32/float16), ``width``, ``height`` (the image's size as decoded); rows in input order.
- ``OUT.npy``: the ``(N, D)`` embeddings, with ``OUT.paths.txt`` beside it (one id per line).
- ``OUT.errors.jsonl``: one ``{"path": ..., "error": ...}`` line per input that was not embedded.

Every file is written to a temporary name in the same directory and renamed into place, so an
interrupted run never leaves a truncated file. While a run is going, finished rows are saved in
chunks under ``OUT.inprogress/`` (each chunk written atomically too); ``--resume`` reads them and
the previous ``OUT`` to skip what is already done, and a finished run removes that folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PARQUET_SUFFIX = ".parquet"
NPY_SUFFIX = ".npy"
OUTPUT_SUFFIXES = (PARQUET_SUFFIX, NPY_SUFFIX)
PATHS_SUFFIX = ".paths.txt"
ERRORS_SUFFIX = ".errors.jsonl"
INPROGRESS_SUFFIX = ".inprogress"
_CHUNK_GLOB = "chunk-*.npz"
PARQUET_METADATA_KEY = b"nvclip_fast"


@dataclass
class Rows:
    """Embedded images: ids and their embeddings (N, D) and decoded sizes."""

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

    @staticmethod
    def empty(dim: int, dtype: np.dtype | str) -> Rows:
        return Rows([], np.zeros((0, dim), dtype=dtype), np.zeros(0, np.int32), np.zeros(0, np.int32))

    @staticmethod
    def concat(parts: Iterable[Rows], dim: int, dtype: np.dtype | str) -> Rows:
        parts = [p for p in parts if p.ids]
        if not parts:
            return Rows.empty(dim, dtype)
        return Rows(
            [i for p in parts for i in p.ids],
            np.concatenate([p.embeddings.astype(dtype, copy=False) for p in parts]),
            np.concatenate([p.widths for p in parts]).astype(np.int32),
            np.concatenate([p.heights for p in parts]).astype(np.int32),
        )

    def take(self, order: Iterable[int]) -> Rows:
        index = np.fromiter(order, dtype=np.int64)
        return Rows(
            [self.ids[i] for i in index], self.embeddings[index], self.widths[index], self.heights[index]
        )


def check_output_path(out: str | os.PathLike[str]) -> Path:
    path = Path(out)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {str(path)!r}: expected a {' or '.join(OUTPUT_SUFFIXES)} file name")
    return path


def sibling(out: Path, suffix: str) -> Path:
    """``OUT.errors.jsonl``, ``OUT.paths.txt``, ...: ``suffix`` replaces OUT's own suffix."""
    return out.with_name(out.stem + suffix)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary path beside ``final``, renamed onto it only when the block finishes cleanly."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------------
# Final outputs


def write_output(out: Path, rows: Rows, metadata: dict[str, Any] | None = None) -> None:
    """Write ``rows`` to ``out`` (Parquet or .npy + .paths.txt), atomically."""
    out = check_output_path(out)
    if out.suffix.lower() == PARQUET_SUFFIX:
        _write_parquet(out, rows, metadata or {})
    else:
        with atomic_path(sibling(out, PATHS_SUFFIX)) as tmp:
            tmp.write_text("".join(f"{i}\n" for i in rows.ids), encoding="utf-8")
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, rows.embeddings)


def read_output(out: Path) -> Rows | None:
    """A previously written output, or None when there is none (or it is unreadable)."""
    out = check_output_path(out)
    if not out.is_file():
        return None
    if out.suffix.lower() == PARQUET_SUFFIX:
        return _read_parquet(out)
    paths = sibling(out, PATHS_SUFFIX)
    if not paths.is_file():
        return None
    embeddings = np.load(out)
    ids = paths.read_text(encoding="utf-8").splitlines()
    if len(ids) != embeddings.shape[0]:
        raise ValueError(f"{out} has {embeddings.shape[0]} rows but {paths} lists {len(ids)} paths")
    unknown = np.full(len(ids), -1, dtype=np.int32)  # .npy keeps no sizes
    return Rows(ids, embeddings, unknown, unknown.copy())


def _write_parquet(out: Path, rows: Rows, metadata: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = rows.embeddings.shape[1]
    values = pa.array(np.ascontiguousarray(rows.embeddings).reshape(-1))
    table = pa.table(
        {
            "path": pa.array(rows.ids, type=pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
            "width": pa.array(rows.widths, type=pa.int32()),
            "height": pa.array(rows.heights, type=pa.int32()),
        }
    )
    table = table.replace_schema_metadata({PARQUET_METADATA_KEY: json.dumps(metadata).encode()})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)


def _read_parquet(out: Path) -> Rows:
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    embedding = table.column("embedding").combine_chunks()
    dim = embedding.type.list_size
    values = embedding.flatten().to_numpy(zero_copy_only=False)
    return Rows(
        table.column("path").to_pylist(),
        values.reshape(len(table), dim),
        table.column("width").to_numpy().astype(np.int32),
        table.column("height").to_numpy().astype(np.int32),
    )


def read_parquet_metadata(out: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    meta = pq.read_schema(out).metadata or {}
    return json.loads(meta.get(PARQUET_METADATA_KEY, b"{}"))


def write_errors(out: Path, errors: Iterable[tuple[str, str]]) -> Path:
    """``OUT.errors.jsonl``: one line per input that was not embedded (written even when empty)."""
    path = sibling(out, ERRORS_SUFFIX)
    with atomic_path(path) as tmp:
        tmp.write_text(
            "".join(json.dumps({"path": i, "error": e}) + "\n" for i, e in errors), encoding="utf-8"
        )
    return path


# ---------------------------------------------------------------------------------------------------
# Checkpoint of an unfinished run


class Checkpoint:
    """Rows finished by a run that has not written OUT yet, as chunk files in ``OUT.inprogress/``."""

    def __init__(self, out: Path):
        self.dir = sibling(out, out.suffix + INPROGRESS_SUFFIX)
        self._next = 0

    def exists(self) -> bool:
        return self.dir.is_dir()

    def load(self) -> list[Rows]:
        chunks = sorted(self.dir.glob(_CHUNK_GLOB)) if self.exists() else []
        self._next = len(chunks)
        loaded = []
        for chunk in chunks:
            with np.load(chunk, allow_pickle=False) as data:
                loaded.append(
                    Rows([str(i) for i in data["ids"]], data["embeddings"], data["widths"], data["heights"])
                )
        return loaded

    def append(self, rows: Rows) -> None:
        if not rows.ids:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.dir / f"chunk-{self._next:06d}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                ids=np.array(rows.ids, dtype=str),
                embeddings=rows.embeddings,
                widths=rows.widths,
                heights=rows.heights,
            )
        self._next += 1

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self._next = 0
