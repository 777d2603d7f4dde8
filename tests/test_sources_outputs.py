"""Inputs of `nvclip-fast embed` (files, folders, @lists, tar shards) and its atomic outputs."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from nvclip_fast.outputs import (
    Checkpoint,
    Rows,
    read_output,
    read_parquet_metadata,
    sibling,
    write_errors,
    write_output,
)
from nvclip_fast.sources import iter_sources


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


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_parquet_round_trip(tmp_path, dtype):
    out = tmp_path / "emb.parquet"
    rows = _rows(5, dtype=dtype)
    write_output(out, rows, {"model": "tiny", "embed_dim": 4})
    back = read_output(out)
    assert back.ids == rows.ids
    assert back.embeddings.dtype == dtype
    np.testing.assert_array_equal(back.embeddings, rows.embeddings)
    np.testing.assert_array_equal(back.widths, rows.widths)
    np.testing.assert_array_equal(back.heights, rows.heights)
    assert read_parquet_metadata(out) == {"model": "tiny", "embed_dim": 4}
    assert [p.name for p in tmp_path.iterdir()] == ["emb.parquet"]  # no temporary left behind


def test_npy_round_trip_with_paths(tmp_path):
    out = tmp_path / "emb.npy"
    rows = _rows(3)
    write_output(out, rows)
    assert sibling(out, ".paths.txt").read_text().splitlines() == rows.ids
    back = read_output(out)
    np.testing.assert_array_equal(back.embeddings, rows.embeddings)
    assert back.ids == rows.ids


def test_failed_write_leaves_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "emb.npy"
    write_output(out, _rows(2))
    before = out.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_output(out, _rows(9))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "emb.paths.txt"]


def test_bad_output_name_and_row_mismatch(tmp_path):
    with pytest.raises(ValueError, match=r"expected a \.parquet or \.npy file name"):
        write_output(tmp_path / "emb.csv", _rows(1))
    with pytest.raises(ValueError, match="rows disagree"):
        Rows(["a"], np.zeros((2, 4)), np.zeros(2), np.zeros(2))


def test_checkpoint_chunks(tmp_path):
    out = tmp_path / "emb.parquet"
    checkpoint = Checkpoint(out)
    assert not checkpoint.exists()
    checkpoint.append(_rows(2))
    checkpoint.append(_rows(3, start=2))
    again = Checkpoint(out)
    loaded = Rows.concat(again.load(), 4, np.float32)
    assert loaded.ids == [f"img{i}.png" for i in range(5)]
    again.append(_rows(1, start=5))  # numbering continues after the loaded chunks
    assert len(Rows.concat(Checkpoint(out).load(), 4, np.float32).ids) == 6
    again.clear()
    assert not checkpoint.exists()


def test_errors_jsonl(tmp_path):
    path = write_errors(
        tmp_path / "emb.parquet", [("a.png", "empty file"), ("b.tar", "unreadable tar shard")]
    )
    assert path.name == "emb.errors.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [
        {"path": "a.png", "error": "empty file"},
        {"path": "b.tar", "error": "unreadable tar shard"},
    ]
