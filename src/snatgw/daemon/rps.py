"""Receive packet steering (RPS) of the gateway's devices: the `rps_cpus` setting.

A NIC with one receive queue (most 1 GbE NICs, virtio, veth) has every packet it receives
handled on one CPU; lvs-snat patched the kernel for that (spec, "The rps framework").  snatgw's
session table is one table shared by all CPUs, so any CPU may handle any packet, and the
kernel's own RPS is enough: `queues/rx-N/rps_cpus` of a device names the CPUs its packets are
handed to (by flow hash) before `__netif_receive_skb_core`, where the TC ingress programs (bpf)
and netfilter's conntrack and nat (nft) run.

``rps_cpus off`` (default) leaves the devices as they are; ``all`` or a CPU list (``0-3,6``)
writes that mask to every rx queue of every inside and outside device; the mask each queue had
before is kept and written back when the daemon stops, when a reload turns the setting off or a
device leaves the config.  A device recreated under its name (another ifindex) gets the mask
again from the hook check.

The masks before are also kept in a state file (``state``: the daemon's is next to its owner
lock, /run/snatgw/owner/<name>-<netns>.rps), written before the first mask write and removed
when nothing is held any more: a daemon killed (SIGKILL, the OOM killer, a crash) leaves its
masks written, and the next daemon reads there what the queues had before the first one, rather
than taking the killed one's mask for the device's own (until 30 Nov 2026 the operator's mask
was then lost for good).  A file that is not one (corrupt, too big, another namespace's) is
named in a warning and ignored.

Safety: the daemon writes only the sysfs of its own network namespace.  /sys shows the devices
of the namespace whose sysfs is mounted there, which is not the daemon's when it was started by
`nsenter --net` (or any setns) without a /sys of its own: those files may be the host's
devices.  Before any write ``foreign_sysfs`` compares the devices /sys/class/net lists (name and
ifindex, every one) with those of this namespace (if_nameindex, netlink); any difference and
nothing is written, a warning is logged once and `status` says why.

The decisions (``decide``) are pure; ``RpsManager`` reads and writes sysfs around them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

SYSFS = "/sys"
MAX_CPUS = 4096  # CPU numbers 0..4095: a bound on the masks written (the setting refuses more)
CHUNK_BITS = 32  # the kernel prints masks in comma-separated groups of 32 bits
FOREIGN_READS = 3  # sysfs and netlink compared up to this many times before they differ (foreign_sysfs)
FOREIGN_PAUSE = 0.01  # seconds between two of those reads (a device being made or removed settles)
STATE_VERSION = 1  # the state file's format
STATE_MAX_BYTES = 1 << 20  # a larger state file is not ours: not read (a bound on a start's work)
STATE_MAX_DEVICES = 1024  # devices a state file may name
STATE_MAX_QUEUES = 4096  # rx queues a device of it may have (the kernel's own bound is lower)
STATE_MAX_MASK = 1200  # characters of one mask: 4096 CPUs are 128 groups of 8 hex digits and commas
SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>, Linux 5.14; not in Python's socket module
_QUEUE = re.compile(r"rx-[0-9]{1,5}\Z")


# --------------------------------------------------------------------------- CPU lists, masks


def parse_cpulist(text: str) -> frozenset[int]:
    """The kernel's cpulist syntax (``0-3,6``) -> CPU numbers; ValueError saying what is wrong
    (an empty item, a reversed range, a CPU >= MAX_CPUS, not a number)."""
    if not text:
        raise ValueError("expected a CPU list such as 0-3,6, got nothing")
    cpus: set[int] = set()
    for item in text.split(","):
        if not item:
            raise ValueError(f"expected a CPU list such as 0-3,6, got an empty item in {text!r}")
        lo, sep, hi = item.partition("-")
        if not (lo.isascii() and lo.isdigit()) or (sep and not (hi.isascii() and hi.isdigit())):
            raise ValueError(f"expected a CPU number or a range LOW-HIGH, got {item!r}")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ValueError(f"expected a range LOW-HIGH with LOW <= HIGH, got {item!r}")
        if b >= MAX_CPUS:
            raise ValueError(f"CPU {b}: CPU numbers go from 0 to {MAX_CPUS - 1}")
        cpus.update(range(a, b + 1))
    return frozenset(cpus)


def format_cpulist(cpus) -> str:
    """CPU numbers as the kernel's cpulist (``0-3,6``); "" for none."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}")
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}")
    return ",".join(out)


