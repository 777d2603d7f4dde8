"""``nvclip-fast serve``: an NV-CLIP NIM- and OpenAI-compatible embeddings server over one Encoder.

    nvclip-fast serve -m vith.plan --port 8000
    nvclip-fast serve -m ViT-B-32 --pretrained laion2b_s34b_b79k

The HTTP application is :func:`create_app` (FastAPI) and :func:`run` serves it with uvicorn; both
need the ``serve`` extra (``pip install "nvclip-fast[serve]"``) and are imported on first use, so
that this module (the command's flags) stays light.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import commands, extras
from .settings import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_QUEUED,
    Settings,
)

if TYPE_CHECKING:
    from fastapi import APIRouter

    from ..encoder import Encoder
    from .app import create_app, run

__all__ = ["API_KEY_ENV", "Settings", "add_parser", "create_app", "encoder_loader", "run"]

API_KEY_ENV = "NVCLIP_FAST_API_KEY"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
EXIT_ERROR = 1  # the server could not start, or the model could not be loaded
EXIT_USAGE = 2


def encoder_loader(args: argparse.Namespace) -> Callable[[], Encoder]:
    """What ``-m MODEL`` and its options mean (:func:`nvclip_fast.commands.encoder_loader`: an
    exported bundle, or a model name built once into the bundle cache, its text tower included where
    its tokenizer can be had), as a function the server's loading thread calls. Raises ValueError
    or FileNotFoundError at once for a model that cannot be opened."""
    return commands.encoder_loader(args, text=None, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms)


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        model_name=args.model_name,
        api_key=args.api_key or None,
        max_items=args.max_items,
        max_image_bytes=args.max_image_bytes,
        max_body_bytes=args.max_body_bytes,
        max_queued=args.max_queued,
        drain_timeout_s=args.drain_timeout,
        random_weights=args.random_weights,
    )


def collection_routers(
    args: argparse.Namespace, load: Callable[[], Encoder]
) -> tuple[Callable[[], Encoder], list[APIRouter]]:
    """``--collection`` (and ``--index``): the search page's router over the collection, and a
    loader that refuses (as a load failure) a model that is not the collection's. ([] without.)"""
    if args.collection is None:
        if args.index is not None:
            raise ValueError("--index needs --collection")
        return load, []
    from ..collection import Collection, encoder_provenance
    from ..search import Index
    from ..search_page import search_router
    from .app import service

    collection = Collection.open(args.collection)
    index = Index.load(args.index) if args.index is not None else None

    def load_checked() -> Encoder:
        encoder = load()
        try:
            collection.check_model(encoder_provenance(encoder))
        except ValueError:
            encoder.close()
            raise
        return encoder

    return load_checked, [search_router(collection, lambda request: service(request).encoder, index=index)]


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        load = encoder_loader(args)
        settings = settings_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"nvclip-fast serve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        from .app import run
    except ImportError as e:
        print(f"nvclip-fast serve: error: {extras.missing_extra('serve', 'the server', e)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        load, routers = collection_routers(args, load)
    except (ValueError, OSError, ImportError) as e:  # the collection or index cannot be used
        print(f"nvclip-fast serve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(
            load,
            settings,
            host=args.host,
            port=args.port,
            routers=routers,
            access_log=args.access_log,
            log_level=args.log_level,
        )
    except OSError as e:  # the address cannot be bound
        print(f"nvclip-fast serve: error: {args.host}:{args.port}: {e}", file=sys.stderr)
        return EXIT_ERROR


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``serve`` command."""
    p = commands.add_command(
        sub,
        "serve",
        help="HTTP embeddings server (NV-CLIP NIM and OpenAI compatible): POST /v1/embeddings",
        description=[
            "Serve POST /v1/embeddings (texts and data:image/...;base64 URLs, NV-CLIP NIM's and OpenAI's "
            "schema), GET /v1/models, /v1/health/live, /v1/health/ready and /v1/metrics. Concurrent "
            "requests share engine batches. SIGTERM finishes the requests in flight, then exits.",
            f"Exit status: {EXIT_ERROR} when the model cannot be loaded or the address bound, {EXIT_USAGE} "
            "for bad arguments; after SIGTERM or SIGINT the process ends by that signal.",
        ],
        example_lines=[
            "nvclip-fast serve -m ViT-B-32 --pretrained laion2b_s34b_b79k --port 8000",
            "nvclip-fast serve -m vith.plan --model-name nvidia/nvclip --host 0.0.0.0",
            "NVCLIP_FAST_API_KEY=secret nvclip-fast serve -m vith --device cpu --threads 8",
            "nvclip-fast serve -m vith --collection photos.parquet   # and a search page at /",
        ],
    )
    commands.add_model_options(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)"
    )
    p.add_argument("--model-name", metavar="NAME", help="the name clients use (default: the model's)")
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on every route but /v1/health/* (default: ${API_KEY_ENV})",
    )
    limits = p.add_argument_group("limits")
    limits.add_argument(
        "--max-items",
        type=int,
        default=DEFAULT_MAX_ITEMS,
        metavar="N",
        help=f"inputs per request (default {DEFAULT_MAX_ITEMS}; more: 422)",
    )
    limits.add_argument(
        "--max-image-bytes",
        type=int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        metavar="N",
        help=f"bytes per image, base64-decoded (default {DEFAULT_MAX_IMAGE_BYTES}; more: 413)",
    )
    limits.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="N",
        help=f"bytes per request body, counted as it is read (default {DEFAULT_MAX_BODY_BYTES}; more: 413)",
    )
    limits.add_argument(
        "--max-queued",
        type=int,
        default=DEFAULT_MAX_QUEUED,
        metavar="N",
        help=f"images and texts accepted and not yet embedded (default {DEFAULT_MAX_QUEUED}; "
        "more: 503 with Retry-After)",
    )
    limits.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        metavar="S",
        help=f"on SIGTERM, seconds in-flight requests get to finish (default {DEFAULT_DRAIN_TIMEOUT_S:g})",
    )
    engine = p.add_argument_group("engine")
    engine.add_argument(
        "--max-batch", type=int, metavar="N", help="images per engine batch (default: the engine's)"
    )
    engine.add_argument(
        "--max-delay-ms",
        type=float,
        metavar="MS",
        help="longest wait for a batch to fill (default: the Encoder's)",
    )
    p.add_argument(
        "--collection",
        metavar="COLLECTION",
        help="also serve a search page over what embed wrote (the same model): POST /v1/search, "
        "/v1/thumbnails/ROW and a page at /",
    )
    p.add_argument("--index", metavar="INDEX", help="search this index of the collection (nvclip-fast index)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="(info)",
    )
    p.set_defaults(run=_cmd_serve)


def __getattr__(name: str) -> Any:
    # The ASGI stack is imported on first use: `nvclip-fast --help` must not need the serve extra.
    if name in ("create_app", "run"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
