"""The benchmark suite (`snatgw bench`, bench/README.md): topo (own namespaces) -> gateways
(the configurations compared) -> traffic/scenarios (measurements) -> runner (rounds, phases)
-> stats/report/plot (pure: spread, costs, targets, Markdown, PNG).  progbench is the
BPF_PROG_TEST_RUN micro-benchmark of the datapath programs alone."""
