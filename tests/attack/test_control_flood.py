"""The heavier sizes of tests/unit/test_control_hostile.py (the control plane of a real
`snatgw run`, fake backend: no namespaces, no datapath), scaled by ATTACK_SCALE (`make
attack`: 10), each bounded in time: a longer SIGHUP storm, more malformed requests (seed
ATTACK_SEED), a flood of clients of every kind at once, and every client slot holding an
unread listing."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest

from daemonproc import (MIB, SEVENTY, SIXTY, Poller, connect, fds, fuzz, hup_storm, rules_text, running,
                        send_oversized, settled_on, write)
from snatgw.daemon import control as C
from snatgw.daemon.control import request

from .conftest import scaled

pytestmark = [pytest.mark.attack]


def test_a_long_sighup_storm_keeps_answering_and_its_memory(tmpdir_short):
    """min(300 x ATTACK_SCALE, 3000) SIGHUPs 2 ms apart (three files, one broken) while a
    client polls `status`: every status answered, the last file applied and recorded, RSS
    grown by less than 8 MiB from the first 300 to the end."""
    n = min(scaled(300), 3000)
    texts = [rules_text(), rules_text(SIXTY), rules_text(SIXTY) + "snat_rule {\n"]
    with running(tmpdir_short) as d, Poller(d.sock) as poll:
        hup_storm(d, 300, texts, gap=0.002)
        rss0 = d.rss()
        hup_storm(d, n, texts, gap=0.002)
        write(d.conf, rules_text(SIXTY, SEVENTY))
        since = time.time()
        os.kill(d.pid, signal.SIGHUP)
        st = settled_on(d, 5, since)
        rss = d.rss()
        alive = d.alive()
    assert alive and not poll.failures and all(a["ok"] for a in poll.answers), poll.failures[:3]
    assert st is not None and st["last_reload"]["via"] == "signal" and st["last_reload"]["error"] is None
    assert rss - rss0 < 8 * MIB, (rss0, rss)


def test_many_malformed_requests(tmpdir_short):
    """min(600 x ATTACK_SCALE, 8000) malformed requests (daemonproc.fuzz), a seed per scale."""
    with running(tmpdir_short) as d:
        fuzz(d, min(scaled(600), 8000), seed=int(os.environ.get("ATTACK_SEED", "2121")))


def test_a_flood_of_every_kind_of_client_at_once(tmpdir_short):
    """At once: 200 silent clients, 50 that send half a request, 20 that pipeline 100
    requests each, 4 that send a line over MAX_REQUEST, 10 that ask for a 100,000-session
    listing and read nothing, and a poller: the poller's every `status` answered (the slowest
    within 5 s), each pipeliner's 100 answers in order, each oversized line refused, the RSS
    peak within 600 MiB of the start, the daemon up."""
    with running(tmpdir_short, sessions=100_000) as d:
        rss0, fd0 = d.rss(), fds(d.pid)
        held: list[socket.socket] = []
        results: list = []
        peak = [rss0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], d.rss())
                stop.wait(0.05)

        def pipeliner():
            try:
                s = connect(d.sock, timeout=25)
                s.sendall(b'{"op": "rules"}\n{"op": "status"}\n' * 50)
                f = s.makefile("rb")
                answers = [json.loads(f.readline()) for _ in range(100)]
                s.close()
                results.append(all(a["ok"] and ("rules" in a if i % 2 == 0 else "pid" in a)
                                   for i, a in enumerate(answers)))
            except Exception as e:  # noqa: BLE001
                results.append(repr(e))

        def oversized():
            try:
                line = send_oversized(d.sock, b"y", timeout=25)
                results.append(b"longer than" in line or b"EBUSY" in line or line)
            except Exception as e:  # noqa: BLE001
                results.append(repr(e))

        sampler = threading.Thread(target=sample)
        sampler.start()
        with Poller(d.sock) as poll:
            try:
                for i in range(250):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    held.append(s)
                    s.setblocking(False)
                    try:
                        s.connect(d.sock)
                        if i >= 200:
                            s.send(b'{"op": "sessi')
                    except OSError:  # the backlog full: this one waits out there
                        pass
                for _ in range(10):
                    s = connect(d.sock, timeout=25)
                    s.sendall(b'{"op": "sessions"}\n')
                    held.append(s)
                workers = [threading.Thread(target=pipeliner) for _ in range(20)] + \
                    [threading.Thread(target=oversized) for _ in range(4)]
                for t in workers:
                    t.start()
                for t in workers:
                    t.join(28)
            finally:
                for s in held:
                    s.close()
        time.sleep(1)
        settle = d.rss()
        stop.set()
        sampler.join(5)
        open_fds = fds(d.pid)
        alive = d.alive()
    assert alive and not poll.failures and poll.slowest < 5, (poll.failures[:3], poll.slowest)
    assert len(results) == 24 and all(r is True for r in results), results
    # (what the listings freed stays with the worker thread's malloc arena for the next one: RSS
    # settles 100-230 MiB above the start, below the peak; a second flood reuses it)
    assert peak[0] - rss0 < 600 * MIB and settle <= peak[0], (rss0, peak[0], settle)
    assert open_fds - fd0 < 10, (fd0, open_fds)


def test_every_client_slot_asking_for_a_listing_and_never_reading(tmpdir_short):
    """MAX_CLIENTS clients ask for a 100,000-session listing and read nothing: two are built,
    the rest answered EBUSY; peak RSS within 400 MiB; `rules` from another client answered
    all along, within 3 s of retrying an EBUSY (the worker's queue, 64, full of the listings'
    first pieces for a moment) (a newcomer takes a silent slot)."""
    with running(tmpdir_short, sessions=100_000) as d:
        rss0 = d.rss()
        hogs = []
        peak = rss0
        try:
            for _ in range(C.MAX_CLIENTS):
                s = connect(d.sock, timeout=20)
                s.sendall(b'{"op": "sessions"}\n')
                hogs.append(s)
            end, busy, slowest = time.monotonic() + 4, 0, 0.0
            while time.monotonic() < end:
                t0 = time.monotonic()
                while True:  # EBUSY while the worker's queue (64) is full of listings' first pieces
                    r = request(d.sock, {"op": "rules"}, timeout=5)
                    if r["ok"] or r.get("code") != "EBUSY" or time.monotonic() - t0 > 3:
                        break
                    busy += 1
                    time.sleep(0.05)
                assert r["ok"], r
                slowest = max(slowest, time.monotonic() - t0)
                peak = max(peak, d.rss())
                time.sleep(0.1)
        finally:
            for s in hogs:
                s.close()
        alive = d.alive()
    assert alive and peak - rss0 < 400 * MIB, (rss0, peak)
    assert slowest < 3, (slowest, busy)
