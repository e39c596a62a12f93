"""A real `snatgw run` process on the fake backend, for the tests that attack its control plane
(tests/unit/test_control_hostile.py, tests/attack/test_control_flood.py): the CLI's own `run`
(its event loop, worker, signals, control socket and metrics listener), optionally with a
synthetic session table of N rows behind the `sessions` op (the fake backend's model makes a
session in ~0.5 ms; these are made as they are listed).  Stopped by SIGTERM (then SIGKILL) on
the way out, whatever happens; its stderr (the log) is kept for the test to read."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from snatgw.daemon.control import request

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "examples" / "lab.conf"

# `snatgw run` with FakeBackend.iter_sessions listing argv[1] synthetic sessions
_RUN = r"""
import sys
from snatgw.datapath.fake import FakeBackend

N = int(sys.argv[1])
if N:
    class Row:
        __slots__ = ("i",)

        def __init__(self, i):
            self.i = i

        def as_dict(self):
            i = self.i
            return {"proto": "udp", "inside": f"198.18.40.{i % 250}:{1024 + i % 60000}",
                    "remote": "203.0.113.10:53", "nat": f"198.19.2.71:{5000 + i % 60000}", "state": "UDP",
                    "idle": 1.0, "expires": 29.0, "rule_id": 1234567, "packets_out": 1, "bytes_out": 100,
                    "packets_in": 1, "bytes_in": 100}

    def iter_sessions(self, flt, limit=None):
        return (Row(i) for i in range(N))

    FakeBackend.iter_sessions = iter_sessions
from snatgw.cli.main import main

sys.exit(main(sys.argv[2:]))
"""


MIB = 1024  # RSS is read in KiB
SIXTY = "  snat_rule { from 198.18.60.0/24 snat_ip 198.19.2.71 }\n"
SEVENTY = "  snat_rule { from 198.18.70.0/24 snat_ip 198.19.3.72 }\n"


def rules_text(*extra: str) -> str:
    """The lab config with ``extra`` rules before its last (3 + len(extra) rules)."""
    base = LAB.read_text()
    last = "  snat_rule { from 198.18.0.0/16"
    return base.replace(last, "".join(extra) + last)


def write(path, text: str) -> None:
    tmp = f"{path}.new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # the daemon reads one whole file or the other


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Poller:
    """A thread asking `status` in a loop: every answer, every failure."""

    def __init__(self, sock: str, op: str = "status"):
        self.sock, self.op = sock, op
        self.answers: list[dict] = []
        self.failures: list[str] = []
        self.slowest = 0.0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                self.answers.append(request(self.sock, {"op": self.op}, timeout=10))
            except Exception as e:  # noqa: BLE001 - each one is a failure of the test
                self.failures.append(repr(e))
            self.slowest = max(self.slowest, time.monotonic() - t0)
            time.sleep(0.002)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join(15)


def hup_storm(d, n: int, texts: list[str], gap: float = 0.005) -> float:
    """``n`` SIGHUPs ``gap`` apart, the config rewritten every 50 to the next of ``texts``;
    the seconds it took."""
    t0 = time.monotonic()
    for i in range(n):
        if i % 50 == 0:
            write(d.conf, texts[(i // 50) % len(texts)])
        os.kill(d.pid, signal.SIGHUP)
        time.sleep(gap)
    return time.monotonic() - t0


def settled_on(d, rules: int, since: float) -> dict | None:
    """status once the daemon runs ``rules`` rules by a reload recorded after ``since``."""
    def ok():
        st = request(d.sock, {"op": "status"}, timeout=10)
        lr = st.get("last_reload") or {}
        return st if st["rules"] == rules and lr.get("at", 0) >= since and lr.get("ok") else None

    return wait_for(ok, 15, 0.1)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class Daemon:
    def __init__(self, proc: subprocess.Popen, conf: Path, sock: str, log: Path, metrics_port: int | None):
        self.proc, self.conf, self.sock, self.log_path, self.metrics_port = proc, conf, sock, log, metrics_port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        """Resident set in KiB."""
        return rss_kib(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(tmpdir: Path, sessions: int = 0, metrics: bool = False, conf_text: str | None = None):
    """Yield a ready Daemon (the lab config unless ``conf_text``; ``metrics``: with
    `metrics_listen 127.0.0.1:<free port>`)."""
    text = conf_text if conf_text is not None else LAB.read_text()
    port = None
    if metrics:
        port = free_port()
        text = text.replace("backend bpf", f"backend bpf\n    metrics_listen 127.0.0.1:{port}")
    conf = tmpdir / "snatgw.conf"
    conf.write_text(text)
    sock = str(tmpdir / "ctl.sock")
    log = tmpdir / "daemon.log"
    import snatgw  # the daemon runs the snatgw the tests import (PYTHONPATH=$PWD/src)

    src = str(Path(snatgw.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-c", _RUN, str(sessions), "run", str(conf), "--backend", "fake",
                              "--socket", sock], stdout=subprocess.PIPE, stderr=err, text=True, env=env)  # fmt: skip
    try:
        line = p.stdout.readline()
        assert "ready" in line, f"no ready line: {line!r}; log:\n{log.read_text()[-3000:]}"
        yield Daemon(p, conf, sock, log, port)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        p.stdout.close()


def send_oversized(sock: str, fill: bytes = b"x", timeout: float = 20.0) -> bytes:
    """Send one request line longer than control.MAX_REQUEST (1 MiB chunks of ``fill``) and
    return the answer line the daemon writes before it closes the connection."""
    from snatgw.daemon import control as C

    s = connect(sock, timeout=timeout)
    chunk = fill * (1 << 20)
    try:
        for _ in range(C.MAX_REQUEST // len(chunk) + 2):
            s.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        return s.makefile("rb").readline()
    finally:
        s.close()


def connect(sock: str, timeout: float = 10.0) -> socket.socket:
    """A connected client; a full listen backlog (EAGAIN) is retried until ``timeout``, as
    control.request() does."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    end = time.monotonic() + timeout
    while True:
        try:
            s.connect(sock)
            return s
        except BlockingIOError:
            if time.monotonic() > end:
                s.close()
                raise
            time.sleep(0.002)


