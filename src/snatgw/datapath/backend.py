"""The one small interface every datapath backend implements (bpf, nft, and the in-memory fake).

The daemon owns a backend: ``start`` once, ``apply`` on every reload, ``expire`` from its GC
loop, ``sessions``/``stats`` for the CLI, ``stop`` on exit.  Backends never read config files
and never parse text: they receive a ``GatewayConfig`` (rules already validated and ordered).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol


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
    packets_out: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    bytes_in: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RuleCounters:
    rule_id: int
    packets: int = 0
    bytes: int = 0
    sessions: int = 0


@dataclass(frozen=True)
class Stats:
    """Counters: per reason (names from snatgw.layout.Reason) and per rule id."""

    reasons: dict[str, int] = field(default_factory=dict)
    rules: dict[int, RuleCounters] = field(default_factory=dict)
    sessions: int = 0

    def as_dict(self) -> dict:
        return {
            "sessions": self.sessions,
            "reasons": dict(self.reasons),
            "rules": {str(k): asdict(v) for k, v in self.rules.items()},
        }


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
