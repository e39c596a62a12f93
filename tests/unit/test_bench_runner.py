"""The suite's order of work, with the namespaces, gateways and traffic replaced by recorders
(the real ones run in tests/lab/test_bench_smoke.py)."""
from contextlib import contextmanager

from snatgw.bench import runner


class Recorder:
    """What the suite did, in order: ("topo", n), ("topo-gone", n) and whatever the fakes add;
    ``serial()`` numbers the fakes (ids of freed objects come again)."""

    def __init__(self):
        self.events: list[tuple] = []
        self.topo_kw: list[dict] = []  # the keywords each topology was made with
        self._made = iter(range(100_000))

    def serial(self) -> int:
        return next(self._made)

    @contextmanager
    def topology(self, **kw):
        """runner.topo.Topology's stand-in: a numbered namespace trio, gone even on failure."""
        t = type("Topo", (), {})()
        t.n = self.serial()
        self.topo_kw.append(kw)
        self.events.append(("topo", t.n))
        try:
            yield t
        finally:
            self.events.append(("topo-gone", t.n))


class FakeGateway:
    """runner.Gateway's stand-in: it starts and stops, and measures nothing itself."""

    start_seconds = 0.1
    proc = None

    def __init__(self, name, t, **kw):
        self.name, self.t = name, t

    def start(self):
        pass

    def stop(self):
        pass


def test_every_packet_scenario_runs_on_its_own_gateway_in_fresh_namespaces(monkeypatch):
    """A scenario must not meet the sessions the one before it left (snatgw's table, the
    kernel's conntrack): each gets a topology and a gateway of its own, stopped after it."""
    rec = Recorder()
    events, topology = rec.events, rec.topology

    class FakeGateway:
        start_seconds = 0.1
        proc = None

        def __init__(self, name, t, **kw):
            self.name, self.t, self.n = name, t, rec.serial()

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


def test_a_failed_measurement_a_gateway_that_will_not_start_and_an_unreadable_audit_each_leave_one_record(monkeypatch):
    """Each scenario leaves exactly one record, in order, whatever fails: a measurement that
    raises (an error record; its gateway still stopped and its namespaces gone), a gateway that
    will not start (n/a), an audit log whose counters cannot be read in time (the record, with no
    counts: it used to raise out of the suite and lose the figure just measured)."""
    import subprocess

    rec = Recorder()
    events, topology = rec.events, rec.topology

    class FakeGateway:
        start_seconds = 0.1
        proc = None
        socket = "/nonexistent"

        def __init__(self, name, t, **kw):
            self.name, self.n = name, rec.serial()

        def start(self):
            if self.name == "snatgw-nft":
                raise runner.Unavailable("no nft here")
            events.append(("start", self.name, self.n))

        def stop(self):
            events.append(("stop", self.name, self.n))

        def cli(self, *args, timeout=60):
            raise subprocess.TimeoutExpired(["snatgw", *args], timeout)

    def measure(s, t, gw, duration):
        if s == "udp-newflows" and gw.name == "forward":
            raise RuntimeError("trafgen died")
        return {"value": 1.0, "metric": "pps"}

    monkeypatch.setattr(runner.topo, "Topology", topology)
    monkeypatch.setattr(runner, "Gateway", FakeGateway)
    monkeypatch.setattr(runner, "availability", lambda cfg: None)
    monkeypatch.setattr(runner.sc, "measure", measure)
    scens = ("udp-1flow", "udp-newflows")
    cfgs = ("forward", "snatgw-nft", "snatgw-bpf-audit")
    suite = runner.Suite(runner.Params(rounds=1, scenarios=scens, configs=cfgs), echo=lambda *a: None)
    suite.packet_phase()
    got = [(r["scenario"], r["config"], r["status"]) for r in suite.records]
    want = [(s, c, "error" if (s, c) == ("udp-newflows", "forward") else "n/a" if c == "snatgw-nft" else "ok")
            for c in runner.rotated(cfgs, 0) for s in scens]
    assert got == want
    stopped = [e[2] for e in events if e[0] == "stop"]
    assert len(stopped) == len(set(stopped)) and {e[2] for e in events if e[0] == "start"} <= set(stopped)
    assert sum(e[0] == "topo" for e in events) == sum(e[0] == "topo-gone" for e in events) == len(want)
    audit = [r for r in suite.records if r["config"] == "snatgw-bpf-audit"]
    assert all(r["value"] == 1.0 and "audit_records" not in r for r in audit)


