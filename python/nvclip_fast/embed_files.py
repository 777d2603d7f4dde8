"""The embedding job: files, folders, ``@lists`` and tar shards in, aligned embeddings out.

One pipeline serves ``nvclip-fast embed`` (:func:`embed_files`) and ``nvclip-fast classify``
(:func:`classify_files`): sources are listed in input order, decoded by a pool of worker threads
(Pillow releases the GIL while it decodes) a bounded distance ahead, and handed to the Encoder's
queue in batches, several batches in flight, so the engine never waits on one decoder. Results come
back in input order; every input ends as exactly one row or one error with its reason.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from .collection import encoder_provenance
from .encoder import Encoder, l2_normalize, top_labels
from .images import DECODE_AHEAD_PER_THREAD, Sized, decode_image_sized, ordered_map
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
from .preprocess import PreprocessSpec
from .sources import Source, iter_sources

if TYPE_CHECKING:
    from .probe import LinearProbe

DTYPES = ("float32", "float16")
# Batches in flight in the queue: enough to keep the engine busy while the decoders catch up.
BATCHES_IN_FLIGHT = 4
CHECKPOINT_ROWS = 4096  # rows per checkpoint chunk (OUT.inprogress/): what an interruption can lose
PROGRESS_INTERVAL_S = 0.5


@dataclass
class Item:
    """One input's outcome: ``row`` (embedding) or ``error``; ``size`` = (width, height) decoded."""

    id: str
    row: np.ndarray | None = None
    error: str | None = None
    size: tuple[int, int] = (-1, -1)


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


class Progress:
    """A one-line progress bar on a terminal (images, images/s, ETA); silent otherwise."""

    def __init__(self, total: int, enabled: bool | None = None, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last >= PROGRESS_INTERVAL_S or self.done == self.total):
            self._last = now
            elapsed = now - self.start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            self.stream.write(f"\r{self.done}/{self.total} images  {rate:.1f} img/s  ETA {eta:.0f} s ")
            self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _read_and_decode(source: Source, index: int, spec: PreprocessSpec) -> tuple[Sized | None, str | None]:
    """(decoded (pixels, (width, height)) or None, error or None) for one source."""
    if source.error is not None:
        return None, source.error
    try:
        data = source.read()
    except OSError as e:
        return None, f"unreadable: {e}"
    if not data:
        return None, "empty file"
    try:
        return decode_image_sized(data, index, spec), None
    except (ValueError, TypeError) as e:
        reason = str(e)
        prefix = f"images[{index}]: "
        return None, reason[len(prefix) :] if reason.startswith(prefix) else reason
    except MemoryError:
        return None, "not enough memory to decode this image"
    except Exception as e:  # a decoder bug on one odd file fails that file, never the job
        return None, f"cannot decode: {type(e).__name__}: {e}"


def _decoded(
    sources: Sequence[Source], workers: int, spec: PreprocessSpec
) -> Iterator[tuple[Source, Sized | None, str | None]]:
    """(source, decoded or None, error or None) in input order, decoded ``workers`` at a time."""
    with concurrent.futures.ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="nvclip-decode"
    ) as pool:
        futures = ordered_map(
            pool,
            lambda source, k: _read_and_decode(source, k, spec),
            sources,
            max(1, workers * DECODE_AHEAD_PER_THREAD),
        )
        for source, future in zip(sources, futures, strict=False):
            yield (source, *future.result())


