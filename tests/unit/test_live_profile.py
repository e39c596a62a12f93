"""bench/experiments/live_profile.py: samples sorted into parts of the path by their call chains."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "live_profile", Path(__file__).resolve().parents[2] / "bench" / "experiments" / "live_profile.py")
live_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(live_profile)

SCRIPT = """\
trafgen
\tffffffff81 lookup_nulls_elem_raw+0x30
\tffffffffa0 bpf_prog_bb1e_port_try_cb+0x10
\tffffffffa0 bpf_prog_7a3c_snat_v4_new+0x90
\tffffffffa0 bpf_prog_7b28_snat_inside+0x120
\tffffffff81 cls_bpf_classify+0x50

trafgen
\tffffffff81 bpf_ipv4_fib_lookup+0x11
\tffffffffa0 bpf_prog_7b28_snat_inside+0x40

trafgen
\tffffffff81 veth_xmit+0x8
\tffffffff81 skb_do_redirect+0x20

trafgen
\tffffffff81 __skb_flow_dissect+0x1
\tffffffff81 packet_sendmsg+0x2

python3
\tffffffff81 lookup_nulls_elem_raw+0x30
\tffffffffa0 bpf_prog_1baa_key_cb+0x4
"""


def test_samples_sorted_by_chain_and_other_processes_left_out():
    n, parts = live_profile.sorted_parts(SCRIPT)
    assert n == 4  # the daemon's (python3) sample is not the pipeline's
    assert parts == {"session table (hash map ops)": 1, "inside program: FIB lookups": 1,
                     "redirect and transmit": 1, "generator (trafgen's send)": 1}
