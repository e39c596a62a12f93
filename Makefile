# snatgw: two commands do all set-up on a fresh Debian 12 machine, as root.
#   make demo   build the lab, run the gateway on the seed's rules, show the traffic
#   make test   every test tier (unit, model, bpf, nft, lab)
#   make bench  the benchmark suite (writes bench/results/)
#   make attack the edge attack suite at full size (tests/attack, ATTACK_SCALE=10)
#   make install / make uninstall   put snatgw on this host (scripts/install.sh: a venv in
#               /opt/snatgw, /usr/local/sbin/snatgw, the systemd unit, /etc/snatgw, man page,
#               bash completion); PREFIX, DESTDIR, SNATGW_HOME, SYSCONFDIR... override the paths
.PHONY: setup demo test bench attack check-header clean install uninstall

VENV := .venv/bin

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/snatgw demo

# without PYTEST_ARGS: the lab tier and the others side by side (scripts/test.sh says why)
test: setup
ifeq ($(strip $(PYTEST_ARGS)),)
	@bash scripts/test.sh
else
	$(VENV)/python -m pytest -q $(PYTEST_ARGS)
endif

attack: setup
	ATTACK_SCALE=$${ATTACK_SCALE:-10} $(VENV)/python -m pytest -q -m attack tests/attack $(PYTEST_ARGS)

bench: setup
	$(VENV)/snatgw bench $(BENCH_ARGS)

check-header: setup
	$(VENV)/python -m snatgw.layout >/dev/null && git diff --exit-code src/snatgw/datapath/bpf/prog/include/snat_layout.h

# the install paths, exported to scripts/install.sh (see its header)
INSTALL_VARS := PREFIX DESTDIR SNATGW_HOME SBINDIR UNITDIR SYSCONFDIR MANDIR BASHCOMPDIR DOCDIR PYTHON PIP_ARGS SNATGW_NO_APT
install:
	$(foreach v,$(INSTALL_VARS),$(if $($(v)),$(v)='$($(v))')) bash scripts/install.sh install

uninstall:
	$(foreach v,$(INSTALL_VARS),$(if $($(v)),$(v)='$($(v))')) bash scripts/install.sh uninstall

clean:
	rm -rf .venv build *.egg-info src/*.egg-info
