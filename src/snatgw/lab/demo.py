"""`snatgw demo`: build the lab, run the gateway on the seed's rules (lab addresses), send TCP,
UDP and ping from the inside hosts, show per flow the rule, the address the server saw, the
link it came in on and what the model expected; fail over ISP 1 by reload; show the sessions;
clean up.  Without snatgw's datapath it falls back to a kernel nft SNAT, labelled as such.
Interrupted (SIGINT, SIGTERM), it removes the lab, says so in one line on stderr and exits 128 +
the signal.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Address

from ..daemon import startsignals
from ..rules import Rule, RuleSet, select_addr
from . import clients
from .gateway import gateway_available, snatgw_argv, snatgw_json, start_kernel_snat
from .netns import LabError, list_netns, run
from .topology import ISP_OF, SERVERS, Lab

SETTINGS = """snatgw {
    inside lan40 lan50
    outside eth1 eth2
    unmatched pass
}
"""
RULE_FIELDS = ("from", "to", "gw", "oif", "new_gw", "snat_ip", "algo")
#: the seed's example on the lab's addresses (192.168.x -> 198.18.x, 1.1.2.x -> 198.19.2.x, ...)
REF_RULES = [
    {"from": "198.18.40.0/24", "gw": "198.19.3.1", "oif": "eth2", "snat_ip": "198.19.3.71-198.19.3.73",
     "algo": "random"},
    {"from": "198.18.40.0/24", "gw": "198.19.2.1", "oif": "eth1", "snat_ip": "198.19.2.71-198.19.2.73",
     "algo": "sdh"},
    {"from": "198.18.0.0/16", "new_gw": "198.19.2.1", "snat_ip": "198.19.2.71-198.19.2.73", "algo": "sh"},
]
#: the seed's failover: rule 2 (same identity) now goes to ISP 2 with ISP 2's addresses
FAILOVER_RULES = [REF_RULES[0],
                  {**REF_RULES[1], "new_gw": "198.19.3.1", "snat_ip": "198.19.3.71-198.19.3.73"},
                  REF_RULES[2]]
FLOW_SOURCES = (("in40", "198.18.40.10"), ("in40", "198.18.40.11"), ("in40", "198.18.40.12"),
                ("in50", "198.18.50.10"))
PROTOS = ("tcp", "udp", "icmp")


def config_text(rules: list[dict]) -> str:
    body = "\n".join("  snat_rule { " + "  ".join(f"{k} {r[k]}" for k in RULE_FIELDS if r.get(k)) + " }"
                     for r in rules)
    return SETTINGS + "\nvirtual_server fwmark 1 {\n" + body + "\n}\n"


def ruleset(rules: list[dict]) -> RuleSet:
    return RuleSet([Rule.from_dict(r, where=f"demo rule {i + 1}") for i, r in enumerate(rules)])


@dataclass
class Flow:
    node: str
    src: str
    dst: str
    proto: str
    sport: int = 0  # inside source port (ICMP: echo identifier)
    seen: str = "-"  # source address the server saw
    link: str = "-"  # link it reached the server on
    rule: str = "-"
    expect_addr: str = "-"
    expect_link: str = "-"
    error: str = ""
    pool: object = None  # the rule's Pool
    exact: bool = True  # the backend promises select_addr's address (nft: any of the pool)

    @property
    def ok(self) -> bool:
        if self.error or self.link != self.expect_link:
            return False
        if self.exact or self.pool is None or self.seen == "-":
            return self.seen == self.expect_addr
        return IPv4Address(self.seen) in self.pool


def send(lab: Lab, f: Flow, servers) -> None:
    try:
        if f.proto == "tcp":
            r = clients.tcp_echo(lab, f.node, f.dst, src=f.src)
        elif f.proto == "udp":
            r = clients.udp_echo(lab, f.node, f.dst, src=f.src)
        else:
            p = clients.ping(lab, f.node, f.dst, src=f.src, servers=servers)
            f.sport = p["id"]
            r = p["seen"] or {}
            if not p["reply"]:
                f.error = "no echo reply"
        if "inside" in r and f.proto != "icmp":
            f.sport = int(r["inside"].rsplit(":", 1)[1])
        f.seen = r.get("peer", "-").split(":")[0]
        f.link = r.get("link") or "-"
    except OSError as e:
        f.error = f"{type(e).__name__}: {e}"


def expect(lab: Lab, rules: RuleSet, f: Flow) -> None:
    """What the spec says: the rule, the SNAT address (select_addr) and the link (new_gw)."""
    route = lab.route(f.dst, src=f.src)
    rule = rules.match(IPv4Address(f.src), IPv4Address(f.dst), route)
    if rule is None:
        f.rule, f.expect_addr, f.expect_link = "none", f.src, ISP_OF.get(route.oif, "?")
        return
    f.rule = f"#{rules.rules.index(rule) + 1} {rule.algo.label}"
    f.pool = rule.pool
    f.expect_addr = str(select_addr(rule.pool, rule.algo, IPv4Address(f.src), IPv4Address(f.dst), f.sport))
    hop = rule.new_gw or route.gw
    f.expect_link = ISP_OF.get(lab.route(hop).oif, "?")


def table(rows: list[list[str]], head: list[str]) -> str:
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(n) for x, n in zip(r, w)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * n for n in w])] + [line(r) for r in rows])


def daemon_rules(lab: Lab, rules: RuleSet) -> dict[tuple[str, str], str]:
    """(proto, "inside IP:PORT") -> "#n" of the rule the daemon's session names (`snatgw conns`)."""
    got = (snatgw_json(lab, "conns") or {}).get("sessions", [])
    prio = {r.rule_id: f"#{i + 1}" for i, r in enumerate(rules.rules)}
    return {(s["proto"], s["inside"]): prio.get(s.get("rule_id"), "?") for s in got if s.get("rule_id")}


