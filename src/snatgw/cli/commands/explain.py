"""`snatgw explain CONFIG --proto P --src IP:PORT --dst IP:PORT --oif IF --gw IP`: what the
gateway would do with one packet arriving from inside.  The packet is built here and run
through the reference model (snatgw.model.Engine) with a router that answers the given route
(or the host's FIB, read only, with --route-from-kernel).  With --live the rules are the running
daemon's (control op `rules`), compared with the file.  Exit 0 matched, 1 none, 2 bad input."""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from ...config.parse import parse_file, shown
from ...errors import EXIT_NO_MATCH, EXIT_OK, SnatgwError
from ...layout import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, REFUSED_SECS, SPILL_MEMO_MS, Reason, Verdict
from ...rules import Route, Rule, RuleSet, parse_addr, parse_oif
from ..render import dump_json, table

HELP = "show which rule, SNAT address, port and next hop a packet would get"
DESCRIPTION = """\
Run one packet from an inside host through the reference model of the datapath and show every
rule in priority order with MATCH or why not, the SNAT address and port, the next hop and egress
interface after new_gw, and the rewritten packet.  The route (egress interface and next hop) of
the destination is --oif/--gw, or the host's routing table with --route-from-kernel.

With --live the rules come from the running daemon (what it translates with now, including
`snatgw adm` changes), and the output says whether they differ from CONFIG (default: the file
the daemon runs) and how; settings still come from CONFIG.

The port search is judged against the running gateway's table (its sessions toward the
destination, the source's sessions, the flow's own session looked up by itself, its spill
memos) with --live, and also without it when a daemon answers on the control socket (--socket,
$SNATGW_SOCKET or CONFIG's control_socket) and runs CONFIG itself; --offline judges against an
empty table whatever runs.  With that table (bpf) the
flow's refusal marker is read too: refused less than 2 s ago, its packets are dropped now as
DROP_REFUSED_RECENTLY whatever the judgement says, and a line after the verdict says so.
Exit status: 0 a rule matched (or the flow's live session translates it), 1 no rule matched,
2 bad input, 4 no daemon (--live).
"""

PROTOS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "icmp": IPPROTO_ICMP}
TCP_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20, "E": 0x40, "C": 0x80}
ICMP_ECHO = 8


#: the model answers as the bpf datapath; with the nft backend the kernel's nf_nat picks
#: why a packet some rule matches takes no rule (docs/datapath.md, steps 2a and 7)
BEFORE_RULES = {
    Reason.DROP_SPOOFED: ("its source {src} is not routed back via {iif}, the device it arrives on, or is a "
                          "gateway or pool address (the reverse-path check, step 2a; --iif names the device)"),
    Reason.PASS_INTERNAL: "the route leaves by an inside device: traffic between inside networks is never translated",
    Reason.PASS_LOCAL: "it is for the gateway itself, or multicast or broadcast: the kernel's",
    Reason.PASS_NO_ROUTE: "the routing table has no route for it: the kernel answers",
    Reason.XLATE_OUT: ("the flow has a session in the running table (looked up by its 5-tuple): its packets "
                       "take the session's SNAT address and port, whatever the rules say now"),
}

NFT_NOTE = ("backend nft: the kernel's nf_nat picks the SNAT address within the pool and the port "
            "(no spill-over, no spill memo, no port_tries): the address, port and spill lines above are "
            "the bpf datapath's (docs/nftables.md)")


def refusal_of(reason: Reason, backend: str | None) -> dict | None:
    """What a refused flow's later packets meet (explain's ``refusal``; None unless the verdict
    is DROP_PORT_EXHAUSTED or DROP_HOST_LIMIT): ``marker`` (with ``marker_s``, how long it
    holds), ``later_packets`` (the reason they get meanwhile) and the ``note`` text shows.
    bpf: its refusal marker drops them as DROP_REFUSED_RECENTLY without a search for
    REFUSED_SECS, then they are judged again.  nft keeps no marker: each later packet is judged
    again (nf_nat searches for a port again, or the host's `ct count` is asked again), refused
    as long as the pool or the limit is full."""
    if reason not in (Reason.DROP_PORT_EXHAUSTED, Reason.DROP_HOST_LIMIT):
        return None
    if backend == "nft":
        again = ("nf_nat searches the pool for a port again" if reason == Reason.DROP_PORT_EXHAUSTED
                 else "the host's sessions are counted against the limit again (ct count)")  # fmt: skip
        return {"backend": "nft", "marker": False, "marker_s": None, "later_packets": reason.name,
                "note": f"refused: backend nft keeps no refusal marker: each later packet of the flow is judged "
                        f"again ({again}) and refused as {reason.name} while that lasts"}  # fmt: skip
    return {"backend": "bpf", "marker": True, "marker_s": REFUSED_SECS,
            "later_packets": Reason.DROP_REFUSED_RECENTLY.name,
            "note": f"refused: a refusal marker remembers the flow for {REFUSED_SECS} s: its later packets meanwhile "
                    "are dropped as DROP_REFUSED_RECENTLY without a search (a reload or restart changing the "
                    "rules, port_range, port_tries or the devices forgets the markers); after that it is judged again"}  # fmt: skip


REFUSAL_WHY = {Reason.DROP_PORT_EXHAUSTED.name: "no free port", Reason.DROP_HOST_LIMIT.name: "its host at its limit"}


