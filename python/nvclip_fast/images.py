"""What callers pass as images, turned into the uint8 pixels the resize_normalize kernel takes.

:func:`decode` handles one item and raises ``ValueError`` / ``TypeError`` saying what was wrong, so
that a caller can decode a batch item by item and collect the errors of the bad ones without
shifting the good ones; :func:`decode_image` also names the item's index (``images[i]: ...``).

Decoding follows open_clip's pipeline (``transform(PIL.Image.open(f))``): files and bytes are opened
with ``PIL.Image.open``, and no EXIF orientation is applied (PIL leaves it, and so does open_clip).
RGB and gray ("L") pixels go to the kernel as they are, which is bit-exact with open_clip: it
resizes in that mode and converts to RGB afterwards, and for gray that only replicates the channel.
open_clip resizes images of other modes in their own mode (palette images with NEAREST, RGBA
premultiplied, CMYK in CMYK, ...): given the ``spec``, those (and RGBA arrays) are resized and
cropped by Pillow exactly as open_clip does, then converted, so every mode is exact and the kernel
only normalizes them. Without a spec they are converted to RGB first (alpha dropped), which differs
for those modes (README, "Preprocessing").
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from . import _C
from .metadata import PreprocessSpec

# PIL's RGBA/LA -> RGB/L conversions drop alpha; an (H, W, 4) array is taken as RGBA.
_ALPHA_CHANNELS = 4
_EXACT_PIL_MODES = ("RGB", "L")
# The largest side the native code accepts (Pillow's float boxes are exact up to 2**24).
MAX_IMAGE_SIDE = 1 << 24
# Memory an encoded image takes while it decodes, per pixel: Pillow's 4-byte pixels (RGB is stored
# as RGBX) and the 3-byte array made from them, both alive until Pillow's image is closed.
DECODING_BYTES_PER_PIXEL = 4 + 3

ACCEPTED = (
    "uint8 numpy arrays (H, W, 3) RGB, (H, W) gray or (H, W, 4) RGBA, PIL images, file paths "
    "(str or Path), encoded image bytes, or uint8 torch tensors (H, W, C) on the CPU or a CUDA device"
)
ENCODED = (str, os.PathLike, bytes, bytearray, memoryview)  # items that are decoded from a file or bytes


def is_torch_tensor(x: Any) -> bool:
    # Only a program that imported torch can hold a tensor: never import torch here.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_pil_image(x: Any) -> bool:
    # Only a program that imported PIL.Image can hold a PIL image. Another thread may be importing
    # it right now (in sys.modules, not yet initialized): then x cannot be one either.
    image_class = getattr(sys.modules.get("PIL.Image"), "Image", None)
    return isinstance(image_class, type) and isinstance(x, image_class)


def _check_shape(shape: tuple[int, ...]) -> int:
    """The channel count of an (H, W) or (H, W, C) image; raises for anything else."""
    if len(shape) not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {tuple(shape)}")
    channels = 1 if len(shape) == 2 else shape[2]
    if channels not in (1, 3, _ALPHA_CHANNELS):
        raise ValueError(f"expected 1, 3 or 4 channels, got {channels} (shape {tuple(shape)})")
    height, width = shape[0], shape[1]
    if height == 0 or width == 0:
        raise ValueError(f"image is empty ({height}x{width})")
    if height > MAX_IMAGE_SIDE or width > MAX_IMAGE_SIDE:
        raise ValueError(f"{height}x{width} exceeds {MAX_IMAGE_SIDE} pixels a side")
    return channels


def _packed(x: Any, strides: Any, contiguous: Any) -> Any:
    """x (numpy array or CUDA tensor) as (H, W) gray or (H, W, 3) RGB with packed pixels: alpha
    dropped, a single channel squeezed, copied when channels or pixels are not packed."""
    channels = _check_shape(tuple(x.shape))
    if channels == _ALPHA_CHANNELS:
        x = x[:, :, :3]
    elif x.ndim == 3 and channels == 1:
        x = x[:, :, 0]
    c = 1 if x.ndim == 2 else 3
    s = strides(x)  # in bytes (= elements for uint8)
    packed = s[1] == c and (x.ndim == 2 or s[2] == 1) and s[0] >= x.shape[1] * c
    return x if packed else contiguous(x)


Sized = tuple[Any, tuple[int, int]]  # (pixels, (width, height) of the image as given)


def _from_array(a: np.ndarray, spec: PreprocessSpec | None = None) -> Sized:
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {a.dtype}")
    size = (int(a.shape[1]), int(a.shape[0])) if a.ndim >= 2 else (0, 0)
    if spec is not None and a.ndim == 3 and a.shape[2] == _ALPHA_CHANNELS and _check_shape(a.shape):
        from PIL import Image  # an RGBA array is an RGBA image: resized premultiplied, as open_clip would

        return _from_array(np.asarray(_pil_transform(Image.fromarray(a, "RGBA"), spec)))[0], size
    return _packed(a, lambda x: x.strides, np.ascontiguousarray), size


def _from_pil(image: Any, spec: PreprocessSpec | None) -> Sized:
    try:
        image.load()  # decodes a lazily opened file; truncated or corrupt data fails here
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot decode the image: {e}") from e
    size = image.size
    if image.mode not in _EXACT_PIL_MODES:
        try:
            image = _pil_transform(image, spec) if spec is not None else image.convert("RGB")
        except ValueError as e:
            raise ValueError(f"cannot transform a {image.mode!r} image: {e}") from e
    return _from_array(np.asarray(image))[0], size


def _pil_transform(image: Any, spec: PreprocessSpec) -> Any:
    """open_clip's resize and center crop/pad run by Pillow in the image's own mode, then
    ``convert("RGB")``, as open_clip orders them: an S x S RGB image that the kernel then only
    normalizes (it skips resampling when the size already matches). For the modes Pillow resizes
    its own way (palette and bilevel with NEAREST, RGBA/LA premultiplied, CMYK, YCbCr, 16-bit in
    their own space), this is what makes them exact too. The geometry is the kernel's own plan."""
    from PIL import Image, ImageOps

    (resized_h, first_y, count_y, pad_top), (resized_w, first_x, count_x, pad_left) = _C.plan_resize(
        image.height, image.width, spec._params
    )
    if (resized_w, resized_h) != image.size:
        resample = Image.Resampling.BICUBIC if spec.interpolation == "bicubic" else Image.Resampling.BILINEAR
        image = image.resize((resized_w, resized_h), resample)
    image = image.crop((first_x, first_y, first_x + count_x, first_y + count_y))
    if (count_x, count_y) != (spec.size, spec.size):  # open_clip pads with fill, in the image's mode
        bands = len(image.getbands())
        fill = spec.fill if bands == 1 else (spec.fill,) * bands
        border = (pad_left, pad_top, spec.size - pad_left - count_x, spec.size - pad_top - count_y)
        palette = image.getpalette() if image.mode == "P" else None
        image = ImageOps.expand(image, border=border, fill=fill)
        if palette is not None:
            image.putpalette(palette)
    return image.convert("RGB")