def run_flows(lab: Lab, rules: RuleSet, servers, out, exact: bool = True, daemon: bool = False) -> int:
    flows = [Flow(node, src, str(dst), proto, exact=exact)
             for node, src in FLOW_SOURCES for dst in SERVERS for proto in PROTOS]
    for f in flows:
        send(lab, f, servers)
        expect(lab, rules, f)
    checked = 0
    if daemon:  # the rule the daemon recorded must be the model's
        by_session = daemon_rules(lab, rules)
        for f in flows:
            said = by_session.get((f.proto, f"{f.src}:{f.sport}"))
            checked += said is not None
            if said is not None and said != f.rule.split()[0] and not f.error:
                f.error = f"daemon says rule {said}"
    rows = [[f.src + (f":{f.sport}" if f.sport else ""), f.dst, f.proto, f.rule, f.seen, f.expect_addr,
             f.link, f.expect_link, ("ok" if f.seen == f.expect_addr else "ok (in pool)") if f.ok
             else ("FAIL " + f.error if f.error else "DIFF")] for f in flows]
    print(table(rows, ["inside src", "dst", "proto", "rule (model)", "server saw", "model says",
                       "via", "expected", "result"]), file=out)
    bad = sum(not f.ok for f in flows)
    print(f"{len(flows) - bad}/{len(flows)} flows as the model predicts"
          + ("" if exact else " (address: any of the rule's pool; the kernel's nf_nat picks it)")
          + (f"; the daemon's session names the model's rule for {checked} of them" if daemon else ""),
          file=out)
    return bad


def show_rules(rules: RuleSet, out) -> None:
    for i, r in enumerate(rules.rules):
        print(f"  #{i + 1}: {r.describe()}", file=out)


