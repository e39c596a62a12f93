"""The session sync protocol's codec (daemon/synccodec.py) and its settings: round trip, MAC,
replay window, the echo of the receiver's boot id (what was recorded before it started is
refused), another protocol version, a fuzz of mutated datagrams (never an exception, every drop
counted), and the config's errors with file, line and field."""

from __future__ import annotations

import os
import random

import pytest

from snatgw.config.parse import parse_text, render_config
from snatgw.daemon import synccodec as C
from snatgw.errors import ConfigError

KEY = b"k" * 32
OWN = 0x0123456789ABCDEF  # the receiving decoder's boot id, which the encoders here echo


def rec(i: int = 0, op: int = C.OP_UPDATE) -> C.Record:
    return C.Record(op, 6, 1, 0, bytes([198, 18, 0, 10]), 40000 + i, bytes([203, 0, 113, 10]), 443,
                    bytes([198, 51, 100, 7]), 5000 + i, 7, 1234 + i)  # fmt: skip


def test_round_trip_in_datagrams_of_at_most_1400_bytes():
    enc, dec = C.Encoder(KEY, echo=OWN), C.Decoder(KEY, OWN)
    recs = [rec(i, C.OP_END if i % 3 else C.OP_UPDATE) for i in range(100)]
    grams = enc.encode(recs)
    assert [len(g) for g in grams] == [32 + 42 * 32 + 16] * 2 + [32 + 16 * 32 + 16]
    assert max(len(g) for g in grams) <= C.MAX_DATAGRAM
    got = [r for g in grams for r in dec.decode(g)]
    assert got == recs
    assert dec.stats()["datagrams"] == 3 and not any(dec.drops.values())


def test_a_wrong_key_is_a_bad_mac_and_gives_nothing():
    g = C.Encoder(b"x" * 32, echo=OWN).encode([rec()])[0]
    dec = C.Decoder(KEY, OWN)
    assert dec.decode(g) == [] and dec.drops["bad_mac"] == 1


def test_replay_is_refused_reordering_within_the_window_is_not():
    enc, dec = C.Encoder(KEY, echo=OWN), C.Decoder(KEY, OWN)
    grams = [enc.encode([rec(i)])[0] for i in range(100)]
    assert dec.decode(grams[10])  # seq 11
    assert dec.decode(grams[5])  # older, within the window: late, not a replay
    assert dec.decode(grams[5]) == [] and dec.drops["replay"] == 1  # the same again
    assert dec.decode(grams[99])  # seq 100
    assert dec.decode(grams[99 - C.WINDOW]) == []  # out of the window now
    assert dec.decode(grams[99 - C.WINDOW + 1])  # the oldest still in it
    assert dec.drops["replay"] == 2
    # another sender (a restarted peer: new boot id) starts at 1 again
    assert C.Decoder(KEY, OWN).decode(C.Encoder(KEY, echo=OWN).encode([rec()])[0])
    assert dec.decode(C.Encoder(KEY, echo=OWN).encode([rec()])[0])


def test_datagrams_recorded_before_the_receiver_restarted_are_stale_and_give_nothing():
    """A replay of what the link carried before the receiver restarted (or rebuilt its sync: a
    new boot id), an END among it: every datagram is counted ``stale`` and gives no record,
    whatever its sequence; the sender's boot id is learnt (our next datagram echoes it)."""
    enc, old = C.Encoder(KEY), C.Decoder(KEY, own=1111)
    enc.echo = old.own
    recorded = [enc.encode([rec(i, C.OP_END)])[0] for i in range(5)]
    assert [len(old.decode(g)) for g in recorded] == [1] * 5  # taken while the receiver ran
    new = C.Decoder(KEY, own=2222)  # the receiver restarted
    assert [new.decode(g) for g in recorded] == [[]] * 5
    assert new.drops == {r: 5 * (r == "stale") for r in C.REASONS} and new.datagrams == new.records == 0
    assert new.peer == enc.boot_id and new.confirmed == 0
    enc.echo = new.own  # the sender heard the new boot id: its next datagram counts
    assert new.decode(enc.encode([rec(9)])[0]) == [rec(9)] and new.confirmed == enc.boot_id
    assert all(new.decode(g) == [] for g in recorded) and new.drops["replay"] == 5  # (their sequences: seen)