def format_mask(cpus, nbits: int | None = None) -> str:
    """CPU numbers as a cpumask the way the kernel prints one (``%*pb``): hex, in groups of 32
    bits separated by commas, most significant first; the first group has the digits that
    ``nbits`` bits need (``nbits``: the number of possible CPUs; default: the highest CPU + 1),
    the others eight.  {0, 1} on 2 CPUs: "3"; {0} on 33: "0,00000001"; all of 64: "ffffffff,ffffffff"."""
    value = 0
    for c in cpus:
        value |= 1 << c
    nbits = max(nbits or 0, value.bit_length(), 1)
    groups, first = [], nbits % CHUNK_BITS or CHUNK_BITS
    top = (nbits + CHUNK_BITS - 1) // CHUNK_BITS
    for i in range(top - 1, -1, -1):
        chunk = (value >> (i * CHUNK_BITS)) & 0xFFFFFFFF
        width = (first + 3) // 4 if i == top - 1 else 8
        groups.append(f"{chunk:0{width}x}")
    return ",".join(groups)


def parse_mask(text: str) -> int:
    """A mask as the kernel prints it ("ff,ffffffff", "0") -> its bits; ValueError if not one."""
    text = text.strip()
    if not text:
        raise ValueError("empty mask")
    value = 0
    for group in text.split(","):
        value = (value << CHUNK_BITS) | int(group, 16)
    return value


def mask_cpus(value: int) -> frozenset[int]:
    return frozenset(i for i in range(value.bit_length()) if value >> i & 1)


def read_cpulist_file(path: str) -> frozenset[int]:
    with open(path) as f:
        return parse_cpulist(f.read().strip())


def online_cpus(sysfs: str = SYSFS) -> frozenset[int]:
    """The CPUs online now (/sys/devices/system/cpu/online: the same in every namespace)."""
    return read_cpulist_file(os.path.join(sysfs, "devices/system/cpu/online"))


def possible_cpus(sysfs: str = SYSFS) -> int:
    """The number of CPU ids the kernel has (nr_cpu_ids: the width of the masks it prints)."""
    try:
        return max(read_cpulist_file(os.path.join(sysfs, "devices/system/cpu/possible"))) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def wanted_cpus(setting: str, online: frozenset[int]) -> tuple[frozenset[int] | None, str | None]:
    """The CPUs a setting asks for now: (None, None) for off; for a list, those of it online
    (a CPU taken offline since the config was read is left out, with why)."""
    if setting == "off":
        return None, None
    if setting == "all":
        return online, None
    asked = parse_cpulist(setting)
    got = asked & online
    if not got:
        return None, f"none of CPUs {setting} is online (online: {format_cpulist(online)})"
    if got != asked:
        return got, f"CPUs {format_cpulist(asked - got)} of {setting} are not online: left out"
    return got, None


# --------------------------------------------------------------------------- decisions (no I/O)


@dataclass(frozen=True)
class DeviceNow:
    """A device as read now: its ifindex and each rx queue's mask (the kernel's text)."""

    ifindex: int
    queues: dict[str, str]  # "rx-0" -> "3"


@dataclass(frozen=True)
class Saved:
    """What a device's queues had before we wrote them (put back at the end)."""

    ifindex: int
    masks: dict[str, str]  # "rx-0" -> the kernel's text then


