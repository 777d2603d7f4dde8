"""The image pipeline shared by Encoder and the bulk jobs: decode-ahead bounded by bytes (in item
order, any one image alone), one Future per call, the queue options, and progress through tqdm."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import threading
import time

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


# --- errors name the first bad item; one item's MemoryError is that item's ---------------------------


@pytest.mark.filterwarnings("ignore:an image of shape")  # the (1, 2000000) image reads only one way
def test_item_error_names_the_first_bad_item():
    rng = np.random.default_rng(3)
    good = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(5)]
    thin = np.zeros((1, 2000000), np.uint8)  # at 16 px a side beyond 2**24 pixels: refused
    with encoder(max_batch=2) as enc:
        with pytest.raises(nf.ItemError, match=r"images\[5\]: a 1x2000000 image resizes to") as info:
            enc.embed([*good, thin, None])
        assert info.value.index == 5
        rows = enc.embed([*good, thin, None], on_error="nan")
        assert np.isnan(rows).all(axis=1).tolist() == [False] * 5 + [True, True]


def test_a_memory_error_fails_only_its_item(monkeypatch):
    from nvclip_fast import images

    real = images._from_pil

    def short_of_memory(image, spec, what="the image"):
        if image.size == (7, 7):
            raise MemoryError
        return real(image, spec, what)

    monkeypatch.setattr(images, "_from_pil", short_of_memory)
    from PIL import Image as PILImage

    items = [PILImage.new("RGB", (9, 9), (1, 2, 3)), PILImage.new("RGB", (7, 7)), PILImage.new("RGB", (9, 9))]
    with encoder() as enc:
        rows = enc.embed(items, on_error="nan")
        assert np.isnan(rows).all(axis=1).tolist() == [False, True, False]
        with pytest.raises(nf.ItemError, match=r"images\[1\]: not enough memory"):
            enc.embed(items)


# --- close() from anywhere ---------------------------------------------------------------------------


def test_close_from_a_done_callback_closes_the_encoder_and_its_queue():
    enc = encoder()
    future = enc.submit([np.zeros((20, 20, 3), np.uint8)])
    raised: list[BaseException] = []

    def close_it(done) -> None:
        try:
            enc.close()
        except BaseException as e:
            raised.append(e)

    future.add_done_callback(close_it)
    assert future.result(TIMEOUT_S).shape == (1, DIM)
    enc.close()  # from here: waits until the queue is closed
    assert raised == []
    assert enc._images.queue.closed
    with pytest.raises(nf.EngineError, match="closed"):
        enc.embed([np.zeros((20, 20, 3), np.uint8)])


# --- many callers, bad items mixed in -----------------------------------------------------------------


def test_32_callers_with_bad_items_get_exactly_their_rows():
    threads, calls = 32, 12
    rng = np.random.default_rng(32)
    bad_items = [b"junk", None, np.zeros((0, 4, 3), np.uint8), np.zeros((6, 6), np.float32)]
    work = {}
    for t in range(threads):
        for c in range(calls):
            n = int(rng.integers(1, 6))
            items = [
                rng.integers(0, 256, (int(rng.integers(5, 40)), int(rng.integers(5, 40)), 3), dtype=np.uint8)
                for _ in range(n)
            ]
            if rng.random() < 0.5:
                items.insert(int(rng.integers(0, n + 1)), bad_items[int(rng.integers(0, len(bad_items)))])
            work[(t, c)] = items
    spec = nf.PreprocessSpec(size=16)
    expected = {}
    for key, items in work.items():  # each image's row without the queue: preprocess + mean
        rows = np.full((len(items), DIM), np.nan, np.float32)
        for k, item in enumerate(items):
            if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.size:
                rows[k] = nf.preprocess([item], spec, threads=1)[0].mean(axis=(1, 2))
        expected[key] = rows
    results: dict = {}
    barrier = threading.Barrier(threads)
    with encoder(max_batch=4, threads=2) as enc:

        def caller(t: int) -> None:
            barrier.wait()
            for c in range(calls):
                results[(t, c)] = enc.embed(work[(t, c)], on_error="nan", normalize=False)

        workers = [threading.Thread(target=caller, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(TIMEOUT_S)
            assert not w.is_alive()
    assert set(results) == set(work)  # no call lost
    for key in work:
        np.testing.assert_allclose(results[key], expected[key], atol=1e-6, err_msg=str(key))  # NaN where bad


# --- progress and checkpoints as batches come back ---------------------------------------------------


class GatedEngine(MeanEngine):
    """MeanEngine that holds its second batch until ``release`` is set."""

    def __init__(self, size: int):
        super().__init__(size)
        self.release = threading.Event()
        self.batches = 0

    def enqueue(self, batch, inputs, outputs, stream):
        self.batches += 1
        if self.batches == 2:
            assert self.release.wait(TIMEOUT_S)
        super().enqueue(batch, inputs, outputs, stream)


def test_rows_are_saved_and_counted_as_each_batch_comes_back(photos, tmp_path, monkeypatch):
    """With the second batch held in the engine (and the staging ring full, so that submitting more
    waits), the rows already back are checkpointed (checkpoint_rows below the batch size) and the
    progress bar shows them."""
    from nvclip_fast.outputs import Checkpoint

    job = sys.modules["nvclip_fast.embed_files"]  # the module (the package exports its function)

    paths, _ = photos
    spec = nf.PreprocessSpec(size=16)
    engine = GatedEngine(spec.size)
    updates: list[int] = []

    class Bar:
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n=1):
            updates.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(job, "progress_bar", Bar)
    out = tmp_path / "e.npy"
    # A staging ring that holds about one batch: with the engine held, the job's submissions wait.
    enc = nf.Encoder.from_engine(engine, spec, max_batch=4, streams=1, staging_mb=1, max_delay_ms=500)
    with enc:
        done = threading.Event()
        thread = threading.Thread(
            target=lambda: (
                nf.embed_files(paths, enc, out, batch=4, workers=2, checkpoint_rows=1, progress=False),
                done.set(),
            ),
            daemon=True,
        )
        thread.start()
        checkpoint = Checkpoint(out)
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and not (
            engine.batches >= 2 and checkpoint.exists() and checkpoint.rows() >= 1
        ):
            time.sleep(0.01)
        saved = checkpoint.rows()
        assert saved >= 1
        assert engine.batches == 2
        assert not engine.release.is_set()
        assert sum(updates) >= saved  # the bar counts the rows back, group by group
        engine.release.set()
        assert done.wait(TIMEOUT_S)
    assert np.load(out).shape == (len(paths), DIM)


def test_the_default_batch_keeps_engine_inputs_within_budget():
    # A sidecar (or engine) may claim an optimal batch of 4096: at 224 px, 2 streams of it would be
    # 4.9 GB of engine input allocated at load. Unless max_batch is asked for, the batch fits the budget.
    class Big(_C.Engine):
        def __init__(self):
            super().__init__(
                _C.EngineInfo(
                    [_C.TensorSpec("pixels", "float32", [-1, 3, 224, 224])],
                    [_C.TensorSpec("means", "float32", [-1, DIM])],
                    (1, 4096, 4096),
                )
            )

    image_bytes = 3 * 224 * 224 * 4
    with nf.Encoder.from_engine(Big(), nf.PreprocessSpec(size=224), streams=2) as enc:
        assert enc.max_batch == pipeline.ENGINE_INPUT_BUDGET // (2 * image_bytes) == 445
    with nf.Encoder.from_engine(Big(), nf.PreprocessSpec(size=224), max_batch=1000) as enc:
        assert enc.max_batch == 1000  # asked for: granted
