"""The embedding job: files, folders, ``@lists`` and tar shards in, aligned embeddings out.

``nvclip-fast embed`` (:func:`embed_files`) and ``nvclip-fast classify`` (:func:`classify_files`):
sources are listed in input order, read and decoded by ``workers`` threads through the Encoder's
image pipeline (``pipeline``: a bounded distance and a bounded number of decoded bytes ahead,
several batches in flight, so the engine never waits on one decoder). Results come back in input
order; every input ends as exactly one row or one error with its reason. Progress is a tqdm bar.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .collection import encoder_provenance
from .encoder import Encoder, top_labels
from .outputs import (
    Checkpoint,
    Rows,
    assemble,
    atomic_path,
    check_output_path,
    output_metadata,
    output_segments,
    write_errors,
    write_output,
)
from .pipeline import Item
from .sources import Source, iter_sources

if TYPE_CHECKING:
    from .probe import LinearProbe

DTYPES = ("float32", "float16")
CHECKPOINT_ROWS = 4096  # rows per checkpoint chunk (OUT.inprogress/): what an interruption can lose


@dataclass
class Summary:
    """What a job did; ``failed`` inputs are listed with their reasons in ``errors_path``."""

    total: int
    embedded: int
    resumed: int
    failed: int
    duplicates: int
    seconds: float
    out: Path | None = None
    errors_path: Path | None = None

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def line(self) -> str:
        parts = [
            f"embedded {self.embedded} of {self.total} images in {self.seconds:.1f} s "
            f"({self.images_per_s:.1f} img/s)"
        ]
        if self.resumed:
            parts.append(f"{self.resumed} already done (resumed)")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate inputs skipped")
        if self.failed:
            where = f": see {self.errors_path}" if self.errors_path else ""
            parts.append(f"{self.failed} failed{where}")
        if self.out is not None:
            parts.append(f"-> {self.out}")
        return ", ".join(parts)


def progress_bar(total: int | None, progress: bool | None, **options: Any) -> Any:
    """A tqdm bar on stderr (in a notebook, its widget). ``progress``: True shows it, False hides it,
    None leaves it to tqdm: ``TQDM_DISABLE`` where set, else a bar on a terminal or in a notebook
    and none in a log (where the summary line says what was done)."""
    from tqdm.auto import tqdm

    if progress is not None:
        options["disable"] = not progress
    elif "TQDM_DISABLE" not in os.environ:
        options["disable"] = None  # tqdm's own test: shown where stderr is a terminal
    return tqdm(total=total, **options)


def _read(source: Source) -> bytes:
    """A source's bytes (read in a decoding thread), or ValueError saying why there are none."""
    if source.error is not None:
        raise ValueError(source.error)
    try:
        data = source.read()
    except OSError as e:
        raise ValueError(f"unreadable: {e}") from e
    if not data:
        raise ValueError("empty file")
    return data


@contextlib.contextmanager
def _opened(model: str | os.PathLike[str] | Encoder, device: str, batch: int | None) -> Iterator[Encoder]:
    """``model`` if it is an Encoder, else one opened on it for this job, and closed after it (its work
    cancelled if the job fails)."""
    if isinstance(model, Encoder):
        yield model
        return
    encoder = Encoder(model, device=device, max_batch=batch)
    try:
        yield encoder
    except BaseException:
        encoder.close(cancel=True)
        raise
    encoder.close()


def _workers(workers: int | None) -> int:
    return max(1, workers if workers else (os.cpu_count() or 1))


