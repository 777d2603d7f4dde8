"""End-to-end embedding throughput: decoded images in, embeddings out, ours against open_clip's own
pipeline on the same model, the same images and the same threads.

    pytest benchmarks/bench_embed.py --benchmark-only

CPU: ``Encoder(onnx)`` (queue + resize_normalize + ONNX Runtime) vs open_clip's pipeline (its Pillow
transform on PIL images, then the torch model's ``encode_image``), ViT-S-32 with random weights,
T = all cores: ONNX Runtime's intra-op threads and our preprocessing threads = T, torch's threads =
T, and the peer's Pillow transforms on one thread (as open_clip's README calls them) or spread
over T threads (as a DataLoader with T workers would).

GPU (marked gpu): ViT-L-14 and ViT-H-14 at 336 px, fp16, batch 128, random weights built on the GPU:
the PyTorch engine end to end (``Encoder.from_engine`` over the same ``TorchEngine`` that
``Encoder.from_open_clip`` builds, fed uint8 640x480 host images) vs the same model on a pre-made
fp16 device batch (model-only) vs open_clip eager (Pillow transform + the model). With TensorRT
(marked tensorrt, slow): the exported fp16 plan end to end vs TensorRT alone on a device batch.
"""

from __future__ import annotations

import concurrent.futures
import warnings

import numpy as np
import pytest
from PIL import Image

import nvclip_fast as nf
from preprocess_reference import bench_photos, open_clip_transform
from throughput import (
    EMBED_CPU_VS_OPEN_CLIP,
    EMBED_GOAL,
    EMBED_GPU_VS_MODEL_ONLY,
    Compare,
    add_info,
    cpu_threads,
    measure,
    queue_stats_info,
)

# The parity bar for Encoder(onnx) against open_clip's pipeline in fp32; fp16 towers are held
# to the exporter's fp16 gate.
MIN_COS_FP32 = 0.99999
MIN_COS_FP16 = 0.999
CPU_IMAGES = 64  # two batches of CPU_MAX_BATCH per round
CPU_ROUNDS = 5

OURS = "Encoder(onnx)"
PEER_1_THREAD = "open_clip, Pillow on 1 thread"
PEER_T_THREADS = "open_clip, Pillow on T threads"
# The forward passes alone, on the same images already preprocessed: what each pipeline is bounded by.
ORT_ONLY = "ONNX Runtime alone (preprocessed batches)"
TORCH_ONLY = "torch model alone (preprocessed batches)"


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def open_clip_forward(torch, model, x):
    """What open_clip's pipeline ends with (and what TorchEngine runs): normalized float32 rows."""
    return torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)


