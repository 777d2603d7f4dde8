"""The one image pipeline, used by ``Encoder`` and by the bulk jobs (``embed_files``, ``classify_files``).

    items ─► decode ahead ─► groups ─► BatchQueue.submit ─► Merge ─► rows in the caller's order
             (in order)                (copied into staging)        (one Future per call)

Files and bytes (all items, for a job that reads its inputs with ``load``) are decoded on a thread
pool, the rest in the caller's thread, at most ``DECODE_AHEAD_PER_THREAD`` items per thread and
``decode_ahead_mb`` of pixels per Encoder ahead of the queue: an image reserves its bytes from its
header, in item order, and waits until they fit (a call holding nothing takes any one image). A
group (the decoded items ready in order, at most a batch) is copied into the queue's staging ring
at once and its bytes given back. Every item ends as one row or one reason: why it could not be
decoded or why preprocessing refuses it (both known when it is decoded; a NaN row), or its batch's
engine error. A bulk job (:class:`Stream`) decodes and queues on a feeder thread, so that its
caller's thread only waits for rows: it gets each group as soon as it is back, and Ctrl-C at once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _C
from ._C import EngineError
from .devices import thread_shares
from .images import ENCODED, decode, is_torch_tensor
from .metadata import PreprocessSpec

MIB = 1 << 20
DECODE_AHEAD_PER_THREAD = 4  # items decoded ahead per thread: the queue stays fed while a file decodes
# Decoded pixels held ahead of the queue per Encoder: six 12-megapixel photos as they decode
# (Pillow's 4 bytes and the array's 3 per pixel), hundreds of 640 x 480 ones.
DEFAULT_DECODE_AHEAD_MB = 512
# Host staging ring: CPU engines need little (a batch of decoded images); for CUDA engines 0 lets
# the queue size it for (slots + 1) full batches of 640 x 480 photos (at least 256 MiB), where the
# slots are ``streams`` per device.
DEFAULT_STAGING_MB = {"cpu": 64, "cuda": 0}
# The bulk jobs keep this many batches of images queued ahead of the rows they hand back.
BATCHES_IN_FLIGHT = 4
# When max_batch is not given, the engine's optimal batch, but at most what keeps the engine's input
# buffers (one batch per stream) within this many bytes: a sidecar cannot make an Encoder allocate
# gigabytes at load (a CUDA engine's default staging ring follows the batch size).
ENGINE_INPUT_BUDGET = 512 * MIB
# How long a bulk job waits for its feeder thread after it stopped early (Ctrl-C): the feeder ends
# by itself once its current decode or staging copy is done.
FEEDER_JOIN_S = 1.0
# Set while one of this module's callbacks runs on a queue's completion thread (where a Future's
# done-callbacks run): close() there must not wait for the queue, which waits for the callback.
_completion = threading.local()


class ItemError(ValueError):
    """An image that could not be embedded: ``index`` in the caller's list and ``reason``."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"images[{index}]: {reason}")
        self.index = index
        self.reason = reason


@dataclass(frozen=True)
class QueueOptions:
    """How an Encoder feeds its image engine (its constructors' keyword arguments): ``max_batch``
    images per batch (None: the engine's optimal batch, at most what keeps ``ENGINE_INPUT_BUDGET`` of
    engine input over the streams of every device), waiting ``max_delay_ms`` to fill; ``streams``
    batches in flight per device; ``staging_mb`` of staging ring (None: 64 MiB for CPU engines; for
    CUDA engines (streams x devices + 1) full batches of 640 x 480 photos, at least 256 MiB);
    ``threads`` for decoding and preprocessing (and ONNX Runtime), None = every core, split between
    CPU replicas; ``decode_ahead_mb`` of decoded pixels held ahead of the queue, all callers
    together."""

    max_batch: int | None = None
    max_delay_ms: float = 2.0
    streams: int = 2
    staging_mb: int | None = None
    threads: int | None = None
    decode_ahead_mb: int = DEFAULT_DECODE_AHEAD_MB

    def __post_init__(self) -> None:
        mb = self.decode_ahead_mb
        if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
            raise ValueError(f"decode_ahead_mb must be an int >= 1, got {mb!r}")


@dataclass
class Item:
    """One of a call's items: ``pixels`` and stored ``size`` (W, H), then ``row``; or ``error``, ``cause``."""

    index: int
    pixels: np.ndarray | None = None
    size: tuple[int, int] = (-1, -1)
    row: np.ndarray | None = None
    error: str | None = None
    cause: BaseException | None = field(default=None, repr=False)
    held: int = field(default=0, repr=False)  # bytes counted against the decode-ahead budget


