"""The control plane against hostile input, on a real `snatgw run` process (fake backend;
tests/daemonproc.py): "no control-plane input may crash the daemon or grow it without limit",
"bad input gets a clear, specific error and changes nothing" (docs/operations.md "Bounds of
the control plane").  A SIGHUP storm while a client polls; clients that connect and say
nothing, stall half-way, pipeline, send a line of many MB, or never read a 100,000-session
answer; the metrics listener under slow, huge, many and wrong requests; malformed requests of
every op.  Each test bounded in count and time; the heavier sizes are in
tests/attack/test_control_flood.py (ATTACK_SCALE)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest

from daemonproc import (LAB, MIB, SEVENTY, SIXTY, Poller, connect, fds, fuzz, hup_storm, rules_text, running,
                        send_oversized, settled_on, wait_for, write)
from snatgw.daemon import control as C
from snatgw.daemon import metrics as M
from snatgw.daemon.control import request


def test_a_sighup_storm_while_a_client_polls_status(tmpdir_short):
    """300 SIGHUPs in ~1.5 s, the file switching between 3 rules, 4 rules and a broken one
    (refused) every 50, a client asking `status` all along: every status answered, the daemon
    up, the reloads coalesced (each signal during a reload asks one more, not one each), the
    last file's 5 rules applied and its last_reload record saying so (via signal, ok, no
    error, that file); a second storm grows the RSS by less than 1 MiB (the first by < 16: on
    main the fake backend kept every config applied, 6.8 KB a reload, 1.4 MB for the
    second storm's ~200)."""
    texts = [rules_text(), rules_text(SIXTY), rules_text(SIXTY) + "snat_rule {\n"]
    with running(tmpdir_short) as d, Poller(d.sock) as poll:
        rss0 = d.rss()
        took = hup_storm(d, 300, texts)
        write(d.conf, rules_text(SIXTY, SEVENTY))
        since = time.time()
        os.kill(d.pid, signal.SIGHUP)
        st = settled_on(d, 5, since)
        rss1 = d.rss()
        hup_storm(d, 300, texts)
        write(d.conf, rules_text(SIXTY, SEVENTY))
        since2 = time.time()
        os.kill(d.pid, signal.SIGHUP)
        st2 = settled_on(d, 5, since2)
        rss2 = d.rss()
        time.sleep(0.3)  # nothing more queued behind: the record stays
        again = request(d.sock, {"op": "status"})
        rules = request(d.sock, {"op": "rules"})["rules"]
        alive = d.alive()
    assert took < 4, f"the storm took {took:.1f} s"
    assert alive and not poll.failures, poll.failures[:3]
    assert len(poll.answers) > 50 and all(a["ok"] and a["pid"] == d.pid for a in poll.answers)
    assert st is not None and st2 is not None, "the last file was not applied"
    lr = again["last_reload"]
    assert (lr["ok"], lr["error"], lr["via"], lr["config"], lr["rules"], lr["warnings"]) == \
        (True, None, "signal", str(d.conf), 5, [])
    assert lr == st2["last_reload"] and again["rules"] == 5 and again["last_error"] is None
    assert [r["from"] for r in rules][:2] == ["198.18.40.0/24", "198.18.40.0/24"] and len(rules) == 5
    assert again["reloads"] < 602  # coalesced: a burst during a reload asks one more
    assert rss1 - rss0 < 16 * MIB and rss2 - rss1 < 1 * MIB, (rss0, rss1, rss2)
    assert "Traceback" not in d.log()


def test_clients_that_connect_and_say_nothing_or_half_hold_nobody_off(tmpdir_short):
    """MAX_CLIENTS + 50 clients that connect and send nothing, and 50 that send half a
    request and stall: a new client is answered at once (on main it waited IDLE_TIMEOUT, 10 s,
    for the silent ones to be closed: accepting paused at MAX_CLIENTS), the daemon holds at most
    MAX_CLIENTS of them (its fds say so) and its RSS grows by less than 16 MiB."""
    with running(tmpdir_short) as d:
        rss0, fd0 = d.rss(), fds(d.pid)
        held = []
        try:
            for i in range(C.MAX_CLIENTS + 100):  # (+ the backlog's 128 would block a connect)
                s = connect(d.sock, timeout=5)  # (the backlog full: retried, as request() does)
                held.append(s)
                if i >= C.MAX_CLIENTS + 50:
                    s.sendall(b'{"op": "sta')
            time.sleep(0.5)
            t0 = time.monotonic()
            answers = [request(d.sock, {"op": op}, timeout=20) for op in ("rules", "stats", "status") * 3]
            took = time.monotonic() - t0
            open_fds = fds(d.pid)
            rss = d.rss()
        finally:
            for s in held:
                s.close()
        alive = d.alive()
    assert all(a["ok"] for a in answers) and took < 3, f"9 requests took {took:.1f} s"
    assert open_fds - fd0 <= C.MAX_CLIENTS + 1, (fd0, open_fds)
    assert rss - rss0 < 16 * MIB, (rss0, rss)
    assert alive


def test_pipelining_clients_get_every_answer_in_order(tmpdir_short):
    """20 clients each send 150 requests in one write (status, rules, a line that is not
    JSON, an unknown op, stats), then read: 3,000 answers, each to its own request, in
    order."""
    lines = [b'{"op": "status"}', b'{"op": "rules"}', b"{not json", b'{"op": "bogus"}', b'{"op": "stats"}']
    batch = b"\n".join(lines * 30) + b"\n"
    results: list = []

    def client():
        s = connect(sock, timeout=20)
        try:
            s.sendall(batch)
            f = s.makefile("rb")
            results.append([json.loads(f.readline()) for _ in range(150)])
        except Exception as e:  # noqa: BLE001
            results.append(repr(e))
        finally:
            s.close()

    with running(tmpdir_short) as d:
        sock = d.sock
        threads = [threading.Thread(target=client) for _ in range(20)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(25)
        took = time.monotonic() - t0
        alive = d.alive()
    assert alive and len(results) == 20 and took < 20, (len(results), took)
    for r in results:
        assert isinstance(r, list), r
        for i, a in enumerate(r):
            kind = i % 5
            if kind == 0:
                assert a["ok"] and "pid" in a
            elif kind == 1:
                assert a["ok"] and len(a["rules"]) == 3
            elif kind == 2:
                assert not a["ok"] and a["error"].startswith("bad request: not JSON")
            elif kind == 3:
                assert not a["ok"] and a["error"].startswith("unknown request op 'bogus'")
            else:
                assert a["ok"] and "stats" in a


def test_a_request_line_of_many_megabytes_is_refused_and_given_back(tmpdir_short):
    """A line just over MAX_REQUEST (64 MiB) is refused as too long and the connection closed;
    a 20 MiB line of junk is a bad request; a client asking `status` meanwhile is answered;
    after both the RSS is within 24 MiB of where it was (the buffers went back)."""
    with running(tmpdir_short) as d:
        rss0 = d.rss()
        with Poller(d.sock) as poll:
            too_long = json.loads(send_oversized(d.sock))
            junk = connect(d.sock, timeout=20)
            junk.sendall(b"[" + b"1," * (10 << 20) + b"\n")
            not_json = json.loads(junk.makefile("rb").readline())
            junk.sendall(b'{"op": "rules"}\n')
            after = json.loads(junk.makefile("rb").readline())
            junk.close()
        rss = wait_for(lambda: d.rss() < rss0 + 24 * MIB and d.rss(), 5)
        alive = d.alive()
    assert not too_long["ok"] and too_long["error"] == f"bad request: longer than {C.MAX_REQUEST} bytes"
    assert not not_json["ok"] and not_json["error"].startswith("bad request: not JSON") and after["ok"]
    assert not poll.failures and poll.answers and poll.slowest < 5, (poll.failures[:2], poll.slowest)
    assert rss, f"RSS {d.rss()} KiB, {rss0} before"
    assert alive


def test_clients_that_never_read_a_large_listing_are_bounded(tmpdir_short):
    """12 clients ask for a 100,000-session listing (~20 MB of JSON each) and read nothing:
    at most MAX_LISTINGS such answers are built or held at once, the others are answered EBUSY
    at once; the peak RSS stays within 400 MiB of the start (on main: 1.3 GB for 20 of them,
    each answer built and held until the idle timeout); `rules` from another client answers
    within 3 s all along; once they leave, a reader gets the whole listing."""
    with running(tmpdir_short, sessions=100_000) as d:
        rss0 = d.rss()
        hogs = [connect(d.sock, timeout=20) for _ in range(12)]
        peak, slowest = rss0, 0.0
        try:
            for s in hogs:
                s.sendall(b'{"op": "sessions"}\n')
            end = time.monotonic() + 6
            while time.monotonic() < end:
                t0 = time.monotonic()
                assert request(d.sock, {"op": "rules"}, timeout=10)["ok"]
                slowest = max(slowest, time.monotonic() - t0)
                peak = max(peak, d.rss())
                time.sleep(0.1)
            busy = 0
            for s in hogs:  # the EBUSY answers are short: already there to read
                s.setblocking(False)
                try:
                    head = s.recv(300)
                except BlockingIOError:
                    continue
                busy += head.startswith(b'{"ok": false') and b"EBUSY" in head
        finally:
            for s in hogs:
                s.close()
        whole = request(d.sock, {"op": "sessions"}, timeout=30)
        alive = d.alive()
    assert busy >= 12 - C.MAX_LISTINGS, busy
    assert peak - rss0 < 400 * MIB, f"peak RSS {peak // MIB} MiB, {rss0 // MIB} MiB before"
    assert slowest < 3, slowest
    assert whole["ok"] and len(whole["sessions"]) == 100_000 and whole["truncated"] is False
    assert alive


def closed_by_peer(s: socket.socket) -> bool:
    if s.fileno() < 0:
        return True
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def http(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    return out
                out += b
        except ConnectionResetError:
            return out


def test_the_metrics_listener_under_slow_huge_many_and_wrong_requests(tmpdir_short):
    """While 40 connections sit silent, 5 send a header a byte at a time and one streams 4 MiB
    of header: wrong methods get 405, wrong paths 404, junk 405, a header over 8 KiB 431,
    and GET /metrics 200 within 2 s each; the control socket answers; the daemon holds at most
    MAX_CLIENTS (16) metrics connections (its fds), closed the silent ones beyond them and,
    after CLIENT_TIMEOUT (5 s), the slow ones; it grew by less than 16 MiB."""
    with running(tmpdir_short, metrics=True) as d:
        port = d.metrics_port
        rss0, fd0 = d.rss(), fds(d.pid)
        started = time.monotonic()
        silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
        slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
        stop = threading.Event()

        def trickle():
            i = 0
            while not stop.is_set():
                for s in slow:
                    try:
                        s.send(b"GET /metrics HTTP/1.0\r\nX: "[i % 27:i % 27 + 1] or b"a")
                    except OSError:
                        pass
                i += 1
                stop.wait(0.2)

        def stream():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"GET /metrics HTTP/1.0\r\nX-Big: ")
                    for _ in range(64):
                        s.sendall(b"a" * 65536)
            except OSError:
                pass  # closed after its 431: as it should

        threads = [threading.Thread(target=trickle), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        try:
            codes, slowest = {}, 0.0
            for what, data in [("GET", b"GET /metrics HTTP/1.0\r\n\r\n"), ("HEAD", b"HEAD /metrics HTTP/1.0\r\n\r\n"),
                               ("POST", b"POST /metrics HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc"),
                               ("DELETE", b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
                               ("BREW", b"BREW /pot HTTP/1.0\r\n\r\n"), ("root", b"GET / HTTP/1.0\r\n\r\n"),
                               ("dots", b"GET /metrics/../../etc/passwd HTTP/1.0\r\n\r\n"),
                               ("long path", b"GET /" + b"m" * 7000 + b" HTTP/1.0\r\n\r\n"),
                               ("junk", bytes(range(256)).replace(b"\n", b"") + b"\r\n\r\n"),
                               ("bare", b"GET\r\n\r\n"), ("huge", b"GET /metrics HTTP/1.0\r\nX: " + b"a" * 9000),
                               ("GET again", b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")]:  # fmt: skip
                t0 = time.monotonic()
                codes[what] = http(port, data)[:12]
                slowest = max(slowest, time.monotonic() - t0)
            ctl = request(d.sock, {"op": "rules"}, timeout=5)["ok"]
            open_fds = fds(d.pid)
            rss = d.rss()
            # the slow ones' time is up CLIENT_TIMEOUT after they were accepted (a connection that
            # overflowed the listen backlog is accepted a SYN-ACK retry later: seconds)
            dropped = wait_for(lambda: all(closed_by_peer(s) for s in slow), M.CLIENT_TIMEOUT + 8, 0.2)
            took = time.monotonic() - started
            evicted = sum(closed_by_peer(s) for s in silent)
        finally:
            stop.set()
            for t in threads:
                t.join(15)
            for s in silent + slow:
                s.close()
        alive = d.alive()
    want = {"GET": 200, "HEAD": 200, "POST": 405, "DELETE": 405, "BREW": 405, "root": 404, "dots": 404,
            "long path": 404, "junk": 405, "bare": 405, "huge": 431, "GET again": 200}  # fmt: skip
    assert {k: v for k, v in codes.items()} == {k: f"HTTP/1.0 {v}".encode() for k, v in want.items()}
    assert slowest < 2 and ctl, slowest
    assert open_fds - fd0 <= M.MAX_CLIENTS + 1, (fd0, open_fds)
    assert dropped and evicted >= 40 - M.MAX_CLIENTS, (took, evicted)
    assert rss - rss0 < 16 * MIB, (rss0, rss)
    assert alive and "Traceback" not in d.log()


def test_malformed_requests_of_every_op_are_refused_by_name_and_change_nothing(tmpdir_short):
    """600 requests, each wrong in one place (a field of any op given a JSON type it never
    takes or a value it refuses, a required one missing, an unknown field, a request that is
    no object, an op that is no string): each answered {"ok": false, exit 2} naming the field;
    on main 642 of 3,000 such requests were taken as valid (a flush's misspelt filter flushed
    everything, restore "no" replaced every rule, limit true listed one session, a filter of
    [["inside", ...]] pairs was read as one)."""
    with running(tmpdir_short) as d:
        fuzz(d, 600, seed=int(os.environ.get("ATTACK_SEED", "21")))


@pytest.mark.parametrize("req,error", [
    ({"op": "flush", "rule": 1}, "bad request: flush: unknown field(s) 'rule'; it takes priority, rule_id, inside, nat"),
    ({"op": "adm", "commands": [["-A", "-f", "1", "-s", "198.18.9.0/24", "--snat-ip", "198.19.2.71"]],
      "restore": "no"}, 'bad request: adm: restore: expected true or false, got "no"'),
    ({"op": "adm", "commands": [], "restore": True}, "bad request: adm: a restore of no commands would remove every rule"),
    ({"op": "reload", "path": False}, "bad request: reload: path: expected a non-empty string, got false"),
    ({"op": "reload", "path": str(LAB), "text": ""}, "bad request: reload: give path or text, not both"),
    ({"op": "sessions", "limit": True}, "bad request: limit: expected a whole number, got true"),
    ({"op": "sessions", "filter": [["proto", 6]]}, "bad request: filter: expected an object of rule_id, inside"),
    ({"op": "sessions", "filter": {"inside": 3232245770}}, "bad request: filter: inside: expected an IPv4 network"),
    ({"op": "refusal_marker", "sport": 1, "dport": 2, "proto": 6, "remote": "203.0.113.10"},
     "refusal_marker: host: missing"),
    ({"op": "session", "host": 3232245770, "sport": 1, "dport": 2, "proto": 6, "remote": "203.0.113.10"},
     "bad request: session: host: expected a non-empty string, got 3232245770"),
    ({"op": ["status"]}, 'bad request: op: expected a string naming the request, got ["status"]'),
    (["status"], 'bad request: expected a JSON object {"op": ...}, got ["status"]'),
])  # fmt: skip
def test_each_kind_of_malformed_request_is_named(tmpdir_short, req, error):
    """One of each, with its whole error: on main the first three changed the rules or
    flushed every session, the fourth reloaded the running file, the next listed sessions."""
    with running(tmpdir_short) as d:
        before = request(d.sock, {"op": "rules"})["rules"], request(d.sock, {"op": "status"})["last_reload"]
        resp = request(d.sock, req)
        after = request(d.sock, {"op": "rules"})["rules"], request(d.sock, {"op": "status"})["last_reload"]
    assert resp["ok"] is False and resp["exit"] == 2 and resp["error"].startswith(error), resp
    assert after == before


def test_memory_a_listing_freed_goes_back_to_the_kernel(tmpdir_short):
    """After three 100,000-session listings (~20 MB of JSON each) the daemon's RSS stayed 63 MiB
    above its start (glibc kept the freed pages for the next listing); the worker now trims the
    heap once no long answer is left: measured +9 MiB."""
    with running(tmpdir_short, sessions=100_000) as d:
        rss0 = d.rss()
        for _ in range(3):
            assert len(request(d.sock, {"op": "sessions"}, timeout=60)["sessions"]) == 100_000
        rss1 = wait_for(lambda: (r := d.rss()) - rss0 < 24 * MIB and r, 5, 0.1) or d.rss()
    assert rss1 - rss0 < 24 * MIB, f"{rss0 // MIB} MiB at start, {rss1 // MIB} MiB after the listings"
