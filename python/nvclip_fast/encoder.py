"""``Encoder``: images and text in, CLIP embeddings out, over TensorRT, ONNX Runtime or PyTorch.

Images go through the image pipeline (``pipeline``) into the native ``BatchQueue``: every caller's
images are copied into one staging ring, batched together (up to ``max_batch`` images or
``max_delay_ms``), preprocessed by ``resize_normalize`` straight into the engine's input and run on
one of ``streams`` slots. On several devices (``device="cuda:0,1"``, ``"cuda:all"``, or CPU
replicas ``["cpu", "cpu"]``) each device runs a replica of the image engine with its own slots
behind the same queue. Text is tokenized in Python (no torch needed) and run on the text tower (on
the first device) synchronously.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import string
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _C, cache, metadata, trt_library
from ._C import EngineError
from .bundle import Towers, cpu_only, load_bundle, load_open_clip, tensorrt_unavailable_reason
from .devices import check_cuda, device_string, parse_devices
from .images import as_image_list
from .metadata import PreprocessSpec
from .pipeline import ImagePipeline, ItemError, Merge, QueueOptions, Stream, l2_normalize
from .provenance import Provenance
from .tokenizer import Tokenizer

ON_ERROR = ("raise", "nan")
OUTPUTS = ("numpy", "torch")
DEFAULT_TEMPLATE = "a photo of a {}."
# Zero-shot logits scale when the bundle has no sidecar: CLIP's learned temperature ends at its cap, 100.
DEFAULT_LOGIT_SCALE = 100.0

log = logging.getLogger(__name__)


def check_template(template: str) -> None:
    """A zero-shot prompt template holds exactly one ``{}`` (where the label goes) and no other
    field; literal braces are written ``{{`` and ``}}``. ValueError saying what is wrong."""
    literal = "write literal braces as '{{' and '}}'"
    if not isinstance(template, str):
        raise TypeError(f"template must be a str, got {type(template).__name__}")
    try:
        fields = [
            (name, spec, conv)
            for _, name, spec, conv in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as e:
        raise ValueError(f"template {template!r}: {e}; {literal}") from e
    if fields != [("", "", None)]:
        others = [
            "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            for name, spec, conv in fields
        ]
        found = others or "none"
        raise ValueError(
            f"template {template!r}: expected exactly one '{{}}' for the label, found {found}; {literal}"
        )


def top_labels(probs: np.ndarray, labels: Sequence[str], top_k: int) -> list[tuple[str, float]]:
    """The ``top_k`` (label, probability) pairs of one row, most probable first; [] for a NaN row."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if np.isnan(probs).any():
        return []
    top = np.argsort(-probs, kind="stable")[:top_k]
    return [(labels[k], float(probs[k])) for k in top]


