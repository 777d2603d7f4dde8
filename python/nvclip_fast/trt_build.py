"""TensorRT engines from the exported ONNX towers, with the ``tensorrt`` Python API (10.x and 11.x).

``tensorrt`` is imported lazily: this module imports without it, says why a build cannot run
(``unavailable_reason``), and writes the equivalent ``trtexec`` command lines (``trtexec_command``).

Precision follows the ONNX graph. fp16 graphs (open_clip ``precision='fp16'``: fp16 weights with
fp32 casts around every LayerNorm and the final L2 normalization) are built as *strongly typed*
networks (the STRONGLY_TYPED network flag, in every 10.x and 11.x): the only kind TensorRT 11
builds, and on 10.x the way to keep those fp32 islands in fp32 (weak typing with the FP16 flag may
run them in fp16, the LayerNorm / L2-normalize overflow traps of NVIDIA/TensorRT#2781 and #1954).
fp32 graphs build with TF32 off, so "fp32" means fp32.

A *version-compatible* plan (``EngineSpec.version_compatible``: the VERSION_COMPATIBLE builder
flag, trtexec's ``--versionCompatible``) also runs with later TensorRT versions of the same major
and with the lean and dispatch runtimes, which run nothing else; it may be slower.

The ``tensorrt`` calls are checked the way the bindings fail: ``IOptimizationProfile.set_shape``
raises RuntimeError, ``add_optimization_profile`` returns -1, ``create_timing_cache`` returns None
for a cache it cannot read, ``build_serialized_network`` returns None.
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
    "engine_specs",
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
    version_compatible: bool = False

    def shape_at(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.input_shape)


@dataclass(frozen=True)
class EngineBuild:
    plan: Path
    tensorrt_version: str
    gpu: str
    seconds: float
    strongly_typed: bool
    version_compatible: bool


def engine_specs(
    meta: metadata.Metadata, paths: metadata.BundlePaths, version_compatible: bool = False
) -> dict[str, EngineSpec]:
    """The plan of each tower a sidecar describes: its ONNX, input and batch profile, written to the
    bundle's ``.plan`` names (``paths``)."""
    return {
        tower: EngineSpec(
            onnx=paths.onnx[tower],
            plan=paths.plan[tower],
            input_name=spec.input.name,
            input_shape=tuple(int(d) for d in spec.input.shape[1:]),
            batch=spec.batch,
            precision=meta.precision,
            version_compatible=version_compatible,
        )
        for tower, spec in meta.towers.items()
    }


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
    if spec.version_compatible:
        cmd.append("--versionCompatible")
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
    strongly_typed = _major(trt) >= TRT11_MAJOR or spec.precision == "fp16"
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(spec.onnx)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT could not parse {spec.onnx}:\n{errors}\n{logger.tail()}")

    config = builder.create_builder_config()
    if spec.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    if spec.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    profile = builder.create_optimization_profile()
    b = spec.batch
    shapes = (spec.shape_at(b.min), spec.shape_at(b.opt), spec.shape_at(b.max))
    try:
        profile.set_shape(spec.input_name, *shapes)
    except RuntimeError as e:
        raise TensorRTBuildError(
            f"{spec.onnx}: TensorRT refused the profile {shapes} of '{spec.input_name}': {e}"
        ) from e
    if config.add_optimization_profile(profile) < 0:
        raise TensorRTBuildError(
            f"{spec.onnx}: TensorRT refused the optimization profile {shapes} of '{spec.input_name}':\n"
            f"{logger.tail()}"
        )
    _use_timing_cache(config, timing_cache)

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
        version_compatible=spec.version_compatible,
    )


def _use_timing_cache(config: Any, path: Path | None) -> None:
    """Attach the timing cache read from ``path`` (when it exists), or a new one when there is none,
    TensorRT cannot read it (``create_timing_cache`` returns None), or it is from another device or
    version (``set_timing_cache`` returns False)."""
    blob = path.read_bytes() if path is not None and path.exists() else b""
    cache = config.create_timing_cache(blob) if blob else None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    if blob:
        print(
            f"[TensorRT] timing cache {path} is unreadable or from another device or version: "
            "starting a new one",
            file=sys.stderr,
        )
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        raise TensorRTBuildError("TensorRT could not create a new timing cache")


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
