"""The CPU engines of an ONNX bundle: ONNX Runtime and OpenVINO in fp32 (exact with open_clip), OpenVINO
in bf16 (checked against fp32 at load), the rule that picks one, and every refusal.

The reference is open_clip itself: its model from the same checkpoint, its Pillow transform, its
tokenizer. bf16 tests skip, with the reason, on a CPU without native bf16 arithmetic.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("onnxruntime")

from PIL import Image  # noqa: E402

import nvclip_fast as nf  # noqa: E402
import tiny_models  # noqa: E402
from nvclip_fast import bundle, cli, engines  # noqa: E402
from nvclip_fast._C import EngineError  # noqa: E402

# fp32 engines equal open_clip's pipeline to float32 summation order (preprocessing is bit-exact).
MIN_COS_FP32 = 0.99999
# bf16 keeps 8 bits of mantissa: the bar the Encoder itself holds bf16 towers to at load.
MIN_COS_BF16 = engines.BF16_MIN_COSINE
# bf16 rows move by about 2^-8 of their largest entries; fp32 engines agree to ~1e-7. A bf16 run
# whose rows sit closer than this to fp32's did not run in bf16.
BF16_MIN_DIFF = 1e-4
MAX_BATCH = 8
TEXTS = ["a photo of a cat", "", "a diagram, with arrows!", "two dogs " * 40]

OPENVINO_SKIP = None if engines.openvino_installed() else "openvino is not installed (nvclip-fast[openvino])"
BF16_SKIP = OPENVINO_SKIP or engines.cpu_bf16_unavailable_reason()
needs_openvino = pytest.mark.skipif(OPENVINO_SKIP is not None, reason=str(OPENVINO_SKIP))
needs_bf16 = pytest.mark.skipif(BF16_SKIP is not None, reason=str(BF16_SKIP))
# Every engine x precision a CPU bundle runs in, and the cosine it keeps to open_clip.
ENGINE_PRECISIONS = [
    pytest.param("onnxruntime", "fp32", MIN_COS_FP32, id="onnxruntime-fp32"),
    pytest.param("openvino", "fp32", MIN_COS_FP32, marks=needs_openvino, id="openvino-fp32"),
    pytest.param("openvino", "bf16", MIN_COS_BF16, marks=needs_bf16, id="openvino-bf16"),
]
# How OpenVINO names the arithmetic of its compiled layers.
RUNTIME_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def open_clip_image_embeds(model: torch.nn.Module, images: list[np.ndarray]) -> np.ndarray:
    """open_clip's own pipeline: its eval transform on PIL images, then encode_image."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
    transform = image_transform_v2(cfg, is_train=False)
    with torch.no_grad():
        x = torch.stack([transform(Image.fromarray(a)) for a in images])
        return model.encode_image(x, normalize=True).numpy()


def open_clip_text_embeds(model: torch.nn.Module, name: str, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        return model.encode_text(open_clip.get_tokenizer(name)(texts), normalize=True).numpy()


def random_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (int(rng.integers(8, 120)), int(rng.integers(8, 120)), 3), dtype=np.uint8)
        for _ in range(n)
    ]


def check_runs_in(encoder: nf.Encoder, precision: str) -> None:
    """What OpenVINO compiled for the Encoder's towers (the text tower once made): every matrix layer
    in ``precision``, whatever was asked."""
    want = RUNTIME_PRECISION[precision]
    for engine in (*encoder._towers.images, encoder._text_engine):  # the engines the Encoder runs
        assert isinstance(engine, engines.OpenVinoEngine)
        counts = engine.runtime_precisions()
        assert set(counts) == {want}, counts
        assert counts[want] > 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny-clip (32 px, CLIP BPE, 2 layers) exported to ONNX: (open_clip model, path of tiny.onnx)."""
    tmp = tmp_path_factory.mktemp("tiny_cpu")
    model = tiny_models.random_model("tiny-clip", seed=11)
    checkpoint = tiny_models.save_checkpoint(model, tmp / "tiny.pt")
    nf.export("tiny-clip", tmp / "tiny.onnx", weights=checkpoint, max_batch=MAX_BATCH, quiet=True)
    return model, tmp / "tiny.onnx"


@pytest.fixture(scope="module")
def fp32_rows(tiny):
    """The tiny bundle's image and text rows from OpenVINO in fp32, for the bf16 tests."""
    if OPENVINO_SKIP:
        pytest.skip(OPENVINO_SKIP)
    images = random_images(13, seed=2)
    with nf.Encoder(tiny[1], device="cpu", engine="openvino", precision="fp32") as enc:
        return images, enc.embed(images), enc.embed_text(TEXTS)


