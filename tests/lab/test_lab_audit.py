"""The audit log end to end (issue 13), both backends: `snatgw run` with `audit_log FILE` in the
lab, real UDP and TCP exchanges from inside hosts through the gateway.  Each flow's create
record names the inside host and port, the SNAT address and port the server saw, and the
remote; `snatgw flush` ends them (an end record with the same addresses); the file rotates at
audit_log_max_size keeping audit_log_keep old files; status reports the counters.  bpf and nft
must agree on every field checked here (nft's end records say `destroyed`, bpf's `flush`)."""

from __future__ import annotations

import json
import os
import time

import pytest

from snatgw.lab import clients
from snatgw.lab.demo import REF_RULES, SETTINGS, config_text
from snatgw.lab.gateway import snatgw_json

from snatgw.lab.topology import Lab

pytestmark = [pytest.mark.root, pytest.mark.lab]

MAX_SIZE, KEEP = 4096, 2
SERVER = "203.0.113.10"


def new_lab() -> Lab:
    """A lab of this module's own (prefix sga<pid>: the conftest's sweep removes it if we die)."""
    return Lab.up(f"pytest-{os.getpid()}-audit{time.monotonic_ns() % 10**6}",
                  prefix=f"sga{os.getpid() % 0xFFFF:04x}{time.monotonic_ns() % 100}")


@pytest.fixture(scope="module", params=["bpf", "nft"])
def agw(request):
    backend = request.param
    lab = new_lab()
    try:
        lab.start_servers()
        path = os.path.join(lab.workdir, "audit.jsonl")
        conf = os.path.join(lab.workdir, f"{backend}-audit.conf")
        settings = SETTINGS.replace("}", f"    audit_log {path}\n    audit_log_max_size {MAX_SIZE}\n"
                                         f"    audit_log_keep {KEEP}\n}}", 1)
        with open(conf, "w") as f:
            f.write(config_text(REF_RULES).replace(SETTINGS, settings))
        lab.add_snat_addresses(conf)
        lab.start_gateway(conf, backend)
        yield lab, backend, path
    finally:
        lab.down()


def records(path: str) -> list[dict]:
    """Every record of the log and its rotated files, oldest first."""
    out = []
    for p in [f"{path}.{i}" for i in range(KEEP + 3, 0, -1)] + [path]:
        try:
            with open(p) as f:
                out += [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:  # not there, or rotated away between two files: wait_for reads again
            continue
    return out


def wait_for(path: str, pred, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = [r for r in records(path) if pred(r)]
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def host_port(s: str) -> tuple[str, int]:
    a, p = s.rsplit(":", 1)
    return a, int(p)


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_an_exchange_makes_a_create_record_with_the_addresses_the_server_saw(agw, proto):
    lab, backend, path = agw
    src = "198.18.40.10" if proto == "udp" else "198.18.40.11"
    seen = (clients.udp_echo if proto == "udp" else clients.tcp_echo)(lab, "in40", SERVER, src=src)
    inside, nat = host_port(seen["inside"]), host_port(seen["peer"])
    [rec] = wait_for(path, lambda r: r["event"] == "create" and r["proto"] == proto
                     and (r["inside_addr"], r["inside_port"]) == inside)
    assert (rec["nat_addr"], rec["nat_port"]) == nat
    assert (rec["remote_addr"], rec["remote_port"]) == (SERVER, clients.ECHO_PORT)
    assert rec["backend"] == backend and rec["rule_id"] != 0
    assert abs(time.time() - time.mktime(time.strptime(rec["time"][:19], "%Y-%m-%dT%H:%M:%S"))
               + time.timezone) < 30  # UTC, now
    # flushed: an end record for the same mapping
    got = snatgw_json(lab, "flush", "--inside", src)
    assert got and got["flushed"] >= 1
    [end] = wait_for(path, lambda r: r["event"] == "end" and (r["inside_addr"], r["inside_port"]) == inside)
    assert (end["nat_addr"], end["nat_port"], end["remote_addr"], end["proto"]) == (*nat, SERVER, proto)
    assert end["why"] == ("flush" if backend == "bpf" else "destroyed")
    assert end["rule_id"] == rec["rule_id"]


def test_the_log_rotates_at_its_size_and_keeps_its_files(agw):
    lab, _backend, path = agw
    for i in range(60):  # ~300 bytes a record: several files' worth
        clients.udp_echo(lab, "in40", SERVER, src="198.18.40.12", sport=20000 + i)
    wait_for(path, lambda r: r["inside_port"] == 20059)
    assert os.path.exists(f"{path}.1") and os.path.exists(f"{path}.{KEEP}")
    assert not os.path.exists(f"{path}.{KEEP + 1}")
    for p in (path, f"{path}.1", f"{path}.{KEEP}"):
        assert 0 < os.path.getsize(p) <= MAX_SIZE
    ports = [r["inside_port"] for r in records(path) if r["inside_addr"] == "198.18.40.12" and r["event"] == "create"]
    assert ports[-1] == 20059 and ports == sorted(ports)  # in order, the newest kept
    st = snatgw_json(lab, "status")["audit"]
    assert st["enabled"] and st["rotations"] >= KEEP and st["records"] >= 60
    assert st["lost_write"] == 0 and (st["lost_datapath"] or 0) == 0


def test_sessions_made_while_no_daemon_runs(agw):
    """bpf: the datapath keeps translating without a daemon and keeps writing records into the
    pinned ring; the next daemon writes them (the docs promise it).  nft: conntrack events
    without a listener are gone; the next daemon starts without them and logs new ones."""
    lab, backend, path = agw
    conf = lab.gateway_config
    lab.stop_gateway()
    try:
        seen = clients.udp_echo(lab, "in40", SERVER, src="198.18.40.12", sport=30001)
    finally:
        lab.start_gateway(conf, backend)
    inside = host_port(seen["inside"])
    got = wait_for(path, lambda r: r["event"] == "create" and (r["inside_addr"], r["inside_port"]) == inside,
                   timeout=3.0 if backend == "bpf" else 1.0)  # fmt: skip
    if backend == "bpf":
        assert [(r["nat_addr"], r["nat_port"]) for r in got] == [host_port(seen["peer"])]
    else:
        assert got == []
    seen = clients.udp_echo(lab, "in40", SERVER, src="198.18.40.12", sport=30002)
    assert wait_for(path, lambda r: r["event"] == "create" and r["inside_port"] == 30002)
