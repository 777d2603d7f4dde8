"""open_clip's eval transform, bit-exact and fast: ``preprocess(images, spec)``.

``PreprocessSpec`` is the transform as data (the fields of the exporter's sidecar ``"preprocess"``
entry), ``preprocess`` runs it on the CPU twin or the CUDA kernel (``resize_normalize``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _C
from .images import as_host_pixels, as_image_list, decode_image

# open_clip/constants.py
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "longest", "squash")
# Which of Pillow's two resampling passes runs first (the uint8 image between them makes it matter):
#   "pillow13": vertical first when the height shrinks by more than twice as many pixels as the width;
#   "pillow12.2": vertical first for images taller than 100x their width (Pillow 12.2-12.3);
#   "pillow12.1": always horizontal first (Pillow <= 12.1).
PASS_ORDERS = ("pillow13", "pillow12.2", "pillow12.1")
DTYPES = ("float32", "float16")
_CHANNELS = 3
_MAX_FILL = 255

_PASS_ORDER_ENUM = {
    "pillow13": _C.PassOrder.pillow13,
    "pillow12.2": _C.PassOrder.pillow12_2,
    "pillow12.1": _C.PassOrder.pillow12_1,
}


def pass_order_for_pillow(version: str) -> str:
    """The pass order of a Pillow version string ("13.0.0", "12.2.1", "11.3.0", "13.1.0.dev0")."""
    numbers = [int(n) for n in re.findall(r"\d+", version)[:2]]
    major, minor = [*numbers, 0, 0][:2]
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


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    # open_clip's image_transform: a scalar mean/std means the same for all three channels.
    values = (value,) * _CHANNELS if isinstance(value, (int, float)) else tuple(value)
    if len(values) != _CHANNELS:
        raise ValueError(f"{name} must have {_CHANNELS} values (one per RGB channel), got {len(values)}")
    floats = tuple(float(v) for v in values)
    if not all(np.isfinite(floats)):
        raise ValueError(f"{name} must be finite, got {floats}")
    return floats  # type: ignore[return-value]


@dataclass(frozen=True)
class PreprocessSpec:
    """open_clip's eval transform as data: resize (``resize_mode``, ``interpolation``) to ``size``,
    center crop or pad with ``fill``, then ``(x / 255 - mean) / std`` per RGB channel.

    The defaults are open_clip's (``PreprocessCfg``): OpenAI mean/std, bicubic, shortest — what a
    model loaded from a weights file such as NVIDIA's NVCLIP gets. ``pass_order`` selects the
    Pillow whose results to reproduce (default: the installed one).
    """

    size: int
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN
    std: tuple[float, float, float] = OPENAI_DATASET_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill: int = 0
    pass_order: str = field(default_factory=default_pass_order)

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mean", _triple("mean", self.mean))
        std = _triple("std", self.std)
        if any(np.float32(s) == 0 for s in std):
            raise ValueError(f"std must be non-zero in float32, got {std}")
        object.__setattr__(self, "std", std)
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if isinstance(self.fill, bool) or not isinstance(self.fill, (int, np.integer)):
            raise ValueError(f"fill must be an int in 0..{_MAX_FILL}, got {self.fill!r}")
        if not 0 <= self.fill <= _MAX_FILL:
            raise ValueError(f"fill must be in 0..{_MAX_FILL}, got {self.fill}")
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
    def _params(self) -> _C.PreprocessParams:
        """The native parameters (private to nvclip_fast)."""
        p = _C.PreprocessParams()
        p.size = self.size
        p.mean = self.mean
        p.std = self.std
        p.interpolation = getattr(_C.Interpolation, self.interpolation)
        p.resize_mode = getattr(_C.ResizeMode, self.resize_mode)
        p.fill = self.fill
        p.pass_order = _PASS_ORDER_ENUM[self.pass_order]
        return p


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    name = {"half": "float16", "float": "float32"}.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return name


def _threads(threads: int | None) -> int:
    if threads is None:
        return 0  # all cores the process may run on
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be None (all cores) or an int >= 1, got {threads!r}")
    return threads


def _host_out(out: Any, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array for device='cpu', got {type(out).__name__}")
    if out.shape != shape or out.dtype != np.dtype(dtype):
        raise ValueError(f"out must have shape {shape} and dtype {dtype}, got {out.shape} {out.dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writeable")
    return out


def preprocess(
    images: Sequence[Any],
    spec: PreprocessSpec,
    *,
    device: Any = "cpu",
    dtype: Any = "float32",
    threads: int | None = None,
    out: Any = None,
) -> Any:
    """open_clip's eval transform for a batch of images of any sizes: an ``(N, 3, S, S)`` array,
    equal bit for bit to ``torch.stack([transform(PIL image) for ...])``.

    ``images``: a sequence of what :func:`nvclip_fast.images.decode_image` accepts (numpy arrays,
    PIL images, paths, bytes, uint8 torch tensors), sizes mixed freely. ``device="cpu"`` returns
    numpy and uses ``threads`` cores (``None``: all); ``device="cuda"`` (or ``"cuda:1"``, a
    ``torch.device``) returns a torch tensor on that device, computed on its current stream.
    ``dtype``: ``"float32"`` or ``"float16"``. ``out``: an array (numpy on the CPU, torch on CUDA)
    of the right shape and dtype to write into instead of allocating.
    """
    if not isinstance(spec, PreprocessSpec):
        raise TypeError(f"spec must be a PreprocessSpec, got {type(spec).__name__}")
    items = as_image_list(images)
    dtype_name = _dtype_name(dtype)
    n_threads = _threads(threads)
    shape = (len(items), _CHANNELS, spec.size, spec.size)
    device_type = str(getattr(device, "type", device)).split(":")[0]  # "cuda:1", torch.device("cuda", 1)
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r}")
    if device_type == "cpu":
        pixels = [as_host_pixels(decode_image(item, i, spec)) for i, item in enumerate(items)]
        result = _host_out(out, shape, dtype_name)
        _C.resize_normalize(pixels, spec._params, getattr(_C.OutputDType, dtype_name), result, n_threads)
        return result
    return _preprocess_cuda(items, spec, device, dtype_name, shape, out)


# ---- CUDA -----------------------------------------------------------------------------------

_runners: dict[int, tuple[Any, threading.Lock]] = {}
_runners_lock = threading.Lock()


def _runner(index: int) -> tuple[Any, threading.Lock]:
    """One ResizeNormalizeCuda (scratch memory + table cache) per device, used under its lock."""
    with _runners_lock:
        if index not in _runners:
            _runners[index] = (_C.ResizeNormalizeCuda(), threading.Lock())
        return _runners[index]


def _preprocess_cuda(
    items: list[Any], spec: PreprocessSpec, device: Any, dtype: str, shape: tuple, out: Any
) -> Any:
    from . import EngineError, build_info

    if not build_info()["cuda"]:
        raise EngineError("device='cuda' needs a CUDA build of nvclip_fast (this one was built without CUDA)")
    import torch

    dev = torch.device(device)
    if not torch.cuda.is_available():
        raise EngineError(f"device={device!r} but no CUDA device is usable: {_C.cuda_unavailable_reason()}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    if out is None:
        out = torch.empty(shape, dtype=torch_dtype, device=dev)
    elif not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch tensor for device={device!r}, got {type(out).__name__}")
    elif (
        tuple(out.shape) != shape or out.dtype != torch_dtype or out.device != dev or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous {torch_dtype} tensor of shape {shape} on {dev}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev)
        tensors = []
        for i, item in enumerate(items):
            pixels = decode_image(item, i, spec)
            if isinstance(pixels, np.ndarray):
                with warnings.catch_warnings():  # arrays of PIL images are read-only; torch only reads
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    host = torch.from_numpy(np.ascontiguousarray(pixels))
                pixels = host.to(dev, non_blocking=True)
            elif pixels.device != dev:
                pixels = pixels.to(dev).contiguous()
            pixels.record_stream(stream)  # keep the memory until the kernel has read it
            tensors.append(pixels)
        views = [
            (t.data_ptr(), t.shape[0], t.shape[1], 1 if t.ndim == 2 else t.shape[2], t.stride(0))
            for t in tensors
        ]
        runner, lock = _runner(dev.index)
        with lock:
            runner.enqueue(
                views, spec._params, getattr(_C.OutputDType, dtype), out.data_ptr(), stream.cuda_stream
            )
    return out
