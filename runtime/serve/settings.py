"""Server settings: every `clipedge serve` flag, also read from `CLIPEDGE_<FLAG>` variables.

The input limits (max length, image pixels, URL policy, checksums, threads) are the one
`clipedge.Options` the library and the batch tool use too; only what is the server's own
(address, batching, queue, request size and time) is defined here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from clipedge.errors import OptionError
from clipedge.options import Options, add_arguments, from_arguments

ENV_PREFIX = "CLIPEDGE_"
# The server's --max-batch-tokens when none is given, from the memory a padded token costs (on
# the full-size text tower on a CPU ~56 kB, so ~0.5 GB per run of 8192 tokens) and the wait of
# a short text behind one run (docs/serve.md). TEI's GPU default, 16384, doubles both.
SERVE_MAX_BATCH_TOKENS = 8192
# A run of long texts cannot be interrupted, so a short text arriving behind it waits for it:
# batches are cut to about this much model time (full-size int8-cpu on 2 vCPUs: one 512-token
# text, ~0.7 s, where 8192 tokens took tens of seconds; docs/serve.md).
MAX_BATCH_SECONDS = 0.5
POSITIVE = (
    "max_batch_size",
    "max_queue",
    "max_inputs",
    "max_text_chars",
    "max_concurrency",
    "max_connections",
    "max_header_bytes",
    "fetch_workers",
    "fetch_per_request",
    "max_request_tokens",
)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ServeSettings:
    """What the server runs and the limits it keeps. Times in seconds unless named _ms."""

    bundle: str
    host: str = field(default="127.0.0.1", metadata=_help("address to listen on"))
    port: int = field(default=8000, metadata=_help("port to listen on"))
    backend: str = field(default="auto", metadata=_help("auto, cpu, cuda, tensorrt, openvino"))
    precision: str | None = field(default=None, metadata=_help("a precision of the bundle"))
    model_name: str = field(default="jina-clip-v2", metadata=_help("the model name served"))
    max_batch_size: int = field(default=32, metadata=_help("items per model run"))
    max_wait_ms: float = field(default=0.0, metadata=_help("wait for more items to batch"))
    max_batch_seconds: float = field(
        default=MAX_BATCH_SECONDS,
        metadata=_help(
            "model time one run aims at, from the measured time per padded token: what a short "
            "request waits behind long ones at most (0: off)"
        ),
    )
    max_queue: int = field(default=1024, metadata=_help("items waiting per tower"))
    max_inputs: int = field(default=512, metadata=_help("items per request"))
    max_text_chars: int = field(default=200_000, metadata=_help("characters per text"))
    max_body_bytes: int = field(default=64 * 1024 * 1024, metadata=_help("request body size"))
    api_key: str | None = field(default=None, repr=False, metadata=_help("Bearer key"))
    request_timeout: float = field(
        default=60.0, metadata=_help("seconds per request: body, preparation, queue, model")
    )
    max_concurrency: int = field(
        default=64, metadata=_help("embedding requests served at once (then 429)")
    )
    max_connections: int = field(
        default=256, metadata=_help("open connections and tasks (then 503, uvicorn's cap)")
    )
    header_timeout: float = field(default=10.0, metadata=_help("seconds to send the headers"))
    keep_alive_timeout: float = field(default=5.0, metadata=_help("idle keep-alive seconds"))
    max_header_bytes: int = field(default=16384, metadata=_help("request line and headers"))
    fetch_workers: int = field(default=16, metadata=_help("threads fetching image URLs"))
    fetch_per_request: int = field(default=4, metadata=_help("URL fetches per request at once"))
    prepare_workers: int | None = field(
        default=None, metadata=_help("threads tokenising and decoding (default: one per CPU)")
    )
    max_request_tokens: int = field(
        default=262_144, metadata=_help("text tokens per request (then 413)")
    )
    options: Options = field(default_factory=lambda: Options(allow_files=False))

    def __post_init__(self) -> None:
        for name in POSITIVE:
            if getattr(self, name) < 1:
                raise OptionError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.port < 65536:
            raise OptionError(f"port must be in [1, 65535], got {self.port}")
        if self.prepare_workers is not None and self.prepare_workers < 1:
            raise OptionError(f"prepare_workers must be at least 1, got {self.prepare_workers}")
        if min(self.max_wait_ms, self.max_batch_seconds) < 0:
            raise OptionError("max_wait_ms and max_batch_seconds must be >= 0")
        if min(self.request_timeout, *self.timeouts) <= 0:
            raise OptionError("every timeout must be > 0")
        if self.max_inputs > self.max_queue:
            raise OptionError(
                f"max_inputs ({self.max_inputs}) must not exceed max_queue ({self.max_queue}): "
                "a full-size request could never be queued"
            )
        if self.options.allow_files:
            # A client must never make the server read its own disk.
            object.__setattr__(self, "options", self.options.replace(allow_files=False))
        if self.options.max_batch_tokens is None:
            tokens = SERVE_MAX_BATCH_TOKENS
            object.__setattr__(self, "options", self.options.replace(max_batch_tokens=tokens))

    @property
    def timeouts(self) -> tuple[float, float]:
        return (self.header_timeout, self.keep_alive_timeout)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting and per shared option; defaults from `CLIPEDGE_<NAME>`."""
    parser.add_argument("bundle", nargs="?", default=os.environ.get(ENV_PREFIX + "BUNDLE"))
    add_arguments(parser, ServeSettings, ENV_PREFIX, skip=("bundle", "options"))
    add_arguments(parser, Options, ENV_PREFIX, skip=("allow_files",))


def settings_from_arguments(args: argparse.Namespace) -> ServeSettings:
    if not args.bundle:
        raise OptionError(f"give the bundle directory (or set {ENV_PREFIX}BUNDLE)")
    options = from_arguments(args, Options, allow_files=False)
    fields = {f.name for f in dataclasses.fields(ServeSettings)} - {"options"}
    return ServeSettings(**{name: getattr(args, name) for name in fields}, options=options)
