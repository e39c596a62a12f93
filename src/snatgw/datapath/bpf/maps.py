"""Typed access to the datapath's maps: what each map must look like (MAP_SPECS, checked when
pins are reused), sessions as OUT/IN pairs, per-CPU reason sums, rule counters, and writing
the rules and config so that a reload never shows a half-written rule set for long.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from socket import inet_ntoa
from typing import Iterable

from ... import layout as L
from ...errors import BackendError
from ..backend import RuleCounters, Session
from . import libbpf as B

log = logging.getLogger("snatgw.bpf")

_PROTO_NAMES = {L.IPPROTO_TCP: "tcp", L.IPPROTO_UDP: "udp", L.IPPROTO_ICMP: "icmp"}


class FastCodec:
    """layout.Struct's unpack with a precompiled struct.Struct (layout recomputes its format
    on every call, which dominates a sweep over hundreds of thousands of ct entries)."""

    def __init__(self, st: L.Struct):
        self.st, self.s = st, struct.Struct(st.fmt)
        self.names = [n for n, _, _ in st.fields]
        self.be = [n for n, c, _ in st.fields if c.startswith("__be")]
        self.size = self.s.size

    def unpack(self, data: bytes) -> dict:
        d = dict(zip(self.names, self.s.unpack_from(data)))
        for n in self.be:
            d[n] = int.from_bytes(d[n], "big")
        return d

    def pack(self, **values) -> bytes:
        return self.st.pack(**values)


CT_ENTRY = FastCodec(L.CT_ENTRY)
CT_KEY = FastCodec(L.CT_KEY)
_DIR_OFF = L.CT_KEY.offsets()["dir"]


@dataclass(frozen=True)
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int

    def check(self, info: B.MapInfo, where: str) -> None:
        """Raise a clear BackendError when an existing (pinned) map differs from this spec."""
        diffs = []
        for field, want in (("type", self.type), ("key_size", self.key_size),
                            ("value_size", self.value_size), ("max_entries", self.max_entries)):  # fmt: skip
            got = getattr(info, field)
            if got != want:
                if field == "type":
                    got, want = B.MAP_TYPE_NAMES.get(got, got), B.MAP_TYPE_NAMES.get(want, want)
                diffs.append(f"{field} is {got}, expected {want}")
        if diffs:
            raise BackendError(
                f"{where}: pinned map {self.name} does not match this snatgw: {'; '.join(diffs)} "
                f"(another snatgw version's layout, which this one cannot carry over). Stop the old datapath "
                f"without keeping state, or remove {os.path.dirname(where) or where}, then start again"
            )


def map_specs(max_sessions: int = L.MAX_SESSIONS) -> dict[str, MapSpec]:
    """The maps of the BPF object as layout.py declares them; snat_ct holds 2 entries per
    session (OUT and IN)."""
    specs = [
        MapSpec(L.MAP_RULES, B.BPF_MAP_TYPE_ARRAY, 4, L.SNAT_RULE.size, L.MAX_RULES),
        MapSpec(L.MAP_CONFIG, B.BPF_MAP_TYPE_ARRAY, 4, L.SNAT_CFG.size, 1),
        MapSpec(L.MAP_CT, B.BPF_MAP_TYPE_HASH, L.CT_KEY.size, L.CT_ENTRY.size, 2 * max_sessions),
        MapSpec(L.MAP_FRAGS, B.BPF_MAP_TYPE_LRU_HASH, L.FRAG_KEY.size, L.FRAG_ENTRY.size, L.MAX_FRAGS),
        MapSpec(L.MAP_REASONS, B.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, L.REASON_MAX),
        MapSpec(L.MAP_RULE_STATS, B.BPF_MAP_TYPE_PERCPU_HASH, 4, L.RULE_STATS.size, L.MAX_RULES),
        MapSpec(L.MAP_IFACES, B.BPF_MAP_TYPE_HASH, 4, 4, L.MAX_IFACES),
        MapSpec(L.MAP_HOST_SESS, B.BPF_MAP_TYPE_HASH, 4, L.LIVE_COUNT.size, L.MAX_HOSTS),
        MapSpec(L.MAP_ADDR_STATS, B.BPF_MAP_TYPE_HASH, 4, L.LIVE_COUNT.size, L.MAX_POOL_ADDRS),
        MapSpec(L.MAP_RULE_LIVE, B.BPF_MAP_TYPE_HASH, 4, L.LIVE_COUNT.size, L.MAX_RULES),
        MapSpec(L.MAP_FROM_NETS, B.BPF_MAP_TYPE_LPM_TRIE, L.LPM_V4.size, 4, L.MAX_FROM_NETS),
        MapSpec(L.MAP_REFUSED, B.BPF_MAP_TYPE_LRU_HASH, L.CT_KEY.size, L.REFUSAL.size, L.MAX_REFUSED),
        MapSpec(L.MAP_SPILL_MEMO, B.BPF_MAP_TYPE_LRU_HASH, L.SPILL_KEY.size, L.SPILL_MEMO.size, L.MAX_SPILL_MEMO),
        MapSpec(L.MAP_ALLOC_CNT, B.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, L.ALLOC_CNT_N),
        MapSpec(L.MAP_INSIDE_ADDRS, B.BPF_MAP_TYPE_HASH, 4, 4, L.MAX_INSIDE_ADDRS),
        MapSpec(L.MAP_RULE_SLOTS, B.BPF_MAP_TYPE_HASH, 4, 4, L.MAX_RULES),
        MapSpec(L.MAP_GW_MARKS, B.BPF_MAP_TYPE_HASH, L.GW_KEY.size, 4, L.GW_SLOTS),
        MapSpec(L.MAP_EIM, B.BPF_MAP_TYPE_HASH, L.EIM_KEY.size, L.EIM_ENTRY.size, L.EIM_PER_SESSION * max_sessions),
        MapSpec(L.MAP_AUDIT, B.BPF_MAP_TYPE_RINGBUF, 0, 0, L.AUDIT_RING_BYTES),
        MapSpec(L.MAP_AUDIT_CNT, B.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, L.AUDIT_CNT_N),
        MapSpec(L.MAP_WALK, B.BPF_MAP_TYPE_ARRAY, 4, L.WALK_STATE.size, 1),
    ]
    return {s.name: s for s in specs}


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns()."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _ip(raw: int) -> str:
    return str(IPv4Address(raw))


_OFF = L.CT_ENTRY.offsets()
_KOFF = L.CT_KEY.offsets()
_RW = _OFF["rw_addr"]
_BE16 = struct.Struct(">H")
_BE16X2 = struct.Struct(">HH")
_STATE_NAMES = {int(s): s.name for s in L.CtState}
_PEER = slice(0, L.CT_KEY.size)
_IFX = slice(L.CT_ENTRY.offsets()["ifindex"], L.CT_ENTRY.offsets()["ifindex"] + 4)  # ct_entry.ifindex
_IIF = slice(L.CT_ENTRY.offsets()["iif"], L.CT_ENTRY.offsets()["iif"] + 2)  # ct_entry.iif
_EIM_IIF = slice(L.EIM_ENTRY.offsets()["iif"], L.EIM_ENTRY.offsets()["iif"] + 4)  # eim_entry.iif
_EIM_DIR_OFF = L.EIM_KEY.offsets()["dir"]
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


def peer_entry(ct: B.Map, key: bytes, value: bytes) -> bytes | None:
    """The session table's entry of the other direction of ``key``'s, looked up by the peer key
    in ``value``, when it points back at ``key``; None for a half pair (the other entry gone,
    or that key now another session's)."""
    other = ct.get(value[_PEER])
    return other if other is not None and other[_PEER] == key else None



def entry_peer(raw: bytes) -> bytes:
    return raw[_PEER]


def entry_last_seen(raw: bytes) -> int:
    return _U64.unpack_from(raw, _OFF["last_seen"])[0]


class SessionPair:
    """One session as stored: the OUT key/entry and the IN key/entry.  Entries are kept as
    raw bytes and decoded on demand (``out``/``inn`` dicts): a GC sweep reads only the
    few fields it needs."""

    __slots__ = ("out_key", "out_raw", "in_key", "in_raw", "_out", "_inn")

    def __init__(self, out_key: bytes, out_raw: bytes, in_key: bytes, in_raw: bytes | None):
        self.out_key, self.out_raw, self.in_key, self.in_raw = out_key, out_raw, in_key, in_raw
        self._out = self._inn = None  # in_raw None: the IN entry is missing (orphan/mid-insert)

    @property
    def out(self) -> dict:
        if self._out is None:
            self._out = CT_ENTRY.unpack(self.out_raw)
        return self._out

    @property
    def inn(self) -> dict | None:
        if self._inn is None and self.in_raw is not None:
            self._inn = CT_ENTRY.unpack(self.in_raw)
        return self._inn

    @property
    def last_seen(self) -> int:
        out = entry_last_seen(self.out_raw)
        return max(out, entry_last_seen(self.in_raw)) if self.in_raw is not None else out

    @property
    def rule_id(self) -> int:
        return _U32.unpack_from(self.out_raw, _OFF["rule_id"])[0]

    @property
    def state(self) -> int:
        return self.out_raw[_OFF["state"]]

    def to_session(self, timeout_of, now_ns: int) -> Session:
        """The Session, decoded straight from the raw bytes (listings decode a million)."""
        k, e = self.out_key, self.out_raw
        sport, dport = _BE16X2.unpack_from(k, _KOFF["sport"])
        proto, st = k[_KOFF["proto"]], e[_OFF["state"]]
        idle = max(0, now_ns - self.last_seen) / 1e9
        return Session(
            proto=_PROTO_NAMES.get(proto) or str(proto),
            inside=f"{inet_ntoa(k[0:4])}:{sport}",
            remote=f"{inet_ntoa(k[4:8])}:{dport}",
            nat=f"{inet_ntoa(e[_RW:_RW + 4])}:{_BE16.unpack_from(e, _OFF['rw_port'])[0]}",
            state=_STATE_NAMES.get(st) or str(st),
            idle=round(idle, 3),
            expires=round(timeout_of(st) - idle, 3),
            rule_id=_U32.unpack_from(e, _OFF["rule_id"])[0],  # packets/bytes stay 0: no per-session counters
        )


def _matcher(flt):
    """A test on (raw OUT key, raw OUT entry) for a sweep.SessionFilter (None: everything)."""
    if flt is None or flt.empty:
        return None
    tests = []
    if flt.rule_id is not None:
        rid = int(flt.rule_id)
        tests.append(lambda k, v: _U32.unpack_from(v, _OFF["rule_id"])[0] == rid)
    if flt.inside is not None:
        net, mask = int(flt.inside.network_address), int(flt.inside.netmask)
        tests.append(lambda k, v: int.from_bytes(k[0:4], "big") & mask == net)
    if flt.nat is not None:
        nat = flt.nat.packed
        tests.append(lambda k, v: v[_OFF["rw_addr"] : _OFF["rw_addr"] + 4] == nat)
    if flt.remote is not None:
        rnet, rmask = int(flt.remote.network_address), int(flt.remote.netmask)
        tests.append(lambda k, v: int.from_bytes(k[4:8], "big") & rmask == rnet)
    if flt.remote_port is not None:
        port = int(flt.remote_port).to_bytes(2, "big")
        tests.append(lambda k, v: k[_KOFF["dport"] : _KOFF["dport"] + 2] == port)
    if flt.proto is not None:
        proto = int(flt.proto)
        tests.append(lambda k, v: k[_KOFF["proto"]] == proto)
    if flt.state is not None:
        state = int(flt.state)
        tests.append(lambda k, v: v[_OFF["state"]] == state)
    return lambda k, v: all(t(k, v) for t in tests)


def _array_values(m, n: int) -> list[bytes]:
    """The values of slots 0..n-1 of array map ``m`` (an array's batch lookups go in slot order:
    a system call per 4,096 slots instead of one per slot; Map.items_batch falls back to
    lookups where the kernel has none)."""
    if n <= 0:
        return []
    return [v for _, v in itertools.islice(m.items_batch(min(n, 4096)), n)]


def _array_put(m, slots: list[tuple[int, bytes]], chunk: int = 1024) -> None:
    """Write (slot, value) pairs to array map ``m`` in their order, by batch updates."""
    for i in range(0, len(slots), chunk):
        part = slots[i : i + chunk]
        m.put_batch(b"".join(k.to_bytes(4, "little") for k, _ in part), b"".join(v for _, v in part), len(part))


def write_rule_slots(m, rules: list[bytes]) -> None:
    """Make map ``m`` (snat_rule_slots) hold exactly rule_id -> slot of ``rules`` (slot bytes)."""
    off = L.SNAT_RULE.offsets()["rule_id"]
    want = {rules[i][off : off + 4]: struct.pack("<I", i) for i in range(len(rules))}
    have = m.to_dict()
    for k, v in want.items():
        if have.get(k) != v:
            m.put(k, v)
    for k in have:
        if k not in want:
            m.delete(k)


#: maps the control plane's readers (`conns`, `stats` from the pins) do without, so that they
#: still read the pins of a datapath from before the map was added (only the programs and the
#: sweep use them)
READER_OPTIONAL = frozenset({L.MAP_WALK})


class DatapathMaps:
    """The seven maps by name (Map objects from a loaded BpfObject or opened from pins)."""

    def __init__(self, maps: dict[str, B.Map], owned: bool = False):
        missing = [n for n in map_specs() if n not in maps and n not in READER_OPTIONAL]
        if missing:
            raise BackendError(f"datapath maps missing: {', '.join(missing)}")
        self.maps, self.owned = maps, owned
        self.ct, self.rules, self.cfg = maps[L.MAP_CT], maps[L.MAP_RULES], maps[L.MAP_CONFIG]
        self.reasons_map, self.rule_stats_map = maps[L.MAP_REASONS], maps[L.MAP_RULE_STATS]
        self.frags = maps[L.MAP_FRAGS]
        self.ifaces = maps[L.MAP_IFACES]
        self.from_nets = maps[L.MAP_FROM_NETS]
        self.inside_addrs = maps[L.MAP_INSIDE_ADDRS]
        self.rule_slots = maps[L.MAP_RULE_SLOTS]
        self.gw_marks = maps[L.MAP_GW_MARKS]
        self._from_nets_written: dict[bytes, int] | None = None  # write_from_nets' last, whole
        #: the table being carried over to ``ct`` at a start (loader, carry.py): a pair removed
        #: from ``ct`` goes from it too, so the copy after attach does not bring it back
        self.shadow_ct: B.Map | None = None

    @classmethod
    def open_pinned(cls, pin_dir: str, readonly: bool = True) -> "DatapathMaps":
        """Open the pinned maps (``snatgw conns``/``stats`` when no daemon runs)."""
        maps: dict[str, B.Map] = {}
        try:
            for name in map_specs():
                path = os.path.join(pin_dir, name)
                if not os.path.exists(path) and name in READER_OPTIONAL:
                    continue
                if not os.path.exists(path):
                    raise BackendError(f"{path}: no pinned map: is the snatgw datapath running "
                                       f"(or its state kept) with pin_dir {pin_dir}?")  # fmt: skip
                maps[name] = B.Map.open_pinned(path, readonly=readonly)
        except BaseException:
            for m in maps.values():
                m.close()
            raise
        return cls(maps, owned=True)

    def close(self) -> None:
        if self.owned:
            for m in self.maps.values():
                m.close()

    # ----------------------------------------------------------------- sessions

    def ct_raw(self) -> dict[bytes, bytes]:
        return self.ct.to_dict()

    def session_pairs(self, entries: dict[bytes, bytes] | None = None) -> tuple[list[SessionPair], list[bytes]]:
        """(pairs keyed by their OUT entries, orphan IN keys) from raw ct entries: an orphan
        is an IN entry that no OUT entry points at (pairs whose IN is gone have in_raw None)."""
        entries = self.ct_raw() if entries is None else entries
        pairs, claimed = [], set()
        for k, v in entries.items():
            if k[_DIR_OFF] != L.CT_DIR_OUT:
                continue
            in_key = v[_PEER]
            inn = entries.get(in_key)
            if inn is not None and inn[_PEER] != k:
                inn = None
            if inn is not None:
                claimed.add(in_key)
            pairs.append(SessionPair(k, v, in_key, inn))
        orphans = [k for k in entries if k[_DIR_OFF] == L.CT_DIR_IN and k not in claimed]
        return pairs, orphans

    def iter_pairs(self, flt=None, with_in: bool = True, chunk: int = 4096):
        """Sessions as SessionPairs, streamed: the table is read one batch (``chunk`` entries)
        at a time and each OUT entry's IN entry looked up by key (``with_in``; half pairs are
        left out then).  ``flt`` (sweep.SessionFilter) selects on the raw OUT key and entry.
        Memory: one batch, whatever the table's size."""
        match = _matcher(flt)
        for part in self.ct._batches(chunk):
            for k, v in part:
                if k[_DIR_OFF] != L.CT_DIR_OUT or (match is not None and not match(k, v)):
                    continue
                in_key = v[_PEER]
                inn = None
                if with_in:
                    inn = peer_entry(self.ct, k, v)
                    if inn is None:
                        continue
                yield SessionPair(k, v, in_key, inn)

    # ----------------------------------------------------------------- live counts

    def _counts(self, name: str) -> dict[bytes, dict]:
        return {k: L.LIVE_COUNT.unpack(v) for k, v in self.maps[name].items_batch()}

    def live_total(self) -> int:
        """Live sessions: the sum of the per-rule live counts (every session has one rule)."""
        return sum(c["sessions"] for c in self._counts(L.MAP_RULE_LIVE).values())

    def live_counts(self) -> dict:
        rules = {int.from_bytes(k, "little"): c for k, c in self._counts(L.MAP_RULE_LIVE).items()}
        addrs = {_ip(int.from_bytes(k, "big")): c for k, c in self._counts(L.MAP_ADDR_STATS).items()}
        hosts = self._counts(L.MAP_HOST_SESS)
        return {
            "sessions": sum(c["sessions"] for c in rules.values()),
            "rules": {rid: c["sessions"] for rid, c in rules.items()},
            "addrs": {a: c["sessions"] for a, c in addrs.items()},
            "hosts": sum(1 for c in hosts.values() if c["sessions"]),
            "host_max": max((c["sessions"] for c in hosts.values()), default=0),
        }

    def reread(self, p: SessionPair) -> SessionPair | None:
        """The pair as it is now (None when its OUT entry is gone)."""
        out = self.ct.get(p.out_key)
        if out is None:
            return None
        in_key = out[_PEER]
        inn = self.ct.get(in_key)
        if inn is not None and inn[_PEER] != p.out_key:
            inn = None
        return SessionPair(p.out_key, out, in_key, inn)

    def delete_pair(self, p: SessionPair) -> None:
        """Delete a session: OUT first (a racing outbound packet then makes a new session,
        whose port search skips the still-present IN key), then IN if it is still ours."""
        for ct in (self.ct, self.shadow_ct) if self.shadow_ct is not None else (self.ct,):
            ct.delete(p.out_key)
            raw = ct.get(p.in_key)
            if raw is not None and raw[_PEER] == p.out_key:
                ct.delete(p.in_key)

    def follow_devices(self, moved: dict[int, int], inside_moved: dict[int, int], chunk: int = 4096) -> int:
        """Sessions of devices recreated with another ifindex follow them: an entry whose device
        (``ifindex``) is an old ifindex in ``moved`` gets the new one, and an OUT entry whose
        inside device (``iif``, its low 16 bits) is an old one in ``inside_moved`` gets the new
        one's, and so does an endpoint-independent mapping's ENDPOINT entry (its ``iif``: where the
        sessions it admits are delivered).  One pass over each table by batches; each entry to change is read again and
        written with BPF_EXIST right away (one that ended meanwhile is not resurrected; a
        packet's refresh racing with it may be lost, as for update_out).  Returns the entries
        rewritten."""
        if not moved and not inside_moved:
            return 0
        ifx = {_U32.pack(o): _U32.pack(n) for o, n in moved.items()}
        iif = {struct.pack("<H", o & 0xFFFF): struct.pack("<H", n & 0xFFFF) for o, n in inside_moved.items()}

        def changed(k: bytes, v: bytes) -> bytes | None:
            new = bytearray(v)
            got = ifx.get(bytes(v[_IFX]))
            if got is not None:
                new[_IFX] = got
            if k[_DIR_OFF] == L.CT_DIR_OUT:
                got = iif.get(bytes(v[_IIF]))
                if got is not None:
                    new[_IIF] = got
            return bytes(new) if new != v else None

        eim_iif = {_U32.pack(o): _U32.pack(n) for o, n in inside_moved.items()}

        def eim_changed(k: bytes, v: bytes) -> bytes | None:
            # an ENDPOINT's inside device, where sessions the mapping admits are delivered
            got = eim_iif.get(bytes(v[_EIM_IIF])) if k[_EIM_DIR_OFF] == L.EIM_DIR_ENDPOINT else None
            return None if got is None else v[: _EIM_IIF.start] + got + v[_EIM_IIF.stop :]

        n = self._rewrite(self.ct, changed, chunk)
        eim = self.maps.get(L.MAP_EIM)
        if eim is not None and eim_iif:
            n += self._rewrite(eim, eim_changed, chunk)
        return n

    @staticmethod
    def _rewrite(m: B.Map, changed, chunk: int) -> int:
        """Entries of ``m`` for which ``changed(key, value)`` gives new bytes get them: keys
        found by one pass of batches, each entry read again and written with BPF_EXIST right
        away (one that ended meanwhile stays ended).  Returns the entries rewritten."""
        todo = [k for part in m._batches(chunk) for k, v in part if changed(k, v) is not None]
        n = 0
        for k in todo:
            raw = m.get(k)
            new = changed(k, raw) if raw is not None else None
            if new is None:
                continue
            try:
                m.put(k, new, B.BPF_EXIST)
            except B.LibbpfError as err:
                if err.errno == 2:
                    continue
                raise
            n += 1
        return n

    def update_out(self, p: SessionPair, **changes) -> bool:
        """Rewrite fields of a live OUT entry (read-modify-write; BPF_EXIST so a session
        that expired meanwhile is not resurrected).  Counters racing with it may lose a
        packet's increment, which is acceptable for a rare control-plane edit."""
        raw = self.ct.get(p.out_key)
        if raw is None:
            return False
        e = CT_ENTRY.unpack(raw)
        e.update(changes)
        try:
            self.ct.put(p.out_key, L.CT_ENTRY.pack(**e), B.BPF_EXIST)
        except B.LibbpfError as err:
            if err.errno == 2:
                return False
            raise
        return True

    # ----------------------------------------------------------------- counters

    def reasons(self) -> dict[str, int]:
        """Per-reason packet counts summed over CPUs, by Reason name (only known reasons)."""
        return {r.name: self.reasons_map.sum_percpu(int(r)) for r in L.Reason}

    def packets_per_cpu(self) -> list[int]:
        """Packets each CPU handled: the per-reason counts (one per packet a program judged)
        summed per CPU, index = CPU number (every possible CPU): how receive packet steering
        (`rps_cpus`) spreads the work."""
        out: list[int] = []
        for r in L.Reason:
            for cpu, v in enumerate(self.reasons_map.get_percpu(int(r)) or []):
                if cpu >= len(out):
                    out.extend([0] * (cpu + 1 - len(out)))
                out[cpu] += int.from_bytes(v, "little")
        return out

    def audit_counts(self) -> dict[str, int]:
        """Audit records the datapath put in the ring (``written``) and dropped because the
        ring was full (``lost``), summed over CPUs."""
        m = self.maps[L.MAP_AUDIT_CNT]
        return {"written": m.sum_percpu(L.AUDIT_CNT_WRITTEN), "lost": m.sum_percpu(L.AUDIT_CNT_LOST)}

    def alloc_counts(self) -> dict[str, int]:
        """The port allocator's counters (snat_alloc_cnt) summed over CPUs, by
        layout.ALLOC_CNT_NAMES; {} when the pinned maps predate them, and only the counters a
        pinned map of an older layout has room for (its missing keys would read 0: made up)."""
        m = self.maps.get(L.MAP_ALLOC_CNT)
        if m is None:
            return {}
        return {name: m.sum_percpu(k) for k, name in L.ALLOC_CNT_NAMES.items() if k < m.max_entries}

    def rule_counters(self) -> dict[int, RuleCounters]:
        out = {}
        for k, _ in self.rule_stats_map.items():
            rid = int.from_bytes(k, "little")
            tot = {"packets": 0, "bytes": 0, "sessions": 0}
            for v in self.rule_stats_map.get_percpu(k) or []:
                for f, x in L.RULE_STATS.unpack(v).items():
                    tot[f] += x
            out[rid] = RuleCounters(rid, **tot)
        return out

    def pressure_counts(self) -> dict[str, dict]:
        """The live-count maps: MAP_HOST_SESS and MAP_ADDR_STATS by dotted address,
        MAP_RULE_LIVE by rule id; each value (sessions, refusals)."""
        out: dict[str, dict] = {}
        for name in (L.MAP_HOST_SESS, L.MAP_ADDR_STATS, L.MAP_RULE_LIVE):
            d = {}
            for k, v in self.maps[name].items():
                key = _U32.unpack(k)[0] if name == L.MAP_RULE_LIVE else str(IPv4Address(k))
                c = L.LIVE_COUNT.unpack(v)
                d[key] = (c["sessions"], c["refusals"])
            out[name] = d
        return out

    def refusal_markers(self) -> list[dict]:
        """The refusal markers: host, remote, ports, proto, the chosen SNAT address, reason
        name and ``at`` (ns, the programs' clock).  Read in raw batches (a system call per
        4,096, each batch unpacked at once by markers_of; bounded: the LRU holds MAX_REFUSED):
        it made a (key, value) pair per marker and a batch of one of each."""
        return markers_of(self.maps[L.MAP_REFUSED].raw_batches())

    def forget_judgements(self) -> list[tuple[int, bytes, bytes]]:
        """Empty the refusal markers and the spill memos (an apply: they were judged under the
        rules and settings it replaces); returns the markers as deleted, in batches of (n, n
        packed keys, n packed values): markers_of() lists them as refusal_markers does, for the
        refusal log's next look rather than in the apply.  Bounded by the two LRUs' sizes
        (MAX_REFUSED, MAX_SPILL_MEMO) and cheap at that bound: bpf_map_lookup_and_delete_batch
        hands back each marker as it deletes it, a system call per 4,096 entries (a delete per
        entry took ~0.35 s and unpacking them ~0.8 s of a reload with both maps full, now ~30 ms
        in all); a marker made meanwhile in a bucket already passed stays: it was judged by
        the new rules, written before this runs."""
        return forget_judgements(self.maps)

    def spill_memos(self, remote: str | None = None) -> list[dict]:
        """The spill memos (toward ``remote`` only, if given): remote address, SNAT address,
        remote port, proto (number) and age in ms (the programs' clock against CLOCK_MONOTONIC
        now; the tick-coarse clock may run a jiffy behind: at least 0)."""
        m = self.maps.get(L.MAP_SPILL_MEMO)
        if m is None:
            return []
        now, out = monotonic_ns(), []
        for k, v in m.items():
            key = L.SPILL_KEY.unpack(k)
            if remote is not None and _ip(key["remote"]) != remote:
                continue
            out.append({"remote": _ip(key["remote"]), "addr": _ip(key["addr"]), "rport": key["rport"],
                        "proto": key["proto"], "age_ms": max(0, (now - L.SPILL_MEMO.unpack(v)["at"]) // 1_000_000)})
        return out

    def zero(self) -> None:
        zero = bytes(8)
        for r in range(L.REASON_MAX):
            self.reasons_map.put(r, zero)
        if L.MAP_ALLOC_CNT in self.maps:
            for k in range(L.ALLOC_CNT_N):
                self.maps[L.MAP_ALLOC_CNT].put(k, zero)
        for k in self.rule_stats_map.keys():
            self.rule_stats_map.delete(k)

    # ----------------------------------------------------------------- interface roles

    def write_ifaces(self, roles: dict[int, int]) -> None:
        """Make snat_ifaces hold exactly ``roles`` (ifindex -> layout.IFACE_*): new and
        changed entries first, then stale ones removed."""
        if len(roles) > L.MAX_IFACES:
            raise BackendError(f"{len(roles)} interfaces: the datapath holds at most {L.MAX_IFACES}")
        want = {struct.pack("<I", i): struct.pack("<I", r) for i, r in roles.items()}
        have = dict(self.ifaces.items())
        for k, v in want.items():
            if have.get(k) != v:
                self.ifaces.put(k, v)
        for k in have:
            if k not in want:
                self.ifaces.delete(k)

    def write_from_nets(self, nets: dict[bytes, int], have: dict[bytes, int] | None = None) -> None:
        """Make snat_from_nets hold exactly ``nets`` (packed lpm_v4 -> FROM_NET_*): new and
        changed ones first, then the stale ones removed, so a net in both the old and the new
        rule set is never absent.  ``have``: what the trie holds, when the caller knows (one
        read of it per apply, not one per write)."""
        if len(nets) > L.MAX_FROM_NETS:
            raise BackendError(f"{len(nets)} `from` nets: the datapath holds at most {L.MAX_FROM_NETS}")
        if have is None:
            have = self.from_nets_now()
        self._from_nets_written = None  # unknown until every write below went in
        for k, kind in nets.items():
            if have.get(k) != kind:
                self.from_nets.put(k, struct.pack("<I", kind))
        for k in have.keys() - nets.keys():
            self.from_nets.delete(k)
        self._from_nets_written = dict(nets)

    def from_nets_now(self) -> dict[bytes, int]:
        """snat_from_nets as it is (packed lpm_v4 -> FROM_NET_*): what this object last wrote
        there, else read (an LPM trie has no batch lookup: two system calls per net, a tenth
        of a 10,000-rule reload; only the daemon that owns the pins writes them)."""
        if self._from_nets_written is not None:
            return dict(self._from_nets_written)
        return {k: struct.unpack("<I", v)[0] for k, v in self.from_nets.items()}

    def write_inside_addrs(self, addrs: dict[IPv4Address, int]) -> list[str]:
        """Make snat_inside_addrs hold exactly ``addrs`` (address -> ifindex of its device);
        returns what changed ("+ADDR", "-ADDR"), for the log."""
        want = {a.packed: struct.pack("<I", i) for a, i in list(addrs.items())[: L.MAX_INSIDE_ADDRS]}
        have = dict(self.inside_addrs.items())
        changed = []
        for k, v in want.items():
            if have.get(k) != v:
                self.inside_addrs.put(k, v)
                changed.append(f"+{IPv4Address(k)}")
        for k in have:
            if k not in want:
                self.inside_addrs.delete(k)
                changed.append(f"-{IPv4Address(k)}")
        return changed

    def iface_roles(self) -> dict[int, int]:
        return {struct.unpack("<I", k)[0]: struct.unpack("<I", v)[0] for k, v in self.ifaces.items()}

    # ----------------------------------------------------------------- rules and config

    def current_cfg(self) -> bytes:
        return self.cfg.get(0) or bytes(L.SNAT_CFG.size)

    def current_rules(self) -> tuple[bytes, list[bytes]]:
        cfg = self.current_cfg()
        n = min(L.SNAT_CFG.unpack(cfg)["nrules"], L.MAX_RULES)
        return cfg, _array_values(self.rules, n)

    def write_rules(self, cfg: bytes, rules: Iterable[bytes]) -> int:
        """Install a compiled rule set; returns how many slots were written.

        Only slots whose bytes change are written, and in an order that keeps each moment's
        visible set (slots < cfg.nrules) close to old or new: when growing, the new tail slots
        are written before cfg raises nrules; when shrinking, cfg lowers nrules first.

        The race: a new flow on another CPU may read the rules while changed slots in
        [0, min(old, new)) are being rewritten (one syscall each, and an array element copy
        is not atomic), so for microseconds it can match a mix of old and new rules.  That
        is acceptable: only the first packet of a new flow reads rules (established sessions
        never do), the flow still gets a valid rule's translation (old or new: both were
        valid configurations), and nothing is lost - its session keeps that mapping until
        it expires, exactly as if it had arrived a moment earlier or later.  A truly atomic
        swap would need an array-of-maps or a generation field in struct snat_cfg (a layout
        change for bpf-C); an unchanged reload writes nothing at all."""
        rules = list(rules)
        if len(rules) > L.MAX_RULES:
            raise BackendError(f"{len(rules)} rules, the datapath holds at most {L.MAX_RULES}")
        for i, r in enumerate(rules):
            if len(r) != L.SNAT_RULE.size:
                raise BackendError(f"rule slot {i}: {len(r)} bytes, expected {L.SNAT_RULE.size}")
        if len(cfg) != L.SNAT_CFG.size or L.SNAT_CFG.unpack(cfg)["nrules"] != len(rules):
            raise BackendError(f"snat_cfg must be {L.SNAT_CFG.size} bytes with nrules={len(rules)}")
        old_cfg, old = self.current_rules()
        written = 0

        def put(slots: list[tuple[int, bytes]]) -> None:
            # in slot order, a batch update per run of slots (as many puts, in one system call
            # each 1,024: a reload of 10,000 changed rules made 10,000 calls)
            nonlocal written
            _array_put(self.rules, slots)
            written += len(slots)

        if len(rules) >= len(old):
            put([(i, rules[i]) for i in range(len(old), len(rules))])
            put([(i, rules[i]) for i in range(len(old)) if old[i] != rules[i]])
            if cfg != old_cfg:
                self.cfg.put(0, cfg)
        else:
            if cfg != old_cfg:
                self.cfg.put(0, cfg)
            put([(i, rules[i]) for i in range(len(rules)) if old[i] != rules[i]])
            put([(i, bytes(L.SNAT_RULE.size)) for i in range(len(rules), len(old))])
        self.write_rule_slots(rules)
        return written

    def write_rule_slots(self, rules: list[bytes]) -> None:
        """snat_rule_slots: each rule's id -> its slot (after the rules: the datapath checks the
        slot's id, so a moment's stale entry finds nothing, never a wrong rule)."""
        write_rule_slots(self.rule_slots, rules)

    def gw_marks_now(self) -> dict[tuple[int, int], int]:
        """snat_gw_marks as it is: (ifindex, next hop as an int) -> mark."""
        out = {}
        for k, v in self.gw_marks.items():
            d = L.GW_KEY.unpack(k)
            out[(d["ifindex"], d["nexthop"])] = _U32.unpack(v)[0]
        return out

    def write_gw_marks(self, marks: dict[tuple[int, int], int]) -> None:
        """Make snat_gw_marks hold exactly ``marks`` ((ifindex, next hop int) -> mark)."""
        write_gw_marks(self.gw_marks, marks)


def write_gw_marks(m, marks: dict[tuple[int, int], int]) -> None:
    """Make map ``m`` (snat_gw_marks) hold exactly ``marks``: new and changed entries first,
    then the stale ones go."""
    keys = {L.GW_KEY.pack(ifindex=i, nexthop=nh): _U32.pack(mark) for (i, nh), mark in marks.items()}
    for k, v in keys.items():
        if m.get(k) != v:
            m.put(k, v)
    for k in list(m.keys()):
        if k not in keys:
            m.delete(k)


class ForgetFailed(BackendError):
    """forget_judgements could not empty a map, by batch nor entry by entry: ``markers`` holds
    the refusal markers it deleted before that (for the refusal log all the same)."""

    def __init__(self, msg: str, markers: list[tuple[int, bytes, bytes]]):
        super().__init__(msg)
        self.markers = markers


def _pop_all(m) -> list[tuple[int, bytes, bytes]]:
    """Empty map ``m``, its entries as deleted in forget_judgements' batches: by
    bpf_map_lookup_and_delete_batch; a kernel without it, or a batch call failing partway
    (the entries of the batches before it are deleted and in hand), empties the rest entry by
    entry (a read, then a delete each: bounded by the LRU's size), so nothing deleted is lost
    and nothing is left for a failure alone.  A failure there too raises ForgetFailed with the
    entries deleted until then."""
    got: list[tuple[int, bytes, bytes]] = []
    why = None
    try:
        for part in m.pop_batches():
            if part is None:  # a kernel without the batch call
                break
            got.append(part)
        else:
            return got
    except (B.LibbpfError, OSError) as e:
        why = e
        log.warning("%s: emptying by batch failed after %d entries (%s): the rest entry by entry", m.name,
                    sum(n for n, _, _ in got), e)  # fmt: skip
    try:
        for k, v in m.items():
            if m.delete(k):
                got.append((1, k, v))
    except (B.LibbpfError, OSError) as e:
        raise ForgetFailed(f"{m.name}: cannot be emptied{f' by batch ({why}) nor' if why else ''} entry by "
                           f"entry: {e}", got) from None  # fmt: skip
    return got


def forget_judgements(maps: dict) -> list[tuple[int, bytes, bytes]]:
    """DatapathMaps.forget_judgements over a dict of maps by name (the test harness's too).
    Each map is emptied as far as it can be (_pop_all); one that cannot be raises ForgetFailed
    once both were tried, with every refusal marker deleted until then."""
    markers: list[tuple[int, bytes, bytes]] = []
    failed = []
    for name in (L.MAP_REFUSED, L.MAP_SPILL_MEMO):
        m = maps.get(name)
        if m is None:
            continue
        try:
            got = _pop_all(m)
        except ForgetFailed as e:
            got = e.markers
            failed.append(str(e))
        if name == L.MAP_REFUSED:
            markers = got
    if failed:
        raise ForgetFailed("; ".join(failed), markers)
    return markers


def last_markers(parts: list[tuple[int, bytes, bytes]], n: int) -> list[tuple[int, bytes, bytes]]:
    """The last ``n`` markers of forget_judgements' batches (what several applies emptied
    before the refusal log looked, bounded as one map's worth)."""
    out, left = [], n
    for cnt, raw_k, raw_v in reversed(parts):
        if left <= 0:
            break
        if cnt > left:
            ks, vs = len(raw_k) // cnt, len(raw_v) // cnt
            cnt, raw_k, raw_v = left, raw_k[-left * ks :], raw_v[-left * vs :]
        out.append((cnt, raw_k, raw_v))
        left -= cnt
    return out[::-1]


_MARKER_KEY = struct.Struct("!4s4sHHB3x")  # ct_key as a marker's key: addresses, ports (network order), proto
_MARKER_VAL = struct.Struct("<Q4sI")  # struct refusal: at, addr, reason
assert _MARKER_KEY.size == L.CT_KEY.size and _MARKER_VAL.size == L.REFUSAL.size
_REASON_NAMES = {r.value: r.name for r in L.Reason}


def markers_of(parts) -> list[dict]:
    """refusal markers from (n, n packed keys, n packed values) batches, as
    DatapathMaps.refusal_markers lists them: one precompiled unpack over each batch and the
    addresses' strings made once (at MAX_REFUSED markers, layout's unpack and IPv4Address
    took most of a second)."""
    out, ips = [], {}

    def ip(raw: bytes) -> str:
        s = ips.get(raw)
        if s is None:
            s = ips[raw] = inet_ntoa(raw)
        return s

    for _, raw_k, raw_v in parts:
        for (sa, da, sp, dp, proto), (at, addr, reason) in zip(_MARKER_KEY.iter_unpack(raw_k),
                                                                _MARKER_VAL.iter_unpack(raw_v)):
            out.append({"host": ip(sa), "remote": ip(da), "sport": sp, "dport": dp,
                        "proto": _PROTO_NAMES.get(proto, str(proto)), "addr": ip(addr), "at": at,
                        "reason": _REASON_NAMES.get(reason, str(reason))})  # fmt: skip
    return out
