"""Encoder: open_clip's numbers through the native queue, every image back to its caller.

The reference is always open_clip itself: its model loaded from the same checkpoint, its Pillow
transform, its tokenizer. Row order is checked against a direct computation (preprocess + the
ONNX graph under ONNX Runtime) that uses no queue at all.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import re
import shutil
import threading
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
ort = pytest.importorskip("onnxruntime")

from PIL import Image  # noqa: E402

import nvclip_fast as nf  # noqa: E402
import tiny_models  # noqa: E402
from nvclip_fast import _C, metadata  # noqa: E402
from nvclip_fast.encoder import Encoder, ItemError  # noqa: E402

# Encoder(onnx) equals open_clip's pipeline with cosine >= 0.99999 in fp32 (preprocessing
# is bit-exact; what remains is ONNX Runtime vs torch float summation order).
MIN_COS = 0.99999
MAX_BATCH = tiny_models.TINY_MAX_BATCH  # the ``tiny`` bundle's (conftest)
# Rows computed with and without the queue run the same ONNX graph on the same input: they may
# differ only by ONNX Runtime choosing different kernels for different batch sizes.
ROW_ATOL = 1e-6
TIMEOUT_S = 60
FP16_MIN_COS = 0.999  # the exporter's gate for fp16
TEXTS = ["a photo of a cat", "", "a diagram, with arrows!", "two dogs " * 40, "🙂"]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def open_clip_image_embeds(model: torch.nn.Module, pil_images: list) -> np.ndarray:
    """open_clip's own pipeline: its eval transform on PIL images, then encode_image."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)
    with torch.no_grad():
        return model.encode_image(torch.stack([transform(im) for im in pil_images]), normalize=True).numpy()


def open_clip_text_embeds(model: torch.nn.Module, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        return model.encode_text(open_clip.get_tokenizer("tiny-clip")(texts), normalize=True).numpy()


def random_images(n: int, seed: int, lo: int = 8, hi: int = 80) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (int(rng.integers(lo, hi)), int(rng.integers(lo, hi)), 3), dtype=np.uint8)
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def encoder(tiny):
    with Encoder(tiny[1], device="cpu", engine="onnxruntime", threads=1) as enc:  # as `direct` runs it
        yield enc


@pytest.fixture(scope="module")
def direct(tiny):
    """Embeddings without the queue: nf.preprocess + the ONNX graph under ONNX Runtime."""
    _, onnx_path = tiny
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    spec = nf.PreprocessSpec(**metadata.load(onnx_path.with_suffix(".json")).preprocess.to_dict())

    def run(images: list) -> np.ndarray:
        x = nf.preprocess(images, spec, threads=1)
        rows = [
            session.run(None, {metadata.IMAGE_INPUT: x[i : i + MAX_BATCH]})[0]
            for i in range(0, len(x), MAX_BATCH)
        ]
        return np.concatenate(rows)

    return run


# --- parity with open_clip ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:an image of shape")  # 3 x 1000 RGB also reads as channels-first
def test_vit_s_32_matches_open_clip_on_photos_and_odd_shapes(vits32):
    skimage_data = pytest.importorskip("skimage.data")
    onnx_path, checkpoint = vits32
    reference = open_clip.create_model("ViT-S-32", pretrained=str(checkpoint)).eval()
    photos = [
        getattr(skimage_data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "camera")
    ]
    rng = np.random.default_rng(7)
    odd = [
        rng.integers(0, 256, shape, dtype=np.uint8)
        for shape in [
            (1, 1, 3),
            (3, 1000, 3),
            (1000, 3, 3),
            (17, 23, 3),
            (700, 224, 3),
            (224, 224, 3),
            (225, 300),
        ]
    ]
    images = photos + odd
    with Encoder(onnx_path, device="cpu") as enc:
        got = enc.embed(images)
    want = open_clip_image_embeds(reference, [Image.fromarray(a) for a in images])
    assert got.shape == (len(images), 384)
    assert cosines(got, want).min() >= MIN_COS


def test_tiny_matches_open_clip(tiny, encoder):
    model, _ = tiny
    images = random_images(12, seed=1, lo=1, hi=120)
    got = encoder.embed(images)
    assert cosines(got, open_clip_image_embeds(model, [Image.fromarray(a) for a in images])).min() >= MIN_COS


