"""The CLI's side of the control socket: where the socket is, one call that turns an error
response into an exception with the daemon's exit code, and the no-daemon fallback that reads
sessions and counters from the bpf backend's pinned maps.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

from ..config.schema import Settings, timeouts_of_answer
from ..errors import DaemonError, SnatgwError
from .control import NoDaemon, request

ENV_SOCKET = "SNATGW_SOCKET"


class RemoteError(SnatgwError):
    """The daemon answered with an error; carries its errno-like code and exit code."""

    def __init__(self, message: str, code: str = "ERROR", exit_code: int = 4):
        self.code = code
        self.exit_code = exit_code
        super().__init__(message)


def resolve_socket(path: str | None = None) -> str:
    """--socket, else $SNATGW_SOCKET, else the default of Settings."""
    return path or os.environ.get(ENV_SOCKET) or Settings().control_socket


#: seconds a CLI call goes on retrying an EBUSY answer (the daemon's bounds: a full worker
#: queue, too much request data pending, two long listings being sent).  EBUSY means the
#: request was not carried out (a listing refused after its first piece is read-only), so a
#: retry is always safe; it is bounded so that a daemon kept busy on purpose still gets an
#: answer to the operator within seconds.
BUSY_RETRY_FOR = 5.0
BUSY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)  # then 0.8 s each


def call(path: str, req: dict, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + min(timeout, BUSY_RETRY_FOR)
    tries = 1
    resp = request(path, req, timeout)
    while resp.get("code") == "EBUSY" and not resp.get("ok"):
        delay = BUSY_DELAYS[min(tries - 1, len(BUSY_DELAYS) - 1)]
        if time.monotonic() + delay > deadline:
            resp = dict(resp, error=f"{resp.get('error', 'the daemon is busy')} (tried {tries} times "
                                    f"in {min(timeout, BUSY_RETRY_FOR):g} s)")
            break
        time.sleep(delay)
        tries += 1
        resp = request(path, req, timeout)
    if not resp.get("ok"):
        raise RemoteError(resp.get("error", "the daemon refused the request"), resp.get("code", "ERROR"),
                          int(resp.get("exit", 4)))
    return resp


def _pinned(pin_dir: str | None):
    pin_dir = pin_dir or Settings().pin_dir
    if not os.path.isdir(pin_dir):
        return None
    try:
        from ..datapath.bpf.backend import read_pinned
    except ImportError as e:
        raise DaemonError(f"pinned maps exist in {pin_dir} but the bpf backend cannot read them: {e}") from None
    return read_pinned(pin_dir)


def _pinned_sessions(pin_dir: str, flt, limit, timeouts: dict | None = None):
    """Sessions straight from the bpf backend's pinned maps, one batch of the table at a
    time (never the whole table in memory), as dicts."""
    from ..datapath.bpf.backend import read_pinned

    settings = Settings(pin_dir=pin_dir)
    if timeouts:
        settings = replace(settings, timeouts=timeouts_of_answer(timeouts))
    reader = read_pinned(pin_dir, settings)
    try:
        for s in reader.iter_sessions(flt, limit):
            yield s.as_dict()
    finally:
        reader.stop()


def _conntrack_sessions(status: dict, flt, limit):
    """The nft backend's sessions read from conntrack here (ctnetlink, streamed), named by the
    daemon's marks: the daemon never holds a listing."""
    from ..datapath.nft.backend import NftBackend

    settings = Settings()
    if status.get("timeouts"):
        settings = replace(settings, timeouts=timeouts_of_answer(status["timeouts"]))
    reader = NftBackend.reader(settings, status["marks"], status.get("netns"))
    for s in reader.iter_sessions(flt, limit):
        yield s.as_dict()


def session_stream(path: str | None, pin_dir: str | None, flt_of, limit: int | None = None,
                   fallback: bool = True):
    """(sessions as an iterator of dicts, rules in priority order, source) for `snatgw conns`
    and `adm -L -n -c`.  ``flt_of(rules)`` builds the SessionFilter (it may need the rules to
    turn a priority into a rule id).  With a bpf daemon the CLI reads the pinned maps itself,
    streaming and filtering as it goes: the daemon is not involved and never holds a listing.
    Other daemons answer the `sessions` op (filtered and limited there); with no daemon, the
    pins in ``pin_dir`` (or the default) are read, unless not ``fallback`` (NoDaemon then)."""
    sock = resolve_socket(path)
    try:
        status = call(sock, {"op": "status"})
        rules = call(sock, {"op": "rules"})["rules"]
    except NoDaemon as e:
        if not fallback:
            raise
        where = pin_dir or Settings().pin_dir
        if not os.path.isdir(where):
            raise DaemonError(f"{e}; and no pinned maps in {where}") from None
        try:
            import snatgw.datapath.bpf.backend  # noqa: F401
        except ImportError as ie:
            raise DaemonError(f"pinned maps exist in {where} but the bpf backend cannot read them: {ie}") from None
        return _pinned_sessions(where, flt_of([]), limit), [], f"pinned maps {where}"
    flt = flt_of(rules)
    pins = status.get("pin_dir")
    if status.get("backend") == "bpf" and pins and os.path.isdir(pins):
        return _pinned_sessions(pins, flt, limit, status.get("timeouts")), rules, f"daemon {sock} (pinned maps {pins})"
    if status.get("backend") == "nft" and "marks" in status:
        return _conntrack_sessions(status, flt, limit), rules, f"daemon {sock} (conntrack)"
    req = {"op": "sessions", "filter": flt.as_dict()}
    if limit is not None:
        req["limit"] = limit
    return iter(call(sock, req)["sessions"]), rules, f"daemon {sock}"


def stats_and_rules(path: str | None, pin_dir: str | None) -> tuple[dict, list[dict], str]:
    """(Stats.as_dict(), rules in priority order, source) from the daemon, else from pins."""
    sock = resolve_socket(path)
    try:
        resp = call(sock, {"op": "stats"})
        return resp["stats"], resp["rules"], f"daemon {sock}"
    except NoDaemon as e:
        reader = _pinned(pin_dir)
        if reader is None:
            raise DaemonError(f"{e}; and no pinned maps in {pin_dir or Settings().pin_dir}") from None
        return reader.stats().as_dict(), [], f"pinned maps {pin_dir or Settings().pin_dir}"
