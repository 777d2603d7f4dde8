"""The package foundation: the extension imports everywhere and reports what it was built with."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import nvclip_fast
from nvclip_fast import _C

EXPECTED_KEYS = {"cuda", "cuda_version", "cuda_archs", "tensorrt", "tensorrt_version", "compiler", "cpu_simd"}


def test_build_info_keys_and_types():
    info = nvclip_fast.build_info()
    assert set(info) == EXPECTED_KEYS
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["tensorrt"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert info["compiler"]
    assert info["cpu_simd"] in {"avx512bw", "avx2", "avx", "sse4.1", "sse2", "neon", "scalar"}
    if info["cuda"]:
        major, minor = info["cuda_version"].split(".")[:2]
        assert (int(major), int(minor)) >= (11, 0)
        assert info["cuda_archs"], "a CUDA build names its architectures"
    else:
        assert (info["cuda_version"], info["cuda_archs"]) == ("", [])
    if info["tensorrt"]:
        assert info["tensorrt_version"].split(".")[0] in {"10", "11"}
    else:
        assert info["tensorrt_version"] == ""


@pytest.mark.skipif("NVCLIP_EXPECT_CUDA" not in os.environ, reason="NVCLIP_EXPECT_CUDA not set by the CI run")
def test_build_matches_ci_expectation():
    # CI builds twice (nvcc found, and NVCLIP_CUDA=OFF) and says which build it is testing.
    assert nvclip_fast.build_info()["cuda"] == (os.environ["NVCLIP_EXPECT_CUDA"] == "1")


def test_cuda_query_never_raises():
    count = _C.cuda_device_count()
    assert count >= 0
    reason = _C.cuda_unavailable_reason()
    assert (count == 0) == bool(reason)
    assert nvclip_fast.cuda_available() == (count > 0)


def test_tensorrt_library_loads_or_says_why():
    info = nvclip_fast.build_info()
    if not info["tensorrt"]:
        with pytest.raises(nvclip_fast.EngineError, match="without TensorRT"):
            _C.tensorrt_library()
        return
    # A path that cannot be loaded fails with the path in the message, whether or not a runtime
    # library was loaded before (then the message says one already is).
    with pytest.raises(nvclip_fast.EngineError, match="/nonexistent/libnvinfer"):
        _C.tensorrt_library("/nonexistent/libnvinfer.so.99")
    try:
        loaded, error = _C.tensorrt_library(), ""
    except nvclip_fast.EngineError as e:
        loaded, error = None, str(e)
    if loaded is None:  # no TensorRT here: the message lists the sonames tried
        assert re.search(r"libnvinfer\.so\.\d+", error), error
    else:
        path, version = loaded
        assert version // 10000 == int(info["tensorrt_version"].split(".")[0])
        assert "nvinfer" in path


def test_engine_error_is_runtime_error():
    assert issubclass(nvclip_fast.EngineError, RuntimeError)


def test_cli_info_prints_build_info():
    out = subprocess.run(
        [sys.executable, "-m", "nvclip_fast", "info"], check=True, capture_output=True, text=True
    ).stdout
    info = json.loads(out)
    assert info["version"] == nvclip_fast.__version__
    assert info["cuda"] == nvclip_fast.build_info()["cuda"]
