"""Model loading: NVCLIP configs, checkpoint formats, what a checkpoint fixes, and the refusals."""

from __future__ import annotations

import argparse
import hashlib

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from safetensors.torch import save_file  # noqa: E402

import tiny_models  # noqa: E402  (after the skips: it imports open_clip)
from nvclip_fast import metadata, models  # noqa: E402

# Parameter counts (millions, visual / rest) of TAO's NVCLIP ViT-L, as open_clip 3.3 builds it (on the
# meta device). ViT-H takes 15 s to instantiate on 2 cores, so its sizes are checked as config values.
NVCLIP_L_PARAMS_M = (304.3, 110.3)
PARAMS_TOLERANCE_M = 0.05
# TAO's ViT-H: embed_dim, vision width / layers / head_width, text width / heads / layers.
NVCLIP_H_SIZES = (1024, 1280, 32, 80, 1024, 16, 24)
CKPT_IMAGE, CKPT_CONTEXT = 48, 24


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_nvclip_architectures_match_tao():
    model = open_clip.create_model("ViT-L-14-SigLIP-CLIPA-336", device="meta")
    visual = sum(p.numel() for p in model.visual.parameters()) / 1e6
    rest = sum(p.numel() for p in model.parameters()) / 1e6 - visual
    assert (visual, rest) == pytest.approx(NVCLIP_L_PARAMS_M, abs=PARAMS_TOLERANCE_M)
    assert model.logit_bias is not None
    assert model.visual.positional_embedding.requires_grad is False  # fixed sin-cos table
    for image_size in (84, 224, 336, 574):
        cfg = models.NVCLIP_CONFIGS[f"ViT-H-14-SigLIP-CLIPA-{image_size}"]
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        sizes = (
            cfg["embed_dim"],
            v["width"],
            v["layers"],
            v["head_width"],
            t["width"],
            t["heads"],
            t["layers"],
        )
        assert sizes == NVCLIP_H_SIZES
        assert v["image_size"] == image_size


def test_nvclip_names_registered():
    expected = {f"ViT-H-14-SigLIP-CLIPA-{s}" for s in (84, 224, 336, 574)}
    expected |= {f"ViT-L-14-SigLIP-CLIPA-{s}" for s in (84, 224, 336)}
    assert expected == set(models.NVCLIP_CONFIGS)
    assert expected <= set(open_clip.list_models())
    cfg = models.NVCLIP_CONFIGS["ViT-L-14-SigLIP-CLIPA-336"]
    assert cfg["vision_cfg"]["pos_embed_type"] == "sin_cos_2d"
    assert cfg["vision_cfg"]["image_size"] == int(["ViT-L-14-SigLIP-CLIPA", "336"][1])
    assert cfg["text_cfg"]["hf_tokenizer_name"] == "bert-base-uncased"
    spec = models.tokenizer_spec("ViT-L-14-SigLIP-CLIPA-336", 77)
    assert (spec.kind, spec.name, spec.strip_sep_token, spec.clean) == (
        "hf",
        "bert-base-uncased",
        True,
        "whitespace",
    )


@pytest.mark.filterwarnings("ignore::nvclip_fast.models.RandomWeightsWarning")
def test_sin_cos_position_embedding_is_open_clips():
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    loaded = models.load_model("tiny-nvclip", random_weights=True)
    vision = tiny_models.CONFIGS["tiny-nvclip"]["vision_cfg"]
    grid = vision["image_size"] // vision["patch_size"]
    expected = torch.from_numpy(get_2d_sincos_pos_embed(vision["width"], grid, cls_token=True)).float()
    torch.testing.assert_close(loaded.model.visual.positional_embedding.detach(), expected, rtol=0, atol=0)


def test_refuses_without_weights():
    with pytest.raises(models.WeightsRequiredError, match=r"'tiny-clip': pass exactly one of .*got none"):
        models.load_model("tiny-clip")
    with pytest.raises(models.WeightsRequiredError, match=r"got \['pretrained', 'random_weights'\]"):
        models.load_model("tiny-clip", pretrained="openai", random_weights=True)


def test_random_weights_warn_and_are_seeded():
    with pytest.warns(models.RandomWeightsWarning, match="RANDOM weights"):
        a = models.load_model("tiny-clip", random_weights=True, seed=3)
    with pytest.warns(models.RandomWeightsWarning):
        b = models.load_model("tiny-clip", random_weights=True, seed=3)
    _same_weights(a.model, b.model)
    assert a.weights == metadata.Weights(source="random", name=None, sha256=None)


