"""`clipedge serve` under hostile traffic (issue 20): every request bounded in memory and time.

Servers listen on 127.0.0.1 only; stalled URLs come from a local server; every client is
bounded in count and time.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi", reason="the server needs the serve extra")
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402
from test_serve import (  # noqa: E402
    PNG,
    FakeSession,
    embed,
    fake_pipeline,
    free_port,
    images,  # noqa: F401
    model,  # noqa: F401
    wait_ready,
)

from clipedge.options import Options  # noqa: E402
from clipedge.pipeline import Pipeline  # noqa: E402
from clipedge.serve.app import create_app  # noqa: E402
from clipedge.serve.batcher import TowerBatcher  # noqa: E402
from clipedge.serve.protocol import uvicorn_config  # noqa: E402
from clipedge.serve.settings import ServeSettings  # noqa: E402


def serve(settings: ServeSettings):
    """(base URL, the app's Service) of a server run as `clipedge serve` runs it."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{settings.port}"
    assert wait_ready(base).status_code == 200
    yield base, app.state.service
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def hostile(tiny_bundle):
    settings = ServeSettings(
        str(tiny_bundle),
        port=free_port(),
        request_timeout=1.0,
        header_timeout=1.0,
        max_concurrency=3,
        max_inputs=500,
        max_queue=1024,
        max_request_tokens=5000,
        fetch_workers=4,
        fetch_per_request=1,
        prepare_workers=2,
        options=Options(
            allow_urls=True, allow_private_urls=True, url_timeout=5.0, max_batch_tokens=600
        ),
    )
    yield from serve(settings)


def test_the_first_over_length_text_stops_the_request_before_the_rest_is_tokenised(hostile):
    base, service = hostile
    tokenizer = service.model.tower("text").tokenizer
    seen = []
    real = tokenizer.tokenize_with_flags

    def counting(texts, max_length):
        seen.append(len(texts))
        return real(texts, max_length)

    tokenizer.tokenize_with_flags = counting
    try:
        response = embed(base, {"input": ["word " * 2000] * 400})
    finally:
        del tokenizer.tokenize_with_flags
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith("item 0: longer than max_length")
    assert sum(seen) <= 8  # one chunk of ~8 cut texts, not 400


def test_token_budgets_are_413_naming_the_item(hostile, model):  # noqa: F811
    base, _ = hostile
    text = "word " * 200
    tokens = len(model.tower("text").prepare([text]).row(0))
    response = embed(base, {"input": [text] * 30, "truncate": True})
    assert response.status_code == 413, response.text
    assert response.json()["detail"].startswith(f"item {5000 // tokens}: the request's texts")
    response = embed(base, {"input": [[5] * 700]})
    assert response.status_code == 400 and "item 0: 700 tokens exceed" in response.text


def test_a_text_over_the_batch_token_budget_is_413(tiny_bundle):
    settings = ServeSettings(
        str(tiny_bundle), port=free_port(), options=Options(max_batch_tokens=64)
    )
    gen = serve(settings)
    base, _ = next(gen)
    response = embed(base, {"input": ["short", "word " * 100]})
    assert response.status_code == 413
    assert "item 1: " in response.json()["detail"] and "max_batch_tokens=64" in response.text
    assert embed(base, {"input": ["short"]}).status_code == 200
    next(gen, None)


def test_long_texts_never_share_a_batch_over_the_token_budget(model):  # noqa: F811
    pipeline = fake_pipeline(model)
    pipeline.max_batch_tokens = 100
    batcher = TowerBatcher(pipeline, max_batch=32, max_wait_s=0.2, max_queue=64)
    rows = [[5] * 60, [6] * 10, [7] * 40, [8] * 30, [9] * 20, [4] * 10]
    futures = batcher.submit(rows)
    assert [f.result(5)[0] for f in futures] == [5, 6, 7, 8, 9, 4]
    batcher.close()
    # Grouped longest first: [60] alone (60+40 pads to 120), [40, 30], [20, 10, 10]. Which
    # runs first is not asked here: short batches may run beside one another (express lane).
    assert sorted(pipeline.session.first_ids) == [[4, 6, 9], [5], [7, 8]]


def test_deep_json_is_400_and_metric_labels_stay_bounded(hostile):
    base, _ = hostile
    deep = b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = requests.post(f"{base}/v1/embeddings", data=deep, timeout=10)
    assert response.status_code == 400 and "nested too deeply" in response.text
    for i in range(50):
        assert requests.get(f"{base}/random-{i}", timeout=5).status_code == 404
    metrics = requests.get(f"{base}/metrics", timeout=5).text
    assert "random-" not in metrics and 'route="unmatched"' in metrics


def test_405_401_docs_and_the_schema(hostile, tiny_bundle):
    base, _ = hostile
    response = requests.get(f"{base}/v1/embeddings", timeout=5)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert requests.get(f"{base}/docs", timeout=5).status_code == 200
    spec = requests.get(f"{base}/openapi.json", timeout=5).json()
    operation = spec["paths"]["/v1/embeddings"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/EmbeddingRequest"
    )
    schemas = spec["components"]["schemas"]
    assert "input" in schemas["EmbeddingRequest"]["properties"]
    assert {"EmbeddingResponse", "ErrorResponse", "TextItem"} <= set(schemas)
    gen = serve(ServeSettings(str(tiny_bundle), port=free_port(), api_key="k"))
    keyed, _ = next(gen)
    answer = embed(keyed, {"input": "a"})
    assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Bearer")
    next(gen, None)


def test_off_matryoshka_dimensions_get_a_warning(hostile):
    body = embed(hostile[0], {"input": "a", "dimensions": 20}).json()
    assert len(body["data"][0]["embedding"]) == 20
    assert "not one of the trained Matryoshka dimensions [16, 32, 64]" in body["warnings"][0]
    assert "warnings" not in embed(hostile[0], {"input": "a", "dimensions": 32}).json()


def test_one_deadline_covers_fetching_and_the_body(hostile, images):  # noqa: F811
    base, _ = hostile
    started = time.monotonic()
    response = embed(base, {"input": [{"url": f"{images}/slow.jpg"}]})  # trickles for 20 s
    assert response.status_code == 504, response.text
    assert time.monotonic() - started < 1.5
    # Decoding too: eight 4000x4000 images take longer than the 1 s the request has.
    out = io.BytesIO()
    Image.new("RGB", (4000, 4000), (9, 99, 199)).save(out, "PNG")
    big = {"bytes": base64.b64encode(out.getvalue()).decode()}
    started = time.monotonic()
    assert embed(base, {"input": [big] * 8}).status_code == 504
    assert time.monotonic() - started < 1.5
    # A body that never finishes: 408 at the deadline, not a connection held for ever.
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 1.5


def test_slow_headers_are_cut_off(hostile):
    base, _ = hostile
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        started = time.monotonic()
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            sock.settimeout(0.1)
            try:
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed and time.monotonic() - started < 2.5
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # a 300 kB head
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")


def test_stalled_urls_do_not_delay_other_requests_and_concurrency_is_capped(hostile, images):  # noqa: F811
    base, _ = hostile
    image = {"bytes": base64.b64encode(PNG).decode()}
    with ThreadPoolExecutor(4) as pool:
        stalled = [
            pool.submit(embed, base, {"input": [{"url": f"{images}/slow.jpg"}]}) for _ in range(2)
        ]
        time.sleep(0.2)
        started = time.monotonic()
        fine = embed(base, {"input": [image]})
        assert fine.status_code == 200 and time.monotonic() - started < 0.5
        crowded = [pool.submit(embed, base, {"input": [{"url": f"{images}/slow.jpg"}]})]
        time.sleep(0.1)
        over = embed(base, {"input": ["a"]})  # 3 requests in flight: --max-concurrency 3
        assert over.status_code == 429 and over.headers["retry-after"] == "1"
        assert [f.result().status_code for f in stalled + crowded] == [504, 504, 504]


def test_concurrent_requests_fill_the_queue(tiny_bundle, model):  # noqa: F811
    """The queue counts the items already waiting: concurrent requests that together pass
    --max-queue get 429 while the model is busy, and the server recovers afterwards."""
    settings = ServeSettings(
        str(tiny_bundle), port=free_port(), max_queue=8, max_inputs=4, request_timeout=20
    )
    gen = serve(settings)
    base, service = next(gen)
    busy = TowerBatcher(fake_pipeline(model, delay=0.5), 1, 0.0, settings.max_queue)
    service.batchers["text"], real = busy, service.batchers["text"]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: embed(base, {"input": ["a"] * 4}), range(6)))
    codes = sorted(a.status_code for a in answers)
    assert codes.count(429) >= 2 and codes.count(200) >= 2, codes
    assert all("queue is full" in a.text for a in answers if a.status_code == 429)
    busy.close()
    service.batchers["text"] = real
    assert embed(base, {"input": ["a"]}).status_code == 200
    next(gen, None)


