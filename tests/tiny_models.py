"""Tiny open_clip architectures for the export tests, registered into open_clip under test names.

Each keeps the layout flags of the family it stands for and shrinks the sizes: ``tiny-clip`` (OpenAI
CLIP: CLS pooling, causal text mask, argmax pooling), ``tiny-clipa`` (CLIPA: mean-pooled patches with
LayerNorm after pooling, no ln_pre, last-token text pooling without a causal mask) and
``tiny-nvclip`` (NVCLIP as TAO defines it, derived from ``models.NVCLIP_CONFIGS``: CLIPA plus fixed
2-D sin-cos position embeddings, a logit bias and the bert-base-uncased tokenizer). The CLIP and
CLIPA ones keep the 49408-token CLIP BPE vocabulary so text parity can use open_clip's tokenizer.
"""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path

import open_clip
import torch

from nvclip_fast import models

CLIP_BPE_VOCAB_SIZE = 49408
TINY_VISION = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
TINY_TEXT = {"context_length": 16, "vocab_size": CLIP_BPE_VOCAB_SIZE, "width": 64, "heads": 2, "layers": 2}
TINY_EMBED_DIM = 32
CLIPA_VISION = {"no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True}
CLIPA_TEXT = {"pool_type": "last", "no_causal_mask": True}
TINY_MAX_BATCH = 8  # the largest batch of the tiny-clip bundle the tests share (conftest's ``tiny``)


def _tiny_nvclip() -> dict:
    cfg = copy.deepcopy(models.NVCLIP_CONFIGS["ViT-L-14-SigLIP-CLIPA-224"])
    cfg["embed_dim"] = TINY_EMBED_DIM
    cfg["vision_cfg"].update(TINY_VISION)
    cfg["text_cfg"].update({k: v for k, v in TINY_TEXT.items() if k != "vocab_size"})
    return cfg


CONFIGS = {
    "tiny-clip": {"embed_dim": TINY_EMBED_DIM, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT},
    "tiny-clipa": {
        "embed_dim": TINY_EMBED_DIM,
        "vision_cfg": {**TINY_VISION, **CLIPA_VISION},
        "text_cfg": {**TINY_TEXT, **CLIPA_TEXT},
    },
    "tiny-nvclip": _tiny_nvclip(),
}
for _name, _cfg in CONFIGS.items():
    models.register_model_config(_name, _cfg, replace=True)


def random_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """open_clip's own random model (seeded), the reference the exported files are held to."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(name, **kwargs).eval()


def save_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


# A small BERT WordPiece vocabulary (the specials, a few words, every lowercase letter and digit as a
# word and as a continuation) standing in for bert-base-uncased, NVCLIP's tokenizer: no hub here.
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_WORDS = ["a", "photo", "of", "cat", "dog", "the", "diagram", "with", "arrows"]
HF_REVISION = "0" * 40


def bert_tokenizer_in_hf_cache(hub: Path, name: str = "bert-base-uncased") -> Path:
    """Save the small BERT tokenizer where the Hugging Face cache ``hub`` (HF_HUB_CACHE) keeps
    ``name``, laid out as a download leaves it (refs/main -> snapshots/<revision>/, with the model's
    config.json, which AutoTokenizer reads too). Returns the snapshot folder."""
    import transformers

    snapshot = hub / f"models--{name.replace('/', '--')}" / "snapshots" / HF_REVISION
    snapshot.mkdir(parents=True)
    pieces = sorted(set(string.ascii_lowercase + string.digits))
    vocab = BERT_SPECIALS + [w for w in BERT_WORDS if w not in pieces] + pieces + ["##" + c for c in pieces]
    (snapshot / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(snapshot / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(snapshot)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "bert"}), encoding="utf-8")
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text(HF_REVISION, encoding="utf-8")
    return snapshot