def _decoded(index: int, item: Any, spec: PreprocessSpec, load: Any, admit: Any) -> Item:
    """``item`` (after ``load``) as host pixels, or why not: an error in one item fails that item."""
    try:
        if load is not None:
            item = load(item)
        if is_torch_tensor(item) and item.is_cuda:
            item = item.cpu()  # the queue stages host memory; on the host RGBA goes through Pillow too
        pixels, size = decode(item, spec, admit)
        return Item(index, pixels, size)
    except (ValueError, TypeError) as e:
        return Item(index, error=str(e), cause=e)
    except MemoryError as e:
        return Item(index, error="not enough memory to decode this image", cause=e)
    except Exception as e:  # a decoder bug on one odd input fails that input, never the call
        return Item(index, error=f"cannot decode: {type(e).__name__}: {e}", cause=e)


class _Budget(threading.Condition):
    """The decoded bytes an Encoder's calls hold ahead of its queue (``held``), at most ``limit``."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.held = limit, 0


class _Turns:
    """One call's share of the budget: its decoders reserve in item order, each waiting until its
    bytes fit, or until the call holds nothing (then any one image gets through)."""

    def __init__(self, budget: _Budget):
        self._budget = budget
        self._next = 0
        self._held = 0
        self._closed = False

    def take(self, turn: int, n: int) -> None:
        budget = self._budget
        with budget:
            budget.wait_for(
                lambda: (
                    self._closed
                    or (self._next == turn and (n == 0 or self._held == 0 or budget.held + n <= budget.limit))
                )
            )
            if not self._closed:
                self._next += 1
                self._add(n)

    def give(self, n: int) -> None:
        with self._budget:
            if not self._closed:
                self._add(-n)

    def close(self) -> None:
        """Give back everything; decoders still waiting go on without waiting."""
        with self._budget:
            self._add(-self._held)
            self._closed = True

    def _add(self, n: int) -> None:
        self._held += n
        self._budget.held += n
        self._budget.notify_all()


class Merge:
    """The rows of one call's ``n`` items, in the caller's order: ``rows`` (NaN until the queue fills
    a position), ``errors`` {position: why preprocessing refused that image}. ``future`` resolves
    once every queued request is back and :meth:`seal` was called: with ``finish(self)`` (or what it
    raises), or with the first engine error."""

    def __init__(self, n: int, dim: int, finish: Callable[[Merge], Any]):
        self.rows = np.full((n, dim), np.nan, np.float32)
        self.errors: dict[int, str] = {}
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()
        self._finish = finish
        self._lock = threading.Lock()
        self._pending = 1  # the seal
        self._failure: BaseException | None = None

    def queue(self, queue: _C.BatchQueue, positions: Sequence[int], pixels: list[np.ndarray]) -> None:
        """Queue ``pixels`` (decoded host pixels) for ``positions``; returns once they are staged."""
        if not pixels:
            return
        positions = list(positions)
        with self._lock:
            self._pending += 1  # if submit raises, the call fails and this merge is dropped
        queue.submit(pixels, lambda request: self._back(positions, request))

    def _back(self, positions: list[int], request: _C.Request) -> None:
        _completion.active = True
        try:
            try:
                rows = request.result()
            except BaseException as e:  # EngineError: the batch failed, or the queue was closed
                with self._lock:
                    self._failure = self._failure or e
            else:
                self.rows[positions] = rows
                self.errors.update((positions[k], why) for k, why in enumerate(request.item_errors) if why)
            self.seal()
        finally:
            _completion.active = False

    def seal(self) -> None:
        """No more requests: the future resolves when the last one is back (now, if none is out)."""
        with self._lock:
            self._pending -= 1
            if self._pending:
                return
        try:
            if self._failure is not None:
                raise self._failure
            self.future.set_result(self._finish(self))
        except BaseException as e:  # a bug here must reach the caller, not vanish in a callback
            self.future.set_exception(e)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (NaN rows stay NaN)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return x / norms


def default_max_batch(info: _C.EngineInfo, streams: int) -> int:
    """The engine's optimal batch, at most what keeps ``streams`` batches of input within
    ``ENGINE_INPUT_BUDGET``."""
    spec = info.inputs[0]
    image_bytes = int(np.prod(spec.shape[1:])) * np.dtype(spec.dtype).itemsize
    return max(1, min(info.batch[1], ENGINE_INPUT_BUDGET // (max(streams, 1) * image_bytes)))


class ImagePipeline:
    """An Encoder's images: the native queue over its image engines (one replica per device, each
    with its own preprocessing stage; CPU replicas share ``threads``), the decoding threads and the
    decode-ahead budget all its calls share."""

    def __init__(self, engines: Sequence[_C.Engine], spec: PreprocessSpec, options: QueueOptions):
        device = engines[0].info.device
        shares = thread_shares(options.threads, len(engines))
        self.stages = [  # one per replica, each with its share of the CPU threads
            _C.ResizeNormalizeStage(spec._params, e.info.device, n or 0)
            for e, n in zip(engines, shares, strict=True)
        ]
        staging_mb = options.staging_mb if options.staging_mb is not None else DEFAULT_STAGING_MB[device]
        self.queue = _C.BatchQueue(
            list(zip(engines, self.stages, strict=True)),
            max_batch=options.max_batch or default_max_batch(engines[0].info, options.streams * len(engines)),
            max_delay_ms=options.max_delay_ms,
            streams=options.streams,
            staging_bytes=staging_mb * MIB,
        )
        self.spec = spec
        self.dim = engines[0].info.outputs[0].shape[1]
        self.closed = False
        self._threads = options.threads or os.cpu_count() or 1
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="nvclip-decode")
        self._budget = _Budget(options.decode_ahead_mb * MIB)
        self._close_lock = threading.Lock()
        self._closer: threading.Thread | None = None

    def submit(
        self, items: Sequence[Any], finish: Callable[[Merge], Any], *, raise_item_errors: bool
    ) -> concurrent.futures.Future:
        """Decode and queue ``items``; returns once all are queued, with the call's one Future
        (``finish(merge)`` once the rows are back). A bad item's row stays NaN, or, with
        ``raise_item_errors``, an item that cannot be decoded raises ItemError at once."""
        merge = Merge(len(items), self.dim, finish)
        turns = _Turns(self._budget)
        try:
            with contextlib.closing(
                self._groups(items, self._pool, self._threads, self.queue.max_batch, turns)
            ) as groups:
                for group in groups:
                    good = [item for item in group if item.error is None]
                    if raise_item_errors and len(good) < len(group):
                        raise _first_error(merge, next(item for item in group if item.error is not None))
                    merge.queue(self.queue, [item.index for item in good], [item.pixels for item in good])
        except (RuntimeError, concurrent.futures.CancelledError) as e:
            if self.closed:  # close() shut the decoding pool down under us
                raise EngineError("this Encoder is closed") from e
            raise
        merge.seal()
        return merge.future

    def stream(
        self, items: Sequence[Any], *, load: Callable[[Any], Any] | None, batch: int, workers: int
    ) -> Stream:
        """A bulk job's items through the queue (see :class:`Stream`)."""
        return Stream(self, items, load=load, batch=batch, workers=workers)

    def _groups(
        self,
        items: Iterable[Any],
        pool: concurrent.futures.Executor,
        threads: int,
        batch: int,
        turns: _Turns,
        load: Callable[[Any], Any] | None = None,
    ) -> Iterator[list[Item]]:
        """The decode-ahead: ``items`` decoded in order, in groups of at most ``batch`` (those ready
        when the first is), their bytes taken in ``turns``. A group's bytes count against the budget
        until the next group is asked for: queue it before. Closing the generator cancels the decodes
        not yet taken."""
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        tickets = itertools.count()
        window = max(batch, threads * DECODE_AHEAD_PER_THREAD)
        numbered = enumerate(items)
        try:
            while True:
                for index, item in itertools.islice(numbered, window - len(pending)):
                    if load is not None or isinstance(item, ENCODED):
                        pending.append(
                            pool.submit(self._decode_turn, turns, next(tickets), index, item, load)
                        )
                    else:  # nothing worth a thread hop
                        pending.append(concurrent.futures.Future())
                        pending[-1].set_result(_decoded(index, item, self.spec, None, None))
                if not pending:
                    return
                group = [pending.popleft().result()]
                while pending and len(group) < batch and pending[0].done():
                    group.append(pending.popleft().result())
                yield group
                turns.give(sum(item.held for item in group))
                for item in group:
                    item.pixels = None
        finally:
            for future in pending:
                future.cancel()
            turns.close()

    def _decode_turn(self, turns: _Turns, ticket: int, index: int, item: Any, load: Any) -> Item:
        """One pooled item: its bytes reserved in its turn (from its header, or 0 if it fails before),
        then counted as what its pixels take."""
        taken: int | None = None

        def admit(n: int) -> None:
            nonlocal taken
            turns.take(ticket, n)
            taken = n

        try:
            decoded = _decoded(index, item, self.spec, load, admit)
        finally:
            if taken is None:
                turns.take(ticket, 0)
        decoded.held = decoded.pixels.nbytes if decoded.pixels is not None else 0
        turns.give((taken or 0) - decoded.held)
        return decoded

    def close(self, cancel: bool = False) -> None:
        """Close the queue (its work finished, or cancelled) and the decoding threads; from any
        thread. On the queue's completion thread (a Future's done-callback) the queue cannot wait for
        itself: a thread of its own closes it, and a later close() elsewhere waits for that thread."""
        with self._close_lock:
            first, self.closed = not self.closed, True
            if first:
                self._pool.shutdown(wait=False, cancel_futures=True)
                if getattr(_completion, "active", False):
                    self._closer = threading.Thread(
                        target=self.queue.close, kwargs={"cancel": cancel}, name="nvclip-close"
                    )
                    self._closer.start()
            closer = self._closer
        if getattr(_completion, "active", False):
            return
        if closer is not None:
            closer.join()
        self.queue.close(cancel=cancel)  # returns at once when already closed


