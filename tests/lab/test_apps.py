"""Applications that just work (issue 12): real third-party programs and real sockets through
kernel nftables SNAT (the reference), snatgw nft and snatgw bpf, in one test each (apps_env):
every check the reference passes must pass on both snatgw backends; the reference's own
failures are documented exceptions (docs/datapath.md, "Applications")."""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import time

import pytest

from snatgw.lab.netns import ns_socket

from tests.lab.apps_env import CLIENT, MODES, SCOREBOARD, SERVER, build, each, judge, wait_port

pytestmark = [pytest.mark.root, pytest.mark.lab]

HTTP_PORT = 8080
BLOB = 5 * 1024 * 1024  # the download of the narrow-hop test


@pytest.fixture(scope="module")
def gws():
    made = {}
    try:
        for mode in MODES:
            made[mode] = build(mode)
        for gw in made.values():  # an HTTP server with a 5 MB file in each lab's `net`
            root = os.path.join(gw.lab.workdir, "www")
            os.makedirs(root, exist_ok=True)
            with open(os.path.join(root, "blob"), "wb") as f:
                f.write(os.urandom(BLOB))
            gw.popen("net", sys.executable, "-m", "http.server", "--bind", "0.0.0.0", "--directory", root,
                     str(HTTP_PORT))
            wait_port(gw, "net", HTTP_PORT)
        yield made
    finally:
        for gw in made.values():
            gw.lab.down()


def curl(gw, path: str = "/blob", node: str = "in40") -> str:
    out = gw.run(node, "curl", "-sS", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                 f"http://{SERVER}:{HTTP_PORT}{path}", timeout=30).stdout.split()
    assert out == ["200", str(BLOB)], f"curl got {out}"
    return f"HTTP {out[0]}, {out[1]} bytes"


def test_curl_downloads_5mb(gws):
    """curl fetches a 5 MB file from an HTTP server behind the uplink."""
    judge("curl 5 MB", each(gws, curl))


# --------------------------------------------------------------------------- timeouts


def test_half_closed_tcp_survives_a_server_answering_10s_after_the_clients_fin(gws):
    """The client sends its request and FIN (shutdown(SHUT_WR)); the server answers 10.5 s later
    (RFC 5382 REQ-5: transitory states last at least 4 minutes).  With the original's 7 s
    CLOSE_WAIT the late answer met no session and the server was reset."""

    def half_closed(gw):
        srv = ns_socket(gw.ns("net"), socket.AF_INET, socket.SOCK_STREAM)
        cli = ns_socket(gw.ns("in40"), socket.AF_INET, socket.SOCK_STREAM)
        try:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((SERVER, 9200))
            srv.listen(1)
            srv.settimeout(5)
            cli.settimeout(20)
            cli.bind((CLIENT, 0))
            cli.connect((SERVER, 9200))
            conn, peer = srv.accept()
            with conn:
                conn.settimeout(5)
                cli.sendall(b"request")
                cli.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := conn.recv(100):
                    got += chunk
                assert got == b"request"
                time.sleep(10.5)
                conn.sendall(b"late answer")
                conn.shutdown(socket.SHUT_WR)
                answer = b""
                while chunk := cli.recv(100):
                    answer += chunk
            assert answer == b"late answer", f"client got {answer!r}"
            return f"answer after 10.5 s in CLOSE_WAIT, server saw {peer[0]}"
        finally:
            cli.close()
            srv.close()

    judge("half-closed TCP, answer 10.5 s after FIN", each(gws, half_closed))


# --------------------------------------------------------------------------- the narrow inside hop

SO_EE_ORIGIN_ICMP = 2
IP_RECVERR = 11
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2  # linux/in.h


