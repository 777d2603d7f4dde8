"""What an Encoder runs, loaded from an exported bundle or from an open_clip model (in PyTorch).

A bundle is named by its stem (``vith``) or any of its files (``vith.json``, ``vith.plan``,
``vith.onnx``, ``vith.text.onnx``, ...). Named by its stem, sidecar or another file, it runs on the
best engine the device has: its TensorRT plan where a CUDA device and TensorRT's runtime load, else
its ONNX towers (under ONNX Runtime's CUDA provider on a GPU where onnxruntime-gpu has it, else on
the CPU under the engine :func:`engines.cpu_engine_name` picks: OpenVINO or ONNX Runtime). Naming
``vith.plan`` or ``vith.onnx`` asks for that kind of engine. The sidecar gives the
preprocessing, tokenizer, logit scale and batch profile; without one (an engine from elsewhere) the
input size comes from the engine, preprocessing is open_clip's default and text, if any, the CLIP
BPE tokenizer, with a warning. Loading a bundle never goes to the network. On several devices
(``device="cuda:0,1"``, ...) the image tower is loaded once per device, the text tower on the first
one only.
"""

from __future__ import annotations

import copy
import functools
import shlex
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _C, metadata, trt_library
from ._C import EngineError
from .devices import check_cuda, parse_devices, thread_shares
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

# The files of a bundle besides the image tower and sidecar, named after its stem as well.
_OTHER_SUFFIXES = (
    metadata.TEXT_STEM + metadata.ONNX_SUFFIX + ".data",
    metadata.ONNX_SUFFIX + ".data",
    metadata.TEXT_STEM + metadata.PLAN_SUFFIX,
    metadata.TEXT_STEM + metadata.ONNX_SUFFIX,
    ".tokenizer",
)
_ENGINE_SUFFIXES = (metadata.PLAN_SUFFIX, metadata.ONNX_SUFFIX)


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
    engine: str = "custom"  # what runs the towers: "tensorrt", "onnxruntime", "openvino", "torch", "custom"
    precision: str = "fp32"  # the engines' arithmetic: "fp32", "fp16" or "bf16"
    # How to open the same model again (the provenance's ``source``): {"bundle": "/abs/vith.json"},
    # or {"model": NAME, "pretrained": TAG | "weights": PATH | "random_weights": True, ...}.
    source: Mapping[str, Any] | None = None
    # What identifies the weights (``Encoder.provenance``): their sha256 where the sidecar records
    # it; else the image engine's files, whose sha256 then tells engines apart.
    weights_sha256: str | None = None
    engine_files: tuple[Path, ...] = ()