def marker_of(got: dict | None, own_session: bool) -> dict | None:
    """explain's ``refusal_marker``: the running gateway's refusal marker under the flow's OUT
    key (control op refusal_marker: bpf, None when there is none or it is REFUSED_SECS old;
    nft keeps none), as ``reason`` it was refused for, ``addr`` (the SNAT address tried last),
    ``age_s``, ``left_s`` until it ages out, ``met`` (False: the flow has a session, which its
    packets take first) and the ``note`` text shows.  Meanwhile its packets are dropped as
    DROP_REFUSED_RECENTLY without a search, whatever explain judges; then judged again."""
    if not got:
        return None
    try:
        age = max(0.0, int(got["age_ms"]) / 1000)
        reason, addr = str(got["reason"]), str(got["addr"])
    except (KeyError, TypeError, ValueError):
        return None  # a malformed answer: no marker to speak of
    left = max(0.0, REFUSED_SECS - age)
    why = f"{reason}, {REFUSAL_WHY[reason]}" if reason in REFUSAL_WHY else reason
    if own_session:
        note = (f"refusal marker: the flow was refused ({why}) at {addr} {age:.1f} s ago, but it has a session now, "
                "which its packets take first: the marker is not met")
    else:
        note = (f"refusal marker: the flow was refused ({why}) at {addr} {age:.1f} s ago: its packets are dropped as "
                f"DROP_REFUSED_RECENTLY without a search until the marker ages out in {left:.1f} s (it lives "
                f"{REFUSED_SECS} s), then judged again (as above, if nothing changes)")
    return {"reason": reason, "addr": addr, "age_s": round(age, 3), "left_s": round(left, 3),
            "marker_s": REFUSED_SECS, "met": not own_session,
            "packets": None if own_session else Reason.DROP_REFUSED_RECENTLY.name, "note": note}


def own_session(sessions: list[dict] | None, s: "Summary") -> dict | None:
    """The flow of ``s`` itself among the live ``sessions`` (Session.as_dict), else None."""
    proto = {v: k for k, v in PROTOS.items()}.get(s.proto)
    for x in sessions or ():
        try:
            (src, sport), (dst, dport) = _endpoint(x["inside"]), _endpoint(x["remote"])
        except (KeyError, TypeError, ValueError):
            continue
        if x.get("proto") == proto and (src, sport, dst) == (s.src, s.sport, s.dst) and (
                s.proto == IPPROTO_ICMP or dport == s.dport):
            return x
    return None


def session_of(cfg, own: dict | None, reason: Reason) -> dict | None:
    """explain's ``session``: the flow's own live session when it decides the verdict
    (XLATE_OUT): its SNAT address and port and the rule it was made under (by rule id; null
    when a reload has removed that rule since), else None."""
    if own is None or reason != Reason.XLATE_OUT:
        return None
    rule = next((r for r in cfg.rules if r.rule_id == own.get("rule_id")), None)
    return {"nat": own.get("nat"), "state": own.get("state"), "rule_id": own.get("rule_id"),
            "rule": None if rule is None else {"rule": rule.describe(), "where": rule.where}}  # fmt: skip


def flow_request(op: str, pkt: bytes) -> dict:
    """A request naming the packet's flow by its OUT key (ops refusal_marker and session)."""
    s = summarize(pkt)
    return {"op": op, "host": str(s.src), "sport": s.sport, "remote": str(s.dst),
            "dport": 0 if s.proto == IPPROTO_ICMP else s.dport, "proto": s.proto}


def live_marker(sock: str, pkt: bytes) -> dict | None:
    """The daemon's answer to refusal_marker for the packet's OUT key (None from a daemon that
    does not know the op: one from before 1 Dec 2026)."""
    from ...daemon.client import RemoteError, call

    try:
        return call(sock, flow_request("refusal_marker", pkt)).get("marker")
    except RemoteError as e:
        if "unknown request op" in str(e):
            return None
        raise


def live_session(sock: str, pkt: bytes) -> tuple[bool, dict | None]:
    """The flow's own session, looked up by its OUT key (op session: bpf one lookup in the
    session table, nft conntrack by the tuple), whatever a listing's cut: (True, the session
    or None), or (False, None) from a daemon that does not know the op (one from before
    1 Dec 2026, which only lists)."""
    from ...daemon.client import RemoteError, call

    try:
        got = call(sock, flow_request("session", pkt)).get("session")
    except RemoteError as e:
        if "unknown request op" in str(e):
            return False, None
        raise
    return True, got if isinstance(got, dict) else None


class BadInput(SnatgwError):
    """A bad command-line value (exit 2)."""


# --------------------------------------------------------------------------- input


def parse_endpoint(text: str, opt: str, port_required: bool) -> tuple[IPv4Address, int]:
    """``IP:PORT`` (or ``IP`` / ``IP:ID`` for icmp) -> (address, port)."""
    host, sep, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not sep and port_required:
        raise BadInput(f"{opt}: expected IP:PORT, got {text!r}")
    addr = parse_addr(host, opt)
    if not sep:
        return addr, 0
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:  # not '²' (a traceback) nor '١٢'
        raise BadInput(f"{opt}: port must be 0..65535, got {port!r}")
    return addr, int(port)


def parse_flags(text: str) -> int:
    bits = 0
    for c in text.upper():
        if c not in TCP_FLAG_BITS:
            raise BadInput(f"--flags: unknown TCP flag {c!r}; use letters of {''.join(TCP_FLAG_BITS)}")
        bits |= TCP_FLAG_BITS[c]
    return bits


def flags_text(bits: int) -> str:
    return "".join(c for c, b in TCP_FLAG_BITS.items() if bits & b) or "-"


# --------------------------------------------------------------------------- packets


