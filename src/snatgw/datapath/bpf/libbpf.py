"""A thin ctypes binding to Debian's libbpf.so.1 (v1.1.x) and small Pythonic wrappers on it.

Struct layouts follow /usr/include/bpf/{libbpf,bpf}.h of libbpf 1.1.2.  Every failing call
raises ``LibbpfError`` (a ``BackendError``) carrying ``errno`` and the errno text.

Stable API (other modules and the bpf-C tests rely on it; only add to it):

    obj = BpfObject.open(path)              # bpf_object__open_file; nothing in the kernel yet
    obj.set_max_entries(name, n)            # before load
    obj.set_pin_path(name, path)            # before load: libbpf reuses a compatible pin or pins
    obj.reuse_fd(name, fd)                  # before load: use an existing map instead
    obj.load()                              # verifier; maps created (or reused)
    obj.prog_fd(name) -> int                # program fd by function name (KeyError if absent)
    obj.map(name) -> Map                    # a map of the object (fd owned by the object)
    obj.map_names() / obj.program_names()
    obj.close()                             # also a context manager

    m = Map.open_pinned(path, readonly=False)   # own fd; m.close()
    m = Map.from_fd(fd, owned=False)        # reads type/key/value sizes from the kernel
    m.key_size, m.value_size, m.max_entries, m.type, m.name, m.fd, m.percpu
    m.get(key) -> bytes | None              # per-CPU maps: ncpus * round8(value_size) bytes
    m.get_percpu(key) -> list[bytes] | None # per-CPU maps: one value per possible CPU
    m.sum_percpu(key) -> int                # per-CPU __u64 counters: summed over CPUs
    m.put(key, value, flags=BPF_ANY)        # per-CPU maps: value may be one value (copied to all)
    m.delete(key) -> bool                   # False when the key was absent
    m.keys() / len(m)                       # a snapshot of the keys (batch lookup)
    m.count()                               # entries, by batch lookup, one batch in memory
    m.key_batches(chunk)                    # (n, packed keys) per batch lookup
    m.items()                               # get_next_key walk + lookups
    m.items_batch(chunk=4096)               # bpf_map_lookup_batch, falls back to items()
    m.pop_batches(chunk=4096)               # bpf_map_lookup_and_delete_batch: (n, keys, values)
    m.raw_batches(chunk=4096)               # bpf_map_lookup_batch: (n, keys, values), falls back to items()
    m.to_dict()                             # the whole map as {key: value} (batch)
    m.put_batch(keys, values, n)            # bpf_map_update_batch: n packed keys and values
    m.pin(path)

    test_run(prog_fd, data, ctx=None, repeat=1) -> (retval, data_out, ctx_out, duration_ns)
    run_syscall(prog_fd, ctx=None) -> (retval, duration_ns)   # BPF_PROG_TYPE_SYSCALL programs
    rb = RingBuffer(map_fd); rb.fileno(); rb.drain(limit) -> [bytes]; rb.close()   # RINGBUF maps
    tc_hook_create(ifindex, point) -> bool(created) ; tc_hook_destroy(ifindex, point)
    tc_attach(ifindex, point, prog_fd, handle=0, priority=0, replace=False)
        -> (handle, priority, prog_id)
    tc_detach(ifindex, point, handle, priority) ; tc_query(...) -> prog_id | None
    obj_pin(fd, path) ; obj_get(path, readonly=False) -> fd ; map_info(fd) -> MapInfo
    num_possible_cpus() ; set_print(logger=None)     # libbpf messages -> Python logging
"""

from __future__ import annotations

import ctypes as C
import errno as _errno
import logging
import os
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

from ...errors import BackendError

log = logging.getLogger("snatgw.libbpf")

# map types (linux/bpf.h enum bpf_map_type)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_RINGBUF = 27
PERCPU_TYPES = frozenset({BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY,
                          BPF_MAP_TYPE_LRU_PERCPU_HASH})  # fmt: skip
MAP_TYPE_NAMES = {
    BPF_MAP_TYPE_HASH: "hash", BPF_MAP_TYPE_ARRAY: "array",
    BPF_MAP_TYPE_PERCPU_HASH: "percpu_hash", BPF_MAP_TYPE_PERCPU_ARRAY: "percpu_array",
    BPF_MAP_TYPE_LRU_HASH: "lru_hash", BPF_MAP_TYPE_LRU_PERCPU_HASH: "lru_percpu_hash",
    BPF_MAP_TYPE_LPM_TRIE: "lpm_trie", BPF_MAP_TYPE_RINGBUF: "ringbuf",
}  # fmt: skip

# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# file flags of bpf_obj_get_opts
BPF_F_RDONLY = 1 << 3
BPF_F_WRONLY = 1 << 4

