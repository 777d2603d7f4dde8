"""The search page of a collection: ``POST /v1/search``, thumbnails, and one static page at ``/``.

:func:`search_router` makes a FastAPI ``APIRouter`` over one :class:`~nvclip_fast.collection.Collection`
and the :class:`~nvclip_fast.encoder.Encoder` of its model (or a function of the request that
returns it, for a server that loads its model after it starts; another model is refused), to be
included in an app (``app.include_router(search_router(collection, encoder))``):

- ``POST /v1/search``: ``{"text": "a dog"}`` or ``{"image": "data:image/jpeg;base64,..."}``, and
  ``"k"`` (1 to ``max_k``, default 10) -> ``{"object": "list", "model": ..., "data": [{"id", "row",
  "score", "thumbnail"}]}``, best first. Errors: 422 for a bad query (both or neither of text and
  image, a data URL that is not an image), 413 for an image over ``max_image_bytes``.
- ``GET /v1/thumbnails/{row}``: a JPEG at most ``thumbnail_px`` on a side, made on request from the
  file (or tar member) that row's id names. Only rows of the collection are served, so no path
  outside it can be asked for; 404 when the row does not exist or its file cannot be read.
- ``GET /``: the page (a query box, an image upload, a grid of thumbnails with their scores).

Endpoints are plain functions: FastAPI runs them in its thread pool, off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import re
import weakref
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Literal

try:
    from fastapi import APIRouter, HTTPException, Request, Response
    from fastapi.responses import HTMLResponse
    from pydantic import BaseModel, Field
except ImportError as e:
    raise ImportError("the search page needs FastAPI: pip install 'nvclip-fast[serve]'") from e
from PIL import Image

from .collection import Collection, encoder_provenance
from .encoder import ItemError
from .provenance import ProvenanceError
from .sources import read_id

if TYPE_CHECKING:
    from .encoder import Encoder
    from .search import Index

DEFAULT_K = 10
MAX_K = 100
MAX_IMAGE_BYTES = 20 << 20  # a query image, decoded from its data URL
MAX_SOURCE_BYTES = 64 << 20  # a collection file read to make a thumbnail
THUMBNAIL_PX = 256
THUMBNAIL_QUALITY = 85
THUMBNAILS_CACHED = 512
DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,(?P<payload>.*)", re.DOTALL)
PAGE = "search.html"


class SearchRequest(BaseModel):
    """A query: ``text`` or ``image`` (a ``data:image/<type>;base64,...`` URL), and ``k``."""

    text: str | None = Field(None, description="a text query")
    image: str | None = Field(None, description="an image query: a data:image/<type>;base64,... URL")
    k: int = Field(DEFAULT_K, ge=1, description="results")


class SearchHit(BaseModel):
    id: str
    row: int
    score: float
    thumbnail: str


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[SearchHit]


def search_router(
    collection: Collection,
    encoder: Encoder | Callable[[Request], Encoder],
    *,
    index: Index | None = None,
    max_k: int = MAX_K,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    thumbnail_px: int = THUMBNAIL_PX,
) -> APIRouter:
    """The routes above over ``collection``, whose queries ``encoder`` embeds: an Encoder (refused
    here with ``ProvenanceError`` when it is not the collection's model), or a function of the
    request that returns one when asked (a server that loads its model after it starts; a model
    that is not the collection's then fails each search with 500 and the reason). ``index``:
    search it instead of every row (it must have been built for ``collection``)."""
    checked: weakref.WeakSet[Encoder] = weakref.WeakSet()  # Encoders found to be the collection's model

    def query_encoder(request: Request) -> Encoder:
        given = encoder(request) if callable(encoder) else encoder
        if given not in checked:
            try:
                collection.check_model(encoder_provenance(given))
            except ProvenanceError as e:
                raise HTTPException(500, f"this server's model cannot search {collection.path}: {e}") from e
            checked.add(given)
        return given

    if not callable(encoder):
        collection.check_model(encoder_provenance(encoder))
        checked.add(encoder)
    if index is not None:
        index.check(collection)
    page = resources.files(__package__).joinpath("static", PAGE).read_text(encoding="utf-8")

    router = APIRouter()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def search_page() -> str:
        return page

    @router.post("/v1/search", response_model=SearchResponse)
    def search(body: SearchRequest, request: Request) -> SearchResponse:
        model = query_encoder(request)
        if (body.text is None) == (body.image is None):
            raise HTTPException(422, "give exactly one of text or image")
        if body.k > max_k:
            raise HTTPException(422, f"k: at most {max_k}, got {body.k}")
        image = None if body.image is None else _decode_data_url(body.image, max_image_bytes)
        try:
            hits = collection.search(text=body.text, image=image, k=body.k, encoder=model, index=index)
        except ItemError as e:
            raise HTTPException(422, f"image: {e.reason}") from e
        return SearchResponse(
            model=model.model,
            data=[
                SearchHit(
                    id=h.id, row=h.row, score=h.score, thumbnail=str(request.url_for("thumbnail", row=h.row))
                )
                for h in hits
            ],
        )

    @functools.lru_cache(maxsize=THUMBNAILS_CACHED)
    def make_thumbnail(row: int) -> bytes:
        return _thumbnail(read_id(collection.ids([row])[0], max_bytes=MAX_SOURCE_BYTES), thumbnail_px)

    @router.get("/v1/thumbnails/{row}", name="thumbnail")
    def thumbnail(row: int) -> Response:
        if not 0 <= row < len(collection):
            raise HTTPException(404, f"no row {row} in the collection ({len(collection)} rows)")
        try:
            data = make_thumbnail(row)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # unreadable, gone, not an image
            raise HTTPException(404, f"row {row}: no thumbnail: {e}") from e
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return router


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    match = DATA_URL.fullmatch(url)
    if match is None:
        raise HTTPException(422, "image: expected a data:image/<type>;base64,<data> URL")
    payload = match["payload"]
    if len(payload) * 3 // 4 > max_bytes:
        raise HTTPException(413, f"image: over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise HTTPException(422, f"image: not valid base64: {e}") from e


def _thumbnail(data: bytes, px: int) -> bytes:
    """A JPEG of the image ``data`` at most ``px`` on a side (Pillow's decompression-bomb limit kept)."""
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (px, px))  # JPEG: decode at a reduced scale directly
        image = ImageOps.exif_transpose(image).convert("RGB")
        image.thumbnail((px, px))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=THUMBNAIL_QUALITY)
        return out.getvalue()
