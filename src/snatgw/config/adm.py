"""The patched ipvsadm's SNAT syntax (reference §5) as pure code: argv -> AdmCommand, and the
rule table those commands edit (AdmTable: service on/off + rules in definition order).

    -A -f 1 -s snat_sched                       enable the SNAT service
    -D -f 1                                     disable it (drops every rule)
    -K|-k -f 1 -F NET [-T NET] [-W GW] [--oif IF] [-N NEWGW] -U A[-B] [-O sh|sdh|random]
    -H -f 1 -F NET [-T NET] [-W GW] [--oif IF]  (-U/-O/-N accepted and ignored)
    -L -n [-c] [--stats|--rate] [-X|--exact]    list rules (precedence order) / sessions / counters
    -S [-n]   -R   -C   -Z   -h
    (-R replaces the rules with the batch it reads; see AdmTable.apply_all)

No I/O here: the CLI sends argv lists to the daemon, which parses them again with this module and
applies them to its AdmTable in one batch (all or nothing).  Errors: AdmUsageError (exit 2,
bad arguments), AdmRefused (the table refuses: EEXIST, ENOENT, ESRCH, carries ``code``).
"""

from __future__ import annotations

import getopt
import shlex
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network

from ..errors import DaemonError, RuleError, SnatgwError
from ..layout import MAX_RULES, Algo
from ..rules import ANY_NET, Pool, Rule, RuleSet, parse_addr, parse_algo, parse_net, parse_oif
from ..rules import _quoted as quoted  # config text quoted, any other word described (docs/config.md)

SCHEDULER = "snat_sched"
FWMARK = 1
ANY_ADDR = IPv4Address("0.0.0.0")


class AdmUsageError(SnatgwError):
    """Bad arguments (ipvsadm exits 2 with a one-line message)."""


