"""The fragment holder's bounds without a TAP (a datagram socketpair stands in for it): at most
`capacity` frames wait, the rest are dropped and counted; a fragment's wait doubles per round
up to FRAG_HOLD_STEP_MAX_MS; frames go back addressed to the device."""

from __future__ import annotations

import socket
import struct

from snatgw import layout as L
from snatgw.datapath.bpf.recirc import FragmentHolder


def frame(ident: int, offset: int = 185) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 60, ident, offset, 64, 17, 0, bytes([198, 18, 40, 10]),
                     bytes([203, 0, 113, 10]))
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + bytes(40)


def holder(capacity: int = 8):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    h = FragmentHolder(capacity=capacity)
    h.fd, h.mac = a.fileno(), b"\x06" * 6
    return h, a, b


def test_at_most_capacity_frames_wait_and_the_rest_are_counted():
    h, a, b = holder(8)
    try:
        for i in range(50):
            b.send(frame(i))
        h._take(100.0)
        assert (len(h._queue), h.held, h.dropped) == (8, 8, 42)
    finally:
        a.close()
        b.close()


def test_a_fragments_wait_doubles_per_round_up_to_the_cap():
    h, a, b = holder()
    waits = [h._delay(frame(7), 0.0) for _ in range(12)]
    a.close()
    b.close()
    assert waits[:3] == [0.001, 0.002, 0.004]
    assert max(waits) == L.FRAG_HOLD_STEP_MAX_MS / 1000 and waits[-1] == waits[-2]
    assert h._delay(frame(8), 0.0) == 0.001  # another datagram starts afresh


def test_frames_go_back_addressed_to_the_device_when_due():
    h, a, b = holder()
    try:
        b.send(frame(9))
        h._take(10.0)
        assert h._send_due(10.0) == 0  # not yet: it waits 1 ms
        assert h._send_due(10.0011) == 1 and h._queue == []
        got = b.recv(2048)
        assert got[:6] == b"\x06" * 6 and got[6:] == frame(9)[6:]
    finally:
        a.close()
        b.close()
