#!/usr/bin/env bash
# Installs everything snatgw needs on a fresh Debian 12 machine (run as root), then the venv.
# Idempotent and quiet when everything is there already.
set -euo pipefail
cd "$(dirname "$0")/.."
# what the datapath needs at run time (scripts/install.sh installs only these on a host)
RUNTIME_PKGS="clang llvm libbpf-dev libbpf1 bpftool nftables iproute2 linux-libc-dev python3-venv conntrack"
APT_PKGS="$RUNTIME_PKGS iperf3 netsniff-ng tcpdump iputils-ping ethtool keepalived conntrackd systemd groff-base"
# iptables (Debian 12: the nft flavour): tests/nft/test_iptables_export.py loads `snatgw export --format
# iptables` with the real iptables-restore, in a namespace of its own (never the host's tables)
APT_PKGS="$APT_PKGS iptables"
# the third-party applications of tests/lab/test_apps.py (issue 12), run only in lab namespaces
APT_PKGS="$APT_PKGS curl openssh-server openssh-client dnsmasq-base bind9-dnsutils traceroute mtr-tiny iputils-tracepath netcat-openbsd hping3 coturn stun-client stun-server"
[ "${SETUP_RUNTIME_ONLY:-0}" = 1 ] && APT_PKGS=$RUNTIME_PKGS
missing=""
for p in $APT_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # sshd, coturn and stund are daemons: the tests start them in lab namespaces, so none may
  # start on the host when installed (policy-rc.d 101 denies it, unless one is there already)
  guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && guard=1
  fi
  apt-get install -y -qq $missing >/dev/null || { [ -z "$guard" ] || rm -f /usr/sbin/policy-rc.d; exit 1; }
  [ -z "$guard" ] || rm -f /usr/sbin/policy-rc.d
fi
[ "${SETUP_RUNTIME_ONLY:-0}" = 1 ] && exit 0  # scripts/install.sh: run-time packages, no dev venv
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# promtool, which tests/unit/test_alert_rules.py runs on examples/prometheus: taken out of Debian's
# prometheus package, not installed (no Prometheus server or unit lands on this host)
if [ ! -x .venv/bin/promtool ]; then
  echo "setup: promtool (extracted from Debian's prometheus package into .venv/bin)"
  tmp=$(mktemp -d)
  # a fresh machine may have no apt lists yet: update once, then download again
  if ! (cd "$tmp" && { apt-get download prometheus >apt.log 2>&1 \
        || { apt-get update -qq && apt-get download prometheus; } >>apt.log 2>&1; }); then
    echo "setup: could not download Debian's prometheus package (for its promtool): apt-get said:" >&2
    tail -n 5 "$tmp/apt.log" >&2
    rm -rf "$tmp"
    exit 1
  fi
  if ! { dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -O ./usr/bin/promtool > .venv/bin/promtool.part \
         && [ -s .venv/bin/promtool.part ]; }; then
    echo "setup: no ./usr/bin/promtool in $(cd "$tmp" && ls prometheus_*.deb 2>/dev/null || echo 'the download')" >&2
    rm -rf "$tmp" .venv/bin/promtool.part
    exit 1
  fi
  chmod 755 .venv/bin/promtool.part && mv .venv/bin/promtool.part .venv/bin/promtool
  rm -rf "$tmp"
fi
stamp=.venv/.snatgw-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: pip install -e .[test,bench]"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test,bench]'
  touch "$stamp"
fi