class AdmRefused(DaemonError):
    """The rule table refuses a command; ``code`` is the errno name the original would give."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


# command letter -> op name (ipvsadm's long option names in comments)
_COMMANDS = {
    "-A": "add-service", "--add-service": "add-service",
    "-E": "edit-service", "--edit-service": "edit-service",
    "-D": "delete-service", "--delete-service": "delete-service",
    "-K": "add", "--add-snat": "add",
    "-k": "edit", "--edit-snat": "edit",
    "-H": "delete", "--delete-snat": "delete",
    "-L": "list", "-l": "list", "--list": "list",
    "-Z": "zero", "--zero": "zero",
    "-S": "save", "--save": "save",
    "-R": "restore", "--restore": "restore",
    "-C": "clear", "--clear": "clear",
    "-h": "help", "--help": "help",
}  # fmt: skip
MUTATING = frozenset({"add-service", "edit-service", "delete-service", "add", "edit", "delete", "clear"})

#: ipvsadm's letters where they mean the same; where ipvsadm gives a letter another meaning,
#: snatgw does not take it for something else: -x is ipvsadm's --u-threshold N, and --exact is -X
#: there (in its option table, both the stock 1.31 and the patched one, though ipvsadm(8) shows
#: no short form); snatgw read -x as --exact, so `-x 100` was --exact and a stray word
_SHORT = "AEDKkHLlZSRChncXbmgijF:T:W:N:U:O:f:s:t:u:p:"
_LONG = [
    "add-service", "edit-service", "delete-service", "add-snat", "edit-snat", "delete-snat",
    "list", "zero", "save", "restore", "clear", "help",
    "fwmark-service=", "scheduler=", "from=", "to=", "gw=", "new-gw=", "snat-ip=", "algo=", "oif=",
    "numeric", "connection", "stats", "rate", "exact", "nosort", "fullnat", "masquerading",
    "gatewaying", "ipip", "tcp-service=", "udp-service=", "persistent=", "socket=", "json",
]  # fmt: skip


@dataclass(frozen=True)
class AdmCommand:
    """One parsed ipvsadm command line (only what the SNAT service uses)."""

    op: str
    fwmark: int | None = None
    scheduler: str | None = None
    src: IPv4Network | None = None
    dst: IPv4Network = ANY_NET
    gw: IPv4Address | None = None
    oif: str | None = None
    new_gw: IPv4Address | None = None
    pool: Pool | None = None
    algo: Algo = Algo.SDH
    numeric: bool = False
    conns: bool = False
    stats: bool = False
    rate: bool = False
    exact: bool = False
    json: bool = False
    socket: str | None = None
    argv: tuple[str, ...] = field(default=(), compare=False)

    @property
    def identity(self) -> tuple:
        return (self.src, self.dst, self.gw, self.oif)

    def rule(self, where: str | None = None) -> Rule:
        assert self.src is not None and self.pool is not None
        return Rule(src=self.src, dst=self.dst, gw=self.gw, oif=self.oif, new_gw=self.new_gw,
                    pool=self.pool, algo=self.algo, where=where)


def _gw(text: str, name: str) -> IPv4Address | None:
    """-W/-N: an address; a /len suffix is ignored as in the original; 0.0.0.0 means none."""
    addr = parse_addr(text.partition("/")[0], name)
    return None if addr == ANY_ADDR else addr


#: words of one command (the longest real one has ~20); getopt's cost grows with the square of
#: the count: 100,000 words held the daemon's worker 43 s
MAX_ARGS = 64
#: commands of one batch (an `-R` of a full rule table is MAX_RULES + 1)
MAX_COMMANDS = 4 * MAX_RULES


def _word(v: str) -> str:
    """An argument as an error names it: as given when it is config text, else described."""
    return v if quoted(v).startswith("'") else quoted(v)


def parse_args(argv: list[str] | tuple[str, ...]) -> AdmCommand:
    """ipvsadm argv (without the program name) -> AdmCommand, or AdmUsageError."""
    if len(argv) > MAX_ARGS:
        raise AdmUsageError(f"{len(argv)} arguments; a command has at most {MAX_ARGS}")
    if not all(isinstance(a, str) for a in argv):
        raise AdmUsageError("arguments must be strings")
    try:
        opts, rest = getopt.gnu_getopt(list(argv), _SHORT, _LONG)
    except getopt.GetoptError as e:
        dash = "-" if len(e.opt) == 1 else "--"
        said = _IPVSADM_ONLY.get(e.opt)
        if said is not None:  # ipvsadm's own, not a typo: what it is, and snatgw's way to do it
            raise AdmUsageError(f"{dash}{e.opt} ({said[0]}) is ipvsadm's, not snatgw's: {said[1]}") from None
        refused = _refused(dash + e.opt)  # e.g. `-p` without its (in ipvsadm optional) timeout
        msg = e.msg if quoted(e.opt).startswith("'") else f"option {quoted(e.opt)} not recognized"
        raise AdmUsageError(refused or f"{msg} (see snatgw adm --help)") from None
    if rest:  # (the daemon's answer to its `adm` op carries it: a 2 MB word or a line of /etc/shadow, described)
        hint = _stray_hint(argv, rest[0])
        raise AdmUsageError(f"unexpected argument {quoted(rest[0])}{hint} (see snatgw adm --help)")
    ops = {_COMMANDS[o] for o, _ in opts if o in _COMMANDS}
    if sum(o in _COMMANDS for o, _ in opts) > 1:  # ipvsadm: -K -K is refused too
        raise AdmUsageError("multiple commands specified")
    seen: dict[str, str] = {}
    for o, _ in opts:  # ipvsadm: a value given twice is refused, never the last one taken
        name = _VALUE_OPTS.get(o)
        if name is not None:
            if name in seen:
                raise AdmUsageError(f"multiple {name} options specified ({seen[name]} and {o})")
            seen[name] = o
    kw: dict = {"argv": tuple(argv)}
    given: set[str] = set()
    try:
        for o, v in opts:
            if o in _COMMANDS:
                continue
            given.add(o)
            if o in ("-f", "--fwmark-service"):
                if not (v.strip().isascii() and v.strip().isdigit()) or int(v) != FWMARK:
                    raise AdmUsageError(f"-f {_word(v)}: only fwmark 1 is the SNAT service (use -f 1)")
                kw["fwmark"] = FWMARK
            elif o in ("-s", "--scheduler"):
                if v != SCHEDULER:
                    raise AdmUsageError(f"-s {_word(v)}: the SNAT service's scheduler is {SCHEDULER}")
                kw["scheduler"] = v
            elif o in ("-F", "--from"):
                kw["src"] = parse_net(v, "-F/--from")
            elif o in ("-T", "--to"):
                kw["dst"] = parse_net(v, "-T/--to")
            elif o in ("-W", "--gw"):
                kw["gw"] = _gw(v, "-W/--gw")
            elif o in ("-N", "--new-gw"):
                kw["new_gw"] = _gw(v, "-N/--new-gw")
            elif o in ("-U", "--snat-ip"):
                kw["pool"] = Pool.parse(v, None)
            elif o in ("-O", "--algo"):
                kw["algo"] = parse_algo(v)
            elif o == "--oif":
                kw["oif"] = parse_oif(v)
            elif o in ("-n", "--numeric", "--nosort", "-b", "--fullnat"):
                kw["numeric"] = kw.get("numeric", False) or o in ("-n", "--numeric")
            elif o in ("-c", "--connection"):
                kw["conns"] = True
            elif o == "--stats":
                kw["stats"] = True
            elif o == "--rate":
                kw["rate"] = True
            elif o in ("-X", "--exact"):
                kw["exact"] = True
            elif o in ("-j", "--json"):
                kw["json"] = True
            elif o == "--socket":
                kw["socket"] = v
            else:
                raise AdmUsageError(_refused(o) or f"unknown option {o}")
    except RuleError as e:
        raise AdmUsageError(f"illegal {e.field or 'argument'}: {e.message}") from None
    if ops:
        op = ops.pop()
    elif given & {"-c", "--connection", "--stats", "--rate"}:
        op = "list"
    else:
        raise AdmUsageError("no command specified (one of -A -D -K -k -H -L -S -R -C -Z; see --help)")
    cmd = AdmCommand(op=op, **kw)
    _check(cmd, given)
    return cmd


def _refused(o: str) -> str | None:
    """Options declared so that their value is not read as a stray word, and refused."""
    if o in ("-m", "--masquerading", "-g", "--gatewaying", "-i", "--ipip"):
        return f"{o}: snatgw only source-NATs (the original's fullnat, -b)"
    if o in ("-t", "--tcp-service", "-u", "--udp-service", "-p", "--persistent"):
        return f"{o}: only the SNAT service -f 1 -s {SCHEDULER} is supported"
    return None


#: flags of snatgw (and the patched ipvsadm) that another ipvsadm gives a value: the word after
#: them is that value, not a stray argument, and the error says so
_VALUE_ELSEWHERE = {
    "-b": "-b is the patched ipvsadm's --fullnat and takes no value; stock ipvsadm's -b is "
          "--sched-flags FLAGS, which snat_sched has none of",
    "-j": "-j is snatgw's --json and takes no value; the patched ipvsadm's -j is --synproxy "
          "enable|disable, which the SNAT service never uses",
}  # fmt: skip


def _stray_hint(argv, word: str) -> str:
    """': ' + why ``word`` came to stand alone, when the word before it is one of _VALUE_ELSEWHERE."""
    flags = [f for f, a in zip(argv, argv[1:]) if a == word and f in _VALUE_ELSEWHERE]
    return f": {_VALUE_ELSEWHERE[flags[0]]}" if flags else ""


_REAL = "real servers mean nothing to SNAT: a rule is added with -K, edited with -k and deleted with -H"
_SYNC = ("snatgw syncs its sessions itself: sync_peer, sync_local and sync_key in the snatgw { } block "
         "(bpf backend; nft: conntrackd), docs/operations.md \"Stateful failover\"")
_THRESH = ("a SNAT service has no real servers, so no connection thresholds (max_sessions_per_host in the "
           "config limits an inside host's sessions)")
_LADDR = ("a SNAT rule's public addresses are its pool, given with the rule: -U/--snat-ip A[-B] "
          "(snat_ip in the config); -L lists them with each rule, `snatgw stats` each address's sessions")
#: options ipvsadm (and the patched one) accepts that snatgw cannot do (getopt's name, no dashes) ->
#: (what it is, what to do instead): said as such, not as an unknown option, as if a typo
_IPVSADM_ONLY = {
    "a": ("add a real server", _REAL), "add-server": ("add a real server", _REAL),
    "e": ("edit a real server", _REAL), "edit-server": ("edit a real server", _REAL),
    "d": ("delete a real server", _REAL), "delete-server": ("delete a real server", _REAL),
    "r": ("a real server's address", _REAL), "real-server": ("a real server's address", _REAL),
    "w": ("a real server's weight", _REAL), "weight": ("a real server's weight", _REAL),
    "x": ("--u-threshold, a real server's upper connection threshold",
          _THRESH + "; exact counters are --exact (-X, capital, as in ipvsadm)"),
    "u-threshold": ("a real server's upper connection threshold", _THRESH),
    "y": ("--l-threshold, a real server's lower connection threshold", _THRESH),
    "l-threshold": ("a real server's lower connection threshold", _THRESH),
    "thresholds": ("the listing's threshold columns", _THRESH),
    "set": ("IPVS's connection timeouts", "the timeouts are `timeout NAME SECONDS` lines in the config's "
            "snatgw { } block (timeout tcp_established 7440, timeout udp 300), applied by a reload"),
    "timeout": ("list IPVS's timeouts", "`snatgw check CONFIG` lists the timeouts in force (settings, "
                "timeouts), `snatgw status -j` the running config's"),
    "start-daemon": ("IPVS's connection sync daemon", _SYNC), "stop-daemon": ("IPVS's connection sync daemon", _SYNC),
    "daemon": ("list the sync daemon", _SYNC), "syncid": ("the sync daemon's id", _SYNC),
    "mcast-interface": ("the sync daemon's interface", _SYNC),
    "persistent-conn": ("the listing's persistence columns", "snatgw has no persistent services; algo sh "
                        "keeps an inside host on one SNAT address"),
    "M": ("persistence netmask", "snatgw has no persistent services; algo sh keeps an inside host on one address"),
    "netmask": ("persistence netmask", "snatgw has no persistent services; algo sh keeps an inside host on one "
                "address"),
    "sort": ("sort the listing", "`-L` lists the rules in precedence order, the order a new flow tries them"),
    "o": ("one-packet scheduling", "every new flow gets a session (a UDP flow's replies need it)"),
    "ops": ("one-packet scheduling", "every new flow gets a session (a UDP flow's replies need it)"),
    "pe": ("a persistence engine", "snatgw has no persistent services"),
    "sched-flags": ("stock ipvsadm's scheduler flags, -b there",
                    f"{SCHEDULER} has no flags; snatgw's -b is the patched ipvsadm's --fullnat"),
    "synproxy": ("the patched ipvsadm's SYN proxy switch", "the SNAT service never uses the SYN proxy"),
    "6": ("an IPv6 fwmark service", "snatgw translates IPv4 only"),
    "ipv6": ("an IPv6 fwmark service", "snatgw translates IPv4 only"),
    "sctp-service": ("an SCTP virtual service", f"only the SNAT service -f 1 -s {SCHEDULER} is supported"),
    "sync-maxlen": ("the sync daemon's datagram size", _SYNC), "mcast-group": ("the sync daemon's group", _SYNC),
    "mcast-port": ("the sync daemon's port", _SYNC), "mcast-ttl": ("the sync daemon's TTL", _SYNC),
    "tun-info": ("the listing's tunnel columns", "snatgw only source-NATs (the original's fullnat, -b)"),
    **{t: ("a real server's tunnel", "snatgw only source-NATs (the original's fullnat, -b)")
       for t in ("tun-type", "tun-port", "tun-nocsum", "tun-csum", "tun-remcsum")},
    "v": ("print the version", "`snatgw --version`"), "version": ("print the version", "`snatgw --version`"),
    # the patched ipvsadm's FULLNAT local addresses, which a SNAT rule's pool replaces
    **{o: ("the patched ipvsadm's FULLNAT local-address " + what, _LADDR)
       for what, names in (("add", ("P", "add-laddr")), ("delete", ("Q", "del-laddr")),
                           ("listing", ("G", "get-laddr")), ("option", ("z", "laddr")))
       for o in names},
}  # fmt: skip

#: options that take a value, by the name an error gives them (short and long spelling are one)
_VALUE_OPTS = {o: name for name in ("-f/--fwmark-service", "-s/--scheduler", "-F/--from", "-T/--to",
                                    "-W/--gw", "-N/--new-gw", "-U/--snat-ip", "-O/--algo")
               for o in name.split("/")} | {"--oif": "--oif", "--socket": "--socket"}  # fmt: skip

_RULE_OPTS = {"-F", "--from", "-T", "--to", "-W", "--gw", "-N", "--new-gw", "-U", "--snat-ip",
              "-O", "--algo", "--oif"}  # fmt: skip


def _check(cmd: AdmCommand, given: set[str]) -> None:
    """Which options each command needs and accepts (ipvsadm's option/command table)."""
    flag = {"add": "-K", "edit": "-k", "delete": "-H", "add-service": "-A", "edit-service": "-E",
            "delete-service": "-D"}.get(cmd.op, "-" + cmd.op[0].upper())  # fmt: skip
    if cmd.op in ("add", "edit", "delete", "add-service", "edit-service", "delete-service"):
        if cmd.fwmark is None:
            raise AdmUsageError(f"{flag} needs the service: -f 1")
    if cmd.op in ("add", "edit", "delete") and cmd.src is None:
        raise AdmUsageError(f"{flag} needs -F/--from NET")
    if cmd.op in ("add", "edit") and cmd.pool is None:
        raise AdmUsageError(f"{flag} needs -U/--snat-ip A[-B]")
    if cmd.op in ("add-service", "edit-service") and cmd.scheduler is None:
        raise AdmUsageError(f"{flag} needs -s {SCHEDULER}")
    if cmd.op not in ("add", "edit", "delete") and given & _RULE_OPTS:
        bad = sorted(given & _RULE_OPTS)[0]
        raise AdmUsageError(f"illegal option {bad} with the {cmd.op} command")


def parse_restore(text: str) -> list[AdmCommand]:
    """`-R` input: one command per line (as `-S` writes them); blank and # lines skipped; a
    byte order mark at the start (a file saved by a Windows editor) is no part of the first."""
    cmds = []
    for n, line in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line)
            if words and words[0] in ("ipvsadm", "snatgw"):  # tolerate pasted command lines
                words = words[2:] if words[0] == "snatgw" and words[1:2] == ["adm"] else words[1:]
            cmd = parse_args(words)
        except (AdmUsageError, ValueError) as e:
            raise AdmUsageError(f"line {n}: {e}") from None
        if cmd.op not in MUTATING:
            raise AdmUsageError(f"line {n}: {cmd.op} cannot be restored (only -A -D -K -k -H -C)")
        if len(cmds) == MAX_COMMANDS:  # the daemon takes one batch of at most this many
            raise AdmUsageError(f"line {n}: command {len(cmds) + 1}; a restore is one batch of at most "
                                f"{MAX_COMMANDS} commands ({MAX_RULES} rules)")
        cmds.append(cmd)
    return cmds


