"""`snatgw run` (also `snatgwd`): the daemon's I/O edge.  Parse flags, load the config, take
the network namespace (owner.py: one daemon per namespace), bind the control socket, start the
backend, print one `ready` line, then run the event loop (loop.py) until SIGTERM/SIGINT:

  main thread (EventLoop): signals (set_wakeup_fd), the control socket and its clients, the
      owner socket, the tick timer; never calls the backend.
  worker thread (Worker): every backend call of the control plane, in order (a long
      `sessions` listing in pieces, other requests between them): control
      requests, SIGHUP reloads, link failovers, metrics scrapes.
  writer thread (writer.Writer): the log lines (stderr) and the audit log (file or syslog),
      bounded queues: a stalled stderr or disk never stalls the loop or the worker.
  gc thread (Worker "snatgw-gc"): the tick alone (expiry sweep + hook check, every
      gc_interval).  A sweep of a million sessions takes seconds (more while a full table
      makes every tick sweep); on its own thread it never holds a `stats` behind it.  What it
      shares with the worker is guarded: the service's lock (the hook check, the GC's
      bookkeeping), the backend's own (bpf: one walk at a time; nft: the full-table judge).

On SIGTERM both threads finish their job, the backend stops with keep_state=True (bpf: programs
stay attached and maps pinned; nft: the table stays), the socket is removed, exit 0.  The
signals are caught from the first line of `snatgw run` (startsignals.py): one during the start
stops it at its next step (before the datapath's start: nothing of it touched) or, during the
datapath's start, once that ends, without `ready`.  The logic lives in service.py.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
import time

from ..errors import EXIT_BACKEND, EXIT_BAD_INPUT, EXIT_OK, RuleError, SnatgwError
from ..rules import parse_oif
from .control import ControlServer
from .log import LibraryLines, Log

from . import startsignals
from .loop import EventLoop, Worker
from .owner import NamespaceOwner, PinDirLock, describe
from .writer import Writer
from .service import Service, load_config, make_backend

DEFAULT_CONFIG = "/etc/snatgw/snatgw.conf"


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    p.add_argument("--backend", choices=("bpf", "nft", "fake"),
                   help="datapath (default: the config's, else bpf; fake: the Python model, for tests: no packet "
                        "of the machine is translated)")
    p.add_argument("--inside", action="append", metavar="IF", help="inside interface (repeat; overrides config)")
    p.add_argument("--outside", action="append", metavar="IF", help="outside interface (repeat; overrides config)")
    p.add_argument("--pin-dir", metavar="DIR", help="bpffs directory for pinned maps")
    p.add_argument("--socket", metavar="PATH", help="control socket path")
    p.add_argument("--gc-interval", type=float, metavar="SECONDS", help="seconds between expiry sweeps")
    p.add_argument("--foreground", action="store_true",
                   help="accepted for compatibility: snatgw never forks (systemd runs it as is)")
    p.add_argument("--log-json", action="store_true", help="log JSON lines instead of key=value")
    p.add_argument("--debug", action="store_true", help="also log debug events (every GC sweep that expired)")


def overrides_from(args) -> dict:
    o: dict = {}
    if args.backend:
        o["backend"] = args.backend
    # each checked as the config's setting is (until 1 Dec 2026 only the names' spelling and
    # gc_interval > 0 were: --gc-interval nan or inf started a daemon whose sweeps never ran,
    # and --inside eth1 --outside eth1 one with both programs on eth1)
    for k in ("inside", "outside"):  # (ASCII, 1..15 characters, once each)
        if getattr(args, k):
            try:
                names = tuple(parse_oif(n) for n in getattr(args, k))
            except RuleError as e:
                raise SnatgwError(f"--{k}: {e.message}") from None
            twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
            if twice is not None:
                raise SnatgwError(f"--{k}: interface {twice} given twice")
            o[k] = names
    if args.pin_dir:
        o["pin_dir"] = args.pin_dir
    if args.socket:
        if not args.socket.startswith("/"):  # control_socket's rule: the CLI and systemd (cwd /) find it
            raise SnatgwError(f"--socket: expected an absolute path, got {args.socket!r}")
        o["control_socket"] = args.socket
    if args.gc_interval is not None:
        from ..config.parse import GC_INTERVAL_MAX

        if not (math.isfinite(args.gc_interval) and 0 < args.gc_interval <= GC_INTERVAL_MAX):
            raise SnatgwError(f"--gc-interval: expected seconds, a number > 0 and <= {GC_INTERVAL_MAX} (as "
                              f"gc_interval), got {args.gc_interval:g}")
        o["gc_interval"] = args.gc_interval
    return o


def sd_notify(*fields: str) -> None:
    """Tell systemd (Type=notify) READY/RELOADING/STOPPING/STATUS (sd_notify(3): one datagram,
    newline-separated assignments); a no-op without $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not fields:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(fields).encode(), addr)
    except OSError:
        pass


