"""The daemon's writer thread (daemon/writer.py): log lines written off the caller's thread, a
stalled stderr drops and counts lines beyond the bound instead of stalling the loop, and the
running daemon still answers with its stderr full and unread."""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from snatgw.daemon.control import request
from snatgw.daemon.log import Log
from snatgw.daemon.writer import Writer

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "examples" / "lab.conf"


class Stalled(io.StringIO):
    """stderr whose writes wait until ``gate`` opens (a pipe to journald nobody drains)."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.writers: set[str] = set()

    def write(self, s):
        self.writers.add(threading.current_thread().name)
        self.gate.wait(30)
        return super().write(s)


def test_a_stalled_stream_drops_and_counts_lines_beyond_the_bound_and_says_so_later():
    stream = Stalled()
    writer = Writer(lanes={"log": 5, "audit": 1})
    log = Log(stream=stream)
    log.attach(writer)
    try:
        for i in range(20):  # returns at once: the write waits on the writer's thread
            log.info("tick", i=i)
        assert log.counts["info"] == 20 and log.dropped == 15
        stream.gate.set()
        assert writer.flush(10)
        log.info("after")
        assert writer.flush(10)
    finally:
        writer.close(10)
    lines = stream.getvalue().splitlines()
    assert [x.split("i=")[1] for x in lines[:5]] == ["0", "1", "2", "3", "4"]
    assert "event=log_lines_dropped lines=15 total=15" in lines[5] and "event=after" in lines[6]
    assert stream.writers == {"snatgw-writer"}


def test_the_daemon_answers_with_its_stderr_full_and_unread(tmp_path):
    """`snatgw run` with stderr a pipe nobody reads (shrunk to one page): a stream of failed
    reloads (each logs an error line) fills it; the worker's requests and the loop still
    answer (the worker wrote the log itself and stuck in write(2), holding every request)."""
    conf = tmp_path / "snatgw.conf"
    shutil.copy(LAB, conf)
    sock = str(tmp_path / "ctl.sock")
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ: one page
    p = subprocess.Popen([sys.executable, "-m", "snatgw.cli.main", "run", str(conf), "--backend", "fake",
                          "--socket", sock], stdout=subprocess.PIPE, stderr=w, text=True)
    os.close(w)
    try:
        assert p.stdout.readline().startswith("snatgw ready")
        bad = "snatgw {\n max_sessions " + "9" * 40 + "\n}\n"
        for _ in range(40):  # ~400 bytes of error line each: ten times the pipe
            assert request(sock, {"op": "reload", "text": bad}, timeout=30)["ok"] is False
        assert request(sock, {"op": "rules"}, timeout=30)["ok"] is True
        h = request(sock, {"op": "health"}, timeout=30)
        assert h["errors"] >= 40 and h["log_lines_dropped"] >= 0
        os.set_blocking(r, False)
        first = os.read(r, 1 << 16).decode()
        assert "event=reload_failed" in first  # the lines that fitted were written
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(30)
        finally:
            os.close(r)
    assert p.returncode == 0
