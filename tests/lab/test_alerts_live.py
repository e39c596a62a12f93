"""The example alert rules on a live daemon's metrics, both backends (root): a host exhausts
the ports of a 10-port range (on_exhausted drop); the gateway's /metrics, scraped before and
after, become the input series of a promtool rule test, and Prometheus's own rule engine must
fire SnatgwPortsExhausted with the refusals counted, and none of the alerts about leaks, the
session table, reloads or errors.  Every metric name the rules use is one the daemon exports
(or one it exports only with a feature this lab does not configure, listed below), so a
renamed metric cannot leave an alert silently watching nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from snatgw.daemon.client import call
from snatgw.lab import clients as C
from snatgw.lab import leakwatch
from snatgw.lab.topology import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]
RULES = Path(__file__).resolve().parents[2] / "examples" / "prometheus" / "snatgw-alerts.yml"
METRICS = ("127.0.0.1", 9469)
S1, A, POOL = "203.0.113.10", "198.18.40.10", "198.19.2.71"
INSIDE_NETS = ("198.18.0.0/16",)
#: metric names of the rules that this lab's daemon does not export, and why
NOT_HERE = {
    "up": "Prometheus's own, per scrape target",
    "snatgw_link_up": "only with probed links (links { })",
    "snatgw_link_on_backup": "only with probed links (links { })",
    "snatgw_audit_records_total": "only with audit_log set",
}
NOT_ON_NFT = {"snatgw_port_search_tries_total", "snatgw_port_searches_total"}  # nf_nat's search is not counted


@pytest.fixture(scope="module", params=["bpf", "nft"])
def alert_lab(request):
    lab = Lab.up(f"pytest-{os.getpid()}-al{request.param}", prefix=f"sga{os.getpid() % 0xFFFF:04x}{request.param[0]}")
    try:
        lab.add_snat_addresses(conf_rules())
        lab.servers = lab.start_servers()
        lab.backend = request.param
        yield lab
    finally:
        lab.down()


def conf(settings: str) -> str:
    return (f"snatgw {{\n inside lan40 lan50\n outside eth1 eth2\n {settings}\n}}\n"
            f"virtual_server fwmark 1 {{\n snat_rule {{ from 198.18.40.0/24 snat_ip {POOL} }}\n}}\n")


def conf_rules():
    from snatgw.config.parse import parse_text

    return parse_text(conf("")).rules


def _series(text: str) -> dict[str, float]:
    """{promtool series text: value} of every sample of a scrape, instance="gw" added."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = dict(s.labels, instance="gw")
            body = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            out[f"{s.name}{{{body}}}"] = s.value
    return out


def _annotation(alert: str, key: str) -> str:
    """The annotation ``key`` of ``alert`` as written in the rules file (a one-line string)."""
    text = RULES.read_text()
    block = text[text.index(f"alert: {alert}\n"):]
    m = re.search(rf'^\s+{key}: "(.*)"$', block, re.M)
    assert m, (alert, key)
    return m[1]


def test_port_exhaustion_fires_its_alert_on_the_daemons_own_metrics(alert_lab, promtool, tmp_path):
    lab = alert_lab
    path = os.path.join(lab.workdir, "alerts.conf")
    with open(path, "w") as f:
        f.write(conf(f"port_range 6000-6009\n on_exhausted drop\n metrics_listen {METRICS[0]}:{METRICS[1]}"))
    with leakwatch.uplinks(lab, INSIDE_NETS) as w:
        lab.start_gateway(path, lab.backend)
        try:
            before = C.metrics_text(lab, METRICS)
            C.udp_burst(lab, "in40", A, S1, range(45000, 45015))  # 15 flows, 10 ports: 5 refused
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                reasons = call(lab.socket_path, {"op": "stats"})["stats"]["reasons"]
                if int(reasons.get("DROP_PORT_EXHAUSTED", 0)) >= 5:
                    break
                time.sleep(0.1)
            after = C.metrics_text(lab, METRICS)
        finally:
            lab.stop_gateway()
            lab.run("gw", sys.executable, "-m", "snatgw.cli.main", "purge", "--pin-dir", lab.pin_dir,
                    "--socket", lab.socket_path, check=False)  # fmt: skip
    assert w.leaks == [] and w.seen >= 10, (w.leaks[:3], w.seen)
    s0, s1 = _series(before), _series(after)
    refused = 'snatgw_reason_packets_total{instance="gw", reason="DROP_PORT_EXHAUSTED"}'
    assert s1.get(refused) == 5 and s0.get(refused, 0) == 0, (s0.get(refused), s1.get(refused))

    # the rules' metric names: exported here, or accounted for
    used = set(re.findall(r"\b(snatgw_\w+|up)\{?", "\n".join(
        ln.split("expr:", 1)[1] for ln in RULES.read_text().splitlines() if "expr:" in ln)))  # fmt: skip
    exported = {k.split("{", 1)[0] for k in s1}
    missing = used - exported - set(NOT_HERE) - (NOT_ON_NFT if lab.backend == "nft" else set())
    assert not missing, f"the alert rules use metrics the daemon does not export: {sorted(missing)}"

    # two scrapes a minute apart, then steady for a quarter of an hour (past every `for:`):
    # what Prometheus would have stored
    series = [{"series": k, "values": f"{s0.get(k, v if not k.startswith('snatgw_reason') else 0)} {v}x15"}
              for k, v in s1.items()]  # fmt: skip
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "SnatgwPortsExhausted", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "instance": "gw", "reason": "DROP_PORT_EXHAUSTED"},
                    "exp_annotations": {
                        "summary": "snatgw on gw refuses new flows: no free SNAT port (5 in 5m)",
                        "description": _annotation("SnatgwPortsExhausted", "description")}}]},
                *({"eval_time": "2m", "alertname": quiet, "exp_alerts": []} for quiet in (
                    "SnatgwLeakBlocked", "SnatgwSessionTableFull", "SnatgwHostLimitReached",
                    "SnatgwReloadFailed", "SnatgwErrors", "SnatgwCounterReadsFailing")),
                # a gateway with a handful of sessions: no table or map is filling (the
                # datapath's fixed arrays and caches are no fill to warn about)
                *({"eval_time": "15m", "alertname": quiet, "exp_alerts": []} for quiet in (
                    "SnatgwSessionTableFilling", "SnatgwMapFilling", "SnatgwPortPressure")),
            ],
        }],
    }
    f = tmp_path / "live.test.yml"
    f.write_text(json.dumps(test, indent=1))  # YAML is a superset of JSON
    r = subprocess.run([promtool, "test", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
