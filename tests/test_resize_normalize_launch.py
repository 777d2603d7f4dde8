"""resize_normalize's launches: descriptors and normalize parameters passed as kernel parameters
(up to 340 images per launch, each block building its own normalize table), batches split over
several launches, and the two compiled occupancy variants of the kernel.

The CPU twin is the reference (tests/test_resize_normalize.py holds it to open_clip); the kernel's
code runs on the CPU through ResizeNormalizeEmulated, and on a GPU in the ``gpu`` tests.
"""

from __future__ import annotations

import numpy as np
import pytest

import nvclip_fast as nf
from nvclip_fast import _C
from nvclip_fast._C import _testing

# More images than one launch carries whatever the descriptor size (32,764 bytes of parameters hold
# at most 341 descriptors of 96 bytes): three launches, the last one partial.
IMAGES_OVER_LAUNCHES = 700
SMALL_SIZE = 32  # one 32 x 32 tile per image: the emulation stays fast
# Not open_clip's defaults: each block must build the table from the parameters it is given.
SIGLIP_LIKE = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
MIN_BLOCKS_VARIANTS = (1, 3)
# Sides of the random images: below and above SMALL_SIZE, never so thin that "longest" rounds a
# side to 0 (which open_clip refuses too).
MIN_SIDE, MAX_SIDE = 16, 80


def small_images(n: int, seed: int) -> list[np.ndarray]:
    """Random noise of random small sizes, RGB and gray mixed: up- and downscaled, cropped, padded."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE, size=2))
        shape = (h, w) if i % 3 == 0 else (h, w, 3)
        images.append(rng.integers(0, 256, size=shape, dtype=np.uint8))
    return images


def emulated(spec: nf.PreprocessSpec, images: list[np.ndarray], dtype: str) -> np.ndarray:
    out = np.empty((len(images), 3, spec.size, spec.size), dtype=dtype)
    _testing.ResizeNormalizeEmulated().enqueue(images, spec._params, getattr(_C.OutputDType, dtype), out)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("mode", ["shortest", "longest"])
def test_batch_over_several_launches_equals_the_cpu_twin(mode, dtype):
    spec = nf.PreprocessSpec(size=SMALL_SIZE, resize_mode=mode, fill=7, **SIGLIP_LIKE)
    images = small_images(IMAGES_OVER_LAUNCHES, seed=3)
    want = nf.preprocess(images, spec, dtype=dtype, threads=None)
    got = emulated(spec, images, dtype)
    # Bit for bit: the same resampling code, and the table each block builds is the CPU twin's.
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


def test_cuda_variant_must_be_a_compiled_one():
    if not hasattr(_C, "ResizeNormalizeCuda"):
        pytest.skip("nvclip_fast was built without CUDA")
    with pytest.raises(ValueError, match=r"min_blocks_per_sm must be 1 or 3 .* got 2"):
        _C.ResizeNormalizeCuda(min_blocks_per_sm=2)


@pytest.mark.gpu
@pytest.mark.parametrize("min_blocks_per_sm", MIN_BLOCKS_VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_variants_equal_the_cpu_twin_over_several_launches(min_blocks_per_sm, dtype):
    torch = pytest.importorskip("torch")
    spec = nf.PreprocessSpec(size=SMALL_SIZE, resize_mode="longest", fill=7, **SIGLIP_LIKE)
    images = small_images(IMAGES_OVER_LAUNCHES, seed=4)
    want = nf.preprocess(images, spec, dtype=dtype, threads=None)
    on_device = [torch.from_numpy(np.ascontiguousarray(a)).cuda() for a in images]
    views = [
        (t.data_ptr(), a.shape[0], a.shape[1], 1 if a.ndim == 2 else 3, t.stride(0))
        for t, a in zip(on_device, images, strict=True)
    ]
    out = torch.empty((len(images), 3, spec.size, spec.size), dtype=getattr(torch, dtype), device="cuda")
    kernel = _C.ResizeNormalizeCuda(min_blocks_per_sm=min_blocks_per_sm)
    assert kernel.min_blocks_per_sm == min_blocks_per_sm
    stream = torch.cuda.current_stream()
    kernel.enqueue(views, spec._params, getattr(_C.OutputDType, dtype), out.data_ptr(), stream.cuda_stream)
    stream.synchronize()
    got = out.cpu().numpy()
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
