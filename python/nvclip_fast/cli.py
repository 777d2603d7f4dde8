"""The ``nvclip-fast`` command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from . import _C, __version__, build_info, metadata

# Exit codes of `nvclip-fast export` (argparse itself exits 2 on malformed arguments).
EXIT_OK = 0
EXIT_ERROR = 1  # the export failed (bad weights, unknown model, download impossible, export error)
EXIT_USAGE = 2  # no weights given (or several): refused
EXIT_NO_TENSORRT = 3  # ONNX files and sidecar written, TensorRT engines not built
EXIT_PARITY = 4  # an exported tower misses the parity gate (files kept for inspection)


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
    p.set_defaults(run=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvclip-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nvclip-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print what this build supports (CUDA, TensorRT, SIMD) as JSON")
    info.set_defaults(run=_cmd_info)
    _add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
