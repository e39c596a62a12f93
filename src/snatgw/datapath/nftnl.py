"""nftables' named counters, and whether a chain exists, through nf_tables netlink (NETLINK_NETFILTER, subsystem
NFNL_SUBSYS_NFTABLES), the interface the `nft` tool speaks: one NFT_MSG_GETOBJ dump of a
table's counter objects per call, in the calling thread's network namespace (or ``netns``),
without a process.  `nft -j list counters table ip T` answers the same figures; a stats call
of the bpf backend read the leak guard's drops that way, a process per call, and metrics
scrapes and `adm --rate` call stats often; the hook check asked `nft list chain` every tick.

    counters("ip", "snatgw_guard")   # {"leak": (packets, bytes)}; {} when there is no table
    chain_exists("ip", "snatgw_guard", "postrouting")   # the hook check's question, each tick
    table_shape("ip", "snatgw", {"forward", ...})   # ({those chains it has}, rules), each tick

The kernel filters the dump by table (NFTA_OBJ_TABLE) and object type (NFTA_OBJ_TYPE,
NFT_OBJECT_COUNTER); a table that does not exist answers ENOENT, read here as no counters.
Nothing here reads what other tables hold: the rule and object dumps are filtered by table in
the kernel, and chains are asked one by one (the chain dump has no table filter).
A dump the ruleset changed under (NLM_F_DUMP_INTR: an `nft` run in the namespace between two
of its datagrams) is asked again, as `nft` does; an answer that does not parse is a
BackendError (the callers fall back to `nft`, then to the figures last read).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Iterable, Iterator

from ..errors import BackendError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN = 0, 1, 3, 4
NFT_MSG_NEWRULE, NFT_MSG_GETRULE = 6, 7
NFT_MSG_NEWOBJ, NFT_MSG_GETOBJ = 18, 19
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x2, 0x10, 0x300
DUMP_TRIES = 3  # a dump the ruleset's changes interrupted is asked again, this many times in all
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_TYPE_MASK = 0x3FFF
NFPROTO = {"ip": 2, "inet": 1, "ip6": 10, "arp": 3, "bridge": 7, "netdev": 5}
# enum nft_object_attributes, the counter's nested attributes, enum of object types
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
NFT_OBJECT_COUNTER = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3
NFTA_TABLE_NAME = 1
NFTA_RULE_TABLE = 1
RECV = 1 << 16

_NLH = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_NFGEN = struct.Struct("=BBH")


def _attr(typ: int, payload: bytes) -> bytes:
    return _NLA.pack(4 + len(payload), typ) + payload + b"\0" * (-len(payload) % 4)


def _attrs(buf: bytes, off: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each netlink attribute in buf[off:end]."""
    while off + 4 <= end:
        ln, typ = _NLA.unpack_from(buf, off)
        if ln < 4 or off + ln > end:
            return
        yield typ & NLA_TYPE_MASK, off + 4, off + ln
        off += (ln + 3) & ~3


