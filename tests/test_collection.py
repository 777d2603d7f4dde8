"""Collections: every stored form opens lazily with its provenance; exact search equals brute-force numpy;
queries are embedded by the collection's own model and another model is refused."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")

import collection_files as cf
import nvclip_fast as nf
from nvclip_fast import cli
from nvclip_fast.collection import (
    Collection,
    CollectionError,
    encoder_provenance,
)
from nvclip_fast.provenance import ProvenanceError
from nvclip_fast.sources import read_id, source_id
from tar_shards import write_tar

DIM = 24
# Exact search computes the same float32 dot products as numpy, in BLAS blocks of another shape:
# the sums may round differently in the last bits.
SCORE_ATOL = 1e-6


def _brute_force(stored: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ stored.astype(np.float32).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


def _store(kind: str, tmp_path: Path, ids: list[str], x: np.ndarray) -> Path:
    prov = cf.provenance(DIM)
    if kind == "parquet":
        return cf.write_parquet(tmp_path / "c.parquet", ids, x, prov, row_group_size=50)
    if kind == "parquet-float16":
        return cf.write_parquet(
            tmp_path / "c.parquet", ids, x.astype(np.float16), prov.replace(dtype="float16")
        )
    if kind == "dataset":
        folder = tmp_path / "c"
        folder.mkdir()
        for part, start in enumerate(range(0, len(ids), 70)):
            cf.write_parquet(
                folder / f"part-{part:03d}.parquet", ids[start : start + 70], x[start : start + 70], prov
            )
        return folder
    return cf.write_npy(tmp_path / "c.npy", ids, x, prov)


@pytest.mark.parametrize("kind", ["parquet", "parquet-float16", "dataset", "npy"])
@pytest.mark.parametrize("chunk_rows", [None, 37])
def test_exact_search_equals_brute_force_numpy(kind, chunk_rows, tmp_path):
    x = cf.unit_vectors(203, DIM, seed=1)
    ids = [f"photos/{i}.jpg" for i in range(len(x))]
    path = _store(kind, tmp_path, ids, x)
    stored = x.astype(np.float16) if kind.endswith("float16") else x
    queries = cf.unit_vectors(9, DIM, seed=2)
    with Collection.open(path, chunk_rows=chunk_rows) as c:
        assert (len(c), c.dim) == (203, DIM)
        assert c.provenance.model == "synthetic"
        for k in (1, 10, 500):
            scores, rows = c.search_vectors(queries, k)
            want_scores, want_rows = _brute_force(stored, queries, k)
            np.testing.assert_array_equal(rows, want_rows)
            np.testing.assert_allclose(scores, want_scores, atol=SCORE_ATOL)
        assert c.ids(rows[0][:3]) == [ids[r] for r in rows[0][:3]]


def test_chunks_and_gather_read_the_stored_rows(tmp_path):
    x = cf.unit_vectors(150, DIM, seed=3)
    ids = [f"{i}.png" for i in range(150)]
    path = cf.write_parquet(tmp_path / "c.parquet", ids, x, cf.provenance(DIM), row_group_size=40)
    c = Collection.open(path, chunk_rows=32)
    starts = []
    for start, block in c.chunks():
        assert len(block) <= 32
        assert block.dtype == np.float32
        np.testing.assert_array_equal(block, x[start : start + len(block)])
        starts.append(start)
    assert starts[0] == 0
    assert sum(len(b) for b in c.embedding_chunks()) == 150
    rows = [149, 0, 77, 77, 31]
    np.testing.assert_array_equal(c.gather(rows), x[rows])
    assert c.ids() == ids
    with pytest.raises(IndexError, match="row 150 out of range"):
        c.gather([150])


def test_ids_are_lossless_in_jsonl(tmp_path):
    ids = ["a\nb.jpg", "c\rd.jpg", "e\u2028f.jpg", "shard.tar::g h.jpg"]
    x = cf.unit_vectors(4, DIM)
    c = Collection.open(cf.write_npy(tmp_path / "o.npy", ids, x, cf.provenance(DIM)))
    assert c.ids() == ids


def test_older_outputs_open_with_a_warning_and_need_a_model(tmp_path):
    x = cf.unit_vectors(5, DIM)
    ids = [f"{i}.jpg" for i in range(5)]
    legacy = {"model": "ViT-S-32", "embed_dim": DIM, "dtype": "float32", "preprocess": cf.SPEC}
    for path in (
        cf.write_parquet(tmp_path / "old.parquet", ids, x, legacy),
        cf.write_npy(tmp_path / "old.npy", ids, x, None, legacy=True),
    ):
        with pytest.warns(UserWarning, match="no provenance stored"):
            c = Collection.open(path)
        assert c.provenance is None
        assert c.ids() == ids
        with pytest.raises(CollectionError, match="has no provenance: give the query model"):
            c.search(text="a dog")
    # what they stored is still checked: the model's name, size and preprocessing
    with pytest.warns(UserWarning, match="no provenance stored"):
        c = Collection.open(tmp_path / "old.parquet")
    c.check_model(cf.provenance(DIM, model="ViT-S-32"))
    with pytest.raises(ProvenanceError, match="model differs: 'ViT-S-32' vs 'synthetic'"):
        c.check_model(cf.provenance(DIM))
    with pytest.raises(ProvenanceError, match="makes 12-d embeddings"):
        c.check_model(cf.provenance(12, model="ViT-S-32"))
    # what the older form gets wrong: a name with a newline shifts every id after it
    cf.write_npy(tmp_path / "bad.npy", ["a\nb.jpg", "c.jpg"], x[:2], None, legacy=True)
    with pytest.warns(UserWarning, match="no provenance"):
        c = Collection.open(tmp_path / "bad.npy")
    with pytest.raises(CollectionError, match="lists 3 ids for the 2 rows"):
        c.ids()


def test_parts_of_another_model_and_bad_files_are_refused(tmp_path):
    x = cf.unit_vectors(4, DIM)
    folder = tmp_path / "ds"
    folder.mkdir()
    cf.write_parquet(folder / "0.parquet", ["a", "b"], x[:2], cf.provenance(DIM))
    cf.write_parquet(folder / "1.parquet", ["c", "d"], x[2:], cf.provenance(DIM, weights_sha256="b" * 64))
    with pytest.raises(
        CollectionError, match=r"1\.parquet holds embeddings of another model.*weights_sha256 differs"
    ):
        Collection.open(folder)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(CollectionError, match=r"expected a \.parquet file"):
        Collection.open(tmp_path / "x.txt")
    with pytest.raises(CollectionError, match="no such file"):
        Collection.open(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(CollectionError, match="not a readable Parquet file"):
        Collection.open(tmp_path / "junk.parquet")
    np.save(tmp_path / "noids.npy", x)
    with pytest.raises(CollectionError, match="no ids beside it"):
        Collection.open(tmp_path / "noids.npy")
    cf.write_npy(tmp_path / "fortran.npy", ["a", "b", "c", "d"], np.asfortranarray(x), cf.provenance(DIM))
    with pytest.raises(CollectionError, match="expected an \\(N, D\\) C-ordered float array, got Fortran"):
        Collection.open(tmp_path / "fortran.npy")
    cut = cf.write_npy(tmp_path / "cut.npy", ["a", "b", "c", "d"], x, cf.provenance(DIM))
    cut.write_bytes(cut.read_bytes()[: -DIM * 2])  # a copy cut short half way through the last row
    with pytest.raises(CollectionError, match=r"truncated: \d+ bytes, \(4, 24\) float32 needs"):
        Collection.open(cut)


def test_read_id_reads_files_and_tar_members_and_nothing_else(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"file bytes")
    shard = tmp_path / "s::x.tar"  # the separator inside the tar's own name
    write_tar(shard, [("k1.jpg", b"member one"), ("dir/k2.png", b"member two")])
    assert read_id(source_id(tmp_path / "a.jpg")) == b"file bytes"
    assert read_id(source_id(shard, "dir/k2.png")) == b"member two"
    with pytest.raises(FileNotFoundError, match=r"no member 'nope\.jpg'"):
        read_id(source_id(shard, "nope.jpg"))
    with pytest.raises(OSError, match="over the limit of 4"):
        read_id(source_id(shard, "k1.jpg"), max_bytes=4)
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(OSError, match="not a regular file"):
        read_id(str(tmp_path / "pipe.jpg"))  # refused, never opened (opening a FIFO blocks)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_id(str(tmp_path / "gone.jpg"))


# ---------------------------------------------------------------------------------------------------
# Queries embedded by a real model


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    pytest.importorskip("skimage")
    from PIL import Image

    import preprocess_reference

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, pixels in list(preprocess_reference.photos().items())[:7]:
        path = folder / f"{name}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def model_collection(tiny_clip_bundles, photo_files, tmp_path_factory):
    """The photos embedded by model A, stored with A's provenance (which names A's bundle)."""
    bundle_a, _ = tiny_clip_bundles
    with nf.Encoder(bundle_a, device="cpu") as enc:
        x = enc.embed(photo_files)
        prov = encoder_provenance(enc).replace(source={"bundle": str(bundle_a)})
    return cf.write_parquet(tmp_path_factory.mktemp("coll") / "photos.parquet", photo_files, x, prov)


def test_search_embeds_the_query_with_the_collections_model(tiny_clip_bundles, photo_files, model_collection):
    with Collection.open(model_collection) as c, nf.Encoder(tiny_clip_bundles[0], device="cpu") as enc:
        hits = c.search(text="a cat on a sofa", k=3)  # the model is opened from the provenance
        query = enc.embed_text(["a cat on a sofa"])
        want_scores, want_rows = _brute_force(enc.embed(photo_files), query, 3)
        assert [h.row for h in hits] == want_rows[0].tolist()
        assert [h.id for h in hits] == [photo_files[r] for r in want_rows[0]]
        np.testing.assert_allclose([h.score for h in hits], want_scores[0], atol=1e-5)
        # an image query by id: the photo itself comes first
        first = c.search(image=photo_files[2], k=1, encoder=enc)[0]
        assert first.id == photo_files[2]
        assert first.score == pytest.approx(1.0, abs=1e-5)


def test_a_query_from_another_model_is_refused(tiny_clip_bundles, model_collection, capsys):
    _, bundle_b = tiny_clip_bundles
    refused = r"query model tiny-clip is not the model of .*weights_sha256 differs"
    with (
        Collection.open(model_collection) as c,
        nf.Encoder(bundle_b, device="cpu") as enc_b,
        pytest.raises(ProvenanceError, match=refused),
    ):
        c.search(text="a dog", encoder=enc_b)
    code = cli.main(["search", str(model_collection), "--text", "a dog", "-m", str(bundle_b)])
    assert code == cli.EXIT_USAGE
    assert "weights_sha256 differs" in capsys.readouterr().err


def test_search_cli_prints_what_the_api_returns(model_collection, photo_files, capsys):
    assert cli.main(["search", str(model_collection), "--text", "a rocket", "-k", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    with Collection.open(model_collection) as c:
        hits = c.search(text="a rocket", k=4)
    assert [(p["id"], p["row"]) for p in printed] == [(h.id, h.row) for h in hits]
    np.testing.assert_allclose([p["score"] for p in printed], [h.score for h in hits], atol=1e-6)
    assert cli.main(["search", str(model_collection), "--image", photo_files[0], "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("\t" + photo_files[0])


def test_what_embed_writes_opens_as_a_collection(tiny_clip_bundles, photo_files, tmp_path):
    bundle_a, _ = tiny_clip_bundles
    out = tmp_path / "emb.parquet"
    assert cli.main(["embed", *photo_files, "-m", str(bundle_a), "-o", str(out), "--no-progress"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # outputs without provenance open with a warning
        c = Collection.open(out)
    with c, nf.Encoder(bundle_a, device="cpu") as enc:
        assert c.ids() == photo_files
        widths, heights = c.sizes()
        assert (widths > 0).all()
        assert (heights > 0).all()
        hit = c.search(image=photo_files[4], k=1, encoder=enc)[0]
        assert hit.row == 4


def test_search_cli_with_an_index_finds_what_exact_search_finds(model_collection, tmp_path, capsys):
    pytest.importorskip("faiss")
    index = tmp_path / "photos.faiss"
    assert cli.main(["index", str(model_collection), "-o", str(index)]) == 0
    capsys.readouterr()

    def search(*extra: str) -> list[str]:
        assert (
            cli.main(["search", str(model_collection), "--text", "a cat", "-k", "3", "--json", *extra]) == 0
        )
        return [hit["id"] for hit in json.loads(capsys.readouterr().out)]

    assert search("--index", str(index)) == search()  # a collection this small gets a Flat index: exact
