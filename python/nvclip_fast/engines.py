"""Engines written in Python, plugged into the native BatchQueue / EngineRunner through ``_C.Engine``.

- :class:`OnnxEngine`: one ONNX tower under ONNX Runtime (CPU; the CUDA execution provider where
  onnxruntime-gpu is installed).
- :class:`OpenVinoEngine`: one ONNX tower under OpenVINO on the CPU, in fp32 or (where the CPU has
  native bf16 arithmetic) bf16.
- :class:`TorchEngine`: one open_clip tower in PyTorch (GPU without TensorRT, or CPU).

:func:`cpu_engine_name` is the rule that picks the CPU engine of a bundle. TensorRT plans run
natively (``_C.TrtEngine``). The queue calls ``enqueue`` once per batch from a slot thread, holding
the GIL for that call only. CPU engines get numpy views; CUDA engines get objects with
``__cuda_array_interface__`` and the slot's CUDA stream, on which their work must be ordered.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings
from collections import Counter
from collections.abc import Sequence
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

ORT_ALLOW_SPINNING = "session.intra_op.allow_spinning"  # ONNX Runtime's session config key
# The CPU engines of an ONNX bundle (Encoder's ``engine=``; "auto" applies cpu_engine_name's rule).
ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
CPU_ENGINES = (ONNXRUNTIME, OPENVINO)
ENGINE_CHOICES = ("auto", *CPU_ENGINES)
AUTO_ENGINE_RULE = "OpenVINO for fp32 bundles where it is installed on an x86-64 CPU, else ONNX Runtime"
# The arithmetic an fp32 bundle runs in on the CPU (Encoder's ``precision=``): fp32 is exact with
# open_clip; bf16 (OpenVINO, on CPUs with native bf16 only) is checked against fp32 at load.
CPU_PRECISIONS = ("fp32", "bf16")
BF16_MIN_COSINE = 0.999
# OpenVINO's names for them. OpenVINO runs fp32 models in bf16 by itself on CPUs with AVX512_BF16 or
# AMX: the exact path pins f32.
OPENVINO_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
# THROUGHPUT: OpenVINO runs several streams (2 on 2 cores, each on its own thread), one infer
# request each, and every batch is split across them; a graph with a fixed batch runs with LATENCY
# (one stream using every thread). Measured (image towers, 2 threads, batch 32, the two alternated,
# medians): 1.08-1.26x LATENCY's images/s (ViT-S-32 and ViT-B-32, fp32 and bf16, alone and end to
# end) on a busy machine, and ViT-S-32 end to end 1.14x (fp32), 0.94x (bf16) on a quieter one.
# THROUGHPUT with one request at a time would leave all streams but one idle (half speed). A batch
# smaller than the streams runs on fewer threads.
OPENVINO_PERFORMANCE_HINT = "THROUGHPUT"
# OpenVINO pins its threads to cores by default, and every compiled model of a process (or every
# process) starting from the same core: two CPU replicas of one thread each then share one core.
# Unpinned, two ViT-S-32 models of one thread each, side by side on 2 cores, ran at 2.0-2.1x their
# pinned images/s (165-176 against 82-85), and one model on both cores the same (170-172 either way).
OPENVINO_CPU_PINNING = False
# The layers that hold a tower's arithmetic, as OpenVINO's runtime model names them.
OPENVINO_MATRIX_LAYERS = ("FullyConnected", "MatMul", "Convolution")


def native_tensor(name: str, dtype: str, shape: tuple) -> _C.TensorSpec:
    """A native TensorSpec of a shape written as in the sidecar: the one place where its dynamic batch
    axis (``metadata.BATCH_DIM``) becomes the native one (-1)."""
    return _C.TensorSpec(name, dtype, [NATIVE_DYNAMIC_BATCH if d == metadata.BATCH_DIM else d for d in shape])


def _profile(batch: metadata.BatchProfile | None) -> tuple[int, int, int]:
    b = batch or DEFAULT_BATCH
    return (b.min, b.opt, b.max)


def _onnx_shape(shape: Sequence[Any], where: str) -> tuple[int | str, ...]:
    """An ONNX shape with a symbolic batch written ``metadata.BATCH_DIM``; a fixed batch (a graph
    exported with batch 1, say) stays fixed; other dimensions must be fixed."""
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else metadata.BATCH_DIM
    for d in shape[1:]:
        if not isinstance(d, int) or d <= 0:
            raise EngineError(f"{where}: only the batch dimension may be dynamic, got shape {list(shape)}")
    return (batch, *shape[1:])


def _tower_info(
    path: str | os.PathLike[str],
    ports: dict[str, list[tuple[str, str, Sequence[Any]]]],
    batch: metadata.BatchProfile | None,
    device: str,
    device_index: int = 0,
) -> _C.EngineInfo:
    """The EngineInfo of an ONNX tower from its ports as a runtime reads them: {"input": [(name,
    dtype, shape)], "output": [...]}, one of each; a dtype we do not take is named as the runtime
    names it."""
    specs = []
    for kind, values in ports.items():
        if len(values) != 1:
            raise EngineError(f"{os.fspath(path)}: expected one {kind}, got {[v[0] for v in values]}")
        name, dtype, shape = values[0]
        if dtype not in metadata.TENSOR_DTYPES:
            raise EngineError(f"{os.fspath(path)}: {kind} {name!r} has unsupported type {dtype}")
        specs.append(native_tensor(name, dtype, _onnx_shape(shape, f"{os.fspath(path)} {kind}")))
    fixed = specs[0].shape[0]
    profile = (fixed, fixed, fixed) if fixed > 0 else _profile(batch)  # the queue pads to a fixed batch
    return _C.EngineInfo([specs[0]], [specs[1]], profile, device, device_index)


def ort_session_options(precision: str, threads: int | None) -> Any:
    """ONNX Runtime session options for one of our towers.

    Intra-op threads sleep instead of spinning between runs: the queue's preprocessing threads share
    the cores with them. Measured (ViT-S-32 and ViT-B-32 image towers, 2 cores, batch 32, the two
    alternated, medians): 1.04-1.36x the images/s with spinning, end to end and alone, on a busy
    machine; 0.99x on a quiet one. fp16 graphs run with graph optimizations off: ONNX Runtime 1.32's CPU
    graph optimizer crashes (SIGSEGV) on open_clip's fp16 graphs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry(ORT_ALLOW_SPINNING, "0")
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
        ports = {
            kind: [(v.name, _ORT_DTYPES.get(v.type, v.type), v.shape) for v in values]
            for kind, values in (
                ("input", self._session.get_inputs()),
                ("output", self._session.get_outputs()),
            )
        }
        super().__init__(_tower_info(path, ports, batch, device, device_index))
        self._input, self._output = self.info.inputs[0].name, self.info.outputs[0].name
        self._device_index = device_index
        # On the CPU one run at a time: the queue's slots then overlap preprocessing with the engine
        # instead of running two batches on the same cores, each with its own (spinning) intra-op
        # threads. Measured (benchmarks/bench_embed.py, ViT-S-32, 2 cores, 2 slots): 60 -> 68 img/s.
        self._cpu_run_lock = threading.Lock()

    def run(self, x: np.ndarray) -> np.ndarray:
        """The tower's output for one batch ``x`` (on the CPU), outside any queue."""
        with self._cpu_run_lock:
            return self._session.run([self._output], {self._input: x})[0]

    def enqueue(self, batch: int, inputs: dict[str, Any], outputs: dict[str, Any], stream: int) -> None:
        if self.info.device == "cpu":
            outputs[self._output][...] = self.run(inputs[self._input])
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


