"""keepalived's `use_vmac` beside snatgw (docs/operations.md "Beside keepalived"): the VIP lives on
a macvlan device over the inside device with the VRRP virtual MAC 00:00:5e:00:01:{VRID}, and
the hosts send to that MAC.  The inside device, where snatgw's programs are, counts those
frames as another host's (the macvlan device takes them only after TC): step 1a must take them
as the gateway's, or the kernel routes them untranslated through the macvlan device and the
leak guard drops them at the uplink.  The macvlan device is made here as keepalived makes it
(a static neighbour entry on the host stands in for its ARP answers).  bpf only: the nft
backend's rules see these packets arrive on the macvlan device, not an inside one, and leave
them untranslated (the leak guard drops them; docs/operations.md says so)."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from snatgw.lab import clients
from snatgw.lab.demo import REF_RULES, config_text, ruleset
from snatgw.lab.gateway import gateway_available

pytestmark = [pytest.mark.root, pytest.mark.lab]

VMAC = "00:00:5e:00:01:28"  # VRID 40
VIP = "198.18.40.254"
SERVER = "203.0.113.10"


def test_hosts_sending_to_a_vrrp_virtual_mac_are_translated(lab, servers, backend="bpf"):
    ok, why = gateway_available(backend)
    assert ok, why
    lab.add_snat_addresses(ruleset(REF_RULES))
    conf = f"{lab.workdir}/vmac.conf"
    with open(conf, "w") as f:
        f.write(config_text(REF_RULES))
    lab.run("gw", "ip", "link", "add", "link", "lan40", "name", "vrrp.40", "address", VMAC, "type", "macvlan",
            "mode", "bridge")
    try:
        lab.run("gw", "ip", "link", "set", "vrrp.40", "up")
        lab.run("gw", "ip", "addr", "add", f"{VIP}/32", "dev", "vrrp.40")
        lab.run("in40", "ip", "neigh", "replace", VIP, "lladdr", VMAC, "dev", "eth0", "nud", "permanent")
        lab.run("in40", "ip", "route", "replace", "default", "via", VIP)
        lab.start_gateway(conf, backend)
        try:
            reply = clients.udp_echo(lab, "in40", SERVER, src="198.18.40.10")
            tcp = clients.tcp_echo(lab, "in40", SERVER, src="198.18.40.11")
        finally:
            lab.stop_gateway()
    finally:
        lab.run("in40", "ip", "route", "replace", "default", "via", "198.18.40.1")
        lab.run("in40", "ip", "neigh", "del", VIP, "dev", "eth0", check=False)
        lab.run("gw", "ip", "link", "del", "vrrp.40", check=False)
    for got in (reply, tcp):  # the server saw a pool address: translated
        assert any(IPv4Address(got["peer"].split(":")[0]) in r.pool for r in ruleset(REF_RULES).rules), got
