"""The pinned reference for preprocessing tests and benchmarks: open_clip's eval transform
(``image_transform_v2(PreprocessCfg(...), is_train=False)``) on PIL images, and the inputs."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

import nvclip_fast as nf
from nvclip_fast import _C
from nvclip_fast._C import _testing

SKIMAGE_DATA = Path(skimage.data.__file__).parent


def open_clip_transform(spec: nf.PreprocessSpec):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(
        size=spec.size,
        mean=spec.mean,
        std=spec.std,
        interpolation=spec.interpolation,
        resize_mode=spec.resize_mode,
        fill_color=spec.fill,
    )
    return image_transform_v2(cfg, is_train=False)


def reference(spec: nf.PreprocessSpec, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """open_clip's result for one PIL image: (uint8 levels (3, S, S) before ToTensor, float32 (3, S, S))."""
    transform = open_clip_transform(spec)
    # The steps before MaybeToTensor + Normalize give the uint8 image that gets normalized.
    before_tensor = image
    for step in transform.transforms[:-2]:
        before_tensor = step(before_tensor)
    levels = np.asarray(before_tensor.convert("RGB")).transpose(2, 0, 1)
    return levels, transform(image).numpy()


@functools.cache
def _level_tables(spec: nf.PreprocessSpec) -> np.ndarray:
    return _testing.normalize_table(spec._params, _C.OutputDType.float32).view(np.float32)


def levels_of(spec: nf.PreprocessSpec, out: np.ndarray) -> np.ndarray:
    """Our float32 output (3, S, S) mapped back to uint8 levels (normalization is increasing in
    the level), -1 where a value is not one of the 256 normalized levels of its channel."""
    tables = _level_tables(spec)
    levels = np.empty(out.shape, dtype=np.int16)
    for c in range(3):
        idx = np.clip(np.searchsorted(tables[c], out[c]), 0, 255)
        levels[c] = np.where(tables[c][idx] == out[c], idx, -1)
    return levels


def assert_exact(spec: nf.PreprocessSpec, ours: np.ndarray, image: Image.Image, label: str) -> None:
    """Ours equals open_clip's: 0 LSB on the uint8 image before normalization, and the same float32
    tensor bit for bit (the normalization is the same float32 arithmetic)."""
    ref_levels, ref = reference(spec, image)
    ours_levels = levels_of(spec, ours)
    if not np.array_equal(ours_levels, ref_levels):
        diff = np.abs(ours_levels.astype(np.int32) - ref_levels)
        differing = np.count_nonzero(diff)
        raise AssertionError(
            f"{label}: uint8 levels differ on {differing} of {diff.size} values, max |diff| {diff.max()}"
        )
    assert np.array_equal(ours, ref), f"{label}: float32 values differ although the levels agree"


def noise(rng: np.random.Generator, h: int, w: int, channels: int) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@functools.cache
def photos() -> dict[str, np.ndarray]:
    """Real photographs bundled with scikit-image (RGB and gray), plus portrait / tall crops."""
    p = {
        "astronaut": skimage.data.astronaut(),  # 512x512 RGB
        "coffee": skimage.data.coffee(),  # 400x600 RGB
        "chelsea": skimage.data.chelsea(),  # 300x451 RGB
        "rocket": skimage.data.rocket(),  # 427x640 RGB (JPEG)
        "hubble": skimage.data.hubble_deep_field(),  # 872x1000 RGB (JPEG)
        "camera": skimage.data.camera(),  # 512x512 gray
        "page": skimage.data.page(),  # 191x384 gray
    }
    p["coffee_portrait"] = np.ascontiguousarray(p["coffee"].transpose(1, 0, 2))  # 600x400
    p["rocket_tall"] = np.ascontiguousarray(p["rocket"][:, 250:390])  # 427x140, taller than 3:1
    p["camera_strip"] = np.ascontiguousarray(p["camera"][:, 200:240])  # 512x40 gray
    return p


def bench_photos() -> list[np.ndarray]:
    """The benchmark's decoded photos: scikit-image's RGB samples of 300-640 pixels a side."""
    return [
        skimage.data.astronaut(),
        skimage.data.coffee(),
        skimage.data.chelsea(),
        skimage.data.rocket(),
        skimage.data.immunohistochemistry(),
    ]
