"""The parsed configuration as frozen values: settings of snatgw's own, and the rules."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..layout import DEFAULT_TIMEOUTS, MAX_SESSIONS, PORT_MAX, PORT_MIN, PORT_TRIES, RFC_TIMEOUT_FLOORS, Algo, CtState
from ..rules import Rule, RuleSet

BACKENDS = ("bpf", "nft")
AUDIT_LOG_MAX_SIZE = 100 * 1024 * 1024  # default audit_log_max_size: 100M
AUDIT_LOG_KEEP = 5  # default audit_log_keep
AUDIT_LOG_MAX_KEEP = 1000
SNAT_ADDRESS_MODES = ("external", "manage")
ON_EXHAUSTED = ("spill", "drop")
SYNC_PORT = 3781  # default sync_port (UDP)
SYNC_KEY_MIN = 32  # bytes of the shared secret, white space stripped
SYNC_INTERVAL = 1.0  # default sync_interval (s): a heartbeat at least this often
SYNC_INTERVAL_RANGE = (0.1, 60.0)
SYNC_REFRESH = 10.0  # default sync_refresh (s): the whole table sent again this often
SYNC_REFRESH_RANGE = (1.0, 3600.0)

#: timeout keywords of the settings block -> state
TIMEOUT_NAMES: dict[str, CtState] = {
    "tcp_" + s.name.lower(): s for s in CtState if s not in (CtState.UDP, CtState.ICMP)
} | {"udp": CtState.UDP, "icmp": CtState.ICMP}


#: state -> its timeout keyword (the names `status` answers the timeouts by)
TIMEOUT_BY_STATE: dict[int, str] = {int(v): k for k, v in TIMEOUT_NAMES.items()}


def timeouts_by_name(timeouts) -> dict[str, int]:
    """Settings.timeouts ((state, seconds), ...) keyed by the `timeout` keyword's names, as the
    daemon's `status` answers them."""
    return {TIMEOUT_BY_STATE[int(st)]: int(secs) for st, secs in timeouts}


def timeouts_of_answer(d: dict) -> tuple[tuple[int, int], ...]:
    """A daemon's `status` timeouts as Settings.timeouts: keyed by name (`tcp_established`,
    `udp`, ...), or by state number as daemons before the names answered (an upgrade runs the
    new CLI against the old daemon); a key neither names (a newer daemon's) is left out."""
    out = {}
    for k, v in d.items():
        k = str(k)
        st = int(TIMEOUT_NAMES[k]) if k in TIMEOUT_NAMES else int(k) if k.isdigit() else None
        if st is not None and st in TIMEOUT_BY_STATE:
            out[st] = int(v)
    return tuple(sorted(out.items()))


def timeout_floor_warning(name: str, secs: int) -> str | None:
    """Why a `timeout NAME SECS` setting is below an RFC's floor (None when it is not)."""
    floor = RFC_TIMEOUT_FLOORS.get(TIMEOUT_NAMES[name])
    if floor is None or secs >= floor[0]:
        return None
    return f"{secs} s is below {floor[0]} s, the floor of {floor[1]}"


@dataclass(frozen=True)
class Settings:
    """snatgw's own settings (the `snatgw { ... }` block).  Defaults follow the original,
    except the timeouts (spec "Sessions": a gateway's, floored by the RFCs; layout.DEFAULT_TIMEOUTS)."""

    inside: tuple[str, ...] = ()  # interfaces facing the internal networks
    outside: tuple[str, ...] = ()  # uplinks; SNAT addresses are local addresses of these
    port_min: int = PORT_MIN
    port_max: int = PORT_MAX
    port_tries: int = PORT_TRIES  # candidates per SNAT address, 1..layout.PORT_TRIES_MAX
    max_sessions: int = MAX_SESSIONS
    #: when a flow's address has no free port: "spill" to the pool's next addresses or "drop";
    #: None: spill for sdh and random, drop for sh (per rule, a rule's own setting wins)
    on_exhausted: str | None = None
    max_sessions_per_host: int = 0  # live sessions per inside host (0 = no limit); per rule too
    refuse_icmp: bool = False  # `refuse_icmp yes`: ICMP host unreachable to a host over its limit
    #: `port_preserve yes`: a new flow's first port candidate is its own source port (per rule too)
    port_preserve: bool = False
    unmatched_drop: bool = False  # `unmatched drop`: the original's drop of no-rule flows
    #: `inbound routed`: packets from an uplink without a session may be routed on (to the
    #: inside); default `inbound drop`: only replies to sessions (and errors about them) get in
    inbound_routed: bool = False
    backend: str = "bpf"
    timeouts: tuple[tuple[int, int], ...] = tuple((int(k), v) for k, v in DEFAULT_TIMEOUTS.items())
    gc_interval: float = 1.0  # seconds between session expiry sweeps
    control_socket: str = "/run/snatgw/control.sock"
    pin_dir: str = "/sys/fs/bpf/snatgw"
    #: "external": the operator adds the SNAT addresses to the uplinks (as with LVS);
    #: "manage": the daemon adds every pool address as a /32 to its uplink (snatgw.daemon.addresses)
    snat_addresses: str = "external"
    #: a config without any snat_rule is refused (by `check`, `run` and reload) unless this is
    #: set (`allow_empty yes`): an empty or truncated file must never turn NAT off by accident
    allow_empty: bool = False
    metrics_listen: str | None = None  # "ADDR:PORT" of the Prometheus /metrics listener (None: off)
    #: the audit log of mappings (snatgw.daemon.audit): an absolute file path (JSON lines,
    #: rotated by size), "syslog", or None (off: the datapath emits nothing)
    audit_log: str | None = None
    audit_log_max_size: int = AUDIT_LOG_MAX_SIZE  # bytes of the file before it is rotated
    audit_log_keep: int = AUDIT_LOG_KEEP  # rotated files kept (audit.jsonl.1 .. .N)
    #: receive packet steering of the inside and outside devices (daemon/rps.py): "off" (the
    #: devices are left as they are), "all" (every online CPU) or a cpulist ("0-3,6", canonical)
    rps_cpus: str = "off"
    #: session sync of the bpf backend (daemon/sync.py): the peer's address on the sync link,
    #: ours (bound and sent from), the UDP port and the file of the shared secret; all None: off
    sync_peer: str | None = None
    sync_local: str | None = None
    sync_port: int = SYNC_PORT
    sync_key: str | None = None
    #: seconds between two heartbeats (the peer is silent after 3 of them without a datagram)
    #: and between the starts of two refresh walks (the whole table sent again)
    sync_interval: float = SYNC_INTERVAL
    sync_refresh: float = SYNC_REFRESH
    #: where each setting was given ((keyword, "file:line"), ...; "snatgw": the block, "timeout udp":
    #: a timeout), for errors and warnings about one (the daemon's "file:line: inside: interface 'x'
    #: does not exist", check's "file:line: port_tries: 16 is ignored with backend nft")
    where: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    def timeout(self, state: int) -> int:
        return dict(self.timeouts)[int(state)]

    def with_timeouts(self, **by_name: int) -> "Settings":
        t = dict(self.timeouts)
        for name, secs in by_name.items():
            t[int(TIMEOUT_NAMES[name])] = int(secs)
        return replace(self, timeouts=tuple(sorted(t.items())))


