"""SNAT addresses on the uplinks, for `snat_addresses manage`.

The uplink must own every SNAT address (the ISP's router ARPs for it, and the kernel answers
only for local addresses), as LVS operators did with `ip addr add`.  With `manage` the daemon
does it: each pool address becomes a /32 on its uplink: the outside interface whose connected
subnet holds the address, else the rule's `oif` when it names an outside interface, else the
only outside interface.  For the gateway's own traffic the kernel picks the uplink's
address in the next hop's subnet, not a /32, so the host's sockets and the sessions do not share
an address:port unless a program binds a pool address on purpose.  Addresses the daemon added and that leave every pool on
reload are removed; on stop they stay, so a restarted daemon keeps answering for live sessions.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess

from ..errors import MissingDeviceError, SnatgwError

MAX_MANAGED = 4096  # more pool addresses than this are the operator's job (routes, proxy ARP)


def _ip(*args: str) -> str:
    cp = subprocess.run(["ip", *args], capture_output=True, text=True)
    if cp.returncode:
        raise SnatgwError(f"ip {' '.join(args)}: {cp.stderr.strip()}")
    return cp.stdout


def current(ifaces) -> dict[str, list[ipaddress.IPv4Interface]]:
    """IPv4 addresses of each interface, as the kernel has them.  A device that is not in this
    network namespace is a MissingDeviceError (the service says where the config names it), not
    `ip`'s own "Device ... does not exist" with no file, line or setting."""
    out = {}
    for name in ifaces:
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise MissingDeviceError(name) from None
        info = json.loads(_ip("-j", "-4", "addr", "show", "dev", name) or "[]")
        out[name] = [ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
                     for i in info for a in i.get("addr_info", [])]
    return out


def plan(config, have: dict[str, list[ipaddress.IPv4Interface]]) -> dict[ipaddress.IPv4Address, str]:
    """address -> uplink for every pool address of the config; SnatgwError names a rule whose
    address has no uplink it can be told to belong to."""
    outside = list(config.settings.outside)
    if not outside:
        raise SnatgwError("snat_addresses manage: no outside interfaces are configured")
    want: dict[ipaddress.IPv4Address, str] = {}
    too_many = SnatgwError(f"snat_addresses manage: more than {MAX_MANAGED} pool addresses")
    for r in config.rules:
        if r.pool.size > MAX_MANAGED:  # (bounds the walk below)
            raise too_many
        for a in r.pool.addresses():
            if a in want:  # rules of one ISP share its pool (or part of it): each address counts once
                continue
            if len(want) >= MAX_MANAGED:
                raise too_many
            # the uplink whose connected subnet holds the address (its ISP router ARPs there; a
            # failed-over rule keeps its oif but takes the backup's pool), else the rule's oif
            owners = [n for n in outside for i in have.get(n, []) if i.network.prefixlen < 32 and a in i.network]
            if owners:
                dev = owners[0]
            elif r.oif in outside:
                dev = r.oif
            else:
                dev = outside[0] if len(outside) == 1 else None
            if dev is None:
                raise SnatgwError(
                    f"{r.where or 'rule'}: snat_ip {a}: no outside interface has a subnet holding it; "
                    "set the rule's oif or add the address yourself (snat_addresses external)")
            want[a] = dev
    return want


class AddressManager:
    def __init__(self, log=None):
        self.log = log
        self.added: dict[ipaddress.IPv4Address, str] = {}

    def sync(self, config) -> None:
        if config.settings.snat_addresses != "manage":
            return
        have = current(config.settings.outside)
        want = plan(config, have)
        local = {i.ip: dev for dev, lst in have.items() for i in lst}
        for a, dev in want.items():
            if a not in local:
                _ip("addr", "add", f"{a}/32", "dev", dev)
                self.added[a] = dev
                if self.log:
                    self.log.info("address_added", address=str(a), dev=dev)
        for a in [a for a in self.added if a not in want]:
            _ip("addr", "del", f"{a}/32", "dev", self.added.pop(a))
            if self.log:
                self.log.info("address_removed", address=str(a))

    def release(self) -> None:
        """Remove the addresses this manager added (a start that failed after sync): what was on
        the uplinks before stays.  Never raises: an address that cannot go is logged."""
        for a in list(self.added):
            dev = self.added.pop(a)
            try:
                _ip("addr", "del", f"{a}/32", "dev", dev)
            except SnatgwError as e:
                if self.log:
                    self.log.warning("address_remove_failed", address=str(a), dev=dev, error=str(e))
                continue
            if self.log:
                self.log.info("address_removed", address=str(a))
