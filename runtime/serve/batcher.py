"""Dynamic batching per tower: items of many requests run together in one model thread.

Each request's items arrive prepared (token ids, or preprocessed pixels). The tower's thread
takes what is queued, up to `max_batch` items, waiting at most `max_wait` for more after the
first (default 0: nothing waits when the model is idle, and under load the requests that
arrive while a batch runs form the next one); rows are run in the tower's order in chunks
so a batch pads little, each within `max_batch` items and the pipeline's padded-token budget
(`max_batch_tokens`: long texts run in small batches), tightened by a time budget
(`max_batch_seconds`, from the measured seconds per padded token) so that one run, which
cannot be interrupted, keeps a short request waiting for about that long at most. While a
run is in progress, a second thread runs short batches (under SHORT_RUN_TOKENS padded tokens)
beside it, so a short request never waits for a long run, only shares the cores with it
(several instances of one model, as Triton's instance groups, but one session: onnxruntime
and OpenVINO run concurrent calls on it; TensorRT's backend takes them in turn). Each chunk
goes through the model's one `Pipeline` (engine limits, retry item by item), so one bad item
fails only its own request. Results are the pooled, checked, not yet truncated vectors: each
request truncates and normalises its own.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from clipedge.pipeline import RAW, Pipeline

# A taken item that has waited this long runs in the next batch, short items or not.
MAX_AGE_S = 1.0
# The time budget never cuts batches below this many padded tokens (32 short texts), and
# learns the time per token from runs at least this large (smaller ones are mostly overhead).
MIN_TIMED_TOKENS = 256
# Batches under this many padded tokens may run beside the run in progress (the express lane).
SHORT_RUN_TOKENS = MIN_TIMED_TOKENS


class QueueFull(Exception):
    """The tower's queue cannot take the request's items now."""


@dataclass
class Work:
    row: list[int] | np.ndarray
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


class TowerBatcher:
    """One model thread for one tower; `submit` queues a request's rows and returns futures."""

    def __init__(
        self,
        pipeline: Pipeline,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        observe: Callable[[str, int, float, float], None] = lambda *a: None,
        max_batch_seconds: float | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.tower = pipeline.tower.spec.name
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_batch_seconds = max_batch_seconds
        self.seconds_per_token: float | None = None  # measured on runs of MIN_TIMED_TOKENS+
        self._observe = observe  # (tower, batch size, oldest queue wait, inference seconds)
        self._queue: queue.Queue[Work | None] = queue.Queue()
        self._admit = threading.Lock()
        self._pending: list[Work] = []  # taken from the queue, not run yet
        self._owed_aged = False  # a shorter batch ran ahead of an item over MAX_AGE_S
        # The lock guards _pending, _running and draining the queue into _pending.
        self._lock = threading.Lock()
        self._running = False  # the main thread is in a run
        self._express_wake = threading.Event()
        self._closing = False
        self.last_progress = time.monotonic()
        self._thread = threading.Thread(
            target=self._loop, name=f"clipedge-{self.tower}", daemon=True
        )
        self._express = threading.Thread(
            target=self._express_loop, name=f"clipedge-{self.tower}-express", daemon=True
        )
        self._thread.start()
        self._express.start()

    @property
    def depth(self) -> int:
        """Items waiting: queued, and taken but not yet run."""
        return self._queue.qsize() + len(self._pending)

    def stalled(self, after_s: float) -> bool:
        """Work is waiting and no batch finished for `after_s` seconds."""
        return self.depth > 0 and time.monotonic() - self.last_progress > after_s

    def submit(self, rows: list) -> list[Future]:
        with self._admit:
            if self.depth + len(rows) > self.max_queue:
                raise QueueFull(f"the {self.tower} queue is full ({self.depth} items waiting)")
            work = [Work(row) for row in rows]
            for item in work:
                self._queue.put(item)
        self._express_wake.set()
        return [item.future for item in work]

    def close(self) -> None:
        """Finish what is queued, then stop the threads."""
        self._queue.put(None)
        self._thread.join()
        self._closing = True
        self._express_wake.set()
        self._express.join()

    def _take(self, block: bool) -> tuple[list[Work], bool]:
        try:
            first = self._queue.get() if block else self._queue.get_nowait()
        except queue.Empty:
            return [], False
        if first is None:
            return [], True
        taken, stop = [first], False
        deadline = time.monotonic() + self.max_wait_s
        # Take more than one batch when it is there (texts: to group similar lengths).
        limit = self.max_batch * (self.pipeline.tower.sort_window if self.max_batch > 1 else 1)
        while len(taken) < limit:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            taken.append(item)
        return taken, stop

    def _loop(self) -> None:
        stop = False
        while True:
            taken, stopping = self._take(block=not self._pending and not stop)
            stop = stop or stopping
            with self._lock:
                # Items of requests that timed out (cancelled futures) are dropped.
                live = [w for w in self._pending + taken if not w.future.cancelled()]
                chunk = self._next(live) if live else set()
                self._pending = [w for i, w in enumerate(live) if i not in chunk]
                work = [live[i] for i in chunk if live[i].future.set_running_or_notify_cancel()]
                self._running = bool(work)
            if work:
                self._express_wake.set()
                self._run(work)
                with self._lock:
                    self._running = False
            self.last_progress = time.monotonic()
            if stop and not self._pending and self._queue.empty():
                return

    def _express_loop(self) -> None:
        """Run short batches while the main thread is in a run."""
        while not self._closing:
            self._express_wake.wait()
            self._express_wake.clear()
            while work := self._take_short():
                self._run(work)
                self.last_progress = time.monotonic()

    def _take_short(self) -> list[Work]:
        """The shortest, then oldest, batch if it is short and the main thread is in a run."""
        with self._lock:
            if not self._running:
                return []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:  # closing: the main thread finishes the rest
                    self._queue.put(None)
                    break
                self._pending.append(item)
            live = [w for w in self._pending if not w.future.cancelled()]
            if not live:
                return []
            plan = self.pipeline.plan([w.row for w in live], range(len(live)), self.max_batch)
            short = [c for c in plan if len(c) * self._width(live, c) < SHORT_RUN_TOKENS]
            if not short:
                return []
            chosen = set(self._shortest_then_oldest(live, short))
            self._pending = [w for i, w in enumerate(live) if i not in chosen]
            return [live[i] for i in chosen if live[i].future.set_running_or_notify_cancel()]

    def _next(self, live: list[Work]) -> set[int]:
        """One batch: grouped longest first (little padding), the shortest batch runs first
        (a short request waits for one batch, not every long text queued before it), and of
        batches as short the one that has waited longest (short texts split over several
        batches by a budget go first in, first out). An item waiting over MAX_AGE_S gets the
        turn after each batch that ran ahead of it, so long texts keep moving too; a batch
        that jumped no one owes it nothing (when turns simply alternated, a short text that
        arrived during such a run waited for a second long run: at full size under attack,
        p99 3.9 s against 1.4 s quiet)."""
        plan = self.pipeline.plan(
            [w.row for w in live], range(len(live)), self.max_batch, self._time_budget()
        )
        oldest = min(range(len(live)), key=lambda i: live[i].queued_at)
        aged = time.monotonic() - live[oldest].queued_at > MAX_AGE_S
        if aged and self._owed_aged:
            self._owed_aged = False
            return set(next(c for c in plan if oldest in c))
        chosen = self._shortest_then_oldest(live, plan)
        self._owed_aged = aged and oldest not in chosen
        return set(chosen)

    def _width(self, live: list[Work], chunk: list[int]) -> int:
        """Padded length of a batch: its longest row's tokens."""
        return max((self.pipeline.tower.tokens(live[i].row) or 0) for i in chunk)

    def _shortest_then_oldest(self, live: list[Work], plan: list[list[int]]) -> list[int]:
        return min(plan, key=lambda c: (self._width(live, c), min(live[i].queued_at for i in c)))

    def _time_budget(self) -> int | None:
        """Padded tokens one run may take so that it lasts about `max_batch_seconds`: a short
        text arriving behind a run of long ones waits that long at most, on any hardware
        (None: not set, or nothing measured yet)."""
        if not self.max_batch_seconds or not self.seconds_per_token:
            return None
        return max(MIN_TIMED_TOKENS, int(self.max_batch_seconds / self.seconds_per_token))

    def _run(self, work: list[Work]) -> None:
        started = time.monotonic()
        try:
            embedded = self.pipeline.run_rows([w.row for w in work], len(work), RAW)
        except Exception as exc:  # a bug, not an item's fault: fail these requests, go on
            for item in work:
                item.future.set_exception(exc)
            return
        tower = self.pipeline.tower
        padded = len(work) * max((tower.tokens(w.row) or 0) for w in work)
        if padded >= MIN_TIMED_TOKENS:
            measured = (time.monotonic() - started) / padded
            known = self.seconds_per_token
            self.seconds_per_token = measured if known is None else 0.7 * known + 0.3 * measured
        self._observe(
            self.tower,
            len(work),
            started - min(w.queued_at for w in work),
            time.monotonic() - started,
        )
        for item, vector, error in zip(work, embedded.vectors, embedded.errors, strict=True):
            if error is None:
                item.future.set_result(vector)
            else:
                item.future.set_exception(error)
