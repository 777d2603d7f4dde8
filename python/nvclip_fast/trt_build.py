"""TensorRT engines from the exported ONNX towers, with the ``tensorrt`` Python API (10.x and 11.x).

``tensorrt`` is imported lazily: this module imports without it, says why a build cannot run
(``unavailable_reason``), and writes the equivalent ``trtexec`` command lines (``trtexec_command``).

Precision follows the ONNX graph. fp16 graphs (open_clip ``precision='fp16'``: fp16 weights with
fp32 casts around every LayerNorm and the final L2 normalization) are built as *strongly typed*
networks: the only kind TensorRT 11 builds, and on 10.x the way to keep those fp32 islands in fp32
(weak typing with the FP16 flag may run them in fp16, the LayerNorm / L2-normalize overflow traps of
NVIDIA/TensorRT#2781 and #1954). Where a 10.x build lacks the STRONGLY_TYPED flag, the FP16 builder
flag is used instead. fp32 graphs build with TF32 off, so "fp32" means fp32.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import metadata

__all__ = [
    "EngineBuild",
    "EngineSpec",
    "TensorRTBuildError",
    "TensorRTUnavailableError",
    "build_engine",
    "run_engine",
    "trtexec_command",
    "unavailable_reason",
]

TRTEXEC = "trtexec"
TRT11_MAJOR = 11
LOG_LINES_KEPT = 20  # TensorRT error lines quoted in an exception


class TensorRTUnavailableError(RuntimeError):
    """TensorRT (its builder) or a CUDA device is missing. ``commands`` are the equivalent ``trtexec``
    command lines for each tower, to run where TensorRT is installed."""

    def __init__(self, reason: str, commands: Sequence[Sequence[str]] = ()) -> None:
        self.reason = reason
        self.commands = [list(c) for c in commands]
        super().__init__(f"TensorRT engines not built: {reason}")


class TensorRTBuildError(RuntimeError):
    """TensorRT was found but parsing, building or running an engine failed."""


@dataclass(frozen=True)
class EngineSpec:
    """One tower to build: ONNX in, plan out, the input tensor and its batch profile."""

    onnx: Path
    plan: Path
    input_name: str
    input_shape: tuple[int, ...]  # without the batch axis
    batch: metadata.BatchProfile
    precision: str

    def shape_at(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.input_shape)


@dataclass(frozen=True)
class EngineBuild:
    plan: Path
    tensorrt_version: str
    gpu: str
    seconds: float
    strongly_typed: bool


def unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot be built here, or None when it can."""
    try:
        import tensorrt as trt
    except ImportError as e:
        return f"the tensorrt Python package is not importable ({e})"
    if not hasattr(trt, "Builder"):
        return f"tensorrt {getattr(trt, '__version__', '?')} has no Builder (a lean/dispatch runtime only)"
    try:
        import torch
    except ImportError as e:  # the exporter's own dependency; checked for a clear message
        return f"torch is needed to run engines for the parity check ({e})"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (the TensorRT builder needs a GPU)"
    return None


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(spec: EngineSpec, timing_cache: Path | None = None) -> list[str]:
    """The ``trtexec`` line that builds the same engine as ``build_engine`` (10.x and 11.x)."""
    name, b = spec.input_name, spec.batch
    cmd = [
        TRTEXEC,
        f"--onnx={spec.onnx}",
        f"--saveEngine={spec.plan}",
        f"--minShapes={name}:{_dims(spec.shape_at(b.min))}",
        f"--optShapes={name}:{_dims(spec.shape_at(b.opt))}",
        f"--maxShapes={name}:{_dims(spec.shape_at(b.max))}",
        "--skipInference",
    ]
    # --stronglyTyped: opt-in on 10.x, always on (the flag accepted) on 11.x.
    cmd.append("--stronglyTyped" if spec.precision == "fp16" else "--noTF32")
    if timing_cache is not None:
        cmd.append(f"--timingCacheFile={timing_cache}")
    return cmd


