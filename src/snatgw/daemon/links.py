"""Link health on the daemon's event loop: per configured link a probe round every `interval`
(snatgw.daemon.probe), its replies read when the socket is readable, carrier changes from the
daemon's one netlink socket (probe.NetlinkWatch, read by daemon.extras), and a timer for the next deadline (dead timer or end of hold) so a failure is
acted on when it is due, not at the next round.  The decisions are snatgw.daemon.linkstate's;
when a link's rules must move (to the backup or back) ``on_change(name, on_backup, why)`` is
called on the loop thread: the daemon hands it to its worker, which applies the rules
(Service.set_link), so no backend call ever runs on the loop.

Loop API used (snatgw.daemon.loop): add_reader, remove, every, call_later.
"""

from __future__ import annotations

import time
from typing import Callable

from ..config.links import Link
from ..errors import SnatgwError
from .linkstate import FAILED, LinkHealth
from .probe import NetlinkWatch, Prober, probe_ident

REOPEN_EVERY = 5.0  # seconds between tries to reopen the probe sockets of a link without them


class LinkMonitor:
    def __init__(self, links: tuple[Link, ...], on_change: Callable[[str, bool, str], None], log,
                 clock: Callable[[], float] = time.monotonic, failed: set[str] | frozenset[str] = frozenset()):
        """``failed``: links whose rules run on their backups already (a reload rebuilt the
        monitor): they start failed, so they must recover (rise, hold) before moving back."""
        self.links = {lk.name: lk for lk in links}
        self.on_change, self.log, self.clock = on_change, log, clock
        now = clock()
        self.health = {lk.name: LinkHealth(lk.name, lk.interval, lk.fall, lk.rise, lk.hold, now) for lk in links}
        for name in failed:
            if name in self.health:
                self.health[name]._to(FAILED, now, "failed before the reload")
        self.probers = {lk.name: Prober(lk, probe_ident(i)) for i, lk in enumerate(links)}
        self.carrier: NetlinkWatch | None = None  # the daemon's (extras), not ours to close
        self.loop = None
        self._timers: dict[str, object] = {}
        self._deadline: dict[str, object] = {}
        self._reopen_at: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    def attach(self, loop, watch: NetlinkWatch | None) -> None:
        """``watch``: the daemon's netlink socket (None: none could be opened); its carrier
        changes come to ``on_carrier``."""
        self.loop = loop
        for name in self.links:
            self._open(name)
        devices = {p.dev for p in self.probers.values() if p.dev} | {lk.oif for lk in self.links.values() if lk.oif}
        try:
            if watch is None:
                raise OSError("no netlink socket")
            watch.track(devices)
            self.carrier = watch
            for name, p in self.probers.items():
                dev = p.dev or self.links[name].oif
                if dev is not None and not self.carrier.state.get(dev, False):
                    self._after(name, self.health[name].set_carrier(False, self.clock()))
        except OSError as e:  # no netlink: probes alone decide
            self.log.warning("link_carrier_unavailable", error=str(e))
        for name, lk in self.links.items():
            self._timers[name] = loop.every(lk.interval, lambda n=name: self._round(n), first=0)
            self._arm(name)

    def close(self) -> None:
        for t in list(self._timers.values()) + list(self._deadline.values()):
            t.cancel()
        for p in self.probers.values():
            if p.rx is not None and self.loop is not None:
                self.loop.remove(p.rx)
            p.close()
        if self.carrier is not None:
            self.carrier.track(())  # the socket stays the daemon's (rule events)
            self.carrier = None
        self._timers, self._deadline = {}, {}

    def _open(self, name: str) -> None:
        p = self.probers[name]
        try:
            p.open()
        except (SnatgwError, OSError) as e:
            self._reopen_at[name] = self.clock() + REOPEN_EVERY
            self.log.warning("link_probe_unavailable", link=name, error=str(e))
            return
        self.loop.add_reader(p.rx, lambda n=name: self._on_reply(n))
        self.log.info("link_probing", link=name, dev=p.dev, source=str(p.source), gw=str(p.link.gw),
                      targets=" ".join(map(str, p.link.probe)), interval=p.link.interval)

    # ------------------------------------------------------------------ events (loop thread)
    def _round(self, name: str) -> None:
        h, p = self.health[name], self.probers[name]
        now = self.clock()
        if p.tx is None and now >= self._reopen_at.get(name, 0.0):
            self._open(name)
        t = h.sent(now)
        p.send_round(h.round)
        self._after(name, t)

    def _on_reply(self, name: str) -> None:
        h, p = self.health[name], self.probers[name]
        now = self.clock()
        for seq in p.drain():
            rnd = h.round - ((h.round - seq) & 0xFFFF)  # the round this sequence number is, unwrapped
            self._after(name, h.reply(rnd, now))

    def on_carrier(self, changes: list[tuple[str, bool]]) -> None:
        """Carrier changes of the tracked devices (NetlinkWatch.read, on the loop thread)."""
        now = self.clock()
        for dev, on in changes:
            self.log.info("link_carrier", dev=dev, carrier=on)
            for name, p in self.probers.items():
                if (p.dev or self.links[name].oif) == dev:
                    if on:  # the device may have been deleted and made again: new sockets
                        self._reopen(name)
                    self._after(name, self.health[name].set_carrier(on, now))

    def _reopen(self, name: str) -> None:
        p = self.probers[name]
        if p.rx is not None:
            self.loop.remove(p.rx)
        p.close()
        self._open(name)

    def _check(self, name: str) -> None:
        self._deadline.pop(name, None)
        self._after(name, self.health[name].check(self.clock()))

    # ------------------------------------------------------------------ transitions
    def _after(self, name: str, transition: str | None) -> None:
        h = self.health[name]
        if transition is not None:
            lk = self.links[name]
            # going down is a warning; coming back (recovering, up) is good news: info
            self.log.emit("warning" if transition == FAILED else "info", "link_" + transition, link=name,
                          why=h.why, gw=str(lk.gw), backup_gw=str(lk.backup_gw), rules_on_backup=h.on_backup)
            if transition != "recovering":  # failed: move to the backup; up: move back
                self.on_change(name, h.on_backup, h.why)
        self._arm(name)

    def _arm(self, name: str) -> None:
        """One timer per link, at its next deadline (dead timer or end of hold)."""
        if self.loop is None:
            return
        old = self._deadline.pop(name, None)
        if old is not None:
            old.cancel()
        h = self.health[name]
        if h.state == FAILED:
            return  # nothing is due: replies, carrier or rounds move it on
        delay = max(0.0, h.next_deadline() - self.clock()) + 0.001
        self._deadline[name] = self.loop.call_later(delay, lambda: self._check(name))

    def as_dict(self) -> dict:
        now = self.clock()
        out = {}
        for name, h in self.health.items():
            p = self.probers[name]
            out[name] = {**h.as_dict(now), "dev": p.dev, "source": str(p.source) if p.source else None,
                         "sent": p.sent, "received": p.received, "send_errors": p.send_errors,
                         "last_error": p.last_error, "gw": str(self.links[name].gw),
                         "backup_gw": str(self.links[name].backup_gw)}
        return out