class Interrupted(BaseException):
    """The demo was asked to stop (SIGINT, SIGTERM): a BaseException, as KeyboardInterrupt, so
    no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Interrupt:
    """The demo's SIGINT/SIGTERM handler: records the first signal and raises Interrupted once;
    later ones (a second Ctrl-C, the group's SIGINT reaching us while the lab is removed) are
    only recorded, so the removal is never cut short.  It only records until the demo's try
    turns ``raising`` on (one raised while the handlers were being set escaped the demo: exit 1,
    a traceback); the try then acts on what it recorded."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.raising = False

    def __call__(self, signum: int, _frame) -> None:
        if self.signum is None:
            self.signum = signum
        if self.raising:
            self.raising = False
            raise Interrupted(signum)


def leftovers(lab: Lab) -> list[str]:
    """What of ``lab`` is still there (after down()): namespaces, pin dir, socket, work dir."""
    left = [f"namespace {n}" for n in list_netns() if n.startswith(lab.prefix + "-")]
    for what, path in (("pin dir", lab.pin_dir), ("socket", lab.socket_path), ("work dir", lab.workdir)):
        if os.path.lexists(path):
            left.append(f"{what} {path}")
    return left


def demo(backend: str = "bpf", name: str = "demo", prefix: str | None = None, out=None) -> int:
    """Exit 0 when every flow is as the model predicts (or the datapath is not built: a labelled
    fallback), 1 otherwise; interrupted (SIGINT, SIGTERM), the lab is removed, one line on
    stderr says so (and what could not be removed), and the exit is 128 + the signal (130, 143),
    as a shell's."""
    t0 = time.monotonic()
    out = out or sys.stdout
    prefix = prefix or "sg" + secrets.token_hex(2)  # known before Lab.up: its leftovers are looked for
    interrupt = _Interrupt()
    old = {s: signal.signal(s, interrupt) for s in interrupt.SIGNALS}
    try:
        lab = None
        ok = built = building = False
        bad = 0
        try:
            interrupt.raising = True
            # one recorded while our handlers were set, or caught by `snatgw demo` before its imports
            early = interrupt.signum or startsignals.EARLY.stop_asked()
            if early is not None:
                interrupt(early, None)
            building = True
            lab = Lab.up(name, prefix)  # a Lab.up interrupted removes what it built, then raises
            ok, bad, built = _show(lab, backend, out)
        except BaseException:
            if interrupt.signum is None:
                raise
            # interrupted: an error with it (a child the same Ctrl-C ended) is its consequence
        finally:
            interrupt.raising = False  # from here a signal is only recorded: the removal goes on
            if lab is not None:
                try:
                    lab.down()
                except Exception:
                    if interrupt.signum is None:
                        raise  # interrupted, the line below names what is left
        if interrupt.signum is not None:
            left = leftovers(Lab(name=name, prefix=prefix))
            done = (f"could not remove: {', '.join(left)} (try `snatgw lab down --all`)" if left else
                    f"the lab {name} (namespaces {prefix}-*) was removed" if building else
                    "no lab was built yet")
            print(f"snatgw demo: interrupted by {startsignals.name(interrupt.signum)}; {done}",
                  file=sys.stderr, flush=True)
            return 128 + interrupt.signum
        print(f"\n== lab removed. {'snatgw ' + backend if ok else 'FALLBACK (kernel nft SNAT)'}: "
              f"{'all flows as the model predicts' if not bad else f'{bad} flows differ from the model'}; "
              f"{time.monotonic() - t0:.1f} s", file=out, flush=True)
        # a datapath not built yet is a labelled fallback (exit 0); one that fails to start, or
        # flows that differ from the model under snatgw, are errors
        return 0 if (ok and not bad) or not built else 1
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _show(lab: Lab, backend: str, out) -> tuple[bool, int, bool]:
    """The demo in ``lab``: (snatgw ran, flows that differ from the model, its datapath is built)."""
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    bad = 0
    say(f"== lab {lab.name} up (namespaces {lab.prefix}-*): inside 198.18.40.0/24, 198.18.50.0/24; "
        "ISP1 via eth1 (198.19.2.1), ISP2 via eth2 (198.19.3.1); servers 203.0.113.10, 198.51.100.10")
    ref, fail = ruleset(REF_RULES), ruleset(FAILOVER_RULES)
    conf = os.path.join(lab.workdir, "snatgw.conf")
    fconf = os.path.join(lab.workdir, "snatgw-failover.conf")
    for path, rules in ((conf, REF_RULES), (fconf, FAILOVER_RULES)):
        with open(path, "w") as fh:
            fh.write(config_text(rules))
    lab.add_snat_addresses(ref)
    lab.add_snat_addresses(fail)
    ok, why = gateway_available(backend)
    built = ok
    if ok:
        try:
            lab.start_gateway(conf, backend)
        except LabError as e:
            ok, why = False, f"snatgw run failed: {e}"
    if ok:
        say(f"== snatgw run --backend {backend} in {lab.ns('gw')}: ready. Rules in priority order:")
    else:
        say("!! FALLBACK, NOT SNATGW: snatgw's datapath is not available here "
            f"({why.splitlines()[0] if why else '?'}).\n"
            "!! Showing the kernel's own nft SNAT of the same rules instead: the kernel picks pool\n"
            "!! addresses its own way and new_gw is not applied, so rows marked DIFF are expected.")
        start_kernel_snat(lab, ref)
    show_rules(ref, out)
    servers = lab.start_servers()
    say("\n== flows (server saw = source address at the server; via = ISP link it arrived on)")
    exact = ok and backend == "bpf"
    if ok and not exact:
        say(f"   ({backend} backend: the kernel's nf_nat picks the address within the rule's pool, "
            "so 'model says' is lvs-snat's pick and any pool address is ok)")
    bad += run_flows(lab, ref, servers, out, exact, daemon=ok)

    say("\n== ISP1 fails: rule 2 replaced (same from/gw/oif) by new_gw 198.19.3.1, pool 198.19.3.71-73")
    if ok:
        lab.reload_gateway(fconf)
        say("   snatgw reload: done")
    else:
        start_kernel_snat(lab, fail)
        say("   (fallback: kernel nft SNAT rules replaced)")
    show_rules(fail, out)
    bad += run_flows(lab, fail, servers, out, exact, daemon=ok)

    say("\n== sessions")
    if ok:
        cp = run(snatgw_argv("conns", "--socket", lab.socket_path), check=False)
        say((cp.stdout or cp.stderr).rstrip())
        st = snatgw_json(lab, "stats")
        if st:
            say(f"   stats: {st.get('sessions', '?')} sessions")
    else:
        cp = lab.run("gw", "conntrack", "-L", check=False)
        say(cp.stdout.rstrip() if cp.returncode == 0 else "   (fallback: no `conntrack` tool to list "
            "the kernel's sessions)")
    servers.stop()
    return ok, bad, built
