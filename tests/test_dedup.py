"""Near-duplicates: planted copies of real photos (re-encoded, resized, byte copies) are grouped and distinct
photos are not; exact duplicates are grouped whatever the threshold; the kept row follows the rule."""

from __future__ import annotations

import io
import json
import shutil
import warnings

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("faiss")

import pyarrow.parquet as pq

import collection_files as cf
from nvclip_fast import cli, dedup
from nvclip_fast.collection import Collection

DIM = 32
# tiny-clip with random weights (test model A): copies of one photo score >= 0.998 (JPEG quality 40,
# half size), distinct photos of scikit-image <= 0.974. The threshold sits between the two.
PHOTO_THRESHOLD = 0.99


@pytest.fixture(scope="module")
def planted(tiny_clip_bundles, tmp_path_factory):
    """Seven photos, each stored four ways (PNG, JPEG quality 40, JPEG at half size, a byte copy of
    the PNG), embedded by ``nvclip-fast embed``: (collection path, {photo: [ids of its copies]})."""
    pytest.importorskip("skimage")
    from PIL import Image

    import preprocess_reference

    bundle_a, _ = tiny_clip_bundles
    folder = tmp_path_factory.mktemp("planted")
    copies = {}
    for name, pixels in list(preprocess_reference.photos().items())[:7]:
        image = Image.fromarray(pixels).convert("RGB")
        original = folder / f"{name}.png"
        image.save(original)
        image.save(folder / f"{name}_q40.jpg", quality=40)
        image.resize((image.width // 2, image.height // 2)).save(folder / f"{name}_half.jpg", quality=90)
        shutil.copyfile(original, folder / f"{name}_copy.png")
        copies[name] = sorted(
            str(folder / f)
            for f in (f"{name}.png", f"{name}_q40.jpg", f"{name}_half.jpg", f"{name}_copy.png")
        )
    out = folder / "emb.parquet"
    assert cli.main(["embed", str(folder), "-m", str(bundle_a), "-o", str(out), "--no-progress"]) == 0
    return out, copies


def _open(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an output without provenance opens with a warning
        return Collection.open(path)


def test_planted_copies_are_grouped_and_distinct_photos_are_not(planted):
    path, copies = planted
    with _open(path) as c:
        groups = c.near_duplicates(PHOTO_THRESHOLD)
    found = sorted(
        sorted(i for i, g in zip(groups.ids, groups.group, strict=True) if g == group)
        for group in set(groups.group)
    )
    assert found == sorted(copies.values())
    for name, members in copies.items():
        kept = [i for i, k in zip(groups.ids, groups.keep, strict=True) if k and i in members]
        # the kept one has the most pixels; the PNG and its byte copy tie, the earlier row wins
        assert kept == [min(m for m in members if m.endswith(".png"))], name
    assert len(groups.drop) == 7 * 3
    assert (groups.similarity >= PHOTO_THRESHOLD).all()


def test_exact_duplicates_are_grouped_whatever_the_threshold(tmp_path):
    x = cf.unit_vectors(300, DIM, seed=4)
    noise = np.random.default_rng(1).normal(0, 1e-7, (5, DIM)).astype(np.float32)
    rows = np.concatenate([x, x[:10], x[10:15] + noise])  # bit-equal copies, and float-rounding ones
    path = cf.write_npy(tmp_path / "c.npy", [f"{i}" for i in range(len(rows))], rows, cf.provenance(DIM))
    with Collection.open(path) as c:
        groups = c.near_duplicates(threshold=1.0)
    pairs = {tuple(sorted(groups.rows[groups.group == g])) for g in set(groups.group)}
    assert pairs == {(i, 300 + i) for i in range(15)}


def test_a_group_larger_than_the_neighbours_searched_stays_one_group(tmp_path):
    x = cf.unit_vectors(50, DIM, seed=5)
    rows = np.concatenate([x, np.repeat(x[:1], 200, axis=0)])  # 201 identical rows
    path = cf.write_npy(tmp_path / "c.npy", [f"{i}" for i in range(len(rows))], rows, cf.provenance(DIM))
    with Collection.open(path, chunk_rows=16) as c:
        groups = c.near_duplicates(0.99, neighbors=4)
    assert groups.groups == 1
    assert len(groups.rows) == 201
    assert groups.rows[groups.keep].tolist() == [0]


def test_an_inverted_file_finds_the_same_groups_as_exact_search(tmp_path, monkeypatch):
    x = cf.unit_vectors(3000, DIM, seed=6, clusters=30, spread=1.0)
    rng = np.random.default_rng(2)
    twins = rng.choice(3000, 40, replace=False)
    near = x[twins] + rng.normal(0, 0.02, (40, DIM)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    rows = np.concatenate([x, near])
    path = cf.write_npy(tmp_path / "c.npy", [f"{i}" for i in range(len(rows))], rows, cf.provenance(DIM))
    with Collection.open(path, chunk_rows=500) as c:
        exact = c.near_duplicates(0.98)
        monkeypatch.setattr(dedup, "FLAT_MAX_ROWS", 100)  # 3040 distinct rows: an IVF index now
        approximate = c.near_duplicates(0.98)
    assert len(exact.rows) >= 80  # every planted twin at least
    np.testing.assert_array_equal(approximate.rows, exact.rows)
    np.testing.assert_array_equal(approximate.group, exact.group)


def test_union_links_chains_and_keeps_roots_smallest():
    parent = np.arange(8)
    dedup._union(parent, np.array([5, 1, 6, 3]), np.array([4, 5, 7, 6]))
    roots = dedup._roots(parent)
    assert roots.tolist() == [0, 1, 2, 3, 1, 1, 3, 3]


def test_dedup_cli_writes_groups_and_the_drop_list(tmp_path, capsys):
    x = cf.unit_vectors(20, DIM, seed=7)
    rows = np.concatenate([x, x[:2]])
    ids = [f"img{i}.jpg" for i in range(22)]
    widths = [100] * 20 + [400, 10]  # the copy of img0 is larger: it is kept; img1's is smaller
    path = cf.write_parquet(
        tmp_path / "c.parquet", ids, rows, cf.provenance(DIM), widths=widths, heights=[100] * 22
    )
    out, drop = tmp_path / "groups.parquet", tmp_path / "drop.jsonl"
    code = cli.main(["dedup", str(path), "--threshold", "0.95", "-o", str(out), "--drop-list", str(drop)])
    assert code == 0
    assert (
        "2 groups of near-duplicates (cosine >= 0.95) among 22 rows: keep 20, drop 2"
        in capsys.readouterr().out
    )
    table = pq.read_table(out)
    # groups numbered by their kept row (img1, then img20), each kept row first
    assert table.column("path").to_pylist() == ["img1.jpg", "img21.jpg", "img20.jpg", "img0.jpg"]
    assert table.column("keep").to_pylist() == [True, False, True, False]
    assert table.column("group").to_pylist() == [0, 0, 1, 1]
    meta = json.loads(table.schema.metadata[b"nvclip_fast"])
    assert meta["threshold"] == 0.95
    assert meta["provenance"]["model"] == "synthetic"
    assert [json.loads(line) for line in io.StringIO(drop.read_text())] == ["img21.jpg", "img0.jpg"]
    assert cli.main(["dedup", str(path), "--threshold", "2", "-o", str(out)]) == cli.EXIT_USAGE
