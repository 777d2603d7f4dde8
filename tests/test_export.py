"""The exporter: ONNX towers that match open_clip, the sidecar, the CLI, and the TensorRT paths.

Each export is checked twice: by the exporter's own gate (recorded in the sidecar) and here,
independently: ONNX Runtime in this process on other inputs vs a model open_clip itself loads from
the same checkpoint (``create_model(name, pretrained=path)``), at batch 1, 3 and 7.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import fake_tensorrt  # noqa: E402
import tiny_models  # noqa: E402
from nvclip_fast import cli, exporter, metadata, models, trt_build  # noqa: E402
from nvclip_fast.bundle import locate_bundle  # noqa: E402
from nvclip_fast.tokenizer import load_tokenizer  # noqa: E402

TESTS = Path(__file__).resolve().parent
BATCHES = (1, 3, 7)
# The export gate: cosine vs open_clip fp32 at least 0.9999 (fp32) / 0.999 (fp16).
MIN_COS = {"fp32": 0.9999, "fp16": 0.999}
MAX_BATCH = 8
PROMPTS = ["a photo of a cat", "", "a diagram, with arrows!", "two dogs " * 40, "un chat", "🙂", "A B C"]
FAMILIES = ("tiny-clip", "tiny-clipa", "tiny-nvclip")
UINT8_LEVELS = 256
EXIT_NO_TENSORRT = 3


# --- independent reference ------------------------------------------------------------------------


def reference_model(name: str, checkpoint: Path) -> torch.nn.Module:
    """open_clip's own loading of the checkpoint (no nvclip_fast code involved)."""
    return open_clip.create_model(name, pretrained=str(checkpoint)).eval()


def image_batch(model: torch.nn.Module, batch: int) -> np.ndarray:
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"][0] if isinstance(cfg["size"], tuple) else cfg["size"]
    g = torch.Generator().manual_seed(100 + batch)
    pixels = torch.randint(0, UINT8_LEVELS, (batch, 3, size, size), generator=g).float() / (UINT8_LEVELS - 1)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    return ((pixels - mean) / std).numpy()


def text_batch(name: str, model: torch.nn.Module, batch: int) -> np.ndarray:
    spec = models.tokenizer_spec(name, model.context_length)
    if spec.kind == "clip_bpe":  # open_clip's own tokenizer ids
        tokenizer = open_clip.get_tokenizer(name, context_length=model.context_length)
        return tokenizer([PROMPTS[i % len(PROMPTS)] for i in range(batch)]).numpy()
    # HF tokenizers need `transformers` and a download: random ids below the vocabulary, zero padded.
    g = np.random.default_rng(batch)
    ctx = model.context_length
    ids = np.zeros((batch, ctx), np.int64)
    for row in ids:
        n = int(g.integers(1, ctx + 1))
        row[:n] = g.integers(1, model.token_embedding.num_embeddings, size=n)
    return ids


def run_onnx(path: Path, x: np.ndarray, precision: str) -> np.ndarray:
    options = ort.SessionOptions()
    if precision == "fp16":  # ORT 1.32 CPU segfaults optimizing open_clip fp16 graphs
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def assert_parity(meta: metadata.Metadata, name: str, ref: torch.nn.Module, run=None) -> dict[str, tuple]:
    """ONNX (or ``run(tower, x)``) vs open_clip at each batch size; (min cos, max |diff|) per tower."""
    found = {}
    for tower in meta.towers:
        cosines, diffs = [], []
        for b in BATCHES:
            x = image_batch(ref, b) if tower == "image" else text_batch(name, ref, b)
            with torch.no_grad():
                t = torch.from_numpy(x)
                want = (
                    ref.encode_image(t, normalize=True)
                    if tower == "image"
                    else ref.encode_text(t, normalize=True)
                ).numpy()
            got = run(tower, x) if run else run_onnx(meta.path(meta.towers[tower].onnx), x, meta.precision)
            assert got.shape == want.shape == (b, meta.embed_dim)
            assert got.dtype == np.float32
            np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)
            cosines.append(float(np.min(np.sum(got.astype(np.float64) * want, axis=-1))))
            diffs.append(float(np.max(np.abs(got - want))))
        found[tower] = (min(cosines), max(diffs))
        assert min(cosines) >= MIN_COS[meta.precision], (tower, cosines, diffs)
    return found


