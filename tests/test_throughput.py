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
        Row("g", "ours", 300.0, [Compare("peer", 1.5, "embedding goal"), Compare("other")]),
        Row("g", "peer", 100.0),
        Row("g", "slow ours", 120.0, [Compare("peer", 1.5, "embedding goal"), Compare("absent")]),
        Row("h", "kernel", 50.0, min_images_per_s=100.0, source="preprocessing goal"),
    ]


def test_ratios_come_from_the_rows_and_targets_can_be_missed():
    got = {(r.label, r.to): r for r in tp.ratios(_rows())}
    assert set(got) == {("ours", "peer"), ("slow ours", "peer")}  # "other"/"absent" did not run
    assert got[("ours", "peer")].ratio == pytest.approx(3.0)
    assert got[("ours", "peer")].met is True
    assert got[("slow ours", "peer")].met is False
    assert tp.missed(_rows()) == ["g: slow ours / peer = 1.20x < 1.5x", "h: kernel = 50 img/s < 100"]
    text = "\n".join(tp.summary_lines(_rows()))
    assert "g: ours / peer = 3.00x  (target >= 1.5x, embedding goal: met)" in text
    assert "MISSED" in text


def test_ratio_table_with_ranges_over_runs():
    # A second run where the peer was twice as fast: the ratios' ranges span both runs.
    again = [
        tp.Row(r.group, r.label, r.images_per_s * (2 if r.label == "peer" else 1), r.compare) for r in _rows()
    ]
    lines = tp.ratio_table([_rows(), again], group_contains="g")
    assert lines[0].startswith("| benchmark | ours | images/s | peer | images/s | ratio | range (2 runs) |")
    assert lines[2] == "| g | ours | 300.0 | peer | 100.0 | **3.00×** | 1.50–3.00× | ≥ 1.5×: met |"
    missed = "| g | slow ours | 120.0 | peer | 100.0 | **1.20×** | 0.60–1.20× | ≥ 1.5×: **missed** |"
    assert lines[3] == missed
    assert len(lines) == 4  # "h" has no ratio; "other" and "absent" did not run


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


def test_queue_stats_info_histogram_of_the_run():
    before = {"batches": 3, "images": 300, "batch_sizes": {128: 2, 44: 1}}
    after = {"batches": 8, "images": 812, "batch_sizes": {128: 6, 44: 1, 1: 1}, "queued_images": 0}
    info = tp.queue_stats_info(before, after)
    assert info == {"mean_batch": 102.4, "batch_sizes": {"1": 1, "128": 4}, "queued_images": 0}
    json.dumps(info)  # it goes into pytest-benchmark's JSON


def test_queue_stats_info_says_when_the_queue_does_not_count_batch_sizes():
    info = tp.queue_stats_info({"batches": 0, "images": 0}, {"batches": 2, "images": 256})
    assert info["mean_batch"] == 128
    assert "batch_sizes" not in info
    assert (
        info["batch_sizes_note"]
        == "Encoder.stats() has no 'batch_sizes': this queue does not count batch sizes"
    )


@pytest.mark.parametrize(
    ("copy_s", "kernel_s", "both_s", "overlap"),
    [
        (4.0, 2.0, 4.0, 1.0),
        (4.0, 2.0, 6.0, 0.0),
        (4.0, 2.0, 5.0, 0.5),
        (4.0, 2.0, 7.0, 0.0),
        (2.0, 2.0, 1.5, 1.0),
    ],
)
def test_overlap_ratio(copy_s, kernel_s, both_s, overlap):
    assert tp.overlap_ratio(copy_s, kernel_s, both_s) == pytest.approx(overlap)


def test_summary_shows_batch_sizes_overlap_and_context_memory():
    rows = [
        tp.Row("q", "e2e", 700.0, info={"mean_batch": 120.0, "batch_sizes": {"64": 1, "128": 9}}),
        tp.Row("q", "cpu", 70.0, info={"mean_batch": 32.0, "batch_sizes_note": "no counters"}),
        tp.Row(
            "k", "pinned", 9e4, info={"copy_ms": 4.0, "kernel_ms": 2.0, "pipelined_ms": 5.0, "overlap": 0.5}
        ),
        tp.Row("t", "trt", 900.0, info={"context_memory_mib": 1536.25}),
    ]
    lines = tp.summary_lines(rows)
    assert "q: e2e: batch sizes {64: 1, 128: 9}, mean 120.0" in lines
    assert "q: cpu: batch sizes {no counters}, mean 32.0" in lines
    assert any(
        line.startswith("k: pinned: copy/kernel overlap 0.50 (copy 4.00 ms, kernel 2.00 ms") for line in lines
    )
    assert "t: trt: each execution context (stream slot) allocates 1,536.2 MiB of device memory" in lines
