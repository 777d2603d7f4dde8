"""The search page: ``POST /v1/search`` answers what ``Collection.search`` answers, thumbnails come only from
the collection's rows, and the page works in a real headless Chromium."""

from __future__ import annotations

import base64
import importlib.util
import io
import shutil
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # FastAPI's TestClient
pytest.importorskip("pyarrow")

from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

import collection_files as cf
import nvclip_fast as nf
from nvclip_fast.collection import Collection, encoder_provenance
from nvclip_fast.provenance import ProvenanceError
from nvclip_fast.search_page import THUMBNAIL_PX, search_router

SERVER_START_S = 20
PAGE_WAIT_S = 60
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    pytest.importorskip("skimage")
    import preprocess_reference

    folder = tmp_path_factory.mktemp("page_photos")
    paths = []
    for name, pixels in list(preprocess_reference.photos().items())[:7]:
        path = folder / f"{name}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def served(tiny_clip_bundles, photos, tmp_path_factory):
    """(collection, encoder of model A, app) over the photos embedded by model A."""
    bundle_a, _ = tiny_clip_bundles
    with nf.Encoder(bundle_a, device="cpu") as enc:
        prov = encoder_provenance(enc).replace(source={"bundle": str(bundle_a)})
        path = cf.write_parquet(
            tmp_path_factory.mktemp("page") / "c.parquet", photos, enc.embed(photos), prov
        )
        with Collection.open(path) as collection:
            app = FastAPI()
            app.include_router(search_router(collection, enc))
            yield collection, enc, app


def _data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()


def test_search_answers_what_the_collection_answers(served, photos):
    collection, enc, app = served
    client = TestClient(app)
    response = client.post("/v1/search", json={"text": "a cat", "k": 4})
    assert response.status_code == 200
    body = response.json()
    hits = collection.search(text="a cat", k=4, encoder=enc)
    assert body["model"] == "tiny-clip"
    assert [(d["id"], d["row"]) for d in body["data"]] == [(h.id, h.row) for h in hits]
    np.testing.assert_allclose([d["score"] for d in body["data"]], [h.score for h in hits], atol=1e-6)
    assert body["data"][0]["thumbnail"] == f"http://testserver/v1/thumbnails/{hits[0].row}"

    by_image = client.post("/v1/search", json={"image": _data_url(photos[3]), "k": 1}).json()
    assert by_image["data"][0]["id"] == photos[3]


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"k": 3}, 422, "exactly one of text or image"),
        ({"text": "a", "image": "data:image/png;base64,AAAA"}, 422, "exactly one of text or image"),
        ({"image": "http://example.com/x.jpg"}, 422, "expected a data:image"),
        ({"image": "data:image/png;base64,@@@@"}, 422, "not valid base64"),
        ({"image": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}, 422, "image: "),
        ({"text": "a", "k": 0}, 422, None),
        ({"text": "a", "k": 101}, 422, None),
    ],
)
def test_bad_queries_get_a_clear_error(served, body, status, detail):
    response = TestClient(served[2]).post("/v1/search", json=body)
    assert response.status_code == status
    if detail is not None:
        assert detail in response.json()["detail"]


def test_an_oversized_query_image_is_refused(tiny_clip_bundles, served):
    collection, enc, _ = served
    app = FastAPI()
    app.include_router(search_router(collection, enc, max_image_bytes=100))
    payload = "data:image/png;base64," + base64.b64encode(bytes(300)).decode()
    response = TestClient(app).post("/v1/search", json={"image": payload})
    assert response.status_code == 413


def test_thumbnails_come_only_from_the_collections_rows(served, photos, tmp_path):
    collection, _, app = served
    client = TestClient(app)
    response = client.get("/v1/thumbnails/2")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    thumbnail = Image.open(io.BytesIO(response.content))
    original = Image.open(photos[2])
    assert max(thumbnail.size) == THUMBNAIL_PX
    assert abs(thumbnail.width / thumbnail.height - original.width / original.height) < 0.02
    assert client.get(f"/v1/thumbnails/{len(collection)}").status_code == 404
    assert client.get("/v1/thumbnails/-1").status_code == 404
    for outside in ("/v1/thumbnails/..%2F..%2Fetc%2Fpasswd", "/v1/thumbnails/%2Fetc%2Fpasswd"):
        assert client.get(outside).status_code in (404, 422)  # a row number or nothing


def test_another_model_is_refused_when_the_router_is_made(tiny_clip_bundles, served):
    collection = served[0]
    with (
        nf.Encoder(tiny_clip_bundles[1], device="cpu") as enc_b,
        pytest.raises(ProvenanceError, match="weights_sha256"),
    ):
        search_router(collection, enc_b)


def test_an_encoder_the_server_gives_per_request_is_checked(tiny_clip_bundles, served):
    collection, enc, _ = served
    with nf.Encoder(tiny_clip_bundles[1], device="cpu") as enc_b:
        serving = {"encoder": enc}  # what a server that loads its model later hands out
        app = FastAPI()
        app.include_router(search_router(collection, lambda request: serving["encoder"]))
        client = TestClient(app)
        assert client.post("/v1/search", json={"text": "a cat"}).status_code == 200
        serving["encoder"] = enc_b
        response = client.post("/v1/search", json={"text": "a cat"})
        assert response.status_code == 500
        assert "weights_sha256 differs" in response.json()["detail"]