def csum(data: bytes) -> int:
    """Internet checksum (RFC 1071) of data."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def build_packet(proto: int, src: IPv4Address, sport: int, dst: IPv4Address, dport: int,
                 flags: int = TCP_FLAG_BITS["S"], ttl: int = 64, ipid: int = 1) -> bytes:  # fmt: skip
    """An IPv4 packet (DF set, valid checksums): TCP segment with ``flags``, UDP datagram with
    8 bytes of payload, or ICMP echo request with identifier ``sport``."""
    if proto == IPPROTO_TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0 if not flags & 0x10 else 1, 5 << 4, flags, 64240, 0, 0)
    elif proto == IPPROTO_UDP:
        payload = b"snatgw\0\0"
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    else:
        l4 = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, sport, 1) + b"snatgw\0\0"
    if proto in (IPPROTO_TCP, IPPROTO_UDP):
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, proto, len(l4))
        c = csum(pseudo + l4) or (0xFFFF if proto == IPPROTO_UDP else 0)
        off = 16 if proto == IPPROTO_TCP else 6
    else:
        c, off = csum(l4), 2
    l4 = l4[:off] + struct.pack("!H", c) + l4[off + 2 :]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ipid, 0x4000, ttl, proto, 0, src.packed, dst.packed)
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + l4


@dataclass(frozen=True)
class Summary:
    proto: int
    src: IPv4Address
    sport: int
    dst: IPv4Address
    dport: int
    ttl: int
    flags: int = 0

    def ends(self) -> tuple[str, str]:
        """("IP:PORT", "IP:PORT"); for ICMP echo the identifier is the source port, 0 the other."""
        return f"{self.src}:{self.sport}", f"{self.dst}:{self.dport}"


def summarize(pkt: bytes) -> Summary:
    """Addresses, ports (echo id), TTL and TCP flags of a packet built or output here."""
    ihl = (pkt[0] & 0x0F) * 4
    proto, ttl = pkt[9], pkt[8]
    src, dst = IPv4Address(pkt[12:16]), IPv4Address(pkt[16:20])
    l4 = pkt[ihl:]
    if proto in (IPPROTO_TCP, IPPROTO_UDP) and len(l4) >= 4:
        sport, dport = struct.unpack("!HH", l4[:4])
        return Summary(proto, src, sport, dst, dport, ttl, l4[13] if proto == IPPROTO_TCP and len(l4) > 13 else 0)
    if proto == IPPROTO_ICMP and len(l4) >= 6:
        return Summary(proto, src, struct.unpack("!H", l4[4:6])[0], dst, 0, ttl)
    return Summary(proto, src, 0, dst, 0, ttl)


# --------------------------------------------------------------------------- routers


def _fib(kind: str, oif: str | None = None, gw: IPv4Address | None = None, mtu: int = 1500):
    from ...model.router import FibResult

    return FibResult(kind, oif, gw, mtu)


@dataclass
class GivenRouter:
    """Answers --oif/--gw for the packet's destination; the packet's source (``back``: address,
    inside interface) is on-link on the interface it arrives by (the reverse-path check); any
    other destination (a new_gw) is taken as on-link via ``other_oif`` (--new-gw-oif, default
    --oif), and said so in ``notes``."""

    dst: IPv4Address
    oif: str
    gw: IPv4Address
    other_oif: str | None = None
    mtu: int = 1500
    notes: list[str] = field(default_factory=list)
    back: tuple[IPv4Address, str] | None = None

    def lookup(self, dst, src=None):
        dst = IPv4Address(dst)
        if dst == self.dst:
            return _fib("forward", self.oif, self.gw, self.mtu)
        if self.back is not None and dst == self.back[0]:
            return _fib("forward", self.back[1], dst, self.mtu)
        dev = self.other_oif or self.oif
        how = "--new-gw-oif" if self.other_oif else "--oif; --new-gw-oif or --route-from-kernel to change"
        note = f"no route given for {dst}: assumed on-link via {dev} ({how})"
        if note not in self.notes:
            self.notes.append(note)
        return _fib("forward", dev, dst, self.mtu)


def ip_route_get(dst: IPv4Address, src: IPv4Address | None, iif: str | None) -> tuple[dict | None, str]:
    """`ip -j route get` (read only): the first answer, or None and the error text."""
    cmd = ["ip", "-j", "route", "get", str(dst)]
    if src is not None:
        cmd += ["from", str(src)] + (["iif", iif] if iif else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{' '.join(cmd)}: {e}"
    if p.returncode != 0:
        return None, f"{' '.join(cmd)}: {p.stderr.strip() or 'exit ' + str(p.returncode)}"
    try:
        return json.loads(p.stdout)[0], " ".join(cmd)
    except (ValueError, IndexError):
        return None, f"{' '.join(cmd)}: unreadable output {p.stdout[:80]!r}"


#: SIOCGIFMTU, and struct ifreq's size (a name of 16 bytes, then a union of 24)
_SIOCGIFMTU, _IFREQ = 0x8921, struct.Struct("16si20x")


def dev_mtu(dev: str | None) -> int:
    """``dev``'s MTU in this network namespace (an ioctl on a socket, which belongs to it), 1500
    when there is none: /sys/class/net is the mount namespace's sysfs, which is the host's under
    `nsenter --net` (the way explain's note tells to run it), so it gave the host's device of the
    same name's MTU, or none."""
    import fcntl

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return _IFREQ.unpack(fcntl.ioctl(s, _SIOCGIFMTU, _IFREQ.pack(dev.encode(), 0)))[1]
    except (OSError, AttributeError, ValueError, struct.error):
        return 1500


def dev_exists(dev: str) -> bool:
    """Whether this network namespace has a device ``dev`` (not /sys/class/net: see dev_mtu)."""
    try:
        socket.if_nametoindex(dev)
        return True
    except OSError:
        return False


@dataclass
class KernelRouter:
    """The host's FIB via `ip -j route get DST from SRC [iif INSIDE]` (read only).  A source
    that is not local to this host needs `iif` (an inside interface that exists here); when
    that fails the lookup is repeated without the source, and notes say so."""

    inside: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    answers: list[tuple[str, dict | None]] = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    def lookup(self, dst, src=None):
        key = (IPv4Address(dst), src)
        if key not in self.cache:  # explain and the model ask the same question: ask once
            self.cache[key] = self._lookup(*key)
        return self.cache[key]

    def _lookup(self, dst: IPv4Address, src):
        iifs = [i for i in self.inside if dev_exists(i)][:1]
        tries = [(src, i) for i in iifs] + [(src, None)] if src is not None else []
        errors = []
        for s, iif in tries + [(None, None)]:
            ans, how = ip_route_get(dst, s, iif)
            if ans is not None:
                break
            errors.append(how)
        self.answers.append((how, ans))
        if errors and ans is not None:
            self.notes.append(f"{'; '.join(errors)}; used `{how}` instead (routing by source not applied)")
        if ans is None:
            self.notes.append(f"no route: {'; '.join(errors)}")
            return _fib("unreachable")
        kind = ans.get("type", "unicast")
        if kind == "local":
            return _fib("local", ans.get("dev"), None, dev_mtu(ans.get("dev")))
        if kind in ("blackhole", "unreachable", "prohibit", "throw"):
            return _fib("unreachable")
        gw = IPv4Address(ans["gateway"]) if ans.get("gateway") else dst
        mtu = int(ans.get("metrics", [{}])[0].get("mtu", 0)) if ans.get("metrics") else 0
        return _fib("forward", ans.get("dev"), gw, mtu or dev_mtu(ans.get("dev")))


# --------------------------------------------------------------------------- the explanation


def _model_result(cfg, pkt: bytes, router, ingress: str, live: list[dict] | None = None,
                  memos: list[dict] | None = None):
    """Engine.process of the reference model on a fresh engine (no sessions yet), or, with
    ``live`` (the running gateway's sessions), on one whose ports and host counts are taken
    as they are there; ``memos``: the running gateway's spill memos (now = 0: a memo made
    ``age_ms`` ago is at -age).  Returns (result, the memos that cut the search short:
    [(address, age in s)])."""
    from ...model import Engine
    from ...model.nat import SpillKey

    e = Engine(cfg.rules, cfg.settings, router)
    if live:
        occupy(e, live)
    ages = {}
    for m in memos or []:
        try:
            k = SpillKey(IPv4Address(m["remote"]), IPv4Address(m["addr"]), int(m["rport"]), int(m["proto"]))
            ages[k.addr, k.remote, k.rport, k.proto] = e.spill.memos[k] = -float(m["age_ms"]) / 1000
        except (KeyError, TypeError, ValueError):
            continue  # a malformed entry from the daemon: not a memo
    res = e.process(pkt, side="inside", ingress=ingress, now=0.0)
    s = summarize(pkt)
    proto_port = 0 if s.proto == IPPROTO_ICMP else s.dport
    used = [(str(a), -ages.get((a, s.dst, proto_port, s.proto), 0.0)) for a in e.spill.skipped]
    return res, used


def _endpoint(text: str) -> tuple[IPv4Address, int]:
    host, _, port = str(text).rpartition(":")
    return IPv4Address(host), int(port or 0)


def occupy(engine, sessions: list[dict]) -> None:
    """Put the running gateway's sessions (Session.as_dict) into a model engine: each one's
    external tuple is taken and its inside host counted, as the live table has them."""
    from ...model.conntrack import CtEntry, in_key, out_key

    for s in sessions:
        proto = PROTOS.get(s.get("proto"))
        if proto is None:
            continue
        (src, sport), (dst, dport), (nat, nport) = (_endpoint(s[k]) for k in ("inside", "remote", "nat"))
        ok = out_key(src, dst, sport, dport, proto)
        ik = in_key(dst, nat, 0 if proto == IPPROTO_ICMP else dport, nport, proto)
        rid = int(s.get("rule_id") or 0)
        engine.table.insert(ik, CtEntry(peer=ok, rw_addr=src, rw_port=sport, oif="", nexthop=None, rule_id=rid,
                                        mtu=1500, last_seen=0.0))  # fmt: skip
        engine.table.insert(ok, CtEntry(peer=ik, rw_addr=nat, rw_port=nport, oif="", nexthop=None, rule_id=rid,
                                        mtu=1500, last_seen=0.0))  # fmt: skip
        engine._live(engine.host_live, src).sessions += 1
        rule = engine._rule_by_id.get(rid)
        if rule is not None and rule.eim and proto in (6, 17):  # its endpoint-independent mapping
            from ...model.eim import EimEntry, endpoint_key, owner_key

            engine.eim.upsert(endpoint_key(src, sport, proto), EimEntry(nat, nport, rid, None, 0.0))
            engine.eim.upsert(owner_key(nat, nport, proto), EimEntry(src, sport, rid, None, 0.0))


def address_choice(cfg, rule, s: "Summary") -> dict:
    """Which SNAT address the rule's algorithm picks for the packet, and the order the
    search takes (docs/datapath.md steps 12-13)."""
    from ...config.schema import rule_host_limit, rule_preserve, rule_spill
    from ...rules import select_index, spill_order

    st = cfg.settings
    n = st.port_max - st.port_min + 1
    tries = max(0, min(st.port_tries, n))
    first = select_index(rule.pool, rule.algo, s.src, s.dst, s.sport)
    spill = rule_spill(rule, st)
    order = spill_order(rule.pool, first, spill, tries)
    how = {"sh": "hash of the source", "sdh": "hash of source and destination",
           "random": "hash of source, destination and source port"}[rule.algo.label]  # fmt: skip
    return {
        "chosen": str(order[0]), "index": first, "pool_size": rule.pool.size, "how": how,
        "on_exhausted": "spill" if spill else "drop", "order": [str(a) for a in order],
        "port_tries": tries, "max_sessions_per_host": rule_host_limit(rule, st),
        "port_preserve": rule_preserve(rule, st), "mapping": rule.mapping or "endpoint-dependent",
        "filtering": rule.filter_mode if rule.eim else None,
    }  # fmt: skip


def _short(w: str, why: list) -> str:
    """"would match, but '<long rule>' comes first" -> "... but #N (file:line) comes first"."""
    if not w.startswith("would match"):
        return w
    n, r = next((i, r) for i, (r, x) in enumerate(why, 1) if x == "MATCH")
    return f"would match, but #{n} ({r.where}) comes first"


def explain_packet(cfg, pkt: bytes, router, ingress: str, live: list[dict] | None = None,
                   memos: list[dict] | None = None, backend: str | None = None, marker: dict | None = None) -> dict:
    """The explanation of one inside packet as a JSON-ready dict (see `snatgw explain --help`);
    ``live``: the running gateway's sessions, to judge the port search against; ``memos``:
    its spill memos (op spill_memos), which may send the flow on to the next address;
    ``backend``: the one that runs (the daemon's, else the file's), for ``refusal``;
    ``marker``: the running gateway's refusal marker of the flow (op refusal_marker)."""
    s = summarize(pkt)
    fib = router.lookup(s.dst, s.src)
    route = Route(fib.oif, fib.gw) if fib.kind == "forward" else None
    winner, why = cfg.rules.explain(s.src, s.dst, route)
    res, memo_skips = _model_result(cfg, pkt, router, ingress, live, memos)
    verdict, reason, rule = Verdict(res.verdict), Reason(res.reason), res.rule
    # the model gives oif/nexthop only for a REDIRECT; otherwise the kernel routes as the FIB says
    oif = res.oif if res.oif is not None else fib.oif
    nexthop = res.nexthop if res.nexthop is not None else fib.gw
    notes = list(getattr(router, "notes", []))
    if rule is None and winner is not None:  # the listing says MATCH, the verdict no rule: say why
        before = BEFORE_RULES.get(reason, "a step before the rule match")
        notes.append(f"{reason.name}: decided before the rules are asked: {before.format(src=s.src, iif=ingress)}; "
                     "the listing above shows the rule a packet past that step would take")
    if rule is not None and (winner is None or rule.identity != winner.identity):  # a bug, if ever
        notes.append(f"the model chose {rule.describe()!r}, unlike the rule listing above")
    translated = snat = None
    own = own_session(live, s)
    if verdict in (Verdict.REDIRECT, Verdict.PASS_TRANSLATED):
        o = summarize(res.packet)
        translated = dict(zip(("src", "dst"), o.ends()), ttl=o.ttl)
    if res.nat is not None:
        snat = {"addr": str(res.nat[0]), "port": int(res.nat[1])}
    return {
        "packet": dict(zip(("src", "dst"), s.ends()), proto={v: k for k, v in PROTOS.items()}[s.proto], ttl=s.ttl,
                       flags=flags_text(s.flags) if s.proto == IPPROTO_TCP else None, ingress=ingress),
        "route": {"kind": fib.kind, "oif": fib.oif, "gw": str(fib.gw) if fib.gw else None},
        "matched": rule is not None,
        "rule": None if rule is None else {**rule.as_dict(), "where": rule.where},
        "candidates": [
            {"priority": i, "rule": r.describe(), "where": r.where, "match": w == "MATCH", "why": _short(w, why)}
            for i, (r, w) in enumerate(why, 1)
        ],
        "verdict": verdict.name,
        "reason": reason.name,
        "snat": snat,
        "next_hop": str(nexthop) if nexthop is not None else None,
        "oif": oif,
        "translated": translated,
        "address": None if rule is None else {**address_choice(cfg, rule, s),
                                              "spill_memo": [{"addr": a, "age_s": round(t, 3)} for a, t in memo_skips]},
        "live_sessions": None if live is None else len(live),
        "refusal": refusal_of(reason, backend or cfg.settings.backend),
        "refusal_marker": marker_of(marker, own is not None),
        "session": session_of(cfg, own, reason),
        "notes": notes,
    }  # fmt: skip


def render_text(d: dict) -> str:
    p, r = d["packet"], d["route"]
    flags = f" flags {p['flags']}" if p["flags"] else ""
    out = [f"packet:    {p['proto']} {p['src']} -> {p['dst']}{flags} ttl {p['ttl']}, in on {p['ingress']}"]
    route = f"via {r['gw']} dev {r['oif']}" if r["kind"] == "forward" else r["kind"]
    out.append(f"route:     {route}")
    out += ["", "rules in priority order:"]
    rows = [[c["priority"], c["rule"], c["where"], c["why"]] for c in d["candidates"]]
    out.append(table(rows, ["#", "rule", "defined at", "result"], "  ") if rows else "  (no rules)")
    out.append("")
    if d["rule"]:
        out.append(f"rule:      {d['rule']['where']}  (snat_ip {d['rule']['snat_ip']} algo {d['rule']['algo']})")
    elif d.get("session"):
        made = d["session"]["rule"]
        out.append(f"rule:      none asked: the flow's live session ({d['session']['nat']}, {d['session']['state']}) "
                   "decides; made under " + (f"{made['where']} ({made['rule']})" if made else
                                             f"rule id {d['session']['rule_id']}, no longer in the config"))
    else:
        out.append("rule:      none matched")
    out.append(f"verdict:   {d['verdict']} ({d['reason']})")
    rm = d.get("refusal_marker")
    if rm and rm["met"]:  # what the flow's packets meet now, before any judgement
        out.append(f"now:       DROP ({rm['packets']}) for {rm['left_s']:.1f} s more: its refusal marker")
    if rm:
        out.append(f"           {rm['note']}")
    a = d.get("address")
    if a:
        src = "the live table" if d.get("live_sessions") is not None else "an empty table"
        out.append(f"address:   {a['chosen']} ({a['how']}: index {a['index']} of {a['pool_size']}); "
                   f"on_exhausted {a['on_exhausted']}, {a['port_tries']} port{'' if a['port_tries'] == 1 else 's'} tried per address")
        if len(a["order"]) > 1:
            out.append(f"           when it has no free port toward {p['dst']}: {', '.join(a['order'][1:])}")
        skipped = {m["addr"]: m["age_s"] for m in a.get("spill_memo") or []}
        for addr, age in skipped.items():
            out.append(f"           spill memo: {addr} was found full toward {p['dst']} {age:g} s ago "
                       f"(< {SPILL_MEMO_MS / 1000:g} s): only its first candidate was tried")
        if d["snat"] and d["snat"]["addr"] != a["chosen"] and a["chosen"] not in skipped:
            out.append(f"           spilled over: {a['chosen']} had no free port in {src}")
        elif d["snat"] and d["snat"]["addr"] != a["chosen"]:
            out.append(f"           spilled over: the spill memo sent it on from {a['chosen']}")
        if a["port_tries"] > 1 and not skipped and a.get("mapping") != "endpoint-independent":
            out.append(f"           (an address whose search finds no free port is remembered for "
                       f"{SPILL_MEMO_MS / 1000:g} s: meanwhile only its first candidate is tried)")
        if a["max_sessions_per_host"]:
            out.append(f"           at most {a['max_sessions_per_host']} sessions per inside host")
        if d.get("refusal"):
            out.append(f"           {d['refusal']['note']}")
        if a.get("port_preserve"):
            out.append(f"           port_preserve yes: port {p['src'].rpartition(':')[2]} itself is tried first "
                       "(when in the port range)")
        if a.get("mapping") == "endpoint-independent":
            out.append(f"           mapping endpoint-independent, filtering {a['filtering']}: a live mapping of "
                       f"{p['src']} is reused toward every remote")
        out.append(f"           (judged against {src}" + (f": its {d['live_sessions']} sessions toward "
                                                         f"{p['dst'].rpartition(':')[0]} or from the source)"
                                                         if d.get("live_sessions") is not None
                                                         else "; --live reads the running gateway's)"))
    if d["snat"]:
        out.append(f"SNAT:      {d['snat']['addr']} port {d['snat']['port']}")
    hop = f"next hop:  {d['next_hop'] or '-'} dev {d['oif'] or '-'}"
    if d["rule"] and d["rule"]["new_gw"]:
        hop += f"  (new_gw {d['rule']['new_gw']} replaces the route's {r['gw']} dev {r['oif']})"
    out.append(hop)
    if d["translated"]:
        t = d["translated"]
        out.append(f"out:       {p['proto']} {t['src']} -> {t['dst']} ttl {t['ttl']}")
    else:
        out.append("out:       not translated")
    out += [f"note:      {n}" for n in d["notes"]]
    return "\n".join(out)


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", nargs="?",
                   help="config file (with --live: compared with the running rules; default the daemon's)")
    p.add_argument("--proto", choices=sorted(PROTOS), default="tcp", help="protocol (default tcp)")
    p.add_argument("--src", required=True, metavar="IP:PORT", help="inside source (icmp: IP[:ECHO_ID])")
    p.add_argument("--dst", required=True, metavar="IP:PORT", help="destination (icmp: IP)")
    p.add_argument("--oif", metavar="IFACE", help="the route's egress interface for DST")
    p.add_argument("--gw", metavar="IP", help="the route's next hop for DST (the destination itself when on-link)")
    p.add_argument("--new-gw-oif", metavar="IFACE", help="interface on which a rule's new_gw is on-link (default --oif)")
    p.add_argument("--route-from-kernel", action="store_true",
                   help="ask this host's FIB (`ip -j route get`, read only) instead of --oif/--gw")
    p.add_argument("--flags", default="S", help="TCP flags, letters of FSRPAUEC (default S, a new connection)")
    p.add_argument("--ttl", type=int, default=64, help="IP TTL (default 64)")
    p.add_argument("--iif", metavar="IFACE", help="inside interface it arrives on (default: the first `inside`; "
                   "with --route-from-kernel the one the source is routed back to)")
    p.add_argument("--live", action="store_true", help="use the running daemon's rules (and compare them with CONFIG)")
    p.add_argument("--offline", action="store_true",
                   help="judge the port search against an empty table even when a daemon runs CONFIG")
    p.add_argument("--socket", metavar="PATH",
                   help="the daemon's control socket (default $SNATGW_SOCKET, else CONFIG's control_socket)")
    p.add_argument("-j", "--json", action="store_true", help="print one JSON object")


