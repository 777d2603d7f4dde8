"""The batch queue under many small callers: 32 threads each embedding one image per call vs one
caller embedding the same images in batches, through the same ``Encoder(onnx)`` on the CPU.

    pytest benchmarks/bench_batch_queue.py --benchmark-only

The queue batches the concurrent callers' images together (up to max_batch, waiting at most
max_delay_ms for a batch to fill), so the many-callers number should approach the batched one;
``mean_batch`` in extra_info is the batch size the queue actually formed during the timed rounds,
``batch_sizes`` the histogram of them.
"""

from __future__ import annotations

import concurrent.futures

import pytest

import nvclip_fast as nf
from preprocess_reference import bench_photos
from throughput import (
    EMBED_GOAL,
    QUEUE_CALLERS_VS_BATCHED,
    Compare,
    add_info,
    cpu_threads,
    measure,
    queue_stats_info,
)

CALLERS = 32  # single-image callers, as a busy server has
IMAGES = 64  # two images per caller, two full batches for the batched caller
ROUNDS = 5
BATCHED = "one caller, batched"
SINGLE_IMAGE_CALLERS = f"{CALLERS} single-image callers"


@pytest.fixture(scope="module")
def queue_setup(cpu_model):
    photos = [bench_photos()[i % len(bench_photos())] for i in range(IMAGES)]
    encoder = nf.Encoder(cpu_model.onnx, device="cpu", threads=cpu_threads(), max_batch=cpu_model.max_batch)
    callers = concurrent.futures.ThreadPoolExecutor(CALLERS, thread_name_prefix="caller")
    yield encoder, photos, callers
    callers.shutdown()
    encoder.close()


def _measure_with_batches(benchmark, encoder, fn, **kwargs) -> None:
    before = encoder.stats()  # the queue's own counters: how the images were batched
    measure(benchmark, fn, **kwargs)
    add_info(benchmark, queue_stats_info(before, encoder.stats()))


@pytest.mark.benchmark(group="batch_queue cpu ViT-S-32")
def test_one_caller_batched(benchmark, queue_setup):
    encoder, photos, _ = queue_setup
    _measure_with_batches(
        benchmark, encoder, lambda: encoder.embed(photos), images=len(photos), label=BATCHED, rounds=ROUNDS
    )


@pytest.mark.benchmark(group="batch_queue cpu ViT-S-32")
def test_32_single_image_callers(benchmark, queue_setup):
    encoder, photos, callers = queue_setup

    def step():
        # Each caller thread embeds one image per call; at most CALLERS calls are in flight.
        rows = list(callers.map(lambda image: encoder.embed([image]), photos))
        assert len(rows) == len(photos)

    _measure_with_batches(
        benchmark,
        encoder,
        step,
        images=len(photos),
        label=SINGLE_IMAGE_CALLERS,
        rounds=ROUNDS,
        compare=[Compare(BATCHED, QUEUE_CALLERS_VS_BATCHED, EMBED_GOAL)],
        callers=CALLERS,
    )
