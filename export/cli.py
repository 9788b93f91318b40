"""The `export` command: checkpoint -> bundle (and, with --precisions, calibration)."""

from __future__ import annotations

import argparse
import contextlib

from clipedge.bundle.writing import check_target
from clipedge.calibration.cli import add_calibration_arguments, calibrate, prepare_calibration
from clipedge.errors import ClipEdgeError
from clipedge.towers import check_tower_names

from .opset import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, check_opset


def export(args: argparse.Namespace) -> int:
    # Every option, the output folder, the precisions and the calibration data are checked
    # before torch is imported and the checkpoint loaded (minutes and GBs for the real model).
    towers = [t.strip() for t in args.towers.split(",") if t.strip()]
    check_tower_names(towers, "--towers")
    check_target(args.output, args.overwrite)
    request = prepare_calibration(args, towers) if args.precisions else None

    from .pipeline import ExportError, export_bundle

    try:
        result = export_bundle(
            args.source,
            args.output,
            towers=towers,
            opset=args.opset,
            token_states=args.token_states,
            revision=args.revision,
            overwrite=args.overwrite,
            report=lambda line: print(line, flush=True),
        )
    except ClipEdgeError:
        raise
    except (ValueError, RuntimeError) as exc:  # torch's and onnx's own errors, in one line
        raise ExportError(str(exc)) from exc
    if not result.ok:
        failed = [v.tower for v in result.verifications if not v.ok]
        raise ExportError(f"verification FAILED for: {', '.join(failed)}")
    print(f"bundle written to {result.bundle_dir}")
    if request is not None:
        return calibrate(args, result.bundle_dir, request)
    return 0


def _opset(text: str) -> int:
    """`--opset`, refused while parsing: before torch is even imported."""
    value: int | str = text
    with contextlib.suppress(ValueError):
        value = int(text)
    try:
        return check_opset(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export", help="export a jina-clip-v2 checkpoint into a bundle of per-tower ONNX graphs"
    )
    parser.add_argument("source", help="local checkpoint directory or hub id (jinaai/jina-clip-v2)")
    parser.add_argument("-o", "--output", required=True, help="bundle directory to write")
    parser.add_argument("--towers", default="text,vision", help="comma list: text,vision")
    parser.add_argument(
        "--opset",
        type=_opset,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})",
    )
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument(
        "--token-states",
        action="store_true",
        help="output last_hidden_state instead of the pooled embedding (runtime pools)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the bundle in OUTPUT (refused unless OUTPUT is empty or a clipedge "
        "bundle with nothing else in it)",
    )
    add_calibration_arguments(parser, required=False)
    parser.set_defaults(handler=export)
