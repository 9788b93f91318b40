"""URL fetching: schemes, the private-address guard, redirects, one deadline, the size cap.

Network rule: nothing here sends traffic anywhere but 127.0.0.1. Other hosts get their address
from a patched resolver, and `connect` is patched to record and refuse any address but
127.0.0.1, so a guard that failed to stop a connection is seen without one being made.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipedge.errors import ImageInputError, OptionError
from clipedge.inputs import fetch
from clipedge.inputs.fetch import UrlPolicy, fetch_url
from clipedge.inputs.images import load_image
from clipedge.options import Options

INPUTS = Path(__file__).parent / "fixtures" / "jina-clip-v2-tiny" / "expected" / "inputs"
PAYLOAD = (INPUTS / "img0_rgb_97x61.png").read_bytes()
LOCAL = UrlPolicy(allow_urls=True, allow_private=True, timeout=5.0)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/img.png":
            self.send_body(PAYLOAD)
        elif path == "/host":
            self.send_body(self.headers["Host"].encode())
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop":
            self.send_response(301)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
        elif path == "/stream":  # no Content-Length: the body ends when the connection closes
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 5000)
        elif path in ("/trickle-body", "/trickle-headers"):
            if path == "/trickle-body":
                self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n")
            else:
                self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
            for _ in range(200):
                try:
                    self.wfile.write(b"x")
                except OSError:
                    return
                time.sleep(0.2)
        else:
            self.send_error(404)

    def send_body(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def serve(server: http.server.ThreadingHTTPServer) -> Iterator[int]:
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    yield from serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler))


@pytest.fixture()
def network(monkeypatch) -> dict[str, list]:
    """Names resolve through `network["hosts"]`; connections only to 127.0.0.1 go through."""
    seen: dict[str, list] = {"resolved": [], "connects": [], "hosts": {}}
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host, port, *args, **kwargs):
        seen["resolved"].append(host)
        answer = seen["hosts"].get(host)
        if answer is None:
            return real_getaddrinfo(host, port, *args, **kwargs)
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in answer
        ]

    def connect(sock, address):
        seen["connects"].append(address[0])
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(f"test network: no connection to {address[0]}")
        return real_connect(sock, address)

    def create_connection(address, *args, **kwargs):
        seen["connects"].append(address[0])
        raise ConnectionRefusedError("test network: create_connection is not used")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return seen


def test_fetch_from_a_local_server(port, network):
    assert fetch_url(f"http://127.0.0.1:{port}/img.png", 0, LOCAL) == PAYLOAD
    assert network["connects"] == ["127.0.0.1"]
    options = Options(allow_urls=True, allow_private_urls=True, url_timeout=5.0)
    image = load_image(f"http://127.0.0.1:{port}/img.png", 0, options)
    assert image.size == (97, 61)


def test_urls_disabled_by_default_without_any_network_access(network):
    with pytest.raises(ImageInputError, match=r"^item 3: URL inputs are disabled \(allow_urls"):
        fetch_url("http://127.0.0.1:9/img.png", 3, UrlPolicy())
    with pytest.raises(ImageInputError, match="allow_urls=False"):
        load_image("https://images.example/cat.jpg", 3)
    assert network["resolved"] == [] and network["connects"] == []


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",  # cloud metadata, link-local
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "127.0.0.1",
        "0.0.0.0",
        "100.64.0.1",  # carrier-grade NAT: not global
        "224.0.0.1",
        "240.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:169.254.169.254",  # IPv4-mapped
        "::ffff:10.0.0.1",
        "2002:a9fe:a9fe::1",  # 6to4 around 169.254.169.254
        "64:ff9b::a00:1",  # NAT64 around 10.0.0.1
    ],
)
def test_non_public_addresses_refused_before_connecting(address, network):
    network["hosts"]["images.example"] = [address]
    policy = UrlPolicy(allow_urls=True)
    with pytest.raises(ImageInputError, match=r"^item 5: cannot fetch .*allow_private_urls=False"):
        fetch_url("http://images.example/cat.jpg", 5, policy)
    assert network["connects"] == []


def test_one_private_address_among_public_ones_is_refused(network):
    network["hosts"]["images.example"] = ["93.184.216.34", "10.0.0.1"]
    with pytest.raises(ImageInputError, match="private address 10.0.0.1"):
        fetch_url("http://images.example/cat.jpg", 0, UrlPolicy(allow_urls=True))
    assert network["connects"] == []


def test_connects_to_the_checked_address_resolved_once(network):
    """A public answer is connected to as resolved: no second lookup that could rebind."""
    network["hosts"]["images.example"] = ["93.184.216.34"]
    with pytest.raises(ImageInputError, match="test network: no connection to 93.184.216.34"):
        fetch_url("http://images.example:8080/cat.jpg", 0, UrlPolicy(allow_urls=True))
    assert network["resolved"] == ["images.example"]
    assert network["connects"] == ["93.184.216.34"]


def test_host_header_is_the_original_name(port, network):
    network["hosts"]["images.example"] = ["127.0.0.1"]
    url = f"http://images.example:{port}/host"
    assert fetch_url(url, 0, LOCAL) == f"images.example:{port}".encode()


def test_redirect_to_a_private_host_is_refused_at_that_hop(port, network, monkeypatch):
    """The loopback test server stands in for a public host; its redirect target is private."""
    public_check = fetch._non_public
    monkeypatch.setattr(
        fetch, "_non_public", lambda a: None if a == "127.0.0.1" else public_check(a)
    )
    network["hosts"]["internal.example"] = ["169.254.169.254"]
    policy = UrlPolicy(allow_urls=True, timeout=5.0)
    # The pretend-public server itself is fetched...
    assert fetch_url(f"http://127.0.0.1:{port}/img.png", 0, policy) == PAYLOAD
    # ...but not what it redirects to.
    url = f"http://127.0.0.1:{port}/redirect?http://internal.example/latest/meta-data/"
    with pytest.raises(ImageInputError, match="link-local address 169.254.169.254") as info:
        fetch_url(url, 2, policy)
    assert info.value.index == 2
    assert "internal.example" in network["resolved"]
    assert set(network["connects"]) == {"127.0.0.1"}


def test_redirects_are_followed_within_the_limit(port, network):
    url = f"http://127.0.0.1:{port}/redirect?/img.png"
    assert fetch_url(url, 0, LOCAL) == PAYLOAD
    with pytest.raises(ImageInputError, match="more than 5 redirects"):
        fetch_url(f"http://127.0.0.1:{port}/loop", 0, LOCAL)
    assert len(network["connects"]) == 2 + 6


@pytest.mark.parametrize(
    "target", ["ftp://127.0.0.1/img.png", "file:///etc/passwd", "data:image/png;base64,AAAA"]
)
def test_redirect_to_another_scheme_is_refused(port, network, target):
    url = f"http://127.0.0.1:{port}/redirect?{target}"
    scheme = target.split(":")[0]
    with pytest.raises(ImageInputError, match=f"unsupported scheme '{scheme}' refused"):
        fetch_url(url, 0, LOCAL)
    assert network["connects"] == ["127.0.0.1"]


def test_only_http_and_https(network):
    with pytest.raises(ImageInputError, match="unsupported URL scheme 'ftp'"):
        fetch_url("ftp://127.0.0.1/img.png", 0, LOCAL)
    assert network["connects"] == []


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_a_trickling_server_is_cut_off_at_the_total_deadline(port, path):
    policy = UrlPolicy(allow_urls=True, allow_private=True, timeout=1.0)
    start = time.monotonic()
    with pytest.raises(ImageInputError, match="timed out after 1 s"):
        fetch_url(f"http://127.0.0.1:{port}{path}", 0, policy)
    assert time.monotonic() - start < policy.timeout + 1.0


def test_size_cap_from_content_length_and_from_the_stream(port):
    policy = UrlPolicy(allow_urls=True, allow_private=True, timeout=5.0, max_bytes=1000)
    with pytest.raises(ImageInputError, match=r"exceeds max_url_bytes=1000 \(Content-Length"):
        fetch_url(f"http://127.0.0.1:{port}/big", 0, policy)
    with pytest.raises(ImageInputError, match="exceeds max_url_bytes=1000$"):
        fetch_url(f"http://127.0.0.1:{port}/stream", 0, policy)
    roomy = UrlPolicy(allow_urls=True, allow_private=True, timeout=5.0, max_bytes=5000)
    assert fetch_url(f"http://127.0.0.1:{port}/stream", 0, roomy) == b"x" * 5000


def test_http_errors_name_the_item(port):
    with pytest.raises(ImageInputError, match="^item 9: cannot fetch .*HTTP 404"):
        fetch_url(f"http://127.0.0.1:{port}/missing", 9, LOCAL)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"url_timeout": 0},
        {"url_timeout": float("inf")},
        {"max_url_bytes": 0},
        {"max_url_bytes": 1.5},
    ],
)
def test_policy_validation(kwargs):
    with pytest.raises(OptionError, match=next(iter(kwargs))):
        Options(**kwargs)


@pytest.fixture(scope="module")
def tls_port(tmp_path_factory) -> Iterator[tuple[int, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        + ["-nodes", "-days", "2", "-subj", "/CN=images.example"]
        + ["-addext", "subjectAltName=DNS:images.example"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    for port in serve(server):
        yield port, cert


def test_https_connects_to_the_checked_address_with_the_host_name(tls_port, network, monkeypatch):
    """TLS to 127.0.0.1 with SNI and certificate check for the URL's host name."""
    port, cert = tls_port
    create = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", functools.partial(create, cafile=cert))
    fetch._tls_context.cache_clear()
    try:
        network["hosts"]["images.example"] = ["127.0.0.1"]
        assert fetch_url(f"https://images.example:{port}/img.png", 0, LOCAL) == PAYLOAD
        network["hosts"]["other.example"] = ["127.0.0.1"]
        with pytest.raises(ImageInputError, match="certificate|hostname"):
            fetch_url(f"https://other.example:{port}/img.png", 0, LOCAL)
    finally:
        fetch._tls_context.cache_clear()
    assert set(network["connects"]) == {"127.0.0.1"}


