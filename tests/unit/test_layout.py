"""The single source of layouts: the generated C header is current, the FSM is the original's."""

from snatgw import layout
from snatgw.layout import CtState, TcpTable, tcp_next_state, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN


def test_generated_header_is_current():
    """snat_layout.h is exactly what layout.py renders (regenerate with python -m snatgw.layout)."""
    assert layout.HEADER_PATH.read_text() == layout.render_header()


def test_struct_sizes_are_naturally_aligned():
    """Every field sits at a multiple of its own size, so C adds no hidden padding."""
    for s in layout.STRUCTS.values():
        for name, off in s.offsets().items():
            ctype = dict((n, c) for n, c, _ in s.fields)[name]
            size = 4 if ctype.startswith("struct ") else layout._SIZES[ctype]
            assert off % size == 0, (s.name, name, off)


def test_session_entry_fits_the_memory_budget():
    """struct ct_entry is 48 bytes: two of them plus keys and kernel headers per session keep
    1M sessions within 256 MiB of kernel memory (bench target)."""
    assert (layout.CT_KEY.size, layout.CT_ENTRY.size) == (16, 48)


def test_pack_unpack_round_trip_keeps_wire_order():
    """Big-endian fields travel as wire bytes: 198.18.40.10 packs as c6 12 28 0a."""
    raw = layout.CT_KEY.pack(saddr=0xC612280A, daddr=1, sport=40000, dport=80, proto=6, dir=1)
    assert raw[:4] == bytes([198, 18, 40, 10])
    assert raw[8:10] == (40000).to_bytes(2, "big")
    back = layout.CT_KEY.unpack(raw)
    assert back["saddr"] == 0xC612280A and back["sport"] == 40000 and back["dir"] == 1


def test_normal_handshake_reaches_established():
    """SYN -> SYN_RECV, SYN-ACK (reply) -> SYN_RECV, ACK -> ESTABLISHED (reference §3.3)."""
    s = tcp_next_state(CtState.NONE, TcpTable.IN_ONLY, TCP_SYN)
    assert s == CtState.SYN_RECV
    s = tcp_next_state(s, TcpTable.OUT, TCP_SYN | TCP_ACK)
    assert s == CtState.SYN_RECV
    s = tcp_next_state(s, TcpTable.IN, TCP_ACK)
    assert s == CtState.ESTABLISHED


def test_event_priority_rst_over_syn_over_fin_over_ack():
    """A segment with RST and SYN is an RST event; no flags at all moves to CLOSE."""
    assert tcp_next_state(CtState.ESTABLISHED, TcpTable.IN, TCP_RST | TCP_SYN) == CtState.CLOSE
    assert tcp_next_state(CtState.ESTABLISHED, TcpTable.IN, TCP_FIN | TCP_ACK) == CtState.CLOSE_WAIT
    assert tcp_next_state(CtState.ESTABLISHED, TcpTable.IN, 0) == CtState.CLOSE


def test_reason_numbers_are_stable():
    """Reason numbers are part of the pinned-map ABI: these must never change."""
    assert layout.Reason.XLATE_NEW == 0
    assert layout.Reason.DROP_MALFORMED == 15
    assert layout.Reason.DROP_TABLE_FULL == 18
    assert max(layout.Reason) < layout.REASON_MAX


def test_new_reasons_are_appended_and_fit_the_counter_array():
    """PASS_INTERNAL and PASS_FRAG_UNTRANSLATED took the next free numbers (22, 23)."""
    assert (layout.Reason.PASS_INTERNAL, layout.Reason.PASS_FRAG_UNTRANSLATED) == (22, 23)
    assert layout.Reason.DROP_BAD_CHECKSUM == 21
    assert max(layout.Reason) < layout.REASON_MAX


def test_pass_markers_only_for_untranslated_flows():
    """A passed first fragment leaves a marker unless it belongs to a flow the datapath would
    translate (PASS_TTL, PASS_FRAG_NEEDED); the C mask is the same set."""
    R = layout.Reason
    assert R.PASS_LOCAL in layout.FRAG_PASS_REASONS and R.PASS_NO_RULE in layout.FRAG_PASS_REASONS
    assert R.PASS_INTERNAL in layout.FRAG_PASS_REASONS and R.PASS_NO_SESSION_IN in layout.FRAG_PASS_REASONS
    assert not {R.PASS_TTL, R.PASS_FRAG_NEEDED} & layout.FRAG_PASS_REASONS
    assert not layout.FRAG_PASS_REASONS & (layout.DROP_REASONS | {R.XLATE_NEW, R.XLATE_IN})
    mask = sum(1 << int(r) for r in layout.FRAG_PASS_REASONS)
    assert f"#define FRAG_PASS_REASON_MASK 0x{mask:x}ULL" in layout.render_header()
