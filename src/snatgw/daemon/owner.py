"""One daemon per network namespace.  Two marks, one authority:

- the owner lock: an exclusive flock on ``/run/snatgw/owner/<name>-<netns>.lock`` (netns: the
  device and inode of /proc/self/ns/net), in a directory only root may write.  The kernel
  releases it when the holder dies (kill -9 too), so nothing goes stale; the file holds the
  holder's pid, control socket, backend and config as one JSON line, and is removed when the
  holder stops (a starter that locked a file just removed sees it gone and takes the new one;
  one left by kill -9 is simply taken).  This decides.
- the abstract unix socket ``@snatgw/datapath-owner`` (per network namespace, released with the
  process), which answers the same line; the daemons before the lock file had only this.  An
  abstract name has no permissions: any local user can bind it first.  That used to stop the
  daemon from starting at all; now the lock decides, and a squatted name is only reported.

A second `snatgw run` fails to take the lock and names the holder from the file, then refuses
to start; `snatgw purge` asks the same question (`current_owner`) before removing anything.
A daemon of an older version (the name, no lock) is still met through the name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import struct

from ..errors import DaemonError

OWNER_NAME = "snatgw/datapath-owner"
#: where the owner locks live: created 0700; refused when others could write there
OWNER_LOCK_DIR = "/run/snatgw/owner"


def _netns_id() -> str:
    st = os.stat("/proc/self/ns/net")
    return f"{st.st_dev:x}-{st.st_ino}"


def lock_path(name: str = OWNER_NAME, lock_dir: str = OWNER_LOCK_DIR) -> str:
    return os.path.join(lock_dir, f"{name.replace('/', '_')}-{_netns_id()}.lock")


def state_path(kind: str, name: str = OWNER_NAME, lock_dir: str = OWNER_LOCK_DIR, lock: str | None = None) -> str:
    """This namespace's run-time state file of ``kind`` next to its owner lock (``lock``: that
    lock's path, the daemon's; `snatgw purge` reads the file after a daemon killed): the same
    name, ``.<kind>`` for ``.lock``."""
    return (lock or lock_path(name, lock_dir)).removesuffix(".lock") + "." + kind


def _lock_dir_ok(lock_dir: str) -> None:
    """Create ``lock_dir`` (0700) or check it: ours or root's, writable by nobody else."""
    try:
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        st = os.stat(lock_dir)
    except OSError as e:
        raise DaemonError(f"{lock_dir}: cannot create the owner lock directory: {e.strerror}") from None
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise DaemonError(
            f"{lock_dir}: the owner lock directory is owned by uid {st.st_uid} with mode "
            f"{st.st_mode & 0o7777:04o}; expected owned by root (or uid {os.geteuid()}) and writable by "
            "nobody else (others could take the lock and stop every start): fix or remove it") from None


