"""Text embeddings into a file: ``nvclip-fast embed-text "a photo of a cat" @prompts.txt -m MODEL -o OUT``.

- ``OUT.parquet``: columns ``text`` and ``embedding`` (a fixed-size list of float32, or float16 with
  ``dtype``), one row per text in the order given (repeats kept); the provenance (model, weights
  sha256, precision, dtype, normalization, how to open the model again, package version, time) as
  JSON in the schema metadata under the key ``nvclip_fast``.
- ``OUT.npy``: the ``(N, D)`` embeddings, with ``OUT.npy.texts.jsonl`` (one JSON string per line, so
  texts may hold line breaks) and ``OUT.npy.provenance.json`` beside it.

Texts are embedded a block at a time and written as they come, so memory holds one block; every
file is written under a temporary name and renamed into place (the ``.npy`` last).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .embed_files import DTYPES, progress_bar
from .encoder import Encoder
from .outputs import PARQUET_SUFFIX, PROVENANCE_SUFFIX, atomic_path, check_output_path, sibling
from .provenance import PARQUET_KEY, Provenance

__all__ = ["PROVENANCE_SUFFIX", "TEXTS_SUFFIX", "embed_texts", "read_texts", "text_provenance"]

TEXTS_SUFFIX = ".texts.jsonl"
TEXT_BLOCK = 1024  # texts per engine call and per Parquet row group
LIST_PREFIX = "@"


def read_texts(arguments: Iterable[str]) -> list[str]:
    """The texts the arguments name, in order: ``@FILE`` stands for the lines of FILE (UTF-8; blank
    lines skipped), anything else is a text itself."""
    texts: list[str] = []
    for argument in arguments:
        if argument.startswith(LIST_PREFIX):
            with open(argument[len(LIST_PREFIX) :], encoding="utf-8") as f:
                texts.extend(line.rstrip("\r\n") for line in f if line.strip())
        else:
            texts.append(argument)
    return texts


def text_provenance(encoder: Encoder, dtype: str) -> Provenance:
    """What the rows of ``encoder``'s text tower are, for the output's metadata."""
    return encoder.provenance(dtype=dtype)


def _blocks(encoder: Encoder, texts: Sequence[str], dtype: str, bar: object) -> Iterator[np.ndarray]:
    for start in range(0, len(texts), TEXT_BLOCK):
        block = texts[start : start + TEXT_BLOCK]
        yield encoder.embed_text(block).astype(dtype, copy=False)
        bar.update(len(block))  # type: ignore[attr-defined]


def embed_texts(
    encoder: Encoder,
    texts: Sequence[str],
    out: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    progress: bool | None = None,
) -> Path:
    """Embed ``texts`` with ``encoder``'s text tower into ``out`` (``.parquet`` or ``.npy``); returns
    ``out``. ``progress``: a tqdm bar (None: tqdm's choice)."""
    out_path = check_output_path(out)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts were given")
    provenance = text_provenance(encoder, dtype)
    with progress_bar(len(texts), progress, unit="text") as bar:
        blocks = _blocks(encoder, texts, dtype, bar)
        if out_path.suffix.lower() == PARQUET_SUFFIX:
            _write_parquet(out_path, texts, blocks, encoder.dim, dtype, provenance)
        else:
            _write_npy(out_path, texts, blocks, encoder.dim, dtype, provenance)
    return out_path


def _write_parquet(
    out: Path,
    texts: Sequence[str],
    blocks: Iterable[np.ndarray],
    dim: int,
    dtype: str,
    provenance: Provenance,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    value = pa.float16() if dtype == "float16" else pa.float32()
    schema = pa.schema([("text", pa.string()), ("embedding", pa.list_(value, dim))]).with_metadata(
        {PARQUET_KEY: provenance.to_json().encode()}
    )
    start = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for rows in blocks:
            values = pa.array(np.ascontiguousarray(rows).reshape(-1), type=value)
            table = pa.Table.from_arrays(
                [
                    pa.array(texts[start : start + len(rows)], pa.string()),
                    pa.FixedSizeListArray.from_arrays(values, dim),
                ],
                schema=schema,
            )
            writer.write_table(table)
            start += len(rows)


def _write_npy(
    out: Path,
    texts: Sequence[str],
    blocks: Iterable[np.ndarray],
    dim: int,
    dtype: str,
    provenance: Provenance,
) -> None:
    with (
        atomic_path(out) as tmp_npy,
        atomic_path(sibling(out, TEXTS_SUFFIX)) as tmp_texts,
        atomic_path(sibling(out, PROVENANCE_SUFFIX)) as tmp_provenance,
    ):
        array = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=dtype, shape=(len(texts), dim))
        start = 0
        for rows in blocks:
            array[start : start + len(rows)] = rows
            start += len(rows)
        array.flush()
        del array
        tmp_texts.write_text(
            "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
        )
        tmp_provenance.write_text(provenance.to_json() + "\n", encoding="utf-8")
        # Leaving the block renames the provenance, then the texts, then the .npy: the commit point.