# enum bpf_tc_attach_point
BPF_TC_INGRESS = 1 << 0
BPF_TC_EGRESS = 1 << 1
BPF_TC_CUSTOM = 1 << 2
BPF_TC_F_REPLACE = 1 << 0

# TC verdicts
TC_ACT_UNSPEC = -1
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7


class LibbpfError(BackendError):
    """A libbpf call failed; ``errno`` holds the (positive) error number."""

    def __init__(self, what: str, err: int):
        self.errno = err
        self.what = what
        super().__init__(f"{what}: {os.strerror(err)} (errno {err}: {_errno.errorcode.get(err, '?')})")


# --------------------------------------------------------------------------- C structs


class TcHook(C.Structure):
    _fields_ = [("sz", C.c_size_t), ("ifindex", C.c_int), ("attach_point", C.c_int),
                ("parent", C.c_uint32)]  # fmt: skip


class TcOpts(C.Structure):
    _fields_ = [("sz", C.c_size_t), ("prog_fd", C.c_int), ("flags", C.c_uint32),
                ("prog_id", C.c_uint32), ("handle", C.c_uint32), ("priority", C.c_uint32)]  # fmt: skip


class RunOpts(C.Structure):
    _fields_ = [
        ("sz", C.c_size_t), ("data_in", C.c_void_p), ("data_out", C.c_void_p),
        ("data_size_in", C.c_uint32), ("data_size_out", C.c_uint32),
        ("ctx_in", C.c_void_p), ("ctx_out", C.c_void_p),
        ("ctx_size_in", C.c_uint32), ("ctx_size_out", C.c_uint32),
        ("retval", C.c_uint32), ("repeat", C.c_int), ("duration", C.c_uint32),
        ("flags", C.c_uint32), ("cpu", C.c_uint32), ("batch_size", C.c_uint32),
    ]  # fmt: skip


class MapBatchOpts(C.Structure):
    _fields_ = [("sz", C.c_size_t), ("elem_flags", C.c_uint64), ("flags", C.c_uint64)]


class ObjGetOpts(C.Structure):
    _fields_ = [("sz", C.c_size_t), ("file_flags", C.c_uint32)]


class _MapInfo(C.Structure):
    _fields_ = [
        ("type", C.c_uint32), ("id", C.c_uint32), ("key_size", C.c_uint32),
        ("value_size", C.c_uint32), ("max_entries", C.c_uint32), ("map_flags", C.c_uint32),
        ("name", C.c_char * 16), ("ifindex", C.c_uint32), ("btf_vmlinux_value_type_id", C.c_uint32),
        ("netns_dev", C.c_uint64), ("netns_ino", C.c_uint64), ("btf_id", C.c_uint32),
        ("btf_key_type_id", C.c_uint32), ("btf_value_type_id", C.c_uint32), ("pad", C.c_uint32),
        ("map_extra", C.c_uint64),
    ]  # fmt: skip


assert C.sizeof(TcHook) == 24 and C.sizeof(TcOpts) == 32 and C.sizeof(RunOpts) == 80
assert C.sizeof(ObjGetOpts) == 16 and C.sizeof(_MapInfo) == 88

# --------------------------------------------------------------------------- library

