"""What an Encoder runs, loaded from an exported bundle or from an open_clip model (in PyTorch).

``vith.plan``, ``vith.onnx`` and ``vith.json`` name the same bundle. Its sidecar gives the
preprocessing, tokenizer, logit scale and batch profile; without one (an engine from elsewhere) the
input size comes from the engine, preprocessing is open_clip's default and text, if any, the CLIP
BPE tokenizer, with a warning.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _C, metadata, trt_library
from ._C import EngineError
from .metadata import PreprocessSpec
from .tokenizer import CLIP_BPE_VOCAB_FILE, DEFAULT_CONTEXT_LENGTH, Tokenizer, load_tokenizer


@dataclass(frozen=True)
class Towers:
    """What an Encoder runs: engines, preprocessing and tokenizer, from a bundle or a model. The
    text tower and tokenizer are made on first use (an image-only job never loads them)."""

    image: _C.Engine
    text: Callable[[], _C.Engine] | None
    spec: PreprocessSpec
    tokenizer: Callable[[], Tokenizer] | None
    embed_dim: int
    name: str
    logit_scale: float | None = None
    logit_bias: float | None = None
    meta: metadata.Metadata | None = None
    engine: str = "custom"  # what runs the towers: "tensorrt", "onnxruntime", "torch", or "custom"
    precision: str = "fp32"  # the engines' arithmetic: "fp32" or "fp16"
    # Provenance (``Encoder.provenance``): the weights' sha256 where known; else the image engine's
    # files, whose sha256 then tells engines apart; how to open the same model again (``source``:
    # {"bundle": path}, {"model": name, "pretrained"|"weights"|"random_weights": ...}).
    weights_sha256: str | None = None
    engine_files: tuple[Path, ...] = ()
    source: dict[str, Any] | None = None


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` -> (kind, index); auto stays ``"auto"``."""
    if device in ("auto", "cpu"):
        return device, 0
    kind, _, index = device.partition(":")
    if kind == "cuda" and (index == "" or index.isdigit()):
        return "cuda", int(index or 0)
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def check_cuda(index: int) -> None:
    count = _C.cuda_device_count()
    if count == 0:
        raise EngineError(
            f"device 'cuda:{index}' requested but no CUDA device is usable: {_C.cuda_unavailable_reason()}"
        )
    if index >= count:
        raise EngineError(f"device 'cuda:{index}' requested but only {count} CUDA device(s) are visible")


def load_bundle(path: Path, device: str, threads: int | None) -> Towers:
    """Engines + preprocessing + tokenizer from an exported bundle (plan, ONNX or sidecar path)."""
    kind, index = parse_device(device)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (metadata.PLAN_SUFFIX, metadata.ONNX_SUFFIX, metadata.SIDECAR_SUFFIX):
        raise ValueError(f"{path}: expected a .plan (TensorRT), .onnx (ONNX Runtime) or .json (sidecar) file")
    sidecar = path if suffix == metadata.SIDECAR_SUFFIX else metadata.bundle_paths(path).sidecar
    meta = metadata.load(sidecar) if sidecar.is_file() else None
    if suffix == metadata.SIDECAR_SUFFIX:
        image_tower = meta.towers["image"]
        use_plan = (
            image_tower.plan is not None and kind != "cpu" and (kind == "cuda" or _C.cuda_device_count() > 0)
        )
        path = meta.path(image_tower.plan if use_plan else image_tower.onnx)
        suffix = path.suffix.lower()
    plan = suffix == metadata.PLAN_SUFFIX
    engine = "tensorrt" if plan else "onnxruntime"
    precision = meta.precision if meta is not None else "fp32"

    if plan:
        if kind == "cpu":
            raise ValueError(f"{path}: TensorRT plans run on CUDA devices; use the .onnx with device='cpu'")

        def make(p: Path, tower: str) -> _C.Engine:
            return _C.TrtEngine(p, device=index, search_dirs=trt_library.search_dirs())
    else:
        if kind == "auto":
            from .engines import cuda_provider_available

            kind = "cuda" if _C.cuda_device_count() > 0 and cuda_provider_available() else "cpu"
        if kind == "cuda":
            check_cuda(index)

        def make(p: Path, tower: str) -> _C.Engine:
            from .engines import OnnxEngine

            batch = meta.towers[tower].batch if meta is not None and tower in meta.towers else None
            return OnnxEngine(
                p, device=kind, device_index=index, precision=precision, threads=threads, batch=batch
            )

    image = make(path, "image")
    data = metadata.BundlePaths.data(path)
    identity: dict[str, Any] = {
        "engine_files": (path, data) if not plan and data.is_file() else (path,),
        "source": {"bundle": str((sidecar if meta is not None else path).resolve())},
    }
    paths = metadata.bundle_paths(path)
    text_path: Path | None = (paths.plan if plan else paths.onnx)["text"]
    if meta is not None:
        text_tower = meta.towers.get("text")
        text_file = None if text_tower is None else (text_tower.plan if plan else text_tower.onnx)
        text_path = meta.path(text_file) if text_file else None
    # Made on first use, once (the tokenizer of a bundle without sidecar reads its context length).
    text = functools.cache(lambda: make(text_path, "text")) if text_path and text_path.is_file() else None

    engine_size, engine_dim = image.info.inputs[0].shape[-1], image.info.outputs[0].shape[1]
    if meta is not None:
        if (meta.preprocess.size, meta.embed_dim) != (engine_size, engine_dim):
            raise EngineError(
                f"{sidecar} does not describe {path}: it says {meta.preprocess.size} px -> "
                f"{meta.embed_dim}-d, the engine takes {engine_size} px -> {engine_dim}-d (a stale sidecar?)"
            )
        tokenizer = (
            None
            if meta.tokenizer is None
            else functools.partial(load_tokenizer, meta.tokenizer, sidecar.parent)
        )
        scale, bias = meta.logit_scale, meta.logit_bias
        kinds = {
            "meta": meta,
            "engine": engine,
            "precision": precision,
            "weights_sha256": meta.weights.sha256,
        }
        return Towers(
            image, text, meta.preprocess, tokenizer, engine_dim, meta.model, scale, bias, **kinds, **identity
        )

    warnings.warn(
        f"{path}: no sidecar {sidecar.name}; preprocessing uses open_clip's defaults at {engine_size} px "
        "(OpenAI mean/std, bicubic, 'shortest') and text, if any, the CLIP BPE tokenizer: check they match",
        UserWarning,
        stacklevel=3,
    )
    bare_tokenizer = None
    if text is not None:

        def bare_tokenizer() -> Tokenizer:
            shape = text().info.inputs[0].shape
            context = shape[1] if len(shape) > 1 else DEFAULT_CONTEXT_LENGTH
            spec = metadata.Tokenizer(metadata.CLIP_BPE_KIND, context, vocab=CLIP_BPE_VOCAB_FILE)
            return load_tokenizer(spec, path.parent)

    spec = PreprocessSpec(size=engine_size)
    return Towers(
        image,
        text,
        spec,
        bare_tokenizer,
        engine_dim,
        path.stem,
        engine=engine,
        precision=precision,
        **identity,
    )


