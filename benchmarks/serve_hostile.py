"""`python -m benchmarks.serve --hostile`: good clients while a second group attacks.

One `clipedge serve` on 127.0.0.1 (`--allow-urls --allow-private-urls`, so image URLs may
point at the local stalling server below). 32 well-behaved clients send short texts and small
base64 images for `--seconds`, first alone, then while `--attackers` threads, in a process of
their own, send in turn: long texts with truncate (8192-char texts x 64), image URLs that
stall (a server on 127.0.0.1 that trickles one byte a second), bodies over the size cap, JSON
nested 100 000 deep, and headers trickled a byte at a time. Everything goes to loopback and
stops at the deadline. Prints errors of good requests, their p50/p99 with and without the
attackers, what the attackers got, and the server's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import base64
import http.server
import io
import multiprocessing
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

from .machine import machine_info
from .serve import free_port, launch

TEXT = "a photo of a cat sitting on a red sofa"


class Stalling(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(60):
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:
                return
            time.sleep(1)

    def log_message(self, *args) -> None:
        pass


def small_png() -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def start_server(bundle: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "clipedge.cli", "serve", str(bundle), "--port", str(port)]
    command += ["--backend", "cpu", "--allow-urls", "--allow-private-urls", *extra]
    return launch(command, port, "the server")


@dataclass
class Hostile:
    """The run: `seconds` alone then as long under attack, `attackers` threads, one good
    request in `image_every` an image (a full-size image costs ~30 short texts on a CPU),
    `timeout` seconds per good request, `think` seconds a good client waits between its
    requests (0: a closed loop, which on a small CPU measures the queue the clients build
    themselves), `server_args` for `clipedge serve`."""

    seconds: float
    attackers: int
    image_every: int = 2
    timeout: float = 30
    think: float = 0.0
    server_args: list[str] = field(default_factory=list)


def good_load(
    base: str, seconds: float, setup: Hostile, reference: dict | None = None, clients: int = 32
) -> dict:
    """`clients` threads sending one short text or one small image per request; each vector
    is compared with `reference` (kind -> the first vector seen, filled in when empty)."""
    reference = {} if reference is None else reference
    worst: dict[str, float] = {}
    image = small_png()
    latencies: list[float] = []
    by_kind: dict[str, list[float]] = {"text": [], "image": []}
    errors: Counter = Counter()
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(seed: int) -> None:
        session = requests.Session()
        n = 0
        while time.monotonic() < stop:
            item = {"bytes": image} if (seed + n) % setup.image_every == 0 else TEXT
            started = time.perf_counter()
            try:
                response = session.post(
                    f"{base}/v1/embeddings", json={"input": [item]}, timeout=setup.timeout
                )
                code = response.status_code
            except requests.RequestException as exc:
                code = type(exc).__name__
            with lock:
                if code == 200:
                    latencies.append(time.perf_counter() - started)
                    kind = "text" if item is TEXT else "image"
                    by_kind[kind].append(latencies[-1])
                    vector = np.asarray(response.json()["data"][0]["embedding"], np.float64)
                    vector /= np.linalg.norm(vector)
                    known = reference.setdefault(kind, vector)
                    worst[kind] = min(worst.get(kind, 1.0), float(vector @ known))
                else:
                    errors[str(code)] += 1
            n += 1
            time.sleep(setup.think)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    for values in by_kind.values():
        values.sort()
    return {
        "p99_ms_text": 1000 * by_kind["text"][int(0.99 * (len(by_kind["text"]) - 1))]
        if by_kind["text"]
        else None,
        "p99_ms_image": 1000 * by_kind["image"][int(0.99 * (len(by_kind["image"]) - 1))]
        if by_kind["image"]
        else None,
        "requests": len(latencies),
        "text_ms": [round(1000 * t) for t in by_kind["text"]],  # sorted: the tail's shape
        "image_ms": [round(1000 * t) for t in by_kind["image"]],
        "errors": dict(errors),
        "min_cosine_to_first": worst,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
    }


def attack(base: str, stall_url: str, kind: str) -> str:
    url = f"{base}/v1/embeddings"
    port = int(base.rsplit(":", 1)[1])
    try:
        if kind == "long":
            body = {"input": ["word " * 1700] * 64, "truncate": True}
            return str(requests.post(url, json=body, timeout=30).status_code)
        if kind == "stall":
            body = {"input": [{"url": f"{stall_url}/{i}.jpg"} for i in range(8)]}
            return str(requests.post(url, json=body, timeout=30).status_code)
        if kind == "huge":
            return str(requests.post(url, data=b" " * (65 * 2**20), timeout=30).status_code)
        if kind == "deep":
            deep = b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            return str(requests.post(url, data=deep, timeout=30).status_code)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # slow headers
            for byte in b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"a" * 60:
                sock.sendall(bytes([byte]))
                time.sleep(0.5)
        return "slow-headers-finished"
    except (requests.RequestException, OSError) as exc:
        return type(exc).__name__


def attack_until(base: str, stall_url: str, attackers: int, stop: float) -> dict[str, int]:
    """`attackers` threads cycling through the attacks until `stop` (time.monotonic, which
    every process shares); what each kind of attack got, counted."""
    outcomes: Counter = Counter()
    kinds = ("long", "stall", "huge", "deep", "slow")

    def attacker(seed: int) -> None:
        n = 0
        while time.monotonic() < stop:
            kind = kinds[(seed + n) % len(kinds)]
            outcomes[f"{kind}: {attack(base, stall_url, kind)}"] += 1
            n += 1

    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(attackers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return dict(outcomes)


def status_mb(pid: int, key: str = "VmHWM") -> float:
    """A /proc/PID/status memory field (peak RSS by default) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_hostile(bundle: Path, setup: Hostile) -> dict:
    stall = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    stall.daemon_threads = True
    threading.Thread(target=stall.serve_forever, daemon=True).start()
    stall_url = f"http://127.0.0.1:{stall.server_address[1]}"
    process, base = start_server(bundle, setup.server_args)
    try:
        good_load(base, 2, setup, clients=4)  # warm-up
        rss_loaded = status_mb(process.pid, "VmRSS")  # the model's resident size, warm
        reference: dict = {}
        quiet = good_load(base, setup.seconds, setup, reference)
        rss_quiet = status_mb(process.pid)
        # The attackers run in a process of their own: they are other machines in life, and
        # in the good clients' process their Python work held the clients' GIL.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(small_png).result()  # started and this module imported: ready to go
            attacks = pool.submit(
                attack_until, base, stall_url, setup.attackers, time.monotonic() + setup.seconds
            )
            hostile = good_load(base, setup.seconds, setup, reference)
            outcomes = attacks.result()
        return {
            "quiet": quiet,
            "hostile": hostile,
            "attacks": outcomes,
            "rss_mb_loaded": rss_loaded,
            "peak_rss_mb_quiet": rss_quiet,
            "peak_rss_mb": status_mb(process.pid),
        }
    finally:
        process.terminate()
        process.wait(timeout=60)
        stall.shutdown()


