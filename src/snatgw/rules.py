"""Rules: the SNAT rule, its address pool, validation, priority order and matching.

A rule (lvs-snat's "snat_rule") matches new flows by source net, destination net, and the
route's egress device and next hop; it names a SNAT pool, the algorithm that picks from it,
and optionally a next-hop override (new_gw).  Identity for add/edit/delete and duplicate
detection is (from, to, gw, oif).

Priority (spec "Matching order"), one total order, most specific first:
  1. source prefix length, longest first;
  2. destination prefix length, longest first;
  3. route conditions: both oif and gw, then one of them, then neither;
  4. definition order.
A rule matches when every condition it names holds (oif compared exactly).
"""

from __future__ import annotations

import bisect
import ipaddress
import re
import socket
import unicodedata
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable, NamedTuple

from .errors import RuleError
from .layout import FROM_NET_POOL, FROM_NET_RULE, MAX_FROM_NETS, PORT_STRIDES, SEARCH_TRIES, Algo

ANY_NET = IPv4Network("0.0.0.0/0")
IFNAMSIZ = 16  # oif names are at most 15 characters


def _quad(text: str) -> int | None:
    """A strict dotted quad as an int, or None (then ipaddress decides, and words the error).
    ipaddress's own parser dominated loading 10k rules; inet_pton accepts the same texts
    (four decimal octets, no leading zeros) in C."""
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError):
        return None


#: parse_net's answers by text (a reload parses the same `from` nets again: 10,000 of them were
#: a tenth of a reload); bounded: emptied when full, and only texts of at most _KEPT_TEXT
#: characters are kept (the longest plain one, "255.255.255.255-255.255.255.255", has 31): an
#: adm command may pad a net or pool to megabytes, and each kept would stay in the daemon
_NETS: dict[str, IPv4Network] = {}
_POOLS: dict[str, "Pool"] = {}  # Pool.parse's, the same way
_KEPT_MAX = 32768  # answers each keeps
_KEPT_TEXT = 64


def _kept(kept: dict, text: str, parse):
    """``kept``'s answer for ``text``, else ``parse()``'s, kept (a refusal raises: never kept)."""
    got = kept.get(text)
    if got is None:
        got = parse()
        if len(text) <= _KEPT_TEXT:
            if len(kept) >= _KEPT_MAX:
                kept.clear()
            kept[text] = got
    return got


#: config text, as config/parse.py's _SHOWABLE: an error quotes only such a word and describes
#: any other (a line of /etc/shadow, a 2 MB word), as docs/config.md says; the error of a reload
#: goes into its answer, the log and every `status` answer after it
_CONFIG_TEXT = re.compile(r"[A-Za-z0-9_.:/,+@%\[\]-]{1,64}\Z")


def _quoted(text: str) -> str:
    """``text`` as an error names it: quoted when it is config text, else described."""
    if not text or _CONFIG_TEXT.match(text):
        return repr(text)
    return f"a word of {len(text)} characters that is not config text (not shown)"


def parse_net(text: str, field_name: str, where: str | None = None) -> IPv4Network:
    """``A.B.C.D[/len]`` -> network.  No ``/len`` means a host (/32); host bits are an error."""
    return _kept(_NETS, text, lambda: _parse_net(text, field_name, where))


def _parse_net(text: str, field_name: str, where: str | None = None) -> IPv4Network:
    text = text.strip()
    if ":" in text:
        raise RuleError(f"IPv6 is not supported: {_quoted(text)}", field_name, where)
    addr, _, plen = text.partition("/")
    q = _quad(addr)
    try:
        ip = IPv4Address(q if q is not None else addr)
    except ValueError:
        raise RuleError(f"expected an IPv4 address A.B.C.D[/len], got {_quoted(text)}", field_name, where) from None
    if plen:
        digits = plen.lstrip("0") or "0"  # leading zeros as int() reads them, without its digit limit
        if not (plen.isascii() and plen.isdigit()) or len(digits) > 2 or int(digits) > 32:  # not '²', '١٢'
            got = repr(plen) if len(plen) <= 32 else f"a number of {len(plen)} digits"
            raise RuleError(f"prefix length must be 0..32, got {got}", field_name, where)
        length = int(digits)
    else:
        length = 32
    try:
        return IPv4Network((int(ip), length))
    except ValueError:
        net = IPv4Network(f"{ip}/{length}", strict=False)
        raise RuleError(
            f"{text} has host bits set; did you mean {net}?", field_name, where
        ) from None


def parse_addr(text: str, field_name: str, where: str | None = None) -> IPv4Address:
    text = text.strip()
    q = _quad(text)
    if q is not None:
        return IPv4Address(q)
    try:
        return IPv4Address(text)
    except ValueError:
        raise RuleError(f"expected an IPv4 address A.B.C.D, got {_quoted(text)}", field_name, where) from None


