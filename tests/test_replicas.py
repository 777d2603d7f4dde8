"""Several devices behind one Encoder: one image engine (replica) per device, one native queue.

The CPU replicas (``device=["cpu", "cpu"]``) run the same code path as CUDA replicas: their rows
are held to a single-device Encoder's on the same images, every row must reach its caller, and a
replica whose engine fails must fail only the images of its own batches. Replicas are made to run a
batch each deterministically where a test needs it: their engines' first calls meet at a barrier
(with one slot per replica, a batch formed meanwhile can only go to the replica still free).
"""

from __future__ import annotations

import concurrent.futures
import copy
import io
import os
import threading

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from PIL import Image

import nvclip_fast as nf
import tiny_models
from nvclip_fast import _C, cli, metadata
from nvclip_fast.devices import Devices, parse_devices, thread_shares
from nvclip_fast.encoder import Encoder
from nvclip_fast.engines import OnnxEngine

# Rows of the same ONNX graph on the same pixels: equal up to ONNX Runtime picking other kernels
# for other batch sizes (the replicas form other batches than a single device does).
MIN_COS = 0.99999
ROW_ATOL = 1e-6
WAIT_S = 60
THREADS, CALLS = 16, 4


# --- device strings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "kind", "indices", "canonical"),
    [
        ("auto", "auto", (0,), "auto"),
        ("cpu", "cpu", (0,), "cpu"),
        ("cuda", "cuda", (0,), "cuda:0"),
        ("cuda:3", "cuda", (3,), "cuda:3"),
        ("cuda:0,1", "cuda", (0, 1), "cuda:0,1"),
        ("cuda:2, 0", "cuda", (2, 0), "cuda:2,0"),
        ("cuda:0,cuda:1", "cuda", (0, 1), "cuda:0,1"),
        (["cuda:1", "cuda:0"], "cuda", (1, 0), "cuda:1,0"),
        ("cpu,cpu", "cpu", (0, 0), "cpu,cpu"),
        (["cpu", "cpu", "cpu"], "cpu", (0, 0, 0), "cpu,cpu,cpu"),
    ],
)
def test_device_strings(device, kind, indices, canonical):
    devices = parse_devices(device)
    assert devices == Devices(kind, indices)
    assert str(devices) == canonical
    assert parse_devices(str(devices)) == devices  # the canonical string reads back


@pytest.mark.parametrize(
    ("device", "match"),
    [
        ("gpu", "device must be"),
        ("cuda:x", "device must be"),
        ("cpu:2", "device must be"),
        ("1,2", "device must be"),
        ("", "device must be"),
        ([], "empty list"),
        (3, "device must be"),
        (["cpu", 1], "device must be"),
        (["cpu", "cuda:0"], "one kind of device"),
        ("cuda:0,0", "listed twice"),
        ("auto,auto", "'auto' picks one device"),
    ],
)
def test_bad_device_strings_say_what_is_accepted(device, match):
    with pytest.raises(ValueError, match=match):
        parse_devices(device)


@pytest.mark.skipif(nf.cuda_available(), reason="checks the no-GPU message")
def test_cuda_all_without_a_gpu_is_a_clear_engine_error(tiny):
    with pytest.raises(nf.EngineError, match="'cuda:all' requested but no CUDA device is usable"):
        Encoder(tiny[1], device="cuda:all")


@pytest.mark.parametrize(
    ("threads", "replicas", "shares"),
    [(None, 1, [None]), (4, 1, [4]), (4, 2, [2, 2]), (5, 2, [3, 2]), (1, 2, [1, 1]), (7, 3, [3, 2, 2])],
)
def test_thread_shares(threads, replicas, shares):
    assert thread_shares(threads, replicas) == shares


def test_every_core_is_shared_when_threads_is_none():
    cores = os.cpu_count() or 1
    shares = thread_shares(None, 2)
    assert sum(shares) == max(cores, 2)
    assert max(shares) - min(shares) <= 1


# --- CPU replicas through the Encoder -----------------------------------------------------------------


