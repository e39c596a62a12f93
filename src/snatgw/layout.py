"""The single source of truth shared by the Python model, the control plane and the BPF C.

Everything that both sides must agree on lives here, once: reason codes (counted drops and
passes), verdicts, TCP states and the state machine table, algorithm ids, default sizes, map
names and the byte layouts of map keys and values.  ``python -m snatgw.layout`` (or
``write_header``) generates ``datapath/bpf/prog/include/snat_layout.h``; a test checks that the
generated file is current and that the compiled object's BTF has the same sizes and offsets.

Numbers are stable: never renumber a reason or a state; retire one as ``UNUSED_n``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

# --------------------------------------------------------------------------- verdicts


class Verdict(enum.IntEnum):
    """What a datapath does with a packet."""

    PASS = 0  # hand to the kernel stack unchanged (TC_ACT_OK)
    DROP = 1  # drop (TC_ACT_SHOT); always counted with a reason
    REDIRECT = 2  # translated and sent out of ``ifindex`` toward ``nexthop``
    PASS_TRANSLATED = 3  # translated, then handed to the kernel (it routes/fragments)


class Reason(enum.IntEnum):
    """Why a packet got its verdict.  Counted per reason (per-CPU array in BPF)."""

    XLATE_NEW = 0  # first packet of a new session, translated
    XLATE_OUT = 1  # established outbound packet translated
    XLATE_IN = 2  # reply translated back
    XLATE_ICMP_ERR_IN = 3  # ICMP error from outside about a session, translated back
    XLATE_ICMP_ERR_OUT = 4  # ICMP error from inside about a reply, translated out
    XLATE_FRAG = 5  # non-first fragment of a remembered datagram, address rewritten
    PASS_NOT_IPV4 = 6  # not IPv4: left to the kernel
    PASS_LOCAL = 7  # to or from the gateway itself
    PASS_NO_RULE = 8  # new flow that matches no rule: normal routing
    PASS_PROTO = 9  # protocol snatgw does not translate (GRE, ESP, ...)
    PASS_TTL = 10  # TTL would expire: the kernel sends time-exceeded
    PASS_FRAG_NEEDED = 11  # over the egress MTU with DF: the kernel sends frag-needed
    PASS_NO_ROUTE = 12  # the FIB has no route: the kernel answers
    PASS_NO_SESSION_IN = 13  # outside packet with no mapping: not let in (kernel, local)
    PASS_ICMP_OTHER = 14  # ICMP that is neither echo request nor an error about a session
    DROP_MALFORMED = 15  # truncated or inconsistent headers
    DROP_NO_SESSION = 16  # matches a rule, has no session, cannot make one (TCP non-SYN, ICMP no query)
    DROP_PORT_EXHAUSTED = 17  # no free port within the bounded search
    DROP_TABLE_FULL = 18  # the session table is full: new flow refused
    DROP_FRAG_UNKNOWN = 19  # non-first fragment with no remembered first fragment
    DROP_UNMATCHED = 20  # no rule and the setting `unmatched drop`
    DROP_BAD_CHECKSUM = 21  # ICMP error with a wrong checksum (the original dropped these)
    PASS_INTERNAL = 22  # new flow routed out of an inside device: internal, never translated
    PASS_FRAG_UNTRANSLATED = 23  # later fragment of a datagram whose first fragment was passed
    # edge safety (turn 2, 24-31)
    DROP_LEAK = 24  # leaving an uplink with a source in a rule's `from` net, untranslated (egress guard)
    DROP_INBOUND = 25  # from an uplink, no session, routed onward (inside): no `inbound routed`
    DROP_SPOOFED = 26  # on an inside device, a source not routed back there, or a local/pool one
    PASS_IP_OPTIONS = 27  # a source route (LSRR/SSRR) or IP options that do not parse: the kernel judges it
    DROP_ICMP_NOT_FROM_HOST = 28  # an inside error about a reply, not from its host: any kind for an on-link host, else port/protocol unreachable, reassembly time exceeded
    PASS_NOT_FOR_US = 29  # a frame not sent to the device's own MAC (another host's: a flood, promiscuous mode; or a broadcast/multicast one): the kernel's, which forwards only frames sent to the device
    # 44-51: applications (issue 12)
    XLATE_IN_TTL = 44  # reply whose TTL runs out: translated, to the kernel (time exceeded to the remote)
    XLATE_IN_FRAG_NEEDED = 45  # reply over the inside MTU with DF: translated, to the kernel (frag-needed)
    FRAG_HELD = 46  # later fragment before its first: held on the recirculation device, tried again
    XLATE_IN_NEW = 47  # inbound to a live endpoint-independent mapping, admitted by its filtering: new session
    XLATE_HAIRPIN = 48  # inside to a live endpoint-independent mapping: translated both ways, back inside
    DROP_REFUSED_RECENTLY = 32  # a packet of a flow refused moments ago (refusal marker): no search
    DROP_HOST_LIMIT = 33  # the inside host has max_sessions_per_host live sessions


REASON_MAX = 64  # size of the per-reason counter array; > max(Reason)
# Number ranges of reasons being added (turn 2): 24-31 edge safety, 32-39 port allocator,
# 40-43 expiry/counts, 44-51 applications (MTU, fragments, mappings), 52-55 operations.

#: reasons that are not drops but still worth a glance in ``snatgw stats``
PASS_REASONS = frozenset(r for r in Reason if r.name.startswith("PASS_"))
DROP_REASONS = frozenset(r for r in Reason if r.name.startswith("DROP_"))
#: a first fragment passed untranslated with one of these leaves a "pass" marker in the fragment
#: table, so its later fragments pass too (PASS_FRAG_UNTRANSLATED).  Not PASS_TTL and
#: PASS_FRAG_NEEDED: those belong to translated flows (the kernel answers and the datagram dies
#: there), and passing their later fragments could leak a private source address.
FRAG_PASS_REASONS = PASS_REASONS - {Reason.PASS_TTL, Reason.PASS_FRAG_NEEDED}

# --------------------------------------------------------------------------- protocols

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_DCCP = 33
IPPROTO_UDPLITE = 136
#: protocols without ports whose own checksum covers the addresses (a pseudo-header) at L4
#: offset 6: translated address-only, that checksum adjusted when its 8 bytes are present
PSEUDO_HDR_PROTOS = (IPPROTO_DCCP, IPPROTO_UDPLITE)

ICMP_ECHOREPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_SOURCE_QUENCH = 4
ICMP_ECHO = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETERPROB = 12
ICMP_ERROR_TYPES = (ICMP_DEST_UNREACH, ICMP_SOURCE_QUENCH, ICMP_TIME_EXCEEDED, ICMP_PARAMETERPROB)
#: (type, code) of the errors only the destination host of the quoted packet sends (RFC 792,
#: RFC 1122 3.2.2.1 and 3.3.2: protocol and port unreachable, fragment reassembly time
#: exceeded); an inside host's such error about a reply is the session's only from that
#: session's inside host (docs/datapath.md "ICMP errors"); icmp.h icmp_err_host_only
ICMP_HOST_ONLY_ERRORS = ((ICMP_DEST_UNREACH, 2), (ICMP_DEST_UNREACH, 3), (ICMP_TIME_EXCEEDED, 1))
#: ICMP queries with an identifier (translated like echo): echo, timestamp, information, mask
ICMP_QUERY_REQUESTS = (ICMP_ECHO, 13, 15, 17)
ICMP_QUERY_REPLIES = (ICMP_ECHOREPLY, 14, 16, 18)

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

# --------------------------------------------------------------------------- algorithms


class Algo(enum.IntEnum):
    """SNAT address selection; numbers as the original's netlink ALGO attribute."""

    SDH = 0  # hash(src, dst)
    SH = 1  # hash(src)
    RANDOM = 2  # hash(src, dst, sport): deterministic, despite the name

    @property
    def label(self) -> str:
        return self.name.lower()


