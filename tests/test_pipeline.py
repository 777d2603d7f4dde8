"""The image pipeline shared by Encoder and the bulk jobs: decode-ahead bounded by bytes (in item
order, any one image alone), one Future per call, the queue options, and progress through tqdm."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

import nvclip_fast as nf
from nvclip_fast import _C, pipeline
from nvclip_fast.images import DECODING_BYTES_PER_PIXEL

MIB = 1 << 20
DIM = 3
SIDE = 256  # a 256 x 256 photo reserves 256 * 256 * 7 bytes (0.44 MiB) while it decodes
TIMEOUT_S = 60


class MeanEngine(_C.Engine):
    """Each image's mean per channel: rows that tell images apart, no model needed."""

    def __init__(self, size: int):
        super().__init__(
            _C.EngineInfo(
                [_C.TensorSpec("pixels", "float32", [-1, 3, size, size])],
                [_C.TensorSpec("means", "float32", [-1, DIM])],
                (1, 4, 4),
            )
        )

    def enqueue(self, batch, inputs, outputs, stream):
        outputs["means"][:] = inputs["pixels"].mean(axis=(2, 3))


def encoder(**options) -> nf.Encoder:
    spec = nf.PreprocessSpec(size=16)
    return nf.Encoder.from_engine(MeanEngine(spec.size), spec, **options)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list:
    """24 PNG files of random pixels, and their arrays."""
    root, rng = tmp_path_factory.mktemp("photos"), np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(24)]
    for k, a in enumerate(arrays):
        Image.fromarray(a).save(root / f"{k:02}.png")
    return [str(root / f"{k:02}.png") for k in range(len(arrays))], arrays


@pytest.fixture
def peak_held(monkeypatch) -> list[int]:
    """Every value the decode-ahead budget's held bytes take, as they change."""
    seen: list[int] = []
    add = pipeline._Turns._add

    def recording(self, n):
        add(self, n)
        seen.append(self._budget.held)

    monkeypatch.setattr(pipeline._Turns, "_add", recording)
    return seen


# --- the decode-ahead budget ----------------------------------------------------------------------


def _taken(turns, ticket: int, n: int) -> threading.Event:
    done = threading.Event()
    threading.Thread(target=lambda: (turns.take(ticket, n), done.set()), daemon=True).start()
    return done


def test_turns_reserve_in_item_order_within_the_limit():
    budget = pipeline._Budget(10)
    turns = pipeline._Turns(budget)
    second = _taken(turns, 1, 4)
    assert not second.wait(0.2)  # ticket 1 waits for ticket 0, though its bytes fit
    turns.take(0, 6)
    assert second.wait(TIMEOUT_S)
    assert budget.held == 10
    third = _taken(turns, 2, 1)
    assert not third.wait(0.2)  # 11 bytes would exceed the limit
    turns.give(4)
    assert third.wait(TIMEOUT_S)
    assert budget.held == 7


def test_an_image_larger_than_the_budget_goes_alone():
    budget = pipeline._Budget(10)
    turns, other = pipeline._Turns(budget), pipeline._Turns(budget)
    other.take(0, 8)  # another call holds most of the budget
    turns.take(0, 50)  # this call holds nothing: its one image is taken whatever its size
    assert budget.held == 58
    waiting = _taken(turns, 1, 1)
    assert not waiting.wait(0.2)
    turns.give(50)
    assert waiting.wait(TIMEOUT_S)


def test_closing_a_call_releases_its_bytes_and_its_waiting_decoders():
    budget = pipeline._Budget(10)
    turns = pipeline._Turns(budget)
    turns.take(0, 9)
    waiting = _taken(turns, 1, 5)
    assert not waiting.wait(0.2)
    turns.close()
    assert waiting.wait(TIMEOUT_S)
    assert budget.held == 0


