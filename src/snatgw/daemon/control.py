"""The control socket: a unix stream socket (mode 0600, its directory 0700 when we create it)
speaking JSON lines.  Each request is one JSON object ``{"op": ..., ...}`` on one line; each
response is one JSON object on one line, ``{"ok": true, ...}`` or ``{"ok": false, "error": ...,
"code": ..., "exit": N}``.  Ops: status, reload, rules, sessions, stats, rate, flush, zero, adm
(see Service.handle).  ``request()`` is the client the CLI verbs use.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import stat
import threading
from typing import Callable

from ..errors import DaemonError

MAX_REQUEST = 16 * 1024 * 1024  # bytes of one request line (a reload may carry a config text)


class NoDaemon(DaemonError):
    """Nothing listens on the control socket."""


def request(path: str, req: dict, timeout: float = 30.0) -> dict:
    """Send one request, return the response dict.  NoDaemon when nothing listens."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NoDaemon(f"no snatgw daemon on {path}: {e.strerror}") from None
        except PermissionError:
            raise DaemonError(f"{path}: permission denied (the control socket is root-only)") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    except socket.timeout:
        raise DaemonError(f"the daemon on {path} did not answer within {timeout:g} s") from None
    finally:
        s.close()
    if not buf:
        raise DaemonError(f"the daemon on {path} closed the connection without an answer")
    return json.loads(buf)


def _live(path: str) -> bool:
    try:
        request(path, {"op": "status"}, timeout=2.0)
        return True
    except (NoDaemon, DaemonError, ValueError):
        return False


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while True:
            line = self.rfile.readline(MAX_REQUEST)
            if not line:
                return
            try:
                req = json.loads(line)
            except ValueError as e:
                resp = {"ok": False, "error": f"bad request: not JSON: {e}", "code": "EINVAL", "exit": 2}
            else:
                resp = self.server.dispatch(req)
            self.wfile.write(json.dumps(resp, default=str).encode() + b"\n")
            self.wfile.flush()


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False


class ControlServer:
    """Bind at construction (refusing when another daemon answers there), serve in a thread."""

    def __init__(self, path: str, dispatch: Callable[[dict], dict]):
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
            os.chmod(parent, 0o700)  # makedirs applies the umask; be exact
        if os.path.lexists(path):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise DaemonError(f"{path} exists and is not a socket; refusing to replace it")
            if _live(path):
                raise DaemonError(f"another snatgw daemon is already running on {path}")
            os.unlink(path)  # stale socket of a daemon that died
        old = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            self.server = _Server(path, _Handler, bind_and_activate=True)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.server.dispatch = dispatch
        self._ino = os.stat(path).st_ino
        self.thread: threading.Thread | None = None

    def serve(self) -> None:
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="snatgw-control", daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join(timeout=5)
        self.server.server_close()
        try:  # remove only our own socket (not one a newer daemon bound since)
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
