"""`clipedge serve` under load, side by side with what users write themselves.

Servers, each in its own process on 127.0.0.1, measured in one run with the same clients:
(a) `clipedge serve` with dynamic batching, (b) the same with batching off
(`--max-batch-size 1`), (c) a plain FastAPI route calling `model.encode_text` per request.
For 1, 8 and 32 concurrent clients sending one short text per request for `--seconds`: p50 /
p99 latency and requests per second; and the model's own time for one text (in-process), so
the server overhead at one client is p50 minus that. The clients run on the same machine and
take CPU from the servers: compare rows with each other, not with other machines.

Usage: python -m benchmarks.serve --bundle DIR [--precision int8-cpu] [--seconds 8]
       python -m benchmarks.serve --bundle DIR --hostile [--attackers 6]   (serve_hostile.py)
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from .charts import add_output_arguments, run_or_render
from .common import markdown_table, median_ms
from .machine import machine_info

TEXT = "a photo of a cat sitting on a red sofa"
NAIVE_SERVER = """
import sys
import clipedge, uvicorn
from fastapi import FastAPI
model = clipedge.load(sys.argv[1], backend="cpu", precision=sys.argv[3] or None)
app = FastAPI()

@app.get("/ready")
def ready():
    return {"status": "ready"}

@app.post("/v1/embeddings")
def embeddings(body: dict):
    vectors = model.encode_text(body["input"])
    return {"data": [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(kind: str, bundle: Path, precision: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind == "naive":
        command = [sys.executable, "-c", NAIVE_SERVER, str(bundle), str(port), precision]
    else:
        batch = "32" if kind == "batching" else "1"
        command = [
            sys.executable,
            "-m",
            "clipedge.cli",
            "serve",
            str(bundle),
            "--port",
            str(port),
            "--backend",
            "cpu",
            "--max-batch-size",
            batch,
        ] + (["--precision", precision] if precision else [])
    return launch(command, port, f"{kind} server")


def launch(command: list[str], port: int, what: str) -> tuple[subprocess.Popen, str]:
    """Start a server process on loopback and wait (at most 300 s) until /ready says 200."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/ready", timeout=2).status_code == 200:
                return process, base
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"{what} did not become ready")


def load(base: str, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = [0]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < stop:
            started = time.perf_counter()
            response = session.post(f"{base}/v1/embeddings", json={"input": [TEXT]}, timeout=60)
            elapsed = time.perf_counter() - started
            with lock:
                if response.status_code == 200:
                    latencies.append(elapsed)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    begun = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - begun
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[0],
        "rps": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def model_ms(bundle: Path, precision: str) -> float:
    import clipedge

    model = clipedge.load(bundle, backend="cpu", precision=precision or None)
    return median_ms(lambda: model.encode_text([TEXT]), 50)


def print_table(results: dict) -> None:
    print(f"model alone, one short text: {results['model_ms']:.1f} ms")
    rows = [
        (
            kind,
            r["clients"],
            f"{r['rps']:.1f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            r["errors"],
        )
        for kind, measured in results["servers"].items()
        for r in measured
    ]
    header = ("server", "clients", "req/s", "p50 ms", "p99 ms", "errors")
    print(markdown_table(header, rows, "lrrrrr"))


def render_charts(results: dict, folder: Path) -> list[Path]:
    """Requests per second and p99 latency per server and client count, as PNG."""
    from .charts import bar_chart

    rows = [
        (f"{kind}, {r['clients']} clients", r)
        for kind, rs in results["servers"].items()
        for r in rs
    ]
    labels = [label for label, _ in rows]
    subtitle = f"{results['machine']['cpu']}, clients on the same machine"
    charts = (
        ("serve-rps.png", "requests per second", "rps", "req/s"),
        ("serve-p99.png", "p99 latency", "p99_ms", "ms"),
    )
    return [
        bar_chart(
            folder / name,
            f"clipedge serve: {title}",
            labels,
            [r[key] for _, r in rows],
            unit,
            subtitle=subtitle,
        )
        for name, title, key, unit in charts
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--precision", default="")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--hostile", action="store_true", help="good clients under attack")
    parser.add_argument("--attackers", type=int, default=6)
    parser.add_argument(
        "--image-every", type=int, default=2, help="--hostile: one good request in N an image"
    )
    parser.add_argument(
        "--client-timeout", type=float, default=30, help="--hostile: seconds per request"
    )
    parser.add_argument(
        "--think", type=float, default=0.0, help="--hostile: seconds between a client's requests"
    )
    parser.add_argument("--server-args", default="", help="extra clipedge serve flags")
    add_output_arguments(parser)
    args = parser.parse_args()
    if args.hostile:
        from .serve_hostile import print_hostile, render_hostile, run_from_args

        run_or_render(args, run_from_args, print_hostile, render_hostile)
        return
    run_or_render(args, run, print_table, render_charts)


def run(args: argparse.Namespace) -> dict:
    results = {
        "machine": machine_info(),
        "text": TEXT,
        "model_ms": model_ms(args.bundle, args.precision),
        "servers": {},
    }
    for kind in ("batching", "no-batching", "naive"):
        process, base = start(kind, args.bundle, args.precision)
        try:
            load(base, 4, 2)  # warm-up
            results["servers"][kind] = [
                load(base, int(n), args.seconds) for n in args.clients.split(",")
            ]
        finally:
            process.terminate()
            process.wait(timeout=60)
    return results


if __name__ == "__main__":
    main()
