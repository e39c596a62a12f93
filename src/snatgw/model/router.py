"""A static FIB for the model: longest-prefix routes, connected networks from interface
addresses (on-link), local addresses.  Stands in for bpf_fib_lookup in the REF topology."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

#: route "devices" that mean the destination is unreachable (ip route blackhole/unreachable)
NO_ROUTE_DEVS = ("blackhole", "unreachable", "prohibit")


@dataclass(frozen=True)
class FibResult:
    kind: str  # "forward" | "local" | "unreachable"
    oif: str | None = None  # egress device name
    gw: IPv4Address | None = None  # next hop; == the looked-up destination when on-link
    mtu: int = 1500


class StaticRouter:
    """A FIB from a table.  ``routes``: (net, oif, via or None for on-link); oif may be
    "blackhole"/"unreachable".  ``addresses``: iface -> ["A.B.C.D/len", ...]; each address is
    local and its network (when shorter than /32) is an on-link route of that iface."""

    def __init__(self, routes: list[tuple[str, str, str | None]], addresses: dict[str, list[str]],
                 mtu: dict[str, int] | None = None):  # fmt: skip
        self.mtu = dict(mtu or {})
        self.local: dict[IPv4Address, str] = {}
        self.broadcast: set[IPv4Address] = set()  # subnet broadcasts: the kernel's local table
        table: list[tuple[IPv4Network, str, IPv4Address | None]] = []
        for dev, addrs in addresses.items():
            for a in addrs:
                iface = IPv4Interface(a)
                self.local[iface.ip] = dev
                if iface.network.prefixlen < 31:
                    self.broadcast.add(iface.network.broadcast_address)
                if iface.network.prefixlen < 32:
                    table.append((iface.network, dev, None))
        for net, dev, via in routes:
            table.append((IPv4Network(net), dev, IPv4Address(via) if via else None))
        self.sources = [(IPv4Interface(a).network, IPv4Interface(a).ip) for addrs in addresses.values()
                        for a in addrs if IPv4Interface(a).network.prefixlen < 32]  # fmt: skip
        # longest prefix first; among equals the first given wins (stable sort)
        self.table = sorted(table, key=lambda r: -r[0].prefixlen)
        self.devices = tuple(addresses)
        #: each device's ifindex (numbered from 2 in the order given, lo being 1); recreate()
        #: gives a device another, as the kernel does to one deleted and made again
        names = dict.fromkeys([*addresses, *(d for _, d, _ in routes if d not in NO_ROUTE_DEVS)])
        self.ifindexes: dict[str, int] = {d: i for i, d in enumerate(names, start=2)}

    def ifindex(self, dev: str) -> int:
        """``dev``'s ifindex (0: no such device)."""
        return self.ifindexes.get(dev, 0)

    def recreate(self, dev: str) -> int:
        """``dev`` deleted and made again under its name: a new ifindex (the next unused, as
        the kernel gives); its routes and addresses are as they were (a test puts them back)."""
        self.ifindexes[dev] = max(self.ifindexes.values(), default=1) + 1
        return self.ifindexes[dev]

    def dev_mtu(self, dev: str | None) -> int:
        return self.mtu.get(dev, 1500) if dev else 1500

    def source_for(self, dst: IPv4Address) -> IPv4Address | None:
        """The gateway's own address toward an on-link ``dst`` (the kernel's preferred source
        of the connected route; bpf_fib_lookup with BPF_FIB_LOOKUP_SRC), or None."""
        nets = sorted((n for n in self.sources if IPv4Address(dst) in n[0]), key=lambda n: -n[0].prefixlen)
        return nets[0][1] if nets else None

    def lookup(self, dst: IPv4Address, src: IPv4Address | None = None) -> FibResult:
        dst = IPv4Address(dst)
        if dst in self.local:
            return FibResult("local", self.local[dst], None, self.dev_mtu(self.local[dst]))
        if dst in self.broadcast:  # the kernel's FIB: type broadcast, not forwarded
            return FibResult("local")
        for net, dev, via in self.table:
            if dst in net:
                if dev in NO_ROUTE_DEVS:
                    return FibResult("unreachable")
                return FibResult("forward", dev, via or dst, self.dev_mtu(dev))
        return FibResult("unreachable")

    @classmethod
    def ref(cls) -> "StaticRouter":
        """The REF topology of the plan (gateway alone)."""
        return cls(list(REF_ROUTES), {k: list(v) for k, v in REF_ADDRESSES.items()})


REF_ADDRESSES: dict[str, tuple[str, ...]] = {
    "lan40": ("198.18.40.1/24",),
    "lan50": ("198.18.50.1/24",),
    "eth1": ("198.19.2.2/24", "198.19.2.71/32", "198.19.2.72/32", "198.19.2.73/32"),
    "eth2": ("198.19.3.2/24", "198.19.3.71/32", "198.19.3.72/32", "198.19.3.73/32"),
}
REF_ROUTES: tuple[tuple[str, str, str | None], ...] = (
    ("0.0.0.0/0", "eth1", "198.19.2.1"),
    ("198.51.100.0/24", "eth2", "198.19.3.1"),
    ("192.0.2.48/28", "lan40", None),  # an inside net no rule covers (corpus STRANGER), on-link
)
