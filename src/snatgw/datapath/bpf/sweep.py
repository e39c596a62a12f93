"""The expiry sweep in the kernel (prog/sweep.bpf.c): expiry and flush of snat_ct at a million
sessions without holding the table in Python.

``Sweeper(maps)`` loads the sweep object over the datapath's own maps (by fd); each call is one
walk of snat_ct by its BPF_PROG_TYPE_SYSCALL program run with BPF_PROG_RUN: either once over
the whole table (bpf_for_each_map_elem, one system call) or ``chunked``, once per SWEEP_CHUNK
keys read by batch lookups (milliseconds each; measured costs: docs/operations.md).

- ``expire(now_ns, timeouts_ns, grace_ns)``: remove expired pairs and old half pairs, recount
  the live counts.
- ``flush(filter)``: remove the selected pairs (no filter: every entry), recount.
- ``recount()``: remove nothing, recount the live counts (a host limit turned on by reload).
- ``host_add(host, n)``: n sessions the control plane made added to an inside host's live count
  by an atomic add (its own program, snat_host_add: it may run beside a walk, on another thread).

A chunked walk given ``stop`` (a callable) asks it before each chunk and, when it says so, ends
there with SWEEP_ABORT instead of SWEEP_END (``SweepResult.cut``): what the chunks visited did
stays done (pairs removed), nothing is published (the counts stay as the last completed walk
left them plus the datapath's increments: high, never low) and the part not reached is left for
the next walk.  The backend cuts an expiry sweep so for a walk that must run now (a recount, a
flush), which counts everything again itself.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from ... import layout as L
from ...errors import BackendError
from ..backend import SessionFilter
from . import libbpf as B

PROG = "snat_sweep"
HOST_ADD = "snat_host_add"
_U64 = struct.Struct("<Q")
_KEYS_HDR = struct.Struct("<II")  # struct sweep_keys: n, pad


def filter_args(flt: SessionFilter) -> dict:
    """struct sweep_args fields for a filter (flags + values, wire order where __be)."""
    a: dict = {"flags": 0}
    if flt.rule_id is not None:
        a["flags"] |= L.SWEEP_F_RULE
        a["rule_id"] = int(flt.rule_id) & 0xFFFFFFFF
    if flt.inside is not None:
        a["flags"] |= L.SWEEP_F_INSIDE
        a["inside"], a["inside_mask"] = int(flt.inside.network_address), int(flt.inside.netmask)
    if flt.nat is not None:
        a["flags"] |= L.SWEEP_F_NAT
        a["nat"] = int(flt.nat)
    if flt.remote is not None:
        a["flags"] |= L.SWEEP_F_REMOTE
        a["remote"], a["remote_mask"] = int(flt.remote.network_address), int(flt.remote.netmask)
    if flt.remote_port is not None:
        a["flags"] |= L.SWEEP_F_RPORT
        a["remote_port"] = int(flt.remote_port)
    if flt.proto is not None:
        a["flags"] |= L.SWEEP_F_PROTO
        a["proto"] = int(flt.proto)
    if flt.state is not None:
        a["flags"] |= L.SWEEP_F_STATE
        a["state"] = int(flt.state)
    return a


ALL = SessionFilter()


@dataclass
class SweepResult:
    visited: int = 0
    removed: int = 0
    orphans: int = 0
    live: int = 0
    fresh: int = 0
    count_errors: int = 0
    made_during: int = 0  # pairs kept that the datapath made during the walk (counted by it, not again)
    seconds: float = 0.0  # wall time of the run (system call included)
    cut: bool = False  # a chunked walk stopped between chunks (``stop``): nothing published
    chunks: int = 0  # SWEEP_KEYS runs made (chunked walks)


class Sweeper:
    """The sweep object loaded over ``maps`` (a DatapathMaps)."""

    def __init__(self, maps, obj_path=None):
        from . import build

        self.maps = maps
        path = obj_path or build.compile(source=build.SWEEP_SOURCE)
        obj = B.BpfObject.open(path)
        try:
            for name in obj.map_names():
                m = maps.maps.get(name)
                if m is not None:
                    obj.reuse_fd(name, m.fd)
            obj.load()
            self.prog_fd = obj.prog_fd(PROG)
            self.host_add_fd = obj.prog_fd(HOST_ADD)
        except BaseException:
            obj.close()
            raise
        self.obj = obj
        self.args_map, self.res_map = obj.map("sweep_args"), obj.map("sweep_res")
        self.timeouts_map = obj.map("sweep_timeouts")
        self.keys_map = obj.map("sweep_keys")
        self._timeouts: tuple[int, ...] | None = None

    def close(self) -> None:
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    def set_timeouts(self, timeouts_ns: dict[int, int]) -> None:
        """Timeout in ns by ct_state; states past SWEEP_STATES use NONE's."""
        none = timeouts_ns[int(L.CtState.NONE)]
        t = tuple(int(timeouts_ns.get(s, none)) for s in range(L.SWEEP_STATES))
        if t != self._timeouts:
            for s, ns in enumerate(t):
                self.timeouts_map.put(s, _U64.pack(ns))
            self._timeouts = t

    def _prog(self) -> None:
        rc, _ = B.run_syscall(self.prog_fd)
        if rc != 0:
            raise BackendError(f"the sweep program failed (return value {rc})")

    def _run(self, chunked: bool = False, stop: Callable[[], bool] | None = None, **args) -> SweepResult:
        """One walk.  ``chunked``: in runs of SWEEP_CHUNK keys read by batch lookups, each
        system call a few milliseconds of kernel time (the whole walk in one run holds its CPU
        for up to seconds at a million sessions).  ``stop`` (chunked only): asked before the
        walk and before each chunk; true -> the walk ends there, cut short (SWEEP_ABORT; before
        SWEEP_BEGIN: nothing runs at all).  A failure between SWEEP_BEGIN and SWEEP_END ends
        the walk the same way before it is raised (the next walk's deltas start empty)."""
        if self.obj is None:
            raise BackendError("the sweep program is closed")
        t0 = time.monotonic()
        if chunked and stop is not None and stop():
            return SweepResult(cut=True, seconds=time.monotonic() - t0)
        self.res_map.put(0, bytes(L.SWEEP_RES.size))
        cut, chunks = False, 0
        if not chunked:
            self.args_map.put(0, L.SWEEP_ARGS.pack(phase=L.SWEEP_WHOLE, **args))
            self._prog()
        else:
            try:
                self.args_map.put(0, L.SWEEP_ARGS.pack(phase=L.SWEEP_BEGIN, **args))
                self._prog()
                self.args_map.put(0, L.SWEEP_ARGS.pack(phase=L.SWEEP_KEYS, **args))
                ks = self.maps.ct.key_size
                for n, keys in self.maps.ct.key_batches(L.SWEEP_CHUNK):
                    if stop is not None and stop():
                        cut = True
                        break
                    self.keys_map.put(0, _KEYS_HDR.pack(n, 0) + keys.ljust(L.SWEEP_CHUNK * ks, b"\0"))
                    self._prog()
                    chunks += 1
            except BaseException:
                self._abort(args)
                raise
            if cut:
                self._abort(args)
            else:
                self.args_map.put(0, L.SWEEP_ARGS.pack(phase=L.SWEEP_END, **args))
                self._prog()
        res = SweepResult(**L.SWEEP_RES.unpack(self.res_map.get(0)), cut=cut, chunks=chunks)
        res.seconds = time.monotonic() - t0
        return res

    def _abort(self, args: dict) -> None:
        """End a chunked walk without publishing (SWEEP_ABORT: its deltas and marks dropped)."""
        self.args_map.put(0, L.SWEEP_ARGS.pack(phase=L.SWEEP_ABORT, **args))
        self._prog()

    def expire(self, now_ns: int, timeouts_ns: dict[int, int], grace_ns: int, full: bool = True,
               chunked: bool = False, stop: Callable[[], bool] | None = None) -> SweepResult:  # fmt: skip
        """``full``: also check every entry's other half (half pairs, orphans); else only the
        entries that look expired cost a lookup.  ``chunked``, ``stop``: see _run."""
        self.set_timeouts(timeouts_ns)
        return self._run(chunked, stop, mode=L.SWEEP_EXPIRE, now=now_ns, grace=grace_ns, full=int(full))

    def flush(self, flt: SessionFilter = ALL, chunked: bool = False) -> SweepResult:
        return self._run(chunked, mode=L.SWEEP_FLUSH, **filter_args(flt))

    def host_add(self, host: bytes, n: int = 1) -> bool:
        """Add ``n`` sessions to the live count of the inside host ``host`` (4 bytes, wire
        order) as the datapath adds its own: atomically (a read and a write lost a datapath
        increment between them).  False when the count map is full (the next walk counts them)."""
        if self.obj is None:
            raise BackendError("the sweep program is closed")
        ctx = L.SWEEP_HOST_ADD.pack(host=bytes(host), sessions=n)
        rc, _ = B.run_syscall(self.host_add_fd, ctx)
        return rc == 0

    def recount(self, chunked: bool = False) -> SweepResult:
        """The live counts (rule, SNAT address, inside host) counted again from the OUT
        entries, nothing removed: one read of each entry, as an expiry walk's common case."""
        return self._run(chunked, mode=L.SWEEP_RECOUNT)
