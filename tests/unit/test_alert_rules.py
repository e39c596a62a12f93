"""The example alert rules (examples/prometheus/snatgw-alerts.yml) are valid Prometheus rules,
and each alert fires on the series that should fire it and not on the others
(snatgw-alerts.test.yml, run by promtool's own rule engine).  tests/lab/test_alerts_live.py runs
them on a live daemon's metrics."""

from __future__ import annotations

import subprocess
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "prometheus"


def test_alert_rules_are_valid_and_their_unit_tests_pass(promtool):
    check = subprocess.run([promtool, "check", "rules", "snatgw-alerts.yml"], cwd=EXAMPLES,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 14 rules found" in check.stdout
    test = subprocess.run([promtool, "test", "rules", "snatgw-alerts.test.yml"], cwd=EXAMPLES,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert test.returncode == 0, test.stdout + test.stderr
