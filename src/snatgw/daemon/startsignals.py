"""SIGTERM, SIGINT and SIGHUP from the daemon's first line of Python on, before its event loop
takes them: caught and recorded here, acted on by main.run between the steps of the start.

Their default action (the kernel's: terminate) killed a starting daemon (`systemctl stop` or a
supervisor's restart during its first ~0.3 s: the imports, the config, the owner lock, the
backend's set-up): exit 143, nothing logged.  ``hold()`` is the first thing `snatgw run`
(cli/main.py, before it imports the daemon) and `snatgwd` do; from then a signal is only
recorded; run() looks at ``stop_asked()`` before each step that would set something up, and
hands what was caught to the loop (``handover``) when the loop's own handlers take over.
What stays outside: the interpreter's own start-up, before any snatgw code runs (the handler is
set ~25 ms after the exec: median of 40 starts, 16-39 ms, on 2 CPUs with a test suite running
beside), where the default action remains; nothing is set up then.

Only the main thread may set handlers; ``release()`` puts back what was there
before ``hold()`` (for a caller that runs the daemon in-process and lives on).
"""

from __future__ import annotations

import _signal  # what the signal module wraps, without its enum import (~10 ms of the window)

#: the signals that stop the daemon; SIGHUP (reload) is recorded too: its default action
#: would terminate a starting daemon as well
STOP = (_signal.SIGTERM, _signal.SIGINT)
HELD = STOP + (_signal.SIGHUP,)


class StartSignals:
    def __init__(self):
        self.caught: list[int] = []  # in order of arrival, each signal once (bounded)
        self._old: dict[int, object] = {}

    def hold(self, signals: tuple[int, ...] = HELD) -> "StartSignals":
        """Catch ``signals`` from now on (again after ``release``); idempotent."""
        for s in signals:
            old = _signal.signal(s, self._record)
            self._old.setdefault(s, old)  # held twice: keep what was there before the first
        return self

    def _record(self, signum: int, _frame) -> None:
        if signum not in self.caught:
            self.caught.append(signum)

    def stop_asked(self) -> int | None:
        """The first stop signal caught, or None."""
        return next((s for s in self.caught if s in STOP), None)

    def handover(self) -> list[int]:
        """What was caught (the caller gives it to the loop, whose handlers replaced ours)."""
        caught, self.caught = self.caught, []
        return caught

    def release(self) -> None:
        """The dispositions from before ``hold()`` again."""
        for s, old in self._old.items():
            _signal.signal(s, old)
        self._old.clear()


#: the process's one instance: held by the CLI before the daemon's imports, used by run() (and
#: by the demo: STOP only, caught before its imports, looked at once its own handlers are set)
EARLY = StartSignals()


def hold(signals: tuple[int, ...] = HELD) -> StartSignals:
    return EARLY.hold(signals)


def name(signum: int) -> str:
    """SIGTERM, SIGINT... (the log's spelling)."""
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
