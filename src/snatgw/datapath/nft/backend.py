"""NftBackend: the nftables datapath (snatgw.datapath.backend.Backend).  Kernel conntrack does the
NAT; this applies render.plan() as ONE `nft -j -f -` transaction (reload is atomic, sessions live
on in conntrack), adds the new_gw policy routing (tagged `proto 201`, prefs/tables 31000-31999),
and reads sessions from conntrack and counters from nft.  It acts in its own network namespace,
or in ``netns`` (a name under /run/netns or a path) when given.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from ...config.schema import GatewayConfig, Settings, rule_host_limit
from ...errors import BackendError, MissingDeviceError
from ...layout import CtState
from ...rules import RuleSet
from ..backend import LastRead, RuleCounters, Session, SessionFilter, Stats, pressure_summary
from .. import nftnl
from ..netns import nsenter
from ..policyroutes import PolicyRange
from . import render as R
from .ctnetlink import PROTO_NAMES, Conntrack

log = logging.getLogger("snatgw.nft")
#: seconds between two looks of the hook check at the new_gw policy routing (`ip` runs)
ROUTING_RECHECK = 10.0
#: our new_gw ip rule prefs and tables (31000-31999, proto 201; datapath/policyroutes.py)
ROUTING = PolicyRange(R.RT_BASE, R.SLOTS, R.RT_PROTO)
MAX_CARRY = 262144  # sessions a bpf -> nft switch carries over at most
#: stats() counts conntrack afresh up to this many entries in the namespace; above, it answers
#: with the GC tick's last count (a dump costs ~1 s per 100k entries in Python: 1.6-2.4 s at
#: 217k made every `snatgw stats` that slow), taken at most once per GC_DUTY times its own
#: duration, so counting holds at most 1/GC_DUTY of a CPU
COUNT_FRESH_MAX = 20_000
GC_DUTY = 3
#: sessions per inside host and SNAT address need a listing (several times a count's cost):
#: stats() lists up to this many, which is COUNT_FRESH_MAX (the tick only counts, so its count
#: stays seconds old at most)
PRESSURE_LIST_MAX = COUNT_FRESH_MAX
#: the warning of changed host limits names this many rules, then how many more (the daemon's
#: other warnings are bounded so: a reload changing 10,000 rules' limits made it megabytes)
LIMITS_NAMED = 10


def _session_counters(d: dict) -> dict:
    """A conntrack entry's per-direction counters as Session fields, when conntrack counts them
    (nf_conntrack_acct 1: the dump carries them); else none, and the Session says so (None)."""
    if "packets" not in d:
        return {}
    return {"packets_out": int(d["packets"]), "bytes_out": int(d.get("bytes", 0)),
            "packets_in": int(d.get("rpackets", 0)), "bytes_in": int(d.get("rbytes", 0))}


@dataclass(frozen=True)
class _Tally:
    """One count of the sessions: per ct mark, per inside host and SNAT address (empty above
    PRESSURE_LIST_MAX), when (time.monotonic()) and how long it took."""

    by_mark: dict
    hosts: dict
    addrs: dict
    at: float
    seconds: float
    listed: bool = True  # hosts and addrs were taken (at most PRESSURE_LIST_MAX sessions)

#: conntrack's TCP state names -> snatgw's CtState names
_TCP_STATES = {
    "SYN_SENT": "SYN_SENT", "SYN_SENT2": "SYN_SENT", "SYN_RECV": "SYN_RECV",
    "ESTABLISHED": "ESTABLISHED", "FIN_WAIT": "FIN_WAIT", "CLOSE_WAIT": "CLOSE_WAIT",
    "LAST_ACK": "LAST_ACK", "TIME_WAIT": "TIME_WAIT", "CLOSE": "CLOSE", "NONE": "NONE",
}  # fmt: skip
_SYSCTL_TIMEOUT = {  # state -> /proc/sys/net/netfilter/ file with its timeout (for `idle`)
    "ESTABLISHED": "nf_conntrack_tcp_timeout_established", "SYN_SENT": "nf_conntrack_tcp_timeout_syn_sent",
    "SYN_RECV": "nf_conntrack_tcp_timeout_syn_recv", "FIN_WAIT": "nf_conntrack_tcp_timeout_fin_wait",
    "CLOSE_WAIT": "nf_conntrack_tcp_timeout_close_wait", "LAST_ACK": "nf_conntrack_tcp_timeout_last_ack",
    "TIME_WAIT": "nf_conntrack_tcp_timeout_time_wait", "CLOSE": "nf_conntrack_tcp_timeout_close",
    "UDP": "nf_conntrack_udp_timeout_stream", "UDP_UNREPLIED": "nf_conntrack_udp_timeout",
    "ICMP": "nf_conntrack_icmp_timeout",
}  # fmt: skip


def parse_conntrack(text: str) -> list[dict]:
    """/proc/net/nf_conntrack (or `conntrack -L -o extended`) lines -> dicts with the original
    tuple (src, dst, sport, dport), the reply tuple (rsrc, rdst, rsport, rdport), proto, state,
    timeout, mark and, with nf_conntrack_acct, packets/bytes per direction."""
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 6 or f[0] != "ipv4":
            continue
        proto, timeout = f[2], int(f[4])
        rest = f[5:]
        state = rest.pop(0) if rest and "=" not in rest[0] and not rest[0].startswith("[") else None
        d: dict = {"proto": proto, "timeout": timeout, "state": state, "mark": 0,
                   "assured": "[ASSURED]" in rest}
        seen: dict[str, int] = {}
        for tok in rest:
            if "=" not in tok:
                continue
            k, _, val = tok.partition("=")
            n = seen.get(k, 0)
            seen[k] = n + 1
            if k == "id" and proto == "icmp":
                k = "sport" if n == 0 else "rsport"
                d.setdefault("dport" if n == 0 else "rdport", val)
                d[k] = val
                continue
            key = ("r" + k) if n else k
            if k in ("mark", "zone", "use"):
                key = k
            if key in ("proto", "timeout", "state", "assured"):
                continue  # GRE's `timeout=30, stream_timeout=180`: never over the parsed fields
            d[key] = val
        try:
            d["mark"] = int(d.get("mark", 0))
        except ValueError:
            d["mark"] = 0
        out.append(d)
    return out


def limits_counted_afresh(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The rules an apply gives another max_sessions_per_host (not 0): their hosts are counted
    in that value's own `ct count` set (render.host_set), which knows only the connections it
    saw added (new flows, and unanswered ones at their next packet, which conntrack still
    calls new), so their answered sessions do not count toward the new limit (a host at 60 of
    60, the limit raised to 100, may open 100 more; lowered to 30, 30 more) until they end.  The
    kernel cannot be given them (an element's count is what passed it; the old set's elements
    keep their old limit), so this is said, once per apply, as a warning: in the log and in
    the reload's answer (NftBackend.apply_warnings), naming the first LIMITS_NAMED rules and
    how many more; returns the warning's text, if any."""
    was = {r.rule_id: rule_host_limit(r, old.settings) for r in old.rules}
    out = []
    for r in new.rules:
        n = rule_host_limit(r, new.settings)
        if n and r.rule_id in was and was[r.rule_id] != n:
            out.append(f"{r.where or r.identity_text()}: {was[r.rule_id]} -> {n}")
    if not out:
        return []
    more = len(out) - LIMITS_NAMED
    named = "; ".join(out[:LIMITS_NAMED]) + (f"; ... and {more} more" if more > 0 else "")
    text = ("max_sessions_per_host changed ({}): the kernel counts each limit value in its own ct count set, so the "
            "hosts' answered sessions do not count toward the new value until they end: a host may open up to that "
            "many new flows on top of them (`snatgw flush --rule` counts from zero; docs/nftables.md)"
            ).format(named)  # fmt: skip
    log.warning("nft backend: %s", text)
    return [text]


