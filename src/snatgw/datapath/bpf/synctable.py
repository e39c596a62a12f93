"""The bpf backend's side of the session sync (daemon/sync.py; docs/operations.md "Stateful
failover (bpf backend)"): its sessions as sync records (the refresh walk, the audit ring's
create and end records), and the peer's records installed into snat_ct.

Installing a record is what an nft -> bpf switch does for a carried session
(``BpfBackend.insert_sessions`` and this module share ``pair_values``): the egress the kernel
would give the flow now (the backend's resolver: the rule's new_gw or the remote; MTU; the
route back to the inside host and its device for ``iif``), IN then OUT with BPF_NOEXIST, never
half a pair.  Before that the record must fit a local rule exactly (``judge``): its rule_id
exists here, the SNAT address is in that rule's pool as installed now and its port in
port_range, the inside address in the rule's ``from`` and the remote in its ``to``, a TCP
state for TCP and the UDP state for UDP; and before a pair is written, its routes must be
those under which the datapath would give the flow that rule (``routed_as_rule``: the remote
not behind an inside device, the inside host behind an inside device; anything else is
``rejected``; and the rule the datapath would choose with the route to the remote, the first
in priority order, is the record's: else ``other_rule`` or ``no_rule``), and its inside host
below the rule's max_sessions_per_host (``host_limit``).  A key holder can therefore only make
sessions a local rule could have made for an inside host's flow.

A pair with the same mapping takes the newer last_seen (the peer's age on our clock), and the
peer's TCP state when the peer saw the later packet; a key held by another mapping stays as it
is (``conflicts``).  An end removes the pair with the same mapping unless we saw a packet of it
after the peer's last one (the peer is the stale side: it came back after a failover).  The
live counts are the expiry sweep's to recount: the backend sweeps at its next GC tick after an
install or removal (as after its other control-plane writes); an inside host's count is added
to at once while the datapath counts hosts (``HostCounts``).  With an audit log, a session
installed is logged as a create marked ``synced``, one a peer's end removes as an end: each
line as its change is made, so a batch that fails part way logs what it did and no more.
"""

from __future__ import annotations

import bisect
import errno
import ipaddress
import socket
import time
from socket import inet_ntoa

from ... import layout as L
from ...daemon.synccodec import OP_END, OP_UPDATE, Record
from ...config.schema import rule_host_limit
from ...errors import BackendError
from ...rules import Route
from . import libbpf as B
from .audit import pair_record as audit_end
from .audit import proto_name
from .maps import CT_ENTRY, SessionPair, monotonic_ns

ROUTE_TTL = 5.0  # seconds a resolved route is reused by installs (the kernel is asked again after)
ROUTES_KEPT = 4096  # routes the cache holds at most (cleared when full)
END_SLACK_NS = 1_000_000_000  # an end is refused when we saw the session this much after the peer
SYNCED = (L.IPPROTO_TCP, L.IPPROTO_UDP)  # ICMP queries are short-lived and start again
TCP_STATES = frozenset(int(s) for s in L.CtState if s not in (L.CtState.UDP, L.CtState.ICMP))
#: flags a synced session keeps: its mapping's endpoint-independent sharing, hairpinning and a
#: walk's stamp are the sender's (the peer's pair is a plain one, its mapping the same)
KEPT_FLAGS = L.CT_F_REPLIED
#: what the installer made of the peer's records; of the refused ones, rejected (no local rule
#: allows the record: rule, pool, ports, state, hairpin, the devices its routes leave by),
#: other_rule (an earlier rule here would take the flow), no_rule (with the routes here no rule
#: would: the record's oif or gw are not the route's), host_limit (its inside host is at the
#: rule's max_sessions_per_host), table_full, no_route, conflicts
COUNTS = ("installed", "refreshed", "ended", "rejected", "conflicts", "table_full", "no_route", "stale_end",
          "end_unknown", "other_rule", "no_rule", "host_limit")
#: the audit log's ``why`` of a session the peer's end record removed
END_PEER = "peer_end"

_OFF = L.CT_ENTRY.offsets()
_KOFF = L.CT_KEY.offsets()


