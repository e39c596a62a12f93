"""BpfBackend: the eBPF TC datapath behind snatgw.datapath.backend.Backend - load/adopt and
attach, rule installs, session expiry on CLOCK_MONOTONIC (the kernel-side sweep of sweep.py),
new_gw moves of live sessions, counters and live counts, and ``read_pinned`` for `snatgw
conns`/`stats` when no daemon runs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import subprocess
import threading
import time
from dataclasses import replace
from typing import Callable

from ... import layout as L
from ...config.schema import GatewayConfig, Settings
from ...errors import BackendError
from ...fibrules import PolicyRule, describe, gw_numbers, route_back_blocker
from ...rules import leak_guard_passes
from ..backend import LastRead, RuleCounters, Session, Stats, pressure_summary
from ..routeget import route_get
from . import guard, gwroutes, synctable
from . import libbpf as B
from .loader import Loader, ifindex
from .maps import CT_KEY, DatapathMaps, ForgetFailed, last_markers, markers_of, monotonic_ns
from .maps import SessionPair, entry_peer, peer_entry
from .recirc import FragmentHolder
from .sweep import ALL, SessionFilter, Sweeper, SweepResult
from .audit import AuditRing, pair_record

log = logging.getLogger("snatgw.bpf")

NO_DEVICE = 0xFFFFFFFF  # rule oif whose device is absent (matches nothing)
FIB_RULE_INVERT = 0x2  # linux/fib_rules.h: a `not` rule
#: seconds between the hook check's own judgements of the route back (a rule dump and a read of
#: every device's forwarding switch, ~2.5 ms): the daemon's netlink events judge at once, this
#: catches what they missed (ENOBUFS, no netlink socket)
ROUTE_BACK_RECHECK = 10.0
ORPHAN_GRACE_NS = 10 * 10**9  # half-inserted pairs older than this are removed by GC
_clock = time.monotonic  # seconds, for GC pacing (tests replace it)
ACCEPT_LOCAL_DIR = "/proc/sys/net/ipv4/conf"
MAX_CARRY = 262144  # sessions an nft -> bpf switch carries over at most
GC_DUTY = 3  # a sweep of duration T is followed by at least (GC_DUTY-1)*T without one
#: ... unless the table is under pressure: live sessions at or above this share of
#: max_sessions, or a new flow refused as DROP_TABLE_FULL since the last sweep.  Then every GC
#: tick sweeps (a refused new flow costs more than a CPU's share): the expired sessions that
#: fill a table leave within a walk, not after the pacing's waits
PRESSURE_FILL = 0.9
#: sweeps walk the table in runs of layout.SWEEP_CHUNK keys (each system call milliseconds of
#: kernel time: the CPU is never held for a whole walk); False: one run walks it all (cheaper,
#: ~2.6x, but holds its CPU for up to seconds at a million sessions)
CHUNKED = True
FULL_EVERY = 16  # every 16th sweep also checks each entry's other half (half pairs, orphans)

#: resolver(addr) -> (ifindex, next hop, mtu) of the route to addr (next hop = addr on-link); the
#: session sync also asks resolver(addr, src, iif): the route a packet from src arriving on iif takes
Resolver = Callable[..., "tuple[int, ipaddress.IPv4Address, int]"]
#: owners(outside device names) -> {address: ifindexes of those devices holding it}
Owners = Callable[[tuple], "dict[ipaddress.IPv4Address, set[int]]"]


def _ifindex_or_absent(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return NO_DEVICE


def route_egress(addr: ipaddress.IPv4Address, src: ipaddress.IPv4Address | None = None,
                 iif: int = 0) -> tuple[int, ipaddress.IPv4Address, int]:
    """How ``addr`` is reached in this namespace (the kernel's `ip route get` answer and its
    device's MTU), through rtnetlink (datapath/routeget.py; it was two `ip` processes, a few ms,
    a route: the session sync asks one per new remote); with ``src`` and ``iif``, how a packet
    from ``src`` arriving on ``iif`` is forwarded there (the datapath's question for a new flow)."""
    return route_get(addr, src, iif)


def _egresses_text(egresses) -> str:
    """(ifindex, next hop) pairs as `via NH dev NAME, ...` for a log line."""
    return ", ".join(f"via {nh} dev {_dev_name(idx)}" for idx, nh in sorted(egresses, key=str)) or "none"


def _gone(idx: int) -> bool:
    """No device has ifindex ``idx`` now."""
    try:
        socket.if_indextoname(idx)
    except OSError:
        return True
    return False


def _dev_name(idx: int) -> str:
    try:
        return socket.if_indextoname(idx)
    except OSError:
        return f"#{idx}"


def address_owners(devices) -> dict[ipaddress.IPv4Address, set[int]]:
    """Which of ``devices`` hold each local IPv4 address (``ip -j -4 addr show``), by ifindex."""
    r = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise BackendError(f"ip addr show: {r.stderr.strip()}")
    out: dict[ipaddress.IPv4Address, set[int]] = {}
    for link in json.loads(r.stdout or "[]"):
        if link.get("ifname") not in devices:
            continue
        for a in link.get("addr_info", []):
            out.setdefault(ipaddress.IPv4Address(a["local"]), set()).add(int(link["ifindex"]))
    return out


def warn_without_forwarding(path: str = "/proc/sys/net/ipv4/ip_forward") -> bool:
    """The programs redirect translated packets themselves, but hand some to the kernel to
    forward (PASS_TRANSLATED: over the MTU without DF, and the replies the kernel must answer
    the remote about: XLATE_IN_TTL, XLATE_IN_FRAG_NEEDED).  With forwarding off the kernel drops
    those, and path MTU discovery through a narrow inside link breaks: say so.  True if on."""
    try:
        with open(path) as f:
            on = f.read().strip() == "1"
    except OSError:
        return True
    if not on:
        log.warning("net.ipv4.ip_forward is 0 in this namespace: translated packets the kernel must "
                    "forward (over the MTU without DF; replies too big for the inside link or whose "
                    "TTL runs out, which it answers with frag-needed / time exceeded) will be dropped")
    return on


def device_addresses(devices) -> dict[ipaddress.IPv4Address, int]:
    """The IPv4 addresses of ``devices`` (this namespace) -> their device's ifindex, by
    `ip -j addr show dev D`; absent devices are skipped."""
    out: dict[ipaddress.IPv4Address, int] = {}
    for dev in devices:
        r = subprocess.run(["ip", "-j", "addr", "show", "dev", dev], capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            continue
        for link in json.loads(r.stdout or "[]"):
            for a in link.get("addr_info", []):
                if a.get("family") == "inet":
                    out[ipaddress.IPv4Address(a["local"])] = int(link.get("ifindex", 0))
    return out


def set_accept_local(devices, conf_dir: str = ACCEPT_LOCAL_DIR) -> None:
    """net.ipv4.conf.<dev>.accept_local=1 on each inside device (this network namespace):
    PASS_TRANSLATED packets reach the kernel there with a local (SNAT) source address, which
    it drops as martian otherwise.  A failure is logged, not fatal: only packets over the MTU
    without DF need it."""
    for dev in devices:
        path = os.path.join(conf_dir, dev, "accept_local")
        try:
            with open(path, "w") as f:
                f.write("1\n")
        except OSError as e:
            log.warning("cannot set %s to 1 (%s): translated packets over the MTU without DF "
                        "from %s will be dropped by the kernel", path, e.strerror, dev)


def _raw(addr: ipaddress.IPv4Address) -> int:
    """An address as the ct_entry codec takes it (int, packed big-endian = wire order)."""
    return int(addr)


class BpfBackend:
    """The eBPF datapath.  ``settings`` are the initial settings (start() takes the config's);
    ``obj_path``/``defines`` choose the object (default: bpf-C's build.compile());
    ``resolver`` answers routes (default: ``ip -j route get``)."""

    name = "bpf"
    #: expire() may run outside the daemon's lock: it serializes its own walks, so control
    #: requests (stats, listings) never wait for a sweep
    expire_unlocked = True

    def __init__(self, settings: Settings | None = None, obj_path=None, defines: dict | None = None,
                 resolver: Resolver | None = None, owners: Owners | None = None):  # fmt: skip
        self.obj_path, self.defines = obj_path, defines
        self.resolver = resolver or route_egress
        self.owners = owners or address_owners
        self.loader: Loader | None = None
        self.maps: DatapathMaps | None = None
        self.settings = settings or Settings()
        self.config: GatewayConfig | None = None
        self.readonly = False
        self._new_gws: dict[int, ipaddress.IPv4Address | None] | None = None  # by rule_id
        self._pools: dict | None = None  # rule_id -> Pool, as last installed
        #: new_gw policy routing as last installed (gwroutes): (ifindex, next hop) -> number
        self._gw_numbers: dict[tuple[int, ipaddress.IPv4Address], int] | None = None
        self._gw_routes: list[gwroutes.GwRoute] = []  # what it installed (the hook check's to restore)
        self._gw_check_at = float("-inf")  # _clock() of the hook check's last look at them
        #: the new_gw egresses the last install resolved ((ifindex, next hop); those `ip` then
        #: refused included): the hook check resolves them again and reinstalls when they moved
        self._gw_resolved: frozenset = frozenset()
        self.last_follow = (0, 0)  # (moved, removed) sessions of the last rule install
        #: markers an apply emptied, for the next refusals(): forget_judgements' packed batches
        self._forgotten_refusals: list[tuple[int, bytes, bytes]] = []
        #: what the refusal markers and spill memos of the installed rules were judged under
        #: (prog_maps.judged_under), set by each install: an apply empties them when it changed
        self._judged: tuple | None = None
        self._next_sweep = 0.0  # time.monotonic() before which expire() skips its sweep
        self._table_full_seen = 0  # DROP_TABLE_FULL when _pressure() last looked
        self.pressure_sweeps = 0  # sweeps the pacing would have skipped but pressure ran
        self.holder: FragmentHolder | None = None  # holds fragments that come before their first
        self._sweeper: Sweeper | None = None
        self._sweeper_lock = threading.Lock()  # loaded once: the gc thread's sweep, the worker's sync installs
        self._sweeps = 0
        self._t_normal: float | None = None  # duration of the last sweep that was not full
        self.chunked = CHUNKED
        self._walk = threading.Lock()  # one walk at a time (the sweep's args live in a map)
        #: walks that must run now (a recount, a flush) waiting for _walk: an expiry sweep in
        #: progress stops at its next chunk for them (cut short, sweep.py), none begins
        self._urgent = 0
        self._urgent_lock = threading.Lock()
        self.cut_sweeps = 0  # expiry sweeps cut short for such a walk
        #: the leak guard's drops as last read (nft's counter, outside our maps): a failed
        #: read answers them, so DROP_LEAK never goes back
        self.counter_reads = LastRead("bpf backend: the leak guard's counter", log)
        self._full_due = False  # a full sweep was cut short: the next one is full
        self._sweep_max = 0.0  # longest sweep so far (seconds), for status
        self.last_sweep: SweepResult | None = None
        #: _clock() when the last walk (expiry, flush or recount) published the live counts:
        #: the per-host sessions are "as of" it while no host limit has the datapath count them
        self.counted_at: float | None = None
        self._walk_since: float | None = None  # _clock() when the walk in progress began
        #: the recount walks (a host limit turned on, or sessions adopted under one), for status
        self.recounts = {"count": 0, "last_seconds": None, "last_wait_seconds": None, "last_visited": None,
                         "last_live": None, "last_cut_sweep": None}  # fmt: skip
        #: the audit log's intake for sessions the control plane removes itself (rule changes):
        #: set by the daemon (daemon/audit.py), called with lists of record dicts
        self.audit_sink: Callable[[list[dict]], None] | None = None
        #: the session sync's intake of the same removals, as end records for the peer (the
        #: datapath's own ends reach it through the audit ring): set by daemon/sync.py
        self.sync_sink: Callable[[list], None] | None = None
        #: why a new session's route back is looked up (fibrules.route_back_blocker; None:
        #: reused from the reverse-path check, CFG_F_BACK_FROM_RPF set); "not judged yet" at first
        self.route_back_blocker: str | None = "not judged yet"
        self._route_back_at = float("-inf")  # _clock() of the last judgement
        self._sync_routes: synctable.RouteCache | None = None  # the session sync's routes (synctable)
        #: what the start did carrying the table over to another max_sessions (loader.finish_carry):
        #: sizes, entries copied per pass, time; None when it adopted the table as it was
        self.resized: dict | None = None

    # ------------------------------------------------------------- lifecycle

    def start(self, config: GatewayConfig) -> None:
        """Check the devices, load (adopting the pinned maps of a previous daemon), install,
        attach (replacing a previous daemon's programs in place: no moment without a program
        on a hook), then remove the nft backend's leftovers in this namespace (its table,
        policy routing, conntrack entries: logged as a warning).

        On a failure after the load: a datapath that was running before (adopted pins) stays
        as it is, attached and pinned (it keeps translating); a fresh one is removed."""
        s = config.settings
        for name in tuple(s.inside) + tuple(s.outside):
            ifindex(name)  # a missing device fails here, before anything is changed
        self.loader = Loader(s.pin_dir, s.max_sessions, self.obj_path, self.defines)
        self.maps = self.loader.load()
        self.settings = s
        try:
            judged = self._pinned_judgement()  # (before this start writes its rules and roles)
            self._install(config)
            self.holder = FragmentHolder()
            recirc = self.holder.start()
            recreated = self._recreated_while_away(s)  # (snat_ifaces as the last daemon left it)
            self._write_ifaces(s)
            if recreated:  # before attach: the new device's first packets find their sessions
                self._follow_devices(recreated)
            if judged is None or judged != self._pinned_judgement(adopted_only=False):
                self._forget_judgements()  # the predecessor's markers and memos: as a reload would
                if self.loader.adopted:
                    log.info("bpf backend: the adopted refusal markers and spill memos were judged under other "
                             "rules, settings or devices (or that is unknown): forgotten")  # fmt: skip
            self.refresh_route_back()
            carried = self._nft_sessions()
            if carried:  # before attach: from the first packet on, ours carry on with nft's mappings
                n = self.insert_sessions(carried, config)
                log.warning("bpf backend: carried %d of %d sessions over from the nft datapath", n, len(carried))
                if n and self.host_counting():  # a host limit judges them from the first packet
                    self.recount()
            self.loader.attach(list(s.inside), list(s.outside), L.RECIRC_DEV if recirc else None)
            self.resized = self._finish_carry()
            set_accept_local(s.inside)
            warn_without_forwarding()
        except BaseException:
            # adopted sessions and programs belong to whoever made them: keep them running,
            # with the pins as they were (the maps this start pinned or replaced put back; a
            # table being carried over: the programs it replaced too)
            adopted = self.loader.adopted
            if not adopted:
                guard.remove()
                self._remove_gw_routes()  # (nothing of ours marks packets: no datapath was adopted)
            else:
                self._unwatched()
                self.loader.rollback()
            self.loader.stop(keep_state=adopted)
            if self.holder is not None:
                self.holder.stop()
                self.holder = None
            self.loader = self.maps = None
            raise
        self.config = config
        self.loader.commit()
        # last: an nft datapath left here keeps translating until ours is attached (a packet
        # meets both for a moment: ours translates first, nft sees a pool source and passes it)
        self._remove_nft()

    def _pinned_judgement(self, adopted_only: bool = True) -> tuple | None:
        """What the refusal markers and spill memos in the maps were judged under, from the
        bytes there (prog_maps.judged_in_maps: rule slots, snat_config, snat_ifaces).  At a
        start, before it writes anything (``adopted_only``), the predecessor's: None when the
        start made or replaced (another layout) any of those three maps, or cannot read them,
        so its markers and memos are forgotten (the safe side: one more search each).  The
        start compares it with its own, after writing: a restart with the same config (and
        devices) keeps them, as a reload that changes nothing does; one with a host limit
        raised, spill turned on or a wider port range forgets them (they stayed, dropping a
        refused flow as DROP_REFUSED_RECENTLY for up to REFUSED_SECS after the start)."""
        from .prog_maps import judged_in_maps

        if adopted_only and not {L.MAP_RULES, L.MAP_CONFIG, L.MAP_IFACES} <= set(self.loader.reused):
            return None
        try:
            cfg, slots = self.maps.current_rules()
            return judged_in_maps(cfg, slots, self.maps.iface_roles())
        except (BackendError, B.LibbpfError, OSError) as e:
            log.warning("bpf backend: cannot read what the adopted refusal markers were judged under: %s", e)
            return None

    def _finish_carry(self) -> dict | None:
        """The session table carried over to this start's size (loader.finish_carry), logged
        with its figures; None when the table was adopted as it was (or made)."""
        done = self.loader.finish_carry()
        if done is None:
            return None
        ct = done["maps"].get(L.MAP_CT, {})
        log.info("bpf backend: session table resized from %s to %s sessions in %.3f s: %s", done.get("sessions_from"),
                 done.get("sessions_to"), done["seconds"], ct)  # fmt: skip
        return {"from": done.get("sessions_from"), "to": done.get("sessions_to"), "seconds": done["seconds"],
                "grace_seconds": done["grace_seconds"], "maps": done["maps"]}  # fmt: skip

    def _nft_sessions(self) -> list[Session]:
        """The sessions of an nft datapath running in this namespace (none: []); never raises."""
        try:
            from ..nft.backend import NftBackend

            nft = NftBackend(self.settings)
            if nft._run(["nft", "list", "table", "ip", "snatgw"], check=False).returncode != 0:
                return []
            return list(nft.iter_sessions(limit=MAX_CARRY))  # streamed: never the whole conntrack
        except Exception as e:  # noqa: BLE001 - a switch must work even when conntrack is unreadable
            log.warning("bpf backend: cannot read the nft datapath's sessions: %s", e)
            return []

    def insert_sessions(self, sessions: list[Session], config: GatewayConfig) -> int:
        """Session pairs (IN first, as the datapath writes them; never over an existing key)
        for each established TCP and each UDP session of another datapath (nft's conntrack),
        with its mapping, the first rule of ``config`` that matches it and holds its SNAT
        address, and the egress the kernel would use.  ICMP and TCP in other states are left
        out: they are short-lived and start again.  The live counts are the expiry sweep's to
        recount.  Returns how many pairs were written."""
        self._writable()
        now = monotonic_ns()
        routes: dict = {}

        def egress(addr):
            if addr not in routes:
                try:
                    routes[addr] = self.resolver(addr)
                except (BackendError, OSError, ValueError) as e:
                    log.warning("cannot carry sessions toward %s: %s", addr, e)
                    routes[addr] = None
            return routes[addr]

        n = 0
        for x in sessions:
            if x.proto not in ("tcp", "udp") or (x.proto == "tcp" and x.state != "ESTABLISHED"):
                continue
            try:
                (ip, port), (rip, rport), (nip, nport) = (a.rsplit(":", 1) for a in (x.inside, x.remote, x.nat))
                ip, rip, nip = ipaddress.IPv4Address(ip), ipaddress.IPv4Address(rip), ipaddress.IPv4Address(nip)
                port, rport, nport = int(port), int(rport), int(nport)
            except ValueError:
                continue
            rule = next((r for r in config.rules if ip in r.src and rip in r.dst and nip in r.pool), None)
            if rule is None:
                continue
            out_eg, in_eg = egress(rule.new_gw or rip), egress(ip)
            if out_eg is None or in_eg is None:
                continue
            proto = L.IPPROTO_TCP if x.proto == "tcp" else L.IPPROTO_UDP
            state = L.CtState.ESTABLISHED if x.proto == "tcp" else L.CtState.UDP
            vals = synctable.pair_values(rule, ip, port, rip, rport, nip, nport, proto, state, 0, out_eg, in_eg, now)
            if synctable.write_pair(self.maps.ct, *vals) is not None:
                continue  # the SNAT side is taken already (or the table is full)
            n += 1
        return n

    def _remove_nft(self) -> None:
        from ..cleanup import remove_nft

        try:
            removed = remove_nft()
        except BackendError as e:  # no nft or ip tool: no nft datapath can be running here
            log.warning("bpf backend: could not look for the nft datapath's leftovers: %s", e)
            return
        if removed:
            log.warning("bpf backend: removed the nft datapath's leftovers: %s", "; ".join(removed))

    def apply(self, config: GatewayConfig) -> None:
        self._writable()
        old = self.settings
        new = config.settings
        for f in ("pin_dir", "max_sessions"):
            if getattr(old, f) != getattr(new, f):
                how = ("a reload cannot resize the session table: restart the daemon (SIGTERM, then start "
                       "it again), which carries the sessions over to a table of the new size while the "
                       "datapath keeps translating" if f == "max_sessions"
                       else "takes effect only on a restart of the datapath")  # fmt: skip
                raise BackendError(f"settings: {f} changed ({getattr(old, f)} -> {getattr(new, f)}): {how}")
        judged = self._judged
        self._install(config)  # validates (compile) before touching anything
        if self._judged != judged:  # (a reload changing nothing keeps them: no search again)
            self._forget_judgements()
        self._write_ifaces(new)  # also when unchanged: a device may have been recreated
        self.refresh_route_back()
        if any(t < dict(old.timeouts).get(k, t) for k, t in new.timeouts):
            self._next_sweep = 0.0  # a timeout got shorter: sessions may have expired now
        if (old.inside, old.outside) != (new.inside, new.outside):
            # replace in place, then remove the hooks that left: no gap on the devices kept
            recirc = self.holder is not None and self.holder.fd is not None
            self.loader.attach(list(new.inside), list(new.outside), L.RECIRC_DEV if recirc else None)
            set_accept_local(new.inside)
        self.settings, self.config = new, config

    def stop(self, keep_state: bool = False) -> None:
        """keep_state (the daemon exits: SIGTERM, restart, upgrade): close our fds only; the
        programs stay attached and the maps pinned, so the kernel keeps translating with no
        daemon and the next start() adopts both.  Otherwise (`snatgw purge`, tests): detach
        and remove the pinned maps (and the sessions)."""
        if self._sweeper is not None:
            self._sweeper.close()
            self._sweeper = None
        if self.readonly:
            if self.maps:
                self.maps.close()
            self.maps = None
            return
        if self.loader is not None:
            if keep_state:
                self._unwatched()
            self.loader.stop(keep_state)
            if not keep_state and self.config is not None:  # the guard this backend put there:
                guard.remove()  # never that of another daemon (maps loaded without a start: tests)
                self._remove_gw_routes()  # (after the detach: nothing marks packets any more)
        if self.holder is not None:  # after the detach: the TAP goes with the holder
            self.holder.stop()
            self.holder = None
        self.loader = self.maps = None

    def check_hooks(self) -> list[str]:
        """Re-attach programs whose TC filter vanished since attach (someone ran `tc filter del`
        or `tc qdisc del`), and put back the leak guard's nft table (guard.py) if it went;
        returns what was restored (the daemon logs and counts it)."""
        if self.readonly or self.loader is None:
            return []
        if self.settings is not None:  # a recreated device may clash: flag it before attaching
            self._refresh_iif_flag(self.settings.inside)
        if _clock() - self._route_back_at >= ROUTE_BACK_RECHECK:  # (events lost, or no daemon socket)
            self.refresh_route_back()
        before = {a.ifname: a.ifindex for a in self.loader.attachments}
        restored = self.loader.check()
        if (restored or self.loader.left) and self.settings is not None:
            # an attachment made again is (mostly) a device recreated with another ifindex:
            # snat_ifaces names devices by ifindex, and an inside device missing there made
            # traffic routed between inside networks through it look outbound (translated with
            # a SNAT address) until a reload
            try:
                self._write_ifaces(self.settings)
            except BackendError as e:
                log.warning("bpf backend: cannot write the devices' roles: %s", e)
            # (a device renamed away keeps its sessions: its hosts are still behind it, and
            # the kernel routes their replies there, as on nft)
            moved = {a.ifname: (before[a.ifname], a.ifindex) for a in self.loader.attachments
                     if before.get(a.ifname, a.ifindex) != a.ifindex and _gone(before[a.ifname])}  # fmt: skip
            if moved:
                self._follow_devices(moved)
        if _clock() - self._gw_check_at >= ROUTE_BACK_RECHECK:  # (`ip` runs: not every tick)
            self._gw_check_at = _clock()
            self._recheck_gw_egresses()
            restored += self._check_gw_routes()
            self._recheck_inside_addrs()
        if self.config is not None and not guard.present():
            self._install_guard(self.config)
            restored.append(f"leak guard table {guard.FAMILY} {guard.TABLE}")
        return restored

    def _recheck_inside_addrs(self) -> None:
        """The hook check's part: the gateway's own addresses on its inside devices as they are
        now (snat_inside_addrs: the egress guard drops a packet leaving an uplink with one of
        them as its source).  They were written at start and reload only, so an address added
        to an inside device later (by hand, DHCP, keepalived's VIP) went unguarded by the
        datapath until a reload (the nft guard table still held).  Logged at info when they
        changed.  Never raises."""
        if self.settings is None or self.maps is None:
            return
        try:
            changed = self.maps.write_inside_addrs(device_addresses(self.settings.inside))
        except (BackendError, B.LibbpfError, OSError, ValueError, subprocess.SubprocessError) as e:
            log.warning("bpf backend: cannot read or write the inside devices' addresses: %s", e)
            return
        if changed:
            log.info("bpf backend: the inside devices' own addresses changed: %s", " ".join(changed))

    def _recreated_while_away(self, s: Settings) -> dict[str, tuple[int, int]]:
        """At a start that adopted a previous daemon's sessions: the devices of ``s`` recreated
        with another ifindex while no daemon watched (a VLAN or PPP device made again during a
        restart), name -> (old, new ifindex), for _follow_devices.  snat_ifaces, still as the
        last daemon wrote it, names its devices by ifindex and role only: per role, the one
        device it held that no longer exists is taken to be the one configured device it did
        not hold.  More than one of a role on either side cannot be told apart: logged, and
        those sessions end when they expire (they were black-holed either way).  A device
        renamed away still exists: its sessions stay where they are.  Never raises."""
        ct = L.MAP_CT in self.loader.reused or L.MAP_CT in self.loader.carrying
        if not ct or L.MAP_IFACES not in self.loader.reused:
            return {}
        try:
            held = self.maps.iface_roles()
            exist = {idx for idx, _ in socket.if_nameindex()}
            now = {n: ifindex(n) for n in tuple(s.inside) + tuple(s.outside)}
        except (BackendError, B.LibbpfError, OSError) as e:
            log.warning("bpf backend: cannot tell which devices were recreated since the last daemon: %s", e)
            return {}
        out = {}
        for names, role in ((s.inside, L.IFACE_INSIDE), (s.outside, L.IFACE_OUTSIDE)):
            gone = [idx for idx, r in held.items() if idx != L.RECIRC_KEY and r == role and idx not in exist]
            new = [n for n in names if now[n] not in held]
            if len(gone) == 1 and len(new) == 1:
                out[new[0]] = (gone[0], now[new[0]])
            elif gone and new:
                log.warning("bpf backend: %s devices recreated since the last daemon (%s) cannot be told apart "
                            "from its ifindexes (%s): their sessions end when they expire",
                            "inside" if role == L.IFACE_INSIDE else "outside", ", ".join(new),
                            ", ".join(map(str, gone)))  # fmt: skip
        return out

    def _follow_devices(self, moved: dict[str, tuple[int, int]]) -> None:
        """Sessions follow devices recreated under their names with another ifindex (a VLAN or
        bond made again, a PPP link with a static address back): a session keeps the ifindex
        of the device it leaves by (OUT: the uplink; IN: the inside device) and redirects
        there, so without this every established session on such a device was black-holed for
        as long as its packets kept it alive.  Never raises (logged)."""
        inside = set(self.settings.inside) if self.settings else set()
        try:
            n = self.maps.follow_devices({o: i for o, i in moved.values()},
                                         {o: i for name, (o, i) in moved.items() if name in inside})  # fmt: skip
        except (BackendError, B.LibbpfError, OSError) as e:
            log.warning("bpf backend: sessions cannot follow recreated devices %s: %s", ", ".join(moved), e)
            return
        log.info("bpf backend: devices recreated with another ifindex (%s): %d session entries follow them",
                 ", ".join(f"{name} {o} -> {i}" for name, (o, i) in moved.items()), n)  # fmt: skip

    def _install_guard(self, config: GatewayConfig) -> None:
        """The leak guard's second line (guard.py), for the rules' `from` nets and the uplinks.
        A failure is logged, not raised: the egress program is the first line."""
        try:
            guard.install([r.src for r in config.rules], config.settings.outside,
                          passes=leak_guard_passes(config.rules))
        except BackendError as e:
            log.warning("bpf backend: %s", e)

    # ------------------------------------------------------------- rules

    def _install(self, config: GatewayConfig) -> None:
        from .prog_maps import compile_from_nets, compile_rules, judged_under  # bpf-C's compiler of rules to map bytes

        cfg, rules = compile_rules(config.rules, config.settings, _ifindex_or_absent)
        # CFG_F_IIF_AMBIGUOUS stays as it is: _write_ifaces, which always follows (before any
        # attach), judges it from the devices present
        # CFG_F_BACK_FROM_RPF too (refresh_route_back judges it after every install)
        was = self.maps.cfg.get(0)
        for flag in (L.CFG_F_IIF_AMBIGUOUS, L.CFG_F_BACK_FROM_RPF):
            cfg = _with_flag(cfg, flag, _has_flag(was, flag))
        # the egress guard learns new `from` nets before the rules use them, and forgets
        # removed ones only after (a removed rule's live sessions are translated anyway); in
        # between, a net that is a `from` net on either side takes the full check
        nets = compile_from_nets(config.rules)
        was = self.maps.from_nets_now()
        both = dict(was)
        for k, kind in nets.items():
            both[k] = min(kind, both.get(k, kind))  # FROM_NET_RULE < FROM_NET_POOL
        self.maps.write_from_nets(both, have=was)
        gw, gw_routes = self._install_gw_routes(config)  # inert until snat_gw_marks names their marks
        written = install_rules(self.maps, cfg, rules, self._recount_for_limit)
        self.maps.write_from_nets(nets, have=both)
        self._install_guard(config)
        log.info("installed %d rules (%d slots written)", len(rules), written)
        new_gws = {r.rule_id: r.new_gw for r in config.rules}
        pools = {r.rule_id: r.pool for r in config.rules}
        if new_gws != self._new_gws or pools != self._pools:
            self.last_follow = self.follow_rules(new_gws, self._new_gws or {}, pools, config.settings.outside)
            moved, removed = self.last_follow
            if moved:
                log.info("moved %d live sessions to their rule's new next hop", moved)
            if removed:
                log.info("removed %d live sessions whose SNAT address left their rule's pool or link", removed)
        self._new_gws, self._pools = new_gws, pools
        # the marks once sessions have followed their rules to the new egresses; then the
        # routing no egress uses any more goes
        self._use_gw_routes(gw, gw_routes)
        self._judged = judged_under(rules, config.settings, _ifindex_or_absent)

    def _use_gw_routes(self, gw: dict, gw_routes: list) -> None:
        """Point snat_gw_marks at the installed egresses' marks, then remove the policy routing
        no egress uses any more."""
        self.maps.write_gw_marks({(idx, _raw(nh)): L.GW_MARK_BASE + n for (idx, nh), n in gw.items()})
        self._gw_numbers, self._gw_routes = gw, gw_routes
        gone = gwroutes.remove(keep={L.GW_RT_BASE + n for n in gw.values()})
        if gone:
            log.info("bpf backend: new_gw policy routing removed: %s", "; ".join(gone))

    def _install_gw_routes(self, config: GatewayConfig, resolved: tuple | None = None):
        """The policy routing of each distinct egress of the new_gw rules (gwroutes): numbered
        (fibrules.gw_numbers, keeping the last install's numbers), routes and ip rules
        installed; returns ((ifindex, next hop) -> number, the GwRoutes).  A new_gw without a
        route now is left out (its flows are not translated: PASS_NO_ROUTE), and so is one whose
        routing `ip` refuses (no mark: its packets handed to the kernel take the kernel's route,
        as before), each with a warning: a reload or start does not fail for them.
        ``resolved``: _gw_egresses' answer when the caller has it (the hook check: each new_gw
        is asked once per pass, and what is installed is what it compared)."""
        found, missing = self._gw_egresses(config) if resolved is None else resolved
        for where, addr, e in missing:
            log.warning("bpf backend: %s: new_gw %s: no policy routing for it: %s", where, addr, e)
        egresses = [(idx, nh, dev) for idx, nh, dev in found.values() if idx]
        self._gw_resolved = frozenset((idx, nh) for idx, nh, _ in egresses)
        devs = {(idx, nh): dev for idx, nh, dev in egresses}
        prev = self._gw_numbers
        if prev is None:  # a start: an adopted datapath's marks keep their numbers
            prev = {(idx, ipaddress.IPv4Address(nh)): m - L.GW_MARK_BASE for (idx, nh), m in self.maps.gw_marks_now().items()
                    if 0 <= m - L.GW_MARK_BASE < L.GW_SLOTS}  # fmt: skip
        numbers = gw_numbers([(idx, nh) for idx, nh, _ in egresses], prev)
        routes = [gwroutes.GwRoute(n, devs[eg], eg[1]) for eg, n in numbers.items()]
        for g, why in gwroutes.install(routes).items():  # its packets are routed by the kernel's table
            log.warning("bpf backend: new_gw via %s dev %s: no policy routing for it: %s", g.nexthop, g.dev, why)
            numbers = {eg: n for eg, n in numbers.items() if n != g.n}
            routes.remove(g)
        return numbers, routes

    def _gw_egresses(self, config: GatewayConfig) -> tuple[dict, list]:
        """(new_gw address -> (ifindex, next hop, device) as the kernel reaches it now, each
        address resolved once, (0, None, None) where it has no route; and those without one as
        (rule's place, address, why), for _install_gw_routes's warnings: such a new_gw's flows
        are not translated, PASS_NO_ROUTE)."""
        out: dict = {}
        missing: list = []
        for r in config.rules:
            if r.new_gw is None or r.new_gw in out:
                continue
            try:
                idx, nh, _mtu = self.resolver(r.new_gw)
                out[r.new_gw] = (idx, nh, socket.if_indextoname(idx))
            except (BackendError, OSError) as e:
                out[r.new_gw] = (0, None, None)
                missing.append((r.where or "rule", r.new_gw, e))
        return out, missing

    def _recheck_gw_egresses(self) -> None:
        """The hook check's part: where the kernel reaches each new_gw now.  When that moved
        since the last install (another device or next hop: a PPP or VLAN device recreated with
        a new ifindex, a renumbered uplink, a route added or gone), the egresses are installed
        again (numbers kept for the unchanged ones, routes and rules, then the marks): until
        then a new session on the new egress found no mark, and its packets handed to the
        kernel (fragmented by it) took the kernel's route instead of their new_gw's.  Logged at
        info (the network changed; nothing of ours vanished).  Never raises."""
        if self.config is None or not any(r.new_gw is not None for r in self.config.rules):
            return
        try:
            resolved = self._gw_egresses(self.config)  # (once per pass: the install takes this answer)
            now = frozenset((idx, nh) for idx, nh, _ in resolved[0].values() if idx)
            if now == self._gw_resolved:
                return
            was = self._gw_resolved
            gw, gw_routes = self._install_gw_routes(self.config, resolved)
            self._use_gw_routes(gw, gw_routes)
        except (BackendError, OSError) as e:
            log.warning("bpf backend: cannot install the new_gw policy routing again: %s", e)
            return
        log.info("bpf backend: new_gw egresses moved (%s -> %s): their policy routing and marks follow",
                 _egresses_text(was), _egresses_text(now))  # fmt: skip

    def _check_gw_routes(self) -> list[str]:
        """The hook check's part: our new_gw ip rules and table routes that vanished (`ip rule
        flush`; the kernel drops a table's route when its device goes down) are put back, so the
        marked packets do not fall through to the kernel's table.  Never raises (logged)."""
        if not self._gw_routes:
            return []
        try:
            rules, tables = gwroutes.our_rules(), gwroutes.our_tables()
            gone = [g for g in self._gw_routes if g.table not in rules or g.table not in tables]
            failed = gwroutes.install(gone) if gone else {}
        except BackendError as e:
            log.warning("bpf backend: cannot restore the new_gw policy routing: %s", e)
            return []
        for g, why in failed.items():  # (its device down, say: the next check tries again)
            log.warning("bpf backend: cannot restore the new_gw policy routing of table %d: %s", g.table, why)
        return [f"new_gw policy routing (ip rule and table {g.table}, via {g.nexthop} dev {g.dev})"
                for g in gone if g not in failed]  # fmt: skip

    def _remove_gw_routes(self) -> None:
        """Our new_gw policy routing (gwroutes), all of it; never raises (a stop goes on)."""
        try:
            gone = gwroutes.remove()
        except BackendError as e:
            log.warning("bpf backend: cannot remove the new_gw policy routing: %s", e)
            return
        self._gw_numbers, self._gw_routes, self._gw_resolved = None, [], frozenset()
        if gone:
            log.info("bpf backend: new_gw policy routing removed: %s", "; ".join(gone))

    def _write_ifaces(self, s: Settings) -> None:
        """snat_ifaces: the inside and outside devices' roles by ifindex (absent devices are
        left out: attaching to them fails with a clear error anyway)."""
        self._refresh_iif_flag(s.inside)
        roles = {}
        for names, role in ((s.inside, L.IFACE_INSIDE), (s.outside, L.IFACE_OUTSIDE)):
            for n in names:
                idx = _ifindex_or_absent(n)
                if idx != NO_DEVICE:
                    roles[idx] = role
        rc = _ifindex_or_absent(L.RECIRC_DEV)
        if rc != NO_DEVICE:  # where held fragments go (key RECIRC_KEY: no device has ifindex 0)
            roles[L.RECIRC_KEY] = rc
        self.maps.write_ifaces(roles)
        self.maps.write_inside_addrs(device_addresses(s.inside))

    def _refresh_iif_flag(self, inside) -> None:
        """CFG_F_IIF_AMBIGUOUS as the inside devices present now say (iif_collisions), before
        any program is attached to a device that arrived; logged when it changes."""
        clash = iif_collisions(inside)
        if not self._put_flag(L.CFG_F_IIF_AMBIGUOUS, bool(clash)):
            return
        if clash:
            log.warning("bpf backend: inside devices %s share their ifindex's low 16 bits, which a session "
                        "keeps: every inside packet now takes the full reverse-path check (slower); "
                        "recreate one of them to get another ifindex", clash)
        else:
            log.info("bpf backend: inside devices' ifindexes are distinct again: sessions vouch for "
                     "their sources (fast path)")

    def _put_flag(self, flag: int, on: bool) -> bool:
        """Set or clear ``flag`` (CFG_F_*) in the datapath's snat_cfg; True when that changed it
        (False too when there is no value yet: the install writes one)."""
        cfg = self.maps.cfg.get(0)
        if cfg is None or _has_flag(cfg, flag) == on:
            return False
        self.maps.cfg.put(0, _with_flag(cfg, flag, on))
        return True

    def _unwatched(self) -> None:
        """The programs go on translating with no daemon to watch the policy rules (an exit
        with keep_state, a failed start that leaves an adopted datapath running): clear
        CFG_F_BACK_FROM_RPF, the safe answer, so an iif rule added before the next start (which
        judges again) does not meet it set.  Never raises: the exit goes on."""
        try:
            if self.maps is not None:
                self._put_flag(L.CFG_F_BACK_FROM_RPF, False)
        except Exception as e:  # noqa: BLE001 - the maps went: nothing reads the flag either
            log.warning("bpf backend: could not clear the route-back flag on the way out: %s", e)

    def refresh_route_back(self) -> str | None:
        """CFG_F_BACK_FROM_RPF as the IPv4 policy rules and forwarding switches now say
        (fibrules.route_back_blocker): set, a new session's route back is the reverse-path
        check's route; clear (also when they cannot be read), it is looked up.  Logged when it
        changes, naming what made it clear.  Returns the blocker (None: reused).  At start,
        every apply, on the daemon's IPv4 rule and netconf events, and at a hook check
        ROUTE_BACK_RECHECK after the last."""
        if self.readonly or self.maps is None:
            return self.route_back_blocker
        self._route_back_at = _clock()
        try:
            blocker = route_back_blocker(*route_back_inputs())
        except Exception as e:  # noqa: BLE001 - unreadable (netlink, /proc): the safe answer, never a crash
            blocker = f"policy rules unreadable: {e}"
        self.route_back_blocker = blocker
        if not self._put_flag(L.CFG_F_BACK_FROM_RPF, blocker is None):
            return blocker
        if blocker is None:
            log.info("bpf backend: no policy rule selects on the input device and every device forwards: "
                     "a new session's route back is the reverse-path check's (one FIB lookup fewer)")
        else:
            log.warning("bpf backend: route back of new sessions looked up per session: %s", blocker)
        return blocker

    def move_sessions(self, new_gws: dict[int, ipaddress.IPv4Address | None],
                      old_gws: dict[int, ipaddress.IPv4Address | None] | None = None) -> int:  # fmt: skip
        """follow_rules() for next hops alone; returns how many sessions moved."""
        return self.follow_rules(new_gws, old_gws)[0]

    def follow_rules(self, new_gws: dict[int, ipaddress.IPv4Address | None],
                     old_gws: dict[int, ipaddress.IPv4Address | None] | None = None,
                     pools: dict | None = None, outside: tuple = ()) -> tuple[int, int]:  # fmt: skip
        """Make live sessions follow their rule after an install (spec "Rule changes and live
        sessions"): rules with new_gw send to new_gw's egress; a session that had a new_gw
        (CT_F_NEW_GW set, or its rule had one in ``old_gws``) whose rule no longer has one
        goes back to the route toward its remote.  A session whose SNAT address is outside its
        rule's pool (``pools``: rule_id -> Pool), or that would move to an ``outside`` device
        other than the ones holding its address, is removed: the flow's next packet makes a
        fresh session from the rule's pool and link.  Sessions of vanished rules keep their
        mapping.  Returns (OUT entries rewritten, sessions removed)."""
        old_gws = old_gws or {}
        pools = pools or {}
        pairs = self.maps.iter_pairs(with_in=False)  # one batch of the table at a time
        cache: dict[ipaddress.IPv4Address, tuple[int, ipaddress.IPv4Address, int] | None] = {}
        owners: dict | None = None

        def egress(addr):
            if addr not in cache:
                try:
                    cache[addr] = self.resolver(addr)
                except BackendError as e:
                    log.warning("cannot move sessions toward %s: %s", addr, e)
                    cache[addr] = None
            return cache[addr]

        def held_elsewhere(addr: ipaddress.IPv4Address, idx: int) -> bool:
            nonlocal owners
            if not outside:
                return False
            if owners is None:
                try:
                    owners = self.owners(tuple(outside))
                except BackendError as e:
                    log.warning("cannot tell which uplink holds which SNAT address: %s", e)
                    owners = {}
            devs = owners.get(addr)
            return bool(devs) and idx not in devs

        moved = removed = 0
        sink = self.audit_sink  # set while the daemon writes an audit log
        ended: list[dict] = []
        to_peer = self.sync_sink  # set while a session sync runs: the peer removes them too
        ends: list = []
        now = monotonic_ns()

        def remove(p) -> None:
            self.maps.delete_pair(p)
            if sink is not None:
                ended.append(pair_record(p.out_key, p.out, L.AUDIT_END_RULE_CHANGE))
                if len(ended) >= 4096:
                    sink(ended[:])
                    ended.clear()
            if to_peer is not None:
                rec = synctable.end_record(p, now)
                if rec is not None:
                    ends.append(rec)
                if len(ends) >= 4096:
                    to_peer(ends[:])
                    ends.clear()

        for p in pairs:
            rid = p.rule_id
            if rid not in new_gws:
                continue
            nat = ipaddress.IPv4Address(p.out["rw_addr"])
            if rid in pools and nat not in pools[rid]:
                remove(p)
                removed += 1
                continue
            gw = new_gws[rid]
            flags = p.out["flags"]
            if gw is not None:
                eg, nflags = egress(gw), flags | L.CT_F_NEW_GW
            elif flags & L.CT_F_NEW_GW or old_gws.get(rid) is not None:
                remote = ipaddress.IPv4Address(CT_KEY.unpack(p.out_key)["daddr"])
                eg, nflags = egress(remote), flags & ~L.CT_F_NEW_GW
            else:
                continue
            if eg is None:
                continue
            idx, nh, mtu = eg
            mtu = min(mtu, 0xFFFF)  # ct_entry.mtu is 16 bits (as ct_mtu() in the datapath)
            if (p.out["ifindex"], p.out["nexthop"], p.out["mtu"], flags) == (idx, _raw(nh), mtu, nflags):
                continue
            if idx != p.out["ifindex"] and held_elsewhere(nat, idx):
                remove(p)
                removed += 1
            elif self.maps.update_out(p, ifindex=idx, nexthop=_raw(nh), mtu=mtu, flags=nflags):
                moved += 1
        if sink is not None and ended:
            sink(ended)
        if to_peer is not None and ends:
            to_peer(ends)
        return moved, removed

    # ------------------------------------------------------------- session sync

    def sync_pairs(self):
        """Live pairs for the sync's refresh walk: a generator reading the table one batch at a
        time (the daemon takes a bounded number per worker job)."""
        return self._m().iter_pairs(with_in=True)

    def sync_install(self, records: list, counts: dict, seconds: float | None = None) -> list:
        """The peer's sync records into the table (synctable.install; worker thread), for at
        most ``seconds``; returns the records there was no time for.  The next GC tick sweeps,
        which recounts the live counts, when pairs were written or removed."""
        self._writable()
        if self._sync_routes is None:
            self._sync_routes = synctable.RouteCache(self.resolver)
        try:
            n, taken = synctable.install(self, records, self._sync_routes, counts, seconds)
        except BaseException:
            self._next_sweep = 0.0  # (a batch that failed part way may have written or removed pairs)
            raise
        if n:
            self._next_sweep = 0.0
        return records[taken:]

    # ------------------------------------------------------------- audit log

    def audit_source(self):
        """The datapath's audit records for the daemon (AuditRing: the snat_audit ring read
        through libbpf; its epoll fd goes into the daemon's loop)."""
        return AuditRing(self._m())

    # ------------------------------------------------------------- sessions

    def _timeouts_ns(self) -> dict[int, int]:
        """Timeout by state in ns; unknown states get NONE's."""
        t = {int(k): int(v) * 10**9 for k, v in self.settings.timeouts}
        return {s: t.get(s, t[int(L.CtState.NONE)]) for s in range(256)}

    def _timeout_ns(self, state: int) -> int:
        return self._timeouts_ns()[int(state)]

    def host_counting(self) -> bool:
        """CFG_F_HOST_COUNT as the running datapath has it: the per-host sessions are counted
        as sessions are made (some rule has a host limit); else they are the last walk's."""
        return _host_count(self._m().current_cfg())

    def _recount_for_limit(self) -> None:
        res = self.recount()
        log.info("host limit on: the per-host counts recounted over %d sessions in %.3f s (after %.3f s waiting "
                 "for a walk in progress%s)", res.live, res.seconds, self.recounts["last_wait_seconds"],
                 ": an expiry sweep, cut short" if self.recounts["last_cut_sweep"] else "")

    @property
    def walk_wanted(self) -> bool:
        """A walk that must run now (recount, flush) waits for the one in progress: an expiry
        sweep stops at its next chunk (between SWEEP_KEYS runs) and none begins."""
        return self._urgent > 0

    @contextlib.contextmanager
    def _counting(self, t0: float, urgent: bool = False):
        """One walk (expiry, flush, recount) begun at ``t0``, which publishes the live counts:
        its last step writes them into the count maps before the walk returns, so a `stats` on
        another thread may read them before counted_at is set; while the walk runs that reader
        dates them from the walk's start, as counted_at does after (the counts are at least
        that fresh).  Yields a dict: a walk that did not publish (cut short) sets "published"
        false.  ``urgent``: the walk must run now (walk_wanted while it waits): an expiry sweep
        in progress is cut short at its next chunk instead of being waited for."""
        if urgent:
            with self._urgent_lock:
                self._urgent += 1
        try:
            self._walk.acquire()
        finally:
            if urgent:
                with self._urgent_lock:
                    self._urgent -= 1
        try:
            self._walk_since = t0
            walk = {"published": True}
            yield walk
            if walk["published"]:
                self.counted_at = t0  # the per-host sessions are as of this walk
        finally:
            self._walk_since = None
            self._walk.release()

    def recount(self) -> SweepResult:
        """Count the live counts again from the table (removes nothing; sweep.py).  It must run
        now: an expiry sweep in progress is cut short at its next chunk (``_counting``), not
        waited for.  Recorded for status (``recounts``): the walk's time, the time it waited for
        a walk in progress (an expiry sweep outside the lock: to its next chunk; a flush: to its
        end) before it could begin, and whether it cut a sweep short."""
        self._writable()
        t0 = _clock()
        cut0 = self.cut_sweeps
        with self._counting(t0, urgent=True):
            waited = _clock() - t0
            cut = self.cut_sweeps - cut0
            res = self.sweeper().recount(chunked=self.chunked)
        self.recounts = {"count": self.recounts["count"] + 1, "last_seconds": round(res.seconds, 4),
                         "last_wait_seconds": round(waited, 4), "last_visited": res.visited, "last_live": res.live,
                         "last_cut_sweep": bool(cut)}  # fmt: skip
        if res.count_errors:
            log.warning("recount: %d live-count updates failed (a count map is full)", res.count_errors)
        return res

    def sweeper(self) -> Sweeper:
        """The sweep program over this datapath's maps (loaded on first use)."""
        with self._sweeper_lock:
            if self._sweeper is None:
                self._sweeper = Sweeper(self._m())
            return self._sweeper

    def expire(self, now: float | None = None) -> int:
        """Remove sessions idle longer than their state's timeout, both keys together (OUT
        first), and half pairs older than ORPHAN_GRACE_NS (not counted; every FULL_EVERY-th
        sweep, and every sweep with an explicit ``now``); recount the live counts.  ``now``:
        CLOCK_MONOTONIC seconds (bpf_ktime_get_ns' clock), default now.

        The work is the sweep program in the kernel (sweep.py), run once per SWEEP_CHUNK keys
        of a batch lookup (CHUNKED).  Without an explicit ``now``, a call
        within (GC_DUTY-1) times the last sweep's duration after it returns 0 at once: the
        sweep takes at most 1/GC_DUTY of a CPU whatever gc_interval is, in system calls of a
        few milliseconds each (CHUNKED).  A session therefore
        leaves at most max(gc_interval, GC_DUTY * T) + T after its timeout (T = one sweep's
        duration; docs/operations.md).

        A walk that must run now (recount, flush: ``walk_wanted``) cuts a sweep in progress
        short at its next chunk (nothing published: the counts stay high until that walk
        recounts them) and keeps one from beginning.  The part of the table the cut sweep did
        not reach waits for the next sweep, on the usual pace from the part that ran, and that
        one is never cut (nor kept from beginning): whatever the control requests, no more than
        one sweep in a row stops early, so an entry may stay at most one sweep interval longer
        than the bound above (plus the walk that cut it).  A full sweep cut short makes the
        next one full."""
        self._writable()
        t0 = _clock()
        cuttable = not (self.last_sweep is not None and self.last_sweep.cut)
        if cuttable and self.walk_wanted:  # its turn comes after the walk that waits
            return 0
        if now is None and t0 < self._next_sweep and not self._pressure():
            return 0
        now_ns = monotonic_ns() if now is None else int(now * 1e9)
        # an explicit now: always full
        full = now is not None or self._full_due or self._sweeps % FULL_EVERY == 0
        self._sweeps += 1
        with self._counting(t0) as walk:
            res = self.sweeper().expire(now_ns, self._timeouts_ns(), ORPHAN_GRACE_NS, full=full,
                                        chunked=self.chunked,
                                        stop=(lambda: self.walk_wanted) if cuttable else None)  # fmt: skip
            if res.cut:  # (before the walk lock goes: the walk that cut it sees the count)
                self.cut_sweeps += 1
                walk["published"] = False
        self._full_due = full and res.cut
        self.last_sweep = res
        self._sweep_max = max(self._sweep_max, res.seconds)
        if res.count_errors:
            log.warning("sweep: %d live-count updates failed (a count map is full)", res.count_errors)
        if res.cut:
            log.info("sweep cut short after %d chunks (%.3f s, %d sessions removed) for a walk that must "
                     "run now", res.chunks, res.seconds, res.removed)
        t1 = _clock()
        t = t1 - t0
        if (not full and not res.cut) or self._t_normal is None:
            self._t_normal = t
        # the rest follows the common sweep's cost: a full one (1 in FULL_EVERY, ~3x dearer)
        # does not stretch the expiry margin; a cut one rests for the part that ran
        self._next_sweep = t1 + (GC_DUTY - 1) * min(t, self._t_normal)
        return res.removed

    def _pressure(self) -> bool:
        """The table is (nearly) full: PRESSURE_FILL of max_sessions live, or a new flow was
        refused as DROP_TABLE_FULL since the last look.  Reads the counts, never the table."""
        m = self._m()
        refused = m.reasons_map.sum_percpu(int(L.Reason.DROP_TABLE_FULL))
        seen, self._table_full_seen = self._table_full_seen, refused
        if refused > seen:
            self.pressure_sweeps += 1
            return True
        if m.live_total() >= PRESSURE_FILL * self.settings.max_sessions:
            self.pressure_sweeps += 1
            return True
        return False

    def status_extra(self) -> dict:
        """The sweeps for the daemon's status: how many, the longest and the last; and the
        recount walks (a host limit turned on by reload: docs/datapath.md step 15)."""
        r = self.last_sweep
        since = self._walk_since
        return {"sweeps": {"count": self._sweeps, "max_seconds": round(self._sweep_max, 4),
                           "under_pressure": self.pressure_sweeps, "cut_short": self.cut_sweeps,
                           "last_seconds": round(r.seconds, 4) if r else None,
                           "last_visited": r.visited if r else None, "last_removed": r.removed if r else None,
                           "last_live": r.live if r else None,
                           "last_cut": r.cut if r else None},  # cut short: its figures are partial
                "recounts": dict(self.recounts),
                # the table carried over to another max_sessions by this daemon's start
                "table_resized": self.resized,
                "counter_reads": self.counter_reads.as_dict(),  # the leak guard's, failed reads
                # our programs on devices renamed away that the hook check could not take off:
                # every failed try, and the devices failing now (logged once per device and kind)
                "renamed_detach": {"failed": self.loader.leave_failures if self.loader else 0,
                                   "failing": {n: msg for _, n, msg in self.loader.leave_failed.values()}
                                   if self.loader else {}},
                # a walk (sweep, flush or recount) running now: for how long; None: none
                "walk_running_seconds": None if since is None else round(max(0.0, _clock() - since), 3)}  # fmt: skip

    def iter_sessions(self, flt: SessionFilter = ALL, limit: int | None = None):
        """The sessions the filter selects, one batch of the table in memory at a time."""
        now = monotonic_ns()
        timeout = self._timeouts_ns()
        n = 0
        for p in self._m().iter_pairs(flt=flt):
            if limit is not None and n >= limit:
                return
            n += 1
            yield p.to_session(lambda s: timeout[s] / 1e9, now)

    def sessions(self) -> list[Session]:
        return list(self.iter_sessions())

    def live_counts(self) -> dict:
        """The kept live counts: {"rules": {rule_id: n}, "addrs": {addr: n}, "hosts": count of
        inside hosts with sessions, "refusals": {...}} (no read of the session table)."""
        return self._m().live_counts()

    def stats(self) -> Stats:
        """Counters and the live session count, from the count maps (the sweep keeps them
        exact; between sweeps the datapath's increments at creation): no table read."""
        m = self._m()
        live = m.pressure_counts()
        total = m.live_total()
        # the table's room as the map has it (a reader of pins does not know the settings)
        live_hosts = self.host_counting()
        walking = self._walk_since  # read before counted_at: a walk ending between sets it first
        since = self.counted_at if self.counted_at is not None else walking
        age = None if live_hosts or since is None else max(0.0, _clock() - since)
        pressure = pressure_summary(live[L.MAP_HOST_SESS], live[L.MAP_ADDR_STATS], total, m.ct.max_entries // 2,
                                    hosts_live=live_hosts, hosts_age=age, allocator=m.alloc_counts())  # fmt: skip
        live_rules = live[L.MAP_RULE_LIVE]  # rule id -> (live sessions, refusals)
        rules = m.rule_counters()
        rules = {rid: replace(rules.get(rid) or RuleCounters(rid), live=live_rules.get(rid, (0, 0))[0])
                 for rid in rules.keys() | live_rules.keys()}  # fmt: skip
        return Stats(reasons=self._reasons(m), rules=rules, sessions=total, pressure=pressure,
                     per_cpu=tuple(m.packets_per_cpu()))

    def refusals(self) -> list[dict]:
        """The refusal markers (DatapathMaps.refusal_markers): recently refused new flows, after
        those an apply emptied since the last call (so the refusal log still counts them)."""
        forgotten, self._forgotten_refusals = self._forgotten_refusals, []
        return markers_of(forgotten) + self._m().refusal_markers()

    def _forget_judgements(self) -> None:
        """After an apply's rules are written, when what the datapath judges by changed
        (prog_maps.judged_under): the refusal markers and spill memos go (they were judged
        under the rules and settings it replaced: a host limit raised, spill turned on, a wider
        port range or more tries, a link's rules failed over would otherwise leave a refused
        flow dropped as DROP_REFUSED_RECENTLY for up to REFUSED_SECS, an address skipped for up
        to SPILL_MEMO_MS); the model's Engine.apply does the same.  Never raises: what stays
        only expires as before (logged), and the markers deleted before a failure still reach
        the refusal log (they were lost with the failure's warning)."""
        try:
            gone = self.maps.forget_judgements()
        except ForgetFailed as e:
            log.warning("bpf backend: refusal markers or spill memos kept after the apply (they expire as "
                        "before): %s", e)  # fmt: skip
            gone = e.markers
        except (BackendError, B.LibbpfError, OSError) as e:
            log.warning("bpf backend: refusal markers and spill memos kept after the apply: %s", e)
            return
        self._forgotten_refusals = last_markers(self._forgotten_refusals + gone, L.MAX_REFUSED)

    def spill_memos(self, remote: str | None = None) -> list[dict]:
        """The spill memos (DatapathMaps.spill_memos): addresses found full toward a remote."""
        return self._m().spill_memos(remote)

    def refusal_marker(self, host: str, sport: int, remote: str, dport: int, proto: int) -> dict | None:
        """The refusal marker under one flow's OUT key (``dport`` 0 for an ICMP echo), None
        when there is none or it is no longer younger than REFUSED_SECS (step 6 passes it by):
        ``reason`` (DROP_PORT_EXHAUSTED, DROP_HOST_LIMIT), ``addr`` (the SNAT address tried
        last) and ``age_ms`` (the programs' coarse clock against CLOCK_MONOTONIC now, which it
        trails by at most a jiffy: at least 0).  One lookup (explain --live)."""
        m = self._m().maps.get(L.MAP_REFUSED)
        key = CT_KEY.pack(saddr=int(ipaddress.IPv4Address(host)), daddr=int(ipaddress.IPv4Address(remote)),
                          sport=sport, dport=dport, proto=proto, dir=L.CT_DIR_OUT)  # fmt: skip
        raw = m.get(key) if m is not None else None
        if raw is None:
            return None
        (got,) = markers_of([(1, key, raw)])
        age_ms = max(0, (monotonic_ns() - got["at"]) // 1_000_000)
        if age_ms >= L.REFUSED_SECS * 1000:
            return None
        return {"reason": got["reason"], "addr": got["addr"], "age_ms": age_ms}

    def session_of(self, host: str, sport: int, remote: str, dport: int, proto: int) -> Session | None:
        """The session under one flow's OUT key (``dport`` 0 for an ICMP echo), as
        iter_sessions lists it; None when there is none (or half of one, which listings leave
        out).  One lookup in the session table and one of its peer (explain --live: a listing
        cut at the reply limit may not hold the flow's own session)."""
        m = self._m()
        key = CT_KEY.pack(saddr=int(ipaddress.IPv4Address(host)), daddr=int(ipaddress.IPv4Address(remote)),
                          sport=sport, dport=dport, proto=proto, dir=L.CT_DIR_OUT)  # fmt: skip
        out = m.ct.get(key)
        inn = peer_entry(m.ct, key, out) if out is not None else None
        if inn is None:
            return None
        timeout = self._timeouts_ns()
        pair = SessionPair(key, out, entry_peer(out), inn)
        return pair.to_session(lambda st: timeout[st] / 1e9, monotonic_ns())

    def counters(self) -> Stats:
        """stats() without the session count (the daemon samples these for rates), with the
        allocator's counters (its port searches' rate and length: Service.rate)."""
        m = self._m()
        return Stats(reasons=self._reasons(m), rules=m.rule_counters(), sessions=-1,
                     pressure={"allocator": m.alloc_counts()})

    def _reasons(self, m: DatapathMaps) -> dict[str, int]:
        """The datapath's reasons; DROP_LEAK also counts the leak guard table's drops
        (guard.py): netfilter's postrouting comes before the TC egress hook, so a packet the
        kernel routes toward an uplink with a `from` source meets the table first."""
        reasons = m.reasons()
        if not self.readonly:  # a failed read: the drops last read (LastRead), never a dip
            drops = self.counter_reads.read(lambda: {guard.COUNTER: guard.dropped()}).get(guard.COUNTER, 0)
            reasons["DROP_LEAK"] = reasons.get("DROP_LEAK", 0) + drops
        return reasons

    def flush(self, rule_id: int | None = None, inside: ipaddress.IPv4Address | None = None,
              nat: ipaddress.IPv4Address | None = None) -> int:
        """Remove the sessions matching every filter given (rule id, inside address, SNAT
        address); with none, every session, orphan and remembered fragment."""
        self._writable()
        flt = SessionFilter(rule_id=rule_id,
                            inside=ipaddress.IPv4Network(inside) if inside is not None else None,
                            nat=ipaddress.IPv4Address(nat) if nat is not None else None)  # fmt: skip
        with self._counting(_clock(), urgent=True):  # an expiry sweep in progress is cut short
            n = self.sweeper().flush(flt, chunked=self.chunked).removed  # no filter: also half pairs
        if flt.empty:
            for k in self.maps.frags.keys():
                self.maps.frags.delete(k)
        return n

    def zero(self) -> None:
        """The datapath's counters, and the leak guard's drops (part of DROP_LEAK) when this
        backend put the guard in place (started)."""
        self._writable()
        self.maps.zero()
        if self.config is not None and guard.reset():
            self.counter_reads.forget()  # a failed read after this must not answer the old drops

    def addr_stats(self) -> dict[ipaddress.IPv4Address, tuple[int, int]]:
        """SNAT address -> (live sessions, refusals) from the datapath's per-address counts
        (snat_addr_stats; metrics).  Empty while the datapath does not count per address."""
        mp = self._m().maps.get(L.MAP_ADDR_STATS)
        if mp is None:
            return {}
        out = {}
        for k, v in mp.items():
            d = L.LIVE_COUNT.unpack(v)
            out[ipaddress.IPv4Address(k[:4])] = (int(d["sessions"]), int(d["refusals"]))
        return out

    def health(self) -> dict:
        """For `snatgw status`: each program this daemon attached and whether it is still the
        one on its hook (another may have replaced it, or the device gone), and every map's
        fill (entries of the hash-like maps; a read of the map)."""
        from .libbpf import BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_TC_INGRESS
        from .loader import attached_prog_id

        m = self._m()
        hooks = []
        for a in self.loader.attachments if self.loader else []:
            try:
                now = attached_prog_id(a.ifname, a.point)
            except (BackendError, OSError) as e:
                now = f"cannot query: {e}"
            hooks.append({"device": a.ifname, "hook": "ingress" if a.point == BPF_TC_INGRESS else "egress",
                          "program": a.prog, "prog_id": a.prog_id, "attached": now == a.prog_id,
                          "found": now})  # fmt: skip
        maps = []
        for name, mp in sorted(m.maps.items()):
            if mp.type == B.BPF_MAP_TYPE_RINGBUF:  # bytes, not entries: no fill to read
                continue
            fixed = mp.type in (BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY)
            # an array's slots all exist: entries = max_entries, no fill (``has_fill`` False: not
            # exported as a fill to Prometheus, where it would read 100% full)
            maps.append({"name": name, "entries": mp.max_entries if fixed else mp.count(),
                         "max_entries": mp.max_entries, "has_fill": not fixed})  # fmt: skip  (count: one batch)
        ct = next(x["entries"] for x in maps if x["name"] == L.MAP_CT)
        reused = _has_flag(m.cfg.get(0), L.CFG_F_BACK_FROM_RPF)
        return {"hooks": hooks, "maps": maps, "sessions": ct // 2, "max_sessions": self.settings.max_sessions,
                "route_back": {"reused": reused, "why": None if reused else self.route_back_blocker,
                               "text": describe(None if reused else self.route_back_blocker or "not judged")},
                "devices": {"inside": list(self.settings.inside), "outside": list(self.settings.outside)}}

    # ------------------------------------------------------------- helpers

    def _m(self) -> DatapathMaps:
        if self.maps is None:
            raise BackendError("the bpf datapath is not started")
        return self.maps

    def _writable(self) -> None:
        self._m()
        if self.readonly:
            raise BackendError("the pinned maps are open read-only (no daemon owns this datapath)")

    @classmethod
    def read_pinned(cls, pin_dir: str = L.PIN_DIR, settings: Settings | None = None) -> "BpfBackend":
        """A read-only view of a pinned datapath: sessions() and stats() work, the rest
        raises.  ``stop()`` closes it (it never detaches or unpins anything)."""
        b = cls(settings or Settings(pin_dir=pin_dir))
        b.maps = DatapathMaps.open_pinned(pin_dir, readonly=True)
        b.readonly = True
        return b


def install_rules(maps: DatapathMaps, cfg: bytes, rules: list[bytes], recount: Callable[[], object]) -> int:
    """maps.write_rules, in CFG_F_HOST_COUNT's order (docs/datapath.md step 15): when a host
    limit turns on (the flag was clear: no rule had one, or fresh maps adopted with sessions),
    the flag is set first (the datapath counts from then on), then ``recount()`` (the sweep's
    SWEEP_RECOUNT walk, which keeps the increments made during it), then the rules with the
    limit: no limit ever judges a count the datapath did not keep.  When the last limit goes,
    the rules first, then the flag is cleared.  Returns the slots written."""
    old_cfg = maps.current_cfg()
    was, wants = _host_count(old_cfg), _host_count(cfg)
    if wants and not was:
        maps.cfg.put(0, _with_host_count(old_cfg, True))
        recount()
    if was and not wants:
        written = maps.write_rules(_with_host_count(cfg, True), rules)
        maps.cfg.put(0, cfg)
        return written
    return maps.write_rules(cfg, rules)


def _host_count(cfg: bytes) -> bool:
    """CFG_F_HOST_COUNT in a snat_cfg value."""
    return _has_flag(cfg, L.CFG_F_HOST_COUNT)


def _has_flag(cfg: bytes | None, flag: int) -> bool:
    """``flag`` (CFG_F_*) is set in a snat_cfg value (None: no value, not set)."""
    return cfg is not None and bool(L.SNAT_CFG.unpack(cfg)["flags"] & flag)


def _with_host_count(cfg: bytes, on: bool) -> bytes:
    """A snat_cfg value with CFG_F_HOST_COUNT set or clear, the rest as it is."""
    return _with_flag(cfg, L.CFG_F_HOST_COUNT, on)


def _with_flag(cfg: bytes, flag: int, on: bool) -> bytes:
    """A snat_cfg value with ``flag`` (CFG_F_*) set or clear, the rest as it is."""
    d = L.SNAT_CFG.unpack(cfg)
    d["flags"] = (d["flags"] | flag) if on else (d["flags"] & ~flag)
    return L.SNAT_CFG.pack(**d)


def iif_collisions(inside) -> list[str]:
    """The inside devices present whose ifindexes share their low 16 bits with another's
    (ct_entry.iif keeps only those bits, docs/datapath.md step 2a), named with their ifindex;
    empty when each is told apart (the common case: ifindexes stay small)."""
    by_low: dict[int, list[str]] = {}
    for n in inside:
        idx = _ifindex_or_absent(n)
        if idx != NO_DEVICE:
            by_low.setdefault(idx & 0xFFFF, []).append(f"{n} (ifindex {idx})")
    return [d for names in by_low.values() if len(names) > 1 for d in names]


def route_back_inputs(conf_dir: str = ACCEPT_LOCAL_DIR) -> tuple[list[PolicyRule], dict[str, bool]]:
    """What fibrules.route_back_blocker judges: this namespace's IPv4 policy rules (an
    rtnetlink dump) and every device's IPv4 forwarding switch (``conf_dir``/<dev>/forwarding)."""
    from pyroute2 import IPRoute

    rules = []
    with IPRoute() as ipr:
        for m in ipr.get_rules(family=socket.AF_INET):
            rules.append(PolicyRule(priority=m.get_attr("FRA_PRIORITY") or 0, iif=m.get_attr("FRA_IIFNAME"),
                                    l3mdev=bool(m.get_attr("FRA_L3MDEV")), invert=bool(m["flags"] & FIB_RULE_INVERT),
                                    table=m.get_attr("FRA_TABLE") or m["table"]))  # fmt: skip
    forwarding = {}
    for dev in os.listdir(conf_dir):
        if dev in ("all", "default"):
            continue
        try:
            with open(os.path.join(conf_dir, dev, "forwarding")) as f:
                forwarding[dev] = f.read().strip() != "0"
        except FileNotFoundError:  # the device went meanwhile
            continue
    return rules, forwarding


def read_pinned(pin_dir: str = L.PIN_DIR, settings: Settings | None = None) -> BpfBackend:
    return BpfBackend.read_pinned(pin_dir, settings)
