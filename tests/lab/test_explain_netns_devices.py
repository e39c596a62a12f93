"""`snatgw explain --route-from-kernel` run as its own note says, `nsenter --net=/run/netns/NS
snatgw explain ...`: the mount namespace (and /sys) stays the host's, so the gateway's devices
must be looked up through the network namespace itself, not /sys/class/net."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.root, pytest.mark.lab]

# the MTU read, and the inside device the route lookup is asked with (`ip route get ... iif DEV`)
PROBE = """
import snatgw.cli.commands.explain as ex
asked = []
ex.ip_route_get = lambda dst, src, iif: (asked.append(iif) or ({"dev": "sgxdum0", "type": "unicast"}, "ip"))
ex.KernelRouter(("sgxdum0",)).lookup("192.0.2.1", "198.18.40.10")
print(ex.dev_mtu("sgxdum0"), asked[0], ex.dev_mtu("lo"))
"""


def test_a_device_only_the_namespace_has_is_found_with_its_mtu():
    """A veth device with MTU 1400 in a namespace of its own, asked from nsenter --net: the
    device was not found (the inside device the route lookup names as iif: "Network is
    unreachable", retried without the source) and its MTU read as 1500 (or the host's device
    of that name's)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    ns = f"sgx{os.getpid():x}"[:15]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "sgxdum0", "mtu", "1400", "type", "veth",
                        "peer", "name", "sgxdum1"], check=True)
        assert not os.path.exists("/sys/class/net/sgxdum0")  # (the host has none of that name)
        p = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", PROBE],
                           capture_output=True, text=True, timeout=60, env={**os.environ})
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == ["1400", "sgxdum0", "65536"]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
