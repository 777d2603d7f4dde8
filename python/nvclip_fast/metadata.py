"""The bundle sidecar (``<stem>.json``): the one contract between the exporter and the runtime.

An export writes, next to each other::

    vith.onnx (+ vith.onnx.data)        image tower, input ``pixel_values``, output ``image_embeds``
    vith.text.onnx (+ .data)            text tower, input ``input_ids``, output ``text_embeds``
    vith.plan, vith.text.plan           TensorRT engines (only for a ``.plan`` target)
    vith.json                           this sidecar
    bpe_simple_vocab_16e6.txt.gz        the CLIP BPE vocabulary (CLIP-BPE tokenizers)

Every file name in the sidecar is relative to the sidecar's directory and must name a file inside it
(no absolute path, no ``..``): a sidecar is data from wherever the bundle came from, so nothing it
says may reach outside its folder, and its numbers are held to finite ranges. The engine I/O tensor names,
the schema version, the accepted values and the entries' types (``PreprocessSpec``, ``Tokenizer``,
...) are defined here and nowhere else; the exporter writes them, the runtime and the tests read
them. This module imports only the standard library (and the native module for ``spec._params``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "BATCH_DIM",
    "IMAGE_INPUT",
    "IMAGE_OUTPUT",
    "SCHEMA_VERSION",
    "TEXT_INPUT",
    "TEXT_OUTPUT",
    "TOWER_TENSOR_NAMES",
    "BatchProfile",
    "BundlePaths",
    "Metadata",
    "MetadataError",
    "Parity",
    "Preprocess",
    "PreprocessSpec",
    "RandomWeightsWarning",
    "TensorSpec",
    "Tokenizer",
    "Tower",
    "Weights",
    "bundle_paths",
    "load",
    "save",
]

# Bump when a reader of the previous version would misread a file of the new one.
SCHEMA_VERSION = 1

# Engine I/O tensor names, the same in the ONNX graphs, the TensorRT plans and the runtime.
IMAGE_INPUT = "pixel_values"  # float NCHW, already resized, cropped and normalized
IMAGE_OUTPUT = "image_embeds"  # float32 (N, embed_dim), L2-normalized
TEXT_INPUT = "input_ids"  # integer (N, context_length) token ids, as open_clip's tokenizer returns them
TEXT_OUTPUT = "text_embeds"  # float32 (N, embed_dim), L2-normalized
BATCH_DIM = "batch"  # the name of the dynamic first axis, written in place of a size in shapes
DEFAULT_MAX_BATCH = 128  # the largest batch an export's engines accept unless told otherwise

TOWERS = ("image", "text")
TOWER_TENSOR_NAMES = {"image": (IMAGE_INPUT, IMAGE_OUTPUT), "text": (TEXT_INPUT, TEXT_OUTPUT)}
PRECISIONS = ("fp32", "fp16")
TENSOR_DTYPES = ("float32", "float16", "int32", "int64")
TOWER_INPUT_DTYPES = {"image": ("float32", "float16"), "text": ("int32", "int64")}
OUTPUT_DTYPE = "float32"
INTERPOLATIONS = ("bicubic", "bilinear")  # open_clip eval transforms (torchvision -> PIL resample)
RESIZE_MODES = ("shortest", "longest", "squash")  # open_clip PreprocessCfg.resize_mode
# The sidecar's "preprocess" entry: PreprocessSpec's fields but the pass order (a reader's choice).
PREPROCESS_KEYS = ("size", "mean", "std", "interpolation", "resize_mode", "fill")
# Which of Pillow's two resampling passes runs first (the uint8 image between them makes it matter):
#   "pillow13": vertical first when the height shrinks by more than twice as many pixels as the width;
#   "pillow12.2": vertical first for images taller than 100x their width (Pillow 12.2-12.3);
#   "pillow12.1": always horizontal first (Pillow <= 12.1).
PASS_ORDERS = ("pillow13", "pillow12.2", "pillow12.1")
# open_clip/constants.py
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
# clip_bpe: open_clip SimpleTokenizer; hf: open_clip HFTokenizer (AutoTokenizer by name);
# siglip: open_clip SigLipTokenizer (sentencepiece vocabulary variant, for *-SigLIP names without one).
CLIP_BPE_KIND, HF_KIND, SIGLIP_KIND = TOKENIZER_KINDS = ("clip_bpe", "hf", "siglip")
TOKENIZER_CLEAN = ("lower", "whitespace", "canonicalize")  # open_clip tokenizer.get_clean_fn
TOKENIZER_KEYS = {  # what a sidecar's "tokenizer" entry holds, per kind
    CLIP_BPE_KIND: ("kind", "vocab", "context_length", "clean"),
    HF_KIND: ("kind", "name", "context_length", "clean", "strip_sep_token", "mode", "files"),
    SIGLIP_KIND: ("kind", "name", "context_length", "files"),
}
WEIGHT_SOURCES = ("file", "pretrained", "random")
PARITY_BACKENDS = ("onnxruntime", "tensorrt")
RGB_CHANNELS = 3
UINT8_MAX = 255
# The largest magnitude that rounds to 0.0 in float32: half the smallest subnormal (ties to even).
FLOAT32_ROUNDS_TO_ZERO = 2.0**-150
SHA256_HEX_LENGTH = 64
SHA256_CHUNK = 1 << 24  # bytes read at a time while hashing a weights file
EMBEDS_RANK = 2  # outputs are (batch, embed_dim)
ONNX_SUFFIX = ".onnx"
PLAN_SUFFIX = ".plan"
SIDECAR_SUFFIX = ".json"
TEXT_STEM = ".text"  # vith.onnx -> vith.text.onnx: the text tower beside the image tower
SIDECAR_MODE = 0o644  # tempfile.mkstemp creates 0600 files; a sidecar is meant to be shared
# Ranges a sidecar's numbers must lie in (far beyond any real model; they bound what loading allocates).
MAX_SIDECAR_BYTES = 16 << 20
MAX_BATCH = 4096  # the native queue's limit
MAX_IMAGE_SIZE = 4096
MAX_EMBED_DIM = 1 << 16
MAX_CONTEXT_LENGTH = 1 << 14
MAX_TENSOR_DIM = 1 << 20
# CLIP's learned logit scale is capped at 100 in training; SigLIP's ends near 120. Beyond this a
# softmax over cosines is meaningless (1e308 overflows to inf; a negative scale inverts the ranking).
MAX_LOGIT_SCALE = 1e4
MAX_LOGIT_BIAS = 1e4
# A Hugging Face hub model id ("bert-base-uncased", "org/name"): never a path, so a sidecar cannot
# make the tokenizer read a folder of its choosing.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


class MetadataError(ValueError):
    """A sidecar that is missing, unreadable, of another schema version, or holds an invalid value."""


class RandomWeightsWarning(UserWarning):
    """The model has random weights (``weights.source == "random"``): its embeddings mean nothing."""


def random_weights_message(model: str) -> str:
    """The one wording of the random-weights warning (export, loading, embedding)."""
    return f"model {model!r} has RANDOM weights: its embeddings are meaningless (for tests only)"


# --- small typed readers: each names the key path and the value it got ----------------------------


def _err(where: str, message: str) -> MetadataError:
    return MetadataError(f"sidecar: {where}: {message}")


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _err(where, f"expected an object, got {type(value).__name__} {value!r}")
    return value


def _require(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise _err(where, f"missing key {key!r} (keys present: {sorted(d)})")
    return d[key]


def _str(value: Any, where: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise _err(where, f"expected a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
        raise _err(where, f"expected one of {list(choices)}, got {value!r}")
    return value


def _opt_str(value: Any, where: str, choices: tuple[str, ...] | None = None) -> str | None:
    return None if value is None else _str(value, where, choices)


def _int(value: Any, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(where, f"expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise _err(where, f"expected an integer >= {minimum}, got {value}")
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(where, f"expected a finite number, got {value!r}")
    return float(value)


def _opt_float(value: Any, where: str) -> float | None:
    return None if value is None else _float(value, where)


def _in_range(value: float, where: str, low: float, high: float, *, open_low: bool = False) -> float:
    if value < low or value > high or (open_low and value == low):
        bound = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
        raise _err(where, f"expected a number in {bound}, got {value!r}")
    return value


def _bundle_file(value: Any, where: str) -> str:
    """A file name of the bundle: relative, inside the sidecar's folder (no ``..``, not absolute)."""
    name = _str(value, where)
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or "\x00" in name:
        raise _err(where, f"expected a file name inside the bundle's folder, got {name!r}")
    return name


