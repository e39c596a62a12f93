"""Holding fragments that come before their first (docs/datapath.md "Fragments out of order").

TC programs cannot queue a packet, and this kernel has no qdisc that delays by timestamp (no
fq, no netem), so the bpf backend holds them in user space: a TAP device (layout.RECIRC_DEV)
whose egress the programs redirect a held fragment to (frag_v4_hold); ``FragmentHolder``'s
thread reads it from the TAP, waits (1 ms, doubling per round up to FRAG_HOLD_STEP_MAX_MS), and
writes it back, so it arrives on the TAP's ingress, where snat_recirc judges it again: by then
its first fragment has usually been translated (or passed) and it follows it.  Bounded: the
datapath gives up on a datagram FRAG_HOLD seconds after its first hold (DROP_FRAG_UNKNOWN), the
holder keeps at most ``capacity`` frames (more are dropped and counted), and the TAP goes
with the holder (a stopped daemon holds nothing; the fragments are then dropped, as before)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import struct
import subprocess
import threading
import time
from collections import OrderedDict

from ... import layout as L

log = logging.getLogger("snatgw.bpf.recirc")

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
CONF_DIR = "/proc/sys/net/ipv4/conf"


def _frame_key(frame: bytes) -> bytes:
    """A held fragment's identity across rounds: IPv4 source, destination, id, protocol, offset."""
    ip = frame[14:34]
    return ip[12:20] + ip[4:8] + ip[9:10] if len(ip) == 20 else frame[:34]


class FragmentHolder:
    """The TAP device and the thread that sends held fragments round it again."""

    def __init__(self, name: str = L.RECIRC_DEV, capacity: int = 1024):
        self.name = name
        self.capacity = capacity
        self.fd: int | None = None
        self.mac = b""
        self.held = 0  # frames taken in (each round counts)
        self.dropped = 0  # frames refused because `capacity` were waiting
        self._rounds: OrderedDict[bytes, tuple[int, float]] = OrderedDict()  # key -> (rounds, last)
        self._queue: list[tuple[float, bytes]] = []
        self._stop = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Create the TAP (up, MTU 65500, reverse-path filter off: it hands fragments of
        untranslated datagrams to the kernel) and start the thread.  False (logged) on failure."""
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        except OSError as e:
            log.warning("no fragment holding (/dev/net/tun: %s): fragments before their first are dropped", e)
            return False
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", self.name.encode(), IFF_TAP | IFF_NO_PI))
            for argv in (["ip", "link", "set", "dev", self.name, "mtu", "65500"],
                         ["ip", "link", "set", "dev", self.name, "up"]):
                r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                if r.returncode != 0:
                    raise OSError(f"{' '.join(argv)}: {r.stderr.strip()}")
            r = subprocess.run(["ip", "-j", "link", "show", "dev", self.name], capture_output=True, text=True,
                               timeout=10)
            self.mac = bytes.fromhex(json.loads(r.stdout)[0]["address"].replace(":", ""))
        except (OSError, ValueError, KeyError, IndexError) as e:
            os.close(fd)
            log.warning("no fragment holding (TAP %s: %s): fragments before their first are dropped", self.name, e)
            return False
        for key, val in (("rp_filter", "0"), ("accept_local", "1")):
            try:
                with open(os.path.join(CONF_DIR, self.name, key), "w") as f:
                    f.write(val + "\n")
            except OSError as e:
                log.warning("cannot set %s's %s: %s", self.name, key, e.strerror)
        self.fd = fd
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="snatgw-frag-holder", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """Stop the thread and close the TAP (the device goes with it)."""
        if self._thread is None:
            return
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        for fd in (self.fd, self._wake_r, self._wake_w):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd, self._thread = None, None

    # ------------------------------------------------------------------ the thread

    def _delay(self, frame: bytes, now: float) -> float:
        key = _frame_key(frame)
        rounds, _ = self._rounds.pop(key, (0, now))
        self._rounds[key] = (rounds + 1, now)
        while len(self._rounds) > 4 * self.capacity:  # bounded: forget the oldest
            self._rounds.popitem(last=False)
        return min(L.FRAG_HOLD_STEP_MAX_MS, L.FRAG_HOLD_STEP_MIN_MS << min(rounds, 16)) / 1000.0

    def _take(self, now: float) -> None:
        while True:
            try:
                frame = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            if len(frame) < 34:
                continue
            if len(self._queue) >= self.capacity:
                self.dropped += 1
                continue
            self.held += 1
            self._queue.append((now + self._delay(frame, now), frame))

    def _send_due(self, now: float) -> int:
        """Write back the frames whose wait is over (in through the TAP's ingress, addressed to
        it); returns how many."""
        due = [x for x in self._queue if x[0] <= now]
        if due:
            self._queue = [x for x in self._queue if x[0] > now]
            for _, frame in due:
                try:
                    os.write(self.fd, self.mac + frame[6:])
                except OSError:
                    pass
        return len(due)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the holder must outlive any one bad round
                log.exception("fragment holder: a round failed; carrying on")
                self._queue.clear()
                time.sleep(0.1)

    def _step(self) -> None:
        now = time.monotonic()
        self._send_due(now)
        wait = min((x[0] for x in self._queue), default=now + 1.0) - time.monotonic()
        r, _, _ = select.select([self.fd, self._wake_r], [], [], max(0.0, min(wait, 1.0)))
        if self.fd in r:
            self._take(time.monotonic())
