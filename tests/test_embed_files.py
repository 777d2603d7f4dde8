"""`nvclip-fast embed` / `classify` on a messy folder: one aligned row per good image, every bad input
listed with its reason, atomic outputs, resume after Ctrl-C."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
pytest.importorskip("onnxruntime")
pa_parquet = pytest.importorskip("pyarrow.parquet")

from PIL import Image  # noqa: E402

import nvclip_fast as nf  # noqa: E402
import tiny_models  # noqa: E402
from nvclip_fast import cli  # noqa: E402
from nvclip_fast.outputs import Checkpoint, read_ids, read_output, read_provenance  # noqa: E402
from nvclip_fast.provenance import Provenance  # noqa: E402
from nvclip_fast.sources import read_id, source_id  # noqa: E402
from tar_shards import write_tar  # noqa: E402

MAX_BATCH = 8
# Rows of the same image through the CLI and through Encoder.embed run the same graph on the same
# input; ONNX Runtime may pick other kernels for other batch sizes: float32 rounding only.
ROW_ATOL = 1e-6
EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6
BOMB_SIDE = 20000  # 400 Mpixel: over twice Pillow's MAX_IMAGE_PIXELS, so Image.open refuses it
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    checkpoint = tiny_models.save_checkpoint(tiny_models.random_model("tiny-clip", seed=4), tmp / "w.pt")
    nf.export("tiny-clip", tmp / "tiny.onnx", weights=checkpoint, max_batch=MAX_BATCH, quiet=True)
    return tmp / "tiny.onnx"


@pytest.fixture(scope="module")
def encoder(bundle):
    with nf.Encoder(bundle, device="cpu") as enc:
        yield enc


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png() -> bytes:
    """A valid PNG header for a 20000 x 20000 gray image with almost no data: Pillow refuses it at
    open (decompression-bomb limit) before any pixel is decoded."""
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A folder with every image mode, sub-folders, a tar shard and bad files.

    Returns (root, good ids in scan order, {bad id: reason pattern})."""
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)

    def rgb(h: int, w: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    photo = _save(rgb(60, 90), root / "a_photos" / "rgb.jpg", quality=90)
    gray = _save(
        Image.fromarray(rng.integers(0, 256, (50, 40), dtype=np.uint8)), root / "a_photos" / "gray.png"
    )
    rgba_pixels = rng.integers(0, 256, (40, 70, 4), dtype=np.uint8)
    rgba = _save(Image.fromarray(rgba_pixels, "RGBA"), root / "a_photos" / "rgba.png")
    palette = _save(rgb(45, 45).convert("P"), root / "a_photos" / "palette.png")
    cmyk = _save(Image.new("CMYK", (64, 48), (10, 200, 30, 40)), root / "a_photos" / "cmyk.jpg")
    deep = _save(
        Image.fromarray((rng.integers(0, 65536, (30, 50))).astype(np.uint16)),
        root / "a_photos" / "deep16.png",
    )
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW
    rotated = _save(rgb(30, 80), root / "a_photos" / "rotated.jpg", exif=exif.tobytes())
    nested = root / "b_nested" / "deeper"
    nested.mkdir(parents=True)
    png = io.BytesIO()
    rgb(40, 40).save(png, format="PNG")
    (nested / "broken.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "b_nested" / "empty.jpg").write_bytes(b"")
    (root / "b_nested" / "readme.txt").write_text("not an image, not listed")
    (root / "b_nested" / "bomb.png").write_bytes(bomb_png())
    shard = root / "c_shard.tar"
    members = [("000001.jpg", rgb(33, 44)), ("000001.txt", None), ("000002.png", rgb(20, 90))]
    write_tar(shard, [(n, b"a caption" if im is None else _encoded(im, n)) for n, im in members])
    # Scan order: a folder's own files (sorted) before its sub-folders (sorted), depth first.
    good = [f"{shard}::000001.jpg", f"{shard}::000002.png"]
    good += sorted(str(p) for p in (photo, gray, rgba, palette, cmyk, deep, rotated))
    bad = {
        str(nested / "broken.png"): "cannot decode",
        str(root / "b_nested" / "empty.jpg"): "empty file",
        str(root / "b_nested" / "bomb.png"): "too large",
    }
    return root, good, bad


def _encoded(image: Image.Image, name: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if name.endswith(".jpg") else "PNG")
    return buf.getvalue()


def _reference(encoder, image_id: str) -> np.ndarray:
    """Encoder.embed on the bytes the id names (a file, or a tar member)."""
    return encoder.embed([read_id(image_id)])[0]


# --- embed ------------------------------------------------------------------------------------------


def test_messy_folder_to_parquet(bundle, encoder, messy, tmp_path, capsys):
    root, good, bad = messy
    out = tmp_path / "emb.parquet"
    code = cli.main(
        ["embed", str(root), "-m", str(bundle), "-o", str(out), "--no-progress", "--workers", "2"]
    )
    assert code == cli.EXIT_SOME_FAILED  # some inputs failed; the rest is written
    table = pa_parquet.read_table(out)
    assert table.column_names == ["path", "embedding", "width", "height"]
    rows = read_output(out)
    assert rows.ids == good  # one row per good image, in scan order
    for k, image_id in enumerate(rows.ids):
        np.testing.assert_allclose(
            rows.embeddings[k], _reference(encoder, image_id), atol=ROW_ATOL, err_msg=image_id
        )
    sizes = dict(zip(rows.ids, zip(rows.widths.tolist(), rows.heights.tolist(), strict=True), strict=True))
    assert sizes[str(root / "a_photos" / "rotated.jpg")] == (80, 30)  # as stored: no EXIF rotation
    assert sizes[str(root / "a_photos" / "deep16.png")] == (50, 30)
    errors = [json.loads(line) for line in (tmp_path / "emb.parquet.errors.jsonl").read_text().splitlines()]
    assert {e["path"] for e in errors} == set(bad)
    for e in errors:
        assert re.search(bad[e["path"]], e["error"]), e
    summary = capsys.readouterr().err
    assert f"embedded {len(good)} of {len(good) + len(bad)} images" in summary
    assert "3 failed" in summary


def test_npy_output_float16_and_python_api(encoder, messy, tmp_path):
    root, good, _ = messy
    out = tmp_path / "emb.npy"
    summary = nf.embed_files(
        [root / "a_photos", root / "c_shard.tar"], encoder, out, dtype="float16", progress=False
    )
    assert summary.ok
    assert (summary.total, summary.embedded, summary.failed) == (len(good), len(good), 0)
    in_input_order = good[2:] + good[:2]  # the folder, then the shard
    paths = read_ids(tmp_path / "emb.npy.ids.jsonl")
    assert paths == in_input_order
    embeddings = np.load(out)
    assert embeddings.dtype == np.float16
    assert embeddings.shape == (len(good), encoder.dim)
    np.testing.assert_allclose(embeddings[0], _reference(encoder, paths[0]), atol=2e-3)  # float16 storage
    assert not (tmp_path / "emb.npy.errors.jsonl").exists()  # nothing failed: no error file


def test_all_good_exits_zero_and_lists_dedupe(bundle, messy, tmp_path):
    _, good, _ = messy
    listing = tmp_path / "list.txt"
    files = good[2:5]  # plain files (tar members are not paths)
    listing.write_text("\n".join([*files, files[0]]) + "\n")
    out = tmp_path / "list.parquet"
    assert (
        cli.main(["embed", f"@{listing}", "-m", str(bundle), "-o", str(out), "--no-progress"]) == cli.EXIT_OK
    )
    assert read_output(out).ids == files


def test_unusable_model_or_output_is_a_usage_error(messy, tmp_path, capsys):
    root, _, _ = messy
    assert (
        cli.main(["embed", str(root), "-m", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "o.parquet")])
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["embed", str(root), "-m", "x.onnx", "-o", str(tmp_path / "o.csv")]) == 2
    assert "expected a .parquet or .npy" in capsys.readouterr().err


@pytest.mark.slow
def test_sigint_leaves_no_output_and_resume_embeds_only_the_rest(bundle, encoder, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(1)
    n = 1500
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    out = tmp_path / "emb.parquet"
    checkpoint = tmp_path / "emb.parquet.inprogress"
    argv = [
        sys.executable,
        "-m",
        "nvclip_fast",
        "embed",
        str(folder),
        "-m",
        str(bundle),
        "-o",
        str(out),
        "--no-progress",
        "--batch",
        "4",
        "--checkpoint-rows",
        "32",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + TIMEOUT_S
    while not list(checkpoint.glob("chunk-*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == cli.EXIT_INTERRUPTED, err
    assert "interrupted" in err
    assert not out.exists()  # no partial output
    assert not (tmp_path / "emb.parquet.errors.jsonl").exists()
    assert list(checkpoint.glob("chunk-*.npz"))

    resumed = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert resumed.returncode == cli.EXIT_OK, resumed.stderr
    found = re.search(r"embedded (\d+) of (\d+) images.*?(\d+) already done", resumed.stderr)
    assert found, resumed.stderr
    embedded, total, done = map(int, found.groups())
    assert total == n
    assert done >= 32
    assert embedded + done == n  # only what was missing was embedded
    rows = read_output(out)
    assert rows.ids == sorted(str(p) for p in folder.iterdir())
    assert not checkpoint.exists()
    sample = [0, done - 1, done, n - 1]
    expected = encoder.embed([rows.ids[k] for k in sample])
    np.testing.assert_allclose(rows.embeddings[sample], expected, atol=ROW_ATOL)


def test_resume_skips_what_the_output_holds(encoder, messy, tmp_path):
    root, good, _ = messy
    out = tmp_path / "emb.parquet"
    first = nf.embed_files([root / "a_photos"], encoder, out, progress=False)
    assert first.embedded == 7
    second = nf.embed_files(
        [root / "a_photos", root / "c_shard.tar"], encoder, out, resume=True, progress=False
    )
    assert (second.embedded, second.resumed) == (2, 7)
    assert read_output(out).ids == good[2:] + good[:2]  # the order of the inputs given


# --- classify ---------------------------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_classify_matches_a_direct_computation(encoder, messy):
    _, good, _ = messy
    labels = ["cat", "dog", "car", "tree"]
    templates = ["a photo of a {}.", "a drawing of a {}."]
    images = good[2:7]  # plain files (tar members are not paths)
    got = encoder.classify(images, labels, templates, top_k=3)
    text = (
        encoder.embed_text([t.format(label) for label in labels for t in templates]).reshape(4, 2, -1).mean(1)
    )
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    probs = _softmax(encoder.metadata.logit_scale * encoder.embed(images) @ text.T)
    for row, ranked in zip(probs, got, strict=True):
        top = np.argsort(-row)[:3]
        assert [label for label, _ in ranked] == [labels[k] for k in top]
        np.testing.assert_allclose([p for _, p in ranked], row[top], rtol=1e-4)


def test_classify_cli_writes_top_k(bundle, encoder, messy, tmp_path):
    root, good, bad = messy
    out = tmp_path / "pred.jsonl"
    code = cli.main(
        [
            "classify",
            str(root),
            "-m",
            str(bundle),
            "--labels",
            "cat,dog,car",
            "--top-k",
            "2",
            "--template",
            "a photo of a {}.",
            "-o",
            str(out),
            "--no-progress",
        ]
    )
    assert code == cli.EXIT_SOME_FAILED
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_path = {line["path"]: line for line in lines}
    assert set(by_path) == set(good) | set(bad)
    direct = encoder.classify([good[2]], ["cat", "dog", "car"], ["a photo of a {}."], top_k=2)[0]
    assert by_path[good[2]]["labels"] == [label for label, _ in direct]
    np.testing.assert_allclose(by_path[good[2]]["probs"], [p for _, p in direct], rtol=1e-4)
    assert all("error" in by_path[b] and by_path[b]["labels"] == [] for b in bad)


def test_classify_argument_errors(encoder):
    with pytest.raises(ValueError, match=r"expected exactly one '\{\}' for the label, found none"):
        encoder.classify([np.zeros((5, 5, 3), np.uint8)], ["cat"], ["a photo"])
    with pytest.raises(ValueError, match="labels is empty"):
        encoder.classify([np.zeros((5, 5, 3), np.uint8)], [])


def test_resume_with_other_inputs_keeps_one_row_per_image(encoder, messy, tmp_path):
    root, good, _ = messy
    out = tmp_path / "emb.npy"
    nf.embed_files([root / "a_photos"], encoder, out, progress=False)
    summary = nf.embed_files(
        [root / "c_shard.tar", root / "a_photos" / "gray.png"], encoder, out, resume=True, progress=False
    )
    assert (summary.embedded, summary.resumed) == (2, 1)
    ids = read_ids(tmp_path / "emb.npy.ids.jsonl")
    assert len(ids) == len(set(ids)) == len(good)  # nothing lost, nothing twice
    # the inputs given now first, in their order; rows of earlier inputs after them
    assert ids[:3] == [*good[:2], str(root / "a_photos" / "gray.png")]
    embeddings = np.load(out)
    for k in (0, 2, 5):
        np.testing.assert_allclose(embeddings[k], _reference(encoder, ids[k]), atol=ROW_ATOL)


def test_resume_refuses_another_model(bundle, messy, tmp_path, capsys):
    root, _, _ = messy
    out = tmp_path / "emb.parquet"
    assert (
        cli.main(["embed", str(root / "a_photos"), "-m", str(bundle), "-o", str(out), "--no-progress"]) == 0
    )
    code = cli.main(
        [
            "embed",
            str(root / "a_photos"),
            "-m",
            str(bundle),
            "-o",
            str(out),
            "--no-progress",
            "--resume",
            "--dtype",
            "float16",
        ]
    )
    assert code == cli.EXIT_USAGE
    assert "dtype differs: 'float32' vs 'float16'" in capsys.readouterr().err


class ScaledEngine(nf._C.Engine):
    """Embeddings that are not L2-normalized (a third-party engine): mean pixel value per channel,
    times ten, plus a constant."""

    def __init__(self, size: int):
        super().__init__(
            nf._C.EngineInfo(
                [nf._C.TensorSpec("pixels", "float32", [-1, 3, size, size])],
                [nf._C.TensorSpec("embeds", "float32", [-1, 4])],
                (1, 4, 4),
            )
        )

    def enqueue(self, batch, inputs, outputs, stream):
        x = inputs["pixels"]
        outputs["embeds"][:, :3] = 10 * x.mean(axis=(2, 3))
        outputs["embeds"][:, 3] = 3


class CountingTextEngine(nf._C.Engine):
    """Text 'embeddings' from token ids: (number of tokens, 1, 2, 3), not normalized."""

    CONTEXT = 16

    def __init__(self):
        super().__init__(
            nf._C.EngineInfo(
                [nf._C.TensorSpec("ids", "int64", [-1, self.CONTEXT])],
                [nf._C.TensorSpec("embeds", "float32", [-1, 4])],
                (1, 4, 4),
            )
        )

    def enqueue(self, batch, inputs, outputs, stream):
        outputs["embeds"][:] = [1, 1, 2, 3]
        outputs["embeds"][:, 0] = (inputs["ids"] != 0).sum(axis=1)


def test_job_rows_equal_encoder_embed_for_unnormalized_engines(messy, tmp_path):
    from nvclip_fast.tokenizer import ClipBpeTokenizer

    _, good, _ = messy
    spec = nf.PreprocessSpec(size=16)
    text, tokenizer = (
        CountingTextEngine(),
        lambda: ClipBpeTokenizer(context_length=CountingTextEngine.CONTEXT),
    )
    with nf.Encoder.from_engine(ScaledEngine(16), spec, text=text, tokenizer=tokenizer) as enc:
        summary = nf.embed_files(good[2:], enc, tmp_path / "e.npy", progress=False)
        assert summary.ok
        np.testing.assert_allclose(np.load(tmp_path / "e.npy"), enc.embed(good[2:]), atol=1e-6)
        (predictions, _) = nf.classify_files(good[2:4], enc, ["a cat", "b"], progress=False)
        direct = enc.classify(good[2:4], ["a cat", "b"])
    for p, ranked in zip(predictions, direct, strict=True):
        assert p.labels == [label for label, _ in ranked]
        np.testing.assert_allclose(p.probs, [prob for _, prob in ranked], rtol=1e-5)
        assert p.probs[0] > p.probs[1]  # the labels are told apart


def test_classify_files_checks_top_k(encoder, messy):
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        nf.classify_files([messy[0]], encoder, ["a"], top_k=0)


# --- integrity: provenance, ids, duplicates, existing outputs --------------------------------------


@pytest.fixture(scope="module")
def bundle_b(tmp_path_factory):
    """The same architecture as ``bundle`` with other weights."""
    tmp = tmp_path_factory.mktemp("bundle_b")
    checkpoint = tiny_models.save_checkpoint(tiny_models.random_model("tiny-clip", seed=9), tmp / "w.pt")
    nf.export("tiny-clip", tmp / "tinyB.onnx", weights=checkpoint, max_batch=MAX_BATCH, quiet=True)
    return tmp / "tinyB.onnx"


def _embed_cli(*args) -> int:
    return cli.main(["embed", *map(str, args), "--no-progress"])


@pytest.mark.parametrize("suffix", [".parquet", ".npy"])
def test_every_output_records_its_provenance(bundle, encoder, messy, tmp_path, suffix):
    root, _, _ = messy
    out = tmp_path / f"emb{suffix}"
    assert _embed_cli(root / "a_photos", "-m", bundle, "-o", out, "--dtype", "float16") == cli.EXIT_OK
    stored = read_provenance(out)
    sidecar = nf.metadata.load(bundle.with_suffix(".json"))
    assert stored.model == "tiny-clip"
    assert stored.weights_sha256 == sidecar.weights.sha256
    assert stored.engine_sha256 is None
    assert stored.preprocess == json.loads(json.dumps(dataclasses.asdict(encoder.spec)))
    assert (stored.embed_dim, stored.precision, stored.normalized, stored.dtype) == (
        32,
        "fp32",
        True,
        "float16",
    )
    assert stored.version == nf.__version__
    assert stored.created
    assert stored.source == {"bundle": str(bundle.with_suffix(".json").resolve())}
    if suffix == ".parquet":
        raw = pa_parquet.read_schema(out).metadata[b"nvclip_fast"]
    else:
        raw = (tmp_path / "emb.npy.provenance.json").read_bytes()
    assert Provenance.from_json(raw) == stored


def test_resume_refuses_other_weights_of_the_same_architecture(bundle, bundle_b, messy, tmp_path, capsys):
    root, _, _ = messy
    out = tmp_path / "mix.parquet"
    assert _embed_cli(root / "a_photos", "-m", bundle, "-o", out) == cli.EXIT_OK
    before = out.read_bytes()
    capsys.readouterr()
    assert _embed_cli(root, "-m", bundle_b, "-o", out, "--resume") == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "weights_sha256 differs" in err
    assert len(err.splitlines()) == 1
    assert out.read_bytes() == before  # nothing mixed in


def test_resume_refuses_an_interrupted_run_of_other_weights(
    bundle, bundle_b, encoder, messy, tmp_path, capsys
):
    root, good, _ = messy
    out = tmp_path / "mix.npy"
    checkpoint = Checkpoint(out)  # what an interrupted run of bundle leaves
    checkpoint.start(encoder.provenance())
    from nvclip_fast.embed_files import _rows
    from nvclip_fast.pipeline import Item

    item = Item(0, size=(4, 4))
    item.row = np.ones(encoder.dim, np.float32)
    checkpoint.append(_rows([(good[2], item)], "float32"))
    assert _embed_cli(root, "-m", bundle_b, "-o", out, "--resume") == cli.EXIT_USAGE
    assert "weights_sha256 differs" in capsys.readouterr().err
    assert not out.exists()


def test_engines_without_known_weights_are_told_apart_by_their_digest(bundle, tmp_path):
    copies = []
    for name, seed in (("x", 1), ("y", 2)):
        folder = tmp_path / name
        folder.mkdir()
        checkpoint = tiny_models.save_checkpoint(
            tiny_models.random_model("tiny-clip", seed=seed), folder / "w.pt"
        )
        nf.export(
            "tiny-clip", folder / "m.onnx", weights=checkpoint, max_batch=MAX_BATCH, quiet=True, text=False
        )
        (folder / "m.json").unlink()  # an engine from elsewhere: no sidecar, so no weights sha256
        copies.append(folder / "m.onnx")
    with pytest.warns(UserWarning, match="no sidecar"):
        first, second = (nf.Encoder(path, device="cpu") for path in copies)
    with first, second:
        a, b = first.provenance(), second.provenance()
    assert a.weights_sha256 is None
    assert len(a.engine_sha256) == 64
    assert a.mismatch(b) is not None
    assert a.mismatch(b).startswith("engine_sha256 differs")


def test_npy_ids_stay_aligned_with_line_breaks_in_names(encoder, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    rng = np.random.default_rng(5)
    names = ["x\ny.png", "z.png", "a\rb.png", "c\u2028d.png", "e\x85f.png", "plain.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / name)
    out = tmp_path / "o.npy"
    assert nf.embed_files(folder, encoder, out, progress=False).ok
    ids = read_ids(tmp_path / "o.npy.ids.jsonl")
    assert sorted(ids) == sorted(str(folder / n) for n in names)
    np.testing.assert_allclose(np.load(out), encoder.embed(ids), atol=ROW_ATOL)  # each row is its file's


def test_distinct_names_are_never_merged_and_duplicates_are_listed(encoder, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    rng = np.random.default_rng(6)
    for name in (b"a\xff.png", b"a\\xff.png"):  # not UTF-8, and a name that spells its old id
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / os.fsdecode(name))
    shard = folder / "s.tar"
    pixels = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(2)]
    # The same member name twice: two members.
    write_tar(shard, [("m.png", _encoded(Image.fromarray(p), "m.png")) for p in pixels])
    out = tmp_path / "o.parquet"
    twice = folder / os.fsdecode(b"a\xff.png")
    summary = nf.embed_files([folder, twice], encoder, out, progress=False)
    assert (summary.total, summary.embedded, summary.duplicates, summary.failed) == (4, 4, 1, 0)
    rows = read_output(out)
    assert len(set(rows.ids)) == 4
    np.testing.assert_allclose(rows.embeddings, encoder.embed([read_id(i) for i in rows.ids]), atol=ROW_ATOL)
    listed = [json.loads(line) for line in (tmp_path / "o.parquet.errors.jsonl").read_text().splitlines()]
    assert listed == [{"path": source_id(twice), "error": "duplicate"}]
    assert source_id(twice).endswith("a\\xff.png")
    assert "1 duplicate inputs skipped" in summary.line()


def test_an_existing_output_is_refused_unless_overwrite_or_resume(bundle, messy, tmp_path, capsys):
    root, _, _ = messy
    out = tmp_path / "emb.parquet"
    assert _embed_cli(root / "a_photos", "-m", bundle, "-o", out) == cli.EXIT_OK
    before = read_output(out).ids
    assert _embed_cli(root / "a_photos" / "gray.png", "-m", bundle, "-o", out) == cli.EXIT_USAGE
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert read_output(out).ids == before  # untouched
    assert _embed_cli(root / "a_photos" / "gray.png", "-m", bundle, "-o", out, "--overwrite") == cli.EXIT_OK
    assert read_output(out).ids == [str(root / "a_photos" / "gray.png")]
    with pytest.raises(SystemExit) as refused:  # argparse: the two exclude each other
        cli.main(["embed", str(root), "-m", str(bundle), "-o", str(out), "--resume", "--overwrite"])
    assert refused.value.code == cli.EXIT_USAGE


def test_an_interrupted_runs_rows_are_not_discarded_silently(encoder, messy, tmp_path):
    root, _, _ = messy
    out = tmp_path / "emb.parquet"
    Checkpoint(out).start(encoder.provenance())
    with pytest.raises(FileExistsError, match=r"emb.parquet.inprogress exists"):
        nf.embed_files(root / "a_photos", encoder, out, progress=False)
    assert nf.embed_files(root / "a_photos", encoder, out, progress=False, overwrite=True).ok


def test_one_path_is_one_input_and_an_empty_folder_writes_nothing(encoder, messy, tmp_path, capsys):
    root, _, _ = messy
    summary = nf.embed_files(str(root / "a_photos"), encoder, tmp_path / "one.npy", progress=False)
    assert (summary.total, summary.failed) == (7, 0)  # the folder, not its name's characters
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    out = tmp_path / "e.parquet"
    assert _embed_cli(empty, "-m", tmp_path / "no_model.onnx", "-o", out) == cli.EXIT_USAGE
    assert "no images found" in capsys.readouterr().err  # said before any model is opened
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "empty",
        "one.npy",
        "one.npy.ids.jsonl",
        "one.npy.provenance.json",
    ]


def test_errors_name_the_path_or_tar_member(encoder, tmp_path):
    shard = tmp_path / "s.tar"
    write_tar(shard, [("good.png", _encoded(Image.new("RGB", (9, 9)), "x.png")), ("bad.png", b"not a png")])
    summary = nf.embed_files(shard, encoder, tmp_path / "o.npy", progress=False)
    (line,) = (tmp_path / "o.npy.errors.jsonl").read_text().splitlines()
    error = json.loads(line)
    assert summary.failed == 1
    assert error["path"] == f"{shard}::bad.png"
    assert error["error"] == f"cannot decode '{shard}::bad.png': not an image, or a format Pillow cannot read"


def _png_with_idat(pixels: np.ndarray, damage: str) -> bytes:
    """A PNG whose IDAT chunk has its CRC or its data damaged (the CRC then recomputed to match)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4 : at])[0]
    crc_at = at + 4 + length
    if damage == "crc":
        data[crc_at] ^= 0xFF
    else:
        data[at + 4 + length // 2] ^= 0x01
        data[crc_at : crc_at + 4] = struct.pack(">I", zlib.crc32(bytes(data[at : at + 4 + length])))
    return bytes(data)


def test_a_png_with_a_bad_idat_crc_embeds_and_damaged_pixels_fail(encoder):
    # Pillow (so open_clip) does not check IDAT CRCs; the pixels are still checked by zlib's
    # Adler-32. A CRC-only error changes no pixel: embedded as open_clip does. Damaged image data
    # fails whatever its CRC says.
    pixels = np.random.default_rng(8).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    rows = encoder.embed(
        [_png_with_idat(pixels, "crc"), pixels, _png_with_idat(pixels, "data")], on_error="nan"
    )
    np.testing.assert_array_equal(rows[0], rows[1])
    assert np.isnan(rows[2]).all()
    with pytest.raises(nf.ItemError, match=r"images\[0\]: cannot decode .*broken data stream"):
        encoder.embed([_png_with_idat(pixels, "data")])


# --- untrusted files: one line naming the file and the problem, exit 2 ------------------------------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_classify_with_a_bad_template_is_one_line(bundle, messy, capsys):
    root, _, _ = messy
    argv = ["classify", str(root / "a_photos"), "-m", str(bundle), "--labels", "cat,dog", "--no-progress"]
    assert cli.main([*argv, "--template", "{x} {}"]) == cli.EXIT_USAGE
    assert (
        "template '{x} {}': expected exactly one '{}' for the label, found ['{x}', '{}']"
        in _one_error_line(capsys)
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[" * 200_000 + "]" * 200_000, "is not a sidecar: JSON nested too deeply"),
        (b"\xff\xfe{", "is not UTF-8 text"),
        (
            "towers.image.onnx=/etc/passwd",
            "towers.image.onnx: expected a file name inside the bundle's folder",
        ),
        (
            "tokenizer.vocab=../../etc/passwd",
            "tokenizer.vocab: expected a file name inside the bundle's folder",
        ),
        ("logit_scale=1e308", "logit_scale: expected a number in (0, 10000], got 1e+308"),
    ],
)
def test_a_hostile_sidecar_is_one_line(bundle, messy, tmp_path, capsys, content, problem):
    root, _, _ = messy
    for f in bundle.parent.iterdir():
        (tmp_path / f.name).symlink_to(f)
    sidecar = tmp_path / "tiny.json"
    sidecar.unlink()
    if isinstance(content, bytes):
        sidecar.write_bytes(content)
    elif "=" in content:
        keys, value = content.split("=")
        meta = json.loads(bundle.with_suffix(".json").read_text())
        *path, last = keys.split(".")
        target = meta
        for key in path:
            target = target[key]
        target[last] = float(value) if value[0].isdigit() else value
        sidecar.write_text(json.dumps(meta))
    else:
        sidecar.write_text(content)
    code = cli.main(
        ["embed", str(root / "a_photos"), "-m", str(sidecar), "-o", str(tmp_path / "o.npy"), "--no-progress"]
    )
    assert code == cli.EXIT_USAGE
    line = _one_error_line(capsys)
    assert problem in line, line
    assert "tiny.json" in line


def test_embed_text_says_bytes(encoder):
    with pytest.raises(
        TypeError, match=r"texts must be a str or a sequence of str, got bytes \(decode bytes first"
    ):
        encoder.embed_text(b"x")