def _first_error(merge: Merge, bad: Item) -> ItemError:
    """The ItemError of a call whose item ``bad`` could not be decoded: the first refused item, which
    may be an earlier one that preprocessing refused in the queue (waited for here)."""
    merge.seal()
    concurrent.futures.wait([merge.future])
    earlier = min(merge.errors, default=bad.index)
    if earlier < bad.index:
        return ItemError(earlier, merge.errors[earlier])
    error = ItemError(bad.index, str(bad.error))
    error.__cause__ = bad.cause
    return error


class Stream:
    """A bulk job's items through an Encoder's queue: decoded on ``workers`` threads of its own
    (``load`` turns an item into an image there) and queued by a feeder thread, in groups of at most
    ``batch``, up to ``BATCHES_IN_FLIGHT`` batches ahead of the rows handed out.

    Iterating gives the groups in item order, each as soon as its rows are back: lists of items, each
    with its L2-normalized ``row`` or its ``error``. The iterating thread only waits for results, so
    a KeyboardInterrupt reaches it at once; :meth:`finished` then gives the groups that were back
    but not handed out yet, and :meth:`close` (or leaving a ``with`` block) stops the feeder."""

    def __init__(
        self,
        pipeline: ImagePipeline,
        items: Sequence[Any],
        *,
        load: Callable[[Any], Any] | None,
        batch: int,
        workers: int,
    ):
        self._pipeline = pipeline
        self._turns = _Turns(pipeline._budget)
        self._cond = threading.Condition()
        self._queued: collections.deque[tuple[list[Item], list[Item], Merge]] = collections.deque()
        self._queued_items = 0
        self._limit = BATCHES_IN_FLIGHT * batch
        self._stopping = False
        self._fed = False
        self._failure: BaseException | None = None
        self._feeder = threading.Thread(
            target=self._feed, args=(items, load, batch, workers), name="nvclip-feed", daemon=True
        )
        self._feeder.start()

    def _feed(
        self, items: Sequence[Any], load: Callable[[Any], Any] | None, batch: int, workers: int
    ) -> None:
        pipeline = self._pipeline
        try:
            with (
                concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="nvclip-decode") as pool,
                contextlib.closing(
                    pipeline._groups(items, pool, workers, batch, self._turns, load)
                ) as groups,
            ):
                for group in groups:
                    good = [item for item in group if item.error is None]
                    merge = Merge(len(good), pipeline.dim, lambda m: l2_normalize(m.rows))
                    merge.queue(pipeline.queue, range(len(good)), [item.pixels for item in good])
                    merge.seal()
                    with self._cond:
                        self._queued.append((group, good, merge))
                        self._queued_items += len(group)
                        self._cond.notify_all()
                        self._cond.wait_for(lambda: self._stopping or self._queued_items <= self._limit)
                        if self._stopping:
                            return
        except BaseException as e:  # handed to the iterating thread, after the groups before it
            with self._cond:
                self._failure = e
        finally:
            with self._cond:
                self._fed = True
                self._cond.notify_all()

    def __iter__(self) -> Iterator[list[Item]]:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queued or self._fed)
                if not self._queued:
                    if self._failure is not None and not self._stopping:
                        raise self._failure
                    return
                head = self._queued[0]
            concurrent.futures.wait([head[2].future])
            settled = _settled(*head)
            with self._cond:
                self._queued.popleft()
                self._queued_items -= len(head[0])
                self._cond.notify_all()
            yield settled

    def finished(self) -> Iterator[list[Item]]:
        """The groups whose rows are back but were not handed out (after an interruption)."""
        with self._cond:
            done = [queued for queued in self._queued if queued[2].future.done()]
        for queued in done:
            yield _settled(*queued)

    def close(self) -> None:
        """Stop feeding: decodes not started are cancelled; waits briefly for the feeder."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._turns.close()
        self._feeder.join(FEEDER_JOIN_S)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _settled(group: list[Item], good: list[Item], merge: Merge) -> list[Item]:
    """A queued group's items once its rows are back: a row, or why there is none."""
    try:
        rows = merge.future.result()
    except EngineError as e:  # the engine failed this batch: its images fail, the job goes on
        for item in good:
            item.error = f"engine failed: {e}"
    else:
        for k, item in enumerate(good):
            if k in merge.errors:
                item.error = f"preprocessing failed: {merge.errors[k]}"
            else:
                item.row = rows[k]
    return group