def test_two_sides_agree_within_a_round_trip_and_a_replayed_old_hello_changes_nothing():
    """Start-up as sync.py runs it: each side's hello echoes 0 (stale at the other, which learns
    the boot id and answers with a hello echoing it); then records pass both ways.  The peer
    restarts: its new hello is stale and changes nothing at b (b has a confirmed peer); b's next
    heartbeat (echoing the old boot id) teaches a2 b's boot id, a2's answer echoes it and is
    confirmed.  A replayed hello of the peer's previous boot (retired once the new one is
    confirmed) is a replay: it does not make the receiver echo the dead boot id, which would
    starve the live peer of records."""

    class Side:
        def __init__(self):
            self.enc = C.Encoder(KEY)
            self.dec = C.Decoder(KEY, self.enc.boot_id)

        def hear(self, g: bytes, answer: list) -> list:
            out = self.dec.decode(g)
            if self.dec.peer_changed:
                self.enc.echo = self.dec.peer
                answer.append(self.enc.datagram([]))
            return out

    a, b = Side(), Side()
    to_b, to_a = [a.enc.datagram([])], []  # a's hello (b's hello was lost: a was not up yet)
    assert b.hear(to_b.pop(), to_a) == [] and b.dec.drops["stale"] == 1 and len(to_a) == 1
    assert a.hear(to_a.pop(), to_b) == [] and a.dec.drops["stale"] == 0 and a.dec.confirmed == b.enc.boot_id
    assert b.hear(a.enc.encode([rec(1)])[0], to_a) == [rec(1)] and not to_a  # (a's answering hello, lost)
    assert a.hear(b.enc.encode([rec(2)])[0], to_b) == [rec(2)]
    old_hello = a.enc.datagram([])  # (an attacker records it)
    was = a.enc.boot_id
    a2 = Side()  # a restarts
    assert b.hear(a2.enc.datagram([]), to_a) == [] and b.dec.peer == was and not to_a
    to_b.clear()  # (what went to the old a)
    assert a2.hear(b.enc.datagram([]), to_b) == [] and a2.dec.peer == b.enc.boot_id and len(to_b) == 1
    assert b.hear(to_b.pop(), to_a) == [] and b.dec.confirmed == b.dec.peer == a2.enc.boot_id
    assert b.dec.confirmed_changed and len(to_a) == 1  # b's hello echoing a2 (and its whole table)
    assert a2.hear(to_a.pop(), to_b) == [] and a2.dec.confirmed == b.enc.boot_id
    assert b.hear(a2.enc.encode([rec(4)])[0], to_a) == [rec(4)]
    drops = dict(b.dec.drops)
    assert b.hear(old_hello, to_a) == [] and b.dec.drops["replay"] == drops["replay"] + 1
    assert b.dec.peer == a2.enc.boot_id != was and not to_a
    assert b.hear(a2.enc.encode([rec(5)])[0], []) == [rec(5)]


def test_a_replayed_datagram_of_a_boot_never_heard_changes_nothing_once_the_peer_is_confirmed():
    """A datagram recorded from an older boot of the peer, before this receiver started (so never
    heard, never retired): once the live peer is confirmed it is ``stale`` and changes nothing.
    Before, it made the receiver echo the dead boot id (the live peer then dropped all it sent,
    until its next heartbeat) and walk its whole table, once per replayed sequence."""
    old_peer = C.Encoder(KEY, echo=1111)  # the peer's previous boot, toward our previous boot
    recorded = [old_peer.datagram([]) for _ in range(3)] + old_peer.encode([rec(1, C.OP_END)])
    live, dec = C.Encoder(KEY), C.Decoder(KEY, own=2222)
    assert dec.decode(live.datagram([])) == [] and dec.peer == live.boot_id  # our start: learnt
    live.echo = dec.own
    assert dec.decode(live.encode([rec(2)])[0]) == [rec(2)] and dec.confirmed == live.boot_id
    for g in recorded:
        assert dec.decode(g) == [] and not dec.peer_changed and not dec.confirmed_changed
        assert dec.peer == dec.confirmed == live.boot_id
    assert dec.drops["stale"] == 1 + len(recorded)
    assert dec.decode(live.encode([rec(3)])[0]) == [rec(3)]


def test_the_confirmed_boots_window_outlives_many_other_boot_ids():
    """Hellos of many other boot ids (replays of old ones: valid MAC, never confirmed) push out
    only unconfirmed windows: the confirmed peer's datagrams, replayed after them, stay refused."""
    enc, dec = C.Encoder(KEY, echo=OWN), C.Decoder(KEY, OWN)
    grams = enc.encode([rec(i) for i in range(3 * 42)])
    assert all(dec.decode(g) for g in grams)
    for _ in range(3 * C.BOOTS_KEPT):
        assert dec.decode(C.Encoder(KEY).datagram([])) == []  # echo 0: stale
    assert all(dec.decode(g) == [] for g in grams) and dec.drops["replay"] == 3


