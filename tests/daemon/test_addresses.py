"""`snat_addresses manage`: the daemon puts the pool addresses on their uplinks and takes back
the ones that leave every pool on reload (real `ip`, in a namespace made here)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from snatgw.config.parse import parse_text
from snatgw.daemon.addresses import plan
from snatgw.errors import SnatgwError

pytestmark = pytest.mark.root

CONF = textwrap.dedent("""\
    snatgw {{ inside lan40
             outside eth1 eth2
             snat_addresses manage
             control_socket {sock} }}
    virtual_server fwmark 1 {{
      snat_rule {{ from 198.18.40.0/24 oif eth2 snat_ip 198.19.3.71-198.19.3.72 }}
      snat_rule {{ from 198.18.0.0/16 snat_ip {pool} }}
    }}
""")


def _have():
    from ipaddress import IPv4Interface

    return {"eth1": [IPv4Interface("198.19.2.2/24")], "eth2": [IPv4Interface("198.19.3.2/24")]}


def test_plan_puts_each_address_on_the_uplink_whose_subnet_holds_it():
    """Without oif the connected subnet decides; with oif the rule's uplink does."""
    cfg = parse_text(CONF.format(sock="/x", pool="198.19.2.71-198.19.2.73"))
    want = {str(a): d for a, d in plan(cfg, _have()).items()}
    assert want == {"198.19.3.71": "eth2", "198.19.3.72": "eth2", "198.19.2.71": "eth1",
                    "198.19.2.72": "eth1", "198.19.2.73": "eth1"}


def test_a_failed_over_rules_backup_pool_goes_on_the_backup_uplink():
    """Link failover keeps the rule's oif (eth1) but gives it ISP 2's pool: those addresses are
    planned on eth2, whose subnet holds them (ISP 2's router ARPs for them there)."""
    from snatgw.config.links import failover

    text = CONF.format(sock="/x", pool="198.19.2.71").replace(
        "snat_rule {{ from 198.18.0.0/16".format(), "snat_rule { from 198.18.0.0/16 oif eth1") + (
        "link isp1 { gw 198.19.2.1 oif eth1 probe 203.0.113.10 backup_gw 198.19.3.1 backup_snat_ip 198.19.3.80 }\n")
    cfg = parse_text(text)
    moved = cfg.__class__(rules=failover(cfg.rules, cfg.links, {"isp1"}), settings=cfg.settings, links=cfg.links)
    want = {str(a): d for a, d in plan(moved, _have()).items()}
    assert want["198.19.3.80"] == "eth2"


def test_plan_refuses_an_address_no_uplink_can_own():
    """An address outside every uplink subnet, with two uplinks and no oif, is an error naming it."""
    cfg = parse_text(CONF.format(sock="/x", pool="192.0.2.9"), "gw.conf")
    with pytest.raises(SnatgwError, match=r"gw.conf:7.*192.0.2.9"):
        plan(cfg, _have())


def _ns_addrs(ns, dev):
    out = subprocess.run(["ip", "-n", ns, "-j", "-4", "addr", "show", "dev", dev],
                         capture_output=True, text=True, check=True).stdout
    return {f"{a['local']}/{a['prefixlen']}" for i in json.loads(out) for a in i["addr_info"]}


def _make_devices(ns: str) -> None:
    """The config's devices in ``ns``: eth1, eth2 and lan40 (veths) with their addresses, up."""
    for dev, addr in (("eth1", "198.19.2.2/24"), ("eth2", "198.19.3.2/24"), ("lan40", "198.18.40.1/24")):
        subprocess.run(["ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", dev + "p"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)


def test_daemon_adds_pool_addresses_and_removes_those_a_reload_drops(tmp_path):
    """Start adds every pool address as /32; a reload with a smaller pool removes the rest."""
    ns = f"sgad{os.getpid():x}"
    sock = tmp_path / "c.sock"
    conf = tmp_path / "gw.conf"
    conf.write_text(CONF.format(sock=sock, pool="198.19.2.71-198.19.2.73"))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    proc = None
    try:
        _make_devices(ns)
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "snatgw.cli.main",
                                 "run", str(conf), "--backend", "fake"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert "ready" in line, proc.stderr.read()
        assert {"198.19.2.71/32", "198.19.2.72/32", "198.19.2.73/32"} <= _ns_addrs(ns, "eth1")
        assert {"198.19.3.71/32", "198.19.3.72/32"} <= _ns_addrs(ns, "eth2")
        conf.write_text(CONF.format(sock=sock, pool="198.19.2.71"))
        subprocess.run(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "snatgw.cli.main",
                        "reload", "--socket", str(sock)], check=True, capture_output=True)
        deadline = time.monotonic() + 10
        while "198.19.2.73/32" in _ns_addrs(ns, "eth1") and time.monotonic() < deadline:
            time.sleep(0.1)
        have = _ns_addrs(ns, "eth1")
        assert "198.19.2.71/32" in have and "198.19.2.72/32" not in have and "198.19.2.73/32" not in have
        assert "198.19.2.2/24" in have  # the interface's own address is never touched
    finally:
        if proc and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_a_missing_uplink_with_manage_is_named_with_its_config_line(tmp_path):
    """`outside eth1 eth9` (eth9 no device here) with `snat_addresses manage`: the start exits 3
    and a reload is refused, both naming file:line: outside, as without manage (`ip`'s own
    'Device "eth9" does not exist.' named no file, line nor setting, and the start exited 2);
    the refused reload leaves the daemon and the pool addresses as they were."""
    ns = f"sgam{os.getpid():x}"
    sock = tmp_path / "c.sock"
    good, bad = tmp_path / "gw.conf", tmp_path / "bad.conf"
    text = CONF.format(sock=sock, pool="198.19.2.71")
    good.write_text(text)
    bad.write_text(text.replace("outside eth1 eth2", "outside eth1 eth9"))
    cli = ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "snatgw.cli.main"]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    proc = None
    try:
        _make_devices(ns)
        p = subprocess.run([*cli, "run", str(bad), "--backend", "fake"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 3, p.stderr
        assert f"{bad}:2: outside: interface 'eth9' does not exist in this network namespace" in p.stderr
        assert _ns_addrs(ns, "eth1") == {"198.19.2.2/24"}  # nothing added
        proc = subprocess.Popen([*cli, "run", str(good), "--backend", "fake"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert "ready" in line, proc.stderr.read()
        p = subprocess.run([*cli, "reload", str(bad), "--socket", str(sock)], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode != 0
        assert f"{bad}:2: outside: interface 'eth9' does not exist in this network namespace" in p.stderr
        assert "198.19.2.71/32" in _ns_addrs(ns, "eth1") and proc.poll() is None
        st = subprocess.run([*cli, "status", "--json", "--socket", str(sock)], capture_output=True, text=True)
        assert json.loads(st.stdout)["config"] == str(good)
    finally:
        if proc and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", ns], check=False)
