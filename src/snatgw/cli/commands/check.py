"""`snatgw check FILE [--json]`: validate a config; print its rules in priority order, the
settings and warnings (skipped keepalived blocks, rules that can never match).  Exit 0 when
valid, 2 when not (the error, file:line: field: message, on stderr)."""

from __future__ import annotations

import argparse
from ipaddress import IPv4Address, IPv4Network

from ...config.links import link_rules
from ...config.parse import parse_file, require_rules, settings_as_dict
from ...config.schema import GatewayConfig, rule_host_limit, rule_spill
from ...errors import EXIT_OK, ConfigError
from ...layout import MAX_BPF_SESSIONS, MAX_RULES, PORT_TRIES
from ..render import dump_json, kv_table, rule_json, rule_table

HELP = "validate a config file and show its rules in priority order"
DESCRIPTION = """\
Validate a keepalived-style snatgw config (docs/config.md).  Prints the normalised rules in
priority order (the order a new flow tries them: longest source prefix, longest destination
prefix, rules naming oif and gw, definition order), the settings, and warnings.
Exit status: 0 valid, 2 invalid (nothing would be applied).
"""


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="config file (keepalived.conf style)")
    p.add_argument("-j", "--json", action="store_true", help="print one JSON object instead of tables")


#: ranges no SNAT address can come from (RFC 6890: "this network", loopback, multicast, reserved
#: and the limited broadcast)
UNROUTABLE_POOL = tuple((IPv4Network(n), what) for n, what in (
    ("0.0.0.0/8", "'this network'"), ("127.0.0.0/8", "loopback"), ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved (or broadcast)")))


def oif_warnings(cfg: GatewayConfig) -> list[str]:
    """An `oif` that is no uplink (a typo: such a rule or link matches nothing).  One pass over
    the rules: the daemon logs these at every start and reload too."""
    out, s = [], cfg.settings
    if s.outside:
        for r in cfg.rules.defined:
            if r.oif and r.oif not in s.outside:
                out.append(f"{r.where}: oif: {r.oif} is not among the outside interfaces ({' '.join(s.outside)})")
        for lk in cfg.links:
            if lk.oif and lk.oif not in s.outside:
                out.append(f"{lk.where}: link {lk.name}: oif {lk.oif} is not among the outside interfaces")
    return out


def config_warnings(cfg: GatewayConfig) -> list[str]:
    """What is legal but probably not meant: shadowed rules, oifs that are not uplinks."""
    out = []
    for rule, firsts in cfg.rules.shadowed():
        by = (f"the rule at {firsts[0].where} ({firsts[0].describe()})" if len(firsts) == 1
              else f"the rules at {', '.join(e.where or '?' for e in firsts)}")
        out.append(f"{rule.where}: snat_rule can never match: every packet it matches is matched first by {by}")
    s = cfg.settings
    out += oif_warnings(cfg)
    for lk in cfg.links:
        if not link_rules(lk, cfg.rules):
            out.append(f"{lk.where}: link {lk.name}: no rule has {lk.gw} as its next hop (gw or new_gw, or oif "
                       f"{lk.oif or '-'}): a failure of it moves nothing")
    for r in cfg.rules.defined:  # a pool no reply can come back to: a typo, most likely
        for net, what in UNROUTABLE_POOL:
            if int(r.pool.first) <= int(net.broadcast_address) and int(net.network_address) <= int(r.pool.last):
                out.append(f"{r.where}: snat_ip: {r.pool.short()} has {what} addresses ({net}): a packet from "
                           "one is not routed on the internet and no reply comes back to it")
    out += pool_overlap_warnings(cfg)
    if s.backend == "bpf" and len(cfg.rules) > MAX_RULES:
        out.append(f"{cfg.source}: {len(cfg.rules)} rules: the bpf backend holds at most {MAX_RULES}; "
                   "`snatgw run` with it refuses this config (the nft backend takes it)")
    out += nat_behaviour_warnings(cfg)
    out += nft_pressure_warnings(cfg)
    out += pressure_setting_warnings(cfg)
    out += interface_warnings(cfg)
    if not len(cfg.rules):
        out.append(f"{cfg.source}: no snat_rule: nothing will be translated")
    return out


def pool_overlap_warnings(cfg: GatewayConfig) -> list[str]:
    """A pool (a rule's snat_ip or a link's backup_snat_ip) that holds a next hop (a gw, new_gw
    or backup_gw: the gateway would hold, and answer ARP for, its ISP's router's address), or an
    address of a rule's `from` (an inside host's address used as a public one: the inside
    program drops that host's every packet as DROP_SPOOFED, a pool address coming from inside).
    A typo, most likely (`snat_ip 192.0.2.1` for the router's `.100`). Catch-all sources
    (`from 0.0.0.0/0`) name no inside network and are left out. Each distinct pool is asked in
    O(log n): check scales with the rule count (docs/config.md)."""
    from bisect import bisect_left

    hops: dict[int, str] = {}  # next hop -> where it is named first
    for r in cfg.rules.defined:
        for h in (r.gw, r.new_gw):
            if h is not None:
                hops.setdefault(int(h), f"{r.where}")
    for lk in cfg.links:
        for h in (lk.gw, lk.backup_gw):
            hops.setdefault(int(h), f"link {lk.name} ({lk.where})")
    hop_keys = sorted(hops)
    nets: dict[tuple[int, int], object] = {}  # (network, prefix length) -> the first rule with that from
    for r in cfg.rules.defined:
        if r.src.prefixlen:
            nets.setdefault((int(r.src.network_address), r.src.prefixlen), r)
    starts = sorted(n for n, _ in nets)
    first_at = {}
    for n, plen in sorted(nets, key=lambda k: (k[0], -k[1])):
        first_at.setdefault(n, (n, plen))
    pools = {}
    for r in cfg.rules.defined:
        pools.setdefault((int(r.pool.first), int(r.pool.last)), (r.where, r.pool, "snat_ip"))
    for lk in cfg.links:
        if lk.backup_pool is not None:
            pools.setdefault((int(lk.backup_pool.first), int(lk.backup_pool.last)),
                             (f"link {lk.name} ({lk.where})", lk.backup_pool, "backup_snat_ip"))
    out = []
    for (a, b), (where, pool, field) in pools.items():
        i = bisect_left(hop_keys, a)
        if i < len(hop_keys) and hop_keys[i] <= b:
            h = hop_keys[i]
            out.append(f"{where}: {field}: {pool.short()} holds {IPv4Address(h)}, a next hop ({hops[h]}): the "
                       "gateway would take its router's address and answer ARP for it; every flow through it breaks")
        hit = next((nets[(a & ~((1 << (32 - plen)) - 1) & 0xFFFFFFFF, plen)] for plen in range(1, 33)
                    if (a & ~((1 << (32 - plen)) - 1) & 0xFFFFFFFF, plen) in nets), None)  # a net holding a
        if hit is None:
            j = bisect_left(starts, a)
            if j < len(starts) and starts[j] <= b:  # a net starting inside the pool
                hit = nets[first_at[starts[j]]]
        if hit is not None:
            out.append(f"{where}: {field}: {pool.short()} has addresses of from {hit.src} ({hit.where}): an inside "
                       "network's address as a public one: the inside host that has it cannot send (its every "
                       "packet is dropped as DROP_SPOOFED, a pool address coming from inside)")
    return out


def interface_warnings(cfg: GatewayConfig) -> list[str]:
    """No inside or no outside interfaces: nothing is translated (the daemon says it too, after
    `snatgw run --inside/--outside`, and `status` calls it a problem)."""
    s = cfg.settings
    missing = [k for k in ("inside", "outside") if not getattr(s, k)]
    if not missing:
        return []
    block = setting_at(cfg, "snatgw")  # the block's line when there is one, else the file
    return [f"{block}: no {' or '.join(missing)} interfaces in a snatgw {{ }} block: "
            f"give them there or to `snatgw run --{missing[0]} IF`"]


def setting_at(cfg: GatewayConfig, key: str) -> str:
    """"file:line" of the snatgw block's setting ``key`` (or of the block: "snatgw"), the file
    (or "config") when it was not written there (a default, or --inside)."""
    return dict(cfg.settings.where).get(key) or cfg.source or "config"


def nft_pressure_warnings(cfg: GatewayConfig) -> list[str]:
    """Port-pressure settings the nft backend cannot honour (docs/nftables.md, "Port pressure"):
    said, not silently ignored, at the setting's line."""
    s = cfg.settings
    if s.backend != "nft":
        return []
    spill = ("spill is ignored with backend nft: the kernel's nf_nat fixes the address by its hash "
             "and never tries another address of the pool (docs/nftables.md, \"Port pressure\")")
    out = [f"{setting_at(cfg, 'on_exhausted')}: on_exhausted: {spill}"] if s.on_exhausted == "spill" else []
    out += [f"{r.where}: on_exhausted: {spill}" for r in cfg.rules.defined if r.on_exhausted == "spill"]
    if s.port_tries != PORT_TRIES:
        out.append(f"{setting_at(cfg, 'port_tries')}: port_tries: {s.port_tries} is ignored with backend nft: "
                   "the kernel's nf_nat runs its own search, about 240 tries (docs/nftables.md)")
    out += [f"{where}: vrrp_instance: use_vmac is not handled by backend nft: the hosts' packets arrive on the "
            "macvlan device, which is no inside device, and are not translated (the leak guard drops them); run "
            "keepalived without use_vmac, or use backend bpf (docs/operations.md, \"Beside keepalived\")"
            for where in getattr(cfg, "use_vmac", ())]
    return out


#: kernel memory the bpf backend's maps take per session of max_sessions (measured: 1M sessions
#: in 303 MiB of map memory, README "Performance"; the hash maps are preallocated at start)
BPF_BYTES_PER_SESSION = 318


def mem_total(path: str = "/proc/meminfo") -> int | None:
    """This machine's memory in bytes, None when unknown."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def table_memory_warnings(cfg: GatewayConfig, total: int | None = None) -> list[str]:
    """A bpf session table sized past half of this machine's memory: its maps are preallocated
    when `snatgw run` starts, so such a max_sessions fails the start, or takes the memory the
    host needs (a typo's extra zeros, most likely).  nft allocates conntrack entries as they
    come (max_sessions is a ceiling compared with their count): no warning there."""
    s = cfg.settings
    total = mem_total() if total is None else total
    if s.backend == "nft":
        return []
    if s.max_sessions > MAX_BPF_SESSIONS:
        return [f"{setting_at(cfg, 'max_sessions')}: max_sessions: {s.max_sessions:,} sessions: the bpf backend "
                f"holds at most {MAX_BPF_SESSIONS:,} (a kernel hash map's limit); `snatgw run` with it refuses "
                "this config (the nft backend takes it)"]
    need = s.max_sessions * BPF_BYTES_PER_SESSION
    if not total or need <= total // 2:
        return []
    return [f"{setting_at(cfg, 'max_sessions')}: max_sessions: {s.max_sessions:,} sessions take about "
            f"{need / (1 << 30):.1f} GiB of kernel memory with the bpf backend (~{BPF_BYTES_PER_SESSION} bytes "
            f"each, allocated at start), {'more than' if need > total else 'over half of'} this machine's "
            f"{total / (1 << 30):.1f} GiB: `snatgw run` may fail to create the table or starve the host"]


def pressure_setting_warnings(cfg: GatewayConfig) -> list[str]:
    """Port-pressure settings that do nothing, or more than the rule's algorithm promised:
    refuse_icmp without any host limit, a host limit the session table can never let a host
    reach, and an `algo sh` rule that spills (its one public address per inside host, RFC 6888
    REQ-2, given up when that address is full toward a server; the default for sh is drop)."""
    s = cfg.settings
    out = []
    if s.port_min == s.port_max:  # `port_range 5000` read as "from 5000": one port, not a range
        out.append(f"{setting_at(cfg, 'port_range')}: port_range: {s.port_min} is one port: a SNAT address then has one "
                   "port for each remote address and port, so a second flow toward the same server needs another "
                   f"address of the pool or is refused (write MIN-MAX for a range, e.g. {s.port_min}-65535)")
    limits = {r.where: rule_host_limit(r, s) for r in cfg.rules.defined}
    if s.refuse_icmp and not any(limits.values()):
        out.append(f"{setting_at(cfg, 'refuse_icmp')}: refuse_icmp: yes does nothing: it answers a flow refused by "
                   "max_sessions_per_host, and no rule has one (port exhaustion is refused in silence)")
    over = sorted({n for n in limits.values() if n > s.max_sessions})
    for n in over:
        where = ([setting_at(cfg, "max_sessions_per_host")] if s.max_sessions_per_host == n else []) + \
            [r.where for r in cfg.rules.defined if r.max_sessions_per_host == n]
        out.append(f"{', '.join(w or '?' for w in where)}: max_sessions_per_host: {n} is never reached: the "
                   f"session table (max_sessions {s.max_sessions}) is full first (DROP_TABLE_FULL for every host)")
    out += table_memory_warnings(cfg)
    if s.backend != "nft":  # (nft never spills: nft_pressure_warnings says so)
        for r in cfg.rules.defined:
            if r.algo.name == "SH" and r.pool.size > 1 and rule_spill(r, s):
                how = "its own on_exhausted spill" if r.on_exhausted else \
                    f"on_exhausted spill of the snatgw {{ }} block ({setting_at(cfg, 'on_exhausted')})"
                out.append(f"{r.where}: algo sh with {how}: an inside host whose address is full toward a server "
                           "gets another address of the pool for those flows, no longer one public address per "
                           "host (RFC 6888 REQ-2, paired; sh's default is drop: give the rule on_exhausted drop "
                           "to keep it)")
    return out


def nat_behaviour_warnings(cfg: GatewayConfig) -> list[str]:
    """mapping endpoint-independent: what the nft backend makes of it, and pools shared with
    endpoint-dependent rules (whose sessions do not respect an endpoint's ownership)."""
    out = []
    eim = [r for r in cfg.rules.defined if r.eim]
    for r in eim:
        if cfg.settings.backend == "nft":
            out.append(f"{r.where}: mapping: with backend nft, endpoint-independent is what netfilter's "
                       "`snat persistent` does while the inside port is free (the kernel keeps a socket's "
                       "address and port toward every remote), not a guarantee: another inside host may "
                       "hold that port toward the same remote, and there is no hairpinning (docs/nftables.md)")
        for o in cfg.rules.defined:
            if not o.eim and int(o.pool.first) <= int(r.pool.last) and int(r.pool.first) <= int(o.pool.last):
                out.append(f"{r.where}: snat_ip: {r.pool.short()} shares addresses with the endpoint-dependent "
                           f"rule at {o.where} ({o.pool.short()}): a session of that rule may take an "
                           "endpoint's external port toward one remote, and the endpoint's own session to "
                           "that remote is then refused (give endpoint-independent rules pools of their own)")
    return out


def report(cfg: GatewayConfig, warnings: list[str]) -> dict:
    prio = {r.rule_id: i for i, r in enumerate(cfg.rules, 1)}
    return {
        "valid": True,
        "file": cfg.source,
        "rules": [rule_json(i, r) for i, r in enumerate(cfg.rules, 1)],
        "links": [{**lk.as_dict(), "rules": [prio[r.rule_id] for r in link_rules(lk, cfg.rules)]} for lk in cfg.links],
        "settings": settings_as_dict(cfg.settings),
        "warnings": warnings,
    }


def render_text(cfg: GatewayConfig, warnings: list[str]) -> str:
    n = len(cfg.rules)
    out = [f"{cfg.source}: valid, {n} rule{'s' if n != 1 else ''}", ""]
    if n:
        out += ["rules in priority order (a new flow takes the first that matches):", rule_table(cfg.rules, "  "), ""]
    if cfg.links:
        prio = {r.rule_id: i for i, r in enumerate(cfg.rules, 1)}
        out += ["links (probed; while one is down its rules run on the backup):"]
        for lk in cfg.links:
            owned = ", ".join(f"#{prio[r.rule_id]}" for r in link_rules(lk, cfg.rules)) or "none"
            pool = f" snat_ip {lk.backup_pool}" if lk.backup_pool else ""
            out.append(f"  {lk.name}: gw {lk.gw} oif {lk.oif or '(route)'} probe {' '.join(map(str, lk.probe))} "
                       f"every {lk.interval:g} s, down after {lk.dead_after:g} s, rise {lk.rise}, hold {lk.hold:g} s; "
                       f"rules {owned} -> new_gw {lk.backup_gw}{pool}  ({lk.where})")
        out.append("")
    d = settings_as_dict(cfg.settings)
    timeouts = d.pop("timeout")
    if d.get("on_exhausted") is None:
        d["on_exhausted"] = "by algo (spill for sdh and random, drop for sh)"
    out += ["settings:", kv_table(d.items()), "  timeouts (s):"]
    out += [kv_table(timeouts.items(), "    "), ""]
    out += ["warnings:"] + ([f"  {w}" for w in warnings] or ["  none"])
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    warnings: list[str] = []
    try:
        # (an rps_cpus CPU not online on this machine is a warning: the gateway may have it)
        cfg = require_rules(parse_file(args.file, warnings, cpus_here=False))
    except ConfigError as e:
        if args.json:
            print(dump_json({"valid": False, "file": args.file, "error": str(e), "field": e.field, "where": e.where}))
        raise
    warnings += config_warnings(cfg)
    print(dump_json(report(cfg, warnings)) if args.json else render_text(cfg, warnings))
    return EXIT_OK
