"""The daemon's stderr is its log: every line an event (logfmt, or JSON with --log-json),
also the warnings the config parser and the backends give Python's logging."""

import json
import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root


def test_log_json_has_only_json_lines_also_for_the_parsers_warnings(tmp_path):
    """A keepalived file (its global_defs skipped with a warning) run with --log-json: every
    stderr line is a JSON event, the skipped block an `event=config_warning`; before, the
    parser's warnings (and the backends', such as `net.ipv4.ip_forward is 0`) came out as bare
    text among the JSON lines, which a JSON log shipper cannot take."""
    ns = f"sglg{os.getpid():x}"
    conf = tmp_path / "keepalived.conf"
    conf.write_text("global_defs {\n  router_id gw\n}\n"
                    f"snatgw {{\n  inside lan40\n  outside eth1\n  control_socket {tmp_path / 'c.sock'}\n}}\n"
                    "virtual_server fwmark 1 {\n  snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    proc = None
    try:
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "snatgw.cli.main",
                                 "run", str(conf), "--backend", "fake", "--log-json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=30)[1]
        assert "ready" in line, err
    finally:
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)
    events = [json.loads(x) for x in err.splitlines()]  # (a bare line raises here)
    warned = [e for e in events if e["event"] == "config_warning"]
    assert [e["level"] for e in warned] == ["warning"]
    assert warned[0]["warning"] == f"{conf}:1: skipped keepalived block 'global_defs' (not the SNAT service)"
    assert events[-1]["event"] == "stopped"


def test_library_warnings_become_log_events_and_are_counted():
    """The bridge itself: a backend's warning is a `datapath_warning` line, counted as one."""
    import io
    import logging

    from snatgw.daemon.log import LibraryLines, Log

    out = io.StringIO()
    log = Log(stream=out)
    LibraryLines.install(log)
    try:
        logging.getLogger("snatgw.bpf").warning("net.ipv4.ip_forward is 0 in this namespace")
        logging.getLogger("snatgw.nft").info("not a warning: not written")
    finally:
        LibraryLines.remove()
    logging.getLogger("snatgw.bpf").warning("after remove: not ours")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and 'event=datapath_warning warning="net.ipv4.ip_forward is 0 in' in lines[0]
    assert log.counts == {"warning": 1}
