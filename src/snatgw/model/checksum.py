"""Internet checksums: the kernel's incremental updates (RFC 1624 eqn. 3), bit for bit, and a
full one's-complement sum for tests.

Every update is the kernel's csum_replace4 arithmetic on a little-endian host (what
bpf_l3_csum_replace(.., 4) and bpf_l4_csum_replace(.., 2 or 4) do on an skb that is not
CHECKSUM_PARTIAL).  Its result is normalised: the one's-complement sum inside is never zero,
so a stored checksum is never 0xFFFF and only the residue mod 0xFFFF matters.  Hence any order
or grouping of the changes gives the same bytes (the BPF programs may accumulate deltas and
apply them once).  The one exception is UDP's BPF_F_MARK_MANGLED_0 (a zero checksum is left
alone; a computed zero is written as 0xFFFF), applied per call.
"""

from __future__ import annotations

M32 = 0xFFFFFFFF
M16 = 0xFFFF


def _add32(a: int, b: int) -> int:
    """csum_add: 32-bit add with end-around carry."""
    r = (a + b) & M32
    return (r + (r < b)) & M32


def _fold(c: int) -> int:
    """csum_fold: 32 -> 16 bits, complemented."""
    c = (c & M16) + (c >> 16)
    c = (c & M16) + (c >> 16)
    return ~c & M16


def _add16(c: int, a: int) -> int:
    """csum16_add."""
    r = (c + a) & M16
    return (r + (r < a)) & M16


def csum_replace4(check: int, frm: int, to: int) -> int:
    """The kernel's csum_replace4 on host-order (LE-loaded) values."""
    tmp = _add32(~check & M32, ~frm & M32)
    return _fold(_add32(tmp, to))


def csum_replace2(check: int, old: int, new: int) -> int:
    """The kernel's csum_replace2 on host-order (LE-loaded) values."""
    return ~_add16(_add16(~check & M16, ~old & M16), new) & M16


def _le(b: bytes) -> int:
    return int.from_bytes(b, "little")


def l3_replace(buf: bytearray, csum_off: int, old: bytes, new: bytes) -> None:
    """An IP-header checksum update for a 2- or 4-byte change, normalised as csum_replace4
    (bpf_l3_csum_replace with size 2 uses csum_replace2, which differs only when the field
    holds 0xFFFF; the BPF programs use csum_replace4-style deltas for both sizes)."""
    check = _le(buf[csum_off : csum_off + 2])
    check = csum_replace4(check, _le(old), _le(new))
    buf[csum_off : csum_off + 2] = check.to_bytes(2, "little")


def l4_replace(buf: bytearray, csum_off: int, old: bytes, new: bytes, mangled0: bool = False) -> None:
    """bpf_l4_csum_replace(skb, csum_off, old, new, len(old) [| BPF_F_PSEUDO_HDR]
    [| BPF_F_MARK_MANGLED_0]) for an skb that is not CHECKSUM_PARTIAL.  Both sizes go through
    csum_replace4 (inet_proto_csum_replace2 widens to 32 bits); the pseudo-header flag makes no
    difference to the field then.  ``mangled0``: a zero checksum (UDP "none") is left alone and
    a computed zero is written as 0xFFFF."""
    check = _le(buf[csum_off : csum_off + 2])
    if mangled0 and check == 0:
        return
    check = csum_replace4(check, _le(old), _le(new))
    if mangled0 and check == 0:
        check = M16
    buf[csum_off : csum_off + 2] = check.to_bytes(2, "little")


def _folded_sum(data: bytes) -> int:
    """The 16-bit one's-complement sum of ``data`` (padded to even length)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
    while s >> 16:
        s = (s & M16) + (s >> 16)
    return s


def csum16(data: bytes) -> int:
    """The full Internet checksum of ``data`` (RFC 1071), as the value to store (big-endian)."""
    return ~_folded_sum(data) & M16


def verify(data: bytes) -> bool:
    """True when ``data`` (checksum field included) sums to all ones."""
    return _folded_sum(data) == M16
