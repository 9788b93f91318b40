"""Server settings: every `clipedge serve` flag, also read from `CLIPEDGE_<FLAG>` variables."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServeSettings:
    """What the server runs and the limits it keeps. Times in seconds unless named _ms."""

    bundle: str
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "auto"
    precision: str | None = None
    model_name: str = "jina-clip-v2"
    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    max_queue: int = 1024
    max_inputs: int = 512
    max_length: int = 8192
    max_text_chars: int = 200_000
    max_body_bytes: int = 64 * 1024 * 1024
    api_key: str | None = field(default=None, repr=False)
    allow_urls: bool = False
    allow_private_urls: bool = False
    url_timeout: float = 10.0
    request_timeout: float = 60.0
    prepare_workers: int = 8
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_inputs", "max_length", "prepare_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_wait_ms < 0 or self.request_timeout <= 0:
            raise ValueError("max_wait_ms must be >= 0 and request_timeout > 0")


def env_name(name: str) -> str:
    return "CLIPEDGE_" + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; each default comes from its environment variable if set."""
    parser.add_argument("bundle", nargs="?", default=os.environ.get(env_name("bundle")))
    for item in dataclasses.fields(ServeSettings):
        if item.name == "bundle":
            continue
        flag = "--" + item.name.replace("_", "-")
        env = os.environ.get(env_name(item.name))
        if item.type == "bool":
            default = env.lower() in ("1", "true", "yes") if env is not None else item.default
            parser.add_argument(
                flag, action="store_true", default=default, help=f"${env_name(item.name)}"
            )
            continue
        kind = {"int": int, "float": float}.get(str(item.type).split(" |")[0], str)
        default = kind(env) if env is not None else item.default
        parser.add_argument(
            flag,
            type=kind,
            default=default,
            help=f"${env_name(item.name)} (default {item.default})",
        )


def from_arguments(args: argparse.Namespace) -> ServeSettings:
    if not args.bundle:
        raise ValueError(f"give the bundle directory (or set {env_name('bundle')})")
    return ServeSettings(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)}
    )
