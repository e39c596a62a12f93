"""The daemon's one thread for output that may block: its log lines (stderr: a pipe to journald
that may stall) and its audit log (a file on a slow or full disk, or syslog).  The event loop
and the worker only queue here; a write that blocks stalls this thread alone, never the control
socket, the GC or a reload.

Bounded: each lane (``log``, ``audit``) holds at most its bound of lines waiting; a line that
finds its lane full is refused (``submit`` returns False) and its owner counts it (Log.dropped,
the audit log's ``lost_writer``).  Jobs run in order, one at a time.  ``close(timeout)`` writes
what waits for at most ``timeout`` seconds (a stderr nobody reads must not hold the daemon's
exit), then leaves.
"""

from __future__ import annotations

import time
from typing import Callable

from .loop import JobThread

#: lines each lane may hold waiting (log: about 1 MB of lines; audit: 16 of the reader's batches)
LANES = {"log": 8192, "audit": 65536}


class Writer(JobThread):
    def __init__(self, lanes: dict[str, int] | None = None, name: str = "snatgw-writer"):
        self.bounds = dict(lanes or LANES)
        self.waiting = {k: 0 for k in self.bounds}  # lines queued per lane
        self.refused = {k: 0 for k in self.bounds}  # lines refused per lane (full)
        super().__init__(name)

    def room(self, lane: str) -> int:
        with self._cv:
            return self.bounds[lane] - self.waiting[lane]

    def submit(self, fn: Callable[[], object], cost: int = 1, lane: str = "log", force: bool = False) -> bool:
        """Queue ``fn`` (writing ``cost`` lines of ``lane``); False when the lane is full (or the
        writer closed).  ``force``: queue whatever the bound (a sink's close after its lines)."""
        with self._cv:
            if self._closing or (not force and self.waiting[lane] + cost > self.bounds[lane]):
                self.refused[lane] += cost
                return False
            self.waiting[lane] += cost
            self._queue((fn, cost, lane))
        return True

    def _do(self, job) -> None:
        job[0]()  # a sink's exception is counted in errors: it must not end the daemon's output

    def _done(self, job) -> None:
        with self._cv:
            self.waiting[job[2]] -= job[1]
            self._cv.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued job ran (at most ``timeout``); True when they did."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._jobs or any(self.waiting.values()):
                left = deadline - time.monotonic()
                if left <= 0 or not self.thread.is_alive():
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Write what waits (up to ``timeout``), then stop; True when the thread ended."""
        self.flush(timeout)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self.thread.join(0.1 if self.thread.is_alive() and self.busy_since is not None else timeout)
        return not self.thread.is_alive()


__all__ = ["Writer", "LANES"]
