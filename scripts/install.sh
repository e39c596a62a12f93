#!/usr/bin/env bash
# Install (or uninstall) snatgw on this host: `make install` / `make uninstall` run this.
#
#   $SNATGW_HOME (/opt/snatgw)            a venv holding snatgw and its Python dependencies
#   $SBINDIR/snatgw (/usr/local/sbin)     symlink to $SNATGW_HOME/bin/snatgw (snatgw on PATH)
#   $UNITDIR/snatgw.service               the systemd unit, with the paths above written in
#       (/usr/local/lib/systemd/system)
#   $SYSCONFDIR/snatgw/snatgw.conf (/etc) the config: installed only when absent, never overwritten;
#                                         snatgw.conf.example beside it is always refreshed
#   $MANDIR/man8/snatgw.8.gz              generated from the argparse parsers (snatgw.cli.manpage)
#   $BASHCOMPDIR/snatgw                   bash completion (snatgw.cli.completion)
#   $DOCDIR                               README.md and docs/*.md; prometheus/snatgw-alerts.yml
#
# DESTDIR stages everything under another root (packaging): the files name their final paths
# (the venv's scripts are rewritten), so run them only once they are in place.  Prerequisites
# of the datapath (clang, libbpf, bpftool, nftables, conntrack, iproute2) are Debian packages:
# scripts/setup.sh installs them; so does `make install` unless SNATGW_NO_APT=1.
# uninstall removes all of the above except $SYSCONFDIR/snatgw (your config) and the daemon's
# state (pinned maps under /sys/fs/bpf/snatgw: `snatgw purge` first if you want them gone).
set -euo pipefail
cd "$(dirname "$0")/.."
ACTION=${1:-install}
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
SNATGW_HOME=${SNATGW_HOME:-/opt/snatgw}
SBINDIR=${SBINDIR:-$PREFIX/sbin}
UNITDIR=${UNITDIR:-$PREFIX/lib/systemd/system}
SYSCONFDIR=${SYSCONFDIR:-/etc}
MANDIR=${MANDIR:-$PREFIX/share/man}
BASHCOMPDIR=${BASHCOMPDIR:-$PREFIX/share/bash-completion/completions}
DOCDIR=${DOCDIR:-$PREFIX/share/doc/snatgw}
PYTHON=${PYTHON:-/usr/bin/python3}
R=$DESTDIR

say() { echo "install: $*"; }

if [ "$ACTION" = uninstall ]; then
  for f in "$R$SBINDIR/snatgw" "$R$UNITDIR/snatgw.service" "$R$MANDIR/man8/snatgw.8.gz" \
           "$R$BASHCOMPDIR/snatgw" "$R$SYSCONFDIR/snatgw/snatgw.conf.example"; do
    if [ -e "$f" ] || [ -L "$f" ]; then rm -f "$f"; say "removed $f"; fi
  done
  for d in "$R$DOCDIR" "$R$SNATGW_HOME"; do
    if [ -d "$d" ]; then rm -rf "$d"; say "removed $d"; fi
  done
  say "kept $R$SYSCONFDIR/snatgw (your config); systemctl daemon-reload if the unit was loaded"
  exit 0
fi
[ "$ACTION" = install ] || { echo "usage: $0 [install|uninstall]" >&2; exit 2; }

if [ -z "$DESTDIR" ] && [ "${SNATGW_NO_APT:-0}" != 1 ]; then
  SETUP_RUNTIME_ONLY=1 bash scripts/setup.sh
fi
"$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || {
  echo "install: $PYTHON must be Python >= 3.11 with venv (Debian: apt-get install python3-venv)" >&2; exit 2; }

# 1. the venv, built beside the old one and swapped in (a failed build leaves the old in place)
new="$R$SNATGW_HOME.new.$$"
rm -rf "$new"
trap 'rm -rf "$new"' EXIT
mkdir -p "$(dirname "$new")"
"$PYTHON" -m venv --prompt snatgw "$new"
rm -rf build  # setuptools reuses build/lib: a module deleted from src/ would come back
"$new/bin/pip" install -q --disable-pip-version-check ${PIP_ARGS:-} .
# the venv's scripts (and pyvenv.cfg's `command`) name the directory they were built in: point
# them at the final one (under DESTDIR, $new holds the staging root: no file may keep it)
grep -rlI -- "$new" "$new/bin" "$new/pyvenv.cfg" | xargs -r sed -i "s|$new|$SNATGW_HOME|g"
rm -rf "$R$SNATGW_HOME.old"
[ -d "$R$SNATGW_HOME" ] && mv "$R$SNATGW_HOME" "$R$SNATGW_HOME.old"
mv "$new" "$R$SNATGW_HOME"
rm -rf "$R$SNATGW_HOME.old"
trap - EXIT
say "venv $R$SNATGW_HOME ($("$R$SNATGW_HOME/bin/python" -c 'import snatgw; print("snatgw", snatgw.__version__)'))"
run_py() { "$R$SNATGW_HOME/bin/python" "$@"; }

# 2. snatgw on PATH
install -d "$R$SBINDIR"
ln -sfn "$SNATGW_HOME/bin/snatgw" "$R$SBINDIR/snatgw"
say "$R$SBINDIR/snatgw -> $SNATGW_HOME/bin/snatgw"

# 3. the unit, naming the installed paths
install -d "$R$UNITDIR"
sed -e "s|/usr/local/sbin/snatgw|$SBINDIR/snatgw|g" \
    -e "s|/etc/snatgw/|$SYSCONFDIR/snatgw/|g" \
    -e "s|/usr/local/share/doc/snatgw|$DOCDIR|g" \
    src/snatgw/packaging/snatgw.service > "$R$UNITDIR/snatgw.service"
chmod 0644 "$R$UNITDIR/snatgw.service"
say "$R$UNITDIR/snatgw.service"

# 4. the config (never overwritten) and its example
install -d -m 0755 "$R$SYSCONFDIR/snatgw"
install -m 0644 src/snatgw/packaging/snatgw.conf.example "$R$SYSCONFDIR/snatgw/snatgw.conf.example"
if [ ! -e "$R$SYSCONFDIR/snatgw/snatgw.conf" ]; then
  install -m 0644 src/snatgw/packaging/snatgw.conf.example "$R$SYSCONFDIR/snatgw/snatgw.conf"
  say "$R$SYSCONFDIR/snatgw/snatgw.conf (the example: edit it before starting the unit)"
else
  say "$R$SYSCONFDIR/snatgw/snatgw.conf kept as it is"
fi

# 5. man page, bash completion, docs
install -d "$R$MANDIR/man8" "$R$BASHCOMPDIR" "$R$DOCDIR"
run_py -m snatgw.cli.manpage | gzip -9n > "$R$MANDIR/man8/snatgw.8.gz"
run_py -m snatgw.cli.completion > "$R$BASHCOMPDIR/snatgw"
chmod 0644 "$R$MANDIR/man8/snatgw.8.gz" "$R$BASHCOMPDIR/snatgw"
install -m 0644 README.md docs/*.md "$R$DOCDIR/"
install -D -m 0644 examples/prometheus/snatgw-alerts.yml "$R$DOCDIR/prometheus/snatgw-alerts.yml"
say "$R$MANDIR/man8/snatgw.8.gz, $R$BASHCOMPDIR/snatgw, $R$DOCDIR"
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
say "done; next: edit $SYSCONFDIR/snatgw/snatgw.conf, snatgw check it, systemctl enable --now snatgw"
