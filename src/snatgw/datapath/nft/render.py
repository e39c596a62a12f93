"""RuleSet + Settings -> the nftables rule set of table `ip snatgw` (JSON for `nft -j -f -`, and
text for `snatgw export`), plus the policy-routing entries new_gw needs.  Pure: no I/O; what must
be learnt from the kernel (the device a `gw` is reached through) comes in as arguments.

How the rule set works (docs/nftables.md has the long form and what differs from bpf):
  antispoof prerouting, priority raw (before conntrack): on an inside device a source that is
            not routed back out of it (`fib saddr . iif oif missing`), is local, or lies in a
            pool (rules.pool_sources, held or not) is dropped (counter `spoofed`): edge
            invariant 3; DHCP's 0.0.0.0 -> broadcast is let by.
  steer     prerouting/mangle: from an uplink, a NEW/INVALID/untracked packet the FIB would
            forward is dropped (counter `inbound`) unless `inbound routed`; later packets of a flow get ct mark -> meta mark (so they follow
            the rule's new_gw table); a NEW flow is matched in priority order against a
            PREDICTION of its route (`fib daddr oifname`); a predicted new_gw rule marks it.
  forward   filter: a packet of a session (ct mark ours, original direction) that arrives on a
            device not inside is dropped (counter `spoofed`: conntrack matches tuples, not
            devices); INVALID packets that match a rule are dropped (no untranslated leak); a NEW,
            unmarked flow is matched exactly (oifname, `rt ip nexthop`) against the rules without
            new_gw and gets the winning rule's ct mark; a marked NEW TCP flow that is not a pure
            SYN is dropped (no_session); `unmatched drop`; per-rule packet counters by ct mark.
            A new flow of ours from inside gets its inside device's id in its ct mark (mark_dev);
            an ICMP error from inside RELATED to a connection made on another inside device is
            dropped (err_dev, counter `no_session`): conntrack finds the connection by the
            quoted tuple whatever the device (edge invariant 3, docs/datapath.md step 7);
            a port/protocol unreachable or reassembly time exceeded from inside RELATED to a
            connection of ours whose original source is not the error's source is dropped
            (err_host, counter `not_from_host`, by the set `same_host`: S_SAME).
            A new flow over its host's max_sessions_per_host is dropped (counter `host_limit`),
            or with refuse_icmp answered with ICMP host unreachable, rate-limited (refuse_host).
  nat_out   postrouting/srcnat: `ct mark M` -> `snat to POOL[:PORTS]` (algo mapped, below).
  leak_guard postrouting, priority 200 (after NAT): a packet leaving an uplink whose source is
            still in a rule's `from` net and not a local address is dropped (counter `leak`),
            whatever sent it: edge invariant 1, the twin of the bpf egress guard.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, collapse_addresses

from ...config.schema import Settings, rule_host_limit
from ...errors import BackendError
from ...layout import ICMP_HOST_ONLY_ERRORS, REFUSE_ICMP_PER_SEC, Algo, CtState
from ...rules import ANY_NET, Rule, RuleSet, pool_sources

FAMILY = "ip"
TABLE = "snatgw"
MARK_TAG = 0x53470000  # "SG": every snatgw mark/ct mark has these high 16 bits
MARK_MASK = 0xFFFF0000
SLOTS = 1000  # rules per rule set in this backend (marks, tables and rule prefs per slot)
#: ct mark bits 10-15: the inside device a connection was made on (device_ids; 0: unknown, as
#: for a connection made before these bits existed).  A rule's mark is the rest (RULE_MASK):
#: what every match, counter map, flush and listing of a rule reads.
DEV_SHIFT = 10
DEV_MASK = 0x0000FC00
DEV_IDS = DEV_MASK >> DEV_SHIFT  # 63 ids: 1..63
RULE_MASK = 0xFFFFFFFF & ~DEV_MASK
RT_BASE = 31000  # policy routing: rule pref and table id are RT_BASE + slot
RT_PROTO = 201  # routes and ip rules we add carry `proto 201`, so we only ever remove ours
CHAINS = ("antispoof", "steer", "forward", "classify", "guard", "mark_dev", "err_dev", "err_host",
          "nat_out", "leak_guard")
C_NO_SESSION = "no_session"
C_UNMATCHED = "unmatched"
C_LEAK = "leak"
C_TABLE_FULL = "table_full"
C_HOST_LIMIT = "host_limit"
S_FULL = "full"  # holds MARK_TAG while the table is at max_sessions (the backend's expire() sets it)
C_INBOUND = "inbound"
C_SPOOFED = "spoofed"
C_NOT_FROM_HOST = "not_from_host"
#: err_host's equality oracle: nft (1.0.6, and the kernel's cmp) cannot compare two packet or
#: ct fields, so an error's `ct original ip saddr` is put in as X . X and `ip saddr . ct
#: original ip saddr` looked up: it is there only when the two are equal.  Elements live
#: S_SAME_TIMEOUT; full (65535, as every set here: that many distinct hosts' errors within it),
#: the update fails and the host's own error is dropped too (closed, never open)
S_SAME = "same_host"
S_SAME_TIMEOUT = 1  # seconds

#: what the kernel's nf_nat does for each algo, where it is exact and where it is not
ALGO_NOTES = {
    Algo.SDH: "sdh -> plain `snat to A-B`: a new (src, sport) gets the address nf_nat hashes from "
    "(src, dst) (jhash2 of src with dst as initval), as sdh's grouping but not lvs-snat's lookup2 "
    "pick; a (src, sport) with a live conntrack entry keeps that entry's address and port toward "
    "every destination (endpoint-independent, unlike lvs-snat's sdh)",
    Algo.SH: "sh -> `snat to A-B persistent`: nf_nat hashes the source only - one address per "
    "inside host, as sh, but not the same address as lvs-snat's jhash would pick",
    Algo.RANDOM: "random -> `snat to jhash ip saddr . ip daddr . th sport mod N map {i: A+i}`: "
    "one address per (source, destination, source port), as lvs-snat's random (a socket gets "
    "one address per destination); nft's jhash (lookup3, seed 0) differs from lvs-snat's "
    "lookup2, so the address differs; ICMP hashes type/code instead of the echo id",
}
PORT_NOTE = (
    "ports: the kernel keeps the client's port when it is inside the range and free, otherwise it "
    "searches from a hashed offset; lvs-snat (and the model) always start at raw(sport)+1, so the "
    "SNAT port differs"
)


def mark_of(slot: int) -> int:
    return MARK_TAG | slot


def rule_mark(ct_mark: int) -> int:
    """A connection's rule mark: its ct mark without the inside device's id."""
    return ct_mark & RULE_MASK


def device_ids(inside) -> dict[str, int]:
    """Inside device name -> its id 1..63 in ct mark bits 10-15: crc32(name) mod 63 + 1, the
    next free one on a clash (names in sorted order), so a device keeps its id across reloads
    and restarts unless a device added later clashes with it and sorts first.  Beyond 63
    devices the rest get none (their connections' errors are judged as before: accepted)."""
    out: dict[str, int] = {}
    used: set[int] = set()
    for name in sorted(set(inside)):
        if len(used) == DEV_IDS:
            break
        i = zlib.crc32(name.encode()) % DEV_IDS
        while i + 1 in used:
            i = (i + 1) % DEV_IDS
        used.add(i + 1)
        out[name] = i + 1
    return out


def table_of(slot: int) -> int:
    return RT_BASE + slot


def assign_slots(rules: RuleSet) -> dict[tuple, int]:
    """identity -> slot 0..SLOTS-1, from rule_id mod SLOTS, probing on collision in rule_id order,
    so a rule keeps its slot (and its sessions' ct mark) across reloads that leave it alone."""
    if len(rules) > SLOTS:
        raise BackendError(f"the nft backend handles at most {SLOTS} rules, got {len(rules)}")
    from ...config.parse import nft_refuses

    for r in rules:
        why = nft_refuses(r)
        if why:
            raise BackendError(f"{r.where or r.identity_text()}: filtering: {why}")
    used: dict[int, tuple] = {}
    out: dict[tuple, int] = {}
    for r in sorted(rules, key=lambda r: r.rule_id):
        s = r.rule_id % SLOTS
        while s in used:
            s = (s + 1) % SLOTS
        used[s] = r.identity
        out[r.identity] = s
    return out


def counter_name(rule: Rule, kind: str = "rule") -> str:
    """Named counters per rule: rule_<id> packets/bytes both ways, new_<id> sessions made."""
    return f"{kind}_{rule.rule_id:08x}"


# --------------------------------------------------------------------------- statement pieces
# Each piece is (text, json) so one builder yields both renderings and they cannot drift apart.


def _net(net: IPv4Network):
    if net.prefixlen == 32:
        return str(net.network_address), str(net.network_address)
    return str(net), {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _match(text_left: str, json_left: dict, value_text: str, value_json, op: str = "==") -> tuple:
    t = f"{text_left} {value_text}" if op == "==" else f"{text_left} {op} {value_text}"
    return t, {"match": {"op": op, "left": json_left, "right": value_json}}


def m_saddr(net: IPv4Network) -> tuple:
    t, j = _net(net)
    return _match("ip saddr", {"payload": {"protocol": "ip", "field": "saddr"}}, t, j)


def m_daddr(net: IPv4Network) -> tuple:
    t, j = _net(net)
    return _match("ip daddr", {"payload": {"protocol": "ip", "field": "daddr"}}, t, j)


def m_oifname(name: str) -> tuple:
    return _match("oifname", {"meta": {"key": "oifname"}}, f'"{name}"', name)


def _m_names(text_left: str, json_left: dict, names, op: str = "==") -> tuple:
    names = list(names)
    if len(names) == 1:
        return _match(text_left, json_left, f'"{names[0]}"', names[0], op)
    text = "{ " + ", ".join(f'"{n}"' for n in names) + " }"
    return _match(text_left, json_left, text, {"set": names}, op)


def m_iifnames(names, op: str = "==") -> tuple:
    return _m_names("iifname", {"meta": {"key": "iifname"}}, names, op)


def m_oifnames(names) -> tuple:
    return _m_names("oifname", {"meta": {"key": "oifname"}}, names)


def m_fib_oifnames(names) -> tuple:
    return _m_names("fib daddr oifname", {"fib": {"result": "oifname", "flags": ["daddr"]}}, names)


def m_fib_oifname(name: str) -> tuple:
    return _match("fib daddr oifname", {"fib": {"result": "oifname", "flags": ["daddr"]}}, f'"{name}"', name)


def m_fib_unicast() -> tuple:
    """The destination is routed (not local, broadcast, multicast): never steer the gateway's own."""
    return _match("fib daddr type", {"fib": {"result": "type", "flags": ["daddr"]}}, "unicast", "unicast")


def m_saddr_in(nets) -> tuple:
    """The source in any of ``nets`` (merged first: an nft set refuses overlapping intervals)."""
    nets = list(collapse_addresses(nets))
    if len(nets) == 1:
        return m_saddr(nets[0])
    pairs = [_net(n) for n in nets]
    return _match("ip saddr", {"payload": {"protocol": "ip", "field": "saddr"}},
                  "{ " + ", ".join(t for t, _ in pairs) + " }", {"set": [j for _, j in pairs]})


def m_fib_saddr_not_local() -> tuple:
    """The source is not an address of the device the packet leaves by (postrouting)."""
    return _match("fib saddr . oif type", {"fib": {"result": "type", "flags": ["saddr", "oif"]}}, "local", "local",
                  op="!=")


def m_nexthop(gw: IPv4Address) -> tuple:
    return _match("rt ip nexthop", {"rt": {"key": "nexthop", "family": "ip"}}, str(gw), str(gw))


def m_ct_state(*states: str) -> tuple:
    right = states[0] if len(states) == 1 else list(states)
    return f"ct state {','.join(states)}", {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": right}}


def m_ct_original() -> tuple:
    return _match("ct direction", {"ct": {"key": "direction"}}, "original", "original")


def m_ct_mark(mark: int) -> tuple:
    """The connection is of the rule with ``mark`` (whatever its inside device id)."""
    return f"{K_RULE[0]} == 0x{mark:08x}", {"match": {"op": "==", "left": K_RULE[1], "right": mark}}


def m_ct_dev(dev_id: int, op: str = "==") -> tuple:
    """The connection's inside device id (0: unknown) is / is not ``dev_id``."""
    return (f"ct mark and 0x{DEV_MASK:08x} {op} 0x{dev_id << DEV_SHIFT:08x}",
            {"match": {"op": op, "left": {"&": [{"ct": {"key": "mark"}}, DEV_MASK]}, "right": dev_id << DEV_SHIFT}})


def s_set_dev(dev_id: int) -> tuple:
    """Put the inside device's id into the connection's ct mark (its id bits are 0)."""
    v = dev_id << DEV_SHIFT
    return (f"ct mark set ct mark or 0x{v:08x}",
            {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"|": [{"ct": {"key": "mark"}}, v]}}})


def m_ct_mark_ours(ours: bool = True) -> tuple:
    op = "==" if ours else "!="
    return (
        f"ct mark and 0x{MARK_MASK:08x} {op} 0x{MARK_TAG:08x}",
        {"match": {"op": op, "left": {"&": [{"ct": {"key": "mark"}}, MARK_MASK]}, "right": MARK_TAG}},
    )


def m_icmp_host_only() -> tuple:
    """The ICMP error is of a kind only the quoted packet's destination host sends
    (layout.ICMP_HOST_ONLY_ERRORS: protocol and port unreachable, reassembly time exceeded)."""
    pairs = ", ".join(f"{t} . {c}" for t, c in ICMP_HOST_ONLY_ERRORS)
    key = {"concat": [{"payload": {"protocol": "icmp", "field": "type"}},
                      {"payload": {"protocol": "icmp", "field": "code"}}]}
    return (f"icmp type . icmp code {{ {pairs} }}",
            {"match": {"op": "==", "left": key, "right": {"set": [{"concat": [t, c]} for t, c in ICMP_HOST_ONLY_ERRORS]}}})


_CT_ORIG_SADDR = ("ct original ip saddr", {"ct": {"key": "ip saddr", "dir": "original"}})


def s_update_same() -> tuple:
    """Put the connection's original source in S_SAME as X . X (the equality oracle)."""
    k = _CT_ORIG_SADDR
    return (f"update @{S_SAME} {{ {k[0]} . {k[0]} }}",
            {"set": {"op": "update", "elem": {"concat": [k[1], k[1]]}, "set": f"@{S_SAME}"}})


def m_saddr_is_ct_original() -> tuple:
    """ip saddr == ct original ip saddr, by S_SAME (nft cannot compare two fields)."""
    key = {"concat": [K_SADDR[1], _CT_ORIG_SADDR[1]]}
    return (f"{K_SADDR[0]} . {_CT_ORIG_SADDR[0]} @{S_SAME}",
            {"match": {"op": "==", "left": key, "right": f"@{S_SAME}"}})


def m_tcp_not_syn() -> tuple:
    return (
        "tcp flags & (fin|syn|rst|ack) != syn",
        {"match": {"op": "!=", "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}},
                                              ["fin", "syn", "rst", "ack"]]}, "right": "syn"}},
    )  # fmt: skip


