"""Bulk jobs as processes: Ctrl-C and kill -9 then --resume give what a clean run gives, nothing
hangs on what is not a regular file, and memory stays bounded (peak RSS measured in the process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nvclip_fast as nf
from nvclip_fast.outputs import Checkpoint, read_output

HERE = Path(__file__).parent
JOB = [sys.executable, str(HERE / "bulk_job_process.py")]
TIMEOUT_S = 120
POLL_S = 0.02
N_IMAGES = 160
BATCH = 4
DELAY_S = 0.15  # per batch: the whole job would take N_IMAGES / BATCH * DELAY_S = 6 s
# Peak RSS targets: any input file of at most 1 MB embeds within 300 MB; any number of 12-megapixel
# JPEGs within 2 GB with batches of 128, through the Encoder and through the CLI.
SMALL_FILE_RSS_MIB = 300
PHOTOS_RSS_MIB = 2048
PHOTO_SIZE = (4000, 3000)
N_PHOTOS = 40
PHOTO_BATCH = 128


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for k in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / f"{k:04d}.png")
    return root


@pytest.fixture(scope="module")
def clean(folder, tmp_path_factory):
    """The output of an uninterrupted run."""
    out = tmp_path_factory.mktemp("clean") / "clean.npy"
    subprocess.run([*JOB, "embed", str(folder), str(out)], check=True, timeout=TIMEOUT_S)
    return read_output(out)


def _wait_for(predicate, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        assert proc.poll() is None, "the job ended before it could be interrupted"
        assert time.monotonic() < deadline, "timed out waiting for the job"
        time.sleep(POLL_S)


def _finished_images(log: Path) -> int:
    return sum(int(line) for line in log.read_text().split()) if log.exists() else 0


def _assert_same_rows(out: Path, clean) -> None:
    rows = read_output(out)
    assert rows.ids == clean.ids  # nothing lost, nothing twice, the input order
    np.testing.assert_array_equal(rows.embeddings, clean.embeddings)  # each row is its image's


@pytest.mark.slow
def test_ctrl_c_saves_every_finished_row_then_resume_equals_a_clean_run(folder, clean, tmp_path):
    out, log = tmp_path / "emb.npy", tmp_path / "batches.log"
    proc = subprocess.Popen(
        [*JOB, "embed", str(folder), str(out), "--delay", str(DELAY_S), "--log", str(log)]
    )
    _wait_for(lambda: _finished_images(log) >= 3 * BATCH, proc)
    time.sleep(DELAY_S / 3)  # the rows of the batches logged so far are back by now
    finished = _finished_images(log)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(TIMEOUT_S) == 130
    print(f"Ctrl-C to exit: {time.monotonic() - sent:.2f} s")  # the note reports it; no timed assertion
    assert not out.exists()
    saved = Checkpoint(out).rows()
    # Every row back before Ctrl-C is saved: rows come back per request (a decoded group), and the
    # engine may have finished the first images of a group whose last ones are in the next batch.
    assert finished - (BATCH - 1) <= saved < N_IMAGES  # and the job stopped early
    subprocess.run([*JOB, "embed", str(folder), str(out), "--resume"], check=True, timeout=TIMEOUT_S)
    _assert_same_rows(out, clean)
    assert not Checkpoint(out).exists()


@pytest.mark.slow
def test_kill_9_then_resume_equals_a_clean_run(folder, clean, tmp_path):
    out, log = tmp_path / "emb.parquet", tmp_path / "batches.log"
    argv = [*JOB, "embed", str(folder), str(out), "--delay", str(DELAY_S), "--log", str(log)]
    proc = subprocess.Popen([*argv, "--checkpoint-rows", "3"])  # below the batch size: every batch
    checkpoint = Checkpoint(out)
    _wait_for(lambda: checkpoint.exists() and checkpoint.rows() >= 2 * BATCH, proc)
    proc.kill()
    proc.wait(TIMEOUT_S)
    assert not out.exists()
    assert checkpoint.rows() >= 2 * BATCH
    subprocess.run([*JOB, "embed", str(folder), str(out), "--resume"], check=True, timeout=TIMEOUT_S)
    _assert_same_rows(out, clean)


def test_a_fifo_in_the_folder_neither_hangs_nor_loses_the_rows_around_it(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    for name in ("a.png", "z.png"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / name)
    os.mkfifo(folder / "pipe.jpg")
    os.mkfifo(folder / "pipe")
    out = tmp_path / "o.npy"
    done = subprocess.run(
        [*JOB, "embed", str(folder), str(out)], timeout=TIMEOUT_S, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert read_output(out).ids == [str(folder / "a.png"), str(folder / "z.png")]
    errors = (tmp_path / "o.npy.errors.jsonl").read_text()
    assert errors.count("skipped: a named pipe (FIFO)") == 2


# --- memory -------------------------------------------------------------------------------------------


def _peak_rss_mib(argv: list[str]) -> tuple[float, str]:
    """Run a process that prints its own peak RSS (MiB) as its last line: (peak, its stdout)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S * 5, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1]), done.stdout


