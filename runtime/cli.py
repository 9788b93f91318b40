"""The `clipedge` command: a table of subcommands, each imported only when it is needed.

Each module in `COMMANDS` adds its subparser(s) with `add_commands(subparsers)` (importing
nothing heavy) and imports its dependencies inside its handler, so `clipedge --help` works on
the base install. A missing optional dependency is reported here, once, with the extra to
install. Adding a command is a module with `add_commands` plus one line in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__

# Module -> the pip extra its commands need (None: the base install).
COMMANDS: dict[str, str | None] = {
    "clipedge.export.cli": "export",
    "clipedge.calibration.cli": "export",
    "clipedge.tensorrt_cli": "tensorrt",
    "clipedge.serve.cli": "serve",
    "clipedge.embed.cli": "batch",
}


def _extra_hint(module: str, missing: str) -> str:
    extra = COMMANDS.get(module)
    install = f"pip install 'clipedge[{extra}]'" if extra else "reinstall clipedge"
    return f"this command needs the {extra or 'base'} install (missing module {missing}): {install}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipedge", description="jina-clip-v2 outside PyTorch: export, calibrate, run."
    )
    parser.add_argument("--version", action="version", version=f"clipedge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        importlib.import_module(module).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.handler(args)
    except ModuleNotFoundError as exc:
        print(
            f"clipedge {args.command}: {_extra_hint(args.handler.__module__, exc.name)}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
