"""synctable.install through BpfBackend.sync_install over real maps (the backend stand-in of
test_backend.py; the routes a resolver of the test's and the route judgement taken as passed:
the lab's test_sync.py judges those): the audit lines of a batch that fails part way, the
per-host live count written by an atomic add, a peer's end lowering its host's count within
the job."""

import ipaddress
import socket

import pytest

from snatgw import layout as L
from snatgw.config.parse import parse_text
from snatgw.daemon import synccodec as C
from snatgw.datapath.bpf import synctable as T

from test_backend import backend  # noqa: F401  (fixture)
from test_loader import mini_obj, pin_dir  # noqa: F401  (fixtures)

pytestmark = pytest.mark.bpf

HOST = "198.18.40.10"
POOL = "198.19.2.71"
TEXT = ("snatgw {\n inside lan40\n outside eth1\n port_range 5000-65535\n}\nvirtual_server fwmark 1 {\n"
        " snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 max_sessions_per_host 3 }\n}\n")  # fmt: skip


class Routes:
    """resolver(addr[, src, iif]) -> (ifindex, nexthop, mtu); ``hook(addr)`` runs first (a
    datapath event between two records of one job; an exception: the batch fails there)."""

    def __init__(self):
        self.hook = None

    def __call__(self, addr, src=None, iif=0):
        if self.hook is not None:
            self.hook(str(addr))
        if str(addr) == HOST:
            return 3, ipaddress.IPv4Address(HOST), 1500
        return 2, ipaddress.IPv4Address("198.19.2.1"), 1500


@pytest.fixture
def sync(backend, monkeypatch):  # noqa: F811
    """The backend with TEXT's rule installed (its host limit: the datapath counts hosts), the
    test's routes; (backend, routes, audit lines)."""
    from snatgw.datapath.bpf.backend import install_rules
    from snatgw.datapath.bpf.prog_maps import compile_rules

    config = parse_text(TEXT)
    cfg, rules = compile_rules(config.rules, config.settings, lambda n: 0)
    install_rules(backend.maps, cfg, rules, backend._recount_for_limit)
    assert backend.host_counting()
    backend.config = config
    backend._pools = {r.rule_id: r.pool for r in config.rules}
    routes = Routes()
    backend.resolver = routes
    monkeypatch.setattr(T, "routed_as_rule", lambda *a: None)  # (the lab judges routes: test_sync.py)
    lines: list = []
    backend.audit_sink = lines.extend
    return backend, routes, lines


def rec(iport: int, remote: str = "203.0.113.10", op: int = C.OP_UPDATE, inside: str = HOST) -> C.Record:
    rule_id = next(iter(parse_text(TEXT).rules)).rule_id
    return C.Record(op, L.IPPROTO_UDP, int(L.CtState.UDP), 0, socket.inet_aton(inside), iport,
                    socket.inet_aton(remote), 53, socket.inet_aton(POOL), 5000 + iport % 1000, rule_id, 0)


def host_sessions(backend, host: str = HOST) -> int:
    raw = backend.maps.maps[L.MAP_HOST_SESS].get(ipaddress.IPv4Address(host).packed)
    return 0 if raw is None else L.LIVE_COUNT.unpack(raw)["sessions"]


def test_a_batch_that_fails_part_way_logs_the_sessions_it_installed_and_only_those(sync):
    """Three records; the second's route lookup fails with an error nothing expects (the job
    fails, the daemon counts an install error): the first record's session is in the table,
    so its create line is in the audit log; the second and third are not installed and have
    no line.  The lines were written only at the batch's end: a failure lost them all."""
    backend, routes, lines = sync

    def fail(addr):
        if addr == "203.0.113.12":
            raise RuntimeError("injected")

    routes.hook = fail
    counts = dict.fromkeys(T.COUNTS, 0)
    with pytest.raises(RuntimeError):
        backend.sync_install([rec(40001, "203.0.113.11"), rec(40002, "203.0.113.12"), rec(40003, "203.0.113.13")],
                             counts)  # fmt: skip
    assert counts["installed"] == 1
    assert [(x["inside_port"], x["remote_addr"], x.get("synced")) for x in lines] == [(40001, "203.0.113.11", True)]
    assert len(backend.maps.ct) == 2  # that one pair


def test_a_session_installed_whose_hosts_count_cannot_be_added_to_is_logged(sync, monkeypatch):
    """The host count's atomic add (snat_host_add's run) fails after the first record's pair
    went into the table (the job fails, the daemon counts an install error): that session is
    in the table, so its create line is in the audit log.  The line was made after the add:
    lost, though the session is there."""
    from snatgw.datapath.bpf.sweep import Sweeper

    backend, routes, lines = sync

    def add(self, host, n=1):
        raise OSError("injected")

    monkeypatch.setattr(Sweeper, "host_add", add)
    counts = dict.fromkeys(T.COUNTS, 0)
    with pytest.raises(OSError):
        backend.sync_install([rec(40051, "203.0.113.51"), rec(40052, "203.0.113.52")], counts)
    assert len(backend.maps.ct) == 2  # the first one's pair
    assert [(x["inside_port"], x["remote_addr"]) for x in lines] == [(40051, "203.0.113.51")]


def test_an_install_adds_to_its_hosts_count_without_losing_the_datapaths_increment(sync):
    """Two records of one host in one job; between them the datapath makes a session for that
    host (its atomic +1 on the host's live count, emulated here in the route lookup of the
    second record).  The install's own +1s are atomic adds: the count is the datapath's one
    plus the two installed.  The count was read once and written back whole (read, +1,
    write): the datapath's increment was lost, the host under-counted until the next sweep."""
    backend, routes, lines = sync
    hosts = backend.maps.maps[L.MAP_HOST_SESS]

    def datapath_new_flow(addr):
        if addr == "203.0.113.22":
            c = L.LIVE_COUNT.unpack(hosts.get(ipaddress.IPv4Address(HOST).packed))
            hosts.put(ipaddress.IPv4Address(HOST).packed, L.LIVE_COUNT.pack(sessions=c["sessions"] + 1,
                                                                            refusals=c["refusals"]))  # fmt: skip

    routes.hook = datapath_new_flow
    counts = dict.fromkeys(T.COUNTS, 0)
    assert backend.sync_install([rec(40011, "203.0.113.21"), rec(40012, "203.0.113.22")], counts) == []
    assert counts["installed"] == 2
    assert host_sessions(backend) == 3


def test_a_peers_end_makes_room_for_its_hosts_next_record_in_the_same_job(sync):
    """The host is at its limit (3 sessions, counted); the peer's end of one of them, then a
    new session of the same host, in one job: the end removes its pair and lowers the host's
    count as the job judges it, so the new one fits and is installed.  The count the job
    followed was not lowered by an end: refused as host_limit."""
    backend, routes, lines = sync
    counts = dict.fromkeys(T.COUNTS, 0)
    assert backend.sync_install([rec(40020 + i, f"203.0.113.{30 + i}") for i in range(3)], counts) == []
    assert counts["installed"] == 3 and host_sessions(backend) == 3
    counts = dict.fromkeys(T.COUNTS, 0)
    end = rec(40020, "203.0.113.30", op=C.OP_END)
    assert backend.sync_install([end, rec(40029, "203.0.113.39")], counts) == []
    assert (counts["ended"], counts["installed"], counts["host_limit"]) == (1, 1, 0), counts
    assert len(backend.maps.ct) == 6
