"""A server started as a real subprocess on 127.0.0.1, port 0, for tests and benchmarks: waits (with
bounds) for the port it prints and for readiness, and is always terminated. Plain HTTP through the
standard library, one keep-alive connection per :class:`Client`."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STARTUP_TIMEOUT_S = 120  # a cold import of torch and a model build on a busy 2-core machine
STOP_TIMEOUT_S = 60
REQUEST_TIMEOUT_S = 120
POLL_S = 0.05
_LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One keep-alive HTTP/1.1 connection (reconnects when the server closed it)."""

    def __init__(self, port: int, api_key: str | None = None, timeout: float = REQUEST_TIMEOUT_S):
        self.port = port
        self.api_key = api_key
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Reply:
        """``body``: bytes, or an iterable of bytes (sent chunked)."""
        headers = dict(headers or {})
        if self.api_key is not None:
            headers.setdefault("Authorization", f"Bearer {self.api_key}")
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=headers)
                response = self._conn.getresponse()
                reply = Reply(
                    response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
                )
            except (ConnectionError, http.client.CannotSendRequest):
                # A keep-alive connection the server closed meanwhile: one retry on a new one.
                self.close()
                if attempt or not isinstance(body, (bytes, type(None))):
                    raise
                continue
            if reply.headers.get("connection", "").lower() == "close":
                self.close()
            return reply
        raise AssertionError("unreachable")

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, payload: Any) -> Reply:
        return self.request("POST", path, json.dumps(payload).encode())

    def embed(self, inputs: Any, **fields: Any) -> Reply:
        return self.post("/v1/embeddings", {"input": inputs, **fields})

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class ServerProcess:
    """``argv`` run as a subprocess (output to ``log``); ``port`` once it printed it."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(
            list(argv),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.port = self._wait_for_port()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.output())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(POLL_S)
        self.stop()
        raise TimeoutError(f"the server printed no port within {STARTUP_TIMEOUT_S} s:\n{self.output()}")

    def client(self, api_key: str | None = None) -> Client:
        return Client(self.port, api_key)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
                with contextlib.suppress(ConnectionError):
                    if client.get("/v1/health/ready").status == 200:
                        return
                time.sleep(POLL_S)
        finally:
            client.close()
        raise TimeoutError(f"the server was not ready within {timeout} s:\n{self.output()}")

    def wait_exit(self, timeout: float = STOP_TIMEOUT_S) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_S; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        self._log_file.close()
        return self.proc.returncode


@contextlib.contextmanager
def serving(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A ready server, always stopped afterwards."""
    server = ServerProcess(argv, log, env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def serve_command(*args: str) -> list[str]:
    """``nvclip-fast serve --port 0 ARGS`` run by this interpreter."""
    return [sys.executable, "-m", "nvclip_fast", "serve", "--port", "0", *args]


def data_url(image: np.ndarray | Any, fmt: str = "PNG", **save: Any) -> str:
    """A data:image/...;base64 URL of a numpy image (or PIL image), encoded by Pillow."""
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(encode(image, fmt, **save)).decode()}"


def encode(image: np.ndarray | Any, fmt: str = "PNG", **save: Any) -> bytes:
    from PIL import Image

    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    out = io.BytesIO()
    pil.save(out, fmt, **save)
    return out.getvalue()


def rows_of(reply: Reply) -> np.ndarray:
    """The embeddings of a 200 reply, float or base64, as a float32 array in index order."""
    data = reply.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    return np.stack(
        [
            np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
            if isinstance(d["embedding"], str)
            else np.asarray(d["embedding"], np.float32)
            for d in data
        ]
    )
