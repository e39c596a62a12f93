"""Run the TC programs with BPF_PROG_TEST_RUN in a private REF namespace (tests, progbench).

``RefNet`` builds the plan's REF gateway from veth devices in a namespace of its own (so
bpf_fib_lookup sees the REF routes) and always removes it.  ``ProgHarness`` loads the object
(SNAT_TEST build: it records each packet's verdict, reason and redirect target), writes rules,
runs IPv4 packets through a side ("inside" | "outside" | "egress") and reads sessions/counters.
"""

from __future__ import annotations

import os
import struct
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Address

from ... import layout as L
from ...config.schema import Settings
from ...errors import BackendError
from ...rules import RuleSet
from .maps import forget_judgements, write_gw_marks, write_rule_slots
from . import build
from . import libbpf as B
from .loader import ifindex as _ifindex
from .loader import netns
from .prog_maps import compile_from_nets, compile_rules, judged_under

REF_ADDRS = {
    "lan40": ["198.18.40.1/24"],
    "lan50": ["198.18.50.1/24"],
    "eth1": ["198.19.2.2/24", "198.19.2.71/32", "198.19.2.72/32", "198.19.2.73/32"],
    "eth2": ["198.19.3.2/24", "198.19.3.71/32", "198.19.3.72/32", "198.19.3.73/32"],
    L.RECIRC_DEV: [],  # where held fragments go (frag_v4_hold) and come back (snat_recirc)
}
REF_ROUTES = [
    ["default", "via", "198.19.2.1", "dev", "eth1"],
    ["198.51.100.0/24", "via", "198.19.3.1", "dev", "eth2"],
    ["192.0.2.48/28", "dev", "lan40"],  # an inside net no rule covers (corpus STRANGER)
]
INSIDE, OUTSIDE = ("lan40", "lan50"), ("eth1", "eth2")
PROGS = {"inside": "snat_inside", "outside": "snat_outside", "egress": "snat_egress", "recirc": "snat_recirc"}
CLOCK_BASE = 1000  # s added to a test's clock (0 means "the real clock" to the programs)
SKB_CTX_SIZE = 192  # sizeof(struct __sk_buff) on 6.x; only ifindex fields are set
_OFF_MARK, _OFF_INGRESS_IFINDEX, _OFF_IFINDEX, _OFF_GSO_SEGS, _OFF_GSO_SIZE = 8, 36, 40, 164, 176
REF_MAC = "02:00:00:00:00:02"  # every REF device's MAC: test-run frames are sent to it
ETH = bytes.fromhex(REF_MAC.replace(":", "") + "020000000001" "0800")  # dst, src, IPv4
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
_NONE = 0xFFFFFFFF  # dbg sentinel: the program emitted nothing (egress: not ours)
#: BPF_PROG_TEST_RUN refuses (EINVAL) an IPv4 frame with fewer than 20 bytes after Ethernet,
#: so such packets cannot be run here (the programs still classify them DROP_MALFORMED)
MIN_TESTABLE_IPV4 = 20


class Untestable(BackendError):
    """The kernel's test-run refuses this input; nothing was run."""


def _ip(*args: str, check: bool = True) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise BackendError(f"ip {' '.join(args)}: {res.stderr.strip()}")


