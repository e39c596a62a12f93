"""ct_entry.iif keeps the ingress ifindex's low 16 bits (docs/datapath.md step 2a): two inside
devices that share them would let a session made on one vouch for packets of the other, past
the reverse-path check.  The control plane sets CFG_F_IIF_AMBIGUOUS then, and no session
vouches: every packet takes the full check."""

import subprocess

import pytest

from snatgw import layout as L
from snatgw.datapath.bpf.backend import _with_flag, iif_collisions
from snatgw.datapath.bpf.testrun import REF_MAC
from snatgw.layout import Reason

from tests.cases.corpus import REF_RULES, REF_SETTINGS, ruleset
from tests.cases.pkts import A, R1, udp

pytestmark = pytest.mark.bpf


def test_a_clashing_device_is_vouched_for_only_without_the_flag(make_prog):
    prog = make_prog(ruleset(REF_RULES), REF_SETTINGS)
    pkt = udp(A, R1, 40000, 53)
    assert prog.run("inside", pkt, "lan40").reason == Reason.XLATE_NEW
    clash = prog.net.ifindex["lan40"] + 0x10000  # same low 16 bits, another device
    ip = ["ip", "-n", prog.net.name, "link"]
    subprocess.run(ip + ["add", "sgtclash0", "index", str(clash), "address", REF_MAC, "type", "veth", "peer", "name",
                         "sgtclash1"], check=True)  # (test-run's frames go to REF_MAC: else not for us)
    try:
        _clash(prog, pkt, clash)
    finally:
        subprocess.run(ip + ["del", "sgtclash0"], check=False)


def _clash(prog, pkt, clash):
    # the hole the flag closes: the 16 bits match, the session vouches, no FIB lookup
    assert prog.run("inside", pkt, "lan40", ifindex=clash).reason == Reason.XLATE_OUT
    cfg = prog.maps[L.MAP_CONFIG]
    cfg.put(0, _with_flag(cfg.get(0), L.CFG_F_IIF_AMBIGUOUS, True))
    assert prog.run("inside", pkt, "lan40", ifindex=clash).reason == Reason.DROP_SPOOFED
    # the device it was made on still passes, by the full check now
    assert prog.run("inside", pkt, "lan40").reason == Reason.XLATE_OUT
    cfg.put(0, _with_flag(cfg.get(0), L.CFG_F_IIF_AMBIGUOUS, False))
    assert prog.run("inside", pkt, "lan40", ifindex=clash).reason == Reason.XLATE_OUT


def test_collisions_are_found_by_the_low_16_bits(monkeypatch):
    idx = {"lan40": 7, "lan50": 7 + 0x10000, "lan60": 8, "gone": None}

    def fake(name):
        return idx[name] if idx[name] is not None else 0xFFFFFFFF

    monkeypatch.setattr("snatgw.datapath.bpf.backend._ifindex_or_absent", fake)
    assert iif_collisions(["lan40", "lan60", "gone"]) == []
    assert sorted(iif_collisions(["lan40", "lan50", "lan60", "gone"])) == ["lan40 (ifindex 7)", "lan50 (ifindex 65543)"]
