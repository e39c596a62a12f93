"""Traffic in the lab: the echo servers in <P>-net (started from servers.py, events collected
from their stdout) and clients that run in the inside hosts (sockets opened inside the host's
namespace from this process): TCP, UDP, ping, and UDP with IP_RECVERR for ICMP errors.
Every client returns what the server saw (its JSON answer), so tests compare addresses.
"""

from __future__ import annotations

import errno
import json
import secrets
import select
import socket
import struct
import subprocess
import sys
import threading
import time

from .netns import LabError, ns_socket
from .topology import SERVERS

ECHO_PORT = 7007
CLOSED_PORT = 7999  # nothing listens here: the server answers ICMP port unreachable
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
SO_EE_ORIGIN_ICMP = 2


class EchoServers:
    """servers.py running in <P>-net; ``events`` holds every JSON line it printed."""

    def __init__(self, lab, port: int = ECHO_PORT, timeout: float = 10.0):
        from . import servers

        argv = [sys.executable, servers.__file__, "--port", str(port), "--icmp"]
        for a in SERVERS:
            argv += ["--addr", str(a)]
        self.port = port
        self.events: list[dict] = []
        self.cond = threading.Condition()
        self.proc = lab.popen("net", *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if r else ""
        if '"ready"' not in line:
            self.proc.kill()
            raise LabError(f"echo servers did not start: {line!r} {self.proc.stderr.read()[-500:]!r}")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                self.events.append(ev)
                self.cond.notify_all()

    def wait_for(self, pred, timeout: float = 3.0) -> dict | None:
        """The first event ``pred`` accepts, waiting up to ``timeout`` for it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _token() -> str:
    return "t" + secrets.token_hex(6)


def _bind(sock: socket.socket, src, sport: int) -> None:
    if src is not None or sport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(src) if src is not None else "0.0.0.0", sport))


class TcpSession:
    """A TCP connection from an inside host to a server that stays open across calls."""

    def __init__(self, lab, node: str, dst, port: int = ECHO_PORT, src=None, sport: int = 0,
                 timeout: float = 3.0):
        self.sock = ns_socket(lab.ns(node), socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buf = b""
        try:
            _bind(self.sock, src, sport)
            self.sock.connect((str(dst), port))
        except OSError:
            self.sock.close()
            raise
        self.local = "%s:%d" % self.sock.getsockname()

    def exchange(self, data: str | None = None) -> dict:
        """Send one line, return the server's JSON answer (what it saw)."""
        data = data or _token()
        self.sock.sendall(data.encode() + b"\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError(errno.ECONNRESET, "server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        reply = json.loads(line)
        reply["inside"] = self.local
        return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tcp_echo(lab, node: str, dst, port: int = ECHO_PORT, src=None, sport: int = 0,
             timeout: float = 3.0) -> dict:
    """Connect, send a line, return what the server saw ({"peer": "IP:PORT", "link": ...})."""
    with TcpSession(lab, node, dst, port, src, sport, timeout) as s:
        return s.exchange()


def udp_echo(lab, node: str, dst, port: int = ECHO_PORT, src=None, sport: int = 0,
             timeout: float = 3.0) -> dict:
    """Send one datagram, return the server's answer (what it saw)."""
    with ns_socket(lab.ns(node), socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        _bind(s, src, sport)
        s.connect((str(dst), port))
        tok = _token()
        s.send(tok.encode())
        while True:
            reply = json.loads(s.recv(65536))
            if reply.get("data") == tok:
                reply["inside"] = "%s:%d" % s.getsockname()
                return reply


def _icmp_csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(lab, node: str, dst, src=None, ident: int | None = None, servers: EchoServers | None = None,
         timeout: float = 3.0) -> dict:
    """One echo request from ``node``; returns {"reply": bool, "id": ident, "seen": server event}.
    The request carries a token, so the server's event is found even though the gateway
    translates the identifier."""
    ident = secrets.randbelow(0xFFFF) + 1 if ident is None else ident
    tok = _token().encode()
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    pkt = struct.pack("!BBHHH", 8, 0, _icmp_csum(hdr + tok), ident, 1) + tok
    got = False
    with ns_socket(lab.ns(node), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        if src is not None:
            s.bind((str(src), 0))
        s.sendto(pkt, (str(dst), 0))
        deadline = time.monotonic() + timeout
        while not got and (left := deadline - time.monotonic()) > 0:
            r, _, _ = select.select([s], [], [], left)
            if not r:
                break
            data, peer = s.recvfrom(65536)
            ihl = (data[0] & 0x0F) * 4
            if (peer[0] == str(dst) and data[ihl] == 0 and data[ihl + 4:ihl + 6] == struct.pack("!H", ident)
                    and data[ihl + 8:] == tok):
                got = True
    seen = servers.wait_for(lambda e: e.get("data") == tok.decode(), timeout=1.0) if servers else None
    return {"reply": got, "id": ident, "inside": str(src) if src else None, "seen": seen}


def udp_error(lab, node: str, dst, port: int = CLOSED_PORT, src=None, sport: int = 0,
              ttl: int | None = None, timeout: float = 3.0) -> dict:
    """Send a datagram on a connected socket with IP_RECVERR and report the error that comes
    back: {"errno": "ECONNREFUSED"|"EHOSTUNREACH"|None, "offender": IP, "type": t, "code": c,
    "inside": "IP:PORT"}."""
    with ns_socket(lab.ns(node), socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        if ttl is not None:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        _bind(s, src, sport)
        s.connect((str(dst), port))
        out = {"errno": None, "offender": None, "type": None, "code": None,
               "inside": "%s:%d" % s.getsockname()}
        s.send(_token().encode())
        r, _, _ = select.select([s], [], [], timeout)
        if not r:
            return out
        try:
            s.recv(65536)
        except OSError as e:
            out["errno"] = errno.errorcode.get(e.errno, str(e.errno))
        try:
            _data, anc, _flags, _addr = s.recvmsg(65536, 512, socket.MSG_ERRQUEUE)
        except BlockingIOError:
            return out
        except OSError:
            return out
        for level, kind, data in anc:
            if level == socket.IPPROTO_IP and kind == IP_RECVERR and len(data) >= 16:
                ee_errno, origin, etype, code = struct.unpack_from("=IBBB", data)
                if out["errno"] is None:
                    out["errno"] = errno.errorcode.get(ee_errno, str(ee_errno))
                if origin == SO_EE_ORIGIN_ICMP:
                    out["type"], out["code"] = etype, code
                if len(data) >= 16 + 8:  # struct sockaddr_in of the offender follows
                    out["offender"] = socket.inet_ntoa(data[16 + 4:16 + 8])
        return out


def count_packets(lab, node: str, match: str, table: str = "sglab_watch", hook: str = "prerouting"):
    """Install an nft counter in ``node`` of the packets ``match`` (nft syntax) selects at
    ``hook``; returns a function that reads the count."""
    lab.run(node, "nft", "delete", "table", "ip", table, check=False)
    lab.run(node, "nft", "-f", "-", input=(
        f"table ip {table} {{\n chain c {{\n  type filter hook {hook} priority -400;\n"
        f"  {match} counter\n }}\n}}\n"))

    def read() -> int:
        out = lab.run(node, "nft", "-j", "list", "table", "ip", table).stdout
        for item in json.loads(out)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
        raise LabError(f"no counter in table {table} of {node}")

    return read


def metrics_text(lab, addr: tuple[str, int] = ("127.0.0.1", 9469), node: str = "gw", timeout: float = 10.0) -> str:
    """GET /metrics from ``addr`` (the daemon's metrics_listen) inside ``node``'s namespace."""
    import http.client

    class NsHTTP(http.client.HTTPConnection):
        def connect(self):
            self.sock = ns_socket(lab.ns(node), socket.AF_INET, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(addr)

    c = NsHTTP(*addr, timeout=timeout)
    try:
        c.request("GET", "/metrics")
        r = c.getresponse()
        if r.status != 200:
            raise OSError(f"GET /metrics on {addr[0]}:{addr[1]} in {lab.ns(node)}: HTTP {r.status}")
        return r.read().decode()
    finally:
        c.close()


def udp_burst(lab, node: str, src: str, dst: str, sports, dport: int = 9, rounds: int = 1) -> None:
    """One UDP datagram per source port from ``src`` to ``dst`` (a raw socket in ``node``, so
    any source address and port), ``rounds`` times: one template with the source port patched
    in (UDP checksum 0: none; the kernel fills the IP header's)."""
    from scapy.layers.inet import IP, UDP
    from scapy.packet import raw

    tpl = bytearray(raw(IP(src=src, dst=dst) / UDP(sport=1, dport=dport, chksum=0) / b"pressure"))
    with ns_socket(lab.ns(node), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        for _ in range(rounds):
            for sp in sports:
                tpl[20:22] = sp.to_bytes(2, "big")
                s.sendto(tpl, (dst, 0))


__all__ = ["ECHO_PORT", "CLOSED_PORT", "EchoServers", "TcpSession", "tcp_echo", "udp_echo", "ping",
           "udp_error", "count_packets", "metrics_text", "udp_burst"]
