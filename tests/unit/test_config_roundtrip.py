"""render_config then parse_text gives back the same RuleSet (priority order and fields) and the
same Settings, for generated configs (hypothesis)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from snatgw.config.parse import RULE_KEYWORDS, SETTINGS_KEYWORDS, parse_text, render_config
from snatgw.config.schema import TIMEOUT_NAMES, GatewayConfig, Settings
from snatgw.layout import PORT_TRIES_MAX, Algo
from snatgw.rules import Pool, Rule, RuleSet

RESERVED = set(RULE_KEYWORDS) | set(SETTINGS_KEYWORDS)

#: the names of r"[a-z][a-z0-9_.-]{0,14}", built from text strategies (generating them with
#: st.from_regex took most of the round-trip test's time)
LOWER = "abcdefghijklmnopqrstuvwxyz"
ifname = st.builds(str.__add__, st.sampled_from(LOWER), st.text(LOWER + "0123456789_.-", max_size=14)).filter(
    lambda s: s not in RESERVED)
addr = st.integers(0, 2**32 - 1).map(IPv4Address)


@st.composite
def nets(draw):
    plen = draw(st.integers(0, 32))
    a = draw(st.integers(0, 2**32 - 1))
    return IPv4Network((a >> (32 - plen) << (32 - plen) if plen else 0, plen))


@st.composite
def pools(draw):
    a = draw(st.integers(0, 2**32 - 1))
    b = draw(st.integers(a, min(a + 1000, 2**32 - 1)))
    return Pool(IPv4Address(a), IPv4Address(b))


rules = st.builds(
    Rule,
    src=nets(),
    pool=pools(),
    dst=nets(),
    gw=st.none() | addr.filter(lambda a: int(a) != 0),  # 0.0.0.0 is how a config says "unset"
    oif=st.none() | ifname,
    new_gw=st.none() | addr.filter(lambda a: int(a) != 0),
    algo=st.sampled_from(list(Algo)),
    on_exhausted=st.sampled_from([None, "spill", "drop"]),
    max_sessions_per_host=st.none() | st.integers(0, 2**32 - 1),
)


@st.composite
def rulesets(draw):
    defined = draw(st.lists(rules, max_size=8, unique_by=lambda r: r.identity))
    return RuleSet(defined)


#: r"(/[A-Za-z0-9_.-]{1,12}){1,4}"
path = st.lists(st.text(LOWER + LOWER.upper() + "0123456789_.-", min_size=1, max_size=12), min_size=1,
                max_size=4).map(lambda parts: "".join("/" + p for p in parts))


@st.composite
def settings_values(draw):
    lo = draw(st.integers(1, 65535))
    hi = draw(st.integers(lo, 65535))
    inside = tuple(draw(st.lists(ifname, max_size=3, unique=True)))
    s = Settings(
        inside=inside,
        outside=tuple(draw(st.lists(ifname.filter(lambda n: n not in inside), max_size=3, unique=True))),
        port_min=lo,
        port_max=hi,
        port_tries=draw(st.integers(1, PORT_TRIES_MAX)),
        on_exhausted=draw(st.sampled_from([None, "spill", "drop"])),
        max_sessions_per_host=draw(st.integers(0, 2**32 - 1)),
        refuse_icmp=draw(st.booleans()),
        max_sessions=draw(st.integers(1, 2**31)),
        unmatched_drop=draw(st.booleans()),
        inbound_routed=draw(st.booleans()),
        backend=draw(st.sampled_from(["bpf", "nft"])),
        gc_interval=draw(st.floats(0.001, 3600) | st.integers(1, 3600).map(float)),
        control_socket=draw(path),
        pin_dir=draw(path),
        rps_cpus=draw(st.sampled_from(["off", "all", "0"])),  # (CPU 0 is online on any machine)
    )
    changed = draw(st.dictionaries(st.sampled_from(sorted(TIMEOUT_NAMES)), st.integers(1, 2**31)))
    return s.with_timeouts(**changed) if changed else s


@settings(max_examples=200, deadline=None)
@given(rulesets(), settings_values(), st.booleans())
def test_render_then_parse_gives_same_rules_and_settings(rs, s, full):
    """Rendering a config and parsing the text again yields an equal RuleSet and Settings."""
    text = render_config(GatewayConfig(rules=rs, settings=s), full_settings=full)
    back = parse_text(text, "r.conf", [])
    assert back.rules == rs
    assert [r.identity for r in back.rules.defined] == [r.identity for r in rs.defined]
    assert back.settings == s


def test_render_of_default_settings_has_no_settings_block():
    """A config with default settings renders as the SNAT service alone."""
    text = render_config(GatewayConfig(rules=RuleSet()))
    assert "snatgw" not in text and text.startswith("virtual_server fwmark 1 {")
