"""Structured log lines for the daemon, on stderr: ``ts=... level=info event=reload rules=3``
(logfmt), or one JSON object per line with ``json=True``.  No global state: the daemon makes one
Log and hands it to what needs it.  The running daemon attaches its writer thread
(daemon.writer): lines are counted at once and written there, so a stalled stderr never stalls
the event loop or the worker; lines beyond the writer's bound are dropped and counted
(``dropped``, and a ``log_lines_dropped`` line when there is room again).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import TextIO


def _logfmt_value(v) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "=\t\n'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class Log:
    def __init__(self, json_lines: bool = False, stream: TextIO | None = None, debug: bool = False):
        self.json = json_lines
        self.stream = stream or sys.stderr
        self.debug_enabled = debug
        self._lock = threading.Lock()
        self.lines: list[str] | None = None  # set to a list to also keep lines (tests)
        self.counts: dict[str, int] = {}  # events per level since start (`snatgw status`)
        self.last_error: dict | None = None  # the last error event's record
        self.writer = None  # the daemon's daemon.writer.Writer: lines are written there, never here
        self.dropped = 0  # lines the writer refused (its log lane full: stderr stalled)
        self._dropped_told = 0  # of them, told in a `log_lines_dropped` line

    def attach(self, writer) -> None:
        """Write lines on ``writer``'s thread from now on (None: here again, synchronously)."""
        with self._lock:
            self.writer = writer

    def emit(self, level: str, event: str, **fields) -> None:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
        rec = {"ts": ts, "level": level, "event": event, **{k: v for k, v in fields.items() if v is not None}}
        line = self._format(rec)
        with self._lock:
            self.counts[level] = self.counts.get(level, 0) + 1
            if level == "error":
                self.last_error = rec
            if self.lines is not None:
                self.lines.append(line)
            writer = self.writer
            if writer is None:
                self._write(line)
                return
            if self.dropped > self._dropped_told:  # say what was lost, once there is room again
                note = self._format({"ts": ts, "level": "warning", "event": "log_lines_dropped",
                                     "lines": self.dropped - self._dropped_told, "total": self.dropped})
                if writer.submit(lambda n=note: self._write(n), 1, "log"):
                    self._dropped_told = self.dropped
            if not writer.submit(lambda x=line: self._write(x), 1, "log"):
                self.dropped += 1

    def _format(self, rec: dict) -> str:
        if self.json:
            return json.dumps(rec, default=str, ensure_ascii=False)
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in rec.items())

    def _write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed: logging must never kill the daemon
            pass

    def info(self, event: str, **fields) -> None:
        self.emit("info", event, **fields)

    def warning(self, event: str, **fields) -> None:
        self.emit("warning", event, **fields)

    def error(self, event: str, **fields) -> None:
        self.emit("error", event, **fields)

    def debug(self, event: str, **fields) -> None:
        if self.debug_enabled:
            self.emit("debug", event, **fields)


class LibraryLines(logging.Handler):
    """The warnings the config parser and the backends give Python's ``logging`` (a skipped
    keepalived block, `net.ipv4.ip_forward is 0`, the other backend's leftovers removed), as the
    daemon's own lines: ``event=config_warning`` (snatgw.config) or ``event=datapath_warning``
    (``datapath_error``), the text in ``warning`` (``error``).  Without it Python printed them as bare text on
    stderr, so a `--log-json` log had lines that were not JSON, and `status` did not count them."""

    def __init__(self, log: Log):
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "error" if record.levelno >= logging.ERROR else "warning"
            kind = "config" if record.name.startswith("snatgw.config") else "datapath"
            self.log.emit(level, f"{kind}_{level}", **{level: record.getMessage()})
        except Exception:  # noqa: BLE001 - logging must never kill the daemon
            self.handleError(record)

    @classmethod
    def install(cls, log: Log) -> "LibraryLines":
        """Route the ``snatgw`` loggers to ``log`` (instead of Python's bare last-resort lines)."""
        cls.remove()
        handler = cls(log)
        logging.getLogger("snatgw").addHandler(handler)
        return handler

    @classmethod
    def remove(cls) -> None:
        lib = logging.getLogger("snatgw")
        for h in [h for h in lib.handlers if isinstance(h, cls)]:
            lib.removeHandler(h)
