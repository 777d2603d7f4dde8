"""An embedded collection: what ``nvclip-fast embed`` writes, opened for search, near-duplicates,
clusters and probes.

A collection is one of:

- a Parquet file, or a folder of Parquet part files (``*.parquet``, as Ray Data writes them; rows in
  the order of the sorted file names): columns ``path`` (the id), ``embedding`` (fixed-size list of
  float32 or float16), ``width``, ``height``; the provenance JSON in the schema metadata under the
  key ``nvclip_fast``;
- ``OUT.npy`` (N, D) float32 or float16, with ``OUT.npy.ids.jsonl`` (one JSON string per line: the
  ids, lossless) and ``OUT.npy.provenance.json``; files written before ids and provenance were
  stored this way have ``OUT.paths.txt`` (one id per line) instead, which is read as a fallback.

Embeddings are read in chunks of about :data:`CHUNK_BYTES` (Parquet record batches, or slices of a
memory-mapped ``.npy``), converted to float32 one chunk at a time, so memory stays bounded whatever
the size of the collection; ids and image sizes (a few dozen bytes per row) are loaded once, when
first needed. A collection without provenance (written before it was stored) still opens, with a
warning; then the model of a query cannot be checked, only its embedding size, and must be given.

Ids are file paths or ``<tar path>::<member name>`` (see ``sources``, whose :func:`~.sources.read_id`
reads the bytes behind one; relative paths are relative to the current directory, as they were
given to ``embed``).
"""

from __future__ import annotations

import abc
import json
import mmap
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .outputs import IDS_SUFFIX, LEGACY_PATHS_SUFFIX, NPY_SUFFIX, PARQUET_SUFFIX, PROVENANCE_SUFFIX, read_ids
from .provenance import IDENTITY_FIELDS, PARQUET_KEY, Provenance, ProvenanceError
from .sources import read_id

if TYPE_CHECKING:
    import pyarrow as pa

    from .cluster import Clusters
    from .dedup import DuplicateGroups
    from .encoder import Encoder
    from .search import Index

MIB = 1 << 20
# Embeddings read (as float32) per chunk: large enough for BLAS to run at full speed, small enough
# that a search or a scan holds only this much of the collection at once.
CHUNK_BYTES = 64 * MIB
NO_SIZE = -1  # width/height when unknown
# Fields of the metadata that older outputs stored in place of a provenance, compared where present.
LEGACY_FIELDS = ("model", "embed_dim", "preprocess")
# .npy header readers by format version (numpy writes 1.0, or 2.0 for headers over 64 KiB).
NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class CollectionError(ValueError):
    """A collection that cannot be opened or used as asked: the message names the file."""


@dataclass(frozen=True)
class Hit:
    """One search result: the image's ``id``, its cosine ``score`` to the query, its ``row``."""

    id: str
    score: float
    row: int


# ---------------------------------------------------------------------------------------------------
# The query model


def encoder_provenance(encoder: Encoder) -> Provenance:
    """The provenance of what ``encoder`` makes (normalized rows): ``Encoder.provenance``."""
    return encoder.provenance()


def open_encoder(source: dict[str, Any], device: str = "auto") -> Encoder:
    """Open the model a provenance's ``source`` names: ``{"bundle": path}`` (an exported bundle; with
    ``"precision": "bf16"`` where it ran in bf16) or
    ``{"model": NAME, "pretrained": TAG | "weights": PATH | "random_weights": true, ...}`` (a model
    name: ``Encoder.from_pretrained``, the same bundle cache entry that embedded the collection)."""
    from .encoder import Encoder

    if "bundle" in source:
        return Encoder(source["bundle"], device=device, precision=source.get("precision"))
    if "model" in source:
        keys = ("pretrained", "weights", "random_weights", "image_size", "precision")
        options = {k: source[k] for k in keys if k in source}
        return Encoder.from_pretrained(source["model"], device=device, **options)
    raise CollectionError(f"provenance source {source!r}: expected a 'bundle' or a 'model' key")


# ---------------------------------------------------------------------------------------------------
# Parts: one Parquet file, or one .npy with its ids


