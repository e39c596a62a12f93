"""snatgw.model: the executable specification of the datapath (docs/datapath.md).

Pure Python, sans-I/O: ``Engine.process(ipv4_bytes, side, ingress, now)`` -> ``Result``.
packet (parse), checksum (the kernel's incremental updates), xlate (byte rewrites),
conntrack (two-key session table, TCP FSM, expiry), nat (port search, reverse-first insert),
frag (remembered first fragments), router (a static FIB), engine (the steps).

Points docs/datapath.md leaves open, as the model settles them (the BPF programs agree; the
differential tests hold both to it):
- the IP version is read when there is a byte; fewer than 20 bytes (or none) is malformed;
- `unmatched drop` applies to the inside program only (the outside program's passes meet the
  inbound guard instead: DROP_INBOUND for what the FIB would forward);
- a new_gw with no usable route: PASS_NO_ROUTE, no session;
- every translated first fragment is remembered (new, established and reply packets); an
  entry older than FRAG_TIMEOUT is a miss;
- last_seen moves only for translated packets; sessions keep no packet/byte counters (memory
  per session), their rule does; ICMP errors about a session count toward its rule
  (packets/bytes = IP total length) but do not touch its entries;
- an ICMP error from inside with TTL <= 1 is PASS_TTL like any forwarded packet; a quoted echo's
  own checksum is adjusted for the identifier; only a quoted query request (outside) or query
  reply (inside, egress), TCP, UDP, or a protocol without ports (ports 0) can match a session;
- replies set CT_F_REPLIED on the OUT entry and a copy on the IN entry, for every protocol;
- egress packets that are not ICMP errors pass uncounted, unless the leak guard drops them
  (DROP_LEAK, counted);
- the reverse-path check (DROP_SPOOFED) asks the router for the route to the source; a
  session made on the ingress device vouches for its OUT key's packets without asking;
- checksum updates are normalised like csum_replace4 (never 0xFFFF; see checksum.py)."""

from .engine import Engine, Result
from .router import FibResult, StaticRouter

__all__ = ["Engine", "Result", "FibResult", "StaticRouter"]
