"""The attack tier's lab: one multi-ISP lab (snatgw.lab) per backend and module, REF rules,
echo servers, `snatgw run` in <P>-gw; leak watchers on both ISP routers' uplink ports
(snatgw.lab.leakwatch) and raw frame senders for hostile traffic from either side.
ATTACK_SCALE (default 1, `make attack`: 10) multiplies the fuzz sizes."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import time
from dataclasses import dataclass

import pytest

from snatgw.lab import leakwatch
from snatgw.lab.demo import REF_RULES, config_text
from snatgw.lab.gateway import snatgw_json
from snatgw.lab.netns import ns_socket
from snatgw.lab.topology import Lab

SCALE = float(os.environ.get("ATTACK_SCALE", "1"))
INSIDE_NETS = ("198.18.0.0/16",)  # every REF rule's `from` lies in it
UPLINK_TAPS = leakwatch.UPLINK_TAPS
_seq = itertools.count()


def scaled(n: int) -> int:
    return max(1, int(n * SCALE))


def write_config(lab: Lab, name: str, text: str) -> str:
    path = os.path.join(lab.workdir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


@dataclass
class AttackGw:
    lab: Lab
    backend: str
    conf: str
    other_config: bool = False  # reload() ran without a restore() after it

    def reasons(self) -> dict[str, int]:
        st = snatgw_json(self.lab, "stats", "--all")
        if st is None:
            try:
                with open(os.path.join(self.lab.workdir, "gateway.log")) as f:
                    tail = f.read()[-3000:]
            except OSError:
                tail = "(no log)"
            raise AssertionError(f"snatgw stats failed; gateway log:\n{tail}")
        return {k: int(v) for k, v in st.get("reasons", {}).items()}

    def reload(self, text: str) -> None:
        self.other_config = True
        self.lab.reload_gateway(write_config(self.lab, f"reload-{next(_seq)}.conf", text))

    def restore(self) -> None:
        self.lab.reload_gateway(self.conf)
        self.other_config = False

    @contextlib.contextmanager
    def watch(self, nets=INSIDE_NETS):
        """Leak watchers on both uplinks; yields a list that gets the offending frames."""
        w = leakwatch.uplinks(self.lab, nets)
        found: list = []
        try:
            yield found
        finally:
            found += w.stop()
            self.seen, self.dropped = w.seen, w.dropped


def mac_of(lab: Lab, node: str, dev: str) -> str:
    return json.loads(lab.ip(node, "-j", "link", "show", "dev", dev).stdout)[0]["address"]


class FrameSender:
    """Raw Ethernet frames from ``node``'s ``dev`` to its peer (the gateway side)."""

    def __init__(self, lab: Lab, node: str, dev: str, peer_node: str, peer_dev: str):
        self.src = bytes.fromhex(mac_of(lab, node, dev).replace(":", ""))
        self.dst = bytes.fromhex(mac_of(lab, peer_node, peer_dev).replace(":", ""))
        self.sock = ns_socket(lab.ns(node), socket.AF_PACKET, socket.SOCK_RAW)
        self.sock.bind((dev, 0))
        self.sent = 0

    def send(self, ipv4: bytes) -> None:
        try:
            self.sock.send(self.dst + self.src + b"\x08\x00" + ipv4)
            self.sent += 1
        except OSError:  # e.g. a frame longer than the MTU: not sent, not counted
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="package", params=["bpf", "nft"])
def agw_lab(request):
    """A lab per backend with `snatgw run` on the REF rules (unmatched pass), built once for the
    tier (a lab and a gateway took 3-8 s, twice per module); `agw` hands it to each module as
    a fresh one would be."""
    backend = request.param
    lab = Lab.up(f"pytest-attack-{os.getpid()}-{next(_seq)}", prefix=f"sgx{os.getpid() % 0xFFFF:04x}{next(_seq)}")
    try:
        lab.servers = lab.start_servers()
        from snatgw.lab.demo import ruleset

        lab.add_snat_addresses(ruleset(REF_RULES))
        conf = write_config(lab, "ref.conf", config_text(REF_RULES))
        lab.start_gateway(conf, backend)
        yield AttackGw(lab, backend, conf)
    finally:
        lab.down()


@pytest.fixture(scope="module")
def agw(agw_lab):
    """The backend's attack lab for this module as a new one starts: the gateway running the
    REF rules and no session left by an earlier module (counters only ever grow: tests read
    differences or lower bounds)."""
    from snatgw.daemon.control import request

    lab = agw_lab.lab
    if lab.gateway_proc is None or lab.gateway_proc.poll() is not None:  # an earlier module killed it
        lab.stop_gateway()
        lab.start_gateway(agw_lab.conf, agw_lab.backend)
    elif agw_lab.other_config:
        agw_lab.restore()
    assert request(lab.socket_path, {"op": "flush"}, timeout=20)["ok"]
    left = request(lab.socket_path, {"op": "sessions"}, timeout=20)
    assert left["ok"] and left["sessions"] == [], left
    return agw_lab


def settle(seconds: float = 0.3) -> None:
    time.sleep(seconds)
