"""The lab's servers in <P>-net, a standalone script (stdlib only; run by path with the venv's
python via nsenter): TCP and UDP echo on each server address that answer every line/datagram
with JSON saying what they saw (peer address:port, local address, arrival link), and an ICMP
watcher that reports echo requests.  The arrival link: UDP and ICMP from IP_PKTINFO; TCP from
the SYN's mark (the lab marks packets with their arrival ifindex in <P>-net, and
net.ipv4.tcp_fwmark_accept=1 copies it to the accepted socket).  Every event is also printed as a JSON line on stdout;
the first line is {"ready": ...} once everything is bound.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import struct
import sys

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
SO_MARK = getattr(socket, "SO_MARK", 36)


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def link_of(ancdata) -> str | None:
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 4:
            try:
                return socket.if_indextoname(struct.unpack_from("i", data)[0])
            except OSError:
                return None
    return None


class Server:
    def __init__(self, addrs: list[str], port: int, icmp: bool):
        self.sel = selectors.DefaultSelector()
        self.bufs: dict[socket.socket, bytes] = {}
        for addr in addrs:
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t.bind((addr, port))
            t.listen(128)
            t.setblocking(False)
            self.sel.register(t, selectors.EVENT_READ, ("listen", None))
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            u.bind((addr, port))
            u.setblocking(False)
            self.sel.register(u, selectors.EVENT_READ, ("udp", None))
        if icmp:
            r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            r.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            r.setblocking(False)
            self.sel.register(r, selectors.EVENT_READ, ("icmp", None))

    def serve(self) -> None:
        while True:
            for key, _ in self.sel.select():
                kind, link = key.data
                try:
                    getattr(self, "on_" + kind)(key.fileobj, link)
                except OSError:
                    pass

    def on_listen(self, sock, link) -> None:
        conn, peer = sock.accept()
        conn.setblocking(False)
        try:
            link = socket.if_indextoname(conn.getsockopt(socket.SOL_SOCKET, SO_MARK))
        except OSError:
            link = None
        local = conn.getsockname()
        info = {"proto": "tcp", "peer": f"{peer[0]}:{peer[1]}", "local": f"{local[0]}:{local[1]}",
                "link": link}
        emit({"event": "accept", **info})
        self.bufs[conn] = b""
        self.sel.register(conn, selectors.EVENT_READ, ("conn", info))

    def on_conn(self, conn, info) -> None:
        data = conn.recv(65536)
        if not data:
            self.sel.unregister(conn)
            self.bufs.pop(conn, None)
            conn.close()
            emit({"event": "close", **info})
            return
        buf = self.bufs[conn] + data
        *lines, self.bufs[conn] = buf.split(b"\n")
        for line in lines:
            reply = {**info, "data": line.decode(errors="replace")}
            conn.sendall(json.dumps(reply).encode() + b"\n")

    def on_udp(self, sock, _link) -> None:
        data, anc, _flags, peer = sock.recvmsg(65536, 256)
        local = sock.getsockname()
        info = {"proto": "udp", "peer": f"{peer[0]}:{peer[1]}", "local": f"{local[0]}:{local[1]}",
                "link": link_of(anc), "data": data.decode(errors="replace")}
        emit({"event": "datagram", **info})
        sock.sendto(json.dumps(info).encode(), peer)

    def on_icmp(self, sock, _link) -> None:
        pkt, anc, _flags, _peer = sock.recvmsg(65536, 256)
        ihl = (pkt[0] & 0x0F) * 4
        if len(pkt) < ihl + 8 or pkt[ihl] != 8:  # echo requests only
            return
        src, dst = socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(pkt[16:20])
        ident, seq = struct.unpack_from("!HH", pkt, ihl + 4)
        emit({"event": "echo", "proto": "icmp", "peer": src, "local": dst, "id": ident, "seq": seq,
              "ttl": pkt[8], "link": link_of(anc), "data": pkt[ihl + 8:].decode(errors="replace")})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--addr", action="append", required=True)
    ap.add_argument("--port", type=int, default=7007)
    ap.add_argument("--icmp", action="store_true")
    a = ap.parse_args(argv)
    srv = Server(a.addr, a.port, a.icmp)
    emit({"ready": True, "addrs": a.addr, "port": a.port})
    try:
        srv.serve()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