def _status_line(text: str) -> str:
    """A STATUS= value: one line, bounded (sd_notify fields end at a newline)."""
    return "STATUS=" + " ".join(text.split())[:400]


class Daemon:
    """The running daemon: the loop's handlers (signals, tick) and the jobs they queue."""

    def __init__(self, service: Service, server: ControlServer, log: Log, loop: EventLoop,
                 worker: Worker, owner: NamespaceOwner | None = None, gc: Worker | None = None,
                 writer: Writer | None = None):
        self.service, self.server, self.log = service, server, log
        self.writer = writer  # the thread that writes log lines and the audit log
        self.loop, self.worker, self.owner = loop, worker, owner
        self.gc = gc or worker  # the tick's thread (the worker's when not given: tests)
        self.reload_running = False
        self.reload_again = False
        self.tick_running = False
        self.timer = None
        self.extras = None
        self.stop_signal: int | None = None  # the SIGTERM/SIGINT that stopped the loop

    def start(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(s, self.on_stop)
        self.loop.add_signal_handler(signal.SIGHUP, self.on_hup)
        self.server.attach(self.loop, self.worker)
        if self.owner is not None:
            self.owner.attach(self.loop)
        self.timer = self.loop.every(self.service.config.settings.gc_interval, self.on_tick)
        from .extras import Extras  # links and metrics (prometheus_client): only the daemon pays its import

        self.extras = Extras(self.service, self.loop, self.worker, self.log, self.writer)  # links, metrics, audit
        self.extras.attach()

    # ------------------------------------------------------------------ handlers (loop thread)
    def on_stop(self, signum: int) -> None:
        self.stop_signal = signum
        self.loop.stop()

    def on_hup(self, _signum: int) -> None:
        if self.reload_running:
            self.reload_again = True  # one more after this one: the file may have changed again
            return
        self.reload_running = True
        sd_notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                  _status_line("reloading"))  # fmt: skip
        # via "signal": no answer carries its warnings; status' last_reload shows them
        self.worker.submit(lambda: self.service.reload(via="signal"), self.on_reloaded, bounded=False)

    def on_reloaded(self, _result, error: BaseException | None) -> None:
        self.reload_running = False
        if error is None:
            sd_notify("READY=1", _status_line(f"running: {len(self.service.config.rules)} rules, "
                                              f"backend {self.service.backend.name}, reloaded"))
        else:
            sd_notify("READY=1", _status_line(f"reload failed: {error}; running the previous config "
                                              f"({len(self.service.config.rules)} rules)"))
        interval = self.service.config.settings.gc_interval
        if self.timer is not None and self.timer.interval != interval:
            self.timer.cancel()
            self.timer = self.loop.every(interval, self.on_tick)
        if self.reload_again:
            self.reload_again = False
            self.on_hup(signal.SIGHUP)

    def on_tick(self) -> None:
        if self.tick_running:
            return  # the last tick still runs (a long sweep): skip, do not pile up
        self.tick_running = True
        self.gc.submit(self.service.tick, self.on_ticked, bounded=False)

    def on_ticked(self, _result, _error) -> None:
        self.tick_running = False

    def run(self) -> None:
        self.loop.run()


def run(args) -> int:
    early = startsignals.hold()  # `snatgw run` held them before its imports already (cli/main.py)
    try:
        return _run(args, early)
    finally:
        early.release()
        LibraryLines.remove()


def _close_held(*held) -> None:
    """Release the locks taken (the pin-dir lock, the owner lock and its file), those not None."""
    for h in held:
        if h is not None:
            h.close()


def _stopped_in_start(log: Log, signum: int, backend: str) -> int:
    """A SIGTERM/SIGINT came before the datapath was touched: nothing of it to stop; what was
    taken (locks, socket) the caller has closed."""
    sd_notify("STOPPING=1")
    log.info("stopping", reason="signal", signal=startsignals.name(signum), during="start")
    log.info("stopped", backend=backend, datapath="not started")
    return EXIT_OK