def _logger(trt: Any) -> Any:
    """A TensorRT logger that keeps errors (for exceptions) and shows warnings on stderr."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if severity in (
                trt.ILogger.Severity.INTERNAL_ERROR,
                trt.ILogger.Severity.ERROR,
                trt.ILogger.Severity.WARNING,
            ):
                print(f"[TensorRT] {msg}", file=sys.stderr)

        def tail(self) -> str:
            return "\n".join(self.errors[-LOG_LINES_KEPT:]) or "(TensorRT logged no error)"

    return Logger()


def _major(trt: Any) -> int:
    return int(str(trt.__version__).split(".", 1)[0])


def _write_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(data))
    os.replace(tmp, path)


def build_engine(spec: EngineSpec, timing_cache: Path | None = None) -> EngineBuild:
    """Parse ``spec.onnx`` from its path (so the external ``.onnx.data`` is found), build one
    optimization profile (min/opt/max batch), and write the serialized plan to ``spec.plan``.
    ``timing_cache`` is read when it exists and written back after the build (reusable across
    builds and towers on the same GPU and TensorRT version)."""
    import tensorrt as trt
    import torch

    start = time.perf_counter()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = _major(trt) >= TRT11_MAJOR
    if spec.precision == "fp16" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        strongly_typed = True
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(spec.onnx)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT could not parse {spec.onnx}:\n{errors}\n{logger.tail()}")

    config = builder.create_builder_config()
    if spec.precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)  # 10.x without strong typing
    if spec.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    b = spec.batch
    profile.set_shape(spec.input_name, spec.shape_at(b.min), spec.shape_at(b.opt), spec.shape_at(b.max))
    config.add_optimization_profile(profile)

    cache_blob = timing_cache.read_bytes() if timing_cache is not None and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_blob)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        print(
            f"[TensorRT] timing cache {timing_cache} is from another device or version: starting a new one",
            file=sys.stderr,
        )
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(
            f"TensorRT failed to build {spec.plan.name} from {spec.onnx}:\n{logger.tail()}"
        )
    _write_atomic(spec.plan, serialized)
    if timing_cache is not None:
        _write_atomic(timing_cache, config.get_timing_cache().serialize())
    return EngineBuild(
        plan=spec.plan,
        tensorrt_version=str(trt.__version__),
        gpu=torch.cuda.get_device_name(),
        seconds=time.perf_counter() - start,
        strongly_typed=strongly_typed,
    )


def run_engine(
    plan: Path, input_name: str, output_name: str, batches: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Run a plan on each input array (CUDA memory from torch) and return the outputs, for parity."""
    import tensorrt as trt
    import torch

    logger = _logger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise TensorRTBuildError(f"TensorRT could not load {plan}:\n{logger.tail()}")
    context = engine.create_execution_context()
    torch_dtypes = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
    }
    in_dtype = torch_dtypes[engine.get_tensor_dtype(input_name)]
    out_dtype = torch_dtypes[engine.get_tensor_dtype(output_name)]
    stream = torch.cuda.Stream()
    outputs = []
    for array in batches:
        x = torch.from_numpy(np.ascontiguousarray(array)).to("cuda", in_dtype)
        if not context.set_input_shape(input_name, tuple(x.shape)):
            raise TensorRTBuildError(f"{plan}: input shape {tuple(x.shape)} is outside the engine's profile")
        y = torch.empty(tuple(context.get_tensor_shape(output_name)), dtype=out_dtype, device="cuda")
        context.set_tensor_address(input_name, x.data_ptr())
        context.set_tensor_address(output_name, y.data_ptr())
        with torch.cuda.stream(stream):
            stream.wait_stream(torch.cuda.default_stream())  # x and y were written on the default stream
            if not context.execute_async_v3(stream.cuda_stream):
                raise TensorRTBuildError(f"{plan}: execute_async_v3 failed:\n{logger.tail()}")
        stream.synchronize()
        outputs.append(y.float().cpu().numpy())
    return outputs
