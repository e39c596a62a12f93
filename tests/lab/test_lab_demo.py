"""`snatgw demo` end to end (what `make demo` runs), per backend: every flow as the model
predicts, a failover via reload, and nothing left behind.  An unbuilt backend xfails."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from snatgw.lab.gateway import gateway_available
from snatgw.lab.netns import list_netns
from snatgw.lab.topology import Lab

pytestmark = [pytest.mark.root, pytest.mark.lab]


BACKENDS = ("bpf", "nft")


def _names(backend: str) -> tuple[str, str]:
    """The demo's lab name and prefix for ``backend`` (each its own: both demos run at once)."""
    return f"pytest-demo-{os.getpid()}-{backend}", f"sgd{os.getpid() % 0xFFFF:04x}{backend[0]}"


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """`snatgw demo` of both backends, started together (each in a lab of its own; a demo is
    mostly waiting for its flows' answers, so the pair takes about as long as one): backend ->
    (the running process, its stdout file, its stderr file), which each test reads."""
    out = tmp_path_factory.mktemp("demo")
    procs = {}
    try:
        for backend in BACKENDS:
            name, prefix = _names(backend)
            with open(out / f"{backend}.out", "w") as so, open(out / f"{backend}.err", "w") as se:
                procs[backend] = (subprocess.Popen(
                    [sys.executable, "-m", "snatgw.cli.main", "demo", "--backend", backend, "--name", name,
                     "--prefix", prefix], stdout=so, stderr=se, text=True), so.name, se.name)
        yield procs
    finally:
        for backend, (p, _, _) in procs.items():
            if p.poll() is None:
                p.kill()
                p.wait()
            Lab(name=_names(backend)[0], prefix=_names(backend)[1]).down()


@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_shows_every_flow_as_the_model_predicts_and_cleans_up(request, backend, demos):
    """The demo exits 0 naming snatgw (not the fallback), reloads to the failover rules, and
    removes its lab."""
    ok, why = gateway_available(backend)
    if not ok:
        request.node.add_marker(pytest.mark.xfail(reason=f"snatgw run --backend {backend}: {why}", strict=False))
    name, prefix = _names(backend)
    try:
        proc, out, err = demos[backend]
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"snatgw demo --backend {backend} did not end within 120 s") from None
        with open(out) as so, open(err) as se:
            stdout, stderr = so.read(), se.read()
        assert proc.returncode == 0, stdout[-3000:] + stderr[-2000:]
        assert "FALLBACK" not in stdout
        assert f"snatgw run --backend {backend}" in stdout and "snatgw reload: done" in stdout
        assert stdout.count("24/24 flows as the model predicts") == 2
        assert f"snatgw {backend}: all flows as the model predicts" in stdout
        assert not [n for n in list_netns() if n.startswith(prefix + "-")]
        assert not os.path.exists(f"/sys/fs/bpf/snatgw-{prefix}")
    finally:
        Lab(name=name, prefix=prefix).down()


def test_demo_falls_back_to_a_labelled_kernel_snat_without_a_datapath(monkeypatch, capsys):
    """With no datapath built, the demo says FALLBACK, NOT SNATGW, still sends every flow, and
    exits 0 after removing its lab."""
    from snatgw.lab import demo

    monkeypatch.setattr(demo, "gateway_available", lambda b: (False, "not built yet: (simulated)"))
    prefix = f"sgf{os.getpid() % 0xFFFF:04x}"
    try:
        assert demo.demo("bpf", name=f"pytest-fallback-{os.getpid()}", prefix=prefix) == 0
    finally:
        Lab(name=f"pytest-fallback-{os.getpid()}", prefix=prefix).down()
    out = capsys.readouterr().out
    assert "FALLBACK, NOT SNATGW" in out and "FALLBACK (kernel nft SNAT)" in out
    assert out.count("flows as the model predicts") == 2
    assert not [n for n in list_netns() if n.startswith(prefix + "-")]


def _left(name: str, prefix: str) -> list[str]:
    return ([n for n in list_netns() if n.startswith(prefix + "-")]
            + [p for p in (f"/sys/fs/bpf/snatgw-{prefix}", f"/run/snatgw/lab/{prefix}", f"/run/snatgw/{prefix}.sock",
                           f"/run/snatgw/lab/{name}.json") if os.path.lexists(p)])