# --------------------------------------------------------------------------- TCP states


class CtState(enum.IntEnum):
    """Session states.  TCP uses the original's IPVS states; UDP and ICMP have one each."""

    NONE = 0
    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT = 4
    TIME_WAIT = 5
    CLOSE = 6
    CLOSE_WAIT = 7
    LAST_ACK = 8
    LISTEN = 9
    SYNACK = 10
    UDP = 11
    ICMP = 12


TCP_STATE_COUNT = 11  # NONE..SYNACK


class TcpEvent(enum.IntEnum):
    """Event of a TCP segment, chosen by priority RST > SYN > FIN > ACK (reference §3.3)."""

    SYN = 0
    FIN = 1
    ACK = 2
    RST = 3


class TcpTable(enum.IntEnum):
    """Which row set: IN = inside->outside, OUT = replies, IN_ONLY = outbound before a reply."""

    IN = 0
    OUT = 1
    IN_ONLY = 2


_S = {
    "NO": CtState.NONE, "ES": CtState.ESTABLISHED, "SS": CtState.SYN_SENT,
    "SR": CtState.SYN_RECV, "FW": CtState.FIN_WAIT, "TW": CtState.TIME_WAIT,
    "CL": CtState.CLOSE, "CW": CtState.CLOSE_WAIT, "LA": CtState.LAST_ACK,
    "LI": CtState.LISTEN, "SA": CtState.SYNACK,
}  # fmt: skip

# Rows: (table, event) -> next state by current state NONE..SYNACK (reference §3.3, verbatim).
_TCP_ROWS = {
    (TcpTable.IN, TcpEvent.SYN): "SR ES ES SR SR SR SR SR SR SR SR",
    (TcpTable.IN, TcpEvent.FIN): "CL CW SS TW TW TW CL CW LA LI TW",
    (TcpTable.IN, TcpEvent.ACK): "CL ES SS ES FW TW CL CW CL LI ES",
    (TcpTable.IN, TcpEvent.RST): "CL CL CL SR CL CL CL CL LA LI SR",
    (TcpTable.OUT, TcpEvent.SYN): "SS ES SS SR SS SS SS SS SS LI SR",
    (TcpTable.OUT, TcpEvent.FIN): "TW FW SS TW FW TW CL TW LA LI TW",
    (TcpTable.OUT, TcpEvent.ACK): "ES ES SS ES FW TW CL CW LA ES ES",
    (TcpTable.OUT, TcpEvent.RST): "CL CL SS CL CL TW CL CL CL CL CL",
    (TcpTable.IN_ONLY, TcpEvent.SYN): "SR ES ES SR SR SR SR SR SR SR SR",
    (TcpTable.IN_ONLY, TcpEvent.FIN): "CL FW SS TW FW TW CL CW LA LI TW",
    (TcpTable.IN_ONLY, TcpEvent.ACK): "CL ES SS ES FW TW CL CW CL LI ES",
    (TcpTable.IN_ONLY, TcpEvent.RST): "CL CL CL SR CL CL CL CL LA LI CL",
}

#: TCP_FSM[table][event][state] -> next state
TCP_FSM: tuple[tuple[tuple[int, ...], ...], ...] = tuple(
    tuple(
        tuple(int(_S[c]) for c in _TCP_ROWS[(table, event)].split())
        for event in TcpEvent
    )
    for table in TcpTable
)


def tcp_event(flags: int) -> TcpEvent | None:
    """The event of a segment by priority RST > SYN > FIN > ACK; None when no flag is set
    (the original then moves the state to CLOSE)."""
    if flags & TCP_RST:
        return TcpEvent.RST
    if flags & TCP_SYN:
        return TcpEvent.SYN
    if flags & TCP_FIN:
        return TcpEvent.FIN
    if flags & TCP_ACK:
        return TcpEvent.ACK
    return None


def tcp_next_state(state: int, table: TcpTable, flags: int) -> int:
    event = tcp_event(flags)
    if event is None:
        return int(CtState.CLOSE)
    return TCP_FSM[table][event][state]


# --------------------------------------------------------------------------- defaults

