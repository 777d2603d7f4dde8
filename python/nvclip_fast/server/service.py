"""The embedding service behind the routes: one Encoder, loaded in the background, shared by every
request; images through the Encoder's batch queue, texts through a micro-batcher on the text tower.

Nothing here blocks the event loop: the model loads in a thread; each request's images are
base64-decoded, checked and submitted from a worker thread (``Encoder.submit`` decodes them and
copies them into the queue's staging ring, which may wait while the ring is full), and the Future it
returns is awaited with ``asyncio.wrap_future``; text batches run in one thread of their own (the
text tower runs one batch at a time).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .._C import EngineError
from ..encoder import Encoder, ItemError
from .inputs import ImageInput, TextInput, image_bytes, split_inputs
from .metrics import Metrics
from .schema import ApiError
from .settings import RETRY_AFTER_S, Settings

log = logging.getLogger("nvclip_fast.server")

# Worker threads per core that decode base64 and submit images. They mostly wait (on the Encoder's
# own decoding pool and its staging ring), so there are more of them than cores.
SUBMIT_THREADS_PER_CORE = 4
# CLIP's and BERT's tokenizers pad with id 0: the other ids are the text's tokens (start/end included).
PAD_ID = 0
WARM_UP_TEXT = "a photo of a cat"
_ITEM_PREFIX = re.compile(r"^images\[\d+\]: ")


@dataclass(frozen=True)
class Embedded:
    """The rows of one request, in input order, and what they used."""

    rows: np.ndarray  # (n, D) float32, L2-normalized
    num_images: int
    prompt_tokens: int


def _unavailable(message: str, code: str) -> ApiError:
    return ApiError(
        http.HTTPStatus.SERVICE_UNAVAILABLE, message, code=code, headers={"Retry-After": str(RETRY_AFTER_S)}
    )


@dataclass
class _TextJob:
    texts: list[str]
    future: asyncio.Future


class TextBatcher:
    """Runs the texts of concurrent requests together: waits for the first request, takes every
    request that arrives within ``delay_s`` (up to ``max_batch`` texts; a request is never split),
    runs them as one call of ``run`` in ``pool``, hands each request its rows."""

    def __init__(
        self,
        run: Callable[[list[str]], tuple[np.ndarray, np.ndarray]],
        pool: concurrent.futures.Executor,
        *,
        max_batch: int,
        delay_s: float,
        metrics: Metrics,
    ):
        self._run = run
        self._pool = pool
        self._max_batch = max_batch
        self._delay_s = delay_s
        self._metrics = metrics
        self._jobs: asyncio.Queue[_TextJob] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="nvclip-text-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while not self._jobs.empty():  # nothing may wait forever
            job = self._jobs.get_nowait()
            if not job.future.done():
                job.future.set_exception(_unavailable("the server is shutting down", "shutting_down"))

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(rows (n, D), tokens per text (n,)) of ``texts``."""
        job = _TextJob(texts, asyncio.get_running_loop().create_future())
        self._jobs.put_nowait(job)
        return await job.future

    async def _next_batch(self) -> list[_TextJob]:
        batch = [await self._jobs.get()]
        count = len(batch[0].texts)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._delay_s
        while count < self._max_batch:
            if self._jobs.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._jobs.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                job = self._jobs.get_nowait()
            batch.append(job)
            count += len(job.texts)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            texts = [t for job in batch for t in job.texts]
            self._metrics.text_batch_size.observe(len(texts))
            self._metrics.text_batch_requests.observe(len(batch))
            try:
                rows, tokens = await loop.run_in_executor(self._pool, self._run, texts)
            except Exception as e:  # the whole batch failed: each of its requests gets the error
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            start = 0
            for job in batch:
                end = start + len(job.texts)
                if not job.future.done():  # a request cancelled meanwhile
                    job.future.set_result((rows[start:end], tokens[start:end]))
                start = end