# ---- OpenVINO ---------------------------------------------------------------------------------------


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


@functools.cache
def openvino_core() -> Any:
    """The process's ``openvino.Core`` (ImportError naming the extra where OpenVINO is absent)."""
    try:
        import openvino
    except ImportError as e:
        raise ImportError("the OpenVINO engine needs openvino: pip install 'nvclip-fast[openvino]'") from e
    return openvino.Core()


def cpu_bf16_unavailable_reason() -> str | None:
    """None where this CPU has native bf16 arithmetic as OpenVINO sees it ("BF16" among its CPU
    plugin's OPTIMIZATION_CAPABILITIES: AVX512_BF16 or AMX), else why bf16 cannot run."""
    try:
        capabilities = list(openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except ImportError as e:
        return f"precision='bf16' runs on OpenVINO: {e}"
    if "BF16" not in capabilities:
        return (
            "this CPU has no native bf16 arithmetic (OpenVINO's CPU capabilities: "
            f"{', '.join(capabilities)}; bf16 needs AVX512_BF16 or AMX): use precision='fp32'"
        )
    return None


class OpenVinoEngine(_C.Engine):
    """An ONNX tower (one input, one output) under OpenVINO on the CPU, in ``precision`` arithmetic:
    "fp32" (pinned: exact with open_clip) or "bf16" (where the CPU has it natively; else EngineError).
    ``threads``: OpenVINO's inference threads (None: every core)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        precision: str = "fp32",
        threads: int | None = None,
        batch: metadata.BatchProfile | None = None,
    ):
        if precision not in CPU_PRECISIONS:
            raise ValueError(f"precision must be one of {list(CPU_PRECISIONS)}, got {precision!r}")
        core = openvino_core()
        if precision == "bf16" and (reason := cpu_bf16_unavailable_reason()) is not None:
            raise EngineError(reason)
        try:
            model = core.read_model(os.fspath(path))
            fixed_batch = model.inputs[0].get_partial_shape()[0].is_static if model.inputs else False
            config: dict[str, Any] = {
                "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION_HINTS[precision],
                "PERFORMANCE_HINT": "LATENCY" if fixed_batch else OPENVINO_PERFORMANCE_HINT,
                "ENABLE_CPU_PINNING": OPENVINO_CPU_PINNING,
            }
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            self._compiled = core.compile_model(model, "CPU", config)
            streams = int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        except RuntimeError as e:  # OpenVINO raises RuntimeError (and its subclasses) for files and graphs
            raise EngineError(f"OpenVINO cannot load {os.fspath(path)!r}: {e}") from e
        ports = {
            kind: [_openvino_port(p) for p in values]
            for kind, values in (("input", self._compiled.inputs), ("output", self._compiled.outputs))
        }
        super().__init__(_tower_info(path, ports, batch, "cpu"))
        self._output = self.info.outputs[0].name
        self._requests = [self._compiled.create_infer_request() for _ in range(max(streams, 1))]
        # One batch at a time, split across the streams (as OnnxEngine runs one at a time on the CPU).
        self._run_lock = threading.Lock()

    def _infer(self, x: np.ndarray, out: np.ndarray) -> None:
        """Run ``x`` into ``out``: consecutive slices of the batch on the streams' requests at once."""
        bounds = np.linspace(0, len(x), len(self._requests) + 1).astype(int)
        parts = [(r, a, b) for r, a, b in zip(self._requests, bounds[:-1], bounds[1:], strict=True) if b > a]
        with self._run_lock:
            started = []
            try:
                for request, a, b in parts:
                    request.start_async({0: x[a:b]}, share_inputs=True)  # reads the input in place
                    started.append(request)
            finally:
                # Every started run ends before this returns (the input is the caller's); the first
                # failure is raised after.
                failures = []
                for request in started:
                    try:
                        request.wait()
                    except RuntimeError as e:
                        failures.append(e)
            if failures:
                raise failures[0]
            for request, a, b in parts:
                out[a:b] = request.get_output_tensor(0).data

    def run(self, x: np.ndarray) -> np.ndarray:
        """The tower's output for one batch ``x``, outside any queue."""
        out = np.empty((len(x), *self.info.outputs[0].shape[1:]), self.info.outputs[0].dtype)
        self._infer(x, out)
        return out

    def enqueue(self, batch: int, inputs: dict[str, Any], outputs: dict[str, Any], stream: int) -> None:
        (x,) = inputs.values()
        self._infer(x, outputs[self._output])

    def runtime_precisions(self) -> dict[str, int]:
        """How many of the compiled tower's matrix layers (fully connected, matmul, convolution) run
        in each precision, as OpenVINO compiled them ({"f32": n} or {"bf16": n}): what really runs,
        whatever was asked."""
        counts: Counter[str] = Counter()
        for op in self._compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) in OPENVINO_MATRIX_LAYERS:
                counts[info["runtimePrecision"].astype(str)] += 1
        return dict(counts)


