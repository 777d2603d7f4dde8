"""Engines written in Python, plugged into the native BatchQueue / EngineRunner through ``_C.Engine``.

- :class:`OnnxEngine`: one ONNX tower under ONNX Runtime (CPU; the CUDA execution provider where
  onnxruntime-gpu is installed).
- :class:`TorchEngine`: one open_clip tower in PyTorch (GPU without TensorRT, or CPU).

TensorRT plans run natively (``_C.TrtEngine``). The queue calls ``enqueue`` once per batch from a
slot thread, holding the GIL for that call only. CPU engines get numpy views; CUDA engines get
objects with ``__cuda_array_interface__`` and the slot's CUDA stream, on which their work must be
ordered.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import numpy as np

from . import _C, metadata
from ._C import EngineError

# ONNX Runtime element types -> numpy dtype names.
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}
# The exporter's default profile: batches up to DEFAULT_MAX_BATCH, tuned for the largest.
DEFAULT_BATCH = metadata.BatchProfile(1, metadata.DEFAULT_MAX_BATCH, metadata.DEFAULT_MAX_BATCH)
NATIVE_DYNAMIC_BATCH = -1  # how the native TensorSpec writes a dynamic batch axis


def native_tensor(name: str, dtype: str, shape: tuple) -> _C.TensorSpec:
    """A native TensorSpec of a shape written as in the sidecar: the one place where its dynamic batch
    axis (``metadata.BATCH_DIM``) becomes the native one (-1)."""
    return _C.TensorSpec(name, dtype, [NATIVE_DYNAMIC_BATCH if d == metadata.BATCH_DIM else d for d in shape])


def _profile(batch: metadata.BatchProfile | None) -> tuple[int, int, int]:
    b = batch or DEFAULT_BATCH
    return (b.min, b.opt, b.max)


def _onnx_shape(shape: list[Any], where: str) -> tuple[int | str, ...]:
    """An ONNX shape with a symbolic batch written ``metadata.BATCH_DIM``; a fixed batch (a graph
    exported with batch 1, say) stays fixed; other dimensions must be fixed."""
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else metadata.BATCH_DIM
    for d in shape[1:]:
        if not isinstance(d, int) or d <= 0:
            raise EngineError(f"{where}: only the batch dimension may be dynamic, got shape {shape}")
    return (batch, *shape[1:])


def ort_session_options(precision: str, threads: int | None) -> Any:
    """ONNX Runtime session options for one of our towers.

    fp16 graphs run with graph optimizations off: ONNX Runtime 1.32's CPU graph optimizer crashes
    (SIGSEGV) on open_clip's fp16 graphs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if precision == "fp16":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


