"""``nvclip_fast.export``: open_clip weights -> ONNX image and text towers -> TensorRT plans, with the
metadata sidecar and a parity gate.

Stages (each reported on stderr with the elapsed time and file sizes):

1. load the model (``models.load_model``: a checkpoint, a pretrained tag, or seeded random weights),
   after checking that the text tower's tokenizer can be had from local files (a Hugging Face
   tokenizer must be in the local Hugging Face cache; ``text=False`` exports the image tower alone);
2. export each tower with torch's dynamo ONNX exporter: opset 20 (23 would emit ONNX ``Attention``,
   parsed by TensorRT only from 10.14), a dynamic batch axis traced at batch 2 (torch.export fixes
   example dims of size 1), external weights in ``<file>.data`` (ViT-H exceeds protobuf's 2 GB),
   float32 L2-normalized outputs. fp16 is open_clip's ``precision='fp16'`` model: fp16 weights,
   LayerNorm in fp32 (``LayerNormFp32``), and the final normalization done in fp32 here;
3. parity gate: each ONNX under ONNX Runtime vs open_clip's fp32 model on deterministic inputs at
   batch 1, 3 and 7 (min cosine, max |diff|; fail below 0.9999 fp32 / 0.999 fp16);
4. the sidecar (``metadata``) and the tokenizer files (so that a bundle never needs the network);
5. for a ``.plan`` target: TensorRT engines (``trt_build``), the same gate on them, sidecar updated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import open_clip
import torch
import torch.nn.functional as F
from torch.export import Dim

from . import __version__, metadata, models, trt_build
from .embed_files import progress_bar
from .metadata import BATCH_DIM, RGB_CHANNELS, BundlePaths, bundle_paths

__all__ = ["ExportError", "ParityError", "bundle_paths", "check_onnx_parity", "export"]

ONNX_OPSET = 20
EXPORT_EXAMPLE_BATCH = 2  # torch.export specializes example dims of size 0 and 1
PARITY_BATCHES = (1, 3, 7)
MIN_COS = {"fp32": 0.9999, "fp16": 0.999}
PARITY_SEED = 0
TEXT_DTYPE = "int64"  # open_clip's tokenizers return int64 ids; TensorRT 10+ takes int64 natively
IMAGE_DTYPE = "float32"  # for both precisions: an fp16 graph casts its input itself
UINT8_LEVELS = 256
# Prompts whose open_clip token ids drive the text parity check (batch b takes the first b).
PARITY_PROMPTS = (
    "a photo of a cat",
    "a diagram of a TensorRT engine, with arrows",
    "two dogs playing in the snow at dusk",
    "A RED double-decker bus on a London street!",
    "",
    "an extremely long caption " + "that keeps going " * 30,
    "数字 and emoji 🙂 in one caption",
)
ORT_WORKER = Path(__file__).with_name("_ort_worker.py")
MIB = 1 << 20


class ExportError(RuntimeError):
    """The ONNX export failed or produced a graph that breaks the sidecar's contract."""


class ParityError(RuntimeError):
    """An exported tower's outputs differ from open_clip's beyond the gate. ``results`` holds every
    check; the ONNX files are kept for inspection."""

    def __init__(self, message: str, results: Sequence[metadata.Parity] = ()) -> None:
        self.results = list(results)
        super().__init__(message)


def _size(path: Path) -> str:
    total = path.stat().st_size
    data = BundlePaths.data(path)
    extra = f" + {data.stat().st_size / MIB:.1f} MiB {data.name}" if data.exists() else ""
    return f"{path.name} ({total / MIB:.1f} MiB{extra})"


# --- the towers as modules --------------------------------------------------------------------------------


class _ImageTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixel_values.to(self.dtype)).float(), dim=-1)


class _TextTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(input_ids).float(), dim=-1)


_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
}
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _value_spec(value: onnx.ValueInfoProto, where: str) -> tuple[str, tuple[int | str, ...]]:
    t = value.type.tensor_type
    dims = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim)
    if t.elem_type not in _ONNX_DTYPES:
        raise ExportError(f"{where}: unexpected element type {onnx.TensorProto.DataType.Name(t.elem_type)}")
    return _ONNX_DTYPES[t.elem_type], dims


