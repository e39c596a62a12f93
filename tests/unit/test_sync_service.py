"""daemon/sync.py's queues on loopback with a backend of its own: a flood of valid datagrams
beyond the receive queue's bound is dropped and counted (the worker is not there to drain it),
the ring's records beyond the send queue's bound too, and the refresh walk never queues more
than the send queue has room for."""

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


@pytest.fixture
def svc(tmp_path):
    key = tmp_path / "k"
    key.write_bytes(b"x" * 32)
    os.chmod(key, 0o600)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.2", 0))
    port = probe.getsockname()[1]
    s = Settings(sync_peer="127.0.0.2", sync_local="127.0.0.1", sync_port=port, sync_key=str(key))
    loop, worker = Loop(), Worker()
    y = S.SyncService(s, Backend(), Log(), worker)
    y.attach(loop)
    yield y, probe, worker
    y.close()
    probe.close()


def test_a_flood_beyond_the_receive_queue_is_dropped_and_counted(svc, monkeypatch):
    y, peer, worker = svc
    monkeypatch.setattr(S, "RECV_QUEUE_MAX", 420)
    enc = C.Encoder(b"x" * 32)
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
    other.sendto(C.Encoder(b"x" * 32).encode([rec])[0], ("127.0.0.1", y.settings.sync_port))
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
    dec = C.Decoder(b"x" * 32)
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
