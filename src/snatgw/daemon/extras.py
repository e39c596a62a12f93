"""What issue 13 adds to the running daemon, registered on its event loop (snatgw.daemon.loop):
the link monitor (probes, carrier, automatic failover: snatgw.daemon.links), the Prometheus
listener (snatgw.daemon.metrics) and the audit log (snatgw.daemon.audit); and the daemon's one
netlink socket (probe.NetlinkWatch): carrier changes go to the link monitor, IPv4 rule and
forwarding changes to ``Service.refresh_route_back`` on the worker (one job at a time: events
while it runs make one more, never a queue).  ``Extras.attach()`` after start, ``refresh()`` after every
reload (links or metrics_listen may have changed), ``close()`` on the way out.

Backend work stays on the worker: a link verdict becomes ``worker.submit(Service.set_link)``,
a scrape ``worker.submit(metrics.scrape)``.
"""

from __future__ import annotations

import threading

import os

from ..config.parse import parse_listen
from .links import LinkMonitor
from .metrics import MetricsServer
from .probe import NetlinkWatch


def _key_stamp(path: str | None):
    """A reload re-reads the key when its file changed (a new secret, same path)."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return st and (st.st_ino, st.st_mtime_ns, st.st_size)


SYNC_RETRY = 10.0  # seconds before a session sync that could not start (bind) is tried again


class Extras:
    def __init__(self, service, loop, worker, log, writer=None):
        self.service, self.loop, self.worker, self.log = service, loop, worker, log
        self.writer = writer  # daemon.writer.Writer: the audit log's file/syslog writes go there
        self.monitor: LinkMonitor | None = None
        self.metrics: MetricsServer | None = None
        self._links = None
        self._listen = None
        self.audit = None  # daemon.audit.AuditReader while `audit_log` is set
        self._audit_key = None
        self.sync = None  # daemon.sync.SyncService while sync_peer is set
        self._sync_key = None
        self._sync_retry = None  # Timer of the next try of a sync that failed to start
        self._closed = False
        self.netlink: NetlinkWatch | None = None
        self._judging = self._judge_again = False

    def attach(self) -> None:
        try:
            self.netlink = NetlinkWatch()
            self.loop.add_reader(self.netlink, self._on_netlink)
            # the backend judged at its start, before this socket listened: a rule added in
            # between sent its event to nobody, so judge once more now that one listens
            self._judge_route_back()
        except OSError as e:  # links: probes alone decide; the route back: judged at each hook check
            self.log.warning("netlink_unavailable", error=str(e))
            self.netlink = None
        self.refresh()
        # a reload (SIGHUP or control op, on the worker) may change links or metrics_listen
        self.service.on_reload = self._refresh_soon

    def _refresh_soon(self) -> threading.Event:
        """refresh() on the loop; the event is set once it ran (the reload's answer waits for it
        a moment, so a metrics_listen that cannot listen is in the answer, not only the log)."""
        done = threading.Event()

        def run() -> None:
            try:
                self.refresh()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        return done

    def refresh(self) -> None:
        cfg = self.service.config
        if cfg.links != self._links:
            self._stop_monitor()
            known = {lk.name for lk in cfg.links}
            for name in list(self.service.failed_links - known):  # a link removed from the config
                self.service.failed_links.discard(name)
            if cfg.links:
                self.monitor = LinkMonitor(cfg.links, self._on_link, self.log, clock=self.loop.clock,
                                           failed=set(self.service.failed_links))
                self.monitor.attach(self.loop, self.netlink)
                self.service.link_monitor = self.monitor
            self._links = cfg.links
        listen = cfg.settings.metrics_listen
        if listen != self._listen or (listen and self.metrics is None):  # (a failed listen: tried again)
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            self.service.metrics_error = None
            if listen:
                try:
                    self.metrics = MetricsServer(*parse_listen(listen), self.service, self.log)
                    self.metrics.attach(self.loop, self.worker)
                except OSError as e:  # address in use, not local: the daemon runs on without it
                    self.log.error("metrics_listen_failed", address=listen, error=str(e))
                    self.metrics = None
                    self.service.metrics_error = e.strerror or str(e)  # a problem in `status` until fixed
            self._listen = listen
        s = cfg.settings
        audit_key = (s.audit_log, s.audit_log_max_size, s.audit_log_keep) if s.audit_log else None
        if self.sync is not None and audit_key != self._audit_key:
            self.sync.own_ring(False)  # one reader of the datapath's ring at a time
        self._refresh_audit(s)
        self._refresh_sync(s)

    def _refresh_sync(self, s) -> None:
        """Session sync on, off or re-bound (settings changed); then who reads the ring: the
        audit log's reader hands its records over, else the sync reads it itself."""
        key = (s.sync_peer, s.sync_local, s.sync_port, s.sync_key, _key_stamp(s.sync_key), s.sync_interval,
               s.sync_refresh) if s.sync_peer else None  # fmt: skip
        if key != self._sync_key:
            old = self.sync
            self.sync = self.service.sync = None
            self._stop_sync()
            if key is not None:
                from .sync import SyncService

                try:
                    self.sync = SyncService(s, self.service.backend, self.log, self.worker)
                    if old is not None:  # it stops; the same peer and key: the new one takes its queues
                        old.hand_over(self.sync)
                        old = None
                    self.sync.attach(self.loop)
                except Exception as e:  # noqa: BLE001 - the daemon runs on; status shows sync off and why
                    self.log.error("sync_failed", peer=s.sync_peer, local=s.sync_local, error=str(e),
                                   retry=SYNC_RETRY)  # fmt: skip
                    if self.sync is not None:
                        self.sync.close()
                    self.sync = None
                    self.service.sync_error = str(e)
                    key = None  # tried again (sync_local may not be up yet): in SYNC_RETRY s, or at a reload
                    self._sync_retry = self.loop.call_later(SYNC_RETRY, self._retry_sync)
                else:
                    self.service.sync_error = None
            if old is not None:  # (turned off, or the new one could not be made)
                old.close()
            self.service.sync = self.sync
            self._sync_key = key
        if self.sync is not None:
            if self.audit is not None and self.audit.source is not None:
                self.sync.own_ring(False)
                self.audit.tap = self.sync.on_ring
            else:
                self.sync.own_ring(True)

    def _retry_sync(self) -> None:
        self._sync_retry = None
        if self.sync is None and not self._closed:
            self._refresh_sync(self.service.config.settings)

    def _stop_sync(self) -> None:
        if self._sync_retry is not None:
            self._sync_retry.cancel()
            self._sync_retry = None
        if self.audit is not None:
            self.audit.tap = None
        if self.sync is not None:
            self.sync.close()
            self.sync = None
            self.service.sync = None

    def _refresh_audit(self, s) -> None:
        key = (s.audit_log, s.audit_log_max_size, s.audit_log_keep) if s.audit_log else None
        if key == self._audit_key:
            return
        self._stop_audit()
        if key is not None:
            from .audit import AuditReader

            try:
                self.audit = AuditReader(s, self.service.backend, self.log, writer=self.writer)
                self.audit.attach(self.loop)
            except Exception as e:  # noqa: BLE001 - the daemon runs on; status shows the audit log off
                self.log.error("audit_log_failed", target=s.audit_log, error=str(e))
                if self.audit is not None:
                    self.audit.close()
                self.audit = None
        self.service.audit = self.audit
        self._audit_key = key

    def _stop_audit(self) -> None:
        if self.audit is not None:
            self.audit.close()
            self.audit = None
            self.service.audit = None

    def _on_netlink(self) -> None:
        changes, rules = self.netlink.read()
        if changes and self.monitor is not None:
            self.monitor.on_carrier(changes)
        if rules:
            self._judge_route_back()

    def _judge_route_back(self) -> None:
        """An IPv4 rule or forwarding switch changed: judge the route back again (worker)."""
        if self._judging:
            self._judge_again = True  # one more after this one: it may have read the old rules
            return
        self._judging = True
        self.worker.submit(self.service.refresh_route_back, self._judged, bounded=False)

    def _judged(self, _result, error) -> None:
        self._judging = False
        if error is not None:
            self.log.error("route_back_judge_failed", error=str(error))
        if self._judge_again:
            self._judge_again = False
            self._judge_route_back()

    def _on_link(self, name: str, on_backup: bool, why: str) -> None:
        """A link verdict (loop thread): the rules move on the worker, never here."""
        def apply() -> bool:
            return self.service.set_link(name, on_backup, why)

        self.worker.submit(apply, bounded=False)

    def _stop_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
            self.service.link_monitor = None

    def close(self) -> None:
        self._closed = True
        self._stop_sync()
        self._stop_audit()
        self._stop_monitor()
        if self.netlink is not None:
            self.loop.remove(self.netlink)
            self.netlink.close()
            self.netlink = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