_P = C.c_void_p
_PRINT_FN = C.CFUNCTYPE(C.c_int, C.c_int, C.c_char_p, C.c_void_p)
_SAMPLE_FN = C.CFUNCTYPE(C.c_int, C.c_void_p, C.c_void_p, C.c_size_t)
_SIGS = {
    "bpf_object__open_file": (_P, [C.c_char_p, _P]),
    "bpf_object__load": (C.c_int, [_P]),
    "bpf_object__close": (None, [_P]),
    "bpf_object__find_program_by_name": (_P, [_P, C.c_char_p]),
    "bpf_object__find_map_by_name": (_P, [_P, C.c_char_p]),
    "bpf_object__next_map": (_P, [_P, _P]),
    "bpf_object__next_program": (_P, [_P, _P]),
    "bpf_program__fd": (C.c_int, [_P]),
    "bpf_program__name": (C.c_char_p, [_P]),
    "bpf_program__set_autoload": (C.c_int, [_P, C.c_bool]),
    "bpf_map__fd": (C.c_int, [_P]),
    "bpf_map__name": (C.c_char_p, [_P]),
    "bpf_map__set_max_entries": (C.c_int, [_P, C.c_uint32]),
    "bpf_map__max_entries": (C.c_uint32, [_P]),
    "bpf_map__set_pin_path": (C.c_int, [_P, C.c_char_p]),
    "bpf_map__reuse_fd": (C.c_int, [_P, C.c_int]),
    "bpf_obj_pin": (C.c_int, [C.c_int, C.c_char_p]),
    "bpf_obj_get": (C.c_int, [C.c_char_p]),
    "bpf_obj_get_opts": (C.c_int, [C.c_char_p, _P]),
    "bpf_obj_get_info_by_fd": (C.c_int, [C.c_int, _P, C.POINTER(C.c_uint32)]),
    "bpf_map_update_elem": (C.c_int, [C.c_int, _P, _P, C.c_uint64]),
    "bpf_map_lookup_elem": (C.c_int, [C.c_int, _P, _P]),
    "bpf_map_delete_elem": (C.c_int, [C.c_int, _P]),
    "bpf_map_get_next_key": (C.c_int, [C.c_int, _P, _P]),
    "bpf_map_lookup_batch": (C.c_int, [C.c_int, _P, _P, _P, _P, C.POINTER(C.c_uint32), _P]),
    "bpf_map_update_batch": (C.c_int, [C.c_int, _P, _P, C.POINTER(C.c_uint32), _P]),
    "bpf_map_lookup_and_delete_batch": (C.c_int, [C.c_int, _P, _P, _P, _P, C.POINTER(C.c_uint32), _P]),
    "bpf_prog_test_run_opts": (C.c_int, [C.c_int, _P]),
    "bpf_tc_hook_create": (C.c_int, [_P]),
    "bpf_tc_hook_destroy": (C.c_int, [_P]),
    "bpf_tc_attach": (C.c_int, [_P, _P]),
    "bpf_tc_detach": (C.c_int, [_P, _P]),
    "bpf_tc_query": (C.c_int, [_P, _P]),
    "libbpf_set_print": (_P, [_PRINT_FN]),
    "ring_buffer__new": (_P, [C.c_int, _SAMPLE_FN, _P, _P]),
    "ring_buffer__consume": (C.c_int, [_P]),
    "ring_buffer__poll": (C.c_int, [_P, C.c_int]),
    "ring_buffer__epoll_fd": (C.c_int, [_P]),
    "ring_buffer__free": (None, [_P]),
    "libbpf_num_possible_cpus": (C.c_int, []),
    "bpf_enable_stats": (C.c_int, [C.c_int]),
    "bpf_prog_get_fd_by_id": (C.c_int, [C.c_uint32]),
}

_lib: C.CDLL | None = None
_print_cb = None  # keeps the ctypes callback alive
_print_log = log  # where set_print sends libbpf's messages


def lib() -> C.CDLL:
    """The loaded libbpf with argument types set (loaded on first use)."""
    global _lib
    if _lib is None:
        try:
            dll = C.CDLL("libbpf.so.1", use_errno=True)
        except OSError as e:
            raise BackendError(f"libbpf.so.1 not found: install libbpf1 ({e})") from None
        for name, (res, args) in _SIGS.items():
            fn = getattr(dll, name)
            fn.restype, fn.argtypes = res, args
        _lib = dll
        set_print()
    return _lib


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise LibbpfError(what, -ret if ret != -1 else (C.get_errno() or _errno.EPERM))
    return ret


def _ptr_or_raise(ptr, what: str):
    if not ptr:
        raise LibbpfError(what, C.get_errno() or _errno.ENOENT)
    return ptr


def set_print(logger: logging.Logger | None = None) -> None:
    """Route libbpf's messages to ``logger`` (default ``snatgw.libbpf``): WARN->warning,
    INFO->info, DEBUG->debug.  x86_64/aarch64-linux only format through vsnprintf(va_list)."""
    global _print_cb, _print_log
    logger = _print_log = logger or log
    libc = C.CDLL(None)
    vsnprintf = libc.vsnprintf
    vsnprintf.argtypes = [C.c_char_p, C.c_size_t, C.c_char_p, C.c_void_p]
    levels = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}

    def cb(level, fmt, args):
        lvl = levels.get(level, logging.DEBUG)
        held = getattr(_held, "msgs", None)
        if not logger.isEnabledFor(lvl) and held is None:
            return 0
        buf = C.create_string_buffer(2048)
        vsnprintf(buf, len(buf), fmt, args)
        _emit(lvl, buf.value.decode(errors="replace").rstrip())
        return 0

    _print_cb = _PRINT_FN(cb)
    (_lib or lib()).libbpf_set_print(_print_cb)


_ncpus: int | None = None


def num_possible_cpus() -> int:
    global _ncpus
    if _ncpus is None:
        _ncpus = _check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")
    return _ncpus


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin {path}")


