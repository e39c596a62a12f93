"""Endpoint-independent mappings (RFC 4787 REQ-1; docs/datapath.md "Endpoint-independent
mapping"): the model of the BPF map snat_eim, one hash of three kinds of entry (struct eim_key
-> struct eim_entry):

- ENDPOINT (inside addr, inside port, proto) -> the external (addr, port) every session of that
  inside endpoint gets, toward any remote;
- OWNER (external addr, port, proto) -> the inside endpoint that holds it: while it exists, no
  other endpoint of an endpoint-independent rule gets that (addr, port), toward any remote;
- PERMIT (inside addr, port, proto, remote addr): `filtering address-dependent` lets that
  remote's packets from any port in.

Entries live while a session of theirs does; the expiry (Engine.expire, the BPF sweep) removes
the ones no live session refers to once older than EIM_GRACE (their last_seen is set when made
and when a new session uses them)."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import NamedTuple

from ..layout import EIM_DIR_ENDPOINT, EIM_DIR_OWNER, EIM_DIR_PERMIT, EIM_ENTRY, EIM_KEY
from .conntrack import E_2BIG, E_EXIST

ANY = IPv4Address(0)


class EimKey(NamedTuple):
    addr: IPv4Address
    remote: IPv4Address
    port: int
    proto: int
    dir: int

    def to_bytes(self) -> bytes:
        return EIM_KEY.pack(addr=self.addr.packed, remote=self.remote.packed, port=self.port,
                            proto=self.proto, dir=self.dir)  # fmt: skip


def endpoint_key(addr: IPv4Address, port: int, proto: int) -> EimKey:
    return EimKey(addr, ANY, port, proto, EIM_DIR_ENDPOINT)


def owner_key(addr: IPv4Address, port: int, proto: int) -> EimKey:
    return EimKey(addr, ANY, port, proto, EIM_DIR_OWNER)


def permit_key(addr: IPv4Address, port: int, proto: int, remote: IPv4Address) -> EimKey:
    return EimKey(addr, remote, port, proto, EIM_DIR_PERMIT)


@dataclass
class EimEntry:
    addr: IPv4Address  # ENDPOINT: external address; OWNER: inside address; PERMIT: 0
    port: int
    rule_id: int
    iif: str | None  # ENDPOINT: the inside device of the session that made it
    last_seen: float

    def to_bytes(self, ifindex: dict[str, int], ns: float = 1e9) -> bytes:
        return EIM_ENTRY.pack(addr=self.addr.packed, port=self.port, rule_id=self.rule_id,
                              iif=ifindex.get(self.iif, 0) if self.iif else 0,
                              last_seen=int(self.last_seen * ns))  # fmt: skip


class EimTable:
    """snat_eim: room for ``capacity`` entries of all kinds together (BPF_NOEXIST inserts)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._map: dict[EimKey, EimEntry] = {}

    def __len__(self) -> int:
        return len(self._map)

    def lookup(self, key: EimKey) -> EimEntry | None:
        return self._map.get(key)

    def insert(self, key: EimKey, entry: EimEntry) -> str | None:
        if key in self._map:
            return E_EXIST
        if len(self._map) >= self.capacity:
            return E_2BIG
        self._map[key] = entry
        return None

    def upsert(self, key: EimKey, entry: EimEntry) -> str | None:
        """BPF_ANY: replace, or insert when there is room."""
        if key in self._map:
            self._map[key] = entry
            return None
        return self.insert(key, entry)

    def delete(self, key: EimKey) -> None:
        self._map.pop(key, None)

    def entries(self) -> dict[EimKey, EimEntry]:
        return dict(self._map)

    def expire(self, live: set[EimKey], now: float, grace: float) -> int:
        """Remove the endpoints and permits no live session refers to (``live``: the endpoint
        and permit keys of the sessions kept) once older than ``grace``, an endpoint's owner
        with it (when it points back), and owners whose endpoint is gone or points elsewhere
        once older than ``grace``.  Returns how many entries went."""
        gone = 0
        for k, e in list(self._map.items()):
            if k.dir == EIM_DIR_OWNER or k in live or not now - e.last_seen > grace:
                continue
            del self._map[k]
            gone += 1
            if k.dir == EIM_DIR_ENDPOINT:
                ok = owner_key(e.addr, e.port, k.proto)
                o = self._map.get(ok)
                if o is not None and (o.addr, o.port) == (k.addr, k.port):
                    del self._map[ok]
                    gone += 1
        for k, e in list(self._map.items()):
            if k.dir != EIM_DIR_OWNER or not now - e.last_seen > grace:
                continue
            ep = self._map.get(endpoint_key(e.addr, e.port, k.proto))
            if ep is None or (ep.addr, ep.port) != (k.addr, k.port):
                del self._map[k]
                gone += 1
        return gone


__all__ = ["EimKey", "EimEntry", "EimTable", "endpoint_key", "owner_key", "permit_key", "EIM_DIR_PERMIT"]
