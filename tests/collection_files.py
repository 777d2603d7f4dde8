"""Collections as ``embed`` writes them (Parquet with provenance in the schema metadata, or ``.npy`` with
``.ids.jsonl`` and ``.provenance.json``; and the older forms), made directly from vectors for tests and
benchmarks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nvclip_fast.collection import IDS_SUFFIX, LEGACY_PATHS_SUFFIX, PROVENANCE_SUFFIX
from nvclip_fast.provenance import PARQUET_KEY, Provenance

SPEC = {"size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}


def provenance(dim: int, model: str = "synthetic", **changes) -> Provenance:
    base = Provenance(model=model, embed_dim=dim, preprocess=SPEC, weights_sha256="a" * 64)
    return base.replace(**changes)


def unit_vectors(
    n: int, dim: int, seed: int = 0, clusters: int | None = None, spread: float = 0.5
) -> np.ndarray:
    """``n`` random unit vectors; with ``clusters``, scattered (``spread``) around that many random
    centres, as embeddings of a real collection are."""
    rng = np.random.default_rng(seed)
    if clusters is None:
        x = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x = centres[rng.integers(0, clusters, n)]
        x += rng.standard_normal((n, dim), dtype=np.float32) * (spread / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def write_parquet(
    path: Path,
    ids: Sequence[str],
    embeddings: np.ndarray,
    stored: Provenance | dict | None,
    *,
    widths: Sequence[int] | None = None,
    heights: Sequence[int] | None = None,
    row_group_size: int | None = None,
) -> Path:
    n, dim = embeddings.shape
    value = pa.float16() if embeddings.dtype == np.float16 else pa.float32()
    schema = pa.schema(
        [
            ("path", pa.string()),
            ("embedding", pa.list_(value, dim)),
            ("width", pa.int32()),
            ("height", pa.int32()),
        ]
    )
    if stored is not None:
        text = stored.to_json() if isinstance(stored, Provenance) else json.dumps(stored)
        schema = schema.with_metadata({PARQUET_KEY: text.encode()})
    table = pa.Table.from_arrays(
        [
            pa.array(list(ids), pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim),
            pa.array(widths if widths is not None else [-1] * n, pa.int32()),
            pa.array(heights if heights is not None else [-1] * n, pa.int32()),
        ],
        schema=schema,
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_npy(
    path: Path, ids: Sequence[str], embeddings: np.ndarray, stored: Provenance | None, *, legacy: bool = False
) -> Path:
    """``OUT.npy`` with ``OUT.npy.ids.jsonl`` and ``OUT.npy.provenance.json``; ``legacy``: with
    ``OUT.paths.txt`` only, as older versions wrote it."""
    np.save(path, embeddings)
    if legacy:
        path.with_name(path.stem + LEGACY_PATHS_SUFFIX).write_text(
            "".join(f"{i}\n" for i in ids), encoding="utf-8"
        )
        return path
    path.with_name(path.name + IDS_SUFFIX).write_text(
        "".join(json.dumps(i) + "\n" for i in ids), encoding="utf-8"
    )
    if stored is not None:
        path.with_name(path.name + PROVENANCE_SUFFIX).write_text(stored.to_json(), encoding="utf-8")
    return path