UNSET = IPv4Address(0)


def parse_gw(text: str, field_name: str, where: str | None = None) -> IPv4Address | None:
    """``gw``/``new_gw``: an address, where 0.0.0.0 means unset, as in the original (its
    DEF_SNAT_SRC_GW "all ISPs" for gw, "no override" for new_gw) and in ipvsadm's -S output."""
    addr = parse_addr(text, field_name, where)
    return None if addr == UNSET else addr


def parse_algo(text: str, where: str | None = None) -> Algo:
    try:
        return Algo[text.strip().upper()]
    except KeyError:
        raise RuleError(
            f"unknown ip select algo {_quoted(text.strip())}, should be one of [sh, sdh, random]", "algo", where
        ) from None


def parse_on_exhausted(text: str, where: str | None = None) -> str:
    t = text.strip()
    if t not in ("spill", "drop"):
        raise RuleError(f"expected spill or drop, got {_quoted(t)}", "on_exhausted", where)
    return t


MAPPINGS = ("endpoint-dependent", "endpoint-independent")
FILTERINGS = ("address-port-dependent", "address-dependent", "endpoint-independent")


def parse_choice(text: str, field_name: str, choices: tuple[str, ...], where: str | None = None) -> str:
    t = text.strip()
    if t not in choices:
        raise RuleError(f"expected {' or '.join(choices)}, got {_quoted(t)}", field_name, where)
    return t


def parse_yes_no(text: str, field_name: str, where: str | None = None) -> bool:
    return parse_choice(text, field_name, ("yes", "no"), where) == "yes"


HOST_LIMIT_MAX = (1 << 32) - 1


def parse_host_limit(text: str, where: str | None = None, field_name: str = "max_sessions_per_host") -> int:
    t = text.strip()
    # ASCII digits only: str.isdigit() is true for '²' (int() then raised a traceback) and '١٢'
    # (int() read 12)
    if not (t.isascii() and t.isdigit()) or int(t) > HOST_LIMIT_MAX:
        raise RuleError(f"expected an integer 0..{HOST_LIMIT_MAX} (0 = no limit), got {_quoted(t)}",
                        field_name, where)
    return int(t)


def non_ascii_named(text: str) -> str:
    """Where ``text``'s first non-ASCII character is and which it is ("its character 2 is
    U+0435, CYRILLIC SMALL LETTER IE"), for errors about a word with a look-alike letter."""
    i = next(i for i, c in enumerate(text) if ord(c) > 127)
    return f"its character {i + 1} is U+{ord(text[i]):04X}, {unicodedata.name(text[i], 'unnamed')}"


def parse_oif(text: str, where: str | None = None) -> str:
    name = text.strip()
    if not name.isascii():  # a look-alike letter (Cyrillic 'е' in eth1) names no device: nft's oifname
        got = ascii(name) if len(name) <= 32 and name.isprintable() else f"a word of {len(name)} characters"
        raise RuleError(f"expected an interface name in ASCII, got {got}: {non_ascii_named(name)}: a "
                        "look-alike letter?", "oif", where)  # ... would match nothing, silently
    if not name or len(name) >= IFNAMSIZ:
        raise RuleError(f"expected an interface name of 1..15 characters, got {_quoted(name)}", "oif", where)
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        # the kernel's dev_valid_name refuses these: no device has such a name (eth0:1 is an
        # address label of eth0, not a device); 'a b' or 'a/b' were told "1..15 characters"
        raise RuleError(f"expected an interface name, got {_quoted(name)}: no device can be named so (the kernel "
                        "refuses . and .., '/', ':' and white space; an address label such as eth0:1 is not a "
                        "device)", "oif", where)  # fmt: skip
    if any(c in name for c in '*"\\'):
        # the kernel takes these, but nft reads a trailing '*' as a wildcard (`oif eth*` matches
        # every eth device on nft and none on bpf), and '"' and the backslash as quoting
        raise RuleError(f"expected an interface name without '*', '\"' or a backslash, got {name!r}: nft reads "
                        "'*' as a wildcard and '\"' and the backslash as quoting, so the name would mean other "
                        "devices on nft than on bpf; rename the device", "oif", where)  # fmt: skip
    return name


