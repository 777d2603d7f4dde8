"""The ``nvclip-fast`` command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from . import _C, __version__, build_info, metadata, server
from .embed_files import CHECKPOINT_ROWS, DTYPES, Summary, classify_files, embed_files, write_predictions
from .encoder import Encoder
from .engines import AUTO_ENGINE_RULE, CPU_PRECISIONS, ENGINE_CHOICES

# Exit codes of `nvclip-fast export` (argparse itself exits 2 on malformed arguments).
EXIT_OK = 0
EXIT_ERROR = 1  # the export failed (bad weights, unknown model, download impossible, export error)
EXIT_USAGE = 2  # no weights given (or several): refused
EXIT_NO_TENSORRT = 3  # ONNX files and sidecar written, TensorRT engines not built
EXIT_PARITY = 4  # an exported tower misses the parity gate (files kept for inspection)
# `nvclip-fast embed` / `classify`: 0 every input embedded, 1 some failed (the rest still written),
# 2 the job could not run (bad arguments, no model); 130 interrupted (Ctrl-C), as shells report SIGINT.
EXIT_SOME_FAILED = 1
EXIT_INTERRUPTED = 130


def _cmd_info(args: argparse.Namespace) -> int:
    info = build_info()
    info["version"] = __version__
    info["cuda_devices"] = _C.cuda_device_count()
    if info["cuda_devices"] == 0:
        info["cuda_unavailable"] = _C.cuda_unavailable_reason()
    print(json.dumps(info, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    # Imported here: the exporter pulls in torch, open_clip and onnx, which `info` does not need.
    from .exporter import ExportError, ParityError, bundle_paths, export
    from .models import PretrainedUnavailableError, WeightsRequiredError
    from .trt_build import TensorRTBuildError, TensorRTUnavailableError

    def fail(message: str, code: int) -> int:
        print(f"nvclip-fast export: error: {message}", file=sys.stderr)
        return code

    try:
        export(
            args.model,
            args.output,
            weights=args.weights,
            pretrained=args.pretrained,
            random_weights=args.random_weights,
            image_size=args.image_size,
            precision=args.precision,
            max_batch=args.max_batch,
            opt_batch=args.opt_batch,
            text=args.text,
            verify=args.verify,
            timing_cache=args.timing_cache,
            version_compatible=args.version_compatible,
        )
    except WeightsRequiredError as e:
        return fail(f"{e}. Refusing to export random embeddings by accident.", EXIT_USAGE)
    except TensorRTUnavailableError as e:
        paths = bundle_paths(args.output)
        print(
            f"nvclip-fast export: error: {e}\nThe ONNX files and {paths.sidecar} were written; build the "
            "engines where TensorRT runs with:",
            file=sys.stderr,
        )
        for command in e.commands:
            print(shlex.join(command))
        return EXIT_NO_TENSORRT
    except ParityError as e:
        return fail(str(e), EXIT_PARITY)
    # ValueError covers bad arguments and the models' UnknownModelError / CheckpointError.
    except (ValueError, FileNotFoundError, PretrainedUnavailableError, ExportError, TensorRTBuildError) as e:
        return fail(str(e), EXIT_ERROR)
    print(bundle_paths(args.output).sidecar)
    return EXIT_OK


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="open_clip weights -> ONNX towers (+ TensorRT plans) + sidecar, checked against open_clip",
        description="Export an open_clip (or NVCLIP) model's image and text towers to ONNX and, for a .plan "
        "output, TensorRT engines; write the metadata sidecar; check the outputs against open_clip. "
        f"Exit codes: {EXIT_OK} ok, {EXIT_ERROR} failed, {EXIT_USAGE} no weights, {EXIT_NO_TENSORRT} "
        f"ONNX written but no TensorRT, {EXIT_PARITY} parity gate failed.",
    )
    p.add_argument(
        "model", help="open_clip model name (e.g. ViT-H-14) or NVCLIP name (e.g. ViT-H-14-SigLIP-CLIPA-224)"
    )
    p.add_argument(
        "-o", "--output", required=True, help="OUT.onnx (ONNX + sidecar) or OUT.plan (also TensorRT engines)"
    )
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", metavar="FILE", help="checkpoint: .pt/.pth/.bin/.ckpt/.safetensors")
    weights.add_argument("--pretrained", metavar="TAG", help="open_clip pretrained tag (downloaded)")
    weights.add_argument("--random-weights", action="store_true", help="random weights: for tests only")
    p.add_argument("--image-size", type=int, metavar="N", help="image size (default: the checkpoint's)")
    p.add_argument("--precision", choices=metadata.PRECISIONS, default="fp32")
    p.add_argument(
        "--max-batch",
        type=int,
        default=metadata.DEFAULT_MAX_BATCH,
        metavar="N",
        help=f"largest batch of the engines ({metadata.DEFAULT_MAX_BATCH})",
    )
    p.add_argument(
        "--opt-batch", type=int, metavar="N", help="batch TensorRT tunes for (default: --max-batch)"
    )
    p.add_argument("--no-text", dest="text", action="store_false", help="export the image tower only")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check")
    p.add_argument(
        "--timing-cache", metavar="FILE", help="TensorRT timing cache, read if present and updated"
    )
    p.add_argument(
        "--version-compatible",
        action="store_true",
        help="build plans that later TensorRT versions (same major) and the lean/dispatch runtimes run",
    )
    p.set_defaults(run=_cmd_export)


def _job_fail(command: str, e: BaseException) -> int:
    print(f"nvclip-fast {command}: error: {e}", file=sys.stderr)
    return EXIT_USAGE


def _job_encoder(args: argparse.Namespace) -> Encoder:
    """The Encoder of an ``embed`` / ``classify`` job (closed by the job's ``with``)."""
    return Encoder(
        args.model, device=args.device, max_batch=args.batch, engine=args.engine, precision=args.precision
    )


def _summary(summary: Summary, encoder: Encoder) -> str:
    """The job's summary line, and what ran it."""
    return f"{summary.line()} [{encoder.engine} {encoder.precision} on {encoder.device}]"


def _cmd_embed(args: argparse.Namespace) -> int:
    try:
        with _job_encoder(args) as encoder:
            summary = embed_files(
                args.inputs,
                encoder,
                args.output,
                batch=args.batch,
                workers=args.workers,
                dtype=args.dtype,
                resume=args.resume,
                progress=False if args.no_progress else None,
                checkpoint_rows=args.checkpoint_rows,
            )
    except KeyboardInterrupt:
        print(
            "nvclip-fast embed: interrupted; finished rows are kept for --resume, the output was not written",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except (ValueError, OSError, _C.EngineError, ImportError) as e:  # OSError: no such file, write errors
        return _job_fail("embed", e)
    print(_summary(summary, encoder), file=sys.stderr)
    return EXIT_OK if summary.ok else EXIT_SOME_FAILED


def _labels(text: str) -> list[str]:
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return [label.strip() for label in text.split(",") if label.strip()]


def _cmd_classify(args: argparse.Namespace) -> int:
    try:
        labels = _labels(args.labels)
        with _job_encoder(args) as encoder:
            predictions, summary = classify_files(
                args.inputs,
                encoder,
                labels,
                templates=args.template,
                top_k=args.top_k,
                batch=args.batch,
                workers=args.workers,
                progress=False if args.no_progress else None,
            )
        if args.output:
            write_predictions(args.output, predictions)
    except KeyboardInterrupt:
        print("nvclip-fast classify: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, _C.EngineError, ImportError) as e:
        return _job_fail("classify", e)
    if not args.output:
        for p in predictions:
            shown = (
                p.error
                if p.error
                else ", ".join(f"{label} {prob:.4f}" for label, prob in zip(p.labels, p.probs, strict=True))
            )
            print(f"{p.id}\t{shown}")
    print(_summary(summary, encoder), file=sys.stderr)
    return EXIT_OK if summary.ok else EXIT_SOME_FAILED


def add_cpu_engine_options(p: argparse.ArgumentParser) -> None:
    """``--engine`` and ``--precision`` for a bundle's ONNX towers on the CPU (Encoder's options)."""
    p.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default="auto",
        help=f"what runs an .onnx bundle on the CPU (default auto: {AUTO_ENGINE_RULE})",
    )
    p.add_argument(
        "--precision",
        choices=CPU_PRECISIONS,
        help="a bundle's arithmetic on the CPU: fp32 (the default for fp32 bundles: exact with open_clip) "
        "or bf16 (OpenVINO, CPUs with native bf16: about 2x faster, checked against fp32 at load)",
    )


def _add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, directories (recursive), @list.txt (one path per line), .tar shards",
    )
    p.add_argument(
        "-m", "--model", required=True, help="exported bundle: MODEL.plan, MODEL.onnx or MODEL.json"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    add_cpu_engine_options(p)
    p.add_argument("--batch", type=int, metavar="N", help="images per engine batch (default: the engine's)")
    p.add_argument("--workers", type=int, metavar="N", help="decoding threads (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary line stays)")


def _add_embed_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed images (files, folders, @lists, tar shards) into Parquet or .npy, rows in input order",
        description="Embed every image named by the inputs. Bad inputs are skipped and listed with their "
        f"reason in OUT.errors.jsonl. Exit codes: {EXIT_OK} all embedded, {EXIT_SOME_FAILED} some failed, "
        f"{EXIT_USAGE} the job could not run, {EXIT_INTERRUPTED} interrupted (rerun with --resume).",
    )
    _add_job_options(p)
    p.add_argument("-o", "--output", required=True, help="OUT.parquet or OUT.npy (+ OUT.paths.txt)")
    p.add_argument("--dtype", choices=DTYPES, default=DTYPES[0], help="stored embedding type")
    p.add_argument(
        "--resume", action="store_true", help="skip images already in OUT or saved by an interrupted run"
    )
    p.add_argument(
        "--checkpoint-rows",
        type=int,
        default=CHECKPOINT_ROWS,
        metavar="N",
        help=f"save finished rows for --resume every N rows (default {CHECKPOINT_ROWS}; also on Ctrl-C)",
    )
    p.set_defaults(run=_cmd_embed)

    c = sub.add_parser(
        "classify",
        help="zero-shot classification of images against text labels",
        description="Prompt-ensembled zero-shot classification: each label's templates are embedded, "
        "averaged and renormalized; probabilities are the softmax of logit_scale x cosine.",
    )
    _add_job_options(c)
    c.add_argument("--labels", required=True, help='comma-separated labels ("cat,dog,car") or @labels.txt')
    c.add_argument(
        "--template",
        action="append",
        metavar="TEXT",
        help='prompt template with {} for the label (repeat to ensemble; default "a photo of a {}.")',
    )
    c.add_argument("--top-k", type=int, default=5, metavar="K", help="labels shown per image (default 5)")
    c.add_argument("-o", "--output", help="write JSON lines {path, labels, probs} instead of printing")
    c.set_defaults(run=_cmd_classify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvclip-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nvclip-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print what this build supports (CUDA, TensorRT, SIMD) as JSON")
    info.set_defaults(run=_cmd_info)
    _add_export_parser(sub)
    _add_embed_parsers(sub)
    server.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
