"""Type stub of the private extension module nvclip_fast._C."""

import enum
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypedDict, overload

import numpy as np
import numpy.typing as npt

class EngineError(RuntimeError): ...

def build_info() -> dict[str, Any]: ...
def cuda_device_count() -> int: ...
def cuda_unavailable_reason() -> str: ...

class CudaDevice(TypedDict):
    name: str
    compute_capability: str  # "9.0"

def cuda_device(device: int = 0) -> CudaDevice: ...
def tensorrt_library(library: str = "", search_dirs: Sequence[str] = ()) -> tuple[str, str, str]: ...

# --- engines -----------------------------------------------------------------------------------

DType = Literal["float32", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "bool"]

class TensorSpec:
    """An engine tensor; shape[0] == -1 is a dynamic batch. Other dimensions are fixed."""

    def __init__(self, name: str, dtype: DType, shape: Sequence[int]) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> DType: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def row_bytes(self) -> int: ...

class EngineInfo:
    """Raises ValueError when inconsistent (names, fixed dimensions, 1 <= min <= opt <= max)."""

    def __init__(
        self,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        batch: tuple[int, int, int],
        device: Literal["cpu", "cuda"] = "cpu",
        device_index: int = 0,
    ) -> None: ...
    @property
    def inputs(self) -> list[TensorSpec]: ...
    @property
    def outputs(self) -> list[TensorSpec]: ...
    @property
    def batch(self) -> tuple[int, int, int]: ...
    @property
    def device(self) -> Literal["cpu", "cuda"]: ...
    @property
    def device_index(self) -> int: ...

class CudaArray:
    """A device buffer of the queue (engine input or output), valid during one enqueue() call."""

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...
    @property
    def ptr(self) -> int: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> DType: ...
    @property
    def writeable(self) -> bool:
        """False for engine inputs. (The interface itself always says writable: PyTorch rejects
        read-only ones.)"""
    @property
    def stream(self) -> int: ...
    @property
    def device(self) -> int: ...

class Engine:
    """Subclass in Python and implement enqueue() to run inside a BatchQueue.

    enqueue is called once per batch from a queue thread holding the GIL for that call only.
    inputs/outputs map tensor names to numpy views (CPU engines; inputs read-only) or CudaArray
    objects (CUDA engines) with `batch` rows, valid during the call only. `stream` is the slot's
    cudaStream_t as an int (0 for CPU engines): order the work after it and leave it complete or
    enqueued on it. Raising fails the batch's requests with EngineError.
    """

    def __init__(self, info: EngineInfo) -> None: ...
    @property
    def info(self) -> EngineInfo: ...
    def enqueue(
        self,
        batch: int,
        inputs: dict[str, npt.NDArray[Any] | CudaArray],
        outputs: dict[str, npt.NDArray[Any] | CudaArray],
        stream: int,
    ) -> None: ...

