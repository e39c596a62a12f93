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
from socket import inet_ntoa

from ... import layout as L
from . import libbpf as B

_PROTO = {L.IPPROTO_TCP: "tcp", L.IPPROTO_UDP: "udp", L.IPPROTO_ICMP: "icmp"}
_STATE = {int(s): s.name for s in L.CtState}
_KIND = {L.AUDIT_NEW: "create", L.AUDIT_END: "end"}


def proto_name(p: int) -> str:
    return _PROTO.get(p, str(p))


def clock_offset() -> float:
    """Seconds to add to a CLOCK_MONOTONIC time to get the wall clock (records carry the
    datapath's monotonic clock; the log says when in UTC)."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


_HEAD = struct.Struct("<Q4s4s4s")  # ts, inside, nat, remote (addresses in wire order)
_PORTS = struct.Struct(">HHH")  # inside_port, nat_port, remote_port (wire order)
_TAIL = struct.Struct("<BBIBB")  # kind, proto, rule_id, why, state
_OFF = L.AUDIT_REC.offsets()
_U64 = struct.Struct("<Q")
assert _HEAD.size == _OFF["inside_port"] and _OFF["remote_port"] + 2 == _OFF["kind"] and _TAIL.size == 8


def decode(raw: bytes, offset: float | None = None) -> dict:
    """One struct audit_rec -> the audit log's record dict (times as Unix seconds).  Hot: the
    daemon decodes every record the datapath writes (precompiled structs, inet_ntoa)."""
    off = clock_offset() if offset is None else offset
    ts, inside, nat, remote = _HEAD.unpack_from(raw, 0)
    iport, nport, rport = _PORTS.unpack_from(raw, _OFF["inside_port"])
    kind, proto, rule_id, why, state = _TAIL.unpack_from(raw, _OFF["kind"])
    rec = {
        "event": _KIND.get(kind, str(kind)), "time": ts / 1e9 + off, "proto": _PROTO.get(proto) or str(proto),
        "inside_addr": inet_ntoa(inside), "inside_port": iport, "nat_addr": inet_ntoa(nat), "nat_port": nport,
        "remote_addr": inet_ntoa(remote), "remote_port": rport, "rule_id": rule_id,
    }  # fmt: skip
    if kind == L.AUDIT_END:
        rec["why"] = L.AUDIT_END_NAMES.get(why, str(why))
        rec["state"] = _STATE.get(state, str(state))
        rec["last_seen"] = _U64.unpack_from(raw, _OFF["last_seen"])[0] / 1e9 + off
    return rec


#: the audit log's lines of create and end records, fields in daemon.audit.FIELDS order (the
#: same text as daemon.audit.format_record(decode(raw)): a test holds them equal)
_NEW_LINE = ('{"time": "%s", "event": "create", "proto": "%s", "inside_addr": "%s", "inside_port": %d, '
             '"nat_addr": "%s", "nat_port": %d, "remote_addr": "%s", "remote_port": %d, "rule_id": %d, '
             '"backend": "%s"}')
_END_LINE = ('{"time": "%s", "event": "end", "proto": "%s", "inside_addr": "%s", "inside_port": %d, '
             '"nat_addr": "%s", "nat_port": %d, "remote_addr": "%s", "remote_port": %d, "rule_id": %d, '
             '"why": "%s", "state": "%s", "last_seen": "%s", "backend": "%s"}')


def line(raw: bytes, offset: float, fmt_time, backend: str = "bpf") -> str | None:
    """One struct audit_rec straight to its log line (no dict: the daemon's hot path), with
    ``fmt_time`` (daemon.audit.iso) for times; None for a kind it does not know."""
    ts, inside, nat, remote = _HEAD.unpack_from(raw, 0)
    iport, nport, rport = _PORTS.unpack_from(raw, _OFF["inside_port"])
    kind, proto, rule_id, why, state = _TAIL.unpack_from(raw, _OFF["kind"])
    p = _PROTO.get(proto) or str(proto)
    if kind == L.AUDIT_NEW:
        return _NEW_LINE % (fmt_time(ts / 1e9 + offset), p, inet_ntoa(inside), iport, inet_ntoa(nat), nport,
                            inet_ntoa(remote), rport, rule_id, backend)  # fmt: skip
    if kind == L.AUDIT_END:
        last = _U64.unpack_from(raw, _OFF["last_seen"])[0] / 1e9 + offset
        return _END_LINE % (fmt_time(ts / 1e9 + offset), p, inet_ntoa(inside), iport, inet_ntoa(nat), nport,
                            inet_ntoa(remote), rport, rule_id, L.AUDIT_END_NAMES.get(why, str(why)),
                            _STATE.get(state, str(state)), fmt_time(last), backend)  # fmt: skip
    return None


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

    def drain_lines(self, limit: int, fmt_time, backend: str = "bpf", tap=None) -> list[str]:
        """drain() as log lines (the daemon's path: no dict per record); ``tap`` (the session
        sync's intake) gets the raw records too."""
        raws = self.ring.drain(limit)
        if tap is not None and raws:
            tap(raws)
        off = clock_offset()
        lines = (line(raw, off, fmt_time, backend) for raw in raws)
        return [ln for ln in lines if ln is not None]

    def drain_raw(self, limit: int) -> list[bytes]:
        """A bounded batch of raw struct audit_rec (the session sync reads the ring this way
        while no audit log is written)."""
        return self.ring.drain(limit)

    def counts(self) -> dict[str, int]:
        """{"written": records the datapath put in the ring, "lost": dropped, the ring full}."""
        return self.maps.audit_counts()

    def close(self) -> None:
        self.ring.close()
