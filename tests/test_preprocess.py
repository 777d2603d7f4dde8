"""nvclip_fast.preprocess and PreprocessSpec: every accepted input kind, the errors, out=, and the
PIL modes open_clip resizes in their own mode (exact too, through Pillow)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import nvclip_fast as nf
from nvclip_fast import _C
from nvclip_fast.preprocess import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, pass_order_for_pillow
from preprocess_reference import SKIMAGE_DATA, assert_exact, noise, photos

SPEC = nf.PreprocessSpec(size=224)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return noise(np.random.default_rng(10), 97, 131, 3)


@pytest.fixture(scope="module")
def expected(rgb) -> np.ndarray:
    return nf.preprocess([rgb], SPEC)[0]


# ---- PreprocessSpec -------------------------------------------------------------------------


def test_spec_defaults_are_open_clips():
    from open_clip.transform import PreprocessCfg

    cfg = PreprocessCfg()
    spec = nf.PreprocessSpec(size=cfg.size)
    assert (spec.mean, spec.std) == (tuple(cfg.mean), tuple(cfg.std))
    assert (spec.interpolation, spec.resize_mode, spec.fill) == (
        cfg.interpolation,
        cfg.resize_mode,
        cfg.fill_color,
    )
    assert (spec.mean, spec.std) == (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def test_spec_from_sidecar_dict():
    sidecar = json.loads(
        '{"preprocess": {"size": 336, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],'
        ' "interpolation": "bilinear", "resize_mode": "squash", "fill": 0}}'
    )
    spec = nf.PreprocessSpec(**sidecar["preprocess"])
    assert spec.mean == (0.5, 0.5, 0.5)
    assert spec.size == 336
    assert spec.resize_mode == "squash"
    assert hash(spec) == hash(nf.PreprocessSpec(**sidecar["preprocess"]))


def test_spec_from_open_clip_model_and_cfg():
    from open_clip.transform import PreprocessCfg

    class Visual:
        preprocess_cfg = {  # noqa: RUF012  (what open_clip stores on model.visual)
            "size": (336, 336),
            "mode": "RGB",
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "interpolation": "bilinear",
            "resize_mode": "squash",
            "fill_color": 0,
        }

    class Model:
        visual = Visual()

    spec = nf.PreprocessSpec.from_open_clip(Model())
    assert spec == nf.PreprocessSpec(
        size=336,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        interpolation="bilinear",
        resize_mode="squash",
    )
    assert nf.PreprocessSpec.from_open_clip(PreprocessCfg(size=224)) == nf.PreprocessSpec(size=224)
    assert nf.PreprocessSpec.from_open_clip({"size": 224}, pass_order="pillow12.1").pass_order == "pillow12.1"
    with pytest.raises(ValueError, match="only square"):
        nf.PreprocessSpec.from_open_clip({"size": (224, 336)})


def test_spec_from_real_open_clip_model():
    open_clip = pytest.importorskip("open_clip")
    model = open_clip.create_model("RN50", pretrained=None)  # random weights, no download
    spec = nf.PreprocessSpec.from_open_clip(model)
    assert spec == nf.PreprocessSpec(size=224)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"size": 0}, "size must be a positive int"),
        ({"size": 224.0}, "size must be a positive int"),
        ({"size": 224, "mean": (0.5, 0.5)}, "mean must have 3 values"),
        ({"size": 224, "std": (0.5, 0.0, 0.5)}, "std must be non-zero"),
        ({"size": 224, "std": (0.5, float("nan"), 0.5)}, "std must be finite"),
        ({"size": 224, "interpolation": "lanczos"}, "interpolation must be one of"),
        ({"size": 224, "resize_mode": "crop"}, "resize_mode must be one of"),
        ({"size": 224, "fill": 256}, "fill must be in 0..255"),
        ({"size": 224, "pass_order": "pillow9"}, "pass_order must be one of"),
    ],
)
def test_spec_rejects_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        nf.PreprocessSpec(**fields)


def test_scalar_mean_std_like_open_clip():
    assert nf.PreprocessSpec(size=8, mean=0.5, std=0.25).std == (0.25, 0.25, 0.25)


def test_pass_order_follows_pillow_version():
    import PIL

    assert pass_order_for_pillow("13.0.0") == "pillow13"
    assert pass_order_for_pillow("13.1.0.dev0") == "pillow13"
    assert pass_order_for_pillow("12.3.0") == "pillow12.2"
    assert pass_order_for_pillow("12.2.0") == "pillow12.2"
    assert pass_order_for_pillow("12.1.1") == "pillow12.1"
    assert pass_order_for_pillow("10.4.0") == "pillow12.1"
    assert nf.PreprocessSpec(size=8).pass_order == pass_order_for_pillow(PIL.__version__)


# ---- inputs ---------------------------------------------------------------------------------


def test_every_input_kind_gives_the_same_pixels(rgb, expected, tmp_path):
    torch = pytest.importorskip("torch")
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    path = tmp_path / "image.png"
    path.write_bytes(png.getvalue())
    padded = np.zeros((rgb.shape[0], rgb.shape[1] + 5, 3), np.uint8)
    padded[:, : rgb.shape[1]] = rgb
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])  # opaque: the same pixels
    kinds = {
        "numpy": rgb,
        "numpy rows padded": padded[:, : rgb.shape[1]],
        "numpy non-contiguous": np.ascontiguousarray(rgb[::-1, ::-1])[::-1, ::-1],
        "numpy RGBA": rgba,
        "PIL RGB": Image.fromarray(rgb),
        "PIL RGBA opaque": Image.fromarray(rgb).convert("RGBA"),  # premultiplying by 255 changes nothing
        "path str": str(path),
        "path Path": path,
        "bytes": png.getvalue(),
        "bytearray": bytearray(png.getvalue()),
        "torch CPU (C, H, W)": torch.from_numpy(rgb).permute(2, 0, 1).contiguous(),
        "torch CPU (C, H, W) view": torch.from_numpy(rgb).permute(2, 0, 1),
        "torch CPU transposed view": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 1, 0))).permute(
            0, 2, 1
        ),
    }
    out = nf.preprocess(list(kinds.values()), SPEC)
    for (name, _), got in zip(kinds.items(), out, strict=True):
        assert np.array_equal(got, expected), name


def test_gray_inputs_equal_open_clip_on_L_images():
    gray = noise(np.random.default_rng(11), 150, 90, 1)
    kinds = [gray, gray[:, :, None], Image.fromarray(gray), np.ascontiguousarray(gray.T).T]
    out = nf.preprocess(kinds, SPEC)
    for got in out:
        assert_exact(SPEC, got, Image.fromarray(gray), "gray")


def test_batch_array_and_tuple(rgb, expected):
    out = nf.preprocess(np.stack([rgb, rgb]), SPEC)
    assert np.array_equal(out[1], expected)
    assert np.array_equal(nf.preprocess((rgb,), SPEC)[0], expected)
    assert nf.preprocess([], SPEC).shape == (0, 3, 224, 224)


def test_files_decode_as_open_clip_opens_them():
    # JPEG (rocket.jpg, hubble_deep_field.jpg), gray PNG (camera.png): transform(Image.open(f)) exactly.
    spec = nf.PreprocessSpec(size=336)
    files = [SKIMAGE_DATA / n for n in ("rocket.jpg", "hubble_deep_field.jpg", "camera.png")]
    out = nf.preprocess(files, spec)
    for f, got in zip(files, out, strict=True):
        with Image.open(f) as image:
            assert_exact(spec, got, image, f.name)


def test_out_equals_allocating_form(rgb, expected):
    out = np.full((2, 3, 224, 224), np.nan, np.float32)
    result = nf.preprocess([rgb, rgb], SPEC, out=out)
    assert result is out
    assert np.array_equal(out[0], expected)
    assert np.array_equal(out[1], expected)
    out16 = np.empty((1, 3, 224, 224), np.float16)
    assert np.array_equal(
        nf.preprocess([rgb], SPEC, dtype="float16", out=out16)[0], expected.astype(np.float16)
    )


def test_torch_is_not_imported_for_numpy_inputs():
    code = (
        "import sys, numpy as np, nvclip_fast as nf\n"
        "nf.preprocess([np.zeros((5, 7, 3), np.uint8), sys.argv[1]], nf.PreprocessSpec(size=8))\n"
        "print('torch' in sys.modules)\n"
    )
    png = str(SKIMAGE_DATA / "camera.png")
    result = subprocess.run([sys.executable, "-c", code, png], check=True, capture_output=True, text=True)
    assert result.stdout.strip() == "False"


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (np.zeros((5, 5, 3), np.float32), ValueError, r"images\[1\]: expected uint8 pixels, got float32"),
        (np.zeros((5, 5, 5), np.uint8), ValueError, r"images\[1\]: expected 1, 3 or 4 channels, got 5"),
        (
            np.zeros((5, 5, 3, 1), np.uint8),
            ValueError,
            r"images\[1\]: expected an \(H, W\) or \(H, W, C\) image",
        ),
        (np.zeros((0, 5, 3), np.uint8), ValueError, r"images\[1\]: image is empty \(0x5\)"),
        (np.zeros((5, 0), np.uint8), ValueError, r"images\[1\]: image is empty \(5x0\)"),
        (b"not an image", ValueError, r"images\[1\]: cannot decode 12 bytes of image data"),
        (
            "/nonexistent/image.jpg",
            ValueError,
            r"images\[1\]: cannot decode image file '/nonexistent/image.jpg'",
        ),
        (42, TypeError, r"images\[1\]: unsupported image type int"),
        (Image.new("La", (4, 4)), ValueError, r"images\[1\]: cannot transform the image \(mode 'La'\)"),
    ],
)
def test_bad_items_name_their_index(bad, error, message):
    with pytest.raises(error, match=message):
        nf.preprocess([np.zeros((5, 5, 3), np.uint8), bad], SPEC)


def test_truncated_jpeg_names_its_index():
    with open(SKIMAGE_DATA / "rocket.jpg", "rb") as f:
        data = f.read()
    with pytest.raises(ValueError, match=r"images\[0\]: cannot decode"):
        nf.preprocess([data[: len(data) // 2]], SPEC)


def test_bad_torch_tensor_names_its_index():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"images\[0\]: expected uint8 pixels, got torch.float32"):
        nf.preprocess([torch.zeros(3, 4, 4)], SPEC)


def test_decode_image_errors_can_be_collected_per_item():
    items = [np.zeros((5, 5, 3), np.uint8), b"junk", np.zeros((4, 4), np.float64), np.zeros((6, 6), np.uint8)]
    good, errors = [], {}
    for i, item in enumerate(items):
        try:
            good.append(nf.decode_image(item, i))
        except (ValueError, TypeError) as e:
            errors[i] = str(e)
    assert [g.shape for g in good] == [(5, 5, 3), (6, 6)]
    assert sorted(errors) == [1, 2]
    assert errors[2].startswith("images[2]: expected uint8")


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((5, 5, 3), np.uint8), r"an array of shape \(5, 5, 3\) is not a batch"),
        ("image.jpg", "images must be a sequence of images, got str"),
        (b"\x89PNG", "images must be a sequence of images, got bytes"),
        (Image.new("RGB", (4, 4)), "images must be a sequence of images, got Image"),
        (7, "images must be a sequence of images, got int"),
    ],
)
def test_single_image_is_not_a_batch(images, message):
    with pytest.raises(TypeError, match=message):
        nf.preprocess(images, SPEC)


def test_bad_arguments(rgb):
    with pytest.raises(ValueError, match="threads must be None"):
        nf.preprocess([rgb], SPEC, threads=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        nf.preprocess([rgb], SPEC, dtype="int8")
    with pytest.raises(TypeError, match="spec must be a PreprocessSpec"):
        nf.preprocess([rgb], {"size": 224})
    with pytest.raises(ValueError, match=r"out must have shape \(1, 3, 224, 224\) and dtype float32"):
        nf.preprocess([rgb], SPEC, out=np.empty((1, 3, 224, 223), np.float32))
    with pytest.raises(ValueError, match="out must have shape"):
        nf.preprocess([rgb], SPEC, out=np.empty((1, 3, 224, 224), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        nf.preprocess([rgb], SPEC, out=np.empty((1, 3, 224, 448), np.float32)[..., ::2])
    with pytest.raises(ValueError, match="device must be 'cpu' or a CUDA device"):
        nf.preprocess([rgb], SPEC, device="mps")
    if not nf.cuda_available():
        with pytest.raises(nf.EngineError, match="CUDA"):
            nf.preprocess([rgb], SPEC, device="cuda")


def test_native_layer_refuses_what_it_cannot_read():
    # preprocess() always passes packed arrays; the binding still checks, so that no layout can make
    # native code read out of bounds.
    params, f32 = SPEC._params, _C.OutputDType.float32
    out = np.empty((1, 3, 224, 224), np.float32)
    cases = [
        (np.zeros((4, 4, 3), np.uint8)[:, ::2], "pixels must be packed"),
        (np.zeros((4, 4, 3), np.uint8)[::-1], "row stride -12 is smaller than a row"),
        (np.zeros((4, 4, 2), np.uint8), r"expected 1 \(gray\) or 3 \(RGB\) channels, got 2"),
        (np.zeros((4, 4, 3), np.int8), "expected uint8 pixels"),
        (np.zeros((0, 4, 3), np.uint8), r"image is empty \(0x4\)"),
    ]
    for array, message in cases:
        with pytest.raises(ValueError, match=r"images\[0\]: " + message):
            _C.resize_normalize([array], params, f32, out, 1)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 3, 224, 224\)"):
        _C.resize_normalize([np.zeros((4, 4, 3), np.uint8)] * 2, params, f32, out, 1)


# ---- PIL modes open_clip resizes in their own mode ------------------------------------------


def _mode_inputs() -> dict[str, list[Image.Image]]:
    ph = photos()
    astronaut, coffee = Image.fromarray(ph["astronaut"]), Image.fromarray(ph["coffee"])
    h, w = ph["astronaut"].shape[:2]
    ramp = np.linspace(0, 255, w).astype(np.uint8)[None, :].repeat(h, 0)
    return {
        "RGBA, opaque": [astronaut.convert("RGBA"), Image.open(SKIMAGE_DATA / "logo.png")],
        "RGBA, varying alpha": [Image.fromarray(np.dstack([ph["astronaut"], ramp]))],
        "LA, varying alpha": [Image.fromarray(np.dstack([ph["camera"], ramp]), "LA")],
        "P (palette)": [
            astronaut.quantize(256),
            coffee.quantize(256),
            Image.open(SKIMAGE_DATA / "no_time_for_that_tiny.gif"),
        ],
        "1 (bilevel)": [astronaut.convert("1")],
        "CMYK": [astronaut.convert("CMYK"), coffee.convert("CMYK")],
        "YCbCr": [astronaut.convert("YCbCr")],
        "I;16": [Image.fromarray(ph["camera"].astype(np.uint16) * 257)],
    }


MODE_SPECS = (
    nf.PreprocessSpec(size=224),
    nf.PreprocessSpec(size=336, resize_mode="squash", interpolation="bilinear"),
    nf.PreprocessSpec(size=224, resize_mode="longest", fill=77),  # pads, in the image's own mode
)


@pytest.mark.parametrize("spec", MODE_SPECS, ids=lambda s: f"{s.resize_mode}-{s.size}")
def test_every_pil_mode_is_exact(spec):
    # open_clip resizes these in their own mode (NEAREST for P and 1, premultiplied RGBA/LA, CMYK,
    # YCbCr and 16-bit in their own space) and converts afterwards; decoding with the spec does
    # the same through Pillow, so the result is open_clip's bit for bit.
    for mode, images in _mode_inputs().items():
        ours = nf.preprocess(images, spec)
        for k, (image, got) in enumerate(zip(images, ours, strict=True)):
            assert_exact(spec, got, image, f"{mode} #{k}")


def test_rgba_arrays_are_rgba_images():
    rgba = noise(np.random.default_rng(12), 90, 70, 4)
    got = nf.preprocess([rgba], SPEC)[0]
    assert_exact(SPEC, got, Image.fromarray(rgba, "RGBA"), "RGBA array")


def test_without_spec_other_modes_are_converted_first():
    # decode_image alone (no spec) only converts to RGB: alpha dropped, as convert("RGB") does.
    rgba = noise(np.random.default_rng(13), 9, 7, 4)
    np.testing.assert_array_equal(nf.decode_image(rgba), rgba[:, :, :3])
    palette = Image.fromarray(noise(np.random.default_rng(14), 9, 7, 3)).quantize(16)
    np.testing.assert_array_equal(nf.decode_image(palette), np.asarray(palette.convert("RGB")))


# ---- extreme aspect ratios: only the kept region is resized, still open_clip's pixels ---------


def _extreme(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rgba = Image.fromarray(noise(np.random.default_rng(seed), size[1], size[0], 4), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").quantize(64)
    if mode == "PA":
        pa = Image.merge("PA", (rgba.convert("P").getchannel(0), rgba.getchannel("A")))
        pa.putpalette(rgba.convert("P").getpalette())
        return pa
    return rgba if mode == "RGBA" else rgba.convert(mode)


EXTREME_MODES = ("RGBA", "LA", "P", "1", "CMYK", "YCbCr", "PA", "I;16", "I", "F")


@pytest.mark.parametrize("mode", EXTREME_MODES)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_extreme_aspect_ratios_are_exact_in_every_mode(mode, interpolation):
    # 32 px keeps open_clip's own full resize (the reference) small: 1 x 9000 -> 32 x 288000.
    spec = nf.PreprocessSpec(size=32, interpolation=interpolation)
    for k, size in enumerate([(9000, 1), (1, 9000), (3001, 7), (5, 2000), (333, 1), (40, 23)]):
        image = _extreme(mode, size, seed=k)
        assert_exact(spec, nf.preprocess([image], spec)[0], image, f"{mode} {size}")


def test_the_full_resize_of_an_extreme_image_is_never_made(monkeypatch):
    from nvclip_fast import images

    monkeypatch.setattr(images, "MAX_RESIZE_BYTES", 16 << 20)  # far below a 224 x 2240000 full resize
    spec = nf.PreprocessSpec(size=224)
    for mode in ("RGBA", "P", "CMYK"):  # resized for the kept region only: no limit reached
        assert nf.preprocess([_extreme(mode, (10000, 1), seed=1)], spec).shape == (1, 3, 224, 224)
    with pytest.raises(
        ValueError, match=r"images\[0\]: .*'I;16' image to 2240000x224 .*limit MAX_RESIZE_BYTES"
    ):
        nf.preprocess([_extreme("I;16", (10000, 1), seed=1)], spec)  # Pillow resizes 16-bit: refused


def test_decompression_bombs_are_refused_from_the_header(monkeypatch):
    from nvclip_fast import images

    flat = io.BytesIO()
    Image.new("RGB", (3000, 3000), (1, 2, 3)).save(flat, format="PNG", optimize=True)
    data = flat.getvalue()  # a few tens of kilobytes for 9 megapixels
    monkeypatch.setattr(images, "EXPANSION_FLOOR_BYTES", 1 << 20)
    with pytest.raises(
        ValueError, match=r"3000x3000 pixels in \d+ bytes: decoding it would take 60 MiB, over 128x"
    ):
        nf.preprocess([data], SPEC)
    monkeypatch.setattr(images, "MAX_EXPANSION", None)  # the documented way to embed it anyway
    assert nf.preprocess([data], SPEC).shape == (1, 3, 224, 224)


# ---- layouts: numpy (H, W, C), torch (C, H, W) ------------------------------------------------


@pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision are deprecated"
)
def test_torchvision_decoded_tensors_are_taken_as_they_come(tmp_path, rgb, expected):
    torch = pytest.importorskip("torch")
    torchvision_io = pytest.importorskip("torchvision.io")
    path = tmp_path / "image.png"
    Image.fromarray(rgb).save(path)
    chw = torchvision_io.decode_image(str(path))  # uint8 (3, H, W)
    assert chw.shape == (3, *rgb.shape[:2])
    gray = torchvision_io.decode_image(str(path), mode=torchvision_io.ImageReadMode.GRAY)  # (1, H, W)
    batch = torch.stack([chw, chw])  # (N, C, H, W)
    out = nf.preprocess([chw, *batch], SPEC)
    for got in out:
        assert np.array_equal(got, expected)
    assert np.array_equal(nf.preprocess([gray], SPEC)[0], nf.preprocess([gray[0].numpy()], SPEC)[0])


def test_a_layout_that_only_reads_the_other_way_gets_the_fix(rgb):
    torch = pytest.importorskip("torch")
    with pytest.raises(
        ValueError,
        match=r"images\[0\]: expected 1, 3 or 4 channels, got 131 .*channels-first.*a.transpose\(1, 2, 0\)",
    ):
        nf.preprocess([np.ascontiguousarray(rgb.transpose(2, 0, 1))], SPEC)
    with pytest.raises(
        ValueError,
        match=r"images\[0\]: expected 1, 3 or 4 channels first, got 97 .*channels-last.*t.permute\(2, 0, 1\)",
    ):
        nf.preprocess([torch.from_numpy(rgb)], SPEC)


def test_an_ambiguous_shape_follows_the_convention_with_a_hint():
    torch = pytest.importorskip("torch")
    pixels = noise(np.random.default_rng(15), 3, 40, 4)  # (H, W, C) = 3 x 40 RGBA, or (C, H, W) = 40 x 4
    with pytest.warns(
        UserWarning, match=r"shape \(3, 40, 4\) reads as \(H, W, C\) or as \(C, H, W\): taken as \(H, W, C\)"
    ):
        as_array = nf.preprocess([pixels], SPEC)[0]
    assert_exact(SPEC, as_array, Image.fromarray(pixels, "RGBA"), "3 x 40 RGBA array")
    with pytest.warns(
        UserWarning, match=r"taken as \(C, H, W\); if it is \(H, W, C\), pass t.permute\(2, 0, 1\)"
    ):
        as_tensor = nf.preprocess([torch.from_numpy(pixels)], SPEC)[0]
    assert np.array_equal(
        as_tensor, nf.preprocess([np.ascontiguousarray(pixels.transpose(1, 2, 0))], SPEC)[0]
    )
