"""The first run: a model name to a file in one command, the bundle cache, bundles named by stem,
the commands' help, and the messages a newcomer meets (a missing extra, tokenizer or GPU).

One tiny model (``tiny-clip``, random weights) is built into a session-wide cache once and shared;
tests that build their own entries are marked slow.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("open_clip")
pytest.importorskip("onnxruntime")

import nvclip_fast as nf
import tiny_models  # noqa: F401 (registers tiny-clip and tiny-nvclip with open_clip)
from nvclip_fast import cache, cli, commands, embed_text, engines, metadata
from nvclip_fast.bundle import locate_bundle
from nvclip_fast.provenance import PARQUET_KEY, Provenance

TESTS = Path(__file__).resolve().parent
MODEL = "tiny-clip"
MIN_COS = 0.9999  # the exporter's own fp32 gate: ONNX Runtime vs PyTorch on the same weights
CPU_ENGINE = engines.cpu_engine_name("auto", "fp32")  # what runs an fp32 bundle on this CPU
COMMANDS = sorted(next(a for a in cli.build_parser()._actions if a.dest == "command").choices)
pytestmark = pytest.mark.filterwarnings("ignore::nvclip_fast.metadata.RandomWeightsWarning")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """A bundle cache holding tiny-clip with random weights (ONNX, text tower included), built once
    through ``Encoder.from_pretrained``: (cache folder, its one entry)."""
    root = tmp_path_factory.mktemp("bundle-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv(cache.CACHE_ENV, str(root))
    try:
        nf.Encoder.from_pretrained(MODEL, random_weights=True, device="cpu", progress=False).close()
    finally:
        mp.undo()
    (entry,) = cache.entries(root)
    return root, entry


@pytest.fixture
def in_shared_cache(shared_cache, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(shared_cache[0]))
    return shared_cache[1]


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    from PIL import Image

    for i, (h, w) in enumerate([(40, 60), (64, 48), (33, 33)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _no_export(*args, **kwargs):
    raise AssertionError("nothing may be exported (or loaded) here")


# --- Encoder.from_pretrained and the cache -------------------------------------------------------------


def test_from_pretrained_builds_once_then_loads_from_the_cache(in_shared_cache, monkeypatch):
    entry = in_shared_cache
    assert entry.key["model"] == MODEL
    assert entry.key["weights"] == {"random_seed": cache.RANDOM_WEIGHTS_SEED}
    assert (entry.key["engine"], entry.key["precision"], entry.key["text"]) == ("onnx", "fp32", True)
    assert entry.key["versions"]["nvclip-fast"] == nf.__version__
    assert entry.bundle.suffix == ".onnx"
    assert entry.sidecar.is_file()
    built = entry.path.stat().st_mtime_ns
    monkeypatch.setattr("nvclip_fast.exporter.export", _no_export)
    with nf.Encoder.from_pretrained(MODEL, random_weights=True, device="cpu") as enc:
        assert enc.source == {"model": MODEL, "random_weights": True, "precision": "fp32"}
        assert (enc.engine, enc.precision, enc.device) == (CPU_ENGINE, "fp32", "cpu")
        assert f"engine={CPU_ENGINE!r}" in repr(enc)
        assert enc.embed_text(["a cat"]).shape == (1, enc.dim)
    assert entry.path.stat().st_mtime_ns == built


def test_a_cached_model_runs_without_torch(in_shared_cache):
    """A model name already in the cache opens in a process that never imports torch or open_clip
    (the CPU path needs numpy, Pillow and onnxruntime); the name need not even be registered."""
    code = (
        "import sys, warnings; warnings.simplefilter('ignore'); import nvclip_fast as nf\n"
        "with nf.Encoder.from_pretrained('tiny-clip', random_weights=True, device='cpu') as enc:\n"
        "    assert enc.embed_text(['a cat']).shape == (1, 32)\n"
        "    assert enc.embed([b'not an image'], on_error='nan').shape == (1, 32)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_random_weights_are_seeded(in_shared_cache):
    """Two independent loads with random weights give the same model: the cached bundle (ONNX) and
    open_clip's model made again in PyTorch embed alike."""
    images = [np.random.default_rng(s).integers(0, 256, (48, 40, 3), dtype=np.uint8) for s in range(3)]
    with (
        nf.Encoder.from_pretrained(MODEL, random_weights=True, device="cpu") as cached,
        nf.Encoder.from_open_clip(MODEL, random_weights=True, device="cpu") as torch_model,
    ):
        cos = np.sum(cached.embed(images) * torch_model.embed(images), axis=1)
        assert cos.min() >= MIN_COS
        texts = ["a photo of a cat", "two dogs"]
        assert np.sum(cached.embed_text(texts) * torch_model.embed_text(texts), axis=1).min() >= MIN_COS


