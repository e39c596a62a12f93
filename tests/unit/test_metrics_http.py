"""`metrics_listen`: a real `snatgw run` (fake backend) serves GET /metrics on loopback; urllib
scrapes it and prometheus_client's text parser reads it; a reload that turns the listener off
closes it; other paths, methods and oversized requests are refused; the daemon keeps serving
its control socket while a client sits on the metrics port without sending."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from snatgw.daemon.control import request

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "examples" / "lab.conf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def metrics_daemon(tmpdir, port: int):
    """A fake-backend daemon of the lab config with `metrics_listen 127.0.0.1:PORT`, ready:
    (process, config path, control socket); stopped (SIGTERM) whatever happens."""
    conf = tmpdir / "snatgw.conf"
    conf.write_text(LAB.read_text().replace("backend bpf", f"backend bpf\n    metrics_listen 127.0.0.1:{port}"))
    sock = str(tmpdir / "s" / "ctl.sock")
    p = subprocess.Popen([sys.executable, "-m", "snatgw.cli.main", "run", str(conf), "--backend", "fake", "--socket", sock],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "ready" in p.stdout.readline()
        yield p, conf, sock
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture
def daemon(tmpdir_short):
    port = free_port()
    with metrics_daemon(tmpdir_short, port) as (p, conf, sock):
        yield p, port, conf, sock


def get(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def test_metrics_are_served_over_http_and_parse(daemon):
    """GET /metrics answers 200 in the Prometheus text format; the families parse, with rules
    labelled by rule_id and identity text, and the reload counter."""
    p, port, conf, sock = daemon
    code, ctype, body = get(port)
    assert code == 200 and ctype.startswith("text/plain; version=")
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    assert fams["snatgw_up"].samples[0].value == 1 and "snatgw_sessions" in fams and "snatgw_map_entries" in fams
    rules = {str(r["rule_id"]): f"from {r['from']} to {r['to']} gw {r['gw'] or '-'} oif {r['oif'] or '-'}"
             for r in request(sock, {"op": "rules"})["rules"]}
    for s in fams["snatgw_rule_packets"].samples:
        assert rules[s.labels["rule_id"]] == s.labels["rule"]
    assert {s.labels["result"] for s in fams["snatgw_reloads"].samples} == {"ok", "failed"}


def test_wrong_path_method_and_oversized_request_are_refused(daemon):
    """/ -> 404, POST -> 405, a header beyond 8 KiB -> 431; the daemon still answers after."""
    p, port, conf, sock = daemon
    assert get(port, "/")[0] == 404
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nX-Long: " + b"a" * 9000)
        assert s.recv(100).startswith(b"HTTP/1.0 431")
    assert get(port)[0] == 200


def test_a_silent_client_does_not_block_the_daemon(daemon):
    """A connection that sends nothing: control requests and other scrapes still answer."""
    p, port, conf, sock = daemon
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        assert request(sock, {"op": "status"})["ok"]
        assert get(port)[0] == 200


def test_a_reload_without_metrics_listen_closes_the_port(daemon):
    """Reload to a file without the setting: the port refuses connections."""
    p, port, conf, sock = daemon
    shutil.copy(LAB, conf)
    assert request(sock, {"op": "reload"})["ok"]
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the metrics port is still open after the reload")


@contextlib.contextmanager
def served(monkeypatch, body: bytes):
    """A MetricsServer on its own event loop and worker (loopback, a free port) whose every
    scrape answers ``body``; closed, loop and worker stopped, on the way out."""
    from snatgw.daemon import metrics as M
    from snatgw.daemon.log import Log
    from snatgw.daemon.loop import EventLoop, Worker

    monkeypatch.setattr(M, "scrape", lambda service: body)
    loop = EventLoop(Log(stream=open(os.devnull, "w")))
    worker = Worker(loop)
    server = M.MetricsServer("127.0.0.1", 0, None, loop.log)
    server.attach(loop, worker)
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.stop()
        t.join(5)
        worker.close(5)
        loop.close()


def test_a_client_that_never_reads_its_scrape_is_dropped(monkeypatch):
    """A scraper that sent its GET and read none of a body bigger than the socket buffers was
    never reaped (the reaper skipped clients with output pending): MAX_CLIENTS of them held
    their slots and bodies for good and every later scrape was closed at once."""
    from snatgw.daemon import metrics as M

    monkeypatch.setattr(M, "CLIENT_TIMEOUT", 0.2)
    with served(monkeypatch, b"x" * (16 << 20)) as server:
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect(server.addr)
        c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        end = time.monotonic() + 5
        while time.monotonic() < end and (not server.clients or not any(x.out for x in server.clients.values())):
            time.sleep(0.02)
        assert server.clients, "the scrape was not being sent"
        end = time.monotonic() + 5
        while server.clients and time.monotonic() < end:
            time.sleep(0.05)
        assert not server.clients
        c.close()


def test_silent_connections_do_not_shut_the_scraper_out(monkeypatch):
    """MAX_CLIENTS connections that send nothing (renewed every CLIENT_TIMEOUT) closed every
    scrape at once; now a newcomer at the limit takes the place of the longest silent one."""
    from snatgw.daemon import metrics as M

    silent = []
    with served(monkeypatch, b"snatgw_up 1\n") as server:
        try:
            for _ in range(M.MAX_CLIENTS):
                silent.append(socket.create_connection(server.addr))
            end = time.monotonic() + 5
            while len(server.clients) < M.MAX_CLIENTS and time.monotonic() < end:
                time.sleep(0.01)
            assert len(server.clients) == M.MAX_CLIENTS
            with urllib.request.urlopen(f"http://127.0.0.1:{server.addr[1]}/metrics", timeout=5) as r:
                assert r.status == 200 and r.read() == b"snatgw_up 1\n"
            assert len(server.clients) <= M.MAX_CLIENTS
        finally:
            for c in silent:
                c.close()


def test_a_metrics_port_in_use_is_a_problem_in_status_until_a_reload_gets_it(tmpdir_short):
    """`metrics_listen` on a port another socket holds: the daemon runs without metrics (as
    before), but `status` is unhealthy and says why (before: healthy, the only trace an error
    line in the log, so nothing but a missing scrape told); a reload once the port is free
    listens and the problem goes."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    with contextlib.ExitStack() as stack:
        stack.callback(holder.close)
        _, _, sock = stack.enter_context(metrics_daemon(tmpdir_short, port))

        def said() -> list[str]:  # (the fake backend's devices are missing here: problems too)
            return [x for x in request(sock, {"op": "health"})["problems"] if x.startswith("metrics_listen")]

        assert said() == [f"metrics_listen 127.0.0.1:{port}: configured but not listening: Address already in use "
                          "(a reload tries again)"]
        # a reload while the port is still held says so in its answer (it said "reloaded", no
        # warning, exit 0: only the log and status knew), and `snatgw reload` prints it
        r = request(sock, {"op": "reload"})
        assert r["ok"] and r["warnings"][-1] == (f"metrics_listen 127.0.0.1:{port}: not listening: Address already "
                                                 "in use; the daemon runs on without it, a problem in `snatgw "
                                                 "status` until a reload gets it")
        p = subprocess.run([sys.executable, "-m", "snatgw.cli.main", "reload", "--socket", sock],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and f"snatgw reload: warning: metrics_listen 127.0.0.1:{port}: not listening" in p.stderr
        holder.close()
        r = request(sock, {"op": "reload"})
        assert r["ok"] and not any("metrics_listen" in w for w in r["warnings"])
        end = time.monotonic() + 10
        while said() and time.monotonic() < end:
            time.sleep(0.1)
        assert said() == []
        assert get(port)[0] == 200
