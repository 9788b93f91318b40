"""The `serve` command: run the embedding service with uvicorn (needs the `serve` extra)."""

from __future__ import annotations

import argparse
import logging

from .settings import add_serve_arguments, settings_from_arguments


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .protocol import uvicorn_config
    from .service import open_model

    settings = settings_from_arguments(args)
    model = open_model(settings)  # a bad bundle, precision or backend: fail before listening
    logging.getLogger("clipedge").setLevel(logging.INFO)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = uvicorn_config(
        create_app(settings, model),
        settings,
        access_log=False,  # clipedge.serve.access logs one JSON line per request
        timeout_graceful_shutdown=int(settings.request_timeout) + 5,
        log_level="info",
    )
    uvicorn.Server(config).run()
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve", help="run an embedding service with the Jina and OpenAI embeddings APIs"
    )
    add_serve_arguments(parser)
    parser.set_defaults(handler=serve)