def _run(args, early: startsignals.StartSignals) -> int:
    log = Log(json_lines=args.log_json, debug=args.debug)
    LibraryLines.install(log)  # the parser's and backends' warnings as this log's lines
    try:
        overrides = overrides_from(args)
        config = load_config(args.config, overrides=overrides)
    except SnatgwError as e:
        log.error("config_invalid", error=str(e), config=args.config)
        return EXIT_BAD_INPUT
    settings = config.settings
    if (signum := early.stop_asked()) is not None:
        return _stopped_in_start(log, signum, settings.backend)
    owner = server = pins = None
    service: Service | None = None
    try:
        # one daemon per network namespace (the fake backend has no datapath to own)
        if settings.backend != "fake":
            owner = NamespaceOwner({"socket": settings.control_socket, "backend": settings.backend,
                                    "config": os.path.abspath(args.config)})  # fmt: skip
            if owner.squatter is not None:  # the lock is ours; the name is another user's
                log.warning("owner_name_squatted", name=owner.name, holder=describe(owner.squatter),
                            note="held by a process of another user, not a snatgw daemon: the owner lock "
                                 f"{owner.lock_path} decides; find it with `ss -xlp | grep {owner.name}`")
        if settings.backend == "bpf":  # and per pin directory (a bpffs may be shared by namespaces)
            from ..datapath.bpf.loader import BPFFS, ensure_bpffs, private_mount_ns

            existed = os.path.isdir(settings.pin_dir)
            try:
                if ensure_bpffs(settings.pin_dir) and private_mount_ns():
                    log.warning("pins_private", bpffs=BPFFS, pin_dir=settings.pin_dir,
                                msg="no bpffs was mounted at /sys/fs/bpf in this mount namespace, which is not the "
                                    "host's (`ip netns exec` makes one for each command, with a /sys of its own): "
                                    "the bpffs mounted here, and the pinned sessions, go with it, so a restart "
                                    "cannot adopt them and every session is lost, and `snatgw purge`, `conns` "
                                    "without the daemon do not see them; start the daemon with "
                                    "`nsenter --net=/run/netns/NS snatgw run ...` (the host's /sys/fs/bpf kept; "
                                    "with rps_cpus, which needs this namespace's /sys as well: the one command of "
                                    "docs/operations.md \"In a network namespace\")")
            except SnatgwError as e:  # where pin_dir was given: file:line: pin_dir (or --pin-dir)
                at = dict(settings.where).get("pin_dir")
                said = f"{at}: pin_dir" if at else "--pin-dir" if "pin_dir" in overrides else "pin_dir (default)"
                raise type(e)(f"{said}: {e}") from None
            pins = PinDirLock(settings.pin_dir, made=not existed)  # made: removed at exit when empty
        backend = make_backend(settings.backend, settings)
        service = Service(config, backend, log, config_path=args.config, overrides=overrides,
                          rps_state=owner.state_path("rps") if owner is not None else None)
        server = ControlServer(settings.control_socket, service.dispatch, inline=service.handle, log=log)
    except (SnatgwError, OSError) as e:
        log.error("start_failed", error=str(e))
        _close_held(pins, owner)
        return getattr(e, "exit_code", EXIT_BACKEND)
    if (signum := early.stop_asked()) is not None:  # the socket and locks go as at any stop
        server.close()
        _close_held(pins, owner)
        return _stopped_in_start(log, signum, backend.name)
    loop = EventLoop(log)
    worker = Worker(loop, log)
    gc = Worker(loop, log, name="snatgw-gc")
    writer = Writer()  # from here log lines (and the audit log) are written on its thread
    log.attach(writer)
    daemon = Daemon(service, server, log, loop, worker, owner, gc, writer)
    # from here the loop takes the signals: a SIGTERM/SIGINT during the datapath's start (seconds
    # for bpf: it cannot be cut short) waits for it to end, then the daemon stops as at any stop
    # (the datapath kept) without saying ready; a SIGHUP is a reload after it.  What was caught
    # since the first line (startsignals.py) is handed over.
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, daemon.on_stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.on_hup)
    for s in early.handover():
        loop.queue_signal(s)
    started = False
    try:
        try:
            service.start()
            started = True
        except SnatgwError as e:
            log.error("start_failed", error=str(e), backend=backend.name)
            return e.exit_code
        during = None
        asked = next((s for s in loop.pending_signals() if s in startsignals.STOP), None)
        if asked is None:
            daemon.start()
            print(f"snatgw ready backend={backend.name} rules={len(config.rules)} socket={settings.control_socket}"
                  f" pid={os.getpid()}", flush=True)
            sd_notify("READY=1", _status_line(f"running: {len(config.rules)} rules, backend {backend.name}"))
            daemon.run()
            asked = daemon.stop_signal
        else:
            during = "start"
        sd_notify("STOPPING=1")
        log.info("stopping", reason="signal", signal=startsignals.name(asked) if asked else None, during=during)
        return EXIT_OK
    finally:
        if getattr(daemon, "extras", None) is not None:
            daemon.extras.close()
        for w in (worker, gc):
            if not w.close(timeout=20):
                log.error("stop_worker_busy", msg=f"{w.thread.name} did not finish its job within 20 s")
        server.close()
        if started:
            try:  # the datapath stays (keep_state): the next daemon adopts it
                service.stop()
            except Exception as e:  # noqa: BLE001
                log.error("stop_failed", error=str(e))
        _close_held(pins, owner)  # the datapath is stopped (kept) before the locks go
        loop.close()
        log.attach(None)  # later lines (none expected) are written here
        writer.close(timeout=5)  # what waits is written; a stderr nobody reads does not hold the exit


def main(argv: list[str] | None = None) -> int:
    """Entry point of `snatgwd` (same flags as `snatgw run`; its signals are held from here, after
    this module's imports: `snatgw run` holds them ~0.15 s earlier)."""
    startsignals.hold()
    p = argparse.ArgumentParser(prog="snatgwd", description="the snatgw daemon")
    register(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
