"""The gateway inside the lab: `snatgw run` started in <P>-gw (nsenter --net only), reload,
restart and stop; the SNAT pool addresses put on the outside links; and a plain kernel nft
SNAT used when snatgw's own datapath is not available (clearly labelled wherever shown).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import select
import signal
import subprocess
import sys
import time
from typing import Iterable

from ..rules import Rule, RuleSet
from .netns import LabError, nsenter, run, with_own_sysfs

#: module each backend's datapath lives in (written by other parts of snatgw)
BACKEND_MODULES = {
    "bpf": "snatgw.datapath.bpf.backend",
    "nft": "snatgw.datapath.nft.backend",
    "fake": "snatgw.datapath.fake",
}
KERNEL_SNAT_TABLE = "sglab_kernel_snat"


def _importable(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        return False


def gateway_available(backend: str) -> tuple[bool, str]:
    """Whether `snatgw run --backend B` can work here; if not, why (for the demo and xfails)."""
    need = ["snatgw.cli.commands.run", "snatgw.daemon.service", "snatgw.config.parse",
            BACKEND_MODULES.get(backend, f"snatgw.datapath.{backend}")]
    missing = [m for m in need if not _importable(m)]
    if missing:
        return False, f"not built yet: {', '.join(missing)}"
    return True, ""


def snatgw_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "snatgw.cli.main", *map(str, args)]


def _rules_of(config) -> Iterable[Rule]:
    if isinstance(config, (str, os.PathLike)):
        from ..config.parse import parse_file  # written by the config part of snatgw

        config = parse_file(str(config))
    rules = getattr(config, "rules", config)
    return rules.defined if isinstance(rules, RuleSet) else rules


def add_snat_addresses(lab, config) -> list[tuple[str, str]]:
    """`ip addr add A/32` for every pool address, on the outside link whose subnet holds it
    (as LVS operators did).  ``config``: a GatewayConfig, RuleSet, rules, or a config path.
    Returns (address, iface) pairs; addresses no outside subnet holds are an error."""
    have = {a["local"] for a in _gw_addrs(lab)}
    done = []
    for rule in _rules_of(config):
        for addr in rule.pool.addresses():
            ifname = lab.outside_iface_for(addr)
            if ifname is None:
                raise LabError(f"SNAT address {addr} ({rule.describe()}) is in no outside subnet of the lab")
            if str(addr) not in have:
                lab.ip("gw", "addr", "add", f"{addr}/32", "dev", ifname)
                have.add(str(addr))
            done.append((str(addr), ifname))
    return done


def _gw_addrs(lab) -> list[dict]:
    import json

    out = json.loads(lab.ip("gw", "-j", "addr").stdout or "[]")
    return [i for a in out for i in a.get("addr_info", []) if i.get("family") == "inet"]


def start_gateway(lab, config_path: str, backend: str = "bpf", timeout: float = 30.0,
                  extra: Iterable[str] = (), own_sysfs: bool = False) -> subprocess.Popen:
    """Run `snatgw run` in <P>-gw and wait for its `ready` line; LabError with its log if not.
    ``own_sysfs``: with <P>-gw's own sysfs on /sys (netns.with_own_sysfs: `rps_cpus` writes
    there; with nsenter --net alone /sys is the host's, which the daemon refuses to write)."""
    if lab.gateway_proc is not None and lab.gateway_proc.poll() is None:
        raise LabError(f"a gateway runs already in {lab.ns('gw')} (pid {lab.gateway_proc.pid})")
    os.makedirs(os.path.dirname(lab.socket_path), mode=0o700, exist_ok=True)
    os.makedirs(lab.workdir, exist_ok=True)
    log_path = os.path.join(lab.workdir, "gateway.log")
    # the gateway runs on a copy in the lab's work dir: a reload rewrites that copy, never the
    # operator's (or the repository's) file
    running = os.path.join(lab.workdir, "gateway.conf")
    if os.path.abspath(config_path) != running:
        shutil.copyfile(config_path, running)
    argv = snatgw_argv("run", running, "--backend", backend,
                       "--inside", "lan40", "--inside", "lan50", "--outside", "eth1", "--outside", "eth2",
                       "--pin-dir", lab.pin_dir, "--socket", lab.socket_path, *extra)
    log = open(log_path, "a")
    log.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(argv)}\n")
    log.flush()
    if own_sysfs:
        argv = with_own_sysfs(*argv)
    proc = subprocess.Popen(nsenter(lab.ns("gw"), *argv), stdout=subprocess.PIPE, stderr=log,
                            text=True, bufsize=1)
    log.close()
    lab.gateway_proc = proc
    lab.gateway_pid, lab.gateway_backend, lab.gateway_config = proc.pid, backend, running
    lab.save()
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            stop_gateway(lab)
            raise LabError(f"snatgw run ({backend}) printed no 'ready' within {timeout:g} s; "
                           f"stdout: {seen[-5:]}; log {log_path}:\n{log_tail(log_path)}")
        r, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
        if r:
            line = proc.stdout.readline()
            if line:
                seen.append(line.rstrip())
                if "ready" in line:
                    break
                continue
        if proc.poll() is not None:
            lab.gateway_proc = None
            lab.gateway_pid = None
            lab.save()
            raise LabError(f"snatgw run ({backend}) exited with {proc.returncode} before 'ready'; "
                           f"log {log_path}:\n{log_tail(log_path)}")
    # keep draining stdout so the daemon never blocks on a full pipe
    import threading

    threading.Thread(target=_drain, args=(proc.stdout, log_path), daemon=True).start()
    return proc


