"""The `calibrate` command, and the calibration options `export --precisions` shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipedge.errors import ClipEdgeError


def add_calibration_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("lower precision (calibrated, with an accuracy report)")
    group.add_argument(
        "--precisions",
        required=required,
        default=None,
        help="comma list of fp16, int8 (Q/DQ for TensorRT/GPU), int8-cpu (onnxruntime CPU), "
        "int8-ov (OpenVINO CPU; needs the nncf extra)",
    )
    group.add_argument("--calibration-images", help="images: DIR, GLOB or a .txt list of paths")
    group.add_argument("--calibration-texts", help="texts: .txt (one per line) or .jsonl (text)")
    group.add_argument(
        "--calibration-samples",
        type=int,
        default=256,
        help="max items per kind, a quarter (at least 32) held out to judge accuracy (default 256)",
    )
    group.add_argument(
        "--calibration-method",
        choices=("max", "entropy", "percentile"),
        default="max",
        help="activation ranges of the int8 Q/DQ graph (default max; int8-ov uses NNCF's own)",
    )
    group.add_argument(
        "--target-cosine",
        type=float,
        default=None,
        help="min cosine to fp32 on held-out data (default: 0.999 fp16, 0.99 int8)",
    )
    group.add_argument(
        "--allow-below-target",
        action="store_true",
        help="exit 0 even when a graph misses its target (it is kept, marked failed)",
    )
    group.add_argument(
        "--no-search", action="store_true", help="no per-block mixed-precision fallback"
    )
    group.add_argument("--seed", type=int, default=0, help="sampling seed")
    group.add_argument(
        "--towers",
        default=None,
        help="comma list of the towers to calibrate, text and/or vision (default: both)",
    )
    group.add_argument(
        "--max-memory",
        type=float,
        default=None,
        metavar="GB",
        help="plan the run to stay within this peak RSS (GB); refused up front if it cannot",
    )


def calibrate(args: argparse.Namespace, bundle_dir: Path | None = None) -> int:
    """Add lower-precision graphs with an accuracy report; non-zero exit on a missed target."""
    from onnx.checker import ValidationError

    from .data import CalibrationSet
    from .pipeline import BelowTargetError, CalibrationError, calibrate_bundle, check_precisions

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip() and p != "fp32"]
    targets = {p: args.target_cosine for p in precisions} if args.target_cosine else None
    towers = [t.strip() for t in args.towers.split(",") if t.strip()] if args.towers else None
    try:
        check_precisions(precisions)  # a typo costs nothing, not the data loading first
        calibration = CalibrationSet.from_sources(
            args.calibration_images,
            args.calibration_texts,
            limit=args.calibration_samples,
            seed=args.seed,
        )
        results = calibrate_bundle(
            bundle_dir or args.bundle,
            precisions,
            calibration,
            method=args.calibration_method,
            targets=targets,
            search=not args.no_search,
            report=lambda line: print(line, flush=True),
            towers=towers,
            max_memory_gb=args.max_memory,
        )
    # ValidationError: onnx refusing a bundle's graph, e.g. a weights file with several hard
    # links (a `cp -al` copy of a bundle: make real copies of its .data files).
    except ClipEdgeError:
        raise
    except (ValueError, RuntimeError, ValidationError) as exc:  # onnx's, NNCF's own errors
        raise CalibrationError(str(exc)) from exc
    missed = [f"{r.tower} {r.precision}" for r in results if not r.passed]
    if missed and not args.allow_below_target:
        raise BelowTargetError(
            f"accuracy target missed for: {', '.join(missed)} (the graphs are in the bundle, "
            "marked as failed; pass --allow-below-target to accept them)"
        )
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "calibrate", help="add calibrated fp16/int8 graphs and an accuracy report to a bundle"
    )
    parser.add_argument("bundle", help="bundle directory written by clipedge export")
    add_calibration_arguments(parser, required=True)
    parser.set_defaults(handler=calibrate)