def _opt_bundle_file(value: Any, where: str) -> str | None:
    return None if value is None else _bundle_file(value, where)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _err(where, f"expected true or false, got {value!r}")
    return value


def _triple(value: Any, where: str, positive: bool = False) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != RGB_CHANNELS:
        raise _err(where, f"expected {RGB_CHANNELS} numbers, got {value!r}")
    out = tuple(_float(v, f"{where}[{i}]") for i, v in enumerate(value))
    if positive and min(out) <= 0:
        raise _err(where, f"expected positive numbers, got {list(out)}")
    return out  # type: ignore[return-value]


# --- the schema -------------------------------------------------------------------------------------


def pass_order_for_pillow(version: str) -> str:
    """The pass order of a Pillow version string ("13.0.0", "12.2.1", "11.3.0", "13.1.0.dev0")."""
    parts = [int(n) for n in re.findall(r"\d+", version)[:2]]
    major, minor = [*parts, 0, 0][:2]
    if major >= 13:
        return "pillow13"
    if (major, minor) >= (12, 2):
        return "pillow12.2"
    return "pillow12.1"


@functools.cache
def default_pass_order() -> str:
    """The installed Pillow's pass order (Pillow 13's when Pillow is absent)."""
    try:
        return pass_order_for_pillow(importlib.metadata.version("pillow"))
    except importlib.metadata.PackageNotFoundError:
        return "pillow13"


