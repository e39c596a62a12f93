"""A SIGTERM at any moment of `snatgw run`'s start (systemctl stop or a supervisor's restart
while it starts), from outside, in the lab's gateway namespace, on both backends: logged, exit
0, and what is left is what a normal stop leaves: nothing when the datapath was not started
yet, the datapath kept translating (hooks, pins, table) when it was; never the owner lock file
or the control socket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from snatgw.lab.gateway import no_gateway, purge_gateway, snatgw_argv, write_ref_config
from snatgw.lab.netns import nsenter

OUR_PRIO = 0x534E  # our TC filters' priority


@pytest.fixture(scope="module")
def conf(lab):
    return write_ref_config(lab, "signals.conf")


@pytest.fixture
def clean(lab, conf):
    yield from no_gateway(lab)


def _caught_sigterm(pid: int) -> bool:
    """The process catches SIGTERM (its handler is set: /proc SigCgt, bit 15 - 1)."""
    with open(f"/proc/{pid}/status") as f:
        return any(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1 for line in f if line.startswith("SigCgt:"))


def _lock_file(lab) -> str:
    """The owner lock file of <P>-gw (owner.lock_path, for that namespace)."""
    st = os.stat(f"/run/netns/{lab.ns('gw')}")
    return f"/run/snatgw/owner/snatgw_datapath-owner-{st.st_dev:x}-{st.st_ino}.lock"


def _ours(lab) -> dict:
    """What of ours is in <P>-gw: TC filters, nft tables, policy routing, pins, socket, lock."""
    filters = []
    for link in json.loads(lab.ip("gw", "-j", "link", "show").stdout):
        for point in ("ingress", "egress"):
            p = lab.run("gw", "tc", "-j", "filter", "show", "dev", link["ifname"], point, check=False)
            if p.returncode == 0 and any(f.get("pref") == OUR_PRIO for f in json.loads(p.stdout or "[]")):
                filters.append(f"{link['ifname']} {point}")
    tables = [t for t in lab.run("gw", "nft", "list", "tables").stdout.split() if t.startswith("snatgw")]
    rules = [r for r in json.loads(lab.ip("gw", "-j", "rule", "show").stdout or "[]") if str(r.get("protocol")) == "201"]
    return {"filters": filters, "tables": tables, "ip_rules": rules,
            "pins": os.path.isdir(lab.pin_dir) and bool(os.listdir(lab.pin_dir)),
            "socket": os.path.exists(lab.socket_path), "lock": os.path.exists(_lock_file(lab))}


def _signalled_start(lab, conf: str, backend: str, delay: float | None) -> tuple[int, str, str, float]:
    """`snatgw run` in <P>-gw, SIGTERM ``delay`` s after its handler is set (None: after
    `ready`); (exit code, stdout, stderr, when the handler was set, s after the exec)."""
    argv = snatgw_argv("run", conf, "--backend", backend, "--inside", "lan40", "--inside", "lan50",
                       "--outside", "eth1", "--outside", "eth2", "--pin-dir", lab.pin_dir, "--socket", lab.socket_path)
    p = subprocess.Popen(nsenter(lab.ns("gw"), *argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not _caught_sigterm(p.pid):
            assert p.poll() is None and time.monotonic() - t0 < 10, "snatgw run never caught SIGTERM"
            time.sleep(0.001)
        caught = time.monotonic() - t0
        ready = ""
        if delay is None:
            ready = p.stdout.readline()
            assert _ours(lab)["lock"]  # running: the lock file is where _lock_file looks
        else:
            time.sleep(delay)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
        return p.returncode, ready + out, err, caught
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("backend,delays", [("bpf", (0, 0.15, 0.5, None)), ("nft", (0, 0.15, None))])
def test_a_sigterm_at_any_moment_of_the_start_is_logged_and_leaves_what_a_stop_leaves(lab, conf, clean, backend,
                                                                                      delays):
    """The default action killed the daemon until its loop took the signals (~0.3 s in, before
    the datapath's start): exit 143, nothing logged.  Now the handler is set ~25 ms after the
    exec, before the daemon's imports: a SIGTERM right then stops it before the datapath
    (nothing left at all); later ones too, or, once the datapath's start began, after it ends,
    keeping it as a normal stop does (then purged for the next case)."""
    for delay in delays:
        code, out, err, caught = _signalled_start(lab, conf, backend, delay)
        what = f"{backend}, SIGTERM {delay} s after the catch ({caught * 1000:.0f} ms after the exec): {err[-600:]}"
        assert code == 0, what
        assert "Traceback" not in err, what
        left = _ours(lab)
        assert not left["lock"] and not left["socket"], (left, what)
        if delay is None:
            assert "ready" in out and "event=stopping reason=signal signal=SIGTERM\n" in err, what
        else:
            assert "ready" not in out and "event=stopping reason=signal signal=SIGTERM during=start" in err, what
        if 'event=stopped backend=%s datapath="not started"' % backend in err:
            assert "event=started" not in err, what
            assert left == {"filters": [], "tables": [], "ip_rules": [], "pins": False, "socket": False,
                            "lock": False}, what
        else:
            assert delay != 0, f"the first SIGTERM came after the datapath's start began: {what}"
            assert "event=started" in err and f"event=stopped backend={backend} keep_state=True" in err, what
            if backend == "bpf":  # kept translating: the hooks on every device, the maps pinned
                assert left["filters"] and left["pins"] and "snatgw_guard" in left["tables"], (left, what)
            else:  # the table and its policy routing
                assert "snatgw" in left["tables"], (left, what)
            assert purge_gateway(lab).returncode == 0
