"""The sidecar schema: round trip, the fixed tensor names, and validation errors that name the value."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from nvclip_fast import metadata
from nvclip_fast.metadata import BATCH_DIM, Metadata, MetadataError

EMBED_DIM = 32
SIZE = 224
CONTEXT = 77


def _tower(tower: str, onnx: str, in_dtype: str, in_shape: tuple) -> metadata.Tower:
    input_name, output_name = metadata.TOWER_TENSOR_NAMES[tower]
    return metadata.Tower(
        onnx=onnx,
        plan=None,
        input=metadata.TensorSpec(input_name, in_dtype, (BATCH_DIM, *in_shape)),
        output=metadata.TensorSpec(output_name, "float32", (BATCH_DIM, EMBED_DIM)),
        batch=metadata.BatchProfile(1, 16, 32),
    )


def sample() -> Metadata:
    return Metadata(
        model="ViT-S-32",
        embed_dim=EMBED_DIM,
        precision="fp16",
        preprocess=metadata.Preprocess(
            size=SIZE,
            mean=(0.48145466, 0.4578275, 0.40821073),
            std=(0.26862954, 0.26130258, 0.27577711),
            interpolation="bicubic",
            resize_mode="shortest",
            fill=0,
        ),
        towers={
            "image": _tower("image", "m.onnx", "float32", (3, SIZE, SIZE)),
            "text": _tower("text", "m.text.onnx", "int64", (CONTEXT,)),
        },
        tokenizer=metadata.Tokenizer(
            kind="clip_bpe", vocab="bpe_simple_vocab_16e6.txt.gz", context_length=CONTEXT, clean="lower"
        ),
        context_length=CONTEXT,
        logit_scale=100.0,
        logit_bias=-10.0,
        weights=metadata.Weights(source="file", name="w.pt", sha256="ab" * 32),
        versions={"torch": "2.14.1", "tensorrt": None},
        verification=(metadata.Parity("onnxruntime", "image", (1, 3, 7), 0.99999, 1e-4, 0.999),),
    )


def test_round_trip(tmp_path):
    meta = sample()
    for name in ("m.onnx", "m.text.onnx", "bpe_simple_vocab_16e6.txt.gz"):
        (tmp_path / name).write_bytes(b"x")
    saved = metadata.save(meta, tmp_path / "m.json")
    loaded = metadata.load(tmp_path / "m.json")
    assert loaded == meta == saved
    assert loaded.directory == tmp_path.resolve()
    assert loaded.path("m.onnx") == tmp_path.resolve() / "m.onnx"
    assert json.loads((tmp_path / "m.json").read_text()) == meta.to_dict()


def test_contract_names():
    d = sample().to_dict()
    # Another engineer's PreprocessSpec(**sidecar["preprocess"]) depends on exactly these keys.
    assert list(d["preprocess"]) == ["size", "mean", "std", "interpolation", "resize_mode", "fill"]
    assert d["tokenizer"] == {
        "kind": "clip_bpe",
        "vocab": "bpe_simple_vocab_16e6.txt.gz",
        "context_length": CONTEXT,
        "clean": "lower",
    }
    assert d["towers"]["image"]["input"]["name"] == "pixel_values"
    assert d["towers"]["image"]["output"]["name"] == "image_embeds"
    assert d["towers"]["text"]["input"]["name"] == "input_ids"
    assert d["towers"]["text"]["output"]["name"] == "text_embeds"
    assert d["schema"] == metadata.SCHEMA_VERSION
    assert d["verification"][0]["passed"] is True


def _mutated(path_keys: tuple, value) -> dict:
    d = sample().to_dict()
    target = d
    for k in path_keys[:-1]:
        target = target[k]
    if value is KeyError:
        del target[path_keys[-1]]
    else:
        target[path_keys[-1]] = value
    return d


@pytest.mark.parametrize(
    ("path_keys", "value", "match"),
    [
        (("schema",), 2, r"reads schema 1, the file is 2"),
        (("preprocess", "fill"), KeyError, r"preprocess: missing key 'fill'"),
        (("preprocess", "interpolation"), "lanczos", r"preprocess.interpolation: .*got 'lanczos'"),
        (("preprocess", "std"), [0.5, 0.0, 0.5], r"preprocess.std: expected positive numbers"),
        (("preprocess", "size"), 224.0, r"preprocess.size: expected an integer, got 224.0"),
        (
            ("towers", "image", "input", "name"),
            "images",
            r"towers.image.input.name: expected 'pixel_values', got 'images'",
        ),
        (("towers", "text", "input", "dtype"), "float32", r"towers.text.input.dtype: .*got 'float32'"),
        (
            ("towers", "image", "input", "shape"),
            [4, 3, 224, 224],
            r"expected \['batch', \.\.\.\], got \[4, 3, 224, 224\]",
        ),
        (("towers", "image", "input", "shape"), ["batch", 3, 336, 336], r"expected \['batch', 3, 224, 224\]"),
        (("towers", "image", "batch", "opt"), 64, r"expected 1 <= min <= opt <= max, got 1/64/32"),
        (("towers", "video"), {}, r"unknown towers \['video'\]"),
        (("tokenizer", "kind"), "sentencepiece", r"tokenizer.kind: .*got 'sentencepiece'"),
        (("tokenizer", "context_length"), 64, r"tokenizer.context_length: expected 77"),
        (("tokenizer",), None, r"a text tower, tokenizer and context_length come together"),
        (("embed_dim",), 64, r"towers.image.output.shape: expected \[batch, 64\]"),
        (("weights", "sha256"), "xyz", r"weights.sha256: expected 64 lowercase hex digits, got 'xyz'"),
        (("precision",), "int8", r"precision: .*got 'int8'"),
        (("logit_scale",), "100", r"logit_scale: expected a finite number, got '100'"),
        # Values a sidecar from elsewhere may not take: files outside its folder, numbers out of range.
        (
            ("towers", "image", "onnx"),
            "/etc/passwd",
            r"towers.image.onnx: expected a file name inside the bundle's folder, got '/etc/passwd'",
        ),
        (
            ("towers", "text", "onnx"),
            "../elsewhere/m.text.onnx",
            r"towers.text.onnx: expected a file name inside",
        ),
        (("towers", "image", "plan"), "sub/../../m.plan", r"towers.image.plan: expected a file name inside"),
        (("tokenizer", "vocab"), "/etc/passwd", r"tokenizer.vocab: expected a file name inside"),
        (
            ("tokenizer",),
            {"kind": "hf", "name": "../../home/someone", "context_length": CONTEXT},
            r"tokenizer.name: expected a tokenizer name such as 'bert-base-uncased', got '\.\./\.\./home",
        ),
        (("logit_scale",), 1e308, r"logit_scale: expected a number in \(0, 10000\], got 1e\+308"),
        (("logit_scale",), -100.0, r"logit_scale: expected a number in \(0, 10000\], got -100.0"),
        (("logit_bias",), -1e300, r"logit_bias: expected a number in \[-10000, 10000\]"),
        (
            ("towers", "image", "batch"),
            {"min": 1, "opt": 4096, "max": 8192},
            r"batch.max: expected a number in \[1, 4096\]",
        ),
        (("embed_dim",), 1 << 20, r"embed_dim: expected a number in \[1, 65536\]"),
    ],
)
def test_invalid_sidecars_name_the_value(tmp_path, path_keys, value, match):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(_mutated(path_keys, value)))
    with pytest.raises(MetadataError, match=match):
        metadata.load(path, check_files=False)


def test_missing_files_and_bad_json(tmp_path):
    meta = metadata.save(sample(), tmp_path / "m.json")
    with pytest.raises(MetadataError, match=r"missing from .*\['m.onnx', 'm.text.onnx', 'bpe_simple_vocab"):
        metadata.load(tmp_path / "m.json")
    assert metadata.load(tmp_path / "m.json", check_files=False) == meta
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MetadataError, match=r"is not valid JSON"):
        metadata.load(tmp_path / "bad.json")
    with pytest.raises(MetadataError, match=r"cannot read the sidecar"):
        metadata.load(tmp_path / "absent.json")


def test_hostile_sidecar_files_are_one_clear_error(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(MetadataError, match=r"deep.json' is not a sidecar: JSON nested too deeply"):
        metadata.load(deep)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b"\xff\xfe{")
    with pytest.raises(MetadataError, match=r"latin.json' is not UTF-8 text"):
        metadata.load(latin)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(metadata.MAX_SIDECAR_BYTES + 1)
    with pytest.raises(MetadataError, match=r"huge.json' is over \d+ bytes: not a sidecar"):
        metadata.load(huge)


def test_image_only_bundle():
    meta = dataclasses.replace(
        sample(), towers={"image": sample().towers["image"]}, tokenizer=None, context_length=None
    )
    assert Metadata.from_dict(meta.to_dict()) == meta
    assert meta.files() == ["m.onnx"]


def test_parity_verdict():
    assert metadata.Parity("tensorrt", "text", (1,), 0.9995, 0.01, 0.999).passed
    failed = metadata.Parity("tensorrt", "text", (1, 3), 0.998, 0.05, 0.999)
    assert not failed.passed
    assert "FAILED" in str(failed)
    assert failed.to_dict()["passed"] is False


def test_import_stays_light():
    # The runtime reads sidecars and the CLI parses arguments without torch, onnx or TensorRT.
    code = (
        "import sys, nvclip_fast, nvclip_fast.metadata, nvclip_fast.trt_build, nvclip_fast.cli\n"
        "heavy = {'torch', 'onnx', 'open_clip', 'onnxruntime', 'tensorrt'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert 'export' in dir(nvclip_fast)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