def _per_channel(name: str, value: Any) -> tuple[float, float, float]:
    # open_clip's image_transform: a scalar mean/std means the same for all three channels.
    values = (value,) * RGB_CHANNELS if isinstance(value, numbers.Real) else tuple(value)
    if len(values) != RGB_CHANNELS:
        raise ValueError(f"{name} must have {RGB_CHANNELS} values (one per RGB channel), got {len(values)}")
    floats = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in floats):
        raise ValueError(f"{name} must be finite, got {floats}")
    return floats  # type: ignore[return-value]


@dataclass(frozen=True)
class PreprocessSpec:
    """open_clip's eval transform as data: resize (``resize_mode``, ``interpolation``) to ``size``,
    center crop or pad with ``fill``, then ``(x / 255 - mean) / std`` per RGB channel.

    The defaults are open_clip's (``PreprocessCfg``): OpenAI mean/std, bicubic, shortest — what a
    model loaded from a weights file such as NVIDIA's NVCLIP gets. ``pass_order`` selects the
    Pillow whose results to reproduce (default: the installed one). The sidecar's ``preprocess``
    entry holds every field but ``pass_order`` (:meth:`to_dict`; ``PreprocessSpec(**entry)``).
    """

    size: int
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN
    std: tuple[float, float, float] = OPENAI_DATASET_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill: int = 0
    pass_order: str = field(default_factory=default_pass_order)

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, numbers.Integral) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mean", _per_channel("mean", self.mean))
        std = _per_channel("std", self.std)
        if any(abs(s) <= FLOAT32_ROUNDS_TO_ZERO for s in std):
            raise ValueError(f"std must be non-zero in float32, got {std}")
        object.__setattr__(self, "std", std)
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if isinstance(self.fill, bool) or not isinstance(self.fill, numbers.Integral):
            raise ValueError(f"fill must be an int in 0..{UINT8_MAX}, got {self.fill!r}")
        if not 0 <= self.fill <= UINT8_MAX:
            raise ValueError(f"fill must be in 0..{UINT8_MAX}, got {self.fill}")
        object.__setattr__(self, "fill", int(self.fill))
        if self.pass_order not in PASS_ORDERS:
            raise ValueError(f"pass_order must be one of {PASS_ORDERS}, got {self.pass_order!r}")

    @classmethod
    def from_open_clip(cls, model_or_cfg: Any, **overrides: Any) -> PreprocessSpec:
        """The spec of an open_clip model (``model.visual.preprocess_cfg``), of an open_clip
        ``PreprocessCfg``, or of its dict. ``overrides`` replace fields (e.g. ``pass_order``)."""
        cfg = model_or_cfg
        visual = getattr(cfg, "visual", None)
        if visual is not None:
            cfg = getattr(visual, "preprocess_cfg", None)
            if cfg is None:
                raise ValueError("model.visual has no preprocess_cfg (not an open_clip model?)")
        if not isinstance(cfg, dict):
            cfg = dict(vars(cfg))
        size = cfg.get("size", 224)
        if isinstance(size, (tuple, list)):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"only square image sizes are supported, got {tuple(size)}")
            size = size[0]
        mode = cfg.get("mode", "RGB")
        if mode != "RGB":
            raise ValueError(f"only mode 'RGB' is supported (as in open_clip), got {mode!r}")
        fields = {
            "size": size,
            "mean": cfg.get("mean") or OPENAI_DATASET_MEAN,
            "std": cfg.get("std") or OPENAI_DATASET_STD,
            "interpolation": cfg.get("interpolation") or "bicubic",
            "resize_mode": cfg.get("resize_mode") or "shortest",
            "fill": cfg.get("fill_color", 0),
        }
        fields.update(overrides)
        return cls(**fields)

    @functools.cached_property
    def _params(self) -> Any:
        """The native parameters (``_C.PreprocessParams``, private to nvclip_fast)."""
        from . import _C

        p = _C.PreprocessParams()
        p.size, p.mean, p.std, p.fill = self.size, self.mean, self.std, self.fill
        p.interpolation = getattr(_C.Interpolation, self.interpolation)
        p.resize_mode = getattr(_C.ResizeMode, self.resize_mode)
        p.pass_order = getattr(_C.PassOrder, self.pass_order.replace(".", "_"))
        return p

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's ``preprocess`` entry (``pass_order`` is the reader's, not the bundle's)."""
        d = {k: getattr(self, k) for k in PREPROCESS_KEYS}
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> PreprocessSpec:
        """A sidecar's ``preprocess`` entry, each key checked as the schema reads it (errors name it)."""
        d = _mapping(d, "preprocess")
        entry = {k: _require(d, k, "preprocess") for k in PREPROCESS_KEYS}
        _int(entry["size"], "preprocess.size", minimum=1)
        _triple(entry["mean"], "preprocess.mean")
        _triple(entry["std"], "preprocess.std", positive=True)
        _str(entry["interpolation"], "preprocess.interpolation", INTERPOLATIONS)
        _str(entry["resize_mode"], "preprocess.resize_mode", RESIZE_MODES)
        _int(entry["fill"], "preprocess.fill", minimum=0)
        try:
            return cls(**entry)
        except ValueError as e:
            raise _err("preprocess", str(e)) from e


