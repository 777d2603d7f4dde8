"""What every benchmark shares: timing through pytest-benchmark, images/s, the comparisons that the
end-of-run summary computes (ours / peer, from the run's own numbers), the targets set for them,
and the GPU's FP16 dense ceiling read off the device.

    python benchmarks/throughput.py summary BENCH.json [--markdown OUT.md]
    python benchmarks/throughput.py table RUN2.json RUN1.json RUN3.json [--group "cpu engines"]

prints the same summary for a ``--benchmark-json`` file; ``table`` the README's table of ratios for
the first run, with each ratio's range over all the runs given; ``gpu-check-report`` writes
gpu_check.sh's report.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# --- targets (ratio = this row's images/s over the named row's, same group, same run) -----------------

PREPROCESS_GOAL = "preprocessing goal"
EMBED_GOAL = "embedding goal"
PREPROCESS_1_THREAD_VS_PILLOW = 5.0  # one core >= 5x open_clip's Pillow pipeline
PREPROCESS_2_THREADS_VS_1 = 1.8  # 2 threads >= 1.8x one
PREPROCESS_KERNEL_MIN_IMAGES_PER_S = 100_000.0  # an H100, inputs on the device
PREPROCESS_PINNED_VS_COPY = 0.8  # from pinned host memory within 80% of the H2D copy
EMBED_CPU_VS_OPEN_CLIP = 1.5  # Encoder(onnx) end to end >= 1.5x open_clip's pipeline
QUEUE_CALLERS_VS_BATCHED = 0.8  # 32 single-image callers >= 0.8x one batched caller
EMBED_GPU_VS_MODEL_ONLY = 0.9  # PyTorch engine end to end >= 0.9x model-only
CPU_ENGINE_GOAL = "CPU engine goal"
CPU_EXACT_VS_OPEN_CLIP = 1.2  # the exact CPU path (fp32, auto's engine) end to end >= 1.2x open_clip fp32
CPU_BF16_VS_OPEN_CLIP = 1.8  # the bf16 CPU path end to end >= 1.8x open_clip fp32
CPU_BF16_VS_AUTOCAST = 1.0  # and ahead of open_clip under torch.autocast("cpu", dtype=torch.bfloat16)

# --- the work: vision-tower FLOPs per image (2 per multiply-add) --------------------------------------
# Counted by torch.utils.flop_counter.FlopCounterMode on open_clip 3.3's encode_image at batch 1
# (tests/test_throughput.py recounts them on the meta device).
GFLOP_PER_IMAGE = {
    ("ViT-L-14", 336): 382.0,
    ("ViT-H-14", 336): 781.5,
}

# --- the ceiling: dense FP16 tensor-core FLOP per clock per SM, by compute capability ---------------
# ceiling = SMs x this x the SM clock the device reports as its peak (cudaDevAttrClockRate).
# Sources (NVIDIA architecture whitepapers; checked against the datasheet TFLOP/s):
#   7.0 Volta: 8 tensor cores x 64 FMA            -> 1024  (V100 SXM2: 80 x 1024 x 1.53 GHz = 125)
#   7.5 Turing: 8 x 64 FMA                        -> 1024  (T4: 40 x 1024 x 1.59 GHz = 65)
#   8.0 GA100: 4 x 256 FMA                        -> 2048  (A100: 108 x 2048 x 1.41 GHz = 312)
#   8.6 GA10x: 4 x 128 FMA, FP16 accumulate       -> 1024  (A10: 72 x 1024 x 1.695 GHz = 125);
#       GeForce parts halve it with FP32 accumulation, which PyTorch and TensorRT use: an upper bound
#   8.9 Ada: 4 x 128 FMA                          -> 1024  (L4: 58 x 1024 x 2.04 GHz = 121)
#   9.0 Hopper: 4 x 512 FMA                       -> 4096  (H100 SXM5: 132 x 4096 x 1.83 GHz = 989)
# The H100 SXM reports a 1980 MHz peak, so its ceiling here is 1070 TFLOP/s, above the datasheet's
# 989 (quoted at 1830 MHz): the fractions this reports are conservative. Other architectures get no
# ceiling (reported as unknown rather than guessed).
FP16_DENSE_FLOP_PER_CLOCK_PER_SM = {
    (7, 0): 1024,
    (7, 5): 1024,
    (8, 0): 2048,
    (8, 6): 1024,
    (8, 9): 1024,
    (9, 0): 4096,
}
KHZ = 1e3
TERA = 1e12
GIGA = 1e9


@dataclass(frozen=True)
class Compare:
    """A ratio to print: this row's images/s over row ``to``'s (same group), with an optional target."""

    to: str
    target: float | None = None
    source: str = ""


@dataclass
class Row:
    group: str
    label: str
    images_per_s: float
    compare: list[Compare] = field(default_factory=list)
    min_images_per_s: float | None = None
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)


# Rows measured in this process (pytest-benchmark keeps its own; this list feeds the summary).
RESULTS: list[Row] = []


def cpu_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def measure(
    benchmark: Any,
    fn: Callable[[], Any],
    *,
    images: int,
    label: str,
    rounds: int,
    warmup_rounds: int = 1,
    compare: Sequence[Compare] = (),
    min_images_per_s: float | None = None,
    source: str = "",
    gpu_work: tuple[str, int] | None = None,
    **info: Any,
) -> None:
    """Time ``fn`` (which handles ``images`` images, and synchronizes any device work it started)
    with ``benchmark.pedantic`` after ``warmup_rounds`` untimed calls, and record images/s (from the
    median round) in ``extra_info`` and in RESULTS. ``gpu_work`` = (model, image size) adds the
    FLOP rate and its share of the GPU's FP16 ceiling. With ``--benchmark-disable`` fn runs once
    and nothing is recorded."""
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    benchmark.extra_info.update(label=label, images=images, **info)
    if benchmark.disabled or benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    images_per_s = images / median
    if "bytes" in info:
        info["GB_per_s"] = round(info["bytes"] / median / GIGA, 2)
        benchmark.extra_info["GB_per_s"] = info["GB_per_s"]
    if gpu_work is not None:
        info.update(gpu_work_info(*gpu_work, images_per_s))
        benchmark.extra_info.update(info)
    benchmark.extra_info["images_per_s"] = round(images_per_s, 1)
    benchmark.extra_info["compare"] = [asdict(c) for c in compare]
    if min_images_per_s is not None:
        benchmark.extra_info["min_images_per_s"] = min_images_per_s
        benchmark.extra_info["source"] = source
    RESULTS.append(
        Row(benchmark.group or "", label, images_per_s, list(compare), min_images_per_s, source, dict(info))
    )


# --- what the queue did, and how copies and kernels overlapped ------------------------------------------

BATCH_SIZES_KEY = "batch_sizes"  # Encoder.stats(): {batch size: batches of that size}
QUEUED_IMAGES_KEY = "queued_images"  # Encoder.stats(): images waiting in the queue


def queue_stats_info(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """extra_info for a run through an Encoder, from its stats() before and after: the mean batch,
    the histogram of batch sizes formed during the run ({size: batches}, sizes as strings so that it
    survives JSON), and the images still queued at the end; a queue without those counters gets a
    note saying so instead."""
    batches = after["batches"] - before["batches"]
    info: dict[str, Any] = {"mean_batch": round((after["images"] - before["images"]) / max(batches, 1), 1)}
    if BATCH_SIZES_KEY in after:
        then = {int(k): v for k, v in before.get(BATCH_SIZES_KEY, {}).items()}
        now = {int(k): v for k, v in after[BATCH_SIZES_KEY].items()}
        info[BATCH_SIZES_KEY] = {
            str(k): now[k] - then.get(k, 0) for k in sorted(now) if now[k] > then.get(k, 0)
        }
    else:
        info["batch_sizes_note"] = (
            f"Encoder.stats() has no '{BATCH_SIZES_KEY}': this queue does not count batch sizes"
        )
    if QUEUED_IMAGES_KEY in after:
        info[QUEUED_IMAGES_KEY] = after[QUEUED_IMAGES_KEY]
    return info


def overlap_ratio(copy_s: float, kernel_s: float, both_s: float) -> float:
    """How much of the shorter of two stages hides behind the longer when both run pipelined:
    1.0 when the pipelined time is the longer stage's alone, 0.0 when it is their sum."""
    hidden = copy_s + kernel_s - both_s
    return max(0.0, min(1.0, hidden / min(copy_s, kernel_s)))