class TrtEngine(Engine):
    """A TensorRT plan run natively. Raises EngineError (file, CUDA device, library, TensorRT's
    own errors); in a build without TensorRT headers the constructor always raises EngineError."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: int = 0,
        library: str = "",
        search_dirs: Sequence[str] = (),
    ) -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def library_path(self) -> str: ...
    @property
    def library_version(self) -> int: ...
    @property
    def context_memory_bytes(self) -> int: ...
    def warnings(self) -> list[str]: ...

class EngineRunner:
    """Runs an engine synchronously on numpy arrays, outside any BatchQueue (the text tower)."""

    def __init__(self, engine: Engine) -> None: ...
    def run(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """{input name: `batch` rows} -> {output name: rows}; batch in [1, profile max]."""
    def close(self) -> None: ...

def cuda_stream_synchronize(stream: int) -> None: ...

# --- batch queue -------------------------------------------------------------------------------

class PreprocessStage:
    """The queue's preprocessing step (uint8 images -> the engine's input tensor)."""

    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def device(self) -> Literal["cpu", "cuda"]: ...

class Request:
    """The rows of one submit() call."""

    @property
    def id(self) -> int: ...
    def __len__(self) -> int: ...
    def done(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool:
        """Wait without the GIL; False on timeout. Raises EngineError inside a completion callback
        while unresolved (it would wait for itself)."""
    @property
    def status(self) -> Literal["pending", "ok", "failed", "cancelled"]: ...
    @property
    def error(self) -> str: ...
    @property
    def item_errors(self) -> list[str]:
        """Per image: "" or why that image failed (its row is NaN; the other rows are valid).
        EngineError while pending (as for failed_items)."""
    @property
    def failed_items(self) -> int: ...
    def rows(self) -> npt.NDArray[Any]:
        """(n, *output_shape[1:]) in the output's dtype once done, whatever the status (failed rows
        NaN); EngineError while pending. The array keeps the request alive."""
    def result(self, timeout: float | None = None) -> npt.NDArray[Any]:
        """Wait, then rows(); EngineError if the request failed or was cancelled, TimeoutError."""

class ReplicaStats(TypedDict):
    device: str  # "cpu" | "cuda:N"
    batches: int  # batches this replica ran, failed ones included
    failed_batches: int
    images: int

class BatchQueueStats(TypedDict):
    batches: int  # batches run, failed ones included
    failed_batches: int
    images: int  # images run through the engine
    cancelled_images: int
    requests: int  # requests resolved
    largest_batch: int
    oversized_images: int  # images larger than the staging ring, staged on their own
    callback_failures: int
    batch_sizes: dict[int, int]  # batch size -> batches of that size run
    queued_images: int  # now: accepted images not yet in a running batch
    replicas: list[ReplicaStats]  # per replica, in the queue's order

class BatchQueue:
    """Dynamic batching of any number of callers' images onto one engine, or onto several replicas
    (engine + stage, one per device, the same model) behind one queue (see batch_queue.h)."""

    @overload
    def __init__(
        self,
        engine: Engine,
        stage: PreprocessStage,
        *,
        max_batch: int = 0,
        max_delay_ms: float = 2.0,
        streams: int = 2,
        staging_bytes: int = 0,
        output: str = "",
    ) -> None:
        """staging_bytes 0: (slots + 1) batches of 640x480 RGB photos, at least 256 MiB."""
    @overload
    def __init__(
        self,
        replicas: Sequence[tuple[Engine, PreprocessStage]],
        *,
        max_batch: int = 0,
        max_delay_ms: float = 2.0,
        streams: int = 2,
        staging_bytes: int = 0,
        output: str = "",
    ) -> None:
        """One replica per (engine, stage); each gets `streams` slots, a batch goes to the first
        free slot of any replica. max_batch 0: the smallest optimal batch of the engines."""
    def submit(
        self,
        images: Sequence[npt.NDArray[np.uint8]],
        callback: Callable[[Request], None] | None = None,
    ) -> Request:
        """Queue uint8 HWC RGB / HW gray images (packed pixels, any row stride); returns at once after
        copying them into staging (blocks without the GIL while the ring is full). callback runs
        once, on the completion thread, with the GIL. TypeError/ValueError name a malformed image's
        index (nothing queued); EngineError after close()."""
    def close(self, cancel: bool = False) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def device(self) -> Literal["cpu", "cuda"]: ...
    @property
    def devices(self) -> list[str]:
        """Each replica's device ("cpu", "cuda:N"), in the queue's order."""
    @property
    def max_batch(self) -> int: ...
    @property
    def streams(self) -> int:
        """Slots per replica."""
    @property
    def max_delay_ms(self) -> float: ...
    @property
    def staging_bytes(self) -> int: ...
    @property
    def input(self) -> TensorSpec: ...
    @property
    def output(self) -> TensorSpec: ...
    def stats(self) -> BatchQueueStats: ...
    def __enter__(self) -> BatchQueue: ...
    def __exit__(self, *args: object) -> None: ...

def _close_all_queues() -> None: ...

# resize_normalize (csrc/resize_normalize.h)
class Interpolation(enum.Enum):
    bilinear = 0
    bicubic = 1

class ResizeMode(enum.Enum):
    shortest = 0
    longest = 1
    squash = 2

class PassOrder(enum.Enum):
    pillow13 = 0
    pillow12_2 = 1
    pillow12_1 = 2

class OutputDType(enum.Enum):
    float32 = 0
    float16 = 1

class PreprocessParams:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Interpolation
    resize_mode: ResizeMode
    fill: int
    pass_order: PassOrder
    def __init__(self) -> None: ...

def plan_resize(
    height: int, width: int, params: PreprocessParams
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """open_clip's geometry per axis (y, x): (resized size, first kept, count kept, padding before)."""

class ResizeNormalizeStage(PreprocessStage):
    """The queue's preprocessing: resize_normalize into the engine input ('cpu': CPU twin on
    `threads` threads, 0 = every core; 'cuda': the kernel)."""

    def __init__(
        self, params: PreprocessParams, device: Literal["cpu", "cuda"] = "cpu", threads: int = 0
    ) -> None: ...
    @property
    def params(self) -> PreprocessParams: ...
    @property
    def threads(self) -> int: ...

def resize_normalize(
    images: Sequence[npt.NDArray[np.uint8]],
    params: PreprocessParams,
    dtype: OutputDType,
    out: npt.NDArray[Any],
    threads: int,
) -> None: ...

class ResizeNormalizeCuda:  # CUDA builds only
    def __init__(self, table_arena_bytes: int = ..., min_blocks_per_sm: Literal[1, 3] = 1) -> None: ...
    @property
    def device(self) -> int: ...
    @property
    def min_blocks_per_sm(self) -> int: ...
    def enqueue(
        self,
        images: list[tuple[int, int, int, int, int]],
        params: PreprocessParams,
        dtype: OutputDType,
        out: int,
        stream: int,
    ) -> None: ...

# The private submodule nvclip_fast._C._testing (test hooks, not API), typed as a namespace.
class _testing:
    class ResizeNormalizeEmulated:
        """The CUDA path (packing, table cache, kernel) run on the CPU."""

        def __init__(self, arena_bytes: int = ...) -> None: ...
        def enqueue(
            self,
            images: Sequence[npt.NDArray[np.uint8]],
            params: PreprocessParams,
            dtype: OutputDType,
            out: npt.NDArray[Any],
        ) -> None: ...
        @property
        def cached_tables(self) -> int: ...

    @staticmethod
    def normalize_table(params: PreprocessParams, dtype: OutputDType) -> npt.NDArray[np.uint32]: ...
    @staticmethod
    def float_to_half_bits(values: npt.ArrayLike) -> npt.NDArray[np.uint16]: ...
    @staticmethod
    def describe_cuda_unavailable(
        *,
        device_count: int = 0,
        error_name: str = "",
        error_message: str = "",
        insufficient_driver: bool = False,
        no_device: bool = False,
        driver_version: int = 0,
        runtime_version: int = 0,
        visible_devices: str | None = None,
    ) -> str: ...
