"""open_clip's eval transform, bit-exact and fast: ``preprocess(images, spec)``.

``PreprocessSpec`` (defined with the sidecar schema, in ``metadata``) is the transform as data;
``preprocess`` runs it on the CPU twin or the CUDA kernel (``resize_normalize``).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _C
from .images import as_host_pixels, as_image_list, decode_image
from .metadata import (  # noqa: F401 (the spec and its constants, importable from here too)
    INTERPOLATIONS,
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    PASS_ORDERS,
    RESIZE_MODES,
    RGB_CHANNELS,
    PreprocessSpec,
    default_pass_order,
    pass_order_for_pillow,
)

DTYPES = ("float32", "float16")


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
    shape = (len(items), RGB_CHANNELS, spec.size, spec.size)
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
