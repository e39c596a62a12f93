"""Stand-ins for the daemon's event loop and worker (daemon/loop.py) where a unit test drives
what registers with them (Extras, SyncService) by hand: readers kept, timers kept (fired by the
test: ``fire``), jobs kept until the test runs them."""

from __future__ import annotations


class Timer:
    def __init__(self, interval=None, cb=None, first=None):
        self.interval, self.cb, self.first = interval, cb, first
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class Loop:
    """EventLoop's registration calls: readers kept by file, timers kept (they fire only when the
    test says so), call_soon at once."""

    def __init__(self):
        self.readers = {}
        self.timers = []

    def add_reader(self, f, cb):
        self.readers[f] = cb

    def remove(self, f):
        self.readers.pop(f, None)

    def every(self, interval, cb, first=None):
        t = Timer(interval, cb, first)
        self.timers.append(t)
        return t

    def fire(self, cb) -> int:
        """Run the live timers calling ``cb`` (a bound method compares equal to another of the
        same object's); how many."""
        hits = [t for t in self.timers if t.cb == cb and not t.cancelled]
        for t in hits:
            t.cb()
        return len(hits)

    def call_soon_threadsafe(self, cb):
        cb()


class Worker:
    """The daemon's worker: jobs kept, run by the test (``run``: all, in order)."""

    def __init__(self):
        self.jobs = []

    def submit(self, fn, done=None, bounded=True):
        self.jobs.append((fn, done))
        return True

    def run(self):
        while self.jobs:
            fn, done = self.jobs.pop(0)
            r = fn()
            if done:
                done(r, None)
