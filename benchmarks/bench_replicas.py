"""Replicas on the CPU: two ONNX Runtime replicas behind one queue vs one, the same threads in all.

    pytest benchmarks/bench_replicas.py --benchmark-only

``Encoder(onnx, device=["cpu", "cpu"], threads=T)`` gives each replica T / 2 intra-op threads and
T / 2 preprocessing threads, and the queue sends each batch to whichever replica is free;
``Encoder(onnx, device="cpu", threads=T)`` runs one session on T threads. Both embed the same 64
photos (ViT-S-32, random weights, batches of 32: one batch per replica per round) from one caller,
and their rows are checked equal before any timing. On a GPU machine the same code runs one replica
per GPU; on one CPU it measures whether two half-size sessions side by side beat one full-size
session on the same cores (each replica also preprocesses its own batches, on its share).
"""

from __future__ import annotations

import numpy as np
import pytest

import nvclip_fast as nf
from preprocess_reference import bench_photos
from throughput import Compare, add_info, cpu_threads, measure, queue_stats_info

IMAGES = 64
ROUNDS = 5
MIN_COS = 0.99999  # the same ONNX graph on the same pixels
ONE = "one CPU replica, T threads"
TWO = "two CPU replicas, T/2 threads each"


@pytest.fixture(scope="module")
def replica_encoders(cpu_model):
    threads = cpu_threads()
    photos = [bench_photos()[i % len(bench_photos())] for i in range(IMAGES)]
    options = {"threads": threads, "max_batch": cpu_model.max_batch}
    one = nf.Encoder(cpu_model.onnx, device="cpu", **options)
    two = nf.Encoder(cpu_model.onnx, device=["cpu", "cpu"], **options)
    a, b = one.embed(photos), two.embed(photos)
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= MIN_COS, f"one and two replicas disagree: min cosine {cos.min()}"
    yield {"one": one, "two": two, "photos": photos, "threads": threads}
    one.close()
    two.close()


def _measure(benchmark, encoder, photos, **kwargs) -> None:
    before = encoder.stats()
    measure(benchmark, lambda: encoder.embed(photos), images=len(photos), rounds=ROUNDS, **kwargs)
    after = encoder.stats()
    info = queue_stats_info(before, after)
    info["batches_per_replica"] = [
        now["batches"] - then["batches"]
        for then, now in zip(before["replicas"], after["replicas"], strict=True)
    ]
    add_info(benchmark, info)


@pytest.mark.benchmark(group="replicas cpu ViT-S-32")
def test_one_cpu_replica(benchmark, replica_encoders):
    s = replica_encoders
    _measure(benchmark, s["one"], s["photos"], label=ONE, threads=s["threads"])


@pytest.mark.benchmark(group="replicas cpu ViT-S-32")
def test_two_cpu_replicas(benchmark, replica_encoders):
    s = replica_encoders
    _measure(benchmark, s["two"], s["photos"], label=TWO, compare=[Compare(ONE)], threads=s["threads"])