def test_a_daemon_that_fails_to_start_is_n_a_for_its_round_tried_next_round_given_up_after_two_rounds(monkeypatch):
    """Each scenario starts a gateway of its own, so two failed starts fell in one round and
    gave a configuration up for the whole run after one bad round (the docstring said so).
    Now a failed start makes it n/a for the rest of that round without another start, it is
    tried again the next round, and given up once it failed in two rounds."""
    rec = Recorder()
    starts: list[tuple[str, int]] = []
    fail_in = {"snatgw-bpf": {0, 2}, "snatgw-nft": {0, 1}}
    rnd = {"now": 0}

    class FailingGateway(FakeGateway):
        def start(self):
            starts.append((self.name, rnd["now"]))
            if rnd["now"] in fail_in.get(self.name, ()):
                raise runner.Unavailable(f"{self.name} would not start")

    orig = runner.Suite._packet_one

    def packet_one(self, s, cfg, r):
        rnd["now"] = r
        return orig(self, s, cfg, r)

    monkeypatch.setattr(runner.topo, "Topology", rec.topology)
    monkeypatch.setattr(runner, "Gateway", FailingGateway)
    monkeypatch.setattr(runner, "availability", lambda cfg: None)
    monkeypatch.setattr(runner.sc, "measure", lambda s, t, gw, d: {"value": 1.0, "metric": "pps"})
    monkeypatch.setattr(runner.Suite, "_packet_one", packet_one)
    scens = ("udp-1flow", "udp-newflows", "udp-newflows-spread")
    suite = runner.Suite(runner.Params(rounds=4, scenarios=scens, configs=("snatgw-bpf", "snatgw-nft")),
                         echo=lambda *a: None)  # fmt: skip
    suite.packet_phase()
    status = {(r["config"], r["round"]): set() for r in suite.records}
    for r in suite.records:
        status[(r["config"], r["round"])].add(r["status"])
    # snatgw-bpf: one start in round 0 (n/a for its three scenarios), ok in round 1, one failed
    # start in round 2 (its second bad round: given up), none in round 3
    assert [n for c, n in starts if c == "snatgw-bpf"] == [0, 1, 1, 1, 2]
    assert [status[("snatgw-bpf", r)] for r in range(4)] == [{"n/a"}, {"ok"}, {"n/a"}, {"n/a"}]
    # snatgw-nft: failed in rounds 0 and 1, one start each, then given up
    assert [n for c, n in starts if c == "snatgw-nft"] == [0, 1]
    assert all(status[("snatgw-nft", r)] == {"n/a"} for r in range(4))
    gone = [r["reason"] for r in suite.records if r["config"] == "snatgw-nft" and r["round"] == 3]
    assert all("given up" in w for w in gone)
    assert len(suite.records) == 2 * 4 * len(scens)


def test_rps_sets_the_same_mask_on_every_configurations_gateway(monkeypatch):
    """`--rps`: every topology (drop, forward, nft-kernel and snatgw alike, every phase) is made
    with the run's mask, so that a comparison stays fair; without it none gets one."""
    from snatgw.bench import topo
    from snatgw.cli.commands import bench as cli
    from snatgw.errors import SnatgwError

    for rps, want in (("3", "3"), (None, None)):
        rec = Recorder()

        monkeypatch.setattr(runner.topo, "Topology", rec.topology)
        monkeypatch.setattr(runner, "Gateway", FakeGateway)
        monkeypatch.setattr(runner, "availability", lambda cfg: None)
        monkeypatch.setattr(runner.sc, "measure", lambda s, t, gw, d: {"value": 1.0, "metric": "pps"})
        monkeypatch.setattr(runner.sc, "udp", lambda t, gw, kind, d: {"value": 1.0, "metric": "pps"})
        cfgs = ("drop", "forward", "nft-kernel", "snatgw-bpf")
        suite = runner.Suite(runner.Params(rounds=1, scenarios=("udp-1flow", "rules"), configs=cfgs, rps=rps,
                                           rule_counts=(1,)), echo=lambda *a: None)
        suite.packet_phase()
        suite.rules_phase()
        assert {r["config"] for r in suite.records} == set(cfgs)
        assert len(rec.topo_kw) == len(suite.records) and all(kw == {"rps": want} for kw in rec.topo_kw)
    script = topo.rps_script("3")
    assert "/sys/class/net/in0/queues/rx-*" in script and "/sys/class/net/up0/queues/rx-*" in script
    assert "echo 3 > $q/rps_cpus || exit 1" in script
    monkeypatch.setattr("snatgw.daemon.rps.online_cpus", lambda sysfs=None: frozenset({0, 1}))
    monkeypatch.setattr("snatgw.daemon.rps.possible_cpus", lambda sysfs=None: 2)
    assert (cli.rps_mask(None), cli.rps_mask("off"), cli.rps_mask("all"), cli.rps_mask("1")) == (None, None, "3", "2")
    try:
        cli.rps_mask("5")
    except SnatgwError as e:
        assert str(e) == "--rps: CPU 5 of '5' is not online (online: 0-1)"
    else:
        raise AssertionError("--rps 5 accepted on 2 CPUs")


def test_a_phase_outside_the_rounds_tries_a_daemon_that_failed_in_one_round(monkeypatch):
    """The session-table and control phases run once, after the packet rounds, and took the
    round number's default 0: a daemon that failed to start in the first packet round (and
    started in every later one) was n/a there without a start, "tried again the next" round
    that never came.  Outside the rounds only the two-bad-rounds rule gives a daemon up."""
    rec = Recorder()
    starts: list[str] = []

    class FirstStartFails(FakeGateway):
        def start(self):
            starts.append(self.name)
            if len(starts) == 1:
                raise runner.Unavailable(f"{self.name} would not start")

    monkeypatch.setattr(runner, "Gateway", FirstStartFails)
    monkeypatch.setattr(runner, "availability", lambda cfg: None)
    suite = runner.Suite(runner.Params(rounds=2, configs=("snatgw-bpf",)), echo=lambda *a: None)
    with rec.topology() as t:
        assert suite._gateway_or_na("snatgw-bpf", t, 0) is None  # packet round 0: failed
    with rec.topology() as t:
        assert suite._gateway_or_na("snatgw-bpf", t, 1) is not None  # round 1: started
    with rec.topology() as t:  # the session-table phase's call (sessions_phase)
        assert suite._gateway_or_na("snatgw-bpf", t, max_sessions=1 << 20) is not None, suite.why
    assert len(starts) == 3
