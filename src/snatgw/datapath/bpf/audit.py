"""The bpf datapath's audit records (issue 13): the snat_audit ring buffer, read through
libbpf, and its records (struct audit_rec, layout.AUDIT_REC) decoded into the audit log's
record dicts (snatgw.daemon.audit formats and writes them).

``AuditRing(maps)`` is the daemon's reader: ``fileno()`` (libbpf's epoll fd, registered in the
daemon's event loop), ``drain(limit)`` -> a bounded batch of record dicts, ``counts()`` -> the
datapath's written/lost counters (a full ring drops the record, never waits), ``close()``.
"""

from __future__ import annotations

import struct
import time
from ipaddress import IPv4Address

from ... import layout as L
from . import libbpf as B

_REC = struct.Struct(L.AUDIT_REC.fmt)
_NAMES = [n for n, _, _ in L.AUDIT_REC.fields]
_PROTO = {L.IPPROTO_TCP: "tcp", L.IPPROTO_UDP: "udp", L.IPPROTO_ICMP: "icmp"}
_STATE = {int(s): s.name for s in L.CtState}
_KIND = {L.AUDIT_NEW: "create", L.AUDIT_END: "end"}


def proto_name(p: int) -> str:
    return _PROTO.get(p, str(p))


def clock_offset() -> float:
    """Seconds to add to a CLOCK_MONOTONIC time to get the wall clock (records carry the
    datapath's monotonic clock; the log says when in UTC)."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


def decode(raw: bytes, offset: float | None = None) -> dict:
    """One struct audit_rec -> the audit log's record dict (times as Unix seconds)."""
    off = clock_offset() if offset is None else offset
    d = dict(zip(_NAMES, _REC.unpack_from(raw)))
    kind = _KIND.get(d["kind"], str(d["kind"]))
    rec = {
        "event": kind,
        "time": d["ts"] / 1e9 + off,
        "proto": proto_name(d["proto"]),
        "inside_addr": str(IPv4Address(d["inside"])), "inside_port": int.from_bytes(d["inside_port"], "big"),
        "nat_addr": str(IPv4Address(d["nat"])), "nat_port": int.from_bytes(d["nat_port"], "big"),
        "remote_addr": str(IPv4Address(d["remote"])), "remote_port": int.from_bytes(d["remote_port"], "big"),
        "rule_id": d["rule_id"],
    }  # fmt: skip
    if kind == "end":
        rec["why"] = L.AUDIT_END_NAMES.get(d["why"], str(d["why"]))
        rec["state"] = _STATE.get(d["state"], str(d["state"]))
        rec["last_seen"] = d["last_seen"] / 1e9 + off
    return rec


def pair_record(out_key: bytes, out: dict, why: int) -> dict:
    """The end record of a session the control plane removes itself (``out``: its decoded OUT
    entry), timed now."""
    k = L.CT_KEY.unpack(out_key)
    off = clock_offset()
    return {
        "event": "end", "time": time.time(), "proto": proto_name(k["proto"]),
        "inside_addr": str(IPv4Address(k["saddr"])), "inside_port": k["sport"],
        "nat_addr": str(IPv4Address(out["rw_addr"])), "nat_port": out["rw_port"],
        "remote_addr": str(IPv4Address(k["daddr"])), "remote_port": k["dport"],
        "rule_id": out["rule_id"], "why": L.AUDIT_END_NAMES.get(why, str(why)),
        "state": _STATE.get(out["state"], str(out["state"])), "last_seen": out["last_seen"] / 1e9 + off,
    }  # fmt: skip


class AuditRing:
    """The datapath's audit ring over ``maps`` (a DatapathMaps), read in bounded batches."""

    def __init__(self, maps):
        self.maps = maps
        self.ring = B.RingBuffer(maps.maps[L.MAP_AUDIT].fd)

    def fileno(self) -> int:
        return self.ring.fileno()

    def drain(self, limit: int = 4096) -> list[dict]:
        off = clock_offset()
        return [decode(r, off) for r in self.ring.drain(limit)]

    def counts(self) -> dict[str, int]:
        """{"written": records the datapath put in the ring, "lost": dropped, the ring full}."""
        return self.maps.audit_counts()

    def close(self) -> None:
        self.ring.close()
