"""The `clipedge` command. Export needs the `[export]` extra; everything else is torch-free."""

from __future__ import annotations

import argparse
import logging
import sys


def _export(args: argparse.Namespace) -> int:
    try:
        from clipedge.export.pipeline import export_bundle
    except ImportError as exc:
        print(
            f"clipedge export needs the export extra ({exc}): pip install 'clipedge[export]'",
            file=sys.stderr,
        )
        return 2
    towers = [t.strip() for t in args.towers.split(",") if t.strip()]
    try:
        result = export_bundle(
            args.source,
            args.output,
            towers=towers,
            opset=args.opset,
            token_states=args.token_states,
            revision=args.revision,
            report=lambda line: print(line, flush=True),
        )
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"clipedge export failed: {exc}", file=sys.stderr)
        return 1
    if not result.ok:
        failed = [v.tower for v in result.verifications if not v.ok]
        print(f"verification FAILED for: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"bundle written to {result.bundle_dir}")
    if args.precisions:
        return _calibrate(args, result.bundle_dir)
    return 0


def _calibrate(args: argparse.Namespace, bundle_dir=None) -> int:
    """Add lower-precision graphs with an accuracy report; non-zero exit on a missed target."""
    try:
        from clipedge.calibration.data import CalibrationSet
        from clipedge.calibration.pipeline import calibrate_bundle
    except ImportError as exc:
        print(f"calibration needs the export extra ({exc}): pip install 'clipedge[export]'")
        return 2
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip() and p != "fp32"]
    targets = {p: args.target_cosine for p in precisions} if args.target_cosine else None
    try:
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
        )
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"clipedge calibration failed: {exc}", file=sys.stderr)
        return 1
    missed = [f"{r.tower} {r.precision}" for r in results if not r.passed]
    if missed and not args.allow_below_target:
        print(
            f"accuracy target missed for: {', '.join(missed)} (the graphs are in the bundle, "
            "marked as failed; pass --allow-below-target to accept them)",
            file=sys.stderr,
        )
        return 1
    return 0


def _add_calibration_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
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
    group.add_argument("--calibration-samples", type=int, default=256, help="max items per kind")
    group.add_argument(
        "--calibration-method", choices=("max", "entropy", "percentile"), default="max"
    )
    group.add_argument(
        "--target-cosine",
        type=float,
        default=None,
        help="min cosine to fp32 on held-out data (default: 0.999 fp16, 0.99 int8)",
    )
    group.add_argument("--allow-below-target", action="store_true")
    group.add_argument(
        "--no-search", action="store_true", help="no per-block mixed-precision fallback"
    )
    group.add_argument("--seed", type=int, default=0, help="sampling seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipedge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser(
        "export", help="export a jina-clip-v2 checkpoint into a bundle of per-tower ONNX graphs"
    )
    export.add_argument("source", help="local checkpoint directory or hub id (jinaai/jina-clip-v2)")
    export.add_argument("-o", "--output", required=True, help="bundle directory to write")
    export.add_argument("--towers", default="text,vision", help="comma list: text,vision")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18)")
    export.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    export.add_argument(
        "--token-states",
        action="store_true",
        help="output last_hidden_state instead of the pooled embedding (runtime pools)",
    )
    _add_calibration_arguments(export, required=False)
    export.set_defaults(handler=_export)

    calibrate = commands.add_parser(
        "calibrate", help="add calibrated fp16/int8 graphs and an accuracy report to a bundle"
    )
    calibrate.add_argument("bundle", help="bundle directory written by clipedge export")
    _add_calibration_arguments(calibrate, required=True)
    calibrate.set_defaults(handler=_calibrate)
    from .tensorrt_cli import add_commands as add_tensorrt_commands  # build-engine, verify

    add_tensorrt_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
