"""The daemon against the in-memory FakeBackend: control socket, reload semantics, adm through the
socket, GC, signals.  No root: in-process services on a temp socket, plus `snatgw run --backend
fake` as a subprocess for the ready line and the signals."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.all import IP, TCP, UDP

from snatgw.cli.commands import adm as admcli
from snatgw.config.parse import parse_file
from snatgw.daemon.client import RemoteError, call
from snatgw.daemon.control import ControlServer, NoDaemon, request
from snatgw.daemon.log import Log
from snatgw.daemon.service import Service
from snatgw.datapath.fake import FakeBackend
from snatgw.errors import DaemonError

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "examples" / "lab.conf"
FAILOVER = ROOT / "examples" / "lab-failover.conf"


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Running:
    """An in-process daemon: Service + FakeBackend + ControlServer on a temp socket."""

    def __init__(self, d: Path, conf: Path = LAB, chaos=None):
        self.conf = d / "snatgw.conf"
        shutil.copy(conf, self.conf)
        self.clock = Clock()
        cfg = parse_file(self.conf)
        self.backend = FakeBackend(cfg.settings, clock=self.clock, chaos=chaos)
        self.log = Log(stream=io.StringIO())
        self.log.lines = []
        self.service = Service(cfg, self.backend, self.log, config_path=str(self.conf), clock=self.clock)
        self.sock = str(d / "run" / "ctl.sock")
        self.server = ControlServer(self.sock, self.service.dispatch, inline=self.service.handle)  # as the daemon
        self.service.start()
        self.server.serve()

    def req(self, **kw) -> dict:
        return request(self.sock, kw)

    def syn(self, src="198.18.40.10", sport=40000, dst="203.0.113.10", ingress="lan40"):
        pkt = bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=80, flags="S"))
        return self.backend.process(pkt, "inside", ingress)

    def udp(self, src="198.18.50.10", sport=5353, dst="198.51.100.10", ingress="lan50"):
        return self.backend.process(bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=53)), "inside", ingress)

    def close(self):
        self.server.close()


def test_status_reports_backend_rules_and_config(running):
    """`status` names the backend, the rule count and the config file the daemon runs."""
    st = running.req(op="status")
    assert st["ok"] and st["backend"] == "fake" and st["rules"] == 3
    assert st["config"] == str(running.conf.resolve()) and st["inside"] == ["lan40", "lan50"]


def test_socket_is_0600_in_a_0700_directory_it_created(running):
    """The control socket is root-only: the socket 0600, the directory the daemon made 0700."""
    assert stat.S_IMODE(os.stat(running.sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(running.sock)).st_mode) == 0o700


def test_reload_applies_the_edited_file_and_keeps_live_sessions(running):
    """After editing the file, reload applies the failover rules; sessions of unchanged rules
    stay, the edited rule's session (its address left the rule's pool) is removed."""
    assert running.syn().nat is not None  # rule 2, whose pool the failover replaces
    kept = running.udp()  # rule 3, unchanged
    shutil.copy(FAILOVER, running.conf)
    resp = running.req(op="reload")
    assert resp["ok"], resp
    assert running.backend.applied[-1].rules == parse_file(FAILOVER).rules
    assert [s["rule_id"] for s in running.req(op="sessions")["sessions"]] == [kept.rule.rule_id]


def test_invalid_config_on_reload_changes_nothing(running):
    """A reload of a broken file answers an error naming file:line, and the old rules keep running."""
    before = running.backend.config
    running.conf.write_text("virtual_server fwmark 1 {\n snat_rule { from 198.18.40.1/24 snat_ip 198.19.2.71 }\n}\n")
    resp = running.req(op="reload")
    assert not resp["ok"] and resp["exit"] == 2
    assert "snatgw.conf:2" in resp["error"] and "198.18.40.0/24" in resp["error"]
    assert running.backend.config is before and len(running.backend.applied) == 1
    assert running.req(op="status")["last_error"] == resp["error"]
    assert any("reload_failed" in line for line in running.log.lines)


def test_backend_failure_on_reload_keeps_the_old_config(tmpdir_short):
    """When backend.apply fails (chaos), the daemon keeps the config it had and says why."""
    r = Running(tmpdir_short, chaos="apply")
    try:
        resp = r.req(op="reload", path=str(FAILOVER))
        assert not resp["ok"] and "chaos" in resp["error"] and resp["exit"] == 3
        assert r.service.config.rules == parse_file(LAB).rules
        assert r.service.config_path == str(r.conf.resolve())  # not switched to the file that failed
    finally:
        r.close()


def test_reload_with_text_is_parsed_before_anything_is_applied(running):
    """A reload carrying config text applies it; the text's errors are named as <control>:line."""
    resp = running.req(op="reload", text="virtual_server fwmark 1 {\n snat_rule { from 198.18.0.0/16 snat_ip 198.19.2.71 }\n}\n")
    assert resp["ok"] and resp["rules"] == 1
    bad = running.req(op="reload", text="virtual_server fwmark 1 {\n snat_rule { snat_ip 198.19.2.71 }\n}\n")
    assert not bad["ok"] and "<control>:2" in bad["error"]
    assert len(running.service.config.rules) == 1


