"""The eBPF TC datapath: libbpf binding, loader, typed maps and the BpfBackend."""