def rule_spill(rule: Rule, settings: Settings) -> bool:
    """Whether ``rule``'s new flows spill over to the pool's next addresses."""
    mode = rule.on_exhausted or settings.on_exhausted
    if mode is None:
        return rule.algo != Algo.SH  # sh: one public address per inside host (RFC 6888 REQ-2)
    return mode == "spill"


def rule_preserve(rule: Rule, settings: Settings) -> bool:
    """port_preserve in effect for ``rule``."""
    return settings.port_preserve if rule.port_preserve is None else rule.port_preserve


def rule_host_limit(rule: Rule, settings: Settings) -> int:
    """max_sessions_per_host in effect for ``rule`` (0 = none)."""
    return settings.max_sessions_per_host if rule.max_sessions_per_host is None else rule.max_sessions_per_host


def judged_under(rules: RuleSet, settings: Settings, ifindex_of=None) -> tuple:
    """What a refusal marker and a spill memo were judged under, in the model's terms: an
    apply keeps them while this is unchanged (a reload that changes nothing, or only what no
    judgement reads) and empties them otherwise.  Each rule in priority order as the datapath
    matches and allocates by it (compile_rule's fields: its match, pool, algo, mapping and
    filtering, and on_exhausted, port_preserve and max_sessions_per_host as in effect), the port
    range and port_tries (the search), and the devices' roles (a flow toward an inside device
    is never translated, and the marker is met before that is asked).  Not refuse_icmp (it
    answers a host limit's refusal and never the marker's drop: a marked flow is dropped
    unanswered with it on or off), the timeouts (the search meets the sessions the table holds
    now, whatever their age), nor what only counts or logs (audit_log, the sync).  The bpf
    backend compares the same from the bytes it writes (prog_maps.judged_under).

    A device (a rule's oif, an inside or outside device) is its name and, with
    ``ifindex_of(name)`` (the model's router.ifindex, the bpf backend's if_nametoindex), its
    ifindex: a device recreated under its name is another device, as the datapath's slots
    and roles see it (they hold ifindexes), so the markers go.  It has lost its routes, and
    flows judged while the rules named the old one may be routed and matched otherwise now:
    forgetting a marker costs one more search, keeping a wrong one refuses a flow for up to
    REFUSED_SECS (until 1 Dec 2026 the model compared names only and kept them)."""
    return (tuple((r.src, r.dst, r.gw, r.new_gw, device(r.oif, ifindex_of), int(r.pool.first), int(r.pool.last),
                   r.rule_id, r.algo, r.eim, r.filter_mode, rule_spill(r, settings), rule_preserve(r, settings),
                   rule_host_limit(r, settings)) for r in rules),) + judged_settings(settings, ifindex_of)  # fmt: skip


def device(name: str | None, ifindex_of=None):
    """A device as judged_under compares it: its name, with its ifindex when ``ifindex_of``
    is given (None stays None: no oif)."""
    return name if name is None or ifindex_of is None else (name, ifindex_of(name))


def judged_settings(settings: Settings, ifindex_of=None) -> tuple:
    """The settings a refusal marker and a spill memo were judged under, the same for the model
    and the bpf backend (judged_under, prog_maps.judged_under): the port range and port_tries
    (the search) and the devices' roles (by name and, with ``ifindex_of``, ifindex)."""
    return (settings.port_min, settings.port_max, settings.port_tries,
            frozenset(device(n, ifindex_of) for n in settings.inside),
            frozenset(device(n, ifindex_of) for n in settings.outside))  # fmt: skip


@dataclass(frozen=True)
class GatewayConfig:
    rules: RuleSet
    settings: Settings = field(default_factory=Settings)
    source: str | None = None  # file name it came from
    links: tuple = ()  # snatgw.config.links.Link: probed next hops and their backups
    #: "file:line" of the skipped keepalived `vrrp_instance` blocks that say `use_vmac` (the nft
    #: backend does not handle it: check and the daemon warn)
    use_vmac: tuple[str, ...] = field(default=(), compare=False)
    #: "file:line" of the keepalived `include` lines skipped (snatgw does not follow them)
    includes: tuple[str, ...] = field(default=(), compare=False)