# --------------------------------------------------------------------------- --live


def running_rules(sock: str) -> tuple[RuleSet, dict]:
    """The daemon's rules (definition order, so priority ties break as it breaks them) and its
    status (the config file it runs)."""
    from ...daemon.client import call

    resp = call(sock, {"op": "rules"})
    status = call(sock, {"op": "status"})
    # the links whose rules run on their backups now (failover): said beside the rule diff
    status = dict(status, links_on_backup=list(resp.get("links_on_backup") or ()))
    return RuleSet(Rule.from_dict(d, where=d.get("where") or "daemon") for d in resp["defined"]), status


def rule_diff(file_rules: RuleSet, live: RuleSet) -> dict:
    """How the running rules differ from the file's, by identity (from, to, gw, oif): rules only
    running, only in the file, changed (pool, algo, new_gw), and whether priority order differs."""
    mine = {r.identity: r for r in file_rules}
    theirs = {r.identity: r for r in live}
    changed = [{"file": mine[k].describe(), "running": theirs[k].describe(), "where": mine[k].where}
               for k in mine.keys() & theirs.keys() if mine[k] != theirs[k]]  # fmt: skip
    out = {
        "only_running": [r.describe() for r in live if r.identity not in mine],
        "only_file": [f"{r.describe()} ({r.where})" for r in file_rules if r.identity not in theirs],
        "changed": sorted(changed, key=lambda c: c["file"]),
    }
    out["differs"] = bool(out["only_running"] or out["only_file"] or out["changed"])
    return out


