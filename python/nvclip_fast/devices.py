"""Where an Encoder runs: its ``device`` argument, and the CPU threads its replicas share.

One device: ``"auto"`` (CUDA where usable, else the CPU), ``"cpu"``, ``"cuda"`` (= ``"cuda:0"``) or
``"cuda:N"``. Several devices, each running a replica of the image engine behind one queue: a list
(``["cuda:0", "cuda:1"]``), a comma list (``"cuda:0,cuda:1"``, or the indices alone after one
prefix: ``"cuda:0,1"``), ``"cuda:all"`` (every visible CUDA device), or CPU replicas that split the
cores between them (``["cpu", "cpu"]``, ``"cpu,cpu"``). The replicas of one Encoder run on one kind
of device, each CUDA device at most once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from . import _C
from ._C import EngineError

KINDS = ("auto", "cpu", "cuda")
ALL = "all"
USAGE = (
    "device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'cuda:all', or several of 'cpu' / 'cuda:N' "
    "(a list, or a comma list such as 'cuda:0,1' or 'cpu,cpu')"
)


@dataclass(frozen=True)
class Devices:
    """``kind`` ("auto", "cpu" or "cuda") and one device index per replica (0 for CPU replicas)."""

    kind: str
    indices: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.indices)

    def __str__(self) -> str:
        """The canonical string, which :func:`parse_devices` reads back: ``"cuda:0,1"``, ``"cpu,cpu"``."""
        if self.kind == "cuda":
            return "cuda:" + ",".join(str(i) for i in self.indices)
        return ",".join([self.kind] * len(self.indices))

    def resolved(self, kind: str) -> Devices:
        """``"auto"`` made ``kind`` (a single replica, on device 0)."""
        return Devices(kind, self.indices) if self.kind == "auto" else self


def _one(name: str) -> tuple[str, list[int]]:
    kind, colon, index = name.strip().partition(":")
    if kind in ("auto", "cpu") and not colon:
        return kind, [0]
    if kind == "cuda":
        if not colon:
            return "cuda", [0]
        if index == ALL:
            count = _C.cuda_device_count()
            if count == 0:
                why = _C.cuda_unavailable_reason()
                raise EngineError(f"device 'cuda:all' requested but no CUDA device is usable: {why}")
            return "cuda", list(range(count))
        if index.isdigit():
            return "cuda", [int(index)]
    raise ValueError(f"{USAGE}, got {name!r}")


def parse_devices(device: str | Sequence[str]) -> Devices:
    """``device`` as an Encoder takes it (see the module) -> :class:`Devices`. ValueError names what
    is wrong; ``"cuda:all"`` without a usable CUDA device is an EngineError."""
    if isinstance(device, str):
        prefix = "cuda:" if device.startswith("cuda:") and "," in device else ""
        names = [prefix + part.strip() if part.strip().isdigit() else part for part in device.split(",")]
    elif isinstance(device, Sequence) and all(isinstance(d, str) for d in device):
        names = list(device)
    else:
        raise ValueError(f"{USAGE}, got {device!r}")
    if not names:
        raise ValueError(f"{USAGE}, got an empty list")
    kinds, indices = set(), []
    for name in names:
        kind, found = _one(name)
        kinds.add(kind)
        indices += found
    if len(kinds) > 1:
        raise ValueError(f"the replicas of one Encoder run on one kind of device, got {device!r}")
    kind = kinds.pop()
    if kind == "auto" and len(indices) > 1:
        raise ValueError(f"'auto' picks one device; name the devices to run several, got {device!r}")
    if kind == "cuda" and len(set(indices)) < len(indices):
        raise ValueError(
            f"a CUDA device listed twice in {device!r}: one replica per device (streams= sets the batches "
            "in flight on each)"
        )
    return Devices(kind, tuple(indices))


def check_cuda(index: int) -> None:
    """EngineError unless CUDA device ``index`` is usable."""
    count = _C.cuda_device_count()
    if count == 0:
        raise EngineError(
            f"device 'cuda:{index}' requested but no CUDA device is usable: {_C.cuda_unavailable_reason()}"
        )
    if index >= count:
        raise EngineError(f"device 'cuda:{index}' requested but only {count} CUDA device(s) are visible")


def thread_shares(threads: int | None, replicas: int) -> list[int | None]:
    """Each replica's share of ``threads`` CPU threads (None: every core), as equal as can be and at
    least one each; one replica keeps ``threads`` as given."""
    if replicas == 1:
        return [threads]
    total = threads or os.cpu_count() or 1
    base, extra = divmod(total, replicas)
    return [max(1, base + (k < extra)) for k in range(replicas)]


def device_string(engines: Sequence[_C.Engine]) -> str:
    """Where ``engines`` (an Encoder's image replicas) run, as :func:`parse_devices` reads it."""
    infos = [e.info for e in engines]
    kind = "cuda" if infos[0].device == "cuda" else "cpu"
    return str(Devices(kind, tuple(info.device_index if kind == "cuda" else 0 for info in infos)))
