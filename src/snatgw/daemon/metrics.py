"""Prometheus metrics of the running daemon (setting ``metrics_listen ADDR:PORT``, off by
default): a prometheus_client collector over the Service, and a small HTTP/1.0 server on the
daemon's event loop that answers ``GET /metrics``.

The scrape reads the datapath (counters, session and map fill), so it runs on the daemon's
worker (``worker.submit``), never on the loop; the loop only accepts, reads one bounded request
and writes the answer.  Labels are stable: a rule is named by its stable id (``rule_id``) and
its identity text (from, to, gw, oif), never its position; reasons by their layout names.

Metric families (all prefixed ``snatgw_``):
  up, info{version,backend}                 1; build and backend
  rule_packets_total, rule_bytes_total      per rule {rule_id, rule}
  rule_sessions                             live sessions per rule
  reason_packets_total{reason}              per datapath reason (snatgw.layout.Reason)
  counter_read_failures_total               failed reads of nftables' named counters (nft: every
                                            counter, and conntrack's insert_failed; bpf: the leak
                                            guard's drops in DROP_LEAK); the counters keep the
                                            last figures read, never dip; before any read has
                                            worked, reason and rule counters are left out
  sessions, sessions_max                    the session table
  map_entries{map}, map_max_entries{map}    the fill of each bpf map with one (not
                                            the arrays), conntrack (nft)
  route_back_reused                         1 while new sessions' route back is the reverse-path
                                            check's (bpf; snatgw status `route back`)
  addr_sessions{addr}, addr_refusals_total{addr}   per SNAT address, when the datapath counts them
  hosts, host_sessions_max                  inside hosts with a live count; the busiest one's sessions
  host_counts_age_seconds                   0 while a host limit has the datapath count per host,
                                            else the age of the last sweep's recount (absent: unknown)
  spill_memo_hits_total, spill_memos_written_total   the port allocator's spill memo (bpf)
  port_searches_total, port_search_tries_total       its port searches and the candidates they
                                            tried: their ratio's rise is pressure before refusals (bpf)
  gc_sweeps_total, gc_sessions_removed_total, gc_seconds_total   session expiry work
  reloads_total{result}, last_reload_success, last_reload_timestamp_seconds
  link_up{link}, link_on_backup{link}, link_transitions_total{link},
  link_probes_sent_total{link}, link_probe_replies_total{link}, device_carrier{device}
  prog_run_seconds_total{prog}, prog_runs_total{prog}   when kernel.bpf_stats_enabled is 1
  log_events_total{level}                   error and warning events logged since start
  audit_records_total{result}               audit log records: written, lost_datapath (the ring
                                            full / conntrack events overrun), lost_write, lost_queue,
                                            lost_writer
  audit_write_errors_total, audit_rotations_total   (only while `audit_log` is set)
  sync_datagrams_total{direction}, sync_records_total{result}, sync_drops_total{reason},
  sync_seconds_since_peer                   the session sync (only while sync_peer is set)
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from .. import __version__
from ..config.parse import parse_listen

__all__ = ["ServiceCollector", "MetricsServer", "scrape", "parse_listen"]

MAX_REQUEST = 8192  # bytes of an HTTP request we read; more is refused
MAX_CLIENTS = 16  # open scrape connections; more are closed at once
CLIENT_TIMEOUT = 5.0  # seconds a connection may take to send its request


def _g(name, doc, labels=()):
    return GaugeMetricFamily(f"snatgw_{name}", doc, labels=list(labels))


def _c(name, doc, labels=()):
    return CounterMetricFamily(f"snatgw_{name}", doc, labels=list(labels))


def bpf_stats_enabled() -> bool:
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def prog_run_stats(prog_ids: dict[str, int]) -> dict[str, tuple[float, int]]:
    """prog name -> (run seconds, runs) from bpftool, for programs by id (only meaningful when
    kernel.bpf_stats_enabled is 1: the kernel counts nothing otherwise)."""
    out: dict[str, tuple[float, int]] = {}
    for name, pid in prog_ids.items():
        p = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(pid)], capture_output=True, text=True,
                           timeout=5)  # fmt: skip
        if p.returncode != 0:
            continue
        try:
            d = json.loads(p.stdout)
        except ValueError:
            continue
        t, n = out.get(name, (0.0, 0))
        out[name] = (t + d.get("run_time_ns", 0) / 1e9, n + d.get("run_cnt", 0))
    return out


class ServiceCollector:
    """collect() reads the Service: call it on the worker (it reads maps)."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        s = self.service
        yield self._up()
        info = _g("info", "build and backend", ("version", "backend"))
        info.add_metric([__version__, s.backend.name], 1)
        yield info
        yield from self._datapath(s)
        yield from self._work(s)
        yield from self._links(s)
        yield from self._audit(s)
        yield from self._sync(s)

    def _sync(self, s):
        if getattr(s, "sync", None) is None:
            return
        y = s.sync.stats()
        dg = _c("sync_datagrams", "session sync datagrams by direction (received: valid ones)", ("direction",))
        dg.add_metric(["sent"], y["sent_datagrams"])
        dg.add_metric(["received"], y["received_datagrams"])
        yield dg
        rec = _c("sync_records", "session sync records: sent, received, and what the installer made of them",
                 ("result",))  # fmt: skip
        for k in ("sent_records", "received_records", "installed", "refreshed", "ended", "rejected", "conflicts",
                  "table_full", "no_route", "stale_end", "end_unknown", "other_rule", "no_rule",
                  "host_limit"):  # fmt: skip
            rec.add_metric([k.removesuffix("_records")], y.get(k, 0))
        yield rec
        dr = _c("sync_drops", "session sync datagrams and records dropped, by reason", ("reason",))
        for k, v in y["drops"].items():
            dr.add_metric([k], v)
        dr.add_metric(["foreign"], y["foreign"])
        yield dr
        last = _g("sync_seconds_since_peer", "seconds since the last valid datagram from the peer (-1: never)")
        last.add_metric([], -1 if y["seconds_since_peer"] is None else y["seconds_since_peer"])
        yield last

    def _audit(self, s):
        if getattr(s, "audit", None) is None:
            return
        a = s.audit_stats()
        rec = _c("audit_records", "audit log records by result", ("result",))
        for result, key in (("written", "records"), ("lost_datapath", "lost_datapath"),
                            ("lost_write", "lost_write"), ("lost_queue", "lost_queue"),
                            ("lost_writer", "lost_writer")):  # fmt: skip
            rec.add_metric([result], a.get(key) or 0)
        yield rec
        for name, key, doc in (("audit_write_errors", "write_errors", "failed writes of the audit log"),
                               ("audit_rotations", "rotations", "rotations of the audit log file")):  # fmt: skip
            m = _c(name, doc)
            m.add_metric([], a.get(key) or 0)
            yield m

    def _up(self):
        m = _g("up", "1 while the daemon answers")
        m.add_metric([], 1)
        return m

    def _datapath(self, s):
        rules = {r.rule_id: r for r in s.effective(s.config).rules}
        st = s.backend.stats()
        pk = _c("rule_packets", "packets per rule (both directions)", ("rule_id", "rule"))
        by = _c("rule_bytes", "bytes per rule (both directions)", ("rule_id", "rule"))
        live = _g("rule_sessions", "live sessions per rule", ("rule_id", "rule"))
        reads = getattr(s.backend, "counter_reads", None)
        # counters read from nftables that no read has given yet: left out (a gap), not 0 then N
        unknown = bool(reads is not None and getattr(reads, "unknown", None))
        # every running rule has its series from the start, 0 until it counts (the bpf backend
        # keeps counters only for rules that met a packet: absent series break rate() and alerts
        # on a rule that never matched); then the counted rules no longer running
        for rid in sorted(rules.keys() | st.rules.keys()):
            r, c = rules.get(rid), st.rules.get(rid)
            labels = [str(rid), r.identity_text() if r else "(not in the running config)"]
            pk.add_metric(labels, c.packets if c else 0)
            by.add_metric(labels, c.bytes if c else 0)
            live.add_metric(labels, (c.sessions if c.live is None else c.live) if c else 0)  # bpf's sessions: made
        yield from ((live,) if unknown else (pk, by, live))
        if not unknown:
            rs = _c("reason_packets", "packets per datapath reason (snatgw.layout.Reason)", ("reason",))
            for name, n in sorted(st.reasons.items()):
                rs.add_metric([name], n)
            yield rs
        if reads is not None:  # nft's named counters (nft: the table's; bpf: the leak guard's)
            rf = _c("counter_read_failures", "failed reads of nftables' named counters (the counters "
                    "exported kept the figures of the last read that worked)")
            rf.add_metric([], reads.failed)
            yield rf
        h = s.backend.health() if hasattr(s.backend, "health") else {}
        sess = _g("sessions", "live sessions")
        sess.add_metric([], h.get("sessions", st.sessions))
        mx = _g("sessions_max", "max_sessions (the table's size)")
        mx.add_metric([], s.config.settings.max_sessions)
        yield from (sess, mx)
        ent = _g("map_entries", "entries in each datapath map that has a fill (not the arrays)", ("map",))
        cap = _g("map_max_entries", "capacity of each datapath map", ("map",))
        for m in h.get("maps", []):
            if m.get("has_fill") is False:  # an array: every slot exists, 100% "full" by construction
                continue
            ent.add_metric([m["name"]], m["entries"])
            cap.add_metric([m["name"]], m["max_entries"])
        yield from (ent, cap)
        if h.get("route_back"):  # bpf: a new session's route back (docs/datapath.md step 13)
            rb = _g("route_back_reused", "1 while a new session's route back is the reverse-path check's "
                    "(no iif policy rule, every device forwarding); 0: looked up per session")
            rb.add_metric([], 1 if h["route_back"]["reused"] else 0)
            yield rb
        addrs = getattr(s.backend, "addr_stats", None)
        if callable(addrs):  # per SNAT address live sessions and refusals, when the datapath counts them
            a_s = _g("addr_sessions", "live sessions per SNAT address", ("addr",))
            a_r = _c("addr_refusals", "new flows refused per SNAT address", ("addr",))
            for addr, (n, refused) in sorted(addrs().items()):
                a_s.add_metric([str(addr)], n)
                a_r.add_metric([str(addr)], refused)
            yield from (a_s, a_r)
        p = st.pressure or {}
        if "hosts_total" in p:  # per inside host: how many, the busiest, and how fresh
            hn = _g("hosts", "inside hosts with a live count (sessions or refusals)")
            hn.add_metric([], p["hosts_total"])
            hm = _g("host_sessions_max", "live sessions of the busiest inside host")
            hm.add_metric([], max((h["sessions"] for h in p.get("hosts", [])), default=0))
            yield from (hn, hm)
            age = 0.0 if p.get("hosts_counted", "live") == "live" else p.get("hosts_age_seconds")
            if age is not None:
                ha = _g("host_counts_age_seconds", "age of the per-host sessions: 0 while counted as "
                        "sessions are made (a host limit is set), else since the last sweep's recount")
                ha.add_metric([], age)
                yield ha
        alloc = (st.pressure or {}).get("allocator")
        if alloc is not None:  # the port allocator's counters (bpf: snat_alloc_cnt)
            hits = _c("spill_memo_hits", "address searches cut short by the spill memo (found full moments before)")
            hits.add_metric([], alloc.get("spill_memo_hits", 0))
            made = _c("spill_memos_written", "full port searches of an address that found no free port (spill memos)")
            made.add_metric([], alloc.get("spill_memos_written", 0))
            yield from (hits, made)
            if "port_searches" in alloc:  # absent where the maps predate them: never a made-up 0
                ns = _c("port_searches", "port searches run (one per new flow that reached the search)")
                ns.add_metric([], alloc["port_searches"])
                nt = _c("port_search_tries", "candidate ports tried by the port searches (a spill memo skip is none)")
                nt.add_metric([], alloc.get("port_search_tries", 0))
                yield from (ns, nt)
        progs = {hk["program"]: hk["prog_id"] for hk in h.get("hooks", []) if isinstance(hk.get("prog_id"), int)
                 and s.backend.name == "bpf"}  # fmt: skip
        if progs and bpf_stats_enabled():
            rt = _c("prog_run_seconds", "time in each datapath program (kernel.bpf_stats_enabled)", ("prog",))
            rc = _c("prog_runs", "runs of each datapath program (kernel.bpf_stats_enabled)", ("prog",))
            for name, (secs, n) in sorted(prog_run_stats(progs).items()):
                rt.add_metric([name], secs)
                rc.add_metric([name], n)
            yield from (rt, rc)

    def _work(self, s):
        gc = getattr(s, "gc_stats", {"sweeps": 0, "removed": 0, "seconds": 0.0})
        for key, doc in (("sweeps", "session expiry sweeps"), ("removed", "sessions removed by expiry"),
                         ("seconds", "seconds spent in expiry sweeps")):
            m = _c(f"gc_{'sessions_removed' if key == 'removed' else key}", doc)
            m.add_metric([], gc.get(key, 0))
            yield m
        rl = _c("reloads", "reloads, adm batches and link failovers/failbacks by result", ("result",))
        ok = getattr(s, "applies", {"ok": 0, "failed": 0})
        for result in ("ok", "failed"):
            rl.add_metric([result], ok.get(result, 0))
        yield rl
        la = s.last_apply
        last = _g("last_reload_success", "1 when the last reload/adm batch/failover worked (1 before any)")
        last.add_metric([], 1 if la is None or la["ok"] else 0)
        when = _g("last_reload_timestamp_seconds", "when the last reload/adm batch/failover ran (0: none)")
        when.add_metric([], la["at"] if la else 0)
        yield from (last, when)
        ev = _c("log_events", "log events since start by level", ("level",))
        # error and warning from 0: a series that first appears at 1 is no increase() to Prometheus
        counts = {"error": 0, "warning": 0, **getattr(s.log, "counts", {})}
        for level, n in sorted(counts.items()):
            ev.add_metric([level], n)
        yield ev

    def _links(self, s):
        mon = getattr(s, "link_monitor", None)
        if mon is None:
            return
        up = _g("link_up", "1 when the link is healthy and its rules run on it", ("link",))
        bk = _g("link_on_backup", "1 while the link's rules run on its backup", ("link",))
        tr = _c("link_transitions", "link state changes", ("link",))
        sent = _c("link_probes_sent", "probe echo requests sent", ("link",))
        got = _c("link_probe_replies", "probe echo replies received", ("link",))
        for name, lk in sorted(mon.as_dict().items()):
            up.add_metric([name], 1 if lk["state"] == "up" else 0)
            bk.add_metric([name], 1 if lk["on_backup"] else 0)
            tr.add_metric([name], lk["transitions"])
            sent.add_metric([name], lk["sent"])
            got.add_metric([name], lk["received"])
        yield from (up, bk, tr, sent, got)
        if mon.carrier is not None:
            car = _g("device_carrier", "1 when the probed link's device has carrier", ("device",))
            for dev, on in sorted(mon.carrier.state.items()):
                car.add_metric([dev], 1 if on else 0)
            yield car


