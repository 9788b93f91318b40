"""Whether this CPU adds int8 products exactly: it decides which int8 weight range a CPU
graph may use (the manifest's `weight_bits`).

x86 int8 GEMMs without VNNI or AMX (AVX2, AVX-512 without VNNI: older Xeons, VMs that expose
AVX2 only) multiply uint8 activations by int8 weights with vpmaddubsw, which adds each pair of
products into a saturating int16: 255 * 127 * 2 = 64770 > 32767. onnxruntime's and
OpenVINO's kernels both do. VNNI and AMX add in int32, as ARM's int8 kernels do (each product
widened before it is summed). A graph with 7-bit weights (|w| <= 64: 255 * 64 * 2 = 32640) is
exact on every CPU; one with 8-bit weights only where the sums are int32 (tiny image tower:
min cosine 0.9985 on an AMX Xeon, 0.9507 on an AVX2-only EPYC).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
# Linux /proc/cpuinfo flags of the instructions that add int8 products in int32.
INT32_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def int8_products_exact(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when this CPU's int8 kernels add products in int32 (8-bit weights are exact).
    An x86 CPU whose flags cannot be read (not Linux) counts as not exact: the safe side."""
    if platform.machine().lower() not in X86_MACHINES:
        return True
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        if line.startswith("flags"):
            return bool(INT32_DOT_FLAGS & set(line.partition(":")[2].split()))
    return False
