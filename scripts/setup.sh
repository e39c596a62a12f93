#!/usr/bin/env bash
# Installs everything snatgw needs on a fresh Debian 12 machine (run as root), then the venv.
# Idempotent and quiet when everything is there already.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PKGS="clang llvm libbpf-dev libbpf1 bpftool nftables iproute2 iperf3 netsniff-ng tcpdump iputils-ping ethtool linux-libc-dev python3-venv conntrack keepalived"
missing=""
for p in $APT_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq $missing >/dev/null
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.snatgw-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: pip install -e .[test,bench]"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test,bench]'
  touch "$stamp"
fi
