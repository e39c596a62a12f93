"""The session sync protocol's codec (daemon/synccodec.py) and its settings: round trip, MAC,
replay window, a fuzz of mutated datagrams (never an exception, every drop counted), and the
config's errors with file, line and field."""

from __future__ import annotations

import os
import random

import pytest

from snatgw.config.parse import parse_text, render_config
from snatgw.daemon import synccodec as C
from snatgw.errors import ConfigError

KEY = b"k" * 32


def rec(i: int = 0, op: int = C.OP_UPDATE) -> C.Record:
    return C.Record(op, 6, 1, 0, bytes([198, 18, 0, 10]), 40000 + i, bytes([203, 0, 113, 10]), 443,
                    bytes([198, 51, 100, 7]), 5000 + i, 7, 1234 + i)  # fmt: skip


def test_round_trip_in_datagrams_of_at_most_1400_bytes():
    enc, dec = C.Encoder(KEY), C.Decoder(KEY)
    recs = [rec(i, C.OP_END if i % 3 else C.OP_UPDATE) for i in range(100)]
    grams = enc.encode(recs)
    assert [len(g) for g in grams] == [24 + 42 * 32 + 16] * 2 + [24 + 16 * 32 + 16]
    assert max(len(g) for g in grams) <= C.MAX_DATAGRAM
    got = [r for g in grams for r in dec.decode(g)]
    assert got == recs
    assert dec.stats()["datagrams"] == 3 and not any(dec.drops.values())


def test_a_wrong_key_is_a_bad_mac_and_gives_nothing():
    g = C.Encoder(b"x" * 32).encode([rec()])[0]
    dec = C.Decoder(KEY)
    assert dec.decode(g) == [] and dec.drops["bad_mac"] == 1


def test_replay_is_refused_reordering_within_the_window_is_not():
    enc, dec = C.Encoder(KEY), C.Decoder(KEY)
    grams = [enc.encode([rec(i)])[0] for i in range(100)]
    assert dec.decode(grams[10])  # seq 11
    assert dec.decode(grams[5])  # older, within the window: late, not a replay
    assert dec.decode(grams[5]) == [] and dec.drops["replay"] == 1  # the same again
    assert dec.decode(grams[99])  # seq 100
    assert dec.decode(grams[99 - C.WINDOW]) == []  # out of the window now
    assert dec.decode(grams[99 - C.WINDOW + 1])  # the oldest still in it
    assert dec.drops["replay"] == 2
    # another sender (a restarted peer: new boot id) starts at 1 again
    assert C.Decoder(KEY).decode(C.Encoder(KEY).encode([rec()])[0])
    assert dec.decode(C.Encoder(KEY).encode([rec()])[0])


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda g: g[:30], "short"),
    (lambda g: b"XXXX" + g[4:], "bad_magic"),
    (lambda g: g[:4] + b"\x02" + g[5:], "bad_version"),
    (lambda g: g[:6] + (43).to_bytes(2, "big") + g[8:], "too_many"),
    (lambda g: g[:6] + (2).to_bytes(2, "big") + g[8:], "malformed"),
    (lambda g: g[:-1] + bytes([g[-1] ^ 1]), "bad_mac"),
])  # fmt: skip
def test_each_drop_reason(mutate, reason):
    dec = C.Decoder(KEY)
    assert dec.decode(mutate(C.Encoder(KEY).encode([rec()])[0])) == []
    assert dec.drops == {r: int(r == reason) for r in C.REASONS}


def test_unknown_op_or_protocol_records_are_skipped_and_counted():
    bad = rec()._replace(op=9)
    bad2 = rec()._replace(proto=47)
    dec = C.Decoder(KEY)
    assert dec.decode(C.Encoder(KEY).encode([bad, rec(1), bad2])[0]) == [rec(1)]
    assert dec.bad_records == 2


def test_fuzz_never_raises_and_every_datagram_is_counted_once():
    """Random bytes, truncations and bit flips of a valid datagram: no exception, nothing
    but the valid original decodes, each input counted as accepted or dropped once."""
    rnd = random.Random(1234)
    enc = C.Encoder(KEY)
    good = enc.encode([rec(i) for i in range(10)])[0]
    dec = C.Decoder(KEY)
    inputs = [os.urandom(rnd.randrange(0, 1500)) for _ in range(2000)]
    inputs += [good[: rnd.randrange(0, len(good))] for _ in range(1000)]
    for _ in range(3000):
        b = bytearray(good)
        for _ in range(rnd.randrange(1, 4)):
            b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
        inputs.append(bytes(b))
    inputs += [good[:24] + os.urandom(rnd.randrange(0, 1400)) for _ in range(1000)]
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
    cfg = parse_text(conf(tmp_path, f"sync_peer 192.0.2.2\nsync_local 192.0.2.1\nsync_port 4000\nsync_key {k}\n"))
    s = cfg.settings
    assert (s.sync_peer, s.sync_local, s.sync_port, s.sync_key) == ("192.0.2.2", "192.0.2.1", 4000, k)
    assert parse_text(render_config(cfg)).settings == s
    assert parse_text(conf(tmp_path, "")).settings.sync_peer is None  # off by default


@pytest.mark.parametrize(("body", "line", "field", "words"), [
    ("sync_peer 192.0.2.2\nsync_key KEY\n", 2, "sync_peer", "needs sync_local"),
    ("sync_port 4000\n", 2, "sync_port", "needs sync_peer, sync_local, sync_key"),
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
