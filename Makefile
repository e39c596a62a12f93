# snatgw: two commands do all set-up on a fresh Debian 12 machine, as root.
#   make demo   build the lab, run the gateway on the seed's rules, show the traffic
#   make test   every test tier (unit, model, bpf, nft, lab)
#   make bench  the benchmark suite (writes bench/results/)
#   make attack the edge attack suite at full size (tests/attack, ATTACK_SCALE=10)
.PHONY: setup demo test bench attack check-header clean

VENV := .venv/bin

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/snatgw demo

test: setup
	$(VENV)/python -m pytest -q $(PYTEST_ARGS)

attack: setup
	ATTACK_SCALE=$${ATTACK_SCALE:-10} $(VENV)/python -m pytest -q -m attack tests/attack $(PYTEST_ARGS)

bench: setup
	$(VENV)/snatgw bench $(BENCH_ARGS)

check-header: setup
	$(VENV)/python -m snatgw.layout >/dev/null && git diff --exit-code src/snatgw/datapath/bpf/prog/include/snat_layout.h

clean:
	rm -rf .venv build *.egg-info src/*.egg-info
