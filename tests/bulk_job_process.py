"""Bulk jobs run as processes by the tests that interrupt them or measure their memory.

``python bulk_job_process.py embed FOLDER OUT [--delay S] [--log FILE] [--batch N] [--checkpoint-rows N]``
embeds FOLDER with :class:`MeanEngine` (each image's channel means: rows that tell images apart and
are exactly the same in every run, no model needed) on one stream slot, sleeping ``--delay`` seconds
per batch and appending each finished batch's size to ``--log``; exit 130 on Ctrl-C, as the CLI does.

``python bulk_job_process.py encode SIZE MAX_BATCH FILE...`` embeds the files with ``Encoder.embed``
over a ``SIZE`` px MeanEngine (``on_error="nan"``) and prints the peak RSS in MiB as the last line.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np

import nvclip_fast as nf
from nvclip_fast import _C

DIM = 3
EXIT_INTERRUPTED = 130


class MeanEngine(_C.Engine):
    """Each image's mean per channel; optionally slow, logging every batch it finishes."""

    def __init__(self, size: int, max_batch: int, delay_s: float = 0.0, log: str | None = None):
        super().__init__(
            _C.EngineInfo(
                [_C.TensorSpec("pixels", "float32", [-1, 3, size, size])],
                [_C.TensorSpec("means", "float32", [-1, DIM])],
                (1, max_batch, max_batch),
            )
        )
        self.delay_s, self.log = delay_s, log

    def enqueue(self, batch, inputs, outputs, stream):
        time.sleep(self.delay_s)
        outputs["means"][:] = inputs["pixels"].mean(axis=(2, 3))
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{batch}\n")


def peak_rss_mib() -> float:
    """This process's peak resident set size. Linux's VmHWM belongs to the process's own memory
    map; ru_maxrss would also count the parent's memory when the process was forked from it."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    embed = sub.add_parser("embed")
    embed.add_argument("folder")
    embed.add_argument("out")
    embed.add_argument("--delay", type=float, default=0.0)
    embed.add_argument("--log")
    embed.add_argument("--batch", type=int, default=4)
    embed.add_argument("--checkpoint-rows", type=int, default=10**6)
    embed.add_argument("--resume", action="store_true")
    encode = sub.add_parser("encode")
    encode.add_argument("size", type=int)
    encode.add_argument("max_batch", type=int)
    encode.add_argument("files", nargs="+")
    args = parser.parse_args(argv)

    if args.command == "encode":
        spec = nf.PreprocessSpec(size=args.size)
        with nf.Encoder.from_engine(
            MeanEngine(args.size, args.max_batch), spec, max_batch=args.max_batch
        ) as enc:
            rows = enc.embed(args.files, on_error="nan")
        print("rows", " ".join("nan" if np.isnan(r).any() else "ok" for r in rows))
        print(f"{peak_rss_mib():.1f}")
        return 0

    spec = nf.PreprocessSpec(size=16)
    engine = MeanEngine(spec.size, args.batch, args.delay, args.log)
    with nf.Encoder.from_engine(engine, spec, max_batch=args.batch, streams=1) as enc:
        try:
            summary = nf.embed_files(
                args.folder,
                enc,
                args.out,
                batch=args.batch,
                workers=2,
                checkpoint_rows=args.checkpoint_rows,
                resume=args.resume,
                progress=False,
            )
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
    print(summary.line(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
