"""nvclip-fast: CLIP embeddings at full GPU speed, with exactly open_clip's numbers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _C
from ._C import EngineError
from .collection import Collection
from .embed_files import classify_files, embed_files
from .encoder import Encoder, ItemError
from .images import decode_image
from .preprocess import PreprocessSpec, preprocess
from .probe import LinearProbe

if TYPE_CHECKING:
    from .exporter import export

__version__ = "0.1.0"

__all__ = [
    "Collection",
    "Encoder",
    "EngineError",
    "ItemError",
    "LinearProbe",
    "PreprocessSpec",
    "__version__",
    "build_info",
    "classify_files",
    "cuda_available",
    "decode_image",
    "embed_files",
    "export",
    "preprocess",
]


def build_info() -> dict[str, Any]:
    """What this build was compiled with.

    Keys: ``cuda`` (bool), ``cuda_version``, ``cuda_archs`` (list), ``tensorrt`` (bool),
    ``tensorrt_version`` (the headers compiled against), ``compiler``, ``cpu_simd``.
    """
    return dict(_C.build_info())


def cuda_available() -> bool:
    """True when this build has CUDA and a CUDA device is usable (driver present, GPU visible)."""
    return _C.cuda_device_count() > 0


def __getattr__(name: str) -> Any:
    # `export` pulls in torch, open_clip and onnx: imported on first use, so `import nvclip_fast` stays light.
    if name == "export":
        from .exporter import export

        return export
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"export"})
