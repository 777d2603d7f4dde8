"""A recording stand-in for the build half of the ``tensorrt`` module, shaped like 10.x or 11.x.

It lets ``trt_build.build_engine`` run where TensorRT is absent, to check the calls it makes per
version (network typing, builder flags, the profile, parsing from the file path, the timing cache).
It knows nothing of engines: the real build runs in the ``tensorrt``-marked tests.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

TRT11 = 11


def make(version: str, *, strongly_typed_flag: bool = True) -> types.ModuleType:
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    calls: list[tuple[Any, ...]] = []
    trt.calls = calls

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self) -> None:
            pass

    # Enum values as in the 10.16 / 11.1 headers (kSTRONGLY_TYPED = 1 / 0); FP16 is gone in 11.
    creation = {"STRONGLY_TYPED": 0 if major >= TRT11 else 1} if strongly_typed_flag else {}
    builder_flags = ("TF32",) if major >= TRT11 else ("FP16", "TF32")

    class Parser:
        def __init__(self, network: Any, logger: Any) -> None:
            self.num_errors = 0

        def parse_from_file(self, path: str) -> bool:
            calls.append(("parse_from_file", path))
            ok = Path(path).stat().st_size > 0
            self.num_errors = 0 if ok else 1
            return ok

        def get_error(self, i: int) -> str:
            return "ModelImporter: empty file"

    class TimingCache:
        def __init__(self, blob: bytes) -> None:
            self.blob = bytes(blob)

        def serialize(self) -> bytes:
            return self.blob + b"+tuned"

    class Config:
        def __init__(self) -> None:
            self.cache: TimingCache | None = None

        def set_flag(self, flag: str) -> None:
            calls.append(("set_flag", flag))

        def clear_flag(self, flag: str) -> None:
            calls.append(("clear_flag", flag))

        def add_optimization_profile(self, profile: Any) -> int:
            calls.append(("add_optimization_profile",))
            return 0

        def create_timing_cache(self, blob: bytes) -> TimingCache:
            calls.append(("create_timing_cache", bytes(blob)))
            return TimingCache(blob)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

    class Profile:
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> object:
            calls.append(("create_network", flags))
            return object()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Any, config: Config) -> bytes:
            calls.append(("build_serialized_network",))
            return b"PLAN"

    trt.ILogger = ILogger
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**creation)
    trt.BuilderFlag = types.SimpleNamespace(**{name: name for name in builder_flags})
    trt.Builder, trt.OnnxParser = Builder, Parser
    return trt
