"""Markers shared by all tests: ``gpu``, ``tensorrt``, ``slow`` and ``ray``.

``gpu`` and ``tensorrt`` tests skip themselves, with the reason, where the hardware or library is
absent; ``slow`` tests run by default and can be deselected with ``-m "not slow"``.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest

import nvclip_fast
from nvclip_fast import _C


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA build of nvclip_fast and a CUDA device")
    config.addinivalue_line("markers", "tensorrt: needs TensorRT (builder and runtime) and a CUDA device")
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "ray: starts a local Ray cluster (deselect with -m 'not ray')")


@functools.cache
def gpu_skip_reason() -> str | None:
    if not nvclip_fast.build_info()["cuda"]:
        return "nvclip_fast was built without CUDA"
    if _C.cuda_device_count() == 0:
        return _C.cuda_unavailable_reason()
    return None


@functools.cache
def tensorrt_skip_reason() -> str | None:
    if gpu_skip_reason() is not None:
        return gpu_skip_reason()
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed"
    try:
        import tensorrt

        tensorrt.Builder  # noqa: B018  (the PyPI lean/dispatch wheels have no builder)
    except Exception as e:
        return f"TensorRT builder unavailable: {e}"
    return None


VITS32_MAX_BATCH = 8


@pytest.fixture(scope="session", autouse=True)
def _own_bundle_cache(tmp_path_factory):
    """The tests' bundle cache ($NVCLIP_FAST_CACHE, inherited by the processes they start): never the
    user's own."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NVCLIP_FAST_CACHE", str(tmp_path_factory.mktemp("nvclip-fast-cache")))
    yield
    mp.undo()


@pytest.fixture
def hf_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for one test (the machine's own is not seen)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    hub = tmp_path / "hf-hub"
    hub.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return hub


@pytest.fixture
def bert_in_hf_cache(hf_hub_cache):
    """A small stand-in for bert-base-uncased (NVCLIP's tokenizer) in this test's Hugging Face cache."""
    pytest.importorskip("transformers", reason="Hugging Face tokenizers need transformers")
    import tiny_models

    return tiny_models.bert_tokenizer_in_hf_cache(hf_hub_cache)


@pytest.fixture
def bundle_cache(tmp_path, monkeypatch):
    """An empty bundle cache for one test ($NVCLIP_FAST_CACHE)."""
    root = tmp_path / "bundle-cache"
    monkeypatch.setenv("NVCLIP_FAST_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny-clip (32 px, CLIP BPE) exported to ONNX (max batch ``tiny_models.TINY_MAX_BATCH``), shared
    by every test that needs a fast real model: (open_clip's model, path of tiny.onnx)."""
    import tiny_models

    tmp = tmp_path_factory.mktemp("tiny")
    model = tiny_models.random_model("tiny-clip", seed=3)
    checkpoint = tiny_models.save_checkpoint(model, tmp / "tiny.pt")
    nvclip_fast.export(
        "tiny-clip", tmp / "tiny.onnx", weights=checkpoint, max_batch=tiny_models.TINY_MAX_BATCH, quiet=True
    )
    return model, tmp / "tiny.onnx"


@pytest.fixture(scope="session")
def vits32(tmp_path_factory):
    """ViT-S-32 with random weights saved by torch.save and exported once through the CLI (ONNX,
    fp32, max batch 8), shared by every test that needs a realistic 224 px model:
    (path of vits.onnx, path of the checkpoint)."""
    import tiny_models
    from nvclip_fast import cli

    tmp = tmp_path_factory.mktemp("vits32")
    checkpoint = tiny_models.save_checkpoint(tiny_models.random_model("ViT-S-32", seed=5), tmp / "vits32.pt")
    out = tmp / "out" / "vits.onnx"
    argv = [
        "export",
        "ViT-S-32",
        "-o",
        str(out),
        "--weights",
        str(checkpoint),
        "--max-batch",
        str(VITS32_MAX_BATCH),
    ]
    assert cli.main(argv) == cli.EXIT_OK
    return out, checkpoint


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # Markers, not keywords: keywords also hold the names of the folders above a test (a
        # checkout in a folder named "gpu" would skip every test).
        if item.get_closest_marker("gpu") and (reason := gpu_skip_reason()):
            item.add_marker(pytest.mark.skip(reason=f"gpu: {reason}"))
        if item.get_closest_marker("tensorrt") and (reason := tensorrt_skip_reason()):
            item.add_marker(pytest.mark.skip(reason=f"tensorrt: {reason}"))


@pytest.fixture(scope="session")
def tiny_clip_bundles(tmp_path_factory):
    """Two exports of tiny-clip (ONNX, fp32) with other random weights: the same architecture, two
    models (their weights' sha256 differ). (path of a.onnx, path of b.onnx)."""
    import tiny_models

    tmp = tmp_path_factory.mktemp("tiny_clip")
    bundles = []
    for name, seed in (("a", 4), ("b", 5)):
        checkpoint = tiny_models.save_checkpoint(
            tiny_models.random_model("tiny-clip", seed=seed), tmp / f"{name}.pt"
        )
        nvclip_fast.export("tiny-clip", tmp / f"{name}.onnx", weights=checkpoint, max_batch=8, quiet=True)
        bundles.append(tmp / f"{name}.onnx")
    return tuple(bundles)