def wait_for(pred, timeout: float, step: float = 0.05):
    """``pred()``'s first true value within ``timeout`` seconds, else its last."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        time.sleep(step)


# ---------------------------------------------------------------------- malformed requests
#: a valid value for each field of each op (the others of a request stay valid, so the error
#: must be about the one made wrong); adm's commands only zero counters, a flush's filters
#: match nothing: a request taken as valid by mistake changes nothing a test cannot see
VALID = {
    "reload": {"path": None, "text": None},
    "sessions": {"filter": {"inside": "198.18.40.0/24", "proto": 17}, "limit": 10},
    "spill_memos": {"remote": "203.0.113.10"},
    "refusal_marker": {"host": "198.18.40.10", "sport": 40000, "remote": "203.0.113.10", "dport": 80, "proto": 6},
    "session": {"host": "198.18.40.10", "sport": 40000, "remote": "203.0.113.10", "dport": 80, "proto": 6},
    "flush": {"priority": 1, "rule_id": None, "inside": "198.18.40.99", "nat": "198.19.2.71"},
    "adm": {"commands": [["-Z"]], "restore": False},
}
NO_FIELDS = ("status", "health", "rules", "stats", "rate", "zero")
FLOW_OPS = ("refusal_marker", "session")  # all five fields required
FILTER_FIELDS = ("inside", "remote", "nat", "rule_id", "remote_port", "proto", "state")


def _junk(rng, depth: int = 0):
    """Any JSON value."""
    k = rng.randrange(10 if depth < 2 else 7)
    if k == 0:
        return None
    if k == 1:
        return rng.choice([True, False])
    if k == 2:
        return rng.choice([0, 1, -1, 65536, 2**31, 2**64, -(2**70), rng.randint(-10**30, 10**30)])
    if k == 3:
        return rng.choice([0.5, -1.5, 2.7, 1e300, -0.0, rng.uniform(-1e6, 1e6)])
    if k in (4, 5, 6):
        return rng.choice(["", " ", "x", "1", "-1", "1.5", "1.2.3", "999.1.1.1", "198.18.0.0/33", "tcp", "-A",
                           "\0", "é" * 3, "9" * 300, "nan", "Infinity", "/dev/zero", "/nonexistent/x.conf",
                           "[]", "{}", "true", "0x10", "１２"])  # fmt: skip
    if k in (7, 8):
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["a", "op", "inside", "proto", ""]): _junk(rng, depth + 1) for _ in range(rng.randrange(4))}


def _wrong(rng, op: str, field: str):
    """A value of ``field`` that is wrong whatever else: a JSON type it never takes, or a
    string or number it refuses."""
    while True:
        v = _junk(rng)
        if field in ("path", "remote", "host", "inside", "nat"):
            if v is None and not (op in FLOW_OPS and rng.random() < 0.5):
                continue  # null: absent (optional fields)
            if isinstance(v, str) and (field == "path" and v != "" or
                                       field != "path" and v.strip() and v.strip()[0].isdigit() and
                                       v.count(".") == 3 and "/" not in v and len(v) < 16 and v != "999.1.1.1"):
                continue  # a file name (read: refused, but as a reload), or an address
            return v
        if field == "text":
            if v is None or isinstance(v, str):
                continue
            return v
        if field in ("sport", "dport", "proto", "priority", "rule_id", "limit"):
            if v is None and op not in FLOW_OPS:
                continue
            if isinstance(v, int) and not isinstance(v, bool) and not (field == "limit" and v < 0):
                continue
            if isinstance(v, str) and v.isascii() and v.isdigit():
                continue
            return v
        if field == "filter":
            if v is None or isinstance(v, dict) and not v:
                continue
            if isinstance(v, dict):  # a bad field in it
                k = rng.choice(FILTER_FIELDS + ("op", "port"))
                bad = _wrong(rng, "sessions", "limit" if k in ("rule_id", "remote_port", "proto", "state") else "nat")
                return {k: bad if bad is not None else "x"}
            return v
        if field == "commands":
            if isinstance(v, list) and all(isinstance(c, list) and all(isinstance(a, str) for a in c) for c in v):
                v = [[1]] if not v else v + [[rng.choice([1, None, 2.5, ["-A"]])]]
            return v
        if field == "restore":
            if isinstance(v, bool) or v is None:
                continue
            return v
        raise AssertionError(field)


def hostile_request(rng):
    """(request, what its error must name): one field made wrong, or an unknown field, a
    request that is no object, an op that is no string."""
    k = rng.randrange(20)
    if k == 0:
        return rng.choice([[], [{"op": "status"}], "status", 1, None, True, 2.5]), "JSON object"
    if k == 1:
        return {"op": rng.choice([1, None, True, ["status"], {"op": "status"}, 2.5])}, "op"
    if k == 2:
        return {"op": rng.choice(["", "STATUS", "status ", "bogus", "\0", "é"])}, "unknown request op"
    if k == 3:
        op = rng.choice(NO_FIELDS + tuple(VALID))
        return {"op": op, rng.choice(["rule", "filters", "id", "force", "all", "x" * 60]): _junk(rng)}, "unknown field"
    op = rng.choice(tuple(VALID))
    field = rng.choice(tuple(VALID[op]))
    req = {"op": op}
    for f, v in VALID[op].items():
        if v is not None and f != field and not (op == "flush" and f in ("priority", "rule_id")):
            req[f] = v
    if op in FLOW_OPS and rng.random() < 0.2:
        return req, field  # missing
    req[field] = _wrong(rng, op, field)
    return req, field


def fuzz(d, n: int, seed: int) -> None:
    """``n`` malformed requests (daemonproc.hostile_request, seeded): each answered
    {"ok": false} with exit 2 and an error naming what was wrong; nothing changed (rules,
    last_reload, reload and error counts, counters of the datapath); nothing logged as an
    internal error; the daemon up."""
    rng = random.Random(seed)
    before = {op: request(d.sock, {"op": op}) for op in ("rules", "status", "stats")}
    wrong = []
    for _ in range(n):
        req, what = hostile_request(rng)
        resp = request(d.sock, req, timeout=10)
        if resp.get("ok") is not False or resp.get("exit") != 2 or what not in resp.get("error", ""):
            wrong.append((req, what, resp))
    after = {op: request(d.sock, {"op": op}) for op in ("rules", "status", "stats")}
    assert not wrong, f"{len(wrong)} of {n} (seed {seed}), e.g. {str(wrong[:3])[:1500]}"
    assert after["rules"] == before["rules"]
    for k in ("last_reload", "reloads", "last_error", "errors", "rules"):
        assert after["status"][k] == before["status"][k], k
    for k in ("rules", "reasons", "sessions"):  # (the GC's own figures move with time)
        assert after["stats"]["stats"][k] == before["stats"]["stats"][k], k
    log = d.log()
    assert d.alive() and "internal error" not in log and "request_failed" not in log and "Traceback" not in log
