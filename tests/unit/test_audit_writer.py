"""The audit log's writer (daemon/audit.py) without a datapath: a line's fields and order,
rotation by size with a bounded number of files, a disk-full or vanished file counted and
logged (never raised), syslog datagrams that never block, the bounded queue of the worker's
records, the reader on a real event loop, and the settings' errors (file:line: field:
expected ...) with nothing changed."""

from __future__ import annotations

import json
import os
import socket
import stat
import time

import pytest

from snatgw.config.parse import parse_text, render_config
from snatgw.config.schema import Settings
from snatgw.daemon import audit as A
from snatgw.daemon.log import Log
from snatgw.daemon.loop import EventLoop
from snatgw.errors import ConfigError

REC = {"event": "create", "time": 1795948927.5124, "proto": "udp", "inside_addr": "198.18.40.10",
       "inside_port": 40000, "nat_addr": "198.51.100.7", "nat_port": 40123, "remote_addr": "203.0.113.10",
       "remote_port": 53, "rule_id": 17}  # fmt: skip
RULES = "virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n"


def rec(i: int, **kw) -> dict:
    return {**REC, "inside_port": 1024 + i, **kw}


def quiet_log() -> Log:
    log = Log(stream=open(os.devnull, "w"))
    log.lines = []
    return log


# --------------------------------------------------------------------------- format


def test_a_line_has_its_fields_in_order_and_utc_times():
    line = A.format_record(REC, "bpf")
    assert list(json.loads(line)) == ["time", "event", "proto", "inside_addr", "inside_port", "nat_addr",
                                      "nat_port", "remote_addr", "remote_port", "rule_id", "backend"]
    d = json.loads(line)
    assert d["time"] == "2026-11-29T10:42:07.512Z" and d["nat_port"] == 40123
    end = json.loads(A.format_record({**REC, "event": "end", "why": "expired", "state": "UDP",
                                      "last_seen": REC["time"] - 300}, "bpf"))
    assert (end["why"], end["state"], end["last_seen"]) == ("expired", "UDP", "2026-11-29T10:37:07.512Z")
    assert "\n" not in line


# --------------------------------------------------------------------------- file and rotation


