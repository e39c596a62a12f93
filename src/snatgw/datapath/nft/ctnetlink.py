"""Kernel conntrack through ctnetlink (NETLINK_NETFILTER, the interface `conntrack -L` uses),
streamed and filtered in the kernel: the nft backend's sessions and counts at a million
conntrack entries without reading /proc/net/nf_conntrack as text.

``dump(mark, mask)`` sends one IPCTNL_MSG_CT_GET dump request carrying CTA_MARK/CTA_MARK_MASK,
so the kernel returns only the entries whose ``mark & mask == mark`` (snatgw's tag); replies
are parsed one recv() buffer at a time into dicts shaped like ``parse_conntrack``'s.
``count_by_mark(mark, mask)`` walks the same dump reading only each entry's mark.

What the kernel limits: ctnetlink has no count by mark (IPCTNL_MSG_CT_GET_STATS gives the
global entry count only, as `conntrack -C`), so a per-rule or snatgw-only count is a dump of
snatgw's entries: O(entries) in the kernel and here, however few of them are wanted.  The dump
filter is by mark (and, since Linux 5.8, by tuple with CTA_FILTER); the protocol, address and
state filters of `snatgw conns` are applied here, while streaming.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from ipaddress import IPv4Address
from typing import Iterator

from ...errors import BackendError
from ..nftnl import _attr, _attrs  # the project's netlink attribute codec

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3

# enum ctattr_type
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO = 1, 2, 3, 4
CTA_TIMEOUT, CTA_MARK, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_MARK_MASK = 7, 8, 9, 10, 21
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_ID = 1, 2, 3, 4
CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 5, 6
NLA_F_NESTED = 0x8000
ICMP_ECHO = 8
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
IPS_ASSURED = 1 << 2

TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
              "TIME_WAIT", "CLOSE", "SYN_SENT2")  # fmt: skip
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 132: "sctp", 136: "udplite"}

_NLH = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
RECV = 1 << 20  # bytes per recv(): the dump is read this much at a time


def _tuple(buf: bytes, off: int, end: int, d: dict, prefix: str) -> None:
    for t, a, b in _attrs(buf, off, end):
        if t == CTA_TUPLE_IP:
            for t2, a2, b2 in _attrs(buf, a, b):
                if t2 == CTA_IP_V4_SRC and b2 - a2 == 4:
                    d[prefix + "src"] = str(IPv4Address(buf[a2:b2]))
                elif t2 == CTA_IP_V4_DST and b2 - a2 == 4:
                    d[prefix + "dst"] = str(IPv4Address(buf[a2:b2]))
        elif t == CTA_TUPLE_PROTO:
            for t2, a2, b2 in _attrs(buf, a, b):
                if t2 == CTA_PROTO_NUM and not prefix:
                    d["protonum"] = buf[a2]
                elif t2 == CTA_PROTO_SRC_PORT:
                    d[prefix + "sport"] = str(int.from_bytes(buf[a2:a2 + 2], "big"))
                elif t2 == CTA_PROTO_DST_PORT:
                    d[prefix + "dport"] = str(int.from_bytes(buf[a2:a2 + 2], "big"))
                elif t2 == CTA_PROTO_ICMP_ID:  # echo: the identifier stands for both ports
                    ident = str(int.from_bytes(buf[a2:a2 + 2], "big"))
                    d[prefix + "sport"] = d[prefix + "dport"] = ident


def parse_entry(buf: bytes, off: int, end: int) -> dict:
    """One IPCTNL_MSG_CT_NEW message body (after nlmsghdr + nfgenmsg) -> dict."""
    d: dict = {"timeout": 0, "state": None, "mark": 0, "assured": False}
    for t, a, b in _attrs(buf, off, end):
        if t == CTA_TUPLE_ORIG:
            _tuple(buf, a, b, d, "")
        elif t == CTA_TUPLE_REPLY:
            _tuple(buf, a, b, d, "r")
        elif t == CTA_STATUS:
            d["assured"] = bool(int.from_bytes(buf[a:b], "big") & IPS_ASSURED)
        elif t == CTA_TIMEOUT:
            d["timeout"] = int.from_bytes(buf[a:b], "big")
        elif t == CTA_MARK:
            d["mark"] = int.from_bytes(buf[a:b], "big")
        elif t == CTA_PROTOINFO:
            for t2, a2, b2 in _attrs(buf, a, b):
                if t2 == CTA_PROTOINFO_TCP:
                    for t3, a3, _ in _attrs(buf, a2, b2):
                        if t3 == CTA_PROTOINFO_TCP_STATE:
                            s = buf[a3]
                            d["state"] = TCP_STATES[s] if s < len(TCP_STATES) else str(s)
        elif t in (CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY):
            p = "" if t == CTA_COUNTERS_ORIG else "r"
            for t2, a2, b2 in _attrs(buf, a, b):
                if t2 == CTA_COUNTERS_PACKETS:
                    d[p + "packets"] = str(int.from_bytes(buf[a2:b2], "big"))
                elif t2 == CTA_COUNTERS_BYTES:
                    d[p + "bytes"] = str(int.from_bytes(buf[a2:b2], "big"))
    num = d.pop("protonum", 0)
    d["proto"] = PROTO_NAMES.get(num, str(num))
    return d


def _mark_of(buf: bytes, off: int, end: int) -> int:
    for t, a, b in _attrs(buf, off, end):
        if t == CTA_MARK:
            return int.from_bytes(buf[a:b], "big")
    return 0


class Conntrack:
    """A ctnetlink socket in the calling thread's network namespace (or ``netns``)."""

    def __init__(self, netns: str | None = None):
        if netns:
            from ..netns import enter

            with enter(netns):
                self.sock = self._open()
        else:
            self.sock = self._open()
        self.seq = 0

    @staticmethod
    def _open() -> socket.socket:
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as e:
            raise BackendError(f"ctnetlink: cannot open a netfilter netlink socket: {e.strerror}") from None
        s.bind((0, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV)
        return s

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, mark: int | None, mask: int | None) -> None:
        self.seq += 1
        body = _NFGEN.pack(socket.AF_INET, 0, 0)
        if mark is not None:
            body += _attr(CTA_MARK, struct.pack(">I", mark))
            body += _attr(CTA_MARK_MASK, struct.pack(">I", mask if mask is not None else 0xFFFFFFFF))
        msg = _NLH.pack(_NLH.size + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
                        NLM_F_REQUEST | NLM_F_DUMP, self.seq, 0) + body  # fmt: skip
        self.sock.send(msg)

    def _replies(self, what: str) -> Iterator[tuple[int, bytes, int, int]]:
        """(type, buffer, payload start, end) of each message answering the last request (its
        sequence number), until a malformed header; ``what`` names the request in errors."""
        while True:
            try:
                buf = self.sock.recv(RECV)
            except OSError as e:
                raise BackendError(f"ctnetlink {what}: {e.strerror}") from None
            off = 0
            while off + _NLH.size <= len(buf):
                ln, typ, _flags, seq, _pid = _NLH.unpack_from(buf, off)
                if ln < _NLH.size:
                    return
                if seq == self.seq:
                    yield typ, buf, off + _NLH.size, off + ln
                off += (ln + 3) & ~3

    def _messages(self, mark, mask) -> Iterator[tuple[bytes, int, int]]:
        """(buffer, body start, body end) of each conntrack entry of the dump."""
        self._request(mark, mask)
        for typ, buf, a, b in self._replies("dump"):
            if typ == NLMSG_DONE:
                return
            if typ == NLMSG_ERROR:
                err = -struct.unpack_from("=i", buf, a)[0]
                if err:
                    raise BackendError(f"ctnetlink dump: {os.strerror(err)}")
                return
            yield buf, a + _NFGEN.size, b

    def dump(self, mark: int | None = None, mask: int | None = None) -> Iterator[dict]:
        """IPv4 conntrack entries (``mark & mask == mark`` when given, filtered in the kernel)."""
        for buf, a, b in self._messages(mark, mask):
            yield parse_entry(buf, a, b)

    def get(self, src: str, sport: int, dst: str, dport: int, proto: int) -> dict | None:
        """The entry whose original tuple is (src, sport, dst, dport, proto), one
        IPCTNL_MSG_CT_GET without NLM_F_DUMP (`conntrack -G`): the kernel looks it up in its
        hash; None when there is none.  ICMP: an echo request's, ``sport`` its identifier
        (``dport`` unused)."""
        be16 = struct.Struct(">H").pack
        ip = _attr(CTA_IP_V4_SRC, IPv4Address(src).packed) + _attr(CTA_IP_V4_DST, IPv4Address(dst).packed)
        l4 = _attr(CTA_PROTO_NUM, bytes([proto]))
        if proto == 1:
            l4 += (_attr(CTA_PROTO_ICMP_ID, be16(sport)) + _attr(CTA_PROTO_ICMP_TYPE, bytes([ICMP_ECHO]))
                   + _attr(CTA_PROTO_ICMP_CODE, b"\0"))  # fmt: skip
        else:
            l4 += _attr(CTA_PROTO_SRC_PORT, be16(sport)) + _attr(CTA_PROTO_DST_PORT, be16(dport))
        tup = _attr(CTA_TUPLE_IP | NLA_F_NESTED, ip) + _attr(CTA_TUPLE_PROTO | NLA_F_NESTED, l4)
        body = _NFGEN.pack(socket.AF_INET, 0, 0) + _attr(CTA_TUPLE_ORIG | NLA_F_NESTED, tup)
        self.seq += 1
        self.sock.send(_NLH.pack(_NLH.size + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
                                 NLM_F_REQUEST, self.seq, 0) + body)  # fmt: skip
        for typ, buf, a, b in self._replies("get"):
            if typ == NLMSG_ERROR:
                err = -struct.unpack_from("=i", buf, a)[0]
                if err in (0, errno.ENOENT):
                    return None
                raise BackendError(f"ctnetlink get: {os.strerror(err)}")
            if typ >> 8 == NFNL_SUBSYS_CTNETLINK:
                return parse_entry(buf, a + _NFGEN.size, b)
        return None

    def count_by_mark(self, mark: int | None = None, mask: int | None = None) -> dict[int, int]:
        """{ct mark: entries} of the dump (only each entry's mark is read)."""
        out: dict[int, int] = {}
        for buf, a, b in self._messages(mark, mask):
            m = _mark_of(buf, a, b)
            out[m] = out.get(m, 0) + 1
        return out