def pair_values(rule, ip, port, rip, rport, nip, nport, proto, state, flags, out_eg, in_eg, last_seen):
    """(OUT key, OUT entry, IN key, IN entry) of a session the control plane writes, as the
    datapath makes them: the OUT entry's egress ``out_eg`` and inside device (``iif``: the
    route back's device), the IN entry's route back ``in_eg`` (its MTU too: an MTU of 0 made
    every reply "over the MTU": handed to the kernel and counted as frag needed)."""
    out_key = L.CT_KEY.pack(saddr=int(ip), daddr=int(rip), sport=port, dport=rport, proto=proto, dir=L.CT_DIR_OUT)
    in_key = L.CT_KEY.pack(saddr=int(rip), daddr=int(nip), sport=rport, dport=nport, proto=proto, dir=L.CT_DIR_IN)
    in_val = L.CT_ENTRY.pack(peer=out_key, rw_addr=int(ip), rw_port=port, ifindex=in_eg[0], nexthop=int(in_eg[1]),
                             rule_id=rule.rule_id, mtu=min(in_eg[2], 0xFFFF), last_seen=last_seen)  # fmt: skip
    out_val = L.CT_ENTRY.pack(peer=in_key, rw_addr=int(nip), rw_port=nport, state=int(state),
                              flags=flags | (L.CT_F_NEW_GW if rule.new_gw else 0), ifindex=out_eg[0],
                              nexthop=int(out_eg[1]), rule_id=rule.rule_id, mtu=min(out_eg[2], 0xFFFF),
                              iif=in_eg[0] & 0xFFFF, last_seen=last_seen)  # fmt: skip
    return out_key, out_val, in_key, in_val


def write_pair(ct, out_key, out_val, in_key, in_val) -> str | None:
    """IN then OUT with BPF_NOEXIST (the datapath's order); never half a pair.  None when
    written, else why not: "taken" (a key exists) or "table_full"."""
    try:
        ct.put(in_key, in_val, flags=B.BPF_NOEXIST)
    except B.LibbpfError as e:
        return "taken" if e.errno == errno.EEXIST else "table_full"
    try:
        ct.put(out_key, out_val, flags=B.BPF_NOEXIST)
    except B.LibbpfError as e:
        ct.delete(in_key)
        return "taken" if e.errno == errno.EEXIST else "table_full"
    return None


class RouteCache:
    """The backend's resolver, each answer kept ROUTE_TTL seconds (a burst of records toward
    one remote from one inside host asks the kernel once); a failure is remembered as None for
    as long.  With ``src`` and ``iif`` the route is the one a packet from ``src`` arriving on
    ``iif`` is forwarded by (the datapath's own lookup for a new flow)."""

    def __init__(self, resolver, clock=time.monotonic):
        self.resolver, self.clock = resolver, clock
        self._routes: dict = {}

    def __call__(self, addr, src=None, iif: int = 0):
        now = self.clock()
        key = (addr, src, iif)
        hit = self._routes.get(key)
        if hit is not None and now - hit[0] < ROUTE_TTL:
            return hit[1]
        try:
            eg = self.resolver(addr) if src is None else self.resolver(addr, src, iif)
        except (BackendError, OSError, ValueError):
            eg = None
        if len(self._routes) >= ROUTES_KEPT:
            self._routes.clear()
        self._routes[key] = (now, eg)
        return eg


# --------------------------------------------------------------------------- our sessions -> records


def pair_record(p: SessionPair, now_ns: int) -> Record | None:
    """A live pair as an update record (None: not synced: ICMP, a hairpin session)."""
    k, e = p.out_key, p.out_raw
    proto = k[_KOFF["proto"]]
    flags = e[_OFF["flags"]]
    if proto not in SYNCED or flags & L.CT_F_HAIRPIN:
        return None
    sport = int.from_bytes(k[_KOFF["sport"] : _KOFF["sport"] + 2], "big")
    dport = int.from_bytes(k[_KOFF["dport"] : _KOFF["dport"] + 2], "big")
    rw_port = int.from_bytes(e[_OFF["rw_port"] : _OFF["rw_port"] + 2], "big")
    age = max(0, now_ns - p.last_seen) // 1_000_000
    return Record(OP_UPDATE, proto, e[_OFF["state"]], flags, bytes(k[0:4]), sport, bytes(k[4:8]), dport,
                  bytes(e[_OFF["rw_addr"] : _OFF["rw_addr"] + 4]), rw_port,
                  int.from_bytes(e[_OFF["rule_id"] : _OFF["rule_id"] + 4], "little"), age)  # fmt: skip


_AUD = L.AUDIT_REC.offsets()


