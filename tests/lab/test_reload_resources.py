"""Many reloads of a real backend leave its resources where they were (issue 10's bounded
control plane, on the datapaths themselves: the fake backend's tests cannot see a file
descriptor of a BPF program or map, a netlink socket or an nft handle kept per apply).

Each reload here changes the rules (the REF config and its failover edit, alternated), so
every one of them applies: bpf writes the rule slots, the from-nets trie and what the refusal
markers were judged under; nft replaces its table."""

from __future__ import annotations

import os
import time

import pytest

from snatgw.config.parse import parse_text
from snatgw.daemon.control import request
from snatgw.lab import clients

pytestmark = [pytest.mark.root, pytest.mark.lab]

RELOADS = 60
MIB = 1024  # VmRSS is in KiB


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_sixty_reloads_keep_the_daemons_fds_and_memory(gw):
    """After 60 reloads (after ten and two expiry sweeps to warm up) a bpf and an nft daemon hold the file
    descriptors they held (each apply's BPF objects and netlink sockets closed again) and
    their RSS grew by less than 16 MiB; a flow is translated by the config the last reload
    applied, and the daemon applied every reload."""
    gw.check()
    lab, pid = gw.lab, gw.lab.gateway_pid
    texts = [open(gw.conf).read(), open(gw.failover_conf).read()]

    def reload(i: int) -> dict:
        tmp = lab.gateway_config + ".tmp"
        with open(tmp, "w") as f:
            f.write(texts[i % 2])
        os.replace(tmp, lab.gateway_config)
        return request(lab.socket_path, {"op": "reload"}, timeout=30)

    try:
        for i in range(10):
            assert reload(i)["ok"]
        # bpf loads its sweep program (an object of its own: ~32 fds of maps, programs, BTF) at
        # the first expiry sweep, once: two sweeps before counting
        time.sleep(2 * parse_text(texts[0], "ref.conf").settings.gc_interval + 0.5)
        fds0, rss0 = _fds(pid), _rss(pid)
        answers = [reload(i) for i in range(RELOADS)]  # the last (i = 59) applies the failover config
        time.sleep(0.5)
        fds1, rss1 = _fds(pid), _rss(pid)
        st = request(lab.socket_path, {"op": "status"}, timeout=10)
        failover = clients.tcp_echo(lab, "in40", "203.0.113.10", src="198.18.40.10")
    finally:
        gw.restore()
    assert all(a["ok"] for a in answers), [a for a in answers if not a["ok"]][:2]
    assert st["ok"] and (st.get("last_reload") or {}).get("ok"), st.get("last_reload")
    assert failover["link"] == "isp2" and failover["peer"].startswith("198.19.3."), failover
    assert fds1 <= fds0 + 2, f"{gw.backend}: {fds0} fds before {RELOADS} reloads, {fds1} after"
    assert rss1 - rss0 < 16 * MIB, f"{gw.backend}: RSS {rss0 // MIB} MiB before, {rss1 // MIB} MiB after"