@dataclass
class Plan:
    writes: list[tuple[str, str, str]] = field(default_factory=list)  # (device, queue, mask text)
    saved: dict[str, Saved] = field(default_factory=dict)  # what is kept after the writes
    events: list[str] = field(default_factory=list)  # what was done, for the log (info)


def _same(a: str, b: str) -> bool:
    try:
        return parse_mask(a) == parse_mask(b)
    except ValueError:
        return False


def decide(want: str | None, devices: tuple[str, ...], now: dict[str, DeviceNow | None],
           saved: dict[str, Saved]) -> Plan:
    """What to write.  ``want``: the mask to write (None: off, put back what was saved);
    ``devices``: the inside and outside devices of the config; ``now``: each of them (and each
    saved one) as read now, None when absent; ``saved``: what was saved before.

    A saved device that left the config, or every one when ``want`` is None, gets its masks
    back when it is still the same device (same ifindex); a device gone or recreated meanwhile
    has nothing to put back (not an error).  A configured device gets ``want`` on every queue
    whose mask differs; its masks before are saved the first time (a recreated device's,
    again: the old ones belonged to the device that went; a queue added since, its own)."""
    plan = Plan()
    keep = set(devices) if want is not None else set()
    for name, sv in saved.items():
        if name in keep:
            continue
        cur = now.get(name)
        if cur is None or cur.ifindex != sv.ifindex:
            plan.events.append(f"{name}: gone or recreated since, nothing to put back")
            continue
        back = [(q, m) for q, m in sorted(sv.masks.items()) if q in cur.queues and not _same(cur.queues[q], m)]
        plan.writes += [(name, q, m) for q, m in back]
        if back:
            plan.events.append(f"{name}: put back " + ", ".join(f"{q} {m}" for q, m in back))
    if want is None:
        return plan
    for name in devices:
        cur = now.get(name)
        sv = saved.get(name)
        if cur is None:
            if sv is not None:  # absent now: what it had is kept in case it is the same again
                plan.saved[name] = sv
            continue
        if sv is None or sv.ifindex != cur.ifindex:
            if sv is not None:
                plan.events.append(f"{name}: recreated (ifindex {sv.ifindex} -> {cur.ifindex})")
            sv = Saved(cur.ifindex, dict(cur.queues))
        else:
            sv = Saved(sv.ifindex, {**{q: m for q, m in cur.queues.items() if q not in sv.masks}, **sv.masks})
        plan.saved[name] = sv
        todo = [q for q in sorted(cur.queues, key=_queue_order) if not _same(cur.queues[q], want)]
        plan.writes += [(name, q, want) for q in todo]
        if todo:
            plan.events.append(f"{name}: rps_cpus {want} on {', '.join(todo)}")
    return plan


def _queue_order(q: str) -> tuple[int, str]:
    n = q.rpartition("-")[2]
    return (int(n), q) if n.isdigit() else (1 << 30, q)


# --------------------------------------------------------------------------- the state file


