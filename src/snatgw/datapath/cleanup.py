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
        removed = detach_ours(devices)
        removed += gwroutes.remove()  # its new_gw policy routing (after the detach: unmarked now)
    if pin_dir and os.path.isdir(pin_dir):
        before = set(os.listdir(pin_dir))
        unpin(pin_dir)
        gone = before - (set(os.listdir(pin_dir)) if os.path.isdir(pin_dir) else set())
        if gone or not os.path.isdir(pin_dir):
            removed.append(f"pinned maps in {pin_dir} ({len(gone)} pins)")
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
