"""Run one ONNX tower under ONNX Runtime (CPU) on saved inputs; the exporter starts this in a child
process so that a crash inside ONNX Runtime (ORT 1.32 segfaults optimizing open_clip fp16 graphs)
fails the parity check with a message instead of killing the export.

    python _ort_worker.py MODEL.onnx INPUT_NAME INPUTS.npz OUTPUTS.npz [--no-optimize]

Every array in INPUTS.npz is run separately; OUTPUTS.npz gets the first output under the same key.
Imports numpy and onnxruntime only.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnxruntime as ort


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("input_name")
    p.add_argument("inputs")
    p.add_argument("outputs")
    p.add_argument("--no-optimize", action="store_true", help="disable all ONNX Runtime graph optimizations")
    args = p.parse_args(argv)
    options = ort.SessionOptions()
    if args.no_optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    with np.load(args.inputs) as inputs:
        results = {key: session.run(None, {args.input_name: inputs[key]})[0] for key in inputs.files}
    np.savez(args.outputs, **results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