def netns_cookie() -> int | None:
    """This network namespace's cookie (SO_NETNS_COOKIE: unique while the host runs, never
    reused, unlike the namespace's inode number, which names the state file and which a namespace
    made later may get again); None where the kernel has none (before 5.14)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            return struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
    except OSError:
        return None


def _saved_of(data, cookie: int | None) -> dict[str, Saved]:
    """The masks a state file's JSON holds; ValueError saying why it is not a state file of
    this namespace."""
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION or not isinstance(data.get("devices"), dict):
        raise ValueError(f"not an rps_cpus state file of version {STATE_VERSION}")
    theirs = data.get("netns")
    if cookie is not None and theirs is not None and theirs != cookie:
        raise ValueError(f"written in another network namespace (cookie {theirs}; this one's is {cookie}): one gone "
                         "since, whose inode number this one has")
    devices = data["devices"]
    if len(devices) > STATE_MAX_DEVICES:
        raise ValueError(f"{len(devices)} devices: more than the {STATE_MAX_DEVICES} a state file may name")
    out = {}
    for name, d in devices.items():
        if not (isinstance(name, str) and 0 < len(name) < 16 and "/" not in name and name not in (".", "..")):
            raise ValueError(f"{name!r:.40} is not a device name")
        if not isinstance(d, dict) or type(d.get("ifindex")) is not int or d["ifindex"] <= 0 \
                or not isinstance(d.get("masks"), dict) or len(d["masks"]) > STATE_MAX_QUEUES:
            raise ValueError(f"{name}: expected an ifindex and at most {STATE_MAX_QUEUES} masks")
        for q, m in d["masks"].items():
            if not (isinstance(q, str) and _QUEUE.match(q) and isinstance(m, str) and len(m) <= STATE_MAX_MASK):
                raise ValueError(f"{name}: {q!r:.40}: expected a queue rx-N and its mask")
            parse_mask(m)  # (ValueError: not a mask)
        out[name] = Saved(d["ifindex"], dict(d["masks"]))
    return out


def read_state(path: str, cookie: int | None) -> tuple[dict[str, Saved], str | None]:
    """The masks before that a state file holds, and None; or ({}, why it is ignored): not a
    regular file, another user's or writable by others, larger than STATE_MAX_BYTES, not one
    (corrupt, another version), another network namespace's.  No file: ({}, None)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return {}, None
    except OSError as e:
        return {}, f"cannot open it: {e.strerror or e}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return {}, "not a regular file"
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return {}, f"owned by uid {st.st_uid} with mode {st.st_mode & 0o7777:04o}: not the daemon's"
        raw = os.read(fd, STATE_MAX_BYTES + 1)
        if len(raw) > STATE_MAX_BYTES:
            return {}, f"larger than the {STATE_MAX_BYTES} bytes a state file may have"
        try:
            return _saved_of(json.loads(raw), cookie), None
        except (ValueError, RecursionError) as e:  # (json's errors are ValueErrors)
            return {}, str(e)
    except OSError as e:
        return {}, f"cannot read it: {e.strerror or e}"
    finally:
        os.close(fd)


def write_state(path: str, saved: dict[str, Saved], cookie: int | None) -> None:
    """``saved`` into the state file at ``path``, atomically (a temporary file beside it, then
    renamed over it: a daemon killed meanwhile leaves the old file or the new, never half of
    one); OSError or ValueError (larger than STATE_MAX_BYTES) when it cannot be."""
    data = json.dumps({"version": STATE_VERSION, "netns": cookie, "pid": os.getpid(),
                       "devices": {n: {"ifindex": sv.ifindex, "masks": sv.masks} for n, sv in sorted(saved.items())}},
                      separators=(",", ":")).encode() + b"\n"
    if len(data) > STATE_MAX_BYTES:
        raise ValueError(f"{len(data)} bytes: more than the {STATE_MAX_BYTES} a state file may have")
    tmp = path + ".tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # (one a daemon killed in the middle left)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- the writer


_NOT_OURS = object()  # RpsManager._recorded of a state file that was ignored

FOREIGN_HINT = ("run the daemon with its namespace's own sysfs on /sys: `ip netns exec NS snatgw run ...` "
                "(nft backend), or for bpf, which needs the host's bpffs kept, the one command of "
                "docs/operations.md \"In a network namespace\"")


