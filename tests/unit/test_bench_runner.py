"""The suite's order of work, with the namespaces, gateways and traffic replaced by recorders
(the real ones run in tests/lab/test_bench_smoke.py)."""
from contextlib import contextmanager

from snatgw.bench import runner


def test_every_packet_scenario_runs_on_its_own_gateway_in_fresh_namespaces(monkeypatch):
    """A scenario must not meet the sessions the one before it left (snatgw's table, the
    kernel's conntrack): each gets a topology and a gateway of its own, stopped after it."""
    events: list[tuple] = []
    made = iter(range(1000))  # serial numbers (ids of freed objects come again)

    class Topo:
        def __init__(self):
            self.n = next(made)

    @contextmanager
    def topology():
        t = Topo()
        events.append(("topo", t.n))
        yield t
        events.append(("topo-gone", t.n))

    class FakeGateway:
        start_seconds = 0.1
        proc = None

        def __init__(self, name, t, **kw):
            self.name, self.t, self.n = name, t, next(made)

        def start(self):
            events.append(("start", self.name, self.n))

        def stop(self):
            events.append(("stop", self.name, self.n))

    def measure(s, t, gw, duration):
        events.append(("measure", s, gw.name, gw.n, t.n))
        return {"value": 1.0, "metric": "pps"}

    monkeypatch.setattr(runner.topo, "Topology", topology)
    monkeypatch.setattr(runner, "Gateway", FakeGateway)
    monkeypatch.setattr(runner, "availability", lambda cfg: None)
    monkeypatch.setattr(runner.sc, "measure", measure)
    scens = ("udp-newflows", "udp-newflows-spread", "udp-portpressure")
    suite = runner.Suite(runner.Params(rounds=1, scenarios=scens, configs=("forward", "snatgw-bpf")), echo=lambda *a: None)
    suite.packet_phase()
    runs = [e for e in events if e[0] == "measure"]
    assert [(e[1], e[2]) for e in runs] == [(s, c) for c in runner.rotated(("forward", "snatgw-bpf"), 0) for s in scens]
    assert len({e[3] for e in runs}) == len(runs)  # a gateway per scenario
    assert len({e[4] for e in runs}) == len(runs)  # namespaces per scenario
    for e in runs:  # each gateway stopped, and its namespaces gone, before the next starts
        i = events.index(e)
        assert events[i + 1] == ("stop", e[2], e[3])
        assert events[i + 2] == ("topo-gone", e[4])
    assert [r["scenario"] for r in suite.records] == [e[1] for e in runs]
