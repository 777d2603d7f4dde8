"""k-means of a collection: well-separated synthetic clusters are found, and the outputs say so."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("faiss")

import pyarrow.parquet as pq

import collection_files as cf
from nvclip_fast import cli
from nvclip_fast.collection import Collection

DIM = 32
CLUSTERS = 6


def _clustered(tmp_path, n=1200):
    rng = np.random.default_rng(3)
    centres = cf.unit_vectors(CLUSTERS, DIM, seed=8)
    truth = rng.integers(0, CLUSTERS, n)
    x = centres[truth] + rng.normal(0, 0.03, (n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    path = cf.write_parquet(tmp_path / "c.parquet", [f"{i}.jpg" for i in range(n)], x, cf.provenance(DIM))
    return path, truth


def test_kmeans_finds_separated_clusters(tmp_path):
    path, truth = _clustered(tmp_path)
    with Collection.open(path, chunk_rows=100) as c:
        clusters = c.kmeans(CLUSTERS, seed=1)
    # one found cluster per true cluster: the same partition up to the numbering
    pairs = set(zip(truth.tolist(), clusters.assignment.tolist(), strict=True))
    assert len(pairs) == CLUSTERS
    assert sorted(clusters.sizes.tolist()) == sorted(np.bincount(truth).tolist())
    np.testing.assert_allclose(np.linalg.norm(clusters.centroids, axis=1), 1.0, atol=1e-5)
    assert (clusters.similarity > 0.9).all()


def test_cluster_cli_writes_assignments_and_centroids(tmp_path, capsys):
    path, truth = _clustered(tmp_path, n=300)
    out = tmp_path / "clusters.parquet"
    assert cli.main(["cluster", str(path), "-k", str(CLUSTERS), "-o", str(out)]) == 0
    assert f"{CLUSTERS} clusters of 300 rows" in capsys.readouterr().out
    table = pq.read_table(out)
    assert table.column_names == ["path", "row", "cluster", "similarity"]
    assert table.column("path").to_pylist()[:2] == ["0.jpg", "1.jpg"]
    assert len(set(zip(truth.tolist(), table.column("cluster").to_pylist(), strict=True))) == CLUSTERS
    assert json.loads(table.schema.metadata[b"nvclip_fast"])["k"] == CLUSTERS
    assert np.load(tmp_path / "clusters.centroids.npy").shape == (CLUSTERS, DIM)
    assert cli.main(["cluster", str(path), "-k", "301", "-o", str(out)]) == cli.EXIT_USAGE
    assert "k must be between 1 and the 300 rows" in capsys.readouterr().err
