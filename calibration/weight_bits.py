"""`--weight-bits`: the range of int8 weights a calibration writes (light to import: the CLI
reads its choices before any converter loads)."""

from __future__ import annotations

from clipedge.engine import cpu_features
from clipedge.errors import OptionError

WEIGHT_BITS = ("auto", "7", "8")


def resolve_weight_bits(requested: str | int) -> int:
    """`--weight-bits`: "auto" is 8 where this CPU computes 8-bit weights exactly, else 7. 8
    is refused where it does not: the accuracy gate runs here and would judge wrong sums."""
    if str(requested) not in WEIGHT_BITS:
        raise OptionError(
            f"--weight-bits must be one of {', '.join(WEIGHT_BITS)}, got {requested!r}"
        )
    if str(requested) == "auto":
        return 8 if cpu_features.int8_products_exact() else 7
    if int(requested) == 8 and not cpu_features.int8_products_exact():
        raise OptionError(
            "--weight-bits 8: this CPU (x86 without VNNI or AMX) adds int8 products in a "
            "saturating int16, so the accuracy gate here would judge wrong results; calibrate "
            "on a CPU with VNNI/AMX, or use 7"
        )
    return int(requested)
