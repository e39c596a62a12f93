"""The daemon's I/O structure (issue 10): one event loop, one worker, one GC thread.  Many simultaneous clients
all get answers (backlog 128, EAGAIN retried by the client), idle clients are closed, request
size is bounded, a long service call does not stop `status` or the accept loop, EMFILE pauses
the listener instead of spinning, a failed SIGHUP reload is reported to systemd as such, an
exception from the backend in a tick or request never kills the daemon, and one daemon owns a
network namespace (abstract owner socket)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from snatgw.config.parse import parse_file
from snatgw.daemon import control as C
from snatgw.daemon.control import ControlServer, request
from snatgw.daemon.log import Log
from snatgw.daemon.owner import NamespaceOwner, current_owner, foreign, lock_path
from snatgw.daemon.service import Service
from snatgw.datapath.fake import FakeBackend
from snatgw.errors import DaemonError

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "examples" / "lab.conf"


class SlowBackend(FakeBackend):
    """A fake whose stats() waits on an event (a long service call) and whose expire() can
    raise anything (a backend's parse crash)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.gate.set()
        self.boom: BaseException | None = None
        self.restored: list[str] = []

    def stats(self):
        self.gate.wait(30)
        return super().stats()

    def expire(self, now=None):
        if self.boom is not None:
            raise self.boom
        return super().expire(now)

    def check_hooks(self):
        out, self.restored = self.restored, []
        return out


@pytest.fixture
def daemon(tmpdir_short):
    conf = tmpdir_short / "snatgw.conf"
    shutil.copy(LAB, conf)
    cfg = parse_file(conf)
    backend = SlowBackend(cfg.settings)
    log = Log(stream=io.StringIO())
    log.lines = []
    service = Service(cfg, backend, log, config_path=str(conf))
    sock = str(tmpdir_short / "ctl.sock")
    server = ControlServer(sock, service.dispatch, inline=service.handle, log=log)  # as the daemon
    service.start()
    server.serve()
    try:
        yield server, service, backend, sock
    finally:
        backend.gate.set()
        server.close()


def test_fifty_simultaneous_stats_are_all_answered(daemon):
    """50 clients at once (the old server: backlog 5, 3 of 10 failed with EAGAIN tracebacks)."""
    server, _, _, sock = daemon
    assert server.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    results: list = []

    def one():
        try:
            results.append(request(sock, {"op": "stats"}, timeout=30)["ok"])
        except Exception as e:  # noqa: BLE001
            results.append(repr(e))

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 50


def test_twelve_cli_stats_processes_all_answer(daemon):
    """The same through `snatgw stats` processes (3 of 10 printed a traceback): every one exits 0."""
    _, _, _, sock = daemon
    procs = [subprocess.Popen([sys.executable, "-m", "snatgw.cli.main", "stats", "--socket", sock, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(12)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 12, [e for _, e in outs if e][:3]
    assert all("Traceback" not in e for _, e in outs)


def test_status_answers_while_a_long_call_holds_the_worker(daemon):
    """A stats call that takes long (a huge table) does not stop `status` or new connections."""
    _, _, backend, sock = daemon
    backend.gate.clear()
    slow: list = []
    t = threading.Thread(target=lambda: slow.append(request(sock, {"op": "stats"}, timeout=30)))
    t.start()
    time.sleep(0.2)
    st = request(sock, {"op": "status"}, timeout=5)
    assert st["ok"] and st["backend"] == "fake"
    backend.gate.set()
    t.join(30)
    assert slow and slow[0]["ok"]


def test_a_full_worker_queue_answers_ebusy_at_once(daemon, monkeypatch):
    server, _, backend, sock = daemon
    monkeypatch.setattr(server.worker, "bound", 2)
    backend.gate.clear()
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(request(sock, {"op": "stats"}, timeout=30)))
               for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    busy = [a for a in answers if a.get("code") == "EBUSY"]
    assert len(busy) >= 2 and "busy" in busy[0]["error"]
    backend.gate.set()
    for t in threads:
        t.join(30)
    assert len(answers) == 6 and all(a["ok"] or a["code"] == "EBUSY" for a in answers)


def test_idle_clients_are_closed(daemon, monkeypatch):
    monkeypatch.setattr(C, "IDLE_TIMEOUT", 0.3)
    server, _, _, sock = daemon
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    s.settimeout(5)
    assert s.recv(10) == b""  # closed by the daemon, not by us
    s.close()
    assert server.counters["timeouts"] >= 1
    assert request(sock, {"op": "status"})["ok"]


def test_an_oversized_request_is_refused_and_memory_stays_bounded(daemon, monkeypatch):
    monkeypatch.setattr(C, "MAX_REQUEST", 1 << 16)
    server, _, _, sock = daemon
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    s.settimeout(5)
    try:
        s.sendall(b"x" * (1 << 17))
    except (BrokenPipeError, ConnectionResetError):
        pass
    resp = json.loads(s.makefile().readline())
    assert not resp["ok"] and "longer than" in resp["error"]
    s.close()
    end = time.monotonic() + 5
    while server.buffered and time.monotonic() < end:  # the loop closes it just after the answer
        time.sleep(0.01)
    assert server.buffered == 0
    assert request(sock, {"op": "status"})["ok"]


def test_a_client_that_pipelines_and_never_reads_holds_one_answer(daemon):
    """`status` (and a bad line) is answered on the loop: a client that sent 3,000 status
    lines in a row and read nothing grew the answers it was owed by ~570 bytes each (18 MB for
    576 KB sent); now its lines wait unread until it reads the answer before them."""
    server, _, _, sock = daemon
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    s.setblocking(False)
    sent = 0
    for _ in range(3000):
        try:
            sent += s.send(b'{"op": "status"}\n')
        except BlockingIOError:
            break
    time.sleep(0.3)
    owed = [len(c.wbuf) for c in server.conns.values()]
    assert owed and max(owed) < 4096, owed
    s.setblocking(True)
    s.settimeout(10)
    f = s.makefile("rb")
    answers = [json.loads(f.readline()) for _ in range(sent // len(b'{"op": "status"}\n'))]
    assert all(a["ok"] for a in answers)
    s.close()


def test_after_an_ebusy_answer_the_connection_serves_its_next_request(daemon, monkeypatch):
    """The EBUSY answer left the connection unread: its next request waited for the idle
    timeout and got no answer."""
    server, _, _, sock = daemon
    monkeypatch.setattr(server.worker, "bound", 0)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    s.settimeout(3)
    f = s.makefile("rb")
    s.sendall(b'{"op": "stats"}\n')
    assert json.loads(f.readline())["code"] == "EBUSY"
    monkeypatch.setattr(server.worker, "bound", 64)
    s.sendall(b'{"op": "stats"}\n')
    assert json.loads(f.readline())["ok"]
    s.close()


def test_the_cli_retries_ebusy_for_a_bounded_time(daemon, monkeypatch):
    """EBUSY means the request was not carried out: the CLI's call retries it with backoff
    (the operator's `snatgw stats` during a flood of listings got "busy" at once), and gives
    up after BUSY_RETRY_FOR seconds, saying how often it tried."""
    from snatgw.daemon import client

    server, _, _, sock = daemon
    monkeypatch.setattr(server.worker, "bound", 0)
    threading.Timer(0.3, lambda: setattr(server.worker, "bound", 64)).start()
    t0 = time.monotonic()
    assert client.call(sock, {"op": "stats"}, timeout=10)["ok"]
    assert 0.25 < time.monotonic() - t0 < 3
    assert server.counters["busy"] >= 2

    monkeypatch.setattr(server.worker, "bound", 0)
    monkeypatch.setattr(client, "BUSY_RETRY_FOR", 1.0)
    t0 = time.monotonic()
    with pytest.raises(client.RemoteError) as e:
        client.call(sock, {"op": "stats"}, timeout=10)
    took = time.monotonic() - t0
    assert e.value.code == "EBUSY" and "busy" in str(e.value) and "times in 1 s" in str(e.value)
    assert 0.5 < took < 2.5, took


def test_emfile_pauses_the_listener_instead_of_spinning(tmpdir_short):
    """At the fd limit accept() fails with EMFILE and the connection stays in the backlog, so
    the socket stays readable: the old loop spun at 100% CPU.  Now the listener rests and the
    daemon's CPU time over a second stays small; once fds are free, clients are served."""
    script = r"""
import os, resource, socket, sys, time, json
sys.path.insert(0, sys.argv[1])
from snatgw.daemon.control import ControlServer
from snatgw.daemon.log import Log
srv = ControlServer(sys.argv[2], lambda r: {"ok": True}, log=Log())
srv.serve()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
hog = []
try:
    while True:
        hog.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
print("full", flush=True)
sys.stdin.readline()
t0 = time.process_time(); time.sleep(1.0); used = time.process_time() - t0
for fd in hog:
    os.close(fd)
print(json.dumps({"cpu": used, "paused": srv.counters["accept_paused"]}), flush=True)
sys.stdin.readline()
"""
    sock = str(tmpdir_short / "c.sock")
    p = subprocess.Popen([sys.executable, "-c", script, str(ROOT / "src"), sock], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "full"
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        waiting.connect(sock)  # queued in the backlog; accept() cannot get an fd for it
        waiting.sendall(b'{"op":"status"}\n')
        p.stdin.write("\n")
        p.stdin.flush()
        got = json.loads(p.stdout.readline())
        assert got["paused"] >= 1 and got["cpu"] < 0.5, got
        waiting.settimeout(10)
        assert json.loads(waiting.makefile().readline())["ok"]  # served once fds were free
        waiting.close()
    finally:
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(10)


def test_a_tick_whose_backend_raises_anything_keeps_the_daemon(daemon):
    """The nft conntrack reader's ValueError (a GRE line) killed the daemon from the GC loop."""
    _, service, backend, sock = daemon
    backend.boom = ValueError("invalid literal for int() with base 10: 'timeout=30,'")
    service.tick()
    service.tick()
    assert service.errors == 2
    assert any("gc_failed" in line and "timeout=30" in line for line in service.log.lines)
    backend.boom = None
    backend.restored = ["snat_inside on lan40 ingress"]
    service.tick()
    assert service.hooks_restored == 1 and any("hooks_restored" in line for line in service.log.lines)
    assert request(sock, {"op": "status"})["hooks_restored"] == 1


def test_a_request_whose_backend_raises_anything_is_answered(daemon, monkeypatch):
    _, _, backend, sock = daemon
    monkeypatch.setattr(backend, "sessions", lambda: (_ for _ in ()).throw(RuntimeError("parse crash")))
    resp = request(sock, {"op": "sessions"})
    assert not resp["ok"] and "parse crash" in resp["error"]
    assert request(sock, {"op": "status"})["ok"]


def test_a_reload_whose_backend_raises_anything_keeps_the_old_config(daemon, monkeypatch):
    _, service, backend, sock = daemon

    def bad_apply(cfg):
        raise KeyError("boom")

    monkeypatch.setattr(backend, "apply", bad_apply)
    before = service.config
    resp = request(sock, {"op": "reload"})
    assert not resp["ok"] and "boom" in resp["error"]
    assert service.config is before and service.last_reload["ok"] is False


# ---------------------------------------------------------------- one owner per namespace


def test_a_second_owner_is_refused_with_the_first_ones_pid_and_socket():
    name = f"snatgw-test-owner-{os.getpid()}"
    first = NamespaceOwner({"socket": "/run/x.sock", "backend": "bpf"}, name=name)
    from snatgw.daemon.loop import EventLoop

    loop = EventLoop()
    first.attach(loop)
    done = threading.Event()  # the first owner answers until the checks are over (at most 5 s)

    def serve():
        for _ in range(100):
            if done.is_set():
                return
            loop.run_once(0.05)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(DaemonError) as ei:
            NamespaceOwner({}, name=name)
        msg = str(ei.value)
        assert f"pid {os.getpid()}" in msg and "/run/x.sock" in msg and "one daemon per namespace" in msg
        assert current_owner(name)["backend"] == "bpf"
    finally:
        done.set()
        t.join()
        first.close()
        loop.close()
    assert current_owner(name) is None  # released with the socket: nothing stale
    assert not os.path.exists(first.lock_path)  # and its lock file removed
    NamespaceOwner({}, name=name).close()


def test_the_owner_name_is_released_when_the_process_is_killed():
    """kill -9 of the holder frees the name at once: no stale lock to remove by hand."""
    name = f"snatgw-test-owner-k{os.getpid()}"
    p = subprocess.Popen([sys.executable, "-c",
                          "import sys,time; sys.path.insert(0, sys.argv[1]);"
                          "from snatgw.daemon.owner import NamespaceOwner as N; o = N({}, name=sys.argv[2]);"
                          "print('ok', flush=True); time.sleep(60)", str(ROOT / "src"), name],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ok"
        # the holder runs no loop, so it never answers: the pid is the socket's peer credential,
        # and waiting the default 2 s for an answer that cannot come proves nothing more
        assert current_owner(name, timeout=0.2)["pid"] == p.pid
    finally:
        p.kill()
        p.wait()
    assert current_owner(name) is None
    os.unlink(lock_path(name))  # what kill -9 leaves: taken again by the next start, here removed


# ---------------------------------------------------------------- sd_notify


def _spawn(conf, sock, notify, *extra):
    env = dict(os.environ, NOTIFY_SOCKET=notify)
    return subprocess.Popen([sys.executable, "-m", "snatgw.cli.main", "run", str(conf), "--backend", "fake",
                             "--socket", sock, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _fields(dgram: bytes) -> dict:
    return dict(line.split("=", 1) for line in dgram.decode().split("\n") if line)


@pytest.mark.parametrize("bad", ["", "snatgw {\n max_sessions ²\n}\n", None])
def test_a_failed_sighup_reload_is_reported_to_systemd(tmpdir_short, bad, capsys):
    """RELOADING=1 (with MONOTONIC_USEC), then READY=1 with STATUS=reload failed: ... (sd_notify(3)),
    the daemon alive on its old rules; a good reload then says READY=1 with a running STATUS.
    Cases: an empty file, superscript digits, /dev/zero.  `snatgw status` (json and text) shows
    how each reload came and went, as the signal has no answer: the start, the signal's refusal
    with its error, the signal's good reload with its warning (an oif typo), a control socket
    reload; on main the record had no how and no warnings, which reached only the log."""
    from snatgw.cli.main import main

    conf = tmpdir_short / "snatgw.conf"
    shutil.copy(LAB, conf)
    note = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    note.bind(str(tmpdir_short / "notify"))
    note.settimeout(10)
    sock = str(tmpdir_short / "ctl.sock")
    p = _spawn(conf, sock, str(tmpdir_short / "notify"))

    def status() -> tuple[dict, str]:
        main(["status", "--socket", sock, "-j"])  # (exit 1: the lab's devices are not here)
        d = json.loads(capsys.readouterr().out)["last_reload"]
        main(["status", "--socket", sock])
        return d, capsys.readouterr().out

    try:
        assert _fields(note.recv(1000))["READY"] == "1"
        lr, out = status()
        assert (lr["via"], lr["ok"], lr["rules"], lr["warnings"], lr["config"]) == ("start", True, 3, [], str(conf))
        assert f"  last reload none: started at " in out and f"with {conf}: applied, 3 rules, no warnings" in out
        if bad is None:
            conf.unlink()
            conf.symlink_to("/dev/zero")
        else:
            conf.write_text(bad, encoding="utf-8")
        p.send_signal(signal.SIGHUP)
        first = _fields(note.recv(1000))
        assert first["RELOADING"] == "1" and int(first["MONOTONIC_USEC"]) > 0
        done = _fields(note.recv(1000))
        assert done["READY"] == "1" and done["STATUS"].startswith("reload failed: ")
        assert "previous config (3 rules)" in done["STATUS"]
        st = request(sock, {"op": "status"})
        assert st["rules"] == 3 and st["last_reload"]["ok"] is False
        lr, out = status()
        assert (lr["via"], lr["ok"], lr["rules"], lr["warnings"]) == ("signal", False, 3, [])
        assert lr["error"] and lr["error"] in done["STATUS"]
        assert f"  last reload by signal (SIGHUP, systemctl reload) at " in out
        assert f": REFUSED: {lr['error']} (the previous config runs, 3 rules)" in out
        conf.unlink()
        conf.write_text(LAB.read_text().replace("oif eth2", "oif eht2"))  # applied, with check's warning
        p.send_signal(signal.SIGHUP)
        assert _fields(note.recv(1000))["RELOADING"] == "1"
        ok = _fields(note.recv(1000))
        assert ok["READY"] == "1" and ok["STATUS"].startswith("running: 3 rules")
        lr, out = status()
        (w,) = lr["warnings"]
        assert (lr["via"], lr["ok"], lr["error"], lr["warnings_total"]) == ("signal", True, None, 1)
        assert w.startswith(f"{conf}:16: oif: eht2 is not among the outside interfaces"), w
        assert ": applied, 3 rules, 1 warning\n" in out and f"             warning: {w}\n" in out
        assert request(sock, {"op": "reload"})["ok"]
        lr, out = status()
        assert (lr["via"], lr["ok"], lr["warnings"]) == ("control", True, [w])
        assert f"  last reload by control socket (snatgw reload) at " in out
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
        assert "Traceback" not in p.stderr.read()
    finally:
        note.close()
        if p.poll() is None:
            p.kill()
            p.wait()


def test_reload_of_a_secret_file_echoes_nothing_of_it(tmpdir_short):
    conf = tmpdir_short / "snatgw.conf"
    shutil.copy(LAB, conf)
    secret = tmpdir_short / "shadow"
    secret.write_text("root:$y$j9T$SecretHashMaterial/0123456789:19700:0:99999:7:::\n")
    sock = str(tmpdir_short / "ctl.sock")
    p = _spawn(conf, sock, str(tmpdir_short / "nobody"))
    try:
        assert "ready" in p.stdout.readline()
        resp = request(sock, {"op": "reload", "path": str(secret)})
        assert not resp["ok"] and "SecretHash" not in resp["error"] and "shadow:1" in resp["error"]
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)
        assert "SecretHash" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_run_refuses_a_config_without_rules(tmpdir_short):
    conf = tmpdir_short / "empty.conf"
    conf.write_text("snatgw {\n inside lan40\n}\n")
    p = _spawn(conf, str(tmpdir_short / "ctl.sock"), str(tmpdir_short / "nobody"))
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "ready" not in out and "allow_empty yes" in err
    conf.write_text("snatgw {\n allow_empty yes\n}\n")
    p = _spawn(conf, str(tmpdir_short / "ctl.sock"), str(tmpdir_short / "nobody"))
    try:
        assert "rules=0" in p.stdout.readline()
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)


class SweepingBackend(FakeBackend):
    """A fake whose expire() (the tick's sweep) runs until the test lets it end."""

    expire_unlocked = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sweeping, self.let_go = threading.Event(), threading.Event()

    def expire(self, now=None):
        self.sweeping.set()
        self.let_go.wait(30)
        return super().expire(now)


def test_a_long_sweep_does_not_hold_a_stats_request(tmpdir_short):
    """Issue 14: the tick runs on its own thread (daemon/main.py); a sweep of a million
    sessions (seconds, and at every tick while the table is nearly full) once held every
    control request queued behind it on the one worker."""
    from snatgw.daemon.loop import EventLoop, Worker
    from snatgw.daemon.main import Daemon

    conf = tmpdir_short / "snatgw.conf"
    shutil.copy(LAB, conf)
    cfg = parse_file(conf)
    backend = SweepingBackend(cfg.settings)
    log = Log(stream=io.StringIO())
    service = Service(cfg, backend, log, config_path=str(conf))
    sock = str(tmpdir_short / "ctl.sock")
    server = ControlServer(sock, service.handle, log=log)
    service.start()
    loop = EventLoop(log)
    worker, gc = Worker(loop, log), Worker(loop, log, name="snatgw-gc")
    server.attach(loop, worker)
    daemon = Daemon(service, server, log, loop, worker, None, gc)
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    try:
        loop.call_soon_threadsafe(daemon.on_tick)
        assert backend.sweeping.wait(10)
        answer = request(sock, {"op": "stats"}, timeout=10)
        assert answer["ok"] and not backend.let_go.is_set()  # answered while the sweep runs
        assert daemon.tick_running
    finally:
        backend.let_go.set()
        loop.stop()
        runner.join(5)
        gc.close(5)
        worker.close(5)
        server.close()
        loop.close()


def test_an_owner_name_squatted_by_another_user_does_not_stop_the_start():
    """Any local user can bind the abstract owner name first.  That stopped every start (first
    with 'another snatgw daemon owns the datapath', then naming the other user's process): a
    denial of service by an unprivileged user.  Now the owner lock decides: the start goes on,
    the squatter is reported, a second daemon is still refused (named from the lock file), and
    purge, asked while only the squatter holds the name, does not take it for a daemon."""
    name = f"snatgw-test-squat-{os.getpid()}"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the squatter: an unprivileged user binding the name
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(b"\0" + name.encode())
            s.listen(4)
            os.write(w, b"x")
            for _ in range(8):
                c, _ = s.accept()
                c.send(b'{"socket": "/run/snatgw/control.sock", "backend": "bpf"}\n')
                c.close()
            time.sleep(5)
        finally:
            os._exit(0)
    first = None
    try:
        os.close(w)
        assert os.read(r, 1) == b"x"
        assert foreign(current_owner(name))  # no lock: only the name, another user's
        first = NamespaceOwner({"socket": "/run/x.sock", "backend": "bpf"}, name=name)
        assert first.squatter["pid"] == pid and first.squatter["uid"] == 65534
        assert current_owner(name) == {"pid": os.getpid(), "socket": "/run/x.sock", "backend": "bpf"}
        with pytest.raises(DaemonError) as ei:
            NamespaceOwner({}, name=name)
        msg = str(ei.value)
        assert f"pid {os.getpid()}" in msg and "/run/x.sock" in msg and "one daemon per namespace" in msg
    finally:
        if first is not None:
            first.close()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
    assert current_owner(name) is None


def test_the_owner_lock_directory_must_be_writable_by_nobody_else(tmp_path):
    """Others able to write the lock directory could hold the lock first and stop every start:
    refused, naming the directory, its owner and mode."""
    d = tmp_path / "owner"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o777)
    with pytest.raises(DaemonError) as ei:
        NamespaceOwner({}, name=f"snatgw-test-lockdir-{os.getpid()}", lock_dir=str(d))
    assert str(d) in str(ei.value) and "0777" in str(ei.value) and "writable by nobody else" in str(ei.value)
    os.chmod(d, 0o700)
    NamespaceOwner({}, name=f"snatgw-test-lockdir-{os.getpid()}", lock_dir=str(d)).close()


def test_purge_removes_an_owner_lock_nobody_holds_and_never_a_held_one(tmp_path):
    """A daemon killed with SIGKILL cannot remove its lock file: one file per namespace stayed in
    /run/snatgw/owner for good (the lab's kill -9 tests left one a suite run).  purge's
    remove_stale_lock removes it when nobody holds it; a held one (a daemon owns the namespace)
    and the file a new owner made after it stay."""
    from snatgw.daemon.owner import remove_stale_lock

    d = tmp_path / "owner"
    d.mkdir(mode=0o700)
    name = f"snatgw-test-stale-{os.getpid()}"
    path = lock_path(name, str(d))
    first = NamespaceOwner({}, name=name, lock_dir=str(d))
    assert remove_stale_lock(name, str(d)) is None and os.path.exists(path)  # held
    os.close(first.lock_fd)  # as a SIGKILL leaves it: the lock goes, the file stays
    first.lock_fd = -1
    first.close()
    assert os.path.exists(path)
    assert remove_stale_lock(name, str(d)) == path and not os.path.exists(path)
    assert remove_stale_lock(name, str(d)) is None  # nothing left to remove
    second = NamespaceOwner({}, name=name, lock_dir=str(d))  # a start afterwards is unaffected
    try:
        assert current_owner(name, lock_dir=str(d))["pid"] == os.getpid()
    finally:
        second.close()
    assert not os.path.exists(path)


def test_a_sigterm_after_a_burst_of_sighups_is_not_lost():
    """Signals reached the loop only as bytes on the wake-up socket, which holds a few hundred
    one-byte writes: after a burst of SIGHUPs the SIGTERM's byte was dropped and the daemon
    kept running (676,000 SIGHUPs then SIGTERM: alive 5 s later).  2,000 SIGUSR1 sent while the
    loop does not turn, then one SIGUSR2: both handlers run (SIGUSR1 once for the burst)."""
    from snatgw.daemon.loop import EventLoop

    loop = EventLoop(Log(stream=io.StringIO()))
    seen: list[int] = []
    loop.add_signal_handler(signal.SIGUSR1, seen.append)
    loop.add_signal_handler(signal.SIGUSR2, seen.append)
    try:
        for _ in range(2000):
            os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)
        for _ in range(5):
            loop.run_once(0.01)
        assert signal.SIGUSR2 in seen and signal.SIGUSR1 in seen
        assert len(seen) < 100
    finally:
        loop.close()


@pytest.mark.parametrize("depth", [1500, 40000])
def test_deeply_nested_json_is_answered_as_a_bad_request(daemon, depth):
    """1,500 '[' (3 KB, parsed on the loop) raised RecursionError, not ValueError: no answer, a
    loop_error logged (an error the SnatgwErrors alert counts); 40,000 (parsed on the worker)
    got 'internal error'.  Both are bad requests now, and the connection serves the next."""
    server, _, _, sock = daemon
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    s.settimeout(5)
    f = s.makefile("rb")
    s.sendall(b"[" * depth + b"]" * depth + b"\n")
    resp = json.loads(f.readline())
    assert not resp["ok"] and resp["error"].startswith("bad request: not JSON") and resp["exit"] == 2
    s.sendall(b'{"op": "status"}\n')
    assert json.loads(f.readline())["ok"]
    assert server.loop.errors == 0
    s.close()


def test_requests_asking_for_unbounded_work_or_huge_numbers_are_bad_requests(daemon):
    """100,000 words in one adm command held the worker 43 s (getopt is quadratic) and every
    request queued behind it; a limit or rule number of 1e400 (JSON Infinity) was an internal
    error logged as such.  Each is a bad request (exit 2), answered at once."""
    _, service, _, sock = daemon
    for req, what in [({"op": "adm", "commands": [["-K"] * 100_000]}, "at most 64"),
                      ({"op": "adm", "commands": [["-Z"]] * 70_000}, "at most 65536"),
                      ({"op": "adm", "commands": [[1, 2]]}, "must be strings"),
                      ({"op": "sessions", "limit": float("inf")}, "bad request"),
                      ({"op": "sessions", "filter": {"proto": float("inf")}}, "bad request"),
                      ({"op": "flush", "priority": float("inf")}, "bad request"),
                      ({"op": "flush", "rule_id": float("-inf")}, "bad request")]:
        resp = request(sock, req, timeout=5)
        assert not resp["ok"] and resp["exit"] == 2 and what in resp["error"], (req.get("op"), resp)
    assert not [line for line in service.log.lines if "request_failed" in line]


def test_a_pin_directory_is_held_by_one_daemon_whatever_its_namespace(tmp_path):
    """The owner name is per network namespace, the pin directory per bpffs mount: a daemon of
    another namespace (nsenter --net, one /sys/fs/bpf) given the same pin_dir adopted the first
    one's maps (the lab: both gateways' programs on map 686454, gateway 1 translating with
    gateway 2's pool while listing its own).  The second now fails, naming the holder's pid."""
    from snatgw.daemon.owner import PinDirLock

    pins = tmp_path / "pins"
    pins.mkdir()
    first = PinDirLock(str(pins))
    try:
        with pytest.raises(DaemonError) as ei:
            PinDirLock(str(pins))
        assert f"in use by another snatgw daemon (pid {os.getpid()})" in str(ei.value)
        assert "its own pin_dir" in str(ei.value)
    finally:
        first.close()
    PinDirLock(str(pins)).close()  # released with its holder


def test_a_pin_directory_the_daemon_made_goes_with_it_when_nothing_was_pinned(tmp_path):
    """A start that fails before pinning anything (a device typo) left the empty pin directory
    it had made (/sys/fs/bpf/snatgw-...).  A directory it made goes at release when empty; one
    that holds pins (the datapath kept for the next daemon) or that it found stays."""
    from snatgw.daemon.owner import PinDirLock

    made, kept, found = tmp_path / "made", tmp_path / "kept", tmp_path / "found"
    for d in (made, kept, found):
        d.mkdir()
    (kept / "snat_ct").write_text("")
    PinDirLock(str(made), made=True).close()
    PinDirLock(str(kept), made=True).close()
    PinDirLock(str(found)).close()
    assert not made.exists() and (kept / "snat_ct").exists() and found.is_dir()


#: a `snatgw run` whose start is signalled at STEP (argv[1]) by SIGNALS (argv[2], comma-separated):
#: the process sends them to itself as that step begins, a deterministic stand-in for a
#: `systemctl stop` that lands there
_SIGNALLED_START = """
import os, signal, sys
step, sigs = sys.argv.pop(1), [getattr(signal, s) for s in sys.argv.pop(1).split(",")]
def kill():
    for s in sigs:
        os.kill(os.getpid(), s)
if step == "imports":  # the daemon's imports, after the CLI took the signals
    class Hook:
        def find_spec(self, name, path=None, target=None):
            if name == "snatgw.daemon.service":
                kill()
    sys.meta_path.insert(0, Hook())
else:
    from snatgw.daemon import main as m, service
    where = {"config": (m, "load_config"), "backend": (m, "make_backend"), "socket": (m, "ControlServer"),
             "datapath": (service.Service, "start")}[step]
    real = getattr(*where)
    def signalled(*a, **kw):
        kill()
        return real(*a, **kw)
    setattr(*where, signalled)
from snatgw.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("step,sigs", [
    ("imports", "SIGTERM"), ("imports", "SIGINT"), ("config", "SIGHUP,SIGTERM"), ("backend", "SIGTERM"),
    ("socket", "SIGINT"), ("datapath", "SIGHUP,SIGTERM"),
])
def test_a_stop_signal_at_any_step_of_the_start_is_logged_and_stops_cleanly(tmpdir_short, step, sigs):
    """Signals kept their default action until the loop took them, after the config, the owner
    lock, the backend and the control socket (~0.3 s): a SIGTERM then (systemctl stop while
    activating) killed the daemon, exit 143, nothing logged (a SIGINT: a traceback).  Now
    `snatgw run` takes them before its imports: before the datapath the daemon stops at the
    next step, having touched nothing of it (`stopped datapath="not started"`); during the
    datapath's start it waits for that to end and stops as at any stop (kept), without saying
    ready.  Either way exit 0, `stopping ... during=start` naming the signal, the socket gone; a
    SIGHUP among them does not kill it."""
    conf = tmpdir_short / "snatgw.conf"
    shutil.copy(LAB, conf)
    sock = tmpdir_short / "ctl.sock"
    p = subprocess.run([sys.executable, "-c", _SIGNALLED_START, step, sigs, "run", str(conf), "--backend", "fake",
                        "--socket", str(sock)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (p.returncode, p.stderr[-800:])
    stop = sigs.split(",")[-1]
    assert f"event=stopping reason=signal signal={stop} during=start" in p.stderr, p.stderr
    assert "ready" not in p.stdout and "Traceback" not in p.stderr and not sock.exists()
    if step == "datapath":
        assert "event=started" in p.stderr and "event=stopped backend=fake keep_state=True" in p.stderr
    else:
        assert "event=started" not in p.stderr and 'event=stopped backend=fake datapath="not started"' in p.stderr


def test_a_listening_socket_that_does_not_answer_yet_is_not_taken_over(tmpdir_short):
    """A daemon binds its control socket before its datapath starts and answers only after:
    a second daemon (another namespace, the same socket path) that got no status within 2 s
    took the socket for stale, unlinked it and bound its own, so the first one's clients
    talked to the second.  Only a socket nothing listens on is replaced."""
    path = str(tmpdir_short / "ctl.sock")
    starting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    starting.bind(path)
    starting.listen(4)  # never accepts: a daemon whose loop does not run yet
    ino = os.stat(path).st_ino
    try:
        with pytest.raises(DaemonError, match="something listens on it"):
            ControlServer(path, lambda r: {"ok": True})
        assert os.stat(path).st_ino == ino  # still the first one's socket
    finally:
        starting.close()
    server = ControlServer(path, lambda r: {"ok": True})  # closed: stale, replaced
    server.sock.close()


@pytest.mark.parametrize("mode,uid,why", [
    (0o777, 0, "writable by its group and others without the sticky bit"),
    (0o770, 0, "writable by its group without the sticky bit"),
    pytest.param(0o755, 65534, "is owned by ", marks=pytest.mark.root),  # chown: root
])
def test_a_socket_directory_another_user_could_write_is_refused(tmpdir_short, mode, uid, why):
    """Another user who may write the socket's directory (or owns it) could unlink the socket
    and bind theirs: the daemon refuses to start there, naming the directory, its owner and
    mode, and creates nothing; /tmp-like 1777 and a root-owned 0755 are fine."""
    d = tmpdir_short / "run"
    d.mkdir()
    os.chmod(d, mode)
    if uid:
        os.chown(d, uid, -1)
    with pytest.raises(DaemonError) as ei:
        ControlServer(str(d / "ctl.sock"), lambda r: {"ok": True})
    msg = str(ei.value)
    assert why in msg and str(d) in msg and f"mode {mode:04o}" in msg and "another user could replace" in msg
    assert os.listdir(d) == []
    os.chown(d, os.geteuid(), -1)
    for ok in (0o1777, 0o755):
        os.chmod(d, ok)
        server = ControlServer(str(d / "ctl.sock"), lambda r: {"ok": True})
        server.sock.close()
        os.unlink(d / "ctl.sock")


class _Row:
    def __init__(self, i):
        self.i = i

    def as_dict(self):
        return {"i": self.i}


def test_a_large_sessions_listing_lets_other_requests_through(tmpdir_short, monkeypatch):
    """A `sessions` listing is built SESSIONS_CHUNK sessions per worker job, the service lock
    held only for a piece: a `rules` request that arrives in the middle is answered before the
    listing ends (it waited for the whole listing: up to 100,000 session dicts under the lock),
    and the listing's answer is whole and in order."""
    from snatgw.daemon import service as S

    monkeypatch.setattr(S, "SESSIONS_CHUNK", 50)
    events: list = []
    cfg = parse_file(LAB)
    backend = FakeBackend(cfg.settings)
    service = Service(cfg, backend, Log(stream=io.StringIO()))
    sock = str(tmpdir_short / "ctl.sock")
    server = ControlServer(sock, lambda r: (events.append(r.get("op")), service.dispatch(r))[1],
                           inline=service.handle)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held: list = []

    def iter_sessions(flt, limit=None):
        for i in range(180):
            held.append(service.lock._is_owned())
            if i == 60:  # in the listing's second piece: another client asks for the rules
                other.connect(sock)
                other.sendall(b'{"op": "rules"}\n')
                for _ in range(1000):  # until the loop has queued it (bounded)
                    if server.worker.pending():
                        break
                    threading.Event().wait(0.01)
            events.append("s")
            yield _Row(i)

    backend.iter_sessions = iter_sessions
    service.start()
    server.serve()
    try:
        r = request(sock, {"op": "sessions", "limit": 150}, timeout=30)
        other.settimeout(30)
        assert json.loads(other.makefile().readline())["ok"] is True
    finally:
        other.close()
        server.close()
    assert [x["i"] for x in r["sessions"]] == list(range(150)) and r["truncated"] is True
    assert events.index("rules") < len(events) - 1 - events[::-1].index("s"), "rules waited for the listing"
    assert events.count("s") == 151 and all(held)