def test_embed_text_matches_open_clip(tiny, encoder):
    model, _ = tiny
    texts = ["a photo of a cat", "", "a diagram, with arrows!", "two dogs " * 40, "🙂"] * 4  # 20 > max_batch
    with torch.no_grad():
        want = model.encode_text(open_clip.get_tokenizer("tiny-clip")(texts), normalize=True).numpy()
    got = encoder.embed_text(texts)
    assert got.shape == (len(texts), 32)
    assert cosines(got, want).min() >= MIN_COS
    assert encoder.embed_text([]).shape == (0, 32)
    np.testing.assert_array_equal(
        encoder.tokenize(["a cat"]), open_clip.get_tokenizer("tiny-clip")(["a cat"]).numpy()
    )


def test_from_open_clip_on_cpu_matches_open_clip(tiny, tmp_path):
    model, _ = tiny
    checkpoint = tiny_models.save_checkpoint(model, tmp_path / "w.pt")
    images = random_images(5, seed=2)
    with Encoder.from_open_clip("tiny-clip", weights=checkpoint, device="cpu") as enc:
        assert (enc.dim, enc.device, enc.spec.size) == (32, "cpu", 32)
        got = enc.embed(images)
        text = enc.embed_text(["a photo of a dog"])
    assert cosines(got, open_clip_image_embeds(model, [Image.fromarray(a) for a in images])).min() >= MIN_COS
    with torch.no_grad():
        want_text = model.encode_text(
            open_clip.tokenize(["a photo of a dog"], context_length=16), normalize=True
        )
    assert cosines(text, want_text.numpy()).min() >= MIN_COS


# --- inputs, sizes, order -------------------------------------------------------------------------


def test_mixed_input_kinds_in_one_call(encoder, direct, tmp_path):
    rgb, gray = random_images(1, seed=3)[0], random_images(1, seed=4)[0][:, :, 0].copy()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    path = tmp_path / "img.png"
    path.write_bytes(png.getvalue())
    chw = torch.from_numpy(rgb).permute(2, 0, 1)  # torchvision's layout
    items = [rgb, gray, rgba, Image.fromarray(rgb), str(path), path, png.getvalue(), chw]
    got = encoder.embed(items)
    want = direct([rgb, gray, rgb, rgb, rgb, rgb, rgb, rgb])
    np.testing.assert_allclose(got, want, atol=ROW_ATOL)


@pytest.mark.parametrize("n", [0, 1, MAX_BATCH + 1, 1000])
def test_any_number_of_images_in_order(encoder, direct, n):
    images = random_images(n, seed=n)
    got = encoder.embed(images)
    assert got.shape == (n, 32)
    assert got.dtype == np.float32
    if n:
        np.testing.assert_allclose(got, direct(images), atol=ROW_ATOL)


def test_submit_future_and_torch_output(encoder, direct):
    images = random_images(3, seed=11)
    future = encoder.submit(images)
    assert isinstance(future, concurrent.futures.Future)
    np.testing.assert_allclose(future.result(timeout=TIMEOUT_S), direct(images), atol=ROW_ATOL)
    tensor = encoder.embed(images, output="torch")
    assert isinstance(tensor, torch.Tensor)
    np.testing.assert_allclose(tensor.numpy(), direct(images), atol=ROW_ATOL)


def test_sixteen_threads_get_exactly_their_own_images(encoder, direct):
    threads, calls = 16, 25
    rng = np.random.default_rng(16)
    work = {
        (t, c): random_images(int(rng.integers(1, 5)), seed=1000 * t + c, lo=5, hi=48)
        for t in range(threads)
        for c in range(calls)
    }
    keys = list(work)
    flat = [im for k in keys for im in work[k]]
    expected_flat = direct(flat)
    expected, start = {}, 0
    for k in keys:
        expected[k] = expected_flat[start : start + len(work[k])]
        start += len(work[k])
    results: dict = {}
    barrier = threading.Barrier(threads)

    def caller(t: int) -> None:
        barrier.wait()
        for c in range(calls):
            results[(t, c)] = encoder.embed(work[(t, c)])

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(caller, t) for t in range(threads)]:
            f.result(timeout=TIMEOUT_S)
    assert set(results) == set(keys)
    for k in keys:
        np.testing.assert_allclose(
            results[k], expected[k], atol=ROW_ATOL, err_msg=f"thread {k[0]} call {k[1]}"
        )


