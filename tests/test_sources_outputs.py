"""Inputs of `nvclip-fast embed` (files, folders, @lists, tar shards) and its atomic outputs."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import threading

import numpy as np
import pytest
from PIL import Image

from nvclip_fast import sources as sources_module
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
from nvclip_fast.provenance import Provenance, ProvenanceError
from nvclip_fast.sources import NotAnImageSource, ParsedId, iter_sources, parse_id, read_id
from tar_shards import write_tar

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
    write_tar(
        root / "b" / "shard.tar",
        [("000.jpg", _jpeg_bytes()), ("000.txt", b"caption"), ("001.png", _png_bytes())],
    )
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
    good = write_tar(tmp_path / "good.tar", [(name, _png_bytes()) for name in ("a.png", "b.png")])
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
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "emb.npy",
        "emb.npy.ids.jsonl",
        "emb.npy.provenance.json",
    ]


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


# --- ids: lossless, parsed back, read back --------------------------------------------------------


def test_ids_are_lossless_for_any_file_name(tmp_path):
    # Names that the old backslash-replace ids merged or that a line-based id file split.
    names = [
        b"a\xff.jpg",
        b"a\\xff.jpg",
        b"x::y.png",
        b"new\nline.png",
        b":c:.png",
        b"caf\xc3\xa9.png",
        b"\\",
    ]
    for k, name in enumerate(names):
        (tmp_path / os.fsdecode(name)).write_bytes(_png_bytes(color=(k, k, k)))
    sources = list(iter_sources([tmp_path]))
    assert len({s.id for s in sources}) == len(names)  # none merged
    for source in sources:
        source.id.encode("utf-8")  # storable in Parquet and JSON
        raw = parse_id(source.id).path
        assert raw in {os.path.join(os.fsencode(tmp_path), n) for n in names}
        assert read_id(source.id) == source.read() == (tmp_path / os.fsdecode(raw)).read_bytes()
    by_name = {os.path.basename(parse_id(s.id).path): s.id for s in sources}
    assert by_name[b"a\xff.jpg"].endswith("a\\xff.jpg")
    assert by_name[b"a\\xff.jpg"].endswith("a\\\\xff.jpg")
    assert by_name[b"caf\xc3\xa9.png"].endswith("café.png")  # valid UTF-8 stays as it is


def test_repeated_tar_members_each_get_an_id(tmp_path):
    shard = write_tar(
        tmp_path / "shard.tar",
        [("000.png", _png_bytes((1, 1, 1))), ("000.png", _png_bytes((2, 2, 2))), ("a::b.png", _png_bytes())],
    )
    sources = list(iter_sources([shard]))
    assert [s.id for s in sources] == [f"{shard}::000.png", f"{shard}::000.png::2", f"{shard}::a\\:\\:b.png"]
    assert [s.read() for s in sources] == [_png_bytes((1, 1, 1)), _png_bytes((2, 2, 2)), _png_bytes()]
    assert parse_id(sources[1].id) == ParsedId(os.fsencode(shard), b"000.png", 2)
    assert parse_id(sources[2].id).member == b"a::b.png"
    for source in sources:  # read_id finds each member again, from another working directory too
        assert read_id(os.path.relpath(source.id, tmp_path), root=tmp_path) == source.read()


@pytest.mark.parametrize("bad", ["a\\q", "a\\x4", "a::b::c::d", "x::m::1", "a::b::zz"])
def test_malformed_ids_are_refused(bad):
    with pytest.raises(ValueError, match="id"):
        parse_id(bad)


# --- nothing that is not a regular file is ever opened -------------------------------------------


def _listed_within(inputs, timeout_s: float = 20):
    """iter_sources in a thread: the listing must end (a blocked open would never return)."""
    result: list = []
    thread = threading.Thread(target=lambda: result.extend(iter_sources(inputs)), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "listing the inputs blocked"
    return result


def test_fifos_sockets_devices_are_skipped_with_their_kind(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png_bytes())
    os.mkfifo(folder / "pipe.jpg")
    os.mkfifo(folder / "pipe")  # no image name: a signature check would have opened it
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "sock.png"))
    (folder / "zero.jpg").symlink_to("/dev/zero")
    (folder / "gone.jpg").symlink_to(folder / "missing.jpg")
    try:
        sources = {s.id: s for s in _listed_within([folder])}
    finally:
        server.close()
    assert sources[str(folder / "a.png")].error is None
    assert sources[str(folder / "pipe.jpg")].error == "skipped: a named pipe (FIFO)"
    assert sources[str(folder / "pipe")].error == "skipped: a named pipe (FIFO)"
    assert sources[str(folder / "sock.png")].error == "skipped: a socket"
    assert sources[str(folder / "zero.jpg")].error == "skipped: a character device"
    assert sources[str(folder / "gone.jpg")].error == "skipped: broken symbolic link"


def test_named_fifo_and_dev_zero_get_an_accurate_reason(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("pipe.jpg\n/dev/zero\n")
    sources = _listed_within([tmp_path / "pipe.jpg", "/dev/zero", f"@{listing}", tmp_path / "nope.jpg"])
    assert [s.error for s in sources] == [
        "not a regular file: a named pipe (FIFO)",
        "not a regular file: a character device",
        "not a regular file: a named pipe (FIFO)",
        "not a regular file: a character device",
        "no such file or directory",
    ]


def test_a_file_swapped_for_a_fifo_after_listing_is_refused_unread(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes())
    (source,) = iter_sources([tmp_path])
    (tmp_path / "a.png").unlink()
    os.mkfifo(tmp_path / "a.png")  # no writer: a blocking open or read would wait forever
    with pytest.raises(NotAnImageSource, match="not a regular file: a named pipe"):
        source.read()


def test_files_over_the_size_limit_are_refused_unread(tmp_path, monkeypatch):
    (tmp_path / "big.png").write_bytes(_png_bytes() + b"\0" * 100)
    (source,) = iter_sources([tmp_path])
    monkeypatch.setattr(sources_module, "MAX_FILE_BYTES", 64)
    with pytest.raises(NotAnImageSource, match="a file of 177 bytes, over the limit of 64"):
        sources_module.read_file(source.path, sources_module.MAX_FILE_BYTES)


# --- lists and single paths -----------------------------------------------------------------------


def test_listed_paths_are_stored_normalized(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "coffee.png").write_bytes(_png_bytes())
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "files.txt"
    listing.write_text("../photos/coffee.png\n./../photos/./missing.png\n")
    sources = list(iter_sources([f"@{listing}"]))
    assert [s.id for s in sources] == [
        str(tmp_path / "photos" / "coffee.png"),
        str(tmp_path / "photos" / "missing.png"),
    ]
    assert sources[0].read() == _png_bytes()


def test_a_listed_dotdot_after_a_symlinked_folder_keeps_what_it_names(tmp_path):
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "x.png").write_bytes(_png_bytes((9, 9, 9)))
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    listing = tmp_path / "files.txt"
    listing.write_text("link/../x.png\n")  # the file system's ".." of link is real/, not tmp_path
    (source,) = iter_sources([f"@{listing}"])
    assert source.id == str(tmp_path / "link" / ".." / "x.png")
    assert source.read() == _png_bytes((9, 9, 9))


def test_one_path_is_one_input(folder):
    assert [s.id for s in iter_sources(str(folder))] == [s.id for s in iter_sources([folder])]
    assert [s.id for s in iter_sources(folder)] == [s.id for s in iter_sources([folder])]
    with pytest.raises(TypeError, match="got bytes"):
        list(iter_sources(b"photos"))


# --- .npy ids and error files ---------------------------------------------------------------------


def test_npy_ids_survive_every_line_break(tmp_path):
    out = tmp_path / "emb.npy"
    rows = _rows(6)
    rows.ids[:] = ["a\nb.jpg", "c\rd.jpg", "e\x85f.jpg", "g\u2028h.jpg", 'q"\\.jpg', "plain.jpg"]
    _write(out, rows)
    ids_file = sibling(out, ".ids.jsonl")
    assert ids_file.read_bytes().count(b"\n") == 6
    assert ids_file.read_bytes().isascii()
    assert read_output(out).ids == rows.ids
    np.testing.assert_array_equal(read_output(out).embeddings, rows.embeddings)


def test_error_files_are_tied_to_the_output_and_written_only_when_needed(tmp_path):
    parquet, npy = tmp_path / "photos.parquet", tmp_path / "photos.npy"
    assert write_errors(parquet, [("a.png", "empty file")]).name == "photos.parquet.errors.jsonl"
    assert write_errors(npy, [("b.png", "empty file")]).name == "photos.npy.errors.jsonl"
    assert write_errors(parquet, []) is None  # a clean run: none, and the stale one is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos.npy.errors.jsonl"]


def test_an_npy_without_provenance_is_refused_clearly(tmp_path):
    out = tmp_path / "emb.npy"
    np.save(out, np.zeros((2, 4), np.float32))
    (tmp_path / "emb.paths.txt").write_text("a\nb\n")  # what an older version wrote
    with pytest.raises(ProvenanceError, match=r"emb.npy.provenance.json is missing \(it has emb.paths.txt"):
        read_provenance(out)
