"""The `clipedge` command: a table of subcommands, each module imported only when it runs.

A command's module adds its subparser(s) with `add_commands(subparsers)` and imports its
heavy dependencies inside its handler. Only the module of the command being run is imported
(all of them only to list the commands in `--help` or a usage error), so one command's
missing extra never breaks another. A missing optional dependency, wherever a command meets
it, is reported here, once, with the extra that installs it.

Adding a command: its module, one line in `COMMANDS`, and its optional imports in `EXTRAS`.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
import warnings
from collections.abc import Callable
from typing import TextIO

from . import __version__
from .errors import ClipEdgeError, OptionError

# Subcommand -> the module that defines it.
COMMANDS: dict[str, str] = {
    "export": "clipedge.export.cli",
    "calibrate": "clipedge.calibration.cli",
    "build-engine": "clipedge.tensorrt_cli",
    "verify": "clipedge.tensorrt_cli",
    "serve": "clipedge.serve.cli",
    "embed": "clipedge.embed.cli",
}

# Top-level import name of an optional dependency -> the extra (pyproject.toml) that has it.
EXTRAS: dict[str, str] = {
    "torch": "export",
    "safetensors": "export",
    "onnx": "export",
    "onnxscript": "export",
    "huggingface_hub": "export",
    "openvino": "openvino",
    "nncf": "nncf",
    "cuda": "tensorrt",
    "polygraphy": "tensorrt",
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "pyarrow": "batch",
    "ray": "ray",
    "lancedb": "lancedb",
    "qdrant_client": "qdrant",
}
# Per command, where its need of a module comes with another extra than EXTRAS says
# (build-engine reads graphs with onnx, which the tensorrt extra brings without torch).
COMMAND_EXTRAS: dict[str, dict[str, str]] = {
    "build-engine": {"onnx": "tensorrt"},
}


def _command(argv: list[str]) -> str | None:
    """The subcommand: the first word that is not an option (global options take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command`'s module imported, or every command's when it is not one."""
    parser = argparse.ArgumentParser(
        prog="clipedge", description="jina-clip-v2 outside PyTorch: export, calibrate, run."
    )
    parser.add_argument("--version", action="version", version=f"clipedge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for module in modules:
        importlib.import_module(module).add_commands(subparsers)
    return parser


def _print_warning(
    python_form: Callable[..., None],
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """clipedge's warnings (user and runtime ones) as the command's own lines: the "user's
    line" they point at is the console script. Others keep Python's form, with their source."""
    if issubclass(category, UserWarning | RuntimeWarning):
        print(f"clipedge: warning: {message}", file=sys.stderr)
    else:
        python_form(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Every error a user can cause is one line on stderr,
    `clipedge <command>: error: ...`: exit 2 for a bad option or usage, 1 for a failure."""
    argv = sys.argv[1:] if argv is None else argv
    command = _command(argv)
    prefix = f"clipedge {command}" if command in COMMANDS else "clipedge"
    try:
        args = build_parser(command).parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_print_warning, warnings.showwarning)
            return args.handler(args)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        extra = COMMAND_EXTRAS.get(command or "", {}).get(top, EXTRAS.get(top))
        if extra is None:
            raise
        print(
            f"{prefix}: error: {exc.name} is not installed; it comes with the {extra} extra: "
            f"pip install 'clipedge[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except OptionError as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 2
    except (ClipEdgeError, OSError) as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
