"""open_clip models for the exporter and the runtime: NVCLIP configs and one loading function.

``load_model`` is the single way this package turns (model name, weights) into an open_clip model;
the exporter uses it, and so can ``Encoder.from_open_clip``. It refuses to run without weights unless
random weights are asked for explicitly, reads what a checkpoint fixes (image size, text context
length) from the checkpoint, and reports where the weights came from (file name + sha256).

NVCLIP (NVIDIA TAO) architectures are open_clip configs defined outside open_clip: the CLIPA layout
(no ``ln_pre``, mean-pooled patch tokens then ``ln_post``, text pooled at the last position with no
causal mask, ``bert-base-uncased`` tokenizer with the SEP token stripped) with fixed 2-D sin-cos
position embeddings (``pos_embed_type="sin_cos_2d"``, supported by open_clip since 2.24) and a
SigLIP logit bias. The dicts below follow ``nvidia_tao_pytorch/cv/backbone_v2/open_clip.py`` and
``nvidia_tao_pytorch/multimodal/clip/utils/model_configs.py`` (NVIDIA-TAO/tao-pytorch); they are
registered into open_clip on import, the way TAO does it, so ``open_clip.create_model`` knows them.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
import math
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip import factory as _oc_factory
from open_clip import tokenizer as _oc_tokenizer
from open_clip.transform import merge_preprocess_dict

from . import metadata
from .metadata import RandomWeightsWarning

__all__ = [
    "NVCLIP_CONFIGS",
    "Architecture",
    "CheckpointError",
    "LoadedModel",
    "PretrainedUnavailableError",
    "RandomWeightsWarning",
    "TokenizerUnavailableError",
    "UnknownModelError",
    "WeightsRequiredError",
    "architectures",
    "checkpoint_geometry",
    "load_model",
    "offline_tokenizer",
    "read_checkpoint",
    "register_model_config",
    "require_offline_tokenizer",
    "tokenizer_spec",
]

log = logging.getLogger(__name__)

# The CLIP BPE merges file that ships inside open_clip; bundles carry a copy under the same name.
CLIP_BPE_VOCAB = Path(_oc_tokenizer.default_bpe())
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
# Keys under which training frameworks nest a model's state dict inside a checkpoint dict.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
DDP_PREFIX = "module."
# Every open_clip CLIP / CustomTextCLIP has this top-level parameter: it locates the model's
# key prefix inside checkpoints that nest it (e.g. a TAO backbone's "model.").
ANCHOR_KEY = "logit_scale"
DEFAULT_SEED = 0
SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")  # open_clip model names that fetch config and weights themselves
KEYS_SHOWN = 5  # how many offending keys an error message lists
MATRIX_NDIM = 2  # position embeddings (tokens, width); image sizes (height, width)
CONV_NDIM = 4  # conv1 weight (width, 3, patch, patch)

# --- NVCLIP configs (TAO) ----------------------------------------------------------------------------

_NVCLIP_VISION = {
    "patch_size": 14,
    "no_ln_pre": True,
    "pool_type": "avg",
    "final_ln_after_pool": True,
    "pos_embed_type": "sin_cos_2d",
    "patch_dropout": 0.0,
}
_NVCLIP_TEXT = {
    "vocab_size": 32000,
    "hf_tokenizer_name": "bert-base-uncased",
    "tokenizer_kwargs": {"strip_sep_token": True},
    "pool_type": "last",
    "no_causal_mask": True,
}
# (embed_dim, vision layers, width, head_width, text width, heads, layers) of TAO's two sizes.
_NVCLIP_SIZES = {"H": (1024, 32, 1280, 80, 1024, 16, 24), "L": (768, 24, 1024, 64, 768, 12, 12)}
# TAO's text context lengths: 16 at 84 px, else 77 (backbone_v2). TAO's multimodal table gives
# ViT-L-14-SigLIP-CLIPA-336 a 256-token context; load_model takes the length from the checkpoint.
_NVCLIP_VARIANTS = {"H": {84: 16, 224: 77, 336: 77, 574: 77}, "L": {84: 16, 224: 77, 336: 77}}
NVCLIP_INIT_LOGIT_BIAS = -10


def _nvclip_config(size: str, image_size: int, context_length: int) -> dict[str, Any]:
    embed_dim, layers, width, head_width, text_width, text_heads, text_layers = _NVCLIP_SIZES[size]
    return {
        "embed_dim": embed_dim,
        "init_logit_bias": NVCLIP_INIT_LOGIT_BIAS,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": head_width,
            **_NVCLIP_VISION,
        },
        "text_cfg": {
            "context_length": context_length,
            "width": text_width,
            "heads": text_heads,
            "layers": text_layers,
            **copy.deepcopy(_NVCLIP_TEXT),
        },
    }


NVCLIP_CONFIGS: dict[str, dict[str, Any]] = {
    f"ViT-{size}-14-SigLIP-CLIPA-{image_size}": _nvclip_config(size, image_size, ctx)
    for size, variants in _NVCLIP_VARIANTS.items()
    for image_size, ctx in variants.items()
}


# Where NVCLIP's weights come from: NVIDIA's NGC catalog (TAO models), under NVIDIA's license there.
NVCLIP_WEIGHTS = "NVIDIA NGC model nvidia/tao/nvclip_vit (--weights FILE)"


@dataclass(frozen=True)
class Architecture:
    """A model name open_clip knows: its embedding size, image size and pretrained tags (NVCLIP's
    weights are not open_clip tags: ``nvclip`` says where they come from)."""

    name: str
    embed_dim: int
    image_size: int
    pretrained: tuple[str, ...]
    nvclip: bool


def architectures(contains: str = "") -> list[Architecture]:
    """Every model name open_clip knows (NVCLIP's registered here included) whose name contains
    ``contains`` (any case), in open_clip's order."""
    found = []
    for name in open_clip.list_models():
        if contains.lower() not in name.lower():
            continue
        config = _oc_factory.get_model_config(name) or {}
        found.append(
            Architecture(
                name=name,
                embed_dim=int(config.get("embed_dim", 0)),
                image_size=_square(config.get("vision_cfg", {}).get("image_size", 0), name),
                pretrained=tuple(open_clip.list_pretrained_tags_by_model(name)),
                nvclip=name in NVCLIP_CONFIGS,
            )
        )
    return found


# --- errors -------------------------------------------------------------------------------------------


class WeightsRequiredError(ValueError):
    """Neither weights, a pretrained tag nor random weights were asked for (or more than one)."""


class UnknownModelError(ValueError):
    """The model name is neither an open_clip config nor an NVCLIP one."""


class CheckpointError(ValueError):
    """A weights file that cannot be read, or whose tensors do not fit the model."""


class PretrainedUnavailableError(RuntimeError):
    """An open_clip pretrained tag whose weights could not be downloaded (no network, no cache)."""


class TokenizerUnavailableError(RuntimeError):
    """The text tower's tokenizer cannot be had from local files, so it cannot go into a bundle."""


# --- registry -----------------------------------------------------------------------------------------


def register_model_config(name: str, config: Mapping[str, Any], *, replace: bool = False) -> None:
    """Make an architecture known to ``open_clip.create_model`` under ``name``.

    open_clip only registers configs from JSON files (``add_model_config``); like TAO, this writes
    into ``open_clip.factory._MODEL_CONFIGS``. An existing name is kept unless ``replace``.
    """
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise ValueError(f"model config {name!r} lacks {missing}; got keys {sorted(config)}")
    if name in _oc_factory._MODEL_CONFIGS and not replace:
        return
    _oc_factory._MODEL_CONFIGS[name] = copy.deepcopy(dict(config))


def _register_nvclip_configs() -> None:
    for name, config in NVCLIP_CONFIGS.items():
        register_model_config(name, config)


_register_nvclip_configs()


def model_config(name: str) -> dict[str, Any]:
    """The open_clip config dict of ``name`` (a copy); UnknownModelError with close matches if none."""
    if name.startswith(SCHEMA_PREFIXES):
        raise UnknownModelError(
            f"model {name!r}: 'hf-hub:' and 'local-dir:' names are not supported here; "
            "pass the architecture name with weights=FILE"
        )
    config = _oc_factory.get_model_config(name)
    if config is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=KEYS_SHOWN)
        raise UnknownModelError(
            f"unknown model {name!r}; close matches: {close} (see open_clip.list_models())"
        )
    return config