def assert_bundle(
    meta: metadata.Metadata, out: Path, checkpoint: Path, ref: torch.nn.Module, text: bool = True
) -> None:
    """The files of the bundle, and what the sidecar says about them."""
    paths = exporter.bundle_paths(out)
    assert metadata.load(paths.sidecar) == meta
    assert meta.weights == metadata.Weights(
        "file", checkpoint.name, hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    )
    towers = ["image", "text"] if text else ["image"]
    assert sorted(meta.towers) == sorted(towers)
    for tower in towers:
        assert paths.onnx[tower].is_file()
        assert exporter.BundlePaths.data(paths.onnx[tower]).is_file()
        graph = onnx.load(str(paths.onnx[tower]), load_external_data=False).graph
        (inp,), (outp,) = graph.input, graph.output
        assert (inp.name, outp.name) == metadata.TOWER_TENSOR_NAMES[tower]
        assert inp.type.tensor_type.shape.dim[0].dim_param == metadata.BATCH_DIM  # dynamic batch
        assert meta.towers[tower].batch == metadata.BatchProfile(1, MAX_BATCH, MAX_BATCH)
    cfg = open_clip.get_model_preprocess_cfg(ref)
    pp = meta.preprocess
    assert (pp.mean, pp.std, pp.interpolation, pp.resize_mode, pp.fill) == (
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        cfg["interpolation"],
        cfg["resize_mode"],
        cfg["fill_color"],
    )
    assert pp.size == ref.visual.image_size[0]
    assert meta.logit_scale == pytest.approx(float(ref.logit_scale.detach().exp()))
    checks = {(p.backend, p.tower): p for p in meta.verification}
    assert set(checks) == {("onnxruntime", t) for t in towers}
    for p in checks.values():
        assert (p.batches, p.threshold, p.passed) == (BATCHES, MIN_COS[meta.precision], True)
    if text and meta.tokenizer.kind == "clip_bpe":
        vocab = meta.path(meta.tokenizer.vocab)
        assert vocab.read_bytes() == models.CLIP_BPE_VOCAB.read_bytes()
        assert meta.tokenizer.context_length == meta.context_length == ref.context_length


