"""Run one ONNX tower under ONNX Runtime (CPU) on saved inputs; the exporter starts this in a child
process so that a crash inside ONNX Runtime fails the parity check with a message instead of
killing the export. The session is configured as the runtime's OnnxEngine configures it.

    python _ort_worker.py MODEL.onnx INPUT_NAME INPUTS.npz OUTPUTS.npz [--precision fp32|fp16]

Every array in INPUTS.npz is run separately; OUTPUTS.npz gets the first output under the same key.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnxruntime as ort

from nvclip_fast.engines import ort_session_options


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("input_name")
    p.add_argument("inputs")
    p.add_argument("outputs")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="the graph's precision")
    args = p.parse_args(argv)
    options = ort_session_options(args.precision, threads=None)
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    with np.load(args.inputs) as inputs:
        results = {key: session.run(None, {args.input_name: inputs[key]})[0] for key in inputs.files}
    np.savez(args.outputs, **results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
