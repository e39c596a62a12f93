"""ICMP echo probes through one uplink, and the daemon's netlink events (carrier, IPv4 policy
rules and forwarding switches): the I/O side of link health (snatgw.daemon.linkstate is the
logic, snatgw.daemon.links wires both to the loop) and of the route-back judgement
(snatgw.fibrules; the daemon's extras re-judge on those events).

A probe must test the ISP behind the link, whatever the routing table says about the target
(the default route usually points at one ISP only).  So each echo request is written whole
(IP header with the link's source address, ICMP echo) on a raw IPPROTO_RAW socket bound to the
link's device, and handed to the kernel with the *next hop* as the destination: the kernel
routes toward the next hop (on-link on that device), so the frame goes to the ISP router's
MAC while the IP destination is the target.  No route, rule or neighbour entry is added.
Replies come back to the source address on that device; a raw ICMP socket bound to the device
reads them (a bounded batch per wake-up).  Under strict reverse-path filtering (rp_filter=1)
the kernel may drop replies from a target it routes by another link; Debian's default (2,
loose) and 0 accept them.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import struct
import subprocess
from ipaddress import IPv4Address

from ..config.links import Link
from ..errors import SnatgwError

ICMP_ECHO, ICMP_ECHOREPLY = 8, 0
PAYLOAD = b"snatgw-probe"
DRAIN_MAX = 64  # replies read per wake-up: bounded work per callback
IFF_UP, IFF_LOWER_UP = 0x1, 0x10000
RTMGRP_LINK = 1
RTMGRP_IPV4_RULE = 0x80  # RTNLGRP_IPV4_RULE (8): ip rule add/del
RTMGRP_IPV4_NETCONF = 1 << 23  # RTNLGRP_IPV4_NETCONF (24): a device's forwarding switch changed
#: rtnetlink events that may change whether a FIB lookup depends on its input device
ROUTE_BACK_EVENTS = ("RTM_NEWRULE", "RTM_DELRULE", "RTM_NEWNETCONF", "RTM_DELNETCONF")


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def echo_request(src: IPv4Address, dst: IPv4Address, ident: int, seq: int, ttl: int = 64) -> bytes:
    icmp = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, ident, seq) + PAYLOAD
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0x4000, ttl, socket.IPPROTO_ICMP, 0,
                     src.packed, dst.packed)  # fmt: skip
    return ip[:10] + struct.pack("!H", csum(ip)) + ip[12:] + icmp


def parse_reply(pkt: bytes, ident: int) -> tuple[IPv4Address, IPv4Address, int] | None:
    """(source, destination, sequence) of an echo reply with our identifier, else None."""
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    if pkt[9] != socket.IPPROTO_ICMP or len(pkt) < ihl + 8:
        return None
    typ, _code, _sum, rid, seq = struct.unpack("!BBHHH", pkt[ihl : ihl + 8])
    if typ != ICMP_ECHOREPLY or rid != ident:
        return None
    return IPv4Address(pkt[12:16]), IPv4Address(pkt[16:20]), seq


def _ip_json(*args: str) -> list:
    p = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=10)
    if p.returncode != 0:
        raise SnatgwError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return json.loads(p.stdout or "[]")


def resolve(link: Link) -> tuple[str, IPv4Address]:
    """The link's device (its oif, else the route to its gw) and probe source (its source,
    else the device's address in the gw's subnet, else its first address)."""
    dev = link.oif
    if dev is None:
        routes = _ip_json("route", "get", str(link.gw))
        dev = routes[0].get("dev") if routes else None
        if not dev:
            raise SnatgwError(f"link {link.name}: no route to its gw {link.gw}; give oif")
    if link.source is not None:
        return dev, link.source
    addrs = [ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
             for i in _ip_json("-4", "addr", "show", "dev", dev) for a in i.get("addr_info", [])]
    inside = [a.ip for a in addrs if link.gw in a.network and a.network.prefixlen < 32]
    if not (inside or addrs):
        raise SnatgwError(f"link {link.name}: {dev} has no IPv4 address to probe from; give source")
    return dev, (inside or [a.ip for a in addrs])[0]


class Prober:
    """The sockets of one link's probes.  ``open()`` may fail (device missing): the caller
    counts the link as without carrier and tries again later."""

    def __init__(self, link: Link, ident: int):
        self.link, self.ident = link, ident & 0xFFFF
        self.dev: str | None = None
        self.source: IPv4Address | None = None
        self.tx: socket.socket | None = None
        self.rx: socket.socket | None = None
        self.sent = self.received = self.send_errors = 0
        self.last_error: str | None = None

    def open(self) -> None:
        self.close()
        self.dev, self.source = resolve(self.link)
        tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        try:
            for s in (tx, rx):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.dev.encode())
                s.setblocking(False)
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        except OSError:
            tx.close()
            rx.close()
            raise
        self.tx, self.rx = tx, rx

    def send_round(self, rnd: int) -> int:
        """One echo request per target (sequence = round mod 2^16); returns how many left."""
        if self.tx is None:
            return 0
        n = 0
        for target in self.link.probe:
            try:
                self.tx.sendto(echo_request(self.source, target, self.ident, rnd & 0xFFFF), (str(self.link.gw), 0))
                n += 1
            except OSError as e:  # ENETDOWN, ENETUNREACH, ENXIO (device gone), EAGAIN (queue full)
                self.send_errors += 1
                self.last_error = f"{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)})"
        self.sent += n
        return n

    def drain(self) -> list[int]:
        """Sequence numbers of our echo replies waiting on the socket (at most DRAIN_MAX read)."""
        out = []
        if self.rx is None:
            return out
        targets = set(self.link.probe)
        for _ in range(DRAIN_MAX):
            try:
                pkt = self.rx.recv(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            got = parse_reply(pkt, self.ident)
            if got is not None and got[0] in targets and got[1] == self.source:
                out.append(got[2])
                self.received += 1
        return out

    def close(self) -> None:
        for s in (self.tx, self.rx):
            if s is not None:
                s.close()
        self.tx = self.rx = None


class NetlinkWatch:
    """The daemon's one rtnetlink socket (RTMGRP_LINK | RTMGRP_IPV4_RULE | RTMGRP_IPV4_NETCONF),
    read on the loop: ``fileno()`` for add_reader, ``read()`` -> ([(device, carrier)] changes
    of the ``track``ed devices, whether an IPv4 rule or forwarding switch changed).  Our own
    non-blocking socket, decoded by pyroute2: pyroute2's IPRoute buffers events internally, so
    its fd's readiness does not say when one is waiting.  A batch of events is bounded per
    read (DRAIN_MAX datagrams); lost events (ENOBUFS) count as a rule change (re-judged from a
    fresh dump) and have the tracked devices' carrier asked again (a link dump), the events
    still queued from before it dropped unread (older than the dump, they could undo it)."""

    def __init__(self):
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl

        self.devices: set[str] = set()
        self.state: dict[str, bool] = {}
        self.marshal = MarshalRtnl()
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_RULE | RTMGRP_IPV4_NETCONF))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise

    def track(self, devices) -> None:
        """Carrier of these devices from now on (the state now: events only say what changes)."""
        from pyroute2 import IPRoute

        self.devices = set(devices)
        self.state = {d: False for d in self.devices}
        if self.devices:
            with IPRoute() as ipr:
                for msg in ipr.get_links():
                    self._take(msg)

    def _take(self, msg) -> tuple[str, bool] | None:
        name = msg.get_attr("IFLA_IFNAME")
        if name not in self.devices:
            return None
        on = msg.get("event") != "RTM_DELLINK" and (msg["flags"] & (IFF_UP | IFF_LOWER_UP)) == (IFF_UP | IFF_LOWER_UP)
        if self.state.get(name) == on:
            return None
        self.state[name] = on
        return name, on

    def _resync(self) -> list[tuple[str, bool]]:
        """Events were lost: the tracked devices' carrier as the kernel has it now (one link
        dump), as changes.  Rule and forwarding events share this socket, so a burst of them
        can push out a carrier loss that no later event would report."""
        if not self.devices:
            return []
        from pyroute2 import IPRoute

        out, seen = [], set()
        try:
            with IPRoute() as ipr:
                for msg in ipr.get_links():
                    seen.add(msg.get_attr("IFLA_IFNAME"))
                    got = self._take(msg)
                    if got:
                        out.append(got)
        except Exception:  # noqa: BLE001 - no dump either: the next events (and the probes) tell
            return out
        for dev in sorted(self.devices - seen):  # gone meanwhile
            if self.state.get(dev):
                self.state[dev] = False
                out.append((dev, False))
        return out

    def _discard_queued(self) -> None:
        """Before the dump that follows a loss: the events still queued are older than it (a
        carrier-up the kernel queued before the loss, read after the dump, would undo the
        carrier loss the dump reported), so they go unread; the dump has their effect.  Bounded
        like a read: events still arriving after DRAIN_MAX datagrams are newer anyway."""
        for _ in range(DRAIN_MAX):
            try:
                self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # lost again meanwhile: the dump comes after this too
                continue

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> tuple[list[tuple[str, bool]], bool]:
        out, rules = [], False
        for _ in range(DRAIN_MAX):
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ENOBUFS: events were lost (rules: judge again; carrier: asked now)
                rules = True
                self._discard_queued()
                out += self._resync()
                break
            for msg in self.marshal.parse(data):
                ev = msg.get("event")
                if ev in ("RTM_NEWLINK", "RTM_DELLINK"):
                    got = self._take(msg)
                    if got:
                        out.append(got)
                elif ev in ROUTE_BACK_EVENTS:
                    rules = True
        return out, rules

    def close(self) -> None:
        self.sock.close()


def probe_ident(index: int) -> int:
    """An echo identifier per link of this daemon (pid-based, so two daemons differ)."""
    return (os.getpid() * 31 + index * 7919) & 0xFFFF
