"""Remembered first fragments: frag_key (saddr, daddr, IP id, proto as received) -> the address
rewrite and egress for the datagram's later fragments, a pass marker (oif None) when the
first fragment was passed untranslated, or a held marker (oif HELD, created = when its first
later fragment was held) while later fragments wait for their first.  LRU of MAX_FRAGS entries; an entry older
than FRAG_TIMEOUT seconds is a miss (and is removed)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import NamedTuple

from ..layout import FRAG_KEY, FRAG_TIMEOUT, MAX_FRAGS


class FragKey(NamedTuple):
    saddr: IPv4Address
    daddr: IPv4Address
    id: int
    proto: int

    def to_bytes(self) -> bytes:
        return FRAG_KEY.pack(saddr=self.saddr.packed, daddr=self.daddr.packed, id=self.id, proto=self.proto)


HELD = "(held)"  # FragEntry.oif of a held marker (bpf: frag_entry.ifindex FRAG_HELD_IFINDEX)


@dataclass(frozen=True)
class FragEntry:
    saddr: IPv4Address  # new source
    daddr: IPv4Address  # new destination
    oif: str | None  # None: pass marker (the first fragment passed untranslated)
    nexthop: IPv4Address | None  # None: the destination
    created: float

    @property
    def passed(self) -> bool:
        return self.oif is None

    @property
    def held(self) -> bool:
        return self.oif == HELD


class FragTable:
    def __init__(self, max_entries: int = MAX_FRAGS, timeout: float = FRAG_TIMEOUT):
        self.max_entries = max_entries
        self.timeout = timeout
        self._map: OrderedDict[FragKey, FragEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def remember(self, key: FragKey, entry: FragEntry) -> None:
        """Insert or replace (BPF_ANY); the least recently used entry makes room."""
        self._map.pop(key, None)
        while len(self._map) >= self.max_entries:
            self._map.popitem(last=False)
        self._map[key] = entry

    def lookup(self, key: FragKey, now: float) -> FragEntry | None:
        e = self._map.get(key)
        if e is None:
            return None
        if now - e.created > self.timeout:
            del self._map[key]
            return None
        self._map.move_to_end(key)
        return e

    def expire(self, now: float) -> int:
        old = [k for k, e in self._map.items() if now - e.created > self.timeout]
        for k in old:
            del self._map[k]
        return len(old)

    def entries(self) -> dict[FragKey, FragEntry]:
        return dict(self._map)
