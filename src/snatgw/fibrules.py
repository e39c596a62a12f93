"""Does a FIB lookup's answer depend on its input device?  (sans-I/O: rules in, answer out)

A new session of the bpf datapath makes two FIB lookups with the same destination (the inside
host) and source (the remote) that differ only in the input device: the reverse-path check
(step 2a, from the loopback) and the route back for the replies (from the uplink, as a reply
would arrive).  In the kernel (net/core/filter.c, bpf_ipv4_fib_lookup without
BPF_FIB_LOOKUP_OUTPUT) the input device changes the answer in two ways only:

- policy rules that select on it (net/core/fib_rules.c, fib_rule_match): an `iif`/`iifname`
  selector (FRA_IIFNAME; with `not` too, and a rule naming a device that is not there yet is
  such a rule as soon as the device comes) and the `l3mdev` rule a VRF adds (FRA_L3MDEV: its
  table is the input device's VRF's).  Nothing else of a rule sees it: `oif` is matched against
  an output device these lookups leave unset, mark, uid, tos, ports and protocol are the same
  in both lookups;
- the input device's forwarding switch (IN_DEV_FORWARD): off, the lookup fails
  (BPF_FIB_LKUP_RET_FWD_DISABLED).

The multipath hash reads addresses (and ports, protocol: 0 in both), never the input device.
So while no rule selects on the input device and every device forwards, the route back is the
reverse-path check's route, and the datapath reuses it (CFG_F_BACK_FROM_RPF) instead of
looking it up again.  ``route_back_blocker`` is that judgement; the bpf backend reads the rules
and switches, writes the flag and logs when it changes.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the "clear" answer for a rule that selects on the input device
IIF_RULE, L3MDEV_RULE, NO_FORWARDING = "iif rule", "l3mdev rule", "forwarding off"


@dataclass(frozen=True)
class PolicyRule:
    """One IPv4 policy rule, as much of it as the judgement and its message need."""

    priority: int = 0
    iif: str | None = None  # FRA_IIFNAME (`iif DEV`)
    l3mdev: bool = False  # FRA_L3MDEV (`l3mdev`, added by VRFs)
    invert: bool = False  # FIB_RULE_INVERT (`not`)
    table: int | None = None

    def __str__(self) -> str:
        """The rule as `ip rule` shows it, about (what an operator looks for)."""
        sel = ("not " if self.invert else "") + "from all"
        if self.iif is not None:
            sel += f" iif {self.iif}"
        act = "lookup [l3mdev-table]" if self.l3mdev else f"lookup {self.table}" if self.table is not None else ""
        return f"{self.priority}: {sel} {act}".rstrip()


def route_back_blocker(rules, forwarding: dict[str, bool]) -> str | None:
    """None when a FIB lookup's answer does not depend on its input device (the route back may
    be the reverse-path check's); else why it may, naming the first rule (by priority) or the
    first device (by name) that makes it so.  ``rules``: the IPv4 policy rules (PolicyRule);
    ``forwarding``: device name -> its IPv4 forwarding switch."""
    for r in sorted(rules, key=lambda r: r.priority):
        if r.iif is not None:
            return f"{IIF_RULE} {r}"
        if r.l3mdev:
            return f"{L3MDEV_RULE} {r}"
    for dev in sorted(forwarding):
        if not forwarding[dev]:
            return f"{NO_FORWARDING} on {dev}"
    return None


def describe(blocker: str | None) -> str:
    """What `snatgw status` says about the route back."""
    if blocker is None:
        return "reused from the reverse-path check"
    return f"looked up per session ({blocker})"


def gw_numbers(egresses, prev: dict | None = None, slots: int | None = None) -> dict:
    """The new_gw policy routing's numbers (layout.GW_*): each distinct egress of ``egresses``
    (hashables, in rule order: the bpf backend's (ifindex, next hop), the model's (device, next
    hop)) -> n in 0..slots-1.  An egress numbered in ``prev`` (the last install) keeps its
    number, and a new one takes the lowest number ``prev`` did not use (else the lowest free),
    so a reload does not point a mark still in use at another egress.  More distinct egresses
    than slots: BackendError."""
    from .errors import BackendError
    from .layout import GW_SLOTS

    slots = GW_SLOTS if slots is None else slots
    wanted = list(dict.fromkeys(egresses))
    if len(wanted) > slots:
        raise BackendError(f"new_gw: {len(wanted)} distinct next hops, at most {slots} can be routed")
    out = {eg: prev[eg] for eg in wanted if prev and eg in prev}
    used = set(out.values())
    old = set(prev.values()) if prev else set()
    free = iter([n for n in range(slots) if n not in used and n not in old] +
                [n for n in range(slots) if n not in used and n in old])  # fmt: skip
    for eg in wanted:
        if eg not in out:
            out[eg] = next(free)
    return out