def embed_files(
    inputs: Iterable[str | os.PathLike[str]],
    model: str | os.PathLike[str] | Encoder,
    out: str | os.PathLike[str],
    *,
    device: str = "auto",
    batch: int | None = None,
    workers: int | None = None,
    dtype: str = "float32",
    resume: bool = False,
    progress: bool | None = None,
    checkpoint_rows: int = CHECKPOINT_ROWS,
) -> Summary:
    """Embed every image named by ``inputs`` into ``out`` (``.parquet`` or ``.npy``), rows in input order.

    ``model``: an exported bundle (``.plan``, ``.onnx`` or its ``.json``) or an open Encoder.
    Bad inputs are skipped and listed in ``OUT.errors.jsonl``. ``resume``: skip ids already in
    ``out`` or saved by an interrupted run. ``progress``: see :func:`progress_bar` (None: tqdm's choice).
    ``checkpoint_rows``: finished rows are saved for ``resume`` every so many rows (and on Ctrl-C).
    """
    out_path = check_output_path(out)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if checkpoint_rows < 1:
        raise ValueError(f"checkpoint_rows must be >= 1, got {checkpoint_rows}")
    start = time.monotonic()
    sources, duplicates = _dedupe(iter_sources(inputs))
    checkpoint = Checkpoint(out_path)
    with _opened(model, device, batch) as encoder:
        job = _job_metadata(encoder, dtype)
        if resume:
            _check_same_job(out_path, checkpoint, job)
            done_ids = {
                i for segment in [*output_segments(out_path), *checkpoint.segments()] for i in segment.ids
            }
        else:
            if checkpoint.exists():
                warnings.warn(
                    f"{checkpoint.dir}: an unfinished run's rows are discarded (use --resume to keep them)",
                    UserWarning,
                    stacklevel=2,
                )
                checkpoint.clear()
            done_ids = set()
        checkpoint.start(job)
        todo = [s for s in sources if s.id not in done_ids]
        errors, embedded = _embed_into(
            checkpoint,
            encoder,
            todo,
            workers=_workers(workers),
            batch=batch or encoder.max_batch,
            dtype=dtype,
            checkpoint_rows=checkpoint_rows,
            progress=progress,
        )
        # Everything stored (the previous output when resuming, and every checkpoint chunk), in input
        # order; rows of earlier inputs not given this time are kept after them.
        segments = [*(output_segments(out_path) if resume else []), *checkpoint.segments()]
        stored = dict.fromkeys(i for segment in segments for i in segment.ids)
        order = [s.id for s in sources if s.id in stored]
        given = set(order)
        order += [i for i in stored if i not in given]
        write_output(out_path, order, assemble(order, segments), encoder.dim, dtype, job)
        errors_path = write_errors(out_path, errors)
        checkpoint.clear()
    return Summary(
        total=len(sources),
        embedded=embedded,
        resumed=len(sources) - len(todo),
        failed=len(errors),
        duplicates=duplicates,
        seconds=time.monotonic() - start,
        out=out_path,
        errors_path=errors_path,
    )


def _embed_into(
    checkpoint: Checkpoint,
    encoder: Encoder,
    todo: Sequence[Source],
    *,
    workers: int,
    batch: int,
    dtype: str,
    checkpoint_rows: int,
    progress: bool | None,
) -> tuple[list[tuple[str, str]], int]:
    """Embed ``todo`` into checkpoint chunks; returns (errors, rows embedded). On an interruption
    (Ctrl-C) or failure the rows finished so far are saved first, for --resume."""
    errors: list[tuple[str, str]] = []
    fresh: list[tuple[str, Item]] = []
    embedded = 0
    with progress_bar(len(todo), progress, unit="img") as bar:
        try:
            for item in encoder._stream(todo, load=_read, batch=batch, workers=workers):
                if item.row is None:
                    errors.append((todo[item.index].id, item.error or "unknown error"))
                else:
                    fresh.append((todo[item.index].id, item))
                    embedded += 1
                    if len(fresh) >= checkpoint_rows:
                        checkpoint.append(_rows(fresh, dtype))
                        fresh = []
                bar.update()
        finally:
            checkpoint.append(_rows(fresh, dtype))
    return errors, embedded


def _job_metadata(encoder: Encoder, dtype: str) -> dict[str, Any]:
    """What identifies the rows of a job, as stored (JSON) in the output and the checkpoint."""
    job = {
        "model": encoder.model,
        "embed_dim": encoder.dim,
        "dtype": dtype,
        "preprocess": asdict(encoder.spec),
    }
    return json.loads(json.dumps(job))  # tuples become lists, as they come back from the files