def test_a_datagram_of_the_old_version_is_bad_version_and_remembered_until_a_valid_one():
    """Version 1 (24-byte header, no echo): counted ``bad_version``, its version kept for status
    (the peer speaks another version) until a valid datagram comes."""
    import hashlib
    import hmac
    import struct

    body = struct.pack(">4sBBHQQ", b"SGWS", 1, 0, 1, 77, 1) + rec().pack()
    v1 = body + hmac.new(KEY, body, hashlib.sha256).digest()[:16]
    dec = C.Decoder(KEY, OWN)
    assert dec.decode(v1) == [] and dec.drops["bad_version"] == 1 and dec.other_version == 1
    assert dec.decode(v1[:10]) == [] and dec.drops["bad_version"] == 2  # (even short: the version comes first)
    assert dec.decode(C.Encoder(KEY, echo=OWN).encode([rec()])[0]) == [rec()] and dec.other_version is None


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda g: g[:30], "short"),
    (lambda g: b"XXXX" + g[4:], "bad_magic"),
    (lambda g: g[:4] + b"\x01" + g[5:], "bad_version"),
    (lambda g: g[:6] + (43).to_bytes(2, "big") + g[8:], "too_many"),
    (lambda g: g[:6] + (2).to_bytes(2, "big") + g[8:], "malformed"),
    (lambda g: g[:-1] + bytes([g[-1] ^ 1]), "bad_mac"),
])  # fmt: skip
def test_each_drop_reason(mutate, reason):
    dec = C.Decoder(KEY, OWN)
    assert dec.decode(mutate(C.Encoder(KEY, echo=OWN).encode([rec()])[0])) == []
    assert dec.drops == {r: int(r == reason) for r in C.REASONS}


def test_unknown_op_or_protocol_records_are_skipped_and_counted():
    bad = rec()._replace(op=9)
    bad2 = rec()._replace(proto=47)
    dec = C.Decoder(KEY, OWN)
    assert dec.decode(C.Encoder(KEY, echo=OWN).encode([bad, rec(1), bad2])[0]) == [rec(1)]
    assert dec.bad_records == 2


def test_fuzz_never_raises_and_every_datagram_is_counted_once():
    """Random bytes, truncations and bit flips of a valid datagram: no exception, nothing
    but the valid original decodes, each input counted as accepted or dropped once."""
    rnd = random.Random(1234)
    enc = C.Encoder(KEY, echo=OWN)
    good = enc.encode([rec(i) for i in range(10)])[0]
    dec = C.Decoder(KEY, OWN)
    inputs = [os.urandom(rnd.randrange(0, 1500)) for _ in range(2000)]
    inputs += [good[: rnd.randrange(0, len(good))] for _ in range(1000)]
    for _ in range(3000):
        b = bytearray(good)
        for _ in range(rnd.randrange(1, 4)):
            b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
        inputs.append(bytes(b))
    inputs += [good[:32] + os.urandom(rnd.randrange(0, 1400)) for _ in range(1000)]
    for x in inputs:
        assert dec.decode(x) == []
    assert dec.datagrams == 0 and sum(dec.drops.values()) == len(inputs)
    assert all(dec.drops[r] for r in ("short", "bad_magic", "bad_version", "too_many", "malformed", "bad_mac"))
    assert dec.decode(good) and dec.datagrams == 1  # the original still passes


# --------------------------------------------------------------------------- settings


def conf(tmp_path, body: str, backend: str = "") -> str:
    return (f"snatgw {{\n{backend}{body}}}\n"
            "virtual_server fwmark 1 {\n  snat_rule { from 198.18.0.0/24 snat_ip 203.0.113.5 }\n}\n")  # fmt: skip


def key_file(tmp_path, data: bytes = b"0123456789abcdef0123456789abcdef\n", mode: int = 0o600) -> str:
    p = tmp_path / "sync.key"
    p.write_bytes(data)
    os.chmod(p, mode)
    return str(p)


