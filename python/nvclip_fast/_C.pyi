"""Type stub of the private extension module nvclip_fast._C."""

import enum
from typing import Any

import numpy as np
import numpy.typing as npt

class EngineError(RuntimeError): ...

def build_info() -> dict[str, Any]: ...
def cuda_device_count() -> int: ...
def cuda_unavailable_reason() -> str: ...
def tensorrt_library(path: str = "") -> tuple[str, int]: ...

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

def resize_normalize(
    images: list[npt.NDArray[np.uint8]],
    params: PreprocessParams,
    dtype: OutputDType,
    out: npt.NDArray[Any],
    threads: int,
) -> None: ...

class ResizeNormalizeEmulated:
    def __init__(self, arena_bytes: int = ...) -> None: ...
    def enqueue(
        self,
        images: list[npt.NDArray[np.uint8]],
        params: PreprocessParams,
        dtype: OutputDType,
        out: npt.NDArray[Any],
    ) -> None: ...
    @property
    def cached_tables(self) -> int: ...

class ResizeNormalizeCuda:  # CUDA builds only
    def __init__(self, table_arena_bytes: int = ...) -> None: ...
    @property
    def device(self) -> int: ...
    def enqueue(
        self,
        images: list[tuple[int, int, int, int, int]],
        params: PreprocessParams,
        dtype: OutputDType,
        out: int,
        stream: int,
    ) -> None: ...

def normalize_table(params: PreprocessParams, dtype: OutputDType) -> npt.NDArray[np.uint32]: ...
def float_to_half_bits(values: npt.ArrayLike) -> npt.NDArray[np.uint16]: ...