def add_info(benchmark: Any, info: dict[str, Any]) -> None:
    """Add what was learned after measure() (e.g. queue_stats_info) to the benchmark's extra_info and
    to the row measure() recorded for it."""
    benchmark.extra_info.update(info)
    if RESULTS and RESULTS[-1].label == benchmark.extra_info.get("label"):
        RESULTS[-1].info.update(info)


# --- the summary ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ratio:
    group: str
    label: str
    to: str
    ratio: float
    target: float | None
    source: str

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio >= self.target


def ratios(rows: Iterable[Row]) -> list[Ratio]:
    """Every requested comparison whose two rows ran, in row order."""
    rows = list(rows)
    by_key = {(r.group, r.label): r for r in rows}
    out = []
    for row in rows:
        for c in row.compare:
            peer = by_key.get((row.group, c.to))
            if peer is not None and peer.images_per_s > 0:
                out.append(
                    Ratio(
                        row.group, row.label, c.to, row.images_per_s / peer.images_per_s, c.target, c.source
                    )
                )
    return out


def _verdict(met: bool | None, target: str, source: str) -> str:
    if met is None:
        return ""
    return f"  (target {target}, {source}: {'met' if met else 'MISSED'})"


def summary_lines(rows: Sequence[Row]) -> list[str]:
    """One line per ratio, per absolute target and per GPU row's share of the FP16 ceiling."""
    lines = []
    for r in ratios(rows):
        lines.append(
            f"{r.group}: {r.label} / {r.to} = {r.ratio:.2f}x"
            + _verdict(r.met, f">= {r.target}x" if r.target else "", r.source)
        )
    for row in rows:
        if row.min_images_per_s is not None:
            lines.append(
                f"{row.group}: {row.label} = {row.images_per_s:,.0f} img/s"
                + _verdict(
                    row.images_per_s >= row.min_images_per_s, f">= {row.min_images_per_s:,.0f}", row.source
                )
            )
        if BATCH_SIZES_KEY in row.info or "batch_sizes_note" in row.info:
            sizes = row.info.get(BATCH_SIZES_KEY)
            histogram = (
                ", ".join(f"{k}: {v}" for k, v in sizes.items()) if sizes else row.info["batch_sizes_note"]
            )
            lines.append(
                f"{row.group}: {row.label}: batch sizes {{{histogram}}}, mean {row.info['mean_batch']}"
            )
        if "context_memory_mib" in row.info:
            lines.append(
                f"{row.group}: {row.label}: each execution context (stream slot) allocates "
                f"{row.info['context_memory_mib']:,.1f} MiB of device memory"
            )
        if "overlap" in row.info:
            lines.append(
                f"{row.group}: {row.label}: copy/kernel overlap {row.info['overlap']:.2f} (copy "
                f"{row.info['copy_ms']:.2f} ms, kernel {row.info['kernel_ms']:.2f} ms, both pipelined "
                f"{row.info['pipelined_ms']:.2f} ms; 1.0 = the shorter fully hidden)"
            )
        fraction = row.info.get("fraction_of_fp16_ceiling")
        if "gflop_per_image" in row.info:
            share = (
                f"{fraction:.1%} of the {row.info['fp16_ceiling_tflop_per_s']:.0f} TFLOP/s FP16 dense ceiling"
                if fraction is not None
                else f"FP16 ceiling unknown ({row.info.get('ceiling_note', '')})"
            )
            lines.append(
                f"{row.group}: {row.label} = {row.images_per_s:,.1f} img/s, "
                f"{row.info['achieved_tflop_per_s']:.0f} TFLOP/s, {share}"
            )
    return lines