def test_the_key_holds_everything_that_changes_the_files(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"first weights")
    base = cache.Request(MODEL, weights=weights)
    key = base.key(tmp_path)
    assert key["weights"] == {"sha256": metadata.sha256_file(weights)}
    names = {
        base.folder_name(key),
        *(
            cache.Request(MODEL, weights=weights, **change).folder_name(
                cache.Request(MODEL, weights=weights, **change).key(tmp_path)
            )
            for change in (
                {"precision": "fp16"},
                {"image_size": 64},
                {"max_batch": 256},
                {"text": False},
                {"engine": "tensorrt", "tensorrt": "10.16.1", "gpu": "NVIDIA H100 (9.0)"},
                {"engine": "tensorrt", "tensorrt": "10.16.1", "gpu": "NVIDIA L4 (8.9)"},
            )
        ),
        cache.Request(MODEL, pretrained="openai").folder_name(
            cache.Request(MODEL, pretrained="openai").key(tmp_path)
        ),
    }
    assert len(names) == 8
    # Other weights in the same file (a new mtime and size): another sha256, another entry.
    time.sleep(0.01)
    weights.write_bytes(b"other weights, longer")
    assert (
        cache.Request(MODEL, weights=weights).key(tmp_path)["weights"]["sha256"] != key["weights"]["sha256"]
    )
    # The sha256 of an unchanged file is remembered (per path, size, mtime, inode), not read again.
    remembered = "f" * metadata.SHA256_HEX_LENGTH
    for memo in (tmp_path / ".sha256").iterdir():
        memo.write_text(remembered)
    assert cache.Request(MODEL, weights=weights).key(tmp_path)["weights"]["sha256"] == remembered


def test_request_refuses_bad_arguments():
    with pytest.raises(
        ValueError, match=r"exactly one of pretrained=TAG, weights=FILE or random_weights=True"
    ):
        cache.Request(MODEL)
    with pytest.raises(ValueError, match="exactly one"):
        cache.Request(MODEL, pretrained="openai", random_weights=True)
    with pytest.raises(ValueError, match="precision must be one of"):
        cache.Request(MODEL, random_weights=True, precision="int8")
    with pytest.raises(ValueError, match="names its TensorRT version and GPU"):
        cache.Request(MODEL, random_weights=True, engine="tensorrt")
    with pytest.raises(ValueError, match="exactly one"):
        nf.Encoder.from_pretrained(MODEL)


CONCURRENT_BUILD = """
import logging, sys, time
from pathlib import Path
import tiny_models, warnings
import nvclip_fast as nf
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
warnings.simplefilter("ignore")
Path(sys.argv[1]).touch()  # ready
while not Path(sys.argv[2]).exists():  # everyone starts at once
    time.sleep(0.01)
with nf.Encoder.from_pretrained("tiny-clip", random_weights=True, device="cpu", progress=False) as enc:
    print("rows", enc.embed_text(["a cat"]).round(5).tolist())
"""


