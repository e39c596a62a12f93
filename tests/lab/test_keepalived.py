"""snatgw beside a real keepalived in the lab: one keepalived.conf holds a vrrp_instance that owns
the inside gateway address 198.18.40.254 on <P>-gw's lan40 and the SNAT rules; keepalived runs
VRRP-only in <P>-gw, `snatgw run` reads the same file, in40 routes via the VIP.  Per backend;
one not built yet xfails (strict=False) as in test_lab_e2e.py.  The per-backend file is the
example's with VRRPv3 adverts every 0.1 s (FAST: MASTER ~0.4 s after the start, not ~3.5 s);
the stop test runs examples/keepalived.conf itself, as shipped (advert_int 1)."""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest

from snatgw.config.parse import RULE_KEYWORDS, SETTINGS_KEYWORDS, parse_file
from snatgw.lab import clients
from snatgw.lab.demo import REF_RULES, ruleset
from snatgw.lab.gateway import gateway_available, snatgw_argv, start_kernel_masquerade
from snatgw.lab.keepalived import (VIP, VRRP_IF, Keepalived, combined_config, config_test, gw_addresses,
                                   keepalived_pids, pool_addresses, vip_present, vrrp_text)
from snatgw.lab.netns import LabError, run
from snatgw.lab.topology import Lab
from snatgw.rules import select_addr

pytestmark = [pytest.mark.root, pytest.mark.lab]

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "keepalived.conf")
SERVER = "203.0.113.10"
SOURCES = ("198.18.40.10", "198.18.40.11", "198.18.40.12")
EXACT = {"bpf": True, "nft": False}  # nft: the kernel's nf_nat picks within the pool
_seq = itertools.count()
#: the per-backend labs' VRRP timing (docs/operations.md, "Beside keepalived"): only the time to
#: MASTER differs from the example's; the example itself runs in the stop test
FAST = {"advert_int": "0.1"}


def new_lab() -> Lab:
    """A lab named like conftest's (so a dead run's is swept), prefix sgk<pid-hex><n>."""
    n = next(_seq)
    return Lab.up(f"pytest-{os.getpid()}-ka{n}", prefix=f"sgk{os.getpid() % 0xFFFF:04x}{n}")


@dataclass
class Setup:
    lab: object
    backend: str
    conf: str
    keepalived: Keepalived
    servers: object = None
    error: Exception | None = None
    available: bool = True
    why: str = ""


def _write_conf(lab) -> str:
    conf = os.path.join(lab.workdir, "keepalived.conf")
    with open(conf, "w") as f:
        f.write(combined_config(**FAST))
    return conf


def _via_vip(lab) -> None:
    """in40's hosts use the VRRP address as their gateway (this test only; the lab's is .1)."""
    lab.run("in40", "ip", "route", "replace", "default", "via", VIP)


@pytest.fixture(scope="module", params=["bpf", "nft"])
def ka(request):
    """A lab per backend: servers, the combined file, `snatgw run` on it (started first, as on a
    BACKUP gateway: no pool address is local yet), then keepalived, which becomes MASTER and
    brings the VIP and the pool addresses."""
    backend = request.param
    lab = new_lab()
    k = None
    try:
        s = Setup(lab, backend, _write_conf(lab), None)
        s.servers = lab.start_servers()
        _via_vip(lab)
        s.available, s.why = gateway_available(backend)
        if not s.available:
            s.error = LabError(f"snatgw run --backend {backend}: {s.why}")
        else:
            try:
                lab.start_gateway(s.conf, backend)
            except LabError as e:
                s.error = e
                missing = re.search(r"ModuleNotFoundError: No module named '(snatgw\.[\w.]+)'", str(e))
                if missing:
                    s.available, s.why = False, f"not built yet: {missing[1]}"
        s.keepalived = k = Keepalived(lab, s.conf).start()
        k.wait_master()
        yield s
    finally:
        try:
            if k is not None:
                k.stop()
        finally:
            lab.down()
        assert not keepalived_pids(lab)


@pytest.fixture
def gw(request, ka):
    if not ka.available:
        request.node.add_marker(pytest.mark.xfail(reason=f"snatgw run --backend {ka.backend}: {ka.why}",
                                                  strict=False))
    if ka.error is not None:
        raise ka.error
    return ka


def _rule(s, src):
    r = ruleset(REF_RULES).match(IPv4Address(src), IPv4Address(SERVER), s.lab.route(SERVER, src=src))
    assert r is not None
    return r


def test_keepalived_becomes_master_and_puts_the_vip_and_pool_on_the_gateway_without_ipvs(ka):
    """keepalived --vrrp takes MASTER, the VIP sits on lan40 and the pool addresses on their
    uplinks, and only the parent and its VRRP child run (no checker child: no IPVS asked for)."""
    assert vip_present(ka.lab)
    assert set(pool_addresses()) <= gw_addresses(ka.lab)
    log = open(ka.keepalived.log).read()
    assert "(inside40) Entering MASTER STATE" in log
    assert "IPVS" not in log
    assert len(keepalived_pids(ka.lab)) == 2
    assert set(os.listdir(ka.lab.workdir)) >= {"keepalived.pid", "keepalived-vrrp.pid"}
    route = ka.lab.run("in40", "ip", "route", "get", SERVER).stdout
    assert f"via {VIP} dev eth0" in route


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_inside_host_reaches_the_server_through_the_vip_with_the_rules_snat_address(gw, proto):
    """From each in40 address, via 198.18.40.254, the server sees rule 2's address (bpf: exactly
    select_addr's; nft: one of its pool) arriving over ISP 1."""
    echo = clients.tcp_echo if proto == "tcp" else clients.udp_echo
    for src in SOURCES:
        reply = echo(gw.lab, "in40", SERVER, src=src)
        rule = _rule(gw, src)
        seen, sport = reply["peer"].split(":")
        assert reply["link"] == "isp1"
        if EXACT[gw.backend]:
            assert seen == str(select_addr(rule.pool, rule.algo, IPv4Address(src), IPv4Address(SERVER), 0))
        else:
            assert IPv4Address(seen) in rule.pool
    neigh = gw.lab.run("in40", "ip", "neigh", "show", VIP).stdout
    lladdr = json.loads(gw.lab.ip("gw", "-j", "link", "show", VRRP_IF).stdout)[0]["address"]
    assert lladdr in neigh  # in40 resolved the VIP to the gateway's lan40


