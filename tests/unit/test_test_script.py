"""scripts/test.sh (make test): the two pytest runs side by side, stopped as one.  A stand-in
for the venv's python records how each run ends; no real test runs here."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE = """#!{python}
import os, sys, time
which = "other" if "--ignore=tests/lab" in sys.argv else "lab"
out = os.environ["FAKE_OUT"]
try:  # (the mark inside: a signal right after it, before the try, would skip the teardown)
    open(os.path.join(out, which + ".started"), "w").close()
    time.sleep(30)
except KeyboardInterrupt:  # pytest's way to its fixtures' teardown
    time.sleep(0.2)
    open(os.path.join(out, which + ".teardown"), "w").close()
    sys.exit(2)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_make_test_lets_the_other_run_tear_down(tmp_path, sig):
    """A Ctrl-C (SIGINT to the terminal's process group) or a timeout (SIGTERM to it): the run
    of the other tiers ends by a KeyboardInterrupt, so its fixtures remove their namespaces,
    pins and daemons, and the script waits for it and exits 130.  Before, that run started
    with SIGINT ignored (a background job without job control): a Ctrl-C left it running,
    then the trap's SIGTERM killed it with no teardown, and a timeout's SIGTERM killed it at
    once."""
    fake = tmp_path / "python"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(0o755)
    env = {**os.environ, "SNATGW_TEST_PYTHON": str(fake), "FAKE_OUT": str(tmp_path)}
    p = subprocess.Popen(["bash", str(ROOT / "scripts/test.sh")], env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not all((tmp_path / f"{w}.started").exists() for w in ("lab", "other")):
            assert time.monotonic() < deadline and p.poll() is None, "the two runs did not start"
            time.sleep(0.05)
        os.killpg(p.pid, sig)  # as the terminal (Ctrl-C) or timeout(1) does: the whole group
        out, _ = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert (tmp_path / "other.teardown").exists(), out.decode()
    assert p.returncode == 130
    if sig == signal.SIGINT:
        assert (tmp_path / "lab.teardown").exists()