PORT_MIN = 5000  # the original's fullnat_lport_min
PORT_MAX = 65535  # fullnat_lport_max
PORT_TRIES = 128  # default port_tries: candidates per SNAT address (docs/datapath.md step 13)
PORT_TRIES_MAX = 1024  # largest port_tries setting = the compile-time bound SNAT_PORT_TRIES
PORT_TRIES_BPF = PORT_TRIES_MAX  # (older name)
SEARCH_TRIES = 2048  # all addresses of one new flow's search together try at most this many ports
REFUSED_SECS = 2  # a refusal marker lives this long (seconds)
REFUSE_ICMP_PER_SEC = 100  # `refuse_icmp yes`: at most this many ICMP errors a second (all hosts)
MAX_REFUSED = 65536  # entries of snat_refused (LRU: losing one only costs a search)
#: the spill memo (docs/datapath.md step 13): a port search that finds no free port on an
#: address toward a remote endpoint is remembered this long (ms), and a new flow choosing that
#: address toward that endpoint meanwhile tries only its first candidate there.  At most one
#: full search per (address, remote endpoint) per memo life; a port freed there meanwhile
#: (other than a flow's first candidate) is not found: such a flow spills (or is refused).
SPILL_MEMO_MS = 1000
MAX_SPILL_MEMO = 16384  # entries of snat_spill_memo (LRU: losing one only costs a full search)
#: strides of the port search after the first candidate: primes above 65536, so ``p mod n``
#: is coprime to every port count n <= 65536 and ``start + j * stride`` visits each port once
PORT_STRIDES = (
    65537, 65539, 65543, 65551, 65557, 65563, 65579, 65581, 65587, 65599, 65609, 65617, 65629,
    65633, 65647, 65651, 65657, 65677, 65687, 65699, 65701, 65707, 65713, 65717, 65719, 65729,
    65731, 65761, 65777, 65789, 65809, 65827, 65831, 65837, 65839, 65843, 65851, 65867, 65881,
    65899, 65921, 65927, 65929, 65951, 65957, 65963, 65981, 65983, 65993, 66029, 66037, 66041,
    66047, 66067, 66071, 66083, 66089, 66103, 66107, 66109, 66137, 66161, 66169, 66173,
)
MAX_RULES = 16384  # rule slots in the BPF rules array
MAX_SESSIONS = 262144  # default session table size (each session = 2 map entries)
#: the largest max_sessions the bpf backend can make: a kernel hash map has at most
#: U32_MAX / 16 bytes of buckets, 2^27 of them (a power of two), and the session table holds
#: 2 entries a session (so does the mapping table); above it the map's creation fails (E2BIG,
#: or EINVAL once 2 x max_sessions no longer fits in 32 bits)
MAX_BPF_SESSIONS = 1 << 26
MAX_FRAGS = 8192  # remembered first fragments
MAX_IFACES = 64  # entries of the interface-role map
MAX_HOSTS = 65536  # entries of snat_host_sess (inside hosts with live sessions)
MAX_POOL_ADDRS = 65536  # entries of snat_addr_stats (SNAT addresses in use)
MAX_FROM_NETS = 16384  # entries of snat_from_nets (distinct `from` nets, then pool prefixes)
FROM_NET_RULE = 1  # snat_from_nets value: a rule's `from` net (the egress guard's full check)
FROM_NET_POOL = 2  # snat_from_nets value: a pool prefix (egress: passes at once; step 2a: never a source)
MAX_INSIDE_ADDRS = 1024  # entries of snat_inside_addrs
#: new_gw policy routing of the bpf backend (docs/datapath.md, "new_gw and the kernel"): each
#: distinct egress (device, next hop) of a new_gw rule gets a number n < GW_SLOTS; a packet of
#: such an egress that the datapath hands to the kernel translated carries skb->mark
#: GW_MARK_BASE + n, and the backend installs `ip rule pref GW_RT_BASE+n fwmark MARK lookup
#: GW_RT_BASE+n proto GW_RT_PROTO` with that table's default route via the egress.  Its own
#: ranges (the nft backend's are 31000-31999 and marks 0x53470000 + slot): a switch between
#: the backends never removes the other's.
GW_SLOTS = 1000
GW_MARK_BASE = 0x53478000
GW_RT_BASE = 30000
GW_RT_PROTO = 201
#: endpoint-independent mappings (snat_eim): endpoints, their owners and ADF permits; entries per
#: session of max_sessions (an endpoint and its owner per inside endpoint, a permit per remote)
EIM_PER_SESSION = 2
#: an endpoint (and its owner, an ADF permit) outlives its last session by at most this grace
#: (the sweep's half-pair grace): one made or reused moments before a sweep is never removed by it
EIM_GRACE = 10
FRAG_TIMEOUT = 30  # seconds a first fragment is remembered
#: a later fragment that arrives before its first is held (sent round the recirculation device,
#: then judged again) for at most FRAG_HOLD seconds since its datagram's first held fragment;
#: the bpf backend's holder waits 1 ms, doubling per round, at most FRAG_HOLD_STEP_MAX_MS
FRAG_HOLD = 5
FRAG_HOLD_STEP_MIN_MS = 1
FRAG_HOLD_STEP_MAX_MS = 250
#: the recirculation device, a TAP the bpf backend owns (datapath/bpf/recirc.py): held fragments
#: are redirected to its egress, the backend's holder writes them back after a wait, and they
#: come back on its ingress (program snat_recirc); snat_ifaces[RECIRC_KEY] is its ifindex (no
#: device has ifindex 0); absent: no holding (DROP_FRAG_UNKNOWN as before)
RECIRC_DEV = "snatgw-hold"
RECIRC_KEY = 0
FRAG_HELD_IFINDEX = 0xFFFFFFFF  # frag_entry.ifindex of a held marker (created = first held)
#: protocols without ports (GRE, ESP, SCTP...): addresses of the pool tried for a new session
ADDR_TRIES = 64

#: default timeouts in seconds, by state: a gateway's, floored by the behaviour RFCs (spec
#: "Sessions"; RFC_TIMEOUT_FLOORS below).  Every transitory TCP state gets RFC 5382's 4 minutes
#: (a half-closed connection's server may answer long after the client's FIN).  NONE, LISTEN
#: and SYNACK are never a live session's state (a session starts in SYN_RECV and no row of
#: TCP_FSM leads to them): LISTEN and SYNACK still get the transitory 240 s should a future
#: table use them, NONE gets CLOSE's 10 s (a session in no known state is not worth keeping).
DEFAULT_TIMEOUTS: dict[CtState, int] = {
    CtState.NONE: 10,
    CtState.ESTABLISHED: 7440,
    CtState.SYN_SENT: 240,
    CtState.SYN_RECV: 240,
    CtState.FIN_WAIT: 240,
    CtState.TIME_WAIT: 120,
    CtState.CLOSE: 10,
    CtState.CLOSE_WAIT: 240,
    CtState.LAST_ACK: 240,
    CtState.LISTEN: 240,
    CtState.SYNACK: 240,
    CtState.UDP: 300,
    CtState.ICMP: 60,
}

_TRANSITORY = "RFC 5382 REQ-5 (a transitory TCP connection idle-timeout of at least 4 minutes)"
#: state -> (lowest timeout the RFCs allow, the RFC and requirement); `check` warns below it
RFC_TIMEOUT_FLOORS: dict[CtState, tuple[int, str]] = {
    CtState.ESTABLISHED: (7440, "RFC 5382 REQ-5 (an established TCP connection idle-timeout of at least 2 h 4 min)"),
    CtState.SYN_SENT: (240, _TRANSITORY),
    CtState.SYN_RECV: (240, _TRANSITORY),
    CtState.FIN_WAIT: (240, _TRANSITORY),
    CtState.CLOSE_WAIT: (240, _TRANSITORY),
    CtState.LAST_ACK: (240, _TRANSITORY),
    CtState.LISTEN: (240, _TRANSITORY),
    CtState.SYNACK: (240, _TRANSITORY),
    CtState.TIME_WAIT: (120, "RFC 6888 REQ-8 (an external port not reused until 120 s after its session)"),
    CtState.UDP: (120, "RFC 4787 REQ-5 (a UDP mapping timer of at least 2 minutes)"),
    CtState.ICMP: (60, "RFC 5508 REQ-1 (an ICMP query session timer of at least 60 s)"),
}

# --------------------------------------------------------------------------- map layouts

PIN_DIR = "/sys/fs/bpf/snatgw"