def test_encoder_and_bulk_job_stay_within_decode_ahead_bytes(photos, peak_held, tmp_path):
    paths, arrays = photos
    assert SIDE * SIDE * DECODING_BYTES_PER_PIXEL < MIB < 3 * SIDE * SIDE * DECODING_BYTES_PER_PIXEL
    with encoder(threads=4, decode_ahead_mb=1, max_batch=4) as enc:
        from_files = enc.embed(paths)
        assert 0 < max(peak_held, default=0) <= MIB
        np.testing.assert_allclose(from_files, enc.embed(arrays), atol=1e-6)
        peak_held.clear()
        summary = nf.embed_files(paths, enc, tmp_path / "e.npy", workers=4, progress=False)
        assert summary.ok
        assert 0 < max(peak_held, default=0) <= MIB
        np.testing.assert_allclose(np.load(tmp_path / "e.npy"), from_files, atol=1e-6)


def test_an_image_over_the_budget_still_embeds(peak_held):
    big = np.random.default_rng(1).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(big).save(png, format="PNG")
    with encoder(decode_ahead_mb=1) as enc:
        rows = enc.embed([png.getvalue(), png.getvalue()])
        np.testing.assert_allclose(rows, enc.embed([big, big]), atol=1e-6)
    assert max(peak_held) == 1000 * 1000 * DECODING_BYTES_PER_PIXEL  # one at a time


# --- one Future per call, the options ---------------------------------------------------------------


def test_one_future_per_call_over_many_batches_with_bad_items():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(11)]
    items = [*images[:5], b"not an image", *images[5:]]
    with encoder(max_batch=2) as enc:
        future = enc.submit(items, on_error="nan", normalize=False)
        rows = future.result(timeout=TIMEOUT_S)
        assert rows.shape == (12, DIM)
        assert np.isnan(rows).all(axis=1).tolist() == [k == 5 for k in range(12)]
        np.testing.assert_allclose(np.delete(rows, 5, axis=0), enc.embed(images, normalize=False), atol=1e-6)
        with pytest.raises(nf.ItemError, match=r"images\[5\]: cannot decode 12 bytes") as info:
            enc.submit(items)
        assert info.value.index == 5
        assert isinstance(info.value.__cause__, ValueError)


def test_queue_options_are_checked_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="decode_ahead_mb must be an int >= 1, got 0"):
        nf.Encoder(tmp_path / "absent.onnx", decode_ahead_mb=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_batches'"):
        nf.Encoder(tmp_path / "absent.onnx", max_batches=8)
    with encoder(max_batch=2, max_delay_ms=5, streams=1, staging_mb=8, threads=1) as enc:
        assert (enc.max_batch, enc.stats()["images"]) == (2, 0)


# --- progress -----------------------------------------------------------------------------------------


def _bar_disabled_on_a_terminal(**env: str) -> bool:
    """Whether ``progress_bar(3, None)`` hides its bar in a process whose stderr is a terminal."""
    code = "from nvclip_fast.embed_files import progress_bar; print(progress_bar(3, None).disable)"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")} | env
    main, terminal = pty.openpty()
    try:
        run = subprocess.run(
            [sys.executable, "-c", code],
            env=environ,
            stderr=terminal,
            stdout=subprocess.PIPE,
            text=True,
            check=True,
            timeout=TIMEOUT_S,
        )
    finally:
        os.close(terminal)
        os.close(main)
    return run.stdout.strip() == "True"


def test_progress_is_a_tqdm_bar_that_tqdm_settings_control(capsys):
    from nvclip_fast.embed_files import progress_bar

    with progress_bar(3, True, unit="img") as bar:
        bar.update(3)
    assert "3/3" in capsys.readouterr().err
    assert progress_bar(3, False).disable
    assert progress_bar(3, None).disable  # stderr is not a terminal here: no bar in a log
    assert not _bar_disabled_on_a_terminal()
    assert _bar_disabled_on_a_terminal(TQDM_DISABLE="1")