@pytest.mark.slow
def test_two_processes_build_one_entry_once(tmp_path):
    """Two processes ask for the same missing entry at the same moment: one builds it, the other
    waits on the lock and then loads what the first built; both get the same rows."""
    root = tmp_path / "cache"
    env = {
        **os.environ,
        cache.CACHE_ENV: str(root),
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    go = tmp_path / "go"
    procs, ready = [], []
    for i in range(2):
        ready.append(tmp_path / f"ready{i}")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CONCURRENT_BUILD, str(ready[i]), str(go)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    log = "\n".join(outputs)
    assert log.count("building tiny-clip (random weights) into the cache") == 1, log
    assert log.count("waiting for another process that is building") == 1, log
    assert log.count("(built by another process)") == 1, log
    rows = [line for out in outputs for line in out.splitlines() if line.startswith("rows")]
    assert len(rows) == 2
    assert rows[0] == rows[1]
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [
        cache.entries(root)[0].path.name
    ]
    assert not list(root.glob(".tmp-*"))


def test_a_failed_build_leaves_no_entry(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))

    def failing_export(model, out, **kwargs):
        Path(out).write_bytes(b"half a bundle")
        raise RuntimeError("export failed half-way")

    monkeypatch.setattr("nvclip_fast.exporter.export", failing_export)
    with pytest.raises(RuntimeError, match="half-way"):
        nf.Encoder.from_pretrained(MODEL, random_weights=True, device="cpu")
    assert cache.entries(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == [".locks"]


def test_cache_list_and_clear(tmp_path, monkeypatch, capsys):
    """Entries listed with what they hold; clear MODEL removes that model's only; clear all of them."""
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    for request in (
        cache.Request("tiny-clip", random_weights=True),
        cache.Request("tiny-clip", random_weights=True, precision="fp16"),
        cache.Request("ViT-B-32", pretrained="openai", text=False),
    ):
        folder = tmp_path / request.folder_name(request.key(tmp_path))
        folder.mkdir()
        (folder / "m.onnx").write_bytes(b"x" * 1000)
        record = {"key": request.key(tmp_path), "bundle": "m.onnx", "created": "2026-01-01T00:00:00+00:00"}
        (folder / cache.ENTRY_FILE).write_text(json.dumps({**record, "seconds": 1.0}))
    (tmp_path / ".trash-old-1").mkdir()
    assert cli.main(["cache", "list"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert f"{tmp_path}: 3 entries" in out
    assert "ViT-B-32 (pretrained openai), onnx, fp32, image tower only" in out
    assert "tiny-clip (random weights), onnx, fp16" in out
    assert cli.main(["cache", "clear", "tiny-clip"]) == cli.EXIT_OK
    assert "removed 2 entries of tiny-clip" in capsys.readouterr().out
    assert [e.model for e in cache.entries(tmp_path)] == ["ViT-B-32"]
    assert cli.main(["cache", "clear"]) == cli.EXIT_OK
    assert cache.entries(tmp_path) == []
    assert not list(tmp_path.glob(".trash-*"))


@pytest.mark.slow
def test_export_warns_of_random_weights_once(tmp_path, capsys):
    argv = ["export", MODEL, "--random-weights", "-o", str(tmp_path / "m.onnx"), "--max-batch", "4"]
    with warnings.catch_warnings():
        warnings.simplefilter("default", metadata.RandomWeightsWarning)  # as outside pytest
        assert cli.main(argv) == cli.EXIT_OK
    err = capsys.readouterr().err
    assert err.count("RANDOM") == 1, err
    assert "nvclip-fast: warning: model 'tiny-clip' has RANDOM weights" in err


# --- bundles by stem or any file --------------------------------------------------------------------


def test_a_bundle_is_named_by_its_stem_or_any_of_its_files(in_shared_cache):
    stem = in_shared_cache.bundle.with_suffix("")
    for name in (
        stem,
        stem.with_suffix(".json"),
        stem.with_suffix(".onnx"),
        Path(f"{stem}.text.onnx"),
        Path(f"{stem}.onnx.data"),
    ):
        with nf.Encoder(name, device="cpu") as enc:
            assert (enc.model, enc.engine) == (MODEL, CPU_ENGINE)
            assert enc.source == {"bundle": str(stem.with_suffix(".json"))}


def test_a_plan_that_is_not_there_says_what_is_and_how_to_go_on(in_shared_cache, capsys, photos, tmp_path):
    stem = in_shared_cache.bundle.with_suffix("")
    plan = stem.with_suffix(".plan")
    with pytest.raises(FileNotFoundError) as info:
        locate_bundle(plan)
    message = str(info.value)
    assert f"{plan}: no such file. Bundle {stem.name} has no TensorRT plan, only its ONNX towers" in message
    assert f"-m {stem} (the best engine on this machine) or -m {stem}.onnx" in message
    assert f"trtexec --onnx={stem}.onnx --saveEngine={plan}" in message
    argv = ["embed", str(photos), "-m", str(plan), "-o", str(tmp_path / "o.parquet")]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "has no TensorRT plan" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"no such file \(no bundle there: looked for nothing\.json"):
        locate_bundle(tmp_path / "nothing")


@pytest.mark.skipif(nf.cuda_available(), reason="checks the choice where no GPU is")
def test_without_a_gpu_the_best_engine_is_the_cpus(in_shared_cache):
    from nvclip_fast.bundle import tensorrt_unavailable_reason

    assert tensorrt_unavailable_reason("auto") == nf._C.cuda_unavailable_reason()
    assert tensorrt_unavailable_reason("cpu") == "the device is the CPU"
    with nf.Encoder(in_shared_cache.sidecar) as enc:
        assert (enc.engine, enc.device) == (CPU_ENGINE, "cpu")


@pytest.mark.skipif(nf.cuda_available(), reason="checks the no-GPU message")
def test_from_pretrained_on_cuda_without_a_gpu_says_why(bundle_cache):
    with pytest.raises(nf.EngineError, match="no CUDA device is usable: ") as info:
        nf.Encoder.from_pretrained(MODEL, random_weights=True, device="cuda")
    assert nf._C.cuda_unavailable_reason() in str(info.value)
    assert cache.entries(bundle_cache) == []


@pytest.mark.parametrize(
    ("tensorrt", "builder", "cached", "ort_cuda", "torch_cuda", "engine"),
    [
        (True, True, False, False, False, "tensorrt"),  # a plan is built
        (True, False, True, False, False, "tensorrt"),  # no builder, but the plan is in the cache
        (True, False, False, True, False, "onnx"),  # no builder, no plan: ONNX Runtime's CUDA provider
        (False, True, False, True, True, "onnx"),
        (False, True, False, False, True, "torch"),  # neither TensorRT nor onnxruntime-gpu
        (False, True, False, False, False, "onnx"),  # no GPU engine at all: ONNX (which says so)
    ],
)
def test_the_engine_of_a_model_name_on_a_gpu(
    monkeypatch, bundle_cache, tensorrt, builder, cached, ort_cuda, torch_cuda, engine
):
    """The device-level choice for a model name on CUDA device 0, with the GPU, TensorRT, its builder,
    onnxruntime-gpu and torch's CUDA stood in for: what the cache entry is built for."""
    import torch

    from nvclip_fast import encoder, engines, trt_build

    monkeypatch.setattr(encoder, "tensorrt_unavailable_reason", lambda d: None if tensorrt else "no TensorRT")
    monkeypatch.setattr(nf._C, "cuda_device", lambda i: {"name": "NVIDIA H100", "compute_capability": "9.0"})
    monkeypatch.setattr(encoder.trt_library, "load", lambda: type("Library", (), {"version": "10.16.1"}))
    monkeypatch.setattr(trt_build, "unavailable_reason", lambda: None if builder else "no builder")
    monkeypatch.setattr(engines, "cuda_provider_available", lambda: ort_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: torch_cuda)
    common = {"model": MODEL, "random_weights": True}
    if cached:
        plan = cache.Request(**common, engine="tensorrt", tensorrt="10.16.1", gpu="NVIDIA H100 (9.0)")
        folder = bundle_cache / plan.folder_name(plan.key(bundle_cache))
        folder.mkdir(parents=True)
        record = {"key": plan.key(bundle_cache), "bundle": "m.plan", "created": "-", "seconds": 0}
        (folder / cache.ENTRY_FILE).write_text(json.dumps(record))
    target = encoder._gpu_target(0, common)
    assert target["engine"] == engine
    if engine == "tensorrt":
        assert target == {"engine": "tensorrt", "tensorrt": "10.16.1", "gpu": "NVIDIA H100 (9.0)"}


def test_random_weights_warn_when_a_bundle_is_loaded(in_shared_cache):
    with pytest.warns(metadata.RandomWeightsWarning, match="model 'tiny-clip' has RANDOM weights"):
        nf.Encoder(in_shared_cache.bundle, device="cpu").close()


# --- the commands -------------------------------------------------------------------------------------


def test_embed_with_a_model_name_twice_hits_the_cache(in_shared_cache, photos, tmp_path, capsys, monkeypatch):
    """The quick start: embed by model name; the run after reuses the entry (nothing exported, the
    entry untouched); the summary line names the engine; random weights are warned of once a run."""
    built = in_shared_cache.path.stat().st_mtime_ns
    monkeypatch.setattr("nvclip_fast.exporter.export", _no_export)
    for run in range(2):
        out = tmp_path / f"run{run}.parquet"
        argv = ["embed", str(photos), "-m", MODEL, "--random-weights", "-o", str(out), "--no-progress"]
        with warnings.catch_warnings():
            warnings.simplefilter("default", metadata.RandomWeightsWarning)  # as outside pytest
            assert cli.main(argv) == cli.EXIT_OK
        err = capsys.readouterr().err
        assert f"nvclip-fast: tiny-clip (random weights) from the cache: {in_shared_cache.path}" in err
        assert err.count("RANDOM weights") == 1, err
        assert "embedded 3 of 3 images" in err
        assert f"(tiny-clip on {CPU_ENGINE} fp32, cpu)" in err
    assert in_shared_cache.path.stat().st_mtime_ns == built
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "run0.parquet").equals(pq.read_table(tmp_path / "run1.parquet"))


def test_classify_with_a_model_name(in_shared_cache, photos, capsys):
    argv = ["classify", str(photos), "-m", MODEL, "--random-weights", "--labels", "cat,dog", "--top-k", "1"]
    assert cli.main(argv) == cli.EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3
    assert all(line.split("\t")[1].split()[0] in ("cat", "dog") for line in out)


def test_threads_sets_onnx_runtime_threads(in_shared_cache):
    argv = ["embed", "x", "-m", str(in_shared_cache.bundle), "-o", "o.npy", "--threads", "1"]
    args = cli.build_parser().parse_args([*argv, "--engine", "onnxruntime"])
    with commands.encoder_loader(args, text=None)() as enc:
        assert enc._towers.images[0]._session.get_session_options().intra_op_num_threads == 1


@pytest.mark.parametrize("suffix", [".parquet", ".npy"])
def test_embed_text_writes_texts_embeddings_and_provenance(in_shared_cache, tmp_path, capsys, suffix):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a dog\n\n  \na diagram\n", encoding="utf-8")
    texts = ["a photo of a cat", "a photo of a dog", "a diagram", "two\nlines"]
    out = tmp_path / f"texts{suffix}"
    argv = ["embed-text", texts[0], f"@{prompts}", texts[3], "-m", MODEL, "--random-weights", "-o", str(out)]
    assert cli.main([*argv, "--no-progress"]) == cli.EXIT_OK
    assert f"embedded 4 texts -> {out}" in capsys.readouterr().err
    with nf.Encoder(in_shared_cache.bundle, device="cpu") as enc:
        expected = enc.embed_text(texts)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        assert table.column_names == ["text", "embedding"]
        assert table.column("text").to_pylist() == texts
        rows = np.array(table.column("embedding").to_pylist(), np.float32)
        provenance = Provenance.from_json(table.schema.metadata[PARQUET_KEY])
    else:
        rows = np.load(out)
        lines = out.with_name(out.name + embed_text.TEXTS_SUFFIX).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == texts
        provenance = Provenance.from_json(out.with_name(out.name + embed_text.PROVENANCE_SUFFIX).read_text())
    np.testing.assert_allclose(rows, expected, atol=1e-6)
    assert (provenance.model, provenance.embed_dim, provenance.dtype) == (MODEL, 32, "float32")
    assert provenance.source == {"model": MODEL, "random_weights": True, "precision": "fp32"}


def test_embed_text_refuses_an_empty_list_and_a_bad_output(in_shared_cache, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    argv = ["embed-text", f"@{empty}", "-m", MODEL, "--random-weights", "-o", str(tmp_path / "t.parquet")]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "no texts were given" in capsys.readouterr().err
    argv = ["embed-text", "x", "-m", MODEL, "--random-weights", "-o", str(tmp_path / "t.csv")]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "expected a .parquet or .npy" in capsys.readouterr().err


def test_models_lists_open_clip_and_nvclip_names(capsys):
    assert cli.main(["models"]) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["MODEL", "DIM", "SIZE", "PRETRAINED"]
    vitb = next(line for line in lines if line.split()[0] == "ViT-B-32")
    assert vitb.split()[1:3] == ["512", "224"]
    assert "laion2b_s34b_b79k" in vitb
    nvclip = next(line for line in lines if line.split()[0] == "ViT-H-14-SigLIP-CLIPA-224")
    assert nvclip.split()[1:3] == ["1024", "224"]
    assert "NVCLIP: NVIDIA NGC model nvidia/tao/nvclip_vit (--weights FILE)" in nvclip
    assert cli.main(["models", "siglip-clipa"]) == cli.EXIT_OK
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names
    assert all("SigLIP-CLIPA" in n for n in names)
    assert cli.main(["models", "no-such-model"]) == cli.EXIT_USAGE


def test_every_command_is_covered():
    assert {"embed", "classify", "embed-text", "serve", "export", "info", "models", "cache"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [None, *COMMANDS, "probe train"])
def test_help_is_plain_text_with_examples(command, capsys):
    argv = [*command.split(), "--help"] if command else ["--help"]
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text
    assert ":func:" not in text
    examples = text.split("\nexamples:\n", 1)[1].splitlines()
    assert examples
    assert all(line.startswith("  nvclip-fast ") or line.startswith("  NVCLIP_FAST_") for line in examples)
    if command:
        assert any(f"nvclip-fast {command} " in line + " " for line in examples)


def test_a_model_name_without_weights_says_what_to_add(photos, tmp_path, capsys):
    argv = ["embed", str(photos), "-m", "ViT-B-32", "-o", str(tmp_path / "o.parquet")]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "ViT-B-32: no such file" in err
    assert "give --pretrained TAG, --weights FILE or --random-weights (nvclip-fast models lists" in err


# --- missing pieces: the export extra, a tokenizer, the network -----------------------------------------


@pytest.fixture
def without_onnx(monkeypatch):
    """As where the export extra is not installed: `import onnx` fails (and the exporter with it)."""
    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.delitem(sys.modules, "nvclip_fast.exporter", raising=False)


def test_export_without_the_export_extra_says_what_to_install(without_onnx, tmp_path, capsys):
    argv = ["export", MODEL, "--random-weights", "-o", str(tmp_path / "m.onnx")]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert (
        "nvclip-fast export: error: exporting needs the 'export' extra (onnx is not installed): pip install"
        in err
    )
    assert "[export]" in err
    assert "Traceback" not in err
    assert "ModuleNotFoundError" not in err


def test_a_model_name_without_the_export_extra_says_what_to_install(
    without_onnx, bundle_cache, photos, tmp_path, capsys
):
    argv = ["embed", str(photos), "-m", MODEL, "--random-weights", "-o", str(tmp_path / "o.parquet")]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "building a bundle from the model name 'tiny-clip' needs the 'export' extra" in err
    assert f"pip install {'-e ' if extras_editable() else ''}" in err
    assert not bundle_cache.exists() or cache.entries(bundle_cache) == []


def extras_editable() -> bool:
    from nvclip_fast import extras

    origin = extras._install_origin()
    return origin is not None and origin[1]


def test_the_pip_command_names_where_this_package_came_from(monkeypatch):
    from nvclip_fast import extras

    monkeypatch.setattr(extras, "_install_origin", lambda: None)
    assert extras.pip_install("export") == 'pip install "nvclip-fast[export]"'
    monkeypatch.setattr(extras, "_install_origin", lambda: ("/src/nvclip-fast", False))
    assert extras.pip_install("export") == 'pip install "/src/nvclip-fast[export]"'
    monkeypatch.setattr(extras, "_install_origin", lambda: ("/src/nvclip-fast", True))
    assert extras.pip_install("serve") == 'pip install -e "/src/nvclip-fast[serve]"'


def test_a_missing_text_tokenizer_fails_before_any_export(hf_hub_cache, bundle_cache, monkeypatch):
    """tiny-nvclip's tokenizer (bert-base-uncased) is not in the local Hugging Face cache: a text tower
    is refused at once, with the ways out, and nothing is built."""
    from nvclip_fast.models import TokenizerUnavailableError

    monkeypatch.setattr("nvclip_fast.models.load_model", _no_export)  # no weights are even loaded
    with pytest.raises(TokenizerUnavailableError, match=r"bert-base-uncased.*--no-text; text=False"):
        nf.Encoder.from_pretrained("tiny-nvclip", random_weights=True, device="cpu")
    assert cache.entries(bundle_cache) == []
    assert not list(bundle_cache.glob(".tmp-*"))


@pytest.mark.slow
def test_text_none_exports_the_image_tower_where_the_tokenizer_is_missing(hf_hub_cache, bundle_cache, capsys):
    with nf.Encoder.from_pretrained(
        "tiny-nvclip", random_weights=True, device="cpu", text=None, progress=False
    ) as enc:
        assert enc.embed([np.zeros((40, 40, 3), np.uint8)]).shape == (1, 32)
        with pytest.raises(nf.EngineError, match="no text tower"):
            enc.embed_text(["a cat"])
    (entry,) = cache.entries(bundle_cache)
    assert entry.text is False


def test_loading_a_tokenizer_never_goes_to_the_network(hf_hub_cache, monkeypatch, tmp_path):
    """A bundle whose Hugging Face tokenizer files are missing fails at once, naming the way out,
    without a single connection attempt (no retries)."""
    from nvclip_fast.tokenizer import load_tokenizer

    pytest.importorskip("transformers")
    attempts = []

    def connect(self, address):
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    entry = {"kind": "hf", "name": "bert-base-uncased", "context_length": 16, "strip_sep_token": True}
    with pytest.raises(FileNotFoundError, match="not available offline: the bundle does not carry its files"):
        load_tokenizer(entry, tmp_path)
    assert attempts == []


@pytest.mark.slow
def test_the_tokenizer_in_the_local_cache_goes_into_the_bundle(bert_in_hf_cache, bundle_cache):
    """Where bert-base-uncased is in the local Hugging Face cache, from_pretrained's text tower is
    there and its tokenizer files travel in the entry."""
    pytest.importorskip("transformers")
    with nf.Encoder.from_pretrained("tiny-nvclip", random_weights=True, device="cpu", progress=False) as enc:
        assert enc.metadata.tokenizer.files == "tiny-nvclip.tokenizer"
        assert enc.embed_text(["a photo of a cat"]).shape == (1, 32)
