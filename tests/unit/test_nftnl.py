"""datapath/nftnl.py without root: the NFT_MSG_GETOBJ dump request it sends and its reading of
the kernel's NFT_MSG_NEWOBJ answers (the live read against `nft` is in tests/bpf, root)."""

import struct

from snatgw.datapath import nftnl as N


def obj(table: str, name: str, typ: int, packets: int, nbytes: int) -> bytes:
    """An NFT_MSG_NEWOBJ body after nfgenmsg, as the kernel lays it out."""
    data = N._attr(N.NFTA_COUNTER_BYTES, struct.pack(">Q", nbytes)) + N._attr(N.NFTA_COUNTER_PACKETS,
                                                                              struct.pack(">Q", packets))
    return (N._attr(N.NFTA_OBJ_TABLE, table.encode() + b"\0") + N._attr(N.NFTA_OBJ_NAME, name.encode() + b"\0")
            + N._attr(N.NFTA_OBJ_TYPE, struct.pack(">I", typ)) + N._attr(N.NFTA_OBJ_DATA | 0x8000, data))


def test_the_request_is_one_dump_of_the_tables_counter_objects():
    msg = N.request("ip", "snatgw_guard", seq=7)
    ln, typ, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (ln, typ, flags, seq) == (len(msg), (10 << 8) | 19, 0x301, 7)
    assert msg[16] == 2  # nfgenmsg: NFPROTO_IPV4
    attrs = {t: msg[a:b] for t, a, b in N._attrs(msg, 20, len(msg))}
    assert attrs == {N.NFTA_OBJ_TABLE: b"snatgw_guard\0", N.NFTA_OBJ_TYPE: b"\0\0\0\1"}


def test_a_counter_object_is_read_and_others_are_not():
    body = obj("snatgw_guard", "leak", N.NFT_OBJECT_COUNTER, 2**40 + 3, 1500)
    assert N.parse_counter(body, 0, len(body), "snatgw_guard") == ("leak", 2**40 + 3, 1500)
    for other in (obj("snatgw", "leak", N.NFT_OBJECT_COUNTER, 1, 1), obj("snatgw_guard", "q", 2, 1, 1)):
        assert N.parse_counter(other, 0, len(other), "snatgw_guard") is None  # another table; a quota
    cut = body[:-6]  # a truncated attribute is left, not read past
    assert N.parse_counter(cut, 0, len(cut), "snatgw_guard") == ("leak", 0, 0)


def test_the_chain_question_is_one_get_of_that_chain():
    msg = N.chain_request("ip", "snatgw_guard", "postrouting")
    ln, typ, flags, _, _ = struct.unpack_from("=IHHII", msg)
    assert (ln, typ, flags) == (len(msg), (10 << 8) | 4, 0x1)  # NFT_MSG_GETCHAIN, a get (no dump)
    attrs = {t: msg[a:b] for t, a, b in N._attrs(msg, 20, len(msg))}
    assert attrs == {N.NFTA_CHAIN_TABLE: b"snatgw_guard\0", N.NFTA_CHAIN_NAME: b"postrouting\0"}


class _Sock:
    """A netfilter socket whose answers are given datagrams (then a timeout, as a silent kernel)."""

    def __init__(self, datagrams):
        self.datagrams = list(datagrams)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def settimeout(self, t):
        pass

    def send(self, msg):
        pass

    def recv(self, n):
        import socket

        if not self.datagrams:
            raise socket.timeout("timed out")
        return self.datagrams.pop(0)[:n]


def _newobj(name: str, packets: int, seq: int = 1) -> bytes:
    body = N._NFGEN.pack(2, 0, 0) + obj("snatgw", name, N.NFT_OBJECT_COUNTER, packets, 1)
    return N._NLH.pack(N._NLH.size + len(body), (10 << 8) | N.NFT_MSG_NEWOBJ, N.NLM_F_MULTI, seq, 0) + body


def test_a_malformed_answer_is_a_backend_error_never_another_exception(monkeypatch):
    """Whatever the socket answers (a datagram cut short, a message longer than its datagram, an
    error message without its error number, random bytes), counters/chain_exists/table_shape
    end in an answer or a BackendError: the callers' fallbacks (the nft backend asks `nft`,
    stats leave the guard's drops out) catch that, not struct.error."""
    import random

    import pytest

    from snatgw.errors import BackendError

    done = N._NLH.pack(N._NLH.size + 4, N.NLMSG_DONE, N.NLM_F_MULTI, 1, 0) + bytes(4)
    good = _newobj("a", 1) + _newobj("b", 2) + done
    monkeypatch.setattr(N, "_open", lambda ns: _Sock([good]))
    assert N.counters("ip", "snatgw") == {"a": (1, 1), "b": (2, 1)}
    rnd = random.Random(7)
    bad = [good[:30], good[:-10], N._NLH.pack(N._NLH.size + 2, N.NLMSG_ERROR, 0, 1, 0) + bytes(2),
           N._NLH.pack(N._NLH.size, N.NLMSG_ERROR, 0, 1, 0)]
    for _ in range(300):
        b = bytearray(good)
        p = rnd.randrange(len(b) - 4)
        b[p:p + 4] = struct.pack("=I", rnd.randrange(1 << 32))
        bad.append(bytes(b[:rnd.randrange(16, len(b) + 1)]))
    for b in bad:
        for call in (lambda: N.counters("ip", "snatgw"), lambda: N.chain_exists("ip", "snatgw", "c"),
                     lambda: N.table_shape("ip", "snatgw", ["c", "d"])):  # fmt: skip
            monkeypatch.setattr(N, "_open", lambda ns, b=b: _Sock([b, done]))
            try:
                call()
            except BackendError:
                pass
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"{b.hex()}: {type(e).__name__}: {e}")