@pytest.mark.parametrize("path", ["/etc/hostname", "/no/such/file"])
def test_a_path_as_url_reveals_nothing(hostile, path):
    response = embed(hostile[0], {"input": [{"url": path}]})
    assert response.status_code == 400
    message = json.dumps(response.json())
    assert "local file paths are not accepted" in message and path not in message


def test_a_short_text_waits_for_one_long_batch_not_all(model):  # noqa: F811
    pipeline = fake_pipeline(model, delay=0.3)
    pipeline.max_batch_tokens = 300
    batcher = TowerBatcher(pipeline, max_batch=32, max_wait_s=0.0, max_queue=64)
    # one batch each, 1.2 s in all; each over SHORT_RUN_TOKENS, so none takes the express
    # lane (at 90 tokens they did, and the short text raced them there)
    long = batcher.submit([[5] * 300] * 4)
    time.sleep(0.1)
    short = batcher.submit([[7]])[0]
    assert short.result(5)[0] == 7
    assert sum(f.done() for f in long) <= 2  # it overtook the long ones still waiting
    assert all(f.result(5)[0] == 5 for f in long)
    batcher.close()


def test_long_texts_keep_moving_under_a_stream_of_short_ones(model):  # noqa: F811
    pipeline = fake_pipeline(model, delay=0.1)
    pipeline.max_batch_tokens = 100
    batcher = TowerBatcher(pipeline, max_batch=32, max_wait_s=0.0, max_queue=256)
    batcher.submit([[7]])  # the model is busy when the rest arrive
    long = batcher.submit([[5] * 90] * 2)
    started, shorts = time.monotonic(), []
    while not all(f.done() for f in long) and time.monotonic() - started < 5:
        shorts += batcher.submit([[7]] * 3)
        time.sleep(0.03)
    assert all(f.done() for f in long) and time.monotonic() - started < 2.0
    batcher.close()
    assert all(f.result(5)[0] == 7 for f in shorts)


