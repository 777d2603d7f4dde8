"""What the ``nvclip-fast`` commands share: the layout of their help (plain text, and an example
block for every command) and the model options (``-m MODEL`` with ``--pretrained``, ``--weights``
or ``--random-weights``), turned into an Encoder in one place (:func:`encoder_loader`).

Light to import: the Encoder (and with it the native module) is imported when a model is opened.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import metadata
from .engines import AUTO_ENGINE_RULE, CPU_PRECISIONS, ENGINE_CHOICES

if TYPE_CHECKING:
    from .encoder import Encoder

PROG = "nvclip-fast"
HELP_WIDTH = 88
# The --device forms (nvclip_fast.devices): several devices run one image engine each behind one queue.
DEVICES = "auto, cpu, cuda, cuda:N, or several: cuda:0,1, cuda:all, cpu,cpu (CPU replicas share --threads)"
BUNDLE_SUFFIXES = (metadata.PLAN_SUFFIX, metadata.ONNX_SUFFIX, metadata.SIDECAR_SUFFIX)
# --precision: the export's (fp32, fp16) and the CPU's (fp32, bf16).
PRECISIONS = (*metadata.PRECISIONS, *(p for p in CPU_PRECISIONS if p not in metadata.PRECISIONS))


def help_text(*paragraphs: str) -> str:
    """Paragraphs wrapped for a terminal, blank lines between them."""
    return "\n\n".join(textwrap.fill(p, HELP_WIDTH) for p in paragraphs)


def examples(*lines: str) -> str:
    """An ``examples:`` block (argparse epilog): commands as typed, ``#`` lines as comments."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    *,
    help: str,
    description: Sequence[str],
    example_lines: Sequence[str],
) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` is plain text: the description, the options, the examples."""
    return sub.add_parser(
        name,
        help=help,
        description=help_text(*description),
        epilog=examples(*example_lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``-m MODEL`` with its weights, precision, engine, device and thread options."""
    p.add_argument(
        "-m",
        "--model",
        required=True,
        metavar="MODEL",
        help="an exported bundle, named by its stem or any of its files (vith, vith.json, vith.plan, "
        "vith.onnx), or an open_clip / NVCLIP model name with --pretrained, --weights or --random-weights "
        "(nvclip-fast models lists them; the bundle is built once into the cache)",
    )
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", metavar="TAG", help="model names: an open_clip pretrained tag")
    weights.add_argument(
        "--weights", metavar="FILE", help="model names: a checkpoint (.pt/.pth/.bin/.ckpt/.safetensors)"
    )
    weights.add_argument(
        "--random-weights",
        action="store_true",
        help="model names: seeded random weights (the same every run): meaningless embeddings, for tests",
    )
    p.add_argument(
        "--image-size", type=int, metavar="N", help="model names: image size (default: the weights' own)"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="the engines' arithmetic: fp32 (the default for model names and fp32 bundles: exact with "
        "open_clip); fp16 (model names, for GPUs: exported in fp16); bf16 (on the CPU: an fp32 bundle or "
        "model run in bf16 by OpenVINO, about 2x faster, where the CPU has native bf16; checked against "
        "fp32 when loaded)",
    )
    p.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default="auto",
        help=f"what runs ONNX towers on the CPU (default auto: {AUTO_ENGINE_RULE})",
    )
    p.add_argument("--device", default="auto", help=f"{DEVICES} (default auto: a GPU where there is one)")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for the CPU engine and preprocessing (default: one per core)",
    )


def encoder_loader(args: argparse.Namespace, *, text: bool | None, **queue: Any) -> Callable[[], Encoder]:
    """What ``-m MODEL`` and its options mean, as a function that opens the Encoder (called later:
    the server opens it in its loading thread). The one place that maps the command line to an Encoder:

    - an open_clip / NVCLIP model name with ``--pretrained``, ``--weights`` or ``--random-weights``:
      ``Encoder.from_pretrained`` (the bundle cache; ``text`` as there);
    - otherwise an exported bundle: ``Encoder(path)``.

    ``queue``: further Encoder options (``max_batch``, ...); None values (and the default engine)
    are left out. Raises
    ValueError at once (before anything is loaded) for a combination that cannot work, and
    FileNotFoundError for a bundle that is not there."""
    from .bundle import locate_bundle
    from .encoder import Encoder

    given = {"threads": args.threads, "engine": None if args.engine == "auto" else args.engine, **queue}
    options: dict[str, Any] = {"device": args.device, **{k: v for k, v in given.items() if v is not None}}
    image_size = getattr(args, "image_size", None)
    names_a_file = Path(args.model).suffix.lower() in BUNDLE_SUFFIXES
    if args.pretrained or args.weights or args.random_weights:
        if names_a_file:
            raise ValueError(
                f"{args.model} is a bundle file: --pretrained, --weights and --random-weights go with a "
                "model name (nvclip-fast models lists them)"
            )
        return lambda: Encoder.from_pretrained(
            args.model,
            pretrained=args.pretrained,
            weights=args.weights,
            random_weights=args.random_weights,
            image_size=image_size,
            precision=args.precision or "fp32",
            text=text,
            progress=False if getattr(args, "no_progress", False) else None,
            **options,
        )
    if args.precision not in (None, *CPU_PRECISIONS) or image_size is not None:
        raise ValueError(
            "--precision fp16 and --image-size go with a model name; a bundle's are fixed when it is "
            "exported (it runs in fp32, or bf16 on the CPU)"
        )
    try:
        locate_bundle(args.model)
    except FileNotFoundError as e:
        if names_a_file:
            raise
        raise FileNotFoundError(
            f"{e}. For an open_clip model name give --pretrained TAG, --weights FILE or --random-weights "
            "(nvclip-fast models lists the names and their tags)"
        ) from e
    if args.precision is not None:
        options["precision"] = args.precision
    return lambda: Encoder(args.model, **options)