def m_l4_tcp_udp() -> tuple:
    return _match("meta l4proto", {"meta": {"key": "l4proto"}}, "{ tcp, udp }", {"set": ["tcp", "udp"]})


def s_set_mark(mark: int, meta: bool = True, ct: bool = True) -> list[tuple]:
    out = []
    if meta:
        out.append((f"meta mark set 0x{mark:08x}", {"mangle": {"key": {"meta": {"key": "mark"}}, "value": mark}}))
    if ct:
        out.append((f"ct mark set 0x{mark:08x}", {"mangle": {"key": {"ct": {"key": "mark"}}, "value": mark}}))
    return out


def s_restore_mark() -> tuple:
    """The packet mark from the rule's mark (no device id: the ip rules match the rule's mark)."""
    return f"meta mark set {K_RULE[0]}", {"mangle": {"key": {"meta": {"key": "mark"}}, "value": K_RULE[1]}}


def s_counter(name: str) -> tuple:
    return f'counter name "{name}"', {"counter": name}


def s_counter_map(entries: list[tuple[int, str]]) -> tuple:
    text = f"counter name {K_RULE[0]} map {{ " + ", ".join(f'0x{m:08x} : "{n}"' for m, n in entries) + " }"
    j = {"counter": {"map": {"key": K_RULE[1], "data": {"set": [[m, n] for m, n in entries]}}}}
    return text, j