def _export_tower(
    module: torch.nn.Module, example: torch.Tensor, path: Path, names: tuple[str, str], max_batch: int
) -> tuple[metadata.TensorSpec, metadata.TensorSpec]:
    """Export one tower and hold the graph to the contract: names, dtypes, a dynamic batch axis."""
    input_name, output_name = names
    batch = Dim(BATCH_DIM, min=1, max=max(max_batch, EXPORT_EXAMPLE_BATCH))
    try:
        # The exporter prints its own progress on stdout; stdout stays for results, so move it to stderr.
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=True,
                external_data=True,
                opset_version=ONNX_OPSET,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
    except Exception as e:  # torch.export / onnxscript raise many types; the message is what helps
        raise ExportError(f"ONNX export to {path} failed: {type(e).__name__}: {e}") from e
    graph = onnx.load(str(path), load_external_data=False).graph
    if [i.name for i in graph.input] != [input_name] or [o.name for o in graph.output] != [output_name]:
        raise ExportError(
            f"{path}: expected input {input_name!r} and output {output_name!r}, got "
            f"{[i.name for i in graph.input]} and {[o.name for o in graph.output]}"
        )
    in_dtype, in_dims = _value_spec(graph.input[0], f"{path} input")
    out_dtype, out_dims = _value_spec(graph.output[0], f"{path} output")
    for what, dims in (("input", in_dims), ("output", out_dims)):
        if not dims or not isinstance(dims[0], str):
            raise ExportError(f"{path}: the {what}'s batch axis was fixed to {dims[:1]} (shape {list(dims)})")
    if out_dtype != metadata.OUTPUT_DTYPE:
        raise ExportError(f"{path}: output dtype {out_dtype}, expected {metadata.OUTPUT_DTYPE}")
    return (
        metadata.TensorSpec(input_name, in_dtype, (BATCH_DIM, *in_dims[1:])),
        metadata.TensorSpec(output_name, out_dtype, (BATCH_DIM, *out_dims[1:])),
    )


# --- parity -------------------------------------------------------------------------------------------------


def parity_images(preprocess: metadata.PreprocessSpec, batch: int, seed: int = PARITY_SEED) -> np.ndarray:
    """Deterministic model inputs: random uint8 pixels at the model size, normalized as open_clip
    does (``/255``, ``- mean``, ``/ std`` in float32)."""
    rng = np.random.default_rng([seed, batch])
    size = preprocess.size
    pixels = rng.integers(0, UINT8_LEVELS, size=(batch, RGB_CHANNELS, size, size), dtype=np.uint8)
    mean = np.asarray(preprocess.mean, np.float32)[:, None, None]
    std = np.asarray(preprocess.std, np.float32)[:, None, None]
    return ((pixels.astype(np.float32) / np.float32(UINT8_LEVELS - 1)) - mean) / std


def parity_token_ids(batch: int, tokenizer: Any) -> np.ndarray:
    """open_clip's own token ids for the first ``batch`` parity prompts."""
    prompts = [PARITY_PROMPTS[i % len(PARITY_PROMPTS)] for i in range(batch)]
    return tokenizer(prompts).numpy().astype(np.int64)


def _reference(loaded: models.LoadedModel, tower: str, x: np.ndarray) -> np.ndarray:
    """open_clip's fp32 output, via its own API (``encode_image/encode_text(..., normalize=True)``)."""
    with torch.no_grad():
        t = torch.from_numpy(x)
        out = (
            loaded.model.encode_image(t, normalize=True)
            if tower == "image"
            else loaded.model.encode_text(t, normalize=True)
        )
    return out.float().numpy()