#: map names as in the BPF object (and as pinned under PIN_DIR)
MAP_RULES = "snat_rules"  # ARRAY  u32 slot -> struct snat_rule (priority order)
MAP_CONFIG = "snat_config"  # ARRAY  u32 0 -> struct snat_cfg
MAP_CT = "snat_ct"  # HASH   struct ct_key -> struct ct_entry (both directions)
MAP_FRAGS = "snat_frags"  # LRU    struct frag_key -> struct frag_entry
MAP_REASONS = "snat_reasons"  # PERCPU_ARRAY u32 reason -> u64 packets
MAP_RULE_STATS = "snat_rule_stats"  # PERCPU_HASH u32 rule_id -> struct rule_stats
MAP_IFACES = "snat_ifaces"  # HASH   u32 ifindex -> u32 IFACE_* role (the attached devices)
#: live counts (turn 2): the datapath adds at session creation (and counts refusals), the
#: expiry sweep recounts and corrects them; `stats` reads these instead of the session table
MAP_HOST_SESS = "snat_host_sess"  # HASH   be32 inside address -> struct live_count
MAP_ADDR_STATS = "snat_addr_stats"  # HASH   be32 SNAT address -> struct live_count
MAP_RULE_LIVE = "snat_rule_live"  # HASH   u32 rule_id -> struct live_count
#: the egress guard's view of the rules (turn 2, edge): every rule's `from` net
MAP_FROM_NETS = "snat_from_nets"  # LPM_TRIE struct lpm_v4 -> u32 FROM_NET_*
#: refusal markers (allocator): a refused new flow's OUT key -> when, why, which address
MAP_REFUSED = "snat_refused"  # LRU    struct ct_key -> struct refusal
#: the spill memo (allocator): (remote, SNAT address, remote port, proto) judged full -> when
MAP_SPILL_MEMO = "snat_spill_memo"  # LRU    struct spill_key -> struct spill_memo
#: allocator counters (ALLOC_CNT_*), per CPU
MAP_ALLOC_CNT = "snat_alloc_cnt"  # PERCPU_ARRAY u32 ALLOC_CNT_* -> u64
#: the gateway's own addresses on its inside devices (never a source on an uplink)
MAP_INSIDE_ADDRS = "snat_inside_addrs"  # HASH be32 address -> u32 ifindex
#: endpoint-independent mappings (issue 12): struct eim_key -> struct eim_entry
MAP_EIM = "snat_eim"  # HASH (no prealloc)
#: a rule's slot by its id (the control plane writes it with the rules): a mapping's rule in one lookup
MAP_RULE_SLOTS = "snat_rule_slots"  # HASH u32 rule_id -> u32 slot
#: new_gw egresses -> the mark a packet handed to the kernel translated takes (GW_MARK_BASE + n)
MAP_GW_MARKS = "snat_gw_marks"  # HASH struct gw_key -> u32 mark

EIM_DIR_ENDPOINT = 0  # (inside addr, inside port, proto) -> its external (addr, port)
EIM_DIR_OWNER = 1  # (external addr, port, proto) -> the inside endpoint that owns it
EIM_DIR_PERMIT = 2  # (inside addr, port, proto, remote addr): ADF lets that remote's any port in
#: the audit log (issue 13): session create/end records, when `audit_log` is set (CFG_F_AUDIT)
MAP_AUDIT = "snat_audit"  # RINGBUF of struct audit_rec, AUDIT_RING_BYTES
MAP_AUDIT_CNT = "snat_audit_cnt"  # PERCPU_ARRAY u32 AUDIT_CNT_* -> u64 records
#: the walk in progress (sweep.bpf.c): its number, which the datapath stamps on the sessions it
#: makes meanwhile, so that the walk does not count again what the datapath counted
MAP_WALK = "snat_walk"  # ARRAY u32 0 -> struct walk_state

#: the audit ring's size in bytes (a power of two, a multiple of the page size): each record
#: takes 8 bytes of ring header + struct audit_rec (48 bytes), so 2 MiB hold ~37,000 records
#: the daemon has not read yet; a record that finds it full is dropped and counted
#: (AUDIT_CNT_LOST), never waited for
AUDIT_RING_BYTES = 1 << 21
AUDIT_NEW = 1  # audit_rec.kind: a session was created (after its pair was inserted)
AUDIT_END = 2  # a session was removed
#: audit_rec.why of an AUDIT_END record
AUDIT_END_EXPIRED = 1  # idle past its state's timeout (the expiry sweep)
AUDIT_END_FLUSH = 2  # removed by `snatgw flush` (the sweep's flush mode)
AUDIT_END_RULE_CHANGE = 3  # removed by a rule change (its address left the rule's pool or link)
AUDIT_END_DESTROYED = 4  # nft: conntrack destroyed the entry (timeout, flush, rule change: not told apart)
AUDIT_END_NAMES = {AUDIT_END_EXPIRED: "expired", AUDIT_END_FLUSH: "flush",
                   AUDIT_END_RULE_CHANGE: "rule_change", AUDIT_END_DESTROYED: "destroyed"}  # fmt: skip
AUDIT_CNT_WRITTEN = 0  # snat_audit_cnt: records put in the ring
AUDIT_CNT_LOST = 1  # records dropped because the ring was full
AUDIT_CNT_N = 2
ALLOC_CNT_MEMO_HIT = 0  # snat_alloc_cnt: an address's search cut short after its first candidate by a young memo
ALLOC_CNT_MEMO_SET = 1  # memos written: a full search of an address found no free port
ALLOC_CNT_SEARCH = 2  # port searches run (one per new flow that reached step 13's search)
ALLOC_CNT_TRIES = 3  # candidates tried by those searches (each looked up; a memo skip is none)
ALLOC_CNT_N = 4
ALLOC_CNT_NAMES = {ALLOC_CNT_MEMO_HIT: "spill_memo_hits", ALLOC_CNT_MEMO_SET: "spill_memos_written",
                   ALLOC_CNT_SEARCH: "port_searches", ALLOC_CNT_TRIES: "port_search_tries"}  # fmt: skip

IFACE_INSIDE = 1  # role: an inside device (a new flow routed out of it is internal)
IFACE_OUTSIDE = 2  # role: an uplink

CT_DIR_OUT = 0  # key of the outbound direction: (inside src, remote, sport, dport)
CT_DIR_IN = 1  # key of the reply direction: (remote, SNAT addr, rport, SNAT port)

RULE_F_GW = 0x1  # rule names a gw to match
RULE_F_OIF = 0x2  # rule names an oif to match
RULE_F_NEW_GW = 0x4  # rule overrides the next hop
RULE_F_SPILL = 0x8  # on_exhausted spill: try the pool's next addresses when one is full
RULE_F_EIM = 0x10  # mapping endpoint-independent (TCP and UDP)
RULE_F_PRESERVE = 0x20  # port_preserve yes: the first candidate is the inside port itself
RULE_F_EIF = 0x40  # filtering endpoint-independent
RULE_F_ADF = 0x80  # filtering address-dependent (neither: address-and-port-dependent)

