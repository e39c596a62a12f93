"""Fixtures of the lab tests: a lab per module (unique prefix sgt<pid-hex><n>, always removed),
its echo servers, and a gateway per backend that xfails (not skips) while a backend's
`snatgw run` is not built yet."""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field

import pytest

from snatgw.lab.demo import FAILOVER_RULES, REF_RULES, config_text, ruleset
from snatgw.lab.gateway import gateway_available
from snatgw.lab.netns import LabError
from snatgw.lab.topology import Lab, list_labs

_seq = itertools.count()


def new_lab() -> Lab:
    n = next(_seq)
    return Lab.up(f"pytest-{os.getpid()}-{n}", prefix=f"sgt{os.getpid() % 0xFFFF:04x}{n}")


@pytest.fixture(scope="session", autouse=True)
def _sweep_labs_of_dead_test_runs():
    """Labs named pytest-<pid>-... whose pytest died (SIGKILL, power loss) are removed first."""
    for old in list_labs():
        m = re.match(r"pytest-(?:cli-|demo-|fallback-)?(\d+)", old.name)
        if m and int(m[1]) != os.getpid() and not os.path.exists(f"/proc/{m[1]}"):
            old.down()
    yield


@pytest.fixture
def make_lab():
    """Build labs for one test; every one is removed afterwards, pass or fail."""
    made: list[Lab] = []

    def make() -> Lab:
        made.append(new_lab())
        return made[-1]

    try:
        yield make
    finally:
        for lab in made:
            lab.down()


@pytest.fixture(scope="module")
def lab():
    lab = new_lab()
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def servers(lab):
    s = lab.start_servers()
    try:
        yield s
    finally:
        s.stop()


@dataclass
class Gateway:
    lab: Lab
    backend: str
    servers: object
    conf: str
    failover_conf: str
    rules: object = field(default_factory=lambda: ruleset(REF_RULES))
    failover_rules: object = field(default_factory=lambda: ruleset(FAILOVER_RULES))
    available: bool = False
    why: str = ""
    error: Exception | None = None

    def check(self) -> None:
        """Raise why the gateway is not running (the test then fails, or xfails if not built)."""
        if self.error is not None:
            raise self.error

    def restore(self) -> None:
        """Back to the REF config with a running gateway (after reload/restart tests)."""
        if self.lab.gateway_proc is None or self.lab.gateway_proc.poll() is not None:
            self.lab.stop_gateway()
            self.lab.start_gateway(self.conf, self.backend)
        self.lab.reload_gateway(self.conf)


@pytest.fixture(scope="module", params=["bpf", "nft"])
def gateway_module(request):
    """A lab of its own per backend (nothing one backend leaves can reach the other's tests),
    its servers, the SNAT addresses of both configs, and `snatgw run` on the REF config."""
    backend = request.param
    lab = new_lab()
    try:
        servers = lab.start_servers()
        conf = os.path.join(lab.workdir, f"{backend}.conf")
        fconf = os.path.join(lab.workdir, f"{backend}-failover.conf")
        with open(conf, "w") as f:
            f.write(config_text(REF_RULES))
        with open(fconf, "w") as f:
            f.write(config_text(FAILOVER_RULES))
        gw = Gateway(lab, backend, servers, conf, fconf)
        lab.add_snat_addresses(gw.rules)
        lab.add_snat_addresses(gw.failover_rules)
        gw.available, gw.why = gateway_available(backend)
        if not gw.available:
            gw.error = LabError(f"snatgw run --backend {backend}: {gw.why}")
        else:
            try:
                lab.start_gateway(conf, backend)
            except LabError as e:
                gw.error = e
                missing = re.search(r"ModuleNotFoundError: No module named '(snatgw\.[\w.]+)'", str(e))
                if missing:  # a part of snatgw that is not built yet, not a broken one
                    gw.available, gw.why = False, f"not built yet: {missing[1]}"
        yield gw
    finally:
        lab.down()


@pytest.fixture
def gw(request, gateway_module):
    """The running gateway; while its backend is not built the test xfails (strict=False)."""
    if not gateway_module.available:
        request.node.add_marker(pytest.mark.xfail(
            reason=f"snatgw run --backend {gateway_module.backend}: {gateway_module.why}", strict=False))
    return gateway_module