def live_notes(diff: dict, sock: str, path: str) -> list[str]:
    down = diff.get("links_on_backup") or []
    failed = [f"  link {n} is down: its rules run on their backup (new_gw backup_gw, and backup_snat_ip "
              "if given) until it is up again" for n in down]
    if not diff["differs"]:
        return [f"rules of the running daemon ({sock}), the same as {path}"] + failed
    notes = [f"rules of the running daemon ({sock}), which DIFFER from {path}:"] + failed
    notes += [f"  running only: {t}" for t in diff["only_running"]]
    notes += [f"  file only:    {t}" for t in diff["only_file"]]
    notes += [f"  changed:      {c['where']}: file {c['file']!r}, running {c['running']!r}" for c in diff["changed"]]
    return notes


def _config_socket(cfg) -> str | None:
    """The control socket CONFIG names, when $SNATGW_SOCKET does not name one: a daemon run
    from a file with `control_socket /run/snatgw/isp.sock` answers there, and explain looked
    only at the default (--live: "no snatgw daemon on /run/snatgw/control.sock")."""
    from ...daemon.client import ENV_SOCKET

    return None if cfg is None or os.environ.get(ENV_SOCKET) else cfg.settings.control_socket


def daemon_running(sock: str | None, config: str) -> tuple[str | None, str | None, str | None]:
    """Without --live: (the control socket, a note, its backend) when a daemon answers there and
    runs ``config`` itself (its table is what a flow would meet now; its backend may be another
    than the file's, `run --backend`), else (None, a note or None, None).  Never an error: no
    daemon is the common case."""
    from ...daemon.client import call, resolve_socket
    from ...errors import DaemonError

    sock = resolve_socket(sock)
    if not os.path.exists(sock):
        return None, None, None
    try:
        status = call(sock, {"op": "status"}, timeout=5.0)
    except (DaemonError, SnatgwError, OSError, ValueError):
        return None, None, None
    running = status.get("config")
    if not running or os.path.realpath(running) != os.path.realpath(config):
        return None, (f"a daemon on {sock} runs {running or 'another config'}: judged against an empty "
                      "table (--live judges against its)"), None
    return sock, (f"judged against the running gateway's table ({sock}, which runs this file); the rules are "
                  "the file's (--live uses the daemon's, with `adm` changes; --offline an empty table)"), \
        status.get("backend")