# --- parity, every engine x precision --------------------------------------------------------------


@pytest.mark.parametrize(("engine", "precision", "min_cos"), ENGINE_PRECISIONS)
def test_tiny_matches_open_clip(tiny, engine, precision, min_cos):
    model, onnx_path = tiny
    images = random_images(13, seed=2)  # more than a batch, an odd last batch
    with nf.Encoder(onnx_path, device="cpu", engine=engine, precision=precision, threads=2) as enc:
        assert (enc.engine, enc.precision) == (engine, precision)
        assert f"engine={engine!r}, precision={precision!r}" in repr(enc)
        got_images, got_texts = enc.embed(images), enc.embed_text(TEXTS)
        got_one = enc.embed(images[:1])  # a batch smaller than OpenVINO's streams
        if engine == "openvino":
            check_runs_in(enc, precision)
    assert cosines(got_images, open_clip_image_embeds(model, images)).min() >= min_cos
    assert cosines(got_texts, open_clip_text_embeds(model, "tiny-clip", TEXTS)).min() >= min_cos
    assert cosines(got_one, got_images[:1]).min() >= min_cos  # the same row, alone or in a batch


@needs_bf16
def test_bf16_really_differs_from_fp32(tiny, fp32_rows):
    images, fp32_images, fp32_texts = fp32_rows
    with nf.Encoder(tiny[1], device="cpu", precision="bf16") as enc:
        bf16_images, bf16_texts = enc.embed(images), enc.embed_text(TEXTS)
    for bf16, fp32 in ((bf16_images, fp32_images), (bf16_texts, fp32_texts)):
        assert np.abs(bf16 - fp32).max() > BF16_MIN_DIFF  # bf16 arithmetic happened
        assert cosines(bf16, fp32).min() >= MIN_COS_BF16


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "precision", "min_cos"), ENGINE_PRECISIONS)
def test_vit_s_32_matches_open_clip_on_photos(vits32, engine, precision, min_cos):
    skimage_data = pytest.importorskip("skimage.data")
    onnx_path, checkpoint = vits32
    reference = open_clip.create_model("ViT-S-32", pretrained=str(checkpoint)).eval()
    photos = [getattr(skimage_data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")]
    images = [*photos, *random_images(5, seed=3)]
    with nf.Encoder(onnx_path, device="cpu", engine=engine, precision=precision) as enc:
        got_images, got_texts = enc.embed(images), enc.embed_text(TEXTS)
        if engine == "openvino":
            check_runs_in(enc, precision)
    assert cosines(got_images, open_clip_image_embeds(reference, images)).min() >= min_cos
    assert cosines(got_texts, open_clip_text_embeds(reference, "ViT-S-32", TEXTS)).min() >= min_cos


# --- the rule that picks the CPU engine --------------------------------------------------------------


def test_auto_rule(monkeypatch):
    on_x86 = engines.openvino_installed() and engines._openvino_on_x86_64()
    assert engines.cpu_engine_name("auto", "fp32") == ("openvino" if on_x86 else "onnxruntime")
    assert engines.cpu_engine_name("auto", "fp16") == "onnxruntime"  # where the exporter checked it
    assert engines.cpu_engine_name("auto", "bf16") == "openvino"
    assert engines.cpu_engine_name("onnxruntime", "fp32") == "onnxruntime"
    assert engines.cpu_engine_name("openvino", "fp32") == "openvino"
    monkeypatch.setattr(engines, "openvino_installed", lambda: False)
    assert engines.cpu_engine_name("auto", "fp32") == "onnxruntime"


def test_rule_refusals():
    with pytest.raises(ValueError, match="ONNX Runtime's CPU provider has no bf16"):
        engines.cpu_engine_name("onnxruntime", "bf16")
    with pytest.raises(ValueError, match="this one was exported in fp16"):
        engines.cpu_engine_name("openvino", "fp16")
    with pytest.raises(ValueError, match=r"engine must be one of \['auto', 'onnxruntime', 'openvino'\]"):
        engines.cpu_engine_name("tensorrt", "fp32")


def test_default_engine_runs_in_fp32(tiny):
    # OpenVINO would run an fp32 model in bf16 by itself on a CPU with native bf16: the default
    # (exact) path must not.
    with nf.Encoder(tiny[1], device="cpu") as enc:
        assert (enc.engine, enc.precision) == (engines.cpu_engine_name("auto", "fp32"), "fp32")
        enc.embed_text(TEXTS)  # makes the text tower
        if enc.engine == "openvino":
            check_runs_in(enc, "fp32")


# --- refusals ---------------------------------------------------------------------------------------


def test_precision_and_engine_refusals(tiny, tmp_path):
    _, onnx_path = tiny
    with pytest.raises(ValueError, match=r"exported in fp32: it runs in fp32"):
        nf.Encoder(onnx_path, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match=r"precision must be one of \['bf16', 'fp16', 'fp32'\], got 'int8'"):
        nf.Encoder(onnx_path, device="cpu", precision="int8")
    with pytest.raises(ValueError, match="engine must be one of"):
        nf.Encoder(onnx_path, device="cpu", engine="torch")
    with pytest.raises(ValueError, match="no bf16 arithmetic"):
        nf.Encoder(onnx_path, device="cpu", engine="onnxruntime", precision="bf16")
    # bf16 is a CPU path: never on a GPU device, never for a TensorRT plan.
    with pytest.raises(ValueError, match="run on the CPU: use device='cpu'"):
        nf.Encoder(onnx_path, device="cuda", precision="bf16")
    with pytest.raises(ValueError, match="run on the CPU: use device='cpu'"):
        nf.Encoder(onnx_path, device="cuda:0", engine="openvino")
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"")
    with pytest.raises(ValueError, match="a TensorRT plan runs on TensorRT in the precision it was exported"):
        nf.Encoder(plan, precision="bf16")
    with pytest.raises(ValueError, match="a TensorRT plan runs on TensorRT"):
        nf.Encoder(plan, engine="onnxruntime")


def test_an_onnx_engine_named_runs_the_onnx_beside_a_plan(tiny, tmp_path, monkeypatch):
    # A bundle named by its stem, with a plan beside its ONNX towers, where TensorRT would run: the
    # engine= named (ONNX Runtime or OpenVINO) runs the .onnx; "auto" would pick the plan.
    for f in tiny[1].parent.iterdir():
        if f.suffix != ".pt":
            shutil.copy(f, tmp_path / f.name)
    (tmp_path / "tiny.plan").write_bytes(b"not a plan")
    monkeypatch.setattr(bundle, "tensorrt_unavailable_reason", lambda device: None)
    engines_named = ["onnxruntime"] + ([] if OPENVINO_SKIP else ["openvino"])
    for engine in engines_named:
        with nf.Encoder(tmp_path / "tiny", engine=engine) as enc:
            assert (enc.engine, enc.device) == (engine, "cpu")
    with pytest.raises(EngineError):  # "auto" takes the plan (not one here: refused when read)
        nf.Encoder(tmp_path / "tiny", device="auto")


@needs_bf16
def test_a_text_tower_refused_in_bf16_is_not_checked_again(tiny, monkeypatch):
    checked = []
    real_check = bundle.check_bf16

    def check(engine, path, inputs, **kw):
        if "text" in Path(path).name:
            checked.append(path)
            raise EngineError(f"{path}: bf16 cosine to fp32 too low (stand-in)")
        return real_check(engine, path, inputs, **kw)

    monkeypatch.setattr(bundle, "check_bf16", check)
    with nf.Encoder(tiny[1], device="cpu", precision="bf16") as enc:
        for _ in range(2):
            with pytest.raises(EngineError, match="stand-in"):
                enc.embed_text(["a cat"])
    assert len(checked) == 1


class _CoreWithout:
    """OpenVINO's Core, but its CPU lists no native bf16 among its capabilities."""

    def __init__(self, core):
        self._core = core

    def get_property(self, device, name):
        value = self._core.get_property(device, name)
        return [c for c in value if c != "BF16"] if name == "OPTIMIZATION_CAPABILITIES" else value

    def __getattr__(self, name):
        return getattr(self._core, name)


@needs_openvino
def test_bf16_refused_without_native_bf16(tiny, monkeypatch):
    without = _CoreWithout(engines.openvino_core())
    monkeypatch.setattr(engines, "openvino_core", lambda: without)
    with pytest.raises(nf.EngineError, match=r"this CPU has no native bf16 arithmetic \(OpenVINO's CPU"):
        nf.Encoder(tiny[1], device="cpu", precision="bf16")
    with nf.Encoder(tiny[1], device="cpu", engine="openvino") as enc:  # fp32 still runs
        assert enc.precision == "fp32"


@needs_bf16
def test_bf16_refused_when_too_far_from_fp32(tiny, monkeypatch):
    # A bar no bf16 run can reach stands for a model bf16 damages: refused, with the number.
    monkeypatch.setattr(engines, "BF16_MIN_COSINE", 1.5)
    with pytest.raises(nf.EngineError, match=r"in bf16 is too far from fp32 .* lowest cosine 0\.9\d+ < 1\.5"):
        nf.Encoder(tiny[1], device="cpu", precision="bf16")


def test_openvino_errors(tmp_path, monkeypatch):
    if OPENVINO_SKIP is None:
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"not an onnx file")
        with pytest.raises(nf.EngineError, match="OpenVINO cannot load"):
            engines.OpenVinoEngine(bad)
    monkeypatch.setitem(sys.modules, "openvino", None)  # as where it is not installed
    engines.openvino_core.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install 'nvclip-fast\[openvino\]'"):
            engines.openvino_core()
        assert "nvclip-fast[openvino]" in engines.cpu_bf16_unavailable_reason()
    finally:
        engines.openvino_core.cache_clear()