@dataclass(frozen=True, order=True)
class Pool:
    """A SNAT address range [first, last], inclusive."""

    first: IPv4Address
    last: IPv4Address

    @classmethod
    def parse(cls, text: str, where: str | None = None) -> "Pool":
        if cls is Pool:  # kept by text as parse_net's answers (rules often share one pool)
            return _kept(_POOLS, text, lambda: cls._parse(text, where))
        return cls._parse(text, where)

    @classmethod
    def _parse(cls, text: str, where: str | None = None) -> "Pool":
        text = text.strip()
        if not text:
            raise RuleError("empty pool: expected A or A-B", "snat_ip", where)
        lo, sep, hi = text.partition("-")
        if sep and not (lo.strip() and hi.strip()):  # `192.0.2.1-`: "expected an IPv4 address, got ''" said less
            raise RuleError(f"expected A or A-B, got {_quoted(text)}: an address is missing on one side of "
                            "'-'", "snat_ip", where)
        first = parse_addr(lo, "snat_ip", where)
        last = parse_addr(hi, "snat_ip", where) if sep else first
        if int(last) < int(first):
            raise RuleError(f"max ip smaller than min ip in {text!r}", "snat_ip", where)
        return cls(first, last)

    @property
    def size(self) -> int:
        return int(self.last) - int(self.first) + 1

    def __contains__(self, addr: IPv4Address) -> bool:
        return int(self.first) <= int(addr) <= int(self.last)

    def addresses(self) -> Iterable[IPv4Address]:
        return (IPv4Address(i) for i in range(int(self.first), int(self.last) + 1))

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"

    def short(self) -> str:
        """As ipvsadm lists it: ``a`` when a single address, else ``a-b``."""
        return str(self.first) if self.first == self.last else str(self)


def _quad_text(a: IPv4Address) -> str:
    return socket.inet_ntoa(int(a).to_bytes(4, "big"))


def _net_text(n: IPv4Network) -> str:
    return f"{_quad_text(n.network_address)}/{n.prefixlen}"


class Route(NamedTuple):
    """What the FIB says for a destination: the egress device and the next hop
    (for an on-link destination the next hop is the destination itself)."""

    oif: str
    gw: IPv4Address


