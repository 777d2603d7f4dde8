"""The CPU engines side by side: open_clip (fp32, and bf16 under ``torch.autocast``) against our Encoder
on ONNX Runtime (fp32), OpenVINO (fp32) and OpenVINO (bf16): the same model, images, batch and threads.

    pytest benchmarks/bench_cpu_engines.py --benchmark-only

Two groups per model:

- ``cpu engines MODEL end to end``: JPEG files -> embeddings. Ours: ``Encoder(onnx, device="cpu",
  engine=..., precision=...).embed(paths)`` (decoding, preprocessing, the queue, the engine).
  open_clip's pipeline: ``Image.open`` + its transform on T threads (as a DataLoader with T workers
  would), then ``encode_image`` in fp32, or under ``torch.autocast("cpu", dtype=torch.bfloat16)``
  (open_clip's own bf16: the fair peer for ours).
- ``cpu engines MODEL model only``: the same preprocessed batches through each engine alone.

ViT-S-32 and ViT-B-32 on 64 photos in batches of 32; ViT-L-14 (slow) on 4 in one batch; random
weights (the speed does not depend on them), T = all cores. Before any timing every Encoder's rows
are checked against open_clip fp32 (fp32 cosine >= 0.99999, bf16 >= 0.999); each of their rows'
``min_cos_vs_open_clip_fp32`` says how close it came. Targets: the exact path (fp32 on the engine
``engine="auto"`` picks here) >= 1.2x open_clip fp32 end to end; bf16 >= 1.8x open_clip fp32 and
ahead of open_clip's bf16 autocast. OpenVINO fp32 / ONNX Runtime fp32 (alone and end to end) is the
measurement behind ``engine="auto"``'s rule. OpenVINO rows skip where it is not installed, bf16 rows
where the CPU has no native bf16.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

import nvclip_fast as nf
from bench_embed import MIN_COS_FP32, cosines, open_clip_forward
from nvclip_fast import engines
from preprocess_reference import bench_photos, open_clip_transform
from throughput import (
    CPU_BF16_VS_AUTOCAST,
    CPU_BF16_VS_OPEN_CLIP,
    CPU_ENGINE_GOAL,
    CPU_EXACT_VS_OPEN_CLIP,
    Compare,
    cpu_threads,
    measure,
)

MIN_COS_BF16 = engines.BF16_MIN_COSINE
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Workload:
    images: int
    batch: int
    rounds: int


WORKLOADS = {
    "ViT-S-32": Workload(images=64, batch=32, rounds=5),
    "ViT-B-32": Workload(images=64, batch=32, rounds=3),
    # 81 GFLOP an image, and open_clip's bf16 autocast takes ~10 s an image here: a few images only.
    "ViT-L-14": Workload(images=4, batch=4, rounds=2),
}
MODELS = ["ViT-S-32", "ViT-B-32", pytest.param("ViT-L-14", marks=pytest.mark.slow)]

END_TO_END, MODEL_ONLY = "end to end", "model only"
# The runs, each (engine, precision): "open_clip" is its own pipeline in PyTorch.
OPEN_CLIP = "open_clip"
RUNS = {
    "open_clip fp32": (OPEN_CLIP, "fp32"),
    "open_clip bf16 autocast": (OPEN_CLIP, "bf16"),
    "ONNX Runtime fp32": (engines.ONNXRUNTIME, "fp32"),
    "OpenVINO fp32": (engines.OPENVINO, "fp32"),
    "OpenVINO bf16": (engines.OPENVINO, "bf16"),
}
OC32, OC16, ORT32, OV32, OV16 = RUNS


def label(run: str, stage: str) -> str:
    """A row's name: ours end to end are Encoders; model-only rows are the engines alone."""
    engine = RUNS[run][0]
    if stage == END_TO_END:
        return run if engine == OPEN_CLIP else f"Encoder, {run}"
    return f"{run} model" if engine == OPEN_CLIP else f"{run} alone"


def comparisons(run: str, stage: str) -> list[Compare]:
    """What a row is divided by, and the targets (end to end only)."""

    def to(other: str, target: float | None = None) -> Compare:
        goal = target is not None and stage == END_TO_END
        return Compare(label(other, stage), target if goal else None, CPU_ENGINE_GOAL if goal else "")

    exact_target = CPU_EXACT_VS_OPEN_CLIP if run == exact_run() else None
    return {
        OC32: [],
        OC16: [to(OC32)],
        ORT32: [to(OC32, exact_target)],
        OV32: [to(OC32, exact_target), to(ORT32)],
        OV16: [to(OC32, CPU_BF16_VS_OPEN_CLIP), to(OC16, CPU_BF16_VS_AUTOCAST), to(OV32)],
    }[run]


def exact_run() -> str:
    """The exact path: what ``Encoder(onnx, device="cpu")`` runs here (fp32, ``engine="auto"``)."""
    return ORT32 if engines.cpu_engine_name("auto", "fp32") == engines.ONNXRUNTIME else OV32


