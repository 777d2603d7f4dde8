"""``nvclip-fast serve``: real server processes on 127.0.0.1 (port 0), real HTTP, the official
``openai`` client; every row checked against the in-process Encoder on the same input.

Servers: tiny-clip exported to ONNX (texts and images, 32 px) behind ``nvclip-fast serve``; and
``serve_test_engine.py``, a test engine whose rows are known in advance, which fails the batches
holding a planted white pixel and can be made slow (to hold a request in flight).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import signal
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
prometheus_parser = pytest.importorskip("prometheus_client.parser")
openai = pytest.importorskip("openai")
pytest.importorskip("onnxruntime")

import nvclip_fast as nf  # noqa: E402
import serve_test_engine as engine_server  # noqa: E402
from nvclip_fast import cli, server  # noqa: E402
from nvclip_fast.server import Settings  # noqa: E402
from nvclip_fast.server.inputs import split_inputs  # noqa: E402
from nvclip_fast.server.metrics import Metrics  # noqa: E402
from nvclip_fast.server.schema import ApiError  # noqa: E402
from server_process import (  # noqa: E402
    Client,
    ServerProcess,
    data_url,
    encode,
    rows_of,
    serve_command,
    serving,
)

API_KEY = "test-key-123"
# Every row must equal Encoder.embed / embed_text on the same input with cosine >= 0.99999. The
# server runs the same ONNX graph as the in-process Encoder, in other batch compositions.
MIN_COS = 0.99999
ROW_ATOL = 1e-5
MAX_BATCH = 8
MAX_BODY = 1 << 20  # small limits on the test server, so oversized inputs stay cheap
MAX_IMAGE = 256 << 10
CLIENTS = 32
TIMEOUT_S = 120
TEXTS = ["a photo of a cat", "", "a diagram, with arrows!", "two dogs " * 40, "🙂"]
ENGINE_SCRIPT = str(Path(__file__).resolve().parent / "serve_test_engine.py")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def photo(seed: int, height: int = 40, width: int = 56) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in prometheus_parser.text_string_to_metric_families(text)
        for s in family.samples
    }


def metric_values(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = client.get("/v1/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return parse_metrics(reply.body.decode())


def metric(values: dict, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def assert_error(reply, status: int, code: str | None = None, param: str | None = None, match: str = ""):
    """A JSON error in both shapes (OpenAI's ``error`` object and problem details)."""
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert body["status"] == status
    assert body["detail"] == error["message"]
    assert body["title"]
    assert body["type"] == "about:blank"
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    assert match in error["message"], error
    return error


def bomb_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: Pillow reads the size without decoding."""
    png = bytearray(encode(np.zeros((1, 1), np.uint8)))
    ihdr = 8 + 8  # signature, then IHDR's length and type
    png[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    png[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(png[ihdr - 4 : ihdr + 13])))
    return bytes(png)


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """tiny-clip with random weights, exported to ONNX (image and text towers, CLIP BPE)."""
    import tiny_models

    tmp = tmp_path_factory.mktemp("serve_bundle")
    checkpoint = tiny_models.save_checkpoint(tiny_models.random_model("tiny-clip", seed=13), tmp / "tiny.pt")
    out = tmp / "tiny.onnx"
    # The export's parity with open_clip is tested in test_export.py; here the in-process Encoder on
    # this very bundle is the reference.
    nf.export("tiny-clip", out, weights=checkpoint, max_batch=MAX_BATCH, verify=False, quiet=True)
    return out


@pytest.fixture(scope="module")
def reference(bundle):
    with nf.Encoder(bundle, device="cpu", threads=1) as encoder:
        yield encoder


def model_server_command(bundle: Path, *args: str) -> list[str]:
    return serve_command(
        "-m",
        str(bundle),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--max-body-bytes",
        str(MAX_BODY),
        "--max-image-bytes",
        str(MAX_IMAGE),
        *args,
    )


@pytest.fixture(scope="module")
def model_server(bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    with serving(model_server_command(bundle), log, env={server.API_KEY_ENV: API_KEY}) as s:
        yield s


@pytest.fixture
def client(model_server):
    c = model_server.client(API_KEY)
    yield c
    c.close()


def engine_server_process(tmp_path: Path, *args: str) -> ServerProcess:
    return ServerProcess([sys.executable, ENGINE_SCRIPT, *args], tmp_path / "engine_server.log")


# --- results -----------------------------------------------------------------------------------------


def test_openai_client_float_and_base64(model_server, reference):
    images = [photo(1), photo(2, 64, 48)]
    inputs = [TEXTS[0], data_url(images[0]), data_url(images[1], "JPEG", quality=90), TEXTS[3]]
    expected = np.concatenate(
        [
            reference.embed_text([TEXTS[0]]),
            reference.embed([encode(images[0]), encode(images[1], "JPEG", quality=90)]),
            reference.embed_text([TEXTS[3]]),
        ]
    )
    client = openai.OpenAI(base_url=f"{model_server.url}/v1", api_key=API_KEY, max_retries=0)
    try:
        model = client.models.list().data[0].id
        as_float = client.embeddings.create(model=model, input=inputs, encoding_format="float")
        # Without encoding_format the client asks for base64 and decodes little-endian float32 itself.
        as_base64 = client.embeddings.create(model=model, input=inputs)
    finally:
        client.close()
    for result in (as_float, as_base64):
        rows = np.array([d.embedding for d in result.data], np.float32)
        assert [d.index for d in result.data] == [0, 1, 2, 3]
        assert cosines(rows, expected).min() >= MIN_COS
        assert result.model == model
        assert result.usage.prompt_tokens == result.usage.total_tokens > 0
    np.testing.assert_array_equal(
        np.array([d.embedding for d in as_float.data], np.float32),
        np.array([d.embedding for d in as_base64.data], np.float32),
    )


def test_raw_http_texts_png_jpeg_mixed_in_order(client, reference):
    images = [photo(3), photo(4, 30, 90), photo(5)]
    encoded = [encode(images[0]), encode(images[1], "JPEG", quality=85), encode(images[2], "WEBP")]
    urls = [data_url(images[0]), data_url(images[1], "JPEG", quality=85), data_url(images[2], "WEBP")]
    inputs = [urls[0], TEXTS[1], urls[1], TEXTS[2], TEXTS[4], urls[2]]
    reply = client.embed(inputs, model="tiny-clip")
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["object"] == "list"
    assert body["model"] == "tiny-clip"
    assert all(d["object"] == "embedding" for d in body["data"])
    rows = rows_of(reply)
    image_rows = reference.embed(encoded)
    text_rows = reference.embed_text([TEXTS[1], TEXTS[2], TEXTS[4]])
    expected = np.stack(
        [image_rows[0], text_rows[0], image_rows[1], text_rows[1], text_rows[2], image_rows[2]]
    )
    assert cosines(rows, expected).min() >= MIN_COS
    np.testing.assert_allclose(rows, expected, atol=ROW_ATOL)
    # usage: images counted, tokens = the texts' non-padding ids (start and end tokens included)
    tokens = int((reference.tokenize([TEXTS[1], TEXTS[2], TEXTS[4]]) != 0).sum())
    assert body["usage"] == {"num_images": 3, "prompt_tokens": tokens, "total_tokens": tokens}
    # base64: the same float32 rows, bit for bit
    as_base64 = client.embed(inputs, encoding_format="base64")
    assert all(isinstance(d["embedding"], str) for d in as_base64.json()["data"])
    np.testing.assert_array_equal(rows_of(as_base64), rows)
    # a single string, and the model's own dimensions, are accepted
    single = client.embed(TEXTS[0], dimensions=int(reference.dim), user="someone")
    np.testing.assert_allclose(rows_of(single), reference.embed_text([TEXTS[0]]), atol=ROW_ATOL)


def test_models_health_and_metrics(model_server, client, reference):
    models = client.get("/v1/models")
    assert models.status == 200
    (card,) = models.json()["data"]
    assert models.json()["object"] == "list"
    assert card["id"] == "tiny-clip"
    assert card["object"] == "model"
    assert card["owned_by"]
    assert (card["dimensions"], card["image_size"], card["text"]) == (
        reference.dim,
        reference.spec.size,
        True,
    )
    assert card["random_weights"] is False
    assert card["warning"] is None
    anonymous = model_server.client()
    try:
        for path, status in (("/v1/health/live", "live"), ("/v1/health/ready", "ready")):
            reply = anonymous.get(path)  # no key needed
            assert reply.status == 200
            assert reply.json()["status"] == status
    finally:
        anonymous.close()
    values = metric_values(client)
    assert metric(values, "nvclip_fast_ready") == 1
    assert metric(values, "nvclip_fast_requests_total", route="/v1/health/ready", code="200") >= 1
    assert metric(values, "nvclip_fast_queue_batches_total") >= 1  # the warm-up batch at least
    assert ("nvclip_fast_request_duration_seconds_count", (("route", "/v1/models"),)) in values
    docs = client.get("/openapi.json").json()
    assert "/v1/embeddings" in docs["paths"]
    assert "EmbeddingRequest" in docs["components"]["schemas"]


# --- bad input: the right status, a JSON error, the server unharmed ------------------------------------

GOOD = data_url(photo(9))
PNG_BYTES = encode(photo(9))
BAD_REQUESTS = {
    # name: (payload, status, code, param, text in the message)
    "bad base64": (
        {"input": ["a", "data:image/png;base64,iVBOR*w0K"]},
        422,
        "invalid_base64",
        "input[1]",
        "",
    ),
    "not an image": (
        {"input": ["data:image/png;base64," + base64.b64encode(b"plain text, no pixels").decode()]},
        422,
        "invalid_image",
        "input[0]",
        "not a readable",
    ),
    "truncated image": (
        {
            "input": [
                GOOD,
                "data:image/png;base64," + base64.b64encode(PNG_BYTES[: len(PNG_BYTES) // 2]).decode(),
            ]
        },
        422,
        "invalid_image",
        "input[1]",
        "",
    ),
    "unsupported type": (
        {"input": ["data:image/svg+xml;base64,PHN2Zz48L3N2Zz4="]},
        422,
        "unsupported_media_type",
        "input[0]",
        "image/svg+xml",
    ),
    "not base64 encoded": (
        {"input": ["data:image/png,rawbytes"]},
        422,
        "invalid_data_url",
        "input[0]",
        "base64",
    ),
    "too many items": ({"input": ["x"] * 65}, 422, "too_many_items", "input", "65"),
    "empty input": ({"input": []}, 422, "invalid_request", "input", "empty"),
    "input a number": ({"input": 3}, 422, "invalid_request", "input", "got a number"),
    "input item not a string": ({"input": ["ok", {"a": 1}]}, 422, "invalid_request", "input", "input[1]"),
    "missing input": ({"model": "tiny-clip"}, 422, "invalid_request", "input", "required"),
    "bad encoding_format": (
        {"input": "x", "encoding_format": "hex"},
        422,
        "invalid_request",
        "encoding_format",
        "",
    ),
    "dimensions": ({"input": "x", "dimensions": 8}, 400, "dimensions_unsupported", "dimensions", "32"),
    "unknown model": ({"input": "x", "model": "gpt-4"}, 404, "model_not_found", "model", "tiny-clip"),
    "image too large": (
        {"input": ["data:image/png;base64," + "A" * (MAX_IMAGE * 4 // 3 + 8)]},
        413,
        "image_too_large",
        "input[0]",
        str(MAX_IMAGE),
    ),
    "decompression bomb over 2x the limit": (
        {"input": ["data:image/png;base64," + base64.b64encode(bomb_png(20_000, 20_000)).decode()]},
        413,
        "image_too_large",
        "input[0]",
        "decompression bomb",
    ),
    "decompression bomb over the limit": (
        {"input": ["data:image/png;base64," + base64.b64encode(bomb_png(10_000, 10_000)).decode()]},
        413,
        "image_too_large",
        "input[0]",
        "100000000 pixels",
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_answered_with_a_json_error(client, name):
    payload, status, code, param, text = BAD_REQUESTS[name]
    assert_error(client.post("/v1/embeddings", payload), status, code, param, text)
    assert client.get("/v1/health/ready").status == 200


def test_healthy_after_every_bad_input(client, reference):
    before = metric_values(client)
    for payload, *_ in BAD_REQUESTS.values():
        assert client.post("/v1/embeddings", payload).status >= 400
    reply = client.embed([GOOD, "still here"])
    assert reply.status == 200
    expected = np.concatenate([reference.embed([PNG_BYTES]), reference.embed_text(["still here"])])
    np.testing.assert_allclose(rows_of(reply), expected, atol=ROW_ATOL)
    after = metric_values(client)
    for status in (400, 404, 413, 422):
        refused = sum(s == status for _, s, *_ in BAD_REQUESTS.values())
        key = ("nvclip_fast_requests_total", (("code", str(status)), ("route", "/v1/embeddings")))
        assert after.get(key, 0) - before.get(key, 0) == refused
    assert metric(after, "nvclip_fast_queued_items") == 0


def test_bad_bodies_and_keys(model_server, client):
    assert_error(
        client.request("POST", "/v1/embeddings", b"{not json"), 422, "invalid_request", "body", "JSON"
    )
    assert_error(client.request("POST", "/v1/embeddings", b"[1, 2]"), 422, "invalid_request", "body")
    form = {"Content-Type": "application/x-www-form-urlencoded"}  # what curl -d sends by default
    reply = client.request("POST", "/v1/embeddings", b'{"input": "x"}', headers=form)
    assert_error(reply, 422, "invalid_request", "body", "Content-Type: application/json")
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(client.request("PUT", "/v1/embeddings"), 405, "method_not_allowed")
    # Over the body limit as announced by Content-Length: refused before the body is read (2 GiB
    # announced, 2 bytes sent: a server that waited for the body would never answer).
    liar = Client(model_server.port, API_KEY)
    try:
        huge = liar.request("POST", "/v1/embeddings", b"{}", headers={"Content-Length": str(2 << 30)})
        assert_error(huge, 413, "body_too_large", None, "2147483648 bytes")
    finally:
        liar.close()  # its connection still expects the 2 GiB
    # Over the limit without Content-Length (chunked): counted while read, refused past the limit;
    # the rest is discarded and the connection serves the next request.
    chunk = b"x" * (64 << 10)
    chunked = client.request("POST", "/v1/embeddings", (chunk for _ in range(MAX_BODY // len(chunk) + 4)))
    assert_error(chunked, 413, "body_too_large", None, f"more than {MAX_BODY} bytes")
    assert client.embed("after the big body").status == 200
    # keys: missing or wrong -> 401 with WWW-Authenticate; health stays open
    for key in (None, "wrong-key"):
        other = Client(model_server.port, key)
        try:
            reply = other.embed("x")
            assert_error(reply, 401, "invalid_api_key", match="missing" if key is None else "invalid")
            assert reply.headers["www-authenticate"] == "Bearer"
            assert_error(other.get("/v1/metrics"), 401)
            assert other.get("/v1/health/live").status == 200
        finally:
            other.close()


def test_openai_client_surfaces_errors(model_server):
    client = openai.OpenAI(base_url=f"{model_server.url}/v1", api_key=API_KEY, max_retries=0)
    wrong = openai.OpenAI(base_url=f"{model_server.url}/v1", api_key="wrong", max_retries=0)
    try:
        with pytest.raises(openai.UnprocessableEntityError, match=r"input\[1\]: invalid base64") as e:
            client.embeddings.create(model="tiny-clip", input=["a", "data:image/png;base64,***"])
        assert (e.value.code, e.value.param, e.value.type) == (
            "invalid_base64",
            "input[1]",
            "invalid_request_error",
        )
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            wrong.embeddings.create(model="tiny-clip", input="a")
        with pytest.raises(openai.NotFoundError, match="not served here"):
            client.embeddings.create(model="other", input="a")
    finally:
        client.close()
        wrong.close()


# --- many clients --------------------------------------------------------------------------------------


def test_32_concurrent_clients_get_their_own_rows(bundle, reference, tmp_path):
    """32 clients x 2 mixed requests (texts and images, at most 2 images each): every row comes back
    to its request, in its place, and the engine ran batches larger than any one request."""

    def image(pixels: np.ndarray, fmt: str = "PNG") -> tuple[str, bytes, str]:
        return ("image", encode(pixels, fmt), data_url(pixels, fmt))

    def text(value: str) -> tuple[str, str, str]:
        return ("text", value, value)

    requests = []  # per request: (kind, what the reference embeds, what the server gets)
    for c in range(CLIENTS):
        requests.append([text(f"client {c} says hello"), image(photo(100 + c))])
        requests.append(
            [image(photo(200 + c), "JPEG"), text(f"client {c} again"), image(photo(300 + c, 50, 50))]
        )
    expected = [
        np.stack(
            [
                reference.embed([v])[0] if kind == "image" else reference.embed_text([v])[0]
                for kind, v, _ in items
            ]
        )
        for items in requests
    ]
    flat = np.concatenate(expected)
    distance = np.abs(flat[:, None, :] - flat[None, :, :]).max(axis=2) + np.eye(len(flat))
    assert distance.min() > 100 * ROW_ATOL  # no two inputs share a row: a misrouted row would show

    barrier = threading.Barrier(CLIENTS)

    def run_client(c: int) -> list[np.ndarray]:
        http_client = Client(port, API_KEY)
        try:
            barrier.wait(TIMEOUT_S)
            out = []
            for k in (2 * c, 2 * c + 1):
                reply = http_client.embed([sent for _, _, sent in requests[k]])
                assert reply.status == 200, reply.body
                out.append(rows_of(reply))
            return out
        finally:
            http_client.close()

    # A fresh server (its batch counters are this test's alone) that waits up to 20 ms to fill a batch.
    with serving(
        model_server_command(bundle, "--max-batch", str(MAX_BATCH), "--max-delay-ms", "20"),
        tmp_path / "server.log",
        env={server.API_KEY_ENV: API_KEY},
    ) as s:
        port = s.port
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(run_client, range(CLIENTS)))
        metrics_client = s.client(API_KEY)
        values = metric_values(metrics_client)
        metrics_client.close()
    for c, (first, second) in enumerate(results):
        for k, rows in ((2 * c, first), (2 * c + 1, second)):
            assert rows.shape == expected[k].shape  # none lost, none added
            np.testing.assert_allclose(rows, expected[k], atol=ROW_ATOL)
    images = sum(kind == "image" for items in requests for kind, _, _ in items)
    texts = sum(kind == "text" for items in requests for kind, _, _ in items)
    assert metric(values, "nvclip_fast_items_total", kind="image", outcome="ok") == images
    assert metric(values, "nvclip_fast_items_total", kind="text", outcome="ok") == texts
    assert metric(values, "nvclip_fast_requests_total", route="/v1/embeddings", code="200") == len(requests)
    # Batches larger than one request: no request holds more than 2 images, so a batch of 3 or more
    # images, and a text batch of 2 or more requests, each joined several requests.
    if ("nvclip_fast_image_batch_size_count", ()) in values:  # the queue reports every batch's size
        assert (
            values[("nvclip_fast_image_batch_size_count", ())]
            > values[("nvclip_fast_image_batch_size_bucket", (("le", "2.0"),))]
        )
    assert metric(values, "nvclip_fast_queue_largest_batch") > 2
    text_batches = metric(values, "nvclip_fast_text_batch_requests_count")
    assert text_batches > metric(values, "nvclip_fast_text_batch_requests_bucket", le="1.0")


# --- the engine fails, the queue is full, the model loads, SIGTERM ---------------------------------


def marker_image(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value, np.uint8)


def one_request(proc: ServerProcess, inputs: list[str]):
    c = proc.client()
    try:
        return c.embed(inputs)
    finally:
        c.close()


def test_engine_failure_fails_only_that_batch(tmp_path):
    # One image per batch: however the three requests' images interleave in the queue, only the
    # poisoned image's batch fails, and with it only the request that holds that image.
    proc = engine_server_process(tmp_path, "--max-batch", "1")
    try:
        proc.wait_ready()
        good = [data_url(marker_image(10)), data_url(marker_image(20))]
        poisoned = [data_url(marker_image(255)), data_url(marker_image(30))]
        other = [data_url(marker_image(40)), data_url(marker_image(50))]

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda inputs: one_request(proc, inputs), [good, poisoned, other]))
        expected = (
            [engine_server.expected_row(v) for v in (10, 20)],
            [engine_server.expected_row(v) for v in (40, 50)],
        )
        np.testing.assert_allclose(rows_of(replies[0]), np.stack(expected[0]), atol=1e-6)
        assert_error(replies[1], 500, "engine_error", None, engine_server.FAILURE)
        assert replies[1].json()["error"]["type"] == "server_error"
        np.testing.assert_allclose(rows_of(replies[2]), np.stack(expected[1]), atol=1e-6)
        # the server keeps serving; texts are refused by a model without a text tower
        c = proc.client()
        assert c.get("/v1/health/ready").status == 200
        assert rows_of(c.embed(good)).shape == (2, engine_server.DIM)
        values = metric_values(c)
        assert metric(values, "nvclip_fast_queue_failed_batches_total") == 1
        assert metric(values, "nvclip_fast_items_total", kind="image", outcome="error") == 2
        assert_error(c.embed([good[0], "a text"]), 400, "text_unsupported", "input[1]", "texts")
        c.close()
    finally:
        proc.stop()


def test_not_ready_while_loading_then_queue_full(tmp_path):
    proc = engine_server_process(
        tmp_path,
        "--load-delay-s",
        "2",
        "--batch-delay-s",
        "1",
        "--max-batch",
        "4",
        "--max-delay-ms",
        "1",
        "--max-items",
        "4",
        "--max-queued",
        "4",
    )
    try:
        c = proc.client()
        # The port is printed before the model loads: the probes answer at once.
        ready = c.get("/v1/health/ready")
        assert ready.status == 503
        assert ready.json()["status"] == "loading"
        assert c.get("/v1/health/live").status == 200
        loading = c.embed("x")
        assert_error(loading, 503, "not_ready")
        assert loading.headers["retry-after"] == "1"
        proc.wait_ready()

        # 4 images in flight (the engine takes 1 s a batch) fill the queue: the next request gets 503.
        first = [data_url(marker_image(v)) for v in (60, 70, 80, 90)]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(one_request, proc, first)
            deadline = time.monotonic() + TIMEOUT_S
            while metric(metric_values(c), "nvclip_fast_queued_items") < 4:
                assert time.monotonic() < deadline
                assert not in_flight.done()
                time.sleep(0.02)
            full = c.embed([data_url(marker_image(100))])
            reply = in_flight.result(TIMEOUT_S)
        assert_error(full, 503, "queue_full", None, "limit is 4")
        assert full.headers["retry-after"] == "1"
        assert full.json()["error"]["type"] == "service_unavailable"
        np.testing.assert_allclose(
            rows_of(reply), np.stack([engine_server.expected_row(v) for v in (60, 70, 80, 90)]), atol=1e-6
        )
        assert rows_of(c.embed([data_url(marker_image(100))])).shape == (1, engine_server.DIM)
        c.close()
    finally:
        proc.stop()


def test_sigterm_drains_in_flight_requests(tmp_path):
    proc = engine_server_process(tmp_path, "--batch-delay-s", "2", "--max-batch", "1")
    try:
        proc.wait_ready()
        c = proc.client()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(one_request, proc, [data_url(marker_image(33))])
            deadline = time.monotonic() + TIMEOUT_S
            while metric(metric_values(c), "nvclip_fast_queued_items") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            c.close()
            proc.proc.send_signal(signal.SIGTERM)
            reply = in_flight.result(TIMEOUT_S)
        assert reply.status == 200
        np.testing.assert_allclose(rows_of(reply), engine_server.expected_row(33)[None], atol=1e-6)
        # uvicorn re-raises the signal once it has shut down, as process managers expect
        assert proc.wait_exit() in (0, -signal.SIGTERM)
        log = proc.output()
        assert log.index("Waiting for connections to close") < log.index("stopped: the model is closed")
    finally:
        proc.stop()


def test_routers_join_the_app_behind_the_key(tmp_path):
    """A route added with create_app(routers=...) reaches the service (``Service`` dependency), is
    behind the API key and is counted in the metrics like the built-in ones."""
    proc = engine_server_process(tmp_path, "--with-router", "--api-key", API_KEY)
    try:
        proc.wait_ready()
        c = proc.client(API_KEY)
        reply = c.post("/v1/echo", {"input": [data_url(marker_image(12)), data_url(marker_image(34))]})
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "marker"
        expected = np.stack([engine_server.expected_row(v) for v in (12, 34)])
        np.testing.assert_allclose(np.array(reply.json()["rows"], np.float32), expected, atol=1e-6)
        anonymous = proc.client()
        assert_error(anonymous.post("/v1/echo", {"input": ["x"]}), 401, "invalid_api_key")
        anonymous.close()
        values = metric_values(c)
        assert metric(values, "nvclip_fast_requests_total", route="/v1/echo", code="200") == 1
        assert metric(values, "nvclip_fast_requests_total", route="/v1/echo", code="401") == 1
        c.close()
    finally:
        proc.stop()


def test_load_failure_exits_with_an_error(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not an ONNX model")
    proc = ServerProcess(serve_command("-m", str(broken), "--device", "cpu"), tmp_path / "server.log")
    try:
        assert proc.wait_exit() == 1
        assert "could not be loaded" in proc.output()
    finally:
        proc.stop()


@pytest.mark.slow
def test_random_weights_open_clip_model(tmp_path):
    """``-m NAME --random-weights``: the open_clip model in PyTorch, with a loud warning."""
    with serving(
        serve_command("-m", "ViT-S-32", "--random-weights", "--device", "cpu"), tmp_path / "log"
    ) as s:
        c = s.client()
        (card,) = c.get("/v1/models").json()["data"]
        assert card["random_weights"] is True
        assert "RANDOM" in card["warning"]
        reply = c.embed(["a photo of a cat", data_url(photo(7, 240, 320))])
        c.close()
        assert "RANDOM weights" in s.output()
    from nvclip_fast.models import RandomWeightsWarning

    with (
        pytest.warns(RandomWeightsWarning),
        nf.Encoder.from_open_clip("ViT-S-32", random_weights=True, device="cpu") as reference,
    ):
        expected = np.concatenate(
            [reference.embed_text(["a photo of a cat"]), reference.embed([encode(photo(7, 240, 320))])]
        )
    assert cosines(rows_of(reply), expected).min() >= MIN_COS


# --- in-process: settings, inputs, the command line ---------------------------------------------------


def test_settings_refuse_bad_limits():
    with pytest.raises(ValueError, match="max_items must be a positive integer"):
        Settings(max_items=0)
    with pytest.raises(ValueError, match=r"max_queued .* must be at least max_items"):
        Settings(max_items=64, max_queued=10)
    with pytest.raises(ValueError, match="api_key is empty"):
        Settings(api_key="")


def test_split_inputs_tells_texts_from_images():
    texts, images = split_inputs(
        ["data: the new oil", "data:image/JPEG;charset=x;base64,/9j/", "plain", "data:"], 1 << 20
    )
    assert [(t.index, t.text) for t in texts] == [(0, "data: the new oil"), (2, "plain"), (3, "data:")]
    assert [(i.index, i.media_type, i.data) for i in images] == [(1, "image/jpeg", "/9j/")]
    with pytest.raises(ApiError, match=r"input\[0\]: malformed data URL") as e:
        split_inputs(["data:image/png;base64" + "A" * 300], 1 << 20)
    assert e.value.status == 422


def test_queue_metrics_export_every_stat_and_batch_sizes():
    """The Encoder's counters as Prometheus counters/gauges; {batch size: batches} as a histogram."""
    metrics = Metrics()
    metrics.watch_queue(
        lambda: {
            "batches": 7,
            "images": 20,
            "largest_batch": 8,
            "queued_images": 3,
            "batch_sizes": {1: 2, 3: 4, 8: 1},
        }
    )
    values = parse_metrics(metrics.render()[0].decode())
    assert values[("nvclip_fast_queue_batches_total", ())] == 7
    assert values[("nvclip_fast_queue_images_total", ())] == 20
    assert values[("nvclip_fast_queue_largest_batch", ())] == 8
    assert values[("nvclip_fast_queue_queued_images", ())] == 3
    buckets = {"1.0": 2, "2.0": 2, "4.0": 6, "8.0": 7, "16.0": 7, "+Inf": 7}
    for le, count in buckets.items():
        assert values[("nvclip_fast_image_batch_size_bucket", (("le", le),))] == count
    assert values[("nvclip_fast_image_batch_size_sum", ())] == 1 * 2 + 3 * 4 + 8 * 1
    assert values[("nvclip_fast_image_batch_size_count", ())] == 7


def _args(**given) -> argparse.Namespace:
    args = {"pretrained": None, "weights": None, "random_weights": False, "precision": None, "engine": "auto"}
    return argparse.Namespace(
        **{**args, "device": "cpu", "max_batch": None, "max_delay_ms": None, "threads": None, **given}
    )


def test_encoder_loader_maps_the_command_line(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(nf.Encoder, "from_pretrained", classmethod(lambda cls, *a, **k: calls.append((a, k))))
    monkeypatch.setattr(nf.Encoder, "__init__", lambda self, *a, **k: calls.append((a, k)))
    server.encoder_loader(_args(model="ViT-B-32", weights="w.pt", precision="fp16", max_batch=16))()
    assert calls[-1] == (
        ("ViT-B-32",),
        {
            "pretrained": None,
            "weights": "w.pt",
            "random_weights": False,
            "image_size": None,
            "precision": "fp16",
            "text": None,  # the text tower where its tokenizer can be had: a server may serve images only
            "progress": None,
            "device": "cpu",
            "max_batch": 16,
        },
    )
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")
    server.encoder_loader(_args(model=str(onnx), threads=2, max_delay_ms=5.0))()
    assert calls[-1] == ((str(onnx),), {"device": "cpu", "threads": 2, "max_delay_ms": 5.0})
    server.encoder_loader(_args(model=str(tmp_path / "m")))()  # the bundle by its stem
    assert calls[-1] == ((str(tmp_path / "m"),), {"device": "cpu"})
    with pytest.raises(FileNotFoundError, match="--pretrained TAG, --weights FILE or --random-weights"):
        server.encoder_loader(_args(model="ViT-B-32"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        server.encoder_loader(_args(model=str(tmp_path / "missing.plan")))
    server.encoder_loader(_args(model=str(onnx), engine="openvino", precision="bf16"))()
    assert calls[-1] == ((str(onnx),), {"device": "cpu", "engine": "openvino", "precision": "bf16"})
    with pytest.raises(ValueError, match="--precision fp16 and --image-size go with a model name"):
        server.encoder_loader(_args(model=str(onnx), precision="fp16"))
    with pytest.raises(ValueError, match="is a bundle file"):
        server.encoder_loader(_args(model=str(onnx), random_weights=True))


def test_serve_usage_errors_exit_2(capsys, tmp_path):
    assert cli.main(["serve", "-m", "ViT-B-32"]) == server.EXIT_USAGE
    assert "--pretrained TAG, --weights FILE or --random-weights" in capsys.readouterr().err
    assert cli.main(["serve", "-m", str(tmp_path / "nope.onnx")]) == server.EXIT_USAGE
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --pretrained and --random-weights are exclusive
        cli.main(["serve", "-m", "x", "--pretrained", "t", "--random-weights"])
