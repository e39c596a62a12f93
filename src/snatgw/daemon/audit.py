"""The audit log of mappings (issue 13, RFC 7422's purpose): who used which public address and
port, and when.  The datapath reports each session created and ended (bpf: the snat_audit ring
buffer; nft: conntrack NEW/DESTROY events of snatgw's marked entries); the daemon writes one
JSON line per event to a file rotated by size, or to syslog.

Setting (`snatgw { }` block)::

    audit_log /var/log/snatgw/audit.jsonl   # or `syslog`; default: off
    audit_log_max_size 100M                 # rotate the file at this size (K, M, G suffixes)
    audit_log_keep 5                        # rotated files kept: audit.jsonl.1 (newest) .. .5

I/O structure (daemon/loop.py): the source (ring buffer's epoll fd, netlink socket) is a reader
of the daemon's event loop; each callback drains at most BATCH records and hands their lines to
the daemon's writer thread (daemon/writer.py), which writes the file or syslog: a slow or full
disk stalls that thread, never the loop.  While the writer's audit lane has no room for a
batch the source is not read (the datapath's ring keeps or drops and counts); lines refused
by a full lane are counted (``lost_writer``).  Sessions the control plane removes itself (the bpf backend's rule
changes) come from the worker through ``submit_records`` into a bounded queue drained on the
loop.  Everything is bounded: the ring (the datapath drops and counts when it is full), the
queue (QUEUE_MAX records; more are dropped and counted), the file (max_size, then rotation,
``keep`` old files).  A write error (disk full, file removed, syslog gone) is counted and
logged at most once per ERROR_LOG_INTERVAL; the daemon never stops for it.

A line (keys always in this order; ``why``, ``state``, ``last_seen`` only on ``end``; packets and
bytes where the datapath counts them, nft with nf_conntrack_acct; ``"synced": true`` last, only
on the create of a session installed from the peer's session sync records and on the end of one
that the peer's end record removed, ``why`` "peer_end")::

    {"time": "2026-11-29T10:42:07.512Z", "event": "create", "proto": "udp",
     "inside_addr": "198.18.40.10", "inside_port": 40000, "nat_addr": "198.51.100.7",
     "nat_port": 40123, "remote_addr": "203.0.113.10", "remote_port": 53, "rule_id": 17,
     "backend": "bpf"}
"""

from __future__ import annotations

import collections
import errno
import json
import os
import socket
import threading
import time

BATCH = 4096  # records one loop callback drains and writes
QUEUE_MAX = 65536  # records the worker may queue for the loop (control-plane removals)
ERROR_LOG_INTERVAL = 60.0  # seconds between two log lines about failing writes
DRAIN_EVERY = 1.0  # seconds: the loop also drains on a timer (a missed wake-up costs 1 s)
SYSLOG_SOCKET = "/dev/log"
SYSLOG_PRI = 3 * 8 + 6  # facility daemon, severity info
#: key order of a line
FIELDS = ("time", "event", "proto", "inside_addr", "inside_port", "nat_addr", "nat_port", "remote_addr",
          "remote_port", "rule_id", "why", "state", "last_seen", "packets", "bytes", "rpackets", "rbytes",
          "backend", "synced")  # fmt: skip


_iso_sec: list = [None, ""]  # the last second formatted (strftime is the dearest part of a line)


