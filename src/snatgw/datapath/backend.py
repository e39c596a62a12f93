"""The one small interface every datapath backend implements (bpf, nft, and the in-memory fake).

The daemon owns a backend: ``start`` once, ``apply`` on every reload, ``expire`` from its GC
loop, ``sessions``/``stats`` for the CLI, ``stop`` on exit.  Backends never read config files
and never parse text: they receive a ``GatewayConfig`` (rules already validated and ordered).
"""

from __future__ import annotations

import json

import time
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Callable, Protocol

from ..errors import BackendError


@dataclass(frozen=True)
class Session:
    """One NAT session as every backend reports it (both tuples, state, idle time, counters)."""

    proto: str  # "tcp" | "udp" | "icmp"
    inside: str  # "IP:PORT" of the inside host (ICMP: the echo identifier as port)
    remote: str  # "IP:PORT" of the remote end
    nat: str  # "IP:PORT" the remote end sees
    state: str  # CtState name: ESTABLISHED, SYN_RECV, ..., UDP, ICMP
    idle: float  # seconds since the last packet in either direction
    expires: float  # seconds until expiry at the current state's timeout (<= 0: due)
    rule_id: int = 0
    # per-session counters, None where nothing counts them (the bpf datapath keeps none, nor
    # does conntrack without nf_conntrack_acct): absent from as_dict, never a made-up 0
    packets_out: int | None = None
    bytes_out: int | None = None
    packets_in: int | None = None
    bytes_in: int | None = None

    def as_dict(self) -> dict:
        d = dict(vars(self))  # flat fields: a copy of __dict__ (asdict's deep copy is 10x dearer)
        if self.packets_out is None:  # (the four come together or not at all)
            del d["packets_out"], d["bytes_out"], d["packets_in"], d["bytes_in"]
        return d


_PROTOS = {"tcp": 6, "udp": 17, "icmp": 1}


def _shown(v) -> str:
    """A request's value in an error: its JSON text when short, else its JSON type."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 40 else f"{type(v).__name__} (not shown)"


@dataclass(frozen=True)
class SessionFilter:
    """Which sessions a listing or a flush selects: every field given must match.  The bpf
    backend applies it to the raw map entries (and its sweep in the kernel); others to Session
    objects (``match``)."""

    rule_id: int | None = None
    inside: IPv4Network | None = None  # the inside host's address within this net
    nat: IPv4Address | None = None  # the SNAT address
    remote: IPv4Network | None = None  # the remote address within this net
    remote_port: int | None = None
    proto: int | None = None  # IPPROTO_*
    state: int | None = None  # layout.CtState

    @property
    def empty(self) -> bool:
        return self == SessionFilter()

    def as_dict(self) -> dict:
        """JSON-ready (for the control socket); ``from_dict`` reverses it."""
        return {k: (str(v) if isinstance(v, (IPv4Address, IPv4Network)) else v)
                for k, v in asdict(self).items() if v is not None}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict | None) -> "SessionFilter":
        """``as_dict``'s output back; anything else is a ValueError naming the field: addresses
        are strings, numbers JSON integers or their digits (int() took true as proto 1, 6.9 as
        6 and the integer 3232245770 as the address 192.168.40.10)."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"filter: expected an object of {', '.join(cls.__dataclass_fields__)}, "
                             f"got {type(d).__name__}")
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown session filter field(s): {', '.join(sorted(map(str, unknown)))}")
        for k in ("inside", "remote", "nat"):
            v = d.get(k)
            if v is None:
                continue
            try:
                if not isinstance(v, str):
                    raise ValueError
                d[k] = IPv4Address(v.strip()) if k == "nat" else IPv4Network(v.strip(), strict=False)
            except ValueError:
                what = "an IPv4 address A.B.C.D" if k == "nat" else "an IPv4 network A.B.C.D[/N]"
                raise ValueError(f"filter: {k}: expected {what}, got {_shown(v)}") from None
        for k in ("rule_id", "remote_port", "proto", "state"):
            v = d.get(k)
            if v is None:
                continue
            if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 10:
                v = d[k] = int(v)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 32:
                raise ValueError(f"filter: {k}: expected a whole number 0..4294967295, got {_shown(v)}")
        return cls(**d)

    def match(self, s: "Session") -> bool:
        from .. import layout as L

        ip, _, port = s.inside.rpartition(":")
        rip, _, rport = s.remote.rpartition(":")
        return ((self.rule_id is None or s.rule_id == self.rule_id)
                and (self.inside is None or IPv4Address(ip) in self.inside)
                and (self.nat is None or s.nat.rpartition(":")[0] == str(self.nat))
                and (self.remote is None or IPv4Address(rip) in self.remote)
                and (self.remote_port is None or rport == str(self.remote_port))
                and (self.proto is None or _PROTOS.get(s.proto) == self.proto)
                and (self.state is None or s.state == L.CtState(self.state).name))  # fmt: skip


