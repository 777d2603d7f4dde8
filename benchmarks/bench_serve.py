"""The HTTP server against the in-process Encoder: 16 concurrent clients each sending single-image
requests (JPEG data URLs, base64 answers) to ``nvclip-fast serve``, vs the same images embedded by an
``Encoder`` in this process, with the same model, engine options and threads.

    pytest benchmarks/bench_serve.py --benchmark-only

Rows (same group, same images):
- ``16 HTTP clients, single-image requests``: the server (a subprocess on 127.0.0.1); what HTTP,
  JSON and base64 cost on top of the Encoder shows as its ratio to the next row (target >= 0.8);
- ``in-process Encoder, 16 single-image callers``: 16 threads each calling ``embed([image])``, the
  same concurrency without HTTP;
- ``in-process Encoder, one caller, batched``: all images in one ``embed`` call (the best case).

``extra_info``: images/s, ``p50_ms`` / ``p99_ms`` per request (timed rounds only) and
``mean_batch`` (the engine batch size the queue formed, from the server's /v1/metrics or the
Encoder's stats). CPU: ViT-S-32 ONNX (the benchmarks' CPU model). GPU (marked gpu): ViT-L-14 with
random weights in fp16 by name, in the server and in this process: the bundle cache's entry (a
TensorRT plan where TensorRT is installed, built on the first run), else the PyTorch engine.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nvclip_fast as nf
from preprocess_reference import bench_photos
from throughput import Compare, cpu_threads, measure

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from server_process import Client, ServerProcess, encode, serve_command

CLIENTS = 16
ROUNDS = 5
JPEG_QUALITY = 90
SERVE_VS_IN_PROCESS = 0.8  # HTTP and base64 must stay small next to the model
TARGET_SOURCE = "serving overhead"
MIN_COS = {"fp32": 0.99999, "fp16": 0.999}  # fp16: the exporter's gate
HTTP = f"{CLIENTS} HTTP clients, single-image requests"
IN_PROCESS_CALLERS = f"in-process Encoder, {CLIENTS} single-image callers"
IN_PROCESS_BATCHED = "in-process Encoder, one caller, batched"


@dataclass(frozen=True)
class Setup:
    group: str
    images: int
    precision: str
    server_args: list[str]  # after `nvclip-fast serve --port 0`
    encoder: Callable[[], nf.Encoder]


def cpu_setup(request) -> Setup:
    model = request.getfixturevalue("cpu_model")
    threads = cpu_threads()
    return Setup(
        group=f"serve cpu {model.name}",
        images=2 * model.max_batch,
        precision="fp32",
        server_args=[
            "-m",
            str(model.onnx),
            "--device",
            "cpu",
            "--threads",
            str(threads),
            "--max-batch",
            str(model.max_batch),
        ],
        encoder=lambda: nf.Encoder(model.onnx, device="cpu", threads=threads, max_batch=model.max_batch),
    )


GPU_MODEL = "ViT-L-14"
GPU_MAX_BATCH = 64  # more than the 16 requests in flight: batches are as large as the clients make them


def gpu_setup(request) -> Setup:
    return Setup(
        group=f"serve gpu {GPU_MODEL} fp16",
        images=256,
        precision="fp16",
        server_args=[
            "-m",
            GPU_MODEL,
            "--random-weights",
            "--device",
            "cuda",
            "--precision",
            "fp16",
            "--max-batch",
            str(GPU_MAX_BATCH),
        ],
        # What `serve -m NAME` runs: the bundle cache's entry (a TensorRT plan where TensorRT is installed).
        encoder=lambda: nf.Encoder.from_pretrained(
            GPU_MODEL, random_weights=True, device="cuda", precision="fp16", max_batch=GPU_MAX_BATCH
        ),
    )


@dataclass
class SideBySide:
    setup: Setup
    jpegs: list[bytes]
    bodies: list[bytes]  # one single-image request per image, serialized once
    encoder: nf.Encoder
    server: ServerProcess
    pool: concurrent.futures.ThreadPoolExecutor
    latencies: list[float] = field(default_factory=list)
    _local: threading.local = field(default_factory=threading.local)
    _clients: list[Client] = field(default_factory=list)

    def _client(self) -> Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.server.client()
            self._clients.append(client)
        return client

    def _post(self, k: int) -> np.ndarray:
        start = time.perf_counter()
        reply = self._client().request("POST", "/v1/embeddings", self.bodies[k])
        assert reply.status == 200, reply.body
        row = np.frombuffer(base64.b64decode(reply.json()["data"][0]["embedding"]), "<f4")
        self.latencies.append(time.perf_counter() - start)
        return row

    def http_clients(self) -> np.ndarray:
        return np.stack(list(self.pool.map(self._post, range(len(self.bodies)))))

    def _embed_one(self, k: int) -> np.ndarray:
        start = time.perf_counter()
        row = self.encoder.embed([self.jpegs[k]])[0]
        self.latencies.append(time.perf_counter() - start)
        return row

    def in_process_callers(self) -> np.ndarray:
        return np.stack(list(self.pool.map(self._embed_one, range(len(self.jpegs)))))

    def in_process_batched(self) -> np.ndarray:
        return self.encoder.embed(self.jpegs)

    def server_queue(self) -> tuple[float, float]:
        """(images, batches) the server's queue has run, from its /v1/metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self._client().get("/v1/metrics").body.decode()
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        return values["nvclip_fast_queue_images_total"], values["nvclip_fast_queue_batches_total"]

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.pool.shutdown()
        self.encoder.close()
        self.server.stop()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module", params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def side_by_side(request, tmp_path_factory):
    """The server and the in-process Encoder on the same JPEGs, checked equal before any timing."""
    setup = cpu_setup(request) if request.param == "cpu" else gpu_setup(request)
    photos = bench_photos()
    jpegs = [encode(photos[i % len(photos)], "JPEG", quality=JPEG_QUALITY) for i in range(setup.images)]
    bodies = [
        json.dumps(
            {"input": [f"data:image/jpeg;base64,{base64.b64encode(j).decode()}"], "encoding_format": "base64"}
        ).encode()
        for j in jpegs
    ]
    log: Path = tmp_path_factory.mktemp("bench_serve") / "server.log"
    server = ServerProcess(serve_command(*setup.server_args), log)
    s = SideBySide(
        setup, jpegs, bodies, setup.encoder(), server, concurrent.futures.ThreadPoolExecutor(CLIENTS)
    )
    try:
        server.wait_ready()
        cos = cosines(s.http_clients(), s.in_process_batched())
        assert cos.min() >= MIN_COS[setup.precision], f"server and Encoder disagree: min cosine {cos.min()}"
        yield s
    finally:
        s.close()


