"""The ASGI application (FastAPI) and its runner (uvicorn).

Routes: ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /v1/health/live``,
``GET /v1/health/ready``, ``GET /v1/metrics`` (and FastAPI's ``/docs``, ``/openapi.json``). More
routes join through ``create_app(..., routers=[APIRouter, ...])``; a route reaches the service with
the :func:`service` dependency (``svc: Service``), and is counted in the metrics and covered by the
API key like the others.

Middleware, outermost first: metrics (every request, by route and status), the API key (every path
except ``/v1/health/``), the body limit (counted while the body is read: a body over the limit is
refused with 413 before it is parsed, and the rest of it is discarded as it arrives, never stored).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hmac
import http
import logging
import socket
import sys
import time
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..encoder import Encoder
from . import EXIT_ERROR
from .metrics import Metrics
from .schema import (
    ERROR_RESPONSES,
    ApiError,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    Health,
    ModelCard,
    ModelList,
    Usage,
)
from .service import EmbeddingService
from .settings import Settings

log = logging.getLogger("nvclip_fast.server")

HEALTH_PREFIX = "/v1/health/"  # open without the API key (orchestrators probe them)
RANDOM_WEIGHTS_WARNING = "this model has RANDOM weights: its embeddings are meaningless (for tests only)"
_FLOAT32_LE = "<f4"


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body().model_dump(), status_code=error.status, headers=error.headers)


async def _send_error(error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(error)(scope, receive, send)


def service(request: Request) -> EmbeddingService:
    """FastAPI dependency: the app's EmbeddingService."""
    return request.app.state.service


Service = Annotated[EmbeddingService, Depends(service)]


# --- middleware -----------------------------------------------------------------------------------


