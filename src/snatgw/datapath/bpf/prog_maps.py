"""RuleSet + Settings -> the bytes of snat_config and snat_rules (slot order = priority order).

``compile_rules(ruleset, settings, ifindex_of)`` is pure: ``ifindex_of(name) -> int`` resolves
oif names (0xffffffff for a device that does not exist, so such a rule never matches).  The C
side (prog/include/rules.h) reads these through the layouts of snatgw.layout."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Callable

from ... import layout as L
from ...config.schema import Settings, judged_settings, rule_host_limit, rule_preserve, rule_spill
from ...errors import BackendError
from ...rules import Rule, RuleSet, leak_guard_nets

OIF_ABSENT = 0xFFFFFFFF


def compile_rule(rule: Rule, ifindex_of: Callable[[str], int], settings: Settings = Settings()) -> bytes:
    """A rule's slot; its on_exhausted and max_sessions_per_host as in effect with ``settings``."""
    flags = L.RULE_F_SPILL if rule_spill(rule, settings) else 0
    if rule_preserve(rule, settings):
        flags |= L.RULE_F_PRESERVE
    if rule.eim:
        flags |= L.RULE_F_EIM
        flags |= {"endpoint-independent": L.RULE_F_EIF, "address-dependent": L.RULE_F_ADF}.get(rule.filter_mode, 0)
    oif = 0
    if rule.oif is not None:
        flags |= L.RULE_F_OIF
        oif = int(ifindex_of(rule.oif))
        if oif <= 0:
            oif = OIF_ABSENT
    if rule.gw is not None:
        flags |= L.RULE_F_GW
    if rule.new_gw is not None:
        flags |= L.RULE_F_NEW_GW
    return L.SNAT_RULE.pack(
        src_net=rule.src.network_address.packed, src_mask=rule.src.netmask.packed,
        dst_net=rule.dst.network_address.packed, dst_mask=rule.dst.netmask.packed,
        gw=(rule.gw or IPv4Address(0)).packed, new_gw=(rule.new_gw or IPv4Address(0)).packed,
        oif=oif, pool_min=int(rule.pool.first), pool_max=int(rule.pool.last),
        rule_id=rule.rule_id, algo=int(rule.algo), flags=flags,
        host_limit=min(rule_host_limit(rule, settings), 0xFFFFFFFF),
    )  # fmt: skip


def compile_cfg(nrules: int, settings: Settings, eim: bool = False, host_count: bool = False) -> bytes:
    """``eim``: some rule maps endpoint-independently (CFG_F_EIM: owners are looked up for
    filtering and hairpinning; without it no packet pays for that).  ``host_count``: some rule
    has a max_sessions_per_host (CFG_F_HOST_COUNT: the datapath counts each inside host's new
    sessions; without it the expiry sweep's recount alone keeps those counts)."""
    if not 0 < settings.port_min <= settings.port_max <= 65535:
        raise BackendError(
            f"port range {settings.port_min}-{settings.port_max}: expected 1 <= min <= max <= 65535"
        )
    return L.SNAT_CFG.pack(
        nrules=nrules, flags=(L.CFG_F_UNMATCHED_DROP if settings.unmatched_drop else 0)
        | (L.CFG_F_REFUSE_ICMP if settings.refuse_icmp else 0)
        | (L.CFG_F_INBOUND_ROUTED if settings.inbound_routed else 0) | (L.CFG_F_EIM if eim else 0)
        | (L.CFG_F_AUDIT if settings.audit_log or settings.sync_peer else 0)  # (the session sync reads the ring too)
        | (L.CFG_F_HOST_COUNT if host_count else 0),
        port_min=settings.port_min, port_max=settings.port_max,
        port_tries=min(max(int(settings.port_tries), 0), L.PORT_TRIES_MAX),  # the C bounds it too
    )  # fmt: skip


def compile_rules(
    ruleset: RuleSet, settings: Settings, ifindex_of: Callable[[str], int]
) -> tuple[bytes, list[bytes]]:
    """(snat_config value, [snat_rules value per slot]) for ``ruleset`` in priority order.
    ``ifindex_of`` is asked once per device name (a system call each: 10,000 rules name one
    uplink 10,000 times)."""
    known: dict[str, int] = {}

    def once(name: str) -> int:
        if name not in known:
            known[name] = ifindex_of(name)
        return known[name]

    rules = [compile_rule(r, once, settings) for r in ruleset]
    if len(rules) > L.MAX_RULES:
        raise BackendError(f"{len(rules)} rules: the datapath holds at most {L.MAX_RULES}")
    return compile_cfg(len(rules), settings, any(r.eim for r in ruleset), host_counting(ruleset, settings)), rules


def judged_under(slots: list[bytes], settings: Settings, ifindex_of: Callable[[str], int] | None = None) -> tuple:
    """What a refusal marker and a spill memo were judged under, from what the datapath reads:
    the rule slots as written (matching, pool, algo, flags, host limit: every field of
    snat_rules), the port range and port_tries of snat_config (the search; not its other flags:
    refuse_icmp answers a refusal and never the marker's drop, the rest only count, log or
    concern flows no rule refused), and the devices' roles (snat_ifaces: each device by name
    and, with ``ifindex_of``, ifindex, as a slot's oif is).  The backend's apply empties
    snat_refused and snat_spill_memo only when this changed (schema.judged_under is the model's
    same comparison)."""
    return (tuple(slots),) + judged_settings(settings, ifindex_of)


def judged_in_maps(cfg: bytes, slots: list[bytes], roles: dict[int, int]) -> tuple:
    """What the refusal markers and spill memos of a datapath were judged under, as its maps
    hold it: the rule slots, snat_config's port range and port_tries, and the devices' roles
    of snat_ifaces by ifindex (the fragment holder's device left out: each start makes it
    anew).  A start that adopts the pinned maps compares its predecessor's (read before it
    writes its own) with its own (after): judged_under from the bytes, with the devices as the
    datapath knows them, so a device recreated while no daemon ran counts as changed."""
    c = L.SNAT_CFG.unpack(cfg)
    return (tuple(slots), c["port_min"], c["port_max"], c["port_tries"],
            frozenset((i, r) for i, r in roles.items() if i != L.RECIRC_KEY))  # fmt: skip


def host_counting(ruleset: RuleSet, settings: Settings) -> bool:
    """CFG_F_HOST_COUNT: some rule has a max_sessions_per_host in effect (its own or the
    global), so the datapath must count each inside host's sessions as they are made."""
    return any(rule_host_limit(r, settings) for r in ruleset)


def compile_from_nets(ruleset: RuleSet) -> dict[bytes, int]:
    """snat_from_nets, packed lpm_v4 -> kind: every rule's `from` net (FROM_NET_RULE) and the
    rules' pool prefixes (FROM_NET_POOL), as rules.leak_guard_nets says."""
    return {L.LPM_V4.pack(prefixlen=n.prefixlen, addr=n.network_address.packed): kind
            for n, kind in leak_guard_nets(ruleset).items()}  # fmt: skip
