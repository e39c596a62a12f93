"""The lab itself (no snatgw): building and removing it leaves nothing, leftovers are found by
prefix, and with a plain kernel masquerade in the gateway the inside hosts reach the ISP routers
and the servers answer (so e2e failures are snatgw's, not the lab's)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from snatgw.lab import clients
from snatgw.lab.gateway import start_kernel_masquerade, stop_kernel_snat
from snatgw.lab.netns import LabError, list_netns
from snatgw.lab.topology import NODES, Lab, leftover_prefixes, state_path

pytestmark = [pytest.mark.root, pytest.mark.lab]


def test_lab_up_then_down_leaves_no_namespace_state_or_pins(make_lab):
    """down() removes every namespace, the state file, work dir and pin dir of the lab."""
    lab = make_lab()
    try:
        assert all(lab.ns(n) in list_netns() for n in NODES)
        assert os.path.exists(state_path(lab.name))
        os.makedirs(lab.pin_dir, exist_ok=True)  # as a gateway would
    finally:
        lab.down()
    assert not [n for n in list_netns() if n.startswith(lab.prefix + "-")]
    assert not os.path.exists(state_path(lab.name))
    assert not os.path.exists(lab.pin_dir)
    assert not os.path.exists(lab.workdir)


def test_lab_without_state_file_is_found_and_removed_by_prefix(make_lab):
    """A lab whose state file is gone shows up as a leftover prefix and goes with down()."""
    lab = make_lab()
    try:
        os.unlink(state_path(lab.name))
        assert lab.prefix in leftover_prefixes()
        Lab(name="leftover", prefix=lab.prefix).down()
        assert lab.prefix not in leftover_prefixes()
    finally:
        lab.down()


def test_a_lab_that_is_up_is_no_leftover(make_lab, capsys):
    """A lab with its state file (this process's or another's) is not listed as a leftover, and
    `lab down --name` of another name does not offer it for removal as one: it names it among
    the labs that are up (it said nothing of them unless some leftover existed)."""
    from snatgw.cli.main import main

    lab = make_lab()
    assert lab.prefix not in leftover_prefixes()
    assert main(["lab", "down", "--name", f"nosuch{os.getpid()}"]) == 2  # a bad argument, not a failed lab
    capsys.readouterr()
    assert main(["lab", "status", "--name", f"nosuch{os.getpid()}"]) == 2
    assert f"no lab named 'nosuch{os.getpid()}' is up" in capsys.readouterr().err
    assert main(["lab", "down", "--name", f"nosuch{os.getpid()}"]) == 2
    err = capsys.readouterr().err
    assert lab.prefix not in err
    assert f"no lab named 'nosuch{os.getpid()}'; labs up: " in err and lab.name in err.split("labs up: ")[1]


def test_lab_down_of_an_unknown_name_tells_a_stale_lab_from_one_that_is_up(capsys):
    """A lab whose state file stayed while its namespaces went (a reboot) is not listed among
    the labs that are up (as `lab status` does not call it up), but as stale state to clear."""
    from snatgw.cli.main import main

    stale = Lab(name=f"stale{os.getpid()}", prefix=f"sgz{os.getpid() % 0xffff:04x}")
    stale.save()
    try:
        assert main(["lab", "down", "--name", f"nosuch{os.getpid()}"]) == 2
        err = capsys.readouterr().err
        up = err.split("labs up: ")[1].split(";")[0] if "labs up: " in err else ""
        assert stale.name not in up
        assert f"state of labs whose namespaces are gone: {stale.name}" in err
    finally:
        os.unlink(state_path(stale.name))


def test_lab_up_refuses_a_name_that_is_up(make_lab):
    """A second `up` of the same name is refused with the prefix of the running one."""
    lab = make_lab()
    try:
        with pytest.raises(LabError, match=lab.prefix):
            Lab.up(lab.name)
    finally:
        lab.down()


def test_inside_hosts_reach_the_isp_routers_through_a_kernel_masquerade(lab):
    """With masquerade in gw, each inside host pings both ISP routers; without it nothing returns."""
    assert lab.run("in40", "ping", "-c1", "-W1", "198.19.2.1", check=False).returncode != 0
    start_kernel_masquerade(lab)
    try:
        for node in ("in40", "in50"):
            for router in ("198.19.2.1", "198.19.3.1"):
                lab.run(node, "ping", "-c1", "-W2", router)
    finally:
        stop_kernel_snat(lab)


def test_servers_report_the_address_and_link_they_saw(lab, servers):
    """TCP, UDP and ping reach both servers; each reports the masqueraded source and its ISP link."""
    start_kernel_masquerade(lab)
    try:
        for dst, uplink, link in (("203.0.113.10", "198.19.2.2", "isp1"), ("198.51.100.10", "198.19.3.2", "isp2")):
            t = clients.tcp_echo(lab, "in40", dst, src="198.18.40.11")
            assert (t["peer"].split(":")[0], t["link"], t["local"]) == (uplink, link, f"{dst}:7007")
            u = clients.udp_echo(lab, "in50", dst)
            assert (u["peer"].split(":")[0], u["link"]) == (uplink, link)
            p = clients.ping(lab, "in40", dst, servers=servers)
            assert p["reply"] and p["seen"]["peer"] == uplink and p["seen"]["link"] == link
    finally:
        stop_kernel_snat(lab)


def test_icmp_errors_reach_the_inside_socket_through_a_kernel_masquerade(lab, servers):
    """The lab's error paths work: port unreachable from the server, TTL exceeded from isp1."""
    start_kernel_masquerade(lab)
    try:
        e = clients.udp_error(lab, "in40", "203.0.113.10")
        assert (e["errno"], e["offender"], e["type"], e["code"]) == ("ECONNREFUSED", "203.0.113.10", 3, 3)
        e = clients.udp_error(lab, "in40", "203.0.113.10", port=clients.ECHO_PORT, ttl=2)
        assert (e["errno"], e["offender"], e["type"]) == ("EHOSTUNREACH", "198.19.2.1", 11)
    finally:
        stop_kernel_snat(lab)


