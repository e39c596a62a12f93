"""The scenario corpus: REF topology inputs and SCENARIOS, each a list of steps
(side, ingress, packet, expected verdict, expected reason) run in order on one fresh Engine
(sessions persist within a scenario; step i runs at now = i seconds unless it says its `at`).  The model tests check
every expectation; the BPF differential tests run the same steps through the kernel and
compare verdict, reason and output bytes with the model's."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

from scapy.layers.inet import ICMP, IP, UDP
from scapy.packet import Raw, raw

from snatgw.config.schema import Settings
from snatgw.layout import GW_MARK_BASE, PORT_TRIES_BPF, RECIRC_DEV, Reason, Verdict
from snatgw.model.router import REF_ADDRESSES as _ADDRS
from snatgw.model.router import REF_ROUTES as _ROUTES
from snatgw.rules import Rule, RuleSet

from .pkts import A, A3, B, C, D, ISP1, R1, R2, ROUTER, STRANGER, echo, fragments, icmp_error, other_proto
from .pkts import pseudo_proto, snat_of, tcp, udp, with_options, zeroing_word

REF_CONFIG = """\
virtual_server fwmark 1 {
  snat_rule { from 198.18.40.0/24  gw 198.19.3.1  oif eth2  snat_ip 198.19.3.71-198.19.3.73  algo random }
  snat_rule { from 198.18.40.0/24  gw 198.19.2.1  oif eth1  snat_ip 198.19.2.71-198.19.2.73  algo sdh }
  snat_rule { from 198.18.0.0/16   new_gw 198.19.2.1        snat_ip 198.19.2.71-198.19.2.73  algo sh }
}
"""
#: REF_CONFIG with the REF devices in its settings block, and the failover variant of it
REF_CONFIG_FULL = "snatgw {\n    inside lan40 lan50\n    outside eth1 eth2\n}\n" + REF_CONFIG
FAILOVER_CONFIG_FULL = REF_CONFIG_FULL.replace(
    "gw 198.19.2.1  oif eth1  snat_ip 198.19.2.71-198.19.2.73  algo sdh",
    "gw 198.19.2.1  oif eth1  new_gw 198.19.3.1  snat_ip 198.19.3.71-198.19.3.73  algo sdh",
)
#: the same rules as dicts (Rule.from_dict), so no config parser is needed
REF_RULES: list[dict] = [
    {"from": "198.18.40.0/24", "gw": "198.19.3.1", "oif": "eth2", "snat_ip": "198.19.3.71-198.19.3.73", "algo": "random"},
    {"from": "198.18.40.0/24", "gw": "198.19.2.1", "oif": "eth1", "snat_ip": "198.19.2.71-198.19.2.73", "algo": "sdh"},
    {"from": "198.18.0.0/16", "new_gw": "198.19.2.1", "snat_ip": "198.19.2.71-198.19.2.73", "algo": "sh"},
]  # fmt: skip
#: the failover variant: the second rule replaced (same identity) with new_gw to ISP2
FAILOVER_RULES: list[dict] = [
    REF_RULES[0],
    dict(REF_RULES[1], new_gw="198.19.3.1", snat_ip="198.19.3.71-198.19.3.73"),
    REF_RULES[2],
]
REF_ROUTES: list[tuple[str, str, str | None]] = list(_ROUTES)
REF_ADDRESSES: dict[str, list[str]] = {k: list(v) for k, v in _ADDRS.items()}
REF_INSIDE = ("lan40", "lan50")
REF_OUTSIDE = ("eth1", "eth2")
#: the differential tests bound the port search like the BPF datapath
REF_SETTINGS = Settings(inside=REF_INSIDE, outside=REF_OUTSIDE, port_tries=PORT_TRIES_BPF)


def ruleset(dicts: list[dict]) -> RuleSet:
    return RuleSet([Rule.from_dict(d, where=f"corpus:{i + 1}") for i, d in enumerate(dicts)])


RULE_RANDOM, RULE_SDH, RULE_SH = (Rule.from_dict(d) for d in REF_RULES)

V, R = Verdict, Reason
RED, PASS, DROP, PT = V.REDIRECT, V.PASS, V.DROP, V.PASS_TRANSLATED


class Step(NamedTuple):
    side: str  # "inside" | "outside" | "egress"
    ingress: str  # device it arrives on (egress: leaves by)
    packet: bytes  # IPv4 bytes
    verdict: Verdict
    reason: Reason
    at: float | None = None  # the clock in s (None: the step's index, as most steps run)
    #: skb->mark the packet leaves with (a new_gw egress's, handed to the kernel: GW_MARK_BASE + n)
    mark: int = 0
    #: False: its frame is sent to another host's MAC, not the device's (step 1a; BPF: OTHER_MAC)
    for_us: bool = True

    def when(self, i: int) -> float:
        return float(i) if self.at is None else self.at


@dataclass(frozen=True)
class Scenario:
    name: str
    doc: str
    steps: list[Step]
    settings: dict = field(default_factory=dict)  # overrides of REF_SETTINGS fields
    rules: list[dict] | None = None  # rule dicts replacing REF_RULES
    #: (port searches, candidates tried) after the last step (snat_alloc_cnt's ALLOC_CNT_SEARCH,
    #: ALLOC_CNT_TRIES; docs/datapath.md step 13), where the scenario knows them; None: not said
    alloc: tuple[int, int] | None = None
    #: a route change between steps: {step index: the routes added to REF_ROUTES from that step
    #: on}; the model's router is replaced, the BPF tests change the REF namespace alike
    #: (run_scenario in tests/bpf/test_differential.py) and restore it after the scenario
    reroute: dict[int, list[tuple[str, str, str | None]]] = field(default_factory=dict)

    def make_settings(self) -> Settings:
        return replace(REF_SETTINGS, **self.settings)

    def make_rules(self) -> RuleSet:
        return ruleset(self.rules if self.rules is not None else REF_RULES)

    def make_engine(self, router=None):
        from snatgw.model import Engine, StaticRouter

        return Engine(self.make_rules(), self.make_settings(), router or StaticRouter(REF_ROUTES, REF_ADDRESSES))

    def rerouted(self, engine, i: int) -> list[tuple[str, str, str | None]] | None:
        """Before step ``i``: the routes added to REF_ROUTES from now on, given to ``engine``'s
        router (a new StaticRouter); None when the routes do not change here."""
        from snatgw.model import StaticRouter

        extra = self.reroute.get(i)
        if extra is not None:
            engine.router = StaticRouter(REF_ROUTES + list(extra), REF_ADDRESSES)
        return extra


def inside(pkt: bytes, v: Verdict, r: Reason, dev: str = "lan40", at: float | None = None, mark: int = 0) -> Step:
    return Step("inside", dev, pkt, v, r, at, mark)


def outside(pkt: bytes, v: Verdict, r: Reason, dev: str = "eth1", at: float | None = None) -> Step:
    return Step("outside", dev, pkt, v, r, at)


#: the destination MAC of a step that is not for us (Step.for_us False): no device has it
OTHER_MAC = bytes.fromhex("020000c0ffee")


def egress(pkt: bytes, v: Verdict, r: Reason, dev: str = "eth1") -> Step:
    return Step("egress", dev, pkt, v, r)


def recirc(pkt: bytes, v: Verdict, r: Reason) -> Step:
    """A held fragment coming back from the recirculation device (program snat_recirc)."""
    return Step("recirc", RECIRC_DEV, pkt, v, r)


def _scenarios() -> list[Scenario]:
    S: list[Scenario] = []

    def add(name: str, doc: str, steps: list[Step], **kw) -> None:
        S.append(Scenario(name, doc, steps, **kw))

    na, np_ = snat_of(RULE_SDH, A, R1, 40000)  # 198.19.2.72:21541
    add("tcp_handshake_data_fin_via_isp1", "A TCP connection A->R1 matches the sdh rule on eth1: "
        "handshake, data both ways, FIN close; every packet translated.", [
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        outside(tcp(R1, na, 80, np_, "SA"), RED, R.XLATE_IN),
        inside(tcp(A, R1, 40000, 80, "A"), RED, R.XLATE_OUT),
        inside(tcp(A, R1, 40000, 80, "PA", payload=b"GET / HTTP/1.0\r\n\r\n"), RED, R.XLATE_OUT),
        outside(tcp(R1, na, 80, np_, "PA", payload=b"HTTP/1.0 200 OK\r\n"), RED, R.XLATE_IN),
        inside(tcp(A, R1, 40000, 80, "FA"), RED, R.XLATE_OUT),
        outside(tcp(R1, na, 80, np_, "FA"), RED, R.XLATE_IN),
        inside(tcp(A, R1, 40000, 80, "A"), RED, R.XLATE_OUT),
    ])  # fmt: skip
    add("tcp_rst_from_remote_then_new_syn", "A remote RST is translated back; the session stays "
        "until expiry, so a new SYN on the same tuple is an established packet.", [
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        outside(tcp(R1, na, 80, np_, "RA"), RED, R.XLATE_IN),
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_OUT),
    ])  # fmt: skip
    add("tcp_rst_from_inside", "An inside RST after the handshake is translated out.", [
        inside(tcp(A, R1, 40001, 80, "S"), RED, R.XLATE_NEW),
        outside(tcp(R1, snat_of(RULE_SDH, A, R1, 40001)[0], 80, snat_of(RULE_SDH, A, R1, 40001)[1], "SA"),
                RED, R.XLATE_IN),
        inside(tcp(A, R1, 40001, 80, "R"), RED, R.XLATE_OUT),
    ])  # fmt: skip
    ra, rp = snat_of(RULE_RANDOM, A, R2, 40000)
    add("tcp_via_isp2_random", "A->R2 routes via eth2/198.19.3.1 and matches the random rule; "
        "the reply arrives on eth2.", [
        inside(tcp(A, R2, 40000, 443, "S"), RED, R.XLATE_NEW),
        outside(tcp(R2, ra, 443, rp, "SA"), RED, R.XLATE_IN, dev="eth2"),
        inside(tcp(A, R2, 40000, 443, "A"), RED, R.XLATE_OUT),
    ])  # fmt: skip
    ca, cp = snat_of(RULE_SH, C, R2, 33000)
    add("new_gw_overrides_route", "C (lan50) to R2 matches only the /16 sh rule, whose new_gw sends "
        "it to 198.19.2.1 on eth1 although the route says eth2.", [
        inside(tcp(C, R2, 33000, 80, "S"), RED, R.XLATE_NEW, dev="lan50"),
        outside(tcp(R2, ca, 80, cp, "SA"), RED, R.XLATE_IN),
        inside(tcp(C, R2, 33000, 80, "A"), RED, R.XLATE_OUT, dev="lan50"),
    ])  # fmt: skip
    ua, up = snat_of(RULE_SDH, A, R1, 5353)
    add("udp_flow_both_ways", "A UDP datagram makes a session; the reply and later datagrams are translated.", [
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
        outside(udp(R1, ua, 53, up), RED, R.XLATE_IN),
        inside(udp(A, R1, 5353, 53, payload=b"second"), RED, R.XLATE_OUT),
    ])  # fmt: skip
    add("udp_zero_checksum_stays_zero", "A zero UDP checksum is left zero both ways.", [
        inside(udp(A, R1, 5353, 53, zero_csum=True), RED, R.XLATE_NEW),
        outside(udp(R1, ua, 53, up, zero_csum=True), RED, R.XLATE_IN),
    ])  # fmt: skip
    ea, ei = snat_of(RULE_SDH, A, R1, 0x1234)
    add("echo_request_and_reply", "Ping A->R1: the identifier is translated like a port and back.", [
        inside(echo(A, R1, 0x1234), RED, R.XLATE_NEW),
        outside(echo(R1, ea, ei, reply=True), RED, R.XLATE_IN),
        inside(echo(A, R1, 0x1234, seq=2), RED, R.XLATE_OUT),
    ])  # fmt: skip
    e1 = snat_of(RULE_SDH, A, R1, 7)
    e2 = snat_of(RULE_SDH, B, R1, 7, nth=1, proto=1)
    assert e1[0] == e2[0]  # A and B share an SNAT address toward R1 (sdh)
    add("echo_same_id_two_hosts", "A and B ping R1 with the same identifier through one SNAT "
        "address: they get distinct SNAT identifiers and each reply goes back.", [
        inside(echo(A, R1, 7), RED, R.XLATE_NEW),
        inside(echo(B, R1, 7), RED, R.XLATE_NEW),
        outside(echo(R1, e1[0], e1[1], reply=True), RED, R.XLATE_IN),
        outside(echo(R1, e2[0], e2[1], reply=True), RED, R.XLATE_IN),
    ])  # fmt: skip
    t2 = snat_of(RULE_SDH, B, R1, 40000, nth=1, dport=80, proto=6)
    add("same_sport_two_hosts", "A and B use the same source port toward R1:80: the second takes "
        "the next candidate port.", [
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        inside(tcp(B, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        outside(tcp(R1, t2[0], 80, t2[1], "SA"), RED, R.XLATE_IN),
        outside(tcp(R1, na, 80, np_, "SA"), RED, R.XLATE_IN),
    ])  # fmt: skip
    add("endpoint_dependent_port_reuse", "One inside port to two remote ports gets the same SNAT "
        "port twice (the external tuples differ).", [
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        inside(tcp(A, R1, 40000, 81, "S"), RED, R.XLATE_NEW),
        outside(tcp(R1, na, 81, np_, "SA"), RED, R.XLATE_IN),
        outside(tcp(R1, na, 80, np_, "SA"), RED, R.XLATE_IN),
    ])  # fmt: skip
    add("tcp_non_syn_without_session_dropped", "TCP that is not a pure SYN, with no session, "
        "matching a rule, is dropped: a private source never leaks.", [
        inside(tcp(A, R1, 40010, 80, "A"), DROP, R.DROP_NO_SESSION),
        inside(tcp(A, R1, 40010, 80, "SA"), DROP, R.DROP_NO_SESSION),
        inside(tcp(A, R1, 40010, 80, "F"), DROP, R.DROP_NO_SESSION),
        inside(tcp(A, R1, 40010, 80, "SF"), DROP, R.DROP_NO_SESSION),
        inside(tcp(A, R1, 40010, 80, "R"), DROP, R.DROP_NO_SESSION),
        inside(tcp(A, R1, 40010, 80, ""), DROP, R.DROP_NO_SESSION),
        inside(tcp(A, R1, 40010, 80, "SE"), RED, R.XLATE_NEW),  # ECE does not matter
    ])  # fmt: skip
    add("no_rule_passes", "A source no rule covers is left to the kernel unchanged.", [
        inside(udp(STRANGER, R1, 1000, 53), PASS, R.PASS_NO_RULE),
        inside(tcp(STRANGER, R1, 1000, 80, "A"), PASS, R.PASS_NO_RULE),
        outside(udp(R1, STRANGER, 53, 1000), DROP, R.DROP_INBOUND),  # no way in (invariant 2)
    ])  # fmt: skip
    add("unmatched_drop_setting", "`unmatched drop`: no-rule flows of any protocol from inside are "
        "dropped; matching flows still translate.", [
        inside(udp(STRANGER, R1, 1000, 53), DROP, R.DROP_UNMATCHED),
        inside(other_proto(STRANGER, R1), DROP, R.DROP_UNMATCHED),
        inside(raw(IP(src=STRANGER, dst=R1) / ICMP(type=9)), DROP, R.DROP_UNMATCHED),
        inside(other_proto(A, R1), RED, R.XLATE_NEW),
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
        inside(udp(A, C, 5353, 53), PASS, R.PASS_INTERNAL),  # internal is not "unmatched"
        inside(fragments(STRANGER, R1, 1, 2, ident=0x5757)[0], DROP, R.DROP_UNMATCHED),
        inside(fragments(STRANGER, R1, 1, 2, ident=0x5757)[1], RED, R.FRAG_HELD),  # dropped first: held, never sent
    ], settings={"unmatched_drop": True})  # fmt: skip
    add("local_destination_passes", "Traffic to the gateway's own addresses is not translated.", [
        inside(echo(A, "198.18.40.1", 1), PASS, R.PASS_LOCAL),
        inside(tcp(A, "198.19.2.71", 40000, 22, "S"), PASS, R.PASS_LOCAL),
        inside(udp(C, "198.19.3.2", 40000, 53), PASS, R.PASS_LOCAL, dev="lan50"),
    ])  # fmt: skip
    ga = snat_of(RULE_SDH, A, R1, 0)[0]  # sdh: the address does not depend on the port
    add("other_protocols_address_only", "GRE, ESP, SCTP... matching a rule are translated address "
        "only (session ports 0) and their replies back; one inside host per (protocol, remote, "
        "SNAT address): another host takes the pool's next address, and with none left it is "
        "dropped.  Later fragments follow their first; ICMP errors about them are translated "
        "(the quoted address only).", [
        inside(other_proto(A, R1), RED, R.XLATE_NEW),
        outside(other_proto(R1, ga), RED, R.XLATE_IN),
        inside(other_proto(A, R1), RED, R.XLATE_OUT),
        outside(icmp_error(ROUTER, ga, other_proto(ga, R1, ttl=1), 11, 0), RED, R.XLATE_ICMP_ERR_IN),
        inside(icmp_error(A, R1, other_proto(R1, A, ttl=63), 3, 2), RED, R.XLATE_ICMP_ERR_OUT),
        egress(icmp_error("198.19.2.2", R1, other_proto(R1, A, ttl=63), 3, 4), PASS, R.XLATE_ICMP_ERR_OUT),
        inside(other_proto(A, R1, proto=50), RED, R.XLATE_NEW),
        inside(pseudo_proto(A, R1, 136), RED, R.XLATE_NEW),  # UDP-Lite: its checksum adjusted
        outside(pseudo_proto(R1, ga, 136), RED, R.XLATE_IN),
        inside(pseudo_proto(A, R1, 33, payload=b"dccp"), RED, R.XLATE_NEW),
        inside(other_proto(A, R1, proto=132), RED, R.XLATE_NEW),
        outside(other_proto(R1, ga, proto=51), PASS, R.PASS_PROTO),  # AH: no session
        outside(other_proto(R2, ga), PASS, R.PASS_PROTO),  # another remote: no session
        inside(other_proto(B, R1), RED, R.XLATE_NEW),  # B's own address (sdh) or the next one
        inside(other_proto(A3, R1), RED, R.XLATE_NEW),  # the pool's 3 addresses now carry GRE to R1
        inside(other_proto(C, R1), DROP, R.DROP_PORT_EXHAUSTED, dev="lan50"),  # the sh rule: same pool
        inside(other_proto(D, R2), RED, R.XLATE_NEW, dev="lan50"),  # another remote: free again
        inside(raw(IP(src=A, dst=R2, id=0x7a7a, flags="MF", proto=47) / Raw(b"g" * 24)), RED, R.XLATE_NEW),
        inside(raw(IP(src=A, dst=R2, id=0x7a7a, frag=3, proto=47) / Raw(b"h" * 8)), RED, R.XLATE_FRAG),
        inside(raw(IP(src=A, dst=R2, id=0x7b7b, frag=3, proto=47) / Raw(b"h" * 8)), RED, R.FRAG_HELD),
    # one candidate per address: five protocols of A 1 each; B and A3 5 together (the pool
    # filling); C 3 (every address taken: refused); D 1; A's fragmented GRE to R2 1
    ], alloc=(10, 15))  # fmt: skip
    ta, ti = snat_of(RULE_SDH, A, R1, 0x77)
    add("icmp_queries_and_other_types", "ICMP timestamp, information and address mask requests are "
        "translated like echo (identifier) and their replies back; any other ICMP from inside that "
        "matches a rule has no session to belong to: dropped (DROP_NO_SESSION), never passed.", [
        inside(raw(IP(src=A, dst=R1) / ICMP(type=13, id=0x77)), RED, R.XLATE_NEW),
        outside(raw(IP(src=R1, dst=ta) / ICMP(type=14, id=ti)), RED, R.XLATE_IN),
        inside(raw(IP(src=A, dst=R1) / ICMP(type=15, id=0x78)), RED, R.XLATE_NEW),
        inside(raw(IP(src=A, dst=R1) / ICMP(type=17, id=0x79)), RED, R.XLATE_NEW),
        outside(raw(IP(src=R1, dst=ta) / ICMP(type=18, id=ti + 1)), PASS, R.PASS_NO_SESSION_IN),
        inside(echo(A, R1, 9, reply=True), DROP, R.DROP_NO_SESSION),
        inside(raw(IP(src=A, dst=R1) / ICMP(type=14, id=0x77)), DROP, R.DROP_NO_SESSION),
        inside(raw(IP(src=A, dst=R1) / ICMP(type=9)), DROP, R.DROP_NO_SESSION),  # router advert
        inside(raw(IP(src=A, dst=R1) / ICMP(type=5, code=1) / Raw(b"x" * 28)), DROP, R.DROP_NO_SESSION),
        inside(raw(IP(src=A, dst=R1) / ICMP(type=42)), DROP, R.DROP_NO_SESSION),
        inside(raw(IP(src=A, dst="198.18.40.1") / ICMP(type=13)), PASS, R.PASS_LOCAL),  # to us
        inside(raw(IP(src=A, dst=C) / ICMP(type=0)), PASS, R.PASS_INTERNAL),
        inside(raw(IP(src=A, dst="224.0.0.22", ttl=1) / ICMP(type=9)), PASS, R.PASS_LOCAL),
        inside(other_proto(A, "224.0.0.18", proto=112, ttl=255), PASS, R.PASS_LOCAL),  # VRRP
        inside(udp(A, "224.0.0.251", 5353, 5353, ttl=255), PASS, R.PASS_LOCAL),  # mDNS
        inside(udp(A, "255.255.255.255", 68, 67), PASS, R.PASS_LOCAL),
        inside(raw(IP(src=STRANGER, dst=R1) / ICMP(type=9)), PASS, R.PASS_NO_RULE),
        outside(echo(R1, na, 9), PASS, R.PASS_ICMP_OTHER),
        outside(raw(IP(src=R1, dst=na) / ICMP(type=14)), PASS, R.PASS_NO_SESSION_IN),
    ])  # fmt: skip
    ea0, ei0 = snat_of(RULE_SDH, A, R1, 0x4242)
    add("ttl_expiring_packets_pass", "TTL <= 1 is left to the kernel (time exceeded), new, "
        "established and reply alike; no session is made by a TTL-1 SYN.  A reply is translated "
        "first (TTL untouched, XLATE_IN_TTL): the kernel's time exceeded then quotes the inside "
        "address, which the egress program turns back into the SNAT address and port.", [
        inside(tcp(A, R1, 40000, 80, "S", ttl=1), PASS, R.PASS_TTL),
        outside(tcp(R1, na, 80, np_, "SA"), PASS, R.PASS_NO_SESSION_IN),
        inside(tcp(A, R1, 40000, 80, "S", ttl=2), RED, R.XLATE_NEW),
        inside(tcp(A, R1, 40000, 80, "A", ttl=1), PASS, R.PASS_TTL),
        outside(tcp(R1, na, 80, np_, "SA", ttl=1), PT, R.XLATE_IN_TTL),
        outside(tcp(R1, na, 80, np_, "A", ttl=0), PT, R.XLATE_IN_TTL),
        inside(tcp(A, R1, 40000, 80, "S", ttl=0), PASS, R.PASS_TTL),
        outside(tcp(R1, na, 80, np_, "SA", ttl=2), RED, R.XLATE_IN),
        inside(echo(A, R1, 0x4242), RED, R.XLATE_NEW),
        outside(echo(R1, ea0, ei0, reply=True, ttl=1), PT, R.XLATE_IN_TTL),
        egress(icmp_error("198.19.2.2", R1, tcp(R1, A, 80, 40000, "SA", ttl=1), 11, 0), PASS,
               R.XLATE_ICMP_ERR_OUT),
    ])  # fmt: skip
    big = b"B" * 1572  # 20 + 8 + 1572 = 1600 bytes
    ba, bp = snat_of(RULE_SDH, A, R1, 6000)
    add("over_mtu_df_and_not_df", "Over the 1500 MTU with DF: outbound, the kernel answers "
        "frag-needed to the inside host (untranslated); a reply is translated first and handed to "
        "the kernel (XLATE_IN_FRAG_NEEDED), so its frag-needed reaches the remote about the SNAT "
        "address (egress).  Without DF: translated and handed to the kernel to fragment; TTL is "
        "left to the kernel, which forwards it.", [
        inside(udp(A, R1, 6000, 7000, payload=big, flags="DF"), PASS, R.PASS_FRAG_NEEDED),
        # (its egress, eth1 via 198.19.2.1, is the new_gw rule's too: marked, routed there)
        inside(udp(A, R1, 6000, 7000, payload=big), PT, R.XLATE_NEW, mark=GW_MARK_BASE),
        inside(udp(A, R1, 6000, 7000, payload=big, flags="DF"), PASS, R.PASS_FRAG_NEEDED),
        outside(udp(R1, ba, 7000, bp, payload=big, flags="DF"), PT, R.XLATE_IN_FRAG_NEEDED),
        outside(udp(R1, ba, 7000, bp, payload=big), PT, R.XLATE_IN),
        outside(udp(R1, ba, 7000, bp, payload=big, flags="DF", ttl=1), PT, R.XLATE_IN_TTL),
        inside(udp(A, R1, 6000, 7000, payload=b"x" * 1472, flags="DF"), RED, R.XLATE_OUT),  # exactly 1500
        # from the uplink's address, as the kernel picks it (the route to R1); the gateway's
        # inside-facing address never leaves an uplink (egress leak guard)
        egress(icmp_error("198.19.2.2", R1, udp(R1, A, 7000, 6000, payload=big, flags="DF", ttl=63), 3, 4),
               PASS, R.XLATE_ICMP_ERR_OUT),
    ])  # fmt: skip
    add("over_mtu_df_new_gw", "Over a new_gw route's MTU with DF: the kernel's own route is not "
        "new_gw's (it left by the default route, or met the leak guard, and the host never learnt "
        "the MTU: lab, eth2 at 1400), so the datapath answers a fragmentation needed with that "
        "route's MTU itself, from the gateway's address toward the host, back out of the device "
        "it came by (as refuse_icmp's host unreachable), for a new flow and a session alike.", [
        inside(udp(C, R1, 6000, 7000, payload=big, flags="DF"), RED, R.PASS_FRAG_NEEDED, dev="lan50"),
        inside(udp(C, R1, 6000, 7000, payload=big), PT, R.XLATE_NEW, dev="lan50", mark=GW_MARK_BASE),
        inside(udp(C, R1, 6000, 7000, payload=big, flags="DF", options=[b"\x01\x01\x01\x00"]), RED,
               R.PASS_FRAG_NEEDED, dev="lan50"),  # fmt: skip
        inside(udp(C, R1, 6000, 7000, payload=b"x" * 1472, flags="DF"), RED, R.XLATE_OUT, dev="lan50"),
    ])  # fmt: skip
    jumbo = bytes(range(256)) * 32  # a host on a jumbo LAN fragments at 3000 bytes
    j_udp = raw(UDP(sport=6100, dport=7000) / jumbo[:2976 + 2000 - 8])
    j1 = raw(IP(src=A, dst=R1, id=0x4343, flags="MF", proto=17) / Raw(j_udp[:2976]))
    j2 = raw(IP(src=A, dst=R1, id=0x4343, frag=372, proto=17) / Raw(j_udp[2976:]))
    ja, jp = snat_of(RULE_SDH, A, R1, 6100)
    r_udp = raw(UDP(sport=7000, dport=jp) / jumbo[:1600 + 1480 - 8])
    r1 = raw(IP(src=R1, dst=ja, id=0x4444, flags="MF", proto=17) / Raw(r_udp[:1600]))
    r2 = raw(IP(src=R1, dst=ja, id=0x4444, frag=200, proto=17) / Raw(r_udp[1600:]))
    add("later_fragment_over_the_egress_mtu", "Fragments longer than the egress device's MTU "
        "(a host's 3000-byte fragments toward a 1500-byte uplink, a remote's toward the inside): "
        "the first is translated and handed to the kernel to fragment (PASS_TRANSLATED) as any "
        "packet; a later one alike, its TTL left to the kernel (redirected, the device dropped "
        "it: lab, host fragments of 1500 bytes toward eth1 at 1400 never arrived).", [
        inside(j1, PT, R.XLATE_NEW, mark=GW_MARK_BASE),  # (eth1 via 198.19.2.1: a new_gw egress)
        inside(j2, PT, R.XLATE_FRAG, mark=GW_MARK_BASE),
        outside(r1, PT, R.XLATE_IN),
        outside(r2, RED, R.XLATE_FRAG),  # 1500 bytes: fits lan40
        outside(raw(IP(src=R1, dst=ja, id=0x4444, frag=385, proto=17) / Raw(jumbo[:1600])), PT, R.XLATE_FRAG),
    ])  # fmt: skip
    c_udp = raw(UDP(sport=6200, dport=7000) / jumbo[:2976 + 2000 - 8])
    c1 = raw(IP(src=C, dst=R1, id=0x4545, flags="MF", proto=17) / Raw(c_udp[:2976]))
    c2 = raw(IP(src=C, dst=R1, id=0x4545, frag=372, proto=17) / Raw(c_udp[2976:]))
    add("new_gw_to_kernel_marked", "A new_gw session's packet handed to the kernel translated (over "
        "the egress MTU without DF: the kernel fragments it; a first fragment and a later one alike) "
        "carries its egress's mark (GW_MARK_BASE + the egress's number), for which the backend "
        "installs an ip rule and table routing it by that egress: the kernel's own table may name "
        "another uplink, where it would leave with this one's SNAT address (lab: "
        "test_lab_new_gw_frag).  Redirected packets are not marked; nor is a packet whose egress "
        "is no new_gw rule's (A to R2 by eth2).", [
        inside(c1, PT, R.XLATE_NEW, dev="lan50", mark=GW_MARK_BASE),
        inside(c2, PT, R.XLATE_FRAG, dev="lan50", mark=GW_MARK_BASE),
        inside(udp(C, R1, 6200, 7000, payload=b"x" * 100), RED, R.XLATE_OUT, dev="lan50"),
        inside(udp(A, R2, 6300, 7000, payload=b"B" * 1572), PT, R.XLATE_NEW),
        inside(udp(A, R2, 6300, 7000, payload=b"x" * 100), RED, R.XLATE_OUT),
    ])  # fmt: skip
    add("new_gw_to_kernel_marked_failover", "The failover rules: two new_gw egresses numbered in "
        "rule order (eth2 via 198.19.3.1 is 0, eth1 via 198.19.2.1 is 1); A's session takes "
        "rule 2's new_gw to eth2 and its packet handed to the kernel the mark of that egress.", [
        inside(udp(A, R1, 6400, 7000, payload=b"B" * 1572), PT, R.XLATE_NEW, mark=GW_MARK_BASE),
        inside(c1, PT, R.XLATE_NEW, dev="lan50", mark=GW_MARK_BASE + 1),
        inside(c2, PT, R.XLATE_FRAG, dev="lan50", mark=GW_MARK_BASE + 1),
    ], rules=FAILOVER_RULES)  # fmt: skip
    syn = tcp(A, R1, 40000, 80, "S")
    bad_ihl = bytes([0x44]) + syn[1:]
    short_tot = syn[:2] + (19).to_bytes(2, "big") + syn[4:]
    long_tot = syn[:2] + (41).to_bytes(2, "big") + syn[4:]
    doff4 = syn[:32] + bytes([0x40]) + syn[33:]
    add("malformed_headers_dropped", "Truncated or inconsistent headers are dropped; a non-IPv4 "
        "version passes.", [
        inside(syn[:30], DROP, R.DROP_MALFORMED),
        inside(bad_ihl, DROP, R.DROP_MALFORMED),
        inside(short_tot, DROP, R.DROP_MALFORMED),
        inside(long_tot, DROP, R.DROP_MALFORMED),
        inside(doff4, DROP, R.DROP_MALFORMED),
        inside(udp(A, R1, 1, 2)[:26], DROP, R.DROP_MALFORMED),
        inside(echo(A, R1, 1)[:27], DROP, R.DROP_MALFORMED),
        inside(syn[:19], DROP, R.DROP_MALFORMED),
        inside(bytes([0x60]) + syn[1:], PASS, R.PASS_NOT_IPV4),
        outside(syn[:30], DROP, R.DROP_MALFORMED),
        inside(syn + b"\0" * 6, RED, R.XLATE_NEW),  # link padding after total length is cut
    ])  # fmt: skip
    add("link_padding_is_cut", "Bytes after the IP total length (link padding: the sender's, or "
        "its NIC driver's stale memory) never leave by a redirect, either way, as the kernel "
        "cuts them before forwarding.", [
        inside(tcp(A, R1, 40000, 80, "S") + b"\xaa" * 6, RED, R.XLATE_NEW),
        outside(tcp(R1, na, 80, np_, "SA") + b"\xbb" * 10, RED, R.XLATE_IN),
        inside(tcp(A, R1, 40000, 80, "A") + b"\xcc" * 6, RED, R.XLATE_OUT),
    ])  # fmt: skip
    add("reply_without_session_not_let_in", "Packets to a SNAT address with no session pass to "
        "the kernel (nothing inside is reached).", [
        outside(tcp(R1, na, 80, np_, "SA"), PASS, R.PASS_NO_SESSION_IN),
        outside(udp(R1, na, 53, np_), PASS, R.PASS_NO_SESSION_IN),
        outside(echo(R1, na, np_, reply=True), PASS, R.PASS_NO_SESSION_IN),
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        outside(tcp(R1, na, 8080, np_, "SA"), PASS, R.PASS_NO_SESSION_IN),  # other remote port
        outside(tcp(ROUTER, na, 80, np_, "SA"), PASS, R.PASS_NO_SESSION_IN),  # other remote
    ])  # fmt: skip
    f1, f2 = fragments(A, R1, 5353, 53)
    fa, fp = snat_of(RULE_SDH, A, R1, 5353)
    r1, r2 = fragments(R1, fa, 53, fp, ident=0x5151)
    add("fragments_both_ways", "A first fragment is translated and remembered; its later fragment "
        "gets the same address rewrite, outbound and for the reply.  A later fragment that comes "
        "first is held (round the recirculation device) and translated when it comes back after "
        "its first fragment.", [
        inside(f2, RED, R.FRAG_HELD),
        inside(f1, RED, R.XLATE_NEW),
        recirc(f2, RED, R.XLATE_FRAG),
        inside(f2, RED, R.XLATE_FRAG),
        outside(r2, RED, R.FRAG_HELD),
        outside(r1, RED, R.XLATE_IN),
        recirc(r2, RED, R.XLATE_FRAG),
        outside(r2, RED, R.XLATE_FRAG),
        inside(fragments(A, R1, 5353, 53, ident=0x4343)[1], RED, R.FRAG_HELD),
    ])  # fmt: skip
    l1, l2 = fragments(A, "198.18.40.1", 5353, 53, ident=0x5252)
    o1, o2 = fragments(R1, "198.19.2.2", 53, 5353, ident=0x5353)
    add("fragments_to_the_gateway_pass", "A datagram to the gateway's own address: its first "
        "fragment passes (PASS_LOCAL, inside; PASS_NO_SESSION_IN, outside) and leaves a pass "
        "marker, so the later fragment passes untouched too; one that came before the first is held and passes when it comes back.", [
        inside(l2, RED, R.FRAG_HELD),
        inside(l1, PASS, R.PASS_LOCAL),
        recirc(l2, PASS, R.PASS_FRAG_UNTRANSLATED),
        inside(l2, PASS, R.PASS_FRAG_UNTRANSLATED),
        outside(o1, PASS, R.PASS_NO_SESSION_IN),
        outside(o2, PASS, R.PASS_FRAG_UNTRANSLATED),
    ])  # fmt: skip
    n1, n2 = fragments(STRANGER, R1, 5353, 53, ident=0x5454)
    t1, t2 = fragments(A, R1, 5353, 53, ident=0x5555)
    t1 = t1[:8] + b"\x01" + t1[9:]  # TTL 1 (checksum stale: never checked)
    p1, p2 = fragments(A, R1, 5353, 53, ident=0x5656)
    p1 = raw(IP(src=A, dst=R1, id=0x5656, flags="MF+DF", proto=17) / (p1[20:] + bytes(1560)))  # 1604 B
    k1, k2 = fragments(A, R1, 0x99, 0, proto="icmp", ident=0x5858)
    add("fragments_of_untranslated_datagrams", "A no-rule datagram's later fragment passes after "
        "its first (PASS_NO_RULE) did; a first fragment of a translated flow that the kernel "
        "answers (PASS_TTL, PASS_FRAG_NEEDED) leaves no marker: its later fragment is held, never sent; a "
        "translated first fragment replaces a marker of the same key.", [
        inside(n1, PASS, R.PASS_NO_RULE),
        inside(n2, PASS, R.PASS_FRAG_UNTRANSLATED),
        inside(t1, PASS, R.PASS_TTL),
        inside(t2, RED, R.FRAG_HELD),  # held until FRAG_HOLD, then dropped
        inside(p1, PASS, R.PASS_FRAG_NEEDED),
        inside(p2, RED, R.FRAG_HELD),
        inside(k1[:20] + b"\x00" + k1[21:], DROP, R.DROP_NO_SESSION),  # echo reply: no marker
        inside(k1, RED, R.XLATE_NEW),  # the request's rewrite for the same key
        inside(k2, RED, R.XLATE_FRAG),
    ])  # fmt: skip
    g1, g2 = fragments(A, R1, 0x777, 0, proto="icmp", ident=0x6161)
    add("fragmented_echo_and_ttl", "A fragmented echo request; a later fragment with TTL 1 is "
        "left to the kernel.", [
        inside(g1, RED, R.XLATE_NEW),
        inside(g2[:8] + b"\x01" + g2[9:], PASS, R.PASS_TTL),  # checksum stale: never checked
        inside(g2, RED, R.XLATE_FRAG),
    ])  # fmt: skip
    h1, h2 = fragments(A, R1, 7777, 53, ident=0x6464)
    add("fragments_out_of_order_held", "A later fragment before its first is held: it goes round "
        "the recirculation device as long as its first has not come (within FRAG_HOLD), and is "
        "translated once it has; the recirculation device takes nothing but later fragments.", [
        inside(h2, RED, R.FRAG_HELD),
        recirc(h2, RED, R.FRAG_HELD),
        recirc(h2, RED, R.FRAG_HELD),
        inside(h1, RED, R.XLATE_NEW),
        recirc(h2, RED, R.XLATE_FRAG),
        recirc(h1, DROP, R.DROP_FRAG_UNKNOWN),
        recirc(udp(A, R1, 7777, 53), DROP, R.DROP_FRAG_UNKNOWN),
    ])  # fmt: skip
    syn_out = tcp(na, R1, np_, 80, "S", ttl=63)
    add("icmp_error_about_tcp_from_outside", "Errors from routers about an outbound TCP packet: "
        "outer destination and quoted source go back to the inside host.", [
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        outside(icmp_error(ROUTER, na, syn_out, 3, 1), RED, R.XLATE_ICMP_ERR_IN),
        outside(icmp_error(ROUTER, na, syn_out, 11, 0, keep=len(syn_out)), RED, R.XLATE_ICMP_ERR_IN),
        outside(icmp_error(ISP1, na, syn_out, 3, 4, keep=38), RED, R.XLATE_ICMP_ERR_IN),  # checksum present
        outside(icmp_error(ISP1, na, syn_out, 3, 4, keep=37), RED, R.XLATE_ICMP_ERR_IN),  # 17 L4 bytes
        outside(icmp_error(ROUTER, na, syn_out, 12, 0, ttl=1), PASS, R.PASS_TTL),
    ])  # fmt: skip
    u_out = udp(ua, R1, up, 53, ttl=63)
    add("icmp_error_about_udp_from_outside", "Port unreachable about a UDP datagram (also with a "
        "zero UDP checksum) is translated back.", [
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
        outside(icmp_error(R1, ua, u_out, 3, 3), RED, R.XLATE_ICMP_ERR_IN),
        outside(icmp_error(R1, ua, udp(ua, R1, up, 53, ttl=63, zero_csum=True), 3, 3), RED, R.XLATE_ICMP_ERR_IN),
        outside(icmp_error(R1, ua, u_out, 4, 0), RED, R.XLATE_ICMP_ERR_IN),
    ])  # fmt: skip
    other_pool = "198.19.2.71" if ua != "198.19.2.71" else "198.19.2.73"
    add("icmp_error_from_outside_to_another_address", "An error about an outbound packet is "
        "sent to that packet's source, the SNAT address; one addressed elsewhere (straight to "
        "the inside host, to another pool address, to the gateway) is not about the session "
        "(the kernel's conntrack checks the outer destination too): as no session, the inbound "
        "guard judges it (to the inside host: DROP_INBOUND).", [
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
        outside(icmp_error(ROUTER, A, u_out, 3, 1), DROP, R.DROP_INBOUND),
        outside(icmp_error(ROUTER, C, u_out, 3, 1), DROP, R.DROP_INBOUND),
        outside(icmp_error(ROUTER, other_pool, u_out, 3, 1), PASS, R.PASS_NO_SESSION_IN),
        outside(icmp_error(ROUTER, "198.19.2.2", u_out, 11, 0), PASS, R.PASS_NO_SESSION_IN),
        outside(icmp_error(ROUTER, ua, u_out, 3, 1), RED, R.XLATE_ICMP_ERR_IN),
    ])  # fmt: skip
    add("icmp_error_about_echo_from_outside", "Time exceeded about a translated echo request "
        "(traceroute -I) goes back to the inside host with its own identifier.", [
        inside(echo(A, R1, 0x1234, ttl=3), RED, R.XLATE_NEW),
        outside(icmp_error(ROUTER, ea, echo(ea, R1, ei, ttl=1), 11, 0), RED, R.XLATE_ICMP_ERR_IN),
        outside(icmp_error(ROUTER, ea, echo(ea, R1, ei, ttl=1, reply=True), 11, 0), PASS, R.PASS_NO_SESSION_IN),
    ])  # fmt: skip
    add("icmp_error_from_outside_unknown_or_short", "An error about no session passes; an error "
        "quoting too little is malformed.", [
        outside(icmp_error(ROUTER, na, syn_out, 3, 1), PASS, R.PASS_NO_SESSION_IN),
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        outside(icmp_error(ROUTER, na, syn_out, 3, 1, keep=27), DROP, R.DROP_MALFORMED),
        outside(icmp_error(ROUTER, na, syn_out, 3, 1, keep=12), DROP, R.DROP_MALFORMED),
        outside(icmp_error(ROUTER, na, other_proto(na, R1), 3, 2), PASS, R.PASS_NO_SESSION_IN),
        outside(icmp_error(ROUTER, na, bytes([0x44]) + syn_out[1:], 3, 1, keep=28), DROP, R.DROP_MALFORMED),
    ])  # fmt: skip
    add("icmp_error_about_reply_from_inside", "An inside host's port unreachable about a reply is "
        "translated out: outer source and quoted destination become the SNAT tuple.", [
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
        outside(udp(R1, ua, 53, up), RED, R.XLATE_IN),
        inside(icmp_error(A, R1, udp(R1, A, 53, 5353, ttl=63), 3, 3), RED, R.XLATE_ICMP_ERR_OUT),
        inside(icmp_error(A, R1, udp(R1, A, 53, 9999, ttl=63), 3, 3), DROP, R.DROP_NO_SESSION),
        inside(echo(A, R1, 0x1234), RED, R.XLATE_NEW),
        inside(icmp_error(A, R1, echo(R1, A, 0x1234, reply=True), 3, 3), RED, R.XLATE_ICMP_ERR_OUT),
        inside(icmp_error(A, R1, echo(R1, A, 0x1234), 3, 3), DROP, R.DROP_NO_SESSION),
        inside(icmp_error(A, R1, other_proto(R1, A), 3, 2), DROP, R.DROP_NO_SESSION),  # bogus inner
        inside(icmp_error(A, C, udp(C, A, 53, 9999), 3, 3), PASS, R.PASS_INTERNAL),
        inside(icmp_error(A, "198.18.40.1", udp("198.18.40.1", A, 53, 9999), 3, 3), PASS, R.PASS_LOCAL),
        inside(icmp_error(STRANGER, R1, udp(R1, STRANGER, 53, 9), 3, 3), PASS, R.PASS_NO_RULE),
        inside(icmp_error(A, R1, udp(R1, A, 53, 5353), 3, 3, keep=20), DROP, R.DROP_MALFORMED),
    ])  # fmt: skip
    add("icmp_error_into_another_session", "An error about a reply belongs to the session only "
        "from the device that session's replies go to, and only toward the reply's source: C on "
        "lan50 quoting A's reply (edge invariant 3: a host on another device sent into A's "
        "session with A's SNAT address), or A sending one to R2 about R1's reply (the kernel "
        "checks the outer destination too), has no session: matching a rule, DROP_NO_SESSION. "
        "Another host on A's own link is held to A's errors (icmp_error_not_from_the_host).", [
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
        outside(udp(R1, ua, 53, up), RED, R.XLATE_IN),
        inside(icmp_error(C, R1, udp(R1, A, 53, 5353, ttl=63), 3, 3), DROP, R.DROP_NO_SESSION, dev="lan50"),
        inside(icmp_error(A, R2, udp(R1, A, 53, 5353, ttl=63), 3, 3), DROP, R.DROP_NO_SESSION),
        inside(icmp_error(A, R2, udp(R1, A, 53, 5353, ttl=63), 3, 4), DROP, R.DROP_NO_SESSION),
        inside(icmp_error(B, R1, udp(R1, A, 53, 5353, ttl=63), 3, 4), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(A, R1, udp(R1, A, 53, 5353, ttl=63), 3, 3), RED, R.XLATE_ICMP_ERR_OUT),
        inside(udp(C, R1, 5353, 53), RED, R.XLATE_NEW, dev="lan50"),
        inside(icmp_error(A, R1, udp(R1, C, 53, 5353, ttl=63), 3, 3), DROP, R.DROP_NO_SESSION),
    ])  # fmt: skip
    ru = udp(R1, A, 53, 5353, ttl=63)  # A's reply as A received it
    add("icmp_error_not_from_the_host", "An error about a reply to an on-link host comes only "
        "from that host: no router stands between the gateway and it. B on A's own link quoting "
        "A's reply with its true address is dropped, DROP_ICMP_NOT_FROM_HOST, before the TTL "
        "check, whatever the kind (port, protocol, host unreachable, reassembly and transit "
        "time exceeded, admin prohibited, parameter problem) and the quoted protocol; A's own "
        "are translated (routed hosts: tests/bpf/test_icmp_routed_host.py). The gateway's own "
        "inside address as the source stays DROP_SPOOFED; a truncated quote DROP_MALFORMED.", [
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
        outside(udp(R1, ua, 53, up), RED, R.XLATE_IN),
        inside(icmp_error(B, R1, ru, 3, 3), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(B, R1, ru, 3, 2), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(B, R1, ru, 11, 1), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(B, R1, ru, 3, 3, ttl=1), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(B, R1, ru, 3, 1), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(B, R1, ru, 11, 0), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(B, R1, ru, 3, 13), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(B, R1, ru, 12, 0), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(A, R1, ru, 3, 3), RED, R.XLATE_ICMP_ERR_OUT),
        inside(icmp_error(A, R1, ru, 11, 1, keep=len(ru)), RED, R.XLATE_ICMP_ERR_OUT),
        inside(icmp_error(B, R1, ru, 3, 3, keep=20), DROP, R.DROP_MALFORMED),
        inside(icmp_error(B, R1, ru, 3, 3, keep=27), DROP, R.DROP_MALFORMED),
        inside(icmp_error("198.18.40.1", R1, ru, 3, 3), DROP, R.DROP_SPOOFED),
        inside(echo(A, R1, 0x1234), RED, R.XLATE_NEW),
        inside(icmp_error(B, R1, echo(R1, A, 0x1234, reply=True), 3, 3), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(A, R1, echo(R1, A, 0x1234, reply=True), 3, 3), RED, R.XLATE_ICMP_ERR_OUT),
        inside(other_proto(A, R1), RED, R.XLATE_NEW),
        inside(icmp_error(B, R1, other_proto(R1, A), 3, 2), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(A, R1, other_proto(R1, A), 3, 2), RED, R.XLATE_ICMP_ERR_OUT),
        inside(udp(B, R1, 5353, 53), RED, R.XLATE_NEW),
        inside(icmp_error(A, R1, udp(R1, B, 53, 5353, ttl=63), 3, 3), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(B, R1, udp(R1, B, 53, 5353, ttl=63), 3, 3), RED, R.XLATE_ICMP_ERR_OUT),
    ])  # fmt: skip
    rtr = "198.18.40.254"  # an inside router on lan40
    ua2, up2 = snat_of(RULE_SDH, A, R1, 5354)
    ru2, ru3 = udp(R1, A, 53, 5354, ttl=63), udp(R1, A, 53, 5355, ttl=63)
    add("icmp_error_after_the_route_back_changed", "Whether the inside host is on-link is the "
        "session's route back, found at its creation (the IN entry's next hop, where its replies "
        "keep going), not the route when the error arrives. A's first session is made on-link; "
        "then A is routed via an inside router on lan40: its replies still go straight to A, so "
        "that router's host unreachable or frag needed about them is dropped, "
        "DROP_ICMP_NOT_FROM_HOST, A's own error translated. A's second session, made while "
        "routed, sends its replies to the router (after the route is gone too): the router kinds "
        "from it are translated, the host-only kinds not; the first session is still held to A, "
        "and a session made after the route is gone is on-link.", [
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
        outside(udp(R1, ua, 53, up), RED, R.XLATE_IN),  # 1: A routed via rtr from here on
        inside(icmp_error(rtr, R1, ru, 3, 1), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(rtr, R1, ru, 3, 4), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(A, R1, ru, 3, 3), RED, R.XLATE_ICMP_ERR_OUT),
        inside(udp(A, R1, 5354, 53), RED, R.XLATE_NEW),
        outside(udp(R1, ua2, 53, up2), RED, R.XLATE_IN),
        inside(icmp_error(rtr, R1, ru2, 3, 1), RED, R.XLATE_ICMP_ERR_OUT),
        inside(icmp_error(rtr, R1, ru2, 3, 3), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        outside(udp(R1, ua2, 53, up2, payload=b"again"), RED, R.XLATE_IN),  # 9: A on-link again
        inside(icmp_error(rtr, R1, ru2, 3, 4), RED, R.XLATE_ICMP_ERR_OUT),
        inside(icmp_error(rtr, R1, ru2, 11, 0), RED, R.XLATE_ICMP_ERR_OUT),
        inside(icmp_error(rtr, R1, ru, 3, 1), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(udp(A, R1, 5355, 53), RED, R.XLATE_NEW),
        inside(icmp_error(rtr, R1, ru3, 3, 1), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(A, R1, ru3, 3, 1), RED, R.XLATE_ICMP_ERR_OUT),
    ], reroute={1: [(f"{A}/32", "lan40", rtr)], 9: []})  # fmt: skip
    add("egress_error_about_reply", "The gateway's own frag-needed about a reply, leaving eth1, "
        "quotes the SNAT tuple instead of the inside one; other egress packets pass.", [
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        egress(icmp_error("198.19.2.2", R1, tcp(R1, A, 80, 40000, "PA", ttl=63), 3, 4), PASS,
               R.XLATE_ICMP_ERR_OUT),
        egress(icmp_error("198.19.2.2", R1, tcp(R1, A, 80, 40001, "PA", ttl=63), 3, 4), PASS,
               R.PASS_ICMP_OTHER),
        egress(tcp(na, R1, np_, 80, "A"), PASS, R.PASS_ICMP_OTHER),
    ])  # fmt: skip
    add("egress_leak_guard", "The egress guard: a packet leaving an uplink with a source in a rule's "
        "`from` net is dropped (DROP_LEAK), malformed or an ICMP error alike; a source no rule covers "
        "and translated packets pass uncounted.", [
        egress(udp(A, R1, 5353, 53), DROP, R.DROP_LEAK),
        egress(udp(C, R2, 5353, 53), DROP, R.DROP_LEAK, dev="eth2"),
        egress(bytes([0x44]) + udp(A, R1, 1, 2)[1:], DROP, R.DROP_LEAK),  # malformed (IHL 4)
        egress(icmp_error(A, R1, udp(R1, A, 53, 5353, ttl=63), 3, 3), DROP, R.DROP_LEAK),
        egress(udp(STRANGER, R1, 5353, 53), PASS, R.PASS_ICMP_OTHER),  # no rule's `from`: uncounted
        egress(icmp_error("198.18.50.1", ROUTER, udp(ROUTER, "198.18.50.1", 9, 9), 3, 3), DROP, R.DROP_LEAK),
        egress(tcp(na, R1, np_, 80, "A"), PASS, R.PASS_ICMP_OTHER),
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
        egress(udp(ua, R1, up, 53, ttl=63), PASS, R.PASS_ICMP_OTHER),  # as it left: translated
    ])  # fmt: skip
    add("egress_leak_guard_catch_all", "Under a catch-all `from 0.0.0.0/0` the gateway's own and "
        "pool addresses still leave; any other source leaving untranslated is a leak.", [
        egress(udp("198.19.2.71", R1, 5000, 53), PASS, R.PASS_ICMP_OTHER),
        egress(udp("198.19.2.2", R1, 5000, 53), PASS, R.PASS_ICMP_OTHER),
        egress(udp("198.18.40.1", R1, 5000, 53), DROP, R.DROP_LEAK),  # ours, but inside-facing
        egress(udp(ROUTER, R1, 5000, 53), DROP, R.DROP_LEAK),
        egress(udp(STRANGER, R1, 5000, 53), DROP, R.DROP_LEAK),
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
        egress(udp("198.19.2.71", R1, snat_of(Rule.from_dict({"from": "0.0.0.0/0", "snat_ip": "198.19.2.71"}),
               A, R1, 5353)[1], 53, ttl=63), PASS, R.PASS_ICMP_OTHER),
    ], rules=[{"from": "0.0.0.0/0", "snat_ip": "198.19.2.71"}])  # fmt: skip
    pa, pp = snat_of(Rule.from_dict({"from": "0.0.0.0/0", "snat_ip": "198.19.2.80-198.19.2.83"}), A, R1, 5353)
    add("egress_leak_guard_pool_prefix", "A pool inside a `from` net: its addresses leave at once, "
        "local or not (FROM_NET_POOL, no FIB lookup); the address beside the pool is a leak; a "
        "`from` net inside the pool is the longer match and takes the full check.", [
        egress(udp("198.19.2.80", R1, 5000, 53), PASS, R.PASS_ICMP_OTHER),
        egress(udp("198.19.2.83", R1, 5000, 53), PASS, R.PASS_ICMP_OTHER),
        egress(udp("198.19.2.84", R1, 5000, 53), DROP, R.DROP_LEAK),  # beside the pool, not local
        egress(udp("198.19.2.79", R1, 5000, 53), DROP, R.DROP_LEAK),
        egress(udp("198.19.2.82", R1, 5000, 53), DROP, R.DROP_LEAK),  # a `from` net itself
        egress(udp("198.19.2.71", R1, 5000, 53), PASS, R.PASS_ICMP_OTHER),  # the other rule's pool
        egress(udp(A, R1, 5353, 53), DROP, R.DROP_LEAK),
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
        egress(udp(pa, R1, pp, 53, ttl=63), PASS, R.PASS_ICMP_OTHER),  # as it left: 198.19.2.81
    ], rules=[{"from": "198.19.2.82/32", "snat_ip": "198.19.2.71"},
              {"from": "0.0.0.0/0", "snat_ip": "198.19.2.80-198.19.2.83"}])  # fmt: skip
    # a pool the gateway does not hold, on lan40's subnet (so the route back to it is lan40's)
    pin = "198.18.40.200"
    add("spoofed_unheld_pool_source", "A pool address inside a `from` net passes the egress guard "
        "at once (FROM_NET_POOL), local or not; so no inside host may send with it, even where "
        "the route back to it leaves by the device it came in by (a pool the gateway does not "
        "hold, on an inside subnet): DROP_SPOOFED before any lookup. Else its unmatched flow "
        "(to R2: no rule) was routed and left eth2 untranslated. The host's own flows are "
        "translated to that pool address, as the rule says.", [
        inside(udp(pin, R2, 5000, 53), DROP, R.DROP_SPOOFED),  # unmatched: would leave as it is
        inside(udp(pin, R1, 5000, 53), DROP, R.DROP_SPOOFED),
        inside(tcp(pin, R1, 5001, 80, "S"), DROP, R.DROP_SPOOFED),
        egress(udp(pin, R2, 5000, 53), PASS, R.PASS_ICMP_OTHER, dev="eth2"),  # the guard's fast pass
        inside(udp(A3, R2, 5353, 53), PASS, R.PASS_NO_RULE),  # lan40's host, unmatched: routed
        egress(udp(A3, R2, 5353, 53, ttl=63), DROP, R.DROP_LEAK, dev="eth2"),  # and stopped
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
    ], rules=[{"from": "0.0.0.0/0", "to": "203.0.113.0/24", "snat_ip": pin}])  # fmt: skip
    add("spoofed_pool_source_in_no_from_net", "A pool that lies in no rule's `from` net is in "
        "snat_from_nets too (FROM_NET_POOL): a host on the inside subnet the pool address is "
        "routed to (the gateway does not hold it) sending as it is DROP_SPOOFED, though the "
        "route back leads where it came from and no rule matches its source: as the gateway's "
        "mapping it would reach the remotes of lan50's sessions.  lan50's flows are translated "
        "to it as the rule says.", [
        inside(udp(pin, R1, 5000, 53), DROP, R.DROP_SPOOFED),
        inside(tcp(pin, R1, 5001, 80, "S"), DROP, R.DROP_SPOOFED),
        inside(udp(A3, R1, 5353, 53), PASS, R.PASS_NO_RULE),  # lan40's own address: no rule, routed
        inside(udp(C, R1, 5353, 53), RED, R.XLATE_NEW, dev="lan50"),
        egress(udp(pin, R1, 5000, 53), PASS, R.PASS_ICMP_OTHER),  # in no `from` net: never a leak
    ], rules=[{"from": "198.18.50.0/24", "snat_ip": pin}])  # fmt: skip
    n1_, n2_ = fragments(R1, A, 53, 5353, ident=0x6a6a)
    add("no_way_in", "From an uplink, a packet without a session that the FIB would forward (to an "
        "inside host, or back out) is dropped, DROP_INBOUND, whatever its protocol; what is for the "
        "gateway itself (pool and own addresses, broadcast) is the kernel's, as before.", [
        outside(udp(R1, A, 53, 5353), DROP, R.DROP_INBOUND),
        outside(tcp(R2, C, 443, 22, "S"), DROP, R.DROP_INBOUND, dev="eth2"),
        outside(echo(R1, A, 5), DROP, R.DROP_INBOUND),
        outside(echo(R1, A, 5, reply=True), DROP, R.DROP_INBOUND),
        outside(other_proto(R1, A), DROP, R.DROP_INBOUND),
        outside(icmp_error(ROUTER, A, udp(A, R1, 5353, 53), 3, 3), DROP, R.DROP_INBOUND),
        outside(raw(IP(src=R1, dst=A) / ICMP(type=13)), DROP, R.DROP_INBOUND),
        outside(udp(R1, R2, 53, 53), DROP, R.DROP_INBOUND),  # transit, back out eth2
        outside(n1_, DROP, R.DROP_INBOUND),
        outside(n2_, RED, R.FRAG_HELD),  # no pass marker after the drop: held, then dropped
        outside(udp(R1, na, 53, np_), PASS, R.PASS_NO_SESSION_IN),  # a pool address: ours
        outside(udp(R1, "198.19.2.2", 53, 5353), PASS, R.PASS_NO_SESSION_IN),
        outside(udp(R1, "198.18.40.1", 53, 5353), PASS, R.PASS_NO_SESSION_IN),  # ours, on lan40
        outside(udp(R1, "198.18.40.255", 53, 5353), PASS, R.PASS_NO_SESSION_IN),  # broadcast
        outside(udp(R1, "224.0.0.251", 5353, 5353), PASS, R.PASS_NO_SESSION_IN),  # multicast
        outside(other_proto(R1, na), PASS, R.PASS_PROTO),
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
        outside(udp(R1, ua, 53, up), RED, R.XLATE_IN),  # replies get in
        outside(icmp_error(ROUTER, ua, udp(ua, R1, up, 53, ttl=63), 3, 3), RED, R.XLATE_ICMP_ERR_IN),
    ])  # fmt: skip
    add("inbound_routed_setting", "`inbound routed`: packets without a session that the FIB "
        "forwards are the kernel's to route (an operator with public inside networks).", [
        outside(udp(R1, A, 53, 5353), PASS, R.PASS_NO_SESSION_IN),
        outside(other_proto(R1, A), PASS, R.PASS_PROTO),
        outside(echo(R1, A, 5), PASS, R.PASS_ICMP_OTHER),
        outside(n1_, PASS, R.PASS_NO_SESSION_IN),
        outside(n2_, PASS, R.PASS_FRAG_UNTRANSLATED),
    ], settings={"inbound_routed": True})  # fmt: skip
    s1_, s2_ = fragments(C, R1, 5353, 53, ident=0x6b6b)
    add("no_injection", "On an inside device a source that is not routed back out of it (another "
        "inside net's, an outside one) or a local one (a pool address, the gateway's own) is "
        "dropped, DROP_SPOOFED, before any lookup: B cannot send as A's SNAT address and port, so "
        "no reply to B's packet can land in A's session.", [
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
        inside(udp(ua, R1, up, 53), DROP, R.DROP_SPOOFED),  # B with A's pool address and port
        inside(tcp(na, R1, np_, 80, "S"), DROP, R.DROP_SPOOFED),
        inside(udp("198.19.2.2", R1, 5000, 53), DROP, R.DROP_SPOOFED),  # the gateway's uplink
        inside(udp("198.18.40.1", R1, 5000, 53), DROP, R.DROP_SPOOFED),  # the gateway on lan40
        inside(udp(C, R1, 5353, 53), DROP, R.DROP_SPOOFED),  # lan50's host on lan40
        inside(udp(A, R1, 5353, 53), DROP, R.DROP_SPOOFED, dev="lan50"),  # and the other way
        inside(echo(R2, R1, 9), DROP, R.DROP_SPOOFED),  # an outside address
        inside(other_proto(ROUTER, R1), DROP, R.DROP_SPOOFED),
        inside(icmp_error(ua, R1, udp(R1, A, 53, 5353, ttl=63), 3, 3), DROP, R.DROP_SPOOFED),
        inside(s2_, DROP, R.DROP_SPOOFED, dev="lan40"),  # later fragments too
        inside(udp(A, "198.18.40.1", 68, 67), PASS, R.PASS_LOCAL),  # its own source: fine
        inside(udp(STRANGER, R1, 1000, 53), PASS, R.PASS_NO_RULE),  # routed to lan40: no rule
        inside(udp("0.0.0.0", "255.255.255.255", 68, 67), PASS, R.PASS_LOCAL),  # DHCP
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_OUT),  # A's session as it was
        outside(udp(R1, ua, 53, up), RED, R.XLATE_IN),
    ])  # fmt: skip
    add("port_exhaustion_tiny_range", "With SNAT ports 5000-5001 a third flow from A to R1:80 "
        "finds no free port and is dropped; other remotes still work.  The refused flow's marker "
        "is met before the reverse-path check (its packets cost no FIB lookup): from another "
        "device too, where that check would have said spoofed (dropped either way).", [
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        inside(tcp(A, R1, 40001, 80, "S"), RED, R.XLATE_NEW),
        inside(tcp(A, R1, 40002, 80, "S"), DROP, R.DROP_PORT_EXHAUSTED),
        inside(tcp(A, R1, 40002, 80, "S"), DROP, R.DROP_REFUSED_RECENTLY),  # marked: no search
        inside(tcp(A, R1, 40002, 80, "S"), DROP, R.DROP_REFUSED_RECENTLY, dev="lan50", at=3.5),
        inside(tcp(A, R1, 40003, 80, "S"), DROP, R.DROP_SPOOFED, dev="lan50", at=3.6),  # unmarked: checked
        inside(tcp(A, R1, 40002, 443, "S"), RED, R.XLATE_NEW),
    # searches and tries: 1; 2 (40001's first candidate is 40000's: raw ports, n = 2); 2 (all
    # taken: refused); the marked packet none; 1 (another remote port)
    ], settings={"port_min": 5000, "port_max": 5001, "on_exhausted": "drop"}, alloc=(4, 6))  # fmt: skip
    add("spill_over_in_pool_order", "One SNAT port: A's flows to R1:53 fill the sdh address "
        "(.72), then spill to .73 and .71 (pool order after the chosen one, wrapping); the fourth "
        "is refused and its next packet costs one lookup; each spilled flow's reply comes back.", [
        inside(udp(A, R1, 1, 53), RED, R.XLATE_NEW),
        inside(udp(A, R1, 2, 53), RED, R.XLATE_NEW),
        inside(udp(A, R1, 3, 53), RED, R.XLATE_NEW),
        inside(udp(A, R1, 4, 53), DROP, R.DROP_PORT_EXHAUSTED),
        inside(udp(A, R1, 4, 53), DROP, R.DROP_REFUSED_RECENTLY),
        outside(udp(R1, "198.19.2.73", 53, 6000), RED, R.XLATE_IN),
        outside(udp(R1, "198.19.2.71", 53, 6000), RED, R.XLATE_IN),
        inside(udp(B, R1, 4, 54), RED, R.XLATE_NEW),  # another remote port: free again
        inside(echo(A, R1, 9), RED, R.XLATE_NEW),  # the identifier's own endpoint (R1, 0)
    # tries (T = 1 per address): 1, 2, 3, 3 (every address: refused), the marker none, 1, 1
    ], settings={"port_min": 6000, "port_max": 6000}, alloc=(6, 11))  # fmt: skip
    add("sh_does_not_spill_by_default", "algo sh (one public address per host) drops instead of "
        "spilling unless the rule says on_exhausted spill.", [
        inside(udp(D, R1, 1, 53), RED, R.XLATE_NEW, dev="lan50"),
        inside(udp(D, R1, 2, 53), DROP, R.DROP_PORT_EXHAUSTED, dev="lan50"),
        inside(udp(C, R1, 1, 53), RED, R.XLATE_NEW, dev="lan50"),  # spills: the rule says so
        inside(udp(C, R1, 2, 53), RED, R.XLATE_NEW, dev="lan50"),
    ], settings={"port_min": 6000, "port_max": 6000}, rules=[
        {"from": "198.18.50.11/32", "new_gw": "198.19.2.1", "snat_ip": "198.19.2.71-198.19.2.73", "algo": "sh"},
        {"from": "198.18.50.10/32", "new_gw": "198.19.2.1", "snat_ip": "198.19.2.71-198.19.2.73", "algo": "sh",
         "on_exhausted": "spill"},
    ])  # fmt: skip
    add("refusal_marker_expires", "A refused flow is remembered for REFUSED_SECS (2 s; step i "
        "runs at i s): packets at +1 s cost one lookup, at +2 s it is searched (and refused) "
        "again.", [
        inside(udp(A, R1, 1, 53), RED, R.XLATE_NEW),
        inside(udp(A, R1, 2, 53), DROP, R.DROP_PORT_EXHAUSTED),
        inside(udp(A, R1, 2, 53), DROP, R.DROP_REFUSED_RECENTLY),
        inside(udp(A, R1, 2, 53), DROP, R.DROP_PORT_EXHAUSTED),
        inside(udp(A, R1, 2, 53), DROP, R.DROP_REFUSED_RECENTLY),
        inside(udp(A, R1, 1, 53), RED, R.XLATE_OUT),
    ], settings={"port_min": 6000, "port_max": 6000, "on_exhausted": "drop"})  # fmt: skip
    add("port_tries_below_the_range", "port_tries 4 over 16 SNAT ports (T < n: the double-hashed "
        "sequence cut short, as the default 128 cuts 64k ports), one address, on_exhausted drop: "
        "A's 16 flows to R1:53 share one first candidate (raw source ports 16 apart); each then "
        "walks its own sequence, the 16th tries 4 taken ports and is refused while port 6000 is "
        "still free (the bound, not the range, refuses it), its next packet meets the marker, and "
        "a later flow whose sequence reaches 6000 takes it (the memo 1.5 s old: expired).", [
        *(inside(udp(A, R1, 16 * i + 15, 53), RED, R.XLATE_NEW, at=1.5 * i) for i in range(15)),
        inside(udp(A, R1, 255, 53), DROP, R.DROP_PORT_EXHAUSTED, at=22.5),  # 6001 6004 6011 6002
        inside(udp(A, R1, 255, 53), DROP, R.DROP_REFUSED_RECENTLY, at=23.0),
        inside(udp(A, R1, 303, 53), RED, R.XLATE_NEW, at=24.0),  # 6002 6001 6000: the last free
        outside(udp(R1, "198.19.2.71", 53, 6000), RED, R.XLATE_IN, at=24.5),
    # searches: 17; tries: 1 + 2 x 13 + 3 (sport 191) + 4 (refused) + 3 = 37
    ], settings={"port_min": 6000, "port_max": 6015, "port_tries": 4}, alloc=(17, 37),
        rules=[{"from": "198.18.40.0/24", "snat_ip": "198.19.2.71", "on_exhausted": "drop"}])  # fmt: skip
    add("spill_memo_young_then_expired", "Two SNAT ports: A's flows to R1:53 fill the sdh "
        "address .72; the third's full search there fails and leaves a spill memo (.72 full "
        "toward R1:53, SPILL_MEMO_MS = 1 s) before it spills to .73.  While the memo is young a "
        "new flow tries only .72's first candidate, then .73; at 1 s it is expired: a full "
        "search again (a new memo), .73 full too (its own memo), .71; with every memo young "
        "and .71 full, a flow is refused after three first candidates.  Another remote port "
        "(R1:54) and an echo toward R1 are not judged by R1:53's memos.", [
        inside(udp(A, R1, 1, 53), RED, R.XLATE_NEW, at=0.0),
        inside(udp(A, R1, 2, 53), RED, R.XLATE_NEW, at=1.0),
        inside(udp(A, R1, 3, 53), RED, R.XLATE_NEW, at=2.0),  # .72 searched: full (memo); .73
        inside(udp(A, R1, 4, 53), RED, R.XLATE_NEW, at=2.5),  # memo: .72's first only; .73
        inside(udp(A, R1, 5, 53), RED, R.XLATE_NEW, at=3.0),  # expired: .72, .73 searched; .71
        inside(udp(A, R1, 6, 53), RED, R.XLATE_NEW, at=3.5),  # two memos: .71
        inside(udp(A, R1, 7, 53), DROP, R.DROP_PORT_EXHAUSTED, at=3.5),  # .71 searched: memo
        inside(udp(A, R1, 8, 53), DROP, R.DROP_PORT_EXHAUSTED, at=3.75),  # three first candidates
        inside(udp(A, R1, 7, 53), DROP, R.DROP_REFUSED_RECENTLY, at=4.0),
        inside(udp(A, R1, 7, 54), RED, R.XLATE_NEW, at=4.0),  # R1:54: no memo
        inside(echo(A, R1, 9), RED, R.XLATE_NEW, at=4.0),  # the echo's endpoint (R1, 0)
        inside(udp(A, R1, 1, 53), RED, R.XLATE_OUT, at=4.5),
    ], settings={"port_min": 6000, "port_max": 6001})  # fmt: skip
    add("spill_memo_drop_policy", "on_exhausted drop, two SNAT ports: the third flow's search "
        "fails (a memo, a refusal marker); while the memo is young a new flow is refused after "
        "one candidate (whoever sends it); once both have expired the flow is searched in full again.", [
        inside(udp(A, R1, 1, 53), RED, R.XLATE_NEW, at=0.0),
        inside(udp(A, R1, 2, 53), RED, R.XLATE_NEW, at=1.0),
        inside(udp(A, R1, 3, 53), DROP, R.DROP_PORT_EXHAUSTED, at=2.0),
        inside(udp(A, R1, 4, 53), DROP, R.DROP_PORT_EXHAUSTED, at=2.5),  # memo: one candidate
        inside(udp(A, R1, 3, 53), DROP, R.DROP_REFUSED_RECENTLY, at=2.5),
        inside(udp(A, R1, 4, 53), DROP, R.DROP_REFUSED_RECENTLY, at=4.0),
        inside(udp(A, R1, 4, 53), DROP, R.DROP_PORT_EXHAUSTED, at=5.0),  # searched: a new memo
        inside(udp(B, R1, 4, 53), DROP, R.DROP_PORT_EXHAUSTED, at=5.5),  # B's: also .72, memo
        inside(udp(B, R1, 4, 54), RED, R.XLATE_NEW, at=5.5),  # toward R1:54 it is not full
    # tries: 1, 2, 2 (refused: the memo), 1 (the memo cuts it short), markers none, 2 (a new
    # memo), 1 (B: the memo), 1
    ], settings={"port_min": 6000, "port_max": 6001, "on_exhausted": "drop"}, alloc=(7, 10))  # fmt: skip
    add("spill_memo_port_preserve", "port_preserve yes: the first candidate is the inside port "
        "itself; a young memo leaves that one try on the full address.", [
        inside(udp(A, R1, 6000, 53), RED, R.XLATE_NEW, at=0.0),
        inside(udp(A, R1, 6001, 53), RED, R.XLATE_NEW, at=0.0),
        inside(udp(A, R1, 6000, 54), RED, R.XLATE_NEW, at=0.0),
        inside(udp(B, R1, 6000, 53), RED, R.XLATE_NEW, at=0.5),  # .72 searched: full (memo)
        inside(udp(B, R1, 6001, 53), RED, R.XLATE_NEW, at=0.5),  # memo: 6001 only; the next
    ], settings={"port_min": 6000, "port_max": 6001, "port_preserve": True})  # fmt: skip
    add("port_search_counts", "The allocator's search counters (one search per new flow that "
        "searched, one try per candidate looked up), two SNAT ports (below 256 a source port's "
        "first candidate is 6001): an uncontended flow, 1 try; one whose first candidate is taken, "
        "2; one that finds .72 full (a memo) and spills to .73, 3; one cut short on .72 by the "
        "memo (not a try) that takes .73's second candidate, 3; an established packet, none.", [
        inside(udp(A, R1, 1, 53), RED, R.XLATE_NEW, at=0.0),  # .72:6001          1 search, 1 try
        inside(udp(A, R1, 2, 53), RED, R.XLATE_NEW, at=0.0),  # .72:6000          2, 3
        inside(udp(A, R1, 3, 53), RED, R.XLATE_NEW, at=0.0),  # .72 full; .73:6001  3, 6
        inside(udp(A, R1, 4, 53), RED, R.XLATE_NEW, at=0.5),  # memo; .73:6000    4, 9
        inside(udp(A, R1, 4, 53), RED, R.XLATE_OUT, at=0.5),  #                   4, 9
        inside(udp(A, R1, 5, 54), RED, R.XLATE_NEW, at=0.5),  # R1:54: .72:6001   5, 10
    ], settings={"port_min": 6000, "port_max": 6001}, alloc=(5, 10))  # fmt: skip
    add("host_limit", "max_sessions_per_host 2: A's third flow is DROP_HOST_LIMIT (then marked), "
        "B behind the same address still gets flows, A's sessions keep working; the /16 rule "
        "sets no limit of its own (0).", [
        inside(udp(A, R1, 1, 53), RED, R.XLATE_NEW),
        inside(tcp(A, R1, 2, 80, "S"), RED, R.XLATE_NEW),
        inside(udp(A, R1, 3, 53), DROP, R.DROP_HOST_LIMIT),
        inside(udp(A, R1, 3, 53), DROP, R.DROP_REFUSED_RECENTLY),
        inside(udp(B, R1, 3, 53), RED, R.XLATE_NEW),
        inside(udp(A, R1, 1, 53), RED, R.XLATE_OUT),
        inside(echo(A, R1, 5), DROP, R.DROP_HOST_LIMIT),
        inside(udp(C, R1, 1, 53), RED, R.XLATE_NEW, dev="lan50"),
        inside(udp(C, R1, 2, 53), RED, R.XLATE_NEW, dev="lan50"),
        inside(udp(C, R1, 3, 53), RED, R.XLATE_NEW, dev="lan50"),
    ], settings={"max_sessions_per_host": 2},
       rules=[REF_RULES[0], REF_RULES[1], dict(REF_RULES[2], max_sessions_per_host=0)])  # fmt: skip
    add("host_count_off_without_a_limit", "No rule has a host limit (CFG_F_HOST_COUNT clear): "
        "new sessions count per rule and SNAT address but not per inside host; a refusal does "
        "count for its host (sessions 0, refusals 1): the sweep's recount keeps hosts' sessions.", [
        inside(udp(A, R1, 1, 53), RED, R.XLATE_NEW),
        inside(udp(A, R1, 2, 53), RED, R.XLATE_NEW),
        inside(udp(B, R1, 1, 53), RED, R.XLATE_NEW),
        inside(udp(A, R1, 3, 53), DROP, R.DROP_PORT_EXHAUSTED),
        inside(udp(A, R1, 4, 54), RED, R.XLATE_NEW),
    ], settings={"port_min": 6000, "port_max": 6000})  # fmt: skip
    add("host_limit_of_one_rule_counts_every_host", "Only the /16 rule has a limit (1), the "
        "global none: the datapath counts every host's sessions (one flag), so C's second flow "
        "on that rule is refused while A on the eth1 rule is never limited.", [
        inside(udp(A, R1, 1, 53), RED, R.XLATE_NEW),
        inside(udp(A, R1, 2, 53), RED, R.XLATE_NEW),
        inside(udp(C, R1, 1, 53), RED, R.XLATE_NEW, dev="lan50"),
        inside(udp(C, R1, 2, 53), DROP, R.DROP_HOST_LIMIT, dev="lan50"),
        inside(udp(A, R1, 3, 53), RED, R.XLATE_NEW),
    ], rules=[REF_RULES[0], REF_RULES[1], dict(REF_RULES[2], max_sessions_per_host=1)])  # fmt: skip
    add("host_limit_icmp", "refuse_icmp yes: the refused packet comes back to its host as ICMP "
        "host unreachable (3/1) from the gateway's lan address, quoting it; the next packet of "
        "that flow is marked (dropped, no ICMP); a TCP SYN and an echo request the same.", [
        inside(udp(A, R1, 1, 53), RED, R.XLATE_NEW),
        inside(udp(A, R1, 2, 53, payload=b"quoted beyond 8 bytes"), RED, R.DROP_HOST_LIMIT),
        inside(udp(A, R1, 2, 53), DROP, R.DROP_REFUSED_RECENTLY),
        inside(with_options(tcp(A, R1, 3, 80, "S")), RED, R.DROP_HOST_LIMIT),
        inside(echo(A, R1, 77), RED, R.DROP_HOST_LIMIT),
        inside(udp(D, R1, 1, 53), RED, R.XLATE_NEW, dev="lan50"),
        inside(udp(D, R1, 2, 53), RED, R.DROP_HOST_LIMIT, dev="lan50"),
    ], settings={"max_sessions_per_host": 1, "refuse_icmp": True})  # fmt: skip
    add("table_full_refuses_new_flows", "With room for 2 sessions a third flow is dropped; live "
        "sessions keep working (never evicted).", [
        inside(udp(A, R1, 1001, 53), RED, R.XLATE_NEW),
        inside(udp(A, R1, 1002, 53), RED, R.XLATE_NEW),
        inside(udp(A, R1, 1003, 53), DROP, R.DROP_TABLE_FULL),
        inside(udp(A, R1, 1001, 53), RED, R.XLATE_OUT),
    ], settings={"max_sessions": 2})  # fmt: skip
    add("ip_options_kept", "A packet with IP options (IHL 6) is translated with its options kept.", [
        inside(with_options(tcp(A, R1, 40000, 80, "S")), RED, R.XLATE_NEW),
        outside(with_options(tcp(R1, na, 80, np_, "SA")), RED, R.XLATE_IN),
        inside(with_options(udp(A, R1, 5353, 53)), RED, R.XLATE_NEW),
    ])  # fmt: skip
    lsrr = b"\x83\x07\x04" + bytes([198, 51, 100, 99]) + b"\x00"  # loose source route via 198.51.100.99
    ssrr = b"\x89\x07\x04" + bytes([198, 51, 100, 99]) + b"\x00"
    rr = b"\x07\x07\x04\x00\x00\x00\x00\x00"  # record route, room for one address
    sa, sp = snat_of(RULE_SDH, A, R1, 6002)
    add("ip_source_route_to_kernel", "Step 2b: a source-routed packet (LSRR, SSRR) from either side, "
        "new or of a live session, and one whose options do not parse, go to the kernel untranslated "
        "(PASS_IP_OPTIONS; it drops them by default); to an inside host from outside the inbound guard "
        "drops it; record route and NOPs are translated as before.", [
        inside(udp(A, R1, 6001, 53, options=[lsrr]), PASS, R.PASS_IP_OPTIONS),
        inside(udp(A, R1, 6002, 53), RED, R.XLATE_NEW),
        inside(udp(A, R1, 6002, 53, options=[ssrr]), PASS, R.PASS_IP_OPTIONS),
        outside(udp(R1, sa, 53, sp, options=[lsrr]), PASS, R.PASS_IP_OPTIONS),
        outside(udp(R1, sa, 53, sp), RED, R.XLATE_IN),
        outside(udp(R1, A, 53, 6002, options=[lsrr]), DROP, R.DROP_INBOUND),
        inside(udp(A, R1, 6003, 53, options=[rr]), RED, R.XLATE_NEW),
        inside(udp(A, R1, 6004, 53, options=[b"\x44\x01\x00\x00"]), PASS, R.PASS_IP_OPTIONS),
        inside(udp(A, R1, 6005, 53, options=[b"\x01\x07\x0c\x04"]), PASS, R.PASS_IP_OPTIONS),
        inside(udp(A, R1, 6006, 53, options=[b"\x01\x01\x01\x01\x01\x01\x01\x00"]), RED, R.XLATE_NEW),
        inside(raw(IP(src=A, dst=R1, id=77, frag=3, proto=17, options=[lsrr]) / Raw(b"x" * 16)), PASS,
               R.PASS_IP_OPTIONS),
    ])  # fmt: skip
    add("onlink_destinations", "To the ISP router itself (on-link) the next hop is the destination "
        "and the gw rule matches; another on-link host matches only the /16 new_gw rule.", [
        inside(udp(A, ISP1, 5000, 53), RED, R.XLATE_NEW),
        inside(udp(A, "198.19.2.5", 5000, 53), RED, R.XLATE_NEW),
        inside(udp(D, "198.19.3.9", 5000, 53), RED, R.XLATE_NEW, dev="lan50"),
    ])  # fmt: skip
    i1, i2 = fragments(A, C, 1234, 53, ident=0x7171)
    add("inside_to_inside_is_internal", "A flow between the inside nets (routed out of an inside "
        "device) is internal: never translated, although the /16 rule would match it; both "
        "directions, mid-stream TCP, the same net, and its fragments.", [
        inside(udp(A, C, 1234, 53), PASS, R.PASS_INTERNAL),
        inside(udp(C, A, 53, 1234), PASS, R.PASS_INTERNAL, dev="lan50"),
        inside(tcp(A, C, 40000, 22, "A"), PASS, R.PASS_INTERNAL),  # not DROP_NO_SESSION
        inside(echo(C, B, 5), PASS, R.PASS_INTERNAL, dev="lan50"),
        inside(udp(A, B, 1, 2), PASS, R.PASS_INTERNAL),  # hairpin: out of the device it came in by
        inside(i1, PASS, R.PASS_INTERNAL),
        inside(i2, PASS, R.PASS_FRAG_UNTRANSLATED),
        inside(udp(A, R1, 1234, 53), RED, R.XLATE_NEW),  # toward an uplink: translated as ever
    ])  # fmt: skip
    add("rule_with_destination_net", "A rule with `to` wins for its destinations; the other rule "
        "takes the rest.", [
        inside(udp(A, R2, 1234, 53), RED, R.XLATE_NEW),
        inside(udp(A, R1, 1234, 53), RED, R.XLATE_NEW),
        outside(udp(R2, "198.19.3.71", 53, snat_of(Rule.from_dict(
            {"from": "198.18.40.0/24", "snat_ip": "198.19.3.71"}), A, R2, 1234)[1]), RED, R.XLATE_IN, dev="eth2"),
    ], rules=[
        {"from": "198.18.40.0/24", "snat_ip": "198.19.2.71", "algo": "sh"},
        {"from": "198.18.40.0/24", "to": "198.51.100.0/24", "snat_ip": "198.19.3.71"},
    ])  # fmt: skip
    fa2, fp2 = snat_of(Rule.from_dict(FAILOVER_RULES[1]), A, R1, 40000)
    add("failover_rules_new_gw", "The failover variant: rule 2 sends A->R1 to 198.19.3.1 on eth2 "
        "with an eth2 address; the reply on eth2 is translated.", [
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        outside(tcp(R1, fa2, 80, fp2, "SA"), RED, R.XLATE_IN, dev="eth2"),
    ], rules=FAILOVER_RULES)  # fmt: skip
    za, zp = snat_of(RULE_SDH, A, R1, 7777)
    w_out = zeroing_word(lambda w: (udp(za, R1, zp, 53, payload=b"corner" + w, ttl=63), 26))
    w_in = zeroing_word(lambda w: (udp(R1, A, 53, 7777, payload=b"reply!" + w, ttl=63), 26))
    w_tcp = zeroing_word(lambda w: (tcp(za, R1, snat_of(RULE_SDH, A, R1, 7778)[1], 80, "S", ttl=63,
                                        payload=b"tc" + w), 36))
    t_out0 = tcp(A, R1, 7778, 80, "S", payload=b"tc" + w_tcp)  # its translation sums to 0x0000
    w_in0 = zeroing_word(lambda w: (tcp(A, R1, 7780, 80, "S", payload=b"tc" + w), 36))
    t_in0 = tcp(A, R1, 7780, 80, "S", payload=b"tc" + w_in0)  # checksum field 0x0000 (valid)
    t_in_ffff = t_in0[:36] + b"\xff\xff" + t_in0[38:]  # the same checksum spelled 0xFFFF
    bad_ip = udp(A, R1, 7779, 53)
    bad_ip = bad_ip[:10] + bytes([bad_ip[10] ^ 0x40]) + bad_ip[11:]
    add("checksum_corners", "UDP whose translated checksum computes to zero is sent as 0xFFFF "
        "(both ways); a TCP checksum spelled 0xFFFF-style or 0x0000-style translates alike; a "
        "wrong IP checksum stays wrong.", [
        inside(udp(A, R1, 7777, 53, payload=b"corner" + w_out), RED, R.XLATE_NEW),
        outside(udp(R1, za, 53, zp, payload=b"reply!" + w_in), RED, R.XLATE_IN),
        inside(t_out0, RED, R.XLATE_NEW),
        inside(t_in0, RED, R.XLATE_NEW),
        inside(t_in_ffff, RED, R.XLATE_OUT),
        inside(bad_ip, RED, R.XLATE_NEW),
    ])  # fmt: skip
    z0 = snat_of(RULE_SDH, A, R1, 0)
    zmax = snat_of(RULE_SDH, A, R1, 65535)
    add("edge_ports_and_ttls", "Source port / identifier 0 and 65535, TTL 255, and a lan50 host "
        "whose reply goes back out of lan50.", [
        inside(udp(A, R1, 0, 53, ttl=255), RED, R.XLATE_NEW),
        outside(udp(R1, z0[0], 53, z0[1], ttl=255), RED, R.XLATE_IN),
        inside(tcp(A, R1, 65535, 65535, "S"), RED, R.XLATE_NEW),
        outside(tcp(R1, zmax[0], 65535, zmax[1], "SA"), RED, R.XLATE_IN),
        inside(echo(A, R1, 0), RED, R.XLATE_NEW),
        outside(echo(R1, z0[0], z0[1], reply=True), RED, R.XLATE_IN),
        inside(echo(C, R1, 0xFFFF), RED, R.XLATE_NEW, dev="lan50"),
        outside(echo(R1, snat_of(RULE_SH, C, R1, 0xFFFF)[0], snat_of(RULE_SH, C, R1, 0xFFFF)[1], reply=True),
                RED, R.XLATE_IN),
    ])  # fmt: skip
    w_err = zeroing_word(lambda w: (udp(A, R1, 5353, 53, payload=b"q" * 4 + w, ttl=63), 26))
    q_err = udp(ua, R1, up, 53, payload=b"q" * 4 + w_err, ttl=63)
    from scapy.layers.inet import IP as _IP

    opt_err = raw(_IP(src=ROUTER, dst=ua, options=[b"\x01\x01\x01\x00"]) / ICMP(type=12, code=0)
                  / with_options(u_out))
    add("icmp_error_options_and_zero_sum", "Errors with IP options outside and in the quote, a "
        "parameter problem, a quoted UDP checksum that adjusts to zero (sent as 0xFFFF), and an "
        "error quoting an error.", [
        inside(udp(A, R1, 5353, 53), RED, R.XLATE_NEW),
        outside(opt_err, RED, R.XLATE_ICMP_ERR_IN),
        outside(icmp_error(R1, ua, q_err, 3, 3, keep=len(q_err)), RED, R.XLATE_ICMP_ERR_IN),
        outside(icmp_error(ROUTER, ua, icmp_error(ua, R1, u_out, 3, 3), 3, 1), PASS, R.PASS_NO_SESSION_IN),
        outside(icmp_error(ROUTER, ua, u_out, 12, 0), RED, R.XLATE_ICMP_ERR_IN),
    ])  # fmt: skip
    add("not_ipv4_and_empty", "Non-IPv4 and empty input never raise.", [
        inside(b"", DROP, R.DROP_MALFORMED),
        outside(b"\x60" + b"\0" * 39, PASS, R.PASS_NOT_IPV4),
        egress(b"\x45", PASS, R.PASS_ICMP_OTHER),  # egress: not an ICMP error, uncounted
    ])  # fmt: skip
    _eim_scenarios(add)
    return S


#: endpoint-independent mapping (issue 12): one sh rule over the lab's nets, one pool address
EIM_RULE = {"from": "198.18.0.0/16", "snat_ip": "198.19.2.71", "algo": "sh", "mapping": "endpoint-independent"}
R1B = "203.0.113.20"  # another remote via eth1
NAT = "198.19.2.71"


def eim_rules(**kw) -> list[dict]:
    return [dict(EIM_RULE, **kw)]


def _eim_scenarios(add) -> None:
    rule = Rule.from_dict(EIM_RULE)
    _, pa = snat_of(rule, A, R1, 40000)  # A:40000's mapping, toward every remote
    _, pb = snat_of(rule, B, R2, 40000, nth=1, dport=3478, proto=17)  # B:40000's: A owns pa
    add("eim_reuse_across_remotes", "mapping endpoint-independent: A:40000 gets one (address, "
        "port) toward R1, R2 (another uplink) and R1B; each remote's reply comes back; TCP from "
        "the same port is an endpoint of its own.", [
        inside(udp(A, R1, 40000, 3478), RED, R.XLATE_NEW),
        inside(udp(A, R2, 40000, 3478), RED, R.XLATE_NEW),
        inside(udp(A, R1B, 40000, 53), RED, R.XLATE_NEW),
        outside(udp(R2, NAT, 3478, pa), RED, R.XLATE_IN),
        outside(udp(R1B, NAT, 53, pa), RED, R.XLATE_IN),
        outside(udp(R1, NAT, 3478, pa), RED, R.XLATE_IN),
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        outside(tcp(R1, NAT, 80, pa, "SA"), RED, R.XLATE_IN),
    # the new mapping searches (1 try); each later remote reuses it: a search of its one
    # candidate (1 try); TCP's own endpoint a new mapping
    ], rules=eim_rules(), alloc=(4, 4))  # fmt: skip
    add("eim_owned_port_refused_to_second_endpoint", "B:40000 would take A's port first (same "
        "source port, one address), but A's mapping owns it toward every remote: B gets the next "
        "candidate, even toward a remote A never talked to.  Hostile: R2 to A's mapping under "
        "address-and-port-dependent filtering, and anyone to a pool port nobody owns, stay out.", [
        inside(udp(A, R1, 40000, 3478), RED, R.XLATE_NEW),
        inside(udp(B, R2, 40000, 3478), RED, R.XLATE_NEW),
        outside(udp(R2, NAT, 3478, pb), RED, R.XLATE_IN),
        outside(udp(R2, NAT, 3478, pa), PASS, R.PASS_NO_SESSION_IN),
        outside(udp(R1, NAT, 3479, pa), PASS, R.PASS_NO_SESSION_IN),
        outside(udp(R1, NAT, 3478, 7), PASS, R.PASS_NO_SESSION_IN),
        outside(tcp(R1, NAT, 80, pa, "S"), PASS, R.PASS_NO_SESSION_IN),
    # tries: A 1; B 2 (its first candidate owned by A: taken toward every remote)
    ], rules=eim_rules(), alloc=(2, 3))  # fmt: skip
    add("eim_filtering_endpoint_independent", "filtering endpoint-independent: any remote's UDP "
        "datagram or TCP SYN to a live mapping makes a session back to its inside endpoint "
        "(XLATE_IN_NEW); the endpoint's answer uses it; a TCP segment that is not a SYN, and a "
        "mapping of another protocol, stay out.", [
        inside(udp(A, R1, 40000, 3478), RED, R.XLATE_NEW),
        outside(udp(R2, NAT, 5555, pa), RED, R.XLATE_IN_NEW, dev="eth2"),
        inside(udp(A, R2, 40000, 5555), RED, R.XLATE_OUT),
        outside(udp(R2, NAT, 5555, pa, payload=b"again"), RED, R.XLATE_IN, dev="eth2"),
        outside(tcp(R1B, NAT, 6000, pa, "S"), PASS, R.PASS_NO_SESSION_IN),
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        outside(tcp(R1B, NAT, 6001, pa, "A"), PASS, R.PASS_NO_SESSION_IN),
        outside(tcp(R1B, NAT, 6000, pa, "S"), RED, R.XLATE_IN_NEW),
        inside(tcp(A, R1B, 40000, 6000, "SA"), RED, R.XLATE_OUT),
        outside(tcp(R1B, NAT, 6000, pa, "A"), RED, R.XLATE_IN),
    ], rules=eim_rules(filtering="endpoint-independent"))  # fmt: skip
    add("eim_host_limit_counts_sessions_made_from_outside", "max_sessions_per_host 2 on the "
        "endpoint-independent rule (the only limit: CFG_F_HOST_COUNT on): A's own session and "
        "the one R2's datagram makes count for A, so R1B's SYN is not admitted and A's next "
        "flow is DROP_HOST_LIMIT; B behind the same address still gets its flow.", [
        inside(udp(A, R1, 40000, 3478), RED, R.XLATE_NEW),
        outside(udp(R2, NAT, 5555, pa), RED, R.XLATE_IN_NEW, dev="eth2"),
        outside(tcp(R1B, NAT, 6000, pa, "S"), PASS, R.PASS_NO_SESSION_IN),
        inside(udp(A, R1, 40001, 3478), DROP, R.DROP_HOST_LIMIT),
        inside(udp(B, R1, 40000, 3478), RED, R.XLATE_NEW),
    ], rules=eim_rules(filtering="endpoint-independent", max_sessions_per_host=2))  # fmt: skip
    add("eim_hairpin_receiver_at_its_limit", "max_sessions_per_host 2: A:80 sends a TCP SYN to "
        "A:40000's own mapping; the sender's session is made (A's second), the receiver's is not "
        "(A at its limit): DROP_NO_SESSION, and the sender's new session stays in SYN_RECV as "
        "every new TCP session (the fuzz found the model leaving it at NONE).", [
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        inside(tcp(A, NAT, 80, pa, "S"), DROP, R.DROP_NO_SESSION),
        inside(tcp(A, NAT, 80, pa, "S"), DROP, R.DROP_NO_SESSION),
    ], rules=eim_rules(max_sessions_per_host=2))  # fmt: skip
    add("eim_filtering_address_dependent", "filtering address-dependent: R1 from any port gets in "
        "once A talked to R1; R2 does not until A talks to R2.", [
        inside(udp(A, R1, 40000, 3478), RED, R.XLATE_NEW),
        outside(udp(R1, NAT, 9999, pa), RED, R.XLATE_IN_NEW),
        outside(udp(R2, NAT, 3478, pa), PASS, R.PASS_NO_SESSION_IN, dev="eth2"),
        inside(udp(A, R2, 40000, 1), RED, R.XLATE_NEW),
        outside(udp(R2, NAT, 3478, pa), RED, R.XLATE_IN_NEW, dev="eth2"),
        outside(udp(R1B, NAT, 3478, pa), PASS, R.PASS_NO_SESSION_IN),
    ], rules=eim_rules(filtering="address-dependent"))  # fmt: skip
    add("eim_hairpin", "Hairpinning: B (and C on lan50) send to A's mapping: each gets its own "
        "mapping as source and the packet reaches A:40000 (XLATE_HAIRPIN, one lookup more); A "
        "answers B's mapping and it reaches B; filtering aside (the sender is inside).", [
        inside(udp(A, R1, 40000, 3478), RED, R.XLATE_NEW),
        inside(udp(B, NAT, 41000, pa), RED, R.XLATE_HAIRPIN),
        inside(udp(A, NAT, 40000, snat_of(rule, B, NAT, 41000)[1]), RED, R.XLATE_HAIRPIN),
        inside(udp(B, NAT, 41000, pa, payload=b"more"), RED, R.XLATE_HAIRPIN),
        inside(udp(C, NAT, 41000, pa), RED, R.XLATE_HAIRPIN, dev="lan50"),
        inside(tcp(C, NAT, 41001, pa, "S"), PASS, R.PASS_LOCAL, dev="lan50"),
        inside(udp(C, NAT, 41002, 7), PASS, R.PASS_LOCAL, dev="lan50"),
        outside(udp(R1, NAT, 3478, pa), RED, R.XLATE_IN),
    ], rules=eim_rules())  # fmt: skip
    na, np_ = snat_of(RULE_SDH, A, R1, 7100)
    add("frames_not_for_us", "Step 1a: a frame sent to another host's MAC (a bridge's flood, a "
        "promiscuous device) is left to the kernel untouched from either side (PASS_NOT_FOR_US; the "
        "kernel drops it): no session is made, a live one neither translates it nor is refreshed; "
        "the same packets sent to the device translate as ever.", [
        inside(udp(A, R1, 7100, 53), PASS, R.PASS_NOT_FOR_US)._replace(for_us=False),
        inside(udp(A, R1, 7100, 53), RED, R.XLATE_NEW),
        inside(udp(A, R1, 7100, 53), PASS, R.PASS_NOT_FOR_US)._replace(for_us=False),
        outside(udp(R1, na, 53, np_), PASS, R.PASS_NOT_FOR_US)._replace(for_us=False),
        outside(udp(R1, na, 53, np_), RED, R.XLATE_IN),
        outside(udp(R1, A, 53, 7100), PASS, R.PASS_NOT_FOR_US)._replace(for_us=False),
    ])  # fmt: skip
    p_dflt = snat_of(RULE_SDH, B, R1, 40000, nth=0)[1]
    add("port_preserve", "port_preserve yes: A:40000 keeps its port; B:40000 to the same remote "
        "finds it taken and gets the usual first candidate; port 1024 (outside the range) gets "
        "the usual one; with mapping endpoint-independent too.", [
        inside(tcp(A, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        outside(tcp(R1, NAT, 80, 40000, "SA"), RED, R.XLATE_IN),
        inside(tcp(B, R1, 40000, 80, "S"), RED, R.XLATE_NEW),
        outside(tcp(R1, NAT, 80, p_dflt, "SA"), RED, R.XLATE_IN),
        inside(udp(A, R1, 1024, 53), RED, R.XLATE_NEW),
        outside(udp(R1, NAT, 53, 5005), RED, R.XLATE_IN),
        inside(udp(C, R2, 33333, 3478), RED, R.XLATE_NEW, dev="lan50"),
        outside(udp(R2, "198.19.3.71", 3478, 33333), RED, R.XLATE_IN, dev="eth2"),
    ], settings={"port_preserve": True}, rules=[
        {"from": "198.18.40.0/24", "snat_ip": NAT, "algo": "sdh"},
        dict(EIM_RULE, snat_ip="198.19.3.71"),
    ])  # fmt: skip


SCENARIOS: list[Scenario] = _scenarios()
