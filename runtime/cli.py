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
    return 0


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
    export.set_defaults(handler=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
