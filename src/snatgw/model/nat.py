"""SNAT mappings: the bounded port search and the reverse-first insertion of a session's two
keys (cilium's snat_v4_new_mapping / __snat_update shape): the IN key is inserted first (its
uniqueness is what makes the external tuple unique), then the OUT key; if the OUT insert fails
the IN key is deleted, so no half session is ever left behind."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Callable, Iterable

from ..layout import Reason
from .conntrack import E_2BIG, E_EXIST, CtEntry, CtKey, CtPair, CtTable, in_key


class NatTable:
    """Creates sessions in a CtTable."""

    def __init__(self, ct: CtTable):
        self.ct = ct

    def new_mapping(
        self,
        okey: CtKey,
        addr: IPv4Address,
        candidates: Iterable[int],
        build: Callable[[CtKey, int], tuple[CtEntry, CtEntry]],
    ) -> CtPair | Reason:
        """Try each candidate SNAT port in order; the first whose IN key
        (remote, addr, rport, port) inserts wins.  ``build(in_key, port)`` gives the (OUT, IN)
        entries.  Returns the new pair, DROP_TABLE_FULL (map full, nothing left behind) or
        DROP_PORT_EXHAUSTED (every candidate taken)."""
        for port in candidates:
            ikey = in_key(okey.daddr, addr, okey.dport, port, okey.proto)
            if self.ct.lookup(ikey) is not None:
                continue
            out_e, in_e = build(ikey, port)
            err = self.ct.insert(ikey, in_e)
            if err == E_EXIST:  # pragma: no cover - checked above; kept for the BPF twin
                continue
            if err == E_2BIG:
                return Reason.DROP_TABLE_FULL
            if self.ct.insert(okey, out_e) is not None:
                self.ct.delete(ikey)
                return Reason.DROP_TABLE_FULL
            return CtPair(okey, out_e, ikey, in_e)
        return Reason.DROP_PORT_EXHAUSTED
