"""Carrying the session table (snat_ct) and the endpoint-independent mappings (snat_eim) over to
new maps of another layout at a restart, with no dark window: today another size (a changed
``max_sessions``), later any layout a per-map conversion covers (docs/operations.md, "No dark
window").

The loader pins the new maps beside the old (REPLACED_SUFFIX) and copies every entry over
(``copy_all``: batch reads and batch writes, ``chunk`` entries at a time) before its programs are
attached; the old programs, still attached, go on making sessions in the old maps meanwhile.
Once the new programs are on every hook it renames the new pins over the old ones (the old
maps pinned beside them until the copies are done: loader.CARRIED_SUFFIX), copies what the old
maps gained (``copy_new``), waits for the runs of the old programs that began before their last
replace (MIGRATE_GRACE), and copies once more.  A later pass copies what the new map lacks, and
what the old programs used later than the new map says (a session the new programs made or
used meanwhile wins).  It looks only
at the entries used (made or refreshed) since the pass before it began (``since_ns``): an
older one was in the old map through that whole pass, which saw it.  A session the start
removed goes from the old map too (DatapathMaps.shadow_ct), so no pass brings it back.
Memory: one chunk.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from ... import layout as L
from ...errors import BackendError
from . import libbpf as B
from .maps import _DIR_OFF, _PEER, _U64, peer_entry

#: entry (key, value) -> the new layout's (key, value); identity while only the size changes
Convert = Callable[[bytes, bytes], tuple[bytes, bytes]]


def identity(key: bytes, value: bytes) -> tuple[bytes, bytes]:
    return key, value


@dataclass(frozen=True)
class Carried:
    """How a pinned map of another shape is carried over: ``covers(info, spec)`` says whether
    the conversion applies (else the start is refused as before), ``convert`` maps an entry,
    ``paired``: snat_ct's OUT/IN pairs are copied together (never half a session),
    ``seen_off``: the offset of the value's __u64 last use (the programs' clock), which tells
    the entries a later pass must look at."""

    convert: Convert
    paired: bool
    seen_off: int

    @staticmethod
    def covers(info: B.MapInfo, spec) -> bool:
        """Today: the same type, key and value, another number of entries (max_sessions)."""
        return (info.type, info.key_size, info.value_size) == (spec.type, spec.key_size, spec.value_size)


CARRIED: dict[str, Carried] = {
    L.MAP_EIM: Carried(identity, False, L.EIM_ENTRY.offsets()["last_seen"]),
    L.MAP_CT: Carried(identity, True, L.CT_ENTRY.offsets()["last_seen"]),
}
#: the order of the passes: the mappings before the sessions that use them
ORDER = (L.MAP_EIM, L.MAP_CT)

#: how far the programs' clock (bpf_ktime_get_coarse_ns: a jiffy behind at most) may lag ours
#: when a later pass picks the entries used since the last one began: generous, it costs a
#: lookup per entry used in that second
CLOCK_SLACK_NS = 1_000_000_000
#: after the last hook got the new program, the wait before the last pass: a TC program runs
#: from start to end inside one RCU read-side section (softirq), microseconds a packet; a run
#: of an old program that began before the replace ends within the grace period the replace
#: starts (milliseconds; the kernel frees the old program after it).  50 ms is thousands of
#: program runs and several grace periods of a loaded 2-CPU machine; a session such a late
#: run made is copied by the pass after the wait
GRACE_SECONDS = 0.05



def sessions_of(m: B.Map, chunk: int = 4096) -> tuple[int, int]:
    """(entries, OUT entries) of a snat_ct, read one batch at a time."""
    n = out = 0
    for nn, raw_k in m.key_batches(chunk):
        n += nn
        ks = L.CT_KEY.size
        out += sum(1 for i in range(nn) if raw_k[i * ks + _DIR_OFF] == L.CT_DIR_OUT)
    return n, out


def copy_all(old: B.Map, new: B.Map, how: Carried, chunk: int = 4096) -> int:
    """Every entry of ``old`` into ``new`` (which nothing else writes yet), converted: a batch
    read and a batch write per ``chunk`` entries.  Returns the entries copied.  A new map too
    small for them (entries made since the count) raises BackendError."""
    n = 0
    ks, vs = old.key_size, old.value_size
    for nn, raw_k, raw_v in old._raw_batches(chunk):
        if how.convert is not identity:
            pairs = [how.convert(raw_k[i * ks : (i + 1) * ks], raw_v[i * vs : (i + 1) * vs]) for i in range(nn)]
            raw_k, raw_v = b"".join(k for k, _ in pairs), b"".join(v for _, v in pairs)
        try:
            new.put_batch(raw_k, raw_v, nn)
        except B.LibbpfError as e:
            if e.errno == errno.E2BIG:
                raise BackendError(f"{old.name}: more entries than the new map's {new.max_entries} (sessions "
                                   f"made during the copy): nothing changed") from None
            raise
        n += nn
    return n


@dataclass
class PassResult:
    looked: int = 0  # entries (snat_ct: sessions) used since the pass's ``since_ns`` (looked up in the new map)
    copied: int = 0  # entries copied (a session: 2)
    full: int = 0  # entries the new map had no room for
    updated: int = 0  # entries the old programs changed after the new map's copy of them was made (a session: 2)


def _put_new(new: B.Map, key: bytes, value: bytes) -> int:
    """Put with BPF_NOEXIST: 1 when it went in, 0 when the key was there, -1 when the map is full."""
    try:
        new.put(key, value, B.BPF_NOEXIST)
    except B.LibbpfError as e:
        if e.errno == errno.EEXIST:
            return 0
        if e.errno == errno.E2BIG:
            return -1
        raise
    return 1


def _put_over(new: B.Map, key: bytes, value: bytes) -> bool:
    """Put with BPF_EXIST: False when the key is gone meanwhile."""
    try:
        new.put(key, value, B.BPF_EXIST)
    except B.LibbpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def copy_new(old: B.Map, new: B.Map, how: Carried, since_ns: int, chunk: int = 4096) -> PassResult:
    """The entries of ``old`` used (made or refreshed) since ``since_ns`` (the programs' clock,
    CLOCK_MONOTONIC), converted: those ``new`` lacks are put with BPF_NOEXIST (what the new map
    holds is never overwritten by a copy: a session the new programs made); those it holds as an
    earlier pass copied them but the old programs used later than anything in ``new`` says
    (their last packet's state and time: a connection closed or refreshed on a hook not replaced
    yet) are put over it, the same mapping only (a session the new programs changed since is
    later, and wins).  An older entry was in ``old`` through a whole earlier pass, which saw
    it.  snat_ct: by pairs (an IN entry used since, its OUT entry not: the pair too), the
    IN entry first (its key holds the SNAT port, as the datapath takes it), then the OUT entry;
    a pair whose IN entry is missing or another session's is left (a half pair, which the
    sweep removes); when the OUT key went in meanwhile, the IN entry just written goes again."""
    res = PassResult()
    since = max(0, since_ns - CLOCK_SLACK_NS)
    off = how.seen_off

    def seen(v: bytes) -> int:
        return _U64.unpack_from(v, off)[0]

    def update_pair(out_k: bytes, out_v: bytes, in_k: bytes, in_v: bytes) -> None:
        """The old pair over the new map's when it is the same mapping and the old one's last
        use is the later (lookups only here: the old programs' later use is the rare case)."""
        ck, cv = how.convert(out_k, out_v)
        cik, civ = how.convert(in_k, in_v)
        now, now_in = new.get(ck), new.get(cik)
        if now is None or now_in is None or now[_PEER] != cik or now_in[_PEER] != ck:
            return  # another mapping (the new programs'), or half gone: theirs
        if max(seen(cv), seen(civ)) <= max(seen(now), seen(now_in)):
            return  # the new programs used it since
        if _put_over(new, cik, civ) and _put_over(new, ck, cv):
            res.updated += 2

    for part in old._batches(chunk):
        for k, v in part:
            if seen(v) < since:
                continue
            if not how.paired:
                res.looked += 1
                ck, cv = how.convert(k, v)
                now = new.get(ck)
                if now is None:
                    got = _put_new(new, ck, cv)
                    res.copied += got > 0
                    res.full += got < 0
                elif seen(cv) > seen(now) and now[:off] == cv[:off] and _put_over(new, ck, cv):
                    res.updated += 1
                continue
            if k[_DIR_OFF] != L.CT_DIR_OUT:  # a reply's use: its pair, when the new map has this entry older
                now_in = new.get(how.convert(k, v)[0])
                if now_in is not None and seen(now_in) < seen(v):
                    out_v = peer_entry(old, k, v)
                    if out_v is not None:
                        res.looked += 1
                        update_pair(v[_PEER], out_v, k, v)
                continue  # (a pair the new map lacks: with its OUT entry)
            res.looked += 1
            ck, cv = how.convert(k, v)
            now = new.get(ck)
            in_key = v[_PEER]
            if now is not None:
                if seen(now) < seen(v):
                    inn = peer_entry(old, k, v)
                    if inn is not None:
                        update_pair(k, v, in_key, inn)
                continue
            inn = peer_entry(old, k, v)
            if inn is None:
                continue
            cik, civ = how.convert(in_key, inn)
            got = _put_new(new, cik, civ)
            if got <= 0:
                res.full += 2 * (got < 0)
                continue
            got = _put_new(new, ck, cv)
            if got <= 0:
                res.full += 2 * (got < 0)
                now = new.get(cik)
                if now is not None and now[_PEER] == ck:
                    new.delete(cik)
                continue
            res.copied += 2
    return res
