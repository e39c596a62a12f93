"""The model datapath: ``Engine.process(packet, side, ingress, now)`` runs the numbered steps
of docs/datapath.md on IPv4 bytes and returns a Result (verdict, reason, output bytes, egress).
Sans-I/O: the FIB is an injected router, time is passed in, nothing else is read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

from ..config.schema import Settings
from ..datapath.backend import RuleCounters, Session
from ..layout import ALLOC_CNT_MEMO_HIT, ALLOC_CNT_MEMO_SET, ALLOC_CNT_NAMES, ALLOC_CNT_SEARCH, ALLOC_CNT_TRIES
from ..layout import ADDR_TRIES, CT_F_NEW_GW, CT_F_REPLIED, ICMP_QUERY_REPLIES, ICMP_QUERY_REQUESTS
from ..layout import ICMP_HOST_ONLY_ERRORS, IPPROTO_ICMP, IPPROTO_TCP
from ..layout import FRAG_PASS_REASONS, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, CtState, Reason
from ..layout import FRAG_HOLD, MAX_REFUSED, RECIRC_DEV, REFUSE_ICMP_PER_SEC, REFUSED_SECS, Verdict
from ..layout import CT_DIR_OUT
from ..config.schema import judged_under, rule_host_limit, rule_preserve, rule_spill
from ..layout import CT_F_EIM, CT_F_HAIRPIN, EIM_GRACE, EIM_PER_SESSION, FROM_NET_POOL, GW_MARK_BASE
from ..fibrules import gw_numbers
from ..rules import Route, Rule, RuleSet, leak_guard_nets, port_candidates, port_seed, select_index, spill_order
from .conntrack import CtEntry, CtKey, CtPair, CtTable, in_key, initial_state, is_expired, out_key, tcp_update
from .conntrack import E_2BIG
from .eim import EimEntry, EimKey, EimTable, endpoint_key, owner_key, permit_key
from .eim import ANY as ANY_ADDR
from .frag import HELD, FragEntry, FragKey, FragTable
from .nat import NatTable, SpillMemos
from .packet import IP_DADDR, IP_SADDR, InnerView, IPv4View, ip, parse, parse_inner
from .refuse import FRAG_NEEDED, host_unreachable
from .xlate import rewrite_fragment, translate, translate_icmp_error

PROTOS = (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP)
EIM_PROTOS = (IPPROTO_TCP, IPPROTO_UDP)  # endpoint-independent mapping: ports to share
PROTO_NAMES = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_ICMP: "icmp"}
SIDES = ("inside", "outside", "egress", "recirc")


@dataclass(frozen=True)
class Result:
    verdict: Verdict
    reason: Reason
    packet: bytes  # output IPv4 bytes (== input for PASS/DROP)
    oif: str | None = None  # egress device for REDIRECT
    nexthop: IPv4Address | None = None  # next hop for REDIRECT (None: route to daddr)
    rule: Rule | None = None  # rule of the session (new or existing), or the matched rule
    nat: tuple[IPv4Address, int] | None = None  # the session's SNAT (addr, port/id)
    #: skb->mark of a PASS_TRANSLATED packet of a new_gw egress (layout.GW_MARK_BASE + n: the
    #: backend's ip rule routes it by that egress, not by the kernel's own table); else 0
    mark: int = 0


def trimmed(res: Result) -> Result:
    """A redirected packet leaves with its IP total length's bytes only: link padding after it
    is cut, as the kernel cuts it before forwarding (the BPF snat_emit alike).  Padding is the
    sending host's (or its NIC driver's: stale memory, "Etherleak") and is not for the ISP."""
    pkt = res.packet
    if res.verdict != Verdict.REDIRECT or len(pkt) < 20:
        return res
    tot = int.from_bytes(pkt[2:4], "big")
    return replace(res, packet=pkt[:tot]) if 20 <= tot < len(pkt) else res


@dataclass
class LiveCount:
    """struct live_count: live sessions (+1 at creation; the expiry sweep recounts) and
    refused new flows (cumulative)."""

    sessions: int = 0
    refusals: int = 0


@dataclass(frozen=True)
class Refusal:
    """struct refusal: a refused new flow, remembered under its OUT key for REFUSED_SECS."""

    at: float
    addr: IPv4Address  # the SNAT address chosen for it
    reason: Reason


def _can_start(v: IPv4View) -> bool:
    """Step 9: a TCP pure SYN, any UDP datagram, an ICMP query request (echo, timestamp,
    information, address mask) or a packet of a protocol without ports may make a session."""
    if v.proto == IPPROTO_TCP:
        return v.flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST) == TCP_SYN
    if v.proto == IPPROTO_ICMP:
        return v.is_query_request
    return True


def _multi_or_broadcast(addr: int) -> bool:
    """Multicast or the limited broadcast: never forwarded, but the FIB (bpf_fib_lookup, which
    does not look at the address class) may name a route for it."""
    return addr >> 28 == 0xE or addr == 0xFFFFFFFF


def frame_for_us(dst_mac: bytes, device_mac: bytes) -> bool:
    """Step 1a: whether the programs take a frame to ``dst_mac`` arriving on a device whose MAC
    is ``device_mac`` as sent to the gateway: its own MAC, or a VRRP virtual MAC (RFC 5798 7.3,
    00-00-5E-00-01-{VRID}: keepalived's use_vmac), never another host's, a broadcast or a
    multicast one (the kernel forwards none of those)."""
    return dst_mac == device_mac or dst_mac[:5] == b"\x00\x00\x5e\x00\x01"  # (a unicast prefix)


def _verdict_of(reason: Reason) -> Verdict:
    return Verdict.DROP if reason.name.startswith("DROP_") else Verdict.PASS


class Engine:
    """One gateway's datapath state: sessions, remembered fragments, counters."""

    def __init__(self, rules: RuleSet, settings: Settings, router, inside=None, outside=None,
                 recirc: str | None = RECIRC_DEV):
        """``recirc``: the device held fragments are sent round (None: none, no holding)."""
        self.rules = rules
        self.recirc = recirc
        self.settings = settings
        self.router = router
        self.inside = tuple(settings.inside if inside is None else inside)
        self.outside = tuple(settings.outside if outside is None else outside)
        self.table = CtTable(settings.max_sessions)
        self.nat = NatTable(self.table)
        self.eim = EimTable(EIM_PER_SESSION * settings.max_sessions)
        self.frags = FragTable()
        self.reasons: Counter[Reason] = Counter()
        self.rule_stats: dict[int, RuleCounters] = {}
        self._guard_nets = leak_guard_nets(rules)
        self._gw_numbers: dict | None = None
        self._rules_changed()
        # live counts (snat_host_sess, snat_addr_stats, snat_rule_live) and refusal markers;
        # a host's sessions are counted as they are made only while some rule has a host
        # limit (host_counting, CFG_F_HOST_COUNT), else only recount() keeps them
        self.host_live: dict[IPv4Address, LiveCount] = {}
        self.addr_live: dict[IPv4Address, LiveCount] = {}
        self.rule_live: dict[int, LiveCount] = {}
        self.counted_at: float | None = None  # `now` of the last expire() (its recount)
        self.refused: dict[CtKey, Refusal] = {}
        self.spill = SpillMemos()  # the spill memo (snat_spill_memo) and its counters
        #: the devices' ifindexes, when the router knows them (StaticRouter.ifindex): judged_under
        #: compares a device by name and ifindex, as the bpf backend's slots and roles hold it
        self._ifindex_of = getattr(router, "ifindex", None)
        self._judged = judged_under(rules, settings, self._ifindex_of)  # what those two were judged under (apply)
        self._icmp_sec: int | None = None  # refuse_icmp's rate limit: this second, and how many
        self._icmp_count = 0

    def alloc_counts(self) -> dict[str, int]:
        """The port allocator's counters as snat_alloc_cnt names them (layout.ALLOC_CNT_NAMES):
        the spill memo's, and the port searches with the candidates they tried."""
        return {ALLOC_CNT_NAMES[ALLOC_CNT_MEMO_HIT]: self.spill.hits,
                ALLOC_CNT_NAMES[ALLOC_CNT_MEMO_SET]: self.spill.written,
                ALLOC_CNT_NAMES[ALLOC_CNT_SEARCH]: self.nat.searches,
                ALLOC_CNT_NAMES[ALLOC_CNT_TRIES]: self.nat.tries}  # fmt: skip

    def zero_alloc_counts(self) -> None:
        self.spill.hits = self.spill.written = self.nat.searches = self.nat.tries = 0

    # ------------------------------------------------------------------ entry

    def process(self, pkt: bytes, side: str, ingress: str, now: float, for_us: bool = True) -> Result:
        """Run one packet through the program of ``side`` ("inside" | "outside" | "egress" |
        "recirc": a held fragment coming back from the recirculation device);
        ``ingress``: the device it arrived on (egress: the device it leaves by); ``for_us``
        False: its frame was not sent to that device's MAC (another host's, a broadcast or a
        multicast: the skb's pkt_type is not PACKET_HOST) nor to a VRRP virtual MAC
        (``frame_for_us``), which the inside and outside programs leave to the kernel untouched
        (PASS_NOT_FOR_US, step 1a).  Every packet
        counts one reason in ``reasons``, except egress packets that are not ICMP errors: they
        pass uncounted (Result reason PASS_ICMP_OTHER), as the BPF egress program does."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        pkt = bytes(pkt)
        v = parse(pkt)
        if side == "egress":
            res = self._leak_guard(pkt) or self._egress(pkt, v)
            if res is None:  # not an ICMP error: passes uncounted (our own redirected traffic)
                return Result(Verdict.PASS, Reason.PASS_ICMP_OTHER, pkt)
        elif side == "recirc":  # a held fragment back from the recirculation device
            if isinstance(v, Reason) or v.frag == 0:  # only held fragments come this way
                res = Result(Verdict.DROP, Reason.DROP_FRAG_UNKNOWN, pkt)
            else:
                res = self._later_fragment(pkt, v, now)
        elif not for_us and v is not Reason.PASS_NOT_IPV4:  # step 1a: the kernel forwards only frames to the device
            res = Result(Verdict.PASS, Reason.PASS_NOT_FOR_US, pkt)
        elif isinstance(v, Reason):
            res = Result(_verdict_of(v), v, pkt)
        elif v.opts_kernel:  # step 2b: a source route, or options that do not parse
            res = Result(Verdict.PASS, Reason.PASS_IP_OPTIONS, pkt)
            if side == "outside":
                res = self._inbound_guard(res, v)
        else:
            res = self._inside(pkt, v, ingress, now) if side == "inside" else self._outside(pkt, v, now)
            if side == "outside" and res.verdict == Verdict.PASS:
                res = self._inbound_guard(res, v)
            if v.is_first_fragment and res.verdict == Verdict.PASS and res.reason in FRAG_PASS_REASONS:
                # a first fragment left untranslated: its later fragments pass too (pass marker)
                key = FragKey(ip(v.saddr), ip(v.daddr), v.ipid, v.proto)
                self.frags.remember(key, FragEntry(ip(v.saddr), ip(v.daddr), None, None, now))
        self.reasons[res.reason] += 1
        return trimmed(res)

    def _inside(self, pkt: bytes, v: IPv4View, ingress: str, now: float) -> Result:
        if v.frag > 0 or (v.proto == IPPROTO_ICMP and not v.is_query_request):
            if self._spoofed(v, ingress):  # step 2a (no session to vouch for a fragment or an error)
                return Result(Verdict.DROP, Reason.DROP_SPOOFED, pkt)
            return self._inside_unkeyed(pkt, v, ingress, now)
        # step 2a, fast: the session of this OUT key, made on this device, vouches for it
        okey = self._out_key(v)
        e = self.table.lookup(okey)
        if e is not None and e.iif == ingress:
            return self._established_out(pkt, v, e, ingress, now)
        if e is None and self._refused_recently(okey, now):  # step 6's marker, before the full check
            return Result(Verdict.DROP, Reason.DROP_REFUSED_RECENTLY, pkt)
        if self._spoofed(v, ingress):  # step 2a
            return Result(Verdict.DROP, Reason.DROP_SPOOFED, pkt)
        # step 6 reuses step 2a's lookup, as the BPF program does
        if e is not None:
            return self._established_out(pkt, v, e, ingress, now)
        return self._new_flow(pkt, v, okey, ingress, now)

    @staticmethod
    def _out_key(v: IPv4View) -> CtKey:
        dport = 0 if v.proto == IPPROTO_ICMP else v.dport
        return out_key(ip(v.saddr), ip(v.daddr), v.sport, dport, v.proto)

    def _inside_unkeyed(self, pkt: bytes, v: IPv4View, ingress: str, now: float) -> Result:
        """A later fragment or an ICMP error from inside, past the reverse-path check."""
        if v.frag > 0:
            return self._later_fragment(pkt, v, now)
        if v.is_icmp_error:  # step 5
            res = self._icmp_error(pkt, v, "inside", ingress)
            if res is not None:
                return res
        # no session to belong to: steps 7-9 say local, internal, unmatched or dropped
        return self._new_flow(pkt, v, self._out_key(v), ingress, now)

    def _refused_recently(self, okey: CtKey, now: float) -> bool:
        """Step 6: a flow refused moments ago is not searched again (its marker is young)."""
        m = self.refused.get(okey)
        return m is not None and now - m.at < REFUSED_SECS

    def _new_flow(self, pkt: bytes, v: IPv4View, okey: CtKey, ingress: str, now: float) -> Result:
        src, dst = okey.saddr, okey.daddr
        if _multi_or_broadcast(v.daddr):  # step 7: never forwarded (VRRP, IGMP, mDNS, DHCP)
            return Result(Verdict.PASS, Reason.PASS_LOCAL, pkt)
        fib = self.router.lookup(dst, src)
        if fib.kind == "local":  # a live endpoint-independent mapping's address: hairpinning
            return self._hairpin_new(pkt, v, okey, ingress, now) or Result(Verdict.PASS, Reason.PASS_LOCAL, pkt)
        if fib.kind != "forward":
            return Result(Verdict.PASS, Reason.PASS_NO_ROUTE, pkt)
        if fib.oif in self.inside:  # between inside networks: never translated
            return Result(Verdict.PASS, Reason.PASS_INTERNAL, pkt)
        rule = self.rules.match(src, dst, Route(fib.oif, fib.gw))  # step 8
        if rule is None:
            return self._unmatched(pkt, Reason.PASS_NO_RULE)
        if not _can_start(v):  # step 9
            return Result(Verdict.DROP, Reason.DROP_NO_SESSION, pkt, rule=rule)
        if v.ttl <= 1:  # step 10
            return Result(Verdict.PASS, Reason.PASS_TTL, pkt, rule=rule)
        oif, nexthop, mtu = fib.oif, fib.gw, fib.mtu  # step 11
        if rule.new_gw is not None:
            gwr = self.router.lookup(rule.new_gw)
            if gwr.kind != "forward":
                return Result(Verdict.PASS, Reason.PASS_NO_ROUTE, pkt, rule=rule)
            oif, nexthop, mtu = gwr.oif, gwr.gw, gwr.mtu
        if v.tot_len > mtu and v.df:
            res = Result(Verdict.PASS, Reason.PASS_FRAG_NEEDED, pkt, rule=rule)
            # new_gw: the kernel's own route is not this one, so it cannot answer with its MTU
            return self._refuse_icmp(pkt, v, ingress, now, res, mtu) if rule.new_gw is not None else res
        flags = CT_F_NEW_GW if rule.new_gw is not None else 0
        return self._create(pkt, v, okey, rule, ingress, now, oif, nexthop, mtu, flags)

    def _create(self, pkt: bytes, v: IPv4View, okey: CtKey, rule: Rule, ingress: str, now: float,
                oif: str, nexthop: IPv4Address | None, mtu: int, flags: int) -> Result:
        """Steps 12-15 of a new flow (also the sender's leg of a hairpinned one: CT_F_HAIRPIN)."""
        src, dst = okey.saddr, okey.daddr
        s = self.settings  # step 12: the chosen address, and the spill-over order after it
        n = s.port_max - s.port_min + 1
        per_addr = max(0, min(s.port_tries, n))
        first = select_index(rule.pool, rule.algo, src, dst, v.sport)
        addrs = spill_order(rule.pool, first, rule_spill(rule, s), per_addr)
        limit = rule_host_limit(rule, s)  # step 13: the inside host's limit first
        if limit and self._host_sessions(src) >= limit:
            res = self._refuse(pkt, okey, addrs[0], Reason.DROP_HOST_LIMIT, now, rule)
            return self._refuse_icmp(pkt, v, ingress, now, res) if s.refuse_icmp else res
        # then the port search on each address in turn (an empty range: exhausted)
        cands = list(port_candidates(v.sport, s.port_min, s.port_max, per_addr,
                                     port_seed(src, dst, v.sport, okey.dport, v.proto),
                                     preserve=rule_preserve(rule, s)))  # fmt: skip
        if v.proto not in PROTOS:  # no ports: ports 0, the chosen address then the pool's next ones
            cands = [0]
            addrs = spill_order(rule.pool, first, True, 1)[:ADDR_TRIES]
        eim = rule.eim and v.proto in EIM_PROTOS
        if eim:
            flags |= CT_F_EIM
        # the route back (the IN entry's next hop and MTU): the route to the inside host as a
        # reply from the uplink would take it (docs/datapath.md step 13).  The router has no
        # input devices, so that is its route to the host, the one _spoofed checked (which leads
        # back out of `ingress`): the host itself on-link (as in REF), else its router; the
        # device's MTU.  Kept for the session's life: its replies go there, and an inside
        # error is judged by it (_on_link).  The bpf datapath looks it up per session, or
        # reuses the reverse-path check's while CFG_F_BACK_FROM_RPF holds: the same answer
        in_nexthop = self._route_back(src, dst, ingress)
        in_mtu = self._dev_mtu(ingress)

        def build(ikey: CtKey, addr: IPv4Address, port: int) -> tuple[CtEntry, CtEntry]:
            out = CtEntry(peer=ikey, rw_addr=addr, rw_port=port, oif=oif, nexthop=nexthop,
                          rule_id=rule.rule_id, mtu=mtu, last_seen=now,
                          state=initial_state(v.proto), flags=flags, rule=rule, iif=ingress)  # fmt: skip
            inn = CtEntry(peer=okey, rw_addr=src, rw_port=v.sport, oif=ingress, nexthop=in_nexthop,
                          rule_id=rule.rule_id, mtu=in_mtu, last_seen=now,
                          state=initial_state(v.proto), rule=rule)  # fmt: skip
            return out, inn

        if eim:  # steps 13-14, endpoint-independent: the endpoint's mapping, or a new one it owns
            pair = self._eim_mapping(okey, rule, addrs, cands, build, ingress, now)
        else:
            memo = self.spill.toward(dst, okey.dport, v.proto, now) if len(cands) > 1 else None
            pair = self.nat.new_mapping(okey, addrs, cands, build, memo=memo)  # steps 13-14
        if pair == Reason.DROP_PORT_EXHAUSTED:
            return self._refuse(pkt, okey, addrs[0], pair, now, rule)
        if isinstance(pair, Reason):
            return Result(Verdict.DROP, pair, pkt, rule=rule)
        self._count_new(rule, src, pair.out.rw_addr)
        if flags & CT_F_HAIRPIN:
            return self._hairpin(pkt, v, pair.out, now, new=True)
        return self._translate_out(pkt, v, pair.out, now, Reason.XLATE_NEW)  # step 15

    def _count_new(self, rule: Rule, host: IPv4Address, addr: IPv4Address) -> None:
        self._count_rule(rule.rule_id, sessions=1)
        if self.host_counting:  # step 15: only while some rule has a host limit
            self._live(self.host_live, host).sessions += 1
        self._live(self.addr_live, addr).sessions += 1
        self._live(self.rule_live, rule.rule_id).sessions += 1

    # ------------------------------------------------------------------ endpoint-independent

    def _eim_mapping(self, okey: CtKey, rule: Rule, addrs, cands, build, iif: str, now: float):
        """A new session of an endpoint-independent rule: its inside endpoint's live mapping
        (the one (addr, port), whatever the remote; refused when that external tuple is taken),
        else a port search in which a candidate owned by another endpoint is taken toward every
        remote, the winner's owner claimed with it, then the endpoint made.  An ADF rule's
        session leaves a permit for its remote address."""
        ek = endpoint_key(okey.saddr, okey.sport, okey.proto)
        ep = self._endpoint(ek, rule)
        if ep is not None:
            pair = self.nat.new_mapping(okey, [ep.addr], [ep.port], build)
            if isinstance(pair, CtPair):
                ep.last_seen = now
        else:
            owner = EimEntry(okey.saddr, okey.sport, rule.rule_id, None, now)
            pair = self.nat.new_mapping(okey, addrs, cands, build,
                                        owners=(self.eim, lambda a, p: owner_key(a, p, okey.proto), owner))  # fmt: skip
            if not isinstance(pair, CtPair):
                return pair
            err = self.eim.insert(ek, EimEntry(pair.out.rw_addr, pair.out.rw_port, rule.rule_id, iif, now))
            if err == E_2BIG:  # no room for the endpoint: nothing left behind
                self.table.remove(okey)
                self.eim.delete(owner_key(pair.out.rw_addr, pair.out.rw_port, okey.proto))
                return Reason.DROP_TABLE_FULL
        if isinstance(pair, CtPair) and rule.filter_mode == "address-dependent":
            self.eim.upsert(permit_key(okey.saddr, okey.sport, okey.proto, okey.daddr),
                            EimEntry(ANY_ADDR, 0, rule.rule_id, None, now))  # fmt: skip
        return pair

    def _endpoint(self, ek: EimKey, rule: Rule) -> EimEntry | None:
        """The endpoint's live mapping under ``rule``; a stale one (made by another rule, or its
        address no longer in the rule's pool) is forgotten, with its owner."""
        ep = self.eim.lookup(ek)
        if ep is None or (ep.rule_id == rule.rule_id and ep.addr in rule.pool):
            return ep
        self.eim.delete(ek)
        ok = owner_key(ep.addr, ep.port, ek.proto)
        o = self.eim.lookup(ok)
        if o is not None and (o.addr, o.port) == (ek.addr, ek.port):
            self.eim.delete(ok)
        return None

    def _mapping_of(self, addr: IPv4Address, port: int, proto: int):
        """The live endpoint-independent mapping (addr, port, proto) -> (endpoint key, endpoint,
        its rule), or None: no owner, an owner whose endpoint does not point back, or a rule
        that is gone, no longer maps endpoint-independently or no longer has the address."""
        o = self.eim.lookup(owner_key(addr, port, proto))
        if o is None:
            return None
        ek = endpoint_key(o.addr, o.port, proto)
        ep = self.eim.lookup(ek)
        if ep is None or (ep.addr, ep.port) != (addr, port):
            return None
        rule = self._rule_by_id.get(ep.rule_id)
        if rule is None or not rule.eim or addr not in rule.pool:
            return None
        return ek, ep, rule

    def _admit(self, v: IPv4View, ek: EimKey, ep: EimEntry, rule: Rule, remote: IPv4Address, rport: int,
               now: float, hairpin: bool) -> CtEntry | Reason | None:
        """A session made from the mapping's side (filtering admitted a remote, or a hairpinned
        packet reached the mapping): OUT (inside endpoint -> remote) with the mapping as its
        rewrite, IN (remote -> mapping) back to the endpoint's device.  Its IN entry, or None
        when not admitted (host at its limit, no route to the remote, the OUT key taken), or
        DROP_TABLE_FULL."""
        host, s = ek.addr, self.settings
        limit = rule_host_limit(rule, s)
        if limit and self._host_sessions(host) >= limit:
            return None
        flags = CT_F_EIM | (CT_F_HAIRPIN if hairpin else 0)
        if hairpin:  # the remote is another inside host's mapping: delivered back inside
            oif, nexthop, mtu = ep.iif, None, self._dev_mtu(ep.iif)
        else:
            fib = self.router.lookup(remote, host)
            if rule.new_gw is not None:
                fib = self.router.lookup(rule.new_gw)
                flags |= CT_F_NEW_GW
            if fib.kind != "forward" or fib.oif in self.inside:
                return None
            oif, nexthop, mtu = fib.oif, fib.gw, fib.mtu
        okey = out_key(host, remote, ek.port, rport, ek.proto)
        ikey = in_key(remote, ep.addr, rport, ep.port, ek.proto)
        out = CtEntry(peer=ikey, rw_addr=ep.addr, rw_port=ep.port, oif=oif, nexthop=nexthop,
                      rule_id=rule.rule_id, mtu=mtu, last_seen=now, state=initial_state(ek.proto),
                      flags=flags, rule=rule, iif=ep.iif)  # fmt: skip
        back = self._route_back(host, remote, ep.iif)  # replies' next hop, when it leads to ep.iif
        inn = CtEntry(peer=okey, rw_addr=host, rw_port=ek.port, oif=ep.iif, nexthop=back,
                      rule_id=rule.rule_id, mtu=self._dev_mtu(ep.iif), last_seen=now,
                      state=initial_state(ek.proto), rule=rule)  # fmt: skip
        err = self.table.insert(ikey, inn)
        if err == E_2BIG:
            return Reason.DROP_TABLE_FULL
        if err is not None:
            return None
        err = self.table.insert(okey, out)
        if err is not None:
            self.table.delete(ikey)
            return Reason.DROP_TABLE_FULL if err == E_2BIG else None
        ep.last_seen = now
        self._count_new(rule, host, ep.addr)
        return inn

    def _inbound_new(self, pkt: bytes, v: IPv4View, now: float) -> Result | None:
        """Step 6a of the outside program: a packet with no session to a live endpoint-
        independent mapping, admitted by the rule's filtering (endpoint-independent: any remote;
        address-dependent: a remote address the endpoint has a session with) as a new session
        back to the mapping's inside endpoint; None: not admitted (as before: the kernel's)."""
        if not self._has_eim or v.proto not in EIM_PROTOS or not _can_start(v):
            return None
        hit = self._mapping_of(ip(v.daddr), v.dport, v.proto)
        if hit is None:
            return None
        ek, ep, rule = hit
        mode = rule.filter_mode
        if mode == "address-port-dependent":
            return None
        if mode == "address-dependent" and self.eim.lookup(permit_key(ek.addr, ek.port, ek.proto, ip(v.saddr))) is None:
            return None
        inn = self._admit(v, ek, ep, rule, ip(v.saddr), v.sport, now, hairpin=False)
        if inn is None:
            return None
        if isinstance(inn, Reason):
            return Result(Verdict.DROP, inn, pkt, rule=rule)
        return self._translate_in(pkt, v, inn, self.table.lookup(inn.peer), now, new=True)

    def _hairpin_new(self, pkt: bytes, v: IPv4View, okey: CtKey, ingress: str, now: float) -> Result | None:
        """A new flow from inside to a local address that is a live endpoint-independent
        mapping, from a source in its rule's `from` net: the sender gets its own session (its
        mapping under that rule) marked CT_F_HAIRPIN, and the packet is delivered back inside
        (`_hairpin`).  None: not a hairpin (PASS_LOCAL as before)."""
        if not self._has_eim or v.proto not in EIM_PROTOS or not _can_start(v) or v.ttl <= 1:
            return None
        hit = self._mapping_of(okey.daddr, okey.dport, okey.proto)
        if hit is None or okey.saddr not in hit[2].src:
            return None
        rule = hit[2]
        return self._create(pkt, v, okey, rule, ingress, now, ingress, None, self._dev_mtu(ingress), CT_F_HAIRPIN)

    def _hairpin(self, pkt: bytes, v: IPv4View, e: CtEntry, now: float, new: bool = False) -> Result:
        """A packet of a hairpinned session: translated outward by the sender's session (its
        mapping as source, TTL-1), then inward by the session of the mapping it is sent to
        (its IN key; made now when missing, filtering aside: the sender is inside), and
        REDIRECTed to that endpoint's device, XLATE_HAIRPIN.  ``new``: the sender's session
        was made by this packet, so a TCP one starts in SYN_RECV even when the packet goes no
        further (as every new session; the bpf program sets it at creation)."""
        ikey = in_key(e.rw_addr, ip(v.daddr), e.rw_port, v.dport, v.proto)
        inn = self.table.lookup(ikey)
        if inn is None:
            hit = self._mapping_of(ip(v.daddr), v.dport, v.proto)
            if hit is not None:
                got = self._admit(v, *hit, e.rw_addr, e.rw_port, now, hairpin=True)
                inn = got if isinstance(got, CtEntry) else None
        out = self.table.lookup(inn.peer) if inn is not None else None
        if v.proto == IPPROTO_TCP and (new or (inn is not None and out is not None)):
            tcp_update(e, v.flags, reply=False)
        if inn is None or out is None:
            return Result(Verdict.DROP, Reason.DROP_NO_SESSION, pkt, rule=e.rule)
        buf = bytearray(pkt)
        translate(buf, v, True, e.rw_addr, e.rw_port, dec_ttl=True)
        self._touch(e, v, now)
        v2 = parse(bytes(buf))
        if v.proto == IPPROTO_TCP:
            tcp_update(out, v.flags, reply=True)
        out.flags |= CT_F_REPLIED
        inn.flags |= CT_F_REPLIED
        translate(buf, v2, False, inn.rw_addr, inn.rw_port, dec_ttl=False)
        self._touch(inn, v, now)
        if v.is_first_fragment:
            key = FragKey(ip(v.saddr), ip(v.daddr), v.ipid, v.proto)
            self.frags.remember(key, FragEntry(e.rw_addr, inn.rw_addr, inn.oif, inn.nexthop, now))
        return Result(Verdict.REDIRECT, Reason.XLATE_HAIRPIN, bytes(buf), inn.oif, inn.nexthop, e.rule,
                      (e.rw_addr, e.rw_port))  # fmt: skip

    def _host_sessions(self, host: IPv4Address) -> int:
        """The inside host's live count as step 13 reads it (a lookup: nothing is made)."""
        c = self.host_live.get(host)
        return c.sessions if c is not None else 0

    @staticmethod
    def _live(counts: dict, key) -> LiveCount:
        c = counts.get(key)
        if c is None:
            c = counts[key] = LiveCount()
        return c

    def _refuse_icmp(self, pkt: bytes, v: IPv4View, ingress: str, now: float, res: Result,
                     frag_mtu: int | None = None) -> Result:
        """`refuse_icmp yes`: the refused packet becomes an ICMP host unreachable back to its
        host out of the device it came by (``frag_mtu``: a fragmentation needed with that
        next-hop MTU instead), at most REFUSE_ICMP_PER_SEC a second, both kinds together (all
        hosts; the second is the clock's whole second, as the BPF's snat_now() / 1e9); else
        ``res``."""
        sec = int(now)
        if sec != self._icmp_sec:
            self._icmp_sec, self._icmp_count = sec, 0
        self._icmp_count += 1
        if self._icmp_count > REFUSE_ICMP_PER_SEC:
            return res
        find = getattr(self.router, "source_for", None)
        src = find(ip(v.saddr)) if find else None
        if src is None:
            return res
        err = host_unreachable(pkt, v.ihl, src) if frag_mtu is None else \
            host_unreachable(pkt, v.ihl, src, FRAG_NEEDED, min(frag_mtu, 0xFFFF))
        return Result(Verdict.REDIRECT, res.reason, err, ingress, None, res.rule, res.nat)

    def _refuse(self, pkt: bytes, okey: CtKey, addr: IPv4Address, reason: Reason, now: float,
                rule: Rule) -> Result:
        """A refused new flow: counted for its host and its chosen address, and remembered
        (refusal marker) so its next packets cost one lookup."""
        self._live(self.host_live, okey.saddr).refusals += 1
        self._live(self.addr_live, addr).refusals += 1
        self.refused.pop(okey, None)  # an LRU of MAX_REFUSED markers, as snat_refused
        if len(self.refused) >= MAX_REFUSED:
            del self.refused[next(iter(self.refused))]
        self.refused[okey] = Refusal(now, addr, reason)
        return Result(Verdict.DROP, reason, pkt, rule=rule)

    def _established_out(self, pkt: bytes, v: IPv4View, e: CtEntry, ingress: str, now: float) -> Result:
        if v.ttl <= 1:
            return Result(Verdict.PASS, Reason.PASS_TTL, pkt, rule=e.rule, nat=(e.rw_addr, e.rw_port))
        if e.flags & CT_F_HAIRPIN:
            return self._hairpin(pkt, v, e, now)
        if v.tot_len > e.mtu and v.df:
            res = Result(Verdict.PASS, Reason.PASS_FRAG_NEEDED, pkt, rule=e.rule, nat=(e.rw_addr, e.rw_port))
            # new_gw: the kernel's own route is not the session's, so it cannot answer with its MTU
            return self._refuse_icmp(pkt, v, ingress, now, res, e.mtu) if e.flags & CT_F_NEW_GW else res
        return self._translate_out(pkt, v, e, now, Reason.XLATE_OUT)

    def _translate_out(self, pkt: bytes, v: IPv4View, e: CtEntry, now: float, reason: Reason) -> Result:
        if v.proto == IPPROTO_TCP:
            tcp_update(e, v.flags, reply=False)
        buf = bytearray(pkt)
        to_kernel = v.tot_len > e.mtu  # no DF: the kernel fragments it (and decrements TTL)
        translate(buf, v, True, e.rw_addr, e.rw_port, dec_ttl=not to_kernel)
        self._touch(e, v, now)
        if v.is_first_fragment:
            key = FragKey(ip(v.saddr), ip(v.daddr), v.ipid, v.proto)
            self.frags.remember(key, FragEntry(e.rw_addr, ip(v.daddr), e.oif, e.nexthop, now))
        if to_kernel:  # a new_gw egress's: its mark routes it there, not the kernel's own table
            mark = self.gw_marks.get((e.oif, e.nexthop), 0)
            return Result(Verdict.PASS_TRANSLATED, reason, bytes(buf), e.oif, e.nexthop, e.rule,
                          (e.rw_addr, e.rw_port), mark)  # fmt: skip
        return Result(Verdict.REDIRECT, reason, bytes(buf), e.oif, e.nexthop, e.rule, (e.rw_addr, e.rw_port))

    # ------------------------------------------------------------------ outside

    def _outside(self, pkt: bytes, v: IPv4View, now: float) -> Result:
        if v.frag > 0:
            return self._later_fragment(pkt, v, now)
        if v.proto == IPPROTO_ICMP:
            if v.is_icmp_error:
                return self._icmp_error(pkt, v, "outside")
            if v.icmp_type not in ICMP_QUERY_REPLIES:
                return Result(Verdict.PASS, Reason.PASS_ICMP_OTHER, pkt)
            sport, dport = 0, v.sport
        else:
            sport, dport = v.sport, v.dport
        e = self.table.lookup(in_key(ip(v.saddr), ip(v.daddr), sport, dport, v.proto))
        out = self.table.lookup(e.peer) if e is not None else None
        if e is None:  # step 6a: to a live endpoint-independent mapping, admitted by its filtering
            res = self._inbound_new(pkt, v, now)
            if res is not None:
                return res
        if e is None or out is None:
            return Result(Verdict.PASS, Reason.PASS_NO_SESSION_IN if v.proto in PROTOS else Reason.PASS_PROTO, pkt)
        return self._translate_in(pkt, v, e, out, now)

    def _translate_in(self, pkt: bytes, v: IPv4View, e: CtEntry, out: CtEntry, now: float,
                      new: bool = False) -> Result:
        nat = (ip(v.daddr), v.sport if v.proto == IPPROTO_ICMP else v.dport)
        # The inside link is the narrow hop: a reply whose TTL runs out, or over the inside MTU
        # with DF, is translated and handed to the kernel, which answers the remote as an
        # untranslated gateway would (the egress program shows it the SNAT address and port)
        over = v.tot_len > e.mtu
        reason = Reason.XLATE_IN
        if v.ttl <= 1:
            reason = Reason.XLATE_IN_TTL
        elif over and v.df:
            reason = Reason.XLATE_IN_FRAG_NEEDED
        to_kernel = over or reason != Reason.XLATE_IN
        if new and reason == Reason.XLATE_IN:
            reason = Reason.XLATE_IN_NEW
        if v.proto == IPPROTO_TCP:
            tcp_update(out, v.flags, reply=True)
        out.flags |= CT_F_REPLIED
        e.flags |= CT_F_REPLIED  # the IN entry keeps a copy (the BPF reads it to skip a lookup)
        buf = bytearray(pkt)
        translate(buf, v, False, e.rw_addr, e.rw_port, dec_ttl=not to_kernel)
        self._touch(e, v, now)
        if v.is_first_fragment:
            key = FragKey(ip(v.saddr), ip(v.daddr), v.ipid, v.proto)
            self.frags.remember(key, FragEntry(ip(v.saddr), e.rw_addr, e.oif, e.nexthop, now))
        verdict = Verdict.PASS_TRANSLATED if to_kernel else Verdict.REDIRECT
        return Result(verdict, reason, bytes(buf), e.oif, e.nexthop, e.rule, nat)

    # ------------------------------------------------------------------ shared steps

    def _unmatched(self, pkt: bytes, reason: Reason) -> Result:
        if self.settings.unmatched_drop:
            return Result(Verdict.DROP, Reason.DROP_UNMATCHED, pkt)
        return Result(Verdict.PASS, reason, pkt)

    def _later_fragment(self, pkt: bytes, v: IPv4View, now: float) -> Result:
        key = FragKey(ip(v.saddr), ip(v.daddr), v.ipid, v.proto)
        fe = self.frags.lookup(key, now)
        if fe is None or fe.held:
            # before its first fragment: hold it (round the recirculation device, judged again
            # when it comes back) for up to FRAG_HOLD seconds since the datagram's first hold
            if self.recirc is None or (fe is not None and now - fe.created > FRAG_HOLD):
                return Result(Verdict.DROP, Reason.DROP_FRAG_UNKNOWN, pkt)
            if fe is None:
                self.frags.remember(key, FragEntry(ip(v.saddr), ip(v.daddr), HELD, None, now))
            return Result(Verdict.REDIRECT, Reason.FRAG_HELD, pkt, self.recirc)
        if fe.passed:
            return Result(Verdict.PASS, Reason.PASS_FRAG_UNTRANSLATED, pkt)
        if v.ttl <= 1:
            return Result(Verdict.PASS, Reason.PASS_TTL, pkt)
        # longer than the egress device's MTU: translated and handed to the kernel, which
        # fragments it again (and decrements TTL); redirected, the device would drop it
        to_kernel = v.tot_len > self._dev_mtu(fe.oif)
        buf = bytearray(pkt)
        rewrite_fragment(buf, fe.saddr, fe.daddr, dec_ttl=not to_kernel)
        if to_kernel:  # as the first fragment: by its egress
            mark = self.gw_marks.get((fe.oif, fe.nexthop), 0)
            return Result(Verdict.PASS_TRANSLATED, Reason.XLATE_FRAG, bytes(buf), fe.oif, fe.nexthop, mark=mark)
        return Result(Verdict.REDIRECT, Reason.XLATE_FRAG, bytes(buf), fe.oif, fe.nexthop)

    def _icmp_error(self, pkt: bytes, v: IPv4View, side: str, ingress: str | None = None) -> Result | None:
        """ICMP errors, three ways (docs/datapath.md "ICMP errors").  ``ingress``: the inside
        device an inside error came in by."""
        iv = parse_inner(pkt, v)
        if isinstance(iv, Reason):
            return Result(Verdict.DROP, iv, pkt)
        if side == "outside":  # inner: SNAT addr:port -> remote:rport, as it left
            # sent to that packet's source (the SNAT address), as the kernel's conntrack checks
            e = self._inner_lookup(iv, about_reply=False) if v.daddr == iv.saddr else None
            if e is None:
                return Result(Verdict.PASS, Reason.PASS_NO_SESSION_IN, pkt)
            out = self.table.lookup(e.peer)
            nat = (out.rw_addr, out.rw_port)
            if v.ttl <= 1:
                return Result(Verdict.PASS, Reason.PASS_TTL, pkt, rule=e.rule, nat=nat)
            buf = bytearray(pkt)
            translate_icmp_error(buf, v, iv, outer_off=IP_DADDR, inner_off=IP_SADDR,
                                 addr=e.rw_addr, port=e.rw_port, ttl=True)  # fmt: skip
            self._count_rule(e.rule_id, packets=1, nbytes=v.tot_len)
            return Result(Verdict.REDIRECT, Reason.XLATE_ICMP_ERR_IN, bytes(buf), e.oif, e.nexthop, e.rule, nat)
        # inside or egress: inner: remote:rport -> inside:port, a reply as translated
        e = self._inner_lookup(iv, about_reply=True)
        back = self.table.lookup(e.peer) if e is not None and side == "inside" else None
        if e is not None and side == "inside" and (back is None or back.oif != ingress or v.daddr != iv.saddr):
            # from inside, only the device the session's replies go to, toward the reply's
            # source: another device's host (or one sending elsewhere) has no session here
            e = None
        if e is None:  # inside: the caller classifies it (no session to belong to)
            return None if side == "inside" else Result(Verdict.PASS, Reason.PASS_ICMP_OTHER, pkt)
        if side == "inside" and v.saddr != iv.daddr and (
                (v.icmp_type, v.icmp_code) in ICMP_HOST_ONLY_ERRORS or self._on_link(back, iv)):
            # only the quoted reply's destination, the session's inside host, sends this kind
            # (a neighbour on its link would tell the remote that host's port is closed); and
            # every kind when that host is on-link: no router stands between us and it
            return Result(Verdict.DROP, Reason.DROP_ICMP_NOT_FROM_HOST, pkt)
        nat = (e.rw_addr, e.rw_port)
        if side == "inside" and v.ttl <= 1:
            return Result(Verdict.PASS, Reason.PASS_TTL, pkt, rule=e.rule, nat=nat)
        buf = bytearray(pkt)
        inside = side == "inside"
        translate_icmp_error(buf, v, iv, outer_off=IP_SADDR if inside else None, inner_off=IP_DADDR,
                             addr=e.rw_addr, port=e.rw_port, ttl=inside)  # fmt: skip
        self._count_rule(e.rule_id, packets=1, nbytes=v.tot_len)
        if not inside:
            return Result(Verdict.PASS, Reason.XLATE_ICMP_ERR_OUT, bytes(buf), rule=e.rule, nat=nat)
        return Result(Verdict.REDIRECT, Reason.XLATE_ICMP_ERR_OUT, bytes(buf), e.oif, e.nexthop, e.rule, nat)

    @staticmethod
    def _on_link(back: CtEntry, iv: InnerView) -> bool:
        """The session's inside host (the quoted reply's destination) is on-link: the IN
        entry's next hop, the route back found at the session's creation (_route_back), is the
        host itself, as in the BPF.  Not the route when the error arrives: the session's replies
        keep going to that next hop whatever the routes do since, and the error is about them."""
        return back.nexthop == ip(iv.daddr)

    def _route_back(self, host: IPv4Address, remote: IPv4Address, dev: str) -> IPv4Address | None:
        """A new session's route back to its inside ``host`` (a reply from ``remote``): its next
        hop (the host itself when on-link) when it leaves by ``dev``, the device the session's
        replies go to; else None, the kernel's neighbour lookup (BPF: 0)."""
        r = self.router.lookup(host, remote)
        return r.gw if r.kind == "forward" and r.oif == dev else None

    def _inner_lookup(self, iv: InnerView, about_reply: bool) -> CtEntry | None:
        """The session an ICMP error's quoted packet belongs to.  About an outbound packet:
        the IN key (remote, SNAT addr, rport, SNAT port), echo request (remote, SNAT, 0, id).
        About a reply: the OUT key (inside, remote, port, rport), echo reply (inside, remote,
        id, 0).  A protocol without ports: ports 0.  Other ICMP types: no session."""
        if iv.proto == IPPROTO_ICMP:
            if iv.icmp_type not in (ICMP_QUERY_REPLIES if about_reply else ICMP_QUERY_REQUESTS):
                return None
            sport, dport = (iv.sport, 0) if about_reply else (0, iv.sport)
        elif iv.proto in (IPPROTO_TCP, IPPROTO_UDP):
            sport, dport = iv.dport, iv.sport
        else:  # a protocol without ports: its session has ports 0
            sport = dport = 0
        make = out_key if about_reply else in_key
        e = self.table.lookup(make(ip(iv.daddr), ip(iv.saddr), sport, dport, iv.proto))
        if e is None or self.table.lookup(e.peer) is None:
            return None
        return e

    def _spoofed(self, v: IPv4View, ingress: str) -> bool:
        """Edge invariant 3 (strict reverse path): the source must be routed back out of the
        device the packet came in by; a local source (pool, the gateway's own) never is, nor is
        a pool address the egress guard passes at once (FROM_NET_POOL), local or not.
        DHCP's 0.0.0.0 -> 255.255.255.255 (a host without an address) is let through."""
        if v.saddr == 0 and v.daddr == 0xFFFFFFFF:
            return False
        if self._guard_kind(ip(v.saddr)) == FROM_NET_POOL:
            return True
        back = self.router.lookup(ip(v.saddr), ip(v.daddr))
        return back.kind != "forward" or back.oif != ingress

    def _inbound_guard(self, res: Result, v: IPv4View) -> Result:
        """Edge invariant 2: a packet the outside program passes (no session, not ours to
        translate) may reach the kernel only when it is for the gateway itself; one the FIB
        would forward (to the inside, or back out) is dropped unless `inbound routed`."""
        if self.settings.inbound_routed or _multi_or_broadcast(v.daddr):
            return res
        if self.router.lookup(ip(v.daddr), ip(v.saddr)).kind != "forward":
            return res
        return Result(Verdict.DROP, Reason.DROP_INBOUND, res.packet)

    def _guard_kind(self, src: IPv4Address) -> int | None:
        """snat_from_nets' answer for ``src``: the kind of its longest match, None for none."""
        longest = max((n for n in self._guard_nets if src in n), key=lambda n: n.prefixlen, default=None)
        return None if longest is None else self._guard_nets[longest]

    def _leak_guard(self, pkt: bytes) -> Result | None:
        """The egress guard (edge invariant 1): any IPv4 packet (malformed too) leaving an uplink
        with its source in a rule's `from` net is dropped unless the source is local, or lies in
        a pool prefix inside that net (the longest match of rules.leak_guard_nets)."""
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            return None
        src = IPv4Address(pkt[IP_SADDR : IP_SADDR + 4])
        kind = self._guard_kind(src)
        if kind is None or kind == FROM_NET_POOL:  # no `from` net; one of our pools
            return None
        fib = self.router.lookup(src)
        if fib.kind == "local" and fib.oif not in self.inside:  # ours, and not inside-facing
            return None
        return Result(Verdict.DROP, Reason.DROP_LEAK, pkt)

    def _egress(self, pkt: bytes, v: IPv4View | Reason) -> Result | None:
        """TC egress of the uplinks: only ICMP errors (about a translated reply) are judged and
        counted; None for everything else (not IPv4, malformed, not an ICMP error, a later
        fragment), which passes uncounted, as do all the packets the programs redirect."""
        if isinstance(v, Reason) or v.frag > 0 or not v.is_icmp_error:
            return None
        return self._icmp_error(pkt, v, "egress")

    def _touch(self, e: CtEntry, v: IPv4View, now: float) -> None:
        e.last_seen = now
        self._count_rule(e.rule_id, packets=1, nbytes=v.tot_len)

    def _count_rule(self, rule_id: int, packets: int = 0, nbytes: int = 0, sessions: int = 0) -> None:
        c = self.rule_stats.get(rule_id) or RuleCounters(rule_id)
        self.rule_stats[rule_id] = replace(c, packets=c.packets + packets, bytes=c.bytes + nbytes,
                                           sessions=c.sessions + sessions)  # fmt: skip

    def _dev_mtu(self, dev: str) -> int:
        f = getattr(self.router, "dev_mtu", None)
        return f(dev) if f else 1500

    # ------------------------------------------------------------------ control plane

    def apply(self, rules: RuleSet, settings: Settings | None = None) -> int:
        """Reload: sessions are kept (with their mappings); sessions of a rule whose new_gw
        changed move to the new next hop now; removed rules' sessions live until expiry.  A
        session whose SNAT address is no longer in its rule's pool, or that moves to an
        outside device other than the one holding its address, is removed (spec "Rule changes
        and live sessions", turn 2): the flow's next packet starts a session with the rule's
        current pool and link.  The refusal markers and spill memos are forgotten when what
        they were judged under changed (schema.judged_under: a limit raised, spill turned on, a
        wider port range, a link's rules failed over), and a refused flow's next packet is
        judged again by the new rules instead of being dropped as DROP_REFUSED_RECENTLY for up
        to REFUSED_SECS; an apply that changes none of it keeps them, so a reload changing
        nothing costs no port search again (bpf: the backend's apply empties snat_refused and
        snat_spill_memo after writing the rules, on the same condition).  Returns how many
        sessions were removed."""
        old = {r.rule_id: r for r in self.rules}
        new = {r.rule_id: r for r in rules}
        owner = self._address_owners()
        gone = []
        for pair in list(self.table.pairs()):
            nr = new.get(pair.out.rule_id)
            if nr is None:
                continue
            pair.out.rule = pair.inn.rule = nr
            if pair.out.rw_addr not in nr.pool:
                gone.append(pair.out_key)
                continue
            orule = old.get(nr.rule_id)
            if orule is not None and orule.new_gw != nr.new_gw:
                self._move(pair, nr)
                if owner.get(pair.out.rw_addr, pair.out.oif) != pair.out.oif:
                    gone.append(pair.out_key)
        for k in gone:
            self.table.remove(k)
        was = self.host_counting
        self.rules = rules
        self._guard_nets = leak_guard_nets(rules)
        if settings is not None:
            self.settings = settings
            self.table.max_sessions = settings.max_sessions
            self.eim.capacity = EIM_PER_SESSION * settings.max_sessions
        self._rules_changed()
        judged = judged_under(rules, self.settings, self._ifindex_of)
        if judged != self._judged:
            self.refused.clear()
            self.spill.memos.clear()
        self._judged = judged
        if self.host_counting and not was:
            # a host limit turned on: the counts are recounted before any limit judges them
            # (bpf: CFG_F_HOST_COUNT set, the sweep's SWEEP_RECOUNT walk, then the rules)
            self.recount()
        return len(gone)

    def _rules_changed(self) -> None:
        self._rule_by_id = {r.rule_id: r for r in self.rules}
        self._has_eim = any(r.eim for r in self.rules)  # CFG_F_EIM: owners are looked up
        # CFG_F_HOST_COUNT: some rule has a host limit, so each new session counts for its host
        self.host_counting = any(rule_host_limit(r, self.settings) for r in self.rules)
        # snat_gw_marks: each distinct new_gw egress (device, next hop) -> its mark, numbered
        # as the bpf backend numbers them (fibrules.gw_numbers, keeping the last numbers)
        egs = []
        for r in self.rules:
            fib = self.router.lookup(r.new_gw) if r.new_gw is not None else None
            if fib is not None and fib.kind == "forward":
                egs.append((fib.oif, fib.gw))
        self._gw_numbers = gw_numbers(egs, self._gw_numbers)
        self.gw_marks = {eg: GW_MARK_BASE + n for eg, n in self._gw_numbers.items()}

    def _address_owners(self) -> dict[IPv4Address, str]:
        """SNAT address -> the outside device it is a local address of (the router's view);
        an address on none of them has no known owner."""
        local = getattr(self.router, "local", {})
        return {a: dev for a, dev in local.items() if dev in self.outside}

    def _move(self, pair: CtPair, rule: Rule) -> None:
        if rule.new_gw is not None:
            fib = self.router.lookup(rule.new_gw)
        else:
            fib = self.router.lookup(pair.out_key.daddr, pair.out_key.saddr)
        if fib.kind != "forward":
            return
        out = pair.out
        out.oif, out.nexthop, out.mtu = fib.oif, fib.gw, fib.mtu
        out.flags = (out.flags | CT_F_NEW_GW) if rule.new_gw is not None else (out.flags & ~CT_F_NEW_GW)

    def expire(self, now: float) -> int:
        """Remove sessions idle longer than their state's timeout; returns how many."""
        gone = [p.out_key for p in self.table.pairs() if is_expired(p, now, self.settings.timeout)]
        for k in gone:
            self.table.remove(k)
        self.frags.expire(now)
        self.recount()
        self.counted_at = now
        self._eim_expire(now)
        return len(gone)

    def _eim_expire(self, now: float) -> None:
        """Endpoints, owners and permits no live session refers to go after EIM_GRACE (the
        BPF sweep's walk does the same: docs/datapath.md "Endpoint-independent mapping")."""
        live: set[EimKey] = set()
        for p in self.table.pairs():
            if p.out.flags & CT_F_EIM:
                k = p.out_key
                live.add(endpoint_key(k.saddr, k.sport, k.proto))
                live.add(permit_key(k.saddr, k.sport, k.proto, k.daddr))
        self.eim.expire(live, now, EIM_GRACE)

    def recount(self) -> None:
        """The live counts' sessions counted again from the table, as the bpf expiry sweep
        does (refusals are kept; a count left at 0 sessions and 0 refusals goes, and an inside
        host's at 0 sessions whatever its refusals: hosts are unbounded): a host's limit frees
        up as its sessions expire, and without a host limit (host_counting off) this is what
        keeps the per-host sessions, as of the last recount."""
        for counts in (self.host_live, self.addr_live, self.rule_live):
            for c in counts.values():
                c.sessions = 0
        for p in self.table.pairs():
            self._live(self.host_live, p.out_key.saddr).sessions += 1
            self._live(self.addr_live, p.out.rw_addr).sessions += 1
            self._live(self.rule_live, p.out.rule_id).sessions += 1
        for counts in (self.host_live, self.addr_live, self.rule_live):
            keep_refused = counts is not self.host_live
            for k in [k for k, c in counts.items() if not c.sessions and not (keep_refused and c.refusals)]:
                del counts[k]

    def flush(self, rule_id: int | None = None, inside: IPv4Address | None = None,
              nat: IPv4Address | None = None) -> int:
        """Remove the sessions that match every filter given (rule id, inside address, SNAT
        address); none given: every session.  Returns how many."""
        gone = [p.out_key for p in self.table.pairs()
                if (rule_id is None or p.out.rule_id == rule_id) and (inside is None or p.out_key.saddr == inside)
                and (nat is None or p.out.rw_addr == nat)]  # fmt: skip
        for k in gone:
            self.table.remove(k)
        self.recount()  # the live counts follow, as the bpf backend's flush (a sweep) recounts them
        return len(gone)

    def sessions(self, now: float) -> list[Session]:
        return [self._session(p, now) for p in self.table.pairs()]

    def session_of(self, key: CtKey, now: float) -> Session | None:
        """The session whose OUT key is ``key`` (one lookup, as the bpf backend's
        session_of), None when there is none or only half of one (as sessions() lists)."""
        out = self.table.lookup(key)
        inn = self.table.lookup(out.peer) if out is not None and key.dir == CT_DIR_OUT else None
        if inn is None or inn.peer != key:
            return None
        return self._session(CtPair(key, out, out.peer, inn), now)

    def _session(self, p: CtPair, now: float) -> Session:
        idle = now - max(p.out.last_seen, p.inn.last_seen)
        k = p.out_key
        # no per-session packets/bytes (as struct ct_entry, memory): the rule counters count them
        return Session(
            proto=PROTO_NAMES.get(k.proto, str(k.proto)),
            inside=f"{k.saddr}:{k.sport}", remote=f"{k.daddr}:{k.dport}",
            nat=f"{p.out.rw_addr}:{p.out.rw_port}", state=CtState(p.out.state).name,
            idle=idle, expires=self.settings.timeout(p.out.state) - idle, rule_id=p.out.rule_id,
        )  # fmt: skip