def s_ct_count_over(set_name: str, key: tuple, limit: int) -> tuple:
    """`add @SET { KEY ct count over N }`: counts the live connections per key (nf_conncount;
    the packet's own included), matches when there are more than N."""
    text = f"add @{set_name} {{ {key[0]} ct count over {limit} }}"
    j = {"set": {"op": "add", "elem": key[1], "set": f"@{set_name}",
                 "stmt": [{"ct count": {"val": limit, "inv": True}}]}}  # fmt: skip
    return text, j


K_OURS = (f"ct mark and 0x{MARK_MASK:08x}", {"&": [{"ct": {"key": "mark"}}, MARK_MASK]})
K_RULE = (f"ct mark and 0x{RULE_MASK:08x}", {"&": [{"ct": {"key": "mark"}}, RULE_MASK]})
K_SADDR = ("ip saddr", {"payload": {"protocol": "ip", "field": "saddr"}})


def host_set(limit: int) -> str:
    return f"hosts_{limit}"


def v(verdict: str) -> tuple:
    return verdict, {verdict: None}


def v_jump(chain: str) -> tuple:
    return f"jump {chain}", {"jump": {"target": chain}}


def s_limit_per_second(rate: int) -> tuple:
    """`limit rate N/second`: matches while the token bucket (N a second, nft's default burst
    of 5) has a token."""
    return f"limit rate {rate}/second", {"limit": {"rate": rate, "per": "second"}}


