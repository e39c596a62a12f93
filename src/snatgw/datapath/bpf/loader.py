"""Loading the datapath object, pinning and re-adopting its maps, attaching the three TC
programs (and detaching only our own filters), plus ``netns()`` to act inside a named
network namespace from the calling thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ... import layout as L
from ...errors import BackendError, MissingDeviceError
from ..netns import enter as netns  # noqa: F401  (tests and testrun use it from here)
from . import carry
from . import libbpf as B
from .maps import DatapathMaps, map_specs, monotonic_ns

log = logging.getLogger("snatgw.bpf.loader")

BPFFS = "/sys/fs/bpf"
TC_HANDLE = 0x534E  # "SN": our filters' handle and priority on every hook we use
TC_PRIORITY = 0x534E

PROG_INSIDE = "snat_inside"
PROG_OUTSIDE = "snat_outside"
PROG_EGRESS = "snat_egress"
PROG_RECIRC = "snat_recirc"


# --------------------------------------------------------------------------- namespaces

def ifindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise MissingDeviceError(name) from None


# --------------------------------------------------------------------------- bpffs and pins


def ensure_bpffs(pin_dir: str) -> bool:
    """Mount bpffs at /sys/fs/bpf when it is absent (pins live there), then create pin_dir.
    True when it mounted one (see private_mount_ns)."""
    mounted = False
    if pin_dir.startswith(BPFFS + "/") and not _is_bpffs(BPFFS):
        log.info("mounting bpffs at %s", BPFFS)
        r = subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], capture_output=True, text=True)
        if r.returncode != 0:
            raise BackendError(f"cannot mount bpffs at {BPFFS}: {r.stderr.strip()}")
        mounted = True
    fs = fs_type(pin_dir)
    if fs != "bpf":  # the kernel pins maps on bpffs only: EPERM at the first pin, naming no setting
        raise BackendError(f"{pin_dir} is on a {fs or 'unknown'} filesystem; expected a directory on a bpf "
                           f"filesystem (bpffs), such as {BPFFS}/snatgw (maps are pinned only there)")
    try:
        os.makedirs(pin_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise BackendError(f"{pin_dir}: cannot create the pin directory: {e.strerror}") from None
    check_pin_dir(pin_dir)
    return mounted


def private_mount_ns() -> bool:
    """Whether this process's mount namespace is not init's or not its parent's (`ip netns exec`
    makes one per command, with a /sys of its own and no bpffs on it, and execs the command in
    it): a bpffs mounted here, and the pins in it, are seen by no other process and go when the
    namespace does.  (init's may not be readable, in a container: the parent's then tells.)"""
    try:
        mine = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return False
    for pid in (1, os.getppid()):
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") != mine:
                return True
        except OSError:
            continue
    return False


def check_pin_dir(pin_dir: str) -> None:
    """The pin directory holds the session table and the rules: whoever can write it can swap
    a map under our name.  Refuse one that is not a real directory owned by us, or that
    others may write (made beforehand by another user, or with a loose mode)."""
    try:
        st = os.lstat(pin_dir)
    except OSError as e:
        raise BackendError(f"{pin_dir}: cannot check the pin directory: {e.strerror}") from None
    me = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise BackendError(f"{pin_dir}: the pin directory is not a directory (a symlink?); "
                           "refusing to use it")
    if st.st_uid != me:
        raise BackendError(f"{pin_dir}: the pin directory belongs to uid {st.st_uid}, not to us (uid {me}); "
                           "refusing to trust maps another user could have placed there: remove it, or "
                           f"chown {me} it if it is yours")
    if st.st_mode & 0o022:
        raise BackendError(f"{pin_dir}: the pin directory has mode {stat.S_IMODE(st.st_mode):04o}, "
                           "writable by others; refusing to trust it: chmod 0700 it (or remove it)")


def fs_type(path: str) -> str | None:
    """The type of the filesystem ``path`` is (or would be made) on: that of the last mount of
    /proc/self/mounts whose mount point is the longest prefix of its real path."""
    real, best, kind = os.path.realpath(path), -1, None
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3:
                continue
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])  # a space is \040
            if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= best:
                best, kind = len(mp), fields[2]
    return kind


def _is_bpffs(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1:3] == [path, "bpf"] for line in f if len(line.split()) > 2)


#: the name suffix a replacing map is pinned under until it is renamed over the old pin (bpffs
#: refuses a '.' in a name)
REPLACED_SUFFIX = "_replacing"
#: the old map of a table being carried over, pinned beside the new one from the rename until
#: the copies after it are done (finish_carry): a daemon killed meanwhile leaves it, and the
#: next start copies what it holds that the new table lacks (Loader._recover_carried)
CARRIED_SUFFIX = "_carried_from"


def unpin(pin_dir: str) -> None:
    """Remove our pins and the directory (only our map names; anything else stays)."""
    for name in map_specs():
        for pin in (name, name + REPLACED_SUFFIX, name + CARRIED_SUFFIX):  # the others: a start that died replacing it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(pin_dir, pin))
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(pin_dir)


#: maps a new layout may change without touching a session.  When a pinned one differs from
#: this snatgw's in any way (an upgrade, or a rollback to this version), a new one replaces it
#: instead of the start being refused, so a restart keeping state works across the change (edge
#: invariant 4).  The value says what goes with the old map.  The config maps lose nothing:
#: start() writes every one of them before any program is attached, and the programs attached
#: until then keep the old maps.  Sessions and the maps that must agree with them (snat_ct,
#: snat_eim, the live counts) and the audit ring are never replaced: the sessions and their mappings
#: are carried over to new maps when a conversion covers their other layout (carry.CARRIED: today
#: another size, a changed max_sessions), any other layout is refused, as are the live counts' and
#: the audit ring's.
REPLACEABLE: dict[str, str] = {
    **dict.fromkeys((L.MAP_REASONS, L.MAP_ALLOC_CNT, L.MAP_AUDIT_CNT, L.MAP_RULE_STATS),
                    "its counts start again from zero"),
    **dict.fromkeys((L.MAP_RULES, L.MAP_RULE_SLOTS, L.MAP_CONFIG, L.MAP_IFACES, L.MAP_FROM_NETS,
                     L.MAP_INSIDE_ADDRS, L.MAP_GW_MARKS), "written afresh from the config before the programs are attached"),
    L.MAP_REFUSED: "refusal markers forgotten: a refused flow's next packet searches once more",
    L.MAP_SPILL_MEMO: "spill memos forgotten: the next search on a full address tries it again",
    L.MAP_FRAGS: "remembered fragments forgotten: the rest of a datagram in flight is passed or dropped as unmatched",
    L.MAP_WALK: "walks are numbered again from 1 (a session stamped by an old walk is counted by the next one)",
}


def _shape(m) -> str:
    return (f"{B.MAP_TYPE_NAMES.get(m.type, m.type)}, key {m.key_size} B, value {m.value_size} B, "
            f"{m.max_entries} entries")


def _replaced(spec, info: B.MapInfo) -> str | None:
    """What is lost when pinned map ``info`` is replaced by ``spec``'s (REPLACEABLE), or None:
    it matches (adopt it) or it may not be replaced (spec.check refuses it)."""
    if spec.name not in REPLACEABLE:
        return None
    if (info.type, info.key_size, info.value_size, info.max_entries) == (
            spec.type, spec.key_size, spec.value_size, spec.max_entries):
        return None
    return REPLACEABLE[spec.name]


def _carried(spec, info: B.MapInfo) -> bool:
    """Whether pinned map ``info`` of another layout than ``spec``'s is carried over to a new
    one (carry.CARRIED covers its difference) rather than adopted or refused."""
    how = carry.CARRIED.get(spec.name)
    if how is None or (info.type, info.key_size, info.value_size, info.max_entries) == (
            spec.type, spec.key_size, spec.value_size, spec.max_entries):
        return False
    return how.covers(info, spec)


def _room(name: str, old: B.Map, spec, path: str) -> tuple[int, int]:
    """(entries, sessions) of pinned map ``old`` that is to be carried over to ``spec``'s; a
    BackendError when they do not fit in it (the start is refused, nothing is changed)."""
    if name == L.MAP_CT:
        n, sessions = carry.sessions_of(old)
        per, what = 2, "entries (2 a session)"
    else:
        n = sessions = old.count()
        per, what = L.EIM_PER_SESSION, f"endpoint-independent mappings ({L.EIM_PER_SESSION} a session)"
    if n > spec.max_entries:
        need = -(-n // per)
        raise BackendError(
            f"{path}: the running datapath's table holds {n} {what}"
            + (f", {sessions} live sessions" if name == L.MAP_CT else "")
            + f"; max_sessions {spec.max_entries // per} makes room for {spec.max_entries} only. Nothing was "
            f"changed (the running datapath goes on translating with its table of {old.max_entries // per} "
            f"sessions). Flush sessions (`snatgw flush`), wait for them to expire, or give max_sessions "
            f"{need} or more"
        )
    return n, sessions


# --------------------------------------------------------------------------- attachments


@dataclass(frozen=True)
class Attachment:
    ifname: str
    ifindex: int
    point: int  # B.BPF_TC_INGRESS / B.BPF_TC_EGRESS
    prog: str
    prog_id: int
    created_hook: bool  # we created the clsact qdisc (so we may remove it when empty)

    def __str__(self) -> str:
        where = "ingress" if self.point == B.BPF_TC_INGRESS else "egress"
        return f"{self.prog} on {self.ifname} {where} (prog id {self.prog_id})"


def _hook_empty(ifname: str) -> bool:
    """True when neither clsact point of ``ifname`` carries any filter (ours are gone)."""
    for where in ("ingress", "egress"):
        r = subprocess.run(["tc", "-j", "filter", "show", "dev", ifname, where],
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            return False
        try:
            if json.loads(r.stdout or "[]"):
                return False
        except json.JSONDecodeError:
            return False
    return True


class Loader:
    """Owns one loaded datapath object: ``load()`` then ``attach()``; ``detach()``/``stop()``.

    ``obj_path``: a compiled object (default: build.compile(defines), bpf-C's build)."""

    def __init__(self, pin_dir: str = L.PIN_DIR, max_sessions: int = L.MAX_SESSIONS,
                 obj_path: str | os.PathLike | None = None, defines: dict | None = None):  # fmt: skip
        self.pin_dir, self.max_sessions = pin_dir, max_sessions
        self.obj_path, self.defines = obj_path, defines or {}
        self.obj: B.BpfObject | None = None
        self.maps: DatapathMaps | None = None
        self.reused: list[str] = []  # map names adopted from pins
        self.attachments: list[Attachment] = []
        #: the devices the last check() found renamed away and took our programs off
        self.left: list[str] = []
        #: our hooks on devices renamed away that check() could not take our programs off:
        #: (ifindex, point) -> (the failure's kind, device name, message); logged once per
        #: device and kind until that changes (the removal succeeding, the device gone, an
        #: attach: start, reload), every failed try counted in ``leave_failures`` (status)
        self.leave_failed: dict[tuple[int, int], tuple[str, str, str]] = {}
        self.leave_failures = 0
        #: what the last load() changed in the pin dir, until commit(): pins it created where
        #: none was, and the maps whose pins it replaced (another layout: path -> an fd of the
        #: old map), so that rollback() can put the pin dir back as it found it
        self.created: list[str] = []
        self.displaced: dict[str, int] = {}
        #: the pinned maps of another layout being carried over (carry.py): name -> the old map;
        #: their new ones pinned under REPLACED_SUFFIX until finish_carry() renames them
        self.carrying: dict[str, B.Map] = {}
        self._staged: dict[str, tuple[str, str]] = {}  # name -> (staging pin, final pin)
        self._left: list[str] = []  # the old maps' CARRIED_SUFFIX pins while finish_carry copies
        self._recovered: list[str] = []  # a killed start's CARRIED_SUFFIX pins copied here: removed at commit()
        self._since = 0  # monotonic_ns() when the first copy began (carry.copy_new)
        self._carry_t0 = 0.0
        #: while carrying: our filters as they were before attach() replaced any,
        #: (ifindex, point) -> (prog id, an fd of that program), for rollback() to put back
        self._before: dict[tuple[int, int], tuple[int, int]] | None = None
        #: what the last finish_carry() did (for the log and status), else None
        self.carried: dict | None = None

    @property
    def adopted(self) -> bool:
        """The start found a running datapath's maps: adopted as they are, or carried over (being
        carried, or carried by finish_carry() already: until commit() the old ones are kept)."""
        return bool(self.reused or self.carrying or self.carried)

    # ------------------------------------------------------------- load

    def _object_path(self) -> Path:
        if self.obj_path:
            return Path(self.obj_path)
        try:
            from . import build
        except ImportError as e:  # pragma: no cover - until bpf-C's build exists
            raise BackendError(f"no compiled datapath object and no build module: {e}") from None
        return Path(build.compile(self.defines))

    def load(self) -> DatapathMaps:
        """Open and load the object; maps pinned under pin_dir are reused (after a check of
        type and sizes), the others are created and pinned.  Nothing is attached yet."""
        if self.max_sessions < 1:
            raise BackendError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.max_sessions > L.MAX_BPF_SESSIONS:  # libbpf said only "bpf_object__load: EINVAL"
            raise BackendError(f"max_sessions {self.max_sessions:,}: the bpf backend's session table holds at "
                               f"most {L.MAX_BPF_SESSIONS:,} (a kernel hash map's limit, two entries a "
                               "session); give a smaller max_sessions, or use backend nft")
        specs = map_specs(self.max_sessions)
        ensure_bpffs(self.pin_dir)
        obj = B.BpfObject.open(self._object_path())
        pinned_fds: list[int] = []
        made: list[str] = []  # pins this call created (removed again on failure)
        replaced: list[str] = []  # pinned maps of another layout (_replaced)
        try:
            names = set(obj.map_names())
            missing = [n for n in specs if n not in names]
            if missing:
                raise BackendError(f"{obj.path}: object lacks maps {', '.join(missing)}")
            for name, spec in specs.items():
                obj.set_max_entries(name, spec.max_entries)
                path = os.path.join(self.pin_dir, name)
                if os.path.exists(path):
                    fd = B.obj_get(path)
                    pinned_fds.append(fd)
                    info = B.map_info(fd)
                    if _carried(spec, info):
                        old = B.Map.from_fd(os.dup(fd), owned=True)
                        self.carrying[name] = old
                        n, _ = _room(name, old, spec, path)
                        log.info("%s: pinned with room for %d entries, this start's for %d: its %d entries are "
                                 "carried over to a new map", path, info.max_entries, spec.max_entries, n)  # fmt: skip
                        replaced.append(path)
                        self.displaced[path] = os.dup(fd)  # rollback() pins it back
                        continue
                    lost = _replaced(spec, info)
                    if lost:
                        log.warning("%s: pinned in another layout (%s), this snatgw's is %s: a new one replaces "
                                    "it (%s; sessions are kept)", path, _shape(info), _shape(spec), lost)
                        replaced.append(path)
                        self.displaced[path] = os.dup(fd)  # rollback() pins it back
                        continue
                    spec.check(info, path)
                    obj.reuse_fd(name, fd)
                    self.reused.append(name)
            obj.load()
            # a replaced map's new one is pinned beside the old (REPLACED_SUFFIX), and renamed
            # over it only once every pin is made: a pin that fails leaves the old pins as they
            # were.  The old map lives on with the programs attached until ours replace them.
            staged: list[tuple[str, str]] = []
            for name in specs:
                if name not in self.reused:
                    path = os.path.join(self.pin_dir, name)
                    if path in replaced:
                        path, final = path + REPLACED_SUFFIX, path
                        with contextlib.suppress(FileNotFoundError):  # a crashed start's
                            os.unlink(path)
                        if name in self.carrying:  # renamed once the programs use it (finish_carry)
                            self._staged[name] = (path, final)
                        else:
                            staged.append((path, final))
                    B.obj_pin(obj.map_fd(name), path)
                    made.append(path)
            if self.carrying:  # every entry over, before anything of this start uses the new maps (and
                # before the renames below: a copy that fails leaves the pins as they were)
                self._carry_t0 = time.monotonic()
                self._since = monotonic_ns()
                self.carried = {"first": {n: carry.copy_all(self.carrying[n], obj.map(n), carry.CARRIED[n])
                                          for n in carry.ORDER if n in self.carrying}}  # fmt: skip
            self._recover_carried(obj)
            for path, final in staged:
                os.replace(path, final)  # bpffs renames in place: the name is never missing
                made.remove(path)
        except BaseException:
            obj.close()
            self.reused = []
            self._close_displaced()
            self._close_carrying()
            for path in made:  # leave what was there before, and nothing half-made
                with contextlib.suppress(OSError):
                    os.unlink(path)
            with contextlib.suppress(OSError):
                os.rmdir(self.pin_dir)  # only if empty
            raise
        finally:
            for fd in pinned_fds:  # reuse_fd dup()s the fd
                os.close(fd)
        self.obj = obj
        self.created = list(made)
        self.maps = DatapathMaps({n: obj.map(n) for n in specs})
        # while the old table is carried over, what the start removes goes from both (a later
        # pass copies what the new table lacks)
        self.maps.shadow_ct = self.carrying.get(L.MAP_CT)
        if self.reused:
            log.info("adopted pinned maps from %s: %s", self.pin_dir, ", ".join(self.reused))
        return self.maps

    def commit(self) -> None:
        """The start that loaded succeeded: its pins are the datapath's now (rollback() no more)."""
        if self.carrying:
            raise BackendError("commit before finish_carry: the old table is still pinned")
        for path in self._recovered:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._recovered = []
        self.created = []
        self._close_displaced()
        self._close_before()

    # ------------------------------------------------------------- carrying the table over

    def finish_carry(self, grace: float = carry.GRACE_SECONDS) -> dict | None:
        """After attach(), when load() is carrying maps over (another max_sessions): copy what
        the old maps gained since the first copy (the old programs went on making sessions on
        the hooks not yet replaced), wait ``grace`` (carry.GRACE_SECONDS: runs of the old
        programs begun before their replace end), copy once more.  The new pins take the old
        names first (every hook uses the new maps), the old maps pinned beside them
        (CARRIED_SUFFIX) until the copies are done: a daemon killed meanwhile loses neither
        table (the next start copies that one in: _recover_carried); the old maps go with
        their last fd (commit()).  Returns what it did
        (also ``carried``): per map the old and new size and the entries each pass copied, and
        the seconds since the first copy began; None when nothing was carried."""
        if not self.carrying:
            return None
        if self.obj is None or self._before is None:  # (attach() takes the hooks' programs first)
            raise BackendError("finish_carry before attach")
        # every hook runs the new programs: their maps take the names now, the old ones pinned
        # beside them until the copies are done (a daemon killed during them: the next start
        # has the sessions the new programs made, and copies what the old ones gained)
        for name in carry.ORDER:
            if name in self._staged:
                staging, final = self._staged.pop(name)
                left = final + CARRIED_SUFFIX
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(left)
                B.obj_pin(self.carrying[name].fd, left)
                self._left.append(left)
                os.replace(staging, final)  # in place: the name is never missing
                self.created.remove(staging)
        passes: list[dict] = []
        since = self._since
        for i in range(2):
            if i:
                time.sleep(grace)
            began = monotonic_ns()
            got = {}
            for name in carry.ORDER:
                if name in self.carrying:
                    r = carry.copy_new(self.carrying[name], self.obj.map(name), carry.CARRIED[name], since)
                    got[name] = {"looked": r.looked, "copied": r.copied, "full": r.full, "updated": r.updated}
            passes.append(got)
            since = began
        self._unpin_left()
        sizes = {name: (old.max_entries, self.obj.map(name).max_entries) for name, old in self.carrying.items()}
        first = self.carried["first"] if self.carried else {}
        self.carried = {
            "maps": {name: {"from": a, "to": b, "first": first.get(name, 0),
                            "after_attach": passes[0].get(name), "after_grace": passes[1].get(name)}
                     for name, (a, b) in sizes.items()},
            "grace_seconds": grace,
            "seconds": round(time.monotonic() - self._carry_t0, 4),
        }  # fmt: skip
        if L.MAP_CT in sizes:
            self.carried["sessions_from"], self.carried["sessions_to"] = (n // 2 for n in sizes[L.MAP_CT])
        self._close_carrying()
        if self.maps is not None:
            self.maps.shadow_ct = None
        return self.carried

    def _unpin_left(self) -> None:
        for path in self._left:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._left = []

    def _recover_carried(self, obj) -> None:
        """A start killed while it copied a carried table after its rename left the old map
        pinned beside the new (CARRIED_SUFFIX): what it holds that this start's map lacks (or
        holds older) is copied in (carry.copy_new over every entry), before anything of this
        start runs; the pin goes at commit().  Logged; a failure leaves the pin (tried again
        at the next start) and the start goes on."""
        for name in carry.ORDER:
            path = os.path.join(self.pin_dir, name + CARRIED_SUFFIX)
            if not os.path.exists(path):
                continue
            try:
                left = B.Map.open_pinned(path)
                try:
                    new = obj.map(name)
                    if (left.key_size, left.value_size) != (new.key_size, new.value_size):
                        log.warning("%s: left by a start killed carrying the table over, in another layout: removed, "
                                    "not copied", path)  # fmt: skip
                    else:
                        r = carry.copy_new(left, new, carry.CARRIED[name], 0)
                        log.warning("%s: left by a start killed while it carried the table over: %d entries copied, "
                                    "%d updated, %d without room", path, r.copied, r.updated, r.full)  # fmt: skip
                finally:
                    left.close()
            except (BackendError, OSError) as e:
                log.warning("%s: left by a start killed while it carried the table over, cannot be copied: %s "
                            "(tried again at the next start)", path, e)
                continue
            self._recovered.append(path)

    def _close_carrying(self) -> None:
        for m in self.carrying.values():
            m.close()
        self.carrying = {}
        self._staged = {}
        if self.maps is not None:
            self.maps.shadow_ct = None

    def _close_before(self) -> None:
        for _, fd in (self._before or {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._before = None

    def _snapshot_hooks(self) -> None:
        """Our filters in this namespace and an fd of each one's program (attach(), carrying:
        rollback() puts them back)."""
        before: dict[tuple[int, int], tuple[int, int]] = {}
        try:
            for idx, _ in socket.if_nameindex():
                for point in (B.BPF_TC_INGRESS, B.BPF_TC_EGRESS):
                    pid = _query(idx, point)
                    if pid is not None:
                        before[(idx, point)] = (pid, B.prog_fd_by_id(pid))
        except BaseException:
            for _, fd in before.values():
                os.close(fd)
            raise
        self._before = before

    def _restore_programs(self) -> None:
        """Put the programs of _snapshot_hooks back on their hooks, and take ours off the hooks
        that had none: a start that fails while carrying the table over leaves the datapath on
        the old table whole, never split over two.  Never raises (logged)."""
        for (idx, point), (pid, fd) in self._before.items():
            try:
                if _query(idx, point) != pid:
                    B.tc_hook_create(idx, B.BPF_TC_INGRESS)
                    B.tc_attach(idx, point, fd, TC_HANDLE, TC_PRIORITY, replace=True)
                    log.info("put back the running datapath's program (id %d) on ifindex %d %s", pid, idx,
                             "ingress" if point == B.BPF_TC_INGRESS else "egress")  # fmt: skip
            except (BackendError, OSError) as e:
                log.warning("cannot put the running datapath's program (id %d) back on ifindex %d: %s", pid, idx, e)
        try:
            for what in detach_ours(keep=set(self._before)):
                log.info("removed %s (put on by the failed start)", what)
        except (BackendError, OSError) as e:
            log.warning("cannot remove the programs the failed start attached: %s", e)
        self.attachments = []

    def rollback(self) -> None:
        """Undo what load() changed in the pin dir (a start that fails after it, adopting a
        running datapath): the pins it created are removed, the ones it replaced point at the
        old maps again (the maps the programs still attached use).  Pins of adopted maps are
        never touched.  Carrying the table over (another max_sessions), the programs attach()
        replaced are put back first, and the new table's pins go: the datapath is the old one,
        whole.  Never raises: what cannot be put back is logged."""
        if self._before is not None:
            self._restore_programs()
        self._unpin_left()  # (the old maps go back under their names below)
        self._recovered = []  # (kept for the next start)
        self._close_carrying()
        self._close_before()
        for path in self.created:
            with contextlib.suppress(FileNotFoundError):
                try:
                    os.unlink(path)
                except OSError as e:
                    log.warning("%s: cannot remove the pin of a failed start: %s", path, e)
        self.created = []
        for path, fd in self.displaced.items():
            staging = path + REPLACED_SUFFIX
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staging)
                B.obj_pin(fd, staging)
                os.replace(staging, path)  # in place: the name is never missing
            except (OSError, BackendError) as e:
                log.warning("%s: cannot pin the replaced map back after a failed start: %s", path, e)
        self._close_displaced()

    def _close_displaced(self) -> None:
        for fd in self.displaced.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.displaced = {}

    # ------------------------------------------------------------- attach

    def attach(self, inside: list[str] | tuple[str, ...], outside: list[str] | tuple[str, ...],
               recirc: str | None = None) -> None:
        """snat_inside on inside ingress; snat_outside on outside ingress; snat_egress on
        outside egress; snat_recirc on the ingress of ``recirc`` (the recirculation device,
        where held fragments come back).  An existing filter of ours (handle/priority
        TC_HANDLE/TC_PRIORITY, left by a previous daemon or a previous attach) is replaced in
        place (one netlink request: no packet meets the hook without a program), then our
        filters on every other hook of the namespace (devices no longer inside/outside) are removed.

        On a failure, filters this call newly created are removed again; replaced ones keep
        the new program (it works on the same pinned maps): a datapath that was translating
        never stops translating because an attach failed."""
        if self.obj is None:
            raise BackendError("attach before load")
        overlap = set(inside) & set(outside)
        if overlap:
            raise BackendError(f"interface(s) {', '.join(sorted(overlap))} both inside and outside")
        # Uplinks first, inside devices last.  Taking over from the nft datapath, a flow is
        # half ours while the hooks go on one by one: if the inside hooks came first, our
        # redirected packets would bypass conntrack, and a reply still routed by the kernel
        # would acknowledge data conntrack never saw, be judged INVALID, miss the de-NAT and
        # reach the pool address's own stack, which resets the connection.  This way round the
        # half-seen packet is an inside one, which nft's guard drops and TCP resends.
        plan = [(o, B.BPF_TC_EGRESS, PROG_EGRESS) for o in outside]
        plan += [(o, B.BPF_TC_INGRESS, PROG_OUTSIDE) for o in outside]
        plan += [(i, B.BPF_TC_INGRESS, PROG_INSIDE) for i in inside]
        if recirc:
            plan.append((recirc, B.BPF_TC_INGRESS, PROG_RECIRC))
        idx = {name: ifindex(name) for name, _, _ in plan}  # every device first: fail early
        fds = {p: self.obj.prog_fd(p) for p in {p for _, _, p in plan}}
        if self.carrying and self._before is None:
            self._snapshot_hooks()
        created: dict[str, bool] = {a.ifname: a.created_hook for a in self.attachments}
        done: list[tuple[Attachment, bool]] = []  # (attachment, replaced an existing filter)
        try:
            for name, point, prog in plan:
                if name not in created:
                    created[name] = B.tc_hook_create(idx[name], B.BPF_TC_INGRESS)
                existed = _query(idx[name], point) is not None
                _, _, pid = B.tc_attach(idx[name], point, fds[prog], TC_HANDLE, TC_PRIORITY, replace=True)
                # a hook that carried our filter is one a previous daemon made: ours to remove
                created[name] = created[name] or existed
                a = Attachment(name, idx[name], point, prog, pid, created[name])
                done.append((a, existed))
                log.info("%s %s", "replaced" if existed else "attached", a)
        except BaseException:
            for a, existed in reversed(done):
                if not existed:
                    with contextlib.suppress(BackendError):
                        B.tc_detach(a.ifindex, a.point, TC_HANDLE, TC_PRIORITY)
            raise
        self.attachments = [a for a, _ in done]
        self.leave_failed = {}  # (the renamed devices' hooks are no longer ours to follow: said again if still failing)
        keep = {(a.ifindex, a.point) for a in self.attachments}
        for what in detach_ours(keep=keep):
            log.info("removed %s (no longer inside/outside)", what)

    def check(self) -> list[str]:
        """Restore what vanished: each attachment whose filter is gone (`tc filter del`,
        `tc qdisc del dev X clsact`) or runs another program is attached again.  Returns what
        was restored (empty when all is in place).  Cheap: one netlink query per hook."""
        self.left = []
        if self.obj is None:
            return []
        restored = []
        fixed: list[Attachment] = []
        for a in self.attachments:
            try:
                idx = socket.if_nametoindex(a.ifname)
            except OSError:  # the device is gone (or renamed): nothing to attach to until it returns
                idx = None
            if idx != a.ifindex:
                self._leave_renamed(a)
            if idx is None:
                fixed.append(a)
                continue
            pid = _query(idx, a.point) if idx == a.ifindex else None
            if pid == a.prog_id:
                fixed.append(a)
                continue
            made = B.tc_hook_create(idx, B.BPF_TC_INGRESS)
            _, _, pid = B.tc_attach(idx, a.point, self.obj.prog_fd(a.prog), TC_HANDLE, TC_PRIORITY,
                                    replace=True)  # fmt: skip
            b = Attachment(a.ifname, idx, a.point, a.prog, pid, a.created_hook or made)
            fixed.append(b)
            restored.append(str(b))
        self.attachments = fixed
        hooks = {(a.ifindex, a.point) for a in fixed}  # (a failure on a hook no longer tried is not failing now)
        self.leave_failed = {k: v for k, v in self.leave_failed.items() if k in hooks}
        return restored

    def _leave_renamed(self, a: Attachment) -> None:
        """Take our filter off ``a``'s device when that was renamed away (``ip link set lan40
        name X``): it is no longer inside or outside, as the nft backend, which names devices,
        sees it at once; until 30 Nov 2026 it kept our programs (translating a device the
        config does not name) until a restart.  Only our program on that very hook, and not on
        a device that took another of our names: an ifindex that now names an unrelated device
        is left alone.  Logged; never raises."""
        hook = (a.ifindex, a.point)
        try:
            name = socket.if_indextoname(a.ifindex)
        except OSError:
            self.leave_failed.pop(hook, None)
            return  # gone with its device
        try:
            if name in {x.ifname for x in self.attachments} or _query(a.ifindex, a.point) != a.prog_id:
                self.leave_failed.pop(hook, None)
                return  # (a device of ours under another of our names, two swapped: check() attaches it)
            B.tc_detach(a.ifindex, a.point, TC_HANDLE, TC_PRIORITY)
            if a.created_hook and _hook_empty(name):
                B.tc_hook_destroy(a.ifindex, B.BPF_TC_INGRESS | B.BPF_TC_EGRESS)
        except (BackendError, B.LibbpfError) as e:
            # tried again every tick: said once per device and kind of failure, not every tick
            self.leave_failures += 1
            kind = errno.errorcode.get(getattr(e, "errno", None) or 0, type(e).__name__)
            if (kind, name) not in {(k, n) for (idx, _), (k, n, _) in self.leave_failed.items() if idx == a.ifindex}:
                log.warning("cannot remove %s from %s (renamed from %s): %s (said once while it fails so; the hook "
                            "check tries again every tick, `snatgw status` counts the tries)", a.prog, name, a.ifname, e)
            self.leave_failed[hook] = (kind, name, str(e))
            return
        self.leave_failed.pop(hook, None)
        log.warning("removed %s from %s %s: renamed from %s, it is no longer inside/outside",
                    a.prog, name, "ingress" if a.point == B.BPF_TC_INGRESS else "egress", a.ifname)  # fmt: skip
        self.left.append(name)

    def detach(self) -> None:
        """Remove only our filters; a clsact qdisc we created goes too once it is empty."""
        errors = []
        for a in reversed(self.attachments):
            try:
                B.tc_detach(a.ifindex, a.point, TC_HANDLE, TC_PRIORITY)
            except BackendError as e:
                errors.append(str(e))
        for name, idx in {a.ifname: a.ifindex for a in self.attachments if a.created_hook}.items():
            if _hook_empty(name):
                with contextlib.suppress(BackendError):
                    B.tc_hook_destroy(idx, B.BPF_TC_INGRESS | B.BPF_TC_EGRESS)
        self.attachments = []
        if errors:
            raise BackendError("detach: " + "; ".join(errors))

    # ------------------------------------------------------------- stop

    def stop(self, keep_state: bool = False) -> None:
        """keep_state (a daemon exiting, `systemctl restart`, an upgrade): close our fds only;
        the filters stay attached and the maps pinned, so the kernel keeps translating with
        no daemon and the next one adopts both (load() + attach() replace in place).
        Otherwise (removal on purpose): detach, close, remove the pins."""
        try:
            if not keep_state:
                self.detach()
        finally:
            self._close_displaced()
            self._close_carrying()
            self._close_before()
            if self.obj is not None:
                self.obj.close()
                self.obj, self.maps = None, None
            self.attachments = []
            if not keep_state:
                unpin(self.pin_dir)


def _query(idx: int, point: int) -> int | None:
    try:
        return B.tc_query(idx, point, TC_HANDLE, TC_PRIORITY)
    except B.LibbpfError as e:
        if e.errno in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            return None
        raise BackendError(f"cannot query TC filters on ifindex {idx}: {e}") from None


def devices_here(devices: list[str] | tuple[str, ...] | None = None) -> list[tuple[int, str]]:
    """(ifindex, name) of ``devices`` (default: every device of this network namespace), in
    their order, once each; a name no device has (gone) is left out."""
    if devices is None:
        return socket.if_nameindex()
    found = []
    for name in dict.fromkeys(devices):
        with contextlib.suppress(OSError):
            found.append((socket.if_nametoindex(name), name))
    return found


def detach_ours(devices: list[str] | tuple[str, ...] | None = None,
                keep: set[tuple[int, int]] = frozenset()) -> list[str]:
    """Remove our TC filters (handle/priority TC_HANDLE/TC_PRIORITY only, e.g. left by a bpf
    daemon that was killed) from ``devices`` (default: every device of this network namespace)
    on both clsact points, except the (ifindex, point) hooks in ``keep``; other filters and the
    qdiscs stay.  Returns what was removed."""
    removed = []
    for idx, name in devices_here(devices):
        for point, where in ((B.BPF_TC_INGRESS, "ingress"), (B.BPF_TC_EGRESS, "egress")):
            if (idx, point) in keep:
                continue
            try:
                pid = B.tc_query(idx, point, TC_HANDLE, TC_PRIORITY)
            except B.LibbpfError as e:
                if e.errno in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                    continue
                raise BackendError(f"cannot query TC filters on {name} {where}: {e}") from None
            if pid is None:
                continue
            if B.tc_detach(idx, point, TC_HANDLE, TC_PRIORITY):
                removed.append(f"TC filter {TC_HANDLE:#x} on {name} {where} (prog id {pid})")
    return removed


def attached_prog_id(ifname: str, point: int) -> int | None:
    """The program id of our filter on ``ifname``/``point`` (None if none): for status/tests."""
    try:
        return B.tc_query(ifindex(ifname), point, TC_HANDLE, TC_PRIORITY)
    except B.LibbpfError as e:
        if e.errno in (errno.ENOENT, errno.EINVAL):
            return None
        raise
