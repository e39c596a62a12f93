"""Switching backends in one lab leaves no stale datapath: a bpf start removes a stopped nft
daemon's table and policy routing, an nft start removes a killed bpf daemon's TC filters and
pins, `snatgw purge` removes both (refusing while a daemon runs), nft refuses a missing device."""

from __future__ import annotations

import json
import os

import pytest

from snatgw.lab.gateway import kill_gateway, no_gateway, purge_gateway, write_ref_config
from snatgw.lab.netns import LabError

OUR_PRIO = 0x534E


@pytest.fixture(scope="module")
def conf(lab):
    return write_ref_config(lab, "switch.conf")


@pytest.fixture
def clean(lab, conf):
    """Each test starts and ends with no daemon and nothing of either backend in <P>-gw."""
    yield from no_gateway(lab)


purge = purge_gateway
kill9 = kill_gateway


def nft_table(lab) -> bool:
    return lab.run("gw", "nft", "list", "table", "ip", "snatgw", check=False).returncode == 0


def our_ip_rules(lab) -> list[dict]:
    out = json.loads(lab.ip("gw", "-j", "rule", "show").stdout or "[]")
    return [r for r in out if str(r.get("protocol")) == "201" and 31000 <= int(r.get("priority", 0)) < 32000]


def our_tc_filters(lab) -> list[str]:
    """'dev point' of every TC filter with our priority on any device of <P>-gw."""
    found = []
    for link in json.loads(lab.ip("gw", "-j", "link", "show").stdout):
        for point in ("ingress", "egress"):
            p = lab.run("gw", "tc", "-j", "filter", "show", "dev", link["ifname"], point, check=False)
            if p.returncode == 0 and any(f.get("pref") == OUR_PRIO for f in json.loads(p.stdout or "[]")):
                found.append(f"{link['ifname']} {point}")
    return found


def our_nft_routes(lab) -> list[dict]:
    out = json.loads(lab.ip("gw", "-j", "route", "show", "table", "all", "proto", "201").stdout or "[]")
    return [r for r in out if str(r.get("table", "")).isdigit() and 31000 <= int(r["table"]) < 32000]


def gateway_log(lab) -> str:
    with open(os.path.join(lab.workdir, "gateway.log")) as f:
        return f.read()


@pytest.mark.lab
def test_nft_to_bpf_switch_leaves_no_nft_table_or_routing(clean, conf):
    """A bpf daemon started after a SIGTERMed nft daemon removes table ip snatgw and our ip rules."""
    lab = clean
    lab.start_gateway(conf, "nft")
    lab.stop_gateway()
    assert nft_table(lab) and our_ip_rules(lab), "nft SIGTERM is expected to leave its state"
    lab.start_gateway(conf, "bpf")
    assert not nft_table(lab)
    assert our_ip_rules(lab) == []
    assert "removed the nft datapath's leftovers" in gateway_log(lab)
    assert our_tc_filters(lab), "the bpf datapath is attached"


@pytest.mark.lab
def test_killed_bpf_to_nft_switch_leaves_no_tc_filter_or_pins(clean, conf):
    """An nft daemon started after a kill -9 of a bpf daemon detaches its filters and unpins."""
    lab = clean
    lab.start_gateway(conf, "bpf")
    kill9(lab)
    assert our_tc_filters(lab) and os.path.isdir(lab.pin_dir), "kill -9 is expected to leave filters"
    lab.start_gateway(conf, "nft")
    assert our_tc_filters(lab) == []
    assert not os.path.exists(lab.pin_dir)
    assert "removed the bpf datapath's leftovers" in gateway_log(lab)
    assert nft_table(lab)