def s_reject_host_unreachable() -> tuple:
    """ICMP destination unreachable, code 1 (host unreachable), to the packet's source: the kernel
    builds it (nf_send_unreach), routed back with the gateway's address toward that host."""
    return "reject with icmp type host-unreachable", {"reject": {"type": "icmp", "expr": "host-unreachable"}}


def s_snat(rule: Rule, ports: tuple[int, int] | None) -> tuple:
    """The SNAT statement for the rule's pool and algo (ALGO_NOTES says how faithful it is)."""
    pool = rule.pool
    prange = f":{ports[0]}-{ports[1]}" if ports else ""
    pj = {"range": list(ports)} if ports else None
    if pool.size > 1 and rule.algo == Algo.RANDOM:
        key_t = f"jhash ip saddr . ip daddr . th sport mod {pool.size} seed 0x0"
        key_j = {"jhash": {"mod": pool.size, "seed": 0, "expr": {"concat": [
            {"payload": {"protocol": "ip", "field": "saddr"}},
            {"payload": {"protocol": "ip", "field": "daddr"}},
            {"payload": {"protocol": "th", "field": "sport"}}]}}}  # fmt: skip
        addrs = [str(a) for a in pool.addresses()]
        if ports:
            items_t = [f"{i} : {a} . {ports[0]}-{ports[1]}" for i, a in enumerate(addrs)]
            items_j = [[i, {"concat": [a, {"range": list(ports)}]}] for i, a in enumerate(addrs)]
        else:
            items_t = [f"{i} : {a}" for i, a in enumerate(addrs)]
            items_j = [[i, a] for i, a in enumerate(addrs)]
        text = f"snat ip to {key_t} map {{ {', '.join(items_t)} }}"
        return text, {"snat": {"family": "ip", "addr": {"map": {"key": key_j, "data": {"set": items_j}}}}}
    addr_t = str(pool.first) if pool.size == 1 else f"{pool.first}-{pool.last}"
    addr_j = str(pool.first) if pool.size == 1 else {"range": [str(pool.first), str(pool.last)]}
    j: dict = {"family": "ip", "addr": addr_j}
    text = f"snat ip to {addr_t}{prange}"
    if pj:
        j["port"] = pj
    if rule.algo == Algo.SH and pool.size > 1:
        j["flags"] = "persistent"
        text += " persistent"
    return text, {"snat": j}


# --------------------------------------------------------------------------- the rule set


@dataclass(frozen=True)
class NftRule:
    chain: str
    pieces: tuple[tuple[str, object], ...]
    comment: str | None = None

    @property
    def text(self) -> str:
        t = " ".join(p[0] for p in self.pieces)
        return t + (f' comment "{self.comment}"' if self.comment else "")

    def as_json(self) -> dict:
        d = {"family": FAMILY, "table": TABLE, "chain": self.chain, "expr": [p[1] for p in self.pieces]}
        if self.comment:
            d["comment"] = self.comment
        return {"add": {"rule": d}}


@dataclass(frozen=True)
class RouteEntry:
    """Policy routing for one new_gw rule: `ip rule pref P fwmark M lookup T` + `default via`."""

    slot: int
    new_gw: IPv4Address
    rule: Rule

    @property
    def mark(self) -> int:
        return mark_of(self.slot)

    @property
    def table(self) -> int:
        return table_of(self.slot)

    def commands(self, via: IPv4Address | None = None, dev: str | None = None, onlink: bool = False,
                 unreachable: bool = False) -> list[list[str]]:  # fmt: skip
        """`ip` argv lists (without the leading `ip`) that install it; ``unreachable``: a table
        route that refuses the marked flows (while nothing routes the new_gw: they must not
        fall through to the main table's route, another uplink)."""
        if unreachable:
            route = ["route", "replace", "unreachable", "default"]
        else:
            route = ["route", "replace", "default", "via", str(via or self.new_gw)]
        if dev:
            route += ["dev", dev]
        if onlink:
            route.append("onlink")
        route += ["table", str(self.table), "proto", str(RT_PROTO)]
        rule = ["rule", "add", "pref", str(self.table), "fwmark", f"0x{self.mark:08x}/0xffffffff",
                "lookup", str(self.table), "proto", str(RT_PROTO)]  # fmt: skip
        return [route, rule]


