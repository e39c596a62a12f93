"""A leak watcher for the uplinks: an AF_PACKET capture in a namespace on the far side of an
uplink (the lab's ISP router) that keeps every frame carrying an inside address, which must
never happen (edge invariant 1, "no leak").

    w = leakwatch.start(lab.ns("isp1"), "up", ["198.18.0.0/16"])
    ... traffic, restarts, fuzz ...
    leaks = w.stop()          # [] or the offending frames (LeakFrame)

A frame offends when it arrives on ``dev`` (not sent by the namespace itself) and its IPv4
source lies in one of ``nets`` ("src"), or it is an ICMP error whose quoted packet has a
source or destination in ``nets`` ("inner": a private address in the payload leaks too).
``w.seen`` counts the IPv4 frames examined (a test can check it saw its traffic at all) and
``w.dropped`` the frames the kernel dropped from the capture (nonzero: the answer is unsure).

``uplinks(lab, nets)`` watches every uplink of a lab at once (UPLINK_TAPS) and answers for all:

    with leakwatch.uplinks(lab, ["198.18.0.0/16"]) as w:
        ... traffic ...
    assert w.leaks == [] and w.seen > 0 and w.dropped == 0
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from .netns import ns_socket

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_STATISTICS = 6
ICMP_ERRORS = (3, 4, 5, 11, 12)
RCVBUF = 8 << 20
#: (node, device) of the frames the lab gateway's uplinks carry, seen from the ISP side
UPLINK_TAPS = (("isp1", "up"), ("isp2", "up"))


@dataclass(frozen=True)
class LeakFrame:
    """One offending frame: when, its addresses, and where the inside address was."""

    time: float  # time.time() when captured
    src: IPv4Address
    dst: IPv4Address
    proto: int
    where: str  # "src": the IPv4 source; "inner": inside an ICMP error's quoted packet
    frame: bytes  # the frame as captured (at most 256 bytes)

    def __str__(self) -> str:
        return f"{self.where}: {self.src} -> {self.dst} proto {self.proto} ({self.frame[:64].hex()})"


def _in(nets: tuple[IPv4Network, ...], raw: bytes) -> bool:
    a = IPv4Address(raw)
    return any(a in n for n in nets)


def offends(frame: bytes, nets: tuple[IPv4Network, ...]) -> str | None:
    """"src", "inner" or None for one Ethernet frame (pure: the watcher's test of a frame)."""
    if len(frame) < 14 + 20:
        return None
    off, etype = 14, struct.unpack_from("!H", frame, 12)[0]
    if etype == ETH_P_8021Q and len(frame) >= 18 + 20:
        off, etype = 18, struct.unpack_from("!H", frame, 16)[0]
    if etype != ETH_P_IP or frame[off] >> 4 != 4:
        return None
    if _in(nets, frame[off + 12 : off + 16]):
        return "src"
    ihl = (frame[off] & 0x0F) * 4
    frag = struct.unpack_from("!H", frame, off + 6)[0] & 0x1FFF
    if frame[off + 9] != 1 or frag or ihl < 20:
        return None
    icmp = off + ihl
    inner = icmp + 8
    if len(frame) < inner + 20 or frame[icmp] not in ICMP_ERRORS:
        return None
    if _in(nets, frame[inner + 12 : inner + 16]) or _in(nets, frame[inner + 16 : inner + 20]):
        return "inner"
    return None


class LeakWatcher:
    """A capture thread on one device of one namespace (see the module docstring)."""

    def __init__(self, ns: str | None, dev: str, nets):
        self.ns, self.dev = ns, dev
        self.nets = tuple(IPv4Network(str(n)) for n in nets)
        self.seen = 0
        self.dropped = 0
        self.leaks: list[LeakFrame] = []
        if ns is None:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        else:
            self.sock = ns_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self.sock.bind((dev, ETH_P_ALL))
        except OSError:
            self.sock.close()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"leakwatch-{dev}", daemon=True)
        self._thread.start()

    def _take(self, frame: bytes, pkttype: int) -> None:
        if pkttype == PACKET_OUTGOING:
            return
        self.seen += 1
        where = offends(frame, self.nets)
        if where is None:
            return
        off = 18 if struct.unpack_from("!H", frame, 12)[0] == ETH_P_8021Q else 14
        self.leaks.append(LeakFrame(time.time(), IPv4Address(frame[off + 12 : off + 16]),
                                    IPv4Address(frame[off + 16 : off + 20]), frame[off + 9], where,
                                    bytes(frame[:256])))  # fmt: skip

    def _drain(self) -> None:
        while True:
            try:
                frame, addr = self.sock.recvfrom(65535, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._take(frame, addr[2])

    def _run(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.sock], [], [], 0.05)
            if r:
                self._drain()

    def stop(self) -> list[LeakFrame]:
        """Stop capturing (frames already queued are still judged); the offending frames."""
        time.sleep(0.05)  # frames in flight on the veth
        self._stop.set()
        self._thread.join(5)
        self._drain()
        try:
            st = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            self.dropped += struct.unpack("II", st)[1]
        except OSError:
            pass
        self.sock.close()
        return list(self.leaks)

    def __enter__(self) -> "LeakWatcher":
        return self

    def __exit__(self, *exc) -> None:
        if not self._stop.is_set():
            self.stop()


class UplinkWatch:
    """Leak watchers on every uplink of a lab (UPLINK_TAPS); ``stop()`` gives the offending
    frames of all, ``seen``/``dropped`` their sums (the lab tiers' one way to watch uplinks)."""

    def __init__(self, lab, nets):
        self.watchers: list[LeakWatcher] = []
        self.leaks: list[LeakFrame] = []
        try:
            for node, dev in UPLINK_TAPS:
                self.watchers.append(LeakWatcher(lab.ns(node), dev, nets))
        except BaseException:
            self.stop()
            raise

    @property
    def seen(self) -> int:
        return sum(w.seen for w in self.watchers)

    @property
    def dropped(self) -> int:
        return sum(w.dropped for w in self.watchers)

    def stop(self) -> list[LeakFrame]:
        leaks: list[LeakFrame] = []
        for w in self.watchers:
            leaks += w.stop() if not w._stop.is_set() else w.leaks
        self.leaks = leaks
        return list(leaks)

    def __enter__(self) -> "UplinkWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def uplinks(lab, nets) -> UplinkWatch:
    """Watch both uplinks of ``lab`` (a snatgw.lab Lab) for frames carrying an address of
    ``nets``; ``.stop()`` (or leaving the ``with``) returns the offending frames."""
    return UplinkWatch(lab, nets)


def start(ns: str | None, dev: str, nets) -> LeakWatcher:
    """Watch ``dev`` in namespace ``ns`` (None: this one) for frames carrying an address of
    ``nets`` (strings or IPv4Network); ``.stop()`` returns the offending frames."""
    return LeakWatcher(ns, dev, nets)