def test_an_interrupted_dump_is_asked_again(monkeypatch):
    """The kernel flags a dump whose ruleset changed between its datagrams NLM_F_DUMP_INTR (an
    nft run of any table in the namespace): its entries may be missed or repeated, so its
    figures are not taken (the hook check would count rules missing and reinstall; `nft`
    itself asks again).  Asked again up to 3 times, then a BackendError (the callers' `nft`
    fallback)."""
    import pytest

    from snatgw.errors import BackendError

    intr = 0x10  # NLM_F_DUMP_INTR
    done = N._NLH.pack(N._NLH.size + 4, N.NLMSG_DONE, N.NLM_F_MULTI, 1, 0) + bytes(4)
    cut = bytearray(_newobj("a", 1) + done)
    struct.pack_into("=H", cut, 6, N.NLM_F_MULTI | intr)  # the first message's flags
    whole = _newobj("a", 1) + _newobj("b", 2) + done
    answers = [[bytes(cut)], [whole]]
    monkeypatch.setattr(N, "_open", lambda ns: _Sock(answers.pop(0)))
    assert N.counters("ip", "snatgw") == {"a": (1, 1), "b": (2, 1)} and answers == []
    monkeypatch.setattr(N, "_open", lambda ns: _Sock([bytes(cut)]))
    with pytest.raises(BackendError, match="interrupted"):
        N.counters("ip", "snatgw")


def _msg(typ: int, seq: int, body: bytes = b"", flags: int = 0) -> bytes:
    body = N._NFGEN.pack(2, 0, 0) + body
    return N._NLH.pack(N._NLH.size + len(body), typ, flags, seq, 0) + body


def test_table_shape_asks_each_chain_on_one_socket_and_asks_again_when_interrupted(monkeypatch):
    """table_shape's requests share one socket, each with its own sequence number: a get of
    the table (1), of each chain asked in name order (2, 3: one there, one ENOENT), the rule
    dump (4); an answer of another sequence number is not taken for the one awaited.  A rule
    dump flagged NLM_F_DUMP_INTR has the whole question asked again."""
    import errno

    new = 10 << 8
    name = lambda t, v: N._attr(t, v.encode() + b"\0")  # noqa: E731
    table = _msg(new | N.NFT_MSG_NEWTABLE, 1, name(N.NFTA_TABLE_NAME, "snatgw"))
    chain_a = _msg(new | N.NFT_MSG_NEWCHAIN, 2, name(N.NFTA_CHAIN_TABLE, "snatgw") + name(N.NFTA_CHAIN_NAME, "a"))
    no_b = N._NLH.pack(N._NLH.size + 4, N.NLMSG_ERROR, 0, 3, 0) + struct.pack("=i", -errno.ENOENT)
    stale = _msg(new | N.NFT_MSG_NEWCHAIN, 9, name(N.NFTA_CHAIN_TABLE, "snatgw") + name(N.NFTA_CHAIN_NAME, "b"))
    rule = _msg(new | N.NFT_MSG_NEWRULE, 4, name(N.NFTA_RULE_TABLE, "snatgw"), N.NLM_F_MULTI)
    done = N._NLH.pack(N._NLH.size + 4, N.NLMSG_DONE, N.NLM_F_MULTI, 4, 0) + bytes(4)
    cut = _msg(new | N.NFT_MSG_NEWRULE, 4, name(N.NFTA_RULE_TABLE, "snatgw"), N.NLM_F_MULTI | N.NLM_F_DUMP_INTR)
    sent = []

    class Sock(_Sock):
        def send(self, msg):
            sent.append(struct.unpack_from("=IHHII", msg)[1:4])

    answers = [[table, chain_a, stale + no_b, cut], [table, chain_a, no_b, rule + rule, rule + done]]
    monkeypatch.setattr(N, "_open", lambda ns: Sock(answers.pop(0)))
    assert N.table_shape("ip", "snatgw", ["b", "a", "a"]) == ({"a"}, 3) and answers == []
    get, dump = N.NLM_F_REQUEST, N.NLM_F_REQUEST | N.NLM_F_DUMP
    once = [(new | N.NFT_MSG_GETTABLE, get, 1), (new | N.NFT_MSG_GETCHAIN, get, 2),
            (new | N.NFT_MSG_GETCHAIN, get, 3), (new | N.NFT_MSG_GETRULE, dump, 4)]  # fmt: skip
    assert sent == once + once