def test_a_client_that_leaves_costs_no_more_work(tiny_bundle, images):  # noqa: F811
    """A caller that gave up (closed the connection) has its request cancelled at once: its
    stalled fetch stops and its queued items are dropped, instead of running to the deadline."""
    settings = ServeSettings(
        str(tiny_bundle),
        port=free_port(),
        request_timeout=20,
        options=Options(allow_urls=True, allow_private_urls=True, url_timeout=15.0),
    )
    for base, service in serve(settings):
        body = json.dumps({"input": [{"url": f"{images}/slow.jpg"}]}).encode()  # trickles 20 s
        head = "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        with socket.create_connection(("127.0.0.1", settings.port), timeout=5) as sock:
            sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 5
            while service.active == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert service.active == 1
        left = time.monotonic()
        while service.active and time.monotonic() - left < 5:
            time.sleep(0.02)
        assert service.active == 0 and time.monotonic() - left < 1.0
        assert embed(base, {"input": ["still serving"]}).status_code == 200
        metrics = requests.get(f"{base}/metrics", timeout=5).text
        assert 'code="499"' in metrics


class PerTokenSession(FakeSession):
    """Sleeps in proportion to the padded tokens of each run, as a CPU does."""

    def __init__(self, seconds_per_token: float) -> None:
        super().__init__()
        self.seconds_per_token = seconds_per_token
        self.shapes: list[tuple[int, int]] = []
        self.first_ids: list[int] = []

    def run(self, feeds):
        ids = feeds["input_ids"]
        self.shapes.append(ids.shape)
        self.first_ids.append(int(ids[0, 0]))
        time.sleep(ids.size * self.seconds_per_token)
        return ids[:, :1].astype(np.float32)