def _drain(stream, log_path: str) -> None:
    try:
        with open(log_path, "a") as log:
            for line in stream:
                log.write("stdout: " + line)
                log.flush()
    except (OSError, ValueError):
        pass


def log_tail(path: str, n: int = 15) -> str:
    """The last ``n`` lines of a log file, for an error message."""
    try:
        with open(path) as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def stop_gateway(lab, timeout: float = 10.0) -> int | None:
    """SIGTERM the gateway (pins stay for the next one), wait; SIGKILL after ``timeout``."""
    proc, pid = lab.gateway_proc, lab.gateway_pid
    code = None
    if proc is not None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        code = proc.returncode
    elif pid and _is_ours(lab, pid):  # started by another process (`snatgw lab` CLI)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
    changed = lab.gateway_pid is not None
    lab.gateway_proc, lab.gateway_pid = None, None
    if changed and os.path.exists(os.path.dirname(lab.workdir)):
        try:
            lab.save()
        except OSError:
            pass
    return code


def kill_gateway(lab) -> None:
    """kill -9 the gateway (no clean-up of its own: programs, pins, nft table stay), then
    forget it."""
    if lab.gateway_proc is not None and lab.gateway_proc.poll() is None:
        lab.gateway_proc.kill()
        lab.gateway_proc.wait()
    lab.gateway_proc = None
    stop_gateway(lab)