def unavailable(run: str) -> str | None:
    engine, precision = RUNS[run]
    if engine == engines.OPENVINO and not engines.openvino_installed():
        return "openvino is not installed (nvclip-fast[openvino])"
    if engine == engines.OPENVINO and precision == "bf16":
        return engines.cpu_bf16_unavailable_reason()
    return None


@pytest.fixture(scope="module", params=MODELS)
def side_by_side(request, tmp_path_factory):
    """One model (random weights) exported to ONNX, its JPEG files, an Encoder per available run and
    open_clip's pipeline, checked equal before any timing."""
    torch = pytest.importorskip("torch")
    from nvclip_fast import models

    name, work = request.param, WORKLOADS[request.param]
    threads = cpu_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    tmp = tmp_path_factory.mktemp(f"cpu_engines_{name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", models.RandomWeightsWarning)
        loaded = models.load_model(name, random_weights=True)
    model = loaded.model.eval()
    torch.save(model.state_dict(), tmp / "w.pt")
    onnx = tmp / f"{name}.onnx"
    nf.export(name, onnx, weights=tmp / "w.pt", max_batch=work.batch, text=False, quiet=True)
    spec = nf.PreprocessSpec(**loaded.preprocess.to_dict())

    photos = bench_photos()
    paths = []
    for k in range(work.images):
        paths.append(tmp / f"{k:03d}.jpg")
        Image.fromarray(photos[k % len(photos)]).save(paths[-1], quality=JPEG_QUALITY)
    transform = open_clip_transform(spec)
    pool = concurrent.futures.ThreadPoolExecutor(threads)

    def load(path):  # open_clip's pipeline: Image.open, then its transform (which converts to RGB)
        with Image.open(path) as image:
            return transform(image)

    def autocast(precision: str):
        bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
        return bf16 if precision == "bf16" else contextlib.nullcontext()

    def open_clip_files(precision: str) -> np.ndarray:
        rows = []
        with torch.inference_mode(), autocast(precision):
            for start in range(0, len(paths), work.batch):
                x = torch.stack(list(pool.map(load, paths[start : start + work.batch])))
                rows.append(open_clip_forward(torch, model, x).numpy())
        return np.concatenate(rows)

    # The model-only runs take the batches as our pipeline hands them to its engine.
    decoded = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    batches = [
        nf.preprocess(decoded[start : start + work.batch], spec, threads=threads)
        for start in range(0, len(decoded), work.batch)
    ]

    def open_clip_model(precision: str) -> None:
        with torch.inference_mode(), autocast(precision):
            for b in batches:
                open_clip_forward(torch, model, torch.from_numpy(b))

    reference = open_clip_files("fp32")
    runs: dict[str, dict] = {}
    encoders = []
    for run, (engine, precision) in RUNS.items():
        if unavailable(run):
            continue
        if engine == OPEN_CLIP:  # the reference itself, and open_clip's own bf16 (not our claim)
            e2e = (lambda p: lambda: open_clip_files(p))(precision)
            alone = (lambda p: lambda: open_clip_model(p))(precision)
            cos = 1.0 if precision == "fp32" else None
        else:
            encoder = nf.Encoder(
                onnx, device="cpu", engine=engine, precision=precision, threads=threads, max_batch=work.batch
            )
            encoders.append(encoder)
            assert (encoder.engine, encoder.precision) == (engine, precision)
            cos = round(float(cosines(encoder.embed(paths), reference).min()), 7)
            bar = MIN_COS_BF16 if precision == "bf16" else MIN_COS_FP32
            assert cos >= bar, f"{name} {run}: ours and open_clip disagree: min cosine {cos}"
            tower = encoder._towers.images[0]  # the Encoder's own engine, run alone (no second copy)
            e2e = (lambda enc: lambda: enc.embed(paths))(encoder)
            alone = (lambda t: lambda: [t.run(b) for b in batches])(tower)
        runs[run] = {END_TO_END: e2e, MODEL_ONLY: alone, "min_cos": cos}
    yield {"name": name, "work": work, "threads": threads, "runs": runs}
    for encoder in encoders:
        encoder.close()
    pool.shutdown()
    torch.set_num_threads(previous_threads)


@pytest.mark.parametrize("stage", [END_TO_END, MODEL_ONLY])
@pytest.mark.parametrize("run", list(RUNS))
def test_cpu_engine(benchmark, side_by_side, run, stage):
    if reason := unavailable(run):
        pytest.skip(reason)
    s = side_by_side
    work = s["work"]
    benchmark.group = f"cpu engines {s['name']} {stage}"
    measure(
        benchmark,
        s["runs"][run][stage],
        images=work.images,
        label=label(run, stage),
        rounds=work.rounds,
        compare=comparisons(run, stage),
        threads=s["threads"],
        batch=work.batch,
        min_cos_vs_open_clip_fp32=s["runs"][run]["min_cos"],
    )
