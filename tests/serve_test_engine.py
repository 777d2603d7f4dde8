"""An embeddings server over a test engine, started by tests/test_serve.py as a subprocess:

    python tests/serve_test_engine.py [--batch-delay-s S] [--load-delay-s S] [--max-queued N] ...

The engine (images only, 8 px, squash) embeds each image as (its mean channel-0 input value, 1, 0, 0),
so a solid-colour image's row is known in advance; it fails every batch holding an image whose
top-left pixel is white (a marker the tests plant), and sleeps ``--batch-delay-s`` per batch after
the server's warm-up batch (a request in flight for as long as a test needs one).
``--with-router`` adds ``POST /v1/echo`` through ``create_app(routers=...)``, as other modules add
routes: it embeds ``{"input": [...]}`` with the server's own service. Prints
``listening on http://...`` like ``nvclip-fast serve``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from fastapi import APIRouter

import nvclip_fast as nf
from nvclip_fast import _C, metadata
from nvclip_fast.server import Settings, run
from nvclip_fast.server.app import Service

SIZE = 8
DIM = 4
SPEC = nf.PreprocessSpec(size=SIZE, resize_mode="squash")
WHITE = (1.0 - SPEC.mean[0]) / SPEC.std[0]  # channel 0 of a white pixel after normalization
FAILURE = "planted failure"


def expected_row(value: int) -> np.ndarray:
    """The row of a solid (value, value, value) image: (normalized channel 0, 1, 0, 0), L2-normalized."""
    row = np.array([(value / 255 - SPEC.mean[0]) / SPEC.std[0], 1.0, 0.0, 0.0], np.float64)
    return (row / np.linalg.norm(row)).astype(np.float32)


class MarkerEngine(_C.Engine):
    def __init__(self, max_batch: int, batch_delay_s: float):
        super().__init__(
            _C.EngineInfo(
                [_C.TensorSpec(metadata.IMAGE_INPUT, "float32", [-1, 3, SIZE, SIZE])],
                [_C.TensorSpec(metadata.IMAGE_OUTPUT, "float32", [-1, DIM])],
                (1, max_batch, max_batch),
            )
        )
        self.batch_delay_s = batch_delay_s
        self.batches = 0

    def enqueue(self, batch, inputs, outputs, stream):
        if self.batches:  # not the warm-up
            time.sleep(self.batch_delay_s)
        self.batches += 1
        x = inputs[metadata.IMAGE_INPUT]
        if np.isclose(x[:, 0, 0, 0], WHITE).any():
            raise RuntimeError(FAILURE)
        out = outputs[metadata.IMAGE_OUTPUT]
        out[:] = 0
        out[:, 0] = x[:, 0].mean(axis=(1, 2))
        out[:, 1] = 1


def echo_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/echo")
    async def echo(body: dict, svc: Service) -> dict:
        embedded = await svc.embed(body["input"])
        return {"model": svc.model_name, "rows": embedded.rows.tolist()}

    return router


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch-delay-s", type=float, default=0.0)
    p.add_argument("--load-delay-s", type=float, default=0.0)
    p.add_argument("--max-batch", type=int, default=2)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--max-items", type=int, default=Settings.max_items)
    p.add_argument("--max-queued", type=int, default=Settings.max_queued)
    p.add_argument("--api-key")
    p.add_argument("--with-router", action="store_true")
    args = p.parse_args(argv)

    def load() -> nf.Encoder:
        time.sleep(args.load_delay_s)
        engine = MarkerEngine(args.max_batch, args.batch_delay_s)
        return nf.Encoder.from_engine(
            engine, SPEC, name="marker", max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, streams=1
        )

    settings = Settings(max_items=args.max_items, max_queued=args.max_queued, api_key=args.api_key)
    routers = [echo_router()] if args.with_router else []
    return run(load, settings, host="127.0.0.1", port=0, routers=routers)


if __name__ == "__main__":
    sys.exit(main())