def test_snat_addresses_go_on_the_outside_link_of_their_subnet(lab):
    """add_snat_addresses puts each pool address as /32 on eth1 or eth2 by subnet."""
    from snatgw.lab.demo import REF_RULES, ruleset

    done = dict(lab.add_snat_addresses(ruleset(REF_RULES)))
    assert done["198.19.2.71"] == "eth1" and done["198.19.3.73"] == "eth2"
    out = lab.ip("gw", "-br", "addr", "show", "dev", "eth2").stdout
    assert "198.19.3.72/32" in out


def _snatgw(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snatgw.cli.main", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_lab_up_status_exec_down():
    """`snatgw lab up` keeps the lab after the command; status, exec and down work from its state."""
    name, prefix = f"pytest-cli-{os.getpid()}", f"sgc{os.getpid() % 0xFFFF:04x}"
    try:
        up = _snatgw("lab", "up", "--name", name, "--prefix", prefix)
        assert up.returncode == 0, up.stderr
        st = _snatgw("lab", "status", "--name", name, "--json")
        nodes = json.loads(st.stdout)[0]["nodes"]
        assert nodes["gw"]["addresses"]["eth2"] == ["198.19.3.2/24"]
        ex = _snatgw("lab", "exec", "--name", name, "in50", "--", "ip", "-br", "addr", "show", "dev", "eth0")
        assert "198.18.50.11/24" in ex.stdout
        # up again: the lab is up, nothing done, exit 0 (it was exit 3, as a build that failed)
        for extra in ((), ("--prefix", prefix)):
            again = _snatgw("lab", "up", "--name", name, *extra)
            assert again.returncode == 0, again.stderr
            assert again.stdout.startswith(f"lab {name} is up already: prefix {prefix}, namespaces "
                                           f"{prefix}-in40")
        # conflicts, exit 2, each named: this name with another prefix, this prefix for another name
        other = f"sgd{os.getpid() % 0xFFFF:04x}"
        clash = _snatgw("lab", "up", "--name", name, "--prefix", other)
        assert clash.returncode == 2 and f"is up already with prefix {prefix}, not {other}" in clash.stderr
        taken = _snatgw("lab", "up", "--name", name + "-2", "--prefix", prefix)
        assert taken.returncode == 2 and f"exist already: lab '{name}' has it" in taken.stderr, taken.stderr
        assert not [n for n in list_netns() if n.startswith(other + "-")]
        assert json.loads(_snatgw("lab", "status", "--name", name, "--json").stdout)[0]["prefix"] == prefix
        down = _snatgw("lab", "down", "--name", name)
        assert down.returncode == 0, down.stderr
        assert not [n for n in list_netns() if n.startswith(prefix + "-")]
    finally:
        Lab(name=name, prefix=prefix).down()
        Lab(name=name, prefix=f"sgd{os.getpid() % 0xFFFF:04x}").down()  # had a refusal built it after all


def test_gateway_that_fails_to_start_is_reported_with_its_log_and_leaves_nothing(lab, tmp_path):
    """start_gateway on a broken config raises LabError quoting the daemon's error; no gateway runs."""
    conf = tmp_path / "bad.conf"
    conf.write_text("virtual_server fwmark 1 {\n  snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.73-198.19.2.71 }\n}\n")
    with pytest.raises(LabError, match="max ip smaller than min ip"):
        lab.start_gateway(str(conf), "nft", timeout=20)
    assert lab.gateway_proc is None and lab.daemon_pids() == []
    assert lab.status()["gateway"]["running"] is False


class _Signalled(BaseException):
    """Stands for a signal handler's exception (the demo's Ctrl-C)."""


def test_a_signal_right_after_the_namespace_switch_leaves_the_caller_at_home(lab, monkeypatch):
    """A socket in a lab namespace was made by switching the calling thread there and back:
    an exception from a signal handler between the two (the main thread's, Ctrl-C in the demo)
    left the thread in the lab's namespace, and the lab's down() SIGKILLs every process it finds
    there: an interrupted demo killed itself (exit -9).  The switch is made on a thread of its
    own now, which switches back even then; the caller never leaves, and down() never kills us."""
    from snatgw.lab import netns

    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    real, switches = netns._setns, []

    def switch_then_signal(fd):
        real(fd)
        switches.append(fd)
        if len(switches) == 1:
            raise _Signalled()

    monkeypatch.setattr(netns, "_setns", switch_then_signal)
    try:
        with pytest.raises(_Signalled):
            netns.ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM)
        assert os.stat("/proc/thread-self/ns/net").st_ino == os.fstat(home).st_ino
        assert os.getpid() not in lab._pids_in_lab()
    finally:
        real(home)  # (before the fix this thread was left in <P>-in40)
        os.close(home)


