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
from .engines import (
    BF16_CHECK_TEXTS,
    CPU_PRECISIONS,
    ENGINE_CHOICES,
    ONNXRUNTIME,
    OPENVINO,
    bf16_check_images,
    check_bf16,
    cpu_engine_name,
)
from .metadata import PreprocessSpec
from .preprocess import preprocess
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
    engine: str = "custom"  # what runs the towers: "tensorrt", "onnxruntime", "openvino", "torch", "custom"
    precision: str = "fp32"  # the engines' arithmetic: "fp32", "fp16" or "bf16"


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


def _run_precision(requested: str | None, exported: str, path: Path) -> str:
    """The arithmetic a bundle's towers run in: ``requested`` (None: as exported), where it can be."""
    if requested is None or requested == exported:
        return exported
    choices = sorted({*metadata.PRECISIONS, *CPU_PRECISIONS})
    if requested not in choices:
        raise ValueError(f"precision must be one of {choices}, got {requested!r}")
    if requested == "bf16" and exported == "fp32":
        return requested
    raise ValueError(
        f"{path} was exported in {exported}: it runs in {exported}"
        + (" (bf16 runs fp32 bundles)" if requested == "bf16" else "")
    )


def load_bundle(
    path: Path, device: str, threads: int | None, *, engine: str = "auto", precision: str | None = None
) -> Towers:
    """Engines + preprocessing + tokenizer from an exported bundle (plan, ONNX or sidecar path).

    ``engine`` chooses what runs the ONNX towers ("auto": :func:`engines.cpu_engine_name`'s rule on
    the CPU); ``precision`` "bf16" runs an fp32 bundle in bf16 on the CPU (OpenVINO), each tower
    checked against fp32 when it is made (see :func:`engines.check_bf16`)."""
    kind, index = parse_device(device)
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {list(ENGINE_CHOICES)}, got {engine!r}")
    # OpenVINO and bf16 run on the CPU only.
    cpu_only = engine == OPENVINO or precision == "bf16"
    if cpu_only and kind == "cuda":
        raise ValueError(
            f"engine={engine!r}, precision={precision!r} run on the CPU: use device='cpu' (or 'auto'), or "
            "a TensorRT .plan on the GPU, which runs in the precision it was exported in"
        )
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
            image_tower.plan is not None
            and kind != "cpu"
            and not cpu_only
            and (kind == "cuda" or _C.cuda_device_count() > 0)
        )
        path = meta.path(image_tower.plan if use_plan else image_tower.onnx)
        suffix = path.suffix.lower()
    plan = suffix == metadata.PLAN_SUFFIX
    precision = _run_precision(precision, meta.precision if meta is not None else "fp32", path)

    if plan:
        if kind == "cpu":
            raise ValueError(f"{path}: TensorRT plans run on CUDA devices; use the .onnx with device='cpu'")
        if engine != "auto" or precision == "bf16":
            raise ValueError(
                f"{path}: a TensorRT plan runs on TensorRT in the precision it was exported in; engine= "
                "and precision='bf16' choose how the .onnx runs on the CPU"
            )
        engine = "tensorrt"

        def make(p: Path, tower: str) -> _C.Engine:
            return _C.TrtEngine(p, device=index, search_dirs=trt_library.search_dirs())
    else:
        if kind == "auto":
            from .engines import cuda_provider_available

            use_cuda = not cpu_only and _C.cuda_device_count() > 0 and cuda_provider_available()
            kind = "cuda" if use_cuda else "cpu"
        if kind == "cuda":
            check_cuda(index)
            engine = ONNXRUNTIME
        else:
            engine = cpu_engine_name(engine, precision)

        def make(p: Path, tower: str) -> _C.Engine:
            from .engines import OnnxEngine, cpu_engine

            batch = meta.towers[tower].batch if meta is not None and tower in meta.towers else None
            if kind == "cuda":
                return OnnxEngine(p, device=kind, device_index=index, precision=precision, batch=batch)
            return cpu_engine(p, engine=engine, precision=precision, threads=threads, batch=batch)

    image = make(path, "image")
    paths = metadata.bundle_paths(path)
    text_path: Path | None = (paths.plan if plan else paths.onnx)["text"]
    if meta is not None:
        text_tower = meta.towers.get("text")
        text_file = None if text_tower is None else (text_tower.plan if plan else text_tower.onnx)
        text_path = meta.path(text_file) if text_file else None

    engine_size, engine_dim = image.info.inputs[0].shape[-1], image.info.outputs[0].shape[1]
    if meta is not None and (meta.preprocess.size, meta.embed_dim) != (engine_size, engine_dim):
        raise EngineError(
            f"{sidecar} does not describe {path}: it says {meta.preprocess.size} px -> "
            f"{meta.embed_dim}-d, the engine takes {engine_size} px -> {engine_dim}-d (a stale sidecar?)"
        )
    if meta is None:
        warnings.warn(
            f"{path}: no sidecar {sidecar.name}; preprocessing uses open_clip's defaults at {engine_size} "
            "px (OpenAI mean/std, bicubic, 'shortest') and text, if any, the CLIP BPE tokenizer: check they "
            "match",
            UserWarning,
            stacklevel=3,
        )
    spec = meta.preprocess if meta is not None else PreprocessSpec(size=engine_size)

    def tokenizer_spec(text_engine: _C.Engine) -> metadata.Tokenizer | None:
        """The sidecar's tokenizer; without a sidecar, CLIP BPE at the text tower's context length."""
        if meta is not None:
            return meta.tokenizer
        shape = text_engine.info.inputs[0].shape
        context = shape[1] if len(shape) > 1 else DEFAULT_CONTEXT_LENGTH
        return metadata.Tokenizer(metadata.CLIP_BPE_KIND, context, vocab=CLIP_BPE_VOCAB_FILE)

    if precision == "bf16":
        check_bf16(image, path, preprocess(bf16_check_images(), spec), threads=threads)

    def make_text() -> _C.Engine:
        text_engine = make(text_path, "text")
        if precision == "bf16" and (token_spec := tokenizer_spec(text_engine)) is not None:
            ids = load_tokenizer(token_spec, sidecar.parent)(list(BF16_CHECK_TEXTS))
            check_bf16(text_engine, text_path, ids.astype(text_engine.info.inputs[0].dtype), threads=threads)
        return text_engine

    # The text tower and tokenizer are made on first use, once.
    text = functools.cache(make_text) if text_path and text_path.is_file() else None
    tokenizer = None
    if meta is not None and meta.tokenizer is not None:
        tokenizer = functools.partial(load_tokenizer, meta.tokenizer, sidecar.parent)
    elif meta is None and text is not None:
        tokenizer = lambda: load_tokenizer(tokenizer_spec(text()), sidecar.parent)  # noqa: E731
    scale, bias = (meta.logit_scale, meta.logit_bias) if meta is not None else (None, None)
    name = meta.model if meta is not None else path.stem
    kinds = {"meta": meta, "engine": engine, "precision": precision}
    return Towers(image, text, spec, tokenizer, engine_dim, name, scale, bias, **kinds)


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
    kinds = {"engine": "torch", "precision": precision}
    return Towers(image, text, loaded.preprocess, tokenizer, embed_dim, model, scale, bias, **kinds)