def embedded_items(
    encoder: Encoder, sources: Sequence[Source], *, workers: int, batch: int
) -> Iterator[Item]:
    """Every source's :class:`Item`, in input order: decoded in parallel, embedded in batches."""
    in_flight: collections.deque = collections.deque()  # (items of a batch, future or None)

    def settle(items: list[Item], future: concurrent.futures.Future | None) -> list[Item]:
        if future is None:
            return items
        try:
            rows, item_errors = future.result()
        except Exception as e:  # the engine failed this batch: its images fail, the job goes on
            for item in items:
                item.error = f"engine failed: {e}"
            return items
        good = [item for item in items if item.error is None]
        rows = l2_normalize(rows)  # what Encoder.embed returns for the same images
        for item, row, why in zip(good, rows, item_errors, strict=True):
            if why:
                item.error = f"preprocessing failed: {why}"
            else:
                item.row = row
        return items

    group: list[Item] = []
    pixels: list[np.ndarray] = []

    def flush() -> Iterator[Item]:
        nonlocal group, pixels
        in_flight.append((group, encoder.submit_pixels(pixels) if pixels else None))
        group, pixels = [], []
        while len(in_flight) > BATCHES_IN_FLIGHT:
            yield from settle(*in_flight.popleft())

    for source, decoded, error in _decoded(sources, workers, encoder.spec):
        item = Item(source.id, error=error)
        if decoded is not None:
            image, item.size = decoded
            pixels.append(image)
        group.append(item)
        if len(pixels) >= batch:
            yield from flush()
    if group:
        yield from flush()
    while in_flight:
        yield from settle(*in_flight.popleft())


def _open_encoder(
    model: str | os.PathLike[str] | Encoder, device: str, batch: int | None
) -> tuple[Encoder, bool]:
    """The Encoder to use and whether this job owns it (and closes it)."""
    if isinstance(model, Encoder):
        return model, False
    return Encoder(model, device=device, max_batch=batch), True


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
    ``out`` or saved by an interrupted run. ``progress``: None = a bar when stderr is a terminal.
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
    encoder, owned = _open_encoder(model, device, batch)
    try:
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
    except BaseException:
        encoder_close(encoder, owned, cancel=True)
        raise
    encoder_close(encoder, owned)
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
    bar = Progress(len(todo), progress)
    errors: list[tuple[str, str]] = []
    fresh: list[Item] = []
    embedded = 0
    try:
        for item in embedded_items(encoder, todo, workers=workers, batch=batch):
            if item.row is None:
                errors.append((item.id, item.error or "unknown error"))
            else:
                fresh.append(item)
                embedded += 1
                if len(fresh) >= checkpoint_rows:
                    checkpoint.append(_rows(fresh, dtype))
                    fresh = []
            bar.advance()
    finally:
        checkpoint.append(_rows(fresh, dtype))
        bar.finish()
    return errors, embedded


def _job_metadata(encoder: Encoder, dtype: str) -> dict[str, Any]:
    """What identifies the rows of a job, as stored (JSON) in the output and the checkpoint."""
    job = {
        "model": encoder.model,
        "embed_dim": encoder.dim,
        "dtype": dtype,
        "preprocess": dataclasses.asdict(encoder.spec),
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


def encoder_close(encoder: Encoder, owned: bool, cancel: bool = False) -> None:
    if owned:
        encoder.close(cancel=cancel)


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


def _rows(items: Sequence[Item], dtype: str) -> Rows:
    if not items:
        return Rows([], np.zeros((0, 0), dtype), np.zeros(0, np.int32), np.zeros(0, np.int32))
    return Rows(
        [i.id for i in items],
        np.stack([i.row for i in items]).astype(dtype),
        np.array([i.size[0] for i in items], np.int32),
        np.array([i.size[1] for i in items], np.int32),
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
    encoder, owned = _open_encoder(model, device, batch)
    predictions = []
    try:
        if probe is None:
            text = encoder.label_embeddings(labels, templates)
            probabilities = lambda row: encoder.label_probabilities(row[None, :], text)[0]  # noqa: E731
        else:
            labels, made_by = probe.classes, encoder_provenance(encoder)
            probe.check(made_by)
            probabilities = lambda row: probe.predict_proba(row, provenance=made_by)[0]  # noqa: E731
        bar = Progress(len(sources), progress)
        items = embedded_items(encoder, sources, workers=_workers(workers), batch=batch or encoder.max_batch)
        for item in items:
            if item.row is None:
                predictions.append(Prediction(item.id, [], [], item.error))
            else:
                ranked = top_labels(probabilities(item.row), labels, top_k)
                predictions.append(
                    Prediction(item.id, [label for label, _ in ranked], [p for _, p in ranked])
                )
            bar.advance()
        bar.finish()
    except BaseException:
        encoder_close(encoder, owned, cancel=True)
        raise
    encoder_close(encoder, owned)
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