def test_bf16_check_images_are_built_in_and_varied():
    first, again = engines.bf16_check_images(), engines.bf16_check_images()
    assert len(first) == 4
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)  # the same inputs on every load, every machine
        assert a.shape == (*engines.BF16_CHECK_IMAGE_HW, 3)
        assert a.dtype == np.uint8
        assert a.std() > 20  # not a flat image


@needs_openvino
def test_threads_reach_openvino_unpinned(tiny):
    with nf.Encoder(tiny[1], device="cpu", engine="openvino", threads=1) as enc:
        assert enc._towers.images[0]._compiled.get_property("INFERENCE_NUM_THREADS") == 1
    with nf.Encoder(tiny[1], device="cpu,cpu", engine="openvino", threads=3) as enc:  # replicas share them
        assert [e._compiled.get_property("INFERENCE_NUM_THREADS") for e in enc._towers.images] == [2, 1]
        # Unpinned: pinned, every replica's threads would start from the same core.
        assert [e._compiled.get_property("ENABLE_CPU_PINNING") for e in enc._towers.images] == [False, False]


# --- how to open the same model again --------------------------------------------------------------


@needs_bf16
def test_bf16_is_in_the_source_and_reopens_in_bf16(tiny):
    from nvclip_fast.collection import open_encoder

    with nf.Encoder(tiny[1], device="cpu", precision="bf16") as enc:
        assert enc.source == {"bundle": str(tiny[1].with_suffix(".json").resolve()), "precision": "bf16"}
        with open_encoder(enc.source, device="cpu") as again:
            assert (again.engine, again.precision) == ("openvino", "bf16")
    with nf.Encoder(tiny[1], device="cpu") as exact:
        assert "precision" not in exact.source  # as exported


