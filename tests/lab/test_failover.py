"""Link health and automatic failover through `snatgw run` in the lab, both backends: with a
`link isp1` block the gateway probes ISP 1 through eth1; when isp1's end of the link goes down
(carrier lost) or isp1 silently drops what it should forward (carrier up), the live UDP flow
goes on through isp2 with an ISP 2 address; when isp1 is repaired it comes back after rise and
hold.  `snatgw status` and /metrics (scraped over HTTP inside the gateway's namespace, parsed
with prometheus_client's parser) say so.  No timing is asserted here (generous waits); the
figures come from `python -m snatgw.bench.failover` (docs/operations.md)."""

from __future__ import annotations

import json
import os
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from snatgw.bench.failover import Flow, _blackhole, config_text
from snatgw.lab.clients import metrics_text
from snatgw.lab.demo import FAILOVER_RULES, REF_RULES, ruleset
from snatgw.lab.gateway import gateway_available, snatgw_argv
from snatgw.lab.netns import run

from tests.lab.conftest import new_lab

pytestmark = [pytest.mark.root, pytest.mark.lab]
METRICS = ("127.0.0.1", 9469)


@pytest.fixture(scope="module", params=["bpf", "nft"])
def gw(request):
    ok, why = gateway_available(request.param)
    if not ok:
        pytest.fail(f"snatgw run --backend {request.param}: {why}")
    lab = new_lab()
    try:
        servers = lab.start_servers()
        lab.add_snat_addresses(ruleset(REF_RULES))
        lab.add_snat_addresses(ruleset(FAILOVER_RULES))
        conf = os.path.join(lab.workdir, "links.conf")
        text = config_text(0.2, 3, 2, 1.0, request.param)
        with open(conf, "w") as f:
            f.write(text.replace("unmatched pass", f"unmatched pass\n    metrics_listen {METRICS[0]}:{METRICS[1]}"))
        lab.start_gateway(conf, request.param)
        flow = Flow(lab)
        try:
            yield lab, flow
        finally:
            flow.close()
            servers.stop()
    finally:
        lab.down()


def metrics(lab) -> dict:
    fams = {f.name: f for f in text_string_to_metric_families(metrics_text(lab, METRICS))}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}


def status(lab) -> tuple[int, dict]:
    cp = run(snatgw_argv("status", "--socket", lab.socket_path, "-j"), check=False, timeout=30)
    return cp.returncode, json.loads(cp.stdout)


def wait_for(flow: Flow, link: str, prefix: str, what: str) -> None:
    assert flow.first_after(time.monotonic(), link, prefix, 15.0) is not None, what


def test_healthy_link_is_probed_and_reported(gw):
    """Before any failure: the flow leaves by isp1; status is healthy with isp1 up and answered
    probes; /metrics has snatgw_link_up{link="isp1"} 1 and probe counters."""
    lab, flow = gw
    wait_for(flow, "isp1", "198.19.2.", "the flow does not reach the server through isp1")
    deadline = time.monotonic() + 10  # probes every 0.2 s: the first answered ones, not a fixed 1 s
    while True:
        rc, d = status(lab)
        lk = d["link_health"]["isp1"]
        m = metrics(lab)
        if (rc == 0 and lk["state"] == "up" and lk["received"] > 0
                and m.get(("snatgw_link_probe_replies_total", (("link", "isp1"),)), 0) > 0) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert rc == 0, d["problems"]
    assert lk["state"] == "up" and lk["received"] > 0 and lk["dev"] == "eth1"
    assert m[("snatgw_link_up", (("link", "isp1"),))] == 1
    assert m[("snatgw_link_probe_replies_total", (("link", "isp1"),))] > 0


@pytest.mark.parametrize("kind", ["cut", "blackhole"])
def test_link_failure_moves_the_flow_to_isp2_and_repair_brings_it_back(gw, kind):
    """cut: isp1's end of the link down (no carrier); blackhole: isp1 drops everything it would
    forward (carrier up, only probes tell).  The flow answers through isp2 from an ISP 2
    address, status names the failed link (exit 1), the running rules carry the backup, the
    metrics show it on backup; after the repair it answers through isp1 again, status healthy."""
    lab, flow = gw
    wait_for(flow, "isp1", "198.19.2.", "not on isp1 before the failure")
    if kind == "cut":
        lab.run("isp1", "ip", "link", "set", "dev", "up", "down")
    else:
        _blackhole(lab, True)
    try:
        wait_for(flow, "isp2", "198.19.3.", f"after the {kind} the flow does not come through isp2")
        rc, d = status(lab)
        assert rc == 1 and any(p.startswith("link isp1: failed") for p in d["problems"])
        rules = json.loads(run(snatgw_argv("adm", "-L", "-j", "--socket", lab.socket_path), timeout=30).stdout)
        assert [r["new_gw"] for r in rules["rules"]] == [None, "198.19.3.1", "198.19.3.1"]
        assert metrics(lab)[("snatgw_link_on_backup", (("link", "isp1"),))] == 1
    finally:
        if kind == "cut":
            lab.run("isp1", "ip", "link", "set", "dev", "up", "up")
        else:
            _blackhole(lab, False)
    wait_for(flow, "isp1", "198.19.2.", f"after the repair of the {kind} the flow does not come back to isp1")
    deadline = time.monotonic() + 10
    while (rc := status(lab)[0]) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rc == 0
