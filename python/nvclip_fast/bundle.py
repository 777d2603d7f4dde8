"""What an Encoder runs, loaded from an exported bundle or from an open_clip model (in PyTorch).

``vith.plan``, ``vith.onnx`` and ``vith.json`` name the same bundle. Its sidecar gives the
preprocessing, tokenizer, logit scale and batch profile; without one (an engine from elsewhere) the
input size comes from the engine, preprocessing is open_clip's default and text, if any, the CLIP
BPE tokenizer, with a warning. On several devices (``devices``) the image tower is loaded once per
device, the text tower on the first one only.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _C, metadata, trt_library
from ._C import EngineError
from .devices import check_cuda, parse_devices, thread_shares
from .metadata import PreprocessSpec
from .tokenizer import CLIP_BPE_VOCAB_FILE, DEFAULT_CONTEXT_LENGTH, Tokenizer, load_tokenizer


@dataclass(frozen=True)
class Towers:
    """What an Encoder runs: engines, preprocessing and tokenizer, from a bundle or a model. The
    text tower and tokenizer are made on first use (an image-only job never loads them)."""

    images: tuple[_C.Engine, ...]  # the image tower: one engine per device (replica)
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


def load_bundle(path: Path, device: str | Sequence[str], threads: int | None) -> Towers:
    """Engines + preprocessing + tokenizer from an exported bundle (plan, ONNX or sidecar path).
    CPU replicas share ``threads`` (None: every core)."""
    devices = parse_devices(device)
    kind = devices.kind
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

        def make(p: Path, tower: str, index: int, threads: int | None) -> _C.Engine:
            return _C.TrtEngine(p, device=index, search_dirs=trt_library.search_dirs())
    else:
        if kind == "auto":
            from .engines import cuda_provider_available

            kind = "cuda" if _C.cuda_device_count() > 0 and cuda_provider_available() else "cpu"
        if kind == "cuda":
            for index in devices.indices:
                check_cuda(index)

        def make(p: Path, tower: str, index: int, threads: int | None) -> _C.Engine:
            from .engines import OnnxEngine

            batch = meta.towers[tower].batch if meta is not None and tower in meta.towers else None
            return OnnxEngine(
                p, device=kind, device_index=index, precision=precision, threads=threads, batch=batch
            )

    shares = thread_shares(threads, len(devices))
    images = tuple(make(path, "image", i, n) for i, n in zip(devices.indices, shares, strict=True))
    paths = metadata.bundle_paths(path)
    text_path: Path | None = (paths.plan if plan else paths.onnx)["text"]
    if meta is not None:
        text_tower = meta.towers.get("text")
        text_file = None if text_tower is None else (text_tower.plan if plan else text_tower.onnx)
        text_path = meta.path(text_file) if text_file else None
    # Made on first use, once (the tokenizer of a bundle without sidecar reads its context length).
    first = devices.indices[0]
    text = (
        functools.cache(lambda: make(text_path, "text", first, threads))
        if text_path and text_path.is_file()
        else None
    )

    engine_size, engine_dim = images[0].info.inputs[0].shape[-1], images[0].info.outputs[0].shape[1]
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
        kinds = {"meta": meta, "engine": engine, "precision": precision}
        return Towers(images, text, meta.preprocess, tokenizer, engine_dim, meta.model, scale, bias, **kinds)

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
        images, text, spec, bare_tokenizer, engine_dim, path.stem, engine=engine, precision=precision
    )


def load_open_clip(
    model: str,
    *,
    weights: Any,
    pretrained: str | None,
    random_weights: bool,
    image_size: int | None,
    device: str | Sequence[str],
    precision: str,
    max_batch: int | None,
) -> Towers:
    """An open_clip model's towers run in PyTorch (``device`` "auto": CUDA where torch has it)."""
    import torch

    from . import models
    from .engines import TorchEngine

    devices = parse_devices(device)
    kind = devices.kind
    if kind == "auto":
        kind = "cuda" if _C.cuda_device_count() > 0 and torch.cuda.is_available() else "cpu"
    if precision not in metadata.PRECISIONS:
        raise ValueError(f"precision must be one of {list(metadata.PRECISIONS)}, got {precision!r}")
    if kind == "cuda":
        for index in devices.indices:
            check_cuda(index)
        if not torch.cuda.is_available():
            raise EngineError(
                "device='cuda' needs a CUDA build of torch (torch.cuda.is_available() is False)"
            )
    loaded = models.load_model(
        model, weights=weights, pretrained=pretrained, random_weights=random_weights, image_size=image_size
    )
    net = loaded.model_in(precision).eval()
    embed_dim = int(models.model_config(model)["embed_dim"])
    dtype = "float16" if precision == "fp16" else "float32"
    limit = max_batch or metadata.DEFAULT_MAX_BATCH
    # One copy of the model per CUDA device (copied while in host memory); CPU replicas share the
    # one in host memory (PyTorch's CPU threads are the process's: replicas cannot split them).
    first, *others = devices.indices
    nets = {i: copy.deepcopy(net).to(torch.device(kind, i)) for i in others} if kind == "cuda" else {}
    nets[first] = net.to(torch.device(kind, first)) if kind == "cuda" else net

    def engine(tower: str, index: int, input_shape: tuple[int, ...], input_dtype: str) -> _C.Engine:
        batch = metadata.BatchProfile(1, limit, limit)
        return TorchEngine(
            nets[index],
            tower,
            embed_dim=embed_dim,
            input_shape=input_shape,
            input_dtype=input_dtype,
            device=kind,
            device_index=index,
            batch=batch,
        )

    size = loaded.image_size
    images = tuple(engine("image", i, (3, size, size), dtype) for i in devices.indices)

    def text() -> _C.Engine:
        return engine("text", first, (loaded.context_length,), "int64")

    with torch.no_grad():
        scale = float(net.logit_scale.exp()) if getattr(net, "logit_scale", None) is not None else None
        bias = float(net.logit_bias) if getattr(net, "logit_bias", None) is not None else None
    tokenizer = functools.partial(load_tokenizer, loaded.tokenizer)
    kinds = {"engine": "torch", "precision": precision}
    return Towers(images, text, loaded.preprocess, tokenizer, embed_dim, model, scale, bias, **kinds)
