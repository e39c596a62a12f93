"""How a backend aimed at another network namespace names and enters it: ``netns`` is a name
under /run/netns (``ip netns add``) or a path (/proc/PID/ns/net).  One spelling for the nft
backend, the leak guard's table, ctnetlink, cleanup and the bpf loader."""

from __future__ import annotations

import contextlib
import ctypes
import os

from ..errors import BackendError

_CLONE_NEWNET = 0x40000000


def path(name_or_path: str) -> str:
    return name_or_path if "/" in name_or_path else f"/run/netns/{name_or_path}"


def nsenter(netns: str | None) -> list[str]:
    """The argv prefix that runs a command in ``netns`` (none for the caller's own)."""
    return ["nsenter", f"--net={path(netns)}"] if netns else []


@contextlib.contextmanager
def enter(name_or_path: str):
    """Run the body with the calling thread in network namespace ``name_or_path``; the thread's
    namespace is restored afterwards.  Children started in the body (ip, tc) inherit it; BPF
    fds and netlink sockets opened in it stay valid and bound to it after."""
    where = path(name_or_path)
    libc = ctypes.CDLL(None, use_errno=True)
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        fd = os.open(where, os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise BackendError(f"setns {where}: {os.strerror(e)}")
        finally:
            os.close(fd)
        try:
            yield
        finally:
            if libc.setns(here, _CLONE_NEWNET) != 0:  # pragma: no cover - cannot recover
                raise BackendError(f"setns back to the original netns: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(here)
