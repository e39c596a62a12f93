"""iptables SNAT rules -> snatgw config text (`snatgw import-iptables`).  Reads iptables-save
output and `iptables -t nat -A POSTROUTING ... -j SNAT --to-source A-B [--persistent]` command
lines (the seed's form, including its `--persitent` typo).  Pure: text in, text and findings out.

Mapping: -s -> from, -d -> to, -o -> oif, --to-source -> snat_ip, --persistent -> algo sh,
otherwise sdh (nf_nat hashes src and dst to pick the address).  --random/--random-fully only
randomise PORTS in iptables, so they also give sdh, with a note that port randomisation is not
carried over.  MASQUERADE needs an explicit snat_ip (``masq_addr`` {iface: address}).  Lines of
tables other than nat (*filter, *mangle, ...) are skipped with one summary note.  Everything else
is kept as a `# not carried over: <line>: <why>` comment and counted as flagged.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from .config.schema import GatewayConfig, Settings
from .errors import RuleError
from .layout import Algo
from .rules import ANY_NET, Pool, Rule, RuleSet, parse_oif

_BINARIES = ("iptables", "iptables-nft", "iptables-legacy", "/sbin/iptables", "/usr/sbin/iptables")
_IGNORED_CMDS = {"-F": "flush", "--flush": "flush", "-X": "delete chain", "--delete-chain": "delete chain",
                 "-Z": "zero", "--zero": "zero", "-P": "policy", "--policy": "policy"}  # fmt: skip


@dataclass
class Imported:
    rules: list[Rule] = field(default_factory=list)
    flagged: list[tuple[str, str]] = field(default_factory=list)  # (where + line, why)
    notes: list[str] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # carried over, but behaves differently
    lines: dict[int, str] = field(default_factory=dict)  # id(rule) -> source line text

    @property
    def ok(self) -> bool:
        return not self.flagged and not self.warnings


class _Skip(Exception):
    """This line is not carried over; the message says why."""


def _net(text: str, opt: str, notes: list[str], where: str) -> IPv4Network:
    try:
        net = IPv4Network(text if "/" in text else f"{text}/32", strict=False)
    except ValueError:
        raise _Skip(f"{opt} {text}: not an IPv4 address or network") from None
    if str(net) != text and f"{text}/32" != str(net):
        notes.append(f"{where}: {opt} {text} read as {net} (as iptables does)")
    return net


def _pool(text: str) -> tuple[Pool, str | None]:
    """`A[-B][:P1[-P2]]` -> pool and the port part, if any."""
    addr, _, ports = text.partition(":")
    try:
        return Pool.parse(addr), ports or None
    except RuleError as e:
        raise _Skip(f"--to-source {text}: {e.message}") from None


def _tokens(line: str) -> tuple[str, list[str]] | None:
    """The table and the rule tokens of one line, or None for lines with nothing to carry."""
    try:
        tok = shlex.split(line, comments=False)
    except ValueError as e:
        raise _Skip(f"cannot split the line ({e})") from None
    if tok and tok[0] == "sudo":
        tok = tok[1:]
    table = None
    if tok and (tok[0] in _BINARIES or tok[0].endswith("/iptables")):
        tok = tok[1:]
        table = "filter"
    elif tok and tok[0].startswith(("ip6tables", "ebtables", "arptables", "nft")):
        raise _Skip(f"{tok[0]} is not IPv4 iptables")
    out = []
    i = 0
    while i < len(tok):
        if tok[i] in ("-t", "--table") and i + 1 < len(tok):
            table = tok[i + 1]
            i += 2
            continue
        out.append(tok[i])
        i += 1
    return table or "", out


def parse_rule_tokens(tok: list[str], where: str, masq_addr: dict[str, IPv4Address],
                      notes: list[str], seq: int) -> tuple[Rule, int | None]:
    """Tokens of one `-A/-I POSTROUTING ...` rule -> (Rule, insert position or None to append)."""
    if not tok:
        raise _Skip("empty rule")
    cmd = tok[0]
    if cmd in _IGNORED_CMDS:
        raise _Skip(f"{_IGNORED_CMDS[cmd]} command, not a rule")
    if cmd not in ("-A", "--append", "-I", "--insert") or len(tok) < 2:
        raise _Skip(f"{cmd}: only -A/-I rules are carried over")
    chain = tok[1]
    rest = tok[2:]
    pos = None
    if cmd in ("-I", "--insert"):
        pos = 0
        if rest and rest[0].isascii() and rest[0].isdigit():  # not '²' (int() raised), '١' (read 1)
            pos = int(rest[0]) - 1
            rest = rest[1:]
    if chain != "POSTROUTING":
        raise _Skip(f"chain {chain}: only nat POSTROUTING is carried over")
    src, dst, oif, target, to, algo_flags = ANY_NET, ANY_NET, None, None, None, []
    i = 0
    while i < len(rest):
        t = rest[i]
        arg = rest[i + 1] if i + 1 < len(rest) else None
        if t == "!" or (arg == "!" and t in ("-s", "-d", "-o", "--source", "--destination", "--out-interface")):
            raise _Skip("negated match (!): snatgw rules cannot negate")
        if t in ("-s", "--source", "--src", "-d", "--destination", "--dst", "-o", "--out-interface",
                 "-j", "--jump", "--to-source", "--to", "-m", "--match", "--comment"):
            if arg is None:
                raise _Skip(f"{t} without a value")
            i += 2
            if t in ("-s", "--source", "--src", "-d", "--destination", "--dst"):
                if "," in arg:
                    raise _Skip(f"{t} {arg}: several addresses in one rule; write one line each")
                net = _net(arg, t, notes, where)
                if t.startswith(("-s", "--s")):
                    src = net
                else:
                    dst = net
            elif t in ("-o", "--out-interface"):
                if arg.endswith("+"):
                    raise _Skip(f"-o {arg}: interface wildcards have no snatgw equivalent")
                try:
                    oif = parse_oif(arg)
                except RuleError as e:
                    raise _Skip(f"-o {arg}: {e.message}") from None
            elif t in ("-j", "--jump"):
                target = arg
            elif t in ("-m", "--match"):
                if arg != "comment":
                    raise _Skip(f"-m {arg}: match not supported by snatgw rules")
            elif t == "--comment":
                pass
            else:
                if to is not None:
                    raise _Skip("several --to-source: snatgw takes one range per rule")
                to = arg
            continue
        if t in ("--persistent", "--persitent"):
            if t == "--persitent":
                notes.append(f"{where}: read the seed's typo --persitent as --persistent")
            algo_flags.append("persistent")
        elif t in ("--random", "--random-fully"):
            algo_flags.append("random")
            notes.append(f"{where}: {t} randomises ports only (the address is still nf_nat's hash of "
                         "src and dst, as sdh); port randomisation is not carried over: snatgw picks "
                         "ports in the original's sequence")
        elif t in ("-p", "--protocol", "--dport", "--sport", "--destination-port", "--source-port"):
            raise _Skip(f"{t}: snatgw rules match addresses and the route, not protocols or ports")
        elif t in ("-i", "--in-interface"):
            raise _Skip(f"{t}: snatgw rules cannot match the input interface (use the snatgw block's inside)")
        else:
            raise _Skip(f"{t}: option not supported")
        i += 1
    if target is None:
        raise _Skip("no -j target")
    if target == "MASQUERADE":
        if to is not None:
            raise _Skip("MASQUERADE with --to-source")
        if oif and oif in masq_addr:
            to = str(masq_addr[oif])
            notes.append(f"{where}: MASQUERADE on {oif} -> snat_ip {to} (from --masq-addr)")
        else:
            raise _Skip("MASQUERADE: snatgw needs an explicit snat_ip; give --masq-addr "
                        f"{oif or 'IFACE'}=ADDRESS" + ("" if oif else " and an -o interface"))
    elif target != "SNAT":
        raise _Skip(f"-j {target}: only SNAT and MASQUERADE are carried over")
    if to is None:
        raise _Skip("SNAT without --to-source")
    pool, ports = _pool(to)
    if ports:
        notes.append(f"{where}: port range :{ports} dropped; snatgw's port range is global (port_range)")
    algo = Algo.SH if "persistent" in algo_flags else Algo.SDH
    return Rule(src=src, dst=dst, oif=oif, pool=pool, algo=algo, where=where), pos


def import_iptables(text: str, filename: str = "<stdin>",
                    masq_addr: dict[str, IPv4Address] | None = None) -> Imported:
    """Read iptables-save text or iptables command lines; see the module docstring."""
    masq_addr = masq_addr or {}
    out = Imported()
    table = ""
    placed: list[Rule] = []
    seen: dict[tuple, str] = {}
    other: dict[str, int] = {}  # table -> rule lines skipped (not the nat table)
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        where = f"{filename}:{n}"
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if line == "COMMIT" or line.startswith(":"):
            if line.startswith(":") and table == "nat" and line[1:].split()[0] not in (
                    "PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"):  # fmt: skip
                out.notes.append(f"{where}: user chain {line.split()[0][1:]}: its rules are not carried over")
            continue
        if line.startswith("[") and "]" in line:  # iptables-save -c counters
            line = line.split("]", 1)[1].strip()
        try:
            tbl, tok = _tokens(line)
            tbl = tbl or table or "filter"
            if tbl != "nat" and not {"SNAT", "MASQUERADE"} & set(tok):
                other[tbl] = other.get(tbl, 0) + 1  # not an SNAT rule: summarised below
                continue
            if tok and tok[0] in _IGNORED_CMDS:
                out.notes.append(f"{where}: {line}: ignored ({_IGNORED_CMDS[tok[0]]} command)")
                continue
            if tbl != "nat":
                raise _Skip(f"table {tbl}: iptables only accepts SNAT/MASQUERADE in -t nat")
            rule, pos = parse_rule_tokens(tok, where, masq_addr, out.notes, n)
            if rule.identity in seen:
                raise _Skip(f"same -s/-d/-o as {seen[rule.identity]}, which iptables matches first")
            seen[rule.identity] = where
            out.lines[id(rule)] = raw.strip()
            if pos is None:
                placed.append(rule)
            else:
                placed.insert(max(0, min(pos, len(placed))), rule)
        except _Skip as e:
            out.flagged.append((f"{where}: {raw.strip()}", str(e)))
    out.rules = placed
    if not placed and not out.flagged:  # an empty file, another table's dump: say so, not "all carried"
        out.flagged.append((filename, "no SNAT or MASQUERADE rule (nat table, POSTROUTING) to carry over: the "
                            "config has no snat_rule, which `snatgw check` refuses (`iptables-save -t nat`?)"))
    if other:
        tables = ", ".join(f"{t} ({k})" for t, k in sorted(other.items()))
        out.notes.append(f"{filename}: skipped {sum(other.values())} line(s) of other tables, "
                         f"not SNAT rules: {tables}")
    # iptables is first match in chain order; snatgw is most specific first: say where they differ
    order = RuleSet(placed).rules if placed else ()
    rank = {r.identity: i for i, r in enumerate(order)}
    for i, a in enumerate(placed):
        for b in placed[i + 1:]:
            if rank[b.identity] < rank[a.identity] and _overlap(a, b):
                out.warnings.append((f"{b.where}: {out.lines[id(b)]}",
                                    f"order differs: iptables tries {a.where} first, snatgw tries this "
                                    "more specific rule first (most specific wins)"))
    return out


def _overlap(a: Rule, b: Rule) -> bool:
    return a.src.overlaps(b.src) and a.dst.overlaps(b.dst) and (a.oif is None or b.oif is None or a.oif == b.oif)


def render_imported(imp: Imported, source: str = "<stdin>") -> str:
    """Config text: comments for what was not carried over, the snatgw block, the rules."""
    out = [f"# imported by `snatgw import-iptables` from {source}"]
    out += [f"# note: {n}" for n in imp.notes]
    out += [f"# not carried over: {line}: {why}" for line, why in imp.flagged]
    out += [f"# warning: {line}: {why}" for line, why in imp.warnings]
    oifs = sorted({r.oif for r in imp.rules if r.oif})
    out += ["", "snatgw {", "    backend bpf"]
    if oifs:
        out.append(f"    outside {' '.join(oifs)}")
    out += ["}", "", "virtual_server fwmark 1 {"]
    from .config.parse import render_rule

    for r in imp.rules:
        out.append(f"    {render_rule(r)}   # {r.where}: {imp.lines.get(id(r), '')}")
    out.append("}")
    return "\n".join(out) + "\n"


def as_config(imp: Imported) -> GatewayConfig:
    oifs = tuple(sorted({r.oif for r in imp.rules if r.oif}))
    return GatewayConfig(RuleSet(imp.rules), Settings(outside=oifs))


__all__ = ["import_iptables", "render_imported", "as_config", "Imported", "parse_rule_tokens"]