def _open(source: Any, what: str, spec: PreprocessSpec | None, admit: Callable[[int], None] | None) -> Sized:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            if admit is not None:  # the header is read, the pixels are not
                admit(image.width * image.height * DECODING_BYTES_PER_PIXEL)
            return _from_pil(image, spec)
    except Image.DecompressionBombError as e:  # Pillow's limit (Image.MAX_IMAGE_PIXELS) is respected
        raise ValueError(f"{what} is too large to decode safely: {e}") from e
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"cannot decode {what}: {e}") from e


def _from_tensor(t: Any, spec: PreprocessSpec | None) -> Sized:
    import torch  # already imported by the caller (it passed a tensor)

    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {t.dtype}")
    if t.is_cuda:  # RGBA on the device: alpha dropped (no Pillow on the GPU)
        size = (int(t.shape[1]), int(t.shape[0])) if t.ndim >= 2 else (0, 0)
        return _packed(t, lambda x: x.stride(), lambda x: x.contiguous()), size
    return _from_array(t.detach().numpy(), spec)


def decode(
    item: Any, spec: PreprocessSpec | None = None, admit: Callable[[int], None] | None = None
) -> Sized:
    """One image as packed uint8 pixels and its own (width, height), as stored (before any resize).

    The pixels are an (H, W) gray or (H, W, 3) RGB numpy array, or, for a CUDA tensor, a CUDA
    tensor of that shape; rows may be padded (row stride >= W * C), channels and pixels are packed.
    With ``spec`` (the preprocessing that will follow), images in modes other than RGB and L are
    returned already resized and cropped by Pillow as open_clip does it (S x S RGB). A file or bytes
    calls ``admit(bytes)`` with the memory decoding will take, once its header is read and before
    its pixels are (it may wait there). Raises ``ValueError`` (bad dtype, channels, zero size,
    undecodable bytes or file) or ``TypeError`` (not an image) saying what was wrong.
    """
    if isinstance(item, np.ndarray):
        return _from_array(item, spec)
    if isinstance(item, (str, os.PathLike)):
        return _open(item, f"image file {os.fspath(item)!r}", spec, admit)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(item)), f"{len(item)} bytes of image data", spec, admit)
    if is_torch_tensor(item):
        return _from_tensor(item, spec)
    if is_pil_image(item):
        return _from_pil(item, spec)
    raise TypeError(f"unsupported image type {type(item).__name__}; expected {ACCEPTED}")


def decode_image(item: Any, index: int = 0, spec: PreprocessSpec | None = None) -> Any:
    """:func:`decode`'s pixels; its errors name the item as ``images[index]``."""
    try:
        return decode(item, spec)[0]
    except TypeError as e:
        raise TypeError(f"images[{index}]: {e}") from e
    except ValueError as e:
        raise ValueError(f"images[{index}]: {e}") from e


def as_image_list(images: Any) -> list[Any]:
    """The items of a batch of images: any iterable of images, or an (N, H, W, C) array / tensor.
    A single image (a path, bytes, a PIL image, an (H, W, C) array) is refused: wrap it in a list."""
    if isinstance(images, np.ndarray) or is_torch_tensor(images):
        if images.ndim != 4:
            raise TypeError(
                f"images: an array of shape {tuple(images.shape)} is not a batch; pass a list of images "
                "(or an (N, H, W, C) array)"
            )
        return list(images)
    if isinstance(images, ENCODED) or is_pil_image(images) or not isinstance(images, Iterable):
        kind = type(images).__name__
        raise TypeError(f"images must be a sequence of images, got {kind} (wrap a single image in a list)")
    return list(images)


def as_host_pixels(pixels: Any) -> np.ndarray:
    """``decode_image``'s result in host memory (a CUDA tensor is copied back)."""
    if isinstance(pixels, np.ndarray):
        return pixels
    return np.ascontiguousarray(pixels.cpu().numpy())
