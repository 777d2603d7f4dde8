"""k-means clusters of a collection (FAISS): an assignment per row and the centroids.

Spherical k-means (centroids renormalized after each iteration, so similarity is the cosine, as for
the embeddings themselves) trained by FAISS on a uniform sample of at most
:data:`SAMPLE_PER_CENTROID` rows per centroid, from k-means++ starts, the best of
:data:`DEFAULT_RESTARTS` runs kept (random starts split or merge even well-separated clusters
often); then every row is assigned to its most similar centroid, a chunk at a time. Written as
``OUT.parquet`` (``path``, ``row``, ``cluster``, ``similarity``) and ``OUT.centroids.npy`` (k, D)
float32 beside it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .outputs import atomic_path
from .search import _faiss

if TYPE_CHECKING:
    from .collection import Collection
    from .provenance import Provenance

DEFAULT_ITERATIONS = 20
DEFAULT_RESTARTS = 3
SAMPLE_PER_CENTROID = 256  # FAISS's own default cap on training points per centroid
CENTROIDS_SUFFIX = ".centroids.npy"  # OUT.centroids.npy beside OUT.parquet


@dataclass
class Clusters:
    """``assignment`` (N,) int64 cluster of each row, ``similarity`` (N,) float32 cosine to its
    centroid, ``centroids`` (k, D) float32 unit vectors, ``sizes`` (k,) rows per cluster."""

    assignment: np.ndarray
    similarity: np.ndarray
    centroids: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.assignment, minlength=len(self.centroids))

    def write(
        self, path: str | os.PathLike[str], collection: Collection, provenance: Provenance | None = None
    ) -> tuple[Path, Path]:
        """``path`` (Parquet: ``path``, ``row``, ``cluster``, ``similarity``; the provenance in the
        schema metadata) and ``OUT.centroids.npy``, each atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .provenance import PARQUET_KEY

        path = Path(path)
        centroids_path = path.with_name(path.stem + CENTROIDS_SUFFIX)
        table = pa.table(
            {
                "path": collection.id_array(),
                "row": pa.array(np.arange(len(self.assignment)), pa.int64()),
                "cluster": pa.array(self.assignment, pa.int64()),
                "similarity": pa.array(self.similarity, pa.float32()),
            }
        )
        meta = {"k": len(self.centroids), "provenance": provenance.to_dict() if provenance else None}
        table = table.replace_schema_metadata({PARQUET_KEY: json.dumps(meta).encode()})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        with atomic_path(centroids_path) as tmp, open(tmp, "wb") as f:
            np.save(f, self.centroids)
        return path, centroids_path


def kmeans(
    collection: Collection,
    k: int,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    restarts: int = DEFAULT_RESTARTS,
    seed: int = 0,
) -> Clusters:
    """Spherical k-means of ``collection`` into ``k`` clusters (see the module doc)."""
    faiss = _faiss()
    n = len(collection)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the {n} rows of {collection.path}, got {k}")
    if iterations < 1 or restarts < 1:
        raise ValueError(f"iterations and restarts must be >= 1, got {iterations} and {restarts}")
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, k * SAMPLE_PER_CENTROID), replace=False))
    trainer = faiss.Kmeans(
        collection.dim,
        k,
        niter=iterations,
        nredo=restarts,
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
        spherical=True,
        seed=seed,
        max_points_per_centroid=SAMPLE_PER_CENTROID,
        verbose=False,
    )
    trainer.train(collection.gather(sample))
    centroids = np.ascontiguousarray(trainer.centroids, dtype=np.float32)
    index = faiss.IndexFlatIP(collection.dim)
    index.add(centroids)
    assignment = np.empty(n, np.int64)
    similarity = np.empty(n, np.float32)
    for start, block in collection.chunks():
        scores, nearest = index.search(block, 1)
        assignment[start : start + len(block)] = nearest[:, 0]
        similarity[start : start + len(block)] = scores[:, 0]
    return Clusters(assignment, similarity, centroids)