def cuda_provider_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxEngine(_C.Engine):
    """An ONNX tower (one input, one output) under ONNX Runtime."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        device_index: int = 0,
        precision: str = "fp32",
        threads: int | None = None,
        batch: metadata.BatchProfile | None = None,
    ):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("ONNX models need onnxruntime: pip install 'nvclip-fast[onnx]'") from e
        if device == "cuda" and not cuda_provider_available():
            raise EngineError(
                "device='cuda' for an ONNX model needs onnxruntime-gpu (CUDAExecutionProvider); use a "
                "TensorRT .plan, Encoder.from_open_clip(..., device='cuda'), or device='cpu'"
            )
        providers: list[Any] = (
            [("CUDAExecutionProvider", {"device_id": device_index})]
            if device == "cuda"
            else ["CPUExecutionProvider"]
        )
        try:
            self._session = ort.InferenceSession(
                os.fspath(path), ort_session_options(precision, threads), providers=providers
            )
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile, ...)
            raise EngineError(f"ONNX Runtime cannot load {os.fspath(path)!r}: {e}") from e
        specs = []
        for kind, values in (("input", self._session.get_inputs()), ("output", self._session.get_outputs())):
            if len(values) != 1:
                raise EngineError(f"{os.fspath(path)}: expected one {kind}, got {[v.name for v in values]}")
            v = values[0]
            if v.type not in _ORT_DTYPES:
                raise EngineError(f"{os.fspath(path)}: {kind} {v.name!r} has unsupported type {v.type}")
            specs.append(native_tensor(v.name, _ORT_DTYPES[v.type], _onnx_shape(v.shape, f"{path} {kind}")))
        fixed = specs[0].shape[0]
        profile = (fixed, fixed, fixed) if fixed > 0 else _profile(batch)  # the queue pads to a fixed batch
        super().__init__(_C.EngineInfo([specs[0]], [specs[1]], profile, device, device_index))
        self._input, self._output = specs[0].name, specs[1].name
        self._device_index = device_index
        # On the CPU one run at a time: the queue's slots then overlap preprocessing with the engine
        # instead of running two batches on the same cores, each with its own (spinning) intra-op
        # threads. Measured (benchmarks/bench_embed.py, ViT-S-32, 2 cores, 2 slots): 60 -> 68 img/s.
        self._cpu_run_lock = threading.Lock()

    def enqueue(self, batch: int, inputs: dict[str, Any], outputs: dict[str, Any], stream: int) -> None:
        if self.info.device == "cpu":
            with self._cpu_run_lock:
                outputs[self._output][...] = self._session.run(
                    [self._output], {self._input: inputs[self._input]}
                )[0]
            return
        # CUDA provider: ONNX Runtime works on its own stream, so wait for the slot's stream first
        # (preprocessing wrote the input there); run_with_iobinding returns after its own work.
        _C.cuda_stream_synchronize(stream)
        binding = self._session.io_binding()
        for name, array, bind in (
            (self._input, inputs[self._input], binding.bind_input),
            (self._output, outputs[self._output], binding.bind_output),
        ):
            bind(name, "cuda", self._device_index, np.dtype(array.dtype), list(array.shape), array.ptr)
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # the queue copies the output next, on the slot's stream


class TorchEngine(_C.Engine):
    """One tower of an open_clip model in PyTorch: ``encode_image`` / ``encode_text``, output
    L2-normalized in float32 (as the exported towers are)."""

    def __init__(
        self,
        model: Any,
        tower: str,
        *,
        embed_dim: int,
        input_shape: tuple[int, ...],
        input_dtype: str,
        device: str = "cpu",
        device_index: int = 0,
        batch: metadata.BatchProfile | None = None,
    ):
        import torch

        if tower not in metadata.TOWER_TENSOR_NAMES:
            raise ValueError(f"tower must be one of {list(metadata.TOWER_TENSOR_NAMES)}, got {tower!r}")
        in_name, out_name = metadata.TOWER_TENSOR_NAMES[tower]
        super().__init__(
            _C.EngineInfo(
                [native_tensor(in_name, input_dtype, (metadata.BATCH_DIM, *input_shape))],
                [native_tensor(out_name, metadata.OUTPUT_DTYPE, (metadata.BATCH_DIM, embed_dim))],
                _profile(batch),
                device,
                device_index,
            )
        )
        self._torch = torch
        self._model = model
        self._encode = model.encode_image if tower == "image" else model.encode_text
        self._in, self._out = in_name, out_name
        self._device = torch.device(device, device_index) if device == "cuda" else torch.device("cpu")
        self._cpu_run_lock = threading.Lock()  # one CPU run at a time, as OnnxEngine (see there)

    def _forward(self, x: Any) -> Any:
        torch = self._torch
        with torch.inference_mode():
            features = self._encode(x).float()
            return torch.nn.functional.normalize(features, dim=-1)

    def enqueue(self, batch: int, inputs: dict[str, Any], outputs: dict[str, Any], stream: int) -> None:
        torch = self._torch
        if self.info.device == "cpu":
            with warnings.catch_warnings():  # the queue's input view is read-only; torch only reads it
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                x = torch.from_numpy(inputs[self._in])
            with self._cpu_run_lock:
                outputs[self._out][...] = self._forward(x).numpy()
            return
        # Everything on the slot's stream: ordered after the preprocessing that wrote the input,
        # and before the queue's copy of the output.
        with torch.cuda.device(self._device), torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            x = torch.as_tensor(inputs[self._in], device=self._device)
            out = torch.as_tensor(outputs[self._out], device=self._device)
            out.copy_(self._forward(x))
