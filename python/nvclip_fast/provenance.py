"""Where embeddings come from: the identity of the numbers, stored with every output.

Two embeddings can be compared (resumed into one output, searched against each other, fed to one
probe) only when everything that determines their numbers is the same: the model, its weights, the
preprocessing, the engine's precision and the normalization. :class:`Provenance` holds those fields
and the ones that only describe a file (stored dtype, package version, creation time);
:meth:`Provenance.mismatch` names the first identity field on which two differ.

Stored as JSON: in a Parquet file's schema metadata under the key ``nvclip_fast``, in the JSON
sidecar of an ``.npy`` output, in a probe file. This module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The key of the provenance JSON in a Parquet file's schema metadata.
PARQUET_KEY = b"nvclip_fast"
# The fields that determine the numbers: two outputs may be mixed only when all are equal.
IDENTITY_FIELDS = (
    "model",
    "weights_sha256",
    "engine_sha256",
    "preprocess",
    "embed_dim",
    "precision",
    "normalized",
)


class ProvenanceError(ValueError):
    """Provenance that is missing, malformed, or of another model than required."""


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _package_version() -> str:
    from . import __version__

    return __version__


@dataclass(frozen=True)
class Provenance:
    """The identity and description of a set of embeddings.

    ``weights_sha256``: the sha256 of the weights the engines were exported from (the sidecar's),
    or None when unknown; ``engine_sha256``: the sha256 of the engine file, used to tell engines
    apart when the weights are unknown (None otherwise). ``preprocess``: the preprocessing as a
    dict (``PreprocessSpec`` fields). ``precision``: the engine's arithmetic (``fp32``, ``fp16``,
    ``bf16``). ``dtype``: how the rows are stored (``float32``, ``float16``). ``normalized``: rows
    are L2-normalized. ``source``: how to open the same model again (not part of the identity):
    ``{"bundle": "/abs/path/vith.json"}``, or ``{"model": "ViT-B-32", "pretrained": TAG}`` (or
    ``"weights": PATH``, ``"random_weights": true``); None when unknown.
    """

    model: str
    embed_dim: int
    preprocess: Mapping[str, Any]
    precision: str = "fp32"
    weights_sha256: str | None = None
    engine_sha256: str | None = None
    normalized: bool = True
    dtype: str = "float32"
    source: Mapping[str, Any] | None = None
    version: str = field(default_factory=_package_version)
    created: str = field(default_factory=_utc_now)

    def __post_init__(self) -> None:
        # Tuples become lists, as they come back from JSON: equal values compare equal.
        object.__setattr__(self, "preprocess", json.loads(json.dumps(dict(self.preprocess))))
        if self.source is not None:
            object.__setattr__(self, "source", json.loads(json.dumps(dict(self.source))))

    def identity(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in IDENTITY_FIELDS}

    def mismatch(self, other: Provenance, *, also: tuple[str, ...] = ()) -> str | None:
        """None when ``other`` has the same identity (and the same ``also`` fields, e.g.
        ``("dtype",)``); else a message naming the first field that differs and both values."""
        for name in (*IDENTITY_FIELDS, *also):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} differs: {mine!r} vs {theirs!r}"
        return None

    def replace(self, **changes: Any) -> Provenance:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any, where: str = "provenance") -> Provenance:
        if not isinstance(d, Mapping):
            raise ProvenanceError(f"{where}: expected an object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("model", "embed_dim", "preprocess") if n not in d]
        if missing:
            raise ProvenanceError(f"{where}: missing {missing} (keys present: {sorted(d)})")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "provenance") -> Provenance:
        try:
            return cls.from_dict(json.loads(text), where)
        except (ValueError, TypeError, RecursionError) as e:
            if isinstance(e, ProvenanceError):
                raise
            raise ProvenanceError(f"{where}: not valid provenance JSON: {e}") from e
