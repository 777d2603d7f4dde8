"""The benchmarks' shared arithmetic (benchmarks/throughput.py): FLOP counts, the FP16 ceiling
table, the ratios the end-of-run summary prints, and gpu_check.sh's report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load_throughput():
    if "throughput" in sys.modules:  # the benchmarks' conftest imported it already
        return sys.modules["throughput"]
    spec = importlib.util.spec_from_file_location("throughput", BENCHMARKS / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["throughput"] = module
    spec.loader.exec_module(module)
    return module


tp = _load_throughput()

# FlopCounterMode counts exactly what GFLOP_PER_IMAGE rounds; 0.1% covers that rounding.
FLOP_RTOL = 1e-3


@pytest.mark.parametrize(("model", "size"), sorted(tp.GFLOP_PER_IMAGE))
def test_flop_constants_match_a_count_of_the_model(model, size):
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):  # no memory, no init cost: shapes only
        net = open_clip.create_model(model, force_image_size=size, device="meta")
    with FlopCounterMode(display=False) as counter:
        net.encode_image(torch.empty(1, 3, size, size, device="meta"))
    assert counter.get_total_flops() / 1e9 == pytest.approx(tp.GFLOP_PER_IMAGE[(model, size)], rel=FLOP_RTOL)


@pytest.mark.parametrize(
    ("cc", "sms", "clock_mhz", "datasheet_tflops"),
    [
        ((8, 0), 108, 1410, 312),  # A100 SXM
        ((9, 0), 132, 1830, 989.4),  # H100 SXM5 at the datasheet's clock
        ((8, 9), 58, 2040, 121),  # L4
    ],
)
def test_fp16_ceiling_reproduces_datasheets(cc, sms, clock_mhz, datasheet_tflops):
    props = tp.GpuProperties("x", cc, sms, clock_mhz)
    assert props.fp16_dense_tflop_per_s == pytest.approx(datasheet_tflops, rel=0.01)


def test_unknown_architecture_has_no_ceiling():
    props = tp.GpuProperties("future", (99, 0), 100, 2000)
    assert props.fp16_dense_tflop_per_s is None


def test_gpu_properties_never_guess():
    props = tp.gpu_properties()
    assert isinstance(props, (str, tp.GpuProperties))
    if isinstance(props, str):  # no device or no cuda-python: the reason, not a number
        assert props
        info = tp.gpu_work_info("ViT-H-14", 336, 100.0)
        assert info["fraction_of_fp16_ceiling"] is None
        assert info["ceiling_note"] == props
        assert info["achieved_tflop_per_s"] == pytest.approx(100 * 781.5 / 1000, abs=0.1)


def _rows():
    Compare, Row = tp.Compare, tp.Row
    return [
        Row("g", "ours", 300.0, [Compare("peer", 1.5, "issue 5"), Compare("other")]),
        Row("g", "peer", 100.0),
        Row("g", "slow ours", 120.0, [Compare("peer", 1.5, "issue 5"), Compare("absent")]),
        Row("h", "kernel", 50.0, min_images_per_s=100.0, source="issue 3"),
    ]


def test_ratios_come_from_the_rows_and_targets_can_be_missed():
    got = {(r.label, r.to): r for r in tp.ratios(_rows())}
    assert set(got) == {("ours", "peer"), ("slow ours", "peer")}  # "other"/"absent" did not run
    assert got[("ours", "peer")].ratio == pytest.approx(3.0)
    assert got[("ours", "peer")].met is True
    assert got[("slow ours", "peer")].met is False
    assert tp.missed(_rows()) == ["g: slow ours / peer = 1.20x < 1.5x", "h: kernel = 50 img/s < 100"]
    text = "\n".join(tp.summary_lines(_rows()))
    assert "g: ours / peer = 3.00x  (target >= 1.5x, issue 5: met)" in text
    assert "MISSED" in text


def test_report_from_a_benchmark_json(tmp_path):
    ours = {"label": "ours", "images_per_s": 300.0, "compare": [{"to": "peer", "target": 1.5, "source": "s"}]}
    bench = {
        "benchmarks": [
            {"group": "g", "name": "test_a", "extra_info": ours},
            {"group": "g", "name": "test_b", "extra_info": {"label": "peer", "images_per_s": 100.0}},
            {"group": "g", "name": "test_disabled", "extra_info": {"label": "never timed"}},
        ]
    }
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    steps = tmp_path / "steps.tsv"
    steps.write_text("build\tok\t50\t\nwheels\tskipped\t0\tno .whl/*.whl\nbench\tfailed\t9\texit 1\n")
    not_ok = tp.gpu_check_report(tmp_path, tp.read_steps(steps), "GPU", "90", 70)
    assert not_ok == 1  # the failed bench step; an empty .whl/ is no failure
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["label"] for r in report["benchmarks"]] == ["ours", "peer"]
    assert report["ratios"][0]["ratio"] == pytest.approx(3.0)
    assert report["ratios"][0]["met"] is True
    assert "ours / peer = 3.00x" in (tmp_path / "gpu_check.md").read_text()