@needs_bf16
@pytest.mark.filterwarnings("ignore::nvclip_fast.metadata.RandomWeightsWarning")
def test_from_pretrained_bf16_and_engine():
    kwargs = {"random_weights": True, "device": "cpu", "progress": False}
    with nf.Encoder.from_pretrained("tiny-clip", precision="bf16", **kwargs) as enc:
        assert (enc.engine, enc.precision) == ("openvino", "bf16")
        assert enc.source["precision"] == "bf16"  # reopened by from_pretrained(**source): bf16 again
        bf16 = enc.embed(random_images(3, seed=9))
    with nf.Encoder.from_pretrained("tiny-clip", engine="onnxruntime", **kwargs) as enc:
        assert (enc.engine, enc.precision) == ("onnxruntime", "fp32")
        assert enc.source["precision"] == "fp32"
        assert cosines(bf16, enc.embed(random_images(3, seed=9))).min() >= MIN_COS_BF16  # one fp32 bundle
    with pytest.raises(ValueError, match="run on the CPU"):
        nf.Encoder.from_pretrained("tiny-clip", precision="bf16", random_weights=True, device="cuda")


# --- the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(("engine", "precision", "min_cos"), ENGINE_PRECISIONS)
def test_cli_embed_engine_and_precision(tiny, tmp_path, capsys, engine, precision, min_cos):
    model, onnx_path = tiny
    images = random_images(3, seed=5)
    paths = []
    for k, a in enumerate(images):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(a).save(paths[-1])
    out = tmp_path / "e.npy"
    argv = ["embed", *map(str, paths), "-m", str(onnx_path), "-o", str(out), "--no-progress"]
    assert cli.main([*argv, "--device", "cpu", "--engine", engine, "--precision", precision]) == cli.EXIT_OK
    assert f"on {engine} {precision}, cpu)" in capsys.readouterr().err  # the summary says what ran
    assert cosines(np.load(out), open_clip_image_embeds(model, images)).min() >= min_cos