# --- checkpoints ----------------------------------------------------------------------------------------


def _torch_load(path: Path) -> Any:
    try:
        # mmap keeps a multi-GB checkpoint out of RSS until its tensors are copied into the model;
        # it needs torch.save's zip format, so older files are read without it.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict in a ``.pt``/``.pth``/``.bin``/``.ckpt`` (torch.save) or ``.safetensors`` file.

    Accepts a bare state dict or one nested under ``state_dict``/``model_state_dict``/``model``;
    strips ``module.`` (DistributedDataParallel) prefixes, and the prefix of models nested in a
    wrapper (found from the key ending in ``logit_scale``; keys outside it are dropped, with a log
    line). Only tensors are kept. Pickles are read with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                obj: Any = load_file(path, device="cpu")
            except SafetensorError as e:  # reported below, as any other unreadable file
                raise ValueError(f"not a safetensors file ({e})") from e
        else:
            obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects besides tensors and torch.load(weights_only=True) "
            f"refused it ({e}); "
            "re-save just the weights: torch.save(checkpoint['state_dict'], 'weights.pt')"
        ) from e
    except (RuntimeError, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"cannot read the weights file {str(path)!r}: {e}") from e
    return normalize_state_dict(obj, str(path))


def normalize_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """See ``read_checkpoint``: unwrap, strip ``module.`` and wrapper prefixes, keep the tensors."""
    while isinstance(obj, Mapping):
        nested = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = nested
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: expected a state dict (a mapping of tensors), got {type(obj).__name__}"
        )
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(
            f"{source}: no tensors found (top-level keys: {sorted(map(str, obj))[:KEYS_SHOWN]})"
        )
    sd = {k.removeprefix(DDP_PREFIX): v for k, v in sd.items()}
    if ANCHOR_KEY not in sd:
        anchors = sorted(k for k in sd if k.endswith("." + ANCHOR_KEY))
        if len(anchors) == 1:
            prefix = anchors[0][: -len(ANCHOR_KEY)]
            dropped = [k for k in sd if not k.startswith(prefix)]
            if dropped:
                log.info(
                    "%s: ignoring %d keys outside %r, e.g. %s",
                    source,
                    len(dropped),
                    prefix,
                    dropped[:KEYS_SHOWN],
                )
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def checkpoint_geometry(state_dict: Mapping[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """(image size, text context length) fixed by a state dict's position embeddings, or None each.

    Image: open_clip ViT ``visual.positional_embedding`` has grid² + 1 rows (class token), the patch
    size is ``visual.conv1.weight``'s kernel. Text: ``positional_embedding`` (CLIP) or
    ``text.positional_embedding`` (CustomTextCLIP) has one row per token position.
    """
    image_size = None
    pos, conv = state_dict.get("visual.positional_embedding"), state_dict.get("visual.conv1.weight")
    if pos is not None and conv is not None and pos.ndim == MATRIX_NDIM and conv.ndim == CONV_NDIM:
        patches = pos.shape[0] - 1  # minus the class token
        grid = math.isqrt(patches)
        if grid * grid == patches and conv.shape[-1] == conv.shape[-2]:
            image_size = grid * conv.shape[-1]
    context_length = None
    for key in ("positional_embedding", "text.positional_embedding"):
        t = state_dict.get(key)
        if t is not None and t.ndim == MATRIX_NDIM:
            context_length = int(t.shape[0])
    return image_size, context_length


def _fit_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], name: str, source: str) -> None:
    """Load ``sd`` into ``model`` with the conversions of open_clip's ``load_checkpoint`` (v3.3)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    sd = convert_state_dict(model, dict(sd))
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        param = getattr(model, key, None)
        if key in sd and param is not None and sd[key].ndim != param.ndim:
            sd[key] = sd[key].reshape(param.shape)
    if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])  # what open_clip does for non-SigLIP weights
    sd.pop("text.transformer.embeddings.position_ids", None)
    resize_pos_embed(sd, model)
    resize_text_pos_embed(sd, model)
    own = model.state_dict()
    shapes = [
        f"{key} {tuple(value.shape)} (the model's: {tuple(own[key].shape)})"
        for key, value in sd.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    if shapes:
        raise CheckpointError(
            f"{source} does not fit model {name!r}: {len(shapes)} tensor(s) of other shapes: "
            + "; ".join(shapes[:KEYS_SHOWN])
        )
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # anything else load_state_dict refuses, on one line
        raise CheckpointError(f"{source} does not fit model {name!r}: {' '.join(str(e).split())}") from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{source} does not fit model {name!r}: {len(result.missing_keys)} missing keys "
            f"{result.missing_keys[:KEYS_SHOWN]}, {len(result.unexpected_keys)} unexpected keys "
            f"{result.unexpected_keys[:KEYS_SHOWN]}"
        )


# --- tokenizer and preprocessing as data ----------------------------------------------------------------


def _default_arg(cls: type, name: str) -> Any:
    return inspect.signature(cls).parameters[name].default


def tokenizer_spec(
    name: str, context_length: int, config: Mapping[str, Any] | None = None
) -> metadata.Tokenizer:
    """The tokenizer ``open_clip.get_tokenizer(name)`` would build, as sidecar data (same decision
    order: ``hf_tokenizer_name`` in the text config, else SigLIP by name, else CLIP BPE)."""
    config = model_config(name) if config is None else config
    text_cfg = config.get("text_cfg", {})
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    if hf_name := text_cfg.get("hf_tokenizer_name"):
        return metadata.Tokenizer(
            kind=metadata.HF_KIND,
            name=hf_name,
            context_length=context_length,
            clean=kwargs.get("clean", _default_arg(_oc_tokenizer.HFTokenizer, "clean")),
            strip_sep_token=bool(kwargs.get("strip_sep_token", False)),
            mode=text_cfg.get("tokenizer_mode"),
        )
    lowered = name.lower()
    if "siglip" in lowered:  # open_clip factory.get_tokenizer's variant rule
        variant = "gemma" if "siglip2" in lowered else "mc4" if "i18n" in lowered else "c4-en"
        return metadata.Tokenizer(kind=metadata.SIGLIP_KIND, name=variant, context_length=context_length)
    return metadata.Tokenizer(
        kind=metadata.CLIP_BPE_KIND,
        vocab=CLIP_BPE_VOCAB.name,
        context_length=context_length,
        clean=kwargs.get("clean", _default_arg(_oc_tokenizer.SimpleTokenizer, "clean")),
    )


def _square(size: Any, what: str) -> int:
    if isinstance(size, (tuple, list)):
        if len(size) != MATRIX_NDIM or size[0] != size[1]:
            raise ValueError(f"{what}: only square images are supported, got size {tuple(size)}")
        size = size[0]
    return int(size)


def preprocess_spec(model: torch.nn.Module) -> metadata.PreprocessSpec:
    """``open_clip.get_model_preprocess_cfg(model)`` as sidecar data."""
    return metadata.PreprocessSpec.from_open_clip(open_clip.get_model_preprocess_cfg(model))


def offline_tokenizer(name: str, spec: metadata.Tokenizer) -> Any:
    """open_clip's tokenizer of model ``name`` as ``spec`` describes it, from local files only: the
    CLIP BPE vocabulary open_clip ships, or a Hugging Face tokenizer already in the local Hugging Face
    cache (never the network). TokenizerUnavailableError says how to get it, or to do without text."""
    without_text = "or export the image tower only (--no-text; text=False in Python)"
    if spec.kind == metadata.SIGLIP_KIND:
        raise TokenizerUnavailableError(
            f"model {name!r}: open_clip's SigLIP tokenizer ({spec.name!r}) downloads its vocabulary on "
            f"every use, so it cannot be saved into a bundle: {without_text}"
        )
    kwargs: dict[str, Any] = {"context_length": spec.context_length}
    if spec.kind == metadata.HF_KIND:
        kwargs["local_files_only"] = True  # passed through to AutoTokenizer.from_pretrained
    try:
        return open_clip.get_tokenizer(name, **kwargs)
    except ImportError as e:
        raise TokenizerUnavailableError(
            f"model {name!r}: its {spec.kind} tokenizer needs a package that is missing ({e}): "
            f"pip install transformers, {without_text}"
        ) from e
    except (OSError, ValueError) as e:
        if spec.kind != metadata.HF_KIND:
            raise TokenizerUnavailableError(f"model {name!r}: its tokenizer cannot be loaded ({e})") from e
        from huggingface_hub import constants

        raise TokenizerUnavailableError(
            f"model {name!r}: the text tower needs the Hugging Face tokenizer {spec.name!r}, which is not "
            f"in the local Hugging Face cache ({constants.HF_HUB_CACHE}). Fetch it once where "
            'huggingface.co can be reached: python -c "from transformers import AutoTokenizer; '
            f"AutoTokenizer.from_pretrained('{spec.name}')\" (every bundle exported afterwards carries "
            f"its files), {without_text}"
        ) from e


def require_offline_tokenizer(name: str) -> None:
    """``offline_tokenizer``'s check for model ``name`` before its weights are loaded."""
    config = model_config(name)
    context = int(config["text_cfg"].get("context_length", _oc_tokenizer.DEFAULT_CONTEXT_LENGTH))
    offline_tokenizer(name, tokenizer_spec(name, context, config))


