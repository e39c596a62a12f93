"""daemon/sync.py's queues on loopback with a backend of its own: a flood of valid datagrams
beyond the receive queue's bound is dropped and counted (the worker is not there to drain it),
the ring's records beyond the send queue's bound too, and the refresh walk never queues more
than the send queue has room for.  Freshness: datagrams recorded before the sync restarted are
refused and counted, nothing installed; the heartbeat's timer; a silent peer (or one of another
protocol version) is a problem, until a valid datagram comes."""

from __future__ import annotations

import os
import socket

import pytest

from snatgw.config.schema import Settings
from snatgw.daemon import sync as S
from snatgw.daemon import synccodec as C
from snatgw.daemon.log import Log

from tests.unit.daemon_fakes import Loop, Worker


class Backend:
    name = "bpf"

    def __init__(self, pairs=0):
        self.got = []
        self.pairs = pairs

    def sync_install(self, records, counts, seconds=None):
        self.got += records
        counts["installed"] += len(records)
        return []  # (all taken)

    def sync_pairs(self):
        from snatgw.datapath.bpf.maps import SessionPair
        import snatgw.layout as L

        for i in range(self.pairs):
            k = L.CT_KEY.pack(saddr=0xC6120001, daddr=0xCB00710A, sport=1000 + i % 60000, dport=53, proto=17,
                              dir=L.CT_DIR_OUT)  # fmt: skip
            v = L.CT_ENTRY.pack(rw_addr=0xC6336407, rw_port=5000, state=int(L.CtState.UDP), rule_id=1)
            yield SessionPair(k, v, b"", None)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def service(tmp_path, port: int, **kw):
    key = tmp_path / "k"
    key.write_bytes(b"x" * 32)
    os.chmod(key, 0o600)
    s = Settings(sync_peer="127.0.0.2", sync_local="127.0.0.1", sync_port=port, sync_key=str(key), **kw)
    loop, worker, clock = Loop(), Worker(), Clock()
    y = S.SyncService(s, Backend(), Log(), worker, clock=clock)
    y.attach(loop)
    y.loop_, y.clock_ = loop, clock  # (the test's handles on them)
    return y, worker


@pytest.fixture
def svc(tmp_path):
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.2", 0))
    y, worker = service(tmp_path, probe.getsockname()[1])
    yield y, probe, worker
    y.close()
    probe.close()


def peer_encoder(y) -> C.Encoder:
    """The test peer's encoder, echoing the service's boot id (as a peer that heard its hello)."""
    return C.Encoder(b"x" * 32, echo=y.encoder.boot_id)


