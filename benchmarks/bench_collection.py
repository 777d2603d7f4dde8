"""Search, indexes and near-duplicates over a collection of synthetic unit vectors.

    pytest benchmarks/bench_collection.py --benchmark-only            # 100k and 1M rows
    pytest benchmarks/bench_collection.py --benchmark-only -m "not slow"  # 100k rows only

The collection: ``ROWS`` unit vectors of ``DIM`` floats (the size of ViT-B embeddings), stored as
``.npy`` + ids + provenance as ``embed`` writes them, scattered around ``ROWS / 100`` random
centres as real embeddings are (a pair from one centre has a cosine of about 0.8), with 1% of the
rows planted again as near-duplicates (cosine about 0.998). Queries: ``QUERIES`` rows of the
collection moved by noise, searched for their top 10 together.

- exact search: :meth:`Collection.search_vectors` (chunked matrix products) -> queries/s;
- index search: the :class:`~nvclip_fast.search.Index` that ``nvclip-fast index`` builds for this
  size (built once, untimed; its build time and the recall it measured in ``extra_info``) ->
  queries/s and recall@10 against the exact answer of the same queries;
- dedup: ``Collection.near_duplicates(0.95)`` in a fresh process -> seconds and peak RSS.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from nvclip_fast.collection import IDS_SUFFIX, PROVENANCE_SUFFIX, Collection
from nvclip_fast.provenance import Provenance
from nvclip_fast.search import Index

DIM = 512
QUERIES = 100
K = 10
ROWS_PER_CENTRE = 100
SPREAD = 0.5  # noise norm around a centre: cosine of two rows of one centre ~ 1 / (1 + SPREAD**2)
DUPLICATE_SHARE = 0.01
DUPLICATE_NOISE = 0.05
QUERY_NOISE = 0.3
WRITE_BLOCK = 65_536
DEDUP_THRESHOLD = 0.95
SEARCH_ROUNDS = 3
SIZES = [
    pytest.param(100_000, id="100k"),
    pytest.param(1_000_000, id="1M", marks=pytest.mark.slow),
]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_collection(path: Path, rows: int, seed: int = 0) -> Path:
    """The synthetic collection of the module doc at ``path`` (.npy, ids, provenance), block by block."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((max(1, rows // ROWS_PER_CENTRE), DIM), dtype=np.float32))
    duplicates = int(rows * DUPLICATE_SHARE)
    distinct = rows - duplicates
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, DIM))
    for start in range(0, distinct, WRITE_BLOCK):
        n = min(WRITE_BLOCK, distinct - start)
        block = centres[rng.integers(0, len(centres), n)]
        block += rng.standard_normal((n, DIM), dtype=np.float32) * (SPREAD / np.sqrt(DIM))
        array[start : start + n] = _unit(block)
    originals = np.sort(rng.choice(distinct, duplicates, replace=False))
    copies = array[originals] + rng.standard_normal((duplicates, DIM), dtype=np.float32) * (
        DUPLICATE_NOISE / np.sqrt(DIM)
    )
    array[distinct:] = _unit(copies)
    array.flush()
    del array
    with open(path.with_name(path.name + IDS_SUFFIX), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(f"images/{i:07d}.jpg") + "\n" for i in range(rows))
    provenance = Provenance(model="synthetic", embed_dim=DIM, preprocess={"size": 224})
    path.with_name(path.name + PROVENANCE_SUFFIX).write_text(provenance.to_json(), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=SIZES)
def collection(request, tmp_path_factory):
    rows = request.param
    path = write_collection(tmp_path_factory.mktemp(f"collection{rows}") / "c.npy", rows)
    rng = np.random.default_rng(1)
    with Collection.open(path) as c:
        queries = c.gather(rng.choice(rows, QUERIES, replace=False))
        queries = _unit(
            queries + rng.standard_normal(queries.shape, dtype=np.float32) * (QUERY_NOISE / np.sqrt(DIM))
        )
        exact = c.search_vectors(queries, K)[1]
        yield c, queries, exact


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


@pytest.mark.benchmark(group="collection search")
def test_exact_search(benchmark, collection):
    c, queries, exact = collection
    result = benchmark.pedantic(c.search_vectors, args=(queries, K), rounds=SEARCH_ROUNDS, warmup_rounds=1)
    assert _recall(result[1], exact) == 1.0
    benchmark.extra_info.update(rows=len(c), dim=c.dim, queries=QUERIES, recall_at_10=1.0)
    if benchmark.stats:
        benchmark.extra_info["queries_per_s"] = round(QUERIES / benchmark.stats.stats.median, 1)


@pytest.fixture(scope="module")
def index(collection):
    c = collection[0]
    return Index.build(c)


@pytest.mark.benchmark(group="collection search")
def test_index_search(benchmark, collection, index):
    c, queries, exact = collection
    result = benchmark.pedantic(index.search, args=(queries, K), rounds=SEARCH_ROUNDS, warmup_rounds=1)
    info = index.info
    benchmark.extra_info.update(
        rows=len(c),
        dim=c.dim,
        queries=QUERIES,
        factory=info.factory,
        nprobe=info.nprobe,
        recall_at_10=round(_recall(result[1], exact), 4),
        recall_at_10_held_out=round(info.recall_at_10, 4),
        build_s=round(info.build_seconds, 1),
    )
    if benchmark.stats:
        benchmark.extra_info["queries_per_s"] = round(QUERIES / benchmark.stats.stats.median, 1)


DEDUP_SCRIPT = """
import json, sys, time
from nvclip_fast.collection import Collection
start = time.monotonic()
with Collection.open(sys.argv[1]) as c:
    groups = c.near_duplicates(float(sys.argv[2]))
seconds = time.monotonic() - start
# VmHWM: the peak of this process's own memory map (ru_maxrss would count the parent's pages too,
# those of the pytest process this one was started from)
with open("/proc/self/status") as f:
    peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "groups": groups.groups, "rows": len(groups.rows),
                  "peak_kib": peak_kib}))
"""


def _dedup_in_a_fresh_process(path: Path) -> dict:
    """Run dedup in a child process (Linux): its own time and its own peak RSS."""
    process = subprocess.run(
        [sys.executable, "-c", DEDUP_SCRIPT, str(path), str(DEDUP_THRESHOLD)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    assert process.returncode == 0, process.stdout
    result = json.loads(process.stdout)
    result["peak_rss_mib"] = round(result.pop("peak_kib") / 1024)
    return result


@pytest.mark.benchmark(group="collection dedup")
def test_dedup(benchmark, collection):
    c = collection[0]
    results = []
    start = time.monotonic()
    benchmark.pedantic(lambda: results.append(_dedup_in_a_fresh_process(c.path)), rounds=1, iterations=1)
    result = results[-1]
    planted = int(len(c) * DUPLICATE_SHARE)
    # every planted copy found with its original (a few more pairs may come from the data itself)
    assert result["groups"] >= 0.99 * planted
    benchmark.extra_info.update(
        rows=len(c),
        dim=c.dim,
        threshold=DEDUP_THRESHOLD,
        planted_pairs=planted,
        groups=result["groups"],
        rows_in_groups=result["rows"],
        dedup_s=round(result["seconds"], 1),
        process_s=round(time.monotonic() - start, 1),
        peak_rss_mib=result["peak_rss_mib"],
        collection_mib=round(len(c) * c.dim * 4 / 2**20),
    )
