"""`ip route get ADDR` and the egress device's MTU through rtnetlink (NETLINK_ROUTE), without a
process: RTM_GETROUTE for one IPv4 destination (what `ip route get` sends: the kernel's answer
is the FIB's, policy rules included), then RTM_GETLINK for its device's IFLA_MTU.  The bpf
backend's resolver (route_egress) ran `ip -j route get` and `ip -j link show`, two processes
a route (a few ms each): the session sync installs a peer's records toward new remotes at a
few hundred a second that way; here a route is two datagrams on a socket opened for the call,
in the calling thread's network namespace (a socket kept open would stay in the namespace it
was made in, and callers switch namespaces per thread).

    route_get(IPv4Address("203.0.113.10"))  # (ifindex, next hop, mtu); next hop = addr on-link

With ``src`` and ``iif`` it is `ip route get ADDR from SRC iif DEV`: the route a packet from
``src`` arriving on device ``iif`` is forwarded by, as the datapath asks for a new flow
(bpf_fib_lookup from the inside host on its inside device): policy rules on the source (`ip rule
from`) and a multipath route's choice (hashed on both addresses) give another uplink than the
gateway's own route to ``addr``.

A destination with no route (ENETUNREACH, EHOSTUNREACH, ...) or a route that is not unicast
(local, blackhole, unreachable, prohibit: no device to send by) is a BackendError, worded as
route_egress's was; so is a route whose device is gone by the second request (`ip` answered
with its name, and if_nametoindex failed: an egress of a stale ifindex would drop the session).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

from ..errors import BackendError
from .nftnl import _NLH, _attr, _attrs  # the project's netlink header and attribute codec

RTM_NEWLINK, RTM_GETLINK, RTM_NEWROUTE, RTM_GETROUTE = 16, 18, 24, 26
NLM_F_REQUEST = 0x1
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTA_DST, RTA_SRC, RTA_IIF, RTA_OIF, RTA_GATEWAY = 1, 2, 3, 4, 5
IFLA_MTU = 4
RTN_UNICAST = 1
RTN_NAMES = {0: "unspec", 1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
             7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat", 11: "xresolve"}  # fmt: skip
RECV = 1 << 16
DEFAULT_MTU = 1500  # a device whose MTU cannot be read (gone meanwhile): route_egress's default too

_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_U32 = struct.Struct("=I")


def route_request(addr: ipaddress.IPv4Address, seq: int = 1, src: ipaddress.IPv4Address | None = None,
                  iif: int = 0) -> bytes:
    """RTM_GETROUTE for ``addr`` (/32), as `ip route get` asks (`from SRC iif DEV` with ``src``
    and ``iif``: an input route lookup)."""
    body = _RTMSG.pack(socket.AF_INET, 32, 32 if src is not None else 0, 0, 0, 0, 0, 0, 0)
    body += _attr(RTA_DST, addr.packed)
    if src is not None:
        body += _attr(RTA_SRC, ipaddress.IPv4Address(src).packed)
    if iif:
        body += _attr(RTA_IIF, _U32.pack(iif))
    return _NLH.pack(_NLH.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0) + body


def link_request(ifindex: int, seq: int = 2) -> bytes:
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0)
    return _NLH.pack(_NLH.size + len(body), RTM_GETLINK, NLM_F_REQUEST, seq, 0) + body


def _answer(sock: socket.socket, msg: bytes, want: int, what: str) -> tuple[bytes, int, int]:
    """Send ``msg``; (buffer, payload start, end) of the answer of type ``want``, or OSError
    with the kernel's errno."""
    sock.send(msg)
    seq = _NLH.unpack_from(msg)[3]
    while True:
        buf = sock.recv(RECV)
        off = 0
        while off + _NLH.size <= len(buf):
            ln, typ, _flags, mseq, _pid = _NLH.unpack_from(buf, off)
            if ln < _NLH.size:
                break
            if mseq == seq:
                if typ == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", buf, off + _NLH.size)[0]
                    raise OSError(err or errno.EIO, os.strerror(err or errno.EIO))
                if typ == want:
                    return buf, off + _NLH.size, off + ln
                if typ == NLMSG_DONE:
                    raise OSError(errno.ENOENT, f"no answer to {what}")
            off += (ln + 3) & ~3


def parse_route(buf: bytes, off: int, end: int, addr: ipaddress.IPv4Address) -> tuple[int, ipaddress.IPv4Address]:
    """(ifindex, next hop) of an RTM_NEWROUTE answer; BackendError when it is no unicast route."""
    rtype = _RTMSG.unpack_from(buf, off)[7]
    if rtype != RTN_UNICAST:
        raise BackendError(f"route to {addr} is {RTN_NAMES.get(rtype, rtype)} (no device): cannot send there")
    oif, gw = 0, None
    for typ, a, b in _attrs(buf, off + _RTMSG.size, end):
        if typ == RTA_OIF and b - a >= 4:
            oif = _U32.unpack_from(buf, a)[0]
        elif typ == RTA_GATEWAY and b - a == 4:
            gw = ipaddress.IPv4Address(buf[a:b])
    if not oif:
        raise BackendError(f"route to {addr} has no device: cannot send there")
    return oif, gw or addr


def parse_mtu(buf: bytes, off: int, end: int) -> int:
    for typ, a, b in _attrs(buf, off + _IFINFO.size, end):
        if typ == IFLA_MTU and b - a >= 4:
            return _U32.unpack_from(buf, a)[0]
    return DEFAULT_MTU


def route_get(addr: ipaddress.IPv4Address, src: ipaddress.IPv4Address | None = None,
              iif: int = 0) -> tuple[int, ipaddress.IPv4Address, int]:
    """(egress ifindex, next hop, the device's MTU) of the route to ``addr`` in the calling
    thread's network namespace (the next hop is ``addr`` itself on-link); with ``src`` and
    ``iif``, of the route a packet from ``src`` arriving on ``iif`` is forwarded by."""
    addr = ipaddress.IPv4Address(addr)
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    except OSError as e:
        raise BackendError(f"no route to {addr}: rtnetlink: {e.strerror or e}") from None
    try:
        sock.settimeout(10)
        sock.bind((0, 0))
        try:
            answer = _answer(sock, route_request(addr, 1, src, iif), RTM_NEWROUTE, "route get")
            oif, nexthop = parse_route(*answer, addr)
        except OSError as e:
            raise BackendError(f"no route to {addr}: {e.strerror or e}") from None
        try:
            mtu = parse_mtu(*_answer(sock, link_request(oif), RTM_NEWLINK, "link get"))
        except OSError as e:
            if e.errno == errno.ENODEV:  # the device went meanwhile: no egress (the route's ifindex is stale)
                raise BackendError(f"no route to {addr}: its device (ifindex {oif}) is gone") from None
            mtu = DEFAULT_MTU
        return oif, nexthop, int(mtu)
    finally:
        sock.close()
