"""A recording stand-in for the build half of the ``tensorrt`` module, shaped like 10.x or 11.x.

It lets ``trt_build.build_engine`` run where TensorRT is absent, to check the calls it makes per
version (network typing, builder flags, the profile, parsing from the file path, the timing cache)
and that it handles each call's failures the way the real bindings report them (TensorRT's
python/src/infer/pyCore.cpp, 10.0 to 11.1):

- ``IOptimizationProfile.set_shape`` raises RuntimeError ("Shape provided for min is inconsistent
  with other shapes.") when a shape is refused: here a negative dimension, a rank that differs
  from min's, or not min <= opt <= max;
- ``IBuilderConfig.add_optimization_profile`` returns the profile's index, or -1 for a profile
  TensorRT finds invalid (set ``trt.refuse_profiles = True`` to get -1);
- ``create_timing_cache`` returns None for bytes it cannot read (here: without ``CACHE_MAGIC``);
  ``set_timing_cache`` returns False for a cache of another device or version (here: one whose
  bytes start with ``OTHER_DEVICE_CACHE``) and, like any pybind11 reference argument, raises
  TypeError for None;
- ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` exists in every 10.x (value 1) and 11.x (0);
  11.x has no FP16 builder flag.

It knows nothing of engines: the real build runs in the ``tensorrt``-marked tests.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TRT11 = 11
CACHE_MAGIC = b"fake-timing-cache:"
OTHER_DEVICE_CACHE = CACHE_MAGIC + b"other-device"
TUNED = b"+tuned"


def make(version: str) -> types.ModuleType:
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    calls: list[tuple[Any, ...]] = []
    trt.calls = calls
    trt.refuse_profiles = False

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self) -> None:
            pass

    # Enum values as in the 10.x / 11.x headers (kSTRONGLY_TYPED = 1 / 0); FP16 is gone in 11.
    creation = {"STRONGLY_TYPED": 0 if major >= TRT11 else 1}
    builder_flags = ["TF32", "VERSION_COMPATIBLE"] + ([] if major >= TRT11 else ["FP16"])

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
            self.blob = bytes(blob) or CACHE_MAGIC

        def serialize(self) -> bytes:
            return self.blob + TUNED

    class Config:
        def __init__(self) -> None:
            self.cache: TimingCache | None = None
            self.profiles = 0

        def set_flag(self, flag: str) -> None:
            calls.append(("set_flag", flag))

        def clear_flag(self, flag: str) -> None:
            calls.append(("clear_flag", flag))

        def add_optimization_profile(self, profile: Profile) -> int:
            calls.append(("add_optimization_profile",))
            if trt.refuse_profiles or not profile.shapes:
                return -1
            self.profiles += 1
            return self.profiles - 1

        def create_timing_cache(self, blob: bytes) -> TimingCache | None:
            calls.append(("create_timing_cache", bytes(blob)))
            if blob and not bytes(blob).startswith(CACHE_MAGIC):
                return None
            return TimingCache(blob)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if not isinstance(cache, TimingCache):
                raise TypeError("set_timing_cache(): incompatible function arguments")
            calls.append(("set_timing_cache", cache.blob))
            if cache.blob.startswith(OTHER_DEVICE_CACHE) and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

        # The bindings' argument names: input, min, opt, max.
        def set_shape(self, input: str, min: Sequence[int], opt: Sequence[int], max: Sequence[int]) -> None:
            lo, mid, hi = tuple(min), tuple(opt), tuple(max)
            calls.append(("set_shape", input, lo, mid, hi))
            if any(d < 0 for d in lo):
                raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
            if len(mid) != len(lo) or any(a > b for a, b in zip(lo, mid, strict=True)):
                raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
            if len(hi) != len(lo) or any(a > b for a, b in zip(mid, hi, strict=True)):
                raise RuntimeError("Shape provided for max is inconsistent with other shapes.")
            self.shapes[input] = (lo, mid, hi)

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> object:
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
