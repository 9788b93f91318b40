"""Peak memory per calibration stage, and the calibration's memory plan.

`Stages` times each stage of a calibration (feeds, statistics, conversion, search, ...) and
records the process's peak resident set during it. On Linux the kernel keeps the peak
(`VmHWM` in /proc/self/status) and lets a process reset it (writing 5 to
/proc/self/clear_refs), so a stage's peak is exact and costs nothing; elsewhere the lifetime
peak (`ru_maxrss`) stands in, marked "so far". Calibration runs in one process (onnxruntime,
OpenVINO and NNCF all run in-process), so the process is the whole tree.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """The process's resident set now (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def lifetime_peak_bytes() -> int:
    """The process's peak resident set since it started."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak RSS counter of this process (Linux >= 4.0); False if refused."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@dataclass
class StageRecord:
    name: str
    seconds: float
    peak_bytes: int


@dataclass
class Stages:
    """Stage timer and peak-RSS log: `with stages("text int8-ov", "statistics"): ...` reports
    `[calibrate] text int8-ov: statistics 2.1 min, peak RSS 9.1 GB` when the stage ends."""

    report: Callable[[str], None] = print
    records: list[StageRecord] = field(default_factory=list)
    exact: bool = field(default_factory=lambda: _status_kib("VmHWM") is not None and _reset_peak())
    _open: list[list[int]] = field(default_factory=list)
    peak_bytes: int = 0

    def _fold(self) -> int:
        """Fold the kernel's peak since the last reset into every open stage, then reset."""
        if not self.exact:
            peak = lifetime_peak_bytes()
        else:
            peak = (_status_kib("VmHWM") or 0) * 1024
            _reset_peak()
        for stage in self._open:
            stage[0] = max(stage[0], peak)
        self.peak_bytes = max(self.peak_bytes, peak)
        return peak

    @contextlib.contextmanager
    def __call__(self, scope: str, stage: str, quiet: bool = False) -> Iterator[None]:
        self._fold()
        record = [0]
        self._open.append(record)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._fold()
            self._open.pop()
            seconds = time.perf_counter() - start
            self.records.append(StageRecord(f"{scope}: {stage}", seconds, record[0]))
            if not quiet:
                self.report(
                    f"[calibrate] {scope}: {stage} {duration(seconds)}, "
                    f"peak RSS {record[0] / GB:.1f} GB{'' if self.exact else ' (so far)'}"
                )


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


_active: list[tuple[Stages, str]] = []


@contextlib.contextmanager
def scope(stages: Stages, name: str) -> Iterator[None]:
    """Make `stage(...)` calls below (converters, the search) log under `name`."""
    _active.append((stages, name))
    try:
        yield
    finally:
        _active.pop()


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """A stage of the innermost `scope` (nothing is logged outside one)."""
    if not _active:
        yield
        return
    stages, scope_name = _active[-1]
    with stages(scope_name, name):
        yield


# ------------------------------------------------------------------------------- the plan

# Peak RSS of one tower at one precision, as a multiple of its fp32 graph's bytes (weights
# file included), plus what the process holds before any graph is read (Python, onnxruntime,
# OpenVINO, the feeds). Measured on the full-size bundle (docs/benchmarks.md, "Calibration
# memory"); the towers run one at a time, so the run's peak is the largest of these.
BASE_BYTES = 1.0e9
PEAK_PER_FP32_BYTE = {"fp16": 2.5, "int8": 2.5, "int8-cpu": 2.5, "int8-ov": 2.5}


def estimated_peak(fp32_bytes: int, precision: str) -> float:
    """Planned peak RSS in bytes of one tower at one precision."""
    return BASE_BYTES + PEAK_PER_FP32_BYTE[precision] * fp32_bytes


def check_budget(
    fp32_bytes: dict[str, int], precisions: list[str] | tuple[str, ...], max_memory_gb: float | None
) -> list[str]:
    """The plan's lines for the log; raises OptionError when a tower and precision cannot
    stay within `max_memory_gb`."""
    from clipedge.errors import OptionError

    plans = {
        (tower, precision): estimated_peak(size, precision)
        for tower, size in fp32_bytes.items()
        for precision in precisions
    }
    if not plans:
        return []
    (tower, precision), peak = max(plans.items(), key=lambda item: item[1])
    line = f"memory plan: one tower at a time, largest {tower} {precision} ~{peak / GB:.1f} GB"
    if max_memory_gb is None:
        return [line]
    if max_memory_gb <= 0:
        raise OptionError(f"--max-memory must be positive, not {max_memory_gb:g}")
    over = {k: v for k, v in plans.items() if v > max_memory_gb * GB}
    if over:
        names = ", ".join(f"{t} {p} (~{v / GB:.1f} GB)" for (t, p), v in over.items())
        raise OptionError(
            f"--max-memory {max_memory_gb:g} GB cannot be met: {names} need more; "
            "give more memory, or calibrate those towers/precisions elsewhere"
        )
    return [f"{line}, within --max-memory {max_memory_gb:g} GB"]
