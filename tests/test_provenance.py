"""Provenance: the identity of a set of embeddings, compared field by field and stored as JSON."""

from __future__ import annotations

import pytest

import nvclip_fast
from nvclip_fast.provenance import IDENTITY_FIELDS, Provenance, ProvenanceError

SPEC = {"size": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}


def make(**changes) -> Provenance:
    base = Provenance(model="ViT-S-32", embed_dim=384, preprocess=SPEC, weights_sha256="a" * 64)
    return base.replace(**changes)


def test_json_round_trip_keeps_every_field():
    p = make(dtype="float16", precision="bf16", source={"bundle": "/models/vits.json"})
    back = Provenance.from_json(p.to_json())
    assert back == p
    assert back.version == nvclip_fast.__version__
    assert back.created.endswith("+00:00")


def test_same_identity_ignores_description_fields():
    other = make(dtype="float16", created="2000-01-01T00:00:00+00:00", version="0", source={"bundle": "b"})
    assert make().mismatch(other) is None
    assert make().mismatch(make(dtype="float16"), also=("dtype",)) == "dtype differs: 'float32' vs 'float16'"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("model", "ViT-B-32"),
        ("weights_sha256", "b" * 64),
        ("engine_sha256", "c" * 64),
        ("preprocess", {**SPEC, "size": 336}),
        ("embed_dim", 512),
        ("precision", "fp16"),
        ("normalized", False),
    ],
)
def test_each_identity_field_is_named_when_it_differs(name, value):
    assert name in IDENTITY_FIELDS
    message = make().mismatch(make(**{name: value}))
    assert message is not None
    assert message.startswith(f"{name} differs: ")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[1, 2]", "expected an object, got list"),
        ('{"model": "x"}', r"missing \['embed_dim', 'preprocess'\]"),
        ("{not json", "not valid provenance JSON"),
        ("[" * 200000, "not valid provenance JSON"),
    ],
)
def test_malformed_provenance_is_refused_clearly(text, match):
    with pytest.raises(ProvenanceError, match=match):
        Provenance.from_json(text, "out.parquet")
