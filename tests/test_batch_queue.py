"""The native BatchQueue driven from Python, with a numpy engine plugged in through the trampoline.

Images are uniform colours. The queue's real stage, ResizeNormalizeStage, run with mean 0 and std 1,
maps a uniform image to uniform planes of level / 255 (resampling keeps a uniform image uniform),
and ``MeanEngine`` returns each image's channel means * 255 plus the rows of the engine call, so
every row names the image it came from.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

import nvclip_fast
from nvclip_fast import _C

SIZE = 8  # preprocess output S: small, these tests are about routing, not pixels
OUT_DIM = 4  # R, G, B, rows in the engine call
POISON = 255  # a red value MeanEngine refuses
WAIT_S = 60  # "never hangs": far above any real wait
FOREVER_MS = 3_600_000.0  # a max_delay no batch waits out in a test


class MeanEngine(_C.Engine):
    """Channel means of the preprocessed input, computed with numpy, on the CPU."""

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        batch: tuple[int, int, int] = (1, 8, 64),
        gate: threading.Event | None = None,
    ):
        super().__init__(
            _C.EngineInfo(
                inputs=[_C.TensorSpec("pixels", "float32", [-1, 3, SIZE, SIZE])],
                outputs=[_C.TensorSpec("embeds", "float32", [-1, OUT_DIM])],
                batch=batch,
                device="cpu",
            )
        )
        self.delay_s = delay_s
        self.gate = gate  # set: enqueue waits until it is set
        self.calls: list[int] = []
        self.called = threading.Condition()

    def enqueue(self, batch, inputs, outputs, stream):
        assert stream == 0
        pixels = inputs["pixels"]
        assert pixels.shape == (batch, 3, SIZE, SIZE)
        assert not pixels.flags.writeable
        out = outputs["embeds"]
        out[:, :3] = pixels.astype(np.float64).mean(axis=(2, 3)) * 255
        out[:, 3] = batch
        with self.called:
            self.calls.append(batch)
            self.called.notify_all()
        if self.gate is not None and not self.gate.wait(WAIT_S):
            raise TimeoutError("the engine's gate never opened")
        if self.delay_s:
            time.sleep(self.delay_s)
        if np.any(np.rint(out[:, 0]) == POISON):
            raise ValueError("poisoned batch")

    def wait_calls(self, count: int) -> None:
        """Waits until the engine has been called `count` times."""
        with self.called:
            assert self.called.wait_for(lambda: len(self.calls) >= count, WAIT_S), self.calls


def image(rgb: tuple[int, int, int], height: int = 5, width: int = 7) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (height, width, 3)).copy()


def colours(rows: np.ndarray) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in row) for row in np.rint(rows[:, :3])]


def eventually(predicate: Callable[[], bool]) -> bool:
    """Polls `predicate` until it holds; False if it did not within WAIT_S (a bound, not a timing)."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def make_stage(size: int = SIZE, resize_mode: str = "squash", device: str = "cpu") -> _C.ResizeNormalizeStage:
    """The queue's real preprocessing with mean 0 and std 1: a uniform image becomes level / 255."""
    params = _C.PreprocessParams()
    params.size = size
    params.mean = (0.0, 0.0, 0.0)
    params.std = (1.0, 1.0, 1.0)
    params.resize_mode = getattr(_C.ResizeMode, resize_mode)
    return _C.ResizeNormalizeStage(params, device, threads=1)


def make_queue(engine=None, *, stage=None, **options) -> _C.BatchQueue:
    options.setdefault("max_batch", 8)
    options.setdefault("max_delay_ms", 1.0)
    return _C.BatchQueue(engine or MeanEngine(), stage or make_stage(), **options)


