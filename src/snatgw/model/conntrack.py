"""Sessions: the two-key session table of the model (struct ct_key -> struct ct_entry, both
directions in one map, as the BPF hash map holds them), the TCP state update and expiry.

Lookups never look at the clock: an expired session stays usable until ``expire`` (the
control plane's GC) removes it, exactly as in the BPF map."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Iterator, NamedTuple

from ..layout import CT_DIR_IN, CT_DIR_OUT, CT_ENTRY, CT_F_REPLIED, CT_KEY, IPPROTO_TCP, IPPROTO_UDP, CtState
from ..layout import IPPROTO_ICMP, TcpTable
from ..layout import tcp_next_state
from ..rules import Rule

E_EXIST = "exists"
E_2BIG = "full"


class CtKey(NamedTuple):
    """One direction of a session; fields as struct ct_key (ports as ints)."""

    saddr: IPv4Address
    daddr: IPv4Address
    sport: int
    dport: int
    proto: int
    dir: int

    def to_bytes(self) -> bytes:
        return CT_KEY.pack(saddr=self.saddr.packed, daddr=self.daddr.packed, sport=self.sport,
                           dport=self.dport, proto=self.proto, dir=self.dir)  # fmt: skip


@dataclass
class CtEntry:
    """A session direction, as struct ct_entry (device names instead of ifindexes; ``rule``
    is the model's reference to the Rule object)."""

    peer: CtKey
    rw_addr: IPv4Address
    rw_port: int
    oif: str  # OUT: the uplink; IN: the inside device
    #: OUT: next hop; IN: the route back's (the host itself on-link), found at creation; None: 0
    nexthop: IPv4Address | None
    rule_id: int
    mtu: int
    last_seen: float  # set at creation too
    state: int = int(CtState.NONE)  # kept in the OUT entry
    flags: int = 0
    rule: Rule | None = field(default=None, compare=False)
    iif: str | None = None  # OUT: the inside device the session was made on (anti-spoofing)

    def to_bytes(self, ifindex: dict[str, int], ns: float = 1e9) -> bytes:
        """The BPF value bytes; ``ifindex`` maps device names; times in seconds * ``ns``."""
        return CT_ENTRY.pack(
            peer=self.peer.to_bytes(), rw_addr=self.rw_addr.packed, rw_port=self.rw_port,
            state=self.state, flags=self.flags, ifindex=ifindex.get(self.oif, 0),
            nexthop=self.nexthop.packed if self.nexthop else 0, rule_id=self.rule_id,
            mtu=min(self.mtu, 0xFFFF), last_seen=int(self.last_seen * ns),
            iif=ifindex.get(self.iif, 0) & 0xFFFF if self.iif else 0,
        )  # fmt: skip


class CtPair(NamedTuple):
    out_key: CtKey
    out: CtEntry
    in_key: CtKey
    inn: CtEntry


class CtTable:
    """The session map: both keys of every session; room for ``max_sessions`` sessions."""

    def __init__(self, max_sessions: int):
        self.max_sessions = max_sessions
        self._map: dict[CtKey, CtEntry] = {}

    def __len__(self) -> int:
        """Live sessions (pairs)."""
        return len(self._map) // 2

    def lookup(self, key: CtKey) -> CtEntry | None:
        return self._map.get(key)

    def insert(self, key: CtKey, entry: CtEntry) -> str | None:
        """BPF_NOEXIST update: None on success, E_EXIST when the key is taken, E_2BIG when the
        map (2 * max_sessions entries) is full.  EEXIST is checked first, as the kernel does."""
        if key in self._map:
            return E_EXIST
        if len(self._map) >= 2 * self.max_sessions:
            return E_2BIG
        self._map[key] = entry
        return None

    def delete(self, key: CtKey) -> None:
        self._map.pop(key, None)

    def entries(self) -> dict[CtKey, CtEntry]:
        """Every map entry (both keys per session), as a BPF map dump would show."""
        return dict(self._map)

    def pairs(self) -> Iterator[CtPair]:
        for k, e in list(self._map.items()):
            if k.dir == CT_DIR_OUT:
                inn = self._map.get(e.peer)
                if inn is not None:
                    yield CtPair(k, e, e.peer, inn)

    def remove(self, out_key: CtKey) -> None:
        """Remove a session: both directions together."""
        e = self._map.pop(out_key, None)
        if e is not None:
            self._map.pop(e.peer, None)


def out_key(saddr: IPv4Address, daddr: IPv4Address, sport: int, dport: int, proto: int) -> CtKey:
    return CtKey(saddr, daddr, sport, dport, proto, CT_DIR_OUT)


def in_key(saddr: IPv4Address, daddr: IPv4Address, sport: int, dport: int, proto: int) -> CtKey:
    return CtKey(saddr, daddr, sport, dport, proto, CT_DIR_IN)


def tcp_update(out: CtEntry, flags: int, reply: bool) -> None:
    """TCP state of a session (kept in the OUT entry): replies use the OUT rows and mark the
    session replied; outbound packets use IN_ONLY until a reply was seen, then IN."""
    if reply:
        out.state = tcp_next_state(out.state, TcpTable.OUT, flags)
        out.flags |= CT_F_REPLIED
    else:
        table = TcpTable.IN if out.flags & CT_F_REPLIED else TcpTable.IN_ONLY
        out.state = tcp_next_state(out.state, table, flags)


def initial_state(proto: int) -> int:
    if proto == IPPROTO_TCP:
        return int(CtState.NONE)
    return int(CtState.ICMP if proto == IPPROTO_ICMP else CtState.UDP)  # other protocols: UDP's


def is_expired(pair: CtPair, now: float, timeout) -> bool:
    """``now - max(last_seen of both) > timeout(state)``."""
    last = max(pair.out.last_seen, pair.inn.last_seen)
    return now - last > timeout(pair.out.state)