def _open_and_try(path: str, mode: int, how: int) -> tuple[int, OSError | None] | None:
    """The file at ``path`` opened (never through a symlink) and flock(how) tried without
    waiting: (fd, None) when taken, (fd, the error) when not; None when it cannot be opened.
    The caller closes fd."""
    try:
        fd = os.open(path, mode | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except OSError as e:
        return fd, e
    return fd, None


def _same_file(fd: int, path: str) -> bool:
    """fd is still the file at path (not one unlinked, nor replaced by another)."""
    try:
        st, at = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (at.st_dev, at.st_ino)


def _lock_held(path: str) -> dict | None:
    """The owner lock's holder as the file describes it, or None when nobody holds it."""
    got = _open_and_try(path, os.O_RDONLY, fcntl.LOCK_SH)
    if got is None:
        return None
    fd, err = got
    try:
        if err is None or err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None  # we got it shared: nobody holds it exclusively
        info: dict = {}
        try:
            read = json.loads(os.read(fd, 4096) or b"{}")
            if isinstance(read, dict):
                info = {k: read[k] for k in ("socket", "backend", "config", "pid") if k in read}
        except (OSError, ValueError):
            pass
        info["pid"] = _lock_holder(os.fstat(fd)) or info.get("pid")
        return info
    finally:
        os.close(fd)


def remove_stale_lock(name: str = OWNER_NAME, lock_dir: str = OWNER_LOCK_DIR) -> str | None:
    """Remove this namespace's owner lock file when no daemon holds it (one killed with
    SIGKILL leaves it behind; a daemon that stops removes its own): taken first, then unlinked
    only if it is still the file at that path, as a stopping daemon does.  Returns the path
    removed, or None (no file, or a daemon holds it)."""
    path = lock_path(name, lock_dir)
    got = _open_and_try(path, os.O_RDWR, fcntl.LOCK_EX)
    if got is None:
        return None
    fd, err = got
    try:
        if err is not None or not _same_file(fd, path):
            return None  # held: a daemon owns the namespace (or the file was just replaced)
        os.unlink(path)
        return path
    finally:
        os.close(fd)


def _addr(name: str) -> bytes:
    return b"\0" + name.encode()


def current_owner(name: str = OWNER_NAME, timeout: float = 2.0, lock_dir: str = OWNER_LOCK_DIR) -> dict | None:
    """Who holds the namespace (``{"pid": ..., "socket": ..., "backend": ...}``), or None: the
    owner lock's holder; else whoever holds the owner name (a daemon of an older version, or a
    process of another user: ``foreign``)."""
    held = _lock_held(lock_path(name, lock_dir))
    return held if held is not None else name_holder(name, timeout)


def name_holder(name: str = OWNER_NAME, timeout: float = 2.0) -> dict | None:
    """Who holds the owner name, as it answers (pid from SO_PEERCRED), or None."""
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

    def __init__(self, pin_dir: str, made: bool = False):
        self.pin_dir = pin_dir
        self.made = made  # this daemon made the directory: it goes at release if nothing is pinned
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
            if self.made:  # removed while held: no other daemon is using it (a failed start's)
                with contextlib.suppress(OSError):  # not empty: the kept datapath's pins
                    os.rmdir(self.pin_dir)
            os.close(self.fd)
            self.fd = -1


def _owned_by(other: dict) -> DaemonError:
    return DaemonError(
        f"another snatgw daemon ({describe(other)}) owns the datapath of this network namespace; "
        "one daemon per namespace: stop that one first (systemctl stop snatgw, or SIGTERM), "
        "or use `snatgw reload` to change its config")


class NamespaceOwner:
    """Take the owner lock and the owner name, or raise DaemonError naming the daemon that holds
    them.  ``squatter``: set when another user's process holds the name (reported, not fatal)."""

    def __init__(self, info: dict, name: str = OWNER_NAME, lock_dir: str = OWNER_LOCK_DIR):
        self.name = name
        self.info = {"pid": os.getpid(), **info}
        self.sock: socket.socket | None = None
        self.squatter: dict | None = None
        self.loop = None
        self.lock_fd = -1
        _lock_dir_ok(lock_dir)
        self.lock_path = lock_path(name, lock_dir)
        for _ in range(8):  # a holder removing the file as we open it: take the new one
            if self._take_lock():
                break
        else:
            raise DaemonError(f"{self.lock_path}: the owner lock file keeps being replaced; not starting")
        try:
            os.ftruncate(self.lock_fd, 0)
            os.pwrite(self.lock_fd, json.dumps(self.info).encode() + b"\n", 0)
            self._bind()
        except BaseException:
            self.close()
            raise

    def state_path(self, kind: str) -> str:
        """A run-time state file of this daemon's namespace, next to its owner lock (the same
        name, ``.<kind>`` for ``.lock``): only the lock's holder writes it; it outlives a daemon
        killed, for the next one (the `rps_cpus` masks before: daemon/rps.py)."""
        return state_path(kind, lock=self.lock_path)

    def _take_lock(self) -> bool:
        """Lock the file at lock_path: True when it is ours and still the one at that path (the
        holder removes it when it stops, so a lock on a file just unlinked is no lock)."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise DaemonError(f"{self.lock_path}: cannot open the owner lock: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DaemonError(f"{self.lock_path}: cannot take the owner lock: {e.strerror}") from None
            other = _lock_held(self.lock_path) or {}
            raise _owned_by(other) from None
        if not _same_file(fd, self.lock_path):
            os.close(fd)
            return False
        self.lock_fd = fd
        return True

    def _bind(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(_addr(self.name))
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE:
                raise DaemonError(f"cannot take the namespace owner socket @{self.name}: {e.strerror}") from None
            other = name_holder(self.name) or {}
            if foreign(other):  # not a daemon: the lock is ours, the name only an answering machine
                self.squatter = other
                return
            raise _owned_by(other) from None  # a daemon of an older version: the name, no lock
        sock.listen(16)
        sock.setblocking(False)
        self.sock = sock

    def attach(self, loop) -> None:
        if self.sock is None:
            return
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
        if self.sock is not None:
            if self.loop is not None:
                self.loop.remove(self.sock)
            self.sock.close()
            self.sock = None
        if self.lock_fd >= 0:  # removed while still locked (a starter that opened it retries)
            if _same_file(self.lock_fd, self.lock_path):
                with contextlib.suppress(OSError):
                    os.unlink(self.lock_path)
            os.close(self.lock_fd)
            self.lock_fd = -1
