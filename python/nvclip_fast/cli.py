"""The ``nvclip-fast`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from . import _C, __version__, build_info


def _cmd_info(args: argparse.Namespace) -> int:
    info = build_info()
    info["version"] = __version__
    info["cuda_devices"] = _C.cuda_device_count()
    if info["cuda_devices"] == 0:
        info["cuda_unavailable"] = _C.cuda_unavailable_reason()
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvclip-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nvclip-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print what this build supports (CUDA, TensorRT, SIMD) as JSON")
    info.set_defaults(run=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