@pytest.mark.lab
def test_purge_removes_both_backends_state(clean, conf):
    """purge removes a killed bpf daemon's filters and pins and an nft rule set with routing,
    and says so for each (the nft routes went unreported: the rules' removal flushed their
    tables before the routes were listed)."""
    from snatgw.config.parse import parse_file
    from snatgw.datapath.nft.backend import NftBackend

    lab = clean
    lab.start_gateway(conf, "bpf")
    kill9(lab)
    c = parse_file(conf)
    NftBackend(c.settings, netns=lab.ns("gw")).apply(c)  # apply: no cleanup of the bpf state
    assert our_tc_filters(lab) and nft_table(lab) and our_ip_rules(lab)
    tables = sorted({int(r["table"]) for r in our_nft_routes(lab)})
    assert tables, "the config's new_gw rule is expected to have a route table"
    p = purge(lab)
    assert p.returncode == 0, p.stderr
    assert "removed nft table ip snatgw" in p.stdout and "snatgw_guard" in p.stdout
    assert f"removed routes proto 201 in tables {','.join(map(str, tables))}" in p.stdout.splitlines()
    assert our_tc_filters(lab) == [] and not nft_table(lab) and our_ip_rules(lab) == []
    assert our_nft_routes(lab) == []
    assert lab.run("gw", "nft", "list", "table", "ip", "snatgw_guard", check=False).returncode != 0
    assert not os.path.exists(lab.pin_dir)
    again = purge(lab)
    assert again.returncode == 0 and "nothing of snatgw's found" in again.stdout


@pytest.mark.lab
def test_purge_refuses_while_a_daemon_answers(clean, conf):
    """purge exits 4 and removes nothing while a daemon owns the namespace."""
    lab = clean
    lab.start_gateway(conf, "nft")
    p = purge(lab)
    assert p.returncode == 4
    assert "owns the datapath of this network namespace" in p.stderr
    assert nft_table(lab)


@pytest.mark.lab
def test_nft_refuses_a_missing_outside_device(clean, conf):
    """snatgw run --backend nft with an absent outside device exits 3 and installs nothing."""
    lab = clean
    with pytest.raises(LabError) as e:
        lab.start_gateway(conf, "nft", extra=("--outside", "nope0"))
    assert "exited with 3" in str(e.value)
    assert "interface 'nope0' does not exist" in str(e.value)
    assert not nft_table(lab) and our_ip_rules(lab) == []


@pytest.mark.lab
def test_nft_apply_refuses_a_missing_device_and_keeps_the_rule_set(clean, conf):
    """A reload naming a missing inside device raises BackendError; the installed table stays."""
    from dataclasses import replace

    from snatgw.config.parse import parse_file
    from snatgw.datapath.nft.backend import NftBackend
    from snatgw.errors import BackendError

    lab = clean
    c = parse_file(conf)
    c = replace(c, settings=replace(c.settings, pin_dir=lab.pin_dir))  # never the host's default
    b = NftBackend(c.settings, netns=lab.ns("gw"))
    b.start(c)
    before = lab.run("gw", "nft", "list", "table", "ip", "snatgw").stdout
    bad = replace(c, settings=replace(c.settings, inside=("lan40", "gone9")))
    with pytest.raises(BackendError, match="interface 'gone9' does not exist"):
        b.apply(bad)
    assert lab.run("gw", "nft", "list", "table", "ip", "snatgw").stdout == before
    b.stop()
    assert not nft_table(lab)



@pytest.mark.lab
def test_a_typo_in_inside_is_named_with_its_config_line_and_attaches_nothing(clean, conf):
    """`inside lan40 lan5O` (a letter O): `snatgw run` exits 3 naming file:line: inside, as
    every other config error does (--inside: the flag); nothing is attached, and no empty pin
    directory is left."""
    from snatgw.lab.gateway import snatgw_argv

    lab = clean
    bad = os.path.join(lab.workdir, "typo.conf")
    with open(conf) as f, open(bad, "w") as g:
        g.write(f.read().replace("inside lan40 lan50", "inside lan40 lan5O"))
    assert not os.path.exists(lab.pin_dir)
    p = lab.run("gw", *snatgw_argv("run", bad, "--backend", "bpf", "--pin-dir", lab.pin_dir,
                                   "--socket", lab.socket_path), check=False)
    assert p.returncode == 3
    assert f"{bad}:2: inside: interface 'lan5O' does not exist in this network namespace" in p.stderr
    assert not os.path.exists(lab.pin_dir)  # the empty pin directory it made goes too
    with pytest.raises(LabError) as e:
        lab.start_gateway(conf, "nft", extra=("--inside", "lan5O"))
    assert "exited with 3" in str(e.value) and "--inside: interface 'lan5O' does not exist" in str(e.value)
    assert our_tc_filters(lab) == [] and not nft_table(lab)
