"""Fetching image URLs without letting a URL reach what it should not.

`fetch_url` under a `UrlPolicy`:

- only http and https, also for every redirect (at most `MAX_REDIRECTS`);
- every address a host name resolves to, on the first request and on each redirect hop, is
  checked before connecting: loopback, private, link-local, multicast, reserved, unspecified and
  other non-global addresses (also inside IPv4-mapped, 6to4 and NAT64 IPv6 addresses) are
  refused unless `allow_private`; the connection then goes to the checked address itself (the
  name is not resolved a second time, so DNS rebinding cannot swap it), with the original Host
  header and, for https, the host name for SNI and certificate checks;
- one deadline for the whole fetch: resolving, connecting, TLS, every redirect and every read
  (a server that trickles bytes cannot hold a fetch past it);
- a size cap, from Content-Length and on the bytes streamed.

Proxy settings from the environment are not used. The standard library only; http.client and
ssl are imported on the first fetch (they cost ~30 ms of every `import clipedge`).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from ..errors import ImageInputError

DEFAULT_MAX_URL_BYTES = 32 * 1024 * 1024
DEFAULT_URL_TIMEOUT = 10.0
MAX_REDIRECTS = 5
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class UrlPolicy:
    """Whether and how image URLs are fetched.

    `allow_urls`: fetch http(s) URLs at all (off: refused before any network access).
    `allow_private`: also connect to loopback, private, link-local and other non-global
    addresses (intranet image stores, tests). `timeout`: seconds for the whole fetch, redirects
    included. `max_bytes`: the largest body accepted.
    """

    allow_urls: bool = False
    allow_private: bool = False
    timeout: float = DEFAULT_URL_TIMEOUT
    max_bytes: int = DEFAULT_MAX_URL_BYTES


class _Refused(Exception):
    """The reason a fetch failed; `fetch_url` turns it into an ImageInputError."""


def fetch_url(url: str, index: int, policy: UrlPolicy) -> bytes:
    """The body of an http(s) URL under `policy`; raises `ImageInputError(index, reason)`."""
    try:
        return _fetch(url, policy)
    except _Refused as exc:
        raise ImageInputError(index, str(exc)) from exc.__cause__


def _fetch(url: str, policy: UrlPolicy) -> bytes:
    if _scheme(url) not in _DEFAULT_PORTS:
        raise _Refused(f"unsupported URL scheme {_scheme(url)!r} (only http and https)")
    if not policy.allow_urls:
        raise _Refused(
            f"URL inputs are disabled (allow_urls=False; --allow-urls to serve or embed): {url}"
        )
    deadline = time.monotonic() + policy.timeout
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        try:
            location, body = _get(current, policy, deadline)
        except _Refused as exc:
            raise _Refused(f"cannot fetch {current}: {exc}") from exc.__cause__
        except TimeoutError as exc:
            reason = f"timed out after {policy.timeout:g} s (the deadline of the whole fetch)"
            raise _Refused(f"cannot fetch {current}: {reason}") from exc
        except (OSError, ValueError) as exc:
            raise _Refused(f"cannot fetch {current}: {exc}") from exc
        if location is None:
            return body
        target = urllib.parse.urljoin(current, location)
        if _scheme(target) not in _DEFAULT_PORTS:
            scheme = _scheme(target)
            raise _Refused(f"redirect from {current} to unsupported scheme {scheme!r} refused")
        current = target
    raise _Refused(f"cannot fetch {url}: more than {MAX_REDIRECTS} redirects")


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url else ""


def _get(url: str, policy: UrlPolicy, deadline: float) -> tuple[str | None, bytes]:
    """One GET: (the redirect target, b"") or (None, the body)."""
    import http.client

    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host:
        raise _Refused("the URL has no host")
    port = parts.port or _DEFAULT_PORTS[parts.scheme.lower()]
    addresses = _resolve(host, port, deadline)
    if not policy.allow_private:
        for _, sockaddr in addresses:
            kind = _non_public(sockaddr[0])
            if kind:
                raise _Refused(
                    f"{host} resolves to the {kind} address {sockaddr[0]}, refused "
                    "(allow_private_urls=False)"
                )
    connection = http.client.HTTPConnection(host, port)
    try:
        connection.sock = _connect(addresses, deadline)
        if parts.scheme.lower() == "https":
            connection.sock.settimeout(_remaining(deadline))
            # On a failed handshake the TLS socket closes itself (it owns the descriptor).
            connection.sock = _tls_context().wrap_socket(connection.sock, server_hostname=host)
            connection.sock.deadline = deadline
        netloc = parts.netloc.rpartition("@")[2]
        if not netloc.isascii():
            netloc = host.encode("idna").decode("ascii") + (f":{parts.port}" if parts.port else "")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Host": netloc,
            "User-Agent": "clipedge",
            "Accept-Encoding": "identity",
            "Connection": "close",
        }
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        if response.status in _REDIRECT_CODES:
            location = response.getheader("Location")
            if not location:
                raise _Refused(f"HTTP {response.status} redirect without a Location header")
            return location, b""
        if not 200 <= response.status < 300:
            raise _Refused(f"HTTP {response.status} {response.reason}")
        return None, _read_capped(response, policy.max_bytes)
    except http.client.HTTPException as exc:
        raise _Refused(f"bad HTTP response: {exc!r}") from exc
    finally:
        connection.close()


def _read_capped(response: Any, max_bytes: int) -> bytes:
    too_large = f"URL body exceeds max_url_bytes={max_bytes}"
    declared = (response.getheader("Content-Length") or "").strip()
    if declared.isdigit() and int(declared) > max_bytes:
        raise _Refused(f"{too_large} (Content-Length {declared})")
    chunks = []
    received = 0
    while chunk := response.read(min(_READ_CHUNK, max_bytes + 1 - received)):
        chunks.append(chunk)
        received += len(chunk)
        if received > max_bytes:
            raise _Refused(too_large)
    return b"".join(chunks)


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline passed")
    return remaining


def _resolve(host: str, port: int, deadline: float) -> list[tuple[int, tuple]]:
    """(family, sockaddr) of every address of `host`, resolved in a thread within the deadline."""
    import socket
    import threading

    answer: list[Any] = []

    def resolve() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            answer.append(exc)

    thread = threading.Thread(target=resolve, name="clipedge-resolve", daemon=True)
    thread.start()
    thread.join(_remaining(deadline))
    if not answer:
        raise TimeoutError(f"resolving {host} did not finish")
    if isinstance(answer[0], Exception):
        raise _Refused(f"cannot resolve {host}: {answer[0]}") from answer[0]
    addresses = [(family, sockaddr) for family, _, _, _, sockaddr in answer[0]]
    if not addresses:
        raise _Refused(f"{host} has no address")
    return addresses


def _non_public(address: str) -> str | None:
    """Why `address` is not a public unicast address (None when it is)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        elif ip.sixtofour:
            ip = ip.sixtofour
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-global"


