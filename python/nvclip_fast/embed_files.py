"""The embedding job: files, folders, ``@lists`` and tar shards in, aligned embeddings out.

``nvclip-fast embed`` (:func:`embed_files`) and ``nvclip-fast classify`` (:func:`classify_files`):
sources are listed in input order, read and decoded by ``workers`` threads through the Encoder's
image pipeline (``pipeline``: a bounded distance and a bounded number of decoded bytes ahead,
several batches in flight, so the engine never waits on one decoder). Results come back in input
order; every input ends as exactly one row or one error with its reason. Progress is a tqdm bar
that moves as each batch comes back.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .encoder import Encoder, top_labels
from .images import Encoded
from .outputs import (
    Checkpoint,
    OutputExistsError,
    Rows,
    assemble,
    atomic_path,
    check_output_path,
    existing,
    output_segments,
    read_provenance,
    write_errors,
    write_output,
)
from .pipeline import Item
from .provenance import Provenance, ProvenanceError
from .sources import NotAnImageSource, Source, iter_sources

if TYPE_CHECKING:
    from .probe import LinearProbe

DTYPES = ("float32", "float16")
CHECKPOINT_ROWS = 4096  # rows per checkpoint chunk (OUT.inprogress/): what an interruption can lose
DUPLICATE = "duplicate"  # the reason listed for an input given again (embedded once)


class NoImagesError(ValueError):
    """The inputs name no image at all (an empty folder, a folder without image files)."""


@dataclass
class Summary:
    """What a job did; ``failed`` inputs (and ``duplicates``) are listed with their reasons in
    ``errors_path``."""

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
        where = f": see {self.errors_path}" if self.errors_path else ""
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate inputs skipped{where if not self.failed else ''}")
        if self.failed:
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


def _read(source: Source) -> Encoded:
    """A source's bytes, named by its id (read in a decoding thread), or ValueError saying why there
    are none."""
    if source.error is not None:
        raise ValueError(source.error)
    try:
        data = source.read()
    except NotAnImageSource as e:
        raise ValueError(str(e)) from e
    except OSError as e:
        raise ValueError(f"unreadable: {e.strerror or e}") from e
    if not data:
        raise ValueError("empty file")
    return Encoded(data, source.id)


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


def check_inputs(inputs: Any) -> None:
    """NoImagesError when ``inputs`` name no image at all (listing stops at the first one found)."""
    if next(iter_sources(inputs), None) is None:
        shown = [os.fspath(i) for i in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
        raise NoImagesError(
            f"no images found in {shown}: a folder scan takes regular files with an image extension "
            "or signature, and .tar shards"
        )


def _listed(inputs: Any) -> tuple[list[Source], list[tuple[str, str]]]:
    """Every source named by ``inputs``, each id once, and (id, "duplicate") for each repeat.
    NoImagesError when there is none."""
    sources, duplicates = _dedupe(iter_sources(inputs))
    if not sources:
        check_inputs(inputs)
    return sources, duplicates


def check_job_output(out: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> Path:
    """``out`` as a job's output (checked before any model is opened): a ``.parquet`` or ``.npy``
    name; OutputExistsError when it (or an interrupted run's rows) exists and the job was told
    neither to ``resume`` nor to ``overwrite`` it; ValueError for both."""
    out_path = check_output_path(out)
    if resume and overwrite:
        raise ValueError(
            "resume and overwrite exclude each other: resume adds to the output, overwrite replaces it"
        )
    if not resume and not overwrite and (found := existing(out_path)):
        raise OutputExistsError(
            f"{found[0]} exists: pass --overwrite (overwrite=True) to replace it, or --resume (resume=True) "
            "to add the missing rows to it"
        )
    return out_path


def embed_files(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    model: str | os.PathLike[str] | Encoder,
    out: str | os.PathLike[str],
    *,
    device: str = "auto",
    batch: int | None = None,
    workers: int | None = None,
    dtype: str = "float32",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    checkpoint_rows: int = CHECKPOINT_ROWS,
) -> Summary:
    """Embed every image named by ``inputs`` (one path, or an iterable of them: files, folders,
    ``@list.txt``, ``.tar`` shards) into ``out`` (``.parquet`` or ``.npy``), rows in input order.

    ``model``: an exported bundle (``.plan``, ``.onnx`` or its ``.json``) or an open Encoder. Bad
    inputs are skipped and listed in ``OUT.<ext>.errors.jsonl`` (with inputs given twice, reason
    ``duplicate``). An existing output is refused (OutputExistsError) unless ``overwrite`` (replace
    it) or ``resume`` (skip ids already in ``out`` or saved by an interrupted run; refused with a
    ProvenanceError naming the field when those rows came from another model, preprocessing,
    precision or dtype). NoImagesError when the inputs hold no image. ``progress``: see
    :func:`progress_bar`. ``checkpoint_rows``: finished rows are saved for ``resume`` once that many
    are waiting, at the end of the engine batch that brings them (and on Ctrl-C).
    """
    out_path = check_job_output(out, resume=resume, overwrite=overwrite)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if checkpoint_rows < 1:
        raise ValueError(f"checkpoint_rows must be >= 1, got {checkpoint_rows}")
    checkpoint = Checkpoint(out_path)
    start = time.monotonic()
    sources, duplicates = _listed(inputs)
    with _opened(model, device, batch) as encoder:
        provenance = encoder.provenance(dtype=dtype)
        if resume:
            done_ids = _resumable(out_path, checkpoint, provenance)
        else:
            checkpoint.clear()
            done_ids = set()
        checkpoint.start(provenance)
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
        write_output(out_path, order, assemble(order, segments), encoder.dim, dtype, provenance)
        errors_path = write_errors(out_path, errors + duplicates)
        checkpoint.clear()
    return Summary(
        total=len(sources),
        embedded=embedded,
        resumed=len(sources) - len(todo),
        failed=len(errors),
        duplicates=len(duplicates),
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
    """Embed ``todo`` into checkpoint chunks; returns (errors, rows embedded). Rows are saved once
    ``checkpoint_rows`` are waiting, as each batch comes back; on an interruption (Ctrl-C) or a
    failure every row already back is saved first, for --resume."""
    errors: list[tuple[str, str]] = []
    fresh: list[tuple[str, Item]] = []
    embedded = 0

    def take(group: list[Item]) -> None:
        nonlocal embedded
        for item in group:
            if item.row is None:
                errors.append((todo[item.index].id, item.error or "unknown error"))
            else:
                fresh.append((todo[item.index].id, item))
                embedded += 1

    with (
        progress_bar(len(todo), progress, unit="img") as bar,
        encoder._stream(todo, load=_read, batch=batch, workers=workers) as stream,
    ):
        try:
            for group in stream:
                take(group)
                bar.update(len(group))
                if len(fresh) >= checkpoint_rows:
                    checkpoint.append(_rows(fresh, dtype))
                    fresh = []
        except BaseException:
            for group in stream.finished():
                take(group)
            raise
        finally:
            checkpoint.append(_rows(fresh, dtype))
    return errors, embedded


def _resumable(out: Path, checkpoint: Checkpoint, provenance: Provenance) -> set[str]:
    """The ids already stored in ``out`` and the checkpoint, which --resume skips; ProvenanceError
    (naming the field) when either holds rows of another job, or rows whose provenance is unknown."""
    done: set[str] = set()
    for where, stored, segments in (
        (str(out), read_provenance, lambda: output_segments(out)),
        (str(checkpoint.dir), lambda _: checkpoint.provenance(), checkpoint.segments),
    ):
        try:
            theirs = stored(out)
        except ProvenanceError as e:
            raise ProvenanceError(
                f"--resume: {e}: cannot check its rows are of this model; use --overwrite or another output"
            ) from e
        if theirs is None:
            continue
        if (why := theirs.mismatch(provenance, also=("dtype",))) is not None:
            raise ProvenanceError(
                f"--resume: {where} holds rows of another job ({why}); resume with the same model and "
                "options, or write to another output (or --overwrite)"
            )
        done.update(i for segment in segments() for i in segment.ids)
    return done


def _dedupe(sources: Iterable[Source]) -> tuple[list[Source], list[tuple[str, str]]]:
    """Sources with each id once (the first occurrence), and (id, "duplicate") per repeat."""
    seen: set[str] = set()
    unique: list[Source] = []
    repeats: list[tuple[str, str]] = []
    for s in sources:
        if s.id in seen:
            repeats.append((s.id, DUPLICATE))
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
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
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
    sources, duplicates = _listed(inputs)
    predictions = []
    with _opened(model, device, batch) as encoder:
        if probe is None:
            text = encoder.label_embeddings(labels, templates)
            probabilities = lambda row: encoder.label_probabilities(row[None, :], text)[0]  # noqa: E731
        else:
            labels, made_by = probe.classes, encoder.provenance()
            probe.check(made_by)
            probabilities = lambda row: probe.predict_proba(row, provenance=made_by)[0]  # noqa: E731
        with (
            progress_bar(len(sources), progress, unit="img") as bar,
            encoder._stream(
                sources, load=_read, batch=batch or encoder.max_batch, workers=_workers(workers)
            ) as stream,
        ):
            for group in stream:
                for item in group:
                    source = sources[item.index]
                    if item.row is None:
                        predictions.append(Prediction(source.id, [], [], item.error))
                    else:
                        ranked = top_labels(probabilities(item.row), labels, top_k)
                        predictions.append(
                            Prediction(source.id, [label for label, _ in ranked], [p for _, p in ranked])
                        )
                bar.update(len(group))
    failed = sum(1 for p in predictions if p.error is not None)
    return predictions, Summary(
        total=len(sources),
        embedded=len(sources) - failed,
        resumed=0,
        failed=failed,
        duplicates=len(duplicates),
        seconds=time.monotonic() - start,
    )


def write_predictions(path: str | os.PathLike[str], predictions: Iterable[Prediction]) -> None:
    """Predictions as JSON lines, atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in predictions), encoding="utf-8")