def iso(t: float) -> str:
    """Unix seconds -> '2026-11-29T10:42:07.512Z' (UTC, milliseconds)."""
    sec, ms = divmod(int(round(t * 1000)), 1000)
    if _iso_sec[0] != sec:
        _iso_sec[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _iso_sec[0] = sec
    return f"{_iso_sec[1]}.{ms:03d}Z"


def format_record(rec: dict, backend: str | None = None) -> str:
    """One record dict (see the module doc) -> one JSON line without its newline."""
    out = {}
    for k in FIELDS:
        v = backend if k == "backend" and backend else rec.get(k)
        if v is None:
            continue
        if k in ("time", "last_seen"):
            v = iso(float(v))
        out[k] = v
    return json.dumps(out, separators=(", ", ": "))


class WriteError(Exception):
    pass


class FileSink:
    """JSON lines appended to ``path``; rotated to path.1 .. path.<keep> when the next write
    would pass ``max_size`` bytes (keep 0: the file is cut instead).  Never larger than
    max_size plus one line (a line longer than max_size goes alone into a fresh file)."""

    def __init__(self, path: str, max_size: int, keep: int):
        self.path, self.max_size, self.keep = path, max(1, int(max_size)), max(0, int(keep))
        self.fd: int | None = None
        self.size = 0
        self.rotations = 0

    def describe(self) -> str:
        return self.path

    def _open(self) -> None:
        if self.fd is None:
            # never through a symlink: the daemon is root, and the path is opened again after
            # every rotation and whenever the file there changed (`check` refuses one at the start)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                              0o640)
            self.size = os.fstat(self.fd).st_size

    def _rotate(self) -> None:
        self.close()
        if self.keep == 0:
            os.unlink(self.path)
        else:
            for i in range(self.keep - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self.rotations += 1
        self._open()

    def write(self, lines: list[str]) -> int:
        """Write ``lines``; returns how many were written.  Raises WriteError (with the count
        written before the failure in ``.written``) when the file cannot be written."""
        done = 0
        try:
            self._open()
            # a file someone rotated or removed under us: write to the path again
            try:
                if os.stat(self.path).st_ino != os.fstat(self.fd).st_ino:
                    self.close()
                    self._open()
            except FileNotFoundError:
                self.close()
                self._open()
            buf: list[bytes] = []
            n = 0
            for line in lines:
                b = (line + "\n").encode()
                if self.size + n + len(b) > self.max_size and (self.size + n) > 0:
                    if buf:
                        self._write_all(b"".join(buf))
                        done += len(buf)
                        buf, n = [], 0
                    self._rotate()
                buf.append(b)
                n += len(b)
            if buf:
                self._write_all(b"".join(buf))
                done += len(buf)
        except OSError as e:
            err = WriteError(f"{self.path}: {e.strerror or e}")
            err.written = done
            err.errno = e.errno
            raise err from None
        return done

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            self.size += n
            view = view[n:]

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


class SyslogSink:
    """One datagram per line to the local syslog socket (RFC 3164 framing, facility daemon),
    never blocking: a full socket buffer loses the line (counted)."""

    def __init__(self, address: str = SYSLOG_SOCKET, tag: str = "snatgw-audit"):
        self.address, self.tag = address, tag
        self.sock: socket.socket | None = None
        self.rotations = 0

    def describe(self) -> str:
        return f"syslog ({self.address})"

    def write(self, lines: list[str]) -> int:
        done = 0
        try:
            if self.sock is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
                try:
                    s.connect(self.address)
                except OSError:
                    s.close()
                    raise
                self.sock = s
            head = f"<{SYSLOG_PRI}>{self.tag}[{os.getpid()}]: "
            for line in lines:
                self.sock.send((head + line).encode())
                done += 1
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ENOBUFS):
                self.close()  # reconnect next time (syslog restarted)
            err = WriteError(f"{self.address}: {e.strerror or e}")
            err.written = done
            err.errno = e.errno
            raise err from None
        return done

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def make_sink(target: str, max_size: int, keep: int, syslog_address: str = SYSLOG_SOCKET):
    return SyslogSink(syslog_address) if target == "syslog" else FileSink(target, max_size, keep)


class AuditLog:
    """Formats records and writes them to the sink; counts everything.  Thread-safe (the loop
    writes what the datapath reports, the worker may call it too)."""

    def __init__(self, sink, log, backend: str | None = None, clock=time.monotonic):
        self.sink, self.log, self.backend, self.clock = sink, log, backend, clock
        self._lock = threading.Lock()
        self.records = 0  # lines written
        self.lost_write = 0  # records a write failure lost
        self.write_errors = 0  # failed writes
        self.last_error: str | None = None
        self._error_logged_at: float | None = None
        self._errors_unlogged = 0

    def write_records(self, recs: list[dict]) -> int:
        if not recs:
            return 0
        return self.write_lines([format_record(r, self.backend) for r in recs])

    def write_lines(self, lines: list[str]) -> int:
        """Lines already formatted (format_record's text); returns how many were written."""
        if not lines:
            return 0
        with self._lock:
            try:
                n = self.sink.write(lines)
            except WriteError as e:
                n = getattr(e, "written", 0)
                self.records += n
                self.lost_write += len(lines) - n
                self.write_errors += 1
                self.last_error = str(e)
                self._log_error(str(e), len(lines) - n)
                return n
            self.records += n
            return n

    def _log_error(self, msg: str, lost: int) -> None:
        now = self.clock()
        self._errors_unlogged += 1
        if self._error_logged_at is not None and now - self._error_logged_at < ERROR_LOG_INTERVAL:
            return
        self.log.error("audit_write_failed", target=self.sink.describe(), error=msg, lost=lost,
                       failures=self._errors_unlogged, lost_total=self.lost_write)  # fmt: skip
        self._error_logged_at = now
        self._errors_unlogged = 0

    def stats(self) -> dict:
        return {"target": self.sink.describe(), "records": self.records, "lost_write": self.lost_write,
                "write_errors": self.write_errors, "rotations": getattr(self.sink, "rotations", 0),
                "last_error": self.last_error}  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self.sink.close()


class AuditReader:
    """The daemon's audit log on its event loop: the datapath's source (``backend.audit_source()``)
    as a reader, the worker's records through a bounded queue, the AuditLog that writes both."""

    def __init__(self, settings, backend, log, syslog_address: str = SYSLOG_SOCKET, writer=None):
        self.settings, self.backend, self.log = settings, backend, log
        self.writer = writer  # daemon.writer.Writer: the sink is written there (None: here)
        self.lost_writer = 0  # records dropped: the writer's audit lane was full (the sink stalls)
        self._paused = False  # the source's reader is off while the writer has no room for a batch
        sink = make_sink(settings.audit_log, settings.audit_log_max_size, settings.audit_log_keep, syslog_address)
        self.audit = AuditLog(sink, log, backend=getattr(backend, "name", None))
        self.source = None
        self.loop = None
        self.timer = None
        self._queue: collections.deque[list[dict]] = collections.deque()
        self._queued = 0
        self._qlock = threading.Lock()
        self.lost_queue = 0  # control-plane records dropped (queue full)
        self.received = 0  # records read from the datapath
        #: the session sync's intake of the ring's raw records (daemon/sync.py; bpf), or None
        self.tap = None

    def attach(self, loop) -> None:
        self.loop = loop
        make = getattr(self.backend, "audit_source", None)
        if make is not None:
            self.source = make()
        if self.source is not None:
            loop.add_reader(self.source.fileno(), self.drain)
        self.timer = loop.every(DRAIN_EVERY, self.drain)
        # records the backend makes itself (the control plane removing sessions)
        if hasattr(self.backend, "audit_sink"):
            self.backend.audit_sink = self.submit_records
        self.log.info("audit_log", target=self.audit.sink.describe(), source=type(self.source).__name__
                      if self.source is not None else None)  # fmt: skip

    def submit_records(self, recs: list[dict]) -> None:
        """From any thread: queue records for the loop (bounded; the overflow is counted)."""
        with self._qlock:
            room = QUEUE_MAX - self._queued
            if room <= 0:
                self.lost_queue += len(recs)
                return
            if len(recs) > room:
                self.lost_queue += len(recs) - room
                recs = recs[:room]
            self._queue.append(recs)
            self._queued += len(recs)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.drain_queue)

    def _write(self, lines: list[str]) -> None:
        """Write formatted lines: on the writer's thread (refused when its audit lane is full:
        counted in ``lost_writer``), or here without a writer."""
        if not lines:
            return
        if self.writer is None:
            self.audit.write_lines(lines)
        elif not self.writer.submit(lambda: self.audit.write_lines(lines), len(lines), "audit"):
            self.lost_writer += len(lines)

    def drain_queue(self) -> None:
        while True:
            with self._qlock:
                if not self._queue:
                    return
                recs = self._queue.popleft()
                self._queued -= len(recs)
            self._write([format_record(r, self.audit.backend) for r in recs])

    def drain(self) -> None:
        """Loop callback: one bounded batch from the datapath, handed to the writer.  While the
        writer has no room for a batch (the disk stalls) the source is left unread (its reader
        off, the DRAIN_EVERY timer looks again): the datapath's ring keeps what it can and
        counts the rest, instead of the loop spinning on a readable fd."""
        if self.source is not None:
            if self.writer is not None and self.writer.room("audit") < BATCH:
                if not self._paused and self.loop is not None:
                    self._paused = True
                    self.loop.remove(self.source.fileno())
            else:
                if self._paused and self.loop is not None:
                    self._paused = False
                    self.loop.add_reader(self.source.fileno(), self.drain)
                if hasattr(self.source, "drain_lines"):  # bpf: records straight to lines
                    lines = self.source.drain_lines(BATCH, iso, self.audit.backend or "bpf", tap=self.tap)
                else:
                    lines = [format_record(r, self.audit.backend) for r in self.source.drain(BATCH)]
                self.received += len(lines)
                self._write(lines)
        self.drain_queue()

    def stats(self) -> dict:
        """For status and metrics (worker thread: reads the datapath's counters)."""
        out = {"enabled": True, **self.audit.stats(), "received": self.received, "lost_queue": self.lost_queue,
               "lost_writer": self.lost_writer}
        counts = getattr(self.source, "counts", None)
        if counts is not None:
            try:
                c = counts()
                out["lost_datapath"] = c.get("lost", 0)
                if "written" in c:
                    out["datapath_written"] = c["written"]
            except Exception as e:  # noqa: BLE001 - status must answer anyway
                out["lost_datapath"] = None
                out["counts_error"] = str(e)
        return out

    def close(self) -> None:
        if self.loop is not None:
            if self.source is not None:
                try:
                    self.drain()  # what is waiting now is written before we go
                except Exception:  # noqa: BLE001
                    pass
                if not self._paused:
                    self.loop.remove(self.source.fileno())
            if self.timer is not None:
                self.timer.cancel()
        if hasattr(self.backend, "audit_sink") and self.backend.audit_sink == self.submit_records:
            self.backend.audit_sink = None
        if self.source is not None:
            self.source.close()
            self.source = None
        if self.writer is None or not self.writer.submit(self.audit.close, 0, "audit", force=True):
            self.audit.close()  # after the lines queued before it (on the writer), or now
