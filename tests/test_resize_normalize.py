"""resize_normalize: exact parity with open_clip's eval transform (Pillow), the CUDA kernel's logic
(run on the CPU here, on the device in the gpu tests) and the CPU twin agreeing bit for bit."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
from PIL import Image

import nvclip_fast as nf
from nvclip_fast import _C
from nvclip_fast._C import _testing
from nvclip_fast.preprocess import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from preprocess_reference import assert_exact, levels_of, noise, photos, reference

# Odd shapes such as a 3 x 1000 RGB array also read as channels-first: taken as (H, W, C), as meant.
pytestmark = pytest.mark.filterwarnings("ignore:an image of shape")

MODES = ("shortest", "squash", "longest")
INTERPOLATIONS = ("bicubic", "bilinear")
SIZES = (224, 336)  # NVCLIP's two input sizes

# (height, width): degenerate, extreme aspect ratios, upscaling, exact sizes (no resampling on one or
# both axes), typical photos, portraits taller than 2:1 (Pillow 13 runs the vertical pass first),
# odd sizes, and a large camera frame in both orientations.
SHAPES = (
    (1, 1),
    (2, 3),
    (3, 1000),
    (1000, 3),
    (7, 5),
    (31, 17),
    (224, 224),
    (336, 336),
    (224, 300),
    (500, 336),
    (480, 640),
    (640, 480),
    (1000, 300),
    (2000, 500),
    (257, 1025),
    (3000, 4000),
    (4000, 3000),
)


@functools.cache
def batch(seed: int = 0) -> tuple[tuple[str, np.ndarray], ...]:
    """Random noise (the worst case for rounding) in RGB and gray at every shape, and the photos."""
    rng = np.random.default_rng(seed)
    items = [(f"noise{c} {h}x{w}", noise(rng, h, w, c)) for (h, w), c in itertools.product(SHAPES, (3, 1))]
    items += [(f"photo {name}", a) for name, a in photos().items()]
    return tuple(items)


def run_cpu(spec: nf.PreprocessSpec, arrays: list[np.ndarray], threads: int | None = 1, dtype="float32"):
    return nf.preprocess(arrays, spec, threads=threads, dtype=dtype)


def run_emulated(spec: nf.PreprocessSpec, arrays: list[np.ndarray], dtype="float32", arena_bytes=None):
    emulated = (
        _testing.ResizeNormalizeEmulated()
        if arena_bytes is None
        else _testing.ResizeNormalizeEmulated(arena_bytes)
    )
    out = np.empty((len(arrays), 3, spec.size, spec.size), dtype=dtype)
    emulated.enqueue(arrays, spec._params, getattr(_C.OutputDType, dtype), out)
    return out


@functools.cache
def cpu_result(mode: str, interpolation: str, size: int) -> np.ndarray:
    spec = nf.PreprocessSpec(size=size, resize_mode=mode, interpolation=interpolation, fill=0)
    return run_cpu(spec, [a for _, a in batch()], threads=None)


def spec_of(mode: str, interpolation: str, size: int) -> nf.PreprocessSpec:
    return nf.PreprocessSpec(size=size, resize_mode=mode, interpolation=interpolation)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("mode", MODES)
def test_exact_parity_with_open_clip(mode, interpolation, size):
    # The whole matrix in one mixed-size batch per configuration; every image compared with
    # open_clip's transform of the PIL image: 0 LSB on the uint8 image, identical float32.
    spec = spec_of(mode, interpolation, size)
    ours = cpu_result(mode, interpolation, size)
    failures = []
    for (label, a), out in zip(batch(), ours, strict=True):
        try:
            assert_exact(spec, out, Image.fromarray(a), label)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_kernel_logic_equals_cpu_twin(mode, interpolation, size):
    # The CUDA kernel's tile code and the CUDA path's packing, run on the CPU (ResizeNormalizeEmulated),
    # bit for bit against the CPU twin (which the test above holds to open_clip).
    spec = spec_of(mode, interpolation, size)
    emulated = run_emulated(spec, [a for _, a in batch()])
    assert np.array_equal(emulated, cpu_result(mode, interpolation, size))


def test_wrong_pass_order_is_caught():
    # Shows that the parity test can fail: Pillow 12.1's order (always horizontal first) differs from
    # the installed Pillow 13 on a portrait squashed to a square (vertical pass first in Pillow 13).
    rng = np.random.default_rng(1)
    a = noise(rng, 1000, 300, 3)
    spec = nf.PreprocessSpec(size=224, resize_mode="squash", pass_order="pillow12.1")
    ref_levels, _ = reference(spec, Image.fromarray(a))
    ours = levels_of(spec, run_cpu(spec, [a])[0])
    assert np.abs(ours - ref_levels).max() >= 2


def test_pass_order_rules():
    # On the 100:1 image Pillow 12.2's rule runs the vertical pass first; Pillow 12.1's never does.
    rng = np.random.default_rng(2)
    tall = noise(rng, 2000, 15, 3)
    results = {
        order: run_cpu(nf.PreprocessSpec(size=224, resize_mode="squash", pass_order=order), [tall])
        for order in ("pillow13", "pillow12.2", "pillow12.1")
    }
    assert np.array_equal(results["pillow13"], results["pillow12.2"])  # both vertical first here
    assert not np.array_equal(results["pillow12.2"], results["pillow12.1"])


def test_float16_is_float32_rounded_to_nearest_even():
    spec = spec_of("shortest", "bicubic", 224)
    arrays = [a for _, a in batch()][:8]
    f32 = run_cpu(spec, arrays)
    f16 = run_cpu(spec, arrays, dtype="float16")
    assert f16.dtype == np.float16
    assert np.array_equal(f16, f32.astype(np.float16))
    assert np.array_equal(run_emulated(spec, arrays, dtype="float16"), f16)


def test_threads_do_not_change_results():
    spec = spec_of("shortest", "bicubic", 336)
    arrays = [a for _, a in batch()]
    one = run_cpu(spec, arrays, threads=1)
    assert np.array_equal(run_cpu(spec, arrays, threads=2), one)
    assert np.array_equal(run_cpu(spec, arrays, threads=None), one)
    # Fewer images than threads: each image is split into bands of rows.
    for a in arrays[:3]:
        assert np.array_equal(run_cpu(spec, [a], threads=4), run_cpu(spec, [a], threads=1))


def test_longest_pads_with_fill():
    rng = np.random.default_rng(3)
    spec = nf.PreprocessSpec(size=224, resize_mode="longest", fill=77)
    for (h, w), channels in itertools.product(((100, 300), (300, 100), (50, 60), (3, 1000)), (3, 1)):
        a = noise(rng, h, w, channels)
        out = run_cpu(spec, [a])[0]
        assert_exact(spec, out, Image.fromarray(a), f"longest fill {h}x{w}x{channels}")
        assert levels_of(spec, out)[:, 0, 0].tolist() == [77, 77, 77]  # every case pads the top-left corner


def test_longest_rounding_a_side_to_zero_fails_like_open_clip():
    spec = nf.PreprocessSpec(size=224, resize_mode="longest")
    a = np.zeros((1, 4000, 3), np.uint8)
    with pytest.raises(ValueError, match="height and width must be > 0"):
        reference(spec, Image.fromarray(a))
    with pytest.raises(ValueError, match=r"images\[1\]: a 1x4000 image resizes to 0x224"):
        nf.preprocess([np.zeros((5, 5, 3), np.uint8), a], spec)


def test_emulated_table_cache_is_reused_and_recycled():
    spec = spec_of("shortest", "bicubic", 224)
    rng = np.random.default_rng(4)
    same = [noise(rng, 480, 640, 3) for _ in range(3)]
    emulated = _testing.ResizeNormalizeEmulated()
    out = np.empty((3, 3, 224, 224), np.float32)
    emulated.enqueue(same, spec._params, _C.OutputDType.float32, out)
    assert emulated.cached_tables == 2  # one y and one x table shared by the three images
    emulated.enqueue(same, spec._params, _C.OutputDType.float32, out)
    assert emulated.cached_tables == 2
    assert np.array_equal(out, run_cpu(spec, same))
    # An arena too small for even one batch: every call starts over and grows it.
    arrays = [a for _, a in batch()][:12]
    assert np.array_equal(run_emulated(spec, arrays, arena_bytes=64), run_cpu(spec, arrays))
    # A small arena recycled between batches of different sizes.
    small = _testing.ResizeNormalizeEmulated(64 << 10)
    for start in range(0, 12, 4):
        part = arrays[start : start + 4]
        got = np.empty((len(part), 3, 224, 224), np.float32)
        small.enqueue(part, spec._params, _C.OutputDType.float32, got)
        assert np.array_equal(got, run_cpu(spec, part))


def test_normalize_table_matches_torch():
    torch = pytest.importorskip("torch")
    import torchvision.transforms.functional as F

    for mean, std in (
        (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ):
        spec = nf.PreprocessSpec(size=8, mean=mean, std=std)
        levels = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(3, 1, 256)
        ref = F.normalize(levels.to(torch.float32).div(255), mean, std).view(3, 256)
        f32 = _testing.normalize_table(spec._params, _C.OutputDType.float32).view(np.float32)
        f16 = (
            _testing.normalize_table(spec._params, _C.OutputDType.float16).astype(np.uint16).view(np.float16)
        )
        assert np.array_equal(f32, ref.numpy())
        assert np.array_equal(f16, ref.half().numpy())


def test_float_to_half_rounds_like_numpy():
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    # Every exponent with random mantissas, plus the boundaries: half's subnormals, ties, overflow.
    special = np.array(
        [0.0, -0.0, 2**-24, 2**-25, 3 * 2**-26, 2**-14, 65504.0, 65519.99, 65520.0, np.inf, -np.inf],
        np.float32,
    )
    values = np.concatenate([bits.view(np.float32), special])
    values = values[~np.isnan(values)]
    ours = _testing.float_to_half_bits(values)
    with np.errstate(over="ignore"):  # values beyond half's range become inf, as they should
        expected = values.astype(np.float16).view(np.uint16)
    assert np.array_equal(ours, expected)


# ---- on a GPU: the CUDA kernel bit for bit against the CPU twin ------------------------------


def _device_views(tensors):
    return [
        (t.data_ptr(), t.shape[0], t.shape[1], 1 if t.ndim == 2 else t.shape[2], t.stride(0)) for t in tensors
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_equals_cpu_twin(mode, interpolation, size):
    import torch

    spec = spec_of(mode, interpolation, size)
    arrays = [a for _, a in batch()]
    expected = cpu_result(mode, interpolation, size)
    got = nf.preprocess(arrays, spec, device="cuda")
    got16 = nf.preprocess(arrays, spec, device="cuda", dtype="float16")
    torch.cuda.synchronize()
    assert got.device.type == "cuda"
    assert got.dtype == torch.float32
    assert got.shape == (len(arrays), 3, size, size)
    assert np.array_equal(got.cpu().numpy(), expected)
    assert np.array_equal(got16.cpu().numpy(), expected.astype(np.float16))


@pytest.mark.gpu
def test_cuda_inputs_on_the_device_in_any_layout():
    import torch

    spec = spec_of("shortest", "bicubic", 224)
    rng = np.random.default_rng(20)
    rgb = noise(rng, 300, 451, 3)
    gray = noise(rng, 333, 250, 1)
    padded = torch.zeros(300, 460, 3, dtype=torch.uint8, device="cuda")
    padded[:, :451] = torch.from_numpy(rgb).cuda()
    rgba = torch.from_numpy(np.dstack([rgb, np.full(rgb.shape[:2], 5, np.uint8)])).cuda()
    # Torch tensors are (C, H, W), as torchvision gives them; a view of (H, W, C) memory is used as it is.
    items = [
        torch.from_numpy(rgb).cuda().permute(2, 0, 1),
        padded[:, :451].permute(2, 0, 1),  # rows 460 pixels apart
        rgba.permute(2, 0, 1),  # alpha dropped
        torch.from_numpy(gray).cuda(),
        torch.from_numpy(gray).cuda()[None],
        torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).cuda(),  # planar: copied
        rgb,  # host memory, uploaded
    ]
    got = nf.preprocess(items, spec, device="cuda").cpu().numpy()
    want = run_cpu(spec, [rgb, rgb, rgb, gray, gray, rgb, rgb])
    assert np.array_equal(got, want)


@pytest.mark.gpu
def test_cuda_out_form_streams_and_table_cache():
    import torch

    spec = spec_of("squash", "bilinear", 336)
    arrays = [a for _, a in batch()]
    tensors = [torch.from_numpy(a).cuda() for a in arrays]  # (H, W, C) memory, as the kernel reads it
    expected = cpu_result("squash", "bilinear", 336)
    out = torch.full((len(arrays), 3, 336, 336), float("nan"), device="cuda")
    chw = [t.permute(2, 0, 1) if t.ndim == 3 else t for t in tensors]  # torch's (C, H, W) views
    assert nf.preprocess(chw, spec, device="cuda", out=out) is out
    torch.cuda.synchronize()
    assert np.array_equal(out.cpu().numpy(), expected)
    # The C++ API the batch queue calls: a tiny table arena recycled and grown on every batch, two
    # streams alternating with no host synchronization in between.
    runner = _C.ResizeNormalizeCuda(64)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = [torch.empty((4, 3, 336, 336), device="cuda") for _ in range(0, len(tensors), 4)]
    torch.cuda.synchronize()
    for k, start in enumerate(range(0, len(tensors), 4)):
        part = tensors[start : start + 4]
        o = outs[k][: len(part)]
        stream = streams[k % 2]
        runner.enqueue(
            _device_views(part), spec._params, _C.OutputDType.float32, o.data_ptr(), stream.cuda_stream
        )
    torch.cuda.synchronize()
    got = torch.cat([o for o in outs])[: len(tensors)].cpu().numpy()
    assert np.array_equal(got, expected)


@pytest.mark.gpu
def test_cuda_large_batch_of_one_size():
    import torch

    spec = spec_of("shortest", "bicubic", 224)
    image = noise(np.random.default_rng(21), 480, 640, 3)
    device_image = torch.from_numpy(image).cuda().permute(2, 0, 1)
    got = nf.preprocess([device_image] * 1000, spec, device="cuda", dtype="float16")
    torch.cuda.synchronize()
    want = run_cpu(spec, [image], dtype="float16")[0]
    assert np.array_equal(got.cpu().numpy(), np.broadcast_to(want, got.shape))