class MetricsMiddleware:
    """Counts every HTTP request by route template (``other`` for unknown paths) and status code,
    and times it. ``routes()``: the documented paths."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Callable[[], set[str]]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [http.HTTPStatus.INTERNAL_SERVER_ERROR.value]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The matched route's template; for a request refused before routing (401, 413), its
            # path when that is a documented one. Never the raw path of an unknown URL (cardinality).
            route = getattr(scope.get("route"), "path", None)
            label = route or (scope["path"] if scope["path"] in self.routes() else "other")
            self.metrics.requests.labels(label, str(status[0])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)


class ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on every path except the health probes; 401 otherwise."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(HEALTH_PREFIX):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization")
        if given is not None:
            scheme, _, token = given.partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
                await self.app(scope, receive, send)
                return
        message = (
            "missing API key: send 'Authorization: Bearer <key>'" if given is None else "invalid API key"
        )
        error = ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await _send_error(error, scope, receive, send)


class BodyLimitMiddleware:
    """Reads the request body, counting: over ``limit`` bytes (declared by Content-Length, or
    counted as the chunks arrive) the request gets 413 at once. uvicorn discards the rest of that
    body as it arrives (a response is complete: nothing reads it), so memory stays bounded and the
    client, which typically sends its whole body before reading, still gets the 413 and may reuse
    the connection. A body within the limit is handed to the app unchanged."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    def _too_large(self, size: str) -> ApiError:
        return ApiError(
            http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"the request body is {size}, over the limit of {self.limit} bytes",
            code="body_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_error(
                    ApiError(400, f"invalid Content-Length {declared!r}", code="invalid_request"),
                    scope,
                    receive,
                    send,
                )
                return
            if size > self.limit:
                await _send_error(self._too_large(f"{size} bytes"), scope, receive, send)
                return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                chunks_done: list[Message] = [message]
                break
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.limit:
                await _send_error(self._too_large(f"more than {self.limit} bytes"), scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                chunks_done = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay() -> Message:
            return chunks_done.pop(0) if chunks_done else await receive()

        await self.app(scope, replay, send)


# --- the app --------------------------------------------------------------------------------------


def _validation_message(error: dict[str, Any]) -> tuple[str, str]:
    """(param, message) of one pydantic error: loc ("body", "input", 3) -> "input[3]"; a JSON
    syntax error's loc ("body", 12) -> "body" and "at character 12"."""
    parts = list(error.get("loc", ()))[1:]
    message = error.get("msg", "invalid")
    if not parts or not isinstance(parts[0], str):
        return "body", message + (f" at character {parts[0]}" if parts else "")
    param = str(parts[0])
    for part in parts[1:]:
        param += f"[{part}]" if isinstance(part, int) else f".{part}"
    return param, message


def create_app(
    load: Callable[[], Encoder],
    settings: Settings | None = None,
    *,
    routers: Sequence[APIRouter] = (),
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The embeddings API over the Encoder that ``load()`` returns (called once, in a thread, after
    the server starts: until it has returned and a warm-up batch has run, ``/v1/health/ready`` and
    the model routes answer 503). ``routers`` are included after the built-in routes.
    ``on_load_failure(error)`` is called if loading fails (``run`` stops the server then; otherwise
    ``/v1/health/live`` answers 503)."""
    settings = settings or Settings()
    metrics = Metrics()
    svc = EmbeddingService(load, settings, metrics, on_load_failure)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.random_weights:
            log.warning(RANDOM_WEIGHTS_WARNING)
        loading = asyncio.get_running_loop().create_task(svc.start(), name="nvclip-load")
        try:
            yield
        finally:
            loading.cancel()  # a load still running is finished and closed by close()
            await asyncio.gather(loading, return_exceptions=True)
            await svc.close()

    app = FastAPI(
        title="nvclip-fast",
        version=__version__,
        description="CLIP embeddings of texts and images: NV-CLIP NIM- and OpenAI-compatible.",
        lifespan=lifespan,
    )
    app.state.service = svc
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [_validation_message(e) for e in error.errors()]
        message = "; ".join(f"{param}: {msg}" for param, msg in problems)
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type and request.method == "POST":  # FastAPI parses JSON bodies only
            message = (
                f"the body must be JSON, sent with Content-Type: application/json (got {content_type!r})"
            )
        return error_response(ApiError(422, message, code="invalid_request", param=problems[0][0]))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = http.HTTPStatus(error.status_code).phrase.lower().replace(" ", "_")
        return error_response(
            ApiError(error.status_code, str(error.detail), code=code, headers=dict(error.headers or {}))
        )

    api = APIRouter(responses=ERROR_RESPONSES)

    @api.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(body: EmbeddingRequest, svc: Service) -> Response:
        """Embeddings of texts and images (data URLs), one row per input, in input order."""
        name = svc.model_name
        if body.model is not None and body.model != name:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here; this server serves {name!r}",
                code="model_not_found",
                param="model",
            )
        dim = svc.encoder.dim
        if body.dimensions is not None and body.dimensions != dim:
            raise ApiError(
                400,
                f"dimensions: {name} gives {dim}-d embeddings and cannot shorten them; got {body.dimensions}",
                code="dimensions_unsupported",
                param="dimensions",
            )
        items = body.items()
        if len(items) > settings.max_items:
            raise ApiError(
                422,
                f"input has {len(items)} items, over the limit of {settings.max_items} per request",
                code="too_many_items",
                param="input",
            )
        result = await svc.embed(items)
        if body.encoding_format == "base64":
            values: list[Any] = [
                base64.b64encode(row.astype(_FLOAT32_LE).tobytes()).decode() for row in result.rows
            ]
        else:
            values = result.rows.tolist()
        response = EmbeddingResponse.model_construct(
            data=[Embedding.model_construct(index=i, embedding=v) for i, v in enumerate(values)],
            model=name,
            usage=Usage(
                num_images=result.num_images,
                prompt_tokens=result.prompt_tokens,
                total_tokens=result.prompt_tokens,
            ),
        )
        return Response(response.model_dump_json(), media_type="application/json")

    @api.get("/v1/models", response_model=ModelList)
    async def models(svc: Service) -> ModelList:
        """The served model (OpenAI's list shape), with its embedding size and image size."""
        encoder = svc.encoder
        card = ModelCard(
            id=svc.model_name,
            created=svc.created,
            dimensions=encoder.dim,
            image_size=encoder.spec.size,
            text=svc.text_unavailable is None,
            random_weights=settings.random_weights,
            warning=RANDOM_WEIGHTS_WARNING if settings.random_weights else None,
        )
        return ModelList(data=[card])

    def health(status: int, state: str, message: str) -> JSONResponse:
        return JSONResponse(Health(status=state, message=message).model_dump(), status_code=status)

    @api.get("/v1/health/live", response_model=Health)
    async def live(svc: Service) -> JSONResponse:
        """200 while the process can serve (also while loading); 503 once loading has failed."""
        if svc.load_error is not None:
            return health(503, "failed", f"the model could not be loaded: {svc.load_error}")
        return health(200, "live", "Service is live.")

    @api.get("/v1/health/ready", response_model=Health)
    async def ready(svc: Service) -> JSONResponse:
        """200 once the model is loaded and warmed up; 503 before, after a failed load, and while
        shutting down."""
        if svc.ready:
            return health(200, "ready", "Service is ready.")
        if svc.load_error is not None:
            return health(503, "failed", f"the model could not be loaded: {svc.load_error}")
        if svc.stopping:
            return health(503, "stopping", "Service is shutting down.")
        return health(503, "loading", "The model is loading.")

    @api.get("/v1/metrics", response_class=Response)
    async def metrics_text() -> Response:
        """Prometheus text format."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.include_router(api)
    for router in routers:
        app.include_router(router)

    route_paths: set[str] = set()

    def known_routes() -> set[str]:
        if not route_paths:
            route_paths.update(app.openapi()["paths"])
        return route_paths

    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=known_routes)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: any free port; IPv6 when ``host`` has a ':')."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def run(
    load: Callable[[], Encoder],
    settings: Settings | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    routers: Sequence[APIRouter] = (),
    access_log: bool = False,
    log_level: str = "info",
) -> int:
    """Serve until SIGTERM or SIGINT: in-flight requests finish (up to ``settings.drain_timeout_s``),
    then the Encoder is closed. Prints ``listening on http://HOST:PORT`` (the bound port, also for
    ``port=0``) to stdout once the socket is bound (OSError if it cannot be). Returns 1 when the
    model could not be loaded, else 0 (after a signal, uvicorn re-raises it once shut down, as a
    process manager expects)."""
    import uvicorn

    settings = settings or Settings()
    # Images over Pillow's limit are refused with 413 before decoding; its warning would only be noise.
    from PIL import Image

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)

    def stop(error: BaseException) -> None:  # nothing to serve: shut down (run returns 1)
        server.should_exit = True

    app = create_app(load, settings, routers=routers, on_load_failure=stop)
    # uvicorn's logging, with this package's loggers ("nvclip_fast.*") printed like its own.
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["nvclip_fast"] = {
        "handlers": ["default"],
        "level": log_level.upper(),
        "propagate": False,
    }
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        access_log=access_log,
        log_level=log_level,
        log_config=log_config,
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    server = uvicorn.Server(config)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"nvclip-fast serve: listening on http://{shown}:{sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])
    if app.state.service.load_error is not None:
        print(
            f"nvclip-fast serve: error: the model could not be loaded: {app.state.service.load_error}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return 0
