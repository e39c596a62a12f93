"""`snatgw bench --quick` on a tiny scenario: runs in namespaces of its own, writes valid
JSON, Markdown and a PNG, and leaves no namespace or BPF pin behind (root, mark lab)."""

import json
import os

import pytest

from snatgw.bench import topo
from snatgw.cli.main import main

pytestmark = [pytest.mark.root, pytest.mark.lab]


def test_quick_bench_writes_json_report_and_cleans_up(tmp_path):
    """A one-round quick bench of drop/forward/nft-kernel yields pps for each and a report."""
    mine = f"sgb{os.getpid() & 0xFFFF:04x}"
    rc = main(["bench", "--quick", "--scenario", "udp-1flow", "--config", "drop", "--config", "forward",
               "--config", "nft-kernel", "--rounds", "1", "--duration", "0.5", "--out", str(tmp_path)])
    assert rc == 0
    js = [p for p in tmp_path.glob("*.json")]
    assert len(js) == 1
    res = json.loads(js[0].read_text())
    assert res["machine"]["nproc"] >= 1 and res["machine"]["kernel"]
    got = {r["config"]: r for r in res["records"] if r["scenario"] == "udp-1flow"}
    assert set(got) == {"drop", "forward", "nft-kernel"}
    for cfg, r in got.items():
        assert r["status"] == "ok", r
        assert r["value"] > 0 and r["packets"] > 0
    # nft-kernel's datagrams must arrive from the SNAT pool (the sink counts them apart)
    assert got["nft-kernel"]["translated"] >= 0.99 * got["nft-kernel"]["packets"]
    assert got["forward"]["translated"] == 0
    md = (tmp_path / "latest.md").read_text()
    assert "| 1 one UDP flow | nft-kernel |" in md and "## Targets" in md
    assert (tmp_path / "latest.png").stat().st_size > 1000
    assert topo.leftover_namespaces(mine) == []
    assert not [d for d in os.listdir("/sys/fs/bpf") if d.startswith(f"snatgw-{mine}")]


def test_unavailable_backend_is_reported_not_faked(tmp_path, monkeypatch):
    """A configuration whose backend cannot start is recorded as n/a with the reason."""
    from snatgw.bench import gateways

    monkeypatch.setattr(gateways, "availability", lambda c: "backend not written yet" if c == "snatgw-bpf" else None)
    monkeypatch.setattr("snatgw.bench.runner.availability", gateways.availability)
    rc = main(["bench", "--quick", "--scenario", "udp-1flow", "--config", "drop", "--config", "snatgw-bpf",
               "--rounds", "1", "--duration", "0.3", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    bpf = [r for r in res["records"] if r["config"] == "snatgw-bpf"]
    assert bpf and all(r["status"] == "n/a" and r["value"] is None for r in bpf)
    assert res["unavailable"]["snatgw-bpf"] == "backend not written yet"
    assert "n/a (backend not written yet)" in (tmp_path / "latest.md").read_text()