class _DeadlineMixin:
    """Every blocking read and write waits at most until `deadline` (time.monotonic())."""

    deadline = math.inf

    def recv_into(self, *args: Any) -> int:
        self.settimeout(_remaining(self.deadline))  # type: ignore[attr-defined]
        return super().recv_into(*args)  # type: ignore[misc]

    def sendall(self, *args: Any) -> None:
        self.settimeout(_remaining(self.deadline))  # type: ignore[attr-defined]
        return super().sendall(*args)  # type: ignore[misc]


@functools.cache
def _socket_class() -> type:
    import socket

    return type("_DeadlineSocket", (_DeadlineMixin, socket.socket), {})


@functools.cache
def _tls_context() -> Any:
    import ssl

    context = ssl.create_default_context()
    context.sslsocket_class = type("_DeadlineSSLSocket", (_DeadlineMixin, ssl.SSLSocket), {})
    return context


def _connect(addresses: list[tuple[int, tuple]], deadline: float) -> Any:
    """A socket connected to the first address that answers, with `deadline` on every read."""
    import socket

    error: OSError | None = None
    for family, sockaddr in addresses:
        sock = _socket_class()(family, socket.SOCK_STREAM)
        sock.deadline = deadline
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            error = exc
            continue
        return sock
    assert error is not None
    raise error