class _Part(abc.ABC):
    """One stored file of a collection."""

    path: Path
    rows: int
    dim: int
    dtype: str
    stored: dict[str, Any] | None  # the provenance (or older metadata) JSON object, None when absent

    @abc.abstractmethod
    def embeddings(self, chunk_rows: int) -> Iterator[np.ndarray]:
        """The (rows, dim) embeddings, ``chunk_rows`` rows at a time, in row order."""

    @abc.abstractmethod
    def ids(self) -> pa.Array | list[str]:
        """Every row's id, in row order."""

    @abc.abstractmethod
    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's image width and height (``NO_SIZE`` where not stored)."""


class _ParquetPart(_Part):
    def __init__(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        try:
            self._file = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise CollectionError(f"{path}: not a readable Parquet file: {e}") from e
        schema = self._file.schema_arrow
        missing = [c for c in ("path", "embedding") if c not in schema.names]
        if missing:
            raise CollectionError(f"{path}: no {missing} column (columns: {schema.names})")
        kind = schema.field("embedding").type
        if not (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)):
            raise CollectionError(f"{path}: 'embedding' must be a list of floats, got {kind}")
        if not pa.types.is_floating(kind.value_type):
            raise CollectionError(f"{path}: 'embedding' must hold floats, got {kind.value_type}")
        self.rows = self._file.metadata.num_rows
        self.dtype = kind.value_type.to_pandas_dtype().__name__
        if pa.types.is_fixed_size_list(kind):
            self.dim = kind.list_size
        else:  # a variable-size list: its length, checked on every chunk
            first = next(self._file.iter_batches(batch_size=1, columns=["embedding"]), None)
            self.dim = len(first.column(0)[0]) if first is not None and len(first) else 0
        raw = (schema.metadata or {}).get(PARQUET_KEY)
        self.stored = _json_object(raw, path) if raw is not None else None

    def embeddings(self, chunk_rows: int) -> Iterator[np.ndarray]:
        for batch in self._file.iter_batches(batch_size=chunk_rows, columns=["embedding"]):
            column = batch.column(0)
            if column.null_count:
                raise CollectionError(f"{self.path}: {column.null_count} rows have no embedding")
            values = column.flatten().to_numpy(zero_copy_only=False)
            if values.size != len(column) * self.dim:
                raise CollectionError(f"{self.path}: embeddings of unequal sizes (expected {self.dim})")
            yield values.reshape(len(column), self.dim)

    def ids(self) -> pa.Array:
        return self._file.read(columns=["path"]).column("path").combine_chunks()

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        names = self._file.schema_arrow.names
        if "width" not in names or "height" not in names:
            none = np.full(self.rows, NO_SIZE, np.int32)
            return none, none
        table = self._file.read(columns=["width", "height"])
        return tuple(
            table.column(c).fill_null(NO_SIZE).to_numpy().astype(np.int32) for c in ("width", "height")
        )


