"""The package foundation: the extension imports everywhere and reports what it was built with."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import nvclip_fast
from nvclip_fast import _C, cli

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
        assert (int(major), int(minor)) >= (12, 1)  # kernel parameters of up to 32,764 bytes
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
    reason = _C.cuda_unavailable_reason()
    assert (count == 0) == bool(reason)
    assert nvclip_fast.cuda_available() == (count > 0)
    # With every device hidden, a fresh process counts none and says why (without CUDA in the build,
    # that the build has none), whatever this machine has.
    script = "from nvclip_fast import _C; print(_C.cuda_device_count()); print(_C.cuda_unavailable_reason())"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True, timeout=60
    ).stdout.splitlines()
    assert out[0] == "0"
    if nvclip_fast.build_info()["cuda"]:
        # A GPU hidden: "no NVIDIA GPU was found (CUDA_VISIBLE_DEVICES="")"; no driver at all (CI):
        # "no NVIDIA driver was found", never CUDA's "driver version is insufficient".
        assert out[1].startswith(("no NVIDIA GPU was found", "no NVIDIA driver was found")), out
        assert "insufficient" not in out[1]
    else:
        assert "built without CUDA" in out[1]


@pytest.mark.parametrize(
    ("probe", "reason"),
    [
        (
            {
                "insufficient_driver": True,
                "error_name": "cudaErrorInsufficientDriver",
                "runtime_version": 13000,
            },
            "no NVIDIA driver was found (the CUDA driver library libcuda.so.1 is not installed)",
        ),
        (
            {"insufficient_driver": True, "driver_version": 12020, "runtime_version": 13000},
            "the NVIDIA driver supports CUDA up to 12.2, older than the CUDA 13.0 runtime of this build: "
            "update the NVIDIA driver",
        ),
        ({"no_device": True, "error_name": "cudaErrorNoDevice"}, "no NVIDIA GPU was found"),
        ({"no_device": True, "visible_devices": ""}, 'no NVIDIA GPU was found (CUDA_VISIBLE_DEVICES="")'),
        (
            {"error_name": "cudaErrorSystemNotReady", "error_message": "system not yet initialized"},
            "no usable CUDA device: cudaErrorSystemNotReady (system not yet initialized)",
        ),
        ({"device_count": 1}, ""),
    ],
)
def test_cuda_unavailable_reason_wording(probe, reason):
    """What `info`, the test skips and device='cuda' say for each thing the CUDA runtime reports."""
    assert _C._testing.describe_cuda_unavailable(**probe) == reason


def test_info_says_why_there_is_no_gpu(capsys):
    assert cli.main(["info"]) == cli.EXIT_OK
    info = json.loads(capsys.readouterr().out)
    assert info["cache"]
    if info["cuda_devices"] == 0:
        assert info["cuda_unavailable"] == _C.cuda_unavailable_reason()
        assert "insufficient" not in info["cuda_unavailable"]


# --- the TensorRT runtime library, found as `pip install tensorrt` lays it out ---------------------------
#
# Each load runs in a fresh process (one runtime library per process), against a stand-in library
# compiled here that exports what the loader looks up (getInferLibVersion, createInferRuntime_INTERNAL).

STAND_IN_C = """
int getInferLibVersion(void) { return VERSION; }
void* createInferRuntime_INTERNAL(void* logger, int version) { (void)logger; (void)version; return 0; }
"""
NOT_TENSORRT_C = "int unrelated(void) { return 0; }\n"
LIBRARY_ENV = "NVCLIP_FAST_TENSORRT_LIB"
# A build without TensorRT headers looks for every major it supports, 11 first; a build with them
# for the headers' major only.
MAJOR = int(nvclip_fast.build_info()["tensorrt_version"].split(".")[0] or 11)
SONAME = f"libnvinfer.so.{MAJOR}"
UNSUPPORTED_MAJOR = 9


def _compile(source: str, out: Path, version: int = 0) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the stand-in TensorRT library")
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_name(out.name + ".c")
    src.write_text(source)
    subprocess.run(
        [compiler, "-shared", "-fPIC", f"-DVERSION={version}", "-o", str(out), str(src)],
        check=True,
        timeout=60,
    )
    return out


def _stand_in(out: Path, major: int = MAJOR, minor: int = 1, patch: int = 0) -> Path:
    return _compile(STAND_IN_C, out, major * 10000 + minor * 100 + patch)


def _wheel_site(root: Path, with_library: bool = True) -> Path:
    """A site folder laid out as the tensorrt-cu*-libs wheel installs: tensorrt_libs/ with the
    library and an __init__.py (which here refuses to be imported: the search must not import it)."""
    package = root / "tensorrt_libs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise ImportError('tensorrt_libs must not be imported to be found')\n"
    )
    if with_library:
        _stand_in(package / SONAME)
    return root


def _load_in_fresh_process(site: Path | None = None, library: str = "", **env: str) -> dict:
    """trt_library.load(library) in a new interpreter with `site` first on sys.path and `env`:
    the library found ({"path", "version", "kind", "search_dirs"}) or {"error": message}."""
    script = textwrap.dedent(
        f"""
        import dataclasses, json, sys
        from nvclip_fast import EngineError, trt_library
        try:
            found = dataclasses.asdict(trt_library.load({library!r}))
        except EngineError as e:
            found = {{"error": str(e)}}
        found["search_dirs"] = trt_library.search_dirs()
        found["imported"] = "tensorrt_libs" in sys.modules
        print(json.dumps(found))
        """
    )
    pythonpath = [str(site)] if site else []
    environ = {k: v for k, v in os.environ.items() if k != LIBRARY_ENV}
    environ["PYTHONPATH"] = os.pathsep.join(pythonpath + [p for p in [os.environ.get("PYTHONPATH")] if p])
    environ["LD_LIBRARY_PATH"] = ""
    environ.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=environ, capture_output=True, text=True, check=True, timeout=60
    )
    return json.loads(proc.stdout)


def test_tensorrt_library_found_where_the_pip_wheel_puts_it(tmp_path):
    site = _wheel_site(tmp_path / "site")
    found = _load_in_fresh_process(site)
    library_dir = str(site / "tensorrt_libs")
    assert found == {
        "path": f"{library_dir}/{SONAME}",
        "version": f"{MAJOR}.1.0",
        "kind": "full",
        "search_dirs": [library_dir],
        "imported": False,
    }


def test_tensorrt_library_override_and_lean_runtime(tmp_path):
    site = _wheel_site(tmp_path / "site")
    custom = _stand_in(tmp_path / "custom" / "libmytrt.so", minor=2, patch=3)
    found = _load_in_fresh_process(site, **{LIBRARY_ENV: str(custom)})
    assert (found["path"], found["version"], found["kind"]) == (str(custom), f"{MAJOR}.2.3", "full")
    lean = _stand_in(tmp_path / "lean" / f"libnvinfer_lean.so.{MAJOR}")
    found = _load_in_fresh_process(site, library=str(lean))  # an explicit path beats the variable
    assert (found["path"], found["kind"]) == (str(lean), "lean")
    missing = tmp_path / "nowhere" / SONAME
    found = _load_in_fresh_process(site, **{LIBRARY_ENV: str(missing)})  # only the override is tried
    assert f"(${LIBRARY_ENV}); tried:\n  {missing}: " in found["error"]
    assert "tensorrt_libs" not in found["error"]


def test_tensorrt_library_found_on_ld_library_path(tmp_path):
    site = _wheel_site(tmp_path / "site", with_library=False)  # shadows any real tensorrt_libs
    lib = _stand_in(tmp_path / "lib" / SONAME, minor=4)
    found = _load_in_fresh_process(site, LD_LIBRARY_PATH=str(lib.parent))
    assert (found["path"], found["version"]) == (str(lib), f"{MAJOR}.4.0")


def test_tensorrt_library_not_found_lists_every_place_tried(tmp_path):
    try:
        ctypes.CDLL(SONAME)
        pytest.skip(f"{SONAME} is installed system-wide here: the search cannot come up empty")
    except OSError:
        pass
    site = _wheel_site(tmp_path / "site", with_library=False)
    error = _load_in_fresh_process(site)["error"]
    assert error.startswith("could not load the TensorRT "), error
    assert "runtime library (the default search); tried:" in error
    assert f"\n  {site / 'tensorrt_libs' / SONAME}: " in error
    assert f"\n  {SONAME} (LD_LIBRARY_PATH, then the system's libraries): " in error
    assert LIBRARY_ENV in error


def test_tensorrt_library_refuses_what_it_cannot_drive(tmp_path):
    other = _compile(NOT_TENSORRT_C, tmp_path / "libother.so")
    error = _load_in_fresh_process(**{LIBRARY_ENV: str(other)})["error"]
    assert f"{other}: not a TensorRT runtime library (createInferRuntime_INTERNAL" in error
    old = _stand_in(tmp_path / "old" / f"libnvinfer.so.{UNSUPPORTED_MAJOR}", major=UNSUPPORTED_MAJOR)
    error = _load_in_fresh_process(**{LIBRARY_ENV: str(old)})["error"]
    assert f"is TensorRT {UNSUPPORTED_MAJOR}.1.0 but nvclip_fast was built for TensorRT" in error
    assert "the major versions must match" in error


def test_tensorrt_library_is_one_per_process():
    # In this process: whether or not a library was loaded before, an explicit path that is not
    # the loaded one fails with that path in the message.
    with pytest.raises(nvclip_fast.EngineError, match="/nonexistent/libnvinfer"):
        _C.tensorrt_library("/nonexistent/libnvinfer.so.99")


def test_trt_engine_without_headers_says_so():
    if nvclip_fast.build_info()["tensorrt"]:
        pytest.skip("this build has the TensorRT engine")
    with pytest.raises(nvclip_fast.EngineError, match="without TensorRT"):
        _C.TrtEngine("x.plan")


def test_engine_error_is_runtime_error():
    assert issubclass(nvclip_fast.EngineError, RuntimeError)


def test_cli_info_prints_build_info():
    out = subprocess.run(
        [sys.executable, "-m", "nvclip_fast", "info"], check=True, capture_output=True, text=True
    ).stdout
    info = json.loads(out)
    assert info["version"] == nvclip_fast.__version__
    assert info["cuda"] == nvclip_fast.build_info()["cuda"]