# --- errors ---------------------------------------------------------------------------------------


def test_corrupt_item_raise_names_it(encoder):
    images = random_images(3, seed=5)
    with pytest.raises(ItemError, match=r"images\[1\]: cannot decode 7 bytes") as info:
        encoder.embed([images[0], b"garbage", images[1]])
    assert info.value.index == 1
    with pytest.raises(ItemError, match=r"images\[2\]: expected uint8 pixels, got float32"):
        encoder.embed([images[0], images[1], images[2].astype(np.float32)])
    with pytest.raises(ItemError, match=r"images\[0\]: unsupported image type int"):
        encoder.embed([3])


def test_corrupt_items_nan_keep_the_others(encoder, direct):
    images = random_images(4, seed=6)
    items = [
        images[0],
        b"garbage",
        images[1],
        np.zeros((0, 5, 3), np.uint8),
        images[2],
        "/no/such.png",
        images[3],
    ]
    got = encoder.embed(items, on_error="nan")
    bad = np.isnan(got).all(axis=1)
    assert bad.tolist() == [False, True, False, True, False, True, False]
    np.testing.assert_allclose(got[~bad], direct(images), atol=ROW_ATOL)
    assert np.isnan(encoder.embed([b"x", b"y"], on_error="nan")).all()


def test_bad_arguments(encoder):
    with pytest.raises(ValueError, match="on_error must be one of"):
        encoder.embed([], on_error="skip")
    with pytest.raises(ValueError, match="output must be one of"):
        encoder.embed([], output="list")
    with pytest.raises(ValueError, match="device must be"):
        Encoder("x.onnx", device="gpu")


class MarkerEngine(_C.Engine):
    """Embeds each image as (mean of its channel-0 values, 1, 0, ...) and fails any batch holding an
    image whose top-left pixel is white (a marker the test plants)."""

    DIM = 4

    def __init__(self, spec: nf.PreprocessSpec, white: float):
        size = spec.size
        super().__init__(
            _C.EngineInfo(
                [_C.TensorSpec(metadata.IMAGE_INPUT, "float32", [-1, 3, size, size])],
                [_C.TensorSpec(metadata.IMAGE_OUTPUT, "float32", [-1, self.DIM])],
                (1, 2, 2),
            )
        )
        self.white = white

    def enqueue(self, batch, inputs, outputs, stream):
        x = inputs[metadata.IMAGE_INPUT]
        if np.isclose(x[:, 0, 0, 0], self.white).any():
            raise RuntimeError("planted failure")
        out = outputs[metadata.IMAGE_OUTPUT]
        out[:] = 0
        out[:, 0] = x[:, 0].mean(axis=(1, 2))
        out[:, 1] = 1


def test_engine_failure_fails_only_that_batch():
    spec = nf.PreprocessSpec(size=8, resize_mode="squash")
    white = (1.0 - spec.mean[0]) / spec.std[0]
    # Batches close only when full (2 images; the delay is long), so each request is one batch.
    enc = Encoder.from_engine(MarkerEngine(spec, white), spec, max_batch=2, max_delay_ms=60_000, streams=1)
    good = [np.full((8, 8, 3), 10, np.uint8), np.full((8, 8, 3), 20, np.uint8)]
    poisoned = [np.full((8, 8, 3), 255, np.uint8), np.full((8, 8, 3), 30, np.uint8)]
    with enc:
        futures = [
            enc.submit(good, normalize=False),
            enc.submit(poisoned, normalize=False),
            enc.submit(good, normalize=False),
        ]
        assert futures[0].result(timeout=TIMEOUT_S).shape == (2, MarkerEngine.DIM)
        with pytest.raises(nf.EngineError, match="planted failure"):
            futures[1].result(timeout=TIMEOUT_S)
        np.testing.assert_array_equal(futures[2].result(timeout=TIMEOUT_S), futures[0].result())
        # the queue keeps serving after the failure
        assert enc.embed(good, normalize=False).shape == (2, MarkerEngine.DIM)