def _measure(benchmark, s: SideBySide, fn: Callable[[], Any], label: str, queue: Callable, **kwargs) -> None:
    """measure() plus the per-request latency percentiles of the timed rounds and the mean batch."""
    benchmark.group = s.setup.group
    s.latencies.clear()
    images_before, batches_before = queue()
    measure(benchmark, fn, images=s.setup.images, label=label, rounds=ROUNDS, **kwargs)
    images_after, batches_after = queue()
    timed = s.latencies[-ROUNDS * s.setup.images :]
    if timed:
        p50, p99 = np.percentile(timed, [50, 99]) * 1000
        benchmark.extra_info.update(p50_ms=round(float(p50), 1), p99_ms=round(float(p99), 1))
    batches = max(batches_after - batches_before, 1)
    benchmark.extra_info["mean_batch"] = round((images_after - images_before) / batches, 1)


def _encoder_queue(s: SideBySide) -> Callable[[], tuple[float, float]]:
    return lambda: (s.encoder.stats()["images"], s.encoder.stats()["batches"])


def test_serve_http_clients(benchmark, side_by_side):
    s = side_by_side
    _measure(
        benchmark,
        s,
        s.http_clients,
        HTTP,
        s.server_queue,
        compare=[
            Compare(IN_PROCESS_CALLERS, SERVE_VS_IN_PROCESS, TARGET_SOURCE),
            Compare(IN_PROCESS_BATCHED),
        ],
        clients=CLIENTS,
    )


def test_serve_in_process_callers(benchmark, side_by_side):
    s = side_by_side
    _measure(benchmark, s, s.in_process_callers, IN_PROCESS_CALLERS, _encoder_queue(s), callers=CLIENTS)


def test_serve_in_process_batched(benchmark, side_by_side):
    s = side_by_side
    _measure(benchmark, s, s.in_process_batched, IN_PROCESS_BATCHED, _encoder_queue(s))