@dataclass(frozen=True)
class Rule:
    src: IPv4Network
    pool: Pool
    dst: IPv4Network = ANY_NET
    gw: IPv4Address | None = None
    oif: str | None = None
    new_gw: IPv4Address | None = None
    algo: Algo = Algo.SDH
    on_exhausted: str | None = None  # "spill" | "drop"; None: the global setting
    max_sessions_per_host: int | None = None  # None: the global setting; 0: no limit
    #: "endpoint-independent" (RFC 4787 REQ-1; needs algo sh); None: endpoint-dependent (the original's)
    mapping: str | None = None
    #: of an endpoint-independent mapping: "address-dependent" or "endpoint-independent";
    #: None: address-and-port-dependent
    filtering: str | None = None
    port_preserve: bool | None = None  # None: the global setting
    where: str | None = field(default=None, compare=False)  # "file:line" of its definition

    def __post_init__(self):
        """mapping/filtering combinations that make no sense are refused (file:line: field: ...)."""
        if self.mapping == "endpoint-independent" and self.algo != Algo.SH:
            raise RuleError(f"expected algo sh with mapping endpoint-independent (one public address "
                            f"per inside host), got algo {self.algo.label}", "mapping", self.where)
        if self.filtering not in (None, "address-port-dependent") and not self.eim:
            raise RuleError(f"filtering {self.filtering} expects mapping endpoint-independent in the "
                            "same snat_rule (only a mapping shared by every remote can be filtered "
                            "less strictly)", "filtering", self.where)

    @property
    def eim(self) -> bool:
        """Endpoint-independent mapping (RFC 4787 REQ-1)."""
        return self.mapping == "endpoint-independent"

    @property
    def filter_mode(self) -> str:
        return self.filtering or "address-port-dependent"

    @cached_property
    def identity(self) -> tuple:
        return (self.src, self.dst, self.gw, self.oif)

    @property
    def rule_id(self) -> int:
        """Stable id (counters, sessions): crc32 of the identity, never 0."""
        # kept in the instance dict by hand: functools.cached_property takes a lock per first
        # read (Python 3.11), a tenth of a 10,000-rule RuleSet
        got = self.__dict__.get("_rule_id")
        if got is None:
            got = self.__dict__["_rule_id"] = zlib.crc32(self.identity_text().encode()) or 1
        return got

    def identity_text(self) -> str:
        # the text of str(IPv4Network) and str(IPv4Address), by inet_ntoa (the ids of running
        # sessions hang on these bytes: tests/unit pins them)
        gw = _quad_text(self.gw) if self.gw else "-"
        return f"from {_net_text(self.src)} to {_net_text(self.dst)} gw {gw} oif {self.oif or '-'}"

    def identity_key(self) -> tuple:
        """identity as numbers, for a fast duplicate check (C-level hashing)."""
        return (int(self.src.network_address), self.src.prefixlen, int(self.dst.network_address),
                self.dst.prefixlen, int(self.gw) if self.gw is not None else None, self.oif)  # fmt: skip

    def route_specificity(self) -> int:
        return (self.gw is not None) + (self.oif is not None)

    def match(self, src: IPv4Address, dst: IPv4Address, route: Route | None) -> str | None:
        """None when the rule matches; otherwise why not, in words."""
        if src not in self.src:
            return f"source {src} not in from {self.src}"
        if dst not in self.dst:
            return f"destination {dst} not in to {self.dst}"
        if self.oif is not None and (route is None or route.oif != self.oif):
            return f"route leaves via {route.oif if route else 'nothing'}, rule wants oif {self.oif}"
        if self.gw is not None and (route is None or route.gw != self.gw):
            return f"route next hop is {route.gw if route else 'none'}, rule wants gw {self.gw}"
        return None

    def as_dict(self) -> dict:
        return {
            "from": str(self.src),
            "to": str(self.dst),
            "gw": str(self.gw) if self.gw else None,
            "oif": self.oif,
            "new_gw": str(self.new_gw) if self.new_gw else None,
            "snat_ip": str(self.pool),
            "algo": self.algo.label,
            **({"on_exhausted": self.on_exhausted} if self.on_exhausted else {}),
            **({"max_sessions_per_host": self.max_sessions_per_host}
               if self.max_sessions_per_host is not None else {}),
            **({"mapping": self.mapping} if self.mapping else {}),
            **({"filtering": self.filtering} if self.filtering else {}),
            **({"port_preserve": "yes" if self.port_preserve else "no"} if self.port_preserve is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None) -> "Rule":
        return cls(
            src=parse_net(d["from"], "from", where),
            dst=parse_net(d.get("to") or "0.0.0.0/0", "to", where),
            gw=parse_gw(d["gw"], "gw", where) if d.get("gw") else None,
            oif=parse_oif(d["oif"], where) if d.get("oif") else None,
            new_gw=parse_gw(d["new_gw"], "new_gw", where) if d.get("new_gw") else None,
            pool=Pool.parse(d["snat_ip"], where),
            algo=parse_algo(d.get("algo") or "sdh", where),
            on_exhausted=parse_on_exhausted(d["on_exhausted"], where) if d.get("on_exhausted") else None,
            max_sessions_per_host=(parse_host_limit(str(d["max_sessions_per_host"]), where)
                                   if d.get("max_sessions_per_host") is not None else None),
            mapping=parse_choice(d["mapping"], "mapping", MAPPINGS, where) if d.get("mapping") else None,
            filtering=parse_choice(d["filtering"], "filtering", FILTERINGS, where) if d.get("filtering") else None,
            port_preserve=(parse_yes_no(str(d["port_preserve"]), "port_preserve", where)
                           if d.get("port_preserve") is not None else None),
            where=where,
        )

    def describe(self) -> str:
        parts = [f"from {self.src}"]
        if self.dst != ANY_NET:
            parts.append(f"to {self.dst}")
        if self.gw:
            parts.append(f"gw {self.gw}")
        if self.oif:
            parts.append(f"oif {self.oif}")
        if self.new_gw:
            parts.append(f"new_gw {self.new_gw}")
        parts.append(f"snat_ip {self.pool.short()}")
        parts.append(f"algo {self.algo.label}")
        if self.on_exhausted:
            parts.append(f"on_exhausted {self.on_exhausted}")
        if self.max_sessions_per_host is not None:
            parts.append(f"max_sessions_per_host {self.max_sessions_per_host}")
        if self.mapping:
            parts.append(f"mapping {self.mapping}")
        if self.filtering:
            parts.append(f"filtering {self.filtering}")
        if self.port_preserve is not None:
            parts.append(f"port_preserve {'yes' if self.port_preserve else 'no'}")
        return " ".join(parts)


class _NetIndex:
    """A set of networks (the rules' `from` nets), for what leak_guard_nets and
    leak_guard_passes ask of each pool prefix: whether one of them strictly holds it (a
    lookup per distinct prefix length) and which of them it strictly holds (a bisection of
    the networks by address), so neither walks all the rules for each prefix."""

    def __init__(self, nets: Iterable[IPv4Network]):
        nets = sorted(set(nets), key=lambda n: (int(n.network_address), n.prefixlen))
        self.keys = {(int(n.network_address), n.prefixlen) for n in nets}
        self.lens = sorted({n.prefixlen for n in nets}, reverse=True)
        self.starts = [int(n.network_address) for n in nets]
        self.nets = nets

    def holds(self, p: IPv4Network) -> bool:
        """Some network strictly holds ``p`` (is shorter and contains it)."""
        a = int(p.network_address)
        return any(ln < p.prefixlen and (a & (0xFFFFFFFF << (32 - ln)) & 0xFFFFFFFF, ln) in self.keys
                   for ln in self.lens)  # fmt: skip

    def held_by(self, p: IPv4Network) -> list[IPv4Network]:
        """The networks ``p`` strictly holds (longer, and inside it)."""
        lo = bisect.bisect_left(self.starts, int(p.network_address))
        hi = bisect.bisect_right(self.starts, int(p.broadcast_address))
        return [n for n in self.nets[lo:hi] if n.prefixlen > p.prefixlen]


def leak_guard_nets(rules: Iterable[Rule]) -> dict[IPv4Network, int]:
    """snat_from_nets (docs/datapath.md step 2a and "egress program"), net -> kind: every
    rule's `from` net (FROM_NET_RULE: the egress guard's full check), and the prefixes of the
    rules' pools (FROM_NET_POOL).  The longest match decides, as in the LPM trie.  A source
    whose longest match is a pool prefix is one of our SNAT addresses: it passes the egress
    guard at once, without the FIB's "is it local" (under a catch-all `from` that is every
    translated packet), and no inside host may send with it (step 2a drops it, held by the
    gateway or not).  A pool prefix that is itself a rule's `from` net stays FROM_NET_RULE.
    Pool prefixes fill the room the `from` nets leave in MAX_FROM_NETS: first those inside a
    `from` net (they spare the egress guard its FIB lookup), then the others, each in rule
    order; beyond that the routes alone judge (a held pool address is local: dropped too)."""
    if isinstance(rules, RuleSet):
        return rules.leak_guard_nets()
    return _leak_guard_nets(list(rules))


def _leak_guard_nets(rules: list[Rule]) -> dict[IPv4Network, int]:
    nets: dict[IPv4Network, int] = {}
    for r in rules:
        nets.setdefault(r.src, FROM_NET_RULE)
    froms = _NetIndex(nets)
    pools = dict.fromkeys((r.pool.first, r.pool.last) for r in rules)  # each pool once, in rule order
    prefixes = [p for first, last in pools for p in ipaddress.summarize_address_range(first, last)]
    room = MAX_FROM_NETS - len(nets)
    for p in [p for p in prefixes if froms.holds(p)] + [p for p in prefixes if not froms.holds(p)]:
        if room <= 0:
            break
        if p not in nets:
            nets[p] = FROM_NET_POOL
            room -= 1
    return nets


def leak_guard_passes(rules: Iterable[Rule]) -> list[IPv4Network]:
    """The addresses of the `from` nets that the egress guard passes at once as a pool's
    (leak_guard_nets: those whose longest match is FROM_NET_POOL), as few merged prefixes: the
    pool prefixes inside a `from` net less every `from` net inside one (the longer match,
    which takes the full check).  The leak guard's nft table (datapath/bpf/guard.py) passes the
    same, so a translated packet the kernel forwards (over the MTU without DF) is judged as a
    redirected one is."""
    return _pool_matches(rules, within_from=True)


def pool_sources(rules: Iterable[Rule]) -> list[IPv4Network]:
    """Every address whose longest match in leak_guard_nets is a pool prefix (FROM_NET_POOL),
    inside a `from` net or not, as few merged prefixes: the sources step 2a of the inside
    program refuses from an inside device whatever the routes say, held by the gateway or not
    (docs/datapath.md).  The nft backend drops the same in its antispoof chain, so both refuse
    an unheld pool address on an inside subnet (corpus `spoofed_pool_source_in_no_from_net`)."""
    return _pool_matches(rules, within_from=False)


def _pool_matches(rules: Iterable[Rule], within_from: bool) -> list[IPv4Network]:
    """The FROM_NET_POOL prefixes of leak_guard_nets (only those inside a `from` net when
    ``within_from``) less the `from` nets inside them, merged."""
    nets = leak_guard_nets(rules)
    froms = _NetIndex(n for n, kind in nets.items() if kind == FROM_NET_RULE)
    out: list[IPv4Network] = []
    for p, kind in nets.items():
        if kind != FROM_NET_POOL or (within_from and not froms.holds(p)):
            continue
        parts = [p]
        for f in froms.held_by(p):
            nxt: list[IPv4Network] = []
            for part in parts:
                if part.subnet_of(f):
                    continue
                nxt += part.address_exclude(f) if f.subnet_of(part) else [part]
            parts = nxt
        out += parts
    return list(ipaddress.collapse_addresses(out))


def priority_key(rule: Rule, seq: int) -> tuple:
    return (-rule.src.prefixlen, -rule.dst.prefixlen, -rule.route_specificity(), seq)


class RuleSet:
    """Rules in priority order.  Built from rules in definition order; refuses duplicates."""

    def __init__(self, rules: Iterable[Rule] = ()):
        defined = list(rules)
        seen: dict[tuple, Rule] = {}
        for r in defined:
            key = r.identity_key()
            if key in seen:
                first = seen[key]
                raise RuleError(
                    f"duplicate rule: same from/to/gw/oif as the rule at {first.where or '?'} "
                    f"({r.identity_text()}); edit that rule instead of adding another",
                    "snat_rule",
                    r.where,
                )
            seen[key] = r
        ids: dict[int, Rule] = {}
        for r in defined:
            if r.rule_id in ids:  # pragma: no cover - crc32 collision of two identities
                raise RuleError(f"rule id collision with {ids[r.rule_id].identity_text()}", "snat_rule", r.where)
            ids[r.rule_id] = r
        order = sorted(range(len(defined)), key=lambda i: priority_key(defined[i], i))
        self.rules: tuple[Rule, ...] = tuple(defined[i] for i in order)
        self.defined: tuple[Rule, ...] = tuple(defined)
        self._guard_nets: dict[IPv4Network, int] | None = None  # leak_guard_nets(), once

    def leak_guard_nets(self) -> dict[IPv4Network, int]:
        """rules.leak_guard_nets of these rules, computed once (an install asks two or three
        times: 10,000 rules, 0.05 s each); a copy each time, so no caller edits the kept one."""
        if self._guard_nets is None:
            self._guard_nets = _leak_guard_nets(list(self.rules))
        return dict(self._guard_nets)

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __eq__(self, other) -> bool:
        return isinstance(other, RuleSet) and self.rules == other.rules

    def match(self, src: IPv4Address, dst: IPv4Address, route: Route | None) -> Rule | None:
        for r in self.rules:
            if r.match(src, dst, route) is None:
                return r
        return None

    def first(self, src: IPv4Address, dst: IPv4Address, route: Route | None) -> Rule | None:
        """match()'s answer (the datapath's: the first rule in priority order whose conditions
        hold) by an index built once per RuleSet, not a walk of every rule before it: one dict
        look-up per distinct (from, to) prefix-length pair, then the few rules of that pair of
        nets (a peer's sync records ask it for each record; 10,000 rules were 40 ms a record)."""
        idx = self.__dict__.get("_first")
        if idx is None:
            idx = self.__dict__["_first"] = _FirstMatch(self.rules)
        return idx.match(src, dst, route)

    def explain(self, src, dst, route) -> tuple[Rule | None, list[tuple[Rule, str]]]:
        """The matching rule and, for every rule before it and after, why it did not win."""
        winner = None
        why: list[tuple[Rule, str]] = []
        for r in self.rules:
            reason = r.match(src, dst, route)
            if reason is None and winner is None:
                winner = r
                why.append((r, "MATCH"))
            elif reason is None:
                why.append((r, f"would match, but {winner.describe()!r} comes first"))
            else:
                why.append((r, reason))
        return winner, why

    def shadowed(self, work: list[int] | None = None) -> list[tuple[Rule, list[Rule]]]:
        """(rule, the earlier rules that match first every packet it matches) for rules that can
        never match.  An earlier rule can take a later one's packets when its destination contains
        the later one's and its route conditions are a subset of the later one's; the later rule
        is lost when the source nets of such earlier rules jointly cover its own.  (With this
        priority order one earlier rule alone covers a later one only if they are duplicates,
        which are refused, so a cover is always several rules.)

        Such an earlier rule's source lies strictly inside the later one's (a longer prefix:
        sources nest or are disjoint, and a shorter or equal one would come later or be a
        duplicate), so the search needs no pairs: rules are grouped by (to, gw, oif); a rule asks
        only the groups it could lose to (a `to` containing its own, gw and oif unset or its
        own), and in each the union of the sources longer than its own, kept as merged
        intervals.  Work per rule is a few bisections per group asked (O(n log n) for a rule
        set, where the pairwise search was O(n^2)); ``work``, when given, counts them."""
        return _ShadowSearch(self.rules, work).run()

    def by_identity(self, identity: tuple) -> Rule | None:
        for r in self.rules:
            if r.identity == identity:
                return r
        return None


class _FirstMatch:
    """RuleSet.first()'s index.  The priority order sorts by `from` prefix length, then `to`
    prefix length, then route conditions and definition: so the rules of one (from length, to
    length) pair are contiguous, the pairs in priority order, and within a pair the rules of one
    (from net, to net) keep their order.  A flow's first match is therefore the first rule whose
    route conditions hold among those of its masked (from, to) nets, in the first pair that has
    one."""

    def __init__(self, rules: tuple[Rule, ...]):
        self.pairs: list[tuple[int, int, dict[tuple[int, int], list[Rule]]]] = []
        for r in rules:
            slen, dlen = r.src.prefixlen, r.dst.prefixlen
            if not self.pairs or self.pairs[-1][:2] != (slen, dlen):
                self.pairs.append((slen, dlen, {}))
            key = (int(r.src.network_address), int(r.dst.network_address))
            self.pairs[-1][2].setdefault(key, []).append(r)

    def match(self, src: IPv4Address, dst: IPv4Address, route: Route | None) -> Rule | None:
        s, d = int(src), int(dst)
        for slen, dlen, nets in self.pairs:
            got = nets.get((s & (0xFFFFFFFF << (32 - slen)) & 0xFFFFFFFF, d & (0xFFFFFFFF << (32 - dlen)) & 0xFFFFFFFF))
            if got is None:
                continue
            for r in got:
                if r.match(src, dst, route) is None:
                    return r
        return None


class _ShadowSearch:
    """RuleSet.shadowed()'s index: per group (to, gw, oif), the sources of its rules, and per
    prefix length L asked for, the union of those longer than L as sorted disjoint intervals."""

    def __init__(self, rules: tuple[Rule, ...], work: list[int] | None):
        self.rules = rules
        self.work = work if work is not None else [0]
        self.groups: dict[tuple, list[tuple[int, int, int, int]]] = {}  # key -> (start, prio, end, plen)
        for prio, r in enumerate(rules):
            key = (int(r.dst.network_address), r.dst.prefixlen, r.gw, r.oif)
            self.groups.setdefault(key, []).append(
                (int(r.src.network_address), prio, int(r.src.broadcast_address), r.src.prefixlen))
        for members in self.groups.values():
            members.sort()
        self.dst_lens = sorted({k[1] for k in self.groups}, reverse=True)
        self.unions: dict[tuple, tuple[list[int], list[int]]] = {}

    def union(self, key: tuple, longer_than: int) -> tuple[list[int], list[int]]:
        """Starts and ends of the merged sources of group ``key`` longer than ``longer_than``."""
        got = self.unions.get((key, longer_than))
        if got is None:
            starts: list[int] = []
            ends: list[int] = []
            for start, _, end, plen in self.groups[key]:
                if plen <= longer_than:
                    continue
                if ends and start <= ends[-1] + 1:
                    ends[-1] = max(ends[-1], end)
                else:
                    starts.append(start)
                    ends.append(end)
            self.work[0] += len(self.groups[key])
            got = self.unions[(key, longer_than)] = (starts, ends)
        return got

    def rivals(self, r: Rule) -> list[tuple]:
        """The groups whose rules could take packets of ``r``: a `to` containing r's, gw and oif
        each unset or r's own."""
        d = int(r.dst.network_address)
        out = []
        for plen in self.dst_lens:
            if plen > r.dst.prefixlen:
                continue
            net = d & ((0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF)
            for gw in {None, r.gw}:
                for oif in {None, r.oif}:
                    self.work[0] += 1
                    if (net, plen, gw, oif) in self.groups:
                        out.append((net, plen, gw, oif))
        return out

    def covered(self, r: Rule, groups: list[tuple]) -> bool:
        lo, hi, plen = int(r.src.network_address), int(r.src.broadcast_address), r.src.prefixlen
        unions = [self.union(k, plen) for k in groups]
        reach = lo  # every source below `reach` is taken by an earlier rule
        while reach <= hi:
            best = -1
            for starts, ends in unions:
                self.work[0] += 1
                i = bisect.bisect_right(starts, reach) - 1
                if i >= 0 and ends[i] >= reach:
                    best = max(best, ends[i])
            if best < 0:
                return False
            reach = best + 1
        return True

    def cover(self, r: Rule, groups: list[tuple]) -> list[Rule]:
        """The earlier rules whose sources jointly cover r's, swept in address order."""
        lo, hi, plen = int(r.src.network_address), int(r.src.broadcast_address), r.src.prefixlen
        cands = []
        for k in groups:
            members = self.groups[k]
            i = bisect.bisect_left(members, (lo, -1, 0, 0))
            while i < len(members) and members[i][0] <= hi:
                self.work[0] += 1
                if members[i][3] > plen:
                    cands.append(members[i])
                i += 1
        reach, used = lo, []
        for start, prio, end, _ in sorted(cands):
            if start > reach:
                break
            if end >= reach:
                reach, used = end + 1, used + [self.rules[prio]]
        return used

    def run(self) -> list[tuple[Rule, list[Rule]]]:
        out = []
        for r in self.rules:
            groups = self.rivals(r)
            if groups and self.covered(r, groups):
                out.append((r, self.cover(r, groups)))
        return out


# --------------------------------------------------------------------------- selection


def jhash_3words(a: int, b: int, c: int, initval: int = 0) -> int:
    """Bob Jenkins' lookup2 as in Linux 2.6.32 include/linux/jhash.h (not today's lookup3)."""
    m = 0xFFFFFFFF
    a = (a + 0x9E3779B9) & m
    b = (b + 0x9E3779B9) & m
    c = (c + initval) & m
    a = (a - b - c) & m; a ^= c >> 13
    b = (b - c - a) & m; b ^= (a << 8) & m
    c = (c - a - b) & m; c ^= b >> 13
    a = (a - b - c) & m; a ^= c >> 12
    b = (b - c - a) & m; b ^= (a << 16) & m
    c = (c - a - b) & m; c ^= b >> 5
    a = (a - b - c) & m; a ^= c >> 3
    b = (b - c - a) & m; b ^= (a << 10) & m
    c = (c - a - b) & m; c ^= b >> 15
    return c  # fmt: skip


def raw_addr(addr: IPv4Address) -> int:
    """An address's 4 wire bytes read as a little-endian u32 (1.2.3.4 -> 0x04030201)."""
    return int.from_bytes(addr.packed, "little")


def raw_port(port: int) -> int:
    """A port's 2 wire bytes read as a little-endian u16 (40000 = 0x9C40 -> 0x409C)."""
    return ((port & 0xFF) << 8) | (port >> 8)


def select_index(pool: Pool, algo: Algo, src: IPv4Address, dst: IPv4Address, sport: int) -> int:
    """The chosen address's index in the pool, exactly as lvs-snat chose it (spec "Choosing
    the SNAT address")."""
    n = pool.size
    if n == 1:
        return 0
    if algo == Algo.SH:
        k = (raw_addr(src), 0, 0)
    elif algo == Algo.SDH:
        k = (raw_addr(src), raw_addr(dst), 0)
    else:
        p = raw_port(sport)
        k = (raw_addr(src), raw_addr(dst), (p << 16) | p)
    h = jhash_3words(*k)
    return (h * n) >> 32


def select_addr(pool: Pool, algo: Algo, src: IPv4Address, dst: IPv4Address, sport: int) -> IPv4Address:
    """The SNAT address, exactly as lvs-snat chose it (spec "Choosing the SNAT address")."""
    return IPv4Address(int(pool.first) + select_index(pool, algo, src, dst, sport))


def spill_order(pool: Pool, first: int, spill: bool, tries: int) -> list[IPv4Address]:
    """The addresses a new flow searches: the chosen one (index ``first``), then, with
    ``spill``, the pool's others in fixed order after it, wrapping; as many as keep the whole
    search within SEARCH_TRIES candidates at ``tries`` per address (docs/datapath.md step 13)."""
    n = min(pool.size, max(1, SEARCH_TRIES // max(tries, 1))) if spill else 1
    return [IPv4Address(int(pool.first) + (first + k) % pool.size) for k in range(n)]


def port_seed(src: IPv4Address, dst: IPv4Address, sport: int, dport: int, proto: int) -> int:
    """The per-flow seed of the port search: lookup2 over the whole OUT key (raw wire words,
    as the BPF reads them; the protocol as initval)."""
    return jhash_3words(raw_addr(src), raw_addr(dst), (raw_port(sport) << 16) | raw_port(dport), proto)


def port_candidates(sport: int, port_min: int, port_max: int, tries: int, seed: int = 0,
                    preserve: bool = False) -> Iterable[int]:
    """The port search (docs/datapath.md step 13).  First the original's candidate
    ``min + ((c + 1) mod n)`` (c: the raw source port), so an uncontended flow's port is
    predictable; then a per-flow sequence that does not cluster: double hashing over the
    range, start ``(seed * n) >> 32`` and stride ``PORT_STRIDES[seed % 64] mod n`` (coprime to
    n), the first candidate's slot replaced by the sequence's last, so the first n candidates
    are every port once.  At most ``min(tries, n)`` candidates.

    ``preserve`` (`port_preserve yes`) with ``sport`` in the range: ``sport`` itself first, then
    that sequence's first ``tries - 1``, where ``sport`` would come again the sequence's
    candidate ``tries - 1`` instead (so still distinct, still every port once when tries = n)."""
    seq = list(_sequence(sport, port_min, port_max, tries, seed))
    if not preserve or not port_min <= sport <= port_max or not seq:
        yield from seq
        return
    yield sport
    for c in seq[: len(seq) - 1]:
        yield seq[-1] if c == sport else c


def _sequence(sport: int, port_min: int, port_max: int, tries: int, seed: int) -> Iterable[int]:
    n = port_max - port_min + 1
    if n <= 0:
        return
    tries = min(tries, n)
    if tries <= 0:
        return
    first = (raw_port(sport) + 1) % n
    yield port_min + first
    start = (seed * n) >> 32
    stride = PORT_STRIDES[seed % len(PORT_STRIDES)] % n
    for j in range(tries - 1):
        o = (start + j * stride) % n
        if o == first:
            o = (start + (n - 1) * stride) % n
        yield port_min + o


__all__ = [
    "ANY_NET", "Pool", "Route", "Rule", "RuleSet", "parse_net", "parse_addr", "parse_algo",
    "parse_oif", "parse_gw", "select_addr", "select_index", "spill_order", "port_seed", "port_candidates", "jhash_3words", "raw_addr", "raw_port",
    "priority_key", "ipaddress",
]  # fmt: skip