@pytest.mark.parametrize("cancel", [False, True])
def test_close_under_load_resolves_everything(tiny, cancel):
    enc = Encoder(tiny[1], device="cpu", threads=1, max_delay_ms=1)
    images = random_images(6, seed=8)
    futures: list = []
    stop = threading.Event()

    def producer() -> None:
        while not stop.is_set():
            try:
                futures.append(enc.submit(images))
            except nf.EngineError:
                return  # closed: submit refuses, with a clear error

    workers = [threading.Thread(target=producer) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(0.3)
    enc.close(cancel=cancel)
    stop.set()
    for w in workers:
        w.join(TIMEOUT_S)
        assert not w.is_alive()
    assert futures
    outcomes = set()
    for f in futures:  # each finished with its rows or an error, none left hanging
        error = f.exception(timeout=TIMEOUT_S)
        if error is None:
            assert f.result().shape == (6, 32)
            outcomes.add("rows")
        else:
            assert isinstance(error, nf.EngineError)
            assert re.search("clos|cancel", str(error), re.IGNORECASE), str(error)
            outcomes.add("error")
    assert "rows" in outcomes or cancel
    with pytest.raises(nf.EngineError, match="closed"):
        enc.embed(images)


# --- bundles --------------------------------------------------------------------------------------


def test_plan_without_gpu_or_tensorrt_is_a_clear_engine_error(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not a TensorRT plan")
    with pytest.raises(nf.EngineError, match="TensorRT") as info:
        Encoder(plan)
    if not nf.build_info()["tensorrt"]:  # the build says what it lacks and how to get it
        assert "built without TensorRT support" in str(info.value)
        assert "TensorRT_ROOT" in str(info.value)
    with pytest.raises(ValueError, match="run on CUDA devices"):
        Encoder(plan, device="cpu")


@pytest.mark.skipif(nf.cuda_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_engine_error(tiny):
    with pytest.raises(nf.EngineError, match="no CUDA device is usable"):
        Encoder.from_open_clip("tiny-clip", random_weights=True, device="cuda")


def test_onnx_without_sidecar_warns_and_uses_defaults(tiny, encoder, tmp_path):
    _, onnx_path = tiny
    for name in ("tiny.onnx", "tiny.onnx.data", "tiny.text.onnx", "tiny.text.onnx.data"):
        shutil.copy(onnx_path.parent / name, tmp_path / name)
    images = random_images(4, seed=9)
    with pytest.warns(UserWarning, match="no sidecar"):
        bare = Encoder(tmp_path / "tiny.onnx", device="cpu")
    with bare:
        assert bare.spec.size == 32
        np.testing.assert_allclose(bare.embed(images), encoder.embed(images), atol=ROW_ATOL)
        np.testing.assert_allclose(bare.embed_text(["a cat"]), encoder.embed_text(["a cat"]), atol=ROW_ATOL)


def test_sidecar_path_and_properties(tiny):
    _, onnx_path = tiny
    with Encoder(onnx_path.with_suffix(".json"), device="cpu") as enc:
        assert (enc.dim, enc.model, enc.device, enc.max_batch) == (32, "tiny-clip", "cpu", MAX_BATCH)
        assert enc.logit_scale == pytest.approx(enc.metadata.logit_scale)
        assert "tiny-clip" in repr(enc)
        enc.embed(random_images(MAX_BATCH + 1, seed=17))
        stats = enc.stats()
        assert stats["images"] == MAX_BATCH + 1
        assert stats["batches"] >= 2
        assert stats["largest_batch"] <= MAX_BATCH


# --- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_pytorch_engine_on_cuda_matches_cpu(tiny, tmp_path, precision):
    model, _ = tiny
    checkpoint = tiny_models.save_checkpoint(model, tmp_path / "w.pt")
    images = random_images(40, seed=12, hi=400)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Encoder.from_open_clip(
            "tiny-clip", weights=checkpoint, device="cuda", precision=precision
        ) as gpu:
            got = gpu.embed(images)
            text = gpu.embed_text(TEXTS)
    floor = MIN_COS if precision == "fp32" else FP16_MIN_COS
    want = open_clip_image_embeds(model, [Image.fromarray(a) for a in images])
    assert cosines(got, want).min() >= floor
    assert cosines(text, open_clip_text_embeds(model, TEXTS)).min() >= floor


@pytest.mark.tensorrt
def test_tensorrt_plan_matches_open_clip(tiny, tmp_path):
    model, _ = tiny
    checkpoint = tiny_models.save_checkpoint(model, tmp_path / "w.pt")
    nf.export("tiny-clip", tmp_path / "t.plan", weights=checkpoint, max_batch=MAX_BATCH, quiet=True)
    images = random_images(20, seed=13, hi=300)
    with Encoder(tmp_path / "t.plan") as enc:
        assert enc.device == "cuda:0"
        got = enc.embed(images)
        text = enc.embed_text(TEXTS)
    # The exporter's gate for fp32 engines: TensorRT picks other kernels than torch.
    assert cosines(got, open_clip_image_embeds(model, [Image.fromarray(a) for a in images])).min() >= 0.9999
    assert cosines(text, open_clip_text_embeds(model, TEXTS)).min() >= 0.9999


@pytest.mark.gpu
def test_onnx_runtime_cuda_provider_matches_open_clip(tiny):
    from nvclip_fast.engines import cuda_provider_available

    if not cuda_provider_available():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (needs onnxruntime-gpu)")
    model, onnx_path = tiny
    images = random_images(20, seed=16, hi=300)
    with Encoder(onnx_path, device="cuda") as enc:
        got = enc.embed(images)
    assert cosines(got, open_clip_image_embeds(model, [Image.fromarray(a) for a in images])).min() >= MIN_COS


def test_stale_sidecar_is_refused(tiny, tmp_path):
    _, onnx_path = tiny
    for path in onnx_path.parent.iterdir():
        shutil.copy(path, tmp_path / path.name)
    sidecar = json.loads((tmp_path / "tiny.json").read_text())
    sidecar["embed_dim"] = 64
    for tower in sidecar["towers"].values():
        tower["output"]["shape"][1] = 64
    (tmp_path / "tiny.json").write_text(json.dumps(sidecar))
    with pytest.raises(nf.EngineError, match=r"does not describe .*-> 64-d, the engine takes 32 px -> 32-d"):
        Encoder(tmp_path / "tiny.onnx", device="cpu")


def test_fixed_batch_onnx_is_padded(tiny, tmp_path):
    onnx = pytest.importorskip("onnx")
    _, onnx_path = tiny
    model = onnx.load(str(onnx_path))  # external data loaded too
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1  # as an export with a batch-1 example gives
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, str(fixed))
    images = random_images(3, seed=14)
    with pytest.warns(UserWarning, match="no sidecar"):
        enc = Encoder(fixed, device="cpu")
    with enc, Encoder(onnx_path, device="cpu") as dynamic:
        assert enc.max_batch == 1
        np.testing.assert_allclose(enc.embed(images), dynamic.embed(images), atol=ROW_ATOL)


@pytest.mark.filterwarnings("ignore:an image of shape")  # (1, 1000, 3) reads either way
def test_preprocessing_refusal_names_the_callers_index():
    # open_clip's 'longest' resize rounds a 1 x 1000 image's height to 0 pixels and fails: so do we,
    # for that image only, naming its index among the caller's items (after a decode failure).
    spec = nf.PreprocessSpec(size=8, resize_mode="longest")
    white = (1.0 - spec.mean[0]) / spec.std[0]
    thin, ok = np.zeros((1, 1000, 3), np.uint8), np.full((8, 8, 3), 10, np.uint8)
    with Encoder.from_engine(MarkerEngine(spec, white), spec, max_batch=2) as enc:
        got = enc.embed([ok, b"not an image", thin, ok], on_error="nan", normalize=False)
        assert np.isnan(got).all(axis=1).tolist() == [False, True, True, False]
        with pytest.raises(ItemError, match=r"images\[2\]: a 1x1000 image resizes to 0x8") as info:
            enc.embed([ok, ok, thin])
        assert info.value.index == 2


def test_a_failure_while_finishing_reaches_the_caller(encoder, monkeypatch):
    from nvclip_fast import encoder as encoder_module

    def broken(x):
        raise RuntimeError("finishing failed")

    monkeypatch.setattr(encoder_module, "l2_normalize", broken)
    future = encoder.submit(random_images(2, seed=15))
    with pytest.raises(RuntimeError, match="finishing failed"):
        future.result(timeout=TIMEOUT_S)  # an exception, never a Future left pending