# The sidecar entry's type under the name this schema gave it first.
Preprocess = PreprocessSpec


@dataclass(frozen=True)
class Tokenizer:
    """What reproduces open_clip's token ids offline, without open_clip or torch.

    ``clip_bpe``: open_clip's ``SimpleTokenizer``; ``vocab`` is the BPE merges file shipped in the
    bundle (``bpe_simple_vocab_16e6.txt.gz``); ``clean`` its text cleaning (``lower`` by default).
    ``hf``: open_clip's ``HFTokenizer``: ``AutoTokenizer.from_pretrained(name)``, ``clean``,
    ``strip_sep_token`` (SEP id replaced by 0), ``mode`` (open_clip ``tokenizer_mode``, usually null);
    ``files`` names a directory in the bundle holding the tokenizer's files, or is null where they
    were not available offline at export time. ``siglip``: open_clip's ``SigLipTokenizer``, ``name``
    is its vocabulary variant (``c4-en``, ``mc4``, ``gemma``). All pad to ``context_length``.
    """

    kind: str
    context_length: int
    vocab: str | None = None
    name: str | None = None
    clean: str | None = None
    strip_sep_token: bool = False
    mode: str | None = None
    files: str | None = None

    def __post_init__(self) -> None:
        _str(self.kind, "tokenizer.kind", TOKENIZER_KINDS)
        _int(self.context_length, "tokenizer.context_length", minimum=1)
        _opt_str(self.clean, "tokenizer.clean", TOKENIZER_CLEAN)
        _bool(self.strip_sep_token, "tokenizer.strip_sep_token")
        _opt_str(self.mode, "tokenizer.mode")
        _opt_bundle_file(self.files, "tokenizer.files")
        _int(self.context_length, "tokenizer.context_length", minimum=1)
        _in_range(self.context_length, "tokenizer.context_length", 1, MAX_CONTEXT_LENGTH)
        if self.kind == CLIP_BPE_KIND:
            _bundle_file(self.vocab, "tokenizer.vocab")
        else:
            name = _str(self.name, "tokenizer.name")
            if not _HUB_ID.fullmatch(name) or ".." in name:
                raise _err(
                    "tokenizer.name", f"expected a tokenizer name such as 'bert-base-uncased', got {name!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in TOKENIZER_KEYS[self.kind]}

    @classmethod
    def from_dict(cls, d: Any) -> Tokenizer:
        d = _mapping(d, "tokenizer")
        known = {f.name for f in fields(cls)}
        if unknown := set(d) - known:
            raise _err("tokenizer", f"unknown keys {sorted(unknown)}")
        return cls(
            kind=_require(d, "kind", "tokenizer"),
            context_length=_require(d, "context_length", "tokenizer"),
            **{k: d[k] for k in known - {"kind", "context_length"} if k in d},
        )


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output: name, dtype, and shape with ``BATCH_DIM`` for the dynamic axis."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        _str(self.name, "tensor.name")
        _str(self.dtype, f"tensor {self.name!r} dtype", TENSOR_DTYPES)
        shape = tuple(self.shape) if isinstance(self.shape, (list, tuple)) else None
        if not shape or shape[0] != BATCH_DIM:
            raise _err(f"tensor {self.name!r} shape", f"expected [{BATCH_DIM!r}, ...], got {self.shape!r}")
        for i, s in enumerate(shape[1:], 1):
            _int(s, f"tensor {self.name!r} shape[{i}]", minimum=1)
            _in_range(s, f"tensor {self.name!r} shape[{i}]", 1, MAX_TENSOR_DIM)
        object.__setattr__(self, "shape", shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorSpec:
        d = _mapping(d, where)
        return cls(*(_require(d, k, where) for k in ("name", "dtype", "shape")))


@dataclass(frozen=True)
class BatchProfile:
    """The TensorRT optimization profile of a tower (and the batch range the ONNX was checked at)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        lo = _int(self.min, "batch.min", minimum=1)
        if not lo <= _int(self.opt, "batch.opt") <= _int(self.max, "batch.max"):
            raise _err("batch", f"expected 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        _in_range(self.max, "batch.max", 1, MAX_BATCH)

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> BatchProfile:
        d = _mapping(d, where)
        return cls(*(_require(d, k, where) for k in ("min", "opt", "max")))


@dataclass(frozen=True)
class Tower:
    """One exported tower: its ONNX file, its TensorRT plan (or null), its tensors and batch profile."""

    onnx: str
    plan: str | None
    input: TensorSpec
    output: TensorSpec
    batch: BatchProfile

    def to_dict(self) -> dict[str, Any]:
        entries = {key: getattr(self, key).to_dict() for key in ("input", "output", "batch")}
        return {"onnx": self.onnx, "plan": self.plan, **entries}

    @classmethod
    def from_dict(cls, d: Any, tower: str) -> Tower:
        where = f"towers.{tower}"
        d = _mapping(d, where)
        t = cls(
            onnx=_bundle_file(_require(d, "onnx", where), f"{where}.onnx"),
            plan=_opt_bundle_file(d.get("plan"), f"{where}.plan"),
            input=TensorSpec.from_dict(_require(d, "input", where), f"{where}.input"),
            output=TensorSpec.from_dict(_require(d, "output", where), f"{where}.output"),
            batch=BatchProfile.from_dict(_require(d, "batch", where), f"{where}.batch"),
        )
        t.check(tower)
        return t

    def check(self, tower: str) -> None:
        """Hold the tower to the fixed tensor names and dtypes of this schema."""
        where = f"towers.{tower}"
        input_name, output_name = TOWER_TENSOR_NAMES[tower]
        if self.input.name != input_name:
            raise _err(f"{where}.input.name", f"expected {input_name!r}, got {self.input.name!r}")
        if self.output.name != output_name:
            raise _err(f"{where}.output.name", f"expected {output_name!r}, got {self.output.name!r}")
        _str(self.input.dtype, f"{where}.input.dtype", TOWER_INPUT_DTYPES[tower])
        _str(self.output.dtype, f"{where}.output.dtype", (OUTPUT_DTYPE,))
        if len(self.output.shape) != EMBEDS_RANK:
            raise _err(f"{where}.output.shape", f"expected [batch, embed_dim], got {list(self.output.shape)}")


def sha256_file(*paths: str | os.PathLike[str]) -> str:
    """The sha256 of a file (a weights checkpoint), or of several read one after the other (an ONNX
    graph and its external data), as lowercase hex."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(SHA256_CHUNK):
                h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Weights:
    """Where the weights came from: a ``file`` (its name), a ``pretrained`` tag, or ``random``."""

    source: str
    name: str | None
    sha256: str | None

    def __post_init__(self) -> None:
        _str(self.source, "weights.source", WEIGHT_SOURCES)
        _opt_str(self.name, "weights.name")
        if self.sha256 is not None and (
            not isinstance(self.sha256, str)
            or len(self.sha256) != SHA256_HEX_LENGTH
            or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise _err(
                "weights.sha256", f"expected {SHA256_HEX_LENGTH} lowercase hex digits, got {self.sha256!r}"
            )
        if self.source != "random" and (self.name is None or self.sha256 is None):
            raise _err("weights", f"source {self.source!r} needs a name and a sha256, got {self}")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "name": self.name, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Any) -> Weights:
        d = _mapping(d, "weights")
        return cls(*(_require(d, k, "weights") for k in ("source", "name", "sha256")))


@dataclass(frozen=True)
class Parity:
    """One parity check: a backend's tower output vs open_clip fp32 on the same inputs."""

    backend: str
    tower: str
    batches: tuple[int, ...]
    min_cos: float
    max_abs: float
    threshold: float

    def __post_init__(self) -> None:
        _str(self.backend, "verification.backend", PARITY_BACKENDS)
        _str(self.tower, "verification.tower", TOWERS)
        if not isinstance(self.batches, (list, tuple)) or not self.batches:
            raise _err("verification.batches", f"expected a non-empty list, got {self.batches!r}")
        object.__setattr__(
            self, "batches", tuple(_int(b, "verification.batches", minimum=1) for b in self.batches)
        )
        _float(self.min_cos, "verification.min_cos")
        _float(self.max_abs, "verification.max_abs")
        _float(self.threshold, "verification.threshold")

    @property
    def passed(self) -> bool:
        return self.min_cos >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "batches": list(self.batches), "passed": self.passed}

    @classmethod
    def from_dict(cls, d: Any) -> Parity:
        d = _mapping(d, "verification[]")
        keys = ("backend", "tower", "batches", "min_cos", "max_abs", "threshold")
        return cls(*(_require(d, k, "verification[]") for k in keys))

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"{self.backend} {self.tower}: min cos {self.min_cos:.7f} (threshold {self.threshold}), "
            f"max |diff| {self.max_abs:.3g} at batch {', '.join(map(str, self.batches))}: {verdict}"
        )