def test_unknown_model():
    with pytest.raises(
        models.UnknownModelError, match=r"unknown model 'ViT-S-23'.*close matches: \[.*'ViT-S-32'"
    ):
        models.load_model("ViT-S-23", random_weights=True)


def _variants(sd: dict) -> dict:
    """The checkpoint layouts training code writes."""
    return {
        "plain.pt": sd,
        "ddp.pth": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 7},
        "lightning.ckpt": {
            "state_dict": {f"model.model.{k}": v for k, v in sd.items()} | {"head.weight": torch.ones(2)}
        },
        "model.bin": {"model": sd},
    }


@pytest.mark.parametrize(
    "layout", ["plain.pt", "ddp.pth", "lightning.ckpt", "model.bin", "weights.safetensors"]
)
def test_checkpoint_layouts_load_the_same_weights(tmp_path, layout):
    ref = tiny_models.random_model("tiny-clipa", seed=1)
    sd = ref.state_dict()
    path = tmp_path / layout
    if layout.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(_variants(sd)[layout], path)
    loaded = models.load_model("tiny-clipa", weights=path)
    _same_weights(loaded.model, ref)
    assert loaded.weights.source == "file"
    assert loaded.weights.name == layout
    assert loaded.weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.model.training is False


def test_checkpoint_fixes_context_length_and_image_size(tmp_path):
    # A checkpoint trained at another image size and context length than the config's 32 px / 16 tokens.
    ref = tiny_models.random_model(
        "tiny-nvclip", force_image_size=CKPT_IMAGE, force_context_length=CKPT_CONTEXT
    )
    path = tiny_models.save_checkpoint(ref, tmp_path / "nv.pt")
    loaded = models.load_model("tiny-nvclip", weights=path)
    assert (loaded.image_size, loaded.context_length) == (CKPT_IMAGE, CKPT_CONTEXT)
    assert loaded.preprocess.size == CKPT_IMAGE
    assert loaded.tokenizer.context_length == CKPT_CONTEXT
    _same_weights(loaded.model, ref)
    assert models.checkpoint_geometry(ref.state_dict()) == (CKPT_IMAGE, CKPT_CONTEXT)


@pytest.mark.filterwarnings("ignore::nvclip_fast.models.RandomWeightsWarning")
def test_fp16_model_holds_the_same_weights():
    loaded = models.load_model("tiny-clip", random_weights=True)
    lp = loaded.model_in("fp16")
    assert lp.visual.conv1.weight.dtype == torch.float16
    assert type(lp.visual.transformer.resblocks[0].ln_1).__name__ == "LayerNormFp32"
    torch.testing.assert_close(
        lp.visual.conv1.weight.float(), loaded.model.visual.conv1.weight.half().float()
    )
    assert loaded.model_in("fp32") is loaded.model


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file not found: '.*absent.pt'"):
        models.load_model("tiny-clip", weights=tmp_path / "absent.pt")
    other = tiny_models.save_checkpoint(tiny_models.random_model("tiny-clipa"), tmp_path / "clipa.pt")
    # CLIPA weights lack tiny-clip's ln_pre: strict loading names the keys.
    with pytest.raises(
        models.CheckpointError,
        match=r"clipa.pt does not fit model 'tiny-clip': 2 missing keys \['visual.ln_pre",
    ):
        models.load_model("tiny-clip", weights=other)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(models.CheckpointError, match=r"junk.pt"):
        models.load_model("tiny-clip", weights=tmp_path / "junk.pt")
    # Lightning-style checkpoints pickle hyperparameter objects, which weights_only loading refuses.
    torch.save({"state_dict": {}, "hparams": argparse.Namespace(lr=0.1)}, tmp_path / "hp.ckpt")
    with pytest.raises(
        models.CheckpointError, match=r"(?s)hp.ckpt holds Python objects.*re-save just the weights"
    ):
        models.load_model("tiny-clip", weights=tmp_path / "hp.ckpt")
    torch.save({"step": 3, "config": {"lr": 0.1}}, tmp_path / "empty.pt")
    with pytest.raises(models.CheckpointError, match=r"no tensors found"):
        models.load_model("tiny-clip", weights=tmp_path / "empty.pt")


def test_pretrained_without_network_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    # The HF hub reads this at call time; with an empty cache no download is attempted.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        models.PretrainedUnavailableError, match=r"'ViT-B-32' pretrained='openai'.*--weights FILE"
    ):
        models.load_model("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))
    with pytest.raises(
        ValueError, match=r"unknown pretrained tag 'nope' for model 'ViT-B-32'; its tags: \[.*'openai'"
    ):
        models.load_model("ViT-B-32", pretrained="nope")