CT_F_REPLIED = 0x1  # a reply has been seen (TCP leaves the IN_ONLY rows)
CT_F_NEW_GW = 0x2  # session's nexthop comes from new_gw
CT_F_EIM = 0x4  # OUT: the session uses its inside endpoint's endpoint-independent mapping
CT_F_HAIRPIN = 0x8  # OUT: the remote is a live mapping: translated, then delivered back inside
CT_F_WALK = 0x10  # OUT: made while a walk was counting; its IN entry's iif holds that walk's number

CFG_F_UNMATCHED_DROP = 0x1  # `unmatched drop`: no-rule flows are dropped
CFG_F_REFUSE_ICMP = 0x4  # `refuse_icmp yes`: a host over its limit gets ICMP host unreachable
CFG_F_INBOUND_ROUTED = 0x2  # `inbound routed`: uplink packets without a session may be routed inside
CFG_F_EIM = 0x8  # some rule maps endpoint-independently: look owners up (filtering, hairpinning)
CFG_F_AUDIT = 0x10  # `audit_log` set: session create/end records go to snat_audit
#: some rule has a max_sessions_per_host: the datapath counts each inside host's new sessions
#: (snat_host_sess +1); without it only the expiry sweep's recount keeps them (docs/datapath.md)
CFG_F_HOST_COUNT = 0x20
#: two inside devices share their ifindex's low 16 bits (all ct_entry.iif keeps): no session
#: vouches for a packet's source, step 2a takes the full reverse-path check for every packet
CFG_F_IIF_AMBIGUOUS = 0x40
#: no IPv4 policy rule selects on the input device (iif/iifname, l3mdev) and every device
#: forwards: a FIB lookup's answer does not depend on its input device, so a new session's
#: route back (lookup from the uplink) is the reverse-path check's (lookup from the loopback)
#: and is not looked up again (docs/datapath.md step 13; kept by the control plane: fibrules.py)
CFG_F_BACK_FROM_RPF = 0x80

#: the expiry sweep (sweep.bpf.c: a BPF_PROG_TYPE_SYSCALL program walking snat_ct)
SWEEP_EXPIRE = 0  # remove expired pairs and old half pairs, recount the live counts
SWEEP_FLUSH = 1  # remove the pairs the filters select (all: also half pairs), recount
SWEEP_RECOUNT = 2  # remove nothing, recount the live counts (a host limit turned on by reload)
SWEEP_F_RULE = 0x01
SWEEP_F_INSIDE = 0x02
SWEEP_F_NAT = 0x04
SWEEP_F_REMOTE = 0x08
SWEEP_F_RPORT = 0x10
SWEEP_F_PROTO = 0x20
SWEEP_F_STATE = 0x40
SWEEP_STATES = 16  # entries of the sweep's timeout array (by ct_state; larger states use NONE's)
SWEEP_WHOLE, SWEEP_BEGIN, SWEEP_KEYS, SWEEP_END = 0, 1, 2, 3  # sweep_args.phase
#: sweep_args.phase: end a chunked walk cut short between chunks without publishing anything (its
#: deltas and endpoint marks are dropped; the counts stay as they were, a recount follows)
SWEEP_ABORT = 4
SWEEP_CHUNK = 16384  # keys one SWEEP_KEYS run visits (a power of two)


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str  # C type as written in the header
    fmt: str  # struct module code (little-endian host; 'n' suffix for network order bytes)
    comment: str = ""


_SIZES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8, "__be16": 2, "__be32": 4}
_FMT = {"__u8": "B", "__u16": "H", "__u32": "I", "__u64": "Q", "__be16": "2s", "__be32": "4s"}


@dataclass(frozen=True)
class Struct:
    """A C struct declared once; ``pack``/``unpack`` read and write map bytes.

    Big-endian fields (``__be16``/``__be32``) travel as raw bytes so that addresses and ports
    stay in wire order, exactly as the BPF program stores them."""

    name: str
    doc: str
    fields: tuple[tuple[str, str, str], ...]  # (name, ctype, comment); ctype may be "struct x"

    @cached_property  # frozen dataclass: computed once (nested structs are declared first)
    def fmt(self) -> str:
        out = "<"
        for _, ctype, _ in self.fields:
            if ctype.startswith("struct "):
                out += f"{STRUCTS[ctype[7:]].size}s"
            else:
                out += _FMT[ctype]
        return out

    @cached_property
    def size(self) -> int:
        return struct.calcsize(self.fmt)

    @cached_property
    def _codec(self) -> tuple[struct.Struct, tuple[tuple[str, int, int], ...]]:
        """The compiled struct and, per field, (name, kind, bytes): kind 0 a number, 1 a
        big-endian field (raw bytes), 2 a nested struct (raw bytes).  pack/unpack run at
        every rule compiled and every map value read: 10,000 rules made the format string
        alone a tenth of a reload."""
        plan = []
        for name, ctype, _ in self.fields:
            if ctype.startswith("struct "):
                plan.append((name, 2, STRUCTS[ctype[7:]].size))
            elif ctype.startswith("__be"):
                plan.append((name, 1, _SIZES[ctype]))
            else:
                plan.append((name, 0, 0))
        return struct.Struct(self.fmt), tuple(plan)

    def offsets(self) -> dict[str, int]:
        off, res = 0, {}
        for name, ctype, _ in self.fields:
            res[name] = off
            off += STRUCTS[ctype[7:]].size if ctype.startswith("struct ") else _SIZES[ctype]
        return res

    def pack(self, **values) -> bytes:
        st, plan = self._codec
        args = []
        for name, kind, n in plan:
            v = values.get(name, 0)
            if kind == 1:
                v = v if isinstance(v, bytes) else int(v).to_bytes(n, "big")
            elif kind == 2:
                v = v if isinstance(v, bytes) else bytes(n)
            args.append(v)
        return st.pack(*args)

    def unpack(self, data: bytes) -> dict:
        st, plan = self._codec
        out = {}
        for (name, kind, _), v in zip(plan, st.unpack(data[: st.size])):
            out[name] = int.from_bytes(v, "big") if kind == 1 else v
        return out


# Field order is chosen so that every field is naturally aligned and no padding is implied:
# the header carries _Static_assert on each size, and the BTF test checks each offset.
STRUCTS: dict[str, Struct] = {}


def _declare(s: Struct) -> Struct:
    STRUCTS[s.name] = s
    return s


CT_KEY = _declare(Struct("ct_key", "one direction of a session (wire order)", (
    ("saddr", "__be32", "source address"),
    ("daddr", "__be32", "destination address"),
    ("sport", "__be16", "source port; ICMP echo: identifier on the inside side, else 0"),
    ("dport", "__be16", "destination port; ICMP echo: identifier on the SNAT side, else 0"),
    ("proto", "__u8", "IPPROTO_*"),
    ("dir", "__u8", "CT_DIR_OUT or CT_DIR_IN"),
    ("pad", "__u16", "zero"),
)))  # fmt: skip

