"""Inputs of `nvclip-fast embed` (files, folders, @lists, tar shards) and its atomic outputs."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile

import numpy as np
import pytest
from PIL import Image

from nvclip_fast.outputs import (
    Checkpoint,
    Rows,
    Segment,
    assemble,
    output_segments,
    read_ids,
    read_output,
    read_provenance,
    sibling,
    write_errors,
    write_output,
)
from nvclip_fast.provenance import Provenance
from nvclip_fast.sources import iter_sources

PROVENANCE = Provenance(model="tiny", embed_dim=4, preprocess={"size": 8}, weights_sha256="a" * 64)


def _png_bytes(color=(10, 20, 30), size=(4, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5, 5), (200, 100, 0)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "b" / "deeper").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "z.png").write_bytes(_png_bytes())
    (root / "a" / "one.JPG").write_bytes(_jpeg_bytes())
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / "no_extension").write_bytes(_png_bytes())  # taken by its signature
    (root / "b" / "deeper" / "empty.jpg").write_bytes(b"")  # taken by its name; fails later
    (root / "b" / "data.bin").write_bytes(b"\x00\x01\x02")
    with tarfile.open(root / "b" / "shard.tar", "w") as tar:
        for name, data in [("000.jpg", _jpeg_bytes()), ("000.txt", b"caption"), ("001.png", _png_bytes())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root


def test_directory_scan_order_and_filter(folder):
    ids = [s.id for s in iter_sources([folder])]
    assert ids == [
        str(folder / "z.png"),
        str(folder / "a" / "one.JPG"),
        str(folder / "b" / "no_extension"),
        f"{folder / 'b' / 'shard.tar'}::000.jpg",
        f"{folder / 'b' / 'shard.tar'}::001.png",
        str(folder / "b" / "deeper" / "empty.jpg"),
    ]


def test_sources_read_their_bytes(folder):
    by_id = {s.id: s for s in iter_sources([folder])}
    assert by_id[str(folder / "z.png")].read() == _png_bytes()
    assert by_id[f"{folder / 'b' / 'shard.tar'}::001.png"].read() == _png_bytes()
    assert by_id[str(folder / "b" / "deeper" / "empty.jpg")].read() == b""


def test_list_file_and_missing_paths(folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n\nimages/z.png\n{folder / 'a' / 'notes.txt'}\nimages/missing.png\n")
    sources = list(iter_sources([f"@{listing}", tmp_path / "nope.jpg", f"@{tmp_path / 'nolist.txt'}"]))
    assert [s.id for s in sources] == [
        str(tmp_path / "images" / "z.png"),
        str(folder / "a" / "notes.txt"),  # listed explicitly: taken, decoding will judge it
        str(tmp_path / "images" / "missing.png"),
        str(tmp_path / "nope.jpg"),
        f"@{tmp_path / 'nolist.txt'}",
    ]
    assert [s.error is None for s in sources] == [True, True, False, False, False]
    assert "listed" in sources[2].error
    assert "unreadable list file" in sources[4].error


def test_truncated_tar_reports_the_shard(tmp_path):
    good = tmp_path / "good.tar"
    with tarfile.open(good, "w") as tar:
        for name in ("a.png", "b.png"):
            data = _png_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    broken = tmp_path / "broken.tar"
    broken.write_bytes(good.read_bytes()[:700])  # cut inside the second member
    sources = list(iter_sources([broken]))
    assert sources[0].id == f"{broken}::a.png"
    assert sources[-1].id == str(broken)
    assert "unreadable tar shard" in sources[-1].error


def _rows(n: int, dim: int = 4, dtype=np.float32, start: int = 0) -> Rows:
    rng = np.random.default_rng(start)
    return Rows(
        [f"img{start + i}.png" for i in range(n)],
        rng.standard_normal((n, dim)).astype(dtype),
        np.arange(n, dtype=np.int32) + 10,
        np.arange(n, dtype=np.int32) + 20,
    )


def _write(out, rows: Rows, dtype="float32", provenance=PROVENANCE, block_rows=3):
    blocks = [
        Rows(
            rows.ids[i : i + block_rows],
            rows.embeddings[i : i + block_rows],
            rows.widths[i : i + block_rows],
            rows.heights[i : i + block_rows],
        )
        for i in range(0, len(rows.ids), block_rows)
    ]
    write_output(out, rows.ids, blocks, rows.embeddings.shape[1], dtype, provenance.replace(dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_parquet_round_trip(tmp_path, dtype):
    out = tmp_path / "emb.parquet"
    rows = _rows(5, dtype=dtype)
    _write(out, rows, np.dtype(dtype).name)
    back = read_output(out)
    assert back.ids == rows.ids
    assert back.embeddings.dtype == dtype
    np.testing.assert_array_equal(back.embeddings, rows.embeddings)
    np.testing.assert_array_equal(back.widths, rows.widths)
    np.testing.assert_array_equal(back.heights, rows.heights)
    assert read_provenance(out) == PROVENANCE.replace(dtype=np.dtype(dtype).name)
    assert [p.name for p in tmp_path.iterdir()] == ["emb.parquet"]  # no temporary left behind


def test_outputs_are_readable_by_others(tmp_path):
    out = tmp_path / "emb.parquet"
    old = os.umask(0o022)
    try:
        _write(out, _rows(2))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # not mkstemp's 0600


def test_npy_round_trip_with_ids_and_provenance(tmp_path):
    out = tmp_path / "emb.npy"
    rows = _rows(7)
    _write(out, rows)
    assert read_ids(sibling(out, ".ids.jsonl")) == rows.ids
    back = read_output(out)
    np.testing.assert_array_equal(back.embeddings, rows.embeddings)
    assert back.ids == rows.ids
    assert read_provenance(out) == PROVENANCE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "emb.npy.ids.jsonl", "emb.npy.provenance.json"]


def test_failed_write_leaves_the_previous_pair(tmp_path):
    out = tmp_path / "emb.npy"
    _write(out, _rows(2))
    names = ["emb.npy", "emb.npy.ids.jsonl", "emb.npy.provenance.json"]
    before = [(tmp_path / name).read_bytes() for name in names]

    def broken_blocks():
        yield _rows(3)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_output(out, _rows(9).ids, broken_blocks(), 4, "float32", PROVENANCE)
    assert [(tmp_path / name).read_bytes() for name in names] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_inconsistent_npy_pair_is_ignored_with_a_warning(tmp_path):
    out = tmp_path / "emb.npy"
    _write(out, _rows(2))
    sibling(out, ".ids.jsonl").write_text('"a"\n"b"\n"c"\n')  # as if a crash hit between the renames
    with pytest.warns(UserWarning, match="embedded again"):
        assert output_segments(out) == []


def test_bad_output_name_and_row_mismatch(tmp_path):
    with pytest.raises(ValueError, match=r"expected a \.parquet or \.npy file name"):
        write_output(tmp_path / "emb.csv", [], [], 4, "float32", PROVENANCE)
    with pytest.raises(ValueError, match="rows disagree"):
        Rows(["a"], np.zeros((2, 4)), np.zeros(2), np.zeros(2))


def test_assemble_in_order_last_segment_wins():
    first, second = _rows(4), _rows(3, start=2)  # img2, img3 stored twice: the second copy wins
    segments = [Segment(r.ids, lambda r=r: r) for r in (first, second)]
    order = ["img4.png", "img0.png", "img3.png", "img1.png", "img2.png"]
    blocks = list(assemble(order, segments, block_rows=2))
    assert [len(b.ids) for b in blocks] == [2, 2, 1]
    got = np.concatenate([b.embeddings for b in blocks])
    want = np.stack(
        [
            second.embeddings[2],
            first.embeddings[0],
            second.embeddings[1],
            first.embeddings[1],
            second.embeddings[0],
        ]
    )
    np.testing.assert_array_equal(got, want)


def test_checkpoint_chunks(tmp_path):
    out = tmp_path / "emb.parquet"
    checkpoint = Checkpoint(out)
    assert not checkpoint.exists()
    checkpoint.start(PROVENANCE)
    checkpoint.append(_rows(2))
    checkpoint.append(_rows(3, start=2))
    again = Checkpoint(out)
    assert again.provenance() == PROVENANCE
    assert [i for s in again.segments() for i in s.ids] == [f"img{i}.png" for i in range(5)]
    np.testing.assert_array_equal(again.segments()[1].load().embeddings, _rows(3, start=2).embeddings)
    (checkpoint.dir / "chunk-000000.npz").unlink()  # a gap: numbering continues after the last chunk
    again.append(_rows(1, start=5))
    assert sorted(p.name for p in checkpoint.dir.glob("chunk-*")) == ["chunk-000001.npz", "chunk-000002.npz"]
    again.clear()
    assert not checkpoint.exists()


def test_errors_jsonl(tmp_path):
    path = write_errors(
        tmp_path / "emb.parquet", [("a.png", "empty file"), ("b.tar", "unreadable tar shard")]
    )
    assert path.name == "emb.parquet.errors.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [
        {"path": "a.png", "error": "empty file"},
        {"path": "b.tar", "error": "unreadable tar shard"},
    ]


def test_non_utf8_names_become_storable_ids(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # not UTF-8: os gives it with a surrogate escape
    (tmp_path / name).write_bytes(_png_bytes())
    (source,) = iter_sources([tmp_path])
    assert source.id == str(tmp_path / "caf\\xe9.png")
    assert source.read() == _png_bytes()
    source.id.encode("utf-8")  # storable in Parquet and JSON


def test_unreadable_directory_is_an_error_item(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "a.png").write_bytes(_png_bytes())
    (tmp_path / "b.png").write_bytes(_png_bytes())
    real_scandir = os.scandir

    def scandir(path="."):  # as if `locked` had no read permission (tests may run as root)
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    sources = list(iter_sources([tmp_path]))
    assert [s.id for s in sources] == [str(tmp_path / "b.png"), str(locked)]
    assert sources[1].error == "unreadable directory: Permission denied"
