"""The inputs of ``POST /v1/embeddings``: each string is a text or an image data URL.

A string is an image when it starts with ``data:`` followed by a media type (``data:image/png;...``);
anything else, ``"data: the new oil"`` included, is a text. :func:`split_inputs` looks only at each
data URL's first characters (cheap enough for the event loop); :func:`image_bytes` base64-decodes
one image and reads its header (for a worker thread), refusing what the Encoder should never see:
formats outside :data:`IMAGE_MEDIA_TYPES`, and images over Pillow's decompression-bomb limit.
"""

from __future__ import annotations

import base64
import binascii
import http
import io
import re
from dataclasses import dataclass

from .schema import ApiError

# The media types a data URL may declare, and the Pillow formats that may decode them. Only these
# formats are ever opened (Pillow's ``formats=``): no Ghostscript-backed EPS, no rarely used decoders.
# The image's own bytes decide its format (a PNG sent as image/jpeg is a PNG), within this set.
IMAGE_MEDIA_TYPES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
    "image/bmp": "BMP",
    "image/tiff": "TIFF",
}
IMAGE_FORMATS = tuple(sorted(set(IMAGE_MEDIA_TYPES.values())))
_MEDIA_TYPE = re.compile(r"data:([\w!#$&^.+-]+/[\w!#$&^.+-]+)")
# A data URL's media type and parameters end (at the comma) within this many characters.
_HEADER_CHARS = 256
_BASE64_PARAM = "base64"


@dataclass(frozen=True)
class TextInput:
    index: int  # position in the request's input list
    text: str


@dataclass(frozen=True)
class ImageInput:
    index: int
    media_type: str
    data: str  # the base64 part of the data URL


def _param(index: int) -> str:
    return f"input[{index}]"


def split_inputs(items: list[str], max_image_bytes: int) -> tuple[list[TextInput], list[ImageInput]]:
    """The texts and images among ``items``, each with its index. Raises ApiError for a malformed or
    unsupported data URL (422) and for an image whose base64 is longer than ``max_image_bytes``
    decoded (413), without decoding anything."""
    texts, images = [], []
    for index, item in enumerate(items):
        match = _MEDIA_TYPE.match(item)
        if match is None:
            texts.append(TextInput(index, item))
            continue
        media_type = match.group(1).lower()
        comma = item.find(",", match.end(), _HEADER_CHARS)
        if comma < 0:
            raise ApiError(
                422,
                f"{_param(index)}: malformed data URL: no ',' within its first {_HEADER_CHARS} characters",
                code="invalid_data_url",
                param=_param(index),
            )
        if _BASE64_PARAM not in item[match.end() : comma].lower().split(";"):
            raise ApiError(
                422,
                f"{_param(index)}: only base64 data URLs are accepted (data:{media_type};base64,...)",
                code="invalid_data_url",
                param=_param(index),
            )
        if media_type not in IMAGE_MEDIA_TYPES:
            raise ApiError(
                422,
                f"{_param(index)}: unsupported media type {media_type!r}; accepted: "
                f"{', '.join(IMAGE_MEDIA_TYPES)}",
                code="unsupported_media_type",
                param=_param(index),
            )
        data = item[comma + 1 :]
        if len(data) // 4 * 3 > max_image_bytes + 2:  # base64: 4 characters per 3 bytes (+ padding)
            raise _too_large(index, f"about {len(data) // 4 * 3} bytes", max_image_bytes)
        images.append(ImageInput(index, media_type, data))
    return texts, images


def _too_large(index: int, size: str, max_image_bytes: int) -> ApiError:
    return ApiError(
        http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"{_param(index)}: the image is {size}, over the limit of {max_image_bytes} bytes",
        code="image_too_large",
        param=_param(index),
    )


def image_bytes(image: ImageInput, max_image_bytes: int) -> bytes:
    """The image's bytes, checked: valid base64 (422), at most ``max_image_bytes`` (413), a header
    that Pillow reads as one of :data:`IMAGE_FORMATS` (422), at most ``PIL.Image.MAX_IMAGE_PIXELS``
    pixels (413: a decompression bomb is refused before anything is decoded)."""
    from PIL import Image, UnidentifiedImageError

    index = image.index
    try:
        raw = base64.b64decode(image.data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(
            422,
            f"{_param(index)}: invalid base64 in the data URL: {e}",
            code="invalid_base64",
            param=_param(index),
        ) from e
    if len(raw) > max_image_bytes:
        raise _too_large(index, f"{len(raw)} bytes", max_image_bytes)
    try:
        with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as opened:
            width, height = opened.size
    except Image.DecompressionBombError as e:
        raise ApiError(
            http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"{_param(index)}: refused as a possible decompression bomb: {e}",
            code="image_too_large",
            param=_param(index),
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        why = "" if isinstance(e, UnidentifiedImageError) else f": {e}"  # (its text names a BytesIO)
        raise ApiError(
            422,
            f"{_param(index)}: the data URL ({image.media_type}, {len(raw)} bytes) is not a readable "
            f"{'/'.join(IMAGE_FORMATS)} image{why}",
            code="invalid_image",
            param=_param(index),
        ) from e
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ApiError(
            http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"{_param(index)}: {width}x{height} = {width * height} pixels is over the limit of {limit} "
            "pixels (Pillow's decompression-bomb limit)",
            code="image_too_large",
            param=_param(index),
        )
    return raw
