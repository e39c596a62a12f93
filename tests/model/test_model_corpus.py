"""The shared corpus through the model: every step's verdict and reason as written, output
bytes whose checksums verify (scapy), untouched bytes for PASS/DROP, and the session table's
invariants after every step."""

from __future__ import annotations

import pytest
from cases.corpus import REF_ADDRESSES, REF_CONFIG, REF_ROUTES, SCENARIOS, Scenario
from scapy_oracle import problems

from snatgw.layout import CT_DIR_IN, CT_DIR_OUT, Reason, Verdict
from snatgw.model import StaticRouter
from snatgw.model.packet import parse

TRANSLATED = (Verdict.REDIRECT, Verdict.PASS_TRANSLATED)


def check_table(engine) -> None:
    entries = engine.table.entries()
    outs = {k: e for k, e in entries.items() if k.dir == CT_DIR_OUT}
    ins = {k: e for k, e in entries.items() if k.dir == CT_DIR_IN}
    assert len(outs) == len(ins) == len(engine.table)
    external = set()
    for k, e in outs.items():
        peer = ins[e.peer]  # every OUT has its IN ...
        assert peer.peer == k  # ... pointing back
        assert (e.peer.daddr, e.peer.dport) == (e.rw_addr, e.rw_port)
        assert (peer.rw_addr, peer.rw_port) == (k.saddr, k.sport)
        external.add((k.proto, e.rw_addr, e.rw_port, k.daddr, k.dport))
    assert len(external) == len(outs)  # no two sessions share an external tuple


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario_steps_meet_expectations(sc: Scenario):
    """Each corpus scenario gives the written verdicts and reasons, valid checksums, and a
    consistent session table."""
    engine = sc.make_engine()
    for i, st in enumerate(sc.steps):
        sc.rerouted(engine, i)
        before = sum(engine.reasons.values())
        res = engine.process(st.packet, st.side, st.ingress, st.when(i), for_us=st.for_us)
        v = parse(st.packet)
        is_err = not isinstance(v, Reason) and v.frag == 0 and v.is_icmp_error
        # every packet counts one reason; egress counts only the ICMP errors it judges and leaks
        judged = st.side != "egress" or is_err or st.reason == Reason.DROP_LEAK
        assert sum(engine.reasons.values()) - before == (1 if judged else 0)
        assert (res.verdict, res.reason) == (st.verdict, st.reason), f"step {i}"
        assert res.mark == st.mark, f"step {i}: skb->mark"
        built = {Reason.DROP_HOST_LIMIT: b"\x03\x01", Reason.PASS_FRAG_NEEDED: b"\x03\x04"}  # ICMP we build
        if res.reason in built and res.verdict == Verdict.REDIRECT:  # refuse_icmp yes; new_gw's MTU
            ihl = (st.packet[0] & 0x0F) * 4
            assert problems(res.packet) == [] and res.packet[20:22] == built[res.reason], f"step {i}"
            assert res.packet[16:20] == st.packet[12:16] and res.packet[28:] == st.packet[: ihl + 8], f"step {i}"
            if res.reason == Reason.PASS_FRAG_NEEDED:  # the next-hop MTU, below the packet's length
                assert 68 <= int.from_bytes(res.packet[26:28], "big") < len(st.packet), f"step {i}"
        elif res.verdict in TRANSLATED or res.reason.name.startswith("XLATE_"):  # egress: PASS, rewritten
            # checksums verify after translation exactly when they did before (never recomputed)
            assert (problems(res.packet) == []) == (problems(st.packet) == []), f"step {i}"
            # the same length, but for link padding (after the total length), cut from redirects
            tot = int.from_bytes(st.packet[2:4], "big")
            cut = res.verdict == Verdict.REDIRECT and 20 <= tot < len(st.packet)
            assert len(res.packet) == (tot if cut else len(st.packet)), f"step {i}"
        else:
            assert res.packet == st.packet, f"step {i}"
        if res.verdict == Verdict.REDIRECT:
            assert res.oif is not None
        check_table(engine)
    if sc.alloc is not None:  # the port searches and their tries, where the scenario knows them
        a = engine.alloc_counts()
        assert (a["port_searches"], a["port_search_tries"]) == sc.alloc


def test_corpus_is_large_and_named_uniquely():
    """The corpus has 30+ scenarios with unique names and a doc line each."""
    names = [s.name for s in SCENARIOS]
    assert len(names) >= 30 and len(set(names)) == len(names)
    assert all(s.doc and s.steps for s in SCENARIOS)


def test_corpus_reaches_every_reason_the_ref_topology_can():
    """Across the corpus every reason occurs except those the REF FIB cannot produce."""
    seen = {st.reason for s in SCENARIOS for st in s.steps}
    missing = set(Reason) - seen
    assert missing == {Reason.PASS_NO_ROUTE, Reason.DROP_BAD_CHECKSUM}


def test_ref_inputs_build_the_ref_router():
    """REF_ROUTES/REF_ADDRESSES give the same FIB as StaticRouter.ref()."""
    a, b = StaticRouter(REF_ROUTES, REF_ADDRESSES), StaticRouter.ref()
    for dst in ("203.0.113.10", "198.51.100.10", "198.19.2.71", "198.18.50.10", "198.19.3.9"):
        assert a.lookup(dst) == b.lookup(dst)
    assert "snat_rule" in REF_CONFIG and REF_CONFIG.count("snat_rule") == 3


def test_ref_config_parses_to_ref_rules():
    """REF_CONFIG (the seed's config on REF addresses) parses to exactly REF_RULES."""
    from cases.corpus import REF_RULES, ruleset

    from snatgw.config.parse import parse_text

    assert parse_text(REF_CONFIG).rules == ruleset(REF_RULES)