def load_open_clip(
    model: str,
    *,
    weights: Any,
    pretrained: str | None,
    random_weights: bool,
    image_size: int | None,
    device: str,
    precision: str,
    max_batch: int | None,
) -> Towers:
    """An open_clip model's towers run in PyTorch (``device`` "auto": CUDA where torch has it)."""
    import torch

    from . import models
    from .engines import TorchEngine

    kind, index = parse_device(device)
    if kind == "auto":
        kind = "cuda" if _C.cuda_device_count() > 0 and torch.cuda.is_available() else "cpu"
    if precision not in metadata.PRECISIONS:
        raise ValueError(f"precision must be one of {list(metadata.PRECISIONS)}, got {precision!r}")
    if kind == "cuda":
        check_cuda(index)
        if not torch.cuda.is_available():
            raise EngineError(
                "device='cuda' needs a CUDA build of torch (torch.cuda.is_available() is False)"
            )
    loaded = models.load_model(
        model, weights=weights, pretrained=pretrained, random_weights=random_weights, image_size=image_size
    )
    net = loaded.model_in(precision)
    net = net.to(torch.device(kind, index) if kind == "cuda" else torch.device("cpu")).eval()
    embed_dim = int(models.model_config(model)["embed_dim"])
    dtype = "float16" if precision == "fp16" else "float32"
    limit = max_batch or metadata.DEFAULT_MAX_BATCH
    common = {
        "embed_dim": embed_dim,
        "device": kind,
        "device_index": index,
        "batch": metadata.BatchProfile(1, limit, limit),
    }
    image = TorchEngine(
        net, "image", input_shape=(3, loaded.image_size, loaded.image_size), input_dtype=dtype, **common
    )

    def text() -> _C.Engine:
        return TorchEngine(net, "text", input_shape=(loaded.context_length,), input_dtype="int64", **common)

    with torch.no_grad():
        scale = float(net.logit_scale.exp()) if getattr(net, "logit_scale", None) is not None else None
        bias = float(net.logit_bias) if getattr(net, "logit_bias", None) is not None else None
    tokenizer = functools.partial(load_tokenizer, loaded.tokenizer)
    source: dict[str, Any] = {"model": model}
    if pretrained:
        source["pretrained"] = pretrained
    elif weights:
        source["weights"] = str(Path(weights).resolve())
    else:
        source["random_weights"] = True
    kinds = {
        "engine": "torch",
        "precision": precision,
        "weights_sha256": loaded.weights.sha256,
        "source": source,
    }
    return Towers(image, text, loaded.preprocess, tokenizer, embed_dim, model, scale, bias, **kinds)