# --- loading ---------------------------------------------------------------------------------------------


class _DropRandomInitNotice(logging.Filter):
    """open_clip logs "initialized randomly" when created without weights; ours come right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    root, f = logging.getLogger(), _DropRandomInitNotice()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


@dataclass
class LoadedModel:
    """An open_clip model in fp32 (eval mode, CPU) and what the sidecar needs to know about it."""

    name: str
    model: torch.nn.Module
    image_size: int
    context_length: int
    preprocess: metadata.PreprocessSpec
    tokenizer: metadata.Tokenizer
    weights: metadata.Weights
    create_kwargs: dict[str, Any] = field(repr=False)

    def model_in(self, precision: str) -> torch.nn.Module:
        """This model in ``precision``: ``fp32`` is ``self.model``; ``fp16`` is open_clip's
        ``precision='fp16'`` model (fp16 weights, ``LayerNormFp32``) holding the same weights."""
        if precision == "fp32":
            return self.model
        if precision != "fp16":
            raise ValueError(f"precision must be one of {list(metadata.PRECISIONS)}, got {precision!r}")
        with _quiet_random_init():
            lp = open_clip.create_model(self.name, precision=precision, **self.create_kwargs)
        _fit_state_dict(lp, self.model.state_dict(), self.name, f"the fp32 {self.name} model")
        return lp.eval()

    def open_clip_tokenizer(self) -> Any:
        """open_clip's own tokenizer for this model, from local files only (see ``offline_tokenizer``)."""
        return offline_tokenizer(self.name, self.tokenizer)


