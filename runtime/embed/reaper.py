"""A watcher that ends a job's descendants when the job's process dies, however it dies.

`ray.init()` without an address starts a local Ray instance whose processes are the job's
descendants. Most of them die with the job, but after a SIGKILL Ray's per-node agents
(`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) were found running on, reparented to init.
The reaper is a small process of its own: every `POLL_S` it records the job's new Ray
descendants (pid and start time, so a reused pid is never touched; processes the job had
before, or that are not Ray's, are left alone: a library caller's own children live on);
when the job's end of a pipe closes (the job exited or was killed) it kills what it recorded
that still runs, and exits.

    with reaping():
        ray.init(...)
        ...
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator

POLL_S = 0.5


@contextlib.contextmanager
def reaping() -> Iterator[None]:
    """Run the body with a reaper watching this process: on leaving (normally or not) and if
    this process is killed, every descendant it started is ended."""
    watcher = subprocess.Popen(
        [sys.executable, "-m", "clipedge.embed.reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,  # Ctrl-C in a terminal reaches the job, not its reaper
    )
    try:
        watcher.stdout.readline()  # it has seen what ran before: Ray starts after this
        yield
    finally:
        watcher.stdin.close()  # what a death of this process does too
        watcher.wait()


def _descendants(pid: int) -> set[tuple[int, float]]:
    """(pid, start time) of `pid`'s descendants that are Ray's processes."""
    import psutil

    with contextlib.suppress(psutil.Error):
        found = set()
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "ray" in " ".join(child.cmdline()).lower():
                    found.add((child.pid, child.create_time()))
        return found
    return set()


def _kill(recorded: set[tuple[int, float]]) -> None:
    import psutil

    for pid, started in recorded:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if process.create_time() == started:
                process.send_signal(signal.SIGKILL)


def watch(job: int) -> None:
    """The reaper's loop: record `job`'s descendants until stdin closes, then kill them."""
    before = _descendants(job)
    print("watching", flush=True)
    recorded: set[tuple[int, float]] = set()
    while not select.select([sys.stdin], [], [], POLL_S)[0]:
        recorded |= _descendants(job)
    recorded |= _descendants(job)  # a normal exit: what still runs (the job itself lives on)
    _kill({(pid, started) for pid, started in recorded - before if pid != os.getpid()})


if __name__ == "__main__":
    watch(int(sys.argv[1]))
