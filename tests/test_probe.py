"""Linear probes: synthetic separable classes are learned, the file keeps the model's provenance and
embeddings of another model are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

import collection_files as cf
import nvclip_fast as nf
from nvclip_fast import cli
from nvclip_fast.probe import LinearProbe
from nvclip_fast.provenance import ProvenanceError

DIM = 32


def _classes(n_per_class: int, classes: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Unit vectors around ``classes`` random directions, well apart: linearly separable."""
    rng = np.random.default_rng(seed)
    centres = cf.unit_vectors(classes, DIM, seed=100)
    labels = np.repeat(np.arange(classes), n_per_class)
    x = centres[labels] + rng.normal(0, 0.05, (len(labels), DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, [f"class-{i}" for i in labels]


def test_a_probe_learns_separable_classes(tmp_path):
    prov = cf.provenance(DIM)
    x, y = _classes(20, 4, seed=1)
    probe = LinearProbe.fit(x, y, provenance=prov)
    assert probe.classes == ["class-0", "class-1", "class-2", "class-3"]
    assert probe.holdout_accuracy == 1.0  # the classes are 0.05-noise blobs around far-apart centres
    fresh, labels = _classes(50, 4, seed=2)
    assert probe.predict(fresh, provenance=prov) == labels
    probabilities = probe.predict_proba(fresh, provenance=prov)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)

    probe.save(tmp_path / "probe.npz")
    loaded = LinearProbe.load(tmp_path / "probe.npz")
    assert loaded.classes == probe.classes
    assert loaded.provenance == prov
    assert loaded.examples == 80
    np.testing.assert_array_equal(loaded.predict_proba(fresh, provenance=prov), probabilities)


def test_a_binary_probe_gives_scikit_learns_probabilities():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _classes(15, 2, seed=3)
    probe = LinearProbe.fit(x, y, provenance=None, holdout=0)
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=0)).fit(x, y)
    # the same weights with the scaling folded in, as a two-class softmax instead of a sigmoid:
    # float32 rounding apart
    np.testing.assert_allclose(probe.predict_proba(x, provenance=None), reference.predict_proba(x), atol=1e-5)
    assert probe.holdout_accuracy is None


def test_embeddings_of_another_model_are_refused(tmp_path):
    x, y = _classes(10, 2, seed=4)
    LinearProbe.fit(x, y, provenance=cf.provenance(DIM)).save(tmp_path / "p.npz")
    probe = LinearProbe.load(tmp_path / "p.npz")
    other = cf.provenance(DIM, model="ViT-B-32")
    with pytest.raises(ProvenanceError, match="trained on synthetic embeddings, not ViT-B-32: model differs"):
        probe.predict(x, provenance=other)
    with pytest.raises(ProvenanceError, match="give the provenance of the embeddings"):
        probe.predict(x, provenance=None)
    with pytest.raises(ValueError, match="takes 32-d embeddings, got 16-d"):
        probe.predict(x[:, :16], provenance=cf.provenance(DIM))


def test_bad_training_sets_and_files_are_refused(tmp_path):
    x, y = _classes(3, 2, seed=5)
    with pytest.raises(ValueError, match="at least 2 classes"):
        LinearProbe.fit(x, ["a"] * len(x), provenance=None)
    with pytest.raises(ValueError, match="too few to hold out"):
        LinearProbe.fit(x[:3], ["a", "a", "b"], provenance=None)
    with pytest.raises(ValueError, match="NaN"):
        LinearProbe.fit(np.full_like(x, np.nan), y, provenance=None)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a probe file"):
        LinearProbe.load(tmp_path / "junk.npz")


def test_probe_train_cli_on_a_labelled_folder(tiny_clip_bundles, tmp_path, capsys):
    pytest.importorskip("skimage")
    from PIL import Image

    import preprocess_reference

    bundle_a, bundle_b = tiny_clip_bundles
    photos = preprocess_reference.photos()
    rng = np.random.default_rng(0)
    for label in ("astronaut", "rocket"):
        folder = tmp_path / "labelled" / label
        folder.mkdir(parents=True)
        image = Image.fromarray(photos[label])
        for i in range(6):  # random crops of one photo per class
            w, h = image.size
            left, top = rng.integers(0, w // 4), rng.integers(0, h // 4)
            image.crop((left, top, left + 3 * w // 4, top + 3 * h // 4)).save(folder / f"{i}.jpg")
    (tmp_path / "labelled" / "rocket" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "probe.npz"
    code = cli.main(
        [
            "probe",
            "train",
            str(tmp_path / "labelled"),
            "-m",
            str(bundle_a),
            "-o",
            str(out),
            "--holdout",
            "0.34",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "2 classes, 12 examples: held-out accuracy 1.000" in captured.out
    assert "skipped " in captured.err
    assert "broken.jpg" in captured.err
    probe = LinearProbe.load(out)
    with nf.Encoder(bundle_b, device="cpu") as enc_b:
        from nvclip_fast.collection import encoder_provenance

        with pytest.raises(ProvenanceError, match="weights_sha256 differs"):
            probe.predict(enc_b.embed([photos["rocket"]]), provenance=encoder_provenance(enc_b))

    # classify --probe: the few-shot path beside zero-shot
    predictions = tmp_path / "predictions.jsonl"
    labelled = tmp_path / "labelled"
    classify = ["classify", str(labelled), "--probe", str(out), "--top-k", "2", "--no-progress"]
    assert (
        cli.main([*classify, "-m", str(bundle_a), "-o", str(predictions)]) == cli.EXIT_SOME_FAILED
    )  # broken.jpg
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 13
    for row in rows:
        if row["path"].endswith("broken.jpg"):
            assert row["error"]
            continue
        folder = Path(row["path"]).parent.name
        assert row["labels"][0] == folder  # the images the probe was trained on
        assert sorted(row["labels"]) == ["astronaut", "rocket"]
        assert sum(row["probs"]) == pytest.approx(1.0, abs=1e-5)
    capsys.readouterr()
    assert cli.main([*classify, "-m", str(bundle_b)]) == cli.EXIT_USAGE
    assert "weights_sha256 differs" in capsys.readouterr().err
