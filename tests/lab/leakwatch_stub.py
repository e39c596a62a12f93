"""A stand-in for the edge work's leak watcher (snatgw.lab.leakwatch), with its interface:
``start(ns, dev, nets) -> watcher``; ``watcher.stop() -> offending frames``.  It captures on
``dev`` in namespace ``ns`` (AF_PACKET, every frame) and keeps the IPv4 frames whose source
lies in one of ``nets``.  Used only until the real module lands on main."""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import threading

from snatgw.lab.netns import ns_socket

ETH_P_ALL = 0x0003
MAX_KEPT = 1000


class Watcher:
    def __init__(self, ns: str, dev: str, nets):
        self.nets = [ipaddress.IPv4Network(n) for n in nets]
        self.sock = ns_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((dev, 0))
        self.sock.setblocking(False)
        self.frames: list[bytes] = []
        self.seen = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _bad(self, frame: bytes) -> bool:
        if len(frame) < 34 or struct.unpack_from("!H", frame, 12)[0] != 0x0800:
            return False
        src = ipaddress.IPv4Address(frame[26:30])
        return any(src in n for n in self.nets)

    def _run(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.sock], [], [], 0.1)
            if not r:
                continue
            for _ in range(256):
                try:
                    frame, addr = self.sock.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] == socket.PACKET_OUTGOING:
                    continue  # only what arrives from the gateway on the ISP side
                self.seen += 1
                if self._bad(frame) and len(self.frames) < MAX_KEPT:
                    self.frames.append(frame)

    def stop(self) -> list[bytes]:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()
        return self.frames


def start(ns: str, dev: str, nets) -> Watcher:
    return Watcher(ns, dev, nets)