def _run_onnxruntime(
    onnx_path: Path, input_name: str, arrays: Sequence[np.ndarray], precision: str
) -> list[np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="nvclip-parity-") as tmp:
        inputs, outputs = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        np.savez(inputs, **{f"b{i}": a for i, a in enumerate(arrays)})
        cmd = [sys.executable, str(ORT_WORKER), str(onnx_path), input_name, str(inputs), str(outputs)]
        proc = subprocess.run([*cmd, "--precision", precision], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            rc = proc.returncode
            how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            raise ExportError(f"ONNX Runtime failed on {onnx_path} ({how}):\n{proc.stderr[-4000:]}")
        with np.load(outputs) as data:
            return [data[f"b{i}"] for i in range(len(arrays))]


def _compare(
    backend: str, tower: str, refs: Sequence[np.ndarray], outs: Sequence[np.ndarray], threshold: float
) -> metadata.Parity:
    cosines, diffs = [], []
    for ref, out in zip(refs, outs, strict=True):
        if out.shape != ref.shape:
            raise ParityError(f"{backend} {tower}: output shape {out.shape}, open_clip gives {ref.shape}")
        if not np.isfinite(out).all():
            raise ParityError(f"{backend} {tower}: non-finite outputs at batch {len(out)}")
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        norms = np.linalg.norm(ref64, axis=-1) * np.linalg.norm(out64, axis=-1)
        cosines.append(np.min(np.sum(ref64 * out64, axis=-1) / norms))
        diffs.append(np.max(np.abs(ref64 - out64)))
    return metadata.Parity(
        backend=backend,
        tower=tower,
        batches=tuple(len(r) for r in refs),
        min_cos=float(min(cosines)),
        max_abs=float(max(diffs)),
        threshold=threshold,
    )


@dataclass
class _ParityInputs:
    arrays: dict[str, list[np.ndarray]]
    refs: dict[str, list[np.ndarray]]


def _parity_inputs(
    loaded: models.LoadedModel, towers: Sequence[str], batches: Sequence[int], tokenizer: Any | None
) -> _ParityInputs:
    arrays: dict[str, list[np.ndarray]] = {}
    if "image" in towers:
        arrays["image"] = [parity_images(loaded.preprocess, b) for b in batches]
    if "text" in towers:
        arrays["text"] = [parity_token_ids(b, tokenizer) for b in batches]
    refs = {t: [_reference(loaded, t, x) for x in xs] for t, xs in arrays.items()}
    return _ParityInputs(arrays, refs)


def check_onnx_parity(
    loaded: models.LoadedModel,
    onnx_path: Path,
    tower: str,
    precision: str,
    batches: Sequence[int] = PARITY_BATCHES,
) -> metadata.Parity:
    """One tower's ONNX under ONNX Runtime vs ``loaded.model`` (open_clip fp32) at ``batches``."""
    tokenizer = loaded.open_clip_tokenizer() if tower == "text" else None
    inputs = _parity_inputs(loaded, [tower], batches, tokenizer)
    return _onnx_parity(inputs, onnx_path, tower, precision)


def _onnx_parity(inputs: _ParityInputs, onnx_path: Path, tower: str, precision: str) -> metadata.Parity:
    input_name = metadata.TOWER_TENSOR_NAMES[tower][0]
    # In a child process: ONNX Runtime crashing on a graph (1.32's CPU graph optimizer segfaults on
    # open_clip's fp16 graphs) fails the check instead of the export.
    outs = _run_onnxruntime(onnx_path, input_name, inputs.arrays[tower], precision)
    return _compare("onnxruntime", tower, inputs.refs[tower], outs, MIN_COS[precision])


def _gate(results: Sequence[metadata.Parity], what: str) -> None:
    failed = [r for r in results if not r.passed]
    if failed:
        raise ParityError(f"{what} differ from open_clip: " + "; ".join(map(str, failed)), results)


# --- the export --------------------------------------------------------------------------------------------


def _versions(**extra: str | None) -> dict[str, str | None]:
    import onnxscript

    return {
        "nvclip_fast": __version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": None,
        "tensorrt": None,
        "gpu": None,
    } | extra


def _bundle_tokenizer(
    tok_spec: metadata.Tokenizer, tokenizer: Any, paths: BundlePaths, progress: Callable[[str], None]
) -> metadata.Tokenizer:
    """Put what the tokenizer needs offline into the bundle; returns the spec naming those files."""
    if tok_spec.kind == metadata.CLIP_BPE_KIND:
        dest = paths.directory / tok_spec.vocab
        if not (dest.exists() and filecmp.cmp(models.CLIP_BPE_VOCAB, dest, shallow=False)):
            shutil.copyfile(models.CLIP_BPE_VOCAB, dest)
        progress(f"tokenizer: CLIP BPE vocabulary {_size(dest)}")
        return tok_spec
    dest = paths.directory / f"{paths.stem}.tokenizer"
    tokenizer.save_pretrained(str(dest))
    progress(f"tokenizer: {tok_spec.kind} {tok_spec.name!r} files saved to {dest.name}/")
    return dataclasses.replace(tok_spec, files=dest.name)


def _example(tower: str, loaded: models.LoadedModel, tokenizer: Any | None) -> torch.Tensor:
    if tower == "image":
        return torch.from_numpy(parity_images(loaded.preprocess, EXPORT_EXAMPLE_BATCH))
    return torch.from_numpy(parity_token_ids(EXPORT_EXAMPLE_BATCH, tokenizer))


def _export_onnx(
    loaded: models.LoadedModel,
    precision: str,
    towers: Sequence[str],
    tokenizer: Any | None,
    profile: metadata.BatchProfile,
    paths: BundlePaths,
    progress: Callable[[str], None],
) -> dict[str, metadata.Tower]:
    net = loaded.model_in(precision)
    modules = {"image": _ImageTower(net, _TORCH_DTYPES[precision]), "text": _TextTower(net)}
    size = loaded.image_size
    expected = {
        "image": (IMAGE_DTYPE, (BATCH_DIM, RGB_CHANNELS, size, size)),
        "text": (TEXT_DTYPE, (BATCH_DIM, loaded.context_length)),
    }
    specs = {}
    for tower in towers:
        path = paths.onnx[tower]
        progress(f"export {tower} tower -> {path.name}")
        module, example = modules[tower].eval(), _example(tower, loaded, tokenizer)
        inp, outp = _export_tower(module, example, path, metadata.TOWER_TENSOR_NAMES[tower], profile.max)
        if (inp.dtype, inp.shape) != expected[tower]:
            raise ExportError(f"{path}: input {inp}, expected dtype and shape {expected[tower]}")
        progress(f"exported {_size(path)}")
        specs[tower] = metadata.Tower(path.name, None, inp, outp, profile)
    return specs


def _remove_stale(paths: BundlePaths) -> None:
    for tower in metadata.TOWERS:
        for p in (paths.onnx[tower], BundlePaths.data(paths.onnx[tower]), paths.plan[tower]):
            p.unlink(missing_ok=True)
    paths.sidecar.unlink(missing_ok=True)


def _describe_source(weights: str | Path | None, pretrained: str | None, random_weights: bool) -> str:
    if weights:
        return f"weights {weights}"
    if pretrained:
        return f"pretrained={pretrained}"
    return "random weights" if random_weights else "no weights"


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def export(
    model: str,
    out: str | Path,
    weights: str | Path | None = None,
    pretrained: str | None = None,
    random_weights: bool = False,
    image_size: int | None = None,
    precision: str = "fp32",
    max_batch: int = metadata.DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    text: bool = True,
    verify: bool = True,
    timing_cache: str | Path | None = None,
    version_compatible: bool = False,
    *,
    seed: int = models.DEFAULT_SEED,
    cache_dir: str | None = None,
    quiet: bool = False,
) -> metadata.Metadata:
    """Export open_clip model ``model`` to the bundle named by ``out`` (``X.onnx`` or ``X.plan``).

    Exactly one of ``weights`` (a checkpoint file), ``pretrained`` (an open_clip tag) or
    ``random_weights`` (tests only; seeded, so the same weights every time) is required. Returns the
    sidecar as written. Raises ``models.TokenizerUnavailableError`` before loading the weights when
    ``text`` and the tokenizer cannot be had from local files, ``ParityError`` when ``verify`` and an
    output misses the gate, and, for a ``.plan`` target where
    TensorRT cannot build, ``trt_build.TensorRTUnavailableError`` *after* writing the ONNX files and
    the sidecar (its ``commands`` are the equivalent ``trtexec`` lines). ``version_compatible``
    builds plans that later TensorRT versions of the same major and the lean and dispatch runtimes
    also run (TensorRT's VERSION_COMPATIBLE flag).
    """
    if precision not in metadata.PRECISIONS:
        raise ValueError(f"precision must be one of {list(metadata.PRECISIONS)}, got {precision!r}")
    max_batch = _positive_int(max_batch, "max_batch")
    opt_batch = max_batch if opt_batch is None else _positive_int(opt_batch, "opt_batch")
    if opt_batch > max_batch:
        raise ValueError(f"opt_batch ({opt_batch}) must not exceed max_batch ({max_batch})")
    paths = bundle_paths(out)
    cache_path = None if timing_cache is None else Path(timing_cache)
    start = time.perf_counter()
    bar = progress_bar(None, False if quiet else None, desc="export", unit=" stages")

    def progress(message: str) -> None:  # each stage a line on stderr, above tqdm's bar on a terminal
        if not quiet:
            bar.write(f"[export {time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr)
        bar.update()

    with bar:
        if text:  # before the weights are loaded: a missing tokenizer fails at once
            models.require_offline_tokenizer(model)
        progress(f"load {model} ({_describe_source(weights, pretrained, random_weights)})")
        loaded = models.load_model(
            model,
            weights=weights,
            pretrained=pretrained,
            random_weights=random_weights,
            image_size=image_size,
            seed=seed,
            cache_dir=cache_dir,
        )
        progress(
            f"loaded: {loaded.image_size} px, context {loaded.context_length}, {precision}, "
            f"weights {loaded.weights.name}"
        )
        paths.directory.mkdir(parents=True, exist_ok=True)
        _remove_stale(paths)
        towers = ["image", "text"] if text else ["image"]
        tokenizer = loaded.open_clip_tokenizer() if text else None
        profile = metadata.BatchProfile(1, opt_batch, max_batch)
        tower_specs = _export_onnx(loaded, precision, towers, tokenizer, profile, paths, progress)

        versions = _versions()
        inputs = None
        verification: list[metadata.Parity] = []
        if verify:
            import onnxruntime

            versions["onnxruntime"] = onnxruntime.__version__
            inputs = _parity_inputs(loaded, towers, [b for b in PARITY_BATCHES if b <= max_batch], tokenizer)
            for tower in towers:
                verification.append(_onnx_parity(inputs, paths.onnx[tower], tower, precision))
                progress(f"parity {verification[-1]}")
            _gate(verification, "ONNX Runtime outputs")

        logit_bias = getattr(loaded.model, "logit_bias", None)
        meta = metadata.Metadata(
            model=model,
            embed_dim=tower_specs["image"].output.shape[1],
            precision=precision,
            preprocess=loaded.preprocess,
            towers=tower_specs,
            tokenizer=_bundle_tokenizer(loaded.tokenizer, tokenizer, paths, progress) if text else None,
            context_length=loaded.context_length if text else None,
            logit_scale=float(loaded.model.logit_scale.detach().exp()),
            logit_bias=None if logit_bias is None else float(logit_bias.detach()),
            weights=loaded.weights,
            versions=versions,
            verification=tuple(verification),
        )
        meta = metadata.save(meta, paths.sidecar)
        progress(f"wrote {paths.sidecar.name}")
        if paths.build_plans:
            meta = _build_plans(meta, paths, version_compatible, cache_path, inputs, progress)
        progress("done")
        return meta


def _build_plans(
    meta: metadata.Metadata,
    paths: BundlePaths,
    version_compatible: bool,
    cache_path: Path | None,
    inputs: _ParityInputs | None,
    progress: Callable[[str], None],
) -> metadata.Metadata:
    specs = trt_build.engine_specs(meta, paths, version_compatible)
    reason = trt_build.unavailable_reason()
    if reason is not None:
        raise trt_build.TensorRTUnavailableError(
            reason, [trt_build.trtexec_command(s, cache_path) for s in specs.values()]
        )
    builds = {}
    for tower, spec in specs.items():
        progress(f"build TensorRT engine for the {tower} tower -> {spec.plan.name}")
        builds[tower] = trt_build.build_engine(spec, cache_path)
        progress(
            f"built {_size(spec.plan)} in {builds[tower].seconds:.1f}s "
            f"(strongly typed: {builds[tower].strongly_typed}, "
            f"version-compatible: {builds[tower].version_compatible})"
        )
    verification = list(meta.verification)
    if inputs is not None:
        plan_checks = []
        for tower, spec in specs.items():
            names = metadata.TOWER_TENSOR_NAMES[tower]
            outs = trt_build.run_engine(spec.plan, names[0], names[1], inputs.arrays[tower])
            plan_checks.append(_compare("tensorrt", tower, inputs.refs[tower], outs, MIN_COS[meta.precision]))
            progress(f"parity {plan_checks[-1]}")
        _gate(plan_checks, "TensorRT outputs")
        verification += plan_checks
    first = next(iter(builds.values()))
    updated = dataclasses.replace(
        meta,
        towers={t: dataclasses.replace(s, plan=paths.plan[t].name) for t, s in meta.towers.items()},
        versions=dict(meta.versions) | {"tensorrt": first.tensorrt_version, "gpu": first.gpu},
        verification=tuple(verification),
    )
    meta = metadata.save(updated, paths.sidecar)
    progress(f"updated {paths.sidecar.name} with the plans")
    return meta
