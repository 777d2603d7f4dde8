"""Ray's overhead: ``embed --ray`` on a local Ray cluster vs the in-process ``embed``, the same job.

    pytest benchmarks/bench_ray.py --benchmark-only

Both embed the same 48 photo files (scikit-image's samples, 300-640 px, as PNG) with the same model
(ViT-S-32, random weights, batches of 32) on the same T threads into Parquet, from the files to the
written output: ``nf.embed_files`` (one process: listing, decoding threads, the Encoder's queue)
against ``nvclip_fast.ray.embed_with_ray`` (the driver lists the inputs; a Ray task reads them; one
actor with T threads loads the Encoder and embeds; the driver writes one part per partition). Each
round is a whole job, so the Ray side pays every job's fixed costs (an actor process started and
the model loaded in it, the dataset planned and streamed): on a small job that is most of the gap,
on a large one it is amortized. The rows of both are checked equal before timing.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import nvclip_fast as nf
from preprocess_reference import bench_photos
from throughput import Compare, cpu_threads, measure

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pq = pytest.importorskip("pyarrow.parquet")

from nvclip_fast import ray as nf_ray  # noqa: E402
from nvclip_fast.collection import Collection  # noqa: E402
from nvclip_fast.embed_files import Summary  # noqa: E402
from nvclip_fast.outputs import read_output  # noqa: E402

pytestmark = pytest.mark.ray

IMAGES = 48
ROUNDS = 3
OBJECT_STORE_BYTES = 200 * 1024 * 1024
MIN_COS = 0.99999  # the same ONNX graph on the same pixels
IN_PROCESS = "in-process embed (files -> Parquet), T threads"
RAY = "embed --ray, local Ray, 1 actor with T threads (files -> Parquet parts)"


@pytest.fixture(scope="module")
def ray_job(cpu_model, tmp_path_factory):
    threads = cpu_threads()
    folder = tmp_path_factory.mktemp("ray_photos")
    photos = bench_photos()
    for k in range(IMAGES):
        Image.fromarray(photos[k % len(photos)]).save(folder / f"{k:03d}.png")
    out = tmp_path_factory.mktemp("ray_out")

    def in_process() -> Summary:
        options = {"threads": threads, "max_batch": cpu_model.max_batch}
        with nf.Encoder(cpu_model.onnx, device="cpu", **options) as encoder:
            return nf.embed_files(
                folder,
                encoder,
                out / "in-process.parquet",
                batch=cpu_model.max_batch,
                workers=threads,
                overwrite=True,
                progress=False,
            )

    def on_ray() -> Summary:
        return nf_ray.embed_with_ray(
            folder,
            cpu_model.onnx,
            out / "ray",
            batch_size=cpu_model.max_batch,
            num_cpus=1,  # the reading tasks keep a CPU of their own
            threads=threads,
            max_batch=cpu_model.max_batch,
            overwrite=True,
            progress=False,
        )

    job = {"folder": folder, "threads": threads, "in_process": in_process, "ray": on_ray}
    ray.init(
        num_cpus=threads, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, log_to_driver=False
    )
    try:  # shut down also when the rows disagree
        assert job["in_process"]().embedded == job["ray"]().embedded == IMAGES
        a = read_output(out / "in-process.parquet").embeddings
        with Collection.open(out / "ray") as parts:
            b = np.concatenate(list(parts.embedding_chunks()))
        cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.min() >= MIN_COS, f"Ray and in-process rows disagree: min cosine {cos.min()}"
        yield job
    finally:
        ray.shutdown()


@pytest.mark.benchmark(group="ray cpu ViT-S-32")
def test_in_process_embed(benchmark, ray_job):
    measure(
        benchmark,
        ray_job["in_process"],
        images=IMAGES,
        rounds=ROUNDS,
        label=IN_PROCESS,
        threads=ray_job["threads"],
    )


@pytest.mark.benchmark(group="ray cpu ViT-S-32")
def test_embed_with_ray(benchmark, ray_job):
    measure(
        benchmark,
        ray_job["ray"],
        images=IMAGES,
        rounds=ROUNDS,
        label=RAY,
        compare=[Compare(IN_PROCESS)],
        threads=ray_job["threads"],
    )