def model_source(
    model: str,
    *,
    pretrained: str | None = None,
    weights: str | Path | None = None,
    random_weights: bool = False,
    image_size: int | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """``Towers.source`` of a model opened by name: the keyword arguments that open it again
    (``Encoder.from_pretrained(**source)``)."""
    source: dict[str, Any] = {"model": model}
    if pretrained:
        source["pretrained"] = pretrained
    elif weights:
        source["weights"] = str(Path(weights).expanduser().resolve())
    elif random_weights:
        source["random_weights"] = True
    if image_size:
        source["image_size"] = image_size
    return {**source, "precision": precision}


def tensorrt_unavailable_reason(device: str | Sequence[str]) -> str | None:
    """Why a TensorRT plan cannot run on ``device`` (each of several) here, or None when it can (CUDA
    devices, a build with TensorRT, and TensorRT's runtime library loads)."""
    devices = parse_devices(device)
    if devices.kind == "cpu":
        return "the device is the CPU"
    for index in devices.indices:
        if _C.cuda_device_count() <= index:
            return _C.cuda_unavailable_reason() or f"there is no CUDA device {index}"
    if not _C.build_info()["tensorrt"]:
        return "nvclip_fast was built without TensorRT"
    try:
        trt_library.load()
    except EngineError as e:
        return str(e)
    return None


@dataclass(frozen=True)
class BundleFiles:
    """A bundle as found on disk: ``stem`` (folder / stem), the sidecar and its contents (or None),
    the image tower's plan and ONNX where they exist, and ``named``: the engine file the caller
    named, or None when the bundle was named by its stem, sidecar or another file."""

    stem: Path
    sidecar: Path | None
    meta: metadata.Metadata | None
    plan: Path | None
    onnx: Path | None
    named: Path | None


def locate_bundle(name: str | Path) -> BundleFiles:
    """Find the bundle ``name`` names; FileNotFoundError saying what exists and how to go on."""
    path = Path(name)
    lower = path.name.lower()
    suffix = next(
        (s for s in (*_OTHER_SUFFIXES, *_ENGINE_SUFFIXES, metadata.SIDECAR_SUFFIX) if lower.endswith(s)), ""
    )
    paths = metadata.bundle_paths(path.with_name(path.name[: len(path.name) - len(suffix)] + ".onnx"))
    stem = paths.directory / paths.stem
    sidecar = paths.sidecar if paths.sidecar.is_file() else None
    meta = metadata.load(sidecar) if sidecar is not None else None
    image = meta.towers["image"] if meta is not None else None
    plan = meta.path(image.plan) if image is not None and image.plan else paths.plan["image"]
    onnx = meta.path(image.onnx) if image is not None else paths.onnx["image"]
    files = BundleFiles(
        stem,
        sidecar,
        meta,
        plan if plan.is_file() else None,
        onnx if onnx.is_file() else None,
        path if suffix in _ENGINE_SUFFIXES else None,
    )
    if files.named is not None and not path.is_file():
        raise FileNotFoundError(_missing_engine_message(path, files))
    if files.sidecar is None and files.plan is None and files.onnx is None:
        looked = ", ".join(f"{stem.name}{s}" for s in (metadata.SIDECAR_SUFFIX, *_ENGINE_SUFFIXES))
        raise FileNotFoundError(f"{name}: no such file (no bundle there: looked for {looked})")
    return files


def _missing_engine_message(path: Path, files: BundleFiles) -> str:
    message = f"{path}: no such file"
    if path.suffix.lower() == metadata.PLAN_SUFFIX and files.onnx is not None:
        message += (
            f". Bundle {files.stem.name} has no TensorRT plan, only its ONNX towers ({files.onnx.name}). "
            f"Run them with ONNX Runtime: -m {files.stem} (the best engine on this machine) "
            f"or -m {files.onnx}"
        )
        if files.meta is not None:
            from .trt_build import engine_specs, trtexec_command

            specs = engine_specs(files.meta, metadata.bundle_paths(path))
            commands = "\n".join("  " + shlex.join(trtexec_command(s)) for s in specs.values())
            message += f"; or build the plans where TensorRT runs, then use -m {path}:\n{commands}"
    elif path.suffix.lower() == metadata.ONNX_SUFFIX and files.plan is not None:
        message += (
            f". Bundle {files.stem.name} has only its TensorRT plan ({files.plan.name}): "
            f"-m {files.stem} or -m {files.plan} runs it on a GPU with TensorRT"
        )
    return message


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


def cpu_only(engine: str, precision: str | None) -> bool:
    """Whether ``engine`` / ``precision`` run on the CPU only (OpenVINO, and bf16 on it); ValueError
    for an engine that is not one of ``engines.ENGINE_CHOICES``."""
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {list(ENGINE_CHOICES)}, got {engine!r}")
    return engine == OPENVINO or precision == "bf16"


def load_bundle(
    path: str | Path,
    device: str | Sequence[str],
    threads: int | None,
    *,
    engine: str = "auto",
    precision: str | None = None,
) -> Towers:
    """Engines + preprocessing + tokenizer from an exported bundle (see the module docstring). CPU
    replicas share ``threads`` (None: every core).

    ``engine`` chooses what runs the ONNX towers on the CPU ("auto": :func:`engines.cpu_engine_name`'s
    rule); ``precision`` None runs them as exported, "bf16" an fp32 bundle in bf16 on the CPU
    (OpenVINO), each tower checked against fp32 when it is made (:func:`engines.check_bf16`)."""
    devices = parse_devices(device)
    kind = devices.kind
    on_cpu = cpu_only(engine, precision)
    if on_cpu and kind == "cuda":
        raise ValueError(
            f"engine={engine!r}, precision={precision!r} run on the CPU: use device='cpu' (or 'auto'), or "
            "a TensorRT plan on the GPU, which runs in the precision it was exported in"
        )
    files = locate_bundle(path)
    meta, sidecar = files.meta, files.sidecar
    path = files.named
    if path is None:  # the device picks: the plan where TensorRT runs, else the ONNX towers
        # engine= other than "auto" names an ONNX engine: the .onnx then, whatever the device.
        use_plan = files.plan is not None and (
            files.onnx is None
            or (engine == "auto" and not on_cpu and tensorrt_unavailable_reason(device) is None)
        )
        path = files.plan if use_plan else files.onnx
    suffix = path.suffix.lower()
    plan = suffix == metadata.PLAN_SUFFIX
    exported = meta.precision if meta is not None else "fp32"
    precision = _run_precision(precision, exported, path)
    if meta is not None and meta.weights.source == "random":
        warnings.warn(
            metadata.random_weights_message(meta.model), metadata.RandomWeightsWarning, stacklevel=3
        )

    if plan:
        if kind == "cpu":
            raise ValueError(f"{path}: TensorRT plans run on CUDA devices; use the .onnx with device='cpu'")
        if on_cpu or engine != "auto":
            raise ValueError(
                f"{path}: a TensorRT plan runs on TensorRT in the precision it was exported in; engine= "
                "and precision='bf16' choose how the .onnx runs on the CPU"
            )
        engine = "tensorrt"

        def make(p: Path, tower: str, index: int, threads: int | None) -> _C.Engine:
            return _C.TrtEngine(p, device=index, search_dirs=trt_library.search_dirs())
    else:
        if kind == "auto":
            from .engines import cuda_provider_available

            use_cuda = not on_cpu and _C.cuda_device_count() > 0 and cuda_provider_available()
            kind = "cuda" if use_cuda else "cpu"
        if kind == "cuda":
            for index in devices.indices:
                check_cuda(index)
            engine = ONNXRUNTIME
        else:
            engine = cpu_engine_name(engine, precision)

        def make(p: Path, tower: str, index: int, threads: int | None) -> _C.Engine:
            from .engines import OnnxEngine, cpu_engine

            batch = meta.towers[tower].batch if meta is not None and tower in meta.towers else None
            if kind == "cuda":
                return OnnxEngine(
                    p, device=kind, device_index=index, precision=precision, threads=threads, batch=batch
                )
            return cpu_engine(p, engine=engine, precision=precision, threads=threads, batch=batch)

    shares = thread_shares(threads, len(devices))
    images = tuple(make(path, "image", i, n) for i, n in zip(devices.indices, shares, strict=True))
    data = metadata.BundlePaths.data(path)
    identity = {"engine_files": (path, data) if not plan and data.is_file() else (path,)}
    source = {"bundle": str((sidecar if meta is not None else path).resolve())}
    paths = metadata.bundle_paths(path)
    text_path: Path | None = (paths.plan if plan else paths.onnx)["text"]
    if meta is not None:
        text_tower = meta.towers.get("text")
        if text_tower is None:
            text_path = None
        elif not plan or text_tower.plan:
            text_path = meta.path(text_tower.plan if plan else text_tower.onnx)
        # else: a plan the sidecar does not list (built later with the printed trtexec commands), by name

    engine_size, engine_dim = images[0].info.inputs[0].shape[-1], images[0].info.outputs[0].shape[1]
    if meta is not None and (meta.preprocess.size, meta.embed_dim) != (engine_size, engine_dim):
        raise EngineError(
            f"{sidecar} does not describe {path}: it says {meta.preprocess.size} px -> "
            f"{meta.embed_dim}-d, the engine takes {engine_size} px -> {engine_dim}-d (a stale sidecar?)"
        )
    if meta is None:
        warnings.warn(
            f"{path}: no sidecar {files.stem.name}{metadata.SIDECAR_SUFFIX}; preprocessing uses open_clip's "
            f"defaults at {engine_size} px (OpenAI mean/std, bicubic, 'shortest') and text, if any, the CLIP "
            "BPE tokenizer: check they match",
            UserWarning,
            stacklevel=3,
        )
    spec = meta.preprocess if meta is not None else PreprocessSpec(size=engine_size)
    tokenizer_dir = sidecar.parent if sidecar is not None else path.parent  # its files are relative to it

    def tokenizer_spec(text_engine: _C.Engine) -> metadata.Tokenizer | None:
        """The sidecar's tokenizer; without a sidecar, CLIP BPE at the text tower's context length."""
        if meta is not None:
            return meta.tokenizer
        shape = text_engine.info.inputs[0].shape
        context = shape[1] if len(shape) > 1 else DEFAULT_CONTEXT_LENGTH
        return metadata.Tokenizer(metadata.CLIP_BPE_KIND, context, vocab=CLIP_BPE_VOCAB_FILE)

    if precision == "bf16":  # every replica is the same compilation of the same file: one check
        check_bf16(images[0], path, preprocess(bf16_check_images(), spec), threads=shares[0])

    bf16_text_refused: list[EngineError] = []  # the text tower failed its bf16 check: for good

    def make_text() -> _C.Engine:  # on the first device
        if bf16_text_refused:
            raise bf16_text_refused[0]
        text_engine = make(text_path, "text", devices.indices[0], threads)
        if precision == "bf16" and (token_spec := tokenizer_spec(text_engine)) is not None:
            ids = load_tokenizer(token_spec, tokenizer_dir)(list(BF16_CHECK_TEXTS))
            ids = ids.astype(text_engine.info.inputs[0].dtype)
            try:
                check_bf16(text_engine, text_path, ids, threads=threads)
            except EngineError as e:
                bf16_text_refused.append(e)
                raise
        return text_engine

    # The text tower and tokenizer are made on first use, once.
    text = functools.cache(make_text) if text_path and text_path.is_file() else None
    tokenizer = None
    if meta is not None and meta.tokenizer is not None:
        tokenizer = functools.partial(load_tokenizer, meta.tokenizer, tokenizer_dir)
    elif meta is None and text is not None:
        tokenizer = lambda: load_tokenizer(tokenizer_spec(text()), tokenizer_dir)  # noqa: E731
    scale, bias = (meta.logit_scale, meta.logit_bias) if meta is not None else (None, None)
    name = meta.model if meta is not None else path.stem
    if precision != exported:  # bf16: the same bundle, run in bf16
        source["precision"] = precision
    kinds = {"meta": meta, "engine": engine, "precision": precision, "source": source}
    if meta is not None:
        kinds["weights_sha256"] = meta.weights.sha256
    return Towers(images, text, spec, tokenizer, engine_dim, name, scale, bias, **kinds, **identity)


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
    source = model_source(
        model,
        pretrained=pretrained,
        weights=weights,
        random_weights=random_weights,
        image_size=image_size,
        precision=precision,
    )
    kinds = {"engine": "torch", "precision": precision, "source": source}
    kinds["weights_sha256"] = loaded.weights.sha256
    return Towers(images, text, loaded.preprocess, tokenizer, embed_dim, model, scale, bias, **kinds)