def received(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    out = []
    while True:
        try:
            out.append(sock.recv(2048))
        except BlockingIOError:
            return out


def test_a_flood_beyond_the_receive_queue_is_dropped_and_counted(svc, monkeypatch):
    y, peer, worker = svc
    monkeypatch.setattr(S, "RECV_QUEUE_MAX", 420)
    enc = peer_encoder(y)
    rec = C.Record(1, 17, 0, 0, b"\xc6\x12\x00\x01", 1, b"\xcb\x00\x71\x0a", 53, b"\xc6\x33\x64\x07", 5000, 1, 0)
    for g in enc.encode([rec] * (42 * 20)):
        peer.sendto(g, ("127.0.0.1", y.settings.sync_port))
    monkeypatch.setattr(S, "INSTALL_BATCH", 100)
    for _ in range(5):
        y._on_readable()  # no worker ran meanwhile: the queue fills
    st = y.stats()
    # 420 queued, of which the worker's first job took 100; the other 420 dropped
    assert (st["received_records"], st["recv_queue"], st["drops"]["recv_queue"]) == (840, 320, 420), st
    # the peer's first datagram (a new boot id) started a walk of ours, then the install job
    assert [done.__name__ for _, done in worker.jobs] == ["_walked", "_installed"]
    assert y.stats()["peer_boots"] == 1
    worker.run()
    st = y.stats()
    assert st["installed"] + st["drops"]["recv_queue"] == 42 * 20 and st["recv_queue"] == 0, st
    assert st["drops"]["recv_queue"] > 0


def test_datagrams_from_another_address_or_key_are_dropped_before_anything(svc):
    y, peer, worker = svc
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.3", 0))
    rec = C.Record(1, 17, 0, 0, b"\x01\x02\x03\x04", 1, b"\x01\x02\x03\x05", 53, b"\x01\x02\x03\x06", 5000, 1, 0)
    other.sendto(peer_encoder(y).encode([rec])[0], ("127.0.0.1", y.settings.sync_port))
    peer.sendto(C.Encoder(b"y" * 32).encode([rec])[0], ("127.0.0.1", y.settings.sync_port))
    peer.sendto(b"junk", ("127.0.0.1", y.settings.sync_port))
    y._on_readable()
    worker.run()
    st = y.stats()
    assert (st["foreign"], st["drops"]["bad_mac"], st["drops"]["short"], st["received_records"]) == (1, 1, 1, 0), st
    other.close()


def test_the_send_queue_is_bounded_and_the_walk_waits_for_room(svc, monkeypatch):
    y, peer, worker = svc
    monkeypatch.setattr(S, "SEND_QUEUE_MAX", 5000)
    monkeypatch.setattr(S, "WALK_CHUNK", 1000)
    monkeypatch.setattr(S, "FLUSH_DATAGRAMS", 10)
    y.backend.pairs = 20000
    import snatgw.layout as L

    raw = bytearray(L.AUDIT_REC.size)
    raw[L.AUDIT_REC.offsets()["kind"]] = L.AUDIT_NEW
    raw[L.AUDIT_REC.offsets()["proto"]] = 17
    y.on_ring([bytes(raw)] * 6000)
    st = y.stats()
    assert (st["send_queue"], st["drops"]["send_queue"], st["ring_records"]) == (5000, 1000, 5000), st
    y._start_walk()
    worker.run()  # the walk's first chunk finds no room: nothing queued, nothing dropped
    assert y.stats()["send_queue"] == 5000 and y.stats()["drops"]["send_queue"] == 1000
    got = 0
    dec = C.Decoder(b"x" * 32, own=0)  # (what the service echoes: it heard no peer)
    peer.setblocking(False)

    def receive() -> int:
        n = 0
        while True:
            try:
                n += len(dec.decode(peer.recv(2048)))
            except BlockingIOError:
                return n

    for _ in range(100):  # each flush sends 420 records and lets the walk go on when there is room
        y._flush()
        worker.run()
        assert len(y._send) <= 5000
        got += receive()
    st = y.stats()
    assert st["walks"] == 1 and st["walk_records"] == 20000 and st["drops"]["send_queue"] == 1000, st
    assert st["sent_records"] == 25000 and st["sent_datagrams"] >= (25000 + 41) // 42, st
    assert got == 25000 and not any(dec.drops.values())


def test_datagrams_recorded_before_the_sync_restarted_install_nothing(tmp_path):
    """The peer's datagrams (an END of a session among them) as the link carried them to a sync
    that has since restarted (a daemon restart or a reload: a new boot id): replayed, each is
    counted stale, nothing reaches the table, and the peer is not counted as heard (it stays a
    problem); the replay does tell the new sync the peer's boot id, so it says hello at once,
    echoing it.  Before the echo (wire version 1) the new sync took them all."""
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.2", 0))
    port = peer.getsockname()[1]
    to = ("127.0.0.1", port)
    end = C.Record(C.OP_END, 17, 0, 0, b"\xc6\x12\x00\x01", 1, b"\xcb\x00\x71\x0a", 53, b"\xc6\x33\x64\x07", 5000, 1, 0)
    y, worker = service(tmp_path, port)
    try:
        enc = peer_encoder(y)
        recorded = enc.encode([end]) + enc.encode([end._replace(iport=2)])
        for g in recorded:
            peer.sendto(g, to)
        y._on_readable()
        worker.run()
        assert len(y.backend.got) == 2  # (the first sync took them)
    finally:
        y.close()
    received(peer)
    y, worker = service(tmp_path, port)  # restarted: another boot id
    try:
        hello = received(peer)
        assert len(hello) == 1 and C.HEADER.unpack_from(hello[0])[6] == 0  # (its hello: it heard nobody yet)
        for g in recorded:
            peer.sendto(g, to)
        y._on_readable()
        worker.run()
        st = y.stats()
        assert y.backend.got == [] and st["received_records"] == 0 and st["received_datagrams"] == 0, st
        assert st["drops"]["stale"] == 2 and st["seconds_since_peer"] is None, st
        assert st["peer_boot_id"] == f"{enc.boot_id:016x}"
        answer = received(peer)  # hello at once, echoing the peer's boot id
        assert len(answer) == 1 and C.HEADER.unpack_from(answer[0])[6] == enc.boot_id
        y.clock_.now += 3.5
        assert any("no valid datagram from the peer since this sync started 3.5 s ago" in p
                   and "2 stale ones meanwhile" in p for p in y.problems()), y.problems()  # fmt: skip
        enc.echo = y.encoder.boot_id  # the peer heard it: its records count again
        peer.sendto(enc.encode([end._replace(iport=3)])[0], to)
        y._on_readable()
        worker.run()
        assert [r.iport for r in y.backend.got] == [3] and y.problems() == []
    finally:
        y.close()
        peer.close()


def test_a_heartbeat_leaves_every_sync_interval_and_a_silent_peer_is_a_problem(tmp_path):
    """The heartbeat timer runs every sync_interval (the first one interval after the hello)
    and sends a datagram of no records whatever else is queued; the refresh walk's timer runs
    every sync_refresh.  A peer heard last more than 3 intervals ago is a problem; its next
    valid datagram clears it."""
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.2", 0))
    y, worker = service(tmp_path, peer.getsockname()[1], sync_interval=0.5, sync_refresh=7.0)
    try:
        loop, clock = y.loop_, y.clock_
        beats = [t for t in loop.timers if t.cb == y._hello]
        assert [(t.interval, t.first) for t in beats] == [(0.5, 0.5)]
        assert [(t.interval, t.first) for t in loop.timers if t.cb == y._start_walk] == [(7.0, 0.5)]
        assert len(received(peer)) == 1  # the hello
        for _ in range(3):
            assert loop.fire(y._hello) == 1
        grams = received(peer)
        assert [C.HEADER.unpack_from(g)[3] for g in grams] == [0, 0, 0], grams  # no records
        assert len({C.HEADER.unpack_from(g)[5] for g in grams}) == 3  # each its own sequence
        dec = C.Decoder(b"x" * 32, own=0)
        assert all(dec.decode(g) == [] for g in grams) and dec.datagrams == 3  # valid (they echo 0: nobody heard)
        enc = peer_encoder(y)
        peer.sendto(enc.datagram([]), ("127.0.0.1", y.settings.sync_port))  # the peer's heartbeat
        y._on_readable()
        assert y.problems() == [] and y.stats()["seconds_since_peer"] == 0
        clock.now += 1.5  # 3 intervals: not yet
        assert y.problems() == []
        clock.now += 0.1
        assert y.problems() == ["session sync with 127.0.0.2: no valid datagram from the peer for 1.6 s "
                                "(sync_interval 0.5 s: it sends one at least that often)"], y.problems()  # fmt: skip
        peer.sendto(enc.datagram([]), ("127.0.0.1", y.settings.sync_port))
        y._on_readable()
        assert y.problems() == []
        y.close()
        assert all(t.cancelled for t in loop.timers)
    finally:
        y.close()
        peer.close()


def test_a_peer_of_another_protocol_version_is_a_problem_status_names(tmp_path):
    """A version 1 datagram (24-byte header, no echo) from the peer: bad_version, and status
    says the peer speaks another version, until one of ours comes."""
    import hashlib
    import hmac
    import struct

    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.2", 0))
    y, worker = service(tmp_path, peer.getsockname()[1])
    try:
        body = struct.pack(">4sBBHQQ", b"SGWS", 1, 0, 0, 77, 1)
        peer.sendto(body + hmac.new(b"x" * 32, body, hashlib.sha256).digest()[:16], ("127.0.0.1", y.settings.sync_port))
        y._on_readable()
        st = y.stats()
        assert st["drops"]["bad_version"] == 1 and (st["peer_version"], st["version"]) == (1, 2), st
        assert any("speaks sync protocol version 1, this gateway 2" in p and "upgrade both" in p
                   for p in y.problems()), y.problems()  # fmt: skip
        peer.sendto(peer_encoder(y).datagram([]), ("127.0.0.1", y.settings.sync_port))
        y._on_readable()
        assert y.stats()["peer_version"] is None and y.problems() == []
    finally:
        y.close()
        peer.close()


def test_a_reload_that_rebuilds_the_sync_hands_its_queue_and_wire_state_to_the_new_one(tmp_path, monkeypatch):
    """Through Extras (a reload: sync_interval changed, same peer and key): the peer (the test's
    socket with an encoder and a decoder, as a gateway's) and the sync confirm each other; the
    datapath's ends are queued, more than one flush sends; the reload replaces the service, and
    the new one ends more.  Every end reaches the peer and is taken: the new service goes on
    with the old one's boot id (which the peer confirmed) and its queue.  The old service sent
    one flush at close and dropped the rest, and the new one's datagrams echoed no boot id of
    the peer's (a new boot id, not confirmed yet): stale at the peer, their ends dropped."""
    import types

    import snatgw.layout as L
    from snatgw.daemon.extras import Extras

    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: the test reads after each flush
    peer.bind(("127.0.0.2", 0))
    port = peer.getsockname()[1]
    key = tmp_path / "k"
    key.write_bytes(b"x" * 32)
    os.chmod(key, 0o600)

    def settings(interval: float) -> Settings:
        return Settings(sync_peer="127.0.0.2", sync_local="127.0.0.1", sync_port=port, sync_key=str(key),
                        sync_interval=interval)  # fmt: skip

    svc = types.SimpleNamespace(backend=Backend(), sync=None, sync_error=None)
    ex = Extras(svc, Loop(), Worker(), Log())
    penc = C.Encoder(b"x" * 32)
    pdec = C.Decoder(b"x" * 32, own=penc.boot_id)
    ends = 0

    def hear() -> None:
        nonlocal ends
        for g in received(peer):
            ends += sum(r.op == C.OP_END for r in pdec.decode(g))

    try:
        ex._refresh_sync(settings(1.0))
        y = ex.sync
        hear()  # its hello (stale here: it echoes 0; the peer learns its boot id)
        penc.echo = pdec.peer
        peer.sendto(penc.datagram([]), ("127.0.0.1", port))  # the peer's heartbeat, echoing it
        y._on_readable()  # confirmed: its answer echoes the peer's boot id
        hear()
        assert pdec.confirmed == y.encoder.boot_id and pdec.datagrams >= 1, pdec.stats()
        monkeypatch.setattr(S, "INSTALL_BATCH", 10)
        rec = C.Record(1, 17, 0, 0, b"\xc6\x12\x00\x01", 1, b"\xcb\x00\x71\x0a", 53, b"\xc6\x33\x64\x07", 5000, 1, 0)
        peer.sendto(penc.encode([rec] * 42)[0], ("127.0.0.1", port))
        y._on_readable()  # 10 in an install job the worker has not run yet, 32 waiting
        assert y.stats()["recv_queue"] == 32
        raw = bytearray(L.AUDIT_REC.size)
        raw[L.AUDIT_REC.offsets()["kind"]] = L.AUDIT_END
        raw[L.AUDIT_REC.offsets()["proto"]] = 17
        first = C.MAX_RECORDS * S.FLUSH_DATAGRAMS + 500  # more than one flush
        y.on_ring([bytes(raw)] * first)
        ex._refresh_sync(settings(2.0))  # the reload
        z = ex.sync
        assert z is not y and z.settings.sync_interval == 2.0 and svc.sync is z
        hear()
        ex.worker.run()  # the old job ends: its rest and the 32 are the new service's to install
        assert len(svc.backend.got) == 42 and z.stats()["installed"] == 42, z.stats()
        z.on_ring([bytes(raw)] * 100)  # ended after the reload
        for _ in range(10):
            z._flush()
            hear()
        assert ends == first + 100, (ends, pdec.stats())
        assert z.stats()["boot_id"] == f"{y.encoder.boot_id:016x}" and pdec.drops["stale"] == 1, pdec.stats()
    finally:
        ex._stop_sync()
        peer.close()


def _extras_pair(tmp_path):
    """(Extras over the test's loop and worker, settings(interval, local), the peer's socket, its
    encoder and decoder): the sync and the peer confirmed each other (as two gateways running)."""
    import types

    from snatgw.daemon.extras import Extras

    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
    peer.bind(("127.0.0.2", 0))
    port = peer.getsockname()[1]
    key = tmp_path / "k"
    key.write_bytes(b"x" * 32)
    os.chmod(key, 0o600)

    def settings(interval: float, local: str = "127.0.0.1") -> Settings:
        return Settings(sync_peer="127.0.0.2", sync_local=local, sync_port=port, sync_key=str(key),
                        sync_interval=interval)  # fmt: skip

    svc = types.SimpleNamespace(backend=Backend(), sync=None, sync_error=None)
    ex = Extras(svc, Loop(), Worker(), Log())
    penc = C.Encoder(b"x" * 32)
    pdec = C.Decoder(b"x" * 32, own=penc.boot_id)
    ex._refresh_sync(settings(1.0))
    for g in received(peer):  # its hello (stale here: it echoes 0; the peer learns its boot id)
        pdec.decode(g)
    penc.echo = pdec.peer
    peer.sendto(penc.datagram([]), ("127.0.0.1", port))
    ex.sync._on_readable()  # confirmed both ways
    for g in received(peer):
        pdec.decode(g)
    assert pdec.confirmed == ex.sync.encoder.boot_id
    return ex, settings, peer, port, penc, pdec


REC = C.Record(1, 17, 0, 0, b"\xc6\x12\x00\x01", 1, b"\xcb\x00\x71\x0a", 53, b"\xc6\x33\x64\x07", 5000, 1, 0)


@pytest.mark.parametrize("local", ["127.0.0.1", "127.0.0.3"])
def test_what_the_peer_sent_before_a_reload_and_the_sync_had_not_read_is_taken_by_the_new_service(tmp_path, local):
    """The peer's datagrams wait in the sync's socket (the loop has not read them yet) when a
    reload rebuilds the sync with the same peer and key: the new service takes them all (the
    same sync_local: the socket itself goes over; another: the old one's is read empty first).
    The old socket was closed with them in its buffer: the peer's records (ends among them)
    were lost, and it does not send them again."""
    ex, settings, peer, port, penc, _ = _extras_pair(tmp_path)
    try:
        y = ex.sync
        for _ in range(5):
            peer.sendto(penc.encode([REC] * 10)[0], ("127.0.0.1", port))
        ex._refresh_sync(settings(2.0, local))  # the reload, before the loop read them
        z = ex.sync
        assert z is not y and z.settings.sync_local == local
        z._on_readable()
        ex.worker.run()
        assert z.stats()["received_records"] == 50 and len(ex.service.backend.got) == 50, z.stats()
    finally:
        ex._stop_sync()
        peer.close()


def test_a_reload_to_a_sync_local_that_cannot_be_bound_leaves_the_old_service_to_flush_its_queue(tmp_path):
    """A reload to another sync_local not on this host (the same peer and key): the new service
    cannot bind, so it takes nothing, and the old one sends what it had queued before its
    socket goes, as a reload to another peer does.  The queue went to the new service before
    its bind failed, and nothing sent it: the ends were lost."""
    from tests.unit.daemon_fakes import Timer

    ex, settings, peer, port, _, pdec = _extras_pair(tmp_path)
    ex.loop.call_later = lambda delay, cb: Timer(delay, cb)  # (the retry: not run here)
    try:
        y = ex.sync
        y.on_ended([REC._replace(op=C.OP_END)] * 100)
        ex._refresh_sync(settings(1.0, "192.0.2.1"))  # (EADDRNOTAVAIL: sync off, retried later)
        assert ex.sync is None and ex.service.sync_error
        ends = sum(r.op == C.OP_END for g in received(peer) for r in pdec.decode(g))
        assert ends == 100, pdec.stats()
    finally:
        ex._stop_sync()
        peer.close()


def test_an_end_queued_before_two_quick_reloads_reaches_the_service_after_both(tmp_path):
    """Ends of sessions a rule change removed are queued through the loop (on_ended, any
    thread); two reloads rebuild the sync before the loop runs that: the end goes to the last
    service.  It followed one reload only, and was dropped at the second (closed) one."""
    ex, settings, peer, _, _, _ = _extras_pair(tmp_path)
    later = []
    ex.loop.call_soon_threadsafe = later.append
    try:
        y = ex.sync
        y.on_ended([REC._replace(op=C.OP_END)] * 3)
        ex._refresh_sync(settings(2.0))
        ex._refresh_sync(settings(3.0))
        z = ex.sync
        assert z.settings.sync_interval == 3.0 and len(later) == 1
        later.pop()()
        assert z.stats()["send_queue"] == 3, z.stats()
    finally:
        ex._stop_sync()
        peer.close()
