"""`rps_cpus` live (daemon/rps.py): a gateway with its namespace's own sysfs writes the mask to
every rx queue of its devices, and the datapath's per-CPU counters show the spread: a sender
pinned to CPU 0 has (nearly) every packet handled on CPU 0 without receive packet steering, on
both CPUs with it; a device recreated under its name gets the mask again from the hook check;
a reload to off and a stop put back the masks the devices had (a distinct non-zero one, so
that a restore is not mistaken for a reset to 0).  A gateway started by
nsenter --net alone, whose /sys is the host's, writes nothing and says so in status.  The
host's own devices' masks are read before and after: never written."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import pytest

from snatgw.lab.demo import REF_RULES, config_text, ruleset
from snatgw.lab.gateway import gateway_available, snatgw_argv, snatgw_json
from snatgw.lab.netns import nsenter, run

DEVICES = ("lan40", "lan50", "eth1", "eth2")
SINK = ("203.0.113.10", 9999)  # a socket that never reads: no reply, no ICMP error
FLOWS, PER_FLOW = 300, 4
#: UDP from FLOWS source ports of one inside host, PER_FLOW datagrams each (run pinned to CPU 0)
SENDER = f"""
import socket
for port in range(41000, 41000 + {FLOWS}):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("198.18.40.10", port))
    for _ in range({PER_FLOW}):
        s.sendto(b"x" * 32, {SINK!r})
    s.close()
"""
SINK_PROG = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind({SINK!r})
print("ready", flush=True)
time.sleep(120)
"""


def host_masks() -> dict[str, str]:
    """The rps_cpus of every rx queue of the host's devices (this process's /sys)."""
    out = {}
    for p in sorted(glob.glob("/sys/class/net/*/queues/rx-*/rps_cpus")):
        with open(p) as f:
            out[p] = f.read().strip()
    return out


def gw_masks(lab) -> dict[str, str]:
    """rx-0's mask of each gateway device, read through the gateway namespace's own sysfs."""
    cmd = "; ".join(f"cat /sys/class/net/{d}/queues/rx-0/rps_cpus" for d in DEVICES)
    got = run(["ip", "netns", "exec", lab.ns("gw"), "sh", "-c", cmd]).stdout.split()
    return dict(zip(DEVICES, got))


def set_gw_masks(lab, mask: str) -> None:
    cmd = "; ".join(f"echo {mask} > /sys/class/net/{d}/queues/rx-0/rps_cpus" for d in DEVICES)
    run(["ip", "netns", "exec", lab.ns("gw"), "sh", "-c", cmd])


def write_conf(lab, rps_cpus: str) -> str:
    path = os.path.join(lab.workdir, f"rps-{rps_cpus}.conf")
    with open(path, "w") as f:
        f.write(config_text(REF_RULES).replace("    unmatched pass\n", f"    unmatched pass\n    rps_cpus {rps_cpus}\n"))
    return path


def per_cpu(lab) -> list[int]:
    st = snatgw_json(lab, "stats")
    assert st is not None and "per_cpu" in st, st
    return st["per_cpu"]


def spread(lab) -> tuple[int, int]:
    """Packets the datapath handled on CPU 0 and CPU 1 while the sender (pinned to CPU 0) ran."""
    before = per_cpu(lab)
    run(nsenter(lab.ns("in40"), "taskset", "-c", "0", sys.executable, "-c", SENDER))
    after = per_cpu(lab)
    d = [a - b for a, b in zip(after, before)]
    assert sum(d) >= FLOWS * PER_FLOW, d  # every datagram was judged by the datapath
    return d[0], sum(d[1:])


def status(lab) -> dict:
    cp = run(snatgw_argv("status", "--socket", lab.socket_path, "--json"), check=False)
    return json.loads(cp.stdout)


