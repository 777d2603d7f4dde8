"""``nvclip-fast serve``: an NV-CLIP NIM- and OpenAI-compatible embeddings server over one Encoder.

    nvclip-fast serve -m vith.plan --port 8000
    nvclip-fast serve -m ViT-B-32 --pretrained laion2b_s34b_b79k --device cuda

The HTTP application is :func:`create_app` (FastAPI) and :func:`run` serves it with uvicorn; both
need the ``serve`` extra (``pip install "nvclip-fast[serve]"``) and are imported on first use, so
that this module (the command's flags) stays light.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import metadata
from ..engines import AUTO_ENGINE_RULE, CPU_PRECISIONS, ENGINE_CHOICES
from .settings import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_QUEUED,
    Settings,
)

if TYPE_CHECKING:
    from ..encoder import Encoder
    from .app import create_app, run

__all__ = ["API_KEY_ENV", "Settings", "add_parser", "create_app", "encoder_loader", "run"]

API_KEY_ENV = "NVCLIP_FAST_API_KEY"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
EXIT_ERROR = 1  # the server could not start, or the model could not be loaded
EXIT_USAGE = 2
BUNDLE_SUFFIXES = (metadata.PLAN_SUFFIX, metadata.ONNX_SUFFIX, metadata.SIDECAR_SUFFIX)
PRECISIONS = (*metadata.PRECISIONS, *(p for p in CPU_PRECISIONS if p not in metadata.PRECISIONS))


def encoder_loader(args: argparse.Namespace) -> Callable[[], Encoder]:
    """What ``-m MODEL`` and its options mean, as a function that loads the Encoder (called later,
    in the server's loading thread). The one place that maps the command line to an Encoder:

    - an exported bundle (``.plan``, ``.onnx`` or the ``.json`` sidecar): ``Encoder(path)``, with
      ``--engine`` and ``--precision`` (fp32 or bf16) for its ONNX towers on the CPU;
    - an open_clip model name with ``--pretrained TAG``, ``--weights FILE`` or ``--random-weights``:
      ``Encoder.from_open_clip`` (the open_clip model in PyTorch, ``--precision`` fp32 or fp16).

    Raises ValueError at once for a combination that cannot work."""
    from ..encoder import Encoder

    given = {"max_batch": args.max_batch, "max_delay_ms": args.max_delay_ms, "threads": args.threads}
    options: dict[str, Any] = {"device": args.device, **{k: v for k, v in given.items() if v is not None}}
    if args.pretrained or args.weights or args.random_weights:
        if args.engine != "auto":
            raise ValueError("--engine chooses what runs an .onnx bundle; open_clip models run in PyTorch")
        if args.precision not in (None, *metadata.PRECISIONS):
            raise ValueError(
                f"--precision {args.precision} runs an fp32 .onnx bundle on the CPU; open_clip models run "
                f"in {' or '.join(metadata.PRECISIONS)}"
            )
        return lambda: Encoder.from_open_clip(
            args.model,
            pretrained=args.pretrained,
            weights=args.weights,
            random_weights=args.random_weights,
            precision=args.precision or "fp32",
            **options,
        )
    path = Path(args.model)
    if path.suffix.lower() not in BUNDLE_SUFFIXES:
        raise ValueError(
            f"{args.model}: not an exported bundle ({', '.join(BUNDLE_SUFFIXES)}); for an open_clip model "
            "name give --pretrained TAG, --weights FILE or --random-weights"
        )
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if args.precision not in (None, *CPU_PRECISIONS):
        raise ValueError(
            f"--precision {args.precision} applies to open_clip models; a bundle runs as exported, or in "
            f"{' or '.join(CPU_PRECISIONS)} on the CPU"
        )
    return lambda: Encoder(path, engine=args.engine, precision=args.precision, **options)


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


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        load = encoder_loader(args)
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"nvclip-fast serve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        from .app import run
    except ImportError as e:
        print(
            f"nvclip-fast serve: error: {e}; the server needs pip install 'nvclip-fast[serve]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        return run(
            load,
            settings,
            host=args.host,
            port=args.port,
            access_log=args.access_log,
            log_level=args.log_level,
        )
    except OSError as e:  # the address cannot be bound
        print(f"nvclip-fast serve: error: {args.host}:{args.port}: {e}", file=sys.stderr)
        return EXIT_ERROR


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``serve`` command."""
    p = sub.add_parser(
        "serve",
        help="HTTP embeddings server (NV-CLIP NIM and OpenAI compatible): POST /v1/embeddings",
        description="Serve POST /v1/embeddings (texts and data:image/...;base64 URLs, NV-CLIP NIM's and "
        "OpenAI's schema), GET /v1/models, /v1/health/live, /v1/health/ready and /v1/metrics. Concurrent "
        "requests share engine batches. SIGTERM finishes the requests in flight, then exits. Exit status: "
        f"{EXIT_ERROR} when the model cannot be loaded or the address bound, {EXIT_USAGE} for bad "
        "arguments; after SIGTERM or SIGINT the process ends by that signal.",
    )
    p.add_argument(
        "-m",
        "--model",
        required=True,
        help="exported bundle (MODEL.plan, MODEL.onnx, MODEL.json), or an open_clip model name with "
        "--pretrained, --weights or --random-weights",
    )
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", metavar="TAG", help="open_clip pretrained tag (downloaded)")
    weights.add_argument("--weights", metavar="FILE", help="checkpoint: .pt/.pth/.bin/.ckpt/.safetensors")
    weights.add_argument(
        "--random-weights", action="store_true", help="random weights: meaningless embeddings, for tests only"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="open_clip models: fp32 (default) or fp16 (GPU); .onnx bundles on the CPU: fp32 (exact) or bf16 "
        "(OpenVINO, CPUs with native bf16, checked against fp32 at load)",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
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
        "--engine",
        choices=ENGINE_CHOICES,
        default="auto",
        help=f"what runs an .onnx bundle on the CPU (default auto: {AUTO_ENGINE_RULE})",
    )
    engine.add_argument(
        "--max-batch", type=int, metavar="N", help="images per engine batch (default: the engine's)"
    )
    engine.add_argument(
        "--max-delay-ms",
        type=float,
        metavar="MS",
        help="longest wait for a batch to fill (default: the Encoder's)",
    )
    engine.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: one per core)")
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