def test_settings_a_reload_cannot_change_are_kept_and_logged(running):
    """backend, pin_dir and control_socket stay as started; the reload logs that it ignored them."""
    text = running.conf.read_text().replace("backend bpf", "backend nft")
    assert running.req(op="reload", text=text)["ok"]
    assert running.service.config.settings.backend == "bpf"
    assert any("reload_setting_ignored" in line and "setting=backend" in line for line in running.log.lines)


def test_a_reload_that_changes_a_setting_it_cannot_says_so_to_the_reloader(running, capsys):
    """`backend nft` in the file of a bpf daemon: `snatgw reload` applies the rest, and says on
    stderr (and in the answer) that the backend was not changed and how to change it.  It
    printed a bare 'reloaded: 3 rules', exit 0: only the daemon's log told."""
    from snatgw.cli.main import main

    text = running.conf.read_text()
    running.conf.write_text(text.replace("backend bpf", "backend nft"))
    assert main(["reload", "--socket", running.sock]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("reloaded: 3 rules") and running.service.config.settings.backend == "bpf"
    assert "snatgw reload: warning: backend: not changed by a reload (the file says nft, bpf runs); " \
           "restart the daemon to change it" in err
    running.conf.write_text(text)
    assert running.req(op="reload")["warnings"] == []


def test_adm_add_goes_through_the_backend_and_lists_in_precedence_order(running):
    """-K through the socket reaches backend.apply; -L lists the new /24 before the /16 catch-all."""
    add = ["-K", "-f", "1", "-F", "198.18.50.0/24", "-W", "198.19.2.1", "-N", "198.19.3.1",
           "-U", "198.19.3.71-198.19.3.73", "-O", "sh"]
    assert running.req(op="adm", commands=[add])["ok"]
    assert len(running.backend.config.rules) == 4
    out = io.StringIO()
    assert admcli.main(["-L", "-n", "--socket", running.sock], stdout=out) == 0
    rows = [line.split()[1] for line in out.getvalue().splitlines() if line.startswith("  -> 198")]
    assert rows == ["198.18.40.0/24", "198.18.40.0/24", "198.18.50.0/24", "198.18.0.0/16"]


def test_adm_refusals_come_back_with_their_code_and_change_nothing(running, capsys):
    """-K of an existing rule exits non-zero with 'File exists'; -H of a missing one says 'No such'."""
    dup = ["-K", "-f", "1", "-F", "198.18.40.0/24", "-W", "198.19.2.1", "--oif", "eth1", "-U", "198.19.2.71"]
    assert admcli.main(dup + ["--socket", running.sock]) == 4
    assert "File exists" in capsys.readouterr().err
    assert admcli.main(["-H", "-f", "1", "-F", "198.18.99.0/24", "--socket", running.sock]) == 4
    assert "No such file" in capsys.readouterr().err
    assert admcli.main(["-K", "-f", "1", "-F", "198.18.99.1/24", "-U", "198.19.2.71", "--socket", running.sock]) == 2
    assert len(running.backend.applied) == 1


def test_save_restore_through_the_daemon_reproduces_the_rules(running):
    """`adm -S`, `adm -C`, `adm -R` of the saved text: same rules, same definition order."""
    saved = io.StringIO()
    admcli.main(["-S", "--socket", running.sock], stdout=saved)
    before = running.service.table
    assert admcli.main(["-C", "--socket", running.sock]) == 0
    assert len(running.backend.config.rules) == 0 and not running.service.table.service
    assert admcli.main(["-R", "--socket", running.sock], stdin=io.StringIO(saved.getvalue())) == 0
    assert running.service.table.rules == before.rules


def test_restore_is_all_or_nothing(running, capsys):
    """A restore whose last line is refused (a duplicate within the batch) applies none of it."""
    text = ("-K -f 1 -F 198.18.60.0/24 -U 198.19.2.71\n"
            "-K -f 1 -F 198.18.60.0/24 -U 198.19.2.71\n")
    assert admcli.main(["-R", "--socket", running.sock], stdin=io.StringIO(text)) == 4
    assert "command 2" in capsys.readouterr().err
    assert len(running.service.config.rules) == 3 and len(running.backend.applied) == 1


def test_gc_expires_idle_sessions_and_keeps_fresh_ones(running):
    """A GC tick after the UDP timeout removes that session; a later one is kept."""
    running.udp()
    running.clock.t += 301
    running.syn()
    assert running.service.gc() == 1
    sessions = running.req(op="sessions")["sessions"]
    assert [s["proto"] for s in sessions] == ["tcp"]


def test_flush_of_one_rule_leaves_the_others(running):
    """flush with a rule_id removes only that rule's sessions."""
    a, b = running.syn(), running.udp()
    assert a.rule.rule_id != b.rule.rule_id
    assert running.req(op="flush", rule_id=a.rule.rule_id)["flushed"] == 1
    assert [s["rule_id"] for s in running.req(op="sessions")["sessions"]] == [b.rule.rule_id]


def test_zero_clears_counters_but_not_sessions(running):
    """adm -Z zeroes reason and rule counters; sessions stay (and the rule's live count)."""
    a = running.syn()
    assert running.req(op="stats")["stats"]["reasons"] == {"XLATE_NEW": 1}
    assert admcli.main(["-Z", "--socket", running.sock]) == 0
    st = running.req(op="stats")["stats"]
    assert st["reasons"] == {} and st["sessions"] == 1
    assert st["rules"] == {str(a.rule.rule_id): {"rule_id": a.rule.rule_id, "packets": 0, "bytes": 0,
                                                 "sessions": 0, "live": 1}}


def test_rate_reports_per_second_deltas_between_gc_samples(running):
    """Two GC samples 2 s apart with 2 new sessions between them give 1 session/s for that rule."""
    running.service.gc()
    r1, _ = running.syn(sport=40000), running.syn(sport=40001)
    running.clock.t += 2
    running.service.gc()
    rate = running.req(op="rate")["rate"]
    assert rate["rules"][str(r1.rule.rule_id)]["sessions"] == pytest.approx(1.0)


def test_bad_requests_get_an_error_not_a_dead_daemon(running):
    """Unknown ops, non-JSON lines and malformed adm payloads are answered with errors."""
    assert running.req(op="nope")["code"] == "EINVAL"
    assert running.req(op="adm", commands="-L")["ok"] is False
    import socket as so

    s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    s.connect(running.sock)
    s.sendall(b"not json\n")
    assert json.loads(s.makefile().readline())["ok"] is False
    s.close()
    assert running.req(op="status")["ok"]


def test_a_reload_path_with_a_nul_byte_is_a_config_error_not_an_internal_one(running):
    """A control request's `path` is any JSON string: one with a NUL (no file can have such a
    name) raised ValueError in open(2)'s wrapper and came back as an \"internal error\", logged as
    a failed request; now it is the config error any unreadable path gets, and nothing changes."""
    before = running.req(op="rules")
    r = running.req(op="reload", path="/etc/snatgw.conf\x00.bak")
    assert r["ok"] is False and "internal error" not in r["error"]
    assert "cannot read config: embedded null byte" in r["error"]
    assert running.req(op="rules") == before and running.req(op="status")["ok"]


def test_a_second_daemon_on_the_same_socket_is_refused(running):
    """Binding a control socket where a live daemon answers fails and leaves it serving."""
    with pytest.raises(DaemonError, match="already running"):
        ControlServer(running.sock, lambda r: {"ok": True})
    assert running.req(op="status")["ok"]


def test_a_stale_socket_is_replaced_and_close_removes_it(tmpdir_short):
    """A socket file nobody listens on is taken over; closing the server removes it."""
    import socket as so

    path = str(tmpdir_short / "stale.sock")
    s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    s.bind(path)
    s.close()
    server = ControlServer(path, lambda r: {"ok": True, "echo": r})
    server.serve()
    assert request(path, {"op": "x"})["echo"] == {"op": "x"}
    server.close()
    assert not os.path.exists(path)
    with pytest.raises(NoDaemon):
        call(path, {"op": "status"})


def test_remote_errors_carry_the_daemons_exit_code(running):
    """client.call raises RemoteError with the daemon's errno-like code and exit code."""
    with pytest.raises(RemoteError) as ei:
        call(running.sock, {"op": "adm", "commands": [["-H", "-f", "1", "-F", "198.18.99.0/24"]]})
    assert ei.value.code == "ENOENT" and ei.value.exit_code == 4


# ---------------------------------------------------------------- the real process


def _spawn(conf: Path, sock: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "snatgw.cli.main", "run", str(conf), "--backend", "fake",
                             "--socket", sock, "--gc-interval", "0.05", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(pred, what: str, limit: float = 10.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_run_prints_ready_reloads_on_sighup_and_exits_0_on_sigterm(tmpdir_short):
    """`snatgw run`: one 'ready' line; SIGHUP with a broken file keeps the rules, with the
    failover file applies it; SIGTERM exits 0 and removes the socket."""
    conf = tmpdir_short / "snatgw.conf"
    shutil.copy(LAB, conf)
    sock = str(tmpdir_short / "s" / "ctl.sock")
    p = _spawn(conf, sock)
    try:
        line = p.stdout.readline()
        assert "ready" in line and "backend=fake" in line
        conf.write_text("virtual_server fwmark 1 {\n snat_rule { from 198.18.0.0/16 algo fast snat_ip 1.2.3.4 }\n}\n")
        p.send_signal(signal.SIGHUP)
        st = _wait(lambda: (s := request(sock, {"op": "status"}))["last_error"] and s, "failed reload")
        assert "algo" in st["last_error"] and st["rules"] == 3 and st["reloads"] == 0
        shutil.copy(FAILOVER, conf)
        p.send_signal(signal.SIGHUP)
        _wait(lambda: request(sock, {"op": "status"})["reloads"] == 1, "reload")
        rules = request(sock, {"op": "rules"})["rules"]
        assert any(r["new_gw"] == "198.19.3.1" and r["oif"] == "eth1" for r in rules)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
        assert not os.path.exists(sock)
        err = p.stderr.read()
        assert "event=reload_failed" in err and "event=stopped" in err and "keep_state=True" in err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_run_with_an_invalid_config_exits_2_without_a_socket(tmpdir_short):
    """A config that does not parse: exit 2, the error on stderr, no socket left behind."""
    conf = tmpdir_short / "bad.conf"
    conf.write_text("virtual_server fwmark 1 {\n snat_rule { from 198.18.0.0/16 }\n")
    sock = str(tmpdir_short / "ctl.sock")
    p = _spawn(conf, sock, "--log-json")
    out, err = p.communicate(timeout=20)
    assert p.returncode == 2 and "ready" not in out
    rec = json.loads(err.strip().splitlines()[-1])
    assert rec["event"] == "config_invalid" and "bad.conf" in rec["error"]
    assert not os.path.exists(sock)


def test_run_with_an_audit_log_in_proc_exits_2_naming_the_line(tmpdir_short):
    """`audit_log /proc/version`: a regular file to stat, but none the daemon can append to; the
    start is refused at the setting's line, as `check` refuses it."""
    conf = tmpdir_short / "audit.conf"
    conf.write_text("snatgw {\n audit_log /proc/version\n}\n"
                    "virtual_server fwmark 1 {\n snat_rule { from 198.18.0.0/16 snat_ip 198.19.2.71 }\n}\n")
    sock = str(tmpdir_short / "ctl.sock")
    p = _spawn(conf, sock, "--log-json")
    try:
        out, err = p.communicate(timeout=10)
    finally:  # (a daemon that started is not left behind)
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 2 and "ready" not in out
    rec = json.loads(err.strip().splitlines()[-1])
    assert rec["event"] == "config_invalid" and rec["error"].startswith(f"{conf}:2: audit_log: /proc/version is on "
                                                                        "the kernel's proc file system"), rec
    assert not os.path.exists(sock)


def test_chaos_can_fail_only_the_nth_call(tmpdir_short):
    """FakeBackend chaos 'apply:2': the first reload applies, the second fails, the third applies."""
    r = Running(tmpdir_short, chaos="apply:2")
    try:
        assert r.req(op="reload")["ok"]
        assert not r.req(op="reload")["ok"]
        assert r.req(op="reload")["ok"]
        assert r.service.reloads == 2
    finally:
        r.close()


def test_run_tells_systemd_when_it_is_ready_and_stopping(tmpdir_short):
    """With NOTIFY_SOCKET set (Type=notify), the daemon sends READY=1, then STOPPING=1 on SIGTERM."""
    import socket as so

    note = so.socket(so.AF_UNIX, so.SOCK_DGRAM)
    note.bind(str(tmpdir_short / "notify"))
    note.settimeout(10)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmpdir_short / "notify"))
    p = subprocess.Popen([sys.executable, "-m", "snatgw.cli.main", "run", str(LAB), "--backend", "fake",
                          "--socket", str(tmpdir_short / "ctl.sock")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready = note.recv(1000).split(b"\n")
        assert ready[0] == b"READY=1" and ready[1].startswith(b"STATUS=running: 3 rules")
        p.send_signal(signal.SIGTERM)
        assert note.recv(1000) == b"STOPPING=1"
        assert p.wait(timeout=10) == 0
    finally:
        note.close()
        if p.poll() is None:
            p.kill()
            p.wait()


def test_the_systemd_unit_ships_in_the_package_and_runs_the_daemon():
    """packaging/snatgw.service: ExecStart runs `snatgw run` on /etc/snatgw/snatgw.conf, reload is SIGHUP."""
    from importlib.resources import files

    unit = files("snatgw").joinpath("packaging/snatgw.service").read_text()
    lines = set(unit.splitlines())
    assert "ExecStart=/usr/local/sbin/snatgw run /etc/snatgw/snatgw.conf" in lines  # make install puts it there
    assert "ExecReload=/bin/kill -HUP $MAINPID" in lines and "KillSignal=SIGTERM" in lines
    assert "Type=notify" in lines


def test_the_units_reload_fails_on_a_broken_file_and_signals_nothing(tmpdir_short):
    """The unit's ExecReload lines, run as systemd runs them (in order, the first failure ends
    the reload and fails `systemctl reload`): a broken file fails at `snatgw check` (exit 2, the
    line named) and the daemon is not signalled; a good one is checked, then applied by SIGHUP.
    With the bare `kill -HUP`, `systemctl reload` said success while the daemon kept the old
    rules and only its log said why."""
    import shlex
    from importlib.resources import files

    unit = files("snatgw").joinpath("packaging/snatgw.service").read_text()
    steps = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecReload=")]
    conf = tmpdir_short / "snatgw.conf"
    shutil.copy(LAB, conf)
    sock = str(tmpdir_short / "ctl.sock")
    p = _spawn(conf, sock)

    def reload() -> subprocess.CompletedProcess | None:
        for step in steps:
            argv = shlex.split(step.replace("$MAINPID", str(p.pid)).replace("/etc/snatgw/snatgw.conf", str(conf)))
            if argv[0] == "/usr/local/sbin/snatgw":
                argv[:1] = [sys.executable, "-m", "snatgw.cli.main"]
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                return r
        return None

    try:
        assert "ready" in p.stdout.readline()
        conf.write_text(LAB.read_text().replace("algo sdh", "algo fast", 1))
        failed = reload()
        assert failed is not None and failed.returncode == 2 and f"{conf}:" in failed.stderr and "algo" in failed.stderr
        time.sleep(0.3)
        st = request(sock, {"op": "status"})
        assert st["last_error"] is None and st["reloads"] == 0  # never signalled
        shutil.copy(FAILOVER, conf)
        assert reload() is None
        _wait(lambda: request(sock, {"op": "status"})["reloads"] == 1, "reload")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_missing_device_on_reload_is_named_with_its_config_line(running, monkeypatch):
    """The backend's "interface 'lan5O' does not exist" comes back as file:line: inside: ...
    (as every other config error), exit 3, the old config kept."""
    from snatgw.errors import MissingDeviceError

    real = running.backend.apply

    def apply(cfg):  # as both real backends: every inside/outside device looked up first
        for name in cfg.settings.inside + cfg.settings.outside:
            if name not in ("lan40", "lan50", "eth1", "eth2"):
                raise MissingDeviceError(name)
        return real(cfg)

    monkeypatch.setattr(running.backend, "apply", apply)
    before = running.service.config
    text = running.conf.read_text()
    running.conf.write_text(text.replace("inside lan40 lan50", "inside lan40 lan5O"))
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "inside lan40 lan50" in s)
    resp = running.req(op="reload")
    assert not resp["ok"] and resp["exit"] == 3
    assert f"snatgw.conf:{line}: inside: interface 'lan5O' does not exist" in resp["error"]
    assert running.service.config is before


def test_a_reload_with_an_oif_typo_applies_and_says_what_check_warns(running, capsys):
    """`oif eht1` is legal (the rule matches nothing until such a device routes): the reload
    applies it, but says so (stderr, the answer, the log) instead of a bare "reloaded"."""
    from snatgw.cli.main import main

    text = running.conf.read_text()
    assert " oif eth1 " in text
    running.conf.write_text(text.replace(" oif eth1 ", " oif eht1 ", 1))
    assert main(["reload", "--socket", running.sock]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("reloaded: 3 rules")
    assert "snatgw reload: warning: " in err and "oif: eht1 is not among the outside interfaces (eth1 eth2)" in err
    assert any("config_warning" in line and "eht1" in line for line in running.log.lines)
    running.conf.write_text(text)
    assert running.req(op="reload")["warnings"] == []


def test_an_adm_rule_with_an_oif_typo_is_added_and_warned_of(running, capsys):
    """`snatgw adm -K ... --oif eht1`: added (legal), but said: a rule that matches nothing."""
    from snatgw.cli.main import main

    argv = ["adm", "--socket", running.sock, "-K", "-f", "1", "-F", "198.18.60.0/24", "--oif=eht1", "-U", "198.19.2.71"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "snatgw adm: warning: --oif eht1: not among the outside interfaces (eth1 eth2)" in err
    assert any("config_warning" in line and "eht1" in line for line in running.log.lines)
    assert main(["adm", "--socket", running.sock, "-K", "-f", "1", "-F", "198.18.61.0/24", "--oif", "eth1",
                 "-U", "198.19.2.71"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_settings_the_nft_backend_ignores_are_said_at_start_and_reload(tmp_path, capsys):
    """`port_tries 16` and `on_exhausted spill` under the nft backend (the file's `backend nft`,
    or `snatgw run --backend nft`, which `check` of the file cannot know): the start logs that
    they are ignored, and a reload says so in its answer, as `check` does; before, only an oif
    typo was said and the daemon took them silently."""
    from snatgw.cli.main import main

    text = LAB.read_text().replace("backend bpf", "backend nft\n    port_tries 16\n    on_exhausted spill")
    assert text != LAB.read_text()
    conf = tmp_path / "nft.conf"
    conf.write_text(text)
    r = Running(tmp_path, conf)
    try:
        said = [line for line in r.log.lines if "config_warning" in line]
        assert any("port_tries: 16 is ignored with backend nft" in line for line in said), r.log.lines
        assert any("on_exhausted: spill is ignored with backend nft" in line for line in said)
        assert main(["reload", "--socket", r.sock]) == 0
        err = capsys.readouterr().err
        assert "snatgw reload: warning: " in err and "port_tries: 16 is ignored with backend nft" in err
        r.conf.write_text(LAB.read_text().replace("backend bpf", "backend nft"))
        assert r.req(op="reload")["warnings"] == []
    finally:
        r.close()


def test_a_daemon_without_interfaces_says_it_translates_nothing(tmp_path):
    """No `inside`/`outside` in the file and none given to `snatgw run`: the daemon starts (a
    later reload may give them) but logs what `check` warns of, and `status` is unhealthy with
    the reason; before, it said ready, logged nothing and status said healthy while no program
    was on any device."""
    import re

    text = re.sub(r"\n    (inside|outside) [^\n]*", "", LAB.read_text())
    assert "inside lan40" not in text and "outside eth1" not in text
    conf = tmp_path / "bare.conf"
    conf.write_text(text)
    r = Running(tmp_path, conf)
    try:
        assert any("config_warning" in line and "no inside or outside interfaces" in line for line in r.log.lines)
        problems = r.req(op="health")["problems"]
        assert problems[0].startswith("no inside or outside interfaces: nothing is translated"), problems
        r.conf.write_text(LAB.read_text())
        assert r.req(op="reload")["ok"]
        assert not [p for p in r.req(op="health")["problems"] if "nothing is translated" in p]
    finally:
        r.close()


def _warning_as_nft(running, monkeypatch) -> str:
    """Make the running daemon's fake backend warn as NftBackend.apply does of a changed
    max_sessions_per_host (limits_counted_afresh, as apply_warnings); the config's text."""
    from snatgw.datapath.nft.backend import limits_counted_afresh

    b, apply = running.backend, running.backend.apply

    def as_nft(config):
        old = b.config
        apply(config)
        b.apply_warnings = limits_counted_afresh(old, config) if old is not None else []

    monkeypatch.setattr(b, "apply", as_nft)
    return running.conf.read_text()


def test_a_reload_says_what_the_backends_apply_warns_of(running, capsys, monkeypatch):
    """The nft backend's warning that a changed max_sessions_per_host is counted afresh
    (limits_counted_afresh, set as apply_warnings) is in the reload's answer and on `snatgw
    reload`'s stderr, as check's warnings are: it reached only the daemon's log.  A reload that
    changes no limit says nothing of it."""
    from snatgw.cli.main import main
    text = _warning_as_nft(running, monkeypatch)
    running.conf.write_text(text.replace("port_range 5000-65535", "port_range 5000-65535\n  max_sessions_per_host 20"))
    assert running.req(op="reload")["ok"]
    running.conf.write_text(text.replace("port_range 5000-65535", "port_range 5000-65535\n  max_sessions_per_host 30"))
    assert main(["reload", "--socket", running.sock]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("reloaded: 3 rules")
    assert "snatgw reload: warning: max_sessions_per_host changed (" in err and ": 20 -> 30" in err, err
    assert "ct count set" in err
    assert running.req(op="reload")["warnings"] == []  # the same limit: nothing to say


def test_a_reload_by_signal_keeps_the_backends_warning_for_status(running, capsys, monkeypatch):
    """A reload by SIGHUP (the daemon's handler: Service.reload via "signal") has no answer:
    the nft backend's warning of a changed host limit is kept in status' last_reload, with
    how the reload came, and `snatgw status` prints it; the next reload that warns of nothing
    replaces it.  On main only the log had it."""
    from snatgw.cli.main import main
    text = _warning_as_nft(running, monkeypatch)
    running.conf.write_text(text.replace("port_range 5000-65535", "port_range 5000-65535\n  max_sessions_per_host 20"))
    running.service.reload(via="signal")
    running.conf.write_text(text.replace("port_range 5000-65535", "port_range 5000-65535\n  max_sessions_per_host 30"))
    running.service.reload(via="signal")
    lr = running.req(op="status")["last_reload"]
    (w,) = lr["warnings"]
    assert (lr["via"], lr["ok"], lr["warnings_total"]) == ("signal", True, 1)
    assert w.startswith("max_sessions_per_host changed (") and ": 20 -> 30" in w
    main(["status", "--socket", running.sock])
    assert f"             warning: {w}\n" in capsys.readouterr().out
    running.service.reload(via="signal")  # the same limit: nothing to say
    assert running.req(op="status")["last_reload"]["warnings"] == []
    # bounded: the first 10 warnings kept, each cut at 1,000 characters, the count of all
    lr = running.service.reload_record("signal", "x.conf", None, ["w" * 5000] * 15)
    assert lr["warnings_total"] == 15 and len(lr["warnings"]) == 10
    assert {len(x) for x in lr["warnings"]} == {1000} and lr["warnings"][0].endswith("...")


def test_a_refused_reloads_error_is_bounded_in_status(running):
    """A reload refused for a 2 MB word where an address goes (snat_ip): the error names the
    word by its length instead of quoting it, so neither the reload's answer nor status (its
    last_error and last_reload, in every answer after it) carries the word; the record cuts
    any error at RELOAD_WARNING_CHARS as it cuts its warnings.  A short word that is not config
    text (a line of /etc/shadow) is described too, as docs/config.md says of every error.  On
    main the error quoted the whole word: 2 MB in the answer, twice in each status."""
    from snatgw.daemon.service import RELOAD_WARNING_CHARS

    word = "9" * 2_000_000
    text = running.conf.read_text().replace("snat_ip 198.19.2.71-198.19.2.73", f"snat_ip {word}", 1)
    resp = running.req(op="reload", text=text)
    assert not resp["ok"], resp
    assert "snat_ip: expected an IPv4 address A.B.C.D, got a word of 2000000 characters that is not config text (not " \
        "shown)" in resp["error"], resp["error"][:200]
    st = running.req(op="status")
    assert len(st["last_error"]) < 300 and st["last_reload"]["error"] == st["last_error"]
    assert len(json.dumps(st)) < 20_000
    secret = "root:$6$saltsalt$hashhashhash:19000:0:99999:7:::"  # not config text: described, not echoed
    resp = running.req(op="reload", text=text.replace(word, secret))
    assert "got a word of 48 characters that is not config text" in resp["error"] and "$6$" not in resp["error"]
    lr = running.service.reload_record("control", "<control>", "e" * 5000, [])
    assert len(lr["error"]) == RELOAD_WARNING_CHARS and lr["error"].endswith("...") and not lr["ok"]


def test_the_refusal_marker_request_takes_whole_numbers_only(running):
    """The refusal_marker op's sport, dport and proto: a JSON integer or its digits; a boolean
    (``true``: 1, ICMP), a fraction (6.9: 6) or a list is refused with the field named, and a
    long non-address is described, not echoed.  On main int() took true and 6.9, answering the
    lookup of another flow's key as this one's."""
    base = dict(op="refusal_marker", host="198.18.40.10", sport=40000, remote="203.0.113.10", dport=80, proto=17)
    assert running.req(**base) == {"ok": True, "marker": None, "markers": True}
    assert running.req(**{**base, "sport": "40000"})["ok"]
    for field, bad in (("proto", True), ("sport", 6.9), ("proto", 6.5), ("dport", [80]), ("dport", "8O"),
                       ("sport", "9" * 5000)):  # fmt: skip
        resp = running.req(**{**base, field: bad})
        assert not resp["ok"] and resp["code"] == "EINVAL", (field, bad, resp)
        assert resp["error"].startswith(f"bad request: {field}: expected a whole"), (field, bad, resp)
        assert len(resp["error"]) < 200
    resp = running.req(**{**base, "remote": "x" * 100_000})
    assert not resp["ok"] and "a word of 100000 characters that is not config text" in resp["error"]
    assert len(resp["error"]) < 200


def test_the_session_request_finds_one_flows_session_by_its_5_tuple(running, monkeypatch):
    """Op session (explain --live): the session under one flow's OUT key, or null; the flow is
    validated as refusal_marker's (whole numbers, ports 0..65535, proto 1, 6 or 17, addresses),
    each bad field an EINVAL naming it, a missing one named too.  A backend without a lookup
    of its own (session_of) is answered from its listing, the same.  An ICMP echo is named by
    its identifier as sport and dport 0."""
    assert running.syn().reason.name == "XLATE_NEW"
    base = dict(op="session", host="198.18.40.10", sport=40000, remote="203.0.113.10", dport=80, proto=6)
    got = running.req(**base)
    assert got["ok"] and got["session"]["inside"] == "198.18.40.10:40000", got
    assert got["session"]["remote"] == "203.0.113.10:80" and got["session"]["proto"] == "tcp"
    for other in ({"sport": 40001}, {"dport": 81}, {"proto": 17}, {"remote": "203.0.113.11"}):
        assert running.req(**{**base, **other}) == {"ok": True, "session": None}, other
    with monkeypatch.context() as m:  # a backend without the lookup: the listing's walk
        m.delattr(type(running.backend), "session_of")
        assert not hasattr(running.backend, "session_of")
        assert running.req(**base)["session"] == got["session"]
        assert running.req(**{**base, "sport": 40001})["session"] is None
    from scapy.all import ICMP, IP

    running.backend.process(bytes(IP(src="198.18.40.10", dst="203.0.113.10") / ICMP(id=777)), "inside", "lan40")
    echo = running.req(**{**base, "sport": 777, "dport": 0, "proto": 1})["session"]
    assert echo["proto"] == "icmp" and echo["inside"] == "198.18.40.10:777", echo
    for field, bad, says in (("sport", 70000, "sport: expected 0..65535, got 70000"),
                             ("dport", -1, "dport: expected 0..65535, got -1"),
                             ("proto", 47, "proto: expected 1 (icmp), 6 (tcp) or 17 (udp), got 47"),
                             ("proto", True, "bad request: proto: expected a whole number"),
                             ("sport", 2.7, "bad request: sport: expected a whole number"),
                             ("host", "198.18.40", "session: host: "),
                             ("remote", None, "session: remote: missing")):  # fmt: skip
        resp = running.req(**{**base, field: bad})
        assert not resp["ok"] and resp["code"] == "EINVAL", (field, bad, resp)
        assert says in resp["error"] and len(resp["error"]) < 200, (field, bad, resp)
    resp = running.req(**{**base, "sport": 70000})
    assert resp["error"] == "session: sport: expected 0..65535, got 70000"


def test_snatgw_reload_says_how_many_warnings_it_did_not_print(running, capsys):
    """A reload whose config warns 12 times: the answer carries the first 10 and
    ``warnings_total`` (as status' last_reload), and `snatgw reload` prints the 10, then how
    many more; a warning longer than RELOAD_WARNING_CHARS comes cut.  On main the answer had
    10 and nothing said there were 12."""
    from snatgw.cli.main import main
    from snatgw.daemon.service import RELOAD_WARNING_CHARS

    typos = "".join(f"  snat_rule {{ from 198.18.{60 + i}.0/24 gw 198.19.2.1 oif eth{i + 5}x snat_ip 198.19.2.71 }}\n"
                    for i in range(12))  # fmt: skip
    text = running.conf.read_text()
    running.conf.write_text(text.replace("virtual_server fwmark 1 {\n", "virtual_server fwmark 1 {\n" + typos, 1))
    resp = running.req(op="reload")
    assert (len(resp["warnings"]), resp["warnings_total"]) == (10, 12), resp
    assert main(["reload", "--socket", running.sock]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 11 and "oif: eth14x is not among the outside interfaces" in err[9], err
    assert err[10] == "snatgw reload: warning: ... and 2 more (snatgw check lists the config's)"
    running.conf.write_text(text)
    running.backend.apply_warnings = ["w" * 5000]  # (the fake's apply leaves it: as nft's long one)
    resp = running.req(op="reload")
    assert resp["warnings_total"] == 1 and len(resp["warnings"][0]) == RELOAD_WARNING_CHARS


def test_flush_takes_a_whole_rule_number_only(running):
    """The flush request's priority and rule_id: a boolean or a fraction is refused and
    nothing is flushed.  On main int() took ``true`` as rule #1 and 2.7 as #2, whose sessions
    went."""
    running.syn(), running.udp()
    before = len(running.req(op="sessions")["sessions"])
    for field, bad in (("priority", True), ("priority", 2.7), ("rule_id", 1.5), ("rule_id", False)):
        resp = running.req(op="flush", **{field: bad})
        assert not resp["ok"] and resp["code"] == "EINVAL", (field, bad, resp)
        assert resp["error"].startswith(f"bad request: {field}: expected a whole"), (field, bad, resp)
    assert len(running.req(op="sessions")["sessions"]) == before == 2
    assert running.req(op="flush", priority=2)["flushed"] == 1