@contextlib.contextmanager
def _demo_process(backend: str, name: str, prefix: str, **popen):
    """`snatgw demo` as a child (stdout, stderr piped, text); killed if still running and its
    lab removed afterwards, whatever the test found."""
    p = subprocess.Popen([sys.executable, "-m", "snatgw.cli.main", "demo", "--backend", backend, "--name", name,
                          "--prefix", prefix], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        Lab(name=name, prefix=prefix).down()


@pytest.mark.parametrize("backend,sig", [("bpf", signal.SIGINT), ("nft", signal.SIGTERM)])
def test_an_interrupted_demo_says_so_removes_its_lab_and_exits_as_a_shell_would(backend, sig):
    """Ctrl-C (SIGINT to the process group, the gateway and servers included) or SIGTERM once
    the flows begin: the lab was removed but nothing was said, exit 130 either way.  Now one
    line on stderr names the signal and says the lab was removed; exit 130 or 143."""
    name, prefix = f"pytest-demo-{os.getpid()}-int{backend}", f"sgd{os.getpid() % 0xFFFF:04x}i{backend[0]}"
    with _demo_process(backend, name, prefix, start_new_session=True) as p:
        seen = []
        for line in p.stdout:  # the lab is up, the gateway runs, the servers listen
            seen.append(line)
            if line.startswith("== flows"):
                break
        assert seen and seen[-1].startswith("== flows"), "".join(seen) + p.stderr.read()
        if sig == signal.SIGINT:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 128 + sig, (p.returncode, err)
        assert err.strip().splitlines() == [
            f"snatgw demo: interrupted by {sig.name}; the lab {name} (namespaces {prefix}-*) was removed"], err
        assert "== lab removed." not in out and _left(name, prefix) == []


_INTERRUPTED_UP = """
import os, signal, sys
from snatgw.lab import topology
build = topology.Lab._build
def interrupted(self):
    build(self)
    os.kill(os.getpid(), signal.SIGTERM)
topology.Lab._build = interrupted
if sys.argv.pop(1) == "stuck":  # a removal that fails: the namespaces stay
    topology.Lab.down = lambda self: None
from snatgw.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("down", ["works", "stuck"])
def test_a_demo_interrupted_while_its_lab_is_built_says_what_was_removed(down):
    """A SIGTERM while the lab is being built (no output yet): the lab is removed and said so;
    when something could not be removed, the line names it instead."""
    name, prefix = f"pytest-demo-{os.getpid()}-up{down}", f"sgd{os.getpid() % 0xFFFF:04x}u{down[0]}"
    try:
        p = subprocess.run([sys.executable, "-c", _INTERRUPTED_UP, down, "demo", "--backend", "nft", "--name", name,
                            "--prefix", prefix], capture_output=True, text=True, timeout=60)
        assert p.returncode == 143, (p.returncode, p.stderr[-2000:])
        head = "snatgw demo: interrupted by SIGTERM; "
        if down == "works":
            assert p.stderr.strip() == head + f"the lab {name} (namespaces {prefix}-*) was removed"
            assert _left(name, prefix) == []
        else:
            assert p.stderr.startswith(head + f"could not remove: namespace {prefix}-")
            assert f"namespace {prefix}-gw" in p.stderr and "snatgw lab down --all" in p.stderr
            assert len(p.stderr.strip().splitlines()) == 1
    finally:
        Lab(name=name, prefix=prefix).down()
    assert _left(name, prefix) == []


def test_a_demo_interrupted_before_its_lab_says_none_was_built():
    """A SIGTERM as soon as `snatgw demo` catches it (before its imports, the lab not begun):
    it was killed silently (143 from the shell, no line); now it says so (or, if the lab was
    begun by the time the signal came, that it was removed) and exits 143."""
    name, prefix = f"pytest-demo-{os.getpid()}-early", f"sgd{os.getpid() % 0xFFFF:04x}e"
    with _demo_process("nft", name, prefix) as p:
        t0 = time.monotonic()
        while not any(line.startswith("SigCgt:") and int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1
                      for line in open(f"/proc/{p.pid}/status")):
            assert p.poll() is None and time.monotonic() - t0 < 10, "snatgw demo never caught SIGTERM"
            time.sleep(0.001)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 143, (p.returncode, err)
        assert err.strip() in ("snatgw demo: interrupted by SIGTERM; no lab was built yet",
                               f"snatgw demo: interrupted by SIGTERM; the lab {name} (namespaces {prefix}-*) was removed")
        assert _left(name, prefix) == []


_INTERRUPTED_AT_ITS_HANDLERS = """
import os, signal, sys
from snatgw.lab import demo
real = signal.signal
def signal_then_term(signum, handler):
    old = real(signum, handler)
    if signum == signal.SIGTERM and isinstance(handler, demo._Interrupt):  # ours, set: the signal comes
        os.kill(os.getpid(), signal.SIGTERM)
    return old
demo.signal.signal = signal_then_term
from snatgw.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_demo_interrupted_as_it_sets_its_handlers_says_none_was_built():
    """A SIGTERM the moment the demo's own handler takes it, before the demo's try: the handler
    raised there, outside everything that handles it, so the demo died of a traceback (exit 1)
    instead of its one line and 143.  Now the handler only records until the try, which acts on
    what came before it."""
    name, prefix = f"pytest-demo-{os.getpid()}-handlers", f"sgd{os.getpid() % 0xFFFF:04x}h"
    try:
        p = subprocess.run([sys.executable, "-c", _INTERRUPTED_AT_ITS_HANDLERS, "demo", "--backend", "nft", "--name",
                            name, "--prefix", prefix], capture_output=True, text=True, timeout=60)
        assert p.returncode == 143, (p.returncode, p.stderr[-2000:])
        assert p.stderr.strip() == "snatgw demo: interrupted by SIGTERM; no lab was built yet"
    finally:
        Lab(name=name, prefix=prefix).down()
    assert _left(name, prefix) == []