def test_load_passes_its_url_options_to_every_fetch(tiny_bundle, port):
    """`clipedge.load`'s URL options reach the fetcher: off by default, loopback only with
    allow_private_urls, the size cap and the deadline per fetch."""
    import clipedge

    url = f"http://127.0.0.1:{port}/img.png"
    with pytest.raises(ImageInputError, match="item 0: URL inputs are disabled"):
        clipedge.load(tiny_bundle, backend="cpu").encode_image([url])
    public_only = clipedge.load(tiny_bundle, backend="cpu", allow_urls=True)
    with pytest.raises(ImageInputError, match="item 0: .*(loopback|private)"):
        public_only.encode_image([url])
    local = clipedge.load(
        tiny_bundle, backend="cpu", allow_urls=True, allow_private_urls=True, url_timeout=1.0
    )
    fetched = local.encode_image([url])
    np.testing.assert_array_equal(fetched, local.encode_image([PAYLOAD]))
    capped = clipedge.load(
        tiny_bundle, backend="cpu", allow_urls=True, allow_private_urls=True, max_url_bytes=1000
    )
    with pytest.raises(ImageInputError, match="max_url_bytes=1000"):
        capped.encode_image([f"http://127.0.0.1:{port}/stream"])
    start = time.monotonic()
    with pytest.raises(ImageInputError, match="item 1"):
        local.encode_image([url, f"http://127.0.0.1:{port}/trickle-body"])
    assert time.monotonic() - start < 3.0