def test_serve_with_a_collection_answers_searches_beside_embeddings(tiny_clip_bundles, served, tmp_path):
    pytest.importorskip("uvicorn")
    pytest.importorskip("prometheus_client")  # the serve extra
    from urllib.parse import urlparse

    from server_process import ServerProcess, serve_command, serving

    collection, enc, _ = served
    bundle_a, bundle_b = tiny_clip_bundles
    common = ("--device", "cpu", "--threads", "1", "--collection", str(collection.path))
    with serving(serve_command("-m", str(bundle_a), *common), tmp_path / "a.log") as server:
        client = server.client()
        reply = client.post("/v1/search", {"text": "a cat", "k": 3})
        assert reply.status == 200, reply.body
        hits = collection.search(text="a cat", k=3, encoder=enc)
        assert [d["id"] for d in reply.json()["data"]] == [h.id for h in hits]
        thumbnail = client.get(urlparse(reply.json()["data"][0]["thumbnail"]).path)
        assert thumbnail.status == 200
        assert thumbnail.headers["content-type"] == "image/jpeg"
        page = client.get("/")
        assert page.status == 200
        assert b"Search the collection" in page.body
        assert client.embed(["a cat"]).status == 200  # the embeddings API is still there
        client.close()
    # another model than the collection's: refused when it loads, the server exits 1 naming the field
    other = ServerProcess(serve_command("-m", str(bundle_b), *common), tmp_path / "b.log")
    assert other.wait_exit() == 1
    other.stop()
    assert "weights_sha256 differs" in other.output()


def test_serve_refuses_an_unusable_collection_or_index(tmp_path, capsys):
    from nvclip_fast import cli

    (tmp_path / "m.onnx").write_bytes(b"")
    model = ["serve", "-m", str(tmp_path / "m.onnx"), "--port", "0"]
    assert cli.main([*model, "--collection", str(tmp_path / "missing.parquet")]) == cli.EXIT_USAGE
    assert "missing.parquet: no such file or folder" in capsys.readouterr().err
    assert cli.main([*model, "--index", str(tmp_path / "i.faiss")]) == cli.EXIT_USAGE
    assert "--index needs --collection" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The page in a real browser


def _browser_skip_reason() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    if importlib.util.find_spec("uvicorn") is None:
        return "uvicorn is not installed"
    for program, package in (("chromium", "chromium"), ("chromedriver", "chromium-driver")):
        if shutil.which(program) is None:
            return f"{program} not found (Debian: apt-get install {package})"
    return None


@pytest.fixture
def live_url(served):
    """The app served by uvicorn on 127.0.0.1, an ephemeral port, in a thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(served[2], log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_S
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server.should_exit = True
    thread.join(SERVER_START_S)
    sock.close()


@pytest.fixture
def browser(tmp_path):
    if reason := _browser_skip_reason():
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    driver.set_page_load_timeout(PAGE_WAIT_S)
    yield driver
    driver.quit()


def _results(driver, count: int) -> list:
    """The result tiles once ``count`` are shown with their thumbnails loaded."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def loaded(d):
        tiles = d.find_elements(By.CSS_SELECTOR, "figure.hit")
        images = [t.find_element(By.TAG_NAME, "img") for t in tiles]
        done = len(tiles) == count and all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
            for i in images
        )
        return tiles if done else False

    return WebDriverWait(driver, PAGE_WAIT_S, ignored_exceptions=(StaleElementReferenceException,)).until(
        loaded
    )


def test_the_page_in_chromium(served, photos, live_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    collection, enc, _ = served
    browser.get(live_url)
    assert browser.title == "nvclip-fast search"
    browser.find_element(By.ID, "text").send_keys("a photo of a cat")
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("5")
    browser.find_element(By.ID, "go").click()
    tiles = _results(browser, 5)
    hits = collection.search(text="a photo of a cat", k=5, encoder=enc)
    assert [t.find_element(By.CLASS_NAME, "id").text for t in tiles] == [h.id for h in hits]
    assert [t.find_element(By.CLASS_NAME, "score").text for t in tiles] == [f"{h.score:.4f}" for h in hits]
    width = browser.execute_script(
        "return arguments[0].naturalWidth", tiles[0].find_element(By.TAG_NAME, "img")
    )
    assert 0 < width <= THUMBNAIL_PX
    browser.save_screenshot(str(tmp_path / "text-query.png"))

    # an image query: the uploaded photo finds itself first
    browser.execute_script("document.getElementById('results').replaceChildren()")
    browser.find_element(By.ID, "image").send_keys(photos[5])
    browser.find_element(By.ID, "go").click()
    tiles = _results(browser, 5)
    assert tiles[0].find_element(By.CLASS_NAME, "id").text == photos[5]
    assert tiles[0].find_element(By.CLASS_NAME, "score").text == "1.0000"
    status = browser.find_element(By.ID, "status").text
    assert status == "5 results (tiny-clip)"
