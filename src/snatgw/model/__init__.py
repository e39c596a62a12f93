"""snatgw.model: the executable specification of the datapath (docs/datapath.md).

Pure Python, sans-I/O: ``Engine.process(ipv4_bytes, side, ingress, now)`` -> ``Result``.
packet (parse), checksum (the kernel's incremental updates), xlate (byte rewrites),
conntrack (two-key session table, TCP FSM, expiry), nat (port search, reverse-first insert),
frag (remembered first fragments), router (a static FIB), engine (the steps)."""

from .engine import Engine, Result
from .router import FibResult, StaticRouter

__all__ = ["Engine", "Result", "FibResult", "StaticRouter"]
