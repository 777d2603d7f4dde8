"""Linear probes: a logistic-regression classifier over the embeddings of one model.

``LinearProbe.fit(embeddings, labels, provenance=...)`` trains scikit-learn's
``LogisticRegression`` (multinomial, L-BFGS) on standardized embeddings (each dimension scaled to
unit variance: L2-normalized embeddings have components of about 1/sqrt(D), which the default
regularization would otherwise flatten), measures its accuracy on a stratified held-out share of
the examples, then trains the probe it keeps on all of them. The standardization is folded into
the weights. The probe is the weights of a
softmax over the classes (a binary problem stored as the equivalent two-class softmax), so
predicting needs numpy only. Saved as ``.npz`` with the provenance of the embeddings it was trained
on: embeddings of another model are refused at prediction time (naming the field that differs).

``probe.npz`` holds ``classes`` (unicode strings), ``coef`` (C, D) float32, ``intercept`` (C,)
float32, ``provenance`` (its JSON; empty when unknown), ``holdout_accuracy`` (NaN when not
measured), ``examples`` and ``format``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .outputs import atomic_path
from .provenance import Provenance, ProvenanceError
from .sources import iter_sources

if TYPE_CHECKING:
    from .encoder import Encoder

DEFAULT_HOLDOUT = 0.2
DEFAULT_C = 1.0  # scikit-learn's default inverse regularization strength
MAX_ITERATIONS = 1000
PROBE_FORMAT = 1
EMBED_BATCH = 64  # images read and embedded at a time by labelled_embeddings


@dataclass
class LinearProbe:
    """A trained probe: ``classes``, ``coef`` (C, D), ``intercept`` (C,), the ``provenance`` of the
    embeddings it was trained on, ``holdout_accuracy`` (None when not measured), ``examples``."""

    classes: list[str]
    coef: np.ndarray
    intercept: np.ndarray
    provenance: Provenance | None
    holdout_accuracy: float | None = None
    examples: int = 0

    @classmethod
    def fit(
        cls,
        embeddings: np.ndarray,
        labels: Sequence[str],
        *,
        provenance: Provenance | None,
        holdout: float = DEFAULT_HOLDOUT,
        C: float = DEFAULT_C,  # scikit-learn's name
        seed: int = 0,
    ) -> LinearProbe:
        """Train on ``embeddings`` (N, D) with ``labels`` (N class names). ``provenance``: of the
        embeddings (None only for embeddings of unknown origin: then nothing can be checked).
        ``holdout``: the share kept aside (stratified) to measure accuracy; 0 to skip."""
        try:
            from sklearn.linear_model import LogisticRegression
            from sklearn.model_selection import train_test_split
            from sklearn.pipeline import Pipeline, make_pipeline
            from sklearn.preprocessing import StandardScaler
        except ImportError as e:
            raise ImportError("linear probes need scikit-learn: pip install 'nvclip-fast[probe]'") from e
        x = np.asarray(embeddings, dtype=np.float32)
        y = np.asarray([str(label) for label in labels])
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"expected (N, D) embeddings and N labels, got {x.shape} and {len(y)} labels")
        if not np.isfinite(x).all():
            raise ValueError("embeddings contain NaN or infinite values")
        classes, counts = np.unique(y, return_counts=True)
        if len(classes) < 2:
            raise ValueError(f"a probe needs at least 2 classes, got {classes.tolist()}")
        if provenance is not None and provenance.embed_dim != x.shape[1]:
            raise ValueError(f"provenance says {provenance.embed_dim}-d, the embeddings are {x.shape[1]}-d")
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"holdout is a share in [0, 1), got {holdout}")

        def train(xs: np.ndarray, ys: np.ndarray) -> Pipeline:
            logistic = LogisticRegression(C=C, max_iter=MAX_ITERATIONS, random_state=seed)
            return make_pipeline(StandardScaler(), logistic).fit(xs, ys)

        accuracy = None
        if holdout > 0:
            held = math.ceil(holdout * len(y))
            few = classes[counts < 2]
            if len(few) or held < len(classes) or len(y) - held < len(classes):
                raise ValueError(
                    f"{len(y)} examples of {len(classes)} classes are too few to hold out {holdout:.0%} of "
                    f"each class (classes with fewer than 2: {few.tolist()}); give more, or holdout=0"
                )
            x_train, x_test, y_train, y_test = train_test_split(
                x, y, test_size=held, stratify=y, random_state=seed
            )
            accuracy = float(train(x_train, y_train).score(x_test, y_test))
        (_, scaler), (_, model) = train(x, y).steps
        # ((x - mean) / scale) W^T + b  =  x (W / scale)^T + (b - (mean / scale) W^T)
        coef = model.coef_ / scaler.scale_
        intercept = model.intercept_ - coef @ scaler.mean_
        if len(model.classes_) == 2:  # sigmoid(z) is the softmax of (-z/2, z/2)
            coef = np.concatenate([-coef / 2, coef / 2])
            intercept = np.concatenate([-intercept / 2, intercept / 2])
        return cls(
            [str(c) for c in model.classes_],
            coef.astype(np.float32),
            intercept.astype(np.float32),
            provenance,
            accuracy,
            len(y),
        )

    def check(self, provenance: Provenance | None) -> None:
        """Refuse (``ProvenanceError``) embeddings of ``provenance`` unless they are of this probe's
        model. None (embeddings of unknown origin) is allowed only for a probe of unknown origin."""
        if self.provenance is None:
            return
        if provenance is None:
            raise ProvenanceError(
                f"this probe was trained on {self.provenance.model} embeddings; give the provenance of "
                "the embeddings to classify"
            )
        if why := self.provenance.mismatch(provenance):
            raise ProvenanceError(
                f"this probe was trained on {self.provenance.model} embeddings, not {provenance.model}: {why}"
            )

    def predict_proba(self, embeddings: np.ndarray, *, provenance: Provenance | None) -> np.ndarray:
        """(N, C) class probabilities (columns in ``classes`` order) of ``embeddings`` of
        ``provenance``'s model (refused when it is not this probe's)."""
        self.check(provenance)
        x = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        if x.shape[1] != self.coef.shape[1]:
            raise ValueError(f"this probe takes {self.coef.shape[1]}-d embeddings, got {x.shape[1]}-d")
        logits = x @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, embeddings: np.ndarray, *, provenance: Provenance | None) -> list[str]:
        """The most probable class of each row (see :meth:`predict_proba`)."""
        best = self.predict_proba(embeddings, provenance=provenance).argmax(axis=1)
        return [self.classes[i] for i in best]

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                format=np.int64(PROBE_FORMAT),
                classes=np.array(self.classes, dtype=str),
                coef=self.coef,
                intercept=self.intercept,
                provenance=np.array(self.provenance.to_json() if self.provenance else ""),
                holdout_accuracy=np.float64(
                    math.nan if self.holdout_accuracy is None else self.holdout_accuracy
                ),
                examples=np.int64(self.examples),
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LinearProbe:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                fields = {name: data[name] for name in data.files}
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a probe file: {e}") from e
        needed = {"format", "classes", "coef", "intercept", "provenance"}
        if missing := sorted(needed - fields.keys()):
            raise ValueError(f"{path}: not a probe file (missing {missing})")
        if int(fields["format"]) != PROBE_FORMAT:
            raise ValueError(
                f"{path}: probe format {int(fields['format'])}, this version reads {PROBE_FORMAT}"
            )
        classes = [str(c) for c in fields["classes"]]
        coef, intercept = fields["coef"].astype(np.float32), fields["intercept"].astype(np.float32)
        if coef.ndim != 2 or coef.shape[0] != len(classes) or intercept.shape != (len(classes),):
            raise ValueError(
                f"{path}: {len(classes)} classes but weights of shape {coef.shape}, {intercept.shape}"
            )
        text = str(fields["provenance"])
        accuracy = float(fields.get("holdout_accuracy", math.nan))
        return cls(
            classes,
            coef,
            intercept,
            Provenance.from_json(text, str(path)) if text else None,
            None if math.isnan(accuracy) else accuracy,
            int(fields.get("examples", 0)),
        )


def labelled_embeddings(
    root: str | os.PathLike[str], encoder: Encoder, *, batch: int = EMBED_BATCH
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """(embeddings (N, D), labels, failed inputs as (id, reason)) of the images under each
    sub-folder of ``root``, whose name is the class; the images are found as ``embed`` finds them."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder (expected one sub-folder of images per class)")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(folders) < 2:
        raise ValueError(f"{root}: expected one sub-folder per class, at least 2, found {len(folders)}")
    rows: list[np.ndarray] = []
    labels: list[str] = []
    failed: list[tuple[str, str]] = []
    for folder in folders:
        sources = list(iter_sources([folder]))
        for start in range(0, len(sources), batch):
            items, data = [], []
            for source in sources[start : start + batch]:
                try:
                    if source.error is not None:
                        raise OSError(source.error)
                    data.append(source.read())
                    items.append(source.id)
                except OSError as e:
                    failed.append((source.id, str(e)))
            if not data:
                continue
            embedded = encoder.embed(data, on_error="nan")
            for item, row in zip(items, embedded, strict=True):
                if np.isfinite(row).all():
                    rows.append(row)
                    labels.append(folder.name)
                else:
                    failed.append((item, "could not be embedded"))
    if not rows:
        raise ValueError(f"{root}: no image could be embedded")
    return np.stack(rows), labels, failed
