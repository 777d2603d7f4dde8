"""Nearest neighbours in a collection: exact search (chunked matrix products) and FAISS indexes.

Embeddings are float32 and L2-normalized, so the inner product is the cosine. Exact search streams
the collection chunk by chunk: each chunk's scores against a block of queries are one BLAS matrix
product (numpy runs it on every core), reduced at once to the best ``k`` per query, so memory holds
one chunk and one block of scores whatever the size of the collection.

An :class:`Index` is a FAISS index over every row (row number = FAISS id) whose kind follows the
collection's size (:func:`index_factory`): exact ``Flat`` up to :data:`FLAT_MAX_ROWS` rows; an
inverted file of full vectors (``IVF<lists>,Flat``) up to :data:`IVF_FLAT_MAX_ROWS`; beyond, lists
of product-quantized codes (``IVF<lists>_HNSW32,PQ<m>``: an HNSW graph finds the lists, each vector
kept in ``m`` bytes). Its recall@10 against exact search is measured when it is built, on held-out
queries (rows of the collection, each query's own row left out of both result lists), and the
number of lists probed is the smallest power of two that reaches :data:`TARGET_RECALL`.
``INDEX`` is the FAISS file; ``INDEX.json`` says what it was built from (rows, ids digest,
provenance), its kind, the lists probed and the recall measured.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .outputs import atomic_path
from .provenance import Provenance

if TYPE_CHECKING:
    from .collection import Collection

# Scores held at once by exact search: a block of queries against one chunk (float32: 64 MiB).
SCORE_BLOCK_ELEMENTS = 16 << 20
FLAT_MAX_ROWS = 20_000  # up to here an exact index costs little more than an approximate one
IVF_FLAT_MAX_ROWS = 2_000_000  # up to here the lists keep full vectors (as much memory as the rows)
LISTS_PER_SQRT_ROWS = 4  # inverted lists: the power of two at or below 4 sqrt(rows)
MIN_LISTS = 16
TRAIN_POINTS_PER_LIST = 40  # FAISS's k-means wants at least 39 training points per centroid
PQ_TRAIN_POINTS = 256 * 40  # and its 8-bit product quantizer 256 centroids per sub-vector
HNSW_NEIGHBORS = 32
PQ_DIMS_PER_BYTE = 4  # product quantization: one byte per 4 dimensions (16x smaller than float32)
RECALL_K = 10
RECALL_QUERIES = 1000  # held-out queries measured when an index is built
TARGET_RECALL = 0.95
INDEX_FORMAT = 1
SIDECAR_SUFFIX = ".json"  # INDEX.json beside INDEX


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "indexes, duplicates and clusters need FAISS: pip install 'nvclip-fast[search]'"
        ) from e
    return faiss


# ---------------------------------------------------------------------------------------------------
# Exact search


def exact_search(chunks: Iterable[np.ndarray], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, rows) of each query over the rows of ``chunks`` (float32 (n, D) blocks in
    row order), best first, ties by row: (Q, min(k, rows)) float32 and int64 arrays."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    nq = len(queries)
    best_scores = np.empty((nq, 0), np.float32)
    best_rows = np.empty((nq, 0), np.int64)
    start = 0
    for chunk in chunks:
        n = len(chunk)
        if n == 0:
            continue
        block = max(1, SCORE_BLOCK_ELEMENTS // n)
        new_scores, new_rows = [], []
        for q0 in range(0, nq, block):
            scores = queries[q0 : q0 + block] @ chunk.T
            top = _top_k(scores, k)
            new_scores.append(np.take_along_axis(scores, top, axis=1))
            new_rows.append(top + start)
        merged_scores = np.concatenate([best_scores, np.concatenate(new_scores)], axis=1)
        merged_rows = np.concatenate([best_rows, np.concatenate(new_rows)], axis=1)
        top = _top_k(merged_scores, k)
        best_scores = np.take_along_axis(merged_scores, top, axis=1)
        best_rows = np.take_along_axis(merged_rows, top, axis=1)
        start += n
    order = np.lexsort((best_rows, -best_scores))  # sorts each query's row: score down, then row up
    return np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_rows, order, axis=1)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest scores of each row (unordered)."""
    n = scores.shape[1]
    if n <= k:
        return np.broadcast_to(np.arange(n), scores.shape).copy()
    return np.argpartition(scores, n - k, axis=1)[:, n - k :]


# ---------------------------------------------------------------------------------------------------
# Recall