@dataclass(frozen=True)
class Metadata:
    """The whole sidecar. ``directory`` (not serialized) is where it was loaded from or saved to."""

    model: str
    embed_dim: int
    precision: str
    preprocess: PreprocessSpec
    towers: dict[str, Tower]
    tokenizer: Tokenizer | None
    context_length: int | None
    logit_scale: float
    logit_bias: float | None
    weights: Weights
    versions: dict[str, str | None]
    verification: tuple[Parity, ...] = ()
    schema: int = SCHEMA_VERSION
    directory: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _str(self.model, "model")
        _in_range(_int(self.embed_dim, "embed_dim", minimum=1), "embed_dim", 1, MAX_EMBED_DIM)
        _in_range(self.preprocess.size, "preprocess.size", 1, MAX_IMAGE_SIZE)
        _str(self.precision, "precision", PRECISIONS)
        if self.schema != SCHEMA_VERSION:
            raise _err(
                "schema", f"this nvclip_fast reads schema {SCHEMA_VERSION}, the file is {self.schema!r}"
            )
        if "image" not in self.towers or set(self.towers) - set(TOWERS):
            raise _err("towers", f"expected 'image' and optionally 'text', got {sorted(self.towers)}")
        for name, tower in self.towers.items():
            tower.check(name)
            if tower.output.shape[1] != self.embed_dim:
                raise _err(
                    f"towers.{name}.output.shape",
                    f"expected [batch, {self.embed_dim}] (embed_dim), got {list(tower.output.shape)}",
                )
        image_shape = self.towers["image"].input.shape
        expected_image = (BATCH_DIM, RGB_CHANNELS, self.preprocess.size, self.preprocess.size)
        if image_shape != expected_image:
            raise _err(
                "towers.image.input.shape", f"expected {list(expected_image)}, got {list(image_shape)}"
            )
        has_text = "text" in self.towers
        if has_text != (self.tokenizer is not None) or has_text != (self.context_length is not None):
            raise _err(
                "text",
                "a text tower, tokenizer and context_length come together; got "
                f"text tower {has_text}, tokenizer {self.tokenizer}, context_length {self.context_length}",
            )
        if has_text:
            _int(self.context_length, "context_length", minimum=1)
            text_shape = self.towers["text"].input.shape
            if text_shape != (BATCH_DIM, self.context_length):
                raise _err(
                    "towers.text.input.shape",
                    f"expected [{BATCH_DIM!r}, {self.context_length}] (context_length), "
                    f"got {list(text_shape)}",
                )
            if self.tokenizer is not None and self.tokenizer.context_length != self.context_length:
                raise _err(
                    "tokenizer.context_length",
                    f"expected {self.context_length} (context_length), got {self.tokenizer.context_length}",
                )
        _in_range(_float(self.logit_scale, "logit_scale"), "logit_scale", 0, MAX_LOGIT_SCALE, open_low=True)
        if _opt_float(self.logit_bias, "logit_bias") is not None:
            _in_range(self.logit_bias, "logit_bias", -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        if not isinstance(self.versions, Mapping):
            raise _err("versions", f"expected an object, got {self.versions!r}")
        for k, v in self.versions.items():
            _opt_str(v, f"versions.{k}")

    @property
    def has_plans(self) -> bool:
        return all(t.plan is not None for t in self.towers.values())

    def path(self, relative: str) -> Path:
        """The absolute path of a bundle file named in this sidecar."""
        if self.directory is None:
            raise MetadataError("this Metadata was neither loaded nor saved, so its files have no directory")
        return self.directory / relative

    def files(self) -> list[str]:
        """Every bundle file this sidecar names (the ``.onnx.data`` files are found next to the graphs)."""
        names = [f for t in self.towers.values() for f in (t.onnx, t.plan) if f is not None]
        if self.tokenizer is not None:
            names += [f for f in (self.tokenizer.vocab, self.tokenizer.files) if f is not None]
        return names

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "model": self.model,
            "embed_dim": self.embed_dim,
            "precision": self.precision,
            "preprocess": self.preprocess.to_dict(),
            "context_length": self.context_length,
            "tokenizer": None if self.tokenizer is None else self.tokenizer.to_dict(),
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
            "towers": {name: self.towers[name].to_dict() for name in TOWERS if name in self.towers},
            "weights": self.weights.to_dict(),
            "versions": dict(self.versions),
            "verification": [p.to_dict() for p in self.verification],
        }

    @classmethod
    def from_dict(cls, d: Any, directory: Path | None = None) -> Metadata:
        d = _mapping(d, "top level")
        schema = _require(d, "schema", "top level")
        if schema != SCHEMA_VERSION:
            raise _err("schema", f"this nvclip_fast reads schema {SCHEMA_VERSION}, the file is {schema!r}")
        towers = _mapping(_require(d, "towers", "top level"), "towers")
        if unknown := set(towers) - set(TOWERS):
            raise _err("towers", f"unknown towers {sorted(unknown)}, expected {list(TOWERS)}")
        tokenizer = d.get("tokenizer")
        verification = d.get("verification") or []
        if not isinstance(verification, list):
            raise _err("verification", f"expected a list, got {verification!r}")
        return cls(
            schema=schema,
            model=_require(d, "model", "top level"),
            embed_dim=_require(d, "embed_dim", "top level"),
            precision=_require(d, "precision", "top level"),
            preprocess=PreprocessSpec.from_dict(_require(d, "preprocess", "top level")),
            towers={name: Tower.from_dict(t, name) for name, t in towers.items()},
            tokenizer=None if tokenizer is None else Tokenizer.from_dict(tokenizer),
            context_length=d.get("context_length"),
            logit_scale=_require(d, "logit_scale", "top level"),
            logit_bias=d.get("logit_bias"),
            weights=Weights.from_dict(_require(d, "weights", "top level")),
            versions=dict(_mapping(_require(d, "versions", "top level"), "versions")),
            verification=tuple(Parity.from_dict(p) for p in verification),
            directory=directory,
        )


