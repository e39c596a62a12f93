"""SNAT mappings: the bounded port search over the chosen address and its spill-over, and the reverse-first insertion of a session's two
keys (cilium's snat_v4_new_mapping / __snat_update shape): the IN key is inserted first (its
uniqueness is what makes the external tuple unique), then the OUT key; if the OUT insert fails
the IN key is deleted, so no half session is ever left behind."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Callable, Sequence

from ..layout import Reason
from .conntrack import E_2BIG, E_EXIST, CtEntry, CtKey, CtPair, CtTable, in_key


class NatTable:
    """Creates sessions in a CtTable."""

    def __init__(self, ct: CtTable):
        self.ct = ct

    def new_mapping(
        self,
        okey: CtKey,
        addrs: Sequence[IPv4Address],
        candidates: Sequence[int],
        build: Callable[[CtKey, IPv4Address, int], tuple[CtEntry, CtEntry]],
        owners=None,
    ) -> CtPair | Reason:
        """Search each address of ``addrs`` in order (the chosen one, then the spill-over
        order), trying each of ``candidates`` there: the first (addr, port) whose IN key
        (remote, addr, rport, port) is free (a lookup) and inserts wins.  ``build(in_key,
        addr, port)`` gives the (OUT, IN) entries.  Returns the new pair, DROP_TABLE_FULL (map
        full, nothing left behind) or DROP_PORT_EXHAUSTED (every candidate taken).

        ``owners`` (an endpoint-independent rule's new mapping): ``(table, key_of, entry)``, the
        EimTable, ``key_of(addr, port)`` -> the OWNER key and the entry to claim it with: a
        candidate whose owner exists is taken toward every remote; the owner is claimed (a
        NOEXIST insert) before the IN key and released again when the IN key cannot go in."""
        for addr in addrs:
            for port in candidates:
                ikey = in_key(okey.daddr, addr, okey.dport, port, okey.proto)
                ok = None
                if owners is not None:
                    eim, key_of, owner = owners
                    ok = key_of(addr, port)
                    if eim.lookup(ok) is not None:  # owned by another inside endpoint
                        continue
                if self.ct.lookup(ikey) is not None:  # the lock-free lookup before the insert
                    continue
                if ok is not None:
                    err = eim.insert(ok, owner)
                    if err == E_EXIST:
                        continue
                    if err == E_2BIG:
                        return Reason.DROP_TABLE_FULL
                out_e, in_e = build(ikey, addr, port)
                err = self.ct.insert(ikey, in_e)
                if err is not None and ok is not None:
                    eim.delete(ok)
                if err == E_EXIST:  # another CPU took it between lookup and insert (BPF)
                    continue
                if err == E_2BIG:
                    return Reason.DROP_TABLE_FULL
                if self.ct.insert(okey, out_e) is not None:
                    self.ct.delete(ikey)
                    if ok is not None:
                        eim.delete(ok)
                    return Reason.DROP_TABLE_FULL
                return CtPair(okey, out_e, ikey, in_e)
        return Reason.DROP_PORT_EXHAUSTED