def recall_at_k(found: np.ndarray, truth: np.ndarray, own_rows: np.ndarray, k: int) -> float:
    """Mean share of each query's true top-``k`` rows found in its approximate top-``k``, where both
    lists (searched for ``k + 1``) leave out the query's own row ``own_rows[i]``."""
    total = 0.0
    for f, t, own in zip(found, truth, own_rows, strict=True):
        f_k = [r for r in f if r != own and r >= 0][:k]
        t_k = [r for r in t if r != own][:k]
        total += len(set(f_k) & set(t_k)) / max(1, len(t_k))
    return total / max(1, len(found))


# ---------------------------------------------------------------------------------------------------
# FAISS indexes


def index_factory(rows: int, dim: int) -> str:
    """The FAISS index for a collection of ``rows`` embeddings of ``dim`` floats (see the module doc)."""
    if rows <= FLAT_MAX_ROWS:
        return "Flat"
    lists = ivf_lists(rows)
    if rows <= IVF_FLAT_MAX_ROWS:
        return f"IVF{lists},Flat"
    return f"IVF{lists}_HNSW{HNSW_NEIGHBORS},PQ{pq_bytes(dim)}"


def ivf_lists(rows: int) -> int:
    """Inverted lists for ``rows`` vectors: the power of two at or below 4 sqrt(rows), at least 16."""
    return max(MIN_LISTS, 1 << int(math.log2(max(1.0, LISTS_PER_SQRT_ROWS * math.sqrt(rows)))))