class NftBackend:
    name = "nft"

    def __init__(self, settings: Settings | None = None, netns: str | None = None):
        self.settings = settings or Settings()
        self._failed_base: int | None = 0  # conntrack's insert_failed when started (or zeroed); None: unread
        self._full: bool | None = None  # whether render.S_FULL refuses new flows now
        self.netns = netns
        self._config: GatewayConfig | None = None
        #: what the last apply warns of beyond the config itself (the daemon puts it in the
        #: reload's answer, as `snatgw reload` prints: limits_counted_afresh)
        self.apply_warnings: list[str] = []
        self._plan: R.Plan | None = None
        self._by_mark: dict[int, int] = {}  # ct mark -> rule_id
        self._objects: dict[str, tuple[str, ...]] | None = None  # named objects our last transaction left
        self._gc_lock = threading.RLock()  # the GC tick runs outside the daemon's lock (expire_unlocked)
        self._tally_cache: _Tally | None = None  # the GC tick's last count (large tables)
        self._next_tally = 0.0  # time.monotonic() before which the tick does not count again
        self.last_removed = 0  # conntrack entries the last apply removed (_follow)
        #: the named counters (and conntrack's insert_failed) as last read: a read that fails
        #: (netlink, then nft; /proc) answers them
        self.counter_reads = LastRead("nft backend: counters", log)
        self._routing_next = 0.0  # time.monotonic() before which check_hooks leaves the routing be
        self._routing_refused: dict[int, str] = {}  # table -> the last `ip` refusal logged for it

    # ------------------------------------------------------------------ commands

    def _run(self, argv: list[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        try:
            p = subprocess.run(nsenter(self.netns) + argv, input=input, capture_output=True, text=True, timeout=30)
        except FileNotFoundError as e:
            raise BackendError(f"nft backend: {argv[0]} not found ({e}); install it (scripts/setup.sh)") from None
        if check and p.returncode != 0:
            raise BackendError(f"nft backend: `{' '.join(argv)}` failed: {p.stderr.strip() or p.returncode}")
        return p

    def _read(self, path: str) -> str | None:
        """A /proc file of the gateway's namespace (None if unreadable): read directly by the
        daemon, which runs in it (a `cat` process cost 5-15 ms of a failover's apply), through
        nsenter for a backend aimed at another namespace."""
        if not self.netns:
            try:
                with open(path) as f:
                    return f.read()
            except OSError:
                return None
        p = self._run(["cat", path], check=False)
        return p.stdout if p.returncode == 0 else None

    def _route_get(self, addr: IPv4Address) -> dict | None:
        p = self._run(["ip", "-j", "route", "get", str(addr)], check=False)
        if p.returncode != 0:
            return None
        try:
            res = json.loads(p.stdout)
        except json.JSONDecodeError:
            return None
        return res[0] if res else None

    # ------------------------------------------------------------------ Backend

    def start(self, config: GatewayConfig) -> None:
        """Check the tools and devices, apply the config (one transaction: a table left by a
        previous daemon is replaced atomically), then take over from a bpf datapath left in
        this namespace: its established TCP and UDP sessions become conntrack entries with the
        same mapping (``carry_bpf_sessions``), and its leftovers go (our TC filters, the pin
        directory: logged as a warning).  In that order a bpf datapath keeps translating until
        the rule set is in place; removing it first left the flows untranslated for as long as
        the apply took."""
        self._run(["nft", "--version"])
        self._check_devices(config.settings)
        self._failed_base = self._conntrack_base()  # exhaustion counts from here
        carried = self._bpf_sessions(config.settings.pin_dir)
        self.apply(config)
        from ..cleanup import NoLibbpf, remove_bpf

        if carried:
            n = self.insert_sessions(carried)
            log.warning("nft backend: carried %d of %d sessions over from the bpf datapath", n, len(carried))
        try:
            removed = remove_bpf(config.settings.pin_dir, self.netns)
        except NoLibbpf as e:
            log.warning("nft backend: %s", e)
            removed = []
        if removed:
            log.warning("nft backend: removed the bpf datapath's leftovers: %s", "; ".join(removed))

    def _bpf_sessions(self, pin_dir: str | None) -> list[Session]:
        """The sessions of a bpf datapath pinned in ``pin_dir`` (none: []); never raises."""
        if not pin_dir or not os.path.isdir(pin_dir):
            return []
        try:
            from ..bpf.backend import read_pinned

            view = read_pinned(pin_dir, self.settings)
            try:
                return view.sessions()[:MAX_CARRY]
            finally:
                view.stop()
        except Exception as e:  # noqa: BLE001 - a switch must work even when the old table is unreadable
            log.warning("nft backend: cannot read the bpf datapath's sessions in %s: %s", pin_dir, e)
            return []

    def insert_sessions(self, sessions: list[Session]) -> int:
        """Create a conntrack entry with the same NAT mapping and our rule's mark for each
        established TCP session and each UDP session of a rule that still exists (`conntrack -R`,
        one batch), so their packets keep their address and port when the kernel takes over.
        ICMP and TCP in other states are left out: they are short-lived and start again.
        Returns how many entries the kernel created."""
        mark_of = {rid: m for m, rid in self._by_mark.items()}
        lines = []
        for x in sessions:
            m = mark_of.get(x.rule_id)
            if m is None or x.proto not in ("tcp", "udp") or (x.proto == "tcp" and x.state != "ESTABLISHED"):
                continue
            try:
                (ip, port), (rip, rport), (nip, nport) = (a.rsplit(":", 1) for a in (x.inside, x.remote, x.nat))
                IPv4Address(ip), IPv4Address(rip), IPv4Address(nip)
                int(port), int(rport), int(nport)
            except ValueError:
                continue
            state = "--state ESTABLISHED " if x.proto == "tcp" else ""
            lines.append(f"-I -p {x.proto} -s {ip} -d {rip} --sport {port} --dport {rport} {state}"
                         f"-t {max(1, int(x.expires))} -u SEEN_REPLY,ASSURED -m {m} --src-nat {nip}:{nport}")
        if not lines:
            return 0
        p = self._run(["conntrack", "-R", "-"], input="\n".join(lines) + "\n", check=False)
        if p.returncode == 0:  # -R says nothing on success
            return len(lines)
        # -R stops at the first line that fails (an entry the kernel made meanwhile): one by one
        n = 0
        for line in lines:
            if self._run(["conntrack", *line.split()], check=False).returncode == 0:
                n += 1
        if not n:
            log.warning("nft backend: conntrack -R failed: %s", (p.stderr or p.stdout).strip()[:300])
        return n

    def _check_devices(self, settings: Settings) -> None:
        """Every inside and outside device must exist in the namespace (as the bpf backend
        requires when attaching): rules on a missing device would translate nothing."""
        names = tuple(settings.inside) + tuple(settings.outside)
        if not self.netns:  # the daemon's own namespace: no `ip` process
            have = set()
            for name in names:
                with contextlib.suppress(OSError):
                    socket.if_nametoindex(name)
                    have.add(name)
        else:
            p = self._run(["ip", "-j", "link", "show"])
            have = {link.get("ifname") for link in json.loads(p.stdout or "[]")}
        for name in names:
            if name not in have:
                raise MissingDeviceError(name)

    def apply(self, config: GatewayConfig) -> None:
        """Resolve what needs the kernel first (so a failure to resolve changes nothing), then the
        policy routing of new_gw rules, one nft transaction, and the removal of stale routing."""
        settings = config.settings if config.settings else self.settings
        self._check_devices(settings)
        rules: RuleSet = config.rules
        gw_dev = {}
        for r in rules:
            if r.gw and not r.oif:
                rt = self._route_get(r.gw)
                if rt and rt.get("dev"):
                    gw_dev[r.gw] = rt["dev"]
        p = R.plan(rules, settings, gw_dev)
        routes = []
        for e in p.routes:
            how = self._new_gw_route(e)
            if how is None:  # (an uplink down or gone: a failover reload must not be refused then)
                log.warning("nft backend: %s: new_gw: no route to %s in this namespace now (ip route get %s): "
                            "its flows are refused (an unreachable route in table %d) until one appears, "
                            "put in place by the hook check within %.0f s; or give the rule an oif to use it "
                            "on-link", e.rule.where or "rule", e.new_gw, e.new_gw, e.table,
                            ROUTING_RECHECK)  # fmt: skip
                routes.append((e, e.commands(unreachable=True)))
                continue
            routes.append((e, e.commands(*how)))
        # routes first: a new slot's ip rule is inert until the rule set marks packets with it,
        # and `route replace` swaps a changed new_gw in one step (no window without a route)
        have = set(ROUTING.rules(self._ip))
        for e, cmds in routes:
            self._run(["ip"] + cmds[0])
            if e.table not in have:
                self._run(["ip"] + cmds[1])
        # ONE transaction (render.transaction_text): the old rule set stays whole until the
        # new one replaces it; two transactions left a window where a new flow met a table
        # without its rules.  Stale named objects: those of our last transaction (listing the
        # table cost 15-40 ms of a failover), listed afresh on the first apply and whenever
        # the table did not hold what we remembered (the transaction then fails as a whole)
        stale = self._objects if self._objects is not None else self._object_names()
        try:
            self._run(["nft", "-f", "-"], input=R.transaction_text(p, stale["counter"], stale["ct timeout"]))
        except BackendError:
            if self._objects is None:
                raise
            stale = self._object_names()
            self._run(["nft", "-f", "-"], input=R.transaction_text(p, stale["counter"], stale["ct timeout"]))
        self._objects = {"counter": tuple(p.counters), "ct timeout": tuple(t[0] for t in p.timeouts)}
        self._install_guard(rules, settings)
        self._set_icmp_timeout(settings.timeout(CtState.ICMP))
        wanted = {e.table for e, _ in routes}
        self._remove_routing(keep=wanted)
        old = self._config
        self.apply_warnings = limits_counted_afresh(old, config) if old is not None else []
        self._config, self._plan, self.settings = config, p, settings
        self._by_mark = {m: r.rule_id for m, r in p.rule_by_mark(rules).items()}
        self.last_removed = self._follow(old.rules if old else None, rules, settings.outside)
        self._judge_full()  # (the set `full` keeps its element across the transaction's flush)

    def _new_gw_route(self, e: R.RouteEntry) -> tuple[IPv4Address, str, bool] | None:
        """(via, device, onlink) of new_gw rule ``e``'s table route as the kernel reaches its
        new_gw now; on-link through the rule's oif when nothing routes it (spec: new_gw); None
        when neither."""
        rt = self._route_get(e.new_gw)
        if rt and rt.get("type", "unicast") == "unicast" and rt.get("dev"):
            return (IPv4Address(rt["gateway"]) if rt.get("gateway") else e.new_gw), rt["dev"], False
        if e.rule.oif:
            return e.new_gw, e.rule.oif, True
        return None

    def _check_routing(self) -> list[str]:
        """The hook check's part for the new_gw policy routing (every ROUTING_RECHECK seconds:
        `ip` runs): a table whose route vanished (the kernel removes it when its device goes
        down, and nothing put it back: every new_gw flow then took the main table's route until
        a reload), whose route no longer matches where the kernel reaches the new_gw (another
        uplink, a device recreated), or whose ip rule is gone is installed again as apply()
        does; a table of a new_gw nothing routes now (its uplink down or gone) that lost its
        route gets an unreachable one, so its flows are refused instead of leaving by the main
        table's route, out of another ISP with this one's SNAT address, while the uplink stays
        down.  Returns what was put back; a route `ip` refuses now (its device still down) is
        logged once per refusal and tried again at the next check.  Never raises."""
        if self._plan is None or not self._plan.routes or time.monotonic() < self._routing_next:
            return []
        self._routing_next = time.monotonic() + ROUTING_RECHECK
        try:
            rules = set(ROUTING.rules(self._ip))
            tables = self._table_routes()
        except (BackendError, ValueError) as e:
            log.warning("nft backend: cannot read the new_gw policy routing: %s", e)
            return []
        out, resolved = [], {}
        for e in self._plan.routes:
            if (e.new_gw, e.rule.oif) not in resolved:  # (an `ip route get` per distinct new_gw)
                resolved[(e.new_gw, e.rule.oif)] = self._new_gw_route(e)
            how = resolved[(e.new_gw, e.rule.oif)]
            todo = []
            if how is None:  # no route now and no oif: its flows are refused, not sent by the main table
                route, rule = e.commands(unreachable=True)
                if e.table not in tables:  # (the kernel took its route with the uplink)
                    todo.append((route, f"new_gw policy route (table {e.table}: unreachable, no route to {e.new_gw})"))
            else:
                via, dev, onlink = how
                route, rule = e.commands(via, dev, onlink)
                if tables.get(e.table) != (str(via), dev):
                    todo.append((route, f"new_gw policy route (table {e.table}: default via {via} dev {dev})"))
            if e.table not in rules:
                todo.append((rule, f"new_gw ip rule (pref {e.table})"))
            for argv, what in todo:
                try:
                    self._run(["ip"] + argv)
                except BackendError as err:
                    if self._routing_refused.get(e.table) != str(err):
                        self._routing_refused[e.table] = str(err)
                        log.warning("nft backend: cannot put back the %s now (tried again every %.0f s): %s",
                                    what, ROUTING_RECHECK, err)  # fmt: skip
                    break
                self._routing_refused.pop(e.table, None)
                out.append(what)
        return out

    def _ip(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        """`ip argv` in the gateway's namespace (policyroutes' runner)."""
        return self._run(["ip"] + argv, check=check)

    def _table_routes(self) -> dict[int, tuple[str, str]]:
        """Our policy tables' default routes now: table -> (via, device)."""
        return {t: rt for t, rt in ROUTING.tables(self._ip).items() if rt is not None}

    def _install_guard(self, rules: RuleSet, settings: Settings) -> None:
        """The leak guard's own table (datapath/bpf/guard.py): it outlives a deleted
        `table ip snatgw`.  A failure is logged: the table's own leak_guard chain is the first line."""
        from ..bpf import guard

        try:
            guard.install([r.src for r in rules], settings.outside, self.netns)
        except BackendError as e:
            log.warning("nft backend: %s", e)

    def _follow(self, old: RuleSet | None, new: RuleSet, outside) -> int:
        """Delete the conntrack entries of sessions whose SNAT address left their rule's pool,
        or whose rule's new_gw change sends them by an outside device that does not hold that
        address (spec "Rule changes and live sessions", turn 2).  Only rules whose pool or new_gw
        changed are looked at (all of them on start); returns how many entries went."""
        before = {r.rule_id: r for r in old} if old is not None else {}
        changed = {r.rule_id: r for r in new if old is None or r.rule_id not in before
                   or (before[r.rule_id].pool, before[r.rule_id].new_gw) != (r.pool, r.new_gw)}  # fmt: skip
        if not changed:
            return 0
        mark_of = {rid: m for m, rid in self._by_mark.items()}
        holders: dict[IPv4Address, set[str]] | None = None
        dev_of: dict[IPv4Address, str | None] = {}
        verdict: dict[tuple, set[bool]] = {}  # (mark, nat, remote) -> {goes?}
        for d in parse_conntrack(self._conntrack_text()):
            rid = self._by_mark.get(R.rule_mark(d["mark"]))
            r = changed.get(rid) if rid is not None else None
            if r is None or "rdst" not in d:
                continue
            nat, remote = IPv4Address(d["rdst"]), IPv4Address(d["dst"])
            goes = nat not in r.pool
            # a rule new to this apply may have live entries all the same: its identity (so its
            # mark) was in an earlier rule set, whose new_gw we no longer know
            was_gw = before[rid].new_gw if rid in before else None
            if not goes and old is not None and was_gw != r.new_gw:
                hop = r.new_gw or remote
                if hop not in dev_of:
                    rt = self._route_get(hop)
                    dev_of[hop] = rt.get("dev") if rt else None
                if holders is None:
                    holders = self._holders(outside)
                devs = holders.get(nat)
                goes = bool(devs) and dev_of[hop] is not None and dev_of[hop] not in devs
            verdict.setdefault((mark_of[rid], nat, remote), set()).add(goes)
        # one conntrack call per (rule, address) when all its sessions go, else per remote
        by_nat: dict[tuple, list[tuple[IPv4Address, bool]]] = {}
        for (mark, nat, remote), v in verdict.items():
            by_nat.setdefault((mark, nat), []).append((remote, v == {True}))
        total = 0
        for (mark, nat), remotes in by_nat.items():
            if all(g for _, g in remotes):
                total += self._ct_delete(["-m", f"{mark}/{R.RULE_MASK}", "-q", str(nat)])
            else:
                for remote, goes in remotes:
                    if goes:
                        total += self._ct_delete(["-m", f"{mark}/{R.RULE_MASK}", "-q", str(nat),
                                                  "-d", str(remote)])
        if total:
            log.info("removed %d conntrack entries whose SNAT address left their rule's pool or link", total)
        return total

    def _holders(self, outside) -> dict[IPv4Address, set[str]]:
        """address -> the outside devices holding it (this namespace)."""
        p = self._run(["ip", "-j", "-4", "addr", "show"], check=False)
        out: dict[IPv4Address, set[str]] = {}
        for link in json.loads(p.stdout or "[]") if p.returncode == 0 else []:
            if link.get("ifname") in outside:
                for a in link.get("addr_info", []):
                    out.setdefault(IPv4Address(a["local"]), set()).add(link["ifname"])
        return out

    def _ct_delete(self, filters: list[str]) -> int:
        p = self._run(["conntrack", "-D", *filters], check=False)
        if p.returncode not in (0, 1):
            raise BackendError(f"nft backend: conntrack -D failed: {p.stderr.strip()}")
        m = re.search(r"(\d+) flow entries have been deleted", p.stderr + p.stdout)
        return int(m.group(1)) if m else 0

    def _set_icmp_timeout(self, secs: int) -> None:
        """nft 1.0.6 has no ICMP `ct timeout` policy (its parser takes only tcp and udp, its JSON
        input crashes), so the `icmp` setting becomes the namespace's conntrack ICMP timeout
        (net.netfilter.nf_conntrack_icmp_timeout, per network namespace): it also applies to
        the gateway's own ICMP conntrack entries."""
        path = "/proc/sys/net/netfilter/nf_conntrack_icmp_timeout"
        if (self._read(path) or "").strip() == str(secs):
            return  # the usual case on a reload or failover: nothing to write
        if not self.netns:
            try:
                with open(path, "w") as f:
                    f.write(f"{secs}\n")
                return
            except OSError as e:
                log.warning("nft backend: cannot set the ICMP timeout to %d s: %s", secs, e)
                return
        p = self._run(["sysctl", "-q", "-w", f"net.netfilter.nf_conntrack_icmp_timeout={secs}"], check=False)
        if p.returncode != 0:
            log.warning("nft backend: cannot set the ICMP timeout to %d s: %s", secs, p.stderr.strip())

    def check_hooks(self) -> list[str]:
        """Re-apply the running config when table ip snatgw vanished or lost chains or rules
        since the last apply (someone ran `nft delete table`, `nft flush ruleset`): one
        transaction, as a reload; else put back the new_gw policy routing where it went or
        no longer leads where the kernel reaches the new_gw (_check_routing).  Returns what was
        found missing (empty: all in place)."""
        if self._plan is None or self._config is None:
            return []
        missing = []
        want = {name for name, _ in R._chain_defs()}
        shape = self._table_shape(want)
        if shape is None:
            missing.append(f"nft table {R.FAMILY} {R.TABLE}")
        else:
            chains, nrules = shape
            if want - chains:
                missing.append("chains " + ",".join(sorted(want - chains)))
            if nrules < len(self._plan.rules):
                missing.append(f"{len(self._plan.rules) - nrules} of {len(self._plan.rules)} rules")
        from ..bpf import guard

        if not guard.present(self.netns):
            missing.append(f"nft table {guard.FAMILY} {guard.TABLE}")
        if missing:
            self.apply(self._config)
            return missing
        return self._check_routing()

    def _table_shape(self, chains: set[str]) -> tuple[set[str], int] | None:
        """(those of ``chains`` that table ip snatgw has, its number of rules), None without
        it: by nf_tables netlink (datapath/nftnl.py: a get per chain, whatever other tables
        hold), no `nft -j list table` process each tick; the nft tool if netlink fails."""
        try:
            return nftnl.table_shape(R.FAMILY, R.TABLE, chains, self.netns)
        except BackendError as e:
            log.warning("nft backend: %s; asking nft", e)
        p = self._run(["nft", "-j", "list", "table", R.FAMILY, R.TABLE], check=False)
        if p.returncode != 0:
            return None
        try:
            objs = json.loads(p.stdout)["nftables"]
        except (ValueError, KeyError, TypeError):
            objs = []
        return ({o["chain"]["name"] for o in objs if "chain" in o} & chains,
                sum(1 for o in objs if "rule" in o))  # fmt: skip

    def _object_names(self) -> dict[str, tuple[str, ...]]:
        """Named objects in our table now (counters, ct timeouts), to delete the stale ones."""
        out: dict[str, list[str]] = {"counter": [], "ct timeout": []}
        p = self._run(["nft", "-j", "list", "table", R.FAMILY, R.TABLE], check=False)
        if p.returncode == 0:
            for o in json.loads(p.stdout)["nftables"]:
                for kind in out:
                    if kind in o:
                        out[kind].append(o[kind]["name"])
        return {k: tuple(v) for k, v in out.items()}

    def _counters(self) -> dict[str, tuple[int, int]]:
        """{name: (packets, bytes)} of the table's named counters: by nf_tables netlink
        (datapath/nftnl.py), no `nft` process per stats call; the nft tool if netlink fails;
        the figures last read if that fails too (``counter_reads``: a counter never goes back)."""
        return self.counter_reads.read(self._read_counters)

    def _read_counters(self) -> dict[str, tuple[int, int]]:
        try:
            return nftnl.counters(R.FAMILY, R.TABLE, self.netns)
        except BackendError as e:
            log.warning("nft backend: %s; asking nft", e)
        p = self._run(["nft", "-j", "list", "counters", "table", R.FAMILY, R.TABLE], check=False)
        if p.returncode != 0:
            raise BackendError(f"nft backend: `nft list counters` failed: {p.stderr.strip() or p.returncode}")
        out = {}
        try:
            for o in json.loads(p.stdout)["nftables"]:
                if "counter" in o:
                    c = o["counter"]
                    out[c["name"]] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BackendError(f"nft backend: `nft list counters` answered what does not parse: {e!r}") from None
        return out

    def _remove_routing(self, keep: set[int] = frozenset()) -> list[str]:
        """Remove our ip rules (pref in range AND proto 201) and our routes in their tables,
        except tables ``keep``; returns what went (policyroutes)."""
        return ROUTING.remove(self._ip, keep)

    def stop(self, keep_state: bool = False) -> None:
        """keep_state=False: remove table ip snatgw, our policy routing, and (with the conntrack
        tool) our sessions - nothing of ours is left.  keep_state=True (a daemon restart): leave
        the rule set and routing installed, so the kernel keeps translating every session (and
        new flows) until the next start() replaces them atomically.  Removing only the table
        would be worse: without a nat chain the kernel stops applying the NAT bindings of live
        sessions, which then leak their inside addresses."""
        if keep_state:
            self._plan = None
            return
        self._run(["nft", "delete", "table", R.FAMILY, R.TABLE], check=False)
        self._objects = None
        from ..cleanup import remove_guard

        remove_guard(self.netns)
        self._remove_routing()
        try:
            self.flush()
        except BackendError:
            pass
        self._plan = None

    def remove_leftovers(self) -> list[str]:
        """Remove everything of this backend in the namespace whatever made it (a stopped or
        killed daemon): table ip snatgw, our ip rules and routes (pref/table in our range AND
        proto 201) and our conntrack entries.  Returns what was removed (for the log)."""
        removed = []
        if self._run(["nft", "list", "table", R.FAMILY, R.TABLE], check=False).returncode == 0:
            self._run(["nft", "delete", "table", R.FAMILY, R.TABLE])
            self._objects = None
            removed.append(f"nft table {R.FAMILY} {R.TABLE}")
        removed += self._remove_routing()
        try:
            n = self.flush()
        except BackendError:
            n = 0  # no conntrack tool: the entries expire by themselves
        if n:
            removed.append(f"{n} conntrack entries marked by snatgw")
        return removed

    #: the daemon runs expire() outside its lock: a count of a large table takes seconds
    expire_unlocked = True

    def expire(self, now: float | None = None) -> int:
        """The kernel's conntrack expires sessions itself; each tick re-judges max_sessions
        (render.S_FULL) and, on a table above COUNT_FRESH_MAX entries, counts the sessions for
        stats() (paced: at most 1/GC_DUTY of a CPU)."""
        self._judge_full()
        t0 = time.monotonic()
        if t0 >= self._next_tally and self._conntrack_count() > COUNT_FRESH_MAX:
            self._tally_cache = self._tally()
            t1 = time.monotonic()
            self._next_tally = t1 + (GC_DUTY - 1) * (t1 - t0)
        return 0

    def _netfilter_sysctl(self, name: str) -> int | None:
        """/proc/sys/net/netfilter/<name> of the gateway's namespace (None if unreadable)."""
        text = (self._read(f"/proc/sys/net/netfilter/{name}") or "").strip()
        return int(text) if text.isdigit() else None

    def _conntrack_count(self) -> int:
        """Entries in the namespace's conntrack (all of them, one /proc read)."""
        return self._netfilter_sysctl("nf_conntrack_count") or 0

    def _count_by_mark(self) -> dict[int, int]:
        """{ct mark: entries} of snatgw's sessions: one dump reading only marks (ctnetlink),
        else the conntrack text."""
        try:
            with Conntrack(self.netns) as ct:
                return ct.count_by_mark(R.MARK_TAG, R.MARK_MASK)
        except BackendError as e:
            log.warning("nft backend: %s; counting conntrack text", e)
        by_mark: dict[int, int] = {}
        for d in self._entries():
            by_mark[d["mark"]] = by_mark.get(d["mark"], 0) + 1
        return by_mark

    def _tally(self) -> "_Tally":
        """Live sessions per ct mark (one dump reading only marks) and, up to
        PRESSURE_LIST_MAX, per inside host and SNAT address (a listing)."""
        t0 = time.monotonic()
        by_mark = self._count_by_mark()
        hosts: dict[str, list[int]] = {}
        addrs: dict[str, list[int]] = {}
        listed = sum(by_mark.values()) <= PRESSURE_LIST_MAX
        if listed:  # per host and address needs a listing
            for x in self.iter_sessions():
                hosts.setdefault(x.inside.rpartition(":")[0], [0, 0])[0] += 1
                addrs.setdefault(x.nat.rpartition(":")[0], [0, 0])[0] += 1
        return _Tally(by_mark, hosts, addrs, time.monotonic(), time.monotonic() - t0, listed)

    def _judge_full(self) -> None:
        """Refuse new flows while the namespace's conntrack holds max_sessions entries or more
        (all of them: the gateway's namespace is ours), accept again below: a set element
        that the forward chain checks, changed only when the answer changes."""
        with self._gc_lock:  # the tick (unlocked) and an apply (daemon's lock) may both judge
            self._judge_full_locked()

    def _judge_full_locked(self) -> None:
        count = self._netfilter_sysctl("nf_conntrack_count")
        if count is None:
            return
        full = count >= self.settings.max_sessions
        if full != self._full:
            op = "add" if full else "delete"
            q = self._run(["nft", op, "element", R.FAMILY, R.TABLE, R.S_FULL, f"{{ 0x{R.MARK_TAG:08x} }}"], check=False)
            if q.returncode == 0 or not full:  # (deleting an absent element fails: not full either way)
                self._full = full

    def _conntrack_text(self) -> str:
        text = self._read("/proc/net/nf_conntrack")
        if text is not None:
            return text
        return self._run(["conntrack", "-L", "-o", "extended"], check=False).stdout

    def _timeouts(self) -> dict[str, int]:
        out = {}
        for state, fname in _SYSCTL_TIMEOUT.items():
            text = (self._read(f"/proc/sys/net/netfilter/{fname}") or "").strip()
            if text.isdigit():
                out[state] = int(text)
        return out

    def _entries(self, marks: tuple[int, int] = (R.MARK_TAG, R.MARK_MASK)):
        """snatgw's conntrack entries, streamed: ctnetlink with the mark filter in the kernel
        (ctnetlink.py), else /proc/net/nf_conntrack text (or `conntrack -L`) filtered here."""
        try:
            ct = Conntrack(self.netns)
        except BackendError as e:
            log.warning("nft backend: %s; reading conntrack as text", e)
            for d in parse_conntrack(self._conntrack_text()):
                if d["mark"] & marks[1] == marks[0]:
                    yield d
            return
        with ct:
            yield from ct.dump(*marks)

    def _session(self, d: dict, timeouts: dict[str, int]) -> Session:
        proto = d["proto"]
        state = _TCP_STATES.get(d["state"] or "", "NONE") if proto == "tcp" else proto.upper()
        full = timeouts.get("UDP_UNREPLIED" if state == "UDP" and not d["assured"] else state, d["timeout"])
        idle = max(0.0, float(full - d["timeout"]))
        return Session(
            proto=proto,
            inside=f"{d.get('src')}:{d.get('sport', 0)}",
            remote=f"{d.get('dst')}:{0 if proto == 'icmp' else d.get('dport', 0)}",  # an echo's id: its ends' own
            nat=f"{d.get('rdst')}:{d.get('rdport', 0)}",
            state=state, idle=idle, expires=float(d["timeout"]),
            rule_id=self._by_mark.get(R.rule_mark(d["mark"]), 0),
            **_session_counters(d),
        )  # fmt: skip

    def _session_timeouts(self) -> dict[str, int]:
        timeouts = self._timeouts()
        # what render.timeout_objects set on our flows (and _set_icmp_timeout on the namespace)
        for _, st in R.NFT_TCP_STATES:
            timeouts[st.name] = self.settings.timeout(st)
        timeouts["UDP"] = timeouts["UDP_UNREPLIED"] = self.settings.timeout(CtState.UDP)
        return timeouts

    def iter_sessions(self, flt: SessionFilter | None = None, limit: int | None = None):
        """snatgw's sessions from conntrack, one netlink buffer at a time; a rule filter goes
        to the kernel as the rule's mark, the others are applied while streaming."""
        flt = flt or SessionFilter()
        timeouts = self._session_timeouts()
        marks = (R.MARK_TAG, R.MARK_MASK)
        if flt.rule_id is not None:
            mine = [m for m, rid in self._by_mark.items() if rid == flt.rule_id]
            if not mine:
                return
            marks = (mine[0], R.RULE_MASK)  # whatever the inside device id
        n = 0
        for d in self._entries(marks):
            s = self._session(d, timeouts)
            if flt.empty or flt.match(s):
                if limit is not None and n >= limit:
                    return
                n += 1
                yield s

    def sessions(self) -> list[Session]:
        return list(self.iter_sessions())

    def session_of(self, host: str, sport: int, remote: str, dport: int, proto: int) -> Session | None:
        """snatgw's session of one flow, by its original tuple (``dport`` 0 for an ICMP echo,
        whose identifier is ``sport``): conntrack looks it up in its hash (ctnetlink get, as
        `conntrack -G`), so explain --live finds it whatever a listing's cut; None when
        conntrack has no such flow or it is not snatgw's (its mark).  Without ctnetlink, the
        listing's walk toward the remote from the host."""
        want = {"src": host, "sport": str(sport), "dst": remote, "proto": PROTO_NAMES.get(proto, str(proto))}
        if proto != 1:
            want["dport"] = str(dport)
        try:
            ct = Conntrack(self.netns)
        except BackendError as e:
            log.warning("nft backend: %s; looking the session up in the listing", e)
            flt = SessionFilter(inside=IPv4Network(f"{host}/32"), remote=IPv4Network(f"{remote}/32"), proto=proto,
                                remote_port=None if proto == 1 else dport)  # fmt: skip
            return next((x for x in self.iter_sessions(flt) if x.inside == f"{host}:{sport}"), None)
        with ct:
            d = ct.get(host, sport, remote, dport, proto)
        # (a flow's reply tuple finds its entry too: only the original direction is the flow)
        if d is None or d["mark"] & R.MARK_MASK != R.MARK_TAG or any(d.get(k) != v for k, v in want.items()):
            return None
        return self._session(d, self._session_timeouts())

    def status_extra(self) -> dict:
        """What a reader of conntrack in another process needs to name sessions' rules (the
        CLI lists sessions itself, streaming: see daemon/client.py)."""
        import os

        # the namespace whose conntrack holds the sessions: ours unless given (a reader in
        # another namespace, e.g. the CLI outside the daemon's, enters it by this path)
        netns = self.netns or f"/proc/{os.getpid()}/ns/net"
        return {"marks": {str(m): rid for m, rid in self._by_mark.items()}, "netns": netns,
                "counter_reads": self.counter_reads.as_dict()}  # the named counters' failed reads

    @classmethod
    def reader(cls, settings: Settings, marks: dict, netns: str | None = None) -> "NftBackend":
        """A read-only view for listings: sessions from conntrack, rules by the given marks."""
        b = cls(settings, netns)
        b._by_mark = {int(m): int(rid) for m, rid in marks.items()}
        return b

    def counters(self) -> Stats:
        """stats() without the session counts (no conntrack dump): the daemon's rate samples."""
        c = self._counters()
        rules = {}
        for r in self._config.rules if self._config else ():
            pk, by = c.get(R.counter_name(r), (0, 0))
            made = c.get(R.counter_name(r, "new"), (0, 0))[0]  # the rate's CPS
            rules[r.rule_id] = RuleCounters(r.rule_id, pk, by, made)
        new = sum(v[0] for k, v in c.items() if k.startswith("new_"))
        return Stats(reasons={"XLATE_NEW": new, "DROP_NO_SESSION": c.get(R.C_NO_SESSION, (0, 0))[0],
                              "DROP_UNMATCHED": c.get(R.C_UNMATCHED, (0, 0))[0]}, rules=rules, sessions=-1)

    def stats(self) -> Stats:
        """Counters from nft (a rule's sessions made: its new_ counter), live sessions per rule
        (``live``) from a conntrack dump of snatgw's marks that reads only each entry's mark
        (ctnetlink has no count by mark: see ctnetlink.py).  Above
        COUNT_FRESH_MAX entries the count is the GC tick's last one (``counted_at``, at most
        max(gc_interval, GC_DUTY * T) + T old, T the count's duration), not a dump per call."""
        c = self._counters()
        tally = self._tally_cache
        if tally is None or self._conntrack_count() <= COUNT_FRESH_MAX:
            tally = self._tally()
        by_mark, hosts, addrs = tally.by_mark, tally.hosts, tally.addrs
        live: dict[int, int] = {}
        for m, n in by_mark.items():
            rid = self._by_mark.get(R.rule_mark(m), 0)
            live[rid] = live.get(rid, 0) + n
        rules = {}
        for r in self._config.rules if self._config else ():
            pk, by = c.get(R.counter_name(r), (0, 0))
            made = c.get(R.counter_name(r, "new"), (0, 0))[0]  # sessions made, as bpf's snat_rule_stats
            rules[r.rule_id] = RuleCounters(r.rule_id, pk, by, made, live=live.get(r.rule_id, 0))
        new = sum(v[0] for k, v in c.items() if k.startswith("new_"))
        # a flow refused for want of a port passed nat_out (counted new_) and died at confirm
        failed = self._conntrack_failed()
        if self._failed_base is None:  # unread at start: counted from the first read that works
            self._failed_base = self._conntrack_base(failed)
        exhausted = max(0, failed - self._failed_base) if self._failed_base is not None else 0
        reasons = {
            "XLATE_NEW": max(0, new - exhausted),
            "DROP_PORT_EXHAUSTED": exhausted,
            "DROP_TABLE_FULL": c.get(R.C_TABLE_FULL, (0, 0))[0],
            "DROP_HOST_LIMIT": c.get(R.C_HOST_LIMIT, (0, 0))[0],
            "DROP_NO_SESSION": c.get(R.C_NO_SESSION, (0, 0))[0],
            "DROP_UNMATCHED": c.get(R.C_UNMATCHED, (0, 0))[0],
            "DROP_LEAK": c.get(R.C_LEAK, (0, 0))[0],
            "DROP_INBOUND": c.get(R.C_INBOUND, (0, 0))[0],
            "DROP_SPOOFED": c.get(R.C_SPOOFED, (0, 0))[0],
            "DROP_ICMP_NOT_FROM_HOST": c.get(R.C_NOT_FROM_HOST, (0, 0))[0],
        }
        total = sum(by_mark.values())
        # the kernel says nothing of which host or address a refusal was for: sessions only
        unlisted = None if tally.listed else (
            f"{total} sessions: nft lists them per inside host and SNAT address only up to "
            f"{PRESSURE_LIST_MAX} (a conntrack listing per count; docs/nftables.md)")
        pressure = pressure_summary(hosts, addrs, total, self.settings.max_sessions, unlisted=unlisted,
                                    refusals_known=False)
        return Stats(reasons=reasons, rules=rules, sessions=total, pressure=pressure)

    def flush(self, rule_id: int | None = None, inside: IPv4Address | None = None,
              nat: IPv4Address | None = None) -> int:
        """Delete our conntrack entries matching every filter given (rule, inside address, SNAT
        address) with the conntrack tool; none given: all of ours."""
        if rule_id is None:
            marks = [f"{R.MARK_TAG}/{R.MARK_MASK}"]
        else:
            marks = [f"{m}/{R.RULE_MASK}" for m, rid in self._by_mark.items() if rid == rule_id]
        extra = (["-s", str(inside)] if inside is not None else []) + (["-q", str(nat)] if nat is not None else [])
        return sum(self._ct_delete(["-m", m, *extra]) for m in marks)

    def audit_source(self):
        """Conntrack NEW/DESTROY events of our marked entries (the audit log's source)."""
        from .ctnetlink import ConntrackEvents

        return ConntrackEvents(R.MARK_TAG, R.MARK_MASK, rule_of=lambda m: self._by_mark.get(R.rule_mark(m), 0),
                               netns=self.netns)  # fmt: skip

    def health(self) -> dict:
        """For `snatgw status`: the table's base chains (their hooks), our policy routing, and
        conntrack's fill (all of the namespace's entries against nf_conntrack_max)."""
        p = self._run(["nft", "-j", "list", "table", R.FAMILY, R.TABLE], check=False)
        hooks = []
        if p.returncode == 0:
            for o in json.loads(p.stdout)["nftables"]:
                c = o.get("chain")
                if c and c.get("hook"):
                    hooks.append({"device": None, "hook": c["hook"], "program": f"chain {c['name']}",
                                  "prog_id": c.get("handle"), "attached": True, "found": c.get("handle")})
        expected = {"prerouting", "forward", "postrouting"}
        missing = expected - {h["hook"] for h in hooks}
        hooks += [{"device": None, "hook": h, "program": f"table {R.FAMILY} {R.TABLE}", "prog_id": None,
                   "attached": False, "found": None} for h in sorted(missing)]  # fmt: skip

        # a count, not a listing (only each entry's mark is read); the tick's on a large table
        tally = self._tally_cache
        if tally is None or self._conntrack_count() <= COUNT_FRESH_MAX:
            ours = sum(self._count_by_mark().values())
        else:
            ours = sum(tally.by_mark.values())
        maps = [{"name": "conntrack", "entries": self._conntrack_count(),
                 "max_entries": self._netfilter_sysctl("nf_conntrack_max") or 0},
                {"name": "policy routing rules", "entries": len(ROUTING.rules(self._ip)), "max_entries": 1000}]
        return {"hooks": hooks, "maps": maps, "sessions": ours, "max_sessions": self.settings.max_sessions,
                "devices": {"inside": list(self.settings.inside), "outside": list(self.settings.outside)}}

    def zero(self) -> None:
        if self._run(["nft", "reset", "counters", "table", R.FAMILY, R.TABLE], check=False).returncode == 0:
            self.counter_reads.forget()  # a failed read after this must not answer the old figures
        self._failed_base = self._conntrack_base()

    def _conntrack_base(self, failed: int | None = None) -> int | None:
        """insert_failed now (``failed``: just read), the base DROP_PORT_EXHAUSTED counts from;
        None while no read of it has worked: a base of 0 would count every insert failure of
        the namespace's past as refusals at the first read that works."""
        failed = self._conntrack_failed() if failed is None else failed
        return failed if "conntrack" in self.counter_reads.last else None

    def _conntrack_failed(self) -> int:
        """_insert_failed, or the figure last read when /proc cannot be read (counter_reads):
        DROP_PORT_EXHAUSTED never dips (nor XLATE_NEW, which is less it, jumps)."""
        return self.counter_reads.read(lambda: {"insert_failed": self._insert_failed()}, "conntrack").get(
            "insert_failed", 0)  # fmt: skip

    def _insert_failed(self) -> int:
        """conntrack's insert_failed (all CPUs) in the gateway's namespace: a new flow whose
        NAT found no free tuple is dropped when its entry is confirmed and counted here
        (nft cannot see it: it happens after the last chain).  BackendError when the file
        cannot be read; 0 when it has no such column."""
        text = self._read("/proc/net/stat/nf_conntrack")
        if text is None:
            raise BackendError("nft backend: cannot read /proc/net/stat/nf_conntrack (conntrack's insert_failed)")
        lines = text.split("\n")
        if not lines or "insert_failed" not in lines[0].split():
            return 0
        col = lines[0].split().index("insert_failed")
        total = 0
        for line in lines[1:]:
            f = line.split()
            if len(f) > col:
                try:
                    total += int(f[col], 16)
                except ValueError:
                    pass
        return total



__all__ = ["NftBackend", "parse_conntrack"]