def test_an_unreadable_lab_state_file_stops_neither_the_hint_nor_status_and_down_all_clears_it(
        capsys, monkeypatch, tmp_path):  # fmt: skip
    """A state file emptied or edited by hand (here: not JSON) used to turn `lab down` of an
    unknown name into exit 3 (`unreadable lab state`), and `lab status` and `lab down --all`
    (the cleanup the hint itself recommends) failed on it too.  Now it is named in the hint and
    status, left out, and `lab down --all` removes it.  In a state directory of its own, with no
    leftover prefixes: `lab down --all` must not take down the labs of anything else running on
    this machine."""
    from snatgw.cli.commands import lab as lab_cmd
    from snatgw.cli.main import main
    from snatgw.lab import topology

    monkeypatch.setattr(topology, "STATE_DIR", str(tmp_path))
    monkeypatch.setattr(topology, "leftover_prefixes", lambda: set())
    monkeypatch.setattr(lab_cmd, "leftover_prefixes", lambda: set())
    bad = state_path(f"bad{os.getpid()}")
    assert bad.startswith(str(tmp_path))
    with open(bad, "w") as f:
        f.write("{not json")
    assert main(["lab", "down", "--name", f"nosuch{os.getpid()}"]) == 2
    assert f"unreadable lab state: {bad}" in capsys.readouterr().err
    assert main(["lab", "status"]) == 0
    assert f"{bad}: unreadable lab state, left out" in capsys.readouterr().err
    assert main(["lab", "down", "--all"]) == 0
    assert f"{bad} (unreadable state)" in capsys.readouterr().out
    assert not os.path.exists(bad)
