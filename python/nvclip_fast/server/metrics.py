"""Prometheus metrics of one server (``GET /v1/metrics``), in a registry of its own.

- ``nvclip_fast_requests_total{route, code}``, ``nvclip_fast_request_duration_seconds{route}``: every
  HTTP request, by route template and status code.
- ``nvclip_fast_items_total{kind, outcome}``: the inputs of ``/v1/embeddings``, ``kind`` image or
  text, ``outcome`` ok or error (the request failed after its inputs were read).
- ``nvclip_fast_queued_items``: images and texts accepted and not yet embedded (what the
  ``max_queued`` limit counts).
- ``nvclip_fast_text_batch_size``, ``nvclip_fast_text_batch_requests``: texts, and requests, per
  text-tower batch.
- ``nvclip_fast_queue_*``: the Encoder's image-queue counters (``Encoder.stats()``), read at scrape
  time; ``batch_sizes`` ({batch size: batches}), where the Encoder reports it, becomes the histogram
  ``nvclip_fast_image_batch_size``.
- ``nvclip_fast_ready``: 1 once the model is loaded and warmed up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

PREFIX = "nvclip_fast"
# Request latency: from a cached text (~1 ms) to a full request of large images on a CPU (~10 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Batch sizes: powers of two up to this (engines' largest batches are powers of two, 128 by default).
MAX_BATCH_BUCKET = 1024
# Encoder.stats() keys that only grow (exported as counters); the others (largest_batch,
# queued_images, ...) are levels (gauges).
QUEUE_COUNTERS = frozenset(
    {
        "batches",
        "failed_batches",
        "images",
        "cancelled_images",
        "requests",
        "oversized_images",
        "callback_failures",
    }
)
BATCH_SIZES = "batch_sizes"


def batch_buckets(limit: int = MAX_BATCH_BUCKET) -> tuple[float, ...]:
    """1, 2, 4, ... up to ``limit``."""
    buckets, size = [], 1
    while size <= limit:
        buckets.append(float(size))
        size *= 2
    return tuple(buckets)


def _histogram_of_counts(name: str, doc: str, counts: Mapping[int, int]) -> HistogramMetricFamily:
    """A histogram family from {value: how many times}: cumulative counts per power-of-two bucket."""
    buckets = [
        (str(bound), sum(n for value, n in counts.items() if value <= bound)) for bound in batch_buckets()
    ]
    buckets.append(("+Inf", sum(counts.values())))
    total = float(sum(value * n for value, n in counts.items()))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


class QueueCollector(Collector):
    """The Encoder's queue counters, read when scraped."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]):
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        for key, value in self._stats().items():
            if key == BATCH_SIZES and isinstance(value, Mapping):
                yield _histogram_of_counts(
                    f"{PREFIX}_image_batch_size",
                    "Images per engine batch of the image queue",
                    {int(k): int(v) for k, v in value.items()},
                )
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                name = f"{PREFIX}_queue_{key}"
                doc = f"Encoder.stats()['{key}'] of the image queue"
                family = CounterMetricFamily if key in QUEUE_COUNTERS else GaugeMetricFamily
                yield family(name, doc, value=value)


class Metrics:
    """The server's metrics; ``render()`` is the ``/v1/metrics`` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "HTTP requests by route and status code", ["route", "code"], registry=r
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter(
            f"{PREFIX}_items", "Inputs of /v1/embeddings by kind and outcome", ["kind", "outcome"], registry=r
        )
        self.queued = Gauge(
            f"{PREFIX}_queued_items", "Images and texts accepted, not yet embedded", registry=r
        )
        self.text_batch_size = Histogram(
            f"{PREFIX}_text_batch_size", "Texts per text-tower batch", buckets=batch_buckets(), registry=r
        )
        self.text_batch_requests = Histogram(
            f"{PREFIX}_text_batch_requests",
            "Requests whose texts shared one text-tower batch",
            buckets=batch_buckets(),
            registry=r,
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 once the model is loaded and warmed up", registry=r)

    def watch_queue(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        """Export the Encoder's queue counters (``stats`` is called at every scrape)."""
        self.registry.register(QueueCollector(stats))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