def test_rotation_keeps_at_most_keep_files_each_within_max_size(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    sink = A.FileSink(path, max_size=1000, keep=2)
    log = A.AuditLog(sink, quiet_log(), backend="bpf")
    for i in range(100):
        assert log.write_records([rec(i)]) == 1
    files = sorted(os.listdir(tmp_path))
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(0 < os.path.getsize(tmp_path / f) <= 1000 for f in files)
    ports = []
    for f in ("audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"):
        ports += [json.loads(x)["inside_port"] for x in (tmp_path / f).read_text().splitlines()]
    assert ports == sorted(ports) and ports[-1] == 1024 + 99  # the newest lines, in order
    assert sink.rotations >= 10 and log.records == 100
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o007 == 0  # not world-readable


def test_a_batch_is_split_across_a_rotation_and_keep_0_cuts_the_file(tmp_path):
    path = str(tmp_path / "a.jsonl")
    sink = A.FileSink(path, max_size=1000, keep=0)
    assert A.AuditLog(sink, quiet_log()).write_records([rec(i) for i in range(30)]) == 30
    assert os.listdir(tmp_path) == ["a.jsonl"] and os.path.getsize(path) <= 1000


def test_disk_full_is_counted_and_logged_once_never_raised():
    log = quiet_log()
    audit = A.AuditLog(A.FileSink("/dev/full", max_size=1 << 30, keep=1), log)
    for i in range(5):
        assert audit.write_records([rec(i), rec(i + 100)]) == 0
    st = audit.stats()
    assert (st["records"], st["lost_write"], st["write_errors"]) == (0, 10, 5)
    assert "No space left" in st["last_error"]
    errors = [x for x in log.lines if "audit_write_failed" in x]
    assert len(errors) == 1  # one line per ERROR_LOG_INTERVAL, not one per batch


def test_a_file_removed_or_rotated_by_someone_else_is_written_again(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    audit = A.AuditLog(A.FileSink(path, 1 << 20, 1), quiet_log())
    audit.write_records([rec(1)])
    os.rename(path, path + ".old")  # logrotate's move
    audit.write_records([rec(2)])
    os.unlink(path)
    audit.write_records([rec(3)])
    assert [json.loads(x)["inside_port"] for x in open(path)] == [1027]
    assert audit.stats()["lost_write"] == 0


def test_a_directory_that_vanishes_costs_records_not_the_daemon(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    audit = A.AuditLog(A.FileSink(str(d / "audit.jsonl"), 1 << 20, 1), quiet_log())
    audit.write_records([rec(1)])
    os.unlink(d / "audit.jsonl")
    d.rmdir()
    assert audit.write_records([rec(2)]) == 0 and audit.stats()["lost_write"] == 1
    d.mkdir()
    assert audit.write_records([rec(3)]) == 1  # back as soon as it can be written


# --------------------------------------------------------------------------- syslog


def test_syslog_sends_one_datagram_per_record_and_loses_what_does_not_fit(tmp_path):
    addr = str(tmp_path / "log.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(addr)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        audit = A.AuditLog(A.SyslogSink(addr), quiet_log(), backend="nft")
        assert audit.write_records([rec(1), rec(2)]) == 2
        got = srv.recv(4096).decode()
        assert got.startswith(f"<30>snatgw-audit[{os.getpid()}]: {{")
        assert json.loads(got.split(": ", 1)[1])["inside_port"] == 1025
        srv.recv(4096)
        # nobody reads: the socket fills; the sink never blocks, it counts what it lost
        t0 = time.monotonic()
        sent = audit.write_records([rec(i) for i in range(2000)])
        assert time.monotonic() - t0 < 2 and sent < 2000
        assert audit.stats()["lost_write"] == 2000 - sent
    finally:
        srv.close()
    audit2 = A.AuditLog(A.SyslogSink(str(tmp_path / "nobody.sock")), quiet_log())
    assert audit2.write_records([rec(1)]) == 0 and audit2.stats()["write_errors"] == 1


# --------------------------------------------------------------------------- reader on a loop


class FakeSource:
    """A datapath source: a socketpair's readable end, records handed out in drains."""

    def __init__(self):
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.pending: list[dict] = []
        self.drains: list[int] = []
        self.closed = False

    def push(self, recs):
        self.pending += recs
        self.w.send(b"x")

    def fileno(self):
        return self.r.fileno()

    def drain(self, limit):
        out, self.pending = self.pending[:limit], self.pending[limit:]
        self.drains.append(len(out))
        if not self.pending:
            try:
                self.r.recv(4096)
            except BlockingIOError:
                pass
        return out

    def counts(self):
        return {"lost": 7, "written": 9}

    def close(self):
        self.closed = True
        self.r.close()
        self.w.close()


class FakeBackend:
    name = "fake"

    def __init__(self):
        self.source = FakeSource()
        self.audit_sink = None

    def audit_source(self):
        return self.source


def test_the_reader_drains_bounded_batches_on_the_loop_and_takes_the_workers_records(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    settings = Settings(audit_log=path)
    backend = FakeBackend()
    loop = EventLoop(quiet_log())
    reader = A.AuditReader(settings, backend, quiet_log())
    reader.attach(loop)
    try:
        backend.source.push([rec(i) for i in range(A.BATCH + 10)])
        loop.run_once(0.5)
        assert backend.source.drains[0] == A.BATCH  # one callback, one bounded batch
        loop.run_once(0.5)
        # the worker's records (the control plane removing sessions), from another thread
        assert backend.audit_sink == reader.submit_records
        backend.audit_sink([rec(i, event="end", why="rule_change") for i in range(3)])
        loop.run_once(0.5)
        lines = [json.loads(x) for x in open(path)]
        assert len(lines) == A.BATCH + 13 and lines[-1]["why"] == "rule_change"
        st = reader.stats()
        assert (st["records"], st["lost_datapath"], st["received"]) == (A.BATCH + 13, 7, A.BATCH + 10)
        # the worker's queue is bounded: a flood is counted, not kept
        reader.loop = None  # nobody drains meanwhile
        backend.audit_sink([rec(0)] * (A.QUEUE_MAX + 5))
        assert reader.lost_queue == 5 and reader.stats()["lost_queue"] == 5
    finally:
        reader.loop = loop
        reader.close()
        loop.close()
    assert backend.source.closed and backend.audit_sink is None


# --------------------------------------------------------------------------- settings


def conf(lines: str) -> str:
    return "snatgw {\n" + lines + "\n}\n" + RULES


def test_settings_parse_and_render_back(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    cfg = parse_text(conf(f"audit_log {path}\naudit_log_max_size 10M\naudit_log_keep 3"), "t.conf")
    s = cfg.settings
    assert (s.audit_log, s.audit_log_max_size, s.audit_log_keep) == (path, 10 << 20, 3)
    assert parse_text(render_config(cfg), "r.conf").settings == s
    assert parse_text(conf("audit_log syslog"), "t.conf").settings.audit_log == "syslog"
    assert Settings().audit_log is None  # off by default


@pytest.mark.parametrize("line,needle", [
    ("audit_log relative/audit.jsonl", "expected an absolute path"),
    ("audit_log /nonexistent-dir-snatgw/audit.jsonl", "directory /nonexistent-dir-snatgw of"),
    ("audit_log /etc/passwd/audit.jsonl", "is not a directory"),
    ("audit_log {tmp}", "exists and is a directory"),
    ("audit_log /dev/null", "exists and is a character device"),
    ("audit_log /proc/version", "/proc/version is on the kernel's proc file system"),
    ("audit_log /proc/audit.jsonl", "is on the kernel's proc file system"),
    ("audit_log /sys/kernel/audit.jsonl", "is on the kernel's sysfs file system"),
    ("audit_log_max_size 10X", "expected a size in bytes"),
    ("audit_log_max_size 100", "expected at least 4096 bytes"),
    ("audit_log_keep -1", "audit_log_keep"),
    ("audit_log_keep 100000", "audit_log_keep"),
])  # fmt: skip
def test_bad_settings_are_clear_errors_with_file_and_line(tmp_path, line, needle):
    with pytest.raises(ConfigError) as ei:
        parse_text(conf(line.format(tmp=tmp_path)), "t.conf")
    msg = str(ei.value)
    assert msg.startswith("t.conf:2: ") and needle in msg, msg


def test_an_audit_log_others_could_read_or_replace_is_refused(tmp_path):
    """Records say who used which address when: a file there owned by another user (made in
    advance by whoever could, to read them), or a directory anyone may write without the
    sticky bit (the log or its rotations replaced), is refused at the setting's line; both
    passed.  A sticky directory such as /tmp, and a file owned by root, pass."""
    d = tmp_path / "logs"
    d.mkdir()
    f = d / "audit.jsonl"
    f.write_text("")
    os.chown(f, 65534, -1)
    with pytest.raises(ConfigError, match=r"^t.conf:2: audit_log: .*audit.jsonl is owned by uid 65534, not by root"):
        parse_text(conf(f"audit_log {f}"), "t.conf")
    os.chown(f, 0, -1)
    assert parse_text(conf(f"audit_log {f}"), "t.conf").settings.audit_log == str(f)
    d.chmod(0o777)
    with pytest.raises(ConfigError, match=r"is writable by others \(mode 0777\) without the sticky bit"):
        parse_text(conf(f"audit_log {f}"), "t.conf")
    d.chmod(0o1777)
    assert parse_text(conf(f"audit_log {f}"), "t.conf").settings.audit_log == str(f)


# --------------------------------------------------------------------------- the writer thread


def test_an_audit_file_nobody_reads_stalls_the_writer_not_the_loop(tmp_path):
    """The audit file is a FIFO nobody reads (a stalled disk): opening it blocks, on the
    daemon's writer thread.  The loop's callbacks still return: each batch goes to the writer
    until its audit lane has no room for one, then the source is left unread (its reader off,
    nothing dropped at the loop) while records the worker hands over are counted as lost;
    once someone reads, every queued line arrives, in order."""
    from snatgw.daemon.writer import Writer

    path = str(tmp_path / "audit.fifo")
    os.mkfifo(path)
    writer = Writer(lanes={"log": 100, "audit": A.BATCH * 2})
    backend = FakeBackend()
    loop = EventLoop(quiet_log())
    reader = A.AuditReader(Settings(audit_log=path), backend, quiet_log(), writer=writer)
    reader.attach(loop)
    fd = None
    try:
        for _ in range(3):  # three batches: two fill the lane, the third waits in the source
            backend.source.push([rec(i) for i in range(A.BATCH)])
            loop.run_once(0.05)
        assert backend.source.drains == [A.BATCH, A.BATCH] and len(backend.source.pending) == A.BATCH
        assert writer.busy_since is not None  # the writer is stuck in open(2) of the FIFO
        backend.audit_sink([rec(0, event="end", why="rule_change")] * 3)  # the worker's records
        loop.run_once(0.05)
        assert reader.stats()["lost_writer"] == 3 and reader.stats()["records"] == 0
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a reader: the writer's open returns
        got = b""
        for _ in range(2000):  # bounded: until both batches arrived
            try:
                got += os.read(fd, 1 << 20)
            except BlockingIOError:
                time.sleep(0.01)
            if got.count(b"\n") >= 2 * A.BATCH:
                break
        lines = [json.loads(x) for x in got.splitlines()]
        assert [x["inside_port"] for x in lines] == [1024 + i for i in range(A.BATCH)] * 2
        assert writer.flush(10)
        reader.drain()  # the timer's turn: room again, the source is read again
        assert backend.source.drains[-1] == A.BATCH and not backend.source.pending
    finally:
        reader.close()
        loop.close()
        if fd is not None:
            for _ in range(200):  # the last batch and the close, written to a reader that reads
                try:
                    if not os.read(fd, 1 << 20) and writer.pending() == 0:
                        break
                except BlockingIOError:
                    time.sleep(0.01)
            os.close(fd)
        assert writer.close(10)


def test_the_audit_file_is_never_written_through_a_symlink(tmp_path):
    """The file is opened again after a rotation and whenever the one at its path changed: a
    symlink put there meanwhile (toward a file the daemon, root, may write) is a write error,
    counted, and the file it points to is left as it was; before, the lines were appended to it."""
    path, victim = tmp_path / "audit.jsonl", tmp_path / "victim"
    victim.write_text("root:x:0:0\n")
    sink = A.FileSink(str(path), max_size=1 << 20, keep=1)
    assert sink.write(['{"n": 1}']) == 1
    path.unlink()
    path.symlink_to(victim)
    with pytest.raises(A.WriteError):
        sink.write(['{"n": 2}'])
    sink.close()
    assert victim.read_text() == "root:x:0:0\n"
