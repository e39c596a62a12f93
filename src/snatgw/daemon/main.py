"""`snatgw run` (also `snatgwd`): the daemon's I/O edge.  Parse flags, load the config, start
the backend, bind the control socket, print one `ready` line, then loop: GC every
gc_interval, reload on SIGHUP, stop on SIGTERM/SIGINT (backend.stop(keep_state=True), socket
removed, exit 0).  The logic lives in service.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

from ..errors import EXIT_BACKEND, EXIT_BAD_INPUT, EXIT_OK, SnatgwError
from .control import ControlServer
from .log import Log
from .service import Service, load_config, make_backend

DEFAULT_CONFIG = "/etc/snatgw/snatgw.conf"


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    p.add_argument("--backend", choices=("bpf", "nft", "fake"), help="datapath (default: the config's, else bpf)")
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
    if args.inside:
        o["inside"] = tuple(args.inside)
    if args.outside:
        o["outside"] = tuple(args.outside)
    if args.pin_dir:
        o["pin_dir"] = args.pin_dir
    if args.socket:
        o["control_socket"] = args.socket
    if args.gc_interval is not None:
        if args.gc_interval <= 0:
            raise SnatgwError(f"--gc-interval: expected a positive number of seconds, got {args.gc_interval}")
        o["gc_interval"] = args.gc_interval
    return o


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about READY/RELOADING/STOPPING; a no-op elsewhere."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), addr)
    except OSError:
        pass


class Daemon:
    """The running daemon: signals set flags and wake the main loop; the loop does the work."""

    def __init__(self, service: Service, server: ControlServer, log: Log):
        self.service, self.server, self.log = service, server, log
        self.wake = threading.Event()
        self.stopping = False
        self.reload_wanted = False

    def on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self.reload_wanted = True
        else:
            self.stopping = True
        self.wake.set()

    def loop(self) -> None:
        interval = self.service.config.settings.gc_interval
        while not self.stopping:
            self.wake.wait(interval)
            self.wake.clear()
            if self.stopping:
                break
            if self.reload_wanted:
                self.reload_wanted = False
                sd_notify("RELOADING=1")
                try:
                    self.service.reload()
                except SnatgwError:
                    pass  # logged by the service; the old config stays
                sd_notify("READY=1")
                interval = self.service.config.settings.gc_interval
            try:
                self.service.gc()
            except SnatgwError as e:
                self.log.error("gc_failed", error=str(e))


def run(args) -> int:
    log = Log(json_lines=args.log_json, debug=args.debug)
    try:
        overrides = overrides_from(args)
        config = load_config(args.config, overrides=overrides)
    except SnatgwError as e:
        log.error("config_invalid", error=str(e), config=args.config)
        return EXIT_BAD_INPUT
    settings = config.settings
    try:
        backend = make_backend(settings.backend, settings)
        server = ControlServer(settings.control_socket, lambda req: service.handle(req))
    except (SnatgwError, OSError) as e:
        log.error("start_failed", error=str(e))
        return getattr(e, "exit_code", EXIT_BACKEND)
    service = Service(config, backend, log, config_path=args.config, overrides=overrides)
    daemon = Daemon(service, server, log)
    old = {s: signal.signal(s, daemon.on_signal) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            service.start()
        except SnatgwError as e:
            log.error("start_failed", error=str(e), backend=backend.name)
            return e.exit_code
        server.serve()
        print(f"snatgw ready backend={backend.name} rules={len(config.rules)} socket={settings.control_socket}"
              f" pid={os.getpid()}", flush=True)
        sd_notify("READY=1")
        daemon.loop()
        sd_notify("STOPPING=1")
        log.info("stopping", reason="signal")
        return EXIT_OK
    finally:
        server.close()
        try:  # also after a failed start: detach whatever was attached, keep pinned sessions
            service.stop()
        except SnatgwError as e:
            log.error("stop_failed", error=str(e))
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `snatgwd` (same flags as `snatgw run`)."""
    p = argparse.ArgumentParser(prog="snatgwd", description="the snatgw daemon")
    register(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
