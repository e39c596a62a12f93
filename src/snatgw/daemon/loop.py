"""The daemon's I/O structure: one event loop owned by the main thread, one worker thread that
owns the backend; besides them only the GC's worker (main.py) and the writer thread that owns
the output that may block: log lines and the audit log (writer.py).  Nothing else runs.

EventLoop (main thread) owns every file descriptor and every timer: the control socket and its
connections, the namespace-owner socket, the signal wake-up fd, the GC tick.  Its callbacks
never block and never call the backend: they parse, queue and answer.

Worker (one thread) runs everything that touches the datapath, one job at a time, in order:
control requests (Service.handle), SIGHUP reloads, the GC tick (expire + hook check).  A
long job (a reload of 10,000 rules, a sweep of a million sessions) therefore never stops the
loop from accepting, timing out idle clients or answering `status`; clients beyond the
queue's bound get an immediate EBUSY answer instead of a pile of threads.

Extension point (for metrics, probes, the audit ring buffer of issue 13), all from the main
thread:

    loop.add_reader(fd_or_socket, callback)       # callback() when readable; level-triggered
    loop.add_writer(fd_or_socket, callback)       # callback() when writable
    loop.remove(fd_or_socket)
    loop.call_later(seconds, callback) -> Timer   # once; Timer.cancel()
    loop.every(seconds, callback) -> Timer        # periodic (next run counted from the end)
    loop.call_soon_threadsafe(callback)           # from any thread (the worker's results)
    worker.submit(fn, done=None, bounded=True)    # fn() on the worker; done(result, exc)
                                                  # back on the loop thread; False when full

A handler must not block: a metrics HTTP listener accepts and reads on the loop and hands the
scrape (which reads maps) to the worker with submit(); a probe socket is a reader; a ring
buffer's epoll fd is a reader whose callback drains a bounded batch per call.  Every callback
runs under the loop's guard: an exception is logged and counted (`loop_errors`), never kills
the daemon.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import selectors
import signal
import socket
import threading
import time
from typing import Callable

from .log import Log

#: control requests waiting for the worker; more are answered EBUSY at once
WORKER_QUEUE = 64


class Timer:
    __slots__ = ("when", "callback", "interval", "cancelled", "seq")

    def __init__(self, when: float, callback: Callable[[], None], interval: float | None, seq: int):
        self.when, self.callback, self.interval, self.seq = when, callback, interval, seq
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: "Timer") -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class EventLoop:
    """selectors-based loop; signals arrive through signal.set_wakeup_fd."""

    def __init__(self, log: Log | None = None, clock: Callable[[], float] = time.monotonic):
        self.log = log or Log()
        self.clock = clock
        self.sel = selectors.DefaultSelector()
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._pending: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._signal_handlers: dict[int, Callable[[int], None]] = {}
        self._signals: collections.deque[int] = collections.deque()  # caught, not yet handled
        self._old_signals: dict[int, object] = {}
        self._old_wakeup: int | None = None
        self.stopped = False
        self.errors = 0
        self.add_reader(self._wake_r, self._drain_wake)

    # ------------------------------------------------------------------ registration
    def add_reader(self, f, callback: Callable[[], None]) -> None:
        self._modify(f, selectors.EVENT_READ, callback, None)

    def add_writer(self, f, callback: Callable[[], None]) -> None:
        self._modify(f, selectors.EVENT_WRITE, None, callback)

    def remove_writer(self, f) -> None:
        self._modify(f, selectors.EVENT_WRITE, None, None, remove=True)

    def remove_reader(self, f) -> None:
        self._modify(f, selectors.EVENT_READ, None, None, remove=True)

    def _modify(self, f, event, on_read, on_write, remove: bool = False) -> None:
        try:
            key = self.sel.get_key(f)
            mask, (r, w) = key.events, key.data
        except KeyError:
            mask, r, w = 0, None, None
        if remove:
            mask &= ~event
            if event == selectors.EVENT_READ:
                r = None
            else:
                w = None
        else:
            mask |= event
            if on_read is not None:
                r = on_read
            if on_write is not None:
                w = on_write
        if mask == 0:
            self.remove(f)
            return
        try:
            self.sel.modify(f, mask, (r, w))
        except KeyError:
            self.sel.register(f, mask, (r, w))

    def remove(self, f) -> None:
        try:
            self.sel.unregister(f)
        except (KeyError, ValueError):
            pass

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        t = Timer(self.clock() + max(0.0, delay), callback, None, next(self._seq))
        heapq.heappush(self._timers, t)
        return t

    def every(self, interval: float, callback: Callable[[], None], first: float | None = None) -> Timer:
        t = Timer(self.clock() + (interval if first is None else first), callback, interval, next(self._seq))
        heapq.heappush(self._timers, t)
        return t

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self._pending.append(callback)
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the loop is awake anyway

    # ------------------------------------------------------------------ signals
    def add_signal_handler(self, signum: int, callback: Callable[[int], None]) -> None:
        """``callback(signum)`` runs on the loop (not in a signal frame)."""
        if not self._signal_handlers:
            self._old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self._signal_handlers[signum] = callback
        # the wake-up fd only wakes the loop: its byte per signal is lost once the socket is
        # full (a few hundred signals between two turns of the loop), and a SIGTERM after a
        # burst of SIGHUPs was lost with it; the Python handler (main thread) records each
        # signal not already waiting (a burst of one signal is handled once: bounded)
        old = signal.signal(signum, lambda n, _f: self._caught(n))
        self._old_signals.setdefault(signum, old)  # registered again: keep the disposition before ours

    def _caught(self, signum: int) -> None:
        if signum not in self._signals:
            self._signals.append(signum)

    def queue_signal(self, signum: int) -> None:
        """Handle ``signum`` as if it arrived now (one caught before our handlers were set:
        startsignals.py); wakes the loop."""
        self._caught(signum)
        self.call_soon_threadsafe(lambda: None)

    def pending_signals(self) -> tuple[int, ...]:
        """The signals caught and not handled yet (the loop has not run since)."""
        return tuple(self._signals)

    def restore_signals(self) -> None:
        for signum, old in self._old_signals.items():
            signal.signal(signum, old)
        self._old_signals.clear()
        if self._signal_handlers:
            signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
            self._signal_handlers.clear()

    def _drain_wake(self) -> None:
        while True:
            try:
                data = self._wake_r.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
        self._run_signals()
        while self._pending:
            self._guard(self._pending.popleft())

    def _run_signals(self) -> None:
        while self._signals:
            n = self._signals.popleft()
            if n in self._signal_handlers:
                self._guard(self._signal_handlers[n], n)

    # ------------------------------------------------------------------ running
    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # a handler's bug must not kill the daemon
            self.errors += 1
            self.log.error("loop_error", callback=getattr(fn, "__qualname__", repr(fn)), error=repr(e))

    def stop(self) -> None:
        self.stopped = True
        self.call_soon_threadsafe(lambda: None)

    def run_once(self, max_wait: float = 1.0) -> None:
        now = self.clock()
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        wait = max_wait
        if self._timers:
            wait = min(wait, max(0.0, self._timers[0].when - now))
        if self._pending or self._signals:
            wait = 0.0
        try:
            events = self.sel.select(wait)
        except InterruptedError:
            events = []
        for key, mask in events:
            r, w = key.data
            if mask & selectors.EVENT_READ and r is not None:
                self._guard(r)
            if mask & selectors.EVENT_WRITE and w is not None:
                try:
                    still = self.sel.get_key(key.fileobj).data[1]
                except (KeyError, ValueError):
                    still = None
                if still is not None:
                    self._guard(still)
        self._run_signals()
        while self._pending:
            self._guard(self._pending.popleft())
        now = self.clock()
        while self._timers and self._timers[0].when <= now:
            t = heapq.heappop(self._timers)
            if t.cancelled:
                continue
            self._guard(t.callback)
            if t.interval is not None and not t.cancelled:
                t.when = self.clock() + t.interval
                heapq.heappush(self._timers, t)

    def run(self) -> None:
        while not self.stopped:
            self.run_once()

    def close(self) -> None:
        self.restore_signals()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()


class JobThread:
    """One thread that runs queued jobs in order, one at a time: the skeleton the Worker and
    the output Writer (writer.py) share.  A subclass sets its own fields, then calls
    ``__init__`` (which starts the thread), queues with ``_queue`` under ``self._cv`` after
    its own bound checks, and says what a job is by ``_taken`` (under the lock, as it leaves
    the queue), ``_do`` (running it; an exception that leaves ``_do`` is counted in ``errors``)
    and ``_done`` (after it, outside the lock).  ``busy_since``: when the running job began
    (monotonic), None when idle."""

    def __init__(self, name: str):
        self._jobs: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self.busy_since: float | None = None
        self.errors = 0
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _queue(self, job) -> None:
        """Append ``job`` and wake the thread; the caller holds ``self._cv``."""
        self._jobs.append(job)
        self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._jobs)

    def _taken(self, job) -> None:
        pass

    def _do(self, job) -> None:
        raise NotImplementedError

    def _done(self, job) -> None:
        pass

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._closing:
                    self._cv.wait()
                if not self._jobs:
                    self._cv.notify_all()  # flush() waiters see the end
                    return
                job = self._jobs.popleft()
                self._taken(job)
            self.busy_since = time.monotonic()
            try:
                self._do(job)
            except Exception:  # noqa: BLE001 - one job's failure must not end the thread
                self.errors += 1
            finally:
                self.busy_since = None
                self._done(job)


class Worker(JobThread):
    """One thread that runs jobs in order; results go back to the loop thread."""

    def __init__(self, loop: EventLoop, log: Log | None = None, bound: int = WORKER_QUEUE,
                 name: str = "snatgw-worker"):
        self.loop, self.log, self.bound = loop, log or loop.log, bound
        self._bounded = 0  # bounded jobs queued (control requests)
        super().__init__(name)

    def submit(self, fn: Callable[[], object],
               done: Callable[[object, BaseException | None], None] | None = None, bounded: bool = True) -> bool:
        """Queue ``fn``; ``done(result, error)`` runs on the loop thread after it.  A bounded job
        is refused (False) when ``bound`` of them wait already."""
        with self._cv:
            if self._closing or (bounded and self._bounded >= self.bound):
                return False
            self._queue((fn, done, bounded))
            if bounded:
                self._bounded += 1
        return True

    def _taken(self, job) -> None:
        if job[2]:
            self._bounded -= 1

    def _do(self, job) -> None:
        fn, done, _ = job
        result, error = None, None
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - reported to done(); the worker lives on
            error = e
            if done is None:
                self.errors += 1
                self.log.error("job_failed", job=getattr(fn, "__qualname__", repr(fn)), error=repr(e))
        if done is not None:
            self.loop.call_soon_threadsafe(lambda d=done, r=result, e=error: d(r, e))

    def close(self, timeout: float = 20.0) -> bool:
        """Let the running job finish (up to ``timeout``), drop the queued ones (the daemon is
        stopping: their clients get no answer); True when the thread ended."""
        with self._cv:
            self._closing = True
            self._jobs.clear()
            self._bounded = 0
            self._cv.notify_all()
        self.thread.join(timeout)
        return not self.thread.is_alive()


class Partial:
    """A job's answer that is not finished: ``step()`` does the next bounded piece on the worker
    and returns the answer or another Partial.  The control server queues each step behind the
    jobs waiting then (round robin), so a long listing never holds the worker or the service
    lock for its whole length; ``close()`` gives up (the client left, the daemon stops)."""

    __slots__ = ("step", "close")

    def __init__(self, step: Callable[[], object], close: Callable[[], None] | None = None):
        self.step = step
        self.close = close or (lambda: None)


def is_fd_exhaustion(e: OSError) -> bool:
    return e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


__all__ = ["EventLoop", "JobThread", "Worker", "Timer", "Partial", "WORKER_QUEUE", "is_fd_exhaustion"]