def _download_pretrained(name: str, tag: str, cache_dir: str | None) -> tuple[Path, dict[str, Any]]:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"unknown pretrained tag {tag!r} for model {name!r}; its tags: {known}")
    try:
        path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as e:  # hub / HTTP / offline-mode errors come in many types; all mean the same here
        raise PretrainedUnavailableError(
            f"could not download the weights of {name!r} pretrained={tag!r} ({type(e).__name__}: {e}); "
            "without network access, fetch the file elsewhere and pass it as weights (--weights FILE)"
        ) from e
    if not path:
        raise PretrainedUnavailableError(f"pretrained tag {tag!r} of {name!r} names no download location")
    return Path(path), cfg


def load_model(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    pretrained: str | None = None,
    random_weights: bool = False,
    image_size: int | None = None,
    seed: int = DEFAULT_SEED,
    cache_dir: str | None = None,
) -> LoadedModel:
    """Create open_clip model ``name`` (fp32, eval, CPU) with exactly one source of weights.

    - ``weights``: a local checkpoint (see ``read_checkpoint``). Its position embeddings fix the
      image size and the text context length; ``image_size`` may override the former (open_clip
      then interpolates the position embeddings, as ``create_model(force_image_size=...)`` does).
      Preprocessing is open_clip's default for a weights file (OpenAI mean/std, bicubic, shortest).
    - ``pretrained``: an open_clip pretrained tag, downloaded (PretrainedUnavailableError offline);
      preprocessing from the tag, as open_clip does.
    - ``random_weights``: seeded random initialization, with a RandomWeightsWarning. Tests only.
    """
    given = [
        s
        for s, v in (("weights", weights), ("pretrained", pretrained), ("random_weights", random_weights))
        if v
    ]
    if len(given) != 1:
        raise WeightsRequiredError(
            f"model {name!r}: pass exactly one of weights=FILE, pretrained=TAG or random_weights=True "
            f"(tests only), got {given or 'none'}"
        )
    config = model_config(name)
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")

    sd: dict[str, torch.Tensor] | None = None
    force_preprocess: dict[str, Any] = {}
    if pretrained:
        path, tag_cfg = _download_pretrained(name, pretrained, cache_dir)
        model_gelu, tag_gelu = bool(config.get("quick_gelu", False)), bool(tag_cfg.get("quick_gelu", False))
        if model_gelu != tag_gelu:
            # open_clip.create_model warns the same and keeps the config's activation.
            warnings.warn(
                f"QuickGELU mismatch: model {name!r} has quick_gelu={model_gelu}, pretrained tag "
                f"{pretrained!r} was trained with quick_gelu={tag_gelu} (use the '{name}-quickgelu' "
                "config where one exists)",
                UserWarning,
                stacklevel=2,
            )
        # open_clip: defaults <- tag cfg, then size <- the model's image size.
        force_preprocess = {k: v for k, v in merge_preprocess_dict({}, tag_cfg).items() if k != "size"}
        sd = read_checkpoint(path)
        info = metadata.Weights(source="pretrained", name=pretrained, sha256=metadata.sha256_file(path))
    elif weights:
        sd = read_checkpoint(weights)
        info = metadata.Weights(source="file", name=Path(weights).name, sha256=metadata.sha256_file(weights))
    else:
        warnings.warn(metadata.random_weights_message(name), RandomWeightsWarning, stacklevel=2)
        info = metadata.Weights(source="random", name=None, sha256=None)

    vision_cfg, text_cfg = config["vision_cfg"], config["text_cfg"]
    ckpt_image, ckpt_context = checkpoint_geometry(sd) if sd is not None else (None, None)
    if image_size is not None and ckpt_image is not None and image_size != ckpt_image:
        warnings.warn(
            f"{info.name}: weights are for {ckpt_image} px, exporting at {image_size} px: open_clip "
            "interpolates the position embeddings (resize_pos_embed); check accuracy",
            UserWarning,
            stacklevel=2,
        )
    final_image = image_size or ckpt_image or _square(vision_cfg.get("image_size", 224), name)
    final_context = ckpt_context or int(text_cfg.get("context_length", _oc_tokenizer.DEFAULT_CONTEXT_LENGTH))
    create_kwargs: dict[str, Any] = {
        "force_image_size": final_image if final_image != vision_cfg.get("image_size") else None,
        "force_context_length": final_context if final_context != text_cfg.get("context_length") else None,
        "force_preprocess_cfg": force_preprocess or None,
    }
    with _quiet_random_init(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, precision="fp32", **create_kwargs)
    if sd is not None:
        _fit_state_dict(model, sd, name, info.name or name)
        del sd
    model.eval()
    return LoadedModel(
        name=name,
        model=model,
        image_size=_square(model.visual.image_size, name),
        context_length=final_context,
        preprocess=preprocess_spec(model),
        tokenizer=tokenizer_spec(name, final_context, config),
        weights=info,
        create_kwargs=create_kwargs,
    )
