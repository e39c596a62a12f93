"""Stand-ins for the daemon's event loop and worker (daemon/loop.py) where a unit test drives
what registers with them (Extras, SyncService) by hand: readers kept, timers never fire, jobs
kept until the test runs them."""

from __future__ import annotations


class Timer:
    def cancel(self):
        pass


class Loop:
    """EventLoop's registration calls: readers kept by file, timers inert, call_soon at once."""

    def __init__(self):
        self.readers = {}

    def add_reader(self, f, cb):
        self.readers[f] = cb

    def remove(self, f):
        self.readers.pop(f, None)

    def every(self, interval, cb, first=None):
        return Timer()

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