def load(path: str | os.PathLike[str], *, check_files: bool = True) -> Metadata:
    """Read and validate a sidecar; with ``check_files``, also require every file it names to exist."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIDECAR_BYTES + 1)
    except OSError as e:
        raise MetadataError(f"cannot read the sidecar {str(path)!r}: {e.strerror or e}") from e
    if len(data) > MAX_SIDECAR_BYTES:
        raise MetadataError(f"{str(path)!r} is over {MAX_SIDECAR_BYTES} bytes: not a sidecar")
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise MetadataError(f"{str(path)!r} is not UTF-8 text: {e}") from e
    except json.JSONDecodeError as e:
        raise MetadataError(f"{str(path)!r} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise MetadataError(f"{str(path)!r} is not a sidecar: JSON nested too deeply to read") from e
    try:
        meta = Metadata.from_dict(raw, directory=path.resolve().parent)
    except MetadataError as e:
        raise MetadataError(f"{path}: {e}") from e
    if check_files:
        missing = [f for f in meta.files() if not meta.path(f).exists()]
        if missing:
            raise MetadataError(
                f"{path}: files named in the sidecar are missing from {meta.directory}: {missing}"
            )
    return meta


def save(meta: Metadata, path: str | os.PathLike[str]) -> Metadata:
    """Write ``meta`` as indented JSON (atomically: a reader never sees half a file); returns it with
    ``directory`` set to where it was written."""
    path = Path(path)
    text = json.dumps(meta.to_dict(), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, SIDECAR_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Metadata.from_dict(meta.to_dict(), directory=path.resolve().parent)


# --- bundle layout ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundlePaths:
    directory: Path
    stem: str
    sidecar: Path
    onnx: dict[str, Path]
    plan: dict[str, Path]
    build_plans: bool

    @staticmethod
    def data(onnx_path: Path) -> Path:
        """The external-data file torch writes next to an ONNX graph."""
        return onnx_path.with_name(onnx_path.name + ".data")


def bundle_paths(out: str | Path) -> BundlePaths:
    """``vith.onnx`` or ``vith.plan`` -> vith.onnx, vith.text.onnx, vith.json (+ vith.plan and
    vith.text.plan for a ``.plan`` target)."""
    out = Path(out)
    if out.suffix not in (ONNX_SUFFIX, PLAN_SUFFIX):
        raise ValueError(f"output must end in .onnx or .plan, got {str(out)!r}")
    directory, stem = out.parent, out.stem
    return BundlePaths(
        directory=directory,
        stem=stem,
        sidecar=directory / f"{stem}{SIDECAR_SUFFIX}",
        onnx={
            "image": directory / f"{stem}{ONNX_SUFFIX}",
            "text": directory / f"{stem}{TEXT_STEM}{ONNX_SUFFIX}",
        },
        plan={
            "image": directory / f"{stem}{PLAN_SUFFIX}",
            "text": directory / f"{stem}{TEXT_STEM}{PLAN_SUFFIX}",
        },
        build_plans=out.suffix == PLAN_SUFFIX,
    )