def purge_gateway(lab, *extra: str) -> subprocess.CompletedProcess:
    """`snatgw purge` of the lab's pin dir and socket in <P>-gw (both backends' traces)."""
    return subprocess.run(nsenter(lab.ns("gw"), *snatgw_argv("purge", "--pin-dir", lab.pin_dir,
                                                              "--socket", lab.socket_path, *extra)),
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def write_ref_config(lab, name: str) -> str:
    """The demo's REF rules as a config file in the lab's workdir (their SNAT addresses put on
    the outside links first); returns its path."""
    from .demo import REF_RULES, config_text, ruleset

    lab.add_snat_addresses(ruleset(REF_RULES))
    os.makedirs(lab.workdir, exist_ok=True)
    path = os.path.join(lab.workdir, name)
    with open(path, "w") as f:
        f.write(config_text(REF_RULES))
    return path


def no_gateway(lab):
    """Generator for a pytest fixture: no daemon and nothing of either backend in <P>-gw
    before and after the test, even when it fails.  The purge before is skipped when the last
    thing done in the lab was this fixture's purge after a test, and it succeeded (so a module
    whose tests all take the fixture purges once between two tests, not twice: ~0.4 s each, a
    process start); any other use of the lab in between must go through this fixture too."""
    if not getattr(lab, "_purged_clean", False) or lab.gateway_proc is not None or lab.gateway_pid:
        stop_gateway(lab)
        purge_gateway(lab)
    lab._purged_clean = False
    try:
        yield lab
    finally:
        kill_gateway(lab)
        lab._purged_clean = purge_gateway(lab).returncode == 0


def _is_ours(lab, pid: int) -> bool:
    """The pid still runs in our gw namespace (not a recycled pid elsewhere)."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{lab.ns('gw')}").st_ino
    except OSError:
        return False


def reload_gateway(lab, config_path: str | None = None, timeout: float = 15.0) -> None:
    """Replace the running config file (if given) and ask the daemon to re-read it."""
    if lab.gateway_config is None:
        raise LabError("no gateway runs in this lab")
    if config_path is not None and os.path.abspath(config_path) != lab.gateway_config:
        with open(config_path) as src:
            text = src.read()
        tmp = lab.gateway_config + ".tmp"
        with open(tmp, "w") as dst:
            dst.write(text)
        os.replace(tmp, lab.gateway_config)
    cp = run(snatgw_argv("reload", "--socket", lab.socket_path), check=False, timeout=timeout)
    if cp.returncode != 0:
        raise LabError(f"snatgw reload: exit {cp.returncode}: {(cp.stderr or cp.stdout).strip()}")


def snatgw_json(lab, verb: str, *args: str, timeout: float = 15.0):
    """`snatgw VERB --socket <lab socket> --json ARGS` parsed, or None when it fails."""
    import json

    cp = run(snatgw_argv(verb, "--socket", lab.socket_path, "--json", *args), check=False, timeout=timeout)
    if cp.returncode != 0:
        return None
    try:
        if verb == "conns":  # JSON lines, one session each: as {"sessions": [...]}
            return {"sessions": [json.loads(line) for line in cp.stdout.splitlines() if line.strip()]}
        return json.loads(cp.stdout)
    except ValueError:
        return None


# --------------------------------------------------------------------------- kernel fallback


def kernel_snat_ruleset(rules: RuleSet) -> str:
    """nft text for a plain kernel SNAT of ``rules`` (priority order).  Not snatgw: the kernel
    picks pool addresses its own way and new_gw is not applied (the route decides)."""
    lines = [f"table ip {KERNEL_SNAT_TABLE} {{", "  chain post {",
             "    type nat hook postrouting priority srcnat; policy accept;"]
    for r in rules:
        m = [f"ip saddr {r.src}"]
        if r.dst.prefixlen:
            m.append(f"ip daddr {r.dst}")
        if r.oif:
            m.append(f'oifname "{r.oif}"')
        if r.gw:
            m.append(f"rt ip nexthop {r.gw}")
        to = str(r.pool.first) if r.pool.size == 1 else f"{r.pool.first}-{r.pool.last}"
        lines.append(f"    {' '.join(m)} snat ip to {to}")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def start_kernel_snat(lab, rules: RuleSet) -> None:
    """Plain kernel SNAT in <P>-gw only (the lab's self-test and the demo's labelled fallback)."""
    stop_kernel_snat(lab)
    lab.run("gw", "nft", "-f", "-", input=kernel_snat_ruleset(rules))


def start_kernel_masquerade(lab) -> None:
    """The simplest kernel SNAT in <P>-gw: masquerade to each uplink's own address (proves the
    lab, servers and clients without any rule logic)."""
    stop_kernel_snat(lab)
    lab.run("gw", "nft", "-f", "-", input=(
        f"table ip {KERNEL_SNAT_TABLE} {{\n chain post {{\n  type nat hook postrouting priority srcnat;\n"
        f'  oifname {{ "eth1", "eth2" }} ip saddr 198.18.0.0/15 masquerade\n }}\n}}\n'))


def stop_kernel_snat(lab) -> None:
    lab.run("gw", "nft", "delete", "table", "ip", KERNEL_SNAT_TABLE, check=False)