def audit_record(raw: bytes, now_ns: int) -> Record | None:
    """One struct audit_rec of the snat_audit ring as a record (create: update; end: end);
    None for what is not synced."""
    kind, proto = raw[_AUD["kind"]], raw[_AUD["proto"]]
    if proto not in SYNCED or kind not in (L.AUDIT_NEW, L.AUDIT_END):
        return None
    last = int.from_bytes(raw[_AUD["last_seen"] : _AUD["last_seen"] + 8], "little")
    return Record(OP_UPDATE if kind == L.AUDIT_NEW else OP_END, proto, raw[_AUD["state"]], 0,
                  bytes(raw[_AUD["inside"] : _AUD["inside"] + 4]),
                  int.from_bytes(raw[_AUD["inside_port"] : _AUD["inside_port"] + 2], "big"),
                  bytes(raw[_AUD["remote"] : _AUD["remote"] + 4]),
                  int.from_bytes(raw[_AUD["remote_port"] : _AUD["remote_port"] + 2], "big"),
                  bytes(raw[_AUD["nat"] : _AUD["nat"] + 4]),
                  int.from_bytes(raw[_AUD["nat_port"] : _AUD["nat_port"] + 2], "big"),
                  int.from_bytes(raw[_AUD["rule_id"] : _AUD["rule_id"] + 4], "little"),
                  max(0, now_ns - last) // 1_000_000)  # fmt: skip


# --------------------------------------------------------------------------- records -> our table


class PoolIndex:
    """Whether an address is in any of the pools: their ranges merged and sorted, one bisect a
    look-up (a scan of every pool was 5 ms a record with 10,000 rules, for each record)."""

    def __init__(self, pools):
        spans: list[list[int]] = []
        for lo, hi in sorted((int(p.first), int(p.last)) for p in pools):
            if spans and lo <= spans[-1][1] + 1:
                spans[-1][1] = max(spans[-1][1], hi)
            else:
                spans.append([lo, hi])
        self._starts = [lo for lo, _ in spans]
        self._ends = [hi for _, hi in spans]

    def __contains__(self, addr) -> bool:
        i = bisect.bisect_right(self._starts, int(addr)) - 1
        return i >= 0 and int(addr) <= self._ends[i]


_index: tuple = (None, None)  # (a pools dict, its PoolIndex): the backend replaces its dict whole


def pool_index(pools: dict) -> PoolIndex:
    """The PoolIndex of ``pools`` (rule_id -> Pool), built once per dict."""
    global _index
    if _index[0] is not pools:
        _index = (pools, PoolIndex(pools.values()))
    return _index[1]


def judge(r: Record, rules: dict, pools: dict, settings) -> tuple | None:
    """(rule, inside, remote, SNAT address) when a local rule could have made ``r``'s session,
    else None (rejected)."""
    rule = rules.get(r.rule_id)
    if rule is None or r.proto not in SYNCED:  # ICMP queries are not carried (short-lived, made again)
        return None
    ip, rip, nip = (ipaddress.IPv4Address(a) for a in (r.inside, r.remote, r.nat))
    pool = pools.get(r.rule_id, rule.pool)
    if nip not in pool or ip not in rule.src or rip not in rule.dst:
        return None
    if not settings.port_min <= r.nport <= settings.port_max or not r.iport or not r.rport:
        return None
    if (r.proto == L.IPPROTO_TCP) != (r.state in TCP_STATES) or (r.proto == L.IPPROTO_UDP and r.state != L.CtState.UDP):
        return None
    if rip in pool_index(pools):  # a hairpin session (the remote is one of ours): not carried
        return None
    return rule, ip, rip, nip


def routed_as_rule(rule, ruleset, ip, rip, rt, in_eg, roles: dict) -> str | None:
    """None when the datapath would give a new flow ``ip`` -> ``rip`` to ``rule`` on this
    gateway as its routes are now (snat_v4_new), else the COUNTS key of why not: the route to
    the remote (``rt``) must leave by a device that is not an inside one (between inside
    networks nothing is translated) and the route back to the inside host (``in_eg``) by an
    inside device (the one whose reverse path would vouch for the source: the OUT entry's
    ``iif``): else "rejected"; and the first rule of ``ruleset`` in priority order that matches
    with the route's device and next hop (rules_match4: from, to, oif, gw) must be ``rule``:
    "other_rule" when an earlier one does, "no_rule" when none does (``RuleSet.first``: an
    index, not a walk of the rules before it)."""
    if roles.get(rt[0]) == L.IFACE_INSIDE or roles.get(in_eg[0]) != L.IFACE_INSIDE:
        return "rejected"
    try:
        oif = socket.if_indextoname(rt[0])
    except OSError:
        return "rejected"
    first = ruleset.first(ip, rip, Route(oif, ipaddress.IPv4Address(rt[1])))
    if first is None:
        return "no_rule"
    return None if first.rule_id == rule.rule_id else "other_rule"


class HostCounts:
    """The inside hosts' live sessions (snat_host_sess) as the datapath judges a host limit
    (snat_v4_new_mapping: refused when at ``max_sessions_per_host``), read once per host per
    install job and followed through its installs and ends.  Each install adds one to the map
    too while the datapath counts hosts (CFG_F_HOST_COUNT), as its own new session does: an
    atomic add (``add``: the sweep object's snat_host_add), so a later job or the host's next
    new flow sees it before the next sweep recounts, and a session the datapath makes for that
    host meanwhile keeps its own +1 (a read and a write lost it).  An end lowers the job's
    count only: the map keeps the removed session until the sweep the removal schedules (the
    next GC tick) recounts it (a decrement racing with a walk's snapshot would leave the count
    low, and a host over its limit; high only refuses early).  What the job judges is its
    read: the datapath's new sessions for that host during the job are not in it (a job lasts
    at most INSTALL_SECONDS; the datapath's own check is as close, a read before its add)."""

    def __init__(self, maps, counting: bool, add=None):
        self.map, self.counting, self._add = maps.maps[L.MAP_HOST_SESS], counting, add
        self._n: dict[bytes, int] = {}  # inside address (wire order) -> sessions

    def _get(self, host: bytes) -> int:
        got = self._n.get(host)
        if got is None:
            raw = self.map.get(host)
            got = self._n[host] = L.LIVE_COUNT.unpack(raw)["sessions"] if raw is not None else 0
        return got

    def full(self, host: bytes, limit: int) -> bool:
        return bool(limit) and self._get(host) >= limit

    def add(self, host: bytes) -> None:
        self._n[host] = self._get(host) + 1
        if self.counting and self._add is not None:
            self._add(host, 1)  # (the map full: the sweep counts it)

    def read(self, host: bytes) -> None:
        """Read the host's count now, before one of its sessions is removed (``ended``)."""
        self._get(host)

    def ended(self, host: bytes) -> None:
        """One of the host's sessions removed (a peer's end): one less for this job."""
        self._n[host] = max(0, self._get(host) - 1)


def audit_create(r: Record, rule_id: int) -> dict:
    """The audit log's create record of a session installed from the peer (``synced``)."""
    return {"event": "create", "time": time.time(), "proto": proto_name(r.proto), "inside_addr": inet_ntoa(r.inside),
            "inside_port": r.iport, "nat_addr": inet_ntoa(r.nat), "nat_port": r.nport,
            "remote_addr": inet_ntoa(r.remote), "remote_port": r.rport, "rule_id": rule_id, "synced": True}  # fmt: skip


def end_record(p: SessionPair, now_ns: int) -> Record | None:
    """The end record of a session the control plane removed (a rule change), for the peer;
    None for what is not synced."""
    r = pair_record(p, now_ns)
    return None if r is None else r._replace(op=OP_END, flags=0)


def install(backend, records: list[Record], routes: RouteCache, counts: dict,
            seconds: float | None = None) -> tuple[int, int]:
    """Apply the peer's ``records`` to ``backend``'s table (worker thread); adds to ``counts``
    (COUNTS); returns (how many pairs were written or removed: the live counts want a sweep,
    how many records were taken).  With ``seconds`` it stops once that long has passed (each
    new route is asked of the kernel: a burst toward many remotes would hold the worker, which
    every control request waits for), leaving the rest to the caller.  With an audit log
    (``backend.audit_sink``) each session installed is written there as a create marked
    ``synced``, each one an end record removed as an end (why END_PEER)."""
    cfg = backend.config
    if cfg is None or backend.maps is None or backend.readonly:
        counts["rejected"] += len(records)
        return 0, len(records)
    stop = None if seconds is None else time.monotonic() + seconds
    sink = getattr(backend, "audit_sink", None)  # set while the daemon writes an audit log
    audited: list[dict] = []
    try:
        changed, taken = _install(backend, records, routes, counts, stop, audited if sink is not None else None)
    finally:
        if audited:  # (a batch that fails part way: the sessions it installed or removed are logged)
            sink(audited)
    return changed, taken


def _host_counts(backend) -> HostCounts:
    counting = backend.host_counting()
    return HostCounts(backend.maps, counting, backend.sweeper().host_add if counting else None)


def _install(backend, records, routes, counts, stop, audited) -> tuple[int, int]:
    """install()'s loop; ``audited`` (None: no audit log) gets each line as its change is made."""
    cfg = backend.config
    ct = backend.maps.ct
    rules = {r.rule_id: r for r in cfg.rules}
    pools = backend._pools or {}  # (replaced whole when it changes, never edited: kept as is, indexed once)
    settings = cfg.settings
    now = monotonic_ns()
    changed = 0
    live = roles = hosts = None
    taken = 0
    for r in records:
        if stop is not None and taken and time.monotonic() >= stop:
            break
        taken += 1
        got = judge(r, rules, pools, settings)
        if got is None:
            counts["rejected"] += 1
            continue
        rule, ip, rip, nip = got
        # (a session idle for longer than our CLOCK_MONOTONIC has run, a standby booted minutes
        # ago: its last packet at our clock's start, not a negative time the entry cannot hold)
        peer_seen = max(1, now - r.age_ms * 1_000_000)
        out_key = L.CT_KEY.pack(saddr=int(ip), daddr=int(rip), sport=r.iport, dport=r.rport, proto=r.proto,
                                dir=L.CT_DIR_OUT)  # fmt: skip
        in_key = L.CT_KEY.pack(saddr=int(rip), daddr=int(nip), sport=r.rport, dport=r.nport, proto=r.proto,
                               dir=L.CT_DIR_IN)  # fmt: skip
        out_raw = ct.get(out_key)
        if out_raw is not None:
            p = SessionPair(out_key, out_raw, out_raw[: L.CT_KEY.size], None)
            if p.in_key != in_key:  # the flow has another mapping here
                counts["conflicts"] += 1
                continue
            p = backend.maps.reread(p) or p
            mine = p.last_seen
            if r.op == OP_END:
                if mine > peer_seen + END_SLACK_NS:
                    counts["stale_end"] += 1
                    continue
                if hosts is None:
                    hosts = _host_counts(backend)
                hosts.read(r.inside)  # (its count with the session, as the map has it until the sweep)
                backend.maps.delete_pair(p)
                counts["ended"] += 1
                hosts.ended(r.inside)  # a record of that host later in this job fits its room
                if audited is not None:
                    rec = audit_end(p.out_key, p.out, 0)
                    rec.update(why=END_PEER, synced=True)
                    audited.append(rec)
                changed += 1
                continue
            if peer_seen > mine:
                ch = {"last_seen": peer_seen}
                if r.proto == L.IPPROTO_TCP:
                    ch["state"] = r.state
                backend.maps.update_out(p, **ch)
            counts["refreshed"] += 1
            continue
        if r.op == OP_END:
            counts["end_unknown"] += 1  # nothing of it here
            continue
        in_raw = ct.get(in_key)
        if in_raw is not None:  # the SNAT address and port toward that remote are another flow's
            counts["conflicts"] += 1
            continue
        if live is None:
            live = backend.maps.live_total()
        if live >= settings.max_sessions:
            counts["table_full"] += 1
            continue
        # the routes of the inside host's flow as the datapath looks them up (snat_v4_new: from the
        # host, arriving on its inside device; the gateway's own route to the remote is another
        # under a policy rule on the source or a multipath route: another uplink)
        in_eg = routes(ip)
        rt = out_eg = None
        if in_eg is not None:
            rt = routes(rip, ip, in_eg[0])
            out_eg = routes(rule.new_gw, ip, in_eg[0]) if rule.new_gw else rt
        if rt is None or out_eg is None or in_eg is None:
            counts["no_route"] += 1
            continue
        if roles is None:
            roles = backend.maps.iface_roles()
        why = routed_as_rule(rule, cfg.rules, ip, rip, rt, in_eg, roles)
        if why is not None:
            counts[why] += 1
            continue
        if hosts is None:
            hosts = _host_counts(backend)
        if hosts.full(r.inside, rule_host_limit(rule, settings)):
            counts["host_limit"] += 1
            continue
        vals = pair_values(rule, ip, r.iport, rip, r.rport, nip, r.nport, r.proto, r.state, r.flags & KEPT_FLAGS,
                           out_eg, in_eg, peer_seen)  # fmt: skip
        why = write_pair(ct, *vals)
        if why == "taken":
            counts["conflicts"] += 1
        elif why == "table_full":
            counts["table_full"] += 1
        else:
            counts["installed"] += 1
            live += 1
            changed += 1
            if audited is not None:  # (before the count's add: a failure there leaves the session in the table)
                audited.append(audit_create(r, rule.rule_id))
            hosts.add(r.inside)
    return changed, taken


def describe(r: Record) -> str:
    """A record for a log line."""
    return (f"{'end' if r.op == OP_END else 'update'} proto {r.proto} {inet_ntoa(r.inside)}:{r.iport} -> "
            f"{inet_ntoa(r.remote)}:{r.rport} as {inet_ntoa(r.nat)}:{r.nport} rule {r.rule_id}")