def test_snatgw_check_accepts_the_keepalived_file_and_skips_its_vrrp_blocks(ka):
    """`snatgw check` on the file keepalived runs: valid, 3 rules, vrrp_instance skipped with a warning."""
    cp = run(snatgw_argv("check", ka.conf), check=False)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out
    assert "valid, 3 rules" in out
    assert "skipped keepalived block 'vrrp_instance inside40'" in out
    assert "skipped keepalived block 'global_defs'" in out


def test_snatgw_run_on_the_keepalived_file_loads_the_lab_rules(gw):
    """The daemon started on the combined file runs the chosen backend with the lab's 3 rules."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        c.connect(gw.lab.socket_path)
        c.sendall(b'{"op": "status"}\n')
        status = json.loads(c.makefile().readline())
    assert status["ok"], status
    assert (status["backend"], status["rules"]) == (gw.backend, 3)


def test_keepalived_config_test_objects_only_to_snatgws_own_keywords(ka):
    """`keepalived -t --vrrp` on the combined file (exit 5 in keepalived 2.2) complains only about
    snatgw's words (the snatgw block, snat_rule) and drops fwmark 1 for having no real servers;
    the VRRP part alone passes (the example's and the FAST one this module runs)."""
    cp = config_test(ka.lab, ka.conf)
    assert cp.returncode != 0
    ours = set(SETTINGS_KEYWORDS) | set(RULE_KEYWORDS) | {"snatgw", "snat_rule", "}"}
    for line in cp.stderr.splitlines():
        m = re.search(r"Unknown keyword '([^']*)'", line)
        assert (m and m[1] in ours) or line.endswith(("Unexpected '{' - ignoring",
                                                      "Virtual server FWM 1 has no real servers - ignoring")), line
    for vrrp in ({}, FAST):
        vrrp_only = os.path.join(ka.lab.workdir, "vrrp-only.conf")
        with open(vrrp_only, "w") as f:
            f.write(vrrp_text(**vrrp))
        cp = config_test(ka.lab, vrrp_only)
        assert (cp.returncode, cp.stderr) == (0, ""), vrrp


def test_example_keepalived_conf_holds_the_lab_rules_and_the_same_vrrp_instance(ka):
    """examples/keepalived.conf parses to the lab's rules and settings, as the file the tests run;
    its VRRP part is vrrp_text()'s (the FAST file differs only in its advert timing)."""
    example, tested = parse_file(EXAMPLE, warnings=[]), parse_file(ka.conf, warnings=[])
    assert list(example.rules.defined) == list(tested.rules.defined) == list(ruleset(REF_RULES).defined)
    assert (example.settings.inside, example.settings.outside) == (tested.settings.inside, tested.settings.outside)
    text = open(EXAMPLE).read()
    for line in ["interface lan40", f"{VIP}/24 dev lan40", "virtual_router_id 40", "state MASTER",
                 "virtual_ipaddress_excluded"] + [f"{a}/32 dev {i}" for a, i in pool_addresses()]:
        assert line in text
    words = lambda t: [x.split("#")[0].split() for x in t.splitlines() if x.split("#")[0].strip()]  # noqa: E731
    vrrp_part = text[text.index("\nglobal_defs"):text.index("\nsnatgw {")]
    assert sorted(map(tuple, words(vrrp_part))) == sorted(map(tuple, words(vrrp_text())))
    fast = words(vrrp_text(**FAST))
    assert [w for w in fast if w[0] not in ("advert_int", "version")] == [w for w in words(vrrp_text())
                                                                           if w[0] != "advert_int"]
    cp = run(snatgw_argv("check", EXAMPLE), check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_stopping_keepalived_releases_the_vip_and_leaves_no_process():
    """keepalived on examples/keepalived.conf as shipped becomes MASTER; stop by pid file: the VIP
    and the pool addresses leave the gateway, in40 can no longer resolve its gateway, no
    keepalived process and no pid file remain."""
    lab = new_lab()
    k = None
    try:
        conf = os.path.abspath(EXAMPLE)
        start_kernel_masquerade(lab)  # a plain NAT, so a failure below is the VIP's alone
        srv = lab.start_servers()
        _via_vip(lab)
        k = Keepalived(lab, conf).start()
        k.wait_master()
        assert clients.udp_echo(lab, "in40", SERVER)["link"] == "isp1"
        killed = k.stop()
        assert killed == []  # SIGTERM was enough
        assert keepalived_pids(lab) == []
        assert not vip_present(lab)
        assert not set(pool_addresses()) & gw_addresses(lab)
        assert not any(f.startswith("keepalived") and f.endswith(".pid") for f in os.listdir(lab.workdir))
        lab.run("in40", "ip", "neigh", "flush", VIP)
        with pytest.raises(OSError):
            clients.udp_echo(lab, "in40", SERVER, timeout=1.0)
        srv.stop()
    finally:
        try:
            if k is not None:
                k.stop()
        finally:
            lab.down()
    assert keepalived_pids(lab) == []