def pq_bytes(dim: int) -> int:
    """Bytes per vector of the product quantizer: about one per 4 dimensions, dividing ``dim``."""
    m = max(1, dim // PQ_DIMS_PER_BYTE)
    while dim % m:
        m -= 1
    return m


@dataclass
class IndexInfo:
    """What an index was built from and how well it does (stored as ``INDEX.json``)."""

    factory: str
    rows: int
    dim: int
    ids_sha256: str
    provenance: dict[str, Any] | None
    nprobe: int | None  # inverted lists searched per query (None: not an inverted-file index)
    recall_at_10: float
    recall_queries: int
    build_seconds: float
    collection: str
    format: int = INDEX_FORMAT


def ids_digest(collection: Collection) -> str:
    """sha256 of the collection's ids in row order (JSON strings, one per line): what an index
    checks to know it was built for these rows."""
    digest = hashlib.sha256()
    for chunk in collection.id_array().chunks:
        for item in chunk.to_pylist():
            digest.update(json.dumps(item).encode() + b"\n")
    return digest.hexdigest()


class Index:
    """A FAISS index over a collection's rows (FAISS ids = row numbers) and its :class:`IndexInfo`.

    ``Index.build(collection)`` picks the kind, trains, adds every row and measures recall;
    ``save(path)`` / ``Index.load(path)``; ``search(queries, k)``; ``check(collection)`` refuses
    a collection other than the one it was built for.
    """

    def __init__(self, faiss_index: Any, info: IndexInfo, path: Path | None = None):
        self.faiss_index = faiss_index
        self.info = info
        self.path = path
        self._apply_nprobe()

    def _apply_nprobe(self) -> None:
        if self.info.nprobe is not None:
            _set_nprobe(self.faiss_index, self.info.nprobe)

    @classmethod
    def build(
        cls,
        collection: Collection,
        *,
        factory: str | None = None,
        target_recall: float = TARGET_RECALL,
        recall_queries: int = RECALL_QUERIES,
        seed: int = 0,
    ) -> Index:
        """Build an index over every row of ``collection``; ``factory`` overrides the kind (a FAISS
        index factory string). Raises ``ValueError`` for an empty collection."""
        faiss = _faiss()
        start = time.monotonic()
        n, dim = len(collection), collection.dim
        if n == 0:
            raise ValueError(f"{collection.path}: an empty collection has nothing to index")
        factory = factory or index_factory(n, dim)
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"FAISS index {factory!r}: {e}") from e
        ivf = _ivf(index)
        if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
            # Polysemous training serves only Hamming-filtered search, not used here, and is slow (16 s
            # instead of 1 s to train on 3,000 32-d rows, measured on 1 core).
            faiss.downcast_index(ivf).do_polysemous_training = False
        rng = np.random.default_rng(seed)
        held_out = np.sort(rng.choice(n, size=min(recall_queries, n), replace=False))
        if not index.is_trained:
            index.train(collection.gather(_training_rows(index, n, held_out, rng)))
        for block in collection.embedding_chunks():
            index.add(block)
        queries = collection.gather(held_out)
        truth = exact_search(collection.embedding_chunks(), queries, RECALL_K + 1)[1]
        nprobe, recall = _tune_nprobe(index, queries, truth, held_out, target_recall)
        info = IndexInfo(
            factory=factory,
            rows=n,
            dim=dim,
            ids_sha256=ids_digest(collection),
            provenance=collection.provenance.to_dict() if collection.provenance else None,
            nprobe=nprobe,
            recall_at_10=recall,
            recall_queries=len(held_out),
            build_seconds=time.monotonic() - start,
            collection=str(collection.path),
        )
        return cls(index, info)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (the FAISS index) and ``path.json`` (its info), each atomically."""
        faiss = _faiss()
        path = Path(path)
        with atomic_path(path) as tmp:
            faiss.write_index(self.faiss_index, str(tmp))
        with atomic_path(sidecar_path(path)) as tmp:
            tmp.write_text(json.dumps(asdict(self.info), indent=1), encoding="utf-8")
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Index:
        faiss = _faiss()
        path = Path(path)
        sidecar = sidecar_path(path)
        if not path.is_file() or not sidecar.is_file():
            raise FileNotFoundError(f"{path}: no index there (needs {path.name} and {sidecar.name})")
        try:
            info = IndexInfo(**json.loads(sidecar.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{sidecar}: not an index description: {e}") from e
        if info.format != INDEX_FORMAT:
            raise ValueError(f"{sidecar}: index format {info.format}, this version reads {INDEX_FORMAT}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise ValueError(f"{path}: not a readable FAISS index: {e}") from e
        if (index.ntotal, index.d) != (info.rows, info.dim):
            raise ValueError(
                f"{path} holds {index.ntotal} x {index.d}, {sidecar.name} says {info.rows} x {info.dim}"
            )
        return cls(index, info, path)

    def check(self, collection: Collection) -> None:
        """Refuse (``ValueError``) a collection other than the one this index was built for."""
        where = self.path or "the index"
        mine = self.info
        if mine.rows != len(collection) or mine.dim != collection.dim:
            raise ValueError(
                f"{where} was built for {mine.rows} x {mine.dim} embeddings, {collection.path} holds "
                f"{len(collection)} x {collection.dim}: build it again (nvclip-fast index)"
            )
        if (mine.provenance is None) != (collection.provenance is None):
            raise ValueError(f"{where} and {collection.path} disagree on provenance: build the index again")
        if collection.provenance is not None:
            why = Provenance.from_dict(mine.provenance, str(where)).mismatch(collection.provenance)
            if why:
                raise ValueError(
                    f"{where} was built from another model's embeddings than {collection.path}: {why}"
                )
        if mine.ids_sha256 != ids_digest(collection):
            raise ValueError(
                f"{where} was built for other rows than {collection.path} (ids differ): build it again"
            )

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, rows) per query, best first; where the lists probed hold fewer than
        ``k`` rows, the rest are -1 with score -inf."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        scores, rows = self.faiss_index.search(queries, min(k, self.info.rows))
        return np.where(rows >= 0, scores, -np.inf).astype(np.float32), rows.astype(np.int64)


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _set_nprobe(index: Any, nprobe: int) -> None:
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = nprobe
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):  # the graph must look at least as far as the lists probed
        quantizer.hnsw.efSearch = max(quantizer.hnsw.efSearch, 2 * nprobe)


def _ivf(index: Any) -> Any | None:
    faiss = _faiss()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _training_rows(index: Any, n: int, held_out: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows to train on: enough for the lists' k-means and the product quantizer, none held out."""
    faiss = _faiss()
    ivf = _ivf(index)
    wanted = TRAIN_POINTS_PER_LIST * ivf.nlist if ivf is not None else PQ_TRAIN_POINTS
    if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        wanted = max(wanted, PQ_TRAIN_POINTS)
    pool = np.setdiff1d(np.arange(n), held_out) if len(held_out) < n else np.arange(n)
    return np.sort(rng.choice(pool, size=min(wanted, len(pool)), replace=False))


def _tune_nprobe(
    index: Any, queries: np.ndarray, truth: np.ndarray, own_rows: np.ndarray, target: float
) -> tuple[int | None, float]:
    """(lists probed, recall@10): the fewest lists (powers of two) reaching ``target``, or all."""
    k = RECALL_K + 1
    ivf = _ivf(index)
    if ivf is None:
        return None, recall_at_k(index.search(queries, k)[1], truth, own_rows, RECALL_K)
    nprobe, recall = 1, 0.0
    while True:
        _set_nprobe(index, nprobe)
        recall = recall_at_k(index.search(queries, k)[1], truth, own_rows, RECALL_K)
        if recall >= target or nprobe >= ivf.nlist:
            return nprobe, recall
        nprobe = min(2 * nprobe, ivf.nlist)