def test_runs_are_cut_to_the_time_budget_so_short_texts_wait_little(model):  # noqa: F811
    """A run cannot be interrupted: with runs of 8 long texts (8 x 300 tokens, 1.2 s) a short
    text waits up to 1.2 s; with --max-batch-seconds 0.35 the batcher learns the time per token
    and runs them in twos (0.3 s), while short texts still batch together."""
    session = PerTokenSession(0.0005)
    pipeline = Pipeline(model.tower("text"), session, embed_dim=1)
    batcher = TowerBatcher(pipeline, 32, 0.0, 256, max_batch_seconds=0.35)
    batcher.submit([[5] * 300] * 8)[-1].result(10)  # the first run measures
    long = batcher.submit([[5] * 300] * 8)
    time.sleep(0.05)
    started = time.monotonic()
    assert batcher.submit([[7] * 4])[0].result(10)[0] == 7
    waited = time.monotonic() - started
    [f.result(10) for f in long]
    shorts = batcher.submit([[7] * 4] * 32)
    [f.result(10) for f in shorts]
    batcher.close()
    assert waited < 0.6, waited
    assert max(rows for rows, width in session.shapes[1:] if width == 300) == 2
    assert session.shapes[-1] == (32, 4)  # 128 tokens: short texts are not cut


def test_a_short_text_runs_beside_a_long_run(model):  # noqa: F811
    """A run cannot be interrupted, so short batches run beside it in a second thread: a
    short text waits for no long run (before: the whole 1.2 s run), and the long texts'
    results are unchanged. Batches of SHORT_RUN_TOKENS or more never take that lane."""
    from clipedge.serve.batcher import SHORT_RUN_TOKENS

    session = PerTokenSession(0.0005)
    pipeline = Pipeline(model.tower("text"), session, embed_dim=1)
    batcher = TowerBatcher(pipeline, 32, 0.0, 256)
    long = batcher.submit([[5] * 300] * 8)  # one run of 2400 padded tokens: 1.2 s
    time.sleep(0.1)
    started = time.monotonic()
    assert batcher.submit([[7] * 4])[0].result(10)[0] == 7
    waited = time.monotonic() - started
    assert not long[0].done()
    assert [f.result(10)[0] for f in long] == [5] * 8
    assert waited < 0.3, waited
    # a batch of SHORT_RUN_TOKENS padded tokens waits for the run in progress
    long = batcher.submit([[5] * 300] * 8)
    time.sleep(0.1)
    width = SHORT_RUN_TOKENS // 8
    wide = batcher.submit([[9] * width] * 8)
    wide[-1].result(10)
    assert long[-1].done()
    batcher.close()


def test_short_texts_split_by_the_time_budget_run_first_in_first_out(model):  # noqa: F811
    """Short texts over several runs: the earlier ones go first. Before, the batch with the
    newest of them ran next every time, and under a stream of them an early short text
    waited until the stream ended (a 29 s p99 at full size)."""
    session = PerTokenSession(0.001)
    pipeline = Pipeline(model.tower("text"), session, embed_dim=1)
    batcher = TowerBatcher(pipeline, 64, 0.0, 256, max_batch_seconds=0.01)  # -> 256 tokens
    batcher.submit([[5] * 300] * 2)[-1].result(10)  # measures the time per token
    busy = batcher.submit([[5] * 300])  # the model is busy (0.3 s) while the rest queue
    time.sleep(0.1)
    first = batcher.submit([[3] * 16] * 16)  # 256 tokens: one run
    second = batcher.submit([[4] * 16] * 16)
    [f.result(10) for f in busy + first + second]
    batcher.close()
    assert session.shapes[-2:] == [(16, 16), (16, 16)]
    assert session.first_ids[-2:] == [3, 4]  # the earlier short texts ran first


def test_a_short_text_waits_for_one_long_run_at_most(model):  # noqa: F811
    """Long texts waiting over MAX_AGE_S get the turn after each batch that ran ahead of
    them; runs of long texts with nothing shorter waiting earn them nothing more. Before,
    the turns alternated whatever ran: after two such runs a short text that had just come
    went behind a third."""
    from clipedge.serve.batcher import MAX_AGE_S, Work

    pipeline = Pipeline(model.tower("text"), FakeSession(), embed_dim=1)
    batcher = TowerBatcher(pipeline, 1, 0.0, 256)  # one row per run
    batcher.close()
    aged = time.monotonic() - 2 * MAX_AGE_S
    live = [Work([5] * 300, queued_at=aged + i / 100) for i in range(4)]

    def run_next() -> Work:
        (index,) = batcher._next(live)
        return live.pop(index)

    assert [run_next().queued_at for _ in range(2)] == [aged, aged + 0.01]  # oldest first
    short = Work([7] * 4)
    live.append(short)
    assert run_next() is short
    assert run_next().queued_at == aged + 0.02  # then the long text it ran ahead of