def _error_queue(sock: socket.socket, timeout: float = 3.0) -> tuple[int, int, int, int, int, str]:
    """The first queued error: (errno, origin, ICMP type, code, info, offender address)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, anc, _, _ = sock.recvmsg(2048, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AssertionError("no ICMP error reached the server's socket") from None
            time.sleep(0.02)
            continue
        for level, typ, data in anc:
            if level == socket.IPPROTO_IP and typ == IP_RECVERR:
                ee_errno, origin, itype, code, _, info, _ = struct.unpack_from("=IBBBBII", data)
                offender = socket.inet_ntoa(data[16 + 4: 16 + 8]) if len(data) >= 24 else "?"
                return ee_errno, origin, itype, code, info, offender
        raise AssertionError(f"error queue without IP_RECVERR: {anc}")


def _udp_pair(gw, port: int):
    """A UDP server socket in `net` (IP_RECVERR on) and a client in in40 that sent it a datagram;
    returns (server, client, the client's public address as the server saw it)."""
    srv = ns_socket(gw.ns("net"), socket.AF_INET, socket.SOCK_DGRAM)
    cli = ns_socket(gw.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((SERVER, port))
    srv.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    srv.settimeout(3)
    cli.bind((CLIENT, 0))
    cli.settimeout(1)
    cli.sendto(b"hello", (SERVER, port))
    _, public = srv.recvfrom(100)
    return srv, cli, public


@pytest.fixture
def narrow_inside(gws):
    """The gateway's inside device at MTU 1400 (the host stays at 1500); restored after."""
    for gw in gws.values():
        gw.lab.ip("gw", "link", "set", "dev", "lan40", "mtu", "1400")
        gw.run("net", "ip", "route", "flush", "cache")  # no path MTU learnt before
    try:
        yield
    finally:
        for gw in gws.values():
            gw.lab.ip("gw", "link", "set", "dev", "lan40", "mtu", "1500")
            gw.run("net", "ip", "route", "flush", "cache")


def test_download_completes_when_the_inside_link_is_the_narrow_hop(gws, narrow_inside):
    """Inside device MTU 1400, host 1500: the server's 1500-byte segments get "fragmentation
    needed (mtu 1400)" from the gateway about the SNAT address, and the 5 MB download completes
    (snatgw used to hand them to the kernel untranslated, which reset the connection)."""
    judge("curl 5 MB, inside MTU 1400", each(gws, curl))


def test_udp_reply_over_the_inside_mtu_gets_frag_needed_about_the_snat_address(gws, narrow_inside):
    """A 1450-byte UDP reply with DF toward the 1400-byte inside link: the server's socket gets
    ICMP fragmentation needed, mtu 1400, from the gateway (the kernel delivers it to the socket
    only when the quoted header shows the SNAT address and port the server used)."""

    def frag_needed(gw):
        srv, cli, public = _udp_pair(gw, 9300)
        try:
            srv.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
            srv.sendto(b"x" * 1450, public)
            err = _error_queue(srv)
            assert err[:5] == (errno.EMSGSIZE, SO_EE_ORIGIN_ICMP, 3, 4, 1400), f"error {err}"
            return f"frag-needed mtu {err[4]} from {err[5]} about {public[0]}:{public[1]}"
        finally:
            srv.close()
            cli.close()

    judge("UDP reply > inside MTU: frag-needed to the remote", each(gws, frag_needed))


def test_udp_reply_whose_ttl_runs_out_gets_time_exceeded_about_the_snat_address(gws):
    """A reply sent with TTL 2 arrives at the gateway with TTL 1: the server's socket gets ICMP
    time exceeded from the gateway, about the SNAT address and port it used."""

    def time_exceeded(gw):
        srv, cli, public = _udp_pair(gw, 9301)
        try:
            srv.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 2)
            srv.sendto(b"short-lived", public)
            err = _error_queue(srv)
            assert err[:4] == (errno.EHOSTUNREACH, SO_EE_ORIGIN_ICMP, 11, 0), f"error {err}"
            with pytest.raises(OSError):
                cli.recv(100)  # and the inside host got nothing
            return f"time exceeded from {err[5]} about {public[0]}:{public[1]}"
        finally:
            srv.close()
            cli.close()

    judge("UDP reply TTL runs out: time exceeded to the remote", each(gws, time_exceeded))


def test_zz_scoreboard(gws):
    """Every check of this module, per gateway: the pass counts (printed with -s)."""
    counts = {m: sum(1 for r in SCOREBOARD.values() if m in r and r[m].ok) for m in MODES}
    total = len(SCOREBOARD)
    print(f"\napps scoreboard: {total} checks; " + ", ".join(f"{m} {counts[m]}/{total}" for m in MODES))
    for name, r in SCOREBOARD.items():
        print(f"  {name:60} " + " ".join(f"{m}:{'pass' if r[m].ok else 'FAIL'}" for m in MODES if m in r))
        for m in MODES:
            if m in r:
                print(f"      {m:7} {r[m].detail[:150]}")
    assert total > 0