def mixed_items(seed: int, directory) -> tuple[list, list[bool]]:
    """A call's items: arrays (RGB, gray), a PNG file, JPEG bytes and bad items; and which are bad."""
    rng = np.random.default_rng(seed)
    items: list = []
    bad: list[bool] = []
    for k in range(int(rng.integers(2, 7))):
        h, w = (int(v) for v in rng.integers(4, 70, 2))
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        kind = int(rng.integers(0, 6))
        if kind == 0:
            item = rgb[:, :, 0].copy()  # gray
        elif kind == 1:
            path = directory / f"{seed}-{k}.png"
            Image.fromarray(rgb).save(path)
            item = str(path)
        elif kind == 2:
            buffer = io.BytesIO()
            Image.fromarray(rgb).save(buffer, format="JPEG")
            item = buffer.getvalue()
        elif kind == 3:
            item = [b"not an image", "/no/such.png", np.zeros((0, 4, 3), np.uint8)][int(rng.integers(0, 3))]
        else:
            item = rgb
        items.append(item)
        bad.append(kind == 3)
    return items, bad


def run_callers(encoder: Encoder, work: dict) -> dict:
    """Every call of ``work`` ({(thread, call): items}) from THREADS threads at once, on_error="nan"."""
    results: dict = {}
    barrier = threading.Barrier(THREADS)

    def caller(t: int) -> None:
        barrier.wait(WAIT_S)
        for c in range(CALLS):
            results[(t, c)] = encoder.embed(work[(t, c)], on_error="nan")

    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        for f in [pool.submit(caller, t) for t in range(THREADS)]:
            f.result(timeout=WAIT_S)
    return results


def assert_rows_match(got: np.ndarray, want: np.ndarray, bad: list[bool], where: str) -> None:
    assert got.shape == want.shape, where
    assert np.isnan(got).all(axis=1).tolist() == bad, where
    good = ~np.array(bad)
    a, b = got[good].astype(np.float64), want[good].astype(np.float64)
    cosines = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosines.min(initial=1.0) >= MIN_COS, where
    np.testing.assert_allclose(got[good], want[good], atol=ROW_ATOL, err_msg=where)


def test_cpu_replicas_give_every_caller_the_rows_of_one_device(tiny, tmp_path):
    work, bad = {}, {}
    for t in range(THREADS):
        for c in range(CALLS):
            work[(t, c)], bad[(t, c)] = mixed_items(1000 * t + c, tmp_path)
    with Encoder(tiny[1], device="cpu", threads=2) as single:
        want = {key: single.embed(items, on_error="nan") for key, items in work.items()}
    with Encoder(tiny[1], device=["cpu", "cpu"], threads=2) as enc:
        assert enc.device == "cpu,cpu"
        assert "device='cpu,cpu'" in repr(enc)
        got = run_callers(enc, work)
        stats = enc.stats()
    assert set(got) == set(work)
    for key in work:  # nothing lost, duplicated or sent to another caller: each row is its own image's
        assert_rows_match(got[key], want[key], bad[key], f"thread {key[0]} call {key[1]}")
    good_images = sum(bad_item is False for flags in bad.values() for bad_item in flags)
    replicas = stats["replicas"]
    assert [r["device"] for r in replicas] == ["cpu", "cpu"]
    assert stats["images"] == good_images == sum(r["images"] for r in replicas)
    assert stats["batches"] == sum(r["batches"] for r in replicas)
    # Both ran batches: a batch goes to the replica with fewer batches in flight, or, as loaded, to
    # the one that has taken fewer.
    assert all(r["batches"] > 0 for r in replicas), replicas
    assert stats["failed_batches"] == 0


def test_cpu_replicas_split_the_threads(tiny):
    with Encoder(tiny[1], device="cpu,cpu", engine="onnxruntime", threads=3) as enc:
        sessions = [e._session.get_session_options() for e in enc._towers.images]
        assert [s.intra_op_num_threads for s in sessions] == [2, 1]
        assert [stage.threads for stage in enc._images.stages] == [2, 1]
        assert enc.max_batch == tiny_models.TINY_MAX_BATCH
        assert enc.embed_text(["a cat"]).shape == (1, enc.dim)  # the text tower, on the first device


class Meeting:
    """A barrier that each replica's engine passes on its first call."""

    def __init__(self, parties: int):
        self.barrier = threading.Barrier(parties)
        self.met: set[int] = set()

    def first_call(self, replica: int) -> None:
        if replica not in self.met:
            self.met.add(replica)
            self.barrier.wait(WAIT_S)


class MeetingOnnxEngine(OnnxEngine):
    """The real ONNX image tower; its first call meets the other replicas' first calls."""

    def __init__(self, path, meeting: Meeting, replica: int):
        super().__init__(path, threads=1)
        self.meeting, self.replica = meeting, replica

    def enqueue(self, batch, inputs, outputs, stream):
        self.meeting.first_call(self.replica)
        super().enqueue(batch, inputs, outputs, stream)