@dataclass(frozen=True)
class RuleCounters:
    """One rule's counters: ``packets``/``bytes`` translated (both directions), ``sessions``
    made since start or `adm -Z` (ipvsadm's Conns; the rate's CPS) and ``live``, the rule's live
    sessions now (None where not known: nft's rate samples, counters())."""

    rule_id: int
    packets: int = 0
    bytes: int = 0
    sessions: int = 0
    live: int | None = None


@dataclass(frozen=True)
class Stats:
    """Counters: per reason (names from snatgw.layout.Reason) and per rule id."""

    reasons: dict[str, int] = field(default_factory=dict)
    rules: dict[int, RuleCounters] = field(default_factory=dict)
    sessions: int = 0
    pressure: dict = field(default_factory=dict)  # pressure_summary(); {} when not known
    #: packets handled per CPU (index: CPU number), where the datapath counts per CPU (bpf: its
    #: reason counters); () when not known (nft: conntrack and nat count nothing per CPU)
    per_cpu: tuple[int, ...] = ()

    def as_dict(self) -> dict:
        return {
            "sessions": self.sessions,
            "reasons": dict(self.reasons),
            "rules": {str(k): asdict(v) for k, v in self.rules.items()},
            **({"pressure": self.pressure} if self.pressure else {}),
            **({"per_cpu": list(self.per_cpu)} if self.per_cpu else {}),
        }


def pressure_summary(hosts: dict, addrs: dict, sessions: int, max_sessions: int, top: int = 10,
                     hosts_live: bool = True, hosts_age: float | None = None,
                     allocator: dict | None = None, unlisted: str | None = None,
                     refusals_known: bool = True) -> dict:
    """Port pressure as `stats` shows it: the table's fill, sessions and refusals per SNAT
    address (every one), the ``top`` inside hosts by sessions (then refusals).  ``hosts`` and
    ``addrs``: address text -> (sessions, refusals), as the live-count maps hold them.
    ``hosts_live``: the hosts' sessions are counted as sessions are made ("hosts_counted":
    "live"); else they are the last expiry sweep's recount ("sweep"), ``hosts_age`` seconds
    old (None: not known, e.g. read from pinned maps without a daemon).
    ``allocator``: the port allocator's counters by layout.ALLOC_CNT_NAMES (spill memo hits
    and memos written, port searches and the candidates they tried), when the datapath keeps
    them; with the searches, ``tries_per_search`` (their mean since start or the last zero;
    None before the first search).  No allocator (nft: the kernel's nf_nat counts none of
    this): no "allocator" key, never zeros.  ``unlisted``: why there are no per-host and
    per-address lists this time (nft above PRESSURE_LIST_MAX sessions): said as "unlisted",
    with no "hosts_total" and "hosts_counted" None, so that no one reads empty lists as no
    pressure.  ``refusals_known`` False (nft: the kernel does not say whose flow it refused):
    every row's "refusals" is None and "refusals_known" False, never a made-up 0 beside the
    reasons' counts of the same refusals; "refusals_known" is in every answer (True: bpf, the
    model), listed or not."""
    def rows(d: dict, name: str) -> list[dict]:
        return [{name: k, "sessions": int(s), "refusals": int(r) if refusals_known else None}
                for k, (s, r) in d.items()]  # fmt: skip

    table = {"sessions": sessions, "max_sessions": max_sessions,
             "fill": round(sessions / max_sessions, 4) if max_sessions else None}
    alloc = {"allocator": allocator_summary(allocator)} if allocator is not None else {}
    if unlisted:
        return {"table": table, "refusals_known": refusals_known, "addresses": [], "hosts": [], "hosts_counted": None,
                "unlisted": unlisted, **alloc}  # fmt: skip
    hs = sorted(rows(hosts, "host"), key=lambda r: (-r["sessions"], -(r["refusals"] or 0), r["host"]))
    return {
        "table": table,
        "refusals_known": refusals_known,  # in every answer: a json consumer needs no default
        "addresses": sorted(rows(addrs, "addr"), key=lambda r: tuple(int(x) for x in r["addr"].split("."))),
        "hosts": hs[:top],
        "hosts_total": len(hs),
        "hosts_counted": "live" if hosts_live else "sweep",
        **({} if hosts_live else {"hosts_age_seconds": None if hosts_age is None else round(hosts_age, 1)}),
        **alloc,
    }


