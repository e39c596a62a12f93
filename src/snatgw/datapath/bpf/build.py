"""Compile the TC datapath (prog/snat.bpf.c) with clang into a cached BPF object.

``compile(defines)`` returns the path of the .o for a set of -D options; the cache key is a
hash of every source file, the defines and the compiler, so an edit or a new flag set builds
afresh and an unchanged tree costs nothing.  Cache: $XDG_CACHE_HOME/snatgw or ~/.cache/snatgw.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

from ...errors import BackendError

PROG_DIR = Path(__file__).parent / "prog"
SOURCE = PROG_DIR / "snat.bpf.c"
SWEEP_SOURCE = PROG_DIR / "sweep.bpf.c"  # the session walk (expiry, flush, listings)
INCLUDE = PROG_DIR / "include"

#: compile-time flag sets every build must keep loadable (tests/bpf/test_verifier.py loads each)
FLAG_SETS: tuple[dict[str, object], ...] = (
    {},  # production
    {"SNAT_TEST": 1},  # + the last-verdict map the tests read
    {"SNAT_PORT_TRIES": 1},
    {"SNAT_PORT_TRIES": 256, "SNAT_TEST": 1},
    {"SNAT_MAX_SESSIONS": 1024, "SNAT_MAX_RULES": 64},
    {"SNAT_BENCH": 1},  # + the bench wrappers of progbench
    {"SNAT_FINE_CLOCK": 1},  # bpf_ktime_get_ns instead of the coarse clock
    {"SNAT_NO_KERN_CTX": 1, "SNAT_TEST": 1},  # kernels before 6.3: L4 checksums by helper only
)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "snatgw"


def _clang() -> str:
    for name in ("clang", "clang-16", "clang-15", "clang-14"):
        path = shutil.which(name)
        if path:
            return path
    raise BackendError("clang not found: install clang (scripts/setup.sh) to build the BPF datapath")


def _flags(defines: dict | None) -> list[str]:
    out = []
    for k, v in sorted((defines or {}).items()):
        if not k.replace("_", "").isalnum():
            raise BackendError(f"bad define name {k!r}")
        out.append(f"-D{k}" if v is None or v is True else f"-D{k}={v}")
    return out


def _key(clang: str, flags: list[str], source: Path = SOURCE) -> str:
    h = hashlib.sha256()
    for p in sorted({source, *INCLUDE.glob("*.h")}):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update("\0".join([clang, platform.machine(), *flags]).encode())
    return h.hexdigest()[:20]


def compile(defines: dict | None = None, source: Path = SOURCE) -> Path:  # noqa: A001 - the verb is the point
    """Build (or reuse) the object of ``source`` (default the TC datapath) for ``defines``
    and return its path."""
    clang = _clang()
    flags = _flags(defines)
    source = Path(source)
    out = cache_dir() / f"{source.name.split('.')[0]}-{_key(clang, flags, source)}.o"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [
        clang, "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
        f"-I/usr/include/{platform.machine()}-linux-gnu", "-I", str(INCLUDE),
        *flags, "-c", str(source), "-o", str(tmp),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        what = " ".join(flags) or "no defines"
        raise BackendError(f"compiling {source.name} failed ({what}):\n{res.stderr}")
    os.replace(tmp, out)  # atomic: concurrent builds of the same key agree
    return out


if __name__ == "__main__":
    print(compile())