@dataclass(frozen=True)
class Plan:
    """Everything the backend installs, built from one RuleSet + Settings."""

    rules: tuple[NftRule, ...]
    counters: tuple[str, ...]
    routes: tuple[RouteEntry, ...]
    slots: dict
    notes: tuple[str, ...]
    timeouts: tuple[tuple[str, str, dict], ...] = ()  # (object name, protocol, policy)
    sets: tuple[tuple[str, str], ...] = ()  # (name, key type) of the ct count sets

    def rule_by_mark(self, rules: RuleSet) -> dict[int, Rule]:
        return {mark_of(self.slots[r.identity]): r for r in rules}


def _chain_defs() -> list[tuple[str, dict | None]]:
    base = {"family": FAMILY, "table": TABLE}
    return [
        ("antispoof", base | {"name": "antispoof", "type": "filter", "hook": "prerouting", "prio": -300,
                              "policy": "accept"}),
        ("steer", base | {"name": "steer", "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}),
        ("forward", base | {"name": "forward", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}),
        ("classify", base | {"name": "classify"}),
        ("guard", base | {"name": "guard"}),
        ("mark_dev", base | {"name": "mark_dev"}),
        ("err_dev", base | {"name": "err_dev"}),
        ("err_host", base | {"name": "err_host"}),
        ("refuse_host", base | {"name": "refuse_host"}),
        ("nat_out", base | {"name": "nat_out", "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}),
        ("leak_guard", base | {"name": "leak_guard", "type": "filter", "hook": "postrouting", "prio": 200,
                               "policy": "accept"}),
    ]  # fmt: skip


_CHAIN_TEXT = {
    "antispoof": "type filter hook prerouting priority raw; policy accept;",
    "steer": "type filter hook prerouting priority mangle; policy accept;",
    "forward": "type filter hook forward priority filter; policy accept;",
    "nat_out": "type nat hook postrouting priority srcnat; policy accept;",
    "leak_guard": "type filter hook postrouting priority 200; policy accept;",
}


#: conntrack's TCP timeout policy states, each set from the snatgw state of the same name
#: (conntrack's syn_sent2, retrans and unacknowledged keep the kernel's)
NFT_TCP_STATES = (
    ("established", CtState.ESTABLISHED), ("syn_sent", CtState.SYN_SENT), ("syn_recv", CtState.SYN_RECV),
    ("fin_wait", CtState.FIN_WAIT), ("close_wait", CtState.CLOSE_WAIT), ("last_ack", CtState.LAST_ACK),
    ("time_wait", CtState.TIME_WAIT), ("close", CtState.CLOSE),
)  # fmt: skip


def timeout_objects(settings: Settings) -> list[tuple[str, str, dict]]:
    """conntrack timeout policies from the settings, set on every new flow from inside: every
    TCP state conntrack shares a name with (NFT_TCP_STATES) and UDP (replied and unreplied).
    ICMP has no policy in nft 1.0.6 (the backend sets the namespace's ICMP timeout instead).
    The object's name carries its values (TCP in NFT_TCP_STATES order), so a reload that
    changes one makes a new object."""
    tcp = {name: settings.timeout(st) for name, st in NFT_TCP_STATES}
    udp = settings.timeout(CtState.UDP)
    return [("tcp_" + "_".join(str(v) for v in tcp.values()), "tcp", tcp),
            (f"udp_{udp}", "udp", {"unreplied": udp, "replied": udp})]


def _exact(rule: Rule) -> list[tuple]:
    """A rule's conditions on the routed packet (forward hook: the route is known)."""
    out = [m_saddr(rule.src)]
    if rule.dst != ANY_NET:
        out.append(m_daddr(rule.dst))
    if rule.oif:
        out.append(m_oifname(rule.oif))
    if rule.gw:
        out.append(m_nexthop(rule.gw))
    return out


def _predicted(rule: Rule, gw_dev: dict, notes: list[str]) -> list[tuple]:
    """A rule's conditions before routing: the route's device by `fib daddr oifname`; a `gw`
    is only predictable as the device it is reached through (gw_dev, learnt from the kernel)."""
    out = [m_saddr(rule.src)]
    if rule.dst != ANY_NET:
        out.append(m_daddr(rule.dst))
    dev = rule.oif or (gw_dev.get(rule.gw) if rule.gw else None)
    if dev:
        out.append(m_fib_oifname(dev))
    if rule.gw and not rule.oif:
        if dev:
            notes.append(f"rule {rule.describe()!r}: before routing, gw {rule.gw} is predicted as "
                         f"'the route leaves via {dev}' (exact only if {dev} has one next hop)")
        else:
            notes.append(f"rule {rule.describe()!r}: the device of gw {rule.gw} is unknown here, so "
                         "the steering prediction ignores gw")
    return out


def plan(rules: RuleSet, settings: Settings, gw_dev: dict | None = None) -> Plan:
    """Build the rule set; ``gw_dev`` maps a `gw` address to the device the kernel reaches it by."""
    gw_dev = gw_dev or {}
    slots = assign_slots(rules)
    notes: list[str] = []
    out: list[NftRule] = []
    inside = [m_iifnames(settings.inside)] if settings.inside else []
    ports = (settings.port_min, settings.port_max)

    def add(chain, pieces, comment=None):
        out.append(NftRule(chain, tuple(pieces), comment))

    def tag(r: Rule) -> str:
        return f"{r.rule_id:08x} {r.describe()}"[:120]

    # antispoof: strict reverse path and no local source on the inside devices
    if settings.inside:
        add("antispoof", inside + [m_saddr(IPv4Network("0.0.0.0/32")), m_daddr(IPv4Network("255.255.255.255/32")),
                                   v("return")], "DHCP: a host without an address yet")  # fmt: skip
        add("antispoof", inside + [_match("fib saddr type", {"fib": {"result": "type", "flags": ["saddr"]}},
                                          "local", "local"), s_counter(C_SPOOFED), v("drop")],
            "a local (pool, gateway) source from inside")  # fmt: skip
        pools = pool_sources(rules.rules)
        if pools:  # held or not: an unheld one on an inside subnet passes the reverse path
            add("antispoof", inside + [m_saddr_in(pools), s_counter(C_SPOOFED), v("drop")],
                "a pool address from inside, held or not")  # fmt: skip
        add("antispoof", inside + [(
            "fib saddr . iif oif missing",
            {"match": {"op": "==", "left": {"fib": {"result": "oif", "flags": ["saddr", "iif"]}}, "right": False}}),
            s_counter(C_SPOOFED), v("drop")], "strict reverse path")  # fmt: skip
    # steer: no way in; timeouts for new flows; restore the flow's mark; predict up to the last
    # new_gw rule.  No way in is judged here, before routing, so the kernel does not even answer
    # a TTL-expiring probe of an inside address (it would quote the inside address outward)
    if settings.outside and not settings.inbound_routed:
        add("steer", [m_iifnames(settings.outside), m_ct_state("new", "invalid", "untracked"),
                      _match("fib daddr type", {"fib": {"result": "type", "flags": ["daddr"]}}, "unicast", "unicast"),
                      s_counter(C_INBOUND), v("drop")],
            "no way in: from an uplink only replies and errors about sessions")  # fmt: skip
    timeouts = timeout_objects(settings)
    for name, proto, _ in timeouts:
        add("steer", [m_ct_state("new")] + inside + [
            _match("meta l4proto", {"meta": {"key": "l4proto"}}, proto, proto),
            (f'ct timeout set "{name}"', {"ct timeout": name})])  # fmt: skip
    add("steer", [m_ct_original(), m_ct_mark_ours(), s_restore_mark()], "later packets follow the rule's route")
    if settings.inside:  # internal traffic (routed out of an inside device) is never steered
        add("steer", [m_ct_state("new"), m_ct_mark_ours(False)] + inside +
            [m_fib_oifnames(settings.inside), v("return")], "internal: inside to inside")  # fmt: skip
    last = max((i for i, r in enumerate(rules.rules) if r.new_gw), default=-1)
    for r in rules.rules[: last + 1]:
        m = mark_of(slots[r.identity])
        pre = [m_ct_state("new"), m_ct_mark_ours(False)] + inside + _predicted(r, gw_dev, notes)
        if r.new_gw:
            add("steer", pre + [m_fib_unicast()] + s_set_mark(m) + [v("return")], tag(r))
        else:
            add("steer", pre + [v("return")], tag(r))
    # forward: sessions continue only from inside, internal traffic, guard, exact match, non-SYN
    # drop, unmatched drop, counters
    if settings.inside:
        # conntrack finds a session by its tuple whatever the device: a host on a device that is
        # not an inside one (undeclared, so without the antispoof check) sending with an inside
        # host's tuple would be translated into that host's session
        add("forward", [m_ct_original(), m_ct_mark_ours(), m_iifnames(settings.inside, "!="),
                        s_counter(C_SPOOFED), v("drop")], "a session continues only from the inside devices")  # fmt: skip
        # an inside host's ICMP error about a reply belongs to the connection only from the
        # inside device the connection was made on (its id, mark_dev); conntrack relates it by
        # the quoted tuple alone, so a host on lan50 quoting a reply to lan40's host was
        # translated into that host's session.  No id (made before ids existed): as before
        add("forward", [m_ct_state("related"), _match("meta l4proto", {"meta": {"key": "l4proto"}}, "icmp", "icmp"),
                        m_ct_mark_ours(), m_ct_dev(0, "!=")] + inside +
            [("jump err_dev", {"jump": {"target": "err_dev"}})],
            "an ICMP error from inside only from the device of its connection")  # fmt: skip
        # port/protocol unreachable and reassembly time exceeded come only from the quoted
        # reply's destination, the connection's inside host (docs/datapath.md "ICMP errors"):
        # conntrack relates B's error about A's reply to A's connection by the tuple alone
        add("forward", [m_ct_state("related"), _match("meta l4proto", {"meta": {"key": "l4proto"}}, "icmp", "icmp"),
                        m_ct_mark_ours()] + inside + [m_icmp_host_only(),
                        ("jump err_host", {"jump": {"target": "err_host"}})],
            "an ICMP error only its host sends, only from that host")  # fmt: skip
        add("err_host", [s_update_same()])
        add("err_host", [m_saddr_is_ct_original(), v("return")])
        add("err_host", [s_counter(C_NOT_FROM_HOST), v("drop")], "not from the host its connection was made by")
        add("forward", inside + [m_oifnames(settings.inside), v("accept")], "internal: never translated")
    add("forward", [m_ct_state("invalid", "untracked"), ("jump guard", {"jump": {"target": "guard"}})],
        "no conntrack entry: never leaves untranslated")
    add("forward", [m_ct_state("new"), m_ct_original(), m_ct_mark_ours(False)] + inside +
        [("jump classify", {"jump": {"target": "classify"}})])  # fmt: skip
    add("forward", [m_ct_state("new"), m_ct_mark_ours(), ("meta l4proto tcp", {"match": {
        "op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}), m_tcp_not_syn(),
        s_counter(C_NO_SESSION), v("drop")], "TCP that is not a pure SYN and has no session")  # fmt: skip
    if settings.unmatched_drop:
        add("forward", [m_ct_state("new"), m_ct_original(), m_ct_mark_ours(False)] + inside +
            [s_counter(C_UNMATCHED), v("drop")], "unmatched drop")  # fmt: skip
    # max_sessions: while the backend finds the table full (expire(), every GC tick) the set
    # `full` holds our mark tag and new flows are refused.  (A per-flow `ct count` over all
    # sessions walks its list of connections: measured 2.2 kpps of new flows at 10k sessions.)
    sets = [(S_FULL, "mark")] + ([(S_SAME, "ipv4_addr . ipv4_addr")] if settings.inside else [])
    add("forward", [m_ct_state("new"), m_ct_original(), m_ct_mark_ours(),
                    (f"{K_OURS[0]} @{S_FULL}", {"match": {"op": "==", "left": K_OURS[1], "right": f"@{S_FULL}"}}),
                    s_counter(C_TABLE_FULL), v("drop")], "max_sessions: refuse, never evict")  # fmt: skip
    # max_sessions_per_host: one ct count per limit value, over the rules that have it
    for r in rules.rules:
        limit = rule_host_limit(r, settings)
        if limit:
            if (host_set(limit), "ipv4_addr") not in sets:
                sets.append((host_set(limit), "ipv4_addr"))
            add("forward", [m_ct_state("new"), m_ct_original(), m_ct_mark(mark_of(slots[r.identity])),
                            s_ct_count_over(host_set(limit), K_SADDR, limit), s_counter(C_HOST_LIMIT),
                            v_jump("refuse_host") if settings.refuse_icmp else v("drop")],
                f"max_sessions_per_host {limit}")  # fmt: skip
    if settings.refuse_icmp:
        # refuse_icmp yes (RFC 6888 REQ-11): the refused packet is answered with ICMP host
        # unreachable, at most REFUSE_ICMP_PER_SEC a second over all hosts as on bpf (a token
        # bucket here, a calendar second there), and dropped beyond that; the kernel's own ICMP
        # rate limits (net.ipv4.icmp_ratelimit, per destination host) apply on top
        add("refuse_host", [s_limit_per_second(REFUSE_ICMP_PER_SEC), s_reject_host_unreachable()],
            "refuse_icmp: a host over its max_sessions_per_host hears host unreachable")  # fmt: skip
        add("refuse_host", [v("drop")], "refuse_icmp: over the rate, dropped in silence")
    if settings.inside:  # a new flow of ours remembers its inside device (once: its id bits are 0)
        add("forward", [m_ct_state("new"), m_ct_original(), m_ct_mark_ours(), m_ct_dev(0)] + inside +
            [("jump mark_dev", {"jump": {"target": "mark_dev"}})])  # fmt: skip
        for name, dev_id in sorted(device_ids(settings.inside).items(), key=lambda x: x[1]):
            add("mark_dev", [m_iifnames([name]), s_set_dev(dev_id), v("return")])
            add("err_dev", [m_iifnames([name]), m_ct_dev(dev_id), v("return")])
        add("err_dev", [s_counter(C_NO_SESSION), v("drop")], "about a connection of another inside device")
    if len(rules):
        add("forward", [s_counter_map([(mark_of(slots[r.identity]), counter_name(r)) for r in rules.rules])])
    for r in rules.rules:
        m = mark_of(slots[r.identity])
        if not r.new_gw:
            add("classify", _exact(r) + s_set_mark(m, meta=False) + [v("return")], tag(r))
        add("guard", _exact(r) + [s_counter(C_NO_SESSION), v("drop")], tag(r))
        cnt = s_counter(counter_name(r, "new"))
        add("nat_out", [m_ct_mark(m), m_l4_tcp_udp(), cnt, s_snat(r, ports)], tag(r))
        add("nat_out", [m_ct_mark(m), cnt, s_snat(r, None)], tag(r))
    if settings.outside and len(rules):
        # after NAT: a source still in a `from` net was not translated; an address of the uplink
        # it leaves by is ours (the gateway's own, a pool address under a catch-all `from`),
        # any other local one (the gateway's inside-facing addresses) is not
        add("leak_guard", [m_oifnames(settings.outside), m_saddr_in([r.src for r in rules.rules]),
                           m_fib_saddr_not_local(), s_counter(C_LEAK), v("drop")],
            "no private source leaves an uplink untranslated")  # fmt: skip
    counters = [C_NO_SESSION, C_UNMATCHED, C_LEAK, C_TABLE_FULL, C_HOST_LIMIT, C_INBOUND, C_SPOOFED,
                C_NOT_FROM_HOST]
    for r in rules.rules:
        counters += [counter_name(r), counter_name(r, "new")]
    routes = tuple(RouteEntry(slots[r.identity], r.new_gw, r) for r in rules.rules if r.new_gw)
    return Plan(tuple(out), tuple(counters), routes, slots, tuple(notes), tuple(timeouts), tuple(sets))


def to_json(p: Plan, stale_counters: tuple[str, ...] = (), stale_timeouts: tuple[str, ...] = (),
            with_timeouts: bool = True) -> dict:
    """One transaction: (re)create the table, flush it, define everything; old sessions live on
    in conntrack, so a reload never drops them.  Stale counters and timeout objects are deleted
    in the same batch.  nft 1.0.6 (Debian 12) loses a `ct timeout` policy given in JSON, so the
    backend creates those objects beforehand from text (timeouts_text) and passes
    ``with_timeouts=False``; `add` of an existing object leaves it as it is."""
    tbl = {"family": FAMILY, "name": TABLE}
    cmds: list[dict] = [{"add": {"table": tbl}}, {"flush": {"table": tbl}}]
    for _, c in _chain_defs():
        cmds.append({"add": {"chain": c}})
    for name in p.counters:
        cmds.append({"add": {"counter": {"family": FAMILY, "table": TABLE, "name": name}}})
    # the ct count sets come with the timeouts' text transaction (timeouts_text): nft 1.0.6's
    # JSON has no "dynamic" flag, and adding the same set again without it fails (EEXIST)
    for name, key in p.sets if with_timeouts else ():
        js = {"family": FAMILY, "table": TABLE, "name": name, "type": key.split(" . ") if " . " in key else key,
              "size": 65535}
        if name == S_SAME:
            js |= {"flags": ["timeout"], "timeout": S_SAME_TIMEOUT}
        cmds.append({"add": {"set": js}})
    for name, proto, policy in p.timeouts if with_timeouts else ():
        cmds.append({"add": {"ct timeout": {"family": FAMILY, "table": TABLE, "name": name,
                                            "protocol": proto, "l3proto": "ip", "policy": policy}}})
    for name in stale_counters:
        if name not in p.counters:
            cmds.append({"delete": {"counter": {"family": FAMILY, "table": TABLE, "name": name}}})
    for name in stale_timeouts:
        if name not in {t[0] for t in p.timeouts}:
            cmds.append({"delete": {"ct timeout": {"family": FAMILY, "table": TABLE, "name": name}}})
    cmds += [r.as_json() for r in p.rules]
    return {"nftables": cmds}


def to_json_text(p: Plan, stale_counters: tuple[str, ...] = (), stale_timeouts: tuple[str, ...] = (),
                 with_timeouts: bool = True) -> str:
    return json.dumps(to_json(p, stale_counters, stale_timeouts, with_timeouts), separators=(",", ":"))


def _timeout_lines(p: Plan) -> list[str]:
    out = []
    for name, proto, policy in p.timeouts:
        pol = ", ".join(f"{k}: {v}" for k, v in policy.items())
        out.append(f"\tct timeout {name} {{\n\t\tprotocol {proto}; l3proto ip\n\t\tpolicy = {{ {pol} }}\n\t}}")
    return out


def _set_lines(p: Plan) -> list[str]:
    return [f"\tset {name} {{\n\t\ttype {key}\n\t\tsize 65535\n\t\tflags dynamic{_SET_EXTRA.get(name, '')}\n\t}}"
            for name, key in p.sets]


#: sets whose elements time out (the ct count sets' do not)
_SET_EXTRA = {S_SAME: f",timeout\n\t\ttimeout {S_SAME_TIMEOUT}s"}


def timeouts_text(p: Plan) -> str:
    """`nft -f` text that adds the table, its ct timeout objects and its ct count sets
    (nothing else, no flush)."""
    return "\n".join([f"table {FAMILY} {TABLE} {{"] + _timeout_lines(p) + _set_lines(p) + ["}"]) + "\n"


def to_text(p: Plan) -> str:
    """`nft -f` text of the same rule set (what `snatgw export --format nft` prints)."""
    lines = [f"table {FAMILY} {TABLE} {{"]
    for name in p.counters:
        lines.append(f"\tcounter {name} {{ }}")
    lines += _set_lines(p)
    lines += _timeout_lines(p)
    for chain, _ in _chain_defs():
        lines.append("")
        lines.append(f"\tchain {chain} {{")
        if chain in _CHAIN_TEXT:
            lines.append(f"\t\t{_CHAIN_TEXT[chain]}")
        lines += [f"\t\t{r.text}" for r in p.rules if r.chain == chain]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def transaction_text(p: Plan, stale_counters: tuple[str, ...] = (), stale_timeouts: tuple[str, ...] = ()) -> str:
    """ONE `nft -f` transaction that replaces the whole rule set: create the table if absent,
    flush its rules, define counters, ct timeout objects, chains and rules (to_text), delete
    stale named objects.  The kernel applies all of it or none, so no packet ever meets a
    half-installed rule set (a reload, a restart that adopts the table, a backend switch).
    Text, not JSON: nft 1.0.6 (Debian 12) loses a `ct timeout` policy given in JSON."""
    lines = [f"add table {FAMILY} {TABLE}", f"flush table {FAMILY} {TABLE}", to_text(p).rstrip("\n")]
    for name in stale_counters:
        if name not in p.counters:
            lines.append(f"delete counter {FAMILY} {TABLE} {name}")
    for name in stale_timeouts:
        if name not in {t[0] for t in p.timeouts}:
            lines.append(f"delete ct timeout {FAMILY} {TABLE} {name}")
    return "\n".join(lines) + "\n"


def routing_text(p: Plan) -> str:
    """The policy-routing commands (shell) for new_gw rules, as comments say what they are for."""
    out = []
    for e in p.routes:
        out.append(f"# {e.rule.describe()}: marked flows use table {e.table}")
        for argv in e.commands():
            out.append("ip " + " ".join(argv))
    return "\n".join(out) + ("\n" if out else "")


__all__ = [
    "plan", "to_json", "to_json_text", "to_text", "transaction_text", "routing_text", "assign_slots", "Plan",
    "RouteEntry", "NftRule", "mark_of", "table_of", "counter_name", "TABLE", "FAMILY",
    "MARK_TAG", "MARK_MASK", "RULE_MASK", "DEV_MASK", "rule_mark", "device_ids", "RT_BASE", "RT_PROTO", "SLOTS", "ALGO_NOTES", "PORT_NOTE",
]  # fmt: skip
