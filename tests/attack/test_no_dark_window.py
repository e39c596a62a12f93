"""No dark window (issue 10, promise 4) on the real datapath, both backends: a ping stream
(100/s) and a TCP echo loop run from an inside host while the gateway is restarted (SIGTERM,
kill -9), upgraded from an earlier version and rolled back, reloaded with a broken file, asked
to start a second time, purged while running, switched to the other backend, or has its hooks
removed; the ISP side links are watched for
frames with inside sources.  Every case: zero private sources out.  Restarts (both backends)
and backend switches: the TCP connection survives with its mapping; bpf restart: zero lost
pings.  The losses of each case are printed (`-s`) and kept in
docs/operations.md.  ATTACK_SCALE (make attack: 10) lengthens the traffic around each event."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from snatgw.daemon.control import request
from snatgw.lab.clients import TcpSession
from snatgw.lab.demo import REF_RULES, config_text
from snatgw.lab.gateway import kill_gateway, no_gateway, purge_gateway, snatgw_argv, snatgw_json, write_ref_config
from snatgw.lab.netns import LabError, ns_socket, nsenter

from snatgw.lab import leakwatch
from snatgw.lab.topology import Lab

from .conftest import INSIDE_NETS, UPLINK_TAPS, scaled

pytestmark = [pytest.mark.root, pytest.mark.attack, pytest.mark.lab]
SERVER = "203.0.113.10"
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def lab():
    lab = Lab.up(f"pytest-dark-{os.getpid()}", prefix=f"sgd{os.getpid() % 0xFFFF:04x}")
    try:
        lab.servers = lab.start_servers()
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def conf(lab):
    return write_ref_config(lab, "dark.conf")


@pytest.fixture
def clean(lab, conf):
    yield from no_gateway(lab)


_purge = purge_gateway


def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


class Pinger:
    """ICMP echo every 10 ms from in40 (raw socket), counting replies by sequence number."""

    def __init__(self, lab, interval: float = 0.01):
        self.sock = ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.settimeout(0.05)
        self.ident = os.getpid() & 0xFFFF
        self.sent = 0
        self.got: set[int] = set()
        self.interval = interval
        self._stop = threading.Event()
        self.tx = threading.Thread(target=self._send, daemon=True)
        self.rx = threading.Thread(target=self._recv, daemon=True)
        self._done = threading.Event()
        self.rx.start()
        self.tx.start()

    def _send(self) -> None:
        while not self._stop.is_set() and self.sent < 6000:  # bounded: 60 s at most
            seq = self.sent & 0xFFFF
            hdr = struct.pack("!BBHHH", 8, 0, 0, self.ident, seq) + b"snatgw-dark-window"
            pkt = hdr[:2] + struct.pack("!H", _csum(hdr)) + hdr[4:]
            try:
                self.sock.sendto(pkt, (SERVER, 0))
            except OSError:
                pass
            self.sent += 1
            time.sleep(self.interval)

    def _recv(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(2048)
            except (socket.timeout, OSError):
                continue
            ihl = (data[0] & 0xF) * 4
            typ, _, _, ident, seq = struct.unpack_from("!BBHHH", data, ihl)
            if typ == 0 and ident == self.ident:
                self.got.add(seq)

    def stop(self) -> int:
        """Stop sending, wait for the last replies, return how many pings were lost."""
        self._stop.set()
        self.tx.join(5)
        # the last replies: all back; or the last ping's back (the path answers, so the replies of
        # the pings before it, sent 10 ms apart, are back too: 20 ms more for any reordering
        # and the rest were lost in the event); or 0.5 s, the last one lost too
        last, deadline = (self.sent - 1) & 0xFFFF, time.monotonic() + 0.5
        while len(self.got) < self.sent and time.monotonic() < deadline:
            if last in self.got:
                time.sleep(0.02)
                break
            time.sleep(0.01)
        self._done.set()
        self.rx.join(5)
        self.sock.close()
        return self.sent - len(self.got)


class TcpLoop:
    """One TCP connection from in40 exchanging a line every 20 ms; notes when it broke."""

    def __init__(self, lab):
        self.s = TcpSession(lab, "in40", SERVER, timeout=5.0)
        self.nat = {self.s.exchange()["peer"]}
        self.ok = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.ok < 3000:
            try:
                self.nat.add(self.s.exchange()["peer"])
                self.ok += 1
            except (OSError, ValueError) as e:
                self.error = repr(e)
                return
            time.sleep(0.02)

    def stop(self) -> dict:
        self._stop.set()
        self.t.join(10)
        self.s.close()
        return {"exchanges": self.ok, "broke": self.error, "nat_addresses": sorted(self.nat)}


class Traffic:
    def __init__(self, lab):
        self.watchers = [leakwatch.start(lab.ns(n), d, INSIDE_NETS) for n, d in UPLINK_TAPS]
        self.ping = Pinger(lab)
        self.tcp = TcpLoop(lab)
        time.sleep(scaled(5) / 10)  # traffic before the event: 0.5 s (make attack: 5 s)

    def stop(self, case: str) -> dict:
        time.sleep(scaled(5) / 10)  # and after it
        r = {"lost_pings": self.ping.stop(), "sent_pings": self.ping.sent, **self.tcp.stop()}
        leaks = []
        for w in self.watchers:
            leaks += w.stop()
        r["private_sources_out"] = len(leaks)
        r["leaks"] = [str(f) for f in leaks[:3]]
        RESULTS[case] = r
        print(f"\nno-dark-window {case}: {json.dumps(r)}")
        return r


_kill9 = kill_gateway


@pytest.mark.lab
@pytest.mark.parametrize("backend", ["bpf", "nft"])
@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_restart_under_traffic_leaks_nothing(clean, conf, backend, how):
    """SIGTERM (systemctl restart, an upgrade) or kill -9, then a new daemon: no private source
    on the uplinks; bpf loses no ping and the TCP connection carries on with its address."""
    lab = clean
    lab.start_gateway(conf, backend)
    tr = Traffic(lab)
    if how == "sigterm":
        assert lab.stop_gateway() == 0
    else:
        _kill9(lab)
    time.sleep(0.3)  # no daemon at all for a moment
    lab.start_gateway(conf, backend)
    r = tr.stop(f"{backend} {how}+restart")
    assert r["private_sources_out"] == 0
    assert r["broke"] is None and len(r["nat_addresses"]) == 1, r
    if backend == "bpf":
        assert r["lost_pings"] == 0, r


@pytest.mark.lab
@pytest.mark.parametrize("backend", ["bpf", "nft"])
def test_reload_with_a_broken_file_keeps_translating(clean, conf, backend):
    lab = clean
    lab.start_gateway(conf, backend)
    tr = Traffic(lab)
    with open(lab.gateway_config, "w") as f:
        f.write("snatgw {\n backend " + backend + "\n}\n")  # truncated: the rules are gone
    os.kill(lab.gateway_proc.pid, signal.SIGHUP)
    deadline, last = time.monotonic() + 5, None  # until the daemon has judged the broken file
    while time.monotonic() < deadline and lab.gateway_proc.poll() is None:
        last = request(lab.socket_path, {"op": "health"}, timeout=10).get("last_apply")
        if last and last["kind"] == "reload":
            break
        time.sleep(0.05)
    assert lab.gateway_proc.poll() is None
    assert last and last["kind"] == "reload" and not last["ok"], last
    st = json.loads(subprocess.run(snatgw_argv("stats", "--socket", lab.socket_path, "--json"),
                                   capture_output=True, text=True, timeout=30).stdout)
    r = tr.stop(f"{backend} reload with a broken file")
    assert r["private_sources_out"] == 0 and r["lost_pings"] == 0 and r["broke"] is None
    assert len(st["rules"]) == 3
    with open(lab.gateway_config, "w") as f:
        f.write(config_text(REF_RULES))


@pytest.mark.lab
@pytest.mark.parametrize("backend", ["bpf", "nft"])
def test_a_second_daemon_and_a_purge_are_refused_while_one_runs(clean, conf, backend):
    """A second `snatgw run` (other socket, other pin dir, other backend) exits 4 naming the
    first; `snatgw purge` exits 4 too; neither costs a packet."""
    lab = clean
    lab.start_gateway(conf, backend)
    tr = Traffic(lab)
    other = "nft" if backend == "bpf" else "bpf"
    second = subprocess.run(nsenter(lab.ns("gw"), *snatgw_argv(
        "run", lab.gateway_config, "--backend", other, "--inside", "lan40", "--inside", "lan50",
        "--outside", "eth1", "--outside", "eth2", "--pin-dir", lab.pin_dir + "-2",
        "--socket", lab.socket_path + "-2")), capture_output=True, text=True, timeout=60)
    purge = _purge(lab)
    r = tr.stop(f"{backend} second daemon + purge attempt")
    assert second.returncode == 4 and "owns the datapath of this network namespace" in second.stderr
    assert f"pid {lab.gateway_proc.pid}" in second.stderr and "ready" not in second.stdout
    assert purge.returncode == 4 and "owns the datapath" in purge.stderr
    assert lab.gateway_proc.poll() is None
    assert r["private_sources_out"] == 0 and r["lost_pings"] == 0 and r["broke"] is None
    assert not os.path.exists(lab.pin_dir + "-2")


@pytest.mark.lab
@pytest.mark.parametrize("backend", ["bpf", "nft"])
def test_vanished_hooks_are_restored_within_a_tick(clean, conf, backend):
    """`tc filter del` / `tc qdisc del` (bpf) or `nft delete table` (nft) under a running daemon:
    restored within a tick, logged and counted."""
    lab = clean
    lab.start_gateway(conf, backend, extra=("--gc-interval", "0.2"))
    gap = Traffic(lab)  # through the moment the hooks are gone until they are back
    if backend == "bpf":
        lab.run("gw", "tc", "filter", "del", "dev", "lan40", "ingress", "pref", str(0x534E))
        lab.run("gw", "tc", "qdisc", "del", "dev", "eth1", "clsact")
    else:
        lab.run("gw", "nft", "delete", "table", "ip", "snatgw")
    deadline = time.monotonic() + 5
    st = {}
    while time.monotonic() < deadline:
        st = request(lab.socket_path, {"op": "status"})
        if st.get("hooks_restored"):
            break
        time.sleep(0.1)
    assert st.get("hooks_restored", 0) >= 1
    # `snatgw stats` answers over the restored hooks (it ran in every round of the poll above,
    # its answer unread, a process start each)
    cli = json.loads(subprocess.run(snatgw_argv("stats", "--socket", lab.socket_path, "--json"),
                                    capture_output=True, text=True, timeout=30).stdout or "{}")
    assert len(cli.get("rules", [])) == 3, cli
    r = gap.stop(f"{backend} hooks removed, until restored")
    assert r["private_sources_out"] == 0, r
    with open(os.path.join(lab.workdir, "gateway.log")) as f:
        assert "event=hooks_restored" in f.read()
    if backend == "bpf":
        out = lab.run("gw", "tc", "filter", "show", "dev", "lan40", "ingress").stdout
        assert "snat_inside" in out or "bpf" in out
        assert "bpf" in lab.run("gw", "tc", "filter", "show", "dev", "eth1", "egress").stdout
    else:
        assert lab.run("gw", "nft", "list", "table", "ip", "snatgw", check=False).returncode == 0
    # the leak guard's own table (datapath/bpf/guard.py), which both backends keep, comes back too
    assert lab.run("gw", "nft", "delete", "table", "ip", "snatgw_guard", check=False).returncode == 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and lab.run("gw", "nft", "list", "table", "ip", "snatgw_guard",
                                                  check=False).returncode != 0:  # fmt: skip
        time.sleep(0.1)
    assert "fib saddr . oif type != local" in lab.run("gw", "nft", "list", "table", "ip", "snatgw_guard").stdout
    tr = Traffic(lab)
    r = tr.stop(f"{backend} after hooks restored")
    assert r["private_sources_out"] == 0 and r["broke"] is None


@pytest.mark.lab
@pytest.mark.parametrize("first,second", [("bpf", "nft"), ("nft", "bpf")])
def test_backend_switch_under_traffic_leaks_nothing(clean, conf, first, second):
    """SIGTERM one backend, start the other: no private source out, and the established TCP
    connection carries on with its SNAT address and port: the new backend takes the old one's
    sessions over (bpf -> nft: conntrack entries with the same NAT; nft -> bpf: session pairs
    written before the programs are attached).  Ping losses are measured and reported."""
    lab = clean
    lab.start_gateway(conf, first)
    tr = Traffic(lab)
    assert lab.stop_gateway() == 0
    lab.start_gateway(conf, second)
    time.sleep(1.0)
    r = tr.stop(f"switch {first}->{second}")
    assert r["private_sources_out"] == 0, r
    assert r["broke"] is None and len(r["nat_addresses"]) == 1, r
    with open(os.path.join(lab.workdir, "gateway.log")) as f:
        log = f.read()
    assert re.search(rf"carried [1-9]\d* of \d+ sessions over from the {first} datapath", log), log[-2000:]




#: the earlier versions an upgrade starts from: the last landed versions of snatgw (update when
#: one lands).  Their daemon runs from `git archive` of this repository's history.
UPGRADE_FROM = ("6496daa", "0324051")


def _old_tree(tmp_path_factory, ref: str) -> str:
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path_factory.mktemp(f"snatgw-{ref}")
    r = subprocess.run(f"git -C '{repo}' archive {ref} src | tar -x -C '{out}'", shell=True,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    if r.returncode or not (out / "src" / "snatgw" / "cli" / "main.py").exists():
        pytest.fail(f"the upgrade test runs snatgw {ref} from this repository's history, which this "
                    f"checkout lacks (a shallow clone or an export?): {r.stderr.strip()}")
    return str(out / "src")


def _start_version(lab, conf: str, backend: str, src: str | None) -> None:
    """`snatgw run` of the tree at ``src`` (None: this one), checked to be the one running."""
    if src is None:
        lab.start_gateway(conf, backend)
    else:
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = src  # ahead of the venv's own snatgw for the daemon only
        try:
            lab.start_gateway(conf, backend)
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
    with open(f"/proc/{lab.gateway_proc.pid}/environ", "rb") as f:
        env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
    want = src if src is not None else os.environ.get("PYTHONPATH", "")
    assert env.get(b"PYTHONPATH", b"").decode() == want, (env.get(b"PYTHONPATH"), want)


@pytest.mark.lab
@pytest.mark.parametrize("backend,ref", [("bpf", UPGRADE_FROM[0]), ("bpf", UPGRADE_FROM[1]),
                                         ("nft", UPGRADE_FROM[0])])  # fmt: skip
def test_upgrade_and_rollback_under_traffic_keep_the_connection(clean, conf, backend, ref, tmp_path_factory):
    """An earlier landed version's daemon runs the lab; SIGTERM; this version's daemon starts
    on what it left (bpf: its pinned maps; nft: its table and conntrack); SIGTERM again and the
    earlier version starts on this one's (a rollback).  Throughout: no private source on the
    uplinks, the TCP connection carries on with its SNAT address, and bpf loses no ping."""
    lab = clean
    old = _old_tree(tmp_path_factory, ref)
    _start_version(lab, conf, backend, old)
    tr = Traffic(lab)
    assert lab.stop_gateway() == 0
    _start_version(lab, conf, backend, None)
    time.sleep(0.3)
    assert lab.stop_gateway() == 0
    _start_version(lab, conf, backend, old)  # the rollback
    r = tr.stop(f"{backend} upgrade from {ref} and back")
    assert r["private_sources_out"] == 0, r
    assert r["broke"] is None and len(r["nat_addresses"]) == 1, r
    if backend == "bpf":
        assert r["lost_pings"] == 0, r


def _sized(lab, conf: str, max_sessions: int) -> str:
    """``conf`` with ``max_sessions`` set, as a file of its own in the lab's work dir."""
    with open(conf) as f:
        text = f.read().replace("snatgw {\n", f"snatgw {{\n    max_sessions {max_sessions}\n", 1)
    path = os.path.join(lab.workdir, f"dark-{max_sessions}.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.mark.lab
def test_a_restart_with_another_max_sessions_carries_the_sessions_over(clean, conf):
    """bpf: restarts raising max_sessions (1024 -> 4096) and lowering it with the sessions fitting
    (4096 -> 2048) under traffic: the table is carried over each time (`status` says from what
    to what, the log has event=table_resized), the TCP connection carries on with its SNAT
    address, no ping is lost, no private source goes out, and `conns` and `stats` agree on the
    sessions.  Lowering it below the live sessions (max_sessions 1: room for 2 entries) is
    refused, saying why, and the running datapath goes on translating."""
    lab = clean
    lab.start_gateway(_sized(lab, conf, 1024), "bpf")
    tr = Traffic(lab)
    for before, after in ((1024, 4096), (4096, 2048)):
        assert lab.stop_gateway() == 0
        lab.start_gateway(_sized(lab, conf, after), "bpf")
        st = request(lab.socket_path, {"op": "status"})
        resized = st.get("table_resized") or st.get("datapath", {}).get("table_resized")
        assert resized and (resized["from"], resized["to"]) == (before, after), st
        assert resized["maps"]["snat_ct"]["first"] >= 4, resized  # the ping's and the connection's pairs
    assert lab.stop_gateway() == 0
    with pytest.raises(LabError, match="before 'ready'"):  # max_sessions 1: the running table does not fit
        lab.start_gateway(_sized(lab, conf, 1), "bpf", timeout=20)
    with open(os.path.join(lab.workdir, "gateway.log")) as f:
        log = f.read()
    assert re.search(r"max_sessions 1 makes room for 2 only\. Nothing was changed \(the running datapath goes "
                     r"on translating with its table of 2048 sessions\)", log), log[-3000:]
    time.sleep(scaled(5) / 10)  # no daemon: the datapath of 2048 goes on
    lab.start_gateway(_sized(lab, conf, 2048), "bpf")  # adopted as it is
    conns = (snatgw_json(lab, "conns") or {}).get("sessions", [])
    stats = json.loads(subprocess.run(snatgw_argv("stats", "--socket", lab.socket_path, "--json"),
                                      capture_output=True, text=True, timeout=30).stdout)
    r = tr.stop("bpf max_sessions 1024 -> 4096 -> 2048, then 1 refused")
    assert r["private_sources_out"] == 0, r
    assert r["broke"] is None and len(r["nat_addresses"]) == 1, r
    assert r["lost_pings"] == 0, r
    resizes = [line for line in log.splitlines() if "event=table_resized" in line]
    print("\n".join(resizes))
    assert len(resizes) == 2 and "sessions_from=1024" in resizes[0] and "sessions_to=2048" in resizes[1], resizes
    protos = sorted(s["proto"] for s in conns)
    assert "tcp" in protos and "icmp" in protos, conns
    assert stats["sessions"] == len(conns), (stats["sessions"], conns)
    assert stats["pressure"]["table"]["max_sessions"] == 2048
