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
import math
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

# What the planner knows, measured on the full-size bundle (docs/benchmarks.md, "Calibration
# memory"; AVX2 EPYC, OpenVINO 2026.4, NNCF 3.4). The towers run one at a time, so the run's
# peak is the largest of its stages.
#
# NNCF's statistics run the fp32 graph in OpenVINO with a reducer on every tensor it will
# quantise, and OpenVINO holds most intermediate tensors of that graph until the inference
# ends: the statistics of one feed cost ~3.2 MB per token in it (one 512 px image = 1297
# tokens: 4.1 GB; one 8 x 512-token text batch: 9.7 GB), on top of the compiled fp32 graph.
# So the statistics feeds are cut into row groups of at most `statistics_tokens` tokens.
BASE_BYTES = 0.6e9  # Python, onnxruntime, OpenVINO, NNCF, the feeds
STATISTICS_BYTES_PER_TOKEN = 3.2e6
COMPILED_PER_FP32_BYTE = 1.4  # the fp32 graph compiled for the statistics (and what is read)
# onnxruntime's dynamic quantiser (int8-cpu) holds three copies of the graph it is given and
# makes float transients of the table it is quantising: the full-size conversion peaked at
# ~3x the fp32 graph (vision 4.2 GB for 1.22 GB; text 7.3 GB for 2.24 GB with the embedding
# table set aside for the MatMul pass, 8.1 GB without, 9.0 GB in one pass).
CPU_INT8_PER_FP32_BYTE = 3.0
# After its statistics NNCF quantises and compresses a copy of the OpenVINO model: the text
# tower peaked at 7.6 GB (3.1x its 2.24 GB) with statistics feeds of one row or three alike.
OV_QUANTISATION_PER_FP32_BYTE = 3.1
# fp16 and Q/DQ int8 run the fp32 graph in onnxruntime one calibration row at a time with two
# reductions on every tensor (tensor_stats: the inf/NaN check, activation ranges), then
# convert a copy: a term per fp32 byte and one per token of the row, fitted to the two
# full-size towers' measured peaks (text 2.24 GB and 512 tokens, vision 1.22 GB and 1297).
ROW_STATISTICS = {  # precision: (bytes per fp32 byte, bytes per token of a row)
    "fp16": (2.12, 1.1e6),
    "int8": (2.63, 2.15e6),
}
DEFAULT_BUDGET_GB = 10.0
MARGIN_BYTES = 1.0e9


def statistics_tokens(fp32_bytes: int, budget_gb: float | None) -> int:
    """Tokens per statistics feed that keep NNCF's statistics within the budget (0: none)."""
    budget = (budget_gb or DEFAULT_BUDGET_GB) * GB - MARGIN_BYTES
    room = budget - BASE_BYTES - COMPILED_PER_FP32_BYTE * fp32_bytes
    return max(0, int(room // STATISTICS_BYTES_PER_TOKEN))


def statistics_peak(fp32_bytes: int, tokens: int) -> float:
    """Planned peak RSS in bytes of NNCF's statistics with feeds of `tokens` tokens."""
    return BASE_BYTES + COMPILED_PER_FP32_BYTE * fp32_bytes + STATISTICS_BYTES_PER_TOKEN * tokens


_budget: list[float | None] = [None]


def budget_gb() -> float | None:
    """The --max-memory of the calibration running now (None: the default plan)."""
    return _budget[0]


@contextlib.contextmanager
def budget(gb: float | None) -> Iterator[None]:
    _budget.append(gb)
    try:
        yield
    finally:
        _budget.pop()


def check_budget(row_tokens: dict[str, tuple[int, int]], precisions, max_memory_gb) -> list[str]:
    """The plan's lines for the log; raises OptionError up front when one row of a tower's
    longest input cannot get through NNCF's statistics within `max_memory_gb` (the other
    stages need less: docs/benchmarks.md). `row_tokens`: tower -> (fp32 graph bytes, tokens of
    its longest calibration row)."""
    from clipedge.errors import OptionError

    if max_memory_gb is not None and max_memory_gb <= 0:
        raise OptionError(f"--max-memory must be a positive number of GB, not {max_memory_gb:g}")
    lines = []
    for tower, (fp32_bytes, tokens) in row_tokens.items():
        # Every precision runs the fp32 graph for its reference (and most convert a copy).
        floor = BASE_BYTES + COMPILED_PER_FP32_BYTE * fp32_bytes
        if max_memory_gb is not None and floor > max_memory_gb * GB:
            raise OptionError(
                f"--max-memory {max_memory_gb:g} GB cannot be met: the {tower} tower's fp32 "
                f"graph ({fp32_bytes / GB:.1f} GB) alone needs ~{floor / GB:.1f} GB to run"
            )
        needs = {
            "int8-cpu": BASE_BYTES + CPU_INT8_PER_FP32_BYTE * fp32_bytes,
            "int8-ov": BASE_BYTES + OV_QUANTISATION_PER_FP32_BYTE * fp32_bytes,
        }
        for precision, (per_byte, per_token) in ROW_STATISTICS.items():
            needs[precision] = BASE_BYTES + per_byte * fp32_bytes + per_token * tokens
        for precision, need in needs.items():
            if precision not in precisions:
                continue
            if max_memory_gb is not None and need > max_memory_gb * GB:
                raise OptionError(
                    f"--max-memory {max_memory_gb:g} GB cannot be met: {precision} of the "
                    f"{tower} graph ({fp32_bytes / GB:.1f} GB) needs ~{need / GB:.1f} GB; give "
                    f"at least {math.ceil(need / GB)} GB or leave {precision} out"
                )
            lines.append(f"memory plan: {tower} {precision} conversion ~{need / GB:.1f} GB")
        if "int8-ov" not in precisions:
            continue
        allowed = statistics_tokens(fp32_bytes, max_memory_gb)
        if allowed < tokens:
            need = (statistics_peak(fp32_bytes, tokens) + MARGIN_BYTES) / GB
            raise OptionError(
                f"--max-memory {max_memory_gb:g} GB cannot be met: NNCF's statistics for "
                f"int8-ov need ~{need:.1f} GB for one {tower} input of {tokens} tokens "
                f"(the {tower} graph is {fp32_bytes / GB:.1f} GB); give at least "
                f"{math.ceil(need)} GB or leave int8-ov out"
            )
        rows = max(1, allowed // tokens)
        peak = statistics_peak(fp32_bytes, rows * tokens) / GB
        lines.append(
            f"memory plan: {tower} int8-ov statistics in feeds of <= {allowed} tokens "
            f"({rows} row(s) of {tokens}), ~{peak:.1f} GB"
        )
    within = f" within --max-memory {max_memory_gb:g} GB" if max_memory_gb is not None else ""
    return [*lines, f"memory plan: one tower at a time{within}"]