def save_lines(table: "AdmTable") -> list[str]:
    """`-S`: the service, then one -K per rule in definition order (so -R keeps the order)."""
    if not table.service:
        return []
    out = [f"-A -f {FWMARK} -s {SCHEDULER}"]
    for r in table.rules:
        line = (f"-K -f {FWMARK} -F {r.src} -T {r.dst} -W {r.gw or ANY_ADDR} -U {r.pool.short()}"
                f" -O {r.algo.label} -N {r.new_gw or ANY_ADDR}")
        if r.oif:
            line += f" --oif {r.oif}"
        out.append(line)
    return out


def _ident(identity: tuple) -> str:
    src, dst, gw, oif = identity
    return f"-F {src} -T {dst} -W {gw or ANY_ADDR}" + (f" --oif {oif}" if oif else "")


@dataclass(frozen=True)
class AdmTable:
    """What `adm` edits: the SNAT service on or off, and its rules in definition order."""

    service: bool = True
    rules: tuple[Rule, ...] = ()

    @classmethod
    def from_ruleset(cls, rules: RuleSet) -> "AdmTable":
        return cls(True, tuple(rules.defined))

    def ruleset(self) -> RuleSet:
        return RuleSet(self.rules if self.service else ())

    def apply(self, cmd: AdmCommand) -> "AdmTable":
        """One command -> the new table, or AdmRefused (this table is never changed)."""
        return self.apply_all([cmd])

    @staticmethod
    def _step(service: bool, rules: dict, cmd: AdmCommand) -> bool:
        """Apply ``cmd`` to ``rules`` (identity -> Rule, in definition order) in place; the
        service state after it.  AdmRefused before any change."""
        op = cmd.op
        if op in ("clear", "delete-service"):
            if op == "delete-service" and not service:
                raise AdmRefused("ESRCH", "No such service: the SNAT service (-f 1) is not defined")
            rules.clear()
            return False
        if op == "add-service":
            if service:
                raise AdmRefused("EEXIST", "Service already exists: -f 1 -s snat_sched")
            rules.clear()
            return True
        if op == "edit-service":
            if not service:
                raise AdmRefused("ESRCH", "No such service: the SNAT service (-f 1) is not defined")
            return service
        if op not in ("add", "edit", "delete"):
            raise AdmRefused("EINVAL", f"{op} does not change the rule table")
        if not service:
            raise AdmRefused("ESRCH", "No such service: add it first with -A -f 1 -s snat_sched")
        old = rules.get(cmd.identity)
        if op == "add":
            if old is not None:
                raise AdmRefused("EEXIST", f"File exists: a rule {_ident(cmd.identity)} exists; "
                                           "edit it with -k")
            rules[cmd.identity] = cmd.rule("adm")  # at the end of definition order
            return service
        if old is None:
            raise AdmRefused("ENOENT", f"No such file or directory: no rule {_ident(cmd.identity)}")
        if op == "edit":  # keeps its place in definition order, and the options ipvsadm cannot say
            try:
                new = replace(cmd.rule("adm"), on_exhausted=old.on_exhausted, port_preserve=old.port_preserve,
                              max_sessions_per_host=old.max_sessions_per_host, mapping=old.mapping,
                              filtering=old.filtering)  # fmt: skip
            except RuleError as e:  # e.g. -O sdh for a rule with mapping endpoint-independent
                raise AdmRefused("EINVAL", f"Invalid argument: {e.field}: {e.message} (the rule keeps its "
                                           "config options; change them in the config file)") from None
            rules[cmd.identity] = new  # an existing key keeps its place
            return service
        del rules[cmd.identity]
        return service

    def apply_all(self, cmds: list[AdmCommand], restore: bool = False) -> "AdmTable":
        """Apply a batch in order; the first refusal aborts it and nothing is changed.

        ``restore`` (-R): the batch REPLACES the rules (as ipvsadm-restore after a clear): it
        starts from this table's service state with no rules, and `-A -f 1 -s snat_sched` for a
        service that already exists is a no-op, so `-S` output restores to the same state.

        The rules are worked on as one dict by identity (definition order is its order): each
        command costs O(1), where a new table per command and a scan for its rule made an
        `adm -R` of 2,000 rules take 10 s and one of 8,000 nearly 3 minutes under the lock."""
        service = self.service
        rules: dict = {} if restore else {r.identity: r for r in self.rules}
        for n, c in enumerate(cmds, 1):
            try:
                if restore and c.op == "add-service" and service:
                    continue
                service = self._step(service, rules, c)
            except AdmRefused as e:
                if len(cmds) == 1:
                    raise
                raise AdmRefused(e.code, f"command {n} ({' '.join(c.argv) or c.op}): {e}") from None
        return AdmTable(service, tuple(rules.values()))