class EmbeddingService:
    """One Encoder behind an HTTP API. ``start()`` loads it (``load`` runs in a thread), embeds a
    warm-up image (and text, which also tells whether texts can be embedded), then ``ready`` is
    True. ``embed(items)`` embeds one request's inputs; ``close()`` finishes the work in flight and
    closes the Encoder. Routes added by other modules reach it through ``request.app.state.service``
    (or the ``service`` dependency of :mod:`nvclip_fast.server.app`)."""

    def __init__(
        self,
        load: Callable[[], Encoder],
        settings: Settings,
        metrics: Metrics,
        on_load_failure: Callable[[BaseException], None] | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self._load = load
        self._on_load_failure = on_load_failure
        self._encoder: Encoder | None = None
        self._loading: asyncio.Future | None = None
        self._batcher: TextBatcher | None = None
        self.load_error: BaseException | None = None
        self.text_unavailable: str | None = None  # why texts cannot be embedded (None: they can)
        self.created = int(time.time())
        self.stopping = False
        self._queued = 0
        threads = SUBMIT_THREADS_PER_CORE * (os.cpu_count() or 1)
        self._submit_pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="nvclip-submit")
        self._text_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nvclip-text")

    # -- state ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._encoder is not None and self._batcher is not None and not self.stopping

    @property
    def encoder(self) -> Encoder:
        """The loaded Encoder; ApiError 503 (with Retry-After) while loading or shutting down."""
        if self.load_error is not None:
            raise ApiError(503, f"the model could not be loaded: {self.load_error}", code="load_failed")
        if self.stopping:
            raise _unavailable("the server is shutting down", "shutting_down")
        if not self.ready:
            raise _unavailable("the model is loading; retry shortly", "not_ready")
        assert self._encoder is not None
        return self._encoder

    @property
    def model_name(self) -> str:
        return self.settings.model_name or self.encoder.model

    # -- lifetime ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model and warm it up, in threads; on failure keep the error (``load_error``) and
        call ``on_load_failure``."""
        loop = asyncio.get_running_loop()
        self._loading = loop.run_in_executor(self._submit_pool, self._load_and_warm_up)
        try:
            encoder = await asyncio.shield(self._loading)
        except Exception as e:
            self.load_error = e
            log.error("the model could not be loaded: %s", e, exc_info=e)
            if self._on_load_failure is not None:
                self._on_load_failure(e)
            return
        self.metrics.watch_queue(encoder.stats)
        self._batcher = TextBatcher(
            self._run_texts,
            self._text_pool,
            max_batch=self.settings.text_batch,
            delay_s=self.settings.text_delay_ms / 1000,
            metrics=self.metrics,
        )
        self._batcher.start()
        self._encoder = encoder
        self.metrics.ready.set(1)
        log.info(
            "ready: %s (%d-d, %d px, device %s, %s %s, max batch %d)%s",
            self.settings.model_name or encoder.model,
            encoder.dim,
            encoder.spec.size,
            encoder.device,
            encoder.engine,
            encoder.precision,
            encoder.max_batch,
            "" if self.text_unavailable is None else f"; texts cannot be embedded: {self.text_unavailable}",
        )

    def _load_and_warm_up(self) -> Encoder:
        encoder = self._load()
        try:
            size = encoder.spec.size
            encoder.embed([np.zeros((size, size, 3), np.uint8)])
            try:
                encoder.embed_text([WARM_UP_TEXT])
            except (EngineError, ImportError, OSError, ValueError) as e:  # no text tower or tokenizer
                self.text_unavailable = str(e)
        except BaseException:
            encoder.close()
            raise
        return encoder

    async def close(self) -> None:
        """Stop taking requests, finish what is in flight, close the Encoder."""
        self.stopping = True
        self.metrics.ready.set(0)
        if self._batcher is not None:
            await self._batcher.stop()
        if self._loading is not None:
            # A load still running finishes first (a thread cannot be interrupted); then it is closed.
            await asyncio.gather(self._loading, return_exceptions=True)
        if self._loading is not None and self._loading.done() and self._loading.exception() is None:
            encoder = self._loading.result()
            await asyncio.get_running_loop().run_in_executor(None, encoder.close)
        self._submit_pool.shutdown(wait=False, cancel_futures=True)
        self._text_pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped: the model is closed")

    # -- embedding --------------------------------------------------------------------------------

    async def embed(self, items: Sequence[str]) -> Embedded:
        """The rows of ``items`` (texts and image data URLs), in order. Raises ApiError: 422/413 for
        a bad input (naming it), 503 when the queue is full or the model is not ready, 500 when
        the engine fails (only the requests of the failed batch fail)."""
        encoder = self.encoder
        texts, images = split_inputs(list(items), self.settings.max_image_bytes)
        outcome = "error"
        try:
            rows, tokens = await self._embed_queued(encoder, len(items), texts, images)
            outcome = "ok"
        finally:
            self.metrics.items.labels("image", outcome).inc(len(images))
            self.metrics.items.labels("text", outcome).inc(len(texts))
        return Embedded(rows, len(images), tokens)

    async def _embed_queued(
        self, encoder: Encoder, n: int, texts: list[TextInput], images: list[ImageInput]
    ) -> tuple[np.ndarray, int]:
        if texts and self.text_unavailable is not None:
            raise ApiError(
                400,
                f"input[{texts[0].index}]: this model cannot embed texts: {self.text_unavailable}",
                code="text_unsupported",
                param=f"input[{texts[0].index}]",
            )
        if self._queued + n > self.settings.max_queued:
            raise _unavailable(
                f"the server is busy: {self._queued} inputs queued, the limit is {self.settings.max_queued}",
                "queue_full",
            )
        self._queued += n
        self.metrics.queued.set(self._queued)
        try:
            image_rows, text_result = await asyncio.gather(
                self._embed_images(encoder, images), self._embed_texts(texts), return_exceptions=True
            )
        finally:
            self._queued -= n
            self.metrics.queued.set(self._queued)
        for outcome in (image_rows, text_result):
            if isinstance(outcome, BaseException):
                raise outcome
        text_rows, tokens = text_result
        rows = np.empty((n, encoder.dim), np.float32)
        if images:
            rows[[im.index for im in images]] = image_rows
        if texts:
            rows[[t.index for t in texts]] = text_rows
        return rows, int(tokens.sum())

    async def _embed_texts(self, texts: list[TextInput]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        assert self._batcher is not None
        try:
            return await self._batcher.embed([t.text for t in texts])
        except EngineError as e:
            raise self._engine_error(e) from e

    def _run_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoder = self.encoder
        tokens = (encoder.tokenize(texts) != PAD_ID).sum(axis=1)
        return encoder.embed_text(texts), tokens

    async def _embed_images(self, encoder: Encoder, images: list[ImageInput]) -> np.ndarray:
        if not images:
            return np.zeros((0, encoder.dim), np.float32)
        loop = asyncio.get_running_loop()
        submitted = await loop.run_in_executor(self._submit_pool, self._submit_images, encoder, images)
        try:
            return await asyncio.wrap_future(submitted)
        except ItemError as e:  # refused by preprocessing
            raise _item_error(e, images) from e
        except EngineError as e:
            raise self._engine_error(e) from e

    def _engine_error(self, e: EngineError) -> ApiError:
        if self.stopping:  # close() cancelled what was left
            return _unavailable("the server is shutting down", "shutting_down")
        return ApiError(500, f"the engine failed on this request's batch: {e}", code="engine_error")

    def _submit_images(self, encoder: Encoder, images: list[ImageInput]) -> concurrent.futures.Future:
        raws = [image_bytes(image, self.settings.max_image_bytes) for image in images]
        try:
            return encoder.submit(raws, on_error="raise")
        except ItemError as e:  # could not be decoded
            raise _item_error(e, images) from e
        except EngineError as e:
            raise self._engine_error(e) from e


def _item_error(e: ItemError, images: list[ImageInput]) -> ApiError:
    index = images[e.index].index
    reason = _ITEM_PREFIX.sub("", e.reason)
    return ApiError(422, f"input[{index}]: {reason}", code="invalid_image", param=f"input[{index}]")