CT_ENTRY = _declare(Struct("ct_entry", "a session direction: its rewrite and where it goes", (
    ("peer", "struct ct_key", "the key of the other direction"),
    ("rw_addr", "__be32", "OUT: new source (SNAT addr); IN: new destination (inside host)"),
    ("rw_port", "__be16", "OUT: new source port; IN: new destination port"),
    ("state", "__u8", "enum ct_state (kept in the OUT entry)"),
    ("flags", "__u8", "CT_F_*"),
    ("ifindex", "__u32", "egress device: OUT the uplink, IN the inside device"),
    ("nexthop", "__be32", "OUT: next hop (route gw or new_gw); 0 = the destination"),
    ("rule_id", "__u32", "id of the rule that created the session"),
    ("mtu", "__u16", "egress MTU seen at creation (larger MTUs are kept as 65535)"),
    ("iif", "__u16", "OUT: the inside device the session was made on (ifindex, low 16 bits); IN: the number "
                     "of the walk in progress when it was made (CT_F_WALK), else 0"),
    ("last_seen", "__u64", "bpf_ktime_get_ns() of the last packet in this direction; set at creation too"),
)))  # fmt: skip

SNAT_RULE = _declare(Struct("snat_rule", "a compiled rule, one per slot in priority order", (
    ("src_net", "__be32", "from: network"),
    ("src_mask", "__be32", "from: netmask"),
    ("dst_net", "__be32", "to: network"),
    ("dst_mask", "__be32", "to: netmask"),
    ("gw", "__be32", "route next hop to match (RULE_F_GW)"),
    ("new_gw", "__be32", "next-hop override (RULE_F_NEW_GW)"),
    ("oif", "__u32", "egress ifindex to match (RULE_F_OIF); 0xffffffff: device absent"),
    ("pool_min", "__u32", "first SNAT address, host order"),
    ("pool_max", "__u32", "last SNAT address, host order"),
    ("rule_id", "__u32", "stable id for counters"),
    ("algo", "__u8", "enum algo"),
    ("flags", "__u8", "RULE_F_*"),
    ("pad", "__u16", "zero"),
    ("host_limit", "__u32", "max_sessions_per_host in effect (0 = none)"),
)))  # fmt: skip

SNAT_CFG = _declare(Struct("snat_cfg", "global settings the datapath reads per new flow", (
    ("nrules", "__u32", "slots in use in snat_rules"),
    ("flags", "__u32", "CFG_F_*"),
    ("port_min", "__u16", "first SNAT port"),
    ("port_max", "__u16", "last SNAT port"),
    ("port_tries", "__u32", "bound of the port search (<= SNAT_PORT_TRIES)"),
)))  # fmt: skip

FRAG_KEY = _declare(Struct("frag_key", "a datagram whose first fragment was translated or passed", (
    ("saddr", "__be32", "source as received"),
    ("daddr", "__be32", "destination as received"),
    ("id", "__be16", "IP identification"),
    ("proto", "__u8", "IPPROTO_*"),
    ("pad", "__u8", "zero"),
)))  # fmt: skip

FRAG_ENTRY = _declare(Struct("frag_entry", "the address rewrite for later fragments", (
    ("saddr", "__be32", "new source"),
    ("daddr", "__be32", "new destination"),
    ("ifindex", "__u32", "egress device; 0 = pass marker: first fragment passed, pass the rest; FRAG_HELD_IFINDEX = held marker"),
    ("nexthop", "__be32", "next hop; 0 = the destination"),
    ("created", "__u64", "bpf_ktime_get_ns()"),
)))  # fmt: skip

GW_KEY = _declare(Struct("gw_key", "a new_gw egress: the session's device and next hop", (
    ("ifindex", "__u32", "egress device"),
    ("nexthop", "__be32", "next hop (the new_gw when on-link, else the route's gateway toward it)"),
)))  # fmt: skip

REFUSAL = _declare(Struct("refusal", "a refusal marker: when, why, at which SNAT address", (
    ("at", "__u64", "snat_now() of the refusal"),
    ("addr", "__be32", "the SNAT address chosen (the last one tried)"),
    ("reason", "__u32", "enum reason of the refusal"),
)))  # fmt: skip

SPILL_KEY = _declare(Struct("spill_key", "a spill memo's key: a SNAT address toward a remote endpoint", (
    ("remote", "__be32", "remote address"),
    ("addr", "__be32", "SNAT address"),
    ("rport", "__be16", "remote port (ICMP query: 0)"),
    ("proto", "__u8", "IPPROTO_*"),
    ("pad", "__u8", "zero"),
)))  # fmt: skip

SPILL_MEMO = _declare(Struct("spill_memo", "a spill memo: when a full search of the address found no free port", (
    ("at", "__u64", "snat_now() of that search"),
)))  # fmt: skip

RULE_STATS = _declare(Struct("rule_stats", "per-rule counters (per CPU)", (
    ("packets", "__u64", "packets translated by the rule's sessions"),
    ("bytes", "__u64", "bytes translated"),
    ("sessions", "__u64", "sessions created"),
)))  # fmt: skip


LPM_V4 = _declare(Struct("lpm_v4", "an IPv4 prefix as the LPM trie key", (
    ("prefixlen", "__u32", "prefix length, 0..32"),
    ("addr", "__be32", "network address"),
)))  # fmt: skip

SWEEP_ARGS = _declare(Struct("sweep_args", "what one walk of snat_ct by the sweep program does", (
    ("now", "__u64", "CLOCK_MONOTONIC ns the sweep judges idleness against"),
    ("grace", "__u64", "ns after which a half pair (one direction without its peer) is removed"),
    ("mode", "__u32", "SWEEP_EXPIRE, SWEEP_FLUSH or SWEEP_RECOUNT"),
    ("flags", "__u32", "SWEEP_F_*: which filters apply (FLUSH)"),
    ("rule_id", "__u32", "SWEEP_F_RULE: sessions of this rule"),
    ("full", "__u32", "EXPIRE: 1 = look up the other half of every entry (half pairs, orphans); 0 = only of entries that look expired"),
    ("inside", "__be32", "SWEEP_F_INSIDE: inside address, under inside_mask"),
    ("inside_mask", "__be32", "netmask of inside"),
    ("nat", "__be32", "SWEEP_F_NAT: SNAT address"),
    ("remote", "__be32", "SWEEP_F_REMOTE: remote address, under remote_mask"),
    ("remote_mask", "__be32", "netmask of remote"),
    ("remote_port", "__be16", "SWEEP_F_RPORT: remote port"),
    ("proto", "__u8", "SWEEP_F_PROTO: IPPROTO_*"),
    ("state", "__u8", "SWEEP_F_STATE: enum ct_state"),
    ("phase", "__u32", "SWEEP_WHOLE: one run walks the table; SWEEP_BEGIN, SWEEP_KEYS (the keys in sweep_keys), SWEEP_END: a walk in chunks; SWEEP_ABORT: end one cut short, publishing nothing"),
    ("pad2", "__u32", "zero"),
)))  # fmt: skip