def _check_same_job(out: Path, checkpoint: Checkpoint, job: dict[str, Any]) -> None:
    """--resume only adds rows of the same model, size and preprocessing to what is stored."""
    stored = {"the checkpoint " + str(checkpoint.dir): checkpoint.metadata(), str(out): output_metadata(out)}
    for where, meta in stored.items():
        if not meta:
            continue
        for key, value in meta.items():
            if key in job and job[key] != value:
                raise ValueError(
                    f"--resume: {where} holds rows with {key}={value!r}, this job has {key}={job[key]!r}; "
                    "resume with the same model and options, or write to another output"
                )


def _dedupe(sources: Iterable[Source]) -> tuple[list[Source], int]:
    """Sources with each id once (the first occurrence), and how many repeats were dropped."""
    seen: set[str] = set()
    unique: list[Source] = []
    repeats = 0
    for s in sources:
        if s.id in seen:
            repeats += 1
        else:
            seen.add(s.id)
            unique.append(s)
    return unique, repeats


def _rows(rows: Sequence[tuple[str, Item]], dtype: str) -> Rows:
    """Finished (id, item) pairs as the rows of a checkpoint chunk."""
    if not rows:
        return Rows([], np.zeros((0, 0), dtype), np.zeros(0, np.int32), np.zeros(0, np.int32))
    return Rows(
        [i for i, _ in rows],
        np.stack([item.row for _, item in rows]).astype(dtype),
        np.array([item.size[0] for _, item in rows], np.int32),
        np.array([item.size[1] for _, item in rows], np.int32),
    )


# ---------------------------------------------------------------------------------------------------
# Zero-shot classification


@dataclass
class Prediction:
    """Top-k labels of one input (empty with ``error`` set for an input that failed)."""

    id: str
    labels: list[str]
    probs: list[float]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.id, "labels": self.labels, "probs": self.probs}
        if self.error is not None:
            d["error"] = self.error
        return d


def classify_files(
    inputs: Iterable[str | os.PathLike[str]],
    model: str | os.PathLike[str] | Encoder,
    labels: Sequence[str] | None,
    *,
    templates: Sequence[str] | None = None,
    top_k: int = 5,
    device: str = "auto",
    batch: int | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    probe: LinearProbe | None = None,
) -> tuple[list[Prediction], Summary]:
    """Zero-shot top-k labels for every image named by ``inputs`` (see :meth:`Encoder.classify`);
    with ``probe`` (and ``labels`` None), the probe's classes and probabilities instead (a probe
    trained on another model's embeddings is refused)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    start = time.monotonic()
    sources, duplicates = _dedupe(iter_sources(inputs))
    predictions = []
    with _opened(model, device, batch) as encoder:
        if probe is None:
            text = encoder.label_embeddings(labels, templates)
            probabilities = lambda row: encoder.label_probabilities(row[None, :], text)[0]  # noqa: E731
        else:
            labels, made_by = probe.classes, encoder_provenance(encoder)
            probe.check(made_by)
            probabilities = lambda row: probe.predict_proba(row, provenance=made_by)[0]  # noqa: E731
        items = encoder._stream(
            sources, load=_read, batch=batch or encoder.max_batch, workers=_workers(workers)
        )
        with progress_bar(len(sources), progress, unit="img") as bar:
            for item in items:
                source = sources[item.index]
                if item.row is None:
                    predictions.append(Prediction(source.id, [], [], item.error))
                else:
                    ranked = top_labels(probabilities(item.row), labels, top_k)
                    predictions.append(
                        Prediction(source.id, [label for label, _ in ranked], [p for _, p in ranked])
                    )
                bar.update()
    failed = sum(1 for p in predictions if p.error is not None)
    return predictions, Summary(
        total=len(sources),
        embedded=len(sources) - failed,
        resumed=0,
        failed=failed,
        duplicates=duplicates,
        seconds=time.monotonic() - start,
    )


def write_predictions(path: str | os.PathLike[str], predictions: Iterable[Prediction]) -> None:
    """Predictions as JSON lines, atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in predictions), encoding="utf-8")