def fp16_islands_are_fp32(path: Path) -> None:
    """Every LayerNormalization and the final ReduceL2 read a Cast to float32; the weights are fp16."""
    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    islands = [n for n in graph.node if n.op_type in ("LayerNormalization", "ReduceL2")]
    assert sum(n.op_type == "ReduceL2" for n in islands) == 1
    for node in islands:
        cast = producer[node.input[0]]
        assert cast.op_type == "Cast", node.name
        assert onnx.helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.FLOAT
    dtypes = {i.data_type for i in graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes


# --- exports ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_families_match_open_clip(tmp_path, name, precision, bert_in_hf_cache):
    checkpoint = tiny_models.save_checkpoint(tiny_models.random_model(name, seed=7), tmp_path / f"{name}.pt")
    out = tmp_path / "bundle" / "m.onnx"
    meta = exporter.export(
        name, out, weights=checkpoint, precision=precision, max_batch=MAX_BATCH, quiet=True
    )
    ref = reference_model(name, checkpoint)
    assert_bundle(meta, out, checkpoint, ref)
    found = assert_parity(meta, name, ref)
    print(f"{name} {precision}: {found}")
    if precision == "fp16":
        for tower in meta.towers:
            fp16_islands_are_fp32(meta.path(meta.towers[tower].onnx))
    assert meta.towers["text"].input.dtype == "int64"
    assert meta.towers["image"].input.dtype == "float32"
    if name == "tiny-nvclip":
        assert meta.tokenizer.kind == "hf"
        assert (meta.tokenizer.name, meta.tokenizer.strip_sep_token) == ("bert-base-uncased", True)
        assert meta.logit_bias == pytest.approx(float(ref.logit_bias.detach()))
        # The tokenizer came from the local Hugging Face cache and is in the bundle now: the same ids
        # as open_clip's, offline.
        assert meta.path(meta.tokenizer.files).is_dir()
        reference = open_clip.get_tokenizer(name, context_length=meta.context_length, local_files_only=True)
        ours = load_tokenizer(meta.tokenizer, meta.directory)
        np.testing.assert_array_equal(ours(PROMPTS), reference(PROMPTS).numpy())


@pytest.mark.slow
def test_vit_s_32_through_the_cli(vits32, capsys):
    out, checkpoint = vits32
    meta = metadata.load(exporter.bundle_paths(out).sidecar)
    ref = reference_model("ViT-S-32", checkpoint)
    assert_bundle(meta, out, checkpoint, ref)
    assert (meta.embed_dim, meta.context_length, meta.preprocess.size) == (384, 77, 224)
    found = assert_parity(meta, "ViT-S-32", ref)
    print(f"ViT-S-32 fp32: {found}")


@pytest.mark.slow
def test_vit_s_32_fp16(vits32, tmp_path):
    _, checkpoint = vits32
    meta = exporter.export(
        "ViT-S-32",
        tmp_path / "v16.onnx",
        weights=checkpoint,
        precision="fp16",
        max_batch=MAX_BATCH,
        quiet=True,
    )
    ref = reference_model("ViT-S-32", checkpoint)
    assert_bundle(meta, tmp_path / "v16.onnx", checkpoint, ref)
    found = assert_parity(meta, "ViT-S-32", ref)
    print(f"ViT-S-32 fp16: {found}")
    fp16_islands_are_fp32(tmp_path / "v16.onnx")


@pytest.mark.slow
def test_image_only_bundle(tmp_path):
    checkpoint = tiny_models.save_checkpoint(tiny_models.random_model("tiny-clip"), tmp_path / "c.pt")
    meta = exporter.export(
        "tiny-clip", tmp_path / "img.onnx", weights=checkpoint, text=False, max_batch=MAX_BATCH, quiet=True
    )
    assert_bundle(
        meta, tmp_path / "img.onnx", checkpoint, reference_model("tiny-clip", checkpoint), text=False
    )
    assert (meta.tokenizer, meta.context_length) == (None, None)
    assert not (tmp_path / "img.text.onnx").exists()


# --- the gate fails when it should -----------------------------------------------------------------------


def test_missing_hf_tokenizer_fails_before_loading_weights(tmp_path, hf_hub_cache, monkeypatch, capsys):
    """NVCLIP's bert-base-uncased not in the local Hugging Face cache: the export stops at once, saying
    how to get it or to do without the text tower, before any weights are read or files written."""
    read = []
    monkeypatch.setattr(models, "read_checkpoint", lambda path: read.append(path))
    out = tmp_path / "bundle" / "nv.onnx"
    with pytest.raises(models.TokenizerUnavailableError, match="bert-base-uncased") as info:
        exporter.export("tiny-nvclip", out, weights=tmp_path / "any.pt")
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message
    assert str(hf_hub_cache) in message
    assert "AutoTokenizer.from_pretrained('bert-base-uncased')" in message
    assert "--no-text" in message
    assert read == []
    assert not out.parent.exists()
    argv = ["export", "tiny-nvclip", "-o", str(out), "--weights", str(tmp_path / "any.pt")]
    assert cli.main(argv) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "--no-text" in err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::nvclip_fast.models.RandomWeightsWarning")
def test_without_tokenizer_no_text_exports_the_image_tower(tmp_path, hf_hub_cache):
    meta = exporter.export("tiny-nvclip", tmp_path / "nv.onnx", random_weights=True, text=False, quiet=True)
    assert sorted(meta.towers) == ["image"]
    assert meta.tokenizer is None


@pytest.mark.slow
def test_parity_gate_fails_on_a_different_model(tmp_path):
    checkpoint = tiny_models.save_checkpoint(tiny_models.random_model("tiny-clip"), tmp_path / "c.pt")
    meta = exporter.export(
        "tiny-clip", tmp_path / "m.onnx", weights=checkpoint, max_batch=MAX_BATCH, quiet=True
    )
    loaded = models.load_model("tiny-clip", weights=checkpoint)
    same = exporter.check_onnx_parity(loaded, meta.path(meta.towers["image"].onnx), "image", "fp32")
    assert same.passed
    with torch.no_grad():  # the reference drifts from what was exported
        loaded.model.visual.proj.add_(0.5 * torch.randn_like(loaded.model.visual.proj))
    drifted = exporter.check_onnx_parity(loaded, meta.path(meta.towers["image"].onnx), "image", "fp32")
    assert not drifted.passed
    assert drifted.min_cos < MIN_COS["fp32"]
    with pytest.raises(exporter.ParityError, match=r"onnxruntime image: min cos .* FAILED") as e:
        exporter._gate([same, drifted], "ONNX Runtime outputs")
    assert e.value.results == [same, drifted]


@pytest.mark.slow
def test_cli_parity_failure_keeps_onnx_and_writes_no_sidecar(tmp_path, monkeypatch, capsys):
    checkpoint = tiny_models.save_checkpoint(tiny_models.random_model("tiny-clip"), tmp_path / "c.pt")
    monkeypatch.setattr(exporter, "MIN_COS", {"fp32": 1.5, "fp16": 1.5})  # above any cosine: must fail
    out = tmp_path / "m.onnx"
    code = cli.main(["export", "tiny-clip", "-o", str(out), "--weights", str(checkpoint), "--no-text"])
    assert code == cli.EXIT_PARITY
    assert "ONNX Runtime outputs differ from open_clip" in capsys.readouterr().err
    assert out.is_file()
    assert not (tmp_path / "m.json").exists()


def test_onnxruntime_crash_is_reported(tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"\x00not a graph")
    with pytest.raises(exporter.ExportError, match=r"ONNX Runtime failed on .*bogus.onnx \(exit code 1\)"):
        exporter._run_onnxruntime(bogus, "pixel_values", [np.zeros((1, 3, 2, 2), np.float32)], "fp16")


# --- refusals and the no-TensorRT path ----------------------------------------------------------------------


def test_cli_refuses_without_weights(tmp_path, capsys):
    out = tmp_path / "bundle" / "m.plan"
    assert cli.main(["export", "tiny-clip", "-o", str(out)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "pass exactly one of weights=FILE, pretrained=TAG or random_weights=True" in err
    assert "Refusing to export random embeddings by accident" in err
    assert not out.parent.exists()
    with pytest.raises(models.WeightsRequiredError):
        exporter.export("tiny-clip", out)
    with pytest.raises(SystemExit) as e:  # argparse: the three sources exclude each other
        cli.main(["export", "tiny-clip", "-o", str(out), "--random-weights", "--weights", "x.pt"])
    assert e.value.code == cli.EXIT_USAGE


def test_unusable_weights_files_are_one_line_and_exit_2(tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(1000))
    state = tiny_models.random_model("tiny-clip").state_dict()
    state["visual.proj"] = torch.zeros(5, 7)
    wrong = tmp_path / "wrong.pt"
    torch.save(state, wrong)
    for weights, problem in (
        (garbage, "not a safetensors file"),
        (wrong, r"visual.proj \(5, 7\) \(the model's: \(64, 32\)\)"),
    ):
        code = cli.main(["export", "tiny-clip", "-o", str(tmp_path / "m.onnx"), "--weights", str(weights)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == cli.EXIT_USAGE
        assert len(err) == 2
        assert err[0].startswith("[export")
        assert weights.name in err[1]
        assert re.search(problem, err[1]), err[1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"precision": "int8"}, r"precision must be one of \['fp32', 'fp16'\], got 'int8'"),
        ({"max_batch": 0}, r"max_batch must be a positive integer, got 0"),
        ({"max_batch": 4, "opt_batch": 8}, r"opt_batch \(8\) must not exceed max_batch \(4\)"),
    ],
)
def test_export_argument_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        exporter.export("tiny-clip", tmp_path / "m.onnx", random_weights=True, **kwargs)
    with pytest.raises(ValueError, match=r"output must end in .onnx or .plan, got '.*m.trt'"):
        exporter.bundle_paths(tmp_path / "m.trt")


@pytest.mark.slow
def test_no_tensorrt_keeps_onnx_and_prints_trtexec(tmp_path):
    """A real process where `import tensorrt` fails: exit code, message, files kept, trtexec lines."""
    blocker = tmp_path / "block" / "tensorrt"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('tensorrt hidden by the test')\n")
    checkpoint = tiny_models.save_checkpoint(tiny_models.random_model("tiny-clip"), tmp_path / "c.pt")
    out = tmp_path / "bundle" / "m.plan"
    script = textwrap.dedent(
        f"""
        import sys, tiny_models
        from nvclip_fast.cli import main
        sys.exit(main(["export", "tiny-clip", "-o", {str(out)!r}, "--weights", {str(checkpoint)!r},
                       "--precision", "fp16", "--max-batch", "16", "--opt-batch", "4"]))
        """
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(blocker.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False, timeout=300
    )
    assert proc.returncode == EXIT_NO_TENSORRT == cli.EXIT_NO_TENSORRT, proc.stderr
    assert "TensorRT engines not built: the tensorrt Python package is not importable" in proc.stderr
    assert "tensorrt hidden by the test" in proc.stderr
    assert "The ONNX files and" in proc.stderr
    paths = exporter.bundle_paths(out)
    meta = metadata.load(paths.sidecar)
    assert all(t.plan is None for t in meta.towers.values())
    assert not paths.plan["image"].exists()
    assert not paths.plan["text"].exists()
    commands = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert commands == [
        [
            "trtexec",
            f"--onnx={paths.onnx['image']}",
            f"--saveEngine={paths.plan['image']}",
            "--minShapes=pixel_values:1x3x32x32",
            "--optShapes=pixel_values:4x3x32x32",
            "--maxShapes=pixel_values:16x3x32x32",
            "--skipInference",
            "--stronglyTyped",
        ],
        [
            "trtexec",
            f"--onnx={paths.onnx['text']}",
            f"--saveEngine={paths.plan['text']}",
            "--minShapes=input_ids:1x16",
            "--optShapes=input_ids:4x16",
            "--maxShapes=input_ids:16x16",
            "--skipInference",
            "--stronglyTyped",
        ],
    ]
    for tower in ("image", "text"):
        assert paths.onnx[tower].is_file()
    # Progress went to stderr with stages, times and sizes; stdout holds only the commands.
    assert "export image tower -> m.onnx" in proc.stderr
    assert "MiB m.onnx.data" in proc.stderr
    # The next step: the ONNX towers here, or the plans built elsewhere.
    assert f"nvclip-fast embed PHOTOS -m {out.with_suffix('')};" in proc.stderr
    assert f"then: nvclip-fast embed PHOTOS -m {out}" in proc.stderr
    # Naming the plan that was not built says what the bundle has and how to go on.
    with pytest.raises(
        FileNotFoundError, match=r"m\.plan: no such file\. Bundle m has no TensorRT plan"
    ) as info:
        locate_bundle(out)
    assert f"-m {out.with_suffix('')} (the best engine on this machine)" in str(info.value)
    assert shlex.join(commands[0]) in str(info.value)


# --- TensorRT ---------------------------------------------------------------------------------------------


def _fake_build(monkeypatch, tmp_path, version: str, precision: str = "fp16", **spec_fields):
    """(the stand-in module, an EngineSpec of a 3x32x32 input with batch 1/4/8) for trt_build."""
    fake = fake_tensorrt.make(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "stand-in GPU")
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"graph")
    fields = {"input_shape": (3, 32, 32), "batch": metadata.BatchProfile(1, 4, 8), **spec_fields}
    spec = trt_build.EngineSpec(onnx_path, tmp_path / "m.plan", "pixel_values", precision=precision, **fields)
    return fake, spec


@pytest.mark.parametrize(
    ("version", "precision", "version_compatible", "flags", "network_flags", "strong"),
    [
        ("11.4.0", "fp16", False, [], 1 << 0, True),
        ("11.4.0", "fp32", False, [("clear_flag", "TF32")], 1 << 0, True),
        ("10.16.1", "fp16", False, [], 1 << 1, True),
        ("10.16.1", "fp32", False, [("clear_flag", "TF32")], 0, False),
        ("10.0.0", "fp16", False, [], 1 << 1, True),  # the first 10.x has STRONGLY_TYPED already
        ("10.16.1", "fp16", True, [("set_flag", "VERSION_COMPATIBLE")], 1 << 1, True),
        ("11.4.0", "fp32", True, [("clear_flag", "TF32"), ("set_flag", "VERSION_COMPATIBLE")], 1 << 0, True),
    ],
)
def test_build_engine_calls_per_tensorrt_version(
    tmp_path, monkeypatch, version, precision, version_compatible, flags, network_flags, strong
):
    """The build code run against a recording stand-in of the tensorrt module (see fake_tensorrt)."""
    fake, spec = _fake_build(monkeypatch, tmp_path, version, precision, version_compatible=version_compatible)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(fake_tensorrt.CACHE_MAGIC + b"tuned before")
    build = trt_build.build_engine(spec, cache)
    assert (build.strongly_typed, build.version_compatible) == (strong, version_compatible)
    assert (build.tensorrt_version, build.gpu) == (version, "stand-in GPU")
    assert spec.plan.read_bytes() == b"PLAN"
    assert cache.read_bytes() == fake_tensorrt.CACHE_MAGIC + b"tuned before" + fake_tensorrt.TUNED
    assert fake.calls == [
        ("create_network", network_flags),
        ("parse_from_file", str(spec.onnx)),
        *flags,
        ("set_shape", "pixel_values", (1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32)),
        ("add_optimization_profile",),
        ("create_timing_cache", fake_tensorrt.CACHE_MAGIC + b"tuned before"),
        ("set_timing_cache", fake_tensorrt.CACHE_MAGIC + b"tuned before"),
        ("build_serialized_network",),
    ]
    assert ("--versionCompatible" in trt_build.trtexec_command(spec)) == version_compatible
    spec.onnx.write_bytes(b"")  # the stand-in's parser rejects empty files
    with pytest.raises(
        trt_build.TensorRTBuildError, match=r"could not parse .*m.onnx:\nModelImporter: empty file"
    ):
        trt_build.build_engine(spec, None)


@pytest.mark.parametrize(
    ("stored", "tried"),
    [
        (b"written by another TensorRT", []),  # create_timing_cache returns None
        (fake_tensorrt.OTHER_DEVICE_CACHE, [("set_timing_cache", fake_tensorrt.OTHER_DEVICE_CACHE)]),  # False
    ],
)
def test_unusable_timing_cache_starts_a_new_one(tmp_path, monkeypatch, capsys, stored, tried):
    fake, spec = _fake_build(monkeypatch, tmp_path, "10.16.1")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(stored)
    trt_build.build_engine(spec, cache)
    cache_calls = [c for c in fake.calls if "timing_cache" in c[0]]
    assert cache_calls == [
        ("create_timing_cache", stored),
        *tried,
        ("create_timing_cache", b""),
        ("set_timing_cache", fake_tensorrt.CACHE_MAGIC),
    ]
    assert f"timing cache {cache} is unreadable or from another device or version" in capsys.readouterr().err
    assert cache.read_bytes() == fake_tensorrt.CACHE_MAGIC + fake_tensorrt.TUNED  # the new one, written back


def test_refused_profiles_are_build_errors(tmp_path, monkeypatch):
    # set_shape raises RuntimeError (here for a negative dimension); add_optimization_profile
    # returns -1: both become TensorRTBuildError naming the input and the shapes.
    fake, spec = _fake_build(monkeypatch, tmp_path, "11.4.0", input_shape=(3, -1, 32))
    with pytest.raises(
        trt_build.TensorRTBuildError,
        match=r"refused the profile .* of 'pixel_values': Shape provided for min",
    ):
        trt_build.build_engine(spec, None)
    fake, spec = _fake_build(monkeypatch, tmp_path, "10.16.1")
    fake.refuse_profiles = True
    with pytest.raises(
        trt_build.TensorRTBuildError, match=r"refused the optimization profile .* 'pixel_values'"
    ):
        trt_build.build_engine(spec, None)
    assert ("build_serialized_network",) not in fake.calls


@pytest.mark.filterwarnings("ignore::nvclip_fast.models.RandomWeightsWarning")
def test_cli_version_compatible_reaches_the_trtexec_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trt_build, "unavailable_reason", lambda: "stand-in: no TensorRT here")
    out = tmp_path / "m.plan"
    argv = ["export", "tiny-clip", "-o", str(out), "--random-weights", "--no-text", "--no-verify"]
    assert cli.main([*argv, "--version-compatible"]) == cli.EXIT_NO_TENSORRT
    (command,) = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert command[-1] == "--versionCompatible"
    assert cli.main(argv) == cli.EXIT_NO_TENSORRT
    assert "--versionCompatible" not in capsys.readouterr().out


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_plans_match_open_clip(tmp_path, precision):
    checkpoint = tiny_models.save_checkpoint(tiny_models.random_model("tiny-clip", seed=9), tmp_path / "c.pt")
    cache = tmp_path / "timing.cache"
    out = tmp_path / "m.plan"
    meta = exporter.export(
        "tiny-clip", out, weights=checkpoint, precision=precision, max_batch=MAX_BATCH, timing_cache=cache
    )
    assert meta.has_plans
    assert cache.stat().st_size > 0
    assert meta.versions["tensorrt"]
    assert meta.versions["gpu"]
    assert {(p.backend, p.tower) for p in meta.verification if p.passed} == {
        (b, t) for b in ("onnxruntime", "tensorrt") for t in ("image", "text")
    }
    assert metadata.load(exporter.bundle_paths(out).sidecar) == meta
    ref = reference_model("tiny-clip", checkpoint)

    def run_plan(tower: str, x: np.ndarray) -> np.ndarray:
        names = metadata.TOWER_TENSOR_NAMES[tower]
        return trt_build.run_engine(meta.path(meta.towers[tower].plan), *names, [x])[0]

    found = assert_parity(meta, "tiny-clip", ref, run=run_plan)
    print(f"TensorRT tiny-clip {precision}: {found}")
    # A second build reuses the timing cache.
    again = exporter.export(
        "tiny-clip",
        tmp_path / "again.plan",
        weights=checkpoint,
        precision=precision,
        max_batch=MAX_BATCH,
        timing_cache=cache,
    )
    assert again.has_plans


@pytest.mark.tensorrt
@pytest.mark.parametrize("version_compatible", [False, True])
def test_plan_runs_natively_in_a_fresh_process(tmp_path, version_compatible):
    """`pip install tensorrt` puts libnvinfer in site-packages/tensorrt_libs/: a process that never
    imports tensorrt still finds it and runs the plan natively (a version-compatible plan too, with
    the full runtime)."""
    import nvclip_fast

    if not nvclip_fast.build_info()["tensorrt"]:
        pytest.skip("this nvclip_fast was built without TensorRT headers: no native TensorRT engine")
    checkpoint = tiny_models.save_checkpoint(tiny_models.random_model("tiny-clip", seed=9), tmp_path / "c.pt")
    plan = tmp_path / "m.plan"
    meta = exporter.export(
        "tiny-clip",
        plan,
        weights=checkpoint,
        max_batch=MAX_BATCH,
        text=False,
        version_compatible=version_compatible,
        quiet=True,
    )
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from nvclip_fast import Encoder, trt_library
        library = trt_library.load()
        with Encoder({str(plan)!r}) as enc:
            rows = enc.embed([np.full((40, 50, 3), 7, np.uint8), np.zeros((30, 20), np.uint8)])
        norms = np.linalg.norm(rows, axis=1).tolist()
        imported = "tensorrt" in sys.modules
        print(json.dumps({{"kind": library.kind, "shape": rows.shape, "norms": norms, "imported": imported}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.splitlines()[-1])
    assert (found["kind"], found["shape"], found["imported"]) == ("full", [2, meta.embed_dim], False)
    assert found["norms"] == pytest.approx([1.0, 1.0], abs=1e-3)