SWEEP_HOST_ADD = _declare(Struct("sweep_host_add", "the context of one run of snat_host_add (sweep.bpf.c): sessions the control plane made for an inside host", (
    ("host", "__be32", "the inside address (snat_host_sess's key)"),
    ("sessions", "__u32", "added to its count's sessions, atomically (the entry made when missing)"),
)))  # fmt: skip

SWEEP_RES = _declare(Struct("sweep_res", "what the last walk did (sweep.bpf.c)", (
    ("visited", "__u64", "entries visited (both directions)"),
    ("removed", "__u64", "sessions removed (pairs)"),
    ("orphans", "__u64", "half pairs removed"),
    ("live", "__u64", "sessions kept (pairs counted into the live counts)"),
    ("fresh", "__u64", "pairs found expired by the first look but refreshed by the second"),
    ("count_errors", "__u64", "live-count updates that failed (a count map full)"),
    ("made_during", "__u64", "pairs kept that were made during the walk (counted by the datapath, not again)"),
)))  # fmt: skip

EIM_KEY = _declare(Struct("eim_key", "an endpoint-independent mapping's endpoint, owner or permit", (
    ("addr", "__be32", "ENDPOINT, PERMIT: inside address; OWNER: external address"),
    ("remote", "__be32", "PERMIT: the remote address; else 0"),
    ("port", "__be16", "ENDPOINT, PERMIT: inside port; OWNER: external port"),
    ("proto", "__u8", "IPPROTO_TCP or IPPROTO_UDP"),
    ("dir", "__u8", "EIM_DIR_*"),
)))  # fmt: skip

EIM_ENTRY = _declare(Struct("eim_entry", "ENDPOINT: its mapping; OWNER: its endpoint; PERMIT: (unused)", (
    ("addr", "__be32", "ENDPOINT: external address; OWNER: inside address"),
    ("port", "__be16", "ENDPOINT: external port; OWNER: inside port"),
    ("pad", "__u16", "zero"),
    ("rule_id", "__u32", "the rule whose mapping it is"),
    ("iif", "__u32", "ENDPOINT: the inside device (ifindex) of the session that made it"),
    ("last_seen", "__u64", "made, or last used by a new session (the sweep's grace counts from it)"),
)))  # fmt: skip

AUDIT_REC = _declare(Struct("audit_rec", "an audit log record: a session created or ended", (
    ("ts", "__u64", "snat_now() (CLOCK_MONOTONIC ns, tick-coarse) of the event"),
    ("inside", "__be32", "inside host address"),
    ("nat", "__be32", "SNAT address"),
    ("remote", "__be32", "remote address"),
    ("inside_port", "__be16", "inside port (ICMP query: its identifier; no ports: 0)"),
    ("nat_port", "__be16", "SNAT port (ICMP query: the SNAT identifier)"),
    ("remote_port", "__be16", "remote port (ICMP: 0)"),
    ("kind", "__u8", "AUDIT_NEW or AUDIT_END"),
    ("proto", "__u8", "IPPROTO_*"),
    ("rule_id", "__u32", "id of the rule that created the session"),
    ("why", "__u8", "AUDIT_END: AUDIT_END_*; AUDIT_NEW: 0"),
    ("state", "__u8", "enum ct_state of the session (AUDIT_END: its last)"),
    ("pad", "__u16", "zero"),
    ("pad2", "__u32", "zero"),
    ("last_seen", "__u64", "AUDIT_END: snat_now() of the session's last packet (either direction); AUDIT_NEW: ts"),
)))  # fmt: skip

WALK_STATE = _declare(Struct("walk_state", "the expiry/recount walk in progress (sweep.bpf.c)", (
    ("current", "__u32", "the walk counting now (1-65535; 0: none), stamped on the sessions made meanwhile"),
    ("last", "__u32", "the last walk's number (the next one takes last % 65535 + 1)"),
)))  # fmt: skip

LIVE_COUNT = _declare(Struct("live_count", "live sessions and refusals of a host, SNAT address or rule", (
    ("sessions", "__u32", "live sessions: +1 at creation (atomic), recounted by the expiry sweep"),
    ("refusals", "__u32", "new flows refused (port exhaustion, host limit), cumulative"),
)))  # fmt: skip


# --------------------------------------------------------------------------- header

HEADER_PATH = Path(__file__).parent / "datapath" / "bpf" / "prog" / "include" / "snat_layout.h"