class Encoder:
    """CLIP embeddings of images and text.

    ``Encoder.from_pretrained("ViT-B-32", pretrained="laion2b_s34b_b79k")`` exports a model once
    into the bundle cache and runs it on the best engine of the device; ``Encoder("vith")`` runs an
    exported bundle (named by its stem or any of its files: ``vith.plan`` asks for TensorRT,
    ``vith.onnx`` for ONNX Runtime, the stem or ``vith.json`` for the best engine here);
    ``Encoder.from_open_clip(...)`` runs the open_clip model in PyTorch. Without a sidecar the input
    size is read from the engine and open_clip's default preprocessing is used, with a warning.

    On the CPU, ``engine`` chooses what runs an ONNX bundle: ``"auto"`` OpenVINO for fp32 bundles
    where it is installed (``nvclip-fast[openvino]``) on an x86-64 CPU, where it measured faster,
    else ONNX Runtime; or ``"onnxruntime"``, ``"openvino"``. ``precision``: None runs the bundle as
    exported (fp32: exact with open_clip); ``"bf16"`` runs an fp32 bundle in bf16 on OpenVINO where
    the CPU has native bf16 (AVX512_BF16 or AMX; else EngineError), about twice as fast, each tower
    first checked against fp32 on built-in inputs (cosine >= 0.999, else EngineError naming it).
    :attr:`engine` and :attr:`precision` say what runs.

    Thread-safe: any number of threads may call :meth:`embed` / :meth:`submit` at once, and their
    images are batched together. The keyword ``options`` of every constructor are the queue settings
    (:class:`~nvclip_fast.pipeline.QueueOptions`: ``max_batch``, ``max_delay_ms``, ``streams``,
    ``staging_mb``, ``threads``, ``decode_ahead_mb``).

    ``device``: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or several devices, one image engine
    on each behind one queue: ``"cuda:0,1"``, ``["cuda:0", "cuda:1"]``, ``"cuda:all"``, or CPU
    replicas that split ``threads`` between them (``["cpu", "cpu"]``, ``"cpu,cpu"``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str | Sequence[str] = "auto",
        engine: str = "auto",
        precision: str | None = None,
        **options: Any,
    ):
        settings = QueueOptions(**options)
        towers = load_bundle(Path(path), device, settings.threads, engine=engine, precision=precision)
        self._start(towers, settings)

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        pretrained: str | None = None,
        weights: str | os.PathLike[str] | None = None,
        random_weights: bool = False,
        image_size: int | None = None,
        precision: str = "fp32",
        engine: str = "auto",
        device: str | Sequence[str] = "auto",
        text: bool | None = True,
        progress: bool | None = None,
        **options: Any,
    ) -> Encoder:
        """An open_clip or NVCLIP model by name, exported once into the bundle cache
        (:mod:`nvclip_fast.cache`) and run on the best engine of ``device``: a TensorRT plan where
        the device is a GPU and TensorRT loads (built here the first time: TensorRT's builder is
        needed then); else the ONNX towers under ONNX Runtime, with its CUDA provider on a GPU where
        onnxruntime-gpu has one; on a GPU with neither, the open_clip model in PyTorch (not cached);
        else ONNX Runtime on the CPU.

        Exactly one of ``pretrained`` (an open_clip tag, downloaded once), ``weights`` (a checkpoint
        file) or ``random_weights`` (seeded: the same meaningless weights every time; tests only).
        ``text``: True needs the text tower (an error before any export when its tokenizer cannot be
        had from local files), False exports the image tower only, None includes it where it can.
        The first call exports (the ``export`` extra: torch, open_clip, onnx; ``progress`` shows its
        stages, None leaving it to tqdm); later calls load the cached bundle, without torch.
        ``precision``: "fp32" (exact with open_clip), "fp16" (exported in fp16, for GPUs) or "bf16"
        (exported in fp32, run in bf16 on the CPU by OpenVINO); ``engine``: what runs the ONNX
        towers (see the class). ``options`` are the queue settings, as for the constructor."""
        # bf16 is how an fp32 bundle runs on the CPU; a CPU engine named runs the ONNX towers.
        run_precision = "bf16" if precision == "bf16" else None
        exported = "fp32" if run_precision is not None else precision
        on_cpu = cpu_only(engine, run_precision)
        common = {
            "model": model,
            "pretrained": pretrained,
            "weights": None if weights is None else os.fspath(weights),
            "random_weights": random_weights,
            "image_size": image_size,
            "precision": exported,
            "max_batch": max(metadata.DEFAULT_MAX_BATCH, options.get("max_batch") or 0),
        }
        cache.Request(**common)  # bad arguments fail here, before any device work
        devices = parse_devices(device)
        kind = devices.kind
        if on_cpu and kind == "cuda":
            raise ValueError(f"engine={engine!r}, precision={precision!r} run on the CPU: use device='cpu'")
        if kind == "auto":
            kind = "cuda" if _C.cuda_device_count() > 0 and not on_cpu else "cpu"
        target: dict[str, Any] = {"engine": "onnx"}
        if kind == "cuda":
            for index in devices.indices:
                check_cuda(index)
            if engine == "auto":  # several GPUs: chosen on the first
                target = _gpu_target(devices.indices[0], common)
            if target["engine"] == "torch":
                return cls.from_open_clip(
                    model,
                    weights=weights,
                    pretrained=pretrained,
                    random_weights=random_weights,
                    image_size=image_size,
                    device=device,
                    precision=precision,
                    **options,
                )
        requests = {x: cache.Request(**common, text=x, **target) for x in (True, False)}
        request = requests[text is not False]
        if text is None:
            request = (
                next((r for r in requests.values() if cache.lookup(r)[0] is not None), None)
                or (requests[_text_available(model)])
            )
        entry, _ = cache.get(request, progress=progress)
        encoder = cls(entry.bundle, device=device, engine=engine, precision=run_precision, **options)
        source = request.source if run_precision is None else {**request.source, "precision": run_precision}
        encoder._towers = dataclasses.replace(encoder._towers, source=source)
        return encoder

    @classmethod
    def from_open_clip(
        cls,
        model: str,
        *,
        weights: str | os.PathLike[str] | None = None,
        pretrained: str | None = None,
        random_weights: bool = False,
        image_size: int | None = None,
        device: str | Sequence[str] = "auto",
        precision: str = "fp32",
        **options: Any,
    ) -> Encoder:
        """An open_clip model run in PyTorch (GPU without TensorRT, or CPU): exactly one of
        ``weights`` (a checkpoint), ``pretrained`` (an open_clip tag) or ``random_weights``."""
        settings = QueueOptions(**options)
        towers = load_open_clip(
            model,
            weights=weights,
            pretrained=pretrained,
            random_weights=random_weights,
            image_size=image_size,
            device=device,
            precision=precision,
            max_batch=settings.max_batch,
        )
        return cls._over(towers, settings)

    @classmethod
    def from_engine(
        cls,
        image: _C.Engine | Sequence[_C.Engine],
        spec: PreprocessSpec,
        *,
        text: _C.Engine | None = None,
        tokenizer: Callable[[], Tokenizer] | None = None,
        name: str = "custom",
        logit_scale: float | None = None,
        logit_bias: float | None = None,
        **options: Any,
    ) -> Encoder:
        """An Encoder over engines of your own (``_C.Engine`` subclasses or ``_C.TrtEngine``): the
        image engine takes ``[B, 3, S, S]`` (S = ``spec.size``) and returns ``[B, D]`` (a list of
        such engines: one replica each, all on CPU or all on CUDA devices, behind one queue);
        ``tokenizer`` makes the text engine's token ids (called once, on first use)."""
        images = (image,) if isinstance(image, _C.Engine) else tuple(image)
        if not images:
            raise ValueError("from_engine needs at least one image engine")
        text_engine = (lambda: text) if text is not None else None
        dim = images[0].info.outputs[0].shape[1]
        towers = Towers(images, text_engine, spec, tokenizer, dim, name, logit_scale, logit_bias)
        return cls._over(towers, QueueOptions(**options))

    @classmethod
    def _over(cls, towers: Towers, options: QueueOptions) -> Encoder:
        encoder = cls.__new__(cls)
        encoder._start(towers, options)
        return encoder

    def _start(self, towers: Towers, options: QueueOptions) -> None:
        self._towers = towers
        self._engine_sha256: str | None = None
        self._images = ImagePipeline(towers.images, towers.spec, options)
        self._text_lock = threading.Lock()
        self._text_engine: _C.Engine | None = None
        self._text_runner: _C.EngineRunner | None = None
        self._tokenizer: Tokenizer | None = None
        self._label_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], np.ndarray] = {}

    # -- properties -----------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self._towers.embed_dim

    @property
    def spec(self) -> PreprocessSpec:
        """The preprocessing applied to every image."""
        return self._towers.spec

    @property
    def device(self) -> str:
        """Where the image engines run: ``"cpu"``, ``"cuda:0"``; several: ``"cuda:0,1"``, ``"cpu,cpu"``."""
        return device_string(self._towers.images)

    @property
    def max_batch(self) -> int:
        return self._images.queue.max_batch

    def stats(self) -> dict[str, Any]:
        """The queue's counters: batches run (and failed), images, requests, the largest batch,
        ``batch_sizes`` ({batch size: batches run}), ``queued_images`` (accepted, not yet running),
        ``replicas`` (per device: ``device``, ``batches``, ``failed_batches``, ``images``)."""
        return dict(self._images.queue.stats())

    @property
    def model(self) -> str:
        return self._towers.name

    @property
    def source(self) -> dict[str, Any] | None:
        """How to open the same model again: ``{"bundle": "/abs/path/vith.json"}`` for
        ``Encoder(path)``, or the keyword arguments of ``Encoder.from_pretrained`` (``model``,
        ``pretrained`` | ``weights`` | ``random_weights``, ...) for a model opened by name; None for
        engines of your own."""
        return None if self._towers.source is None else dict(self._towers.source)

    @property
    def engine(self) -> str:
        """What runs the towers: ``"tensorrt"``, ``"onnxruntime"``, ``"openvino"``, ``"torch"`` or
        ``"custom"``."""
        return self._towers.engine

    @property
    def precision(self) -> str:
        """The engines' arithmetic: ``"fp32"``, ``"fp16"`` or ``"bf16"``."""
        return self._towers.precision

    @property
    def metadata(self) -> metadata.Metadata | None:
        """The bundle's sidecar (None without one, or for from_open_clip)."""
        return self._towers.meta

    @property
    def logit_scale(self) -> float | None:
        return self._towers.logit_scale

    def provenance(self, *, dtype: str = "float32", normalized: bool = True) -> Provenance:
        """What identifies this Encoder's embeddings, as every output records it: model, the weights'
        sha256 (from the sidecar; where it is unknown, as for random weights or an engine without
        sidecar, the sha256 of the image engine's files instead), preprocessing, embed dim, the
        engines' precision, ``normalized``, the stored ``dtype``, and how to open the model again."""
        towers = self._towers
        engine_sha256 = None
        if towers.weights_sha256 is None and towers.engine_files:
            if self._engine_sha256 is None:
                self._engine_sha256 = metadata.sha256_file(*towers.engine_files)
            engine_sha256 = self._engine_sha256
        return Provenance(
            model=self.model,
            embed_dim=self.dim,
            preprocess=dataclasses.asdict(self.spec),
            precision=self.precision,
            weights_sha256=towers.weights_sha256,
            engine_sha256=engine_sha256,
            normalized=normalized,
            dtype=dtype,
            source=towers.source,
        )

    @property
    def logit_bias(self) -> float | None:
        return self._towers.logit_bias

    # -- images ---------------------------------------------------------------------------------

    def submit(
        self, images: Any, *, normalize: bool = True, on_error: str = "raise", output: str = "numpy"
    ) -> concurrent.futures.Future:
        """Queue ``images`` and return a Future of their (N, D) float32 embeddings, in order.

        ``images`` takes what :func:`nvclip_fast.preprocess` takes: a sequence of uint8 numpy arrays
        (H, W, 3) RGB, (H, W) gray, (H, W, 4) RGBA, PIL images, file paths, encoded bytes, uint8
        torch tensors (C, H, W) as torchvision gives them, or an (N, H, W, C) array / (N, C, H, W)
        tensor. Files and bytes are decoded here, in parallel, at most ``decode_ahead_mb`` of pixels
        ahead of the queue (so memory stays bounded); this call returns once all are queued. With
        ``on_error="raise"`` the first bad item raises ``ItemError`` (a ValueError naming its index:
        one that cannot be decoded, or that preprocessing refuses); with ``on_error="nan"`` bad items
        get NaN rows. ``normalize``
        L2-normalizes the rows (the exported engines already do). ``output``: ``"numpy"`` or
        ``"torch"``. Callbacks added to the Future run on the queue's completion thread: they must
        not wait on this Encoder.
        """
        self._check_args(on_error, output)

        def finish(merge: Merge) -> Any:
            if merge.errors and on_error == "raise":
                index = min(merge.errors)
                raise ItemError(index, merge.errors[index])
            return self._convert(l2_normalize(merge.rows) if normalize else merge.rows, output)

        return self._images.submit(as_image_list(images), finish, raise_item_errors=on_error == "raise")

    def embed(
        self, images: Any, *, normalize: bool = True, on_error: str = "raise", output: str = "numpy"
    ) -> Any:
        """(N, D) float32 embeddings of ``images``, in order (N = 0 included). See :meth:`submit`."""
        return self.submit(images, normalize=normalize, on_error=on_error, output=output).result()

    def _check_args(self, on_error: str, output: str) -> None:
        if self._images.closed:
            raise EngineError("this Encoder is closed")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")

    def submit_pixels(self, pixels: Sequence[np.ndarray]) -> concurrent.futures.Future:
        """Queue decoded host pixels (``decode_image``'s arrays: uint8 (H, W) or (H, W, 3), packed
        pixels) and return a Future of ``(rows, item_errors)``: the engine's (n, D) float32 rows as
        they come out, and per image "" or why preprocessing refused it (its row is NaN). An engine
        failure sets the Future's exception (EngineError)."""
        self._check_args("raise", "numpy")
        n = len(pixels)
        errors = lambda m: (m.rows, [m.errors.get(k, "") for k in range(n)])  # noqa: E731
        return self._images.submit(list(pixels), errors, raise_item_errors=True)

    def _stream(
        self, items: Sequence[Any], *, load: Callable[[Any], Any] | None, batch: int, workers: int
    ) -> Stream:
        """The bulk jobs' way in (``embed_files``): groups of items in order, each item with its
        L2-normalized row or its error, a few batches in flight, decoded on ``workers`` threads
        (``load`` runs there). See :class:`~nvclip_fast.pipeline.Stream`."""
        return self._images.stream(items, load=load, batch=batch, workers=workers)

    @staticmethod
    def _convert(result: np.ndarray, output: str) -> Any:
        if output == "torch":
            import torch

            return torch.from_numpy(result)
        return result

    # -- text -----------------------------------------------------------------------------------

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """open_clip's token ids for ``texts`` (int64, (M, context_length))."""
        if self._towers.tokenizer is None:
            raise EngineError(f"{self.model}: no tokenizer is known for this bundle")
        with self._text_lock:
            if self._tokenizer is None:
                self._tokenizer = self._towers.tokenizer()
        return self._tokenizer(texts)

    def embed_text(self, texts: str | Sequence[str], *, normalize: bool = True, output: str = "numpy") -> Any:
        """(M, D) float32 embeddings of ``texts``, in order."""
        self._check_args("raise", output)
        if self._towers.text is None:
            raise EngineError(f"{self.model}: this bundle has no text tower (exported with --no-text?)")
        ids = self.tokenize(texts)
        parts = []
        with self._text_lock:
            if self._text_runner is None:
                self._text_engine = self._towers.text()
                self._text_runner = _C.EngineRunner(self._text_engine)
            info = self._text_engine.info
            spec_in, spec_out, limit = info.inputs[0], info.outputs[0], info.batch[2]
            if ids.shape[1] != spec_in.shape[1]:
                raise EngineError(
                    f"the tokenizer gives {ids.shape[1]} tokens but the text tower takes {spec_in.shape[1]}"
                )
            ids = ids.astype(spec_in.dtype, copy=False)
            for start in range(0, len(ids), limit):
                parts.append(self._text_runner.run({spec_in.name: ids[start : start + limit]})[spec_out.name])
        result = (
            np.concatenate(parts).astype(np.float32, copy=False)
            if parts
            else np.zeros((0, self.dim), np.float32)
        )
        return self._convert(l2_normalize(result) if normalize else result, output)

    # -- zero-shot classification ---------------------------------------------------------------

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """(L, D) text embeddings of ``labels``, prompt-ensembled: each label's templates embedded,
        averaged, renormalized (CLIP's zero-shot recipe). Cached per (labels, templates)."""
        labels, templates = list(labels), list(templates or [DEFAULT_TEMPLATE])
        if not labels:
            raise ValueError("labels is empty")
        for t in templates:
            check_template(t)
        key = (tuple(labels), tuple(templates))
        with self._text_lock:
            cached = self._label_cache.get(key)
        if cached is not None:
            return cached
        prompts = [t.format(label) for label in labels for t in templates]
        per_prompt = self.embed_text(prompts).reshape(len(labels), len(templates), self.dim)
        embeds = l2_normalize(per_prompt.mean(axis=1))
        with self._text_lock:
            self._label_cache[key] = embeds
        return embeds

    def label_probabilities(self, image_embeds: np.ndarray, label_embeds: np.ndarray) -> np.ndarray:
        """(N, L) softmax over labels of ``logit_scale * image @ label.T`` (NaN rows stay NaN)."""
        scale = self.logit_scale if self.logit_scale is not None else DEFAULT_LOGIT_SCALE
        logits = scale * (l2_normalize(np.asarray(image_embeds, np.float32)) @ label_embeds.T)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def classify(
        self,
        images: Any,
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        top_k: int = 5,
        *,
        on_error: str = "raise",
    ) -> list[list[tuple[str, float]]]:
        """Zero-shot: per image, the ``top_k`` (label, probability) pairs, most probable first.
        Text embeddings are computed once per (labels, templates). With ``on_error="nan"`` a bad
        image gets an empty list."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        text = self.label_embeddings(labels, templates)
        probs = self.label_probabilities(self.embed(images, on_error=on_error), text)
        return [top_labels(row, labels, top_k) for row in probs]

    # -- lifetime -------------------------------------------------------------------------------

    def close(self, cancel: bool = False) -> None:
        """Finish the work in flight (``cancel=True``: fail it with an error) and release the engines.
        From any thread, a Future's done-callback included (the queue is then closed by a thread of
        its own, which a later close() waits for); calling it again does no harm."""
        self._images.close(cancel=cancel)
        with self._text_lock:
            if self._text_runner is not None:
                self._text_runner.close()
                self._text_runner = None

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # Leaving on an exception (Ctrl-C included), nobody waits for the work in flight: cancel it.
        self.close(cancel=exc_type is not None)

    def __repr__(self) -> str:
        return (
            f"Encoder({self.model!r}, dim={self.dim}, device={self.device!r}, engine={self.engine!r}, "
            f"precision={self.precision!r}, max_batch={self.max_batch}, size={self.spec.size})"
        )


def _gpu_target(index: int, common: dict[str, Any]) -> dict[str, Any]:
    """The engine of a model opened by name (``common``: the cache request's fields) on CUDA device
    ``index``: a TensorRT entry where a plan can run (cached already, or TensorRT's builder is here
    to build it), else ONNX with the CUDA provider where onnxruntime-gpu has one, else
    ``{"engine": "torch"}`` where torch has CUDA, else ONNX (which then says what is missing)."""
    from .engines import cuda_provider_available

    device = f"cuda:{index}"
    reason = tensorrt_unavailable_reason(device)
    if reason is None:
        gpu = _C.cuda_device(index)
        plan = {
            "engine": "tensorrt",
            "tensorrt": trt_library.load().version,
            "gpu": f"{gpu['name']} ({gpu['compute_capability']})",
        }
        from .trt_build import unavailable_reason

        cached = any(cache.lookup(cache.Request(**common, text=x, **plan))[0] for x in (True, False))
        if cached or (reason := unavailable_reason()) is None:
            return plan
    log.info("%s: no TensorRT plan (%s)", device, reason)
    if cuda_provider_available():
        return {"engine": "onnx"}
    try:
        import torch
    except ImportError:
        return {"engine": "onnx"}
    return {"engine": "torch"} if torch.cuda.is_available() else {"engine": "onnx"}


def _text_available(model: str) -> bool:
    """Whether the text tower of ``model`` can be exported here (its tokenizer from local files)."""
    from .models import TokenizerUnavailableError, require_offline_tokenizer

    try:
        require_offline_tokenizer(model)
    except TokenizerUnavailableError as e:
        log.info("%s: exporting the image tower only: %s", model, str(e).split(". ", 1)[0])
        return False
    return True
