"""Session-table layouts, measured alone (not part of snatgw): cold random lookups and inserts
in a preallocated BPF hash map of the session table's shape (16-byte key, 48-byte value,
2,097,152 entries: what `max_sessions 1048576` makes) against an open-addressed array of
64-byte slots (key and value in one cache line, 4,194,304 slots, linear probing, a slot
claimed by compare-and-swap).  720,000 keys in each; lookups chained (each key depends on the
value found before, so their misses do not overlap), 8,192 per run; ns per operation, min and
median of 5 runs, three rounds.  As root:

    clang -O2 -g -mcpu=v3 -target bpf -I/usr/include/$(uname -m)-linux-gnu \\
        -c bench/experiments/oa_lookup.bpf.c -o /tmp/oa_lookup.o
    PYTHONPATH=src .venv/bin/python bench/experiments/oa_lookup.py /tmp/oa_lookup.o
"""

import statistics
import sys

from snatgw.datapath.bpf import libbpf as B

NKEYS, CHUNK, OPS = 720_000, 65_536, 8192


def main(path: str) -> None:
    obj = B.BpfObject.open(path)
    obj.load()
    pkt, data, bss = bytes(64), obj.map("oa_looku.data"), obj.map("oa_looku.bss")
    data.put(0, NKEYS.to_bytes(4, "little"))
    for base in range(0, NKEYS, CHUNK):  # bss: BASE, IBASE
        bss.put(0, base.to_bytes(4, "little") + bytes(4))
        B.test_run(obj.prog_fd("fill"), pkt)
    for rnd in range(3):
        out = {}
        for name in ("h_hit", "h_miss", "oa_hit", "oa_miss", "h_ins", "oa_ins"):
            fd, ds = obj.prog_fd(name), []
            for q in range(5):
                ibase = (1 << 24) + ((rnd * 5 + q) * OPS * 7919) % (1 << 30)  # fresh keys to insert
                bss.put(0, bytes(4) + ibase.to_bytes(4, "little"))
                ds.append(B.test_run(fd, pkt)[3] / OPS)
            out[name] = (min(ds), statistics.median(ds))
        hits = [int.from_bytes(obj.map("res").get(i), "little") for i in range(6)]
        assert hits[0] == hits[2] == OPS and hits[1] == hits[3] == 0, hits  # hits hit, misses miss
        print("  ".join(f"{k} {v[0]:.0f}/{v[1]:.0f}" for k, v in out.items()), "ns (min/median)")


if __name__ == "__main__":
    main(sys.argv[1])
