"""The machine a benchmark ran on, recorded the same way by every benchmark."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path
from typing import Any

PACKAGES = ("numpy", "onnxruntime", "openvino", "nncf", "torch", "tokenizers", "PIL")
MATRIX_ISA = ("amx", "avx512_bf16", "avx512_vnni", "avx_vnni")


def _cpuinfo_field(name: str) -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(name)), None)


def machine_info(threads: int | None = None, packages: tuple[str, ...] = PACKAGES) -> dict:
    """CPU model, cores, matrix instructions (AMX / VNNI / BF16 decide int8 and bf16 speed),
    memory, Python and the versions of the packages that are installed."""
    versions: dict[str, Any] = {}
    for name in packages:
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            versions[name] = None
    flags = (_cpuinfo_field("flags") or "").split()
    return {
        "cpu": _cpuinfo_field("model name") or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "threads_used": threads,
        "matrix_isa": sorted(f for f in flags if f.startswith(MATRIX_ISA)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "python": platform.python_version(),
        "versions": versions,
    }


def describe(machine: dict) -> str:
    """One line for a report: CPU, cores, threads, matrix instructions and package versions."""
    return (
        f"CPU: {machine['cpu']}, {machine['cores']} cores, {machine['threads_used']} threads, "
        f"matrix ISA: {', '.join(machine['matrix_isa']) or 'none'}; "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    )
