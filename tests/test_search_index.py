"""FAISS indexes of a collection: the kind follows the size, recall@10 is measured against exact search, and
an index refuses a collection it was not built for."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("faiss")

import collection_files as cf
from nvclip_fast import cli, search
from nvclip_fast.collection import Collection
from nvclip_fast.search import Index, index_factory, recall_at_k

DIM = 32


def _collection(tmp_path, n, seed=0, name="c.parquet", **changes):
    x = cf.unit_vectors(n, DIM, seed=seed, clusters=max(1, n // 100))
    ids = [f"img/{i}.jpg" for i in range(n)]
    return cf.write_parquet(tmp_path / name, ids, x, cf.provenance(DIM, **changes)), x


def _true_top(x, queries, k):
    return np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :k]


def test_the_index_kind_follows_the_collection_size():
    assert index_factory(search.FLAT_MAX_ROWS, 512) == "Flat"
    assert index_factory(100_000, 512) == "IVF1024,Flat"
    assert index_factory(1_000_000, 512) == "IVF2048,Flat"
    assert index_factory(5_000_000, 1024) == "IVF8192_HNSW32,PQ256"
    assert index_factory(5_000_000, 768) == "IVF8192_HNSW32,PQ192"


def test_a_flat_index_is_exact(tmp_path):
    path, x = _collection(tmp_path, 500)
    with Collection.open(path) as c:
        index = Index.build(c)
        assert index.info.factory == "Flat"
        assert index.info.recall_at_10 == 1.0
        assert index.info.nprobe is None
        queries = cf.unit_vectors(5, DIM, seed=9)
        scores, rows = c.search_vectors(queries, 10, index=index)
        np.testing.assert_array_equal(rows, _true_top(x, queries, 10))
        np.testing.assert_allclose(scores, c.search_vectors(queries, 10)[0], atol=1e-6)


def test_an_ivf_index_reports_the_recall_it_has(tmp_path):
    path, x = _collection(tmp_path, 30_000, seed=1)
    with Collection.open(path) as c:
        index = Index.build(c, recall_queries=300)
        info = index.info
        assert info.factory == "IVF512,Flat"
        assert info.recall_at_10 >= search.TARGET_RECALL or info.nprobe == 512
        # recall on fresh queries near the rows, computed here from numpy's exact answer
        rng = np.random.default_rng(5)
        queries = x[rng.choice(len(x), 200, replace=False)] + rng.normal(0, 0.05, (200, DIM)).astype(
            np.float32
        )
        found = c.search_vectors(queries, 10, index=index)[1]
        truth = _true_top(x, queries, 10)
        recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
        assert recall >= info.recall_at_10 - 0.05  # the same index on similar queries


def test_a_product_quantized_index_builds_and_measures_itself(tmp_path):
    path, x = _collection(tmp_path, 3000, seed=2)
    with Collection.open(path) as c:
        index = Index.build(c, factory="IVF32_HNSW32,PQ8", recall_queries=200)
    assert 0.0 < index.info.recall_at_10 <= 1.0
    assert 1 <= index.info.nprobe <= 32
    rows = index.search(x[:3], 10)[1]
    assert rows.shape == (3, 10)
    assert (rows < 3000).all()


def test_recall_leaves_out_the_query_row():
    own = np.array([7, 8])
    truth = np.array([[7, 1, 2], [3, 4, 8]])
    assert recall_at_k(np.array([[7, 1, 5], [3, 8, 4]]), truth, own, 2) == pytest.approx((0.5 + 1.0) / 2)


def test_an_index_is_saved_loaded_and_refuses_other_collections(tmp_path):
    path, x = _collection(tmp_path, 300)
    with Collection.open(path) as c:
        Index.build(c).save(tmp_path / "c.faiss")
        loaded = Index.load(tmp_path / "c.faiss")
        np.testing.assert_array_equal(loaded.search(x[:2], 5)[1], c.search_vectors(x[:2], 5)[1])
    info = json.loads((tmp_path / "c.faiss.json").read_text())
    assert info["rows"] == 300
    assert info["provenance"]["model"] == "synthetic"

    other_rows, _ = _collection(tmp_path, 301, name="bigger.parquet")
    other_ids = cf.write_parquet(
        tmp_path / "renamed.parquet", [f"x{i}" for i in range(300)], x, cf.provenance(DIM)
    )
    other_model, _ = _collection(tmp_path, 300, name="model.parquet", weights_sha256="b" * 64)
    for path_, match in (
        (other_rows, "built for 300 x 32 embeddings"),
        (other_ids, r"other rows .* \(ids differ\)"),
        (other_model, "another model's embeddings .* weights_sha256 differs"),
    ):
        with Collection.open(path_) as c, pytest.raises(ValueError, match=match):
            c.search_vectors(x[:1], 3, index=tmp_path / "c.faiss")
    with pytest.raises(FileNotFoundError, match="no index there"):
        Index.load(tmp_path / "missing.faiss")


def test_index_cli_prints_the_recall_it_measured(tmp_path, capsys):
    path, _x = _collection(tmp_path, 400)
    assert cli.main(["index", str(path), "-o", str(tmp_path / "i.faiss")]) == 0
    line = capsys.readouterr().out
    assert "Flat over 400 rows: recall@10 1.000 against exact search on 400 held-out queries" in line
    code = cli.main(["index", str(path), "-o", str(tmp_path / "j.faiss"), "--factory", "Nonsense99"])
    assert code == cli.EXIT_USAGE
    assert "FAISS index 'Nonsense99'" in capsys.readouterr().err