class LostDevice(_C.Engine):
    """A replica whose device is gone: the same tensors as ``like``, and every batch fails."""

    def __init__(self, like: _C.Engine, meeting: Meeting, replica: int):
        info = like.info
        super().__init__(_C.EngineInfo(info.inputs, info.outputs, info.batch, "cpu"))
        self.meeting, self.replica = meeting, replica

    def enqueue(self, batch, inputs, outputs, stream):
        self.meeting.first_call(self.replica)
        raise RuntimeError("device lost")


def test_a_failing_replica_fails_only_the_images_of_its_batches(tiny):
    onnx_path = tiny[1]
    spec = nf.PreprocessSpec(**metadata.load(onnx_path.with_suffix(".json")).preprocess.to_dict())
    rng = np.random.default_rng(5)
    images = {
        (t, c): rng.integers(0, 256, (int(rng.integers(8, 60)), int(rng.integers(8, 60)), 3), dtype=np.uint8)
        for t in range(THREADS)
        for c in range(CALLS)
    }
    with Encoder(onnx_path, device="cpu", threads=1) as single:
        want = {key: single.embed([image]) for key, image in images.items()}
    meeting = Meeting(2)
    good = MeetingOnnxEngine(onnx_path, meeting, 0)
    enc = Encoder.from_engine([good, LostDevice(good, meeting, 1)], spec, max_batch=4, streams=1, threads=2)
    outcomes: dict = {}
    barrier = threading.Barrier(THREADS)

    def caller(t: int) -> None:  # one image per call: a call fails exactly when its image did
        barrier.wait(WAIT_S)
        for c in range(CALLS):
            try:
                outcomes[(t, c)] = enc.embed([images[(t, c)]])
            except nf.EngineError as e:
                outcomes[(t, c)] = e

    with enc, concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        for f in [pool.submit(caller, t) for t in range(THREADS)]:
            f.result(timeout=WAIT_S)
        stats = enc.stats()
    failed = [key for key, outcome in outcomes.items() if isinstance(outcome, Exception)]
    for key in failed:
        assert "failed on replica 1 (cpu)" in str(outcomes[key])
        assert "device lost" in str(outcomes[key])
    for key in set(outcomes) - set(failed):
        np.testing.assert_allclose(outcomes[key], want[key], atol=ROW_ATOL, err_msg=str(key))
    ok_replica, lost_replica = stats["replicas"]
    assert len(outcomes) == THREADS * CALLS
    # Exactly the images that ran on the lost replica failed; the other replica's all came back right.
    assert len(failed) == lost_replica["images"] > 0
    assert len(outcomes) - len(failed) == ok_replica["images"] > 0
    assert lost_replica["failed_batches"] == lost_replica["batches"] == stats["failed_batches"]
    assert ok_replica["failed_batches"] == 0


class Shaped(_C.Engine):
    """An engine that is only described (never run): images of ``size`` px to rows of ``dim``."""

    def __init__(self, size: int, dim: int):
        pixels = _C.TensorSpec(metadata.IMAGE_INPUT, "float32", [-1, 3, size, size])
        super().__init__(
            _C.EngineInfo([pixels], [_C.TensorSpec(metadata.IMAGE_OUTPUT, "float32", [-1, dim])], (1, 4, 8))
        )

    def enqueue(self, batch, inputs, outputs, stream):
        raise AssertionError("never run")


def test_replicas_that_disagree_are_refused():
    spec = nf.PreprocessSpec(size=32)
    engine = Shaped(32, 16)
    with pytest.raises(
        ValueError, match=r"replica 1: engine input .*8, 8\] does not match the preprocess stage"
    ):
        Encoder.from_engine([engine, Shaped(8, 16)], spec)
    with pytest.raises(ValueError, match=r"replica 1 \(cpu\) and replica 0 \(cpu\) return different rows"):
        Encoder.from_engine([engine, Shaped(32, 24)], spec)
    with pytest.raises(ValueError, match=r"replica 1 \(cpu\) has the same engine as replica 0"):
        Encoder.from_engine([engine, engine], spec)
    with pytest.raises(ValueError, match="at least one image engine"):
        Encoder.from_engine([], spec)
    with Encoder.from_engine([engine, Shaped(32, 16)], spec) as enc:  # the refusals kept no engine
        assert (enc.device, enc.max_batch, enc.dim) == ("cpu,cpu", 4, 16)


