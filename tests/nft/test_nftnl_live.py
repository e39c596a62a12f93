"""datapath/nftnl.py against the kernel (root, mark nft), in a namespace the test makes: what
the nft backend's hook check reads every tick (table_shape) costs the same however many chains
other tables hold (a docker or k8s ruleset beside ours), and still sees our table change."""

from __future__ import annotations

import subprocess

import pytest

from snatgw.datapath import nftnl

pytestmark = [pytest.mark.nft, pytest.mark.root]

OURS = "sgnl_ours"
ASKED = {"pre", "filt", "spare"}  # spare: asked about, not there until the test adds it


def _nft(ns: str, text: str) -> None:
    p = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=text, text=True,
                       capture_output=True)  # fmt: skip
    assert p.returncode == 0, p.stderr


NS_TAG = "nl"  # empty_netns's names: sgnl<pid><random>


@pytest.fixture
def ns(empty_netns):
    return empty_netns


class _Counting:
    """A netfilter socket that counts the netlink messages it reads (what table_shape costs,
    counted rather than timed)."""

    read = 0

    def __init__(self, sock):
        self.sock = sock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()
        return False

    def settimeout(self, t):
        self.sock.settimeout(t)

    def send(self, msg):
        return self.sock.send(msg)

    def recv(self, n):
        buf = self.sock.recv(n)
        off = 0
        while off + nftnl._NLH.size <= len(buf):
            ln = nftnl._NLH.unpack_from(buf, off)[0]
            if ln < nftnl._NLH.size:
                break
            _Counting.read += 1
            off += (ln + 3) & ~3
        return buf


def _shape(ns, monkeypatch):
    """table_shape of our table and the number of netlink messages it read."""
    real = nftnl._open
    monkeypatch.setattr(nftnl, "_open", lambda netns: _Counting(real(netns)))
    _Counting.read = 0
    try:
        return nftnl.table_shape("ip", OURS, ASKED, ns), _Counting.read
    finally:
        monkeypatch.setattr(nftnl, "_open", real)


def test_table_shape_reads_the_same_beside_a_foreign_table_of_500_chains(ns, monkeypatch):
    """Our table (two chains, three rules) alone, then beside a foreign table of 500 chains
    (with rules) in the same family: the same answer from the same number of messages (a
    dump of the family's chains read all 500 every tick).  A chain added to ours and one
    removed from it are seen, and the rule count follows."""
    _nft(ns, f"""table ip {OURS} {{
  counter c1 {{ }}
  chain pre {{ type filter hook prerouting priority -300; policy accept; }}
  chain filt {{ type filter hook forward priority 0; policy accept;
    ip saddr 198.18.0.0/15 counter name c1 accept
    ip saddr {{ 192.0.2.1, 192.0.2.2 }} drop
    ct state new accept
  }}
}}
""")
    alone, cost = _shape(ns, monkeypatch)
    assert alone == ({"pre", "filt"}, 3)
    foreign = "table ip sgnl_foreign {\n" + "".join(
        f"  chain c{i} {{ ip daddr 203.0.113.{i % 250} accept; }}\n" for i in range(500)) + "}\n"
    _nft(ns, foreign + "table ip sgnl_foreign2 { chain input { type filter hook input priority 0; }; }\n")
    beside, cost_beside = _shape(ns, monkeypatch)
    assert beside == alone
    assert cost_beside == cost, f"{cost} messages alone, {cost_beside} beside 500 foreign chains"
    assert cost <= len(ASKED) + 6  # a get of the table, one per chain, the rule dump (and its end)

    _nft(ns, f"add chain ip {OURS} spare\nadd rule ip {OURS} spare accept\n")
    assert _shape(ns, monkeypatch)[0] == ({"pre", "filt", "spare"}, 4)
    _nft(ns, f"flush chain ip {OURS} filt\ndelete chain ip {OURS} filt\n")
    assert _shape(ns, monkeypatch)[0] == ({"pre", "spare"}, 1)
    _nft(ns, f"delete table ip {OURS}\n")
    assert _shape(ns, monkeypatch)[0] is None
    _nft(ns, f"table ip {OURS} {{ chain sgnl_other {{ }}; }}\n")  # a chain not asked about is not reported
    assert _shape(ns, monkeypatch)[0] == (set(), 0)


def test_the_leak_guard_counter_is_read_and_zeroed(ns):
    """The bpf backend's DROP_LEAK adds the guard table's counter (guard.dropped, by netlink),
    and its zero() zeroes that counter too (guard.reset): a failed read after a zero then
    answers zeros, not the drops from before it (LastRead.forget)."""
    from snatgw.datapath.bpf import guard

    assert guard.reset(ns) is False and guard.dropped(ns) == 0  # no table yet
    guard.install([], [], netns=ns)  # the table with its counter, no rule referring to it
    _nft(ns, f"delete counter ip {guard.TABLE} {guard.COUNTER}\n"
             f"add counter ip {guard.TABLE} {guard.COUNTER} {{ packets 5 bytes 300 }}\n")  # fmt: skip
    assert guard.dropped(ns) == 5
    assert guard.reset(ns) is True and guard.dropped(ns) == 0
