"""Typed access to the datapath's maps: what each map must look like (MAP_SPECS, checked when
pins are reused), sessions as OUT/IN pairs, per-CPU reason sums, rule counters, and writing
the rules and config so that a reload never shows a half-written rule set for long.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Iterable

from ... import layout as L
from ...errors import BackendError
from ..backend import RuleCounters, Session
from . import libbpf as B

_PROTO_NAMES = {L.IPPROTO_TCP: "tcp", L.IPPROTO_UDP: "udp", L.IPPROTO_ICMP: "icmp"}


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
                f"(a different max_sessions or an older layout?). Stop the old datapath without "
                f"keeping state, or remove {os.path.dirname(where) or where}, then start again"
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
    ]
    return {s.name: s for s in specs}


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns()."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _ip(raw: int) -> str:
    return str(IPv4Address(raw))


@dataclass
class SessionPair:
    """One session as stored: the OUT key/entry and the IN key/entry (decoded dicts)."""

    out_key: bytes
    out: dict
    in_key: bytes
    inn: dict | None  # None when the IN entry is missing (an orphan, or mid-insert)

    @property
    def last_seen(self) -> int:
        return max(self.out["last_seen"], self.inn["last_seen"] if self.inn else 0)

    @property
    def rule_id(self) -> int:
        return self.out["rule_id"]

    @property
    def state(self) -> int:
        return self.out["state"]

    def to_session(self, timeout_of, now_ns: int) -> Session:
        k = L.CT_KEY.unpack(self.out_key)
        idle = max(0, now_ns - self.last_seen) / 1e9
        try:
            state = L.CtState(self.state).name
        except ValueError:
            state = str(self.state)
        return Session(
            proto=_PROTO_NAMES.get(k["proto"], str(k["proto"])),
            inside=f"{_ip(k['saddr'])}:{k['sport']}",
            remote=f"{_ip(k['daddr'])}:{k['dport']}",
            nat=f"{_ip(self.out['rw_addr'])}:{self.out['rw_port']}",
            state=state,
            idle=round(idle, 3),
            expires=round(timeout_of(self.state) - idle, 3),
            rule_id=self.rule_id,
            packets_out=self.out["packets"],
            bytes_out=self.out["bytes"],
            packets_in=self.inn["packets"] if self.inn else 0,
            bytes_in=self.inn["bytes"] if self.inn else 0,
        )


class DatapathMaps:
    """The six maps by name (Map objects from a loaded BpfObject or opened from pins)."""

    def __init__(self, maps: dict[str, B.Map], owned: bool = False):
        missing = [n for n in map_specs() if n not in maps]
        if missing:
            raise BackendError(f"datapath maps missing: {', '.join(missing)}")
        self.maps, self.owned = maps, owned
        self.ct, self.rules, self.cfg = maps[L.MAP_CT], maps[L.MAP_RULES], maps[L.MAP_CONFIG]
        self.reasons_map, self.rule_stats_map = maps[L.MAP_REASONS], maps[L.MAP_RULE_STATS]
        self.frags = maps[L.MAP_FRAGS]

    @classmethod
    def open_pinned(cls, pin_dir: str, readonly: bool = True) -> "DatapathMaps":
        """Open the pinned maps (``snatgw conns``/``stats`` when no daemon runs)."""
        maps: dict[str, B.Map] = {}
        try:
            for name in map_specs():
                path = os.path.join(pin_dir, name)
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

    def ct_entries(self) -> dict[bytes, dict]:
        return {k: L.CT_ENTRY.unpack(v) for k, v in self.ct.items_batch()}

    def session_pairs(self, entries: dict[bytes, dict] | None = None) -> tuple[list[SessionPair], list[bytes]]:
        """(pairs keyed by their OUT entries, orphan keys): an orphan is an IN entry no OUT
        entry points at, or an OUT entry whose IN entry is gone."""
        entries = self.ct_entries() if entries is None else entries
        pairs, claimed, orphans = [], set(), []
        for k, e in entries.items():
            if k[L.CT_KEY.offsets()["dir"]] != L.CT_DIR_OUT:
                continue
            in_key = e["peer"]
            inn = entries.get(in_key)
            if inn is not None and inn["peer"] != k:
                inn = None
            if inn is not None:
                claimed.add(in_key)
            pairs.append(SessionPair(k, e, in_key, inn))
        dir_off = L.CT_KEY.offsets()["dir"]
        for k in entries:
            if k[dir_off] == L.CT_DIR_IN and k not in claimed:
                orphans.append(k)
        return pairs, orphans

    def delete_pair(self, p: SessionPair) -> None:
        """Delete a session: OUT first (a racing outbound packet then makes a new session,
        whose port search skips the still-present IN key), then IN if it is still ours."""
        self.ct.delete(p.out_key)
        raw = self.ct.get(p.in_key)
        if raw is not None and L.CT_ENTRY.unpack(raw)["peer"] == p.out_key:
            self.ct.delete(p.in_key)

    def update_out(self, p: SessionPair, **changes) -> bool:
        """Rewrite fields of a live OUT entry (read-modify-write; BPF_EXIST so a session
        that expired meanwhile is not resurrected).  Counters racing with it may lose a
        packet's increment, which is acceptable for a rare control-plane edit."""
        raw = self.ct.get(p.out_key)
        if raw is None:
            return False
        e = L.CT_ENTRY.unpack(raw)
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
        out = {}
        for r in L.Reason:
            vals = self.reasons_map.get_percpu(int(r)) or []
            out[r.name] = sum(int.from_bytes(v, "little") for v in vals)
        return out

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

    def zero(self) -> None:
        zero = bytes(8)
        for r in range(L.REASON_MAX):
            self.reasons_map.put(r, zero)
        for k in self.rule_stats_map.keys():
            self.rule_stats_map.delete(k)

    # ----------------------------------------------------------------- rules and config

    def current_rules(self) -> tuple[bytes, list[bytes]]:
        cfg = self.cfg.get(0) or bytes(L.SNAT_CFG.size)
        n = min(L.SNAT_CFG.unpack(cfg)["nrules"], L.MAX_RULES)
        return cfg, [self.rules.get(i) or b"" for i in range(n)]

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

        def put(i: int, r: bytes) -> None:
            nonlocal written
            self.rules.put(i, r)
            written += 1

        if len(rules) >= len(old):
            for i in range(len(old), len(rules)):
                put(i, rules[i])
            for i in range(len(old)):
                if old[i] != rules[i]:
                    put(i, rules[i])
            if cfg != old_cfg:
                self.cfg.put(0, cfg)
        else:
            if cfg != old_cfg:
                self.cfg.put(0, cfg)
            for i in range(len(rules)):
                if old[i] != rules[i]:
                    put(i, rules[i])
            for i in range(len(rules), len(old)):
                put(i, bytes(L.SNAT_RULE.size))
        return written