def relevant_sessions(sock: str, pkt: bytes, cfg) -> tuple[list[dict], int, bool | None]:
    """The running sessions that decide the port search of ``pkt`` (those toward its remote
    endpoint: their ports are taken there) and the host limit (the source's own sessions, as
    many as the largest limit), fetched filtered so a table of a million costs what matters,
    with the flow's own session looked up by itself (live_session: a listing cut at the
    daemon's reply limit may leave it out, and the flow would be judged as new); the daemon's
    reply limit when the remote's listing was cut at it (else 0); and whether the flow has a
    session of its own (None: a daemon that cannot look it up, only the listings tell)."""
    from ...config.schema import rule_host_limit
    from ...daemon.client import call

    s = summarize(pkt)
    toward = {"remote": f"{s.dst}/32", "proto": s.proto}
    if s.proto != IPPROTO_ICMP:
        toward["remote_port"] = s.dport
    reply = call(sock, {"op": "sessions", "filter": toward})
    listed = reply["sessions"]
    cut = len(listed) if reply.get("truncated") else 0
    limit = max((rule_host_limit(r, cfg.settings) for r in cfg.rules), default=0)
    if limit:  # enough of the source's sessions to know whether it is at its limit
        listed = listed + call(sock, {"op": "sessions", "filter": {"inside": f"{s.src}/32"},
                                      "limit": limit})["sessions"]  # fmt: skip
    looked, own = live_session(sock, pkt)
    if own is not None:
        listed.append(own)
    # a session toward the remote from the source is in both listings (and the own one in a
    # third): once (the first)
    got: dict = {}
    for x in listed:
        got.setdefault((x.get("inside"), x.get("remote"), x.get("nat"), x.get("proto")), x)
    return list(got.values()), cut, (own is not None) if looked else None