def err(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse_text(text, "t.conf", [])
    return ei.value


def test_sync_settings_parse_and_render_back(tmp_path):
    k = key_file(tmp_path)
    cfg = parse_text(conf(tmp_path, f"sync_peer 192.0.2.2\nsync_local 192.0.2.1\nsync_port 4000\nsync_key {k}\n"
                                    "sync_interval 0.5 sync_refresh 30\n"))
    s = cfg.settings
    assert (s.sync_peer, s.sync_local, s.sync_port, s.sync_key) == ("192.0.2.2", "192.0.2.1", 4000, k)
    assert (s.sync_interval, s.sync_refresh) == (0.5, 30.0)
    assert "sync_interval 0.5\n" in render_config(cfg) and "sync_refresh 30\n" in render_config(cfg)
    assert parse_text(render_config(cfg)).settings == s
    dflt = parse_text(conf(tmp_path, "")).settings
    assert dflt.sync_peer is None and (dflt.sync_interval, dflt.sync_refresh) == (1.0, 10.0)  # off by default


@pytest.mark.parametrize(("body", "line", "field", "words"), [
    ("sync_peer 192.0.2.2\nsync_key KEY\n", 2, "sync_peer", "needs sync_local"),
    ("sync_port 4000\n", 2, "sync_port", "needs sync_peer, sync_local, sync_key"),
    ("sync_interval 2\n", 2, "sync_interval", "needs sync_peer, sync_local, sync_key"),
    ("sync_peer 192.0.2.2\nsync_local 192.0.2.1\nsync_key KEY\nsync_interval 0.05\n", 5, "sync_interval",
     "a number from 0.1 to 60, got '0.05'"),
    ("sync_peer 192.0.2.2\nsync_local 192.0.2.1\nsync_key KEY\nsync_interval 61\n", 5, "sync_interval", "0.1 to 60"),
    ("sync_peer 192.0.2.2\nsync_local 192.0.2.1\nsync_key KEY\nsync_interval nan\n", 5, "sync_interval", "0.1 to 60"),
    ("sync_peer 192.0.2.2\nsync_local 192.0.2.1\nsync_key KEY\nsync_refresh 0.5\n", 5, "sync_refresh",
     "a number from 1 to 3600, got '0.5'"),
    ("sync_peer 192.0.2.2\nsync_local 192.0.2.1\nsync_key KEY\nsync_refresh 1e9\n", 5, "sync_refresh", "1 to 3600"),
    ("sync_peer 192.0.2.2\nsync_local 192.0.2.1\n", 2, "sync_peer", "needs sync_key"),
    ("sync_peer 192.0.2.300\n", 2, "sync_peer", "IPv4 address"),
    ("sync_local 224.0.0.1\n", 2, "sync_local", "unicast"),
    ("sync_port 0\n", 2, "sync_port", "1..65535"),
    ("sync_key relative.key\n", 2, "sync_key", "absolute path"),
    ("sync_peer 192.0.2.1\nsync_local 192.0.2.1\nsync_key KEY\n", 2, "sync_peer", "sync_local's own"),
    ("sync_peer 192.0.2.2\nsync_local 192.0.2.1\nsync_key KEY\n", 2, "sync_peer", "use conntrackd"),
])  # fmt: skip
def test_sync_setting_errors_name_file_line_and_field(tmp_path, body, line, field, words):
    backend = "backend nft\n" if words == "use conntrackd" else ""
    e = err(conf(tmp_path, body.replace("KEY", key_file(tmp_path)), backend).replace("\n}", "\n}", 1))
    want_line = line + (1 if backend else 0)
    assert (e.where, e.field) == (f"t.conf:{want_line}", field), str(e)
    assert words in e.message, str(e)


@pytest.mark.parametrize(("data", "mode", "words"), [
    (b"0123456789abcdef0123456789abcdef", 0o640, "accessible by group or others (mode 0640)"),
    (b"0123456789abcdef0123456789abcdef", 0o604, "chmod 600"),
    (b"  short key \n\n", 0o600, "holds 9 bytes after stripping"),
    (b"x" * 5000, 0o600, "more than 4096 bytes"),
])  # fmt: skip
def test_a_bad_key_file_is_refused(tmp_path, data, mode, words):
    k = key_file(tmp_path, data, mode)
    e = err(conf(tmp_path, f"sync_peer 192.0.2.2\nsync_local 192.0.2.1\nsync_key {k}\n"))
    assert (e.where, e.field) == ("t.conf:4", "sync_key") and words in e.message, str(e)


def test_a_key_file_not_owned_by_the_daemons_user_is_refused(tmp_path):
    """As ssh refuses a key another user owns (who may chmod it, or replace what it holds)."""
    k = key_file(tmp_path)
    os.chown(k, os.geteuid() + 1234, -1)
    e = err(conf(tmp_path, f"sync_peer 192.0.2.2\nsync_local 192.0.2.1\nsync_key {k}\n"))
    assert (e.where, e.field) == ("t.conf:4", "sync_key"), str(e)
    assert f"owned by uid {os.geteuid() + 1234}, not by uid {os.geteuid()}" in e.message, str(e)
    assert "chown" in e.message, str(e)


def test_a_missing_key_file_is_refused(tmp_path):
    e = err(conf(tmp_path, f"sync_peer 192.0.2.2\nsync_local 192.0.2.1\nsync_key {tmp_path}/none\n"))
    assert (e.where, e.field) == ("t.conf:4", "sync_key") and "cannot read" in e.message, str(e)
