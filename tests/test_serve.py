"""`clipedge serve` end to end: real servers on 127.0.0.1, real HTTP clients, nothing else.

Every request goes to loopback; image URLs point at a local HTTP server on 127.0.0.1; the
private-address guard is tested with a patched resolver and refused connection attempts.
"""

from __future__ import annotations

import base64
import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi", reason="the server needs the serve extra")
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

import clipedge  # noqa: E402
from clipedge.engine.session import EngineLimits  # noqa: E402
from clipedge.options import Options  # noqa: E402
from clipedge.pipeline import Pipeline  # noqa: E402
from clipedge.serve.app import create_app  # noqa: E402
from clipedge.serve.settings import ServeSettings  # noqa: E402

from conftest import EXPECTED  # noqa: E402

JPEG = (EXPECTED / "inputs" / "img3_large_1024x768.jpg").read_bytes()
PNG = (EXPECTED / "inputs" / "img0_rgb_97x61.png").read_bytes()


class ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/photo.jpg":
            self._send(JPEG)
        elif self.path == "/late.jpg":  # answers after 1.5 s (in flight during a shutdown)
            time.sleep(1.5)
            self._send(JPEG)
        elif self.path == "/slow.jpg":  # trickles a byte every 0.2 s
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n")
            for _ in range(100):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
        else:
            self.send_error(404)

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def images() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def wait_ready(base: str, timeout: float = 60) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = requests.get(f"{base}/ready", timeout=2)
            if response.status_code == 200 or time.monotonic() > deadline:
                return response
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def start(settings: ServeSettings) -> Iterator[str]:
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{settings.port}"
    yield base
    server.should_exit = True
    thread.join(timeout=30)


def start_ready(settings: ServeSettings) -> Iterator[str]:
    gen = start(settings)
    url = next(gen)
    assert wait_ready(url).status_code == 200
    yield url
    next(gen, None)


@pytest.fixture(scope="module")
def base(tiny_bundle) -> Iterator[str]:
    settings = ServeSettings(
        str(tiny_bundle),
        port=free_port(),
        request_timeout=20,
        max_batch_size=8,
        max_inputs=64,
        max_text_chars=20_000,
        max_body_bytes=2_000_000,
        options=Options(allow_urls=True, allow_private_urls=True, url_timeout=3.0),
    )
    yield from start_ready(settings)


@pytest.fixture(scope="module")
def guarded(tiny_bundle) -> Iterator[str]:
    """Public URLs only, an API key, a tiny queue."""
    settings = ServeSettings(
        str(tiny_bundle),
        port=free_port(),
        api_key="s3cret",
        max_queue=4,
        max_inputs=4,
        options=Options(allow_urls=True),
    )
    yield from start_ready(settings)


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return clipedge.load(tiny_bundle, backend="cpu")


def embed(base: str, payload: dict, **kwargs) -> requests.Response:
    return requests.post(f"{base}/v1/embeddings", json=payload, timeout=30, **kwargs)


