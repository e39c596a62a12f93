"""The policy routing a backend owns for its new_gw rules: which ip rules and routes are ours,
and their removal.  Both backends route a new_gw rule's marked packets by an ip rule and a
table of their own (bpf: datapath/bpf/gwroutes.py, prefs/tables 30000-30999; nft:
datapath/nft/render.py, 31000-31999); what is theirs is decided here alone, once:

* an ip rule is ours when its pref lies in the backend's range AND it carries the backend's
  `proto` (201): an operator's rule at such a pref, or ours of the other backend, is not;
* a route is ours when it carries that proto and lies in a table of the range.

Nothing else is ever removed.  ``ip`` is the backend's way of running `ip` (argv without
`ip`, ``check``) in the gateway's namespace: the bpf backend runs it in the daemon's own, the
nft backend through nsenter when aimed at another.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Callable

IpRunner = Callable[..., subprocess.CompletedProcess]  # ip(argv, check=True)


@dataclass(frozen=True)
class PolicyRange:
    """A backend's ip rule prefs and tables: base .. base + slots - 1, tagged ``proto``."""

    base: int
    slots: int
    proto: int

    def ours(self, n: int) -> bool:
        return self.base <= n < self.base + self.slots

    def rules(self, ip: IpRunner) -> dict[int, dict]:
        """Our ip rules by pref (`ip -j rule show`'s objects)."""
        r = ip(["-j", "-4", "rule", "show"], check=False)
        if r.returncode != 0 or not r.stdout.strip():
            return {}
        out = {}
        for x in json.loads(r.stdout):
            pref = int(x.get("priority", -1))
            # (`ip` names proto 201 by number, or by name where rt_protos names it)
            if self.ours(pref) and str(x.get("protocol", "")) in (str(self.proto), "201"):
                out[pref] = x
        return out

    def tables(self, ip: IpRunner) -> dict[int, tuple[str, str] | None]:
        """Every table of our range holding a route of ours -> its default route's (via,
        device), or None when it has no default route of ours.  (The proto filters in the
        kernel's dump: a gateway holding a full routing table is not listed every check.)"""
        r = ip(["-j", "-4", "route", "show", "table", "all", "proto", str(self.proto)], check=False)
        out: dict[int, tuple[str, str] | None] = {}
        for rt in json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else ():
            t = str(rt.get("table", ""))
            if not (t.isdigit() and self.ours(int(t))):
                continue
            if rt.get("dst") == "default":
                out[int(t)] = (str(rt.get("gateway")), str(rt.get("dev")))
            else:
                out.setdefault(int(t), None)
        return out

    def remove(self, ip: IpRunner, keep: set[int] = frozenset()) -> list[str]:
        """Our rules and the routes of our tables, except tables/prefs ``keep``; returns what
        went (for the log).  Tables are listed before the rules go; each rule is deleted by pref
        and proto, so an operator's rule at the same pref stays."""
        prefs = sorted(p for p in self.rules(ip) if p not in keep)
        tables = sorted((set(self.tables(ip)) | set(prefs)) - set(keep))
        for pref in prefs:
            ip(["rule", "del", "pref", str(pref), "proto", str(self.proto)], check=False)
        for t in tables:
            ip(["route", "flush", "table", str(t), "proto", str(self.proto)], check=False)
        gone = []
        if prefs:
            gone.append("ip rules pref " + ",".join(map(str, prefs)))
        if tables:
            gone.append(f"routes proto {self.proto} in tables " + ",".join(map(str, tables)))
        return gone


__all__ = ["IpRunner", "PolicyRange"]