def test_cli_embed_on_cpu_replicas(tiny, tmp_path):
    rng = np.random.default_rng(9)
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(12):
        Image.fromarray(rng.integers(0, 256, (20 + k, 30, 3), dtype=np.uint8)).save(folder / f"{k:02}.png")
    outputs = {}
    for device in ("cpu", "cpu,cpu"):
        out = tmp_path / f"{device.replace(',', '-')}.npy"
        argv = ["embed", str(folder), "-m", str(tiny[1]), "--device", device, "-o", str(out), "--no-progress"]
        assert cli.main(argv) == cli.EXIT_OK
        outputs[device] = np.load(out)
    assert outputs["cpu"].shape == (12, 32)
    np.testing.assert_allclose(outputs["cpu,cpu"], outputs["cpu"], atol=ROW_ATOL)


# --- GPU -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_all_matches_one_device(tiny, tmp_path):
    count = _C.cuda_device_count()
    if count < 2:
        pytest.skip(f"cuda:all needs 2 or more CUDA devices to test replicas; this machine has {count}")
    pytest.importorskip("torch")
    model, _ = tiny
    checkpoint = tiny_models.save_checkpoint(model, tmp_path / "w.pt")
    rng = np.random.default_rng(11)
    work = {
        (t, c): [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(8)]
        for t in range(THREADS)
        for c in range(CALLS)
    }
    with Encoder.from_open_clip("tiny-clip", weights=checkpoint, device="cuda:0") as one:
        want = {key: one.embed(items) for key, items in work.items()}
    with Encoder.from_open_clip("tiny-clip", weights=checkpoint, device="cuda:all", streams=1) as every:
        assert every.device == "cuda:" + ",".join(str(i) for i in range(count))
        got = run_callers(every, work)
        stats = every.stats()
        text = every.embed_text(["a photo of a cat"])
    for key, items in work.items():
        assert_rows_match(got[key], want[key], [False] * len(items), str(key))
    replicas = stats["replicas"]
    assert [r["device"] for r in replicas] == [f"cuda:{i}" for i in range(count)]
    assert sum(r["images"] for r in replicas) == THREADS * CALLS * 8
    assert all(r["batches"] > 0 for r in replicas), replicas
    assert text.shape == (1, 32)


@pytest.mark.gpu
def test_two_cuda_replicas_of_a_python_engine(tiny):
    # Runs on any GPU host: two PyTorch replicas (on the first and the last device, the same one
    # where there is only one) behind one queue, each with its own CUDA stage and slot; their first
    # calls meet, so both run batches. Rows equal a single replica's.
    torch = pytest.importorskip("torch")
    from nvclip_fast.engines import TorchEngine

    model, onnx_path = tiny
    spec = nf.PreprocessSpec(**metadata.load(onnx_path.with_suffix(".json")).preprocess.to_dict())
    meeting = Meeting(2)

    class MeetingTorchEngine(TorchEngine):
        def __init__(self, device_index: int, replica: int):
            net = copy.deepcopy(model).to(torch.device("cuda", device_index))
            shape = (3, spec.size, spec.size)
            super().__init__(
                net,
                "image",
                embed_dim=32,
                input_shape=shape,
                input_dtype="float32",
                device="cuda",
                device_index=device_index,
            )
            self.replica = replica

        def enqueue(self, batch, inputs, outputs, stream):
            if self.replica is not None:
                meeting.first_call(self.replica)
            super().enqueue(batch, inputs, outputs, stream)

    last = _C.cuda_device_count() - 1
    rng = np.random.default_rng(12)
    images = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for _ in range(200)]
    with Encoder.from_engine(MeetingTorchEngine(0, None), spec, max_batch=8) as one:
        want = one.embed(images)
    replicas = [MeetingTorchEngine(0, 0), MeetingTorchEngine(last, 1)]
    with Encoder.from_engine(replicas, spec, max_batch=8, streams=1) as two:
        assert two.device == f"cuda:0,{last}"
        got = two.embed(images)
        stats = two.stats()
    assert_rows_match(got, want, [False] * len(images), "two CUDA replicas")
    assert [r["device"] for r in stats["replicas"]] == ["cuda:0", f"cuda:{last}"]
    assert all(r["batches"] > 0 for r in stats["replicas"])