@needs_openvino
def test_cli_classify_says_what_ran(tiny, tmp_path, capsys):
    _, onnx_path = tiny
    image = tmp_path / "a.png"
    Image.fromarray(random_images(1, seed=6)[0]).save(image)
    argv = ["classify", str(image), "-m", str(onnx_path), "--labels", "cat,dog", "--no-progress"]
    assert cli.main([*argv, "--device", "cpu", "--engine", "openvino"]) == cli.EXIT_OK
    out, err = capsys.readouterr()
    assert out.startswith(f"{image}\t")
    assert "on openvino fp32, cpu)" in err


def test_cli_refusals_exit_2(tiny, tmp_path, capsys):
    _, onnx_path = tiny
    out = tmp_path / "e.npy"
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)  # the inputs are listed before the model is opened
    argv = ["embed", str(image), "-m", str(onnx_path), "-o", str(out), "--no-progress"]
    assert cli.main([*argv, "--engine", "onnxruntime", "--precision", "bf16"]) == cli.EXIT_USAGE
    assert "no bf16 arithmetic" in capsys.readouterr().err
    assert cli.main([*argv, "--precision", "fp16"]) == cli.EXIT_USAGE  # a bundle's is fixed at export
    assert "--precision fp16 and --image-size go with a model name" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not a choice
        cli.main([*argv, "--engine", "tensorrt"])
