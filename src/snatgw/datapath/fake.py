"""FakeBackend: the Backend interface in memory, over the reference model (snatgw.model.Engine).

Daemon, adm and CLI tests run against it without root.  ``process()`` feeds packets through the
engine, so sessions and counters are the model's own.  ``chaos`` makes chosen operations fail
on demand (pyroute2's ChaoticIPRoute habit): a set of operation names ("apply", "start",
"expire", ...) that raise BackendError before anything changes, or "apply:N" to fail only the
N-th call of that operation (1-based).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace
from typing import Callable, Iterable

from ..errors import BackendError
from ..layout import MAX_REFUSED, REFUSED_SECS
from .backend import RuleCounters, Stats, pressure_summary

APPLIED_KEPT = 16  # configs FakeBackend.applied keeps (the last ones)


def parse_chaos(spec: str | Iterable[str] | None) -> dict[str, int]:
    """"apply,expire:2" -> {"apply": 0, "expire": 2} (0: every call fails)."""
    if not spec:
        return {}
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: dict[str, int] = {}
    for item in items:
        name, _, nth = item.strip().partition(":")
        if name:
            out[name] = int(nth) if nth else 0
    return out


class FakeBackend:
    name = "fake"

    def __init__(self, settings=None, router=None, clock: Callable[[], float] = time.monotonic,
                 chaos: str | Iterable[str] | None = None):
        self.settings = settings
        self.router = router
        self.clock = clock
        self.chaos = parse_chaos(chaos)
        self.calls: dict[str, int] = {}
        self.engine = None
        self.config = None
        # the configs applied last, in order (tests inspect it); bounded: a daemon on the fake backend
        # grew 6.8 KB a reload, each config kept for good
        self.applied: deque = deque(maxlen=APPLIED_KEPT)
        self.stopped: bool | None = None  # None: running; else the keep_state it stopped with
        self._forgotten: list[dict] = []  # refusal markers an apply forgot, for the next refusals()

    # -- fault injection
    def _enter(self, op: str) -> None:
        n = self.calls[op] = self.calls.get(op, 0) + 1
        if op in self.chaos and self.chaos[op] in (0, n):
            raise BackendError(f"fake backend: {op} failed on purpose (chaos, call {n})")

    def _need(self):
        if self.engine is None:
            raise BackendError("fake backend: not started")
        return self.engine

    # -- Backend interface
    def start(self, config) -> None:
        self._enter("start")
        try:
            from ..model.engine import Engine
            from ..model.router import StaticRouter
        except ImportError as e:  # the model is a sibling package; say so plainly
            raise BackendError(f"fake backend needs snatgw.model: {e}") from None
        router = self.router or StaticRouter.ref()
        self.engine = Engine(config.rules, config.settings, router)
        self.config = config
        self.applied.append(config)
        self.stopped = None

    def apply(self, config) -> None:
        self._enter("apply")
        eng = self._need()
        markers = self._markers(eng)  # an apply may forget them (Engine.apply): kept for refusals()
        eng.apply(config.rules, config.settings)
        if not eng.refused:  # (forgotten, or none there)
            self._forgotten = (self._forgotten + markers)[-MAX_REFUSED:]
        self.config = config
        self.applied.append(config)

    def expire(self, now: float | None = None) -> int:
        self._enter("expire")
        return self._need().expire(self.clock() if now is None else now)

    def sessions(self) -> list:
        self._enter("sessions")
        return list(self._need().sessions(self.clock()))

    def stats(self) -> Stats:
        self._enter("stats")
        eng = self._need()
        reasons = {r.name: int(n) for r, n in eng.reasons.items() if n}
        rules = {int(k): v if isinstance(v, RuleCounters) else RuleCounters(int(k), *v)
                 for k, v in eng.rule_stats.items()}
        live = {rid: c.sessions for rid, c in eng.rule_live.items()}  # as the bpf backend: the kept counts
        rules = {rid: replace(rules.get(rid) or RuleCounters(rid), live=live.get(rid, 0))
                 for rid in rules.keys() | live.keys()}  # fmt: skip
        n = len(eng.sessions(self.clock()))
        pressure = pressure_summary({str(k): (c.sessions, c.refusals) for k, c in eng.host_live.items()},
                                    {str(k): (c.sessions, c.refusals) for k, c in eng.addr_live.items()},
                                    n, eng.settings.max_sessions, hosts_live=eng.host_counting,
                                    hosts_age=None if eng.counted_at is None else self.clock() - eng.counted_at,
                                    allocator=eng.alloc_counts())  # fmt: skip
        return Stats(reasons=reasons, rules=rules, sessions=n, pressure=pressure)

    def refusals(self) -> list[dict]:
        """The model's refusal markers, as the bpf backend lists them (``at`` in ns), after
        those an apply forgot since the last call (as the bpf backend keeps them)."""
        forgotten, self._forgotten = self._forgotten, []
        return forgotten + self._markers(self._need())

    @staticmethod
    def _markers(eng) -> list[dict]:
        return [{"host": str(k.saddr), "remote": str(k.daddr), "sport": k.sport, "dport": k.dport,
                 "proto": k.proto, "addr": str(m.addr), "at": int(m.at * 1e9), "reason": m.reason.name}
                for k, m in eng.refused.items()]  # fmt: skip

    def refusal_marker(self, host: str, sport: int, remote: str, dport: int, proto: int) -> dict | None:
        """The model's refusal marker of one flow's OUT key, as the bpf backend answers it
        (None once it is REFUSED_SECS old: the model passes it by then)."""
        from ipaddress import IPv4Address

        from ..model.conntrack import out_key

        m = self._need().refused.get(out_key(IPv4Address(host), IPv4Address(remote), sport, dport, proto))
        if m is None or self.clock() - m.at >= REFUSED_SECS:
            return None
        return {"reason": m.reason.name, "addr": str(m.addr), "age_ms": max(0, int((self.clock() - m.at) * 1000))}

    def session_of(self, host: str, sport: int, remote: str, dport: int, proto: int):
        """The model's session under one flow's OUT key (``dport`` 0 for an ICMP echo), as the
        bpf backend answers it; None when there is none."""
        from ipaddress import IPv4Address

        from ..model.conntrack import out_key

        self._enter("sessions")
        return self._need().session_of(out_key(IPv4Address(host), IPv4Address(remote), sport, dport, proto),
                                       self.clock())  # fmt: skip

    def spill_memos(self, remote: str | None = None) -> list[dict]:
        """The model's spill memos, as the bpf backend lists them (``age_ms`` by this clock)."""
        now = self.clock()
        return [{"remote": str(k.remote), "addr": str(k.addr), "rport": k.rport, "proto": k.proto,
                 "age_ms": max(0, int((now - at) * 1000))}
                for k, at in self._need().spill.memos.items() if remote is None or str(k.remote) == remote]  # fmt: skip

    def flush(self, rule_id: int | None = None, inside=None, nat=None) -> int:
        self._enter("flush")
        return self._need().flush(rule_id, inside, nat)

    def health(self) -> dict:
        self._enter("health")
        eng = self._need()
        hooks = [{"device": d, "hook": "ingress", "program": "model", "prog_id": 0, "attached": True, "found": 0}
                 for d in eng.inside + eng.outside]
        return {"hooks": hooks, "maps": [{"name": "sessions", "entries": 2 * len(eng.table),
                                          "max_entries": 2 * eng.table.max_sessions}],
                "sessions": len(eng.table), "max_sessions": eng.table.max_sessions,
                "devices": {"inside": list(eng.inside), "outside": list(eng.outside)}}

    def zero(self) -> None:
        self._enter("zero")
        eng = self._need()
        eng.reasons.clear()
        eng.rule_stats.clear()
        eng.zero_alloc_counts()

    def stop(self, keep_state: bool = False) -> None:
        self._enter("stop")
        if self.engine is not None and not keep_state:
            self.engine.flush(None)
        self.stopped = keep_state

    # -- test helper: run one packet through the model datapath
    def process(self, pkt: bytes, side: str = "inside", ingress: str = "lan40", now: float | None = None):
        return self._need().process(pkt, side, ingress, self.clock() if now is None else now)