def vectors(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


def test_the_release_notes_request(base, images, model):
    response = embed(
        base,
        {
            "model": "jina-clip-v2",
            "input": [{"text": "Bridge close-shot"}, {"url": f"{images}/photo.jpg"}],
            "encoding_type": "float",
            "dimensions": "32",
        },
    )
    got = vectors(response)
    assert got.shape == (2, 32)
    np.testing.assert_allclose(
        got[0], model.encode_text("Bridge close-shot", truncate_dim=32), atol=1e-5
    )
    np.testing.assert_allclose(got[1], model.encode_image(JPEG, truncate_dim=32), atol=1e-5)
    body = response.json()
    assert body["object"] == "list" and body["model"] == "jina-clip-v2"
    assert [row["index"] for row in body["data"]] == [0, 1]
    text_tokens = len(model.tower("text").prepare(["Bridge close-shot"]).row(0))
    assert body["usage"] == {
        "total_tokens": text_tokens + 4 * 4000,
        "prompt_tokens": text_tokens + 16000,
    }


def test_the_official_openai_client(base, model):
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    texts = ["a photo of a cat", "Ein Foto einer Katze"]
    result = client.embeddings.create(model="jina-clip-v2", input=texts, dimensions=32)
    got = np.array([row.embedding for row in result.data], dtype=np.float32)
    np.testing.assert_allclose(got, model.encode_text(texts, truncate_dim=32), atol=1e-5)
    assert [m.id for m in client.models.list()] == ["jina-clip-v2"]


def test_every_input_form_and_encoding(base, images, model):
    data_uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    ids = model.tower("text").prepare(["token ids"]).row(0)
    inputs = [
        "plain",
        {"text": "object"},
        {"image": f"{images}/photo.jpg"},
        {"image": base64.b64encode(PNG).decode()},
        {"image": data_uri},
        {"url": f"{images}/photo.jpg"},
        {"bytes": base64.b64encode(JPEG).decode()},
        ids,
    ]
    want = np.stack(
        [
            model.encode_text("plain"),
            model.encode_text("object"),
            model.encode_image(JPEG),
            model.encode_image(PNG),
            model.encode_image(PNG),
            model.encode_image(JPEG),
            model.encode_image(JPEG),
            model.encode_text("token ids"),
        ]
    )
    types = ["float", "base64", "binary", "ubinary"]
    body = embed(base, {"input": inputs, "embedding_type": types}).json()
    for row, expected in zip(body["data"], want, strict=True):
        got = row["embedding"]
        np.testing.assert_allclose(got["float"], expected, atol=1e-5)
        decoded = np.frombuffer(base64.b64decode(got["base64"]), dtype="<f4")
        np.testing.assert_allclose(decoded, expected, atol=1e-5)
        ubinary = np.packbits(expected > 0)
        assert got["ubinary"] == ubinary.tolist()
        assert got["binary"] == (ubinary.astype(int) - 128).tolist()
    single = embed(
        base, {"input": "plain", "encoding_format": "base64", "normalized": False}
    ).json()
    raw = np.frombuffer(base64.b64decode(single["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(
        raw, model.encode_text("plain", normalize_embeddings=False), atol=1e-5
    )
    query = vectors(embed(base, {"input": ["q"], "task": "retrieval.query"}))
    np.testing.assert_allclose(query[0], model.encode_text("q", task="retrieval.query"), atol=1e-5)


def strip_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(out, "PNG")
    return out.getvalue()


def bomb_png() -> bytes:
    """A small PNG that declares 30000 x 30000 pixels (Pillow's bomb guard refuses it)."""
    out = io.BytesIO()
    Image.new("1", (30000, 30000)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ({"bytes": base64.b64encode(JPEG[:3000]).decode()}, "truncated"),
        ({"bytes": base64.b64encode(bomb_png()).decode()}, "too large"),
        ({"url": "{images}/missing.jpg"}, "404"),
        ({"url": "{images}/slow.jpg"}, "deadline|timed out"),
        ("", "empty string"),
        ({"video": "x"}, "expected a string"),
    ],
)
def test_a_bad_item_fails_only_its_own_request(base, images, model, item, reason):
    if isinstance(item, dict) and "url" in item:
        item = {"url": item["url"].format(images=images)}
    start = time.monotonic()
    response = embed(base, {"input": ["fine", item]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith("item 1: ") and error["param"] == "input"
    assert __import__("re").search(reason, error["message"]), error["message"]
    assert time.monotonic() - start < 5
    np.testing.assert_allclose(
        vectors(embed(base, {"input": "fine"}))[0], model.encode_text("fine"), atol=1e-5
    )
    assert requests.get(f"{base}/ready", timeout=5).status_code == 200


def test_a_long_strip_costs_what_a_square_costs(base, model):
    strip = strip_png(1, 100_000)
    got = vectors(embed(base, {"input": [{"bytes": base64.b64encode(strip).decode()}]}))
    np.testing.assert_allclose(got[0], model.encode_image(strip), atol=1e-5)


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"input": []}, 400, "input"),
        ({"input": ""}, 400, "input"),
        ({"input": "a", "model": "clip-v1"}, 404, "model"),
        ({"input": "a", "dimensions": "abc"}, 400, "dimensions"),
        ({"input": "a", "dimensions": 65}, 400, "dimensions"),
        ({"input": "a", "embedding_type": "int4"}, 400, "embedding_type"),
        ({"input": "a", "task": "summarise"}, 400, "task"),
        ({"input": ["a"] * 65}, 413, "input"),
        ({"input": "x" * 20_001}, 413, "input"),
        ({"input": [[0, 5, 99999, 2]]}, 400, "input"),
        ({"input": "long " * 1000}, 400, "input"),
    ],
)
def test_bad_requests_get_clear_4xx(base, payload, status, param):
    response = embed(base, payload)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["param"] == param and body["detail"] == body["error"]["message"]


