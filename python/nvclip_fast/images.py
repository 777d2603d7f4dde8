"""What callers pass as images, turned into the uint8 pixels the resize_normalize kernel takes.

:func:`decode_image` handles one item and raises ``ValueError`` / ``TypeError`` naming the item's
index and what was wrong, so that a caller can decode a batch item by item and collect the errors
of the bad ones without shifting the good ones.

Decoding follows open_clip's pipeline (``transform(PIL.Image.open(f))``): files and bytes are opened
with ``PIL.Image.open``, and no EXIF orientation is applied (PIL leaves it, and so does open_clip).
RGB and gray ("L") pixels go to the kernel as they are, which is bit-exact with open_clip: it
resizes in that mode and converts to RGB afterwards, and for gray that only replicates the channel.
Images in other modes are converted with ``convert("RGB")`` first; open_clip resizes those in their
own mode (palette images with NEAREST, RGBA premultiplied, CMYK in CMYK), so they can differ
slightly (README, "Preprocessing"). RGBA arrays drop their alpha, as PIL's RGBA -> RGB conversion does.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any

import numpy as np

# PIL's RGBA/LA -> RGB/L conversions drop alpha; an (H, W, 4) array is taken as RGBA.
_ALPHA_CHANNELS = 4
_EXACT_PIL_MODES = ("RGB", "L")
# The largest side the native code accepts (Pillow's float boxes are exact up to 2**24).
MAX_IMAGE_SIDE = 1 << 24

ACCEPTED = (
    "uint8 numpy arrays (H, W, 3) RGB, (H, W) gray or (H, W, 4) RGBA, PIL images, file paths "
    "(str or Path), encoded image bytes, or uint8 torch tensors (H, W, C) on the CPU or a CUDA device"
)


def is_torch_tensor(x: Any) -> bool:
    # Only a program that imported torch can hold a tensor: never import torch here.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_pil_image(x: Any) -> bool:
    # Only a program that imported PIL.Image can hold a PIL image. Another thread may be importing
    # it right now (in sys.modules, not yet initialized): then x cannot be one either.
    image_class = getattr(sys.modules.get("PIL.Image"), "Image", None)
    return isinstance(image_class, type) and isinstance(x, image_class)


def _check_shape(shape: tuple[int, ...], index: int) -> int:
    """The channel count of an (H, W) or (H, W, C) image; raises for anything else."""
    if len(shape) not in (2, 3):
        raise ValueError(f"images[{index}]: expected an (H, W) or (H, W, C) image, got shape {tuple(shape)}")
    channels = 1 if len(shape) == 2 else shape[2]
    if channels not in (1, 3, _ALPHA_CHANNELS):
        raise ValueError(
            f"images[{index}]: expected 1, 3 or 4 channels, got {channels} (shape {tuple(shape)})"
        )
    height, width = shape[0], shape[1]
    if height == 0 or width == 0:
        raise ValueError(f"images[{index}]: image is empty ({height}x{width})")
    if height > MAX_IMAGE_SIDE or width > MAX_IMAGE_SIDE:
        raise ValueError(f"images[{index}]: {height}x{width} exceeds {MAX_IMAGE_SIDE} pixels a side")
    return channels


def _packed(x: Any, index: int, strides: Any, contiguous: Any) -> Any:
    """x (numpy array or CUDA tensor) as (H, W) gray or (H, W, 3) RGB with packed pixels: alpha
    dropped, a single channel squeezed, copied when channels or pixels are not packed."""
    channels = _check_shape(tuple(x.shape), index)
    if channels == _ALPHA_CHANNELS:
        x = x[:, :, :3]
    elif x.ndim == 3 and channels == 1:
        x = x[:, :, 0]
    c = 1 if x.ndim == 2 else 3
    s = strides(x)  # in bytes (= elements for uint8)
    packed = s[1] == c and (x.ndim == 2 or s[2] == 1) and s[0] >= x.shape[1] * c
    return x if packed else contiguous(x)


def _from_array(a: np.ndarray, index: int) -> np.ndarray:
    if a.dtype != np.uint8:
        raise ValueError(f"images[{index}]: expected uint8 pixels, got {a.dtype}")
    return _packed(a, index, lambda x: x.strides, np.ascontiguousarray)


def _from_pil(image: Any, index: int) -> np.ndarray:
    try:
        image.load()  # decodes a lazily opened file; truncated or corrupt data fails here
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"images[{index}]: cannot decode the image: {e}") from e
    if image.mode not in _EXACT_PIL_MODES:
        try:
            image = image.convert("RGB")
        except ValueError as e:
            raise ValueError(f"images[{index}]: cannot convert a {image.mode!r} image to RGB: {e}") from e
    return _from_array(np.asarray(image), index)


def _open(source: Any, what: str, index: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            return _from_pil(image, index)
    except Image.DecompressionBombError as e:  # Pillow's limit (Image.MAX_IMAGE_PIXELS) is respected
        raise ValueError(f"images[{index}]: {what} is too large to decode safely: {e}") from e
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"images[{index}]: cannot decode {what}: {e}") from e


def _from_tensor(t: Any, index: int) -> Any:
    import torch  # already imported by the caller (it passed a tensor)

    if t.dtype != torch.uint8:
        raise ValueError(f"images[{index}]: expected uint8 pixels, got {t.dtype}")
    if t.is_cuda:
        return _packed(t, index, lambda x: x.stride(), lambda x: x.contiguous())
    return _from_array(t.detach().numpy(), index)


def decode_image(item: Any, index: int = 0) -> Any:
    """One image as packed uint8 pixels: an (H, W) gray or (H, W, 3) RGB numpy array, or, for a
    CUDA tensor, a CUDA tensor of that shape. Rows may be padded (row stride >= W * C); channels
    and pixels are packed.

    Raises ``ValueError`` (bad dtype, channels, zero size, undecodable bytes or file) or
    ``TypeError`` (not an image) with ``images[index]:`` and what was wrong.
    """
    if isinstance(item, np.ndarray):
        return _from_array(item, index)
    if isinstance(item, (str, os.PathLike)):
        return _open(item, f"image file {os.fspath(item)!r}", index)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(item)), f"{len(item)} bytes of image data", index)
    if is_torch_tensor(item):
        return _from_tensor(item, index)
    if is_pil_image(item):
        return _from_pil(item, index)
    raise TypeError(f"images[{index}]: unsupported image type {type(item).__name__}; expected {ACCEPTED}")


def as_host_pixels(pixels: Any) -> np.ndarray:
    """``decode_image``'s result in host memory (a CUDA tensor is copied back)."""
    if isinstance(pixels, np.ndarray):
        return pixels
    return np.ascontiguousarray(pixels.cpu().numpy())