def obj_get(path: str, readonly: bool = False) -> int:
    """Open a pinned object; the caller owns (and closes) the returned fd."""
    if readonly:
        opts = ObjGetOpts(sz=C.sizeof(ObjGetOpts), file_flags=BPF_F_RDONLY)
        return _check(lib().bpf_obj_get_opts(path.encode(), C.byref(opts)), f"bpf_obj_get {path}")
    return _check(lib().bpf_obj_get(path.encode()), f"bpf_obj_get {path}")


def prog_fd_by_id(prog_id: int) -> int:
    """An fd of the loaded program ``prog_id`` (it lives as long as the fd does); the caller
    closes it."""
    return _check(lib().bpf_prog_get_fd_by_id(prog_id), f"bpf_prog_get_fd_by_id {prog_id}")


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str

    @property
    def type_name(self) -> str:
        return MAP_TYPE_NAMES.get(self.type, str(self.type))


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    n = C.c_uint32(C.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, C.byref(info), C.byref(n)), "bpf_obj_get_info_by_fd")
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries,
                   info.map_flags, info.name.decode(errors="replace"))  # fmt: skip


# --------------------------------------------------------------------------- maps


def _round8(n: int) -> int:
    return (n + 7) & ~7


class Map:
    """A BPF map by fd, with byte keys and values (see snatgw.layout for their codecs)."""

    def __init__(self, fd: int, info: MapInfo, owned: bool = False, path: str | None = None):
        self.fd, self.info, self.owned, self.path = fd, info, owned, path
        self.name, self.type = info.name, info.type
        self.key_size, self.value_size, self.max_entries = info.key_size, info.value_size, info.max_entries
        self.percpu = info.type in PERCPU_TYPES
        self._vlen = _round8(self.value_size) * num_possible_cpus() if self.percpu else self.value_size

    @classmethod
    def from_fd(cls, fd: int, owned: bool = False) -> "Map":
        return cls(fd, map_info(fd), owned)

    @classmethod
    def open_pinned(cls, path: str, readonly: bool = False) -> "Map":
        fd = obj_get(path, readonly)
        try:
            return cls(fd, map_info(fd), owned=True, path=path)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"Map({self.name!r}, {MAP_TYPE_NAMES.get(self.type, self.type)}, fd={self.fd})"

    def _key(self, key: bytes | int) -> bytes:
        """The key as bytes (ctypes passes a bytes object as a const pointer to its data)."""
        if isinstance(key, int):
            key = key.to_bytes(self.key_size, "little")
        if len(key) != self.key_size:
            raise BackendError(f"map {self.name}: key is {len(key)} bytes, expected {self.key_size}")
        return bytes(key)

    def get(self, key: bytes | int) -> bytes | None:
        k, v = self._key(key), C.create_string_buffer(self._vlen)
        ret = lib().bpf_map_lookup_elem(self.fd, k, v)
        if ret < 0:
            if -ret == _errno.ENOENT:
                return None
            _check(ret, f"lookup in map {self.name}")
        return v.raw

    def get_percpu(self, key: bytes | int) -> list[bytes] | None:
        raw = self.get(key)
        if raw is None:
            return None
        step = _round8(self.value_size)
        return [raw[i : i + self.value_size] for i in range(0, len(raw), step)]

    def sum_percpu(self, key: bytes | int) -> int:
        """A per-CPU __u64 counter summed over CPUs (0 when the key is absent)."""
        return sum(int.from_bytes(v, "little") for v in self.get_percpu(key) or [])

    def put(self, key: bytes | int, value: bytes, flags: int = BPF_ANY) -> None:
        value = bytes(value)
        if self.percpu and len(value) == self.value_size:
            value = value.ljust(_round8(self.value_size), b"\0") * num_possible_cpus()
        if len(value) != self._vlen:
            raise BackendError(f"map {self.name}: value is {len(value)} bytes, expected {self._vlen}")
        _check(lib().bpf_map_update_elem(self.fd, self._key(key), value, flags), f"update of map {self.name}")

    def delete(self, key: bytes | int) -> bool:
        ret = lib().bpf_map_delete_elem(self.fd, self._key(key))
        if ret < 0 and -ret == _errno.ENOENT:
            return False
        _check(ret, f"delete in map {self.name}")
        return True

    def keys(self) -> list[bytes]:
        """A snapshot of the keys, by batch lookup (robust against concurrent deletes),
        else by get_next_key."""
        return [k for k, _ in self.items_batch()]

    def _keys_walk(self) -> list[bytes]:
        """Keys by get_next_key: a hash map restarts the walk when the current key vanishes
        meanwhile, so the walk stops at the first repeat (it may then miss a few keys)."""
        out, cur, nxt = [], None, C.create_string_buffer(self.key_size)
        seen: set[bytes] = set()
        for _ in range(self.max_entries + 1):
            ret = lib().bpf_map_get_next_key(self.fd, cur, nxt)
            if ret < 0:
                if -ret == _errno.ENOENT:
                    break
                _check(ret, f"iteration of map {self.name}")
            k = nxt.raw
            if k in seen:  # restarted after a concurrent delete: stop, we have the rest
                break
            seen.add(k)
            out.append(k)
            cur = C.create_string_buffer(k, self.key_size)
        return out

    def __len__(self) -> int:
        return len(self.keys())

    def count(self, chunk: int = 4096) -> int:
        """How many entries, read one batch at a time (len() keeps every key: not at 1M)."""
        n = 0
        for part in self._batches(chunk):
            n += sum(1 for _ in part)
        return n

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) by get_next_key and lookups (items_batch is the fast way)."""
        for k in self._keys_walk():
            v = self.get(k)
            if v is not None:
                yield k, v

    def items_batch(self, chunk: int = 4096) -> Iterator[tuple[bytes, bytes]]:
        """bpf_map_lookup_batch (one syscall per chunk); falls back to items() if unsupported."""
        for part in self._batches(chunk):
            yield from part

    def to_dict(self, chunk: int = 4096) -> dict[bytes, bytes]:
        """The whole map as {key: value} by batch lookup (the fastest full read)."""
        out: dict[bytes, bytes] = {}
        for part in self._batches(chunk):
            out.update(part)
        return out

    def raw_batches(self, chunk: int = 4096) -> Iterator[tuple[int, bytes, bytes]]:
        """The whole map as (n, n packed keys, n packed values) per bpf_map_lookup_batch call,
        for a reader that unpacks a batch at once (no per-entry bytes object); a kernel without
        the batch call: (1, key, value) per entry of items()."""
        for part in self._raw_batches(chunk, fallback=True):
            if part is None:
                yield from ((1, k, v) for k, v in self.items())
                return
            yield part

    def pop_batches(self, chunk: int = 4096) -> Iterator[tuple[int, bytes, bytes] | None]:
        """Empty a hash map by bpf_map_lookup_and_delete_batch: (n, n packed keys, n packed
        values) per call, each entry returned exactly as it was deleted (one system call per
        chunk, not one per entry; an entry the programs add meanwhile to a bucket already
        passed stays).  A kernel that refuses it on the first call yields None once: the
        caller empties the map another way (items_batch and a delete per entry)."""
        return self._raw_batches(chunk, fallback=True, delete=True)

    def _raw_batches(self, chunk: int, fallback: bool = False,
                     delete: bool = False) -> Iterator[tuple[int, bytes, bytes] | None]:
        """The bpf_map_lookup_batch cursor walk (``delete``: bpf_map_lookup_and_delete_batch):
        (n, n packed keys, n packed values) per call.
        With ``fallback``, a kernel that refuses batch lookups on the first call yields None
        once (the caller reads the map another way); otherwise every error raises.  A hash
        bucket is returned whole or not at all: one with more entries than ``chunk`` fails
        ENOSPC, and the chunk doubles for that bucket (up to max_entries, which bounds it)."""
        keys = C.create_string_buffer(self.key_size * chunk)
        vals = C.create_string_buffer(self._vlen * chunk)
        inb, outb = None, C.create_string_buffer(max(self.key_size, 8))
        opts = MapBatchOpts(sz=C.sizeof(MapBatchOpts))
        call = lib().bpf_map_lookup_and_delete_batch if delete else lib().bpf_map_lookup_batch
        what = "batch lookup and delete" if delete else "batch lookup"
        while True:
            n = C.c_uint32(chunk)
            ret = call(self.fd, inb, outb, keys, vals, C.byref(n), C.byref(opts))
            err = -ret if ret < 0 else 0
            if err == _errno.ENOSPC and not n.value and chunk < max(self.info.max_entries, 1):
                chunk = min(chunk * 2, max(self.info.max_entries, 1))  # the cursor stays: that bucket again
                keys = C.create_string_buffer(self.key_size * chunk)
                vals = C.create_string_buffer(self._vlen * chunk)
                continue
            if err and err != _errno.ENOENT:
                if fallback and inb is None and err in (_errno.EINVAL, _errno.ENOTSUP, 524):  # 524: ENOTSUPP
                    yield None
                    return
                _check(ret, f"{what} in map {self.name}")
            if n.value:
                yield n.value, C.string_at(keys, n.value * self.key_size), C.string_at(vals, n.value * self._vlen)
            if err == _errno.ENOENT:
                return
            inb = C.create_string_buffer(outb.raw, len(outb))

    def key_batches(self, chunk: int = 4096) -> Iterator[tuple[int, bytes]]:
        """(n, n packed keys) per bpf_map_lookup_batch call: the keys without a per-entry
        Python object (the expiry's chunked walk hands them to the kernel as they are)."""
        for nn, raw_k, _ in self._raw_batches(chunk):
            yield nn, raw_k

    def _batches(self, chunk: int) -> Iterator[Iterable[tuple[bytes, bytes]]]:
        ks, vs = self.key_size, self._vlen
        for part in self._raw_batches(chunk, fallback=True):
            if part is None:
                yield list(self.items())
                return
            nn, raw_k, raw_v = part
            yield zip([raw_k[i : i + ks] for i in range(0, nn * ks, ks)],
                      [raw_v[i : i + vs] for i in range(0, nn * vs, vs)])  # fmt: skip

    def put_batch(self, keys: bytes, values: bytes, n: int, flags: int = BPF_ANY) -> None:
        """bpf_map_update_batch: ``n`` keys and values packed back to back (one system call)."""
        if len(keys) != n * self.key_size or len(values) != n * self._vlen:
            raise BackendError(f"map {self.name}: batch of {n} needs {n * self.key_size} key and "
                               f"{n * self._vlen} value bytes")  # fmt: skip
        cnt = C.c_uint32(n)
        opts = MapBatchOpts(sz=C.sizeof(MapBatchOpts), elem_flags=flags)
        _check(lib().bpf_map_update_batch(self.fd, keys, values, C.byref(cnt), C.byref(opts)),
               f"batch update of map {self.name}")  # fmt: skip

    def pin(self, path: str) -> None:
        obj_pin(self.fd, path)


# --------------------------------------------------------------------------- ring buffer

#: what RingBuffer's callback returns to stop ring_buffer__consume once a batch is full (any
#: negative value stops it; the record it was called for is consumed, and kept by us)
_BATCH_FULL = -_errno.EAGAIN


class RingBuffer:
    """A BPF_MAP_TYPE_RINGBUF map read through libbpf 1.1's ring_buffer__* API (there is no
    ring_buffer__consume_n before 1.4: a batch is bounded by the callback, which stops the
    consume once ``limit`` records are in).

        rb = RingBuffer(map_fd)
        rb.fileno()          # libbpf's epoll fd: readable while the ring holds records
        rb.drain(limit)      # -> list of records (bytes), at most ``limit``; never blocks
        rb.close()
    """

    def __init__(self, map_fd: int):
        self._batch: list[bytes] = []
        self._limit = 0
        self._cb = _SAMPLE_FN(self._sample)  # kept alive as long as the ring
        ptr = lib().ring_buffer__new(map_fd, self._cb, None, None)
        self._ptr = _ptr_or_raise(ptr, f"ring_buffer__new (map fd {map_fd})")

    def _sample(self, _ctx, data, size) -> int:
        self._batch.append(C.string_at(data, size))
        return _BATCH_FULL if len(self._batch) >= self._limit else 0

    def fileno(self) -> int:
        if not self._ptr:
            raise BackendError("ring buffer closed")
        return lib().ring_buffer__epoll_fd(self._ptr)

    def drain(self, limit: int = 4096) -> list[bytes]:
        """The records waiting in the ring, oldest first, at most ``limit`` (the rest stay)."""
        if not self._ptr:
            raise BackendError("ring buffer closed")
        self._batch, self._limit = [], max(1, int(limit))
        ret = lib().ring_buffer__consume(self._ptr)
        if ret < 0 and -ret != _errno.EAGAIN:
            _check(ret, "ring_buffer__consume")
        out, self._batch = self._batch, []
        return out

    def close(self) -> None:
        if self._ptr:
            lib().ring_buffer__free(self._ptr)
            self._ptr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- objects


class BpfObject:
    """A BPF ELF object: open, adjust maps, load, then programs and maps by name."""

    def __init__(self, ptr, path: str):
        self._ptr, self.path, self.loaded = ptr, path, False

    @classmethod
    def open(cls, path: str | os.PathLike) -> "BpfObject":
        path = os.fspath(path)
        ptr = lib().bpf_object__open_file(path.encode(), None)
        return cls(_ptr_or_raise(ptr, f"bpf_object__open_file {path}"), path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _alive(self):
        if not self._ptr:
            raise BackendError(f"BPF object {self.path} is closed")
        return self._ptr

    def _map_ptr(self, name: str):
        p = lib().bpf_object__find_map_by_name(self._alive(), name.encode())
        if not p:
            raise KeyError(f"{self.path}: no map named {name!r}")
        return p

    def _prog_ptr(self, name: str):
        p = lib().bpf_object__find_program_by_name(self._alive(), name.encode())
        if not p:
            raise KeyError(f"{self.path}: no program named {name!r}")
        return p

    def map_names(self) -> list[str]:
        out, p = [], None
        while p := lib().bpf_object__next_map(self._alive(), p):
            out.append(lib().bpf_map__name(p).decode())
        return out

    def program_names(self) -> list[str]:
        out, p = [], None
        while p := lib().bpf_object__next_program(self._alive(), p):
            out.append(lib().bpf_program__name(p).decode())
        return out

    def set_max_entries(self, name: str, n: int) -> None:
        _check(lib().bpf_map__set_max_entries(self._map_ptr(name), n), f"set_max_entries {name}")

    def max_entries(self, name: str) -> int:
        return lib().bpf_map__max_entries(self._map_ptr(name))

    def set_pin_path(self, name: str, path: str | None) -> None:
        _check(lib().bpf_map__set_pin_path(self._map_ptr(name), path.encode() if path else None),
               f"set_pin_path {name}")  # fmt: skip

    def reuse_fd(self, name: str, fd: int) -> None:
        _check(lib().bpf_map__reuse_fd(self._map_ptr(name), fd), f"reuse_fd {name}")

    def set_autoload(self, prog: str, on: bool) -> None:
        _check(lib().bpf_program__set_autoload(self._prog_ptr(prog), on), f"set_autoload {prog}")

    def load(self) -> None:
        _check(lib().bpf_object__load(self._alive()), f"bpf_object__load {self.path}")
        self.loaded = True

    def prog_fd(self, name: str) -> int:
        return _check(lib().bpf_program__fd(self._prog_ptr(name)), f"program fd {name}")

    def map_fd(self, name: str) -> int:
        return _check(lib().bpf_map__fd(self._map_ptr(name)), f"map fd {name}")

    def map(self, name: str) -> Map:
        """The loaded map ``name``; its fd belongs to the object (valid until close())."""
        return Map.from_fd(self.map_fd(name), owned=False)

    def close(self) -> None:
        if self._ptr:
            lib().bpf_object__close(self._ptr)
            self._ptr = None


# --------------------------------------------------------------------------- test run


def test_run(prog_fd: int, data: bytes, ctx: bytes | None = None, repeat: int = 1,
             data_out_size: int | None = None) -> tuple[int, bytes, bytes | None, int]:  # fmt: skip
    """BPF_PROG_TEST_RUN: run ``prog_fd`` on ``data`` (a whole Ethernet frame for TC).
    Returns (retval, data_out, ctx_out or None, average duration in ns)."""
    din = C.create_string_buffer(bytes(data), len(data))
    out_sz = data_out_size or len(data) + 4096
    dout = C.create_string_buffer(out_sz)
    o = RunOpts(sz=C.sizeof(RunOpts), data_in=C.cast(din, C.c_void_p),
                    data_out=C.cast(dout, C.c_void_p), data_size_in=len(data),
                    data_size_out=out_sz, repeat=max(1, int(repeat)))  # fmt: skip
    cin = cout = None
    if ctx is not None:
        cin = C.create_string_buffer(bytes(ctx), len(ctx))
        cout = C.create_string_buffer(len(ctx))
        o.ctx_in, o.ctx_out = C.cast(cin, C.c_void_p), C.cast(cout, C.c_void_p)
        o.ctx_size_in = o.ctx_size_out = len(ctx)
    _check(lib().bpf_prog_test_run_opts(prog_fd, C.byref(o)), "bpf_prog_test_run_opts")
    ctx_out = cout.raw[: o.ctx_size_out] if cout is not None else None
    return int(C.c_int32(o.retval).value), dout.raw[: o.data_size_out], ctx_out, int(o.duration)


def run_syscall(prog_fd: int, ctx: bytes | None = None) -> tuple[int, int]:
    """BPF_PROG_RUN of a BPF_PROG_TYPE_SYSCALL program (no packet; ``ctx`` optional).
    Returns (retval, duration in ns as measured by the kernel; 0 where it does not)."""
    o = RunOpts(sz=C.sizeof(RunOpts))
    cin = None
    if ctx:
        cin = C.create_string_buffer(bytes(ctx), len(ctx))
        o.ctx_in, o.ctx_size_in = C.cast(cin, C.c_void_p), len(ctx)
    _check(lib().bpf_prog_test_run_opts(prog_fd, C.byref(o)), "bpf_prog_test_run_opts (syscall)")
    return int(C.c_int32(o.retval).value), int(o.duration)


BPF_STATS_RUN_TIME = 0


def enable_run_time_stats() -> int:
    """BPF_ENABLE_STATS (run time): every program's run_time_ns/run_cnt count while the returned
    fd is open.  The kernel drops its reference when the fd is closed or the process dies, so
    nothing is left on (unlike writing kernel.bpf_stats_enabled, a global sysctl)."""
    return _check(lib().bpf_enable_stats(BPF_STATS_RUN_TIME), "bpf_enable_stats")


# --------------------------------------------------------------------------- TC


def _hook(ifindex: int, point: int) -> TcHook:
    return TcHook(sz=C.sizeof(TcHook), ifindex=ifindex, attach_point=point)


_held = threading.local()  # .msgs: libbpf's messages held during one call (_quiet)


def _emit(lvl: int, text: str) -> None:
    """One message of libbpf's: held during a _quiet call, else logged."""
    held = getattr(_held, "msgs", None)
    if held is not None:
        held.append((lvl, text))
    else:
        _print_log.log(lvl, "%s", text)


def _quiet(fn, expected: tuple[int, ...], *args) -> int:
    """``fn(*args)`` holding libbpf's messages: the kernel's error text for a failure the
    caller expects and handles (a clsact qdisc that exists, a filter that is gone) would
    otherwise reach the log as a warning at every start.  Held messages go to the log as
    they would have when the call fails otherwise, and at debug level when it fails as
    expected."""
    _held.msgs = []
    try:
        ret = fn(*args)
    finally:
        msgs, _held.msgs = _held.msgs, None
    as_expected = ret < 0 and -ret in expected
    for lvl, text in msgs:
        _print_log.log(logging.DEBUG if as_expected else lvl, "%s", text)
    return ret


def tc_hook_create(ifindex: int, point: int = BPF_TC_INGRESS) -> bool:
    """Create the clsact qdisc on ``ifindex`` (either point creates it); False if it existed."""
    ret = _quiet(lib().bpf_tc_hook_create, (_errno.EEXIST,), C.byref(_hook(ifindex, point)))
    if ret < 0 and -ret == _errno.EEXIST:
        return False
    _check(ret, f"bpf_tc_hook_create ifindex {ifindex}")
    return True


def tc_hook_destroy(ifindex: int, point: int = BPF_TC_INGRESS | BPF_TC_EGRESS) -> None:
    """INGRESS|EGRESS removes the whole clsact qdisc; one point flushes that point's filters."""
    gone = (_errno.ENOENT, _errno.EINVAL, _errno.ENODEV)
    ret = _quiet(lib().bpf_tc_hook_destroy, gone, C.byref(_hook(ifindex, point)))
    if ret < 0 and -ret in gone:
        return
    _check(ret, f"bpf_tc_hook_destroy ifindex {ifindex}")


def tc_attach(ifindex: int, point: int, prog_fd: int, handle: int = 0, priority: int = 0,
              replace: bool = False) -> tuple[int, int, int]:  # fmt: skip
    """Attach a direct-action cls_bpf filter; returns (handle, priority, prog_id)."""
    o = TcOpts(sz=C.sizeof(TcOpts), prog_fd=prog_fd, handle=handle, priority=priority,
               flags=BPF_TC_F_REPLACE if replace else 0)  # fmt: skip
    _check(lib().bpf_tc_attach(C.byref(_hook(ifindex, point)), C.byref(o)),
           f"bpf_tc_attach ifindex {ifindex}")  # fmt: skip
    return o.handle, o.priority, o.prog_id


def tc_detach(ifindex: int, point: int, handle: int, priority: int) -> bool:
    """Remove our filter (handle, priority); False if it was already gone."""
    o = TcOpts(sz=C.sizeof(TcOpts), handle=handle, priority=priority)
    gone = (_errno.ENOENT, _errno.ENODEV, _errno.EINVAL)
    ret = _quiet(lib().bpf_tc_detach, gone, C.byref(_hook(ifindex, point)), C.byref(o))
    if ret < 0 and -ret in gone:
        return False
    _check(ret, f"bpf_tc_detach ifindex {ifindex}")
    return True


def tc_query(ifindex: int, point: int, handle: int, priority: int) -> int | None:
    """The prog id of filter (handle, priority), or None when there is none."""
    o = TcOpts(sz=C.sizeof(TcOpts), handle=handle, priority=priority)
    gone = (_errno.ENOENT, _errno.EINVAL, _errno.ENODEV)
    ret = _quiet(lib().bpf_tc_query, gone, C.byref(_hook(ifindex, point)), C.byref(o))
    if ret < 0 and -ret in gone:
        return None
    _check(ret, f"bpf_tc_query ifindex {ifindex}")
    return o.prog_id


test_run.__test__ = False  # not a pytest test when imported into a test module
run_syscall.__test__ = False