def tries_per_search(tries: float, searches: float) -> float | None:
    """The mean candidates tried per port search (None without a search)."""
    return round(tries / searches, 2) if searches > 0 else None


def allocator_summary(counts: dict) -> dict:
    """The allocator's counters (by layout.ALLOC_CNT_NAMES) as `stats` shows them: with the
    port searches, their mean tries per search."""
    out = {k: int(v) for k, v in counts.items()}
    if "port_searches" in out and "port_search_tries" in out:
        out["tries_per_search"] = tries_per_search(out["port_search_tries"], out["port_searches"])
    return out


#: seconds between two warnings of failing counter reads (LastRead): a scrape every few seconds
#: would otherwise log each time
READ_LOG_INTERVAL = 60.0


class LastRead:
    """Counters a backend reads from outside its own maps (nftables' named counters: the nft
    backend's table, the bpf leak guard's; conntrack's insert_failed): a read that fails
    (BackendError: netlink and the `nft` fallback both failed, an unreadable /proc file)
    answers the figures the last read of that ``source`` gave, so an exported counter never
    goes back (Prometheus takes a dip for a counter reset and the return for a burst of that
    size).  The failures are counted (``failed``: `snatgw status`'s `counter_reads`, the metric
    `counter_read_failures_total`) and logged, at most once per READ_LOG_INTERVAL.  A source
    whose reads have all failed (since start, e.g. the first read after a restart over an nft
    table whose counters live on) is ``unknown``: its answer {} is not its figures, and the
    metrics leave the counters out meanwhile (a gap) rather than export 0 and then N, which
    Prometheus takes for a burst of N (an alert on the increase would fire)."""

    def __init__(self, what: str, log, clock: Callable[[], float] = time.monotonic):
        self.what, self.log, self.clock = what, log, clock
        self.last: dict[str, dict] = {}  # by source: the figures the last read that worked gave
        self.failed = 0  # reads that failed since start
        self.last_error: str | None = None  # the last failure's text, None once a read works again
        self._logged_at: float | None = None
        self.unknown: set[str] = set()  # sources no read of which has worked yet

    def read(self, fn: Callable[[], dict], source: str = "") -> dict:
        """``fn()``, kept as ``source``'s figures; when it raises BackendError, those kept."""
        try:
            got = fn()
        except BackendError as e:
            self.failed += 1
            self.last_error = str(e)
            now = self.clock()
            if self._logged_at is None or now - self._logged_at >= READ_LOG_INTERVAL:
                self._logged_at = now
                self.log.warning("%s: %s; the figures of the last read that worked are answered (%d failed "
                                 "reads since start)", self.what, e, self.failed)  # fmt: skip
            if source not in self.last:
                self.unknown.add(source)
            return dict(self.last.get(source, {}))
        self.last[source], self.last_error = dict(got), None
        self.unknown.discard(source)
        return got

    def forget(self, source: str = "") -> None:
        """``source``'s counters were zeroed: a failed read must not bring the old figures back
        (it answers zeros, which they are now)."""
        self.last[source] = {}
        self.unknown.discard(source)

    def as_dict(self) -> dict:
        return {"failed": self.failed, "last_error": self.last_error}


class Backend(Protocol):
    name: str

    def start(self, config) -> None:
        """Set the datapath up for ``config`` (attach/apply); adopt pinned state if present."""

    def apply(self, config) -> None:
        """Atomically replace the rules and settings; sessions survive (spec: reload), except
        those whose SNAT address left their rule's pool or whose rule's new_gw now sends them
        by an uplink that does not hold that address (spec "Rule changes and live sessions")."""

    def expire(self, now: float | None = None) -> int:
        """Remove expired sessions (both directions together); return how many."""

    def sessions(self) -> list[Session]: ...

    def stats(self) -> Stats: ...

    def flush(self, rule_id: int | None = None, inside=None, nat=None) -> int:
        """Remove the sessions matching every filter given: rule id, inside address, SNAT
        address (IPv4Address); none given: all.  Return how many."""

    def zero(self) -> None:
        """Zero the counters."""

    def stop(self, keep_state: bool = False) -> None:
        """Detach.  With ``keep_state`` pinned sessions stay for the next daemon to adopt."""