def test_truncate_true_embeds_the_beginning(base, model):
    text = "long " * 1000
    got = vectors(embed(base, {"input": text, "truncate": True}))
    np.testing.assert_allclose(got[0], model.encode_text(text, max_length=512), atol=1e-5)


def test_body_limits_and_broken_json(base):
    response = requests.post(f"{base}/v1/embeddings", data=b"{not json", timeout=5)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = requests.post(f"{base}/v1/embeddings", data=b" " * 2_000_001, timeout=5)
    assert response.status_code == 413
    assert requests.get(f"{base}/nowhere", timeout=5).status_code == 404


def test_auth_queue_limit_and_url_guard(guarded, monkeypatch):
    key = {"Authorization": "Bearer s3cret"}
    assert embed(guarded, {"input": "a"}).status_code == 401
    assert (
        embed(guarded, {"input": "a"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    )
    assert embed(guarded, {"input": "a"}, headers=key).status_code == 200
    # More inputs than the queue can ever hold: 413 at once (never a 429 to retry forever).
    never = embed(guarded, {"input": ["a"] * 5}, headers=key)
    assert never.status_code == 413 and "limit of 4 per request" in never.json()["detail"]
    # The resolver says the name is link-local; no connection may be attempted.
    attempts = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def resolve(host, *args, **kwargs):
        if host == "images.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if address[0] not in ("127.0.0.1", "::1"):
            attempts.append(address)
            raise ConnectionRefusedError("tests connect to loopback only")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(socket.socket, "connect", connect)
    response = embed(guarded, {"input": [{"url": "http://images.example/cat.jpg"}]}, headers=key)
    assert response.status_code == 400 and "item 0" in response.json()["error"]["message"]
    assert "169.254.169.254" in response.json()["error"]["message"]
    assert attempts == []


def test_metrics_and_health(base):
    embed(base, {"input": ["m1", "m2"]})
    text = requests.get(f"{base}/metrics", timeout=5).text
    for name in (
        "clipedge_requests_total",
        "clipedge_request_seconds_bucket",
        "clipedge_queue_depth",
        "clipedge_batch_size_bucket",
        "clipedge_items_total",
        "clipedge_queue_seconds_bucket",
        "clipedge_inference_seconds_bucket",
    ):
        assert name in text
    assert 'code="400"' in text or 'code="200"' in text
    assert requests.get(f"{base}/health", timeout=5).json() == {"status": "alive"}


def test_a_model_that_failed_to_load_says_why_everywhere(tmp_path):
    """Loaded in the background (how an app made without a model starts): when that fails,
    /ready, /health (so a supervisor restarts it) and every request say why."""
    gen = start(ServeSettings(str(tmp_path / "no-bundle"), port=free_port()))
    url = next(gen)
    response = wait_ready(url, timeout=5)
    assert response.status_code == 503 and "BundleError" in response.json()["reason"]
    health = requests.get(f"{url}/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "failed"
    answer = embed(url, {"input": "a"})
    assert answer.status_code == 503
    assert "could not be loaded: BundleError" in answer.json()["error"]["message"]
    next(gen, None)


@pytest.mark.parametrize(
    ("arguments", "reason", "code"),
    [(["{missing}"], "does not exist", 1), (["{bundle}", "--precision", "int4"], "got 'int4'", 2)],
)
def test_serve_refuses_a_bad_bundle_before_listening(
    tiny_bundle, tmp_path, capsys, arguments, reason, code
):
    from clipedge.cli import main

    paths = {"missing": tmp_path / "no-bundle", "bundle": tiny_bundle}
    argv = ["serve", *(a.format(**paths) for a in arguments), "--port", str(free_port())]
    assert main(argv) == code  # returned at once: uvicorn never started
    err = capsys.readouterr().err
    assert err.startswith("clipedge serve: error: ") and reason in err


def test_bounded_load_mixed_and_bad(base, images, model):
    """32 concurrent clients for ~3 s on loopback: every good answer right, every bad one 400."""
    texts = [f"caption number {i} " * (1 + i % 7) for i in range(16)]
    want_text = {t: model.encode_text(t) for t in texts}
    want_image = model.encode_image(JPEG)
    unexpected = []
    stop = time.monotonic() + 3

    def client(seed: int) -> int:
        done = 0
        while time.monotonic() < stop:
            kind = (seed + done) % 4
            text = texts[(seed * 7 + done) % len(texts)]
            if kind == 3:
                response = embed(base, {"input": [text, {"bytes": "!!notbase64"}]})
                ok = response.status_code == 400
            elif kind == 2:
                response = embed(base, {"input": [{"url": f"{images}/photo.jpg"}]})
                ok = response.status_code == 200 and np.allclose(
                    vectors(response)[0], want_image, atol=1e-5
                )
            else:
                response = embed(base, {"input": [text]})
                ok = response.status_code == 200 and np.allclose(
                    vectors(response)[0], want_text[text], atol=1e-5
                )
            if not ok:
                unexpected.append((kind, response.status_code, response.text[:200]))
            done += 1
        return done

    with ThreadPoolExecutor(32) as pool:
        total = sum(pool.map(client, range(32)))
    assert unexpected == [] and total >= 32


def test_sigterm_finishes_requests_in_flight(tiny_bundle, images):
    port = free_port()
    env = {
        **os.environ,
        "CLIPEDGE_PORT": str(port),
        "CLIPEDGE_ALLOW_URLS": "1",
        "CLIPEDGE_ALLOW_PRIVATE_URLS": "true",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "clipedge.cli", "serve", str(tiny_bundle)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_ready(base).status_code == 200
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(embed, base, {"input": [{"url": f"{images}/late.jpg"}]})
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            assert pending.result().status_code == 200
        # uvicorn re-raises the signal once it has shut down cleanly (what supervisors expect).
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert b"Traceback" not in process.stderr.read()
    finally:
        process.kill()
        process.wait()


class FakeSession:
    """An engine that fails on a poisoned row, or sleeps; returns each row's first id."""

    provider = "fake"
    limits = EngineLimits()

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.first_ids: list[list[int]] = []  # each batch's rows by their first id

    @property
    def batches(self) -> list[int]:
        """Each batch's size, in the order the batches ran."""
        return [len(rows) for rows in self.first_ids]

    def run(self, feeds):
        time.sleep(self.delay)
        self.first_ids.append(sorted(int(i) for i in feeds["input_ids"][:, 0]))
        if (feeds["input_ids"] == 666).any():
            raise RuntimeError("poisoned row")
        return feeds["input_ids"][:, :1].astype(np.float32)

    def close(self) -> None:
        pass


def fake_pipeline(model, delay: float = 0.0) -> Pipeline:
    return Pipeline(model.tower("text"), FakeSession(delay), embed_dim=1)


def test_a_failing_batch_is_retried_item_by_item(model):
    from clipedge.serve.batcher import TowerBatcher

    pipeline = fake_pipeline(model, delay=0.05)
    batcher = TowerBatcher(pipeline, max_batch=8, max_wait_s=0.02, max_queue=16)
    futures = batcher.submit([[5], [666], [7]])
    assert futures[0].result(5)[0] == 5 and futures[2].result(5)[0] == 7
    with pytest.raises(clipedge.BackendError, match="poisoned"):
        futures[1].result(5)
    batches = pipeline.session.batches
    assert batches[0] == 3 and sorted(batches[1:]) == [1, 1, 1]
    batcher.close()


def test_request_timeout_is_a_504_and_cancels_its_items(tiny_bundle, model):
    import asyncio

    from clipedge.serve.batcher import TowerBatcher
    from clipedge.serve.errors import ApiError
    from clipedge.serve.metrics import Metrics
    from clipedge.serve.requests import parse_request
    from clipedge.serve.service import Service

    settings = ServeSettings(str(tiny_bundle), request_timeout=0.2)
    service = Service(settings, Metrics())
    service.model = model
    service.batchers = {"text": TowerBatcher(fake_pipeline(model, delay=1.0), 8, 0.0, 16)}
    service.ready = True
    request = parse_request({"input": ["a", "b"]}, settings, 64, {})
    with pytest.raises(ApiError) as error:
        asyncio.run(service.embed(request, time.monotonic() + settings.request_timeout))
    assert error.value.status == 504
    service.close()
