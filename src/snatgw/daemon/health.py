"""The daemon's health for `snatgw status` (control op `health`): what the backend says of its
hooks and maps (``backend.health()``), the state of every inside and outside device, the last
reload or adm batch and its result, error events since start, and the list of problems that
make the gateway unhealthy (empty: healthy).

Problems, each one line naming what and where:
  - a program this daemon attached is no longer on its hook (replaced, or the device went);
  - an inside or outside device is missing, administratively down, or without carrier;
  - the last reload or adm batch failed (the daemon runs the rules it had before);
  - the session table is at least FILL_ALARM full (new flows will soon be refused);
  - a probed link (config `link`) is failed or recovering: its rules run on the backup;
  - the backend cannot be read at all;
  - `rps_cpus` is set but nothing was written (/sys shows another network namespace);
  - the audit log, the session sync or the metrics listener is configured but not running;
  - no inside or no outside interface is configured (nothing is translated).
"""

from __future__ import annotations

import json
import subprocess
import time

FILL_ALARM = 0.9  # sessions / max_sessions at which status calls the table nearly full


def link_states(devices) -> dict[str, dict]:
    """name -> {exists, up (admin), carrier, operstate} from `ip -j link show` (netlink, so it
    answers for the daemon's own network namespace, unlike /sys of another mount)."""
    p = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, timeout=10)
    links = {link.get("ifname"): link for link in json.loads(p.stdout or "[]")} if p.returncode == 0 else {}
    out = {}
    for name in devices:
        link = links.get(name)
        if link is None:
            out[name] = {"exists": False, "up": False, "carrier": False, "operstate": "MISSING"}
            continue
        flags = link.get("flags", [])
        out[name] = {"exists": True, "up": "UP" in flags, "carrier": "LOWER_UP" in flags,
                     "operstate": link.get("operstate", "UNKNOWN")}
    return out


def problems(dp: dict, links: dict[str, dict], last_apply: dict | None) -> list[str]:
    out = []
    if "error" in dp:
        out.append(f"datapath: cannot read its state: {dp['error']}")
    for h in dp.get("hooks", []):
        if not h["attached"]:
            where = f"{h['device']} {h['hook']}" if h.get("device") else f"the {h['hook']} hook"
            found = "nothing" if h.get("found") is None else f"{h['found']}"
            out.append(f"datapath: {h['program']} is no longer on {where} (found {found})")
    for name, st in links.items():
        if not st["exists"]:
            out.append(f"link {name}: missing")
        elif not st["up"]:
            out.append(f"link {name}: administratively down")
        elif not st["carrier"]:
            out.append(f"link {name}: no carrier ({st['operstate']})")
    if last_apply and not last_apply["ok"]:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last_apply["at"]))
        out.append(f"last {last_apply['kind']} failed at {when}: {last_apply['error']} "
                   "(the previous rules are still running)")
    mx, n = dp.get("max_sessions") or 0, dp.get("sessions") or 0
    if mx and n >= FILL_ALARM * mx:
        out.append(f"sessions: {n} of {mx} ({100 * n / mx:.0f}%): new flows will be refused when full")
    return out


def report(service, link_reader=None) -> dict:
    """The health report of a running Service (called under its lock)."""
    try:
        dp = service.backend.health()
    except Exception as e:  # noqa: BLE001 - any failure to read is itself the finding
        dp = {"error": str(e)}
    s = service.config.settings
    links = (link_reader or link_states)(tuple(s.inside) + tuple(s.outside))
    found = problems(dp, links, service.last_apply)
    missing = [k for k in ("inside", "outside") if not getattr(s, k)]
    if missing:  # the programs are on no device: nothing is translated
        found.insert(0, f"no {' or '.join(missing)} interfaces: nothing is translated (give them in the snatgw "
                        f"{{ }} block, then reload, or to `snatgw run --{missing[0]} IF`)")
    probes = service.link_monitor.as_dict() if getattr(service, "link_monitor", None) else {}
    for name, lk in probes.items():
        if lk["on_backup"]:
            found.append(f"link {name}: {lk['state']} for {lk['since']:.1f} s ({lk['why']}): its rules run on "
                         f"the backup {lk['backup_gw']}")
    rps = getattr(service, "rps", None)
    if rps is not None and rps.refused:
        found.append(f"rps_cpus {rps.setting}: not applied: {rps.refused}")
    if s.audit_log and getattr(service, "audit", None) is None:
        found.append(f"audit log {s.audit_log}: configured but not running (see the daemon's log)")
    if s.metrics_listen and getattr(service, "metrics_error", None):
        found.append(f"metrics_listen {s.metrics_listen}: configured but not listening: {service.metrics_error} "
                     "(a reload tries again)")
    if s.sync_peer and getattr(service, "sync", None) is None:
        why = getattr(service, "sync_error", None)
        found.append(f"session sync with {s.sync_peer}: configured but not running" + (f": {why}" if why else ""))
    elif getattr(service, "sync", None) is not None:
        found += service.sync.problems()  # a silent peer, or one of another protocol version
    counts = dict(service.log.counts) if hasattr(service.log, "counts") else {}
    return {
        **service.status(),
        "healthy": not found,
        "problems": found,
        "datapath": dp,
        "links": links,
        "link_health": probes,
        "last_apply": service.last_apply,
        "errors": counts.get("error", 0),
        "warnings": counts.get("warning", 0),
        "log_lines_dropped": getattr(service.log, "dropped", 0),  # stderr stalled: the writer's bound
        "last_error_event": getattr(service.log, "last_error", None),
    }
