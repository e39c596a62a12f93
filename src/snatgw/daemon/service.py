"""The daemon's logic, without I/O of its own: the running config, the adm rule table, the
backend, reload (parse + validate first, apply atomically, keep the old on any error), the GC
tick, and ``handle(request) -> response`` for the control socket (JSON-ready dicts).

Every backend call happens under one lock, so control requests, SIGHUP reloads and the GC
never interleave.  main.py does the I/O: sockets, signals, printing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from ipaddress import IPv4Network
from pathlib import Path
from typing import Callable

from ..config.adm import MAX_COMMANDS, AdmRefused, AdmTable, AdmUsageError, parse_args
from ..config.schema import GatewayConfig, Settings, timeouts_by_name
from ..datapath.backend import SessionFilter, tries_per_search
from ..errors import EXIT_BAD_INPUT, BackendError, MissingDeviceError, SnatgwError
from ..rules import Rule, RuleSet, parse_addr
from ..config.links import failover
from .addresses import AddressManager
from .log import Log
from .loop import Partial
from .rps import RpsManager

#: settings a reload cannot change (the running daemon keeps its own; restart to change them)
FIXED_ON_RELOAD = ("backend", "pin_dir", "control_socket")
RATE_INTERVAL = 2.0  # seconds between counter samples for `adm --rate`
#: most sessions one `sessions` reply carries (the CLI streams listings itself; this op must not
#: make the daemon hold a million of them)
MAX_SESSIONS_REPLY = 100_000
#: sessions one piece of a `sessions` listing reads under the service lock; between pieces the
#: lock is free (the GC, a reload) and the worker answers the requests queued meanwhile
SESSIONS_CHUNK = 2048
REFUSAL_LOG_INTERVAL = 10.0  # seconds: each (inside host, SNAT address) with refusals is logged once
REFUSAL_LOG_LINES = 50  # at most this many such lines per interval, then one summary line
#: the last reload's record (status' ``last_reload``) keeps this many of its warnings, each cut at
#: RELOAD_WARNING_CHARS (nft's warning of changed host limits names every rule changed)
RELOAD_WARNINGS_KEPT = 10
RELOAD_WARNING_CHARS = 1000
#: seconds the reload op's answer waits for the listeners' refresh on the daemon's loop
REFRESH_WAIT = 3.0


def load_config(path: str | None = None, text: str | None = None, overrides: dict | None = None,
                filename: str | None = None, require_rules: bool = True) -> GatewayConfig:
    """Parse a config file (or text) and apply command-line overrides to its settings.  A
    config without rules is refused unless it says `allow_empty yes` (``require_rules``)."""
    from ..config.parse import parse_file, parse_text
    from ..config.parse import require_rules as _require

    if text is not None:
        if not isinstance(text, str):
            raise SnatgwError("reload: 'text' must be a string")
        cfg = parse_text(text, filename or path or "<control>")
    else:
        if not path:
            raise SnatgwError("no config file given")
        if not isinstance(path, str):
            raise SnatgwError("reload: 'path' must be a string")
        try:
            cfg = parse_file(path)
        except OSError as e:
            raise SnatgwError(f"{path}: cannot read config: {e.strerror or e}") from None
    if overrides:
        at = dict(cfg.settings.where)
        where = tuple((k, at) for k, at in cfg.settings.where if k not in overrides)  # --inside: no line
        cfg = replace(cfg, settings=replace(cfg.settings, **overrides, where=where))
        both = [i for i in cfg.settings.outside if i in cfg.settings.inside]
        if both:  # as the config refuses it: both programs on one device (until 1 Dec 2026 --inside took it)
            def given(k: str) -> str:
                return f"--{k}" if k in overrides else (at.get(k) or k)

            raise SnatgwError(f"interface {both[0]} is listed both inside ({given('inside')}) and outside "
                              f"({given('outside')})")
    return _require(cfg) if require_rules else cfg


def locate_device(settings, e: MissingDeviceError) -> MissingDeviceError:
    """``e`` naming where the missing device was given: "file:line: inside: ..." (or --inside)."""
    for k in ("inside", "outside"):
        if e.name in getattr(settings, k):
            at = dict(settings.where).get(k)
            return MissingDeviceError(e.name, f"{at + ': ' + k if at else '--' + k}: interface {e.name!r} "
                                              "does not exist in this network namespace")
    return e


def rule_info(priority: int, r: Rule) -> dict:
    return {"priority": priority, **r.as_dict(), "rule_id": r.rule_id, "where": r.where,
            "text": r.describe()}


def _error(e: BaseException) -> dict:
    code = getattr(e, "code", None) or ("EINVAL" if isinstance(e, AdmUsageError) else "ERROR")
    return {"ok": False, "error": str(e), "code": code,
            "exit": getattr(e, "exit_code", EXIT_BAD_INPUT)}


def _cut(text: str) -> str:
    """``text`` as the reload record keeps it: at most RELOAD_WARNING_CHARS characters."""
    return text if len(text) <= RELOAD_WARNING_CHARS else text[: RELOAD_WARNING_CHARS - 3] + "..."


def _whole(req: dict, key: str, digits: int = 5) -> int:
    """A request's whole-number field: a JSON integer or its decimal digits (at most
    ``digits``), never a boolean or a fraction (int() took ``true`` as 1, the ICMP protocol or
    rule #1 to flush, and 6.9 as 6: a lookup of another flow answered as this one's)."""
    v = req.get(key)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= digits:
        return int(v)
    raise AdmUsageError(f"bad request: {key}: expected a whole number, got "
                        + ("nothing" if key not in req else _shown(v)))


#: the fields each request op takes (besides ``op``); any other is refused, as a misspelt
#: filter of a flush (``{"op": "flush", "rule": 3}``) flushed every session
REQUEST_FIELDS = {
    "status": (), "health": (), "reload": ("path", "text"), "rules": (), "sessions": ("filter", "limit"),
    "session": ("host", "sport", "remote", "dport", "proto"), "spill_memos": ("remote",),
    "refusal_marker": ("host", "sport", "remote", "dport", "proto"),
    "stats": (), "rate": (), "flush": ("priority", "rule_id", "inside", "nat"), "zero": (),
    "adm": ("commands", "restore"),
}  # fmt: skip


def _shown(v) -> str:
    """A request value in an error: its JSON text when short, else its JSON type."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):  # (json.loads makes none such; be sure anyway)
        text = repr(v)
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)  # fmt: skip
    return text if len(text) <= 40 else f"{kind} (not shown)"


def _text(req: dict, key: str, op: str, required: bool = False) -> str | None:
    """A request's string field (None when absent or null, unless ``required``)."""
    v = req.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v:
        raise AdmUsageError(f"bad request: {op}: {key}: expected a non-empty string, got "
                            + ("nothing" if key not in req else _shown(v)))
    return v


def check_request(req) -> str:
    """The request's op, once its shape is right: a JSON object whose ``op`` is one of
    REQUEST_FIELDS and whose other fields that op takes; else AdmUsageError (a bad request,
    exit 2), before anything is read or changed."""
    if not isinstance(req, dict):
        raise AdmUsageError(f'bad request: expected a JSON object {{"op": ...}}, got {_shown(req)}')
    op = req.get("op")
    if not isinstance(op, str) or op not in REQUEST_FIELDS:
        ops = ", ".join(REQUEST_FIELDS)
        if "op" not in req:
            raise AdmUsageError(f'bad request: no "op"; expected one of {ops}')
        raise AdmUsageError(f"unknown request op {op!r}; expected one of {ops}" if isinstance(op, str) else
                            f"bad request: op: expected a string naming the request, got {_shown(op)}")
    extra = sorted(str(k) for k in req if k != "op" and k not in REQUEST_FIELDS[op])
    if extra:
        takes = ", ".join(REQUEST_FIELDS[op]) or "no other field"
        raise AdmUsageError(f"bad request: {op}: unknown field(s) {', '.join(map(repr, extra[:5]))}"
                            f"{' ...' if len(extra) > 5 else ''}; it takes {takes}")
    return op


def _flow(req: dict, op: str) -> tuple[str, int, str, int, int]:
    """A request's flow as the session table's OUT key names it: ``host`` (the inside source),
    ``sport``, ``remote``, ``dport`` (0 for an ICMP echo, whose identifier is ``sport``) and
    ``proto`` (1, 6 or 17); anything else is an EINVAL naming the field (ops refusal_marker
    and session: explain --live asks them of one flow)."""
    missing = [k for k in ("host", "sport", "remote", "dport", "proto") if req.get(k) is None]
    if missing:
        raise AdmUsageError(f"{op}: {', '.join(missing)}: missing (host, sport, remote, dport and proto name "
                            "the flow)")
    texts = [_text(req, k, op, required=True) for k in ("host", "remote")]  # (a number is no address)
    try:
        host, remote = (str(parse_addr(t, k)) for t, k in zip(texts, ("host", "remote")))
    except SnatgwError as e:
        raise AdmUsageError(f"{op}: {e}") from None
    sport, dport, proto = (_whole(req, k) for k in ("sport", "dport", "proto"))
    for k, v in (("sport", sport), ("dport", dport)):
        if not 0 <= v <= 65535:
            raise AdmUsageError(f"{op}: {k}: expected 0..65535, got {v}")
    if proto not in (1, 6, 17):
        raise AdmUsageError(f"{op}: proto: expected 1 (icmp), 6 (tcp) or 17 (udp), got {proto}")
    return host, sport, remote, dport, proto


class Service:
    def __init__(self, config: GatewayConfig, backend, log: Log | None = None,
                 config_path: str | None = None, overrides: dict | None = None,
                 clock: Callable[[], float] = time.monotonic, rps_state: str | None = None):
        self.config = config
        self.table = AdmTable.from_ruleset(config.rules)
        self.backend = backend
        self.log = log or Log()
        self.config_path = str(Path(config_path).resolve()) if config_path else None
        self.overrides = dict(overrides or {})
        self.clock = clock
        self.lock = threading.RLock()
        self.started_at = clock()
        self.reloads = 0
        self.warnings: list[str] = []  # what config_warnings found at the last start or reload
        self.last_error: str | None = None
        self._samples: list[tuple[float, dict]] = []  # (time, stats dict), at most two
        self.hooks_restored = 0  # datapath hooks put back after someone removed them
        self.errors = 0  # failed GC ticks and hook checks since start
        #: the start or the last reload (reload_record): when, how, its result and warnings
        self.last_reload: dict | None = None
        self._refusals_at: float | None = None  # when refusals were last looked at
        self._refusal_seen: set[tuple] = set()  # the markers the last look found (bounded by the map)
        self.addresses = AddressManager(self.log)
        #: receive packet steering of the devices (`rps_cpus`): a device setting of both
        #: backends, applied after the backend's start and each apply, put back at stop; the
        #: masks before also in ``rps_state`` (a file: what a daemon killed leaves to the next)
        self.rps = RpsManager(self.log, state=rps_state)
        self.last_apply: dict | None = None  # the last reload or adm batch: when, what, result
        self.failed_links: set[str] = set()  # links whose rules run on their backups (LinkMonitor)
        self.applies = {"ok": 0, "failed": 0}  # reloads, adm batches, failovers by result (metrics)
        self.gc_stats = {"sweeps": 0, "removed": 0, "seconds": 0.0}  # expiry work (metrics)
        self.link_monitor = None  # set by the daemon when the config has links
        self.audit = None  # the daemon's audit log reader (daemon/audit.py) while `audit_log` is set
        self.sync = None  # the session sync (daemon/sync.py) while sync_peer is set
        self.sync_error: str | None = None  # why the sync configured could not start
        self.metrics_error: str | None = None  # why metrics_listen could not listen (daemon.extras)
        # called after each successful reload: schedules the listeners' refresh, and returns
        # an Event set once it ran (the control op's answer waits for it, REFRESH_WAIT at most)
        self.on_reload: Callable[[], threading.Event | None] | None = None
        self.refreshed: threading.Event | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self.lock:
            try:
                self.addresses.sync(self.config)  # (manage: reads the uplinks' addresses first)
                self.backend.start(self.config)
            except MissingDeviceError as e:
                self.addresses.release()
                raise locate_device(self.config.settings, e) from None
            except BaseException:
                self.addresses.release()  # the addresses this start added; those there before stay
                raise
            self.rps.sync(self.config.settings)  # never raises: what fails is logged and in status
            resized = getattr(self.backend, "resized", None)
            if resized:  # bpf: the session table carried over to another max_sessions
                ct = resized["maps"].get("snat_ct") or {}
                later = [ct.get("after_attach") or {}, ct.get("after_grace") or {}]
                self.log.info("table_resized", sessions_from=resized["from"], sessions_to=resized["to"],
                              copied_first=ct.get("first"), copied_after_attach=later[0].get("copied"),
                              copied_after_grace=later[1].get("copied"), no_room=sum(p.get("full", 0) for p in later),
                              seconds=resized["seconds"])  # fmt: skip
            self.log.info("started", backend=self.backend.name, rules=len(self.config.rules),
                          config=self.config_path, inside=",".join(self.config.settings.inside) or None,
                          outside=",".join(self.config.settings.outside) or None)
            self.config_warnings()
            self.last_reload = self.reload_record("start", self.config_path, None, self.warnings)

    def backend_warnings(self) -> list[str]:
        """What the backend's last apply warned of beyond the config (``apply_warnings``: nft's
        host limits counted afresh), logged by the backend; the reload's and adm's answers
        carry them, as `snatgw reload` and `snatgw adm` print their warnings."""
        got = getattr(self.backend, "apply_warnings", None)
        return [str(w) for w in got] if isinstance(got, (list, tuple)) else []

    def config_warnings(self) -> list[str]:
        """Log what `snatgw check` warns of about devices (an oif that is no uplink: a typo
        whose rule matches nothing; no inside or outside interface at all: nothing is
        translated) and about settings the running backend ignores (nft:
        `port_tries`, `on_exhausted spill`; also when `--backend nft` chose it,
        which `check` of the file cannot know), so that a start or reload does not take them
        silently; kept in ``warnings`` (the reload request's answer prints them)."""
        from ..cli.commands.check import interface_warnings, nft_pressure_warnings, oif_warnings

        found = self.warnings = (interface_warnings(self.config) + oif_warnings(self.config)
                                 + nft_pressure_warnings(self.config))
        for w in found[:10]:
            self.log.warning("config_warning", warning=w)
        if len(found) > 10:
            self.log.warning("config_warning", warning=f"... and {len(found) - 10} more (snatgw check lists them)")
        return found

    def stop(self) -> None:
        with self.lock:
            try:  # refusals of the interval in progress would otherwise never be logged
                self._log_refusals(self.clock(), force=True)
            except Exception as e:  # noqa: BLE001 - stopping the datapath must not depend on it
                self.log.warning("refusals_failed", error=repr(e))
            self.rps.restore()  # the masks the devices had before (the datapath itself stays)
            self.backend.stop(keep_state=True)
            self.log.info("stopped", backend=self.backend.name, keep_state=True)

    def _commit(self, new: GatewayConfig, table: AdmTable, event: str, **fields) -> None:
        """Apply ``new`` to the backend; only when that succeeds does it become current."""
        running = self.effective(new)  # with the rules of failed links on their backups
        try:
            self.addresses.sync(running)  # first: a plan error (no uplink for an address) changes nothing
            self.backend.apply(running)
        except MissingDeviceError as e:
            raise locate_device(running.settings, e) from None
        self.config, self.table = new, table
        self.rps.sync(running.settings)  # (an adm batch changes no setting: nothing to write then)
        self.log.info(event, rules=len(new.rules), **fields)

    def _keep_fixed(self, new: GatewayConfig) -> tuple[GatewayConfig, list[str]]:
        """``new`` with the settings a reload cannot change kept as they run, and a warning for
        each (logged now; the reload's answer carries them once it is applied)."""
        cur = self.config.settings
        fixed = {k: getattr(cur, k) for k in FIXED_ON_RELOAD if getattr(new.settings, k) != getattr(cur, k)}
        said = []
        for k, v in fixed.items():
            self.log.warning("reload_setting_ignored", setting=k, running=v, wanted=getattr(new.settings, k),
                             msg="restart the daemon to change it")
            said.append(f"{k}: not changed by a reload (the file says {getattr(new.settings, k)}, {v} runs); "
                        "restart the daemon to change it")
        return (replace(new, settings=replace(new.settings, **fixed)) if fixed else new), said

    def reload_record(self, via: str, config: str | None, error: str | None, warnings: list[str]) -> dict:
        """What `snatgw status` shows of the start or the last reload (``last_reload``): when
        (``at``, unix time), ``via`` (start, signal: SIGHUP or `systemctl reload`, control: the
        reload request of `snatgw reload`), the ``config`` read, ``ok`` and the ``error`` of a
        refused one (the previous config runs), the ``rules`` running after it and its
        ``warnings``, the first RELOAD_WARNINGS_KEPT of ``warnings_total`` (each cut at
        RELOAD_WARNING_CHARS, as the error is: a config's error may quote much of it, and every
        status answer carries the record).  A reload by signal has no answer to carry them, so
        the log and this record are where an operator finds them.  Bounded: one record,
        replaced by the next."""
        kept = [_cut(w) for w in warnings[:RELOAD_WARNINGS_KEPT]]
        return {"ok": error is None, "error": None if error is None else _cut(error), "at": time.time(), "via": via,
                "config": config, "rules": len(self.config.rules), "warnings": kept, "warnings_total": len(warnings)}

    def reload(self, path: str | None = None, text: str | None = None, via: str = "control") -> GatewayConfig:
        """Re-read the config (its file, another file, or text) and apply it atomically.
        Any error (parse, validation, backend) is logged and raised; the old config stays.
        ``via``: how it came, for ``last_reload``: "control" (the reload request), "signal"
        (the daemon's SIGHUP handler says so)."""
        with self.lock:
            src = path or self.config_path
            what = src if text is None else "<control>"
            try:
                new = load_config(None if text is not None else src, text, self.overrides,
                                  filename="<control>" if text is not None else None)
                new, ignored = self._keep_fixed(new)
                self._commit(new, AdmTable.from_ruleset(new.rules), "reloaded", config=what)
            except SnatgwError as e:
                self.last_error = str(e)
                self.last_reload = self.reload_record(via, what, str(e), [])
                self._applied("reload", what, str(e))
                self.log.error("reload_failed", error=str(e), kept_rules=len(self.config.rules))
                raise
            except Exception as e:  # a bug below must cost the reload, never the daemon
                self.last_error = f"internal error: {e!r}"
                self.last_reload = self.reload_record(via, what, self.last_error, [])
                self._applied("reload", what, self.last_error)
                self.log.error("reload_failed", error=self.last_error, kept_rules=len(self.config.rules))
                raise BackendError(self.last_error) from None
            self._applied("reload", what, None)
            if path and text is None:
                self.config_path = str(Path(path).resolve())
            self.reloads += 1
            self.last_error = None
            self.config_warnings()
            # the reload's answer: what it did not do first, then what the backend's apply warns
            # of (nft: a host limit counted afresh), then the config's warnings
            self.warnings = ignored + self.backend_warnings() + self.warnings
            self.refreshed = self.on_reload() if self.on_reload is not None else None
            self.last_reload = self.reload_record(via, what, None, self.warnings)
            return new

    def adm(self, argvs: list[list[str]], restore: bool = False) -> AdmTable:
        """Apply ipvsadm-syntax commands as one batch: all of them, or none.  ``restore`` (-R):
        the batch replaces the rule table (AdmTable.apply_all)."""
        with self.lock:
            cmds = [parse_args(a) for a in argvs]
            table = self.table.apply_all(cmds, restore=restore)
            new = replace(self.config, rules=table.ruleset())
            try:
                self._commit(new, table, "adm_applied", commands=len(cmds),
                             ops=",".join(c.op for c in cmds), restore=restore or None,
                             args=" ".join(argvs[0]) if len(argvs) == 1 else None)
            except SnatgwError as e:
                self._applied("adm", " ".join(argvs[0]) if len(argvs) == 1 else f"{len(argvs)} commands", str(e))
                self.log.error("adm_failed", error=str(e), kept_rules=len(self.config.rules))
                raise
            self._applied("adm", " ".join(argvs[0]) if len(argvs) == 1 else f"{len(argvs)} commands", None)
            return table

    def _applied(self, kind: str, what: str | None, error: str | None) -> None:
        self.applies["ok" if error is None else "failed"] += 1
        self.last_apply = {"kind": kind, "what": what, "ok": error is None, "error": error,
                           "at": time.time(), "uptime": round(self.clock() - self.started_at, 3)}

    def gc(self, now: float | None = None) -> int:
        """One GC tick: expire sessions; sample counters for rates.  A backend with
        ``expire_unlocked`` (bpf: its sweep serializes itself) expires outside the service
        lock, so control requests do not wait for a sweep of a million sessions."""
        unlocked = getattr(self.backend, "expire_unlocked", False)
        t0 = time.monotonic()
        if unlocked:
            n = self.backend.expire()
        with self.lock:
            if not unlocked:
                n = self.backend.expire()
            self.gc_stats["sweeps"] += 1
            self.gc_stats["removed"] += n
            self.gc_stats["seconds"] += time.monotonic() - t0
            t = self.clock() if now is None else now
            if not self._samples or t - self._samples[-1][0] >= RATE_INTERVAL:
                try:
                    # counters() where a backend has it: rates need no session count, and
                    # counting sessions reads the whole table
                    sample = getattr(self.backend, "counters", self.backend.stats)()
                    self._samples = (self._samples + [(t, sample.as_dict())])[-2:]
                except SnatgwError as e:
                    self.log.warning("stats_failed", error=str(e))
            self._log_refusals(t)
        if n:
            self.log.debug("expired", sessions=n)
        return n

    def check_hooks(self) -> list[str]:
        """Put back datapath hooks that vanished (backend.check_hooks); logged and counted."""
        check = getattr(self.backend, "check_hooks", None)
        with self.lock:
            restored = check() if check is not None else []
            self.rps.check()  # a device recreated under its name gets the mask again (logged at info)
        if restored:
            self.hooks_restored += len(restored)
            self.log.warning("hooks_restored", backend=self.backend.name, restored="; ".join(restored),
                             total=self.hooks_restored)  # fmt: skip
        return restored

    def refresh_route_back(self) -> str | None:
        """Judge again whether a new session's route back is the reverse-path check's (an IPv4
        rule or forwarding switch changed: daemon.extras); the backend's answer, None: reused."""
        refresh = getattr(self.backend, "refresh_route_back", None)
        if refresh is None:
            return None
        with self.lock:
            return refresh()

    def tick(self) -> None:
        """The periodic job: GC, then the hook check.  Never raises: every error is logged and
        counted (a backend's parse error, a vanished tool), and the next tick tries again."""
        for name, step in (("gc", self.gc), ("hooks", self.check_hooks)):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - the daemon outlives any backend failure
                self.errors += 1
                msg = str(e) if isinstance(e, SnatgwError) else repr(e)
                self.log.error(f"{name}_failed", error=msg, errors=self.errors)
    def _log_refusals(self, t: float, force: bool = False) -> None:
        """Every REFUSAL_LOG_INTERVAL: one warning per (inside host, SNAT address) whose new
        flows were refused since the last look (from the refusal markers, not per packet);
        ``force``: now, whatever the interval (the daemon stopping)."""
        get = getattr(self.backend, "refusals", None)
        if get is None or (not force and self._refusals_at is not None
                           and t - self._refusals_at < REFUSAL_LOG_INTERVAL):
            return
        self._refusals_at = t
        try:
            markers = get()
        except SnatgwError as e:
            self.log.warning("refusals_failed", error=str(e))
            return
        seen = {(m["host"], m["remote"], m["sport"], m["dport"], m["proto"], m["at"]) for m in markers}
        pairs: dict[tuple[str, str], list] = {}  # (host, addr) -> [flows, {reason: flows}]
        for m in markers:  # new since the last look: not there then, or refused again (new time)
            if (m["host"], m["remote"], m["sport"], m["dport"], m["proto"], m["at"]) in self._refusal_seen:
                continue
            p = pairs.setdefault((m["host"], m["addr"]), [0, {}])
            p[0] += 1
            p[1][m["reason"]] = p[1].get(m["reason"], 0) + 1
        ranked = sorted(pairs.items(), key=lambda kv: -kv[1][0])
        for i, ((host, addr), (flows, reasons)) in enumerate(ranked):
            if i == REFUSAL_LOG_LINES:  # the rest in one line, their flows counted: the lines add up to all
                self.log.warning("refused_more", pairs=len(pairs) - i, flows=sum(f for _, (f, _) in ranked[i:]),
                                 interval=REFUSAL_LOG_INTERVAL)  # fmt: skip
                break
            # a pair's flows refused for several reasons (a port search that failed, then the host's
            # limit) name each with its count: the first marker's reason stood for all of them
            by = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
            more = {"reasons": ",".join(f"{r}:{n}" for r, n in by)} if len(by) > 1 else {}
            self.log.warning("refused", host=host, snat_addr=addr, flows=flows, reason=",".join(r for r, _ in by),
                             **more, interval=REFUSAL_LOG_INTERVAL)  # fmt: skip
        self._refusal_seen = seen

    # ------------------------------------------------------------------ queries
    def status(self) -> dict:
        s = self.config.settings
        return {
            "pid": os.getpid(), "backend": self.backend.name, "config": self.config_path,
            "uptime": round(self.clock() - self.started_at, 3), "reloads": self.reloads,
            "service": self.table.service, "rules": len(self.config.rules),
            "last_error": self.last_error, "inside": list(s.inside), "outside": list(s.outside),
            "pin_dir": s.pin_dir, "control_socket": s.control_socket, "max_sessions": s.max_sessions,
            "gc_interval": s.gc_interval, "hooks_restored": self.hooks_restored, "errors": self.errors,
            "last_reload": self.last_reload, "timeouts": timeouts_by_name(s.timeouts),
            "audit": self.audit_stats(), "sync": self.sync_stats(), "rps": self.rps.as_dict(),
            **getattr(self.backend, "status_extra", dict)(),
        }

    def audit_stats(self) -> dict:
        """The audit log's counters (records written, lost by cause), or {"enabled": False}."""
        if self.audit is None:
            return {"enabled": False, "target": self.config.settings.audit_log}
        return self.audit.stats()

    def sync_stats(self) -> dict:
        """The session sync's counters (daemon/sync.py), or {"enabled": False} (and why, when
        it is configured but could not start)."""
        if self.sync is None:
            s = self.config.settings
            return {"enabled": False, "peer": f"{s.sync_peer}:{s.sync_port}" if s.sync_peer else None,
                    "error": self.sync_error if s.sync_peer else None}  # fmt: skip
        return self.sync.stats()

    def rules(self) -> dict:
        """The running rules (with failed links' rules on their backups), priority and
        definition order."""
        rs = self.effective(self.config).rules
        return {
            "service": self.table.service,
            "max_sessions": self.config.settings.max_sessions,
            "rules": [rule_info(i, r) for i, r in enumerate(rs, 1)],
            "defined": [rule_info(0, r) for r in rs.defined],
            "links_on_backup": sorted(self.failed_links & {lk.name for lk in self.config.links}),
        }

    # ------------------------------------------------------------------ link failover
    def effective(self, cfg: GatewayConfig) -> GatewayConfig:
        """``cfg`` as it runs while the links in ``failed_links`` are down (config.links)."""
        down = self.failed_links & {lk.name for lk in cfg.links}
        return replace(cfg, rules=failover(cfg.rules, cfg.links, down)) if down else cfg

    def set_link(self, name: str, on_backup: bool, why: str = "") -> bool:
        """A link monitor's verdict: move the link's rules to its backup, or back.  Applies the
        running rules at once (sessions follow, spec "Rule changes and live sessions"); on a
        backend error the verdict is kept and the next apply carries it.  True when applied."""
        with self.lock:
            before = self.effective(self.config)
            (self.failed_links.add if on_backup else self.failed_links.discard)(name)
            after = self.effective(self.config)
            if after.rules == before.rules:
                return False
            moved = sum(1 for a, b in zip(before.rules.defined, after.rules.defined) if a != b)
            t0 = time.monotonic()
            try:
                self.addresses.sync(after)
                self.backend.apply(after)
            except SnatgwError as e:
                self._applied("failover" if on_backup else "failback", name, str(e))
                self.log.error("link_apply_failed", link=name, on_backup=on_backup, error=str(e))
                return False
            self._applied("failover" if on_backup else "failback", name, None)
            removed = getattr(self.backend, "last_follow", (0, 0))[1] if hasattr(self.backend, "last_follow") \
                else getattr(self.backend, "last_removed", None)
            self.log.emit("warning" if on_backup else "info", "link_failover" if on_backup else "link_restored",
                          link=name, why=why, rules=moved, sessions_removed=removed,
                          apply_ms=round((time.monotonic() - t0) * 1e3, 1))
            return True

    def rate(self) -> dict:
        """Per-second deltas between the last two counter samples (empty until two exist);
        with the allocator's counters in both (bpf), ``allocator``: port searches and tries a
        second and the mean tries per search over the interval (None without a search)."""
        if len(self._samples) < 2:
            return {"interval": None, "rules": {}, "reasons": {}}
        (t0, a), (t1, b) = self._samples
        dt = max(t1 - t0, 1e-9)
        rules = {}
        for rid, cur in b["rules"].items():
            old = a["rules"].get(rid, {})
            rules[rid] = {k: max(0.0, (cur[k] - old.get(k, 0)) / dt) for k in ("packets", "bytes", "sessions")}
        reasons = {k: max(0.0, (v - a["reasons"].get(k, 0)) / dt) for k, v in b["reasons"].items()}
        out = {"interval": dt, "rules": rules, "reasons": reasons}
        al0, al1 = (x.get("pressure", {}).get("allocator") or {} for x in (a, b))
        if all(k in al0 and k in al1 for k in ("port_searches", "port_search_tries")):
            ds = max(0, al1["port_searches"] - al0["port_searches"])  # a zero between: no rate
            dtr = max(0, al1["port_search_tries"] - al0["port_search_tries"])
            out["allocator"] = {"searches_per_sec": ds / dt, "tries_per_sec": dtr / dt,
                                "tries_per_search": tries_per_search(dtr, ds)}
        return out

    def session_of(self, host: str, sport: int, remote: str, dport: int, proto: int):
        """The session of one flow by its OUT key (op session), or None: the backend's own
        lookup (bpf: one lookup in the session table; nft: conntrack by the tuple), else the
        sessions listed toward the remote from the host, searched for the source port."""
        get = getattr(self.backend, "session_of", None)
        if get is not None:
            return get(host, sport, remote, dport, proto)
        flt = SessionFilter(inside=IPv4Network(f"{host}/32"), remote=IPv4Network(f"{remote}/32"), proto=proto,
                            remote_port=None if proto == 1 else dport)  # fmt: skip
        every = self.backend.iter_sessions(flt) if hasattr(self.backend, "iter_sessions") else \
            (x for x in self.backend.sessions() if flt.match(x))
        return next((x for x in every if x.inside.rpartition(":")[2] == str(sport)), None)

    def flush_filters(self, req: dict) -> dict:
        """The flush request's filters as backend.flush() keywords: ``rule_id`` (stable id) or
        ``priority`` (the running listing's #), ``inside``, ``nat`` (addresses); none: all."""
        out: dict = {}
        if req.get("priority") is not None:
            n, rules = _whole(req, "priority"), self.config.rules.rules
            if not 1 <= n <= len(rules):
                raise AdmUsageError(f"no rule #{n} (the running config has {len(rules)} rules)")
            out["rule_id"] = rules[n - 1].rule_id
        elif req.get("rule_id") is not None:
            out["rule_id"] = _whole(req, "rule_id", digits=10)
        for k in ("inside", "nat"):
            if req.get(k) is not None:
                out[k] = parse_addr(_text(req, k, "flush"), k)
        return out

    # ------------------------------------------------------------------ control requests
    def dispatch(self, req: dict) -> dict | Partial:
        """The control server's handle(): a long answer (a `sessions` listing) comes as a
        loop.Partial whose steps each hold the lock for a bounded piece; never raises."""
        return self.handle(req, pieces=True)

    def _guarded(self, op, fn) -> dict | Partial:
        """``fn()`` with handle()'s error answers; a Partial it returns is guarded the same."""
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001 - mapped as handle() maps them
            return self._failure(op, e)
        if isinstance(r, Partial):
            return Partial(lambda: self._guarded(op, r.step), r.close)
        return r

    def _failure(self, op, e: BaseException) -> dict:
        if isinstance(e, (SnatgwError, AdmRefused)):
            return _error(e)
        if isinstance(e, (KeyError, TypeError, ValueError, OverflowError)):  # Overflow: a limit of 1e400
            return _error(AdmUsageError(f"bad request: {e}"))
        self.log.error("request_failed", op=op, error=repr(e))  # the daemon must survive any request
        return _error(BackendError(f"internal error: {e!r}"))

    def handle(self, req: dict, pieces: bool = False) -> dict:
        """One control request -> one response; never raises."""
        op = req.get("op") if isinstance(req, dict) else None
        try:
            op = check_request(req)
            if op == "status":
                return {"ok": True, **self.status()}
            if op == "health":
                from .health import report

                with self.lock:
                    return {"ok": True, **report(self)}
            if op == "reload":
                path, text = _text(req, "path", op), req.get("text")
                if text is not None and not isinstance(text, str):
                    raise AdmUsageError(f"bad request: reload: text: expected a string, got {_shown(text)}")
                if path is not None and text is not None:
                    raise AdmUsageError("bad request: reload: give path or text, not both")
                new = self.reload(path=path, text=text, via="control")
                # its warnings as status keeps them: the first 10, each cut, and how many in all
                lr = self.last_reload or {}
                warnings, total = list(lr.get("warnings", [])), lr.get("warnings_total", 0)
                # the daemon's listeners follow the reload on its loop (daemon.extras): wait for
                # them a moment (the lock is free) and say a metrics_listen that could not listen,
                # which the answer never said ("reloaded", exit 0; only the log and status knew)
                done, listen = getattr(self, "refreshed", None), new.settings.metrics_listen
                if done is not None and done.wait(REFRESH_WAIT) and listen and self.metrics_error:
                    warnings.append(f"metrics_listen {listen}: not listening: {self.metrics_error}; the daemon runs "
                                    "on without it, a problem in `snatgw status` until a reload gets it")
                    total += 1
                return {"ok": True, "rules": len(new.rules), "warnings": warnings, "warnings_total": total}
            if op == "rules":
                with self.lock:
                    return {"ok": True, **self.rules()}
            if op == "sessions":
                # `snatgw conns` reads the bpf backend's pinned maps itself, streaming; this op
                # serves the other backends (and old clients), filtered and limited here, in
                # pieces of SESSIONS_CHUNK (dispatch: a Partial per piece; handle: all at once)
                flt = SessionFilter.from_dict(req.get("filter"))
                limit = MAX_SESSIONS_REPLY if req.get("limit") is None else _whole(req, "limit", digits=9)
                if limit < 0:
                    raise AdmUsageError(f"bad request: limit: expected a whole number 0 or more, got {limit}")
                limit = min(limit, MAX_SESSIONS_REPLY)
                listing = _Listing(self, flt, limit)
                first = self._guarded(op, listing.step)
                if pieces:
                    return first
                while isinstance(first, Partial):
                    first = first.step()
                return first
            if op == "spill_memos":  # explain --live: addresses found full toward a remote (bpf)
                remote = _text(req, "remote", op)
                remote = None if remote is None else str(parse_addr(remote, "remote"))
                get = getattr(self.backend, "spill_memos", None)
                with self.lock:
                    memos = get(remote) if get else []
                return {"ok": True, "memos": memos}
            if op == "refusal_marker":  # explain --live: the flow's refusal marker, if young (bpf)
                host, sport, remote, dport, proto = _flow(req, op)
                get = getattr(self.backend, "refusal_marker", None)
                with self.lock:
                    marker = get(host, sport, remote, dport, proto) if get else None
                return {"ok": True, "marker": marker, "markers": get is not None}
            if op == "session":  # explain --live: the flow's own session, whatever a listing's cut
                flow = _flow(req, op)
                with self.lock:
                    found = self.session_of(*flow)
                return {"ok": True, "session": None if found is None else found.as_dict()}
            if op == "stats":
                with self.lock:
                    st = self.backend.stats().as_dict()
                    st["audit"] = self.audit_stats()
                    st["sync"] = self.sync_stats()
                    alloc, rate = st.get("pressure", {}).get("allocator"), self.rate()
                    if alloc is not None and rate.get("allocator") is not None:  # over the last interval
                        alloc["last_interval"] = {"seconds": round(rate["interval"], 3), **rate["allocator"]}
                    return {"ok": True, "stats": st, **self.rules()}
            if op == "rate":
                with self.lock:
                    return {"ok": True, "rate": self.rate(), **self.rules()}
            if op == "flush":
                with self.lock:
                    which = self.flush_filters(req)
                    n = self.backend.flush(**which)
                self.log.info("flushed", **{k: str(v) for k, v in which.items()}, sessions=n)
                return {"ok": True, "flushed": n, **{k: str(v) for k, v in which.items()}}
            if op == "zero":
                with self.lock:
                    self.backend.zero()
                    self._samples = []
                self.log.info("zeroed")
                return {"ok": True}
            if op == "adm":
                cmds, restore = req.get("commands"), req.get("restore", False)
                if not isinstance(cmds, list) or not all(isinstance(c, list) for c in cmds):
                    raise AdmUsageError("bad request: adm: commands: expected a list of argv lists")
                if len(cmds) > MAX_COMMANDS:
                    raise AdmUsageError(f"bad request: adm: commands: {len(cmds)} of them; a batch has at most "
                                        f"{MAX_COMMANDS}")
                odd = next((a for c in cmds for a in c if not isinstance(a, str)), "")
                if not isinstance(odd, str):  # (adm.parse_args says only "arguments must be strings")
                    raise AdmUsageError("bad request: adm: commands: arguments must be strings, got "
                                        + _shown(odd))
                if not isinstance(restore, bool):  # "no" was true: the batch replaced every rule
                    raise AdmUsageError("bad request: adm: restore: expected true or false, got "
                                        + _shown(restore))
                if restore and not cmds:  # `snatgw adm -R` sends none for an empty input: -C clears
                    raise AdmUsageError("bad request: adm: a restore of no commands would remove every rule; "
                                        "send [\"-C\"] to clear them")
                table = self.adm(cmds, restore=restore)
                outside = self.config.settings.outside
                named = (parse_args(c) for c in cmds if any(str(a).startswith("--oif") for a in c))
                oifs = sorted({c.oif for c in named if c.oif and c.op in ("add", "edit")} - set(outside))
                warnings = [f"--oif {o}: not among the outside interfaces ({' '.join(outside)}): a rule with it "
                            "matches nothing through it" for o in oifs[:10] if outside]
                for w in warnings:
                    self.log.warning("config_warning", warning=w)
                warnings = self.backend_warnings() + warnings
                return {"ok": True, "rules": len(table.rules), "service": table.service, "warnings": warnings}
            raise AssertionError(f"op {op!r} in REQUEST_FIELDS but not handled")  # (check_request)
        except Exception as e:  # noqa: BLE001 - the daemon must survive any single request
            return self._failure(op, e)


class _Listing:
    """A `sessions` answer built SESSIONS_CHUNK sessions per step, the lock held only during a
    step.  The backend's iterator stays open between steps (bpf: batches of the map; nft: its
    own conntrack dump socket), as it does while the GC sweeps beside a listing; a session
    created or removed meanwhile may be listed or not, as with any walk of a live table."""

    def __init__(self, svc: Service, flt: SessionFilter, limit: int):
        self.svc, self.flt, self.limit = svc, flt, limit
        self.it = None
        self.out: list[dict] = []

    def step(self) -> dict | Partial:
        try:
            return self._step()
        except BaseException:
            self.close()  # the backend failed mid-listing: its dump socket goes now
            raise

    def _step(self) -> dict | Partial:
        svc = self.svc
        with svc.lock:
            if self.it is None:
                if hasattr(svc.backend, "iter_sessions"):
                    self.it = iter(svc.backend.iter_sessions(self.flt, self.limit + 1))
                else:
                    self.it = (x for x in svc.backend.sessions() if self.flt.match(x))
            n = 0
            for x in self.it:
                if len(self.out) >= self.limit:
                    self.close()
                    return {"ok": True, "sessions": self.out, "truncated": True}
                self.out.append(x.as_dict())
                n += 1
                if n >= SESSIONS_CHUNK:
                    return Partial(self.step, self.close)
        self.close()
        return {"ok": True, "sessions": self.out, "truncated": False}

    def close(self) -> None:
        close = getattr(self.it, "close", None)
        if close is not None:
            close()  # a generator: its dump socket goes now, not at garbage collection


def make_backend(name: str, settings: Settings):
    """The backend for ``name``; a missing implementation is a clear BackendError."""
    try:
        if name == "bpf":
            from ..datapath.bpf.backend import BpfBackend

            return BpfBackend(settings)
        if name == "nft":
            from ..datapath.nft.backend import NftBackend

            return NftBackend(settings)
        if name == "fake":
            from ..datapath.fake import FakeBackend

            return FakeBackend(settings, chaos=os.environ.get("SNATGW_FAKE_CHAOS"))
    except ImportError as e:
        raise BackendError(f"backend {name} is not available: {e}") from None
    raise BackendError(f"unknown backend {name!r}: expected bpf, nft or fake")


__all__ = ["Service", "load_config", "make_backend", "RuleSet"]
