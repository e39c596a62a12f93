"""The daemon's one rtnetlink socket (daemon/probe.py NetlinkWatch), live in a namespace of its
own: events lost to a full socket buffer (ENOBUFS) are not left for later.  The socket carries
the link monitor's carrier changes and the route-back judgement's rule and forwarding changes
together, so a burst of rule events can push out a carrier event; the read after the loss asks
the kernel for the tracked devices' state and reports what changed."""

import socket
import subprocess

import pytest

from snatgw.daemon.probe import NetlinkWatch
from snatgw.datapath.netns import enter

pytestmark = pytest.mark.root


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


NS_TAG = "nlw"  # empty_netns's names: sgnlw<pid><random>


@pytest.fixture
def ns(empty_netns):
    return empty_netns


def test_a_carrier_event_lost_to_a_rule_burst_is_recovered(ns):
    _ip("-n", ns, "link", "add", "up0", "type", "veth", "peer", "name", "up0p")
    _ip("-n", ns, "link", "set", "up0", "up")
    _ip("-n", ns, "link", "set", "up0p", "up")
    with enter(ns):
        w = NetlinkWatch()
        try:
            w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (the kernel's minimum, about)
            w.track({"up0"})
            assert w.state == {"up0": True}
            # a burst of rule events fills the buffer; the carrier loss after it is dropped
            batch = "".join(f"rule add from 198.18.{i // 250}.{i % 250} lookup 100 pref {1000 + i}\n"
                            for i in range(400))  # fmt: skip
            subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
            subprocess.run(["ip", "link", "set", "up0p", "down"], check=True)  # up0 loses its carrier
            changes, rules = [], False
            for _ in range(50):  # drain: each read is bounded (DRAIN_MAX datagrams, or up to the loss)
                got, r = w.read()
                changes += got
                rules |= r
            assert rules
            assert changes[-1:] == [("up0", False)], changes
            assert w.state == {"up0": False}
        finally:
            w.close()


def _newlink(name: str, flags: int) -> bytes:
    from pyroute2.netlink.rtnl import RTM_NEWLINK
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    m = ifinfmsg()
    m["header"]["type"] = RTM_NEWLINK
    m["index"], m["flags"] = 7, flags
    m["attrs"] = [("IFLA_IFNAME", name)]
    m.encode()
    return bytes(m.data)


def test_events_queued_before_a_loss_do_not_undo_what_the_dump_after_it_says():
    """The flake this fixes (the live test above, once under load): after ENOBUFS the dump said
    up0 had lost its carrier, then a carrier-up the kernel had queued before the loss was read
    and put it back up: a link reported up while down.  Queued events are older than the dump:
    they go unread."""
    from snatgw.daemon import probe

    up = probe.IFF_UP | probe.IFF_LOWER_UP
    queue = [OSError(105, "No buffer space available"), _newlink("up0", up)]

    class Sock:
        def recv(self, n):
            if not queue:
                raise BlockingIOError
            x = queue.pop(0)
            if isinstance(x, Exception):
                raise x
            return x

    w = NetlinkWatch.__new__(NetlinkWatch)
    from pyroute2.netlink.rtnl.marshal import MarshalRtnl

    w.marshal, w.sock, w.devices, w.state = MarshalRtnl(), Sock(), {"up0"}, {"up0": True}

    def dump():  # the kernel now: up0 without carrier
        w.state["up0"] = False
        return [("up0", False)]

    w._resync = dump
    changes, rules = w.read()
    changes += w.read()[0]
    assert rules and changes == [("up0", False)] and w.state == {"up0": False}

