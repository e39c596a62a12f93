"""One daemon per network namespace: the running daemon holds an abstract unix socket,
``@snatgw/datapath-owner``.  The abstract socket namespace belongs to the network namespace, and
the name is released by the kernel when the process dies (kill -9 too): no lock file to go
stale, nothing to clean up.  A second `snatgw run` fails to bind it and asks the holder who it
is (its pid from SO_PEERCRED, its control socket and backend from the line it answers), then
refuses to start; `snatgw purge` asks the same question before removing anything.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct

from ..errors import DaemonError

OWNER_NAME = "snatgw/datapath-owner"


def _addr(name: str) -> bytes:
    return b"\0" + name.encode()


def current_owner(name: str = OWNER_NAME, timeout: float = 2.0) -> dict | None:
    """Who holds the namespace (``{"pid": ..., "socket": ..., "backend": ...}``), or None."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(_addr(name))
        except ConnectionRefusedError:
            return None
        except FileNotFoundError:
            return None
        except (BlockingIOError, InterruptedError):  # backlog full: someone holds it
            return {"pid": None}
        info: dict = {}
        try:
            pid, uid, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            info["pid"], info["uid"] = pid, uid
        except OSError:
            info["pid"] = None
        try:
            buf = b""
            while not buf.endswith(b"\n") and len(buf) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            got = json.loads(buf) if buf else {}
            if isinstance(got, dict):
                if info.get("uid") in (None, os.geteuid()):  # another user's words are not a daemon's
                    info.update({k: got[k] for k in ("socket", "backend", "config", "pid") if k in got})
        except (OSError, ValueError):
            pass  # a busy owner that did not answer in time is still the owner
        return info
    finally:
        s.close()


def foreign(info: dict) -> bool:
    """The holder runs as another user than we do: not a snatgw daemon of ours (an abstract
    name has no permissions: any local user can bind it first)."""
    return info.get("uid") is not None and info["uid"] != os.geteuid()


def describe(info: dict) -> str:
    parts = [f"pid {info['pid']}" if info.get("pid") else "pid unknown"]
    if foreign(info):
        parts.append(f"uid {info['uid']}")
    if info.get("backend"):
        parts.append(f"backend {info['backend']}")
    if info.get("socket"):
        parts.append(f"control socket {info['socket']}")
    return ", ".join(parts)


def _lock_holder(st: os.stat_result) -> int | None:
    """The pid holding a flock on the inode of ``st`` (/proc/locks), or None."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                w = line.split()
                if len(w) > 5 and w[1] == "FLOCK" and w[5] == dev:
                    return int(w[4])
    except (OSError, ValueError):
        pass
    return None


class PinDirLock:
    """An exclusive flock on the bpf pin directory, held for the daemon's life (released by the
    kernel when it dies).  The owner name above is per network namespace, but a pin directory is
    per bpffs mount: a daemon of another namespace (nsenter --net, a shared /sys/fs/bpf) given
    the same pin_dir adopted the first one's maps, so both gateways translated with the rules
    and sessions of whichever wrote last, and each listed its own."""

    def __init__(self, pin_dir: str):
        self.pin_dir = pin_dir
        self.fd = os.open(pin_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            st = os.fstat(self.fd)
            os.close(self.fd)
            self.fd = -1
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DaemonError(f"{pin_dir}: cannot lock the pin directory: {e.strerror}") from None
            pid = _lock_holder(st)
            raise DaemonError(
                f"{pin_dir}: the pin directory is in use by another snatgw daemon"
                f"{f' (pid {pid})' if pid else ''}, in another network namespace: its maps (rules, sessions) "
                "would be shared by both gateways; give each gateway its own pin_dir") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NamespaceOwner:
    """Bind the owner name or raise DaemonError naming the daemon that holds it."""

    def __init__(self, info: dict, name: str = OWNER_NAME):
        self.name = name
        self.info = {"pid": os.getpid(), **info}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(_addr(name))
        except OSError as e:
            self.sock.close()
            if e.errno != errno.EADDRINUSE:
                raise DaemonError(f"cannot take the namespace owner socket @{name}: {e.strerror}") from None
            other = current_owner(name) or {}
            if foreign(other):
                raise DaemonError(
                    f"the namespace owner name @{name} is held by a process of another user ({describe(other)}), "
                    "not by a snatgw daemon: any local user can bind an abstract socket name first; stop that "
                    f"process (`ss -xlp | grep {name}` names it), then start again") from None
            raise DaemonError(
                f"another snatgw daemon ({describe(other)}) owns the datapath of this network namespace; "
                "one daemon per namespace: stop that one first (systemctl stop snatgw, or SIGTERM), "
                "or use `snatgw reload` to change its config") from None
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.loop = None

    def attach(self, loop) -> None:
        self.loop = loop
        loop.add_reader(self.sock, self._answer)

    def _answer(self) -> None:
        for _ in range(16):
            try:
                c, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and the like: the asker still learns our pid from SO_PEERCRED
            try:
                c.setblocking(False)
                c.send(json.dumps(self.info).encode() + b"\n")
            except OSError:
                pass
            finally:
                c.close()

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove(self.sock)
        self.sock.close()