def missed(rows: Sequence[Row]) -> list[str]:
    """The targets this run missed (empty when all were met or none applied)."""
    out = [
        f"{r.group}: {r.label} / {r.to} = {r.ratio:.2f}x < {r.target}x"
        for r in ratios(rows)
        if r.met is False
    ]
    out += [
        f"{row.group}: {row.label} = {row.images_per_s:,.0f} img/s < {row.min_images_per_s:,.0f}"
        for row in rows
        if row.min_images_per_s is not None and row.images_per_s < row.min_images_per_s
    ]
    return out


def rows_from_json(path: str | os.PathLike[str]) -> list[Row]:
    """The rows of a pytest-benchmark ``--benchmark-json`` file written by benchmarks using measure()."""
    text = Path(path).read_text()
    if not text.strip():  # pytest-benchmark leaves the file empty when every benchmark skipped
        return []
    data = json.loads(text)
    rows = []
    for b in data.get("benchmarks", []):
        e = dict(b.get("extra_info", {}))
        if "images_per_s" not in e:
            continue
        compare = [Compare(**c) for c in e.pop("compare", [])]
        label, ips = e.pop("label", b["name"]), e.pop("images_per_s")
        floor, source = e.pop("min_images_per_s", None), e.pop("source", "")
        rows.append(Row(b.get("group") or "", label, ips, compare, floor, source, e))
    return rows