def run_from_args(args: argparse.Namespace) -> dict:
    """The run of `python -m benchmarks.serve --hostile ...`, with the machine and setup."""
    setup = Hostile(
        args.seconds,
        args.attackers,
        args.image_every,
        args.client_timeout,
        args.think,
        ["--precision", args.precision] * bool(args.precision) + args.server_args.split(),
    )
    return {"machine": machine_info(), "setup": setup.__dict__, **run_hostile(args.bundle, setup)}


def render_hostile(results: dict, folder: Path) -> list[Path]:
    """Good short texts' p50 and p99 alone and under attack, against the goal (2x alone)."""
    from .charts import Line, bar_chart

    rows = [
        (f"{which}, {name}", value)
        for phase, name in (("quiet", "alone"), ("hostile", "under attack"))
        for which, value in (
            ("p50", statistics.median(results[phase]["text_ms"])),
            ("p99", results[phase]["p99_ms_text"]),
        )
    ]
    setup = results["setup"]
    return [
        bar_chart(
            folder / "serve-hostile.png",
            "clipedge serve: good short texts alone and under attack",
            [label for label, _ in rows],
            [value for _, value in rows],
            "ms",
            [Line(2 * results["quiet"]["p99_ms_text"], "goal: p99 under attack <= 2x alone")],
            subtitle=f"{results['machine']['cpu']}, {setup['attackers']} attackers, "
            f"{setup['seconds']:.0f} s per phase, clients on the same machine",
        )
    ]


def print_hostile(results: dict) -> None:
    for name in ("quiet", "hostile"):
        r = results[name]
        print(
            f"good clients, {name:7s}: {r['requests']} ok, errors {r['errors'] or 'none'}, "
            f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms (texts {r['p99_ms_text']:.0f}, "
            f"images {r['p99_ms_image']:.0f}); min cosine to the first vector "
            + ", ".join(f"{k} {v:.6f}" for k, v in r["min_cosine_to_first"].items())
        )
    print("attacks:", ", ".join(f"{k} x{v}" for k, v in sorted(results["attacks"].items())))
    print(
        f"server RSS: {results['rss_mb_loaded']:.0f} MB loaded and warm; peak "
        f"{results['peak_rss_mb_quiet']:.0f} MB before the attacks, "
        f"{results['peak_rss_mb']:.0f} MB after"
    )
