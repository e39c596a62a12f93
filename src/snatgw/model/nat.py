"""SNAT mappings: the bounded port search over the chosen address and its spill-over, and the reverse-first insertion of a session's two
keys (cilium's snat_v4_new_mapping / __snat_update shape): the IN key is inserted first (its
uniqueness is what makes the external tuple unique), then the OUT key; if the OUT insert fails
the IN key is deleted, so no half session is ever left behind."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Callable, NamedTuple, Sequence

from ..layout import MAX_SPILL_MEMO, SPILL_MEMO_MS, Reason
from .conntrack import E_2BIG, E_EXIST, CtEntry, CtKey, CtPair, CtTable, in_key


class SpillKey(NamedTuple):
    """struct spill_key: a SNAT address toward a remote endpoint (ICMP query: rport 0)."""

    remote: IPv4Address
    addr: IPv4Address
    rport: int
    proto: int


class SpillMemos:
    """snat_spill_memo (docs/datapath.md step 13): SpillKey -> when a full search of that
    address toward that remote found no free port; young for SPILL_MEMO_MS.  An LRU of
    ``size`` entries (losing one only costs a full search), with the allocator counters
    (snat_alloc_cnt): ``hits`` (searches of an address cut short by a young memo) and
    ``written``."""

    def __init__(self, size: int = MAX_SPILL_MEMO):
        self.size = size
        self.memos: dict[SpillKey, float] = {}
        self.hits = 0
        self.written = 0
        self.skipped: list[IPv4Address] = []  # addresses the last new flow's memos cut short (explain)

    def young(self, key: SpillKey, now: float) -> bool:
        at = self.memos.get(key)
        return at is not None and (now - at) * 1000 < SPILL_MEMO_MS

    def put(self, key: SpillKey, now: float) -> None:
        self.memos.pop(key, None)
        if len(self.memos) >= self.size:
            del self.memos[next(iter(self.memos))]
        self.memos[key] = now
        self.written += 1

    def toward(self, remote: IPv4Address, rport: int, proto: int, now: float) -> "_Toward":
        """The memo as NatTable.new_mapping uses it for one new flow."""
        self.skipped = []
        return _Toward(self, remote, rport, proto, now)


class _Toward:
    def __init__(self, memos: SpillMemos, remote: IPv4Address, rport: int, proto: int, now: float):
        self.memos, self.remote, self.rport, self.proto, self.now = memos, remote, rport, proto, now

    def key(self, addr: IPv4Address) -> SpillKey:
        return SpillKey(self.remote, addr, self.rport, self.proto)

    def young(self, addr: IPv4Address) -> bool:
        if self.memos.young(self.key(addr), self.now):
            self.memos.hits += 1
            self.memos.skipped.append(addr)
            return True
        return False

    def full(self, addr: IPv4Address) -> None:
        self.memos.put(self.key(addr), self.now)


class NatTable:
    """Creates sessions in a CtTable; counts its port searches as snat_alloc_cnt does
    (docs/datapath.md step 13): ``searches`` (new_mapping calls: one per new flow that
    reached the search) and ``tries`` (candidates looked up; a memo skip is none)."""

    def __init__(self, ct: CtTable):
        self.ct = ct
        self.searches = 0
        self.tries = 0

    def new_mapping(
        self,
        okey: CtKey,
        addrs: Sequence[IPv4Address],
        candidates: Sequence[int],
        build: Callable[[CtKey, IPv4Address, int], tuple[CtEntry, CtEntry]],
        owners=None,
        memo=None,
    ) -> CtPair | Reason:
        """Search each address of ``addrs`` in order (the chosen one, then the spill-over
        order), trying each of ``candidates`` there: the first (addr, port) whose IN key
        (remote, addr, rport, port) is free (a lookup) and inserts wins.  ``build(in_key,
        addr, port)`` gives the (OUT, IN) entries.  Returns the new pair, DROP_TABLE_FULL (map
        full, nothing left behind) or DROP_PORT_EXHAUSTED (every candidate taken).

        ``owners`` (an endpoint-independent rule's new mapping): ``(table, key_of, entry)``, the
        EimTable, ``key_of(addr, port)`` -> the OWNER key and the entry to claim it with: a
        candidate whose owner exists is taken toward every remote; the owner is claimed (a
        NOEXIST insert) before the IN key and released again when the IN key cannot go in.

        ``memo`` (the spill memo, docs/datapath.md step 13; None: off): ``young(addr)`` says
        whether a search of ``addr`` toward this remote found no free port moments ago,
        ``full(addr)`` records that this one found none.  When an address's first candidate
        is taken and its memo is young, the rest of it is not tried: the next address."""
        self.searches += 1
        for addr in addrs:
            for j, port in enumerate(candidates):
                if j == 1 and memo is not None and memo.young(addr):
                    break  # judged full moments ago: the first candidate was its only try
                self.tries += 1
                res = self._try(okey, addr, port, build, owners)
                if res is not None:
                    return res
            else:  # every candidate taken
                if memo is not None:
                    memo.full(addr)
        return Reason.DROP_PORT_EXHAUSTED

    def _try(self, okey: CtKey, addr: IPv4Address, port: int, build, owners) -> CtPair | Reason | None:
        """One candidate: the new pair, DROP_TABLE_FULL, or None when it is taken."""
        ikey = in_key(okey.daddr, addr, okey.dport, port, okey.proto)
        ok = None
        if owners is not None:
            eim, key_of, owner = owners
            ok = key_of(addr, port)
            if eim.lookup(ok) is not None:  # owned by another inside endpoint
                return None
        if self.ct.lookup(ikey) is not None:  # the lock-free lookup before the insert
            return None
        if ok is not None:
            err = eim.insert(ok, owner)
            if err == E_EXIST:
                return None
            if err == E_2BIG:
                return Reason.DROP_TABLE_FULL
        out_e, in_e = build(ikey, addr, port)
        err = self.ct.insert(ikey, in_e)
        if err is not None and ok is not None:
            eim.delete(ok)
        if err == E_EXIST:  # another CPU took it between lookup and insert (BPF)
            return None
        if err == E_2BIG:
            return Reason.DROP_TABLE_FULL
        if self.ct.insert(okey, out_e) is not None:
            self.ct.delete(ikey)
            if ok is not None:
                eim.delete(ok)
            return Reason.DROP_TABLE_FULL
        return CtPair(okey, out_e, ikey, in_e)