# --------------------------------------------------------------------------- events (audit log)

NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY = 1, 3
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE = 0, 2
CTA_TIMESTAMP, CTA_TIMESTAMP_START, CTA_TIMESTAMP_STOP = 20, 1, 2
SOL_NETLINK = 270
EVENTS_RCVBUF = 8 << 20  # bytes the kernel may queue for us before it reports ENOBUFS


class ConntrackEvents:
    """Conntrack NEW and DESTROY events (the multicast groups `conntrack -E` reads) of the
    entries whose ``mark & mask == mark`` (snatgw's tag), as the audit log's record dicts.

    ``fileno()`` goes into the daemon's event loop; ``drain(limit)`` reads what is queued,
    never blocking, at most ``limit`` records.  Events the kernel could not queue (the socket
    buffer full: ENOBUFS) are lost; ``counts()["lost"]`` counts the overruns (the kernel does
    not say how many events each one cost).  Event time is when we read it (conntrack's own
    start/stop stamps are used when nf_conntrack_timestamp is on).  ``rule_of(mark)`` names a
    mark's rule (the nft backend's current map)."""

    def __init__(self, mark: int, mask: int, rule_of=None, netns: str | None = None):
        self.mark, self.mask, self.rule_of = mark, mask, rule_of or (lambda m: 0)
        if netns:
            from ..netns import enter

            with enter(netns):
                self.sock = self._open()
        else:
            self.sock = self._open()
        self.overruns = 0
        self.seen = 0  # events of our entries read

    @staticmethod
    def _open() -> socket.socket:
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                              NETLINK_NETFILTER)  # fmt: skip
        except OSError as e:
            raise BackendError(f"ctnetlink: cannot open a netfilter netlink socket: {e.strerror}") from None
        try:
            s.setsockopt(socket.SOL_SOCKET, 33, EVENTS_RCVBUF)  # SO_RCVBUFFORCE (root)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, EVENTS_RCVBUF)
        groups = (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
        try:
            s.bind((0, groups))
        except OSError as e:
            s.close()
            raise BackendError(f"ctnetlink: cannot subscribe to conntrack events: {e.strerror}") from None
        return s

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self, limit: int = 4096) -> list[dict]:
        out: list[dict] = []
        while len(out) < limit:
            try:
                buf = self.sock.recv(RECV)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno == 105:  # ENOBUFS: the kernel dropped events; the socket goes on
                    self.overruns += 1
                    continue
                raise BackendError(f"ctnetlink events: {e.strerror}") from None
            if not buf:
                break
            self._parse(buf, out)
        return out

    def _parse(self, buf: bytes, out: list[dict]) -> None:
        off = 0
        now = time.time()
        while off + _NLH.size <= len(buf):
            ln, typ, _flags, _seq, _pid = _NLH.unpack_from(buf, off)
            if ln < _NLH.size:
                return
            sub, msg = typ >> 8, typ & 0xFF
            body = off + _NLH.size
            if sub == NFNL_SUBSYS_CTNETLINK and msg in (IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE) and \
                    buf[body] == socket.AF_INET:
                a, b = body + _NFGEN.size, off + ln
                m = _mark_of(buf, a, b)
                if m & self.mask == self.mark:
                    d = parse_entry(buf, a, b)
                    self.seen += 1
                    out.append(self._record(d, m, msg == IPCTNL_MSG_CT_DELETE, _stamps(buf, a, b), now))
            off += (ln + 3) & ~3

    def _record(self, d: dict, mark: int, end: bool, stamps: tuple, now: float) -> dict:
        def port(k):
            v = d.get(k)
            return int(v) if v is not None else 0

        start, stop = stamps
        rec = {
            "event": "end" if end else "create", "time": (stop or now) if end else (start or now),
            "proto": d.get("proto"),
            "inside_addr": d.get("src"), "inside_port": port("sport"),
            "nat_addr": d.get("rdst"), "nat_port": port("rdport"),
            "remote_addr": d.get("dst"), "remote_port": 0 if d.get("proto") == "icmp" else port("dport"),
            "rule_id": self.rule_of(mark),
        }  # fmt: skip
        if end:
            rec["why"] = "destroyed"
            if d.get("state"):
                rec["state"] = d["state"]
            for k in ("packets", "bytes", "rpackets", "rbytes"):
                if d.get(k) is not None:
                    rec[k] = int(d[k])
        return rec

    def counts(self) -> dict[str, int]:
        return {"lost": self.overruns, "seen": self.seen}

    def close(self) -> None:
        self.sock.close()


def _stamps(buf: bytes, off: int, end: int) -> tuple[float | None, float | None]:
    """CTA_TIMESTAMP start/stop (ns, CLOCK_REALTIME) as Unix seconds (None when absent)."""
    start = stop = None
    for t, a, b in _attrs(buf, off, end):
        if t == CTA_TIMESTAMP:
            for t2, a2, b2 in _attrs(buf, a, b):
                if b2 - a2 == 8 and t2 in (CTA_TIMESTAMP_START, CTA_TIMESTAMP_STOP):
                    v = int.from_bytes(buf[a2:b2], "big") / 1e9
                    if t2 == CTA_TIMESTAMP_START:
                        start = v
                    else:
                        stop = v
    return start, stop