def request(family: str, table: str, seq: int = 1) -> bytes:
    """The NFT_MSG_GETOBJ dump request for ``table``'s counter objects."""
    body = _NFGEN.pack(NFPROTO[family], 0, 0)
    body += _attr(NFTA_OBJ_TABLE, table.encode() + b"\0")
    body += _attr(NFTA_OBJ_TYPE, struct.pack(">I", NFT_OBJECT_COUNTER))
    return _NLH.pack(_NLH.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ,
                     NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body  # fmt: skip


def parse_counter(buf: bytes, off: int, end: int, table: str) -> tuple[str, int, int] | None:
    """(name, packets, bytes) of one NFT_MSG_NEWOBJ body (after nfgenmsg); None when it is not
    a counter of ``table`` (a kernel too old to filter the dump answers every object)."""
    name, tab, typ, packets, nbytes = None, None, None, 0, 0
    for t, a, b in _attrs(buf, off, end):
        if t == NFTA_OBJ_TABLE:
            tab = buf[a:b].split(b"\0", 1)[0].decode(errors="replace")
        elif t == NFTA_OBJ_NAME:
            name = buf[a:b].split(b"\0", 1)[0].decode(errors="replace")
        elif t == NFTA_OBJ_TYPE and b - a == 4:
            typ = struct.unpack_from(">I", buf, a)[0]
        elif t == NFTA_OBJ_DATA:
            for t2, a2, b2 in _attrs(buf, a, b):
                if t2 == NFTA_COUNTER_PACKETS and b2 - a2 == 8:
                    packets = struct.unpack_from(">Q", buf, a2)[0]
                elif t2 == NFTA_COUNTER_BYTES and b2 - a2 == 8:
                    nbytes = struct.unpack_from(">Q", buf, a2)[0]
    if name is None or tab != table or typ != NFT_OBJECT_COUNTER:
        return None
    return name, packets, nbytes


def _open(netns: str | None) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        s.bind((0, 0))
        return s

    try:
        if netns:
            from .netns import enter

            with enter(netns):
                return make()
        return make()
    except OSError as e:
        raise BackendError(f"nf_tables netlink: cannot open a netfilter socket: {e.strerror}") from None


class _Interrupted(BackendError):
    """A dump flagged NLM_F_DUMP_INTR: entries may be missed or repeated (``_again`` asks again)."""


def _again(fn):
    """``fn`` (a public call) run again while its dump was interrupted, DUMP_TRIES times in
    all, as `nft` asks again: its figures are not taken (a rule count short by the entries
    missed would have the hook check reinstall).  BackendError after the last."""
    import functools

    @functools.wraps(fn)
    def run(*a, **kw):
        for _ in range(DUMP_TRIES - 1):
            try:
                return fn(*a, **kw)
            except _Interrupted:
                continue
        try:
            return fn(*a, **kw)
        except _Interrupted as e:
            raise BackendError(f"nf_tables netlink: {e}: dump interrupted by ruleset changes "
                               f"{DUMP_TRIES} times") from None  # fmt: skip

    return run


def _exchange(msg: bytes, what: str, netns: str | None,
              sock: socket.socket | None = None) -> Iterator[tuple[int, bytes, int, int]]:
    """Send one request and yield (message type, buffer, body start after nfgenmsg, body end)
    of each answer (those of the request's sequence number) until the dump is done, the get
    answered, or the kernel says ENOENT (no such table/chain: nothing yielded).  BackendError
    for any other error.  On ``sock`` when given (several requests, one socket: their sequence
    numbers differ), else on a socket of its own."""
    if sock is None:
        with _open(netns) as s:
            yield from _exchange(msg, what, netns, s)
        return
    want = _NLH.unpack_from(msg, 0)[3]
    s = sock
    s.settimeout(5)
    try:
        s.send(msg)
        while True:
            buf = s.recv(RECV)
            off = 0
            while off + _NLH.size <= len(buf):
                ln, typ, flags, seq, _pid = _NLH.unpack_from(buf, off)
                if ln < _NLH.size or off + ln > len(buf):  # (the kernel never: a bad or cut datagram)
                    raise BackendError(f"nf_tables netlink: {what}: a malformed answer (message of "
                                       f"{ln} bytes at {off} of a {len(buf)}-byte datagram)")  # fmt: skip
                if seq == want:
                    if flags & NLM_F_DUMP_INTR:  # the ruleset changed between datagrams
                        raise _Interrupted(what)
                    if typ == NLMSG_DONE:
                        return
                    if typ == NLMSG_ERROR:
                        if ln < _NLH.size + 4:
                            raise BackendError(f"nf_tables netlink: {what}: a malformed answer (an error "
                                               f"message of {ln} bytes)")  # fmt: skip
                        err = -struct.unpack_from("=i", buf, off + _NLH.size)[0]
                        if err in (0, errno.ENOENT):
                            return
                        raise BackendError(f"nf_tables netlink: {what}: {os.strerror(err)}")
                    if ln < _NLH.size + _NFGEN.size:
                        raise BackendError(f"nf_tables netlink: {what}: a malformed answer (a message of "
                                           f"{ln} bytes, no nfgenmsg)")  # fmt: skip
                    yield typ, buf, off + _NLH.size + _NFGEN.size, off + ln
                    if not flags & NLM_F_MULTI:  # the one answer of a get
                        return
                off += (ln + 3) & ~3
    except OSError as e:
        raise BackendError(f"nf_tables netlink: {what}: {e.strerror or e}") from None


@_again
def counters(family: str, table: str, netns: str | None = None) -> dict[str, tuple[int, int]]:
    """{name: (packets, bytes)} of the named counters of ``family`` ``table`` ({} without the
    table).  BackendError when netlink fails otherwise."""
    out: dict[str, tuple[int, int]] = {}
    for typ, buf, a, b in _exchange(request(family, table), f"counters of {family} {table}", netns):
        if typ == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ:
            c = parse_counter(buf, a, b, table)
            if c is not None:
                out[c[0]] = (c[1], c[2])
    return out


def chain_request(family: str, table: str, chain: str, seq: int = 1) -> bytes:
    """The NFT_MSG_GETCHAIN get of one chain."""
    attrs = _attr(NFTA_CHAIN_TABLE, table.encode() + b"\0") + _attr(NFTA_CHAIN_NAME, chain.encode() + b"\0")
    return _get(NFT_MSG_GETCHAIN, family, attrs, seq=seq)


@_again
def chain_exists(family: str, table: str, chain: str, netns: str | None = None) -> bool:
    """Whether ``family`` ``table`` has ``chain`` (what `nft list chain` answers by its exit
    status), without a process: the hook check asks every tick."""
    want = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN
    return any(typ == want for typ, _, _, _ in _exchange(chain_request(family, table, chain),
                                                         f"chain {family} {table} {chain}", netns))


def _get(msg_type: int, family: str, attrs: bytes, dump: bool = False, seq: int = 1) -> bytes:
    body = _NFGEN.pack(NFPROTO[family], 0, 0) + attrs
    return _NLH.pack(_NLH.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
                     NLM_F_REQUEST | (NLM_F_DUMP if dump else 0), seq, 0) + body  # fmt: skip


def _name(buf: bytes, a: int, b: int, typ: int) -> str | None:
    for t, x, y in _attrs(buf, a, b):
        if t == typ:
            return buf[x:y].split(b"\0", 1)[0].decode(errors="replace")
    return None


@_again
def table_shape(family: str, table: str, chains: Iterable[str],
                netns: str | None = None) -> tuple[set[str], int] | None:
    """(those of ``chains`` that ``table`` has, its number of rules), None without the table:
    what the nft backend's hook check compares with what it applied, every tick, without
    listing the table as JSON through an `nft` process (thousands of rules at thousands of
    `from` nets).  On one socket: a get of the table, a get of each chain asked, a dump of the
    table's rules (filtered by the kernel, only counted).  Its cost does not depend on other
    tables: the kernel's chain dump takes no table filter (nf_tables_dump_chains walks every
    table of the family; 6.18 answered the 500 chains of a table beside ours), so a dump kept
    to ours would read every chain of a docker or k8s ruleset every tick; a get is one hash
    lookup in the table's chains and one answer.  A chain not asked about is not seen."""
    name = table.encode() + b"\0"
    what = f"table {family} {table}"
    new = (NFNL_SUBSYS_NFTABLES << 8)
    with _open(netns) as s:
        got = _exchange(_get(NFT_MSG_GETTABLE, family, _attr(NFTA_TABLE_NAME, name), seq=1), what, netns, s)
        if not any(typ == new | NFT_MSG_NEWTABLE for typ, _, _, _ in got):
            return None
        have, seq = set(), 1
        for chain in sorted(set(chains)):
            seq += 1
            msg = chain_request(family, table, chain, seq)
            for typ, buf, a, b in _exchange(msg, f"chain {family} {table} {chain}", netns, s):
                if (typ == new | NFT_MSG_NEWCHAIN and _name(buf, a, b, NFTA_CHAIN_TABLE) == table
                        and _name(buf, a, b, NFTA_CHAIN_NAME) == chain):  # fmt: skip
                    have.add(chain)
        rules = 0
        msg = _get(NFT_MSG_GETRULE, family, _attr(NFTA_RULE_TABLE, name), dump=True, seq=seq + 1)
        for typ, buf, a, b in _exchange(msg, what, netns, s):
            if typ == new | NFT_MSG_NEWRULE and _name(buf, a, b, NFTA_RULE_TABLE) == table:
                rules += 1
    return have, rules


__all__ = ["chain_exists", "chain_request", "counters", "parse_counter", "request", "table_shape"]
