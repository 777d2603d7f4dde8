"""Benchmarks share the tests' markers (gpu and tensorrt skip themselves without a device or
TensorRT) and reference inputs, one exported CPU model, and print the ratios at the end of a run."""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import throughput

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

_spec = importlib.util.spec_from_file_location("nvclip_tests_conftest", TESTS / "conftest.py")
_tests_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tests_conftest)

pytest_configure = _tests_conftest.pytest_configure
pytest_collection_modifyitems = _tests_conftest.pytest_collection_modifyitems

# The CPU embedding benchmarks' model: ViT-S-32 (2.3 GFLOP per 224 px image), the smallest open_clip
# ViT with a real layout (12 layers, 384 wide, 224 px), so that a 2-core machine still runs
# several batches per round; larger ViTs only make the forward pass a larger share of the time.
CPU_MODEL = "ViT-S-32"
CPU_MAX_BATCH = 32  # images per engine call, for us and for the peer


@dataclass(frozen=True)
class CpuModel:
    """One model with random weights: open_clip's torch model and the same weights exported to ONNX."""

    name: str
    onnx: Path
    model: Any  # open_clip's torch model, fp32, eval
    spec: Any  # nvclip_fast.PreprocessSpec of the model
    max_batch: int


@pytest.fixture(scope="session")
def cpu_model(tmp_path_factory) -> CpuModel:
    """ViT-S-32 with random weights, exported once (image tower, fp32, ONNX, parity-checked by the
    exporter) from a checkpoint of the very model the peer runs."""
    import torch

    import nvclip_fast as nf
    from nvclip_fast import models

    tmp = tmp_path_factory.mktemp("cpu_model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", models.RandomWeightsWarning)
        loaded = models.load_model(CPU_MODEL, random_weights=True)
    checkpoint = tmp / f"{CPU_MODEL}.pt"
    torch.save(loaded.model.state_dict(), checkpoint)
    onnx = tmp / f"{CPU_MODEL}.onnx"
    nf.export(CPU_MODEL, onnx, weights=checkpoint, max_batch=CPU_MAX_BATCH, text=False, quiet=True)
    spec = nf.PreprocessSpec(**loaded.preprocess.to_dict())
    return CpuModel(CPU_MODEL, onnx, loaded.model, spec, CPU_MAX_BATCH)


@dataclass(frozen=True)
class CpuSample:
    """Busy CPU seconds of the whole machine (/proc/stat) and of this process, at one moment."""

    wall: float
    machine_busy: float | None  # None where /proc/stat is absent
    own: float

    @staticmethod
    def now() -> CpuSample:
        import time

        try:
            import resource
        except ImportError:  # not a Unix: nothing to compare with
            return CpuSample(time.monotonic(), None, 0.0)
        busy = None
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            ticks = [int(v) for v in fields]
            idle = ticks[3] + ticks[4]  # idle + iowait
            busy = (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal
        except (OSError, ValueError, IndexError):
            pass
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return CpuSample(time.monotonic(), busy, sum(u.ru_utime + u.ru_stime for u in usage))


_at_start: CpuSample | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _at_start
    _at_start = CpuSample.now()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    lines = throughput.summary_lines(throughput.RESULTS)
    if not lines:
        return
    terminalreporter.section("throughput: ratios computed from this run")
    for line in lines:
        terminalreporter.write_line(line)
    end = CpuSample.now()
    if _at_start is not None and _at_start.machine_busy is not None and end.machine_busy is not None:
        # Other work on the machine skews every number: the CPU time that other processes (and the
        # hypervisor, as steal) took during the run, as a share of all cores.
        cores = os.cpu_count() or 1
        other = (end.machine_busy - _at_start.machine_busy) - (end.own - _at_start.own)
        share = max(other, 0.0) / ((end.wall - _at_start.wall) * cores)
        terminalreporter.write_line(
            f"other processes used {share:.0%} of the {cores} cores during the run "
            "(compare only runs where this is near 0%)"
        )
