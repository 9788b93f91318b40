"""Regenerate the exported fp32 bundles checked into tests/fixtures/ (needs the export extra).

    python scripts/make_fixture_bundle.py            # rewrites tests/fixtures/tiny-bundle*
    python scripts/make_fixture_bundle.py -o DIR     # writes DIR/tiny-bundle* instead

The runtime's tests load these bundles instead of exporting, so they run on a plain
`pip install .` without torch. They are `clipedge export` of the tiny reference checkpoint
(tests/fixtures/jina-clip-v2-tiny/checkpoint): `tiny-bundle` as exported by default,
`tiny-bundle-token-states` with --token-states. The export is deterministic (same torch and
onnx: the same bytes); tests/test_fixture_bundle.py exports afresh and fails when the
checked-in bundles no longer match what the exporter writes. Run this script after a change
to the exporter or the manifest, then commit tests/fixtures/tiny-bundle*.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "tests" / "fixtures" / "jina-clip-v2-tiny" / "checkpoint"
FIXTURES = ROOT / "tests" / "fixtures"
# bundle folder name -> export_bundle keyword arguments
BUNDLES: dict[str, dict[str, bool]] = {
    "tiny-bundle": {},
    "tiny-bundle-token-states": {"token_states": True},
}


def make(out_dir: Path, report=lambda line: None) -> dict[str, Path]:
    """Export every fixture bundle into `out_dir` (replacing what is there); their paths."""
    from clipedge.export.pipeline import export_bundle

    written = {}
    for name, kwargs in BUNDLES.items():
        target = out_dir / name
        result = export_bundle(str(CHECKPOINT), target, report=report, overwrite=True, **kwargs)
        if not result.ok:
            raise SystemExit(f"{name}: the export failed its checks: {result.verifications}")
        written[name] = target
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=FIXTURES, help="parent folder")
    args = parser.parse_args(argv)
    for name, path in make(args.out).items():
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"{name}: {path} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
