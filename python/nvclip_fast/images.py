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
cropped exactly as open_clip does, then converted, so every mode is exact and the kernel only
normalizes them. Only the region the crop keeps is resized: 8-bit bands by the kernel's resampler
(Pillow's, bit for bit), palette and bilevel images by picking the pixels Pillow's NEAREST picks, so
a tiny file of 1 x 70000 pixels costs kilobytes, not the gigabytes of a full resize; 16- and 32-bit
modes by Pillow itself, refused when the full resize would exceed ``MAX_RESIZE_BYTES``. Without a
spec they are converted to RGB first (alpha dropped), which differs for those modes (README,
"Preprocessing").

Layouts follow each library's convention: numpy arrays are H x W x C (as Pillow and OpenCV give
them), torch tensors C x H x W (as torchvision gives them); a shape that reads either way is taken
by the convention, with a warning, and one that only reads the other way is refused with the fix.

Files and bytes that would decode to far more memory than their own size (decompression bombs
within Pillow's pixel limit) are refused past a floor: see ``MAX_EXPANSION``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
MIB = 1 << 20
# Decompression bombs: a file or bytes whose decoding would take more than MAX_EXPANSION times its
# own size is refused, unless that is at most EXPANSION_FLOOR_BYTES (which every photo up to
# 13 megapixels is, whatever its file size). Real photos take 10-40x their JPEG size; 128x lets
# through any camera JPEG and most flat PNG graphics, and holds a file of 1 MB to 128 MiB of
# pixels. Set MAX_EXPANSION = None to turn the check off (Pillow's Image.MAX_IMAGE_PIXELS still holds).
MAX_EXPANSION: float | None = 128
EXPANSION_FLOOR_BYTES = 96 * MIB
# The largest full-size intermediate a resize may allocate (Pillow's resize of 16- and 32-bit
# modes, the index table of a palette image's long side); an image that would need more is refused.
MAX_RESIZE_BYTES = 256 * MIB
PILLOW_BAND_BYTES = 4  # the most a Pillow image stores per pixel and band (I and F modes)
CHANNEL_COUNTS = (1, 3, 4)
COLOR_CHANNEL_COUNTS = (3, 4)
# Modes whose bands are 8-bit: resized band by band by the kernel's resampler (Pillow's). RGBA and LA
# are resized premultiplied, as Pillow does (RGBa, La).
_UINT8_BAND_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"})
_PREMULTIPLIED = {"RGBA": "RGBa", "LA": "La"}
_NEAREST_MODES = ("1", "P")  # Pillow resizes these with NEAREST whatever it is asked

ACCEPTED = (
    "uint8 numpy arrays (H, W, 3) RGB, (H, W) gray or (H, W, 4) RGBA, PIL images, file paths "
    "(str or Path), encoded image bytes, or uint8 torch tensors (C, H, W) on the CPU or a CUDA device"
)


@dataclass(frozen=True)
class Encoded:
    """Encoded image bytes and the ``name`` their errors give (a file path, a tar member's id)."""

    data: bytes
    name: str


ENCODED = (str, os.PathLike, bytes, bytearray, memoryview, Encoded)  # items decoded from a file or bytes


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
    if channels not in CHANNEL_COUNTS:
        hint = ""
        if shape[0] in CHANNEL_COUNTS:
            hint = (
                "; it looks channels-first (C, H, W): numpy arrays are (H, W, C), as Pillow and OpenCV "
                "give them (pass a.transpose(1, 2, 0)); torch tensors are (C, H, W)"
            )
        raise ValueError(f"expected 1, 3 or 4 channels, got {channels} (shape {tuple(shape)}){hint}")
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


def _warn_ambiguous(shape: tuple[int, ...], layout: str, other: str, fix: str) -> None:
    """Warn when a 3-D shape reads as a color image either way round ((3, 40, 4): a 3 x 40 RGBA
    image, or an RGB image of 40 x 4); a first axis of 1 is taken as a row, unannounced."""
    if len(shape) == 3 and shape[0] in COLOR_CHANNEL_COUNTS and shape[2] in CHANNEL_COUNTS:
        warnings.warn(
            f"an image of shape {tuple(shape)} reads as {layout} or as {other}: taken as {layout}; if it is "
            f"{other}, pass {fix}",
            UserWarning,
            stacklevel=4,
        )


def _from_array(a: np.ndarray, spec: PreprocessSpec | None = None) -> Sized:
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {a.dtype}")
    size = (int(a.shape[1]), int(a.shape[0])) if a.ndim >= 2 else (0, 0)
    if spec is not None and a.ndim == 3 and a.shape[2] == _ALPHA_CHANNELS and _check_shape(a.shape):
        from PIL import Image  # an RGBA array is an RGBA image: resized premultiplied, as open_clip would

        return _from_array(np.asarray(_pil_transform(Image.fromarray(a, "RGBA"), spec)))[0], size
    pixels = _packed(a, lambda x: x.strides, np.ascontiguousarray)
    if spec is not None:
        _check_plan(pixels.shape[0], pixels.shape[1], spec)
    return pixels, size


def _check_plan(height: int, width: int, spec: PreprocessSpec) -> Any:
    """open_clip's geometry for the image (``_C.plan_resize``): ValueError where preprocessing would
    refuse it, so that the refusal is known when the image is decoded."""
    return _C.plan_resize(height, width, spec._params)


def _from_pil(image: Any, spec: PreprocessSpec | None, what: str = "the image") -> Sized:
    try:
        image.load()  # decodes a lazily opened file; truncated or corrupt data fails here
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot decode {what}: {e}") from e
    size = image.size
    if image.mode not in _EXACT_PIL_MODES:
        try:
            image = _pil_transform(image, spec) if spec is not None else image.convert("RGB")
        except ValueError as e:
            raise ValueError(f"cannot transform {what} (mode {image.mode!r}): {e}") from e
    return _from_array(np.asarray(image), spec)[0], size


def _pil_transform(image: Any, spec: PreprocessSpec) -> Any:
    """open_clip's resize and center crop/pad in the image's own mode, then ``convert("RGB")``, as
    open_clip orders them: an S x S RGB image that the kernel then only normalizes (it skips
    resampling when the size already matches). For the modes Pillow resizes its own way (palette
    and bilevel with NEAREST, RGBA/LA premultiplied, CMYK, YCbCr, 16-bit in their own space), this
    is what makes them exact too. The geometry is the kernel's own plan; only the kept region is
    computed (see the module's docstring)."""
    from PIL import Image, ImageOps

    plan = _check_plan(image.height, image.width, spec)
    (resized_h, first_y, count_y, pad_top), (resized_w, first_x, count_x, pad_left) = plan
    if (resized_w, resized_h) == image.size:
        image = image.crop((first_x, first_y, first_x + count_x, first_y + count_y))
    elif image.mode in _NEAREST_MODES:
        image = _nearest_region(image, plan)
    elif image.mode in _UINT8_BAND_MODES:
        image = _resampled_region(image, plan, spec)
    else:
        need = resized_w * resized_h * len(image.getbands()) * PILLOW_BAND_BYTES
        if need > MAX_RESIZE_BYTES:
            raise ValueError(
                f"resizing a {image.width}x{image.height} {image.mode!r} image to {resized_w}x{resized_h} as "
                f"open_clip does would take {need / MIB:.0f} MiB (limit MAX_RESIZE_BYTES, "
                f"{MAX_RESIZE_BYTES / MIB:.0f} MiB)"
            )
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


def _nearest_indices(length: int, resized: int, first: int, count: int) -> np.ndarray:
    """The source pixels Pillow's NEAREST resize of an axis of ``length`` to ``resized`` picks for
    the kept outputs ``first .. first + count``: computed by Pillow itself, on a one-row image
    holding each pixel's index, so it costs the axis, not the image. Pillow maps both axes with the
    same arithmetic (a running sum of the scale from half a step), so a row serves either axis: the
    pixels picked equal those of Pillow's own resize (tests/test_preprocess.py)."""
    from PIL import Image

    need = resized * np.dtype(np.int32).itemsize
    if need > MAX_RESIZE_BYTES:
        raise ValueError(
            f"resizing an axis of {length} pixels to {resized} as open_clip does would take "
            f"{need / MIB:.0f} MiB of indices (limit MAX_RESIZE_BYTES, {MAX_RESIZE_BYTES / MIB:.0f} MiB)"
        )
    index = Image.frombytes("I", (length, 1), np.arange(length, dtype=np.int32).tobytes())
    picked = index.resize((resized, 1), Image.Resampling.NEAREST).crop((first, 0, first + count, 1))
    return np.asarray(picked).reshape(-1)


def _nearest_region(image: Any, plan: Any) -> Any:
    """Pillow's NEAREST resize (what it does for "1" and "P" images) cropped to the kept region,
    without making the full-size image: the same pixels, picked directly."""
    from PIL import Image

    (resized_h, first_y, count_y, _), (resized_w, first_x, count_x, _) = plan
    rows = _nearest_indices(image.height, resized_h, first_y, count_y)
    columns = _nearest_indices(image.width, resized_w, first_x, count_x)
    picked = np.ascontiguousarray(np.asarray(image)[np.ix_(rows, columns)])
    if image.mode == "1":
        return Image.fromarray(picked)
    region = Image.frombytes(image.mode, (count_x, count_y), picked.tobytes())
    region.putpalette(image.getpalette())
    return region


def _resampled_region(image: Any, plan: Any, spec: PreprocessSpec) -> Any:
    """Pillow's resize of an image with 8-bit bands (premultiplied for RGBA and LA, as Pillow does),
    cropped to the kept region, computed band by band by the kernel for that region only: for one
    8-bit band the kernel's resampler is Pillow's, bit for bit (the same coefficients, fixed-point
    sums and pass order), and its output with mean 0 and std 1 is level / 255, read back exactly."""
    from PIL import Image

    (_, _, count_y, pad_top), (_, _, count_x, pad_left) = plan
    work = image.convert(_PREMULTIPLIED[image.mode]) if image.mode in _PREMULTIPLIED else image
    pixels = np.asarray(work)
    bands = [np.ascontiguousarray(pixels[:, :, b]) for b in range(pixels.shape[2])]
    levels = dataclasses.replace(spec, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = np.empty((len(bands), 3, spec.size, spec.size), np.float32)
    _C.resize_normalize(bands, levels._params, _C.OutputDType.float32, out, 1)
    kept = out[:, 0, pad_top : pad_top + count_y, pad_left : pad_left + count_x]
    region = np.rint(kept * 255).astype(np.uint8).transpose(1, 2, 0)
    # A new image of the mode: like Pillow's resize of a "PA" image, it keeps no palette.
    result = Image.frombytes(work.mode, (count_x, count_y), np.ascontiguousarray(region).tobytes())
    return result.convert(image.mode) if work is not image else result


def _check_expansion(width: int, height: int, encoded_bytes: int | None, what: str) -> None:
    """Refuse a decompression bomb (see ``MAX_EXPANSION``) from its header, before decoding it."""
    if MAX_EXPANSION is None or encoded_bytes is None:
        return
    need = width * height * DECODING_BYTES_PER_PIXEL
    if need > max(EXPANSION_FLOOR_BYTES, MAX_EXPANSION * encoded_bytes):
        raise ValueError(
            f"{what} is {width}x{height} pixels in {encoded_bytes} bytes: decoding it would take "
            f"{need / MIB:.0f} MiB, over {MAX_EXPANSION:g}x its size (a decompression bomb?); "
            "raise nvclip_fast.images.MAX_EXPANSION (or set it to None) to embed it"
        )


def _open(
    source: Any,
    what: str,
    spec: PreprocessSpec | None,
    admit: Callable[[int], None] | None,
    encoded_bytes: int | None,
) -> Sized:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:  # the header is read, the pixels are not
            _check_expansion(image.width, image.height, encoded_bytes, what)
            if admit is not None:
                admit(image.width * image.height * DECODING_BYTES_PER_PIXEL)
            return _from_pil(image, spec, what)
    except Image.DecompressionBombError as e:  # Pillow's limit (Image.MAX_IMAGE_PIXELS) is respected
        raise ValueError(f"{what} is too large to decode safely: {e}") from e
    except UnidentifiedImageError as e:  # its message holds the file object's repr: say it plainly
        raise ValueError(f"cannot decode {what}: not an image, or a format Pillow cannot read") from e
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode {what}: {e}") from e


def _channels_last(t: Any) -> Any:
    """A (C, H, W) tensor (torchvision's layout) as an (H, W, C) view; (H, W) as it is."""
    shape = tuple(t.shape)
    if len(shape) != 3:
        return t
    if shape[0] not in CHANNEL_COUNTS:
        hint = ""
        if shape[2] in CHANNEL_COUNTS:
            hint = (
                "; it looks channels-last (H, W, C): torch tensors are (C, H, W), as torchvision gives "
                "them (pass t.permute(2, 0, 1)); numpy arrays are (H, W, C)"
            )
        raise ValueError(f"expected 1, 3 or 4 channels first, got {shape[0]} (shape {shape}){hint}")
    _warn_ambiguous(shape, "(C, H, W)", "(H, W, C)", "t.permute(2, 0, 1)")
    return t.permute(1, 2, 0)


def _from_tensor(t: Any, spec: PreprocessSpec | None) -> Sized:
    import torch  # already imported by the caller (it passed a tensor)

    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {t.dtype}")
    t = _channels_last(t.detach())
    if t.is_cuda:  # RGBA on the device: alpha dropped (no Pillow on the GPU)
        size = (int(t.shape[1]), int(t.shape[0])) if t.ndim >= 2 else (0, 0)
        pixels = _packed(t, lambda x: x.stride(), lambda x: x.contiguous())
        if spec is not None:
            _check_plan(pixels.shape[0], pixels.shape[1], spec)
        return pixels, size
    return _from_array(t.numpy(), spec)


def decode(
    item: Any, spec: PreprocessSpec | None = None, admit: Callable[[int], None] | None = None
) -> Sized:
    """One image as packed uint8 pixels and its own (width, height), as stored (before any resize).

    The pixels are an (H, W) gray or (H, W, 3) RGB numpy array, or, for a CUDA tensor, a CUDA
    tensor of that shape; rows may be padded (row stride >= W * C), channels and pixels are packed.
    With ``spec`` (the preprocessing that will follow), images in modes other than RGB and L are
    returned already resized and cropped as open_clip does it (S x S RGB), and an image that
    preprocessing would refuse raises here. A file or bytes calls ``admit(bytes)`` with the memory
    decoding will take, once its header is read and before its pixels are (it may wait there).
    Raises ``ValueError`` (bad dtype, channels, zero size, undecodable bytes or file, a
    decompression bomb) or ``TypeError`` (not an image) saying what was wrong.
    """
    if isinstance(item, np.ndarray):
        _warn_ambiguous(item.shape, "(H, W, C)", "(C, H, W)", "a.transpose(1, 2, 0)")
        return _from_array(item, spec)
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        try:
            encoded_bytes = os.stat(path).st_size
        except OSError:
            encoded_bytes = None  # Image.open says why it cannot open it
        return _open(item, f"image file {path!r}", spec, admit, encoded_bytes)
    if isinstance(item, Encoded):
        return _open(io.BytesIO(item.data), repr(item.name), spec, admit, len(item.data))
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        return _open(io.BytesIO(data), f"{len(data)} bytes of image data", spec, admit, len(data))
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
    """The items of a batch of images: any iterable of images, an (N, H, W, C) numpy array or an
    (N, C, H, W) torch tensor.
    A single image (a path, bytes, a PIL image, an (H, W, C) array) is refused: wrap it in a list."""
    if isinstance(images, np.ndarray) or is_torch_tensor(images):
        if images.ndim != 4:
            raise TypeError(
                f"images: an array of shape {tuple(images.shape)} is not a batch; pass a list of images "
                "(or an (N, H, W, C) numpy array, an (N, C, H, W) torch tensor)"
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