def scrape(service) -> bytes:
    """The exposition text of one scrape (worker thread)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ServiceCollector(service))
    return generate_latest(reg)


class _Client:
    __slots__ = ("sock", "buf", "out", "sent", "started", "busy")

    def __init__(self, sock: socket.socket, now: float):
        self.sock, self.buf, self.out, self.started, self.busy = sock, b"", b"", now, False
        self.sent = 0  # bytes of ``out`` sent


class MetricsServer:
    """GET /metrics on the loop; the scrape itself on the worker."""

    def __init__(self, addr: str, port: int, service, log):
        self.service, self.log = service, log
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, port))
        self.sock.listen(32)
        self.sock.setblocking(False)
        self.addr = self.sock.getsockname()
        self.clients: dict[int, _Client] = {}
        self.loop = self.worker = None
        self.timer = None
        self.scrapes = 0

    def attach(self, loop, worker) -> None:
        self.loop, self.worker = loop, worker
        loop.add_reader(self.sock, self._accept)
        self.timer = loop.every(1.0, self._reap)
        self.log.info("metrics_listening", address=f"{self.addr[0]}:{self.addr[1]}")

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove(self.sock)
            if self.timer is not None:
                self.timer.cancel()
        for c in list(self.clients.values()):
            self._drop(c)
        self.sock.close()

    def _accept(self) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: try again on the next readiness
                self.log.warning("metrics_accept_failed", error=str(e))
                return
            if len(self.clients) >= MAX_CLIENTS:
                # full: the longest silent client goes, not the newcomer (16 connections that
                # send nothing, renewed every CLIENT_TIMEOUT, shut every scrape out); a client
                # whose request is in or whose answer is being sent stays
                idle = [x for x in self.clients.values() if not x.busy and not x.out]
                if not idle:
                    conn.close()
                    continue
                self._drop(min(idle, key=lambda x: x.started))
            conn.setblocking(False)
            c = _Client(conn, self.loop.clock())
            self.clients[conn.fileno()] = c
            self.loop.add_reader(conn, lambda c=c: self._read(c))

    def _read(self, c: _Client) -> None:
        try:
            data = c.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        c.buf += data
        if b"\r\n\r\n" not in c.buf and b"\n\n" not in c.buf:
            if len(c.buf) > MAX_REQUEST:
                self._answer(c, 431, b"request header too large\n")
            return
        self.loop.remove(c.sock)
        line = c.buf.split(b"\n", 1)[0].decode("latin-1").split()
        if len(line) < 2 or line[0] not in ("GET", "HEAD"):
            self._answer(c, 405, b"only GET /metrics\n")
        elif line[1].split("?", 1)[0] != "/metrics":
            self._answer(c, 404, b"try /metrics\n")
        else:
            c.busy = True
            head = line[0] == "HEAD"
            if not self.worker.submit(lambda: scrape(self.service), lambda body, err, c=c: self._scraped(c, body, err, head)):
                c.busy = False
                self._answer(c, 503, b"busy\n")

    def _scraped(self, c: _Client, body, err, head: bool) -> None:
        c.busy = False
        if c.sock.fileno() < 0:
            return
        if err is not None:
            self.log.error("metrics_scrape_failed", error=repr(err))
            self._answer(c, 500, f"scrape failed: {err}\n".encode())
            return
        self.scrapes += 1
        self._answer(c, 200, b"" if head else body, CONTENT_TYPE_LATEST, length=len(body))

    def _answer(self, c: _Client, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
                length: int | None = None) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large",
                  500: "Internal Server Error", 503: "Service Unavailable"}[code]
        head = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: "
                f"{len(body) if length is None else length}\r\nConnection: close\r\n\r\n").encode()
        c.out, c.sent = head + body, 0
        c.started = self.loop.clock()  # from now CLIENT_TIMEOUT counts from the last progress
        self.loop.add_writer(c.sock, lambda: self._write(c))

    def _write(self, c: _Client) -> None:
        try:
            n = c.sock.send(memoryview(c.out)[c.sent:c.sent + (1 << 16)])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        c.sent += n
        c.started = self.loop.clock()
        if c.sent >= len(c.out):
            self._drop(c)

    def _drop(self, c: _Client) -> None:
        fd = c.sock.fileno()
        if fd >= 0:
            self.loop.remove(c.sock)
            self.clients.pop(fd, None)
        c.sock.close()

    def _reap(self) -> None:
        """Connections that never finished their request within CLIENT_TIMEOUT go, and those
        that read none of their answer for as long (they held a slot and the body for good:
        MAX_CLIENTS of them shut Prometheus out)."""
        now = self.loop.clock()
        for c in list(self.clients.values()):
            if not c.busy and now - c.started > CLIENT_TIMEOUT:
                self._drop(c)