class RefNet:
    """The REF gateway as veth devices in namespace ``<prefix>ref``; a context manager."""

    def __init__(self, prefix: str | None = None):
        self.name = f"{prefix or f'sgt{os.getpid():x}-'}ref"
        self.ifindex: dict[str, int] = {}

    def __enter__(self) -> "RefNet":
        _ip("netns", "add", self.name)
        try:
            n = ["-n", self.name]
            _ip(*n, "link", "set", "lo", "up")
            for dev, addrs in REF_ADDRS.items():
                # veth pairs (this kernel has no dummy driver); the peer stays in the namespace
                _ip(*n, "link", "add", dev, "type", "veth", "peer", "name", f"{dev}p")
                _ip(*n, "link", "set", f"{dev}p", "up")
                # the frames test-run makes are sent to this MAC (ETH): a frame to another MAC is
                # another host's (PASS_NOT_FOR_US)
                _ip(*n, "link", "set", dev, "address", REF_MAC)
                _ip(*n, "link", "set", dev, "up")
                for a in addrs:
                    _ip(*n, "addr", "add", a, "dev", dev)
            for r in REF_ROUTES:
                _ip(*n, "route", "add", *r)
            _ip("netns", "exec", self.name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            with netns(self.name):
                self.ifindex = {d: _ifindex(d) for d in REF_ADDRS}
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        _ip("netns", "del", self.name, check=False)

    def __exit__(self, *exc) -> None:
        self.close()

    def dev(self, ifindex: int) -> str | None:
        return next((d for d, i in self.ifindex.items() if i == ifindex), None)

    def enter(self):
        return netns(self.name)


@dataclass(frozen=True)
class Run:
    """One packet through a program: what the model's Result also says."""

    verdict: L.Verdict | None  # None: the program did not judge it (egress, not an ICMP error)
    reason: L.Reason | None
    packet: bytes  # output IPv4 bytes
    oif: str | None
    nexthop: IPv4Address | None
    retval: int
    mark: int = 0  # skb->mark as the program left it (the model's Result.mark)


class ProgHarness:
    """A loaded datapath object whose programs run on packets by BPF_PROG_TEST_RUN."""

    def __init__(self, net: RefNet, defines: dict | None = None, max_sessions: int = 4096, test: bool = True):
        self.net = net
        self.defines = {**({"SNAT_TEST": 1} if test else {}), **(defines or {})}
        self.obj = B.BpfObject.open(build.compile(self.defines))
        try:
            self.obj.set_max_entries(L.MAP_CT, 2 * max_sessions)
            self.obj.set_max_entries(L.MAP_EIM, L.EIM_PER_SESSION * max_sessions)
            self.obj.load()
        except BaseException:
            self.obj.close()
            raise
        self.maps = {n: self.obj.map(n) for n in (L.MAP_CT, L.MAP_RULES, L.MAP_CONFIG, L.MAP_FRAGS,
                                                   L.MAP_REASONS, L.MAP_RULE_STATS, L.MAP_IFACES,
                                                   L.MAP_FROM_NETS, L.MAP_HOST_SESS, L.MAP_ADDR_STATS,
                                                   L.MAP_RULE_LIVE, L.MAP_REFUSED,
                                                   L.MAP_INSIDE_ADDRS, L.MAP_EIM, L.MAP_AUDIT,
                                                   L.MAP_AUDIT_CNT, L.MAP_RULE_SLOTS, L.MAP_SPILL_MEMO,
                                                   L.MAP_ALLOC_CNT, L.MAP_GW_MARKS, L.MAP_WALK)}  # fmt: skip
        # global variables (.data, .bss: e.g. snat.bpf.c's refused_last = 1) as loaded, for reset()
        self._globals = {n: m.to_dict() for n, m in self._all_maps() if n.endswith((".data", ".bss"))}
        self._gw_numbers: dict | None = None  # new_gw egress -> number, as last written
        self._judged: tuple | None = None  # what the markers and memos were judged under (apply)
        self._write_devices()
        self.dbg = self.obj.map("snat_dbg") if "SNAT_TEST" in self.defines else None
        self.clock = self.obj.map("snat_clock") if "SNAT_TEST" in self.defines else None
        self.fds = {side: self.obj.prog_fd(p) for side, p in PROGS.items()}

    def _write_devices(self) -> None:
        net = self.net
        # the REF devices' roles, as the backend writes them from Settings.inside/outside
        for dev, idx in net.ifindex.items():
            role = L.IFACE_INSIDE if dev in INSIDE else L.IFACE_OUTSIDE if dev in OUTSIDE else 0
            if role:
                self.maps[L.MAP_IFACES].put(struct.pack("<I", idx), struct.pack("<I", role))
        # the recirculation device, as the backend writes it (held fragments go there)
        self.maps[L.MAP_IFACES].put(struct.pack("<I", L.RECIRC_KEY), struct.pack("<I", net.ifindex[L.RECIRC_DEV]))
        for dev in INSIDE:  # the gateway's own inside addresses, as the backend writes them
            for a in REF_ADDRS[dev]:
                self.maps[L.MAP_INSIDE_ADDRS].put(IPv4Address(a.split("/")[0]).packed,
                                                  struct.pack("<I", net.ifindex[dev]))

    def _all_maps(self):
        """Every map of the object but the read-only sections (.rodata, .kconfig)."""
        for name in self.obj.map_names():
            if not name.endswith((".rodata", ".kconfig")):
                yield name, self.obj.map(name)

    def reset(self) -> None:
        """Every map back to what a fresh load of this object holds before apply(): hash, LRU
        and trie entries deleted, array slots zeroed, global variables as loaded, the audit
        ring drained, then the devices written again.  One loaded object then serves many tests (the verifier's load is most
        of a short test's time); snapshot() lets a test hold reset() to a fresh load."""
        for name, m in self._all_maps():
            if m.type == B.BPF_MAP_TYPE_RINGBUF:
                with B.RingBuffer(m.fd) as ring:
                    while ring.drain(100_000):
                        pass
            elif name in self._globals:
                for k, v in self._globals[name].items():
                    m.put(k, v)
            elif m.type in (B.BPF_MAP_TYPE_ARRAY, B.BPF_MAP_TYPE_PERCPU_ARRAY):
                for k, v in m.to_dict().items():
                    if any(v):
                        m.put(k, bytes(len(v)))
            else:
                for k in m.keys():
                    m.delete(k)
        self._gw_numbers = None  # (the model's numbering starts again too)
        self._judged = None
        self._write_devices()

    def snapshot(self) -> dict[str, dict[bytes, bytes]]:
        """Every map's entries (arrays: the non-zero slots) but the audit ring's records."""
        out = {}
        for name, m in self._all_maps():
            if m.type != B.BPF_MAP_TYPE_RINGBUF:
                out[name] = {k: v for k, v in m.to_dict().items() if any(v)}
        return out

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        for m in (self.dbg, self.clock):
            if m is not None:
                m.close()
        self.obj.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def apply(self, rules: RuleSet, settings: Settings, cfg_flags: int = 0, renumber: bool = False) -> None:
        """``cfg_flags``: CFG_F_* the control plane judges from the host rather than the
        config (CFG_F_BACK_FROM_RPF, CFG_F_IIF_AMBIGUOUS), set in snat_config too.
        ``renumber``: the new_gw egresses numbered afresh (as a new model numbers them), not
        keeping the last apply's numbers (a reload's)."""
        cfg, slots = compile_rules(rules, settings, lambda n: self.net.ifindex.get(n, 0))
        if cfg_flags:
            d = L.SNAT_CFG.unpack(cfg)
            d["flags"] |= cfg_flags
            cfg = L.SNAT_CFG.pack(**d)
        for i, r in enumerate(slots):
            self.maps[L.MAP_RULES].put(i, r)
        write_rule_slots(self.maps[L.MAP_RULE_SLOTS], slots)
        self.maps[L.MAP_CONFIG].put(0, cfg)
        for k in list(self.maps[L.MAP_FROM_NETS].keys()):
            self.maps[L.MAP_FROM_NETS].delete(k)
        for k, kind in compile_from_nets(rules).items():
            self.maps[L.MAP_FROM_NETS].put(k, struct.pack("<I", kind))
        if renumber:
            self._gw_numbers = None
        self._write_gw_marks(rules)
        # as the backend's apply after its rules (Engine.apply): judgements of the old rules go
        # when what they were judged under changed
        judged, self._judged = self._judged, judged_under(slots, settings, lambda n: self.net.ifindex.get(n, 0))
        if judged != self._judged:
            forget_judgements(self.maps)

    def _write_gw_marks(self, rules: RuleSet) -> None:
        """snat_gw_marks as the backend writes it: each new_gw rule's egress (the REF
        namespace's `ip route get`), numbered by fibrules.gw_numbers (keeping the last numbers)."""
        from ...fibrules import gw_numbers
        from .backend import route_egress

        egs = []
        with self.net.enter():
            for r in rules:
                if r.new_gw is not None:
                    try:
                        idx, nh, _ = route_egress(r.new_gw)
                    except BackendError:
                        continue
                    egs.append((idx, int(nh)))
        self._gw_numbers = gw_numbers(egs, self._gw_numbers)
        write_gw_marks(self.maps[L.MAP_GW_MARKS], {eg: L.GW_MARK_BASE + n for eg, n in self._gw_numbers.items()})

    def host_flags(self) -> int:
        """The CFG_F_* the bpf backend judges from the host, judged here from the test's
        namespace: CFG_F_BACK_FROM_RPF while no policy rule selects on the input device and
        every device forwards (fibrules; REF: so), for apply(cfg_flags=) where a run should be
        what the daemon would run (progbench)."""
        from ...fibrules import route_back_blocker
        from .backend import route_back_inputs

        with self.net.enter():
            return L.CFG_F_BACK_FROM_RPF if route_back_blocker(*route_back_inputs()) is None else 0

    def ctx(self, ingress: str, gso_size: int = 0, ifindex: int | None = None) -> bytes:
        c = bytearray(SKB_CTX_SIZE)
        idx = self.net.ifindex[ingress] if ifindex is None else ifindex
        struct.pack_into("<I", c, _OFF_INGRESS_IFINDEX, idx)
        struct.pack_into("<I", c, _OFF_IFINDEX, idx)
        if gso_size:
            struct.pack_into("<I", c, _OFF_GSO_SIZE, gso_size)
            struct.pack_into("<I", c, _OFF_GSO_SEGS, 2)
        return bytes(c)

    def run(self, side: str, ipv4: bytes, ingress: str, gso_size: int = 0, now: float | None = None,
            ifindex: int | None = None, dst_mac: bytes | None = None) -> Run:
        """Run ``ipv4`` (no Ethernet header) through ``side`` as if it arrived on ``ingress``
        (egress: the device it leaves by); ``gso_size``: as a GRO aggregate of such segments;
        ``now``: the programs' clock in seconds (+ CLOCK_BASE, SNAT_TEST builds), else the real one;
        ``ifindex``: the skb's ifindex instead of ``ingress``'s (a device the test net has not);
        ``dst_mac``: the frame's destination MAC instead of the devices' own (REF_MAC)."""
        if len(ipv4) < MIN_TESTABLE_IPV4:
            raise Untestable(f"test-run refuses IPv4 frames shorter than {MIN_TESTABLE_IPV4} bytes")
        if self.clock is not None:
            self.clock.put(0, struct.pack("<Q", 0 if now is None else int((now + CLOCK_BASE) * 1e9)))
        if self.dbg is not None:
            self.dbg.put(0, struct.pack("<IIII", _NONE, _NONE, 0, 0))
        with self.net.enter():
            eth = ETH if dst_mac is None else dst_mac + ETH[6:]
            ret, out, ctx_out, _ = B.test_run(self.fds[side], eth + bytes(ipv4), self.ctx(ingress, gso_size, ifindex))
        mark = struct.unpack_from("<I", ctx_out, _OFF_MARK)[0] if ctx_out else 0
        verdict = reason = oif = nh = None
        if self.dbg is not None:
            v, r, ifi, nhop = struct.unpack("<III4s", self.dbg.get(0))
            if v != _NONE:
                verdict, reason = L.Verdict(v), L.Reason(r)
                if verdict == L.Verdict.REDIRECT:
                    oif = self.net.dev(ifi) or str(ifi)
                    nh = IPv4Address(nhop) if nhop != bytes(4) else None
        return Run(verdict, reason, out[len(ETH):], oif, nh, ret, mark)

    def bench(self, prog: str, ipv4: bytes, ingress: str, repeat: int) -> int:
        """Average ns per run of program ``prog`` over ``repeat`` runs (kernel-timed); with the
        SNAT_BENCH build, the bench_* wrappers restore the packet between runs."""
        with self.net.enter():
            return B.test_run(self.obj.prog_fd(prog), ETH + bytes(ipv4), self.ctx(ingress), repeat=repeat)[3]

    # ------------------------------------------------------------------ state

    def ct(self) -> dict[tuple, dict]:
        """Session map: key tuple (saddr, daddr, sport, dport, proto, dir) -> entry fields."""
        out = {}
        for k, v in self.maps[L.MAP_CT].items():
            kk = L.CT_KEY.unpack(k)
            e = L.CT_ENTRY.unpack(v)
            e["peer"] = _key_tuple(L.CT_KEY.unpack(e["peer"]))
            out[_key_tuple(kk)] = e
        return out

    def reasons(self) -> dict[L.Reason, int]:
        m = self.maps[L.MAP_REASONS]
        res = {}
        for r in L.Reason:
            n = m.sum_percpu(int(r))
            if n:
                res[r] = n
        return res

    def rule_stats(self) -> dict[int, dict]:
        m = self.maps[L.MAP_RULE_STATS]
        res = {}
        for k, _ in m.items():
            rid = struct.unpack("<I", k)[0]
            tot = {"packets": 0, "bytes": 0, "sessions": 0}
            for x in m.get_percpu(k) or []:
                for f, n in L.RULE_STATS.unpack(x).items():
                    tot[f] += n
            res[rid] = tot
        return res

    def live_counts(self) -> dict[str, dict]:
        """snat_host_sess / snat_addr_stats (by address) and snat_rule_live (by rule id):
        key -> (sessions, refusals)."""
        out = {}
        for name in (L.MAP_HOST_SESS, L.MAP_ADDR_STATS, L.MAP_RULE_LIVE):
            d = {}
            for k, v in self.maps[name].items():
                key = struct.unpack("<I", k)[0] if name == L.MAP_RULE_LIVE else IPv4Address(k)
                c = L.LIVE_COUNT.unpack(v)
                d[key] = (c["sessions"], c["refusals"])
            out[name] = d
        return out

    def refused(self) -> dict[tuple, tuple]:
        """Refusal markers: OUT key tuple -> (at in s of the test clock, SNAT address, reason)."""
        out = {}
        for k, v in self.maps[L.MAP_REFUSED].items():
            m = L.REFUSAL.unpack(v)
            out[_key_tuple(L.CT_KEY.unpack(k))] = (m["at"] / 1e9 - CLOCK_BASE, IPv4Address(m["addr"]),
                                                   L.Reason(m["reason"]))  # fmt: skip
        return out

    def spill_memos(self) -> dict[tuple, float]:
        """The spill memo: (remote, SNAT address, remote port, proto) -> at in s of the test clock."""
        out = {}
        for k, v in self.maps[L.MAP_SPILL_MEMO].items():
            kk = L.SPILL_KEY.unpack(k)
            key = (IPv4Address(kk["remote"]), IPv4Address(kk["addr"]), kk["rport"], kk["proto"])
            out[key] = L.SPILL_MEMO.unpack(v)["at"] / 1e9 - CLOCK_BASE
        return out

    def alloc_counts(self) -> dict[str, int]:
        """snat_alloc_cnt summed over CPUs, by layout.ALLOC_CNT_NAMES."""
        m = self.maps[L.MAP_ALLOC_CNT]
        return {name: m.sum_percpu(k) for k, name in L.ALLOC_CNT_NAMES.items()}

    def eim(self) -> dict[tuple, tuple]:
        """snat_eim: (addr, remote, port, proto, dir) -> (addr, port, rule_id, inside device or
        None, last_seen in s of the test clock)."""
        out = {}
        for k, v in self.maps[L.MAP_EIM].items():
            kk, e = L.EIM_KEY.unpack(k), L.EIM_ENTRY.unpack(v)
            key = (IPv4Address(kk["addr"]), IPv4Address(kk["remote"]), kk["port"], kk["proto"], kk["dir"])
            out[key] = (IPv4Address(e["addr"]), e["port"], e["rule_id"], self.net.dev(e["iif"]) if e["iif"] else None,
                        round(e["last_seen"] / 1e9 - CLOCK_BASE, 6))  # fmt: skip
        return out

    def zero_counters(self) -> None:
        for r in range(L.REASON_MAX):
            self.maps[L.MAP_REASONS].put(r, bytes(8))
        for k in self.maps[L.MAP_RULE_STATS].keys():
            self.maps[L.MAP_RULE_STATS].delete(k)

    def clear_sessions(self) -> None:
        m = self.maps[L.MAP_CT]
        for k in m.keys():
            m.delete(k)
        for k in self.maps[L.MAP_FRAGS].keys():
            self.maps[L.MAP_FRAGS].delete(k)
        # and what a fresh datapath would not have either: mappings, refusal markers (a
        # marker of the last run's flow would refuse the same flow again), live counts
        for name in (L.MAP_EIM, L.MAP_REFUSED, L.MAP_SPILL_MEMO, L.MAP_HOST_SESS, L.MAP_ADDR_STATS,
                     L.MAP_RULE_LIVE):
            for k in self.maps[name].keys():
                self.maps[name].delete(k)


def _key_tuple(k: dict) -> tuple:
    return (IPv4Address(k["saddr"]), IPv4Address(k["daddr"]), k["sport"], k["dport"], k["proto"], k["dir"])
