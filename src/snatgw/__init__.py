"""snatgw: a multi-ISP source-NAT gateway for Linux (lvs-snat, rebuilt without a kernel patch).

Architecture, top to bottom (each layer imports only the ones below it):

    cli       the `snatgw` command: check, explain, run, adm, conns, stats, lab, demo, bench
    daemon    owns a datapath, reloads config, expires sessions, serves a control socket
    datapath  backends behind one interface: bpf/ (TC eBPF via libbpf) and nft/ (nftables)
    model     the reference datapath in pure Python: sans-I/O, clock injected
    rules     Rule, Pool, RuleSet: validation, priority order, matching, address selection
    config    keepalived-style config text -> GatewayConfig (rules + settings)
    layout    the single source of binary layouts, reason codes and constants shared with C
"""

__version__ = "0.1.0"
