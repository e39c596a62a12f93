"""Where a live packet's cost goes: `perf record -a -g` around one `snatgw bench` run of one
scenario and configuration, then the samples taken in the generator's context (trafgen: the
generator, the gateway and the sink all run there, see bench/README.md) sorted into parts of
the path by their call chains.

    python bench/experiments/live_profile.py [--scenario udp-newflows-spread] [--config snatgw-bpf]
                                             [--duration 5] [--out /tmp/live-profile]

Needs root and perf.  Prints each part's share of the samples and that share of 1e9/pps of the
run (the whole pipeline's cost per packet; the gateway-isolated cost is that minus the drop
baseline's, which this run does not measure).  Keep --duration short enough that the table does
not fill (3a' makes a session per packet).  The samples of the daemon's own work (python) and of
idle CPUs are left out.  cpu-clock samples cannot land where interrupts are off: the time of a
hash map insert's locked part is counted at its end, inside the insert, which is where it belongs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys

PARTS = (  # (part, test on the chain's leaf and the whole chain), first match wins
    ("session table (hash map ops)", lambda leaf, chain: "snat_inside" in chain and ("htab" in leaf or "lookup_nulls" in leaf)),
    ("inside program: FIB lookups", lambda leaf, chain: "snat_inside" in chain and "fib" in leaf),
    ("inside program: LPM tries", lambda leaf, chain: "snat_inside" in chain and "trie" in leaf),
    ("inside program: its instructions", lambda leaf, chain: "snat_inside" in chain and leaf.startswith("bpf_prog_")),
    ("inside program: other helpers", lambda leaf, chain: "snat_inside" in chain),
    ("egress program", lambda leaf, chain: "snat_egress" in chain),
    ("generator (trafgen's send)", lambda leaf, chain: "packet_sendmsg" in chain and "net_rx_action" not in chain),
    ("redirect and transmit", lambda leaf, chain: "skb_do_redirect" in chain),
    ("rest of the kernel's path", lambda leaf, chain: True),
)


def sorted_parts(script: str, comm: str = "trafgen") -> tuple[int, collections.Counter]:
    """`perf script -F comm,ip,sym` text -> (samples of ``comm``, samples per part)."""
    n, parts = 0, collections.Counter()
    for block in script.split("\n\n"):
        lines = [x for x in block.strip().split("\n") if x.strip()]
        if not lines or lines[0].split()[0] != comm:
            continue
        frames = [(x.split(None, 1) + ["?"])[1].split("+")[0] for x in lines[1:]] or ["?"]
        chain = " ".join(frames)
        n += 1
        parts[next(p for p, test in PARTS if test(frames[0], chain))] += 1
    return n, parts


def by_caller(script: str, comm: str = "trafgen") -> tuple[collections.Counter, collections.Counter]:
    """The session table's hash map operations by the BPF program that called them
    ("lookup_nulls_elem_raw < bpf_prog_..._snat_inside") and the hot leaves' offsets
    ("lookup_nulls_elem_raw+0x21"): which load a sample waited on (the script needs symoff)."""
    calls, offsets = collections.Counter(), collections.Counter()
    for block in script.split("\n\n"):
        lines = [x for x in block.strip().split("\n") if x.strip()]
        if not lines or lines[0].split()[0] != comm:
            continue
        full = [(x.split(None, 1) + ["?"])[1].split(" (")[0] for x in lines[1:]] or ["?"]
        frames = [f.split("+")[0] for f in full]
        if "htab" not in frames[0] and "lookup_nulls" not in frames[0]:
            continue
        offsets[full[0]] += 1
        prog = next((f for f in frames if f.startswith("bpf_prog_")), "?")
        op = next((f for f in frames if f in ("htab_map_update_elem", "__htab_map_lookup_elem",
                                                 "htab_map_delete_elem")), frames[0])  # fmt: skip
        calls[f"{op} < {prog.split('_', 3)[-1]}"] += 1
    return calls, offsets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="udp-newflows-spread")
    ap.add_argument("--config", default="snatgw-bpf")
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--out", default="/tmp/live-profile")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    data = os.path.join(a.out, "perf.data")
    perf = subprocess.Popen(["perf", "record", "-a", "-g", "-F", "2999", "-o", data],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        subprocess.run([sys.executable, "-m", "snatgw.cli.main", "bench", "--scenario", a.scenario, "--config",
                        a.config, "--rounds", "1", "--duration", str(a.duration), "--out", a.out], check=True)  # fmt: skip
    finally:
        perf.send_signal(2)
        perf.wait(timeout=60)
    result = max((f for f in os.listdir(a.out) if f.endswith(".json")), key=lambda f: os.path.getmtime(os.path.join(a.out, f)))
    with open(os.path.join(a.out, result)) as f:
        pps = next(r["value"] for r in json.load(f)["records"] if r.get("config") == a.config and r.get("value"))
    script = subprocess.run(["perf", "script", "-i", data, "-F", "comm,ip,sym,symoff"], capture_output=True,
                            text=True).stdout  # fmt: skip
    n, parts = sorted_parts(script)
    per_pkt = 1e9 / pps
    print(f"{a.scenario} {a.config}: {pps:,.0f} pps, {per_pkt:,.0f} ns a packet for the whole pipeline; {n} samples")
    for part, k in parts.most_common():
        print(f"  {part:36s} {100 * k / n:5.1f}%  ~{per_pkt * k / n:6,.0f} ns")
    calls, offsets = by_caller(script)
    print("session table operations by caller (leaf samples):")
    for what, k in calls.most_common(8):
        print(f"  {what:60s} {100 * k / n:5.1f}%  ~{per_pkt * k / n:6,.0f} ns")
    print("their hottest instructions (the load a sample waited on):")
    for what, k in offsets.most_common(6):
        print(f"  {what:40s} {k} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