def ratio_table(runs: Sequence[Sequence[Row]], group_contains: str = "") -> list[str]:
    """The README's table rows for the ratios of ``runs[0]`` (groups containing ``group_contains``):
    benchmark, ours and its images/s, the peer and its images/s, the ratio, its range over all
    ``runs`` (the same benchmarks run again) and the target with its verdict."""
    first, *_ = runs
    by_run = [{(r.group, r.label, r.to): r.ratio for r in ratios(rows)} for rows in runs]
    speed = {(r.group, r.label): r.images_per_s for r in first}
    lines = [
        f"| benchmark | ours | images/s | peer | images/s | ratio | range ({len(runs)} runs) | target |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in ratios(first):
        if group_contains not in r.group:
            continue
        seen = [run[(r.group, r.label, r.to)] for run in by_run if (r.group, r.label, r.to) in run]
        target = "—" if r.target is None else f"≥ {r.target}×: {'met' if r.met else '**missed**'}"
        ours, peer = speed[(r.group, r.label)], speed[(r.group, r.to)]
        lines.append(
            f"| {r.group} | {r.label} | {ours:,.1f} | {r.to} | {peer:,.1f} | **{r.ratio:.2f}×** | "
            f"{min(seen):.2f}–{max(seen):.2f}× | {target} |"
        )
    return lines


def markdown(rows: Sequence[Row], title: str) -> str:
    """A short Markdown report: every row's images/s, then the ratios and targets."""
    out = [f"## {title}", "", "| group | benchmark | images/s |", "| --- | --- | ---: |"]
    out += [f"| {r.group} | {r.label} | {r.images_per_s:,.1f} |" for r in rows]
    out += ["", *[f"- {line}" for line in summary_lines(rows)]]
    return "\n".join(out) + "\n"


# --- the GPU, read through cuda-python --------------------------------------------------------------


@dataclass(frozen=True)
class GpuProperties:
    name: str
    compute_capability: tuple[int, int]
    sms: int
    peak_sm_clock_mhz: float

    @property
    def fp16_flop_per_clock_per_sm(self) -> int | None:
        return FP16_DENSE_FLOP_PER_CLOCK_PER_SM.get(self.compute_capability)

    @property
    def fp16_dense_tflop_per_s(self) -> float | None:
        """SMs x FP16 dense FLOP/clock/SM x peak SM clock; None for an architecture not in the table."""
        per_sm = self.fp16_flop_per_clock_per_sm
        if per_sm is None:
            return None
        return self.sms * per_sm * self.peak_sm_clock_mhz * 1e6 / TERA


@functools.cache
def gpu_properties(device: int = 0) -> GpuProperties | str:
    """The device's name, compute capability, SM count and peak SM clock through cuda-python's
    runtime bindings, or why they could not be read (a string): nothing is guessed."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            return "cuda-python (cuda-bindings) is not installed"

    def attribute(name: str) -> int:
        err, value = cudart.cudaDeviceGetAttribute(getattr(cudart.cudaDeviceAttr, name), device)
        if err != cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"cudaDeviceGetAttribute({name}): {err.name}")
        return int(value)

    try:
        err, prop = cudart.cudaGetDeviceProperties(device)
        if err != cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"cudaGetDeviceProperties: {err.name}")
        name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
        return GpuProperties(
            name=name,
            compute_capability=(
                attribute("cudaDevAttrComputeCapabilityMajor"),
                attribute("cudaDevAttrComputeCapabilityMinor"),
            ),
            sms=attribute("cudaDevAttrMultiProcessorCount"),
            peak_sm_clock_mhz=attribute("cudaDevAttrClockRate") / KHZ,
        )
    except RuntimeError as e:
        return str(e)


def gpu_work_info(model: str, image_size: int, images_per_s: float, device: int = 0) -> dict[str, Any]:
    """extra_info for a GPU embedding row: the work per image, the rate achieved and its share of the
    device's FP16 dense ceiling (None with the reason when the ceiling is unknown)."""
    gflop = GFLOP_PER_IMAGE[(model, image_size)]
    achieved = images_per_s * gflop * GIGA / TERA
    info: dict[str, Any] = {"gflop_per_image": gflop, "achieved_tflop_per_s": round(achieved, 1)}
    props = gpu_properties(device)
    if isinstance(props, str):
        return {**info, "fraction_of_fp16_ceiling": None, "ceiling_note": props}
    info.update(
        gpu=props.name,
        compute_capability=f"{props.compute_capability[0]}.{props.compute_capability[1]}",
        sms=props.sms,
        peak_sm_clock_mhz=props.peak_sm_clock_mhz,
        fp16_flop_per_clock_per_sm=props.fp16_flop_per_clock_per_sm,
    )
    ceiling = props.fp16_dense_tflop_per_s
    if ceiling is None:
        return {
            **info,
            "fraction_of_fp16_ceiling": None,
            "ceiling_note": f"no FP16 rate known for compute capability {info['compute_capability']}",
        }
    return {
        **info,
        "fp16_ceiling_tflop_per_s": round(ceiling, 1),
        "fraction_of_fp16_ceiling": achieved / ceiling,
    }


@dataclass(frozen=True)
class Step:
    """One step of gpu_check.sh: ok, failed (with why) or skipped (with why)."""

    step: str
    status: str
    seconds: int
    note: str = ""


OK = "ok"
NOT_A_FAILURE = {"no .whl/*.whl"}  # a skipped step that is no failure: nothing to install


def read_steps(path: str | os.PathLike[str]) -> list[Step]:
    """gpu_check.sh's step records: one 'step<TAB>status<TAB>seconds<TAB>note' line each."""
    steps = []
    for line in Path(path).read_text().splitlines():
        name, status, seconds, note = line.split("\t")
        steps.append(Step(name, status, int(seconds), note))
    return steps


def gpu_check_report(out: Path, steps: Sequence[Step], gpu: str, arch: str, seconds: int) -> int:
    """Write gpu_check.json and gpu_check.md into ``out`` from the steps and out/bench.json (if any);
    return how many steps were not ok."""
    bench = out / "bench.json"
    rows = rows_from_json(bench) if bench.is_file() else []
    props = gpu_properties()
    device = (
        props
        if isinstance(props, str)
        else {**asdict(props), "fp16_dense_tflop_per_s": props.fp16_dense_tflop_per_s}
    )
    not_ok = [s for s in steps if s.status != OK and s.note not in NOT_A_FAILURE]
    report = {
        "gpu": gpu,
        "cuda_arch": arch,
        "device_properties": device,
        "seconds": seconds,
        "steps": [asdict(s) for s in steps],
        "steps_not_ok": len(not_ok),
        "benchmarks": [asdict(r) for r in rows],
        "ratios": [{**asdict(r), "met": r.met} for r in ratios(rows)],
        "missed_targets": missed(rows),
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    md = [
        f"# gpu_check: {gpu}",
        "",
        f"CUDA architecture {arch}; {seconds} s in all; {len(not_ok)} step(s) not ok.",
        "",
        "| step | status | s | note |",
        "| --- | --- | ---: | --- |",
        *[f"| {s.step} | {s.status} | {s.seconds} | {s.note} |" for s in steps],
        "",
        markdown(rows, "Benchmarks") if rows else "No benchmark results.",
    ]
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    return len(not_ok)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    summary = sub.add_parser("summary", help="ratios of a pytest-benchmark --benchmark-json file")
    summary.add_argument("bench_json")
    summary.add_argument("--markdown", help="also write a Markdown summary here")
    table = sub.add_parser(
        "table", help="the README's ratio table from a --benchmark-json file, with ranges over more runs"
    )
    table.add_argument("bench_json", nargs="+", help="the run the table shows, then the others")
    table.add_argument("--group", default="", help="only groups containing this text")
    report = sub.add_parser("gpu-check-report", help="gpu_check.sh's gpu_check.json and gpu_check.md")
    report.add_argument("out", type=Path, help="the folder holding bench.json (if any)")
    report.add_argument("--steps", required=True, help="the step records (TSV)")
    report.add_argument("--gpu", default="", help="the GPU as nvidia-smi names it")
    report.add_argument("--arch", default="")
    report.add_argument("--seconds", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "summary":
        rows = rows_from_json(args.bench_json)
        print("\n".join(summary_lines(rows)))
        if args.markdown:
            Path(args.markdown).write_text(markdown(rows, "Benchmarks"))
        return 0 if rows else 1
    if args.command == "table":
        runs = [rows_from_json(path) for path in args.bench_json]
        print("\n".join(ratio_table(runs, args.group)))
        return 0 if runs[0] else 1
    not_ok = gpu_check_report(args.out, read_steps(args.steps), args.gpu, args.arch, args.seconds)
    print((args.out / "gpu_check.md").read_text())
    return 1 if not_ok else 0


if __name__ == "__main__":
    sys.exit(main())