def _tiny_extreme_pngs(folder: Path) -> list[Path]:
    """Files of a few hundred bytes whose full resize at 224 px takes gigabytes."""
    palette = [v for i in range(256) for v in (i, 255 - i, 7 * i % 256)]
    images = {
        "rgba_1x10000.png": Image.new("RGBA", (10000, 1), (10, 20, 30, 128)),
        "rgba_1x70000.png": Image.new("RGBA", (70000, 1), (10, 20, 30, 128)),
        "rgba_70000x1.png": Image.new("RGBA", (1, 70000), (10, 20, 30, 128)),
        "la_40000x1.png": Image.new("LA", (1, 40000), (10, 200)),
        "cmyk_1x40000.tif": Image.new("CMYK", (40000, 1), (1, 2, 3, 4)),
    }
    for name, size in (("p_1x70000.png", (70000, 1)), ("p_70000x1.png", (1, 70000))):
        p = Image.new("P", size)
        p.putpalette(palette)
        p.putdata([k % 7 for k in range(70000)])
        images[name] = p
    paths = []
    for name, image in images.items():
        image.save(folder / name, optimize=True)
        paths.append(folder / name)
    return paths


@pytest.mark.slow
def test_any_small_file_embeds_within_300_mb(tmp_path):
    paths = _tiny_extreme_pngs(tmp_path)
    assert max(p.stat().st_size for p in paths) <= 1 << 20
    # A 1 MB-class flat PNG of 81 megapixels: refused as a decompression bomb, from its header.
    Image.new("RGB", (9000, 9000), (1, 2, 3)).save(tmp_path / "flat_9000.png", optimize=True)
    paths.append(tmp_path / "flat_9000.png")
    for path in paths:  # each in a process of its own: the peak of that one file
        peak, stdout = _peak_rss_mib([*JOB, "encode", "224", "8", str(path)])
        print(f"{path.name} ({path.stat().st_size} bytes): peak RSS {peak:.0f} MiB")
        assert peak < SMALL_FILE_RSS_MIB, path.name
        assert stdout.splitlines()[0] == ("rows nan" if path.name == "flat_9000.png" else "rows ok")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """N_PHOTOS 12-megapixel JPEGs (one photo-like image, hard-linked)."""
    root = tmp_path_factory.mktemp("photos")
    w, h = PHOTO_SIZE
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.int16)
    pixels += np.random.default_rng(0).integers(-20, 20, pixels.shape, dtype=np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "0000.jpg", quality=90)
    for k in range(1, N_PHOTOS):
        os.link(root / "0000.jpg", root / f"{k:04d}.jpg")
    return sorted(root.iterdir())


@pytest.mark.slow
def test_twelve_megapixel_photos_through_the_encoder_stay_within_2_gb(photos):
    peak, _ = _peak_rss_mib([*JOB, "encode", "224", str(PHOTO_BATCH), *map(str, photos)])
    print(f"Encoder, {len(photos)} 12-MP JPEGs, max_batch {PHOTO_BATCH}: peak RSS {peak:.0f} MiB")
    assert peak < PHOTOS_RSS_MIB


@pytest.mark.slow
def test_twelve_megapixel_photos_through_the_cli_stay_within_2_gb(photos, tmp_path):
    tiny_models = pytest.importorskip("tiny_models")
    pytest.importorskip("onnxruntime")
    checkpoint = tiny_models.save_checkpoint(tiny_models.random_model("tiny-clip", seed=1), tmp_path / "w.pt")
    nf.export(
        "tiny-clip", tmp_path / "m.onnx", weights=checkpoint, max_batch=PHOTO_BATCH, quiet=True, text=False
    )
    run_cli = (
        "import sys\n"
        "from bulk_job_process import peak_rss_mib\n"
        "from nvclip_fast import cli\n"
        "code = cli.main(sys.argv[1:])\n"
        "print(peak_rss_mib())\n"
        "sys.exit(code)\n"
    )
    argv = [sys.executable, "-c", run_cli, "embed", str(photos[0].parent), "-m", str(tmp_path / "m.onnx")]
    argv += [
        "-o",
        str(tmp_path / "o.parquet"),
        "--batch",
        str(PHOTO_BATCH),
        "--device",
        "cpu",
        "--no-progress",
    ]
    peak, _ = _peak_rss_mib(argv)
    print(f"CLI, {len(photos)} 12-MP JPEGs, --batch {PHOTO_BATCH}: peak RSS {peak:.0f} MiB")
    assert peak < PHOTOS_RSS_MIB
    assert len(read_output(tmp_path / "o.parquet").ids) == len(photos)
