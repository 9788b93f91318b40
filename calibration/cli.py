"""The `calibrate` command, and the calibration options `export --precisions` shares."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipedge.errors import ClipEdgeError, OptionError
from clipedge.towers import TEXT, TOWERS, VISION, tower_spec

from .weight_bits import WEIGHT_BITS


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
        "--weight-bits",
        choices=WEIGHT_BITS,
        default="auto",
        help="int8 weight range: 7 runs exactly on every CPU; 8 is more accurate but exact "
        "only on CPUs with VNNI/AMX (or ARM), and the runtime refuses it elsewhere; auto "
        "(default): 8 where this CPU runs it, else 7",
    )
    group.add_argument(
        "--max-memory",
        type=float,
        default=None,
        metavar="GB",
        help="plan the run to stay within this peak RSS (GB); refused up front if it cannot",
    )


@dataclass(frozen=True)
class CalibrationRequest:
    """The checked calibration options: precisions, per-precision targets, the data."""

    precisions: list[str]
    targets: dict[str, float] | None
    calibration: Any


def prepare_calibration(
    args: argparse.Namespace, towers: Sequence[str] | None = None
) -> CalibrationRequest:
    """Every calibration option and source checked, and the data read, before any model is:
    the precisions (names, installed packages), `--target-cosine`, `--calibration-samples`,
    and for each tower (`towers`, else the bundle's) the source its calibration needs."""
    from .data import CalibrationSet
    from .precisions import check_precisions
    from .weight_bits import resolve_weight_bits

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip() and p != "fp32"]
    check_precisions(precisions)  # a typo costs nothing, not the data loading first
    resolve_weight_bits(args.weight_bits)
    target = args.target_cosine
    if target is not None and not 0 < target <= 1:
        raise OptionError(f"--target-cosine must be in (0, 1], got {target}")
    if args.calibration_samples < 2:
        raise OptionError(
            f"--calibration-samples must be >= 2 (some are held out), got "
            f"{args.calibration_samples}"
        )
    if towers is None:
        from clipedge.bundle.manifest import read_manifest

        towers = list(read_manifest(args.bundle).towers)
    unknown = [t for t in towers if t not in TOWERS]
    if unknown or not towers:
        raise OptionError(f"unknown tower(s) {unknown or towers!r}; towers are {', '.join(TOWERS)}")
    sources = {TEXT.name: args.calibration_texts, VISION.name: args.calibration_images}
    missing = [tower_spec(t).calibration_option for t in towers if not sources.get(t)]
    if precisions and missing:
        raise OptionError(f"calibrating the exported towers needs {' and '.join(missing)}")
    calibration = CalibrationSet.from_sources(
        args.calibration_images,
        args.calibration_texts,
        limit=args.calibration_samples,
        seed=args.seed,
    )
    targets = {p: target for p in precisions} if target else None
    return CalibrationRequest(precisions, targets, calibration)


def calibrate(
    args: argparse.Namespace,
    bundle_dir: Path | None = None,
    request: CalibrationRequest | None = None,
) -> int:
    """Add lower-precision graphs with an accuracy report; non-zero exit on a missed target.
    `request`: the options already checked and the data read (`prepare_calibration`)."""
    from onnx.checker import ValidationError

    from .pipeline import BelowTargetError, CalibrationError, calibrate_bundle

    towers = [t.strip() for t in args.towers.split(",") if t.strip()] if args.towers else None
    try:
        request = request or prepare_calibration(args, towers)
        results = calibrate_bundle(
            bundle_dir or args.bundle,
            request.precisions,
            request.calibration,
            method=args.calibration_method,
            targets=request.targets,
            search=not args.no_search,
            report=lambda line: print(line, flush=True),
            towers=towers,
            max_memory_gb=args.max_memory,
            weight_bits=args.weight_bits,
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
    parser.add_argument(
        "--towers",
        default=None,
        help="comma list of the towers to calibrate, text and/or vision (default: both)",
    )
    add_calibration_arguments(parser, required=True)
    parser.set_defaults(handler=calibrate)