def build_from_args(args: argparse.Namespace) -> tuple[bytes, IPv4Address]:
    proto = PROTOS[args.proto]
    src, sport = parse_endpoint(args.src, "--src", proto != IPPROTO_ICMP)
    dst, dport = parse_endpoint(args.dst, "--dst", proto != IPPROTO_ICMP)
    if proto == IPPROTO_ICMP and dport:
        raise BadInput("--dst: an echo request has no destination port; give IP (the identifier is --src's port)")
    if not 0 <= args.ttl <= 255:
        raise BadInput(f"--ttl: expected 0..255, got {args.ttl}")
    flags = parse_flags(args.flags) if proto == IPPROTO_TCP else 0
    return build_packet(proto, src, sport, dst, dport, flags=flags, ttl=args.ttl), dst


def run(args: argparse.Namespace) -> int:
    pkt, dst = build_from_args(args)
    live = None
    backend = None
    if args.live:
        from dataclasses import replace

        from ...daemon.client import resolve_socket

        given = parse_file(args.config) if args.config else None
        sock = resolve_socket(args.socket or _config_socket(given))
        rules, status = running_rules(sock)
        path = args.config or status.get("config")
        if not path:
            raise BadInput("--live: the daemon names no config file; give CONFIG")
        cfg = given or parse_file(path)
        diff = rule_diff(cfg.rules, rules)
        live = {"socket": sock, "config": path, **diff, "links_on_backup": status["links_on_backup"]}
        cfg = replace(cfg, rules=rules)
        backend = status.get("backend")
    elif not args.config:
        raise BadInput("give CONFIG (or --live to use the running daemon's rules)")
    else:
        cfg = parse_file(args.config)
    if args.live and args.offline:
        raise BadInput("--offline judges against an empty table, --live against the running one; give one")
    table_of = live["socket"] if live is not None else None
    auto_note = None
    if live is None and not args.offline:  # a daemon running this very file: its table counts
        # the daemon's backend, not the file's, says who picks (a `run --backend nft` of a bpf file)
        table_of, auto_note, backend = daemon_running(args.socket or _config_socket(cfg), args.config)
    if args.route_from_kernel:
        if args.oif or args.gw or args.new_gw_oif:
            raise BadInput("--route-from-kernel replaces --oif/--gw/--new-gw-oif; give one or the other")
        router = KernelRouter(cfg.settings.inside)
    else:
        if not (args.oif and args.gw):
            raise BadInput("give the route of DST as --oif IFACE --gw IP (or --route-from-kernel)")
        other = parse_oif(args.new_gw_oif, "--new-gw-oif") if args.new_gw_oif else None
        router = GivenRouter(dst, parse_oif(args.oif, "--oif"), parse_addr(args.gw, "--gw"), other)
    inside = tuple(status.get("inside") or ()) if live is not None else cfg.settings.inside
    if args.iif and inside and args.iif not in inside:
        # the inside program runs on those devices only: the model would translate a packet the
        # datapath never sees there (until 1 Dec 2026 explain said REDIRECT for it)
        raise BadInput(f"--iif {shown(args.iif)}: not an inside interface ({' '.join(inside)}): snatgw translates "
                       "only what arrives on those; a packet from another device is routed untranslated, and "
                       "the egress guard drops it at an uplink when its source is in a rule's from (DROP_LEAK)")
    ingress = args.iif or (cfg.settings.inside[0] if cfg.settings.inside else "lan0")
    src = IPv4Address(pkt[12:16])
    if isinstance(router, GivenRouter):
        router.back = (src, ingress)
    elif not args.iif:  # the inside interface the kernel routes the source back to, if any
        back = router.lookup(src, dst)
        if back.kind == "forward" and back.oif in cfg.settings.inside:
            ingress = back.oif
    sessions = memos = marker = has_own = None
    truncated = 0
    if table_of is not None:  # the search judged against the daemon's sessions and spill memos too
        from ...daemon.client import call

        sessions, truncated, has_own = relevant_sessions(table_of, pkt, cfg)
        memos = call(table_of, {"op": "spill_memos", "remote": str(dst)}).get("memos") or []
        marker = live_marker(table_of, pkt)
    d = explain_packet(cfg, pkt, router, ingress, sessions, memos, backend, marker)
    if (isinstance(router, KernelRouter) and d["reason"] == Reason.DROP_SPOOFED.name
            and not any(n == ingress for _, n in socket.if_nameindex())):  # the likely why of that drop
        d["notes"].insert(0, f"{ingress} is no device of this network namespace: the routes are this host's, not "
                             "the gateway's (run explain there: nsenter --net=/run/netns/NS snatgw explain ...)")
    if truncated:
        own = ("the flow's own session may be among those not listed, and the flow judged as new then (this "
               "daemon cannot look it up by itself: it predates the session request)" if has_own is None else
               f"the flow's own session was looked up by its 5-tuple: it has {'one' if has_own else 'none'}")
        d["notes"].append(f"the daemon listed at most {truncated:,} of the sessions toward {dst}: the port search "
                          f"was judged against those, so a port it names may be taken; {own}")
    if auto_note:
        d["notes"].insert(0, auto_note)
    if (backend or cfg.settings.backend) == "nft" and d.get("snat"):
        d["notes"].append(NFT_NOTE)
    if live is not None:
        d["live"] = live
        d["notes"] = live_notes(live, live["socket"], live["config"]) + d["notes"]
    print(dump_json(d) if args.json else render_text(d))
    return EXIT_OK if d["matched"] or d["session"] else EXIT_NO_MATCH