def as_future(queue: _C.BatchQueue, images) -> concurrent.futures.Future:
    """How the Encoder wires a Request to a concurrent.futures.Future: a completion callback."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_running_or_notify_cancel()

    def done(request: _C.Request) -> None:
        try:
            future.set_result(request.result())
        except nvclip_fast.EngineError as e:
            future.set_exception(e)

    queue.submit(images, done)
    return future


def test_rows_come_back_in_order_for_every_layout():
    base = np.zeros((12, 16, 3), np.uint8)
    base[...] = (30, 40, 50)
    images = [
        image((1, 2, 3)),
        np.full((9, 4), 77, np.uint8),  # gray HW
        np.full((6, 6, 1), 88, np.uint8),  # gray HWC, C = 1
        base[2:10, 3:12],  # a crop: rows padded (strided), used without a copy
    ]
    with make_queue() as queue:
        request = queue.submit(images)
        rows = request.result(timeout=WAIT_S)
    assert rows.shape == (len(images), OUT_DIM)
    assert rows.dtype == np.float32
    assert colours(rows) == [(1, 2, 3), (77, 77, 77), (88, 88, 88), (30, 40, 50)]
    assert request.status == "ok"
    assert request.error == ""
    assert request.item_errors == [""] * len(images)
    assert len(request) == len(images)


def test_results_cannot_be_read_while_pending():
    with make_queue(max_batch=64, max_delay_ms=FOREVER_MS) as queue:
        request = queue.submit([image((1, 2, 3))])
        assert request.status == "pending"
        assert not request.done()
        assert request.wait(timeout=0.01) is False
        with pytest.raises(TimeoutError):
            request.result(timeout=0.01)
        for read in (request.rows, lambda: request.item_errors, lambda: request.failed_items):
            with pytest.raises(nvclip_fast.EngineError, match="read before it was done"):
                read()
    # close() drains: the request ran after all
    assert colours(request.result(timeout=0)) == [(1, 2, 3)]


def test_zero_images():
    with make_queue() as queue:
        rows = queue.submit([]).result(timeout=WAIT_S)
    assert rows.shape == (0, OUT_DIM)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (np.zeros((4, 4, 3), np.float32), ValueError, r"images\[1\]: expected uint8 pixels, got float32"),
        (
            np.zeros((4, 4, 4), np.uint8),
            ValueError,
            r"images\[1\]: expected 1 \(gray\) or 3 \(RGB\) channels, got 4",
        ),
        (np.zeros((4,), np.uint8), ValueError, r"images\[1\]: expected an \(H, W\) or \(H, W, C\) array"),
        (np.zeros((0, 4, 3), np.uint8), ValueError, r"images\[1\]: image is empty \(0x4\)"),
        (np.zeros((4, 8, 3), np.uint8)[:, ::2], ValueError, r"images\[1\]: pixels must be packed"),
        (
            np.zeros((4, 5, 3), np.uint8)[::-1],
            ValueError,
            r"images\[1\]: row stride -15 is smaller than a row \(15 bytes\)",
        ),
        ([[1, 2], [3, 4]], TypeError, r"images\[1\]: expected a numpy uint8 array .* got list"),
    ],
)
def test_malformed_images_raise_naming_the_index_and_queue_nothing(bad, error, match):
    engine = MeanEngine()
    with make_queue(engine) as queue:
        with pytest.raises(error, match=match):
            queue.submit([image((1, 1, 1)), bad])
        assert queue.stats()["images"] == 0
    assert engine.calls == []


def test_full_batch_goes_at_once_and_the_remainder_waits_for_max_delay():
    engine = MeanEngine()
    with make_queue(engine, max_batch=4, max_delay_ms=FOREVER_MS, streams=1) as queue:
        request = queue.submit([image((i, 0, 0)) for i in range(5)])
        engine.wait_calls(1)  # the full batch of 4 went without waiting
        stats = queue.stats()
        assert stats["queued_images"] == 1  # the fifth waits for max_delay (an hour) or close
        assert not request.done()
    # close() drained it
    rows = request.result(timeout=0)
    assert engine.calls == [4, 1]
    assert colours(rows) == [(i, 0, 0) for i in range(5)]
    assert list(rows[:, 3]) == [4, 4, 4, 4, 1]


def test_a_partial_batch_goes_after_max_delay():
    engine = MeanEngine()
    with make_queue(engine, max_batch=64, max_delay_ms=5.0) as queue:
        # No close: only max_delay can send a batch of one when 64 fit.
        assert colours(queue.submit([image((9, 8, 7))]).result(timeout=WAIT_S)) == [(9, 8, 7)]
    assert engine.calls == [1]


def test_stats_count_batch_sizes_and_queued_images():
    engine = MeanEngine()
    with make_queue(engine, max_batch=4, max_delay_ms=FOREVER_MS, streams=1) as queue:
        assert queue.stats()["batch_sizes"] == {}
        assert queue.stats()["queued_images"] == 0
        request = queue.submit([image((i, 1, 1)) for i in range(10)])
        engine.wait_calls(2)  # two full batches went at once; the last 2 images wait
        assert queue.stats()["queued_images"] == 2
        assert not request.done()
    stats = queue.stats()  # close() drained the last 2
    assert stats["batch_sizes"] == {4: 2, 2: 1}
    assert stats["queued_images"] == 0
    assert sum(size * count for size, count in stats["batch_sizes"].items()) == stats["images"] == 10
    assert colours(request.result(timeout=0)) == [(i, 1, 1) for i in range(10)]


def test_concurrent_callers_each_get_exactly_their_rows():
    # 16 threads x 25 calls of 1..6 random-size images; a row's colour names (thread, call, index).
    threads, calls = 16, 25
    engine = MeanEngine()
    with make_queue(engine, max_batch=16, streams=3, staging_bytes=64 << 10) as queue:

        def caller(t: int) -> int:
            rng = random.Random(t)
            checked = 0
            for c in range(calls):
                n = rng.randint(1, 6)
                images = [image((t, c, j), rng.randint(1, 30), rng.randint(1, 30)) for j in range(n)]
                if c % 2:
                    rows = as_future(queue, images).result(timeout=WAIT_S)
                else:
                    rows = queue.submit(images).result(timeout=WAIT_S)
                assert colours(rows) == [(t, c, j) for j in range(n)]
                checked += n
            return checked

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            checked = sum(pool.map(caller, range(threads)))
        stats = queue.stats()
    assert stats["images"] == checked
    assert stats["requests"] == threads * calls
    assert stats["failed_batches"] == 0
    assert max(engine.calls) > 1  # callers' images were batched together


def test_failing_batch_fails_only_its_requests_and_the_queue_goes_on():
    with make_queue(streams=1) as queue:
        assert colours(queue.submit([image((1, 2, 3))]).result(timeout=WAIT_S)) == [(1, 2, 3)]
        poisoned = queue.submit([image((5, 5, 5)), image((POISON, 0, 0))])
        with pytest.raises(
            nvclip_fast.EngineError, match=r"engine failed: Python engine enqueue\(\) raised ValueError"
        ):
            poisoned.result(timeout=WAIT_S)
        assert poisoned.status == "failed"
        assert "poisoned batch" in poisoned.error
        future = as_future(queue, [image((POISON, 1, 1))])
        with pytest.raises(nvclip_fast.EngineError, match="poisoned batch"):
            future.result(timeout=WAIT_S)
        assert colours(queue.submit([image((7, 8, 9))]).result(timeout=WAIT_S)) == [(7, 8, 9)]
        stats = queue.stats()
    assert stats["failed_batches"] == 2
    assert stats["batches"] == 4


def test_replicas_share_one_queue_and_a_batch_goes_to_a_free_one():
    # Two replicas with one slot each, their engines gated: while one replica holds the first batch,
    # the next batch can only run on the other; then both serve, and every row reaches its caller.
    gates = [threading.Event(), threading.Event()]
    engines = [MeanEngine(gate=gate) for gate in gates]
    replicas = [(engine, make_stage()) for engine in engines]
    with _C.BatchQueue(replicas, max_batch=4, max_delay_ms=1.0, streams=1) as queue:
        assert queue.devices == ["cpu", "cpu"]
        first = queue.submit([image((1, k, 0)) for k in range(4)])  # a full batch: goes at once
        assert eventually(lambda: any(e.calls for e in engines))
        busy = 0 if engines[0].calls else 1
        second = queue.submit([image((2, k, 0)) for k in range(4)])
        engines[1 - busy].wait_calls(1)  # the busy replica still holds the first batch
        assert len(engines[busy].calls) == 1
        for gate in gates:
            gate.set()
        rest = [queue.submit([image((3, k, j)) for j in range(3)]) for k in range(20)]
        assert colours(first.result(timeout=WAIT_S)) == [(1, k, 0) for k in range(4)]
        assert colours(second.result(timeout=WAIT_S)) == [(2, k, 0) for k in range(4)]
        for k, request in enumerate(rest):
            assert colours(request.result(timeout=WAIT_S)) == [(3, k, j) for j in range(3)]
        stats = queue.stats()
    assert [r["device"] for r in stats["replicas"]] == ["cpu", "cpu"]
    assert [r["batches"] for r in stats["replicas"]] == [len(e.calls) for e in engines]
    assert sum(r["images"] for r in stats["replicas"]) == stats["images"] == 8 + 60
    with pytest.raises(ValueError, match=r"replica 1 \(cpu\) has the same engine as replica 0"):
        _C.BatchQueue([replicas[0], (engines[0], make_stage())])
    with pytest.raises(ValueError, match="at least one replica"):
        _C.BatchQueue([])


def test_failed_item_gives_a_nan_row_without_shifting_the_others():
    # resize_mode 'longest' rounds the 1-pixel side of a 1x64 image to 0 pixels: open_clip's
    # transform fails on it, and so does the stage, for that image alone.
    with make_queue(stage=make_stage(resize_mode="longest")) as queue:
        request = queue.submit(
            [image((10, 20, 30), 8, 8), image((1, 2, 3), 1, 64), image((11, 21, 31), 4, 4)]
        )
        rows = request.result(timeout=WAIT_S)
    assert request.status == "ok"
    assert request.failed_items == 1
    assert request.item_errors[0] == request.item_errors[2] == ""
    assert "a 1x64 image resizes to 0x8" in request.item_errors[1]
    assert np.isnan(rows[1]).all()
    assert colours(rows[[0, 2]]) == [(10, 20, 30), (11, 21, 31)]


@pytest.mark.parametrize("cancel", [False, True])
def test_close_under_load_resolves_every_request(cancel):
    engine = MeanEngine(delay_s=0.002)
    queue = make_queue(engine, max_batch=4, staging_bytes=32 << 10)
    requests: list[tuple[int, _C.Request]] = []
    lock = threading.Lock()
    stop = threading.Event()
    rejected: list[str] = []

    def caller(t: int) -> None:
        images = [image((t, j, 0), 12, 12) for j in range(5)]
        while not stop.is_set():
            try:
                request = queue.submit(images)
            except nvclip_fast.EngineError as e:
                rejected.append(str(e))
                return
            with lock:
                requests.append((t, request))

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    engine.wait_calls(20)  # under load: callers blocked on the full ring, batches in flight
    queue.close(cancel=cancel)
    stop.set()
    for thread in threads:
        thread.join(WAIT_S)
    assert not any(thread.is_alive() for thread in threads)
    assert requests
    assert all("closed" in message for message in rejected)
    assert all(r.done() for _, r in requests), "close() returned with a request unresolved"
    for t, r in requests:
        if r.status == "cancelled":
            assert cancel
            with pytest.raises(nvclip_fast.EngineError, match="cancelled"):
                r.result(timeout=0)
        else:  # drain: everything accepted is finished, every row where it belongs
            assert colours(r.result(timeout=0)) == [(t, j, 0) for j in range(5)]
    stats = queue.stats()
    assert stats["images"] + stats["cancelled_images"] == 5 * len(requests)
    assert stats["queued_images"] == 0
    with pytest.raises(nvclip_fast.EngineError, match="closed"):
        queue.submit([image((1, 1, 1))])
    assert queue.closed


def test_close_cancel_fails_what_has_not_started_and_finishes_what_has():
    # One slot; the engine holds the first batch until close(cancel=True) is under way. The second
    # request is queued behind it, so it is cancelled; the first finishes.
    gate = threading.Event()
    engine = MeanEngine(gate=gate)
    queue = make_queue(engine, max_batch=2, max_delay_ms=0.0, streams=1)
    first = queue.submit([image((1, 2, 3))])
    engine.wait_calls(1)
    second = queue.submit([image((4, 5, 6)), image((7, 8, 9))])
    assert queue.stats()["queued_images"] == 2
    closing = threading.Thread(target=queue.close, kwargs={"cancel": True})
    closing.start()
    assert eventually(lambda: queue.closed)  # at once; then close() waits for the engine
    gate.set()
    closing.join(WAIT_S)
    assert not closing.is_alive()
    assert colours(first.result(timeout=0)) == [(1, 2, 3)]
    assert second.status == "cancelled"
    with pytest.raises(nvclip_fast.EngineError, match=r"cancelled: BatchQueue.close\(cancel\)"):
        second.result(timeout=0)
    stats = queue.stats()
    assert (stats["images"], stats["cancelled_images"], engine.calls) == (1, 2, [1])


def test_waiting_releases_the_gil():
    # The request runs only once a helper thread has called close() (an hour's max_delay), and the
    # helper asks for the GIL only after the switch interval was made longer than the test: it gets
    # the GIL only when the main thread blocks without it. Unless request.wait() releases the GIL,
    # the helper never runs and the wait times out.
    waiting = threading.Event()
    with make_queue(max_delay_ms=FOREVER_MS) as queue:
        helper = threading.Thread(target=lambda: waiting.wait(WAIT_S) and queue.close())
        helper.start()
        request = queue.submit([image((1, 2, 3))])
        interval = sys.getswitchinterval()
        sys.setswitchinterval(10 * WAIT_S)
        try:
            waiting.set()
            resolved = request.wait(timeout=WAIT_S)
        finally:
            sys.setswitchinterval(interval)
            helper.join(WAIT_S)
    assert resolved, "request.wait() held the GIL: the helper thread never ran"
    assert colours(request.result(timeout=0)) == [(1, 2, 3)]


def test_backpressure_blocks_submit_without_the_gil():
    # A 4 KiB ring holds 4 of these 1 KiB images; submit(40) must wait until (40 - 4) / 4 = 9 batches
    # have released their staging (after their stage ran). At most one batch per slot (2 slots) is
    # still before its engine call then, so at least 7 engine calls, which need the GIL for the
    # Python engine, happened: submit released the GIL while it blocked.
    engine = MeanEngine(delay_s=0.002)
    images = [image((i, 1, 2), 16, 21) for i in range(40)]  # 16 * 21 * 3 = 1008 bytes -> 1 KiB staged
    with make_queue(engine, max_batch=4, max_delay_ms=0.0, staging_bytes=4096) as queue:
        request = queue.submit(images)
        calls_when_submit_returned = len(engine.calls)
        rows = request.result(timeout=WAIT_S)
    assert calls_when_submit_returned >= 7
    assert colours(rows) == [(i, 1, 2) for i in range(40)]


def test_oversized_image_works():
    with make_queue(staging_bytes=4096) as queue:
        rows = queue.submit([image((1, 1, 1)), image((9, 8, 7), 64, 64)]).result(timeout=WAIT_S)
        assert queue.stats()["oversized_images"] == 1
    assert colours(rows) == [(1, 1, 1), (9, 8, 7)]


def test_rows_outlive_the_request_and_the_queue():
    with make_queue() as queue:
        rows = queue.submit([image((3, 4, 5))]).result(timeout=WAIT_S)
    del queue
    assert colours(rows) == [(3, 4, 5)]
    rows[0, 0] = -1.0  # the caller owns the rows
    assert rows[0, 0] == -1.0


def test_callback_exception_is_reported_as_unraisable(monkeypatch):
    seen: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(info.exc_value))

    def callback(request):
        raise RuntimeError("callback bug")

    with make_queue() as queue:
        queue.submit([image((1, 1, 1))], callback).wait(timeout=WAIT_S)
        ok = queue.submit([image((2, 2, 2))]).result(timeout=WAIT_S)  # the queue carries on
    assert colours(ok) == [(2, 2, 2)]
    assert [str(e) for e in seen] == ["callback bug"]


def test_engine_without_enqueue_fails_its_batches():
    class NoEnqueue(_C.Engine):
        pass

    info = MeanEngine().info
    with (
        make_queue(NoEnqueue(info)) as queue,
        pytest.raises(nvclip_fast.EngineError, match=r"does not implement enqueue"),
    ):
        queue.submit([image((1, 1, 1))]).result(timeout=WAIT_S)


def test_engine_and_queue_configuration_errors():
    with pytest.raises(ValueError, match=r"unknown tensor dtype 'float' \(expected one of float32"):
        _C.TensorSpec("x", "float", [-1, 3])
    with pytest.raises(ValueError, match=r"1 <= min <= opt <= max"):
        _C.EngineInfo(
            inputs=[_C.TensorSpec("x", "float32", [-1, 3])],
            outputs=[_C.TensorSpec("y", "float32", [-1, 2])],
            batch=(4, 2, 8),
        )
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        _C.EngineInfo(inputs=[], outputs=[], batch=(1, 1, 1), device="tpu")
    engine = MeanEngine()
    with pytest.raises(ValueError, match=r"writes \[batch, 3, 16, 16\]"):
        _C.BatchQueue(engine, make_stage(size=16))
    with pytest.raises(ValueError, match=r"max_batch must be in \[1, 64\]"):
        make_queue(engine, max_batch=65)
    with pytest.raises(ValueError, match="max_delay_ms must be a finite number >= 0"):
        make_queue(engine, max_delay_ms=-1.0)
    with pytest.raises(ValueError, match=r"staging_bytes must be 0 \(the default\) or >= 1024, got 16"):
        make_queue(engine, staging_bytes=16)
    with make_queue(engine) as queue:
        assert (queue.device, queue.max_batch, queue.streams) == ("cpu", 8, 2)
        assert queue.input.name == "pixels"
        assert queue.output.shape == [-1, OUT_DIM]
        # The default ring: (streams + 1) batches of 640x480 photos, at least 256 MiB.
        assert queue.staging_bytes == max(3 * 8 * 640 * 480 * 3, 256 << 20)
        with pytest.raises(nvclip_fast.EngineError, match="already serves a BatchQueue"):
            make_queue(engine)
    with make_queue(engine) as queue:  # free again once the first queue closed
        assert queue.max_batch == 8


def test_multi_output_engine_needs_the_output_named():
    class TwoOutputs(_C.Engine):
        def __init__(self):
            super().__init__(
                _C.EngineInfo(
                    inputs=[_C.TensorSpec("pixels", "float32", [-1, 3, SIZE, SIZE])],
                    outputs=[_C.TensorSpec("a", "float32", [-1, 2]), _C.TensorSpec("b", "int64", [-1, 1])],
                    batch=(1, 4, 8),
                )
            )

        def enqueue(self, batch, inputs, outputs, stream):
            outputs["a"][:] = 1.5
            outputs["b"][:] = np.arange(batch)[:, None]

    engine = TwoOutputs()
    with pytest.raises(ValueError, match=r"the engine has 2 outputs \(a, b\): name the one to return"):
        _C.BatchQueue(engine, make_stage())
    with _C.BatchQueue(engine, make_stage(), output="b", max_delay_ms=50.0) as queue:
        rows = queue.submit([image((1, 1, 1))] * 3).result(timeout=WAIT_S)
    assert rows.dtype == np.int64
    assert rows[:, 0].tolist() == [0, 1, 2]


def test_tensorrt_plan_on_this_machine_raises_engine_error_never_crashes(tmp_path):
    # Encoder("x.plan") on a machine without a GPU (or TensorRT) is a clear EngineError, never a crash.
    missing = tmp_path / "missing.plan"
    with pytest.raises(nvclip_fast.EngineError, match=r"missing\.plan|without TensorRT"):
        _C.TrtEngine(missing)
    junk = tmp_path / "junk.plan"
    junk.write_bytes(b"not a TensorRT plan")
    with pytest.raises(nvclip_fast.EngineError) as excinfo:
        _C.TrtEngine(str(junk))
    message = str(excinfo.value)
    if not nvclip_fast.build_info()["tensorrt"]:
        assert "built without TensorRT" in message
    elif not nvclip_fast.cuda_available():
        assert "junk.plan" in message
        assert "no usable CUDA device" in message
    else:  # a GPU: either TensorRT is absent, or it refuses the bytes
        assert "could not load the TensorRT" in message or "deserialization failed" in message


def test_open_queue_at_interpreter_exit_does_not_hang():
    # A queue left open (with a Python engine and pending work) is cancelled by the atexit hook.
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_batch_queue import MeanEngine, image, make_queue
        queue = make_queue(MeanEngine(delay_s=0.01), max_batch=2)
        requests = [queue.submit([image((i, 0, 0))] * 4) for i in range(20)]
        print("submitted", flush=True)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT_S)
    assert out.returncode == 0, out.stderr
    assert "submitted" in out.stdout


@pytest.mark.gpu
def test_cuda_engine_through_the_trampoline():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")

    class TorchMean(_C.Engine):
        def __init__(self):
            super().__init__(
                _C.EngineInfo(
                    inputs=[_C.TensorSpec("pixels", "float32", [-1, 3, SIZE, SIZE])],
                    outputs=[_C.TensorSpec("embeds", "float32", [-1, OUT_DIM])],
                    batch=(1, 8, 64),
                    device="cuda",
                )
            )

        def enqueue(self, batch, inputs, outputs, stream):
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                pixels = torch.as_tensor(inputs["pixels"], device="cuda")
                out = torch.as_tensor(outputs["embeds"], device="cuda")
                out[:, :3] = pixels.double().mean(dim=(2, 3)).float() * 255
                out[:, 3] = batch

    with _C.BatchQueue(TorchMean(), make_stage(device="cuda"), max_batch=8) as queue:
        assert queue.device == "cuda"
        futures = [as_future(queue, [image((t, j, 1), 3 + j, 9) for j in range(5)]) for t in range(20)]
        for t, future in enumerate(futures):
            assert colours(future.result(timeout=WAIT_S)) == [(t, j, 1) for j in range(5)]