class _NpyPart(_Part):
    """An ``.npy`` read through a read-only memory map, a chunk at a time; each chunk's pages are
    released from the process once the next chunk is asked for (they stay in the page cache), so
    a pass over the file does not leave the whole file in the process's memory."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version not in NPY_HEADERS:
                    raise ValueError(f".npy format version {version}")
                shape, fortran, dtype = NPY_HEADERS[version](f)
                self._offset = f.tell()
                size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError) as e:
            raise CollectionError(f"{path}: not a readable .npy file: {e}") from e
        if len(shape) != 2 or dtype.kind != "f" or fortran:
            order = "Fortran-ordered " if fortran else ""
            raise CollectionError(
                f"{path}: expected an (N, D) C-ordered float array, got {order}{shape} {dtype}"
            )
        self.rows, self.dim = shape
        self._dtype = dtype
        self.dtype = str(dtype)
        expected = self._offset + self.rows * self.dim * dtype.itemsize
        if size < expected:
            raise CollectionError(f"{path}: truncated: {size} bytes, {shape} {dtype} needs {expected}")
        self._ids_path = path.with_name(path.name + IDS_SUFFIX)
        self._legacy_ids = path.with_name(path.stem + LEGACY_PATHS_SUFFIX)
        if not self._ids_path.is_file() and not self._legacy_ids.is_file():
            raise CollectionError(f"{path}: no ids beside it ({self._ids_path.name})")
        sidecar = path.with_name(path.name + PROVENANCE_SUFFIX)
        self.stored = _json_object(sidecar.read_bytes(), sidecar) if sidecar.is_file() else None

    def embeddings(self, chunk_rows: int) -> Iterator[np.ndarray]:
        if self.rows == 0:
            return
        with open(self.path, "rb") as f:
            # Not closed here: the arrays handed out keep it alive, and it is unmapped with the last.
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        rows = np.frombuffer(mapped, self._dtype, self.rows * self.dim, self._offset).reshape(
            self.rows, self.dim
        )
        row_bytes = self.dim * self._dtype.itemsize
        for start in range(0, self.rows, chunk_rows):
            yield rows[start : start + chunk_rows]
            begin = self._offset + start * row_bytes
            end = min(begin + chunk_rows * row_bytes, len(mapped))
            aligned = begin - begin % mmap.PAGESIZE
            # Pages of a read-only file map: dropped from this process, read again if touched again.
            mapped.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)

    def ids(self) -> list[str]:
        if self._ids_path.is_file():
            try:
                ids = read_ids(self._ids_path)
            except ValueError as e:
                raise CollectionError(str(e)) from e
            where = self._ids_path
        else:
            ids = self._legacy_ids.read_text(encoding="utf-8").split("\n")[:-1]
            where = self._legacy_ids
        if len(ids) != self.rows:
            raise CollectionError(f"{where} lists {len(ids)} ids for the {self.rows} rows of {self.path}")
        return ids

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        none = np.full(self.rows, NO_SIZE, np.int32)
        return none, none


def _json_object(raw: bytes, where: Path) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CollectionError(f"{where}: stored provenance is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise CollectionError(f"{where}: stored provenance is not a JSON object")
    return value


def _parts(path: Path) -> list[_Part]:
    if path.is_dir():
        files = sorted(
            p for p in path.glob(f"*{PARQUET_SUFFIX}") if p.is_file() and not p.name.startswith((".", "_"))
        )
        if not files:
            raise CollectionError(f"{path}: a folder with no {PARQUET_SUFFIX} files")
        return [_ParquetPart(f) for f in files]
    if not path.exists():
        raise CollectionError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == PARQUET_SUFFIX:
        return [_ParquetPart(path)]
    if suffix == NPY_SUFFIX:
        return [_NpyPart(path)]
    raise CollectionError(f"{path}: expected a {PARQUET_SUFFIX} file, a folder of them, or a {NPY_SUFFIX}")


# ---------------------------------------------------------------------------------------------------
# The collection


class Collection:
    """Embeddings of images, with their ids and provenance, read lazily in chunks.

    ``Collection.open(path)``; ``len(c)`` rows of ``c.dim`` floats; ``c.provenance`` (None for an
    output written before provenance was stored); ``c.search(text=... | image=..., k=10)``,
    ``c.near_duplicates(threshold=0.95)``, ``c.kmeans(k)``. A query is embedded with the
    collection's model, opened from its provenance (or the ``encoder`` given, which must be the
    same model). A context manager: ``close()`` closes the model it opened.
    """

    def __init__(self, path: Path, parts: list[_Part], chunk_rows: int | None = None):
        self.path = path
        self._parts = parts
        dims = {p.dim for p in parts if p.rows}
        if len(dims) > 1:
            raise CollectionError(f"{path}: parts hold embeddings of different sizes {sorted(dims)}")
        self.dim = dims.pop() if dims else parts[0].dim
        self.dtype = parts[0].dtype
        self.provenance, self.stored = self._read_provenance()
        self.chunk_rows = chunk_rows or max(1, CHUNK_BYTES // (4 * max(self.dim, 1)))
        self._ids: pa.ChunkedArray | None = None
        self._sizes: tuple[np.ndarray, np.ndarray] | None = None
        self._encoder: Encoder | None = None
        self._index: Index | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, chunk_rows: int | None = None) -> Collection:
        """Open what ``embed`` wrote at ``path`` (``.parquet`` file or folder, or ``.npy``).
        ``chunk_rows``: rows per chunk read (default: :data:`CHUNK_BYTES` of float32)."""
        path = Path(path)
        return cls(path, _parts(path), chunk_rows)

    def _read_provenance(self) -> tuple[Provenance | None, dict[str, Any] | None]:
        first = self._parts[0]
        complete = [p.stored is not None and all(f in p.stored for f in IDENTITY_FIELDS) for p in self._parts]
        if not all(complete):
            warnings.warn(
                f"{self.path}: no provenance stored (written by an older nvclip-fast): the model that "
                "made these embeddings cannot be checked; give the query model explicitly",
                UserWarning,
                stacklevel=4,
            )
            return None, first.stored
        provenances = [Provenance.from_dict(p.stored, str(p.path)) for p in self._parts]
        for part, other in zip(self._parts[1:], provenances[1:], strict=True):
            if why := provenances[0].mismatch(other):
                raise CollectionError(
                    f"{part.path} holds embeddings of another model than {first.path}: {why}"
                )
        if provenances[0].embed_dim != self.dim:
            raise CollectionError(
                f"{first.path}: provenance says {provenances[0].embed_dim}-d, the rows are {self.dim}-d"
            )
        return provenances[0], first.stored

    def __len__(self) -> int:
        return sum(p.rows for p in self._parts)

    def __repr__(self) -> str:
        model = self.provenance.model if self.provenance else "unknown model"
        return f"Collection({str(self.path)!r}, {len(self)} x {self.dim} {self.dtype}, {model})"

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the query model this collection opened (not one that was given)."""
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None

    # -- rows -----------------------------------------------------------------------------------

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 (n, D) embeddings) for consecutive chunks of at most ``chunk_rows``."""
        start = 0
        for part in self._parts:
            for block in part.embeddings(self.chunk_rows):
                yield start, np.ascontiguousarray(block, dtype=np.float32)
                start += len(block)

    def embedding_chunks(self) -> Iterator[np.ndarray]:
        """The float32 embeddings, chunk by chunk (see :meth:`chunks`)."""
        for _, block in self.chunks():
            yield block

    def gather(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 embeddings of ``rows`` (any order), read in one pass over the chunks."""
        rows = np.asarray(rows, dtype=np.int64)
        self._check_rows(rows)
        out = np.empty((len(rows), self.dim), np.float32)
        order = np.argsort(rows, kind="stable")
        wanted = rows[order]
        for start, block in self.chunks():
            lo, hi = np.searchsorted(wanted, [start, start + len(block)])
            if lo < hi:
                out[order[lo:hi]] = block[wanted[lo:hi] - start]
            if hi == len(wanted):
                break
        return out

    def _check_rows(self, rows: np.ndarray) -> None:
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            bad = rows[(rows < 0) | (rows >= len(self))][0]
            raise IndexError(f"row {bad} out of range for {self.path} ({len(self)} rows)")

    def id_array(self) -> pa.ChunkedArray:
        """Every id, in row order, as one Arrow string column (loaded once)."""
        import pyarrow as pa

        if self._ids is None:
            self._ids = pa.chunked_array([pa.array(p.ids(), type=pa.string()) for p in self._parts])
        return self._ids

    def ids(self, rows: Sequence[int] | np.ndarray | None = None) -> list[str]:
        """The ids of ``rows`` (every row when None)."""
        if rows is None:
            return self.id_array().to_pylist()
        rows = np.asarray(rows, dtype=np.int64)
        self._check_rows(rows)
        return self.id_array().take(rows).to_pylist()

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(widths, heights) of every row as stored, int32, -1 where unknown (loaded once)."""
        if self._sizes is None:
            parts = [p.sizes() for p in self._parts]
            self._sizes = (np.concatenate([w for w, _ in parts]), np.concatenate([h for _, h in parts]))
        return self._sizes

    # -- the query model ------------------------------------------------------------------------

    def check_model(self, query: Provenance) -> None:
        """Refuse (``ProvenanceError``, naming both models and the first field that differs)
        embeddings of ``query``'s model to be compared with this collection's."""
        if query.embed_dim != self.dim:
            raise ProvenanceError(
                f"the query model {query.model} makes {query.embed_dim}-d embeddings, {self.path} holds "
                f"{self.dim}-d ones"
            )
        if self.provenance is not None:
            why = self.provenance.mismatch(query)
            mine = self.provenance.model
        else:  # an older output: compare what it stored
            stored = self.stored or {}
            mine = stored.get("model", "an unknown model")
            theirs = query.identity()
            field = next((f for f in LEGACY_FIELDS if f in stored and stored[f] != theirs[f]), None)
            why = field and f"{field} differs: {stored[field]!r} vs {theirs[field]!r}"
        if why:
            raise ProvenanceError(
                f"the query model {query.model} is not the model of {self.path} ({mine}): {why}; "
                "embed the collection again with this model, or query it with its own"
            )

    def encoder(self, device: str = "auto") -> Encoder:
        """The collection's model, opened once from its provenance's ``source`` (and closed by
        :meth:`close`)."""
        if self._encoder is None:
            source = self.provenance.source if self.provenance is not None else None
            if not source:
                why = "has no provenance" if self.provenance is None else "does not say where its model is"
                raise CollectionError(f"{self.path} {why}: give the query model (-m MODEL, or encoder=)")
            encoder = open_encoder(dict(source), device)
            try:
                self.check_model(encoder_provenance(encoder))
            except ProvenanceError:
                encoder.close()
                raise
            self._encoder = encoder
        return self._encoder

    def embed_query(
        self, text: str | None = None, image: Any = None, encoder: Encoder | None = None
    ) -> np.ndarray:
        """The (1, D) float32 embedding of one query: ``text``, or ``image`` (a path or an id of
        this collection's kind, bytes, a PIL image or an array), by this collection's model."""
        if (text is None) == (image is None):
            raise ValueError("give exactly one of text= or image=")
        if encoder is None:
            encoder = self.encoder()
        else:
            self.check_model(encoder_provenance(encoder))
        if text is not None:
            return np.asarray(encoder.embed_text([text]), dtype=np.float32)
        if isinstance(image, (str, os.PathLike)):
            image = read_id(os.fspath(image))
        return np.asarray(encoder.embed([image]), dtype=np.float32)

    # -- search, duplicates, clusters ----------------------------------------------------------

    def search(
        self,
        text: str | None = None,
        image: Any = None,
        *,
        k: int = 10,
        encoder: Encoder | None = None,
        index: Index | str | os.PathLike[str] | None = None,
    ) -> list[Hit]:
        """The ``k`` rows most similar (cosine) to a text or image query, best first. Exact (a
        chunked matrix product over every row) unless ``index`` (a :class:`nvclip_fast.search.Index`
        built for this collection, or its path) is given."""
        query = self.embed_query(text, image, encoder)
        scores, rows = self.search_vectors(query, k, index=index)
        found = rows[0] >= 0  # an approximate index may fill fewer than k
        scores, rows = scores[0][found], rows[0][found]
        return [Hit(i, float(s), int(r)) for i, s, r in zip(self.ids(rows), scores, rows, strict=True)]

    def search_vectors(
        self, queries: np.ndarray, k: int = 10, *, index: Index | str | os.PathLike[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, rows) for each row of ``queries`` (Q, D), best first: (Q, k') float32
        and int64 arrays, k' = min(k, rows); an index marks rows it could not fill with -1. Inner
        products: cosines for normalized rows."""
        from .search import exact_search

        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries are {queries.shape[1]}-d, {self.path} holds {self.dim}-d embeddings")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if index is None:
            return exact_search(self.embedding_chunks(), queries, k)
        return self._use_index(index).search(queries, k)

    def _use_index(self, index: Index | str | os.PathLike[str]) -> Index:
        """``index`` (or the index at that path, loaded once), checked once against this collection."""
        from .search import Index

        if isinstance(index, Index):
            if index is not self._index:
                index.check(self)
                self._index = index
        elif self._index is None or self._index.path != Path(index):
            loaded = Index.load(index)
            loaded.check(self)
            self._index = loaded
        return self._index

    def near_duplicates(self, threshold: float = 0.95, **options: Any) -> DuplicateGroups:
        """Groups of near-duplicate rows (see :func:`nvclip_fast.dedup.near_duplicates`)."""
        from .dedup import near_duplicates

        return near_duplicates(self, threshold, **options)

    def kmeans(self, k: int, **options: Any) -> Clusters:
        """k-means clusters of the rows (see :func:`nvclip_fast.cluster.kmeans`)."""
        from .cluster import kmeans

        return kmeans(self, k, **options)