def _openvino_port(port: Any) -> tuple[str, str, list[int | str]]:
    """(name, numpy dtype name, shape with "?" for a dynamic dimension) of a compiled model's port."""
    shape = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
    return port.get_any_name(), port.get_element_type().to_dtype().name, shape


# ---- the CPU engine of a bundle ----------------------------------------------------------------------


def cpu_engine_name(engine: str, precision: str) -> str:
    """Which engine runs a bundle's ONNX towers on the CPU in ``precision`` ("fp32" or "fp16": as
    exported; "bf16"), for ``engine`` "auto", "onnxruntime" or "openvino".

    The rule for "auto", from measurements on an AMD EPYC (AVX-512, AVX512_BF16) with 2 threads and
    the same ONNX files, batch 32 (benchmarks/bench_cpu_engines.py): OpenVINO in fp32 ran the
    ViT-S-32 and ViT-B-32 image towers at 1.21-2.57x ONNX Runtime's images/s alone and 0.95-2.10x
    end to end (11 of 12 runs >= 1.13x), so an fp32 bundle runs on OpenVINO where it is installed
    and its CPU plugin is the x86-64 one (on other CPUs nothing was measured and ONNX Runtime
    stays); bf16 runs on OpenVINO only (ONNX Runtime's CPU provider has no bf16 arithmetic); an
    fp16 bundle runs on ONNX Runtime, under which the exporter checked it."""
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {list(ENGINE_CHOICES)}, got {engine!r}")
    if precision == "bf16":
        if engine == ONNXRUNTIME:
            raise ValueError(
                "precision='bf16' runs on OpenVINO: ONNX Runtime's CPU provider has no bf16 arithmetic"
            )
        return OPENVINO
    if engine == OPENVINO and precision not in CPU_PRECISIONS:
        raise ValueError(
            f"engine='openvino' runs fp32 bundles (in fp32 or bf16); this one was exported in {precision}: "
            "it runs on ONNX Runtime, under which the exporter checked it"
        )
    if engine != "auto":
        return engine
    if precision == "fp32" and openvino_installed() and _openvino_on_x86_64():
        return OPENVINO
    return ONNXRUNTIME


