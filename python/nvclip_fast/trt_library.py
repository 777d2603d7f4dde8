"""Where the TensorRT runtime library (``libnvinfer.so.<major>``) is found.

The native runtime loads it with dlopen, once per process, and tries in order:

1. the path in the ``NVCLIP_FAST_TENSORRT_LIB`` environment variable, when set (only it);
2. the folders of :func:`search_dirs`: where ``pip install tensorrt`` puts the library
   (``site-packages/tensorrt_libs/``), found without importing ``tensorrt``;
3. the dynamic loader's own search: ``LD_LIBRARY_PATH``, then the system's libraries.

Only the full runtime is searched for. The lean and dispatch runtimes (``libnvinfer_lean.so.N``,
``libnvinfer_dispatch.so.N``) run only plans built version-compatible (``nvclip-fast export
--version-compatible``); point ``NVCLIP_FAST_TENSORRT_LIB`` at one to use it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from . import _C

__all__ = ["WHEEL_LIBRARY_PACKAGES", "TensorRTLibrary", "load", "search_dirs"]

# The packages of the TensorRT wheels that hold the runtime libraries (tensorrt-cu12-libs,
# tensorrt-cu13-libs): plain folders of .so files with an __init__.py that loads them.
WHEEL_LIBRARY_PACKAGES = ("tensorrt_libs",)


@dataclass(frozen=True)
class TensorRTLibrary:
    """The runtime library this process loaded: its path, version ("10.16.1") and kind ("full",
    "lean" or "dispatch")."""

    path: str
    version: str
    kind: str


def search_dirs() -> list[str]:
    """The folders of the installed TensorRT wheel packages that hold the runtime library, without
    importing them (importing ``tensorrt_libs`` loads every library in it)."""
    dirs: list[str] = []
    for package in WHEEL_LIBRARY_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):  # a broken or half-removed installation: nothing to find there
            continue
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(str(d) for d in spec.submodule_search_locations if os.path.isdir(d))
    return dirs


def load(library: str | os.PathLike[str] = "") -> TensorRTLibrary:
    """Load the TensorRT runtime library (``library``, a path, instead of the search when given).
    Raises :class:`nvclip_fast.EngineError` listing every place tried."""
    path, version, kind = _C.tensorrt_library(os.fspath(library), search_dirs())
    return TensorRTLibrary(path, version, kind)