# ---- CPU ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_side_by_side(cpu_model):
    """Our encoder and open_clip's pipeline on the same images, checked equal before any timing."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    from nvclip_fast.engines import ort_session_options

    threads = cpu_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    photos = [bench_photos()[i % len(bench_photos())] for i in range(CPU_IMAGES)]
    pil_images = [Image.fromarray(a) for a in photos]
    transform = open_clip_transform(cpu_model.spec)
    pool = concurrent.futures.ThreadPoolExecutor(threads)

    def peer(map_fn) -> np.ndarray:
        rows = []
        with torch.inference_mode():
            for start in range(0, len(pil_images), cpu_model.max_batch):
                x = torch.stack(list(map_fn(transform, pil_images[start : start + cpu_model.max_batch])))
                rows.append(open_clip_forward(torch, cpu_model.model, x).numpy())
        return np.concatenate(rows)

    # ONNX Runtime, as the model-only row runs it: the ratio between them is what the pipeline costs.
    # (The CPU engines against each other: bench_cpu_engines.py.)
    encoder = nf.Encoder(
        cpu_model.onnx, device="cpu", engine="onnxruntime", threads=threads, max_batch=cpu_model.max_batch
    )
    cos = cosines(encoder.embed(photos), peer(map))
    assert cos.min() >= MIN_COS_FP32, f"ours and open_clip disagree: min cosine {cos.min()}"
    # The model-only runs take the images as the pipelines hand them to their models.
    batches = [
        nf.preprocess(photos[start : start + cpu_model.max_batch], cpu_model.spec, threads=threads)
        for start in range(0, len(photos), cpu_model.max_batch)
    ]
    session = ort.InferenceSession(
        str(cpu_model.onnx), ort_session_options("fp32", threads), providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name

    def torch_only() -> None:
        with torch.inference_mode():
            for b in batches:
                open_clip_forward(torch, cpu_model.model, torch.from_numpy(b))

    yield {
        "threads": threads,
        "photos": photos,
        "encoder": encoder,
        "peer_1_thread": lambda: peer(map),
        "peer_t_threads": lambda: peer(pool.map),
        "ort_only": lambda: [session.run(None, {input_name: b}) for b in batches],
        "torch_only": torch_only,
    }
    encoder.close()
    pool.shutdown()
    torch.set_num_threads(previous_threads)


@pytest.mark.benchmark(group="embed cpu ViT-S-32")
def test_encoder_onnx_cpu(benchmark, cpu_side_by_side):
    s = cpu_side_by_side
    measure(
        benchmark,
        lambda: s["encoder"].embed(s["photos"]),
        images=len(s["photos"]),
        label=OURS,
        rounds=CPU_ROUNDS,
        compare=[
            Compare(PEER_T_THREADS, EMBED_CPU_VS_OPEN_CLIP, EMBED_GOAL),
            Compare(PEER_1_THREAD),
            Compare(ORT_ONLY),
        ],
        threads=s["threads"],
    )


@pytest.mark.benchmark(group="embed cpu ViT-S-32")
def test_open_clip_pipeline_cpu_pillow_1_thread(benchmark, cpu_side_by_side):
    s = cpu_side_by_side
    measure(
        benchmark,
        s["peer_1_thread"],
        images=len(s["photos"]),
        label=PEER_1_THREAD,
        rounds=CPU_ROUNDS,
        compare=[Compare(TORCH_ONLY)],
        threads=s["threads"],
    )


@pytest.mark.benchmark(group="embed cpu ViT-S-32")
def test_open_clip_pipeline_cpu_pillow_t_threads(benchmark, cpu_side_by_side):
    s = cpu_side_by_side
    measure(
        benchmark,
        s["peer_t_threads"],
        images=len(s["photos"]),
        label=PEER_T_THREADS,
        rounds=CPU_ROUNDS,
        compare=[Compare(TORCH_ONLY)],
        threads=s["threads"],
    )


@pytest.mark.benchmark(group="embed cpu ViT-S-32")
def test_onnx_runtime_alone_cpu(benchmark, cpu_side_by_side):
    s = cpu_side_by_side
    measure(
        benchmark,
        s["ort_only"],
        images=len(s["photos"]),
        label=ORT_ONLY,
        rounds=CPU_ROUNDS,
        compare=[Compare(TORCH_ONLY)],
        threads=s["threads"],
    )


@pytest.mark.benchmark(group="embed cpu ViT-S-32")
def test_torch_model_alone_cpu(benchmark, cpu_side_by_side):
    s = cpu_side_by_side
    measure(benchmark, s["torch_only"], images=len(s["photos"]), label=TORCH_ONLY, rounds=CPU_ROUNDS)


# ---- GPU ------------------------------------------------------------------------------------------

GPU_MODELS = ("ViT-L-14", "ViT-H-14")
GPU_IMAGE_SIZE = 336
GPU_BATCH = 128
GPU_BATCHES_PER_CALL = 4  # 512 images per end-to-end call: the pipeline fills and drains once
HOST_IMAGE_HW = (480, 640)  # uint8 640x480 RGB host images, a camera's frames
GPU_STREAMS = 2
# Staging ring: every slot's batch on the device plus one batch queued behind them.
GPU_STAGING_BATCHES = GPU_STREAMS + 1
GPU_SEED = 0
MODEL_ONLY_ROUNDS = 10
E2E_ROUNDS = 5
EAGER_ROUNDS = 2
PARITY_IMAGES = 8
MIB = 1 << 20

E2E = "PyTorch engine, end to end"
MODEL_ONLY = "model only (fp16 device batch)"
EAGER = "open_clip eager fp16 (Pillow on all cores)"
TRT_E2E = "TensorRT plan, end to end"
TRT_ONLY = "TensorRT only (fp16 device batch)"


def build_on_gpu(torch, name: str):
    """open_clip's ``precision='fp16'`` model with random weights, initialized on the GPU (ViT-H's
    random init on the CPU takes seconds per copy; under ``torch.device('cuda')`` it takes well under
    one)."""
    import open_clip

    with torch.device("cuda"), torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        torch.manual_seed(GPU_SEED)
        model = open_clip.create_model(name, precision="fp16", device="cuda", force_image_size=GPU_IMAGE_SIZE)
    return model.eval()


@pytest.fixture(scope="module")
def host_images_640x480() -> list[np.ndarray]:
    """Photos resized to 640x480 uint8 RGB, GPU_BATCH * GPU_BATCHES_PER_CALL of them (real content,
    never zeros: constant images would flatter every stage)."""
    h, w = HOST_IMAGE_HW
    base = [np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BICUBIC)) for a in bench_photos()]
    return [base[i % len(base)].copy() for i in range(GPU_BATCH * GPU_BATCHES_PER_CALL)]


@pytest.fixture(scope="module", params=GPU_MODELS)
def gpu_model(request, host_images_640x480):
    """(name, model, spec, encoder over its TorchEngine) for one GPU model; parity checked first."""
    torch = pytest.importorskip("torch")
    from nvclip_fast import metadata
    from nvclip_fast.engines import TorchEngine

    name = request.param
    model = build_on_gpu(torch, name)
    spec = nf.PreprocessSpec.from_open_clip(model)
    engine = TorchEngine(
        model,
        "image",
        embed_dim=model.visual.output_dim,
        input_shape=(3, GPU_IMAGE_SIZE, GPU_IMAGE_SIZE),
        input_dtype="float16",
        device="cuda",
        batch=metadata.BatchProfile(1, GPU_BATCH, GPU_BATCH),
    )
    image_bytes = host_images_640x480[0].nbytes
    staging_mb = -(-GPU_STAGING_BATCHES * GPU_BATCH * image_bytes // (1 << 20))
    encoder = nf.Encoder.from_engine(
        engine, spec, name=name, max_batch=GPU_BATCH, streams=GPU_STREAMS, staging_mb=staging_mb
    )
    some = host_images_640x480[:PARITY_IMAGES]
    with torch.inference_mode():
        x = torch.stack([open_clip_transform(spec)(Image.fromarray(a)) for a in some]).cuda().half()
        want = open_clip_forward(torch, model, x).cpu().numpy()
    cos = cosines(encoder.embed(some), want)
    assert cos.min() >= MIN_COS_FP16, f"{name}: ours and open_clip eager disagree: min cosine {cos.min()}"
    yield name, model, spec, encoder
    encoder.close()
    del model, engine, encoder
    torch.cuda.empty_cache()


def _gpu_group(name: str) -> str:
    return f"embed gpu {name}@{GPU_IMAGE_SIZE} fp16 b{GPU_BATCH}"


@pytest.mark.gpu
def test_gpu_model_only(benchmark, gpu_model, host_images_640x480):
    import torch

    name, model, spec, _ = gpu_model
    benchmark.group = _gpu_group(name)
    x = nf.preprocess(host_images_640x480[:GPU_BATCH], spec, device="cuda", dtype="float16")

    def step():
        with torch.inference_mode():
            open_clip_forward(torch, model, x)
        torch.cuda.synchronize()

    measure(
        benchmark,
        step,
        images=GPU_BATCH,
        label=MODEL_ONLY,
        rounds=MODEL_ONLY_ROUNDS,
        gpu_work=(name, GPU_IMAGE_SIZE),
    )


@pytest.mark.gpu
def test_gpu_pytorch_engine_end_to_end(benchmark, gpu_model, host_images_640x480):
    import torch

    name, _, _, encoder = gpu_model
    benchmark.group = _gpu_group(name)
    before = encoder.stats()

    def step():
        encoder.embed(host_images_640x480)
        torch.cuda.synchronize()

    measure(
        benchmark,
        step,
        images=len(host_images_640x480),
        label=E2E,
        rounds=E2E_ROUNDS,
        compare=[Compare(MODEL_ONLY, EMBED_GPU_VS_MODEL_ONLY, EMBED_GOAL), Compare(EAGER)],
        gpu_work=(name, GPU_IMAGE_SIZE),
    )
    add_info(benchmark, queue_stats_info(before, encoder.stats()))


@pytest.mark.gpu
def test_gpu_open_clip_eager(benchmark, gpu_model, host_images_640x480):
    """open_clip as its users run it on a GPU: Pillow transforms on a pool of all cores (a DataLoader
    with workers), pinned batches, the fp16 model; the next batch's transforms overlap this one's
    forward pass because kernel launches return at once."""
    import torch

    name, model, spec, _ = gpu_model
    benchmark.group = _gpu_group(name)
    transform = open_clip_transform(spec)
    pil_images = [Image.fromarray(a) for a in host_images_640x480]
    pool = concurrent.futures.ThreadPoolExecutor(cpu_threads())

    def step():
        rows = []
        with torch.inference_mode():
            for start in range(0, len(pil_images), GPU_BATCH):
                x = torch.stack(list(pool.map(transform, pil_images[start : start + GPU_BATCH])))
                x = x.pin_memory().to("cuda", non_blocking=True).half()
                rows.append(open_clip_forward(torch, model, x))
            torch.cat(rows).cpu()  # waits for the last forward pass, as our embed() does
        torch.cuda.synchronize()

    try:
        measure(
            benchmark,
            step,
            images=len(pil_images),
            label=EAGER,
            rounds=EAGER_ROUNDS,
            gpu_work=(name, GPU_IMAGE_SIZE),
            threads=cpu_threads(),
        )
    finally:
        pool.shutdown()


# ---- TensorRT ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=GPU_MODELS)
def trt_plan(request, tmp_path_factory):
    """The model exported to a TensorRT fp16 plan (batch 1..128) with random weights: slow (ONNX
    export and parity check on the CPU, then TensorRT's build)."""
    from nvclip_fast import models

    name = request.param
    plan = tmp_path_factory.mktemp("trt") / f"{name}.plan"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", models.RandomWeightsWarning)
        nf.export(
            name,
            plan,
            random_weights=True,
            image_size=GPU_IMAGE_SIZE,
            precision="fp16",
            max_batch=GPU_BATCH,
            text=False,
            quiet=True,
        )
    return name, plan


@pytest.mark.tensorrt
@pytest.mark.slow
def test_tensorrt_only(benchmark, trt_plan, host_images_640x480):
    """TensorRT's own runtime on a device batch: the ceiling for the plan's end-to-end number."""
    import tensorrt as trt
    import torch

    from nvclip_fast import metadata

    name, plan = trt_plan
    benchmark.group = f"embed tensorrt {name}@{GPU_IMAGE_SIZE} fp16 b{GPU_BATCH}"
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    (input_name,) = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    (output_name,) = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    spec = nf.PreprocessSpec(**metadata.load(plan.with_suffix(".json")).preprocess.to_dict())
    in_dtype = "float16" if engine.get_tensor_dtype(input_name) == trt.DataType.HALF else "float32"
    x = nf.preprocess(host_images_640x480[:GPU_BATCH], spec, device="cuda", dtype=in_dtype)
    context.set_input_shape(input_name, tuple(x.shape))
    out = torch.empty(tuple(context.get_tensor_shape(output_name)), device="cuda", dtype=torch.float32)
    context.set_tensor_address(input_name, x.data_ptr())
    context.set_tensor_address(output_name, out.data_ptr())
    stream = torch.cuda.current_stream()

    def step():
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()

    # What each stream slot's execution context allocates for the largest batch (10.0 has only the
    # first name, 11.x only the second).
    context_bytes = getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size
    measure(
        benchmark,
        step,
        images=GPU_BATCH,
        label=TRT_ONLY,
        rounds=MODEL_ONLY_ROUNDS,
        gpu_work=(name, GPU_IMAGE_SIZE),
        context_memory_mib=round(context_bytes / MIB, 1),
    )


@pytest.mark.tensorrt
@pytest.mark.slow
def test_tensorrt_end_to_end(benchmark, trt_plan, host_images_640x480):
    import torch

    name, plan = trt_plan
    benchmark.group = f"embed tensorrt {name}@{GPU_IMAGE_SIZE} fp16 b{GPU_BATCH}"
    with nf.Encoder(plan, max_batch=GPU_BATCH) as encoder:
        before = encoder.stats()

        def step():
            encoder.embed(host_images_640x480)
            torch.cuda.synchronize()

        measure(
            benchmark,
            step,
            images=len(host_images_640x480),
            label=TRT_E2E,
            rounds=E2E_ROUNDS,
            compare=[Compare(TRT_ONLY, EMBED_GPU_VS_MODEL_ONLY, EMBED_GOAL)],
            gpu_work=(name, GPU_IMAGE_SIZE),
        )
        add_info(benchmark, queue_stats_info(before, encoder.stats()))