def _openvino_on_x86_64() -> bool:
    try:
        return str(openvino_core().get_property("CPU", "DEVICE_ARCHITECTURE")) == "intel64"
    except (ImportError, RuntimeError):  # no OpenVINO, or no CPU plugin for this machine
        return False


def cpu_engine(
    path: str | os.PathLike[str],
    *,
    engine: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
    batch: metadata.BatchProfile | None = None,
) -> OnnxEngine | OpenVinoEngine:
    """The engine that runs one ONNX tower on the CPU: the one :func:`cpu_engine_name` picks, built.
    A bf16 engine is not yet checked against fp32 (:func:`check_bf16` does that)."""
    if cpu_engine_name(engine, precision) == OPENVINO:
        return OpenVinoEngine(path, precision=precision, threads=threads, batch=batch)
    return OnnxEngine(path, precision=precision, threads=threads, batch=batch)


# ---- the bf16 check ------------------------------------------------------------------------------

# What a bf16 tower is checked on when it is made: built-in inputs, the same on every machine.
BF16_CHECK_IMAGE_HW = (240, 320)  # resized and cropped by the bundle's preprocessing
BF16_CHECK_SEED = 0
BF16_CHECK_TEXTS = (
    "a photo of a cat.",
    "a diagram of a neural network",
    "two dogs playing in the snow at night",
    "NVIDIA",
)


def bf16_check_images() -> list[np.ndarray]:
    """Four 320x240 RGB images made here, deterministically (no files): a colour gradient, smooth
    waves, blocks of flat colour and seeded noise; smooth areas, edges and fine texture."""
    h, w = BF16_CHECK_IMAGE_HW
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    gradient = np.stack([x / w, y / h, 1 - x / w], axis=-1)
    waves = 0.5 + 0.5 * np.stack([np.sin(x / 7), np.cos(y / 11), np.sin((x + y) / 17)], axis=-1)
    rng = np.random.default_rng(BF16_CHECK_SEED)
    blocks = np.kron(rng.random((h // 40, w // 40, 3)), np.ones((40, 40, 1)))
    noise = rng.random((h, w, 3))
    return [(255 * a).round().astype(np.uint8) for a in (gradient, waves, blocks, noise)]


def _run_rows(engine: OnnxEngine | OpenVinoEngine, x: np.ndarray) -> np.ndarray:
    """``engine``'s output for every row of ``x``, in batches its profile takes (a short last
    batch padded with its last row where the batch is fixed)."""
    smallest, _, largest = engine.info.batch
    rows = []
    for start in range(0, len(x), largest):
        chunk = x[start : start + largest]
        if len(chunk) < smallest:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], smallest - len(chunk), axis=0)])
        rows.append(engine.run(chunk)[: min(largest, len(x) - start)])
    return np.concatenate(rows)


def check_bf16(
    engine: OpenVinoEngine, path: str | os.PathLike[str], inputs: np.ndarray, *, threads: int | None = None
) -> float:
    """Hold a bf16 tower (``engine``, compiled from ``path``) to the same tower in fp32 on ``inputs``:
    the lowest cosine between their rows, or EngineError naming it where it is under
    BF16_MIN_COSINE (bf16 keeps 8 bits of mantissa; a model whose outputs move more than that
    allows is refused, not run)."""
    reference = _run_rows(OpenVinoEngine(path, precision="fp32", threads=threads), inputs)
    got = _run_rows(engine, inputs)
    cos = (got * reference).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    lowest = float(np.nan_to_num(cos, nan=-1.0).min())
    if lowest < BF16_MIN_COSINE:
        raise EngineError(
            f"{os.fspath(path)} in bf16 is too far from fp32 on the built-in check inputs: lowest cosine "
            f"{lowest:.6f} < {BF16_MIN_COSINE} (use precision='fp32')"
        )
    return lowest


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
