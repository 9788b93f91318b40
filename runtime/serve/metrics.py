"""Prometheus metrics of one server (its own registry, so several apps can live in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "clipedge_requests",
            "Requests by route, status code and failure reason",
            ["route", "code", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "clipedge_request_seconds", "Request latency", ["route"], registry=r
        )
        self.queue_depth = Gauge(
            "clipedge_queue_depth", "Items waiting per tower", ["tower"], registry=r
        )
        self.batch_size = Histogram(
            "clipedge_batch_size",
            "Items per model run",
            ["tower"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.items = Counter(
            "clipedge_items",
            "Items embedded per tower (rate() = items per second)",
            ["tower"],
            registry=r,
        )
        self.queue_seconds = Histogram(
            "clipedge_queue_seconds",
            "Oldest item's wait before its batch ran",
            ["tower"],
            registry=r,
        )
        self.inference_seconds = Histogram(
            "clipedge_inference_seconds", "Model time per batch", ["tower"], registry=r
        )

    def observe_batch(self, tower: str, size: int, waited: float, inference: float) -> None:
        self.batch_size.labels(tower).observe(size)
        self.items.labels(tower).inc(size)
        self.queue_seconds.labels(tower).observe(waited)
        self.inference_seconds.labels(tower).observe(inference)

    def render(self) -> bytes:
        return generate_latest(self.registry)