class RpsManager:
    """The `rps_cpus` setting applied to the config's devices (thin I/O around ``decide``):
    ``sync(settings)`` at start and on each reload, ``check()`` from the hook check (a device
    recreated), ``restore()`` when the daemon stops.  Never raises: what fails is logged and
    shown by ``as_dict`` (status).  ``state``: the state file of the masks before (None: kept
    in memory only; the daemon gives one when it holds its namespace's owner lock, which makes
    it the file's only writer).  ``sysfs``, ``nameindex`` and ``nametoindex`` are the tests' (a
    fake sysfs in a tmpdir)."""

    def __init__(self, log=None, sysfs: str = SYSFS,
                 nameindex: Callable[[], list] = socket.if_nameindex,
                 nametoindex: Callable[[str], int] = socket.if_nametoindex,
                 state: str | None = None):
        self.log, self.sysfs = log, sysfs
        self.nameindex, self.nametoindex = nameindex, nametoindex
        self.state = state
        self.cookie = netns_cookie() if state else None
        #: what the state file holds (None: not read yet; _NOT_OURS: a file ignored)
        self._recorded: dict[str, Saved] | object | None = None
        self.state_error: str | None = None  # why the state file cannot be written now (status)
        self.saved: dict[str, Saved] = {}
        self.setting = "off"
        self.devices: tuple[str, ...] = ()
        self.mask: str | None = None  # the mask being applied (None: off)
        self.note: str | None = None  # why the mask is not what the setting says (CPUs offline)
        self.refused: str | None = None  # why nothing is written (sysfs of another namespace)
        self.errors: dict[str, str] = {}  # device -> why its mask is not applied
        self.seen: dict[str, int | None] = {}  # device -> ifindex at the last sync (None: absent)
        self._ours_fd = -1  # sysfs/class/net held open once found this namespace's (foreign_sysfs)
        self._ours: tuple[int, int] | None = None  # its (device, inode)

    # ------------------------------------------------------------------ reading
    def _net(self, *parts: str) -> str:
        return os.path.join(self.sysfs, "class/net", *parts)

    def _read(self, name: str) -> DeviceNow | None:
        try:
            with open(self._net(name, "ifindex")) as f:
                idx = int(f.read().strip())
            queues = {}
            for q in os.listdir(self._net(name, "queues")):
                if q.startswith("rx-"):
                    try:
                        with open(self._net(name, "queues", q, "rps_cpus")) as f:
                            queues[q] = f.read().strip()
                    except FileNotFoundError:
                        continue  # a kernel without CONFIG_RPS
            return DeviceNow(idx, queues)
        except (OSError, ValueError):
            return None

    def _ifindex(self, name: str) -> int | None:
        try:
            return self.nametoindex(name)
        except OSError:
            return None

    def foreign_sysfs(self) -> str | None:
        """Why sysfs/class/net is not this network namespace's (None: it is): every device it
        lists, with its ifindex, must be one of this namespace (if_nameindex: netlink), and the
        other way round (its devices: the entries that are directories; the bonding driver adds a
        file, bonding_masters, to every namespace's).  The two listings are not one snapshot: a device created, deleted or
        renamed between them (a PPP or VLAN device made again, a container's veth) differs
        once, so a difference is read again (FOREIGN_READS times) before it counts: another
        namespace's devices differ every time.

        Found this namespace's, sysfs/class/net is held open (_hold_ours): sysfs has one
        superblock per network namespace, and one held keeps its device number, so while the
        path is that very directory (device and inode) it is still ours and is not walked
        again (every device read: ~125-175 ms with 2,000 devices, under the service lock at
        each reload, adm batch and failover until 30 Nov 2026); another mount there is."""
        try:
            st = os.stat(self._net())
            if (st.st_dev, st.st_ino) == self._ours:
                return None
        except OSError:
            pass
        for attempt in range(FOREIGN_READS):
            if attempt:
                time.sleep(FOREIGN_PAUSE)
            why, diff = self._compare_sysfs()
            if why is None:
                self._hold_ours()
            if why is None or not diff:
                return why
        return why

    def _hold_ours(self) -> None:
        """Hold sysfs/class/net open, found this namespace's (foreign_sysfs): its (device,
        inode) then names it for as long as the daemon runs."""
        try:
            fd = os.open(self._net(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        st = os.fstat(fd)
        if self._ours_fd >= 0:
            os.close(self._ours_fd)
        self._ours_fd, self._ours = fd, (st.st_dev, st.st_ino)

    def _compare_sysfs(self) -> tuple[str | None, bool]:
        """One comparison for foreign_sysfs: (why not ours or None, whether it was a difference
        of the listings, worth reading again, rather than a failure to list)."""
        try:
            mine = {name: int(idx) for idx, name in self.nameindex()}
        except OSError as e:
            return f"cannot list this namespace's devices: {e}", False
        shown: dict[str, int] = {}
        try:
            for name in os.listdir(self._net()):
                if not os.path.isdir(self._net(name)):  # a file of the class, no device: bonding_masters
                    continue
                try:
                    with open(self._net(name, "ifindex")) as f:
                        shown[name] = int(f.read().strip())
                except (OSError, ValueError):
                    shown[name] = -1
        except OSError as e:
            return f"cannot list {self._net()}: {e.strerror or e}", False
        if shown == mine:
            return None, False
        diff = sorted(set(shown.items()) ^ set(mine.items()))
        ex = ", ".join(f"{n} (ifindex {i})" for n, i in diff[:3])
        return (f"{self._net()} shows the devices of another network namespace (they differ from this "
                f"one's: {ex}{', ...' if len(diff) > 3 else ''}): rps_cpus is not applied, nothing is written; "
                + FOREIGN_HINT), True

    # ------------------------------------------------------------------ applying
    def sync(self, settings) -> list[str]:
        """Apply ``settings.rps_cpus`` to ``settings``' inside and outside devices (start and
        reload), putting back what a device that left (or every one, for off) had; returns the
        events (also logged at info)."""
        self.setting = getattr(settings, "rps_cpus", "off")
        self.devices = tuple(settings.inside) + tuple(settings.outside)
        self.note, want = None, None
        if self.setting != "off":
            try:
                cpus, self.note = wanted_cpus(self.setting, online_cpus(self.sysfs))
            except (OSError, ValueError) as e:
                cpus, self.note = None, f"cannot read the online CPUs: {e}"
            if self.note and self.log:
                self.log.warning("rps_cpus", warning=self.note)
            want = format_mask(cpus, possible_cpus(self.sysfs)) if cpus else None
        self.mask = want
        return self._guarded(want)

    def _guarded(self, want: str | None) -> list[str]:
        """_run, whose failure (a bug, an error no branch foresaw) is logged, never raised: a
        start, reload, hook check or stop never fails for the steering."""
        try:
            return self._run(want)
        except Exception as e:  # noqa: BLE001 - a performance setting must not cost the datapath
            if self.log:
                self.log.warning("rps_failed", error=repr(e))
            return []

    def _load(self) -> None:
        """The state file's masks before, once (the first sync): a daemon before this one that
        did not stop (killed) left them there; they are what its devices' queues get back.  A
        file that is not one is named in a warning and ignored (replaced at the next write)."""
        saved, why = read_state(self.state, self.cookie)
        if why is not None:
            if self.log:
                self.log.warning("rps_state_ignored", file=self.state, error=why)
            self._recorded = _NOT_OURS  # (never equal to what we keep: the next record replaces it)
            return
        self._recorded = dict(saved)
        self.saved = {**saved, **self.saved}
        if saved and self.log:
            self.log.info("rps_state", file=self.state, devices=",".join(sorted(saved)),
                          msg="the masks before of a daemon that did not stop (killed?): put back as it would have")

    def _record(self, saved: dict[str, Saved]) -> None:
        """The state file holding ``saved`` (removed when empty), if it does not already; a
        failure is logged once and shown in status, and the masks are still written (kept in
        memory only then, as before 30 Nov 2026: a performance setting does not fail for it)."""
        if self.state is None or saved == self._recorded:
            return
        try:
            if saved:
                write_state(self.state, saved, self.cookie)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.state)
        except (OSError, ValueError) as e:
            why = f"cannot {'write' if saved else 'remove'} {self.state}: {getattr(e, 'strerror', None) or e}"
            if why != self.state_error and self.log:
                self.log.warning("rps_state_failed", error=why,
                                 msg="the masks before are kept in memory only: a daemon killed leaves its own")
            self.state_error = why
            return
        self._recorded, self.state_error = dict(saved), None

    def _run(self, want: str | None) -> list[str]:
        if self.state is not None and self._recorded is None:
            self._load()
        if want is None and not self.saved:  # off: no read, no write
            self.errors, self.refused, self.seen = {}, None, {}
            return []
        names = set(self.devices) | set(self.saved)
        self.seen = {n: self._ifindex(n) for n in self.devices}
        why = self.foreign_sysfs()
        if why is not None:
            if why != self.refused and self.log:
                self.log.warning("rps_not_applied", error=why)
            self.refused = why
            return []
        self.refused = None
        now = {n: self._read(n) for n in names}
        # a device whose sysfs ifindex is not the one of its name here (renamed between the two
        # reads) is treated as absent: written never
        now = {n: (d if d is not None and d.ifindex == self._ifindex(n) else None) for n, d in now.items()}
        plan = decide(want, self.devices, now, self.saved)
        # the state file first: what we put back stays there until it is back, what we are
        # about to change is there before we change it
        self._record({**self.saved, **plan.saved})
        errors: dict[str, str] = {}
        for dev, q, mask in plan.writes:
            try:
                with open(self._net(dev, "queues", q, "rps_cpus"), "w") as f:
                    f.write(mask + "\n")
            except OSError as e:
                errors[dev] = f"{q}: cannot write rps_cpus {mask}: {e.strerror or e}"
                if self.log:
                    self.log.warning("rps_write_failed", device=dev, queue=q, mask=mask, error=e.strerror or str(e))
        self.saved = plan.saved
        self._record(self.saved)
        for n in self.devices:
            d = now.get(n)
            if d is None and want is not None:
                errors.setdefault(n, "device absent")
            elif d is not None and want is not None and not d.queues:
                errors.setdefault(n, "no rx queue with rps_cpus (a kernel without CONFIG_RPS?)")
        self.errors = errors
        for ev in plan.events:
            if self.log:
                self.log.info("rps_cpus", change=ev)
        return plan.events

    def check(self) -> list[str]:
        """The hook check's part: a configured device whose ifindex changed since the last sync
        (recreated under its name; or one that came back) gets the mask again.  Cheap when
        nothing changed: one if_nametoindex per device."""
        if self.mask is None and not self.saved:
            return []
        if all(self._ifindex(n) == idx for n, idx in self.seen.items()):
            return []
        return self._guarded(self.mask)

    def restore(self) -> list[str]:
        """Put back every saved mask (the daemon stops); never raises."""
        self.mask = None
        try:
            return self._guarded(None)
        finally:
            if self._ours_fd >= 0:  # (a later sync walks again)
                os.close(self._ours_fd)
                self._ours_fd, self._ours = -1, None

    # ------------------------------------------------------------------ status
    def as_dict(self) -> dict:
        """For `status`: the setting, the mask written, and per device each queue's mask as read
        now with the one it had before (or why it has none of ours)."""
        devices = {}
        if self.setting != "off" or self.saved:
            for n in self.devices:
                d = self._read(n) if self.refused is None else None
                sv = self.saved.get(n)
                devices[n] = {"queues": dict(sorted(d.queues.items(), key=lambda kv: _queue_order(kv[0])))
                              if d else {}, "previous": dict(sv.masks) if sv else {},
                              "error": self.errors.get(n) if self.refused is None else "not applied"}
        return {"setting": self.setting, "mask": self.mask, "note": self.note, "refused": self.refused,
                "devices": devices, "state": self.state, "state_error": self.state_error}


__all__ = ["RpsManager", "decide", "parse_cpulist", "format_cpulist", "format_mask", "parse_mask", "online_cpus",
           "MAX_CPUS"]
