"""The control socket: a unix stream socket (mode 0600, its directory 0700 when we create it;
an existing directory another user could write to or owns is refused: check_socket_dir)
speaking JSON lines.  Each request is one JSON object ``{"op": ..., ...}`` on one line; each
response is one JSON object on one line, ``{"ok": true, ...}`` or ``{"ok": false, "error": ...,
"code": ..., "exit": N}``.  Ops: status, reload, rules, sessions, stats, rate, flush, zero, adm
(see Service.handle).  ``request()`` is the client the CLI verbs use.

The server runs on the daemon's EventLoop (loop.py): non-blocking accept (backlog 128) and
reads on the loop thread, one request per connection at a time handed to the Worker; `status`
is answered on the loop itself, so it answers even while a long reload runs.  A dispatch may
answer a loop.Partial (a `sessions` listing of up to 100,000): each further piece is queued
behind the requests waiting then, so other clients are answered between its pieces.  Bounds: a
request line of at most MAX_REQUEST bytes, MAX_BUFFERED bytes over all connections,
MAX_CLIENTS connections (beyond, the longest-silent client not waiting for an answer is closed
for a newcomer, else accepting pauses), IDLE_TIMEOUT seconds without progress
closes a connection, and at most MAX_LISTINGS long answers (a listing of more than one piece)
are being built or wait to be written at once: another is answered EBUSY (twenty clients that
asked for 100,000 sessions each and read nothing held 1.3 GB).  When accept() fails for lack
of file descriptors (EMFILE at the unit's LimitNOFILE) the listener is paused for ACCEPT_PAUSE
seconds instead of spinning on a socket that stays readable.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import threading
import time
from typing import Callable

from ..config import MAX_CONFIG_BYTES, MAX_SOCKET_PATH
from ..errors import DaemonError
from .log import Log
from .loop import EventLoop, Partial, Worker, is_fd_exhaustion

MAX_REQUEST = 2 * MAX_CONFIG_BYTES + 65536  # bytes of one request line (a reload may carry a config)
MAX_BUFFERED = 2 * MAX_REQUEST  # bytes of unanswered requests over all connections
MAX_CLIENTS = 256
BACKLOG = 128
MAX_LISTINGS = 2  # long answers (Partial) being built or written at once; ~120 MB each at 100,000 sessions
IDLE_TIMEOUT = 10.0  # seconds a client may stay silent (or not read its answer)
ACCEPT_PAUSE = 0.5  # seconds the listener rests after EMFILE/ENFILE
INLINE_OPS = ("status",)  # answered on the loop thread, never queued behind a long job


def _libc_trim():
    """glibc's malloc_trim, or None (another libc): gives the heap's free pages back."""
    try:
        import ctypes
        import ctypes.util

        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


#: after the last long answer is written, the worker returns the memory the listing freed to
#: the kernel: without it RSS settled 100-230 MiB above the start after big listings (glibc keeps
#: freed arena pages for the next ones); None where the libc has no malloc_trim
TRIM = _libc_trim()


class NoDaemon(DaemonError):
    """Nothing listens on the control socket."""


def request(path: str, req: dict, timeout: float = 30.0) -> dict:
    """Send one request, return the response dict.  NoDaemon when nothing listens.  A full
    listen backlog (EAGAIN on connect) is retried until ``timeout``."""
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        delay = 0.005
        while True:
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise NoDaemon(f"no snatgw daemon on {path}: {e.strerror}") from None
            except PermissionError:
                raise DaemonError(f"{path}: permission denied (the control socket is root-only)") from None
            except (BlockingIOError, InterruptedError):  # EAGAIN: the backlog is full right now
                if time.monotonic() + delay > deadline:
                    raise DaemonError(f"the daemon on {path} accepted no connection within {timeout:g} s") \
                        from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
                s.close()
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(max(0.01, deadline - time.monotonic()))
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    except socket.timeout:
        raise DaemonError(f"the daemon on {path} did not answer within {timeout:g} s") from None
    except (ConnectionResetError, BrokenPipeError) as e:
        raise DaemonError(f"the daemon on {path} closed the connection: {e.strerror}") from None
    finally:
        s.close()
    if not buf:
        raise DaemonError(f"the daemon on {path} closed the connection without an answer")
    try:
        resp = json.loads(buf)
    except ValueError:
        raise DaemonError(f"the daemon on {path} answered something that is not JSON") from None
    if not isinstance(resp, dict):
        raise DaemonError(f"the daemon on {path} answered something that is not a JSON object")
    ANSWERED.append(path)
    return resp


#: the sockets whose daemon answered in this process (most recent last): a CLI verb that then
#: fails reading the answer (a field missing or of another type: a daemon of another snatgw
#: version, running on after an upgrade until its restart) says so instead of a traceback
#: (cli.main.unreadable_answer)
ANSWERED: list[str] = []


def _live(path: str) -> str | None:
    """Why the socket at ``path`` is not stale (None: nothing listens, it may be replaced).  A
    listener that does not answer in time is alive too: a daemon still starting (its loop runs
    after the datapath's start, seconds for bpf) had its socket taken over by a second one."""
    try:
        request(path, {"op": "status"}, timeout=2.0)
        return "another snatgw daemon is already running on it"
    except NoDaemon:
        return None
    except (DaemonError, ValueError) as e:
        return f"something listens on it (a snatgw daemon still starting?) but gave no status ({e})"


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_socket_dir(path: str, parent: str) -> None:
    """Refuse a control socket whose directory lets another user replace it: one writable by
    group or others without the sticky bit (/tmp's 1777 is fine: only a file's owner may
    remove it there), or one owned by a user other than root and the daemon's own.  Such a
    user could unlink the socket and bind theirs, and `snatgw reload`, `adm`, `flush` from
    root would talk to them."""
    st = os.stat(parent)
    me = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    why = None
    if st.st_uid not in (0, me):
        why = f"is owned by {_owner(st.st_uid)}"
    elif mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        who = [w for bit, w in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others")) if mode & bit]
        why = f"is writable by {' and '.join(who)} without the sticky bit"
    if why:
        raise DaemonError(
            f"control socket {path}: its directory {parent} {why} (owner {_owner(st.st_uid)}, mode "
            f"{mode:04o}); another user could replace the socket. Expected a directory owned by root or "
            f"{_owner(me)} that only its owner may write (e.g. mode 0755 or 0700; or the sticky bit, as "
            "/tmp's 1777)")


def _error(msg: str, code: str = "EINVAL", exit_code: int = 2) -> dict:
    return {"ok": False, "error": msg, "code": code, "exit": exit_code}


class _Conn:
    __slots__ = ("sock", "rbuf", "wbuf", "last", "busy", "close_after", "long")

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.last = now
        self.busy = False  # a request of this connection is with the worker
        self.close_after = False  # close once wbuf is written
        self.long = False  # its answer is a long one (Partial), being built or written: MAX_LISTINGS


class ControlServer:
    """Bind at construction (refusing when another daemon answers there).  ``attach(loop,
    worker)`` serves on the daemon's loop; ``serve()`` alone makes a private loop and worker in a
    thread (tests, tools).  ``dispatch(req) -> response`` runs on the worker; ``inline(req)``
    (default: dispatch) answers INLINE_OPS on the loop thread."""

    def __init__(self, path: str, dispatch: Callable[[dict], dict],
                 inline: Callable[[dict], dict] | None = None, log: Log | None = None):
        self.path = path
        self.dispatch = dispatch
        self.inline = inline or dispatch
        self.log = log or Log()
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:  # bind() would say only "AF_UNIX path too long"
            raise DaemonError(f"control socket {path}: longer than {MAX_SOCKET_PATH} bytes, a unix socket's limit")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
            os.chmod(parent, 0o700)  # makedirs applies the umask; be exact
        check_socket_dir(path, parent)
        if os.path.lexists(path):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise DaemonError(f"{path} exists and is not a socket; refusing to replace it")
            why = _live(path)
            if why:
                raise DaemonError(f"{path}: {why}; refusing to replace it")
            os.unlink(path)  # stale socket of a daemon that died
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            self.sock.bind(path)
        except OSError:
            self.sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(BACKLOG)
        self.sock.setblocking(False)
        self._ino = os.stat(path).st_ino
        self.loop: EventLoop | None = None
        self.worker: Worker | None = None
        self.conns: dict[int, _Conn] = {}
        self.buffered = 0
        self.accepting = False
        self._paused = False  # resting after EMFILE: only the timer resumes
        self._own_thread: threading.Thread | None = None
        self._idle_timer = None
        self.longs = 0  # connections whose long answer is being built or written
        self.counters = {"accepted": 0, "answered": 0, "busy": 0, "timeouts": 0, "too_large": 0,
                         "accept_paused": 0, "long_busy": 0, "evicted": 0, "trims": 0}  # fmt: skip
        self._last_pause_log = 0.0

    # ------------------------------------------------------------------ wiring
    def attach(self, loop: EventLoop, worker: Worker) -> None:
        self.loop, self.worker = loop, worker
        self._listen(True)
        self._idle_timer = loop.every(1.0, self._expire_idle)

    def serve(self) -> None:
        """A private loop and worker in a thread (for tests and tools; the daemon uses attach)."""
        loop = EventLoop(self.log)
        self.attach(loop, Worker(loop, self.log))
        self._own_thread = threading.Thread(target=loop.run, name="snatgw-control", daemon=True)
        self._own_thread.start()

    def _listen(self, on: bool) -> None:
        if on and not self.accepting:
            self.loop.add_reader(self.sock, self._accept)
        elif not on and self.accepting:
            self.loop.remove_reader(self.sock)
        self.accepting = on

    # ------------------------------------------------------------------ accept
    def _accept(self) -> None:
        for _ in range(64):  # a bounded batch per wake-up; the loop comes back if more wait
            if len(self.conns) >= MAX_CLIENTS and not self._evict():
                self._listen(False)  # resumed by _close when a client leaves
                return
            try:
                s, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if is_fd_exhaustion(e):
                    self._pause(e)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            s.setblocking(False)
            c = _Conn(s, self.loop.clock())
            self.conns[s.fileno()] = c
            self.counters["accepted"] += 1
            self.loop.add_reader(s, lambda c=c: self._read(c))

    def _evict(self) -> bool:
        """At MAX_CLIENTS: close the longest-silent client whose request is not with the worker
        (as the metrics listener does), so a newcomer is served; 300 clients that connected and
        sent nothing held every other one off for IDLE_TIMEOUT.  False: every client waits for
        an answer (accepting pauses until one leaves)."""
        idle = [c for c in self.conns.values() if not c.busy]
        if not idle:
            return False
        self.counters["evicted"] += 1
        self._close(min(idle, key=lambda c: c.last))
        return True

    def _pause(self, e: OSError) -> None:
        """No fd for accept(): rest the listener (the pending connection stays in the backlog)
        instead of waking up for it again at once; close the longest-idle client to make room."""
        self.counters["accept_paused"] += 1
        self._paused = True
        self._listen(False)
        idle = [c for c in self.conns.values() if not c.busy]
        if idle:
            self._close(min(idle, key=lambda c: c.last))
        now = time.monotonic()
        if now - self._last_pause_log > 10:
            self._last_pause_log = now
            self.log.warning("control_accept_paused", error=os.strerror(e.errno), clients=len(self.conns),
                             seconds=ACCEPT_PAUSE)  # fmt: skip
        self.loop.call_later(ACCEPT_PAUSE, self._unpause)

    def _unpause(self) -> None:
        self._paused = False
        if not self._closed() and len(self.conns) < MAX_CLIENTS:
            self._listen(True)

    def _closed(self) -> bool:
        return self.sock.fileno() < 0

    # ------------------------------------------------------------------ read / dispatch
    def _read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        if not data:
            self._close(c)
            return
        c.last = self.loop.clock()
        c.rbuf += data
        self.buffered += len(data)
        if b"\n" not in data:
            if len(c.rbuf) > MAX_REQUEST:
                self.counters["too_large"] += 1
                self._answer(c, _error(f"bad request: longer than {MAX_REQUEST} bytes"), close=True)
                return
            if self.buffered > MAX_BUFFERED:
                self.counters["busy"] += 1
                busy = _error("the daemon is busy (too much request data pending); retry", "EBUSY", 4)
                self._answer(c, busy, close=True)
                return
        self._next(c)

    def _take_line(self, c: _Conn) -> bytes | None:
        i = c.rbuf.find(b"\n")
        if i < 0:
            return None
        line = bytes(c.rbuf[:i])
        del c.rbuf[: i + 1]
        self.buffered -= i + 1
        return line

    def _next(self, c: _Conn) -> None:
        """Dispatch the next complete line of ``c`` unless one is with the worker already, or
        an answer waits for the client to read it (a client that pipelines requests and never
        reads would otherwise grow the answers it is owed without limit: `status` and errors
        are answered on the loop)."""
        while not c.busy and not c.close_after and not c.wbuf:
            line = self._take_line(c)
            if line is None:
                return
            if len(line) > MAX_REQUEST:
                self.counters["too_large"] += 1
                self._answer(c, _error(f"bad request: longer than {MAX_REQUEST} bytes"), close=True)
                return
            if not line.strip():
                continue
            req = None
            if len(line) < 4096:  # small: look at the op here (status is answered at once)
                try:
                    req = json.loads(line)
                except (ValueError, RecursionError) as e:  # RecursionError: '[' * 1000, 1 KB
                    self._answer(c, _error(f"bad request: not JSON: {e}"))
                    continue
                if isinstance(req, dict) and req.get("op") in INLINE_OPS:
                    resp = self._safe(self.inline, req)
                    self._answer(c, resp if isinstance(resp, dict) else _error("internal error: no answer",
                                                                                "ERROR", 4))
                    continue
            c.busy = True
            self.loop.remove_reader(c.sock)  # one request at a time: the client waits for its answer
            job = (lambda r=req: self._safe(self.dispatch, r)) if req is not None else \
                (lambda b=line: self._parse_and_dispatch(b))
            if not self.worker.submit(job, lambda resp, err, c=c: self._done(c, resp, err)):
                c.busy = False
                self.counters["busy"] += 1
                self._answer(c, _error("the daemon is busy (too many requests queued); retry", "EBUSY", 4))
                if c.sock.fileno() >= 0 and not c.wbuf and not c.close_after:
                    self.loop.add_reader(c.sock, lambda c=c: self._read(c))  # its next request

    def _parse_and_dispatch(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError) as e:
            return _error(f"bad request: not JSON: {e}")
        return self._safe(self.dispatch, req)

    def _safe(self, fn, req) -> dict | Partial:
        try:
            resp = fn(req)
            return resp if isinstance(resp, (dict, Partial)) else _error("internal error: no answer", "ERROR", 4)
        except Exception as e:  # dispatch never raises (Service.handle); be sure anyway
            self.log.error("request_failed", error=repr(e))
            return _error(f"internal error: {e!r}", "ERROR", 4)

    def _done(self, c: _Conn, resp, err) -> None:
        if err is None and isinstance(resp, Partial) and not c.long and c.sock.fileno() >= 0:
            if self.longs >= MAX_LISTINGS:  # its first piece: the answer would be long, and others are
                resp.close()
                c.busy = False
                self.counters["long_busy"] += 1
                self._answer(c, _error(f"the daemon is busy ({self.longs} long answers, e.g. session "
                                       "listings, are being built or sent); retry", "EBUSY", 4))
                self._resume(c)
                return
            c.long = True
            self.longs += 1
        if err is None and isinstance(resp, Partial):  # a long answer: its next piece, behind the others
            if c.sock.fileno() >= 0 and self.worker.submit(
                    lambda p=resp: self._safe(lambda _r: p.step(), None),
                    lambda r, e, c=c: self._done(c, r, e), bounded=False):  # one per client: bounded
                return
            resp.close()  # the client left, or the daemon stops
            c.busy = False
            self._unlong(c)
            return
        c.busy = False
        if err is not None:
            resp = _error(f"internal error: {err!r}", "ERROR", 4)
        if c.sock.fileno() < 0:
            self._unlong(c)
            return  # the client left meanwhile
        c.last = self.loop.clock()
        self._answer(c, resp)
        self._resume(c)

    def _resume(self, c: _Conn) -> None:
        """Read and dispatch again once nothing is with the worker or waits to be written."""
        if c.sock.fileno() >= 0 and not c.busy and not c.close_after and not c.wbuf:
            self.loop.add_reader(c.sock, lambda c=c: self._read(c))
            self._next(c)

    # ------------------------------------------------------------------ write
    def _answer(self, c: _Conn, resp: dict, close: bool = False) -> None:
        if c.sock.fileno() < 0:
            return
        self.counters["answered"] += 1
        c.wbuf += json.dumps(resp, default=str).encode() + b"\n"
        c.close_after = c.close_after or close
        self._write(c)

    def _write(self, c: _Conn) -> bool:
        """Send what ``c`` is owed; True when all of it went.  While some waits, the client's
        requests are not read (it stalls, and IDLE_TIMEOUT closes it if it never reads)."""
        try:
            while c.wbuf:
                n = c.sock.send(c.wbuf)
                del c.wbuf[:n]
                c.last = self.loop.clock()
        except (BlockingIOError, InterruptedError):
            self.loop.remove_reader(c.sock)
            self.loop.add_writer(c.sock, lambda c=c: self._writable(c))
            return False
        except OSError:
            self._close(c)
            return False
        self.loop.remove_writer(c.sock)
        self._unlong(c)
        if c.close_after:
            self._close(c)
            return False
        return True

    def _unlong(self, c: _Conn) -> None:
        """``c``'s long answer is written (or will never be): it no longer counts."""
        if c.long and not c.busy and not c.wbuf:
            c.long = False
            self.longs -= 1
            if self.longs == 0 and TRIM is not None:  # off the loop: a trim of ~1 GB takes ms
                self.worker.submit(lambda: TRIM(0), None, bounded=False)
                self.counters["trims"] += 1

    def _writable(self, c: _Conn) -> None:
        if self._write(c):
            self._resume(c)

    # ------------------------------------------------------------------ close
    def _expire_idle(self) -> None:
        now = self.loop.clock()
        for c in list(self.conns.values()):
            if not c.busy and now - c.last > IDLE_TIMEOUT:
                self.counters["timeouts"] += 1
                self._close(c)

    def _close(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        if fd >= 0:
            self.loop.remove(c.sock)
            self.conns.pop(fd, None)
            c.sock.close()
        self.buffered -= len(c.rbuf)
        c.rbuf.clear()
        c.wbuf.clear()  # its answer, owed to no one now
        self._unlong(c)
        if not self.accepting and not self._paused and not self._closed() and len(self.conns) < MAX_CLIENTS:
            self._listen(True)

    def close(self) -> None:
        """Stop serving (from the loop thread, or after the loop ended) and remove our socket."""
        if self._own_thread is not None:
            self.loop.stop()
            self._own_thread.join(timeout=5)
            self.worker.close(timeout=5)
        if self.loop is not None and self._own_thread is None:
            for c in list(self.conns.values()):
                self._close(c)
            self.loop.remove(self.sock)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self.accepting = False
        self.sock.close()
        if self._own_thread is not None:
            self.loop.close()
        try:  # remove only our own socket (not one a newer daemon bound since)
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
