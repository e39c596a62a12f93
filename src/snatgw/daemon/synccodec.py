"""The session sync protocol's wire format (sans-I/O: bytes in, bytes out; daemon/sync.py does
the sockets).  One UDP datagram (<= MAX_DATAGRAM bytes)::

    header   magic "SGWS" | version u8 | 0 u8 | count u16 | boot id u64 | sequence u64 | echo u64   (32 bytes)
    records  count x 32 bytes (below)
    mac      HMAC-SHA256(key, header + records), first 16 bytes

all big-endian.  A record is one session::

    op u8 (1 update, 2 end) | proto u8 | TCP state u8 (layout.CtState) | flags u8 (CT_F_*)
    inside addr | remote addr | SNAT addr (4 bytes each)
    inside port | remote port | SNAT port | 0 (u16 each)
    rule_id u32 | age u32 (ms since the session's last packet, as the sender's table says)

The boot id is random per sender (a daemon's sync instance); the sequence starts at 1 and
grows by one per datagram.  The echo is the boot id the sender last heard from its peer (0:
none yet).  A receiver takes records only from datagrams that echo its own current boot id:
whatever was recorded on the link before it started (a restart, or a reload that rebuilt the
sync for another peer or key: a new boot id; one that keeps both keeps the encoder and decoder,
daemon/sync.py hand_over) is useless, without the two clocks having to agree; within one boot the
sequence window below refuses what it saw.  A datagram of no records is a hello or a
heartbeat: a sender sends one when it starts (so that the peer learns its new boot id, echoes
it, and sends its whole table at once) and then every sync_interval.

Start-up: each side's first datagrams echo 0 (or a boot id of the peer's that is gone): they
are counted ``stale`` and their records dropped, but they tell the receiver the sender's boot
id (``peer``), which its next datagram echoes; the sender takes that one and echoes back.  A
datagram that echoes the receiver's boot id confirms its sender's boot id; the receiver then
retires every other boot id it heard (a replayed hello of an older boot of the peer is a
``replay`` from then on).  Once a boot id is confirmed, a stale datagram no longer changes what
the receiver echoes: a replay of an old boot it never heard (recorded before it started) would
make it echo a dead boot id, and the live peer would drop everything it sends.  A peer that
restarts has nothing confirmed: it learns the receiver's boot id from the receiver's next
datagram (a heartbeat at the latest), echoes it, and is confirmed by that.

The receiver (Decoder) drops and counts by reason: ``short`` (less than a header and a MAC),
``bad_magic``, ``bad_version`` (another protocol version: ``other_version`` holds it),
``too_many`` (count above MAX_RECORDS), ``malformed`` (length does not match count),
``bad_mac``, ``replay`` (a sequence seen already, or older than the reordering WINDOW below the
highest seen for that boot id, or a retired boot id), ``stale`` (valid, but not echoing our
boot id: its records are dropped).  Records of a datagram that passes with an op or protocol
it does not know are skipped and counted (``bad_record``).  Decoder.decode never raises,
whatever the bytes.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import struct
from typing import NamedTuple

from .. import layout as L

MAGIC = b"SGWS"
VERSION = 2  # 1: no echo (records recorded on the link were good again after a restart)
MAX_DATAGRAM = 1400
HEADER = struct.Struct(">4sBBHQQQ")
RECORD = struct.Struct(">BBBB4s4s4sHHHHII")
MAC_LEN = 16
MAX_RECORDS = (MAX_DATAGRAM - HEADER.size - MAC_LEN) // RECORD.size  # 42
OP_UPDATE, OP_END = 1, 2
PROTOS = frozenset((L.IPPROTO_TCP, L.IPPROTO_UDP, L.IPPROTO_ICMP))
WINDOW = 64  # sequences below the highest seen that may still come (reordering)
BOOTS_KEPT = 8  # unconfirmed sender boot ids the replay check remembers (the oldest forgotten first)
RETIRED_KEPT = 256  # boot ids of the peer retired by a newer confirmed one (refused; the oldest forgotten first)
AGE_MAX = 0xFFFFFFFF
REASONS = ("short", "bad_magic", "bad_version", "too_many", "malformed", "bad_mac", "replay", "stale")

assert HEADER.size == 32 and RECORD.size == 32 and MAX_RECORDS == 42


class Record(NamedTuple):
    """One session as carried (addresses as 4 raw bytes in wire order, ports as numbers)."""

    op: int
    proto: int
    state: int
    flags: int
    inside: bytes
    iport: int
    remote: bytes
    rport: int
    nat: bytes
    nport: int
    rule_id: int
    age_ms: int

    def pack(self) -> bytes:
        return RECORD.pack(self.op, self.proto, self.state, self.flags, self.inside, self.remote, self.nat,
                           self.iport, self.rport, self.nport, 0, self.rule_id, min(AGE_MAX, max(0, self.age_ms)))


def unpack_record(raw: bytes, off: int) -> Record:
    op, proto, state, flags, inside, remote, nat, iport, rport, nport, _, rule_id, age = RECORD.unpack_from(raw, off)
    return Record(op, proto, state, flags, inside, iport, remote, rport, nat, nport, rule_id, age)


def mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:MAC_LEN]


def new_boot_id() -> int:
    return int.from_bytes(os.urandom(8), "big") or 1


class Encoder:
    """Records -> datagrams of at most MAX_RECORDS records each, numbered from 1; each echoes
    ``echo`` (the peer's boot id as last heard: the receiver's Decoder.peer; 0: none yet)."""

    def __init__(self, key: bytes, boot_id: int | None = None, echo: int = 0):
        self.key = key
        self.boot_id = new_boot_id() if boot_id is None else boot_id
        self.seq = 0
        self.echo = echo

    def datagram(self, packed: list[bytes]) -> bytes:
        """One datagram of already packed records (at most MAX_RECORDS; none: a hello or a
        heartbeat, which tells the peer our boot id and that we hear it)."""
        assert 0 <= len(packed) <= MAX_RECORDS
        self.seq += 1
        body = HEADER.pack(MAGIC, VERSION, 0, len(packed), self.boot_id, self.seq, self.echo) + b"".join(packed)
        return body + mac(self.key, body)

    def encode(self, records: list[Record]) -> list[bytes]:
        packed = [r.pack() for r in records]
        return [self.datagram(packed[i : i + MAX_RECORDS]) for i in range(0, len(packed), MAX_RECORDS)]


class Decoder:
    """Datagrams -> records, with the MAC, replay and echo checks; counts every drop by reason.
    ``own``: the receiver's boot id (its Encoder's), which a datagram must echo."""

    def __init__(self, key: bytes, own: int):
        self.key = key
        self.own = own
        self.drops = dict.fromkeys(REASONS, 0)
        self.bad_records = 0
        self.datagrams = 0  # valid datagrams (echoing our boot id)
        self.records = 0  # records of valid datagrams (bad ones included)
        #: the peer's boot id as last heard (what our datagrams echo; 0: nothing heard yet)
        self.peer = 0
        #: the boot id of the peer confirmed last (a datagram of it echoed ours); its window is never forgotten
        self.confirmed = 0
        #: the last decode changed ``peer`` (our next datagram echoes it: say hello at once)
        self.peer_changed = False
        #: the last decode confirmed a boot id of the peer's (a peer that started, or our own start:
        #: it wants our whole table, and what we sent it meanwhile echoed another boot id)
        self.confirmed_changed = False
        #: the version of the last datagram of another protocol version (None: none since the last valid one)
        self.other_version: int | None = None
        #: boot id -> (highest sequence, bitmap of the WINDOW sequences up to it: bit i = highest - i seen)
        self._seen: collections.OrderedDict[int, tuple[int, int]] = collections.OrderedDict()
        self._retired: collections.OrderedDict[int, None] = collections.OrderedDict()

    def _drop(self, why: str) -> list[Record]:
        self.drops[why] += 1
        return []

    def decode(self, data: bytes) -> list[Record]:
        """The records of a valid datagram; [] (counted) for anything else.  Never raises."""
        self.peer_changed = self.confirmed_changed = False
        try:
            return self._decode(bytes(data))
        except Exception:  # noqa: BLE001 - defence in depth: no input may stop the receiver
            return self._drop("malformed")

    def _decode(self, data: bytes) -> list[Record]:
        if len(data) < 6:
            return self._drop("short")
        if data[:4] != MAGIC:
            return self._drop("bad_magic")
        if data[4] != VERSION:  # (before the length checks: another version's header may differ)
            self.other_version = data[4]
            return self._drop("bad_version")
        if len(data) < HEADER.size + MAC_LEN:
            return self._drop("short")
        _, _, _, count, boot, seq, echo = HEADER.unpack_from(data, 0)
        if count > MAX_RECORDS:
            return self._drop("too_many")
        if len(data) != HEADER.size + count * RECORD.size + MAC_LEN:  # (count 0: a hello or heartbeat)
            return self._drop("malformed")
        body = data[:-MAC_LEN]
        if not hmac.compare_digest(mac(self.key, body), data[-MAC_LEN:]):
            return self._drop("bad_mac")
        if boot in self._retired or not self._fresh(boot, seq):
            return self._drop("replay")
        if echo != self.own:  # sent before the peer heard us, or recorded before we started
            # learnt only while no boot id of the peer is confirmed (our start): after that, a
            # replayed datagram of an old boot we never heard would make us echo a dead boot id
            # and the live peer drop all we send; a peer that restarts learns ours from our next
            # datagram (it has nothing confirmed) and confirms itself by echoing it
            if not self.confirmed and boot != self.peer:
                self.peer, self.peer_changed = boot, True
            return self._drop("stale")
        if boot != self.peer:
            self.peer, self.peer_changed = boot, True
        self.confirmed_changed = boot != self.confirmed
        if self.confirmed_changed:  # the peer's boot id now: every other one we heard is retired
            for b in self._seen:
                if b != boot:
                    self._retired[b] = None
            for b in self._retired:
                self._seen.pop(b, None)
            while len(self._retired) > RETIRED_KEPT:
                self._retired.popitem(last=False)
            self.confirmed = boot
        self.other_version = None
        self.datagrams += 1
        self.records += count
        out = []
        for i in range(count):
            r = unpack_record(data, HEADER.size + i * RECORD.size)
            if r.op not in (OP_UPDATE, OP_END) or r.proto not in PROTOS:
                self.bad_records += 1
                continue
            out.append(r)
        return out

    def _fresh(self, boot: int, seq: int) -> bool:
        """Whether (boot, seq) is new, and if so remember it."""
        if seq == 0 or boot == 0:
            return False
        top, bits = self._seen.get(boot, (0, 0))
        if seq > top:
            shift = seq - top
            bits = ((bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            top = seq
        else:
            back = top - seq
            if back >= WINDOW or bits >> back & 1:
                return False
            bits |= 1 << back
        self._seen[boot] = (top, bits)
        self._seen.move_to_end(boot)
        while len(self._seen) > BOOTS_KEPT:  # (never the confirmed boot's window: its replays would pass)
            old = next(b for b in self._seen if b != self.confirmed)
            del self._seen[old]
        return True

    def stats(self) -> dict:
        return {"datagrams": self.datagrams, "records": self.records, "bad_records": self.bad_records,
                "drops": dict(self.drops)}  # fmt: skip
