"""RuleSet + Settings -> iptables-restore text (`iptables-restore --noflush`) that does what the
nft rule set does as closely as iptables can, with the differences as notes.  Pure; marks,
slots and policy-routing tables are the nft backend's (render.py), so both exports agree.

iptables cannot look at the route before routing (nft has `fib daddr oifname`) nor match the
next hop at all (nft has `rt ip nexthop`): `gw` conditions are dropped, and new_gw steering is
decided on source/destination only.  The notes returned with the text say which rules that hits.
"""

from __future__ import annotations

from ...config.schema import Settings
from ...layout import Algo
from ...rules import ANY_NET, Rule, RuleSet
from . import render as R

OURS = f"0x{R.MARK_TAG:08x}/0x{R.MARK_MASK:08x}"


def _word(text: str) -> str:
    """One iptables-restore word: a device name may hold '"' (the kernel allows any character but
    '/', ':' and white space), which iptables-restore takes for a quote: `-o a"b` loaded as the
    device 'ab -j DROP' with the rest of the line.  Quoted, with '"' and '\\' escaped, as
    iptables-restore reads them back."""
    if '"' not in text and "\\" not in text:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _wildcard_note(what: str, name: str) -> list[str]:
    """iptables reads a trailing '+' of a device name as "any name starting so": no line can
    name the device `eth+` alone (nft's oifname "eth+" does)."""
    if not name.endswith("+"):
        return []
    which = f" whose name starts with {name[:-1]}" if name[:-1] else ""
    return [f"{what}: iptables reads the trailing + of {name} as a wildcard: it matches every device"
            f"{which}, not {name} alone"]


def _conds(rule: Rule, with_oif: bool = True) -> list[str]:
    out = ["-s", str(rule.src)]
    if rule.dst != ANY_NET:
        out += ["-d", str(rule.dst)]
    if with_oif and rule.oif:
        out += ["-o", _word(rule.oif)]
    return out


def _comment(rule: Rule) -> list[str]:
    return ["-m", "comment", "--comment", f'"snatgw {rule.rule_id:08x}"']


def _snat_target(rule: Rule, ports: tuple[int, int] | None) -> list[str]:
    pool = rule.pool
    to = str(pool.first) if pool.size == 1 else f"{pool.first}-{pool.last}"
    if ports:
        to += f":{ports[0]}-{ports[1]}"
    out = ["-j", "SNAT", "--to-source", to]
    if rule.algo == Algo.SH and pool.size > 1:
        out.append("--persistent")
    if rule.algo == Algo.RANDOM:
        out.append("--random")
    return out


def render_iptables(rules: RuleSet, settings: Settings) -> tuple[str, list[str]]:
    """(iptables-restore text, notes on what differs from snatgw's nft/bpf behaviour)."""
    p = R.plan(rules, settings)
    notes: list[str] = []
    mark = {r.identity: R.mark_of(p.slots[r.identity]) for r in rules}
    inside = settings.inside
    ports = (settings.port_min, settings.port_max)

    def line(*parts) -> str:
        return " ".join(str(x) for x in parts if x != "")

    for r in rules:
        if r.oif:
            notes += _wildcard_note(r.describe(), r.oif)
        if r.gw:
            notes.append(f"{r.describe()}: iptables cannot match the next hop; `gw {r.gw}` is left out"
                         + ("" if r.oif else " (the rule matches any route)"))
        if r.algo == Algo.RANDOM and r.pool.size > 1:
            notes.append(f"{r.describe()}: iptables has no hash of (src, dst, sport) for the address; "
                         "`--random` only randomises ports, the address is hashed from (src, dst) as sdh")

    mangle = ["*mangle", ":SNATGW_STEER - [0:0]", ":SNATGW_MATCH - [0:0]",
              "-A PREROUTING -j SNATGW_STEER", "-A FORWARD -j SNATGW_MATCH",
              f"-A SNATGW_STEER -m conntrack --ctdir ORIGINAL -m connmark --mark {OURS} -j CONNMARK --restore-mark"]
    last = max((i for i, r in enumerate(rules.rules) if r.new_gw), default=-1)
    iif = [f"-i {_word(i)}" for i in inside][:1] if len(inside) == 1 else []
    if len(inside) == 1:
        notes += _wildcard_note("inside", inside[0])
    if len(inside) > 1:
        notes.append("several inside interfaces: iptables lines cannot list them; not restricted by -i")
    new_only = f"-m conntrack --ctstate NEW -m connmark ! --mark {OURS}"
    for r in rules.rules[: last + 1]:
        if r.new_gw:
            if r.oif or r.gw:
                notes.append(f"{r.describe()}: iptables cannot see the route before routing; new_gw "
                             "steering here matches on from/to only")
            m = f"0x{mark[r.identity]:08x}"
            mangle.append(line("-A SNATGW_STEER", new_only, *iif, *_conds(r, False), *_comment(r),
                               "-j MARK --set-mark", m))
            mangle.append(line("-A SNATGW_STEER", f"-m mark --mark {m}", "-j CONNMARK --save-mark"))
        elif r.oif or r.gw:
            notes.append(f"{r.describe()}: cannot be judged before routing, so a later new_gw rule may "
                         "steer flows this rule would take")
        else:
            mangle.append(line("-A SNATGW_STEER", new_only, *iif, *_conds(r), *_comment(r), "-j RETURN"))
    for r in rules.rules:
        if not r.new_gw:
            mangle.append(line("-A SNATGW_MATCH -m conntrack --ctstate NEW --ctdir ORIGINAL",
                               f"-m connmark ! --mark {OURS}", *iif, *_conds(r), *_comment(r),
                               f"-j CONNMARK --set-xmark 0x{mark[r.identity]:08x}/0xffffffff"))
    mangle.append("COMMIT")

    filt = ["*filter", ":SNATGW_FWD - [0:0]", ":SNATGW_GUARD - [0:0]", "-A FORWARD -j SNATGW_FWD",
            "-A SNATGW_FWD -m conntrack --ctstate INVALID -j SNATGW_GUARD",
            f"-A SNATGW_FWD -p tcp ! --syn -m conntrack --ctstate NEW -m connmark --mark {OURS} -j DROP"]
    if settings.unmatched_drop:
        filt.append(line("-A SNATGW_FWD -m conntrack --ctstate NEW --ctdir ORIGINAL",
                         f"-m connmark ! --mark {OURS}", *iif, "-j DROP"))
    for r in rules.rules:
        filt.append(line("-A SNATGW_GUARD", *_conds(r), *_comment(r), "-j DROP"))
    filt.append("COMMIT")

    nat = ["*nat", ":SNATGW_SNAT - [0:0]", "-A POSTROUTING -j SNATGW_SNAT"]
    for r in rules.rules:
        m = f"-m connmark --mark 0x{mark[r.identity]:08x}"
        for proto in ("tcp", "udp"):
            nat.append(line("-A SNATGW_SNAT", m, "-p", proto, *_comment(r), *_snat_target(r, ports)))
        nat.append(line("-A SNATGW_SNAT", m, *_comment(r), *_snat_target(r, None)))
    nat.append("COMMIT")

    head = ["# snatgw export --format iptables: load with `iptables-restore --noflush < FILE`",
            "# (loading twice adds the PREROUTING/FORWARD/POSTROUTING jumps twice; delete them with -D)"]
    routing = []
    for e in p.routes:
        routing.append(f"# new_gw of {e.rule.describe()}: run these too")
        routing += ["#   ip " + " ".join(argv) for argv in e.commands()]
    body = head + routing + mangle + filt + nat
    return "\n".join(body) + "\n", notes


__all__ = ["render_iptables"]
