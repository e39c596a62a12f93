"""Removing a backend's traces from one network namespace: the nft backend's table, policy
routing and conntrack entries; the bpf backend's TC filters (our handle/priority only) and pin
directory; the leak guard table both keep (bpf/guard.py).  Each backend's start() removes the other's; `snatgw purge` removes both.
"""

from __future__ import annotations

import contextlib
import os

from ..errors import BackendError


class NoLibbpf(BackendError):
    """libbpf cannot be loaded here, so no TC filter of ours can be looked for (or exist)."""


def remove_nft(netns: str | None = None) -> list[str]:
    """The nft backend's table, ip rules/routes (proto 201, our range) and conntrack entries."""
    from .nft.backend import NftBackend

    return NftBackend(netns=netns).remove_leftovers()


def remove_bpf(pin_dir: str | None, netns: str | None = None, devices=None) -> list[str]:
    """Our TC filters on ``devices`` (default: every device of the namespace), the new_gw
    policy routing (bpf/gwroutes: prefs/tables 30000-30999, proto 201) and the pins
    under ``pin_dir`` (None: leave pins alone).  Pins live on the host's bpffs, not in the
    namespace: the caller names the one directory that belongs to this gateway."""
    try:
        from .bpf import libbpf
        from .bpf.loader import detach_ours, unpin
        from .netns import enter

        libbpf.lib()
    except (ImportError, OSError, BackendError) as e:  # no libbpf: no bpf datapath ran here
        raise NoLibbpf(f"cannot look for TC filters of the bpf backend: {e}") from None
    from .bpf import gwroutes

    with enter(netns) if netns else contextlib.nullcontext():
        carrying = _carrying_ours(devices)
        removed = detach_ours(devices)
        removed += _remove_emptied_hooks(carrying)
        removed += gwroutes.remove()  # its new_gw policy routing (after the detach: unmarked now)
    if pin_dir and os.path.isdir(pin_dir):
        before = set(os.listdir(pin_dir))
        unpin(pin_dir)
        gone = before - (set(os.listdir(pin_dir)) if os.path.isdir(pin_dir) else set())
        if gone or not os.path.isdir(pin_dir):
            removed.append(f"pinned maps in {pin_dir} ({len(gone)} pins)")
    return removed


def _carrying_ours(devices) -> dict[str, int]:
    """{name: ifindex} of the devices (default: every one here) with our TC filter on either
    clsact point."""
    from .bpf import libbpf as B
    from .bpf.loader import _query, devices_here

    out = {}
    for idx, name in devices_here(devices):
        with contextlib.suppress(BackendError, OSError):
            if any(_query(idx, p) is not None for p in (B.BPF_TC_INGRESS, B.BPF_TC_EGRESS)):
                out[name] = idx
    return out


def _remove_emptied_hooks(carrying: dict[str, int]) -> list[str]:
    """The clsact qdisc of each device that carried our filter, once no filter is left on it:
    the loader's rule (a hook that carried our filter is one snatgw made, loader.Attachment's
    created_hook), as the daemon's own stop removes it.  A hook with another filter stays."""
    from .bpf import libbpf as B
    from .bpf.loader import _hook_empty

    removed = []
    for name, idx in carrying.items():
        try:
            empty = _hook_empty(name)
        except OSError:  # no `tc` to list the other filters: the qdisc stays, as with another filter
            continue
        if empty:
            try:
                B.tc_hook_destroy(idx, B.BPF_TC_INGRESS | B.BPF_TC_EGRESS)
            except BackendError:
                continue
            removed.append(f"clsact qdisc on {name} (snatgw's, now empty)")
    return removed


def remove_guard(netns: str | None = None) -> list[str]:
    """The leak guard's table (bpf/guard.py), which both backends keep: a backend taking over
    from the other leaves it (and rewrites it); only a purge or a stop without keep_state
    removes it."""
    from .bpf import guard

    try:
        if guard.remove(netns):
            return [f"nft table {guard.FAMILY} {guard.TABLE} (the leak guard's second line)"]
    except BackendError:  # no nft: no guard table can exist
        pass
    return []


def purge(pin_dir: str | None, netns: str | None = None, devices=None) -> list[str]:
    """Every trace of both backends in the namespace (and the pin directory)."""
    return remove_nft(netns) + remove_bpf(pin_dir, netns, devices) + remove_guard(netns)


__all__ = ["NoLibbpf", "remove_nft", "remove_bpf", "remove_guard", "purge"]