def render_header() -> str:
    """The C header twin of this module (generated; never edit it by hand)."""
    out = [
        "/* GENERATED by snatgw.layout (python -m snatgw.layout): do not edit. */",
        "/* Shared layouts, constants and reason codes of the snatgw datapath. */",
        "#pragma once",
        "#include <linux/types.h>",
        "",
    ]
    for n, v in [
        ("SNAT_PORT_MIN", PORT_MIN), ("SNAT_PORT_MAX", PORT_MAX),
        ("SNAT_MAX_RULES", MAX_RULES), ("SNAT_MAX_SESSIONS", MAX_SESSIONS),
        ("SNAT_MAX_FRAGS", MAX_FRAGS), ("SNAT_MAX_IFACES", MAX_IFACES),
        ("SNAT_MAX_HOSTS", MAX_HOSTS), ("SNAT_MAX_POOL_ADDRS", MAX_POOL_ADDRS),
        ("SNAT_FRAG_HOLD_NS", f"{FRAG_HOLD * 1_000_000_000}ULL"),
        ("SNAT_MAX_FROM_NETS", MAX_FROM_NETS), ("SNAT_ADDR_TRIES", ADDR_TRIES),
        ("SNAT_MAX_REFUSED", MAX_REFUSED), ("SNAT_SEARCH_TRIES", SEARCH_TRIES),
        ("SNAT_REFUSED_SECS", REFUSED_SECS), ("SNAT_REFUSE_ICMP_PER_SEC", REFUSE_ICMP_PER_SEC),
        ("SNAT_SPILL_MEMO_NS", f"{SPILL_MEMO_MS * 1_000_000}ULL"), ("SNAT_MAX_SPILL_MEMO", MAX_SPILL_MEMO),
        ("SNAT_MAX_INSIDE_ADDRS", MAX_INSIDE_ADDRS), ("SNAT_EIM_PER_SESSION", EIM_PER_SESSION),
        ("SNAT_MAX_INSIDE_ADDRS", MAX_INSIDE_ADDRS), ("SNAT_AUDIT_RING_BYTES", AUDIT_RING_BYTES),
        ("SNAT_GW_SLOTS", GW_SLOTS),
    ]:  # fmt: skip
        out += [f"#ifndef {n}", f"#define {n} {v}", "#endif"]
    out += ["#ifndef SNAT_PORT_TRIES", f"#define SNAT_PORT_TRIES {PORT_TRIES_MAX} /* port search bound */", "#endif"]
    consts = {
        "CT_DIR_OUT": CT_DIR_OUT, "CT_DIR_IN": CT_DIR_IN,
        "RULE_F_GW": RULE_F_GW, "RULE_F_OIF": RULE_F_OIF, "RULE_F_NEW_GW": RULE_F_NEW_GW,
        "RULE_F_SPILL": RULE_F_SPILL, "PORT_STRIDE_COUNT": len(PORT_STRIDES),
        "RULE_F_EIM": RULE_F_EIM, "RULE_F_PRESERVE": RULE_F_PRESERVE, "RULE_F_EIF": RULE_F_EIF,
        "RULE_F_ADF": RULE_F_ADF, "CT_F_EIM": CT_F_EIM, "CT_F_HAIRPIN": CT_F_HAIRPIN, "CFG_F_EIM": CFG_F_EIM,
        "EIM_DIR_ENDPOINT": EIM_DIR_ENDPOINT, "EIM_DIR_OWNER": EIM_DIR_OWNER, "EIM_DIR_PERMIT": EIM_DIR_PERMIT,
        "CT_F_REPLIED": CT_F_REPLIED, "CT_F_NEW_GW": CT_F_NEW_GW, "CT_F_WALK": CT_F_WALK,
        "CFG_F_UNMATCHED_DROP": CFG_F_UNMATCHED_DROP, "CFG_F_INBOUND_ROUTED": CFG_F_INBOUND_ROUTED,
        "FROM_NET_RULE": FROM_NET_RULE, "FROM_NET_POOL": FROM_NET_POOL,
        "CFG_F_REFUSE_ICMP": CFG_F_REFUSE_ICMP, "CFG_F_AUDIT": CFG_F_AUDIT, "CFG_F_HOST_COUNT": CFG_F_HOST_COUNT,
        "CFG_F_IIF_AMBIGUOUS": CFG_F_IIF_AMBIGUOUS, "CFG_F_BACK_FROM_RPF": CFG_F_BACK_FROM_RPF,
        "AUDIT_NEW": AUDIT_NEW, "AUDIT_END": AUDIT_END, "AUDIT_END_EXPIRED": AUDIT_END_EXPIRED,
        "AUDIT_END_FLUSH": AUDIT_END_FLUSH, "AUDIT_CNT_WRITTEN": AUDIT_CNT_WRITTEN,
        "AUDIT_CNT_LOST": AUDIT_CNT_LOST, "AUDIT_CNT_N": AUDIT_CNT_N,
        "ALLOC_CNT_MEMO_HIT": ALLOC_CNT_MEMO_HIT, "ALLOC_CNT_MEMO_SET": ALLOC_CNT_MEMO_SET,
        "ALLOC_CNT_SEARCH": ALLOC_CNT_SEARCH, "ALLOC_CNT_TRIES": ALLOC_CNT_TRIES, "ALLOC_CNT_N": ALLOC_CNT_N,
        "REASON_MAX": REASON_MAX,
        "TCP_STATE_COUNT": TCP_STATE_COUNT,
        "IFACE_INSIDE": IFACE_INSIDE, "IFACE_OUTSIDE": IFACE_OUTSIDE,
        "SWEEP_EXPIRE": SWEEP_EXPIRE, "SWEEP_FLUSH": SWEEP_FLUSH, "SWEEP_RECOUNT": SWEEP_RECOUNT,
        "SWEEP_F_RULE": SWEEP_F_RULE, "SWEEP_F_INSIDE": SWEEP_F_INSIDE, "SWEEP_F_NAT": SWEEP_F_NAT,
        "SWEEP_F_REMOTE": SWEEP_F_REMOTE, "SWEEP_F_RPORT": SWEEP_F_RPORT,
        "SWEEP_F_PROTO": SWEEP_F_PROTO, "SWEEP_F_STATE": SWEEP_F_STATE,
        "SWEEP_STATES": SWEEP_STATES, "SWEEP_WHOLE": SWEEP_WHOLE, "SWEEP_BEGIN": SWEEP_BEGIN,
        "SWEEP_KEYS": SWEEP_KEYS, "SWEEP_END": SWEEP_END, "SWEEP_ABORT": SWEEP_ABORT, "SWEEP_CHUNK": SWEEP_CHUNK,
        "FRAG_PASS_REASON_MASK": f"0x{sum(1 << int(r) for r in FRAG_PASS_REASONS):x}ULL",
        "RECIRC_KEY": RECIRC_KEY, "FRAG_HELD_IFINDEX": f"0x{FRAG_HELD_IFINDEX:x}",
    }  # fmt: skip
    out.append("")
    out += [f"#define {k} {v}" for k, v in consts.items()]
    for enum_cls, prefix in [
        (Verdict, "VERDICT_"), (Reason, "REASON_"), (Algo, "ALGO_"), (CtState, "CT_"),
        (TcpEvent, "TCP_EV_"), (TcpTable, "TCP_TBL_"),
    ]:  # fmt: skip
        out.append("")
        out.append(f"enum {prefix.lower().rstrip('_')} {{")
        out += [f"\t{prefix}{m.name} = {int(m)}," for m in enum_cls]
        out.append("};")
    out.append("")
    out.append("/* tcp_fsm[table][event][state] -> next state (reference §3.3) */")
    out.append(f"static const __u8 tcp_fsm[3][4][{TCP_STATE_COUNT}] = {{")
    for t in TCP_FSM:
        out.append("\t{")
        for row in t:
            out.append("\t\t{" + ", ".join(str(x) for x in row) + "},")
        out.append("\t},")
    out.append("};")
    out.append("")
    out.append("/* strides of the port search (layout.PORT_STRIDES) */")
    out.append(f"static const __u32 port_strides[{len(PORT_STRIDES)}] = {{")
    for i in range(0, len(PORT_STRIDES), 10):
        out.append("\t" + ", ".join(str(x) for x in PORT_STRIDES[i : i + 10]) + ",")
    out.append("};")
    for s in STRUCTS.values():
        out.append("")
        out.append(f"/* {s.doc} */")
        out.append(f"struct {s.name} {{")
        for name, ctype, comment in s.fields:
            out.append(f"\t{ctype} {name}; /* {comment} */")
        out.append("};")
        out.append(f'_Static_assert(sizeof(struct {s.name}) == {s.size}, "{s.name} size");')
    out.append("")
    return "\n".join(out)


def write_header(path: Path = HEADER_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_header())
    return path


if __name__ == "__main__":
    print(write_header())
