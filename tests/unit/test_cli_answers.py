"""A daemon whose answers this CLI cannot read (another snatgw version's, running on after an
upgrade until its restart, or no snatgw daemon at all on the socket): one line and exit 4, not
a traceback."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from snatgw.cli.main import main


@pytest.fixture
def answering(tmpdir_short):
    """A unix socket at a temp path that answers every request with the bytes set on it."""
    path = str(tmpdir_short / "odd.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(16)
    state = {"reply": b'{"ok": true}\n', "stop": False}

    def serve():
        while not state["stop"]:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                c.recv(1 << 16)
                c.sendall(state["reply"])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, state
    state["stop"] = True
    srv.close()
    os.unlink(path)


@pytest.mark.parametrize("reply,words", [
    (b'{"ok": true}\n', "(KeyError: "),
    (b'{"ok": true, "rules": 5, "sessions": 5, "stats": 3, "service": true}\n', "Error: "),
])  # fmt: skip
@pytest.mark.parametrize("argv", [
    ["status"], ["status", "-j"], ["stats"], ["conns"], ["conns", "-j"], ["flush", "--all"],
    ["adm", "-L"], ["adm", "-L", "-c"], ["adm", "-S"],
])  # fmt: skip
def test_an_answer_of_another_form_is_one_line_and_exit_4(answering, capsys, argv, reply, words):
    """A field missing or of another type raised KeyError, TypeError or AttributeError out of
    the verb: a traceback. Now the socket and what was wrong are named."""
    path, state = answering
    state["reply"] = reply
    verb = argv[0]
    args = [verb, *argv[1:], "--socket", path] if verb != "adm" else ["adm", *argv[1:], "--socket", path]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"snatgw {verb}: the daemon on {path} answered in a form this snatgw cannot read (")
    assert words in err and err.count("\n") == 1 and "Traceback" not in err


def test_an_answer_that_is_no_json_object_is_named(answering, capsys):
    path, state = answering
    state["reply"] = b"[1, 2]\n"
    assert main(["status", "--socket", path]) == 4
    assert capsys.readouterr().err == f"snatgw status: the daemon on {path} answered something that is not a JSON object\n"


def test_an_error_of_ours_without_any_answer_is_not_blamed_on_a_daemon(monkeypatch, tmp_path):
    """Only a command that got an answer says so: one that failed before (here a check made to
    raise) raises as it is, and an earlier command's answer does not count."""
    from snatgw.cli.commands import check
    from snatgw.daemon import control

    control.ANSWERED.append("/stale/from/an/earlier/command.sock")
    monkeypatch.setattr(check, "run", lambda args: {}["boom"])
    conf = tmp_path / "c.conf"
    conf.write_text("")
    with pytest.raises(KeyError):
        main(["check", str(conf)])
