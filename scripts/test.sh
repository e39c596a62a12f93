#!/usr/bin/env bash
# make test: every test tier, as two pytest runs side by side.
#
# The lab tests (tests/lab) spend most of their time waiting: for daemons, timers, namespaces
# and peers, one CPU mostly idle.  The other tiers (unit, model, bpf, nft, attack) run in a
# second pytest beside them, so the suite's wall time is about the longer of the two rather
# than their sum (on the 2-CPU VM: ~600 s one after the other).  Every test makes its own
# namespaces, pins and sockets under a prefix of its pytest's pid, so the two runs share
# nothing.  The lab run's output streams; the other's is printed when both have ended.
# (`make test PYTEST_ARGS=...`, a selection, runs one pytest: the Makefile.)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${SNATGW_TEST_PYTHON:-.venv/bin/python}  # (tests/unit/test_test_script.py runs a stand-in)

log=$(mktemp /tmp/snatgw-test-XXXXXX.log)
t0=$(date +%s)
# The other tiers in a process group of their own (set -m for this one job): without job
# control a background job starts with SIGINT ignored, so a Ctrl-C left it running and the
# trap's SIGTERM then killed it with no teardown (its namespaces, pins and daemons stayed).
# Now the terminal's Ctrl-C and a timeout's SIGTERM to the group reach the lab run only, and
# the trap hands the other run one SIGINT: pytest's KeyboardInterrupt, which tears down.
set -m
"$PY" -m pytest -q tests --ignore=tests/lab >"$log" 2>&1 &
other=$!
set +m
# a CI run stopped (Ctrl-C, timeout) stops both, each after its teardown
trap 'kill -INT "$other" 2>/dev/null; wait "$other" 2>/dev/null; cat "$log"; rm -f "$log"; exit 130' INT TERM

echo "== tests/lab (the other tiers run beside it; their output follows)"
"$PY" -m pytest -q tests/lab
lab_rc=$?
t_lab=$(($(date +%s) - t0))
wait "$other"
other_rc=$?
t_all=$(($(date +%s) - t0))
trap - INT TERM

echo
echo "== tests except tests/lab"
cat "$log"
rm -f "$log"
echo
echo "make test: tests/lab rc $lab_rc (${t_lab} s), the other tiers rc $other_rc, ${t_all} s in all"
# pytest's 5 (no tests collected) is a failure here too: every tier has tests
[ "$lab_rc" -eq 0 ] && [ "$other_rc" -eq 0 ]