@pytest.fixture
def sink(lab):
    p = lab.popen("net", sys.executable, "-c", SINK_PROG, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    try:
        yield
    finally:
        p.kill()
        p.wait()


@pytest.fixture
def bpf_gateway(lab):
    ok, why = gateway_available("bpf")
    assert ok, why
    lab.add_snat_addresses(ruleset(REF_RULES))
    try:
        yield lab
    finally:
        lab.stop_gateway()
        set_gw_masks(lab, "0")
        for path in rps_state_files(lab):  # (a test failing between a kill and the next stop)
            os.unlink(path)


def test_rps_cpus_spreads_a_one_queue_device_over_both_cpus_and_puts_the_masks_back(bpf_gateway, sink):
    lab = bpf_gateway
    host = host_masks()
    set_gw_masks(lab, "0")
    lab.start_gateway(write_conf(lab, "off"), "bpf", own_sysfs=True)
    # off: the devices are left as they are, and a sender on CPU 0 is handled on CPU 0
    assert gw_masks(lab) == dict.fromkeys(DEVICES, "0")
    cpu0, others = spread(lab)
    assert others <= 0.1 * (cpu0 + others), (cpu0, others)
    # a distinct non-zero mask before the setting: what is put back is that, not 0
    set_gw_masks(lab, "1")
    lab.reload_gateway(write_conf(lab, "all"))
    assert gw_masks(lab) == dict.fromkeys(DEVICES, "3")
    cpu0, others = spread(lab)
    assert min(cpu0, others) >= 0.25 * (cpu0 + others), (cpu0, others)
    st = status(lab)["rps"]
    assert st["setting"] == "all" and st["mask"] == "3" and st["refused"] is None
    assert st["devices"]["lan40"] == {"queues": {"rx-0": "3"}, "previous": {"rx-0": "1"}, "error": None}
    cp = run(snatgw_argv("stats", "--socket", lab.socket_path))
    assert "packets per CPU: cpu0 " in cp.stdout and ", cpu1 " in cp.stdout
    # lan50 made again under its name (as a VLAN or PPP device is): the hook check writes it again
    lab.recreate_link("lan50")
    deadline = time.monotonic() + 5
    while gw_masks(lab)["lan50"] != "3" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gw_masks(lab)["lan50"] == "3"
    with open(os.path.join(lab.workdir, "gateway.log")) as f:
        assert "lan50: recreated (ifindex" in f.read()
    # a reload to off puts them back (the new lan50's own mask was the kernel's 0)
    before = {**dict.fromkeys(DEVICES, "1"), "lan50": "0"}
    lab.reload_gateway(write_conf(lab, "off"))
    assert gw_masks(lab) == before
    lab.reload_gateway(write_conf(lab, "all"))
    assert gw_masks(lab) == dict.fromkeys(DEVICES, "3")
    lab.stop_gateway()  # and so does a stop
    assert gw_masks(lab) == before
    assert host_masks() == host


def rps_state_files(lab) -> list[str]:
    """The gateway namespace's rps_cpus state files (next to its owner lock: named by the
    namespace's device and inode)."""
    st = os.stat(f"/run/netns/{lab.ns('gw')}")
    return glob.glob(f"/run/snatgw/owner/*-{st.st_dev:x}-{st.st_ino}.rps")


def test_a_daemon_killed_leaves_the_masks_before_to_the_next_one(bpf_gateway):
    """SIGKILL (the OOM killer, a crash) leaves the killed daemon's mask written; the next
    daemon reads the masks before from the state file and its stop puts back the very first
    ones (until 30 Nov 2026 it took the killed one's 3 for the devices' own and put that back:
    the operator's mask was lost for good).  The file is gone after the stop."""
    from snatgw.lab.gateway import kill_gateway

    lab = bpf_gateway
    set_gw_masks(lab, "1")
    conf = write_conf(lab, "all")
    lab.start_gateway(conf, "bpf", own_sysfs=True)
    assert gw_masks(lab) == dict.fromkeys(DEVICES, "3")
    assert len(rps_state_files(lab)) == 1
    kill_gateway(lab)
    assert gw_masks(lab) == dict.fromkeys(DEVICES, "3")
    lab.start_gateway(conf, "bpf", own_sysfs=True)
    assert status(lab)["rps"]["devices"]["eth2"]["previous"] == {"rx-0": "1"}
    lab.stop_gateway()
    assert gw_masks(lab) == dict.fromkeys(DEVICES, "1")
    assert rps_state_files(lab) == []


def test_purge_puts_back_the_masks_a_killed_daemon_left(bpf_gateway):
    """`snatgw purge` after SIGKILL: run with the host's /sys (nsenter --net alone) it writes
    nothing, says why and keeps the state file; with the namespace's own /sys (`ip netns exec`)
    every queue gets its first mask back and the file goes (until 30 Nov 2026 purge left the
    killed daemon's mask, and the file for the next daemon)."""
    from snatgw.lab.gateway import kill_gateway

    lab = bpf_gateway
    host = host_masks()
    set_gw_masks(lab, "1")
    lab.start_gateway(write_conf(lab, "all"), "bpf", own_sysfs=True)
    assert gw_masks(lab) == dict.fromkeys(DEVICES, "3")
    kill_gateway(lab)
    argv = snatgw_argv("purge", "--pin-dir", lab.pin_dir, "--socket", lab.socket_path)
    cp = run(nsenter(lab.ns("gw"), *argv), check=False)
    assert cp.returncode == 0, cp.stderr
    assert "are not put back" in cp.stderr and "another network namespace" in cp.stderr, cp.stderr
    assert gw_masks(lab) == dict.fromkeys(DEVICES, "3") and len(rps_state_files(lab)) == 1
    cp = run(["ip", "netns", "exec", lab.ns("gw"), *argv], check=False)
    assert cp.returncode == 0, cp.stderr
    assert gw_masks(lab) == dict.fromkeys(DEVICES, "1")
    assert "removed rps_cpus of eth1: put back rx-0 1" in cp.stdout, cp.stdout
    assert rps_state_files(lab) == []
    assert host_masks() == host


def test_rps_cpus_writes_nothing_when_sys_is_another_namespaces(bpf_gateway):
    """Started by nsenter --net alone, the daemon's /sys is the host's: nothing is written
    (neither the host's devices nor the gateway's), status says why and calls it a problem."""
    lab = bpf_gateway
    host = host_masks()
    set_gw_masks(lab, "1")
    lab.start_gateway(write_conf(lab, "all"), "bpf")
    r = status(lab)
    assert "shows the devices of another network namespace" in r["rps"]["refused"]
    assert any(p.startswith("rps_cpus all: not applied: ") for p in r["problems"]) and not r["healthy"]
    assert gw_masks(lab) == dict.fromkeys(DEVICES, "1")
    lab.stop_gateway()
    assert gw_masks(lab) == dict.fromkeys(DEVICES, "1")
    assert host_masks() == host


def test_rps_cpus_on_the_nft_backend_too(lab):
    """The setting is the daemon's, not a datapath's: the nft backend's gateway writes and puts
    back the masks the same way."""
    ok, why = gateway_available("nft")
    assert ok, why
    lab.add_snat_addresses(ruleset(REF_RULES))
    host = host_masks()
    set_gw_masks(lab, "2")
    try:
        lab.start_gateway(write_conf(lab, "0"), "nft", own_sysfs=True)
        assert gw_masks(lab) == dict.fromkeys(DEVICES, "1")
        assert status(lab)["rps"]["devices"]["eth1"] == {"queues": {"rx-0": "1"}, "previous": {"rx-0": "2"},
                                                         "error": None}
        lab.stop_gateway()
        assert gw_masks(lab) == dict.fromkeys(DEVICES, "2")
    finally:
        lab.stop_gateway()
        run(nsenter(lab.ns("gw"), *snatgw_argv("purge", "--pin-dir", lab.pin_dir, "--socket", lab.socket_path)),
            check=False)
        set_gw_masks(lab, "0")
    assert host_masks() == host
