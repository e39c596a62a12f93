"""Session sync of the bpf backend (docs/operations.md "Stateful failover (bpf backend)"): both
gateways of a keepalived pair send what their session table holds to the other over UDP on a
dedicated link, and install what they receive, so that the one that takes the VIP and the pool
carries the other's connections on with the same SNAT address and port.  The wire format is
synccodec's; the table's side (records of our pairs, installing the peer's) is
datapath/bpf/synctable.py.

Settings (`snatgw { }` block): ``sync_peer ADDR``, ``sync_local ADDR``, ``sync_port N``
(3781), ``sync_key FILE``, ``sync_interval SECONDS`` (1: a heartbeat at least this often; the
peer is a problem in status after SILENT_INTERVALS of them without a valid datagram),
``sync_refresh SECONDS`` (10: the refresh walk's period).

Freshness (synccodec's docstring): records are taken only from datagrams that echo our boot id,
so what was recorded on the link before this sync started is refused (``stale``).  When what
we echo changes (the peer's boot id learnt at our start, or confirmed later) we say hello (a
heartbeat echoing it) at once; when a boot id of the peer's is confirmed (its datagram echoes
ours: a peer that started, or our own start) we send our whole table: the records sent
meanwhile echoed another boot id and the peer dropped them.  A peer that restarts while we run
learns our boot id from our next datagram (at the latest the next heartbeat) and is confirmed
once it echoes it (synccodec: a stale datagram no longer changes what we echo once a boot id is
confirmed, so a replayed one cannot).

I/O structure (daemon/loop.py):
- the UDP socket, bound to sync_local:sync_port, is a reader of the loop: each callback reads at
  most RECV_BATCH datagrams, drops those not from sync_peer:sync_port (``foreign``), decodes
  and checks them (synccodec.Decoder; the peer's boot id it learns is what our datagrams echo)
  and queues their records (at most RECV_QUEUE_MAX; more are dropped and counted
  ``recv_queue``); one worker job at a time installs at most INSTALL_BATCH
  of them for at most INSTALL_SECONDS (BpfBackend.sync_install; the rest goes back to the
  queue's front, so that control requests waiting for the worker run between), then the next;
- what to send: the datapath's create and end records (the snat_audit ring, turned on by the
  sync even without audit_log: read by the audit log's reader, which hands them over, or here
  while no audit log is written) and the refresh walk: every sync_refresh seconds the whole table,
  WALK_CHUNK pairs per worker job, each job only once the send queue has room for it (never
  the whole table at once; a walk of a million sessions takes as long as the link needs).
  A peer's boot id confirmed (a peer that started and hears us) makes a walk start at once.
  A heartbeat (a datagram of no records) leaves every sync_interval whatever else is sent.
  Records wait in the send queue (SEND_QUEUE_MAX; more from the ring are dropped and counted
  ``send_queue``); every FLUSH_EVERY seconds at most FLUSH_DATAGRAMS datagrams leave.  A full
  socket buffer keeps the rest for the next flush.

A gateway with no traffic simply has nothing new to send; both send and receive whichever of
them is MASTER: nothing is switched at a failover.
"""

from __future__ import annotations

import collections
import errno
import hmac
import socket
import time

from ..config.parse import read_sync_key
from ..datapath.bpf.maps import monotonic_ns
from ..datapath.bpf.synctable import COUNTS, audit_record, pair_record
from . import synccodec as C

RECV_BATCH = 64  # datagrams one reader callback takes
RECV_QUEUE_MAX = 65536  # records waiting for the worker
INSTALL_BATCH = 4096  # records one worker job installs
INSTALL_SECONDS = 0.1  # at most: the rest of its batch goes back to the queue's front (each new (inside host, remote) pair costs two rtnetlink requests)
SEND_QUEUE_MAX = 65536  # records waiting to be sent
FLUSH_EVERY = 0.1  # seconds between two sends of what is queued (the ~100 ms of a new session)
FLUSH_DATAGRAMS = 256  # datagrams one flush sends at most (~10,000 records: 100,000 a second)
SILENT_INTERVALS = 3  # sync_intervals without a valid datagram from the peer: a problem in status
WALK_CHUNK = 2048  # pairs one worker job of the walk reads
RING_BATCH = 4096  # ring records one read takes while the sync reads the ring itself
SOCK_BUF = 4 << 20  # socket buffers asked for (the kernel caps them at rmem_max/wmem_max)


class SyncService:
    """The sync of one set of settings (a reload that changes them makes a new one, which goes
    on with this one's wire state and queues when the peer and key are the same: hand_over)."""

    def __init__(self, settings, backend, log, worker, clock=time.monotonic):
        self.settings, self.backend, self.log, self.worker, self.clock = settings, backend, log, worker, clock
        if not hasattr(backend, "sync_install"):  # (`run --backend nft` over a file with sync settings)
            raise ValueError(f"session sync is the bpf backend's, not {getattr(backend, 'name', '?')}'s; "
                             "with the nft backend use conntrackd")  # fmt: skip
        self.peer = (settings.sync_peer, settings.sync_port)
        key = read_sync_key(settings.sync_key)
        self._key = key
        self.encoder = C.Encoder(key)
        self.decoder = C.Decoder(key, own=self.encoder.boot_id)
        self.sock: socket.socket | None = None
        self.loop = None
        self.timers: list = []
        self.ring = None  # our own reader of the snat_audit ring (while no audit log reads it)
        self._send: collections.deque[bytes] = collections.deque()  # packed records
        self._recv: collections.deque = collections.deque()  # decoded records
        self._installing = 0  # records of the install job running (they count toward RECV_QUEUE_MAX)
        self._walk = None  # the refresh walk's generator (advanced on the worker only)
        self._walk_busy = False
        self._walk_again = False  # a peer started during a walk: one more after it
        self._closed = False
        self._heir: SyncService | None = None  # the service a reload handed our queues to
        self.counts = dict.fromkeys(("sent_datagrams", "sent_records", "send_errors", "walks", "walk_records",
                                     "ring_records", "received_datagrams", "received_records", "foreign", "peer_boots",
                                     "install_errors"), 0)  # fmt: skip
        self.drops = {"send_queue": 0, "recv_queue": 0}
        self.installed = dict.fromkeys(COUNTS, 0)  # what the worker made of the peer's records
        self.last_valid: float | None = None  # clock() of the last valid datagram from the peer
        self.started: float | None = None  # clock() at attach
        self._stale_at_valid = 0  # the decoder's stale count at the last valid datagram
        self.last_error: str | None = None

    # ------------------------------------------------------------------ life cycle

    def attach(self, loop) -> None:
        self.loop = loop
        if self.sock is None:  # (else the socket of the service this one took over from, or bound by hand_over)
            self._bind()
        self.started = self.clock()
        loop.add_reader(self.sock, self._on_readable)
        self._hello()
        if hasattr(self.backend, "sync_sink"):  # sessions a rule change removes: ends for the peer
            self.backend.sync_sink = self.on_ended
        iv = self.settings.sync_interval
        self.timers = [loop.every(FLUSH_EVERY, self._flush), loop.every(iv, self._hello, first=iv),
                       loop.every(self.settings.sync_refresh, self._start_walk, first=0.5)]
        self._install_next()  # (what a service this one took over from had queued)
        self.log.info("sync", peer=f"{self.peer[0]}:{self.peer[1]}", local=f"{self.settings.sync_local}:"
                      f"{self.settings.sync_port}", boot_id=f"{self.encoder.boot_id:016x}")  # fmt: skip

    def _bind(self) -> None:
        """Our socket, bound to sync_local:sync_port (``sock``)."""
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # a walk's bursts (FLUSH_DATAGRAMS of ~1.4 KB) must fit the peer's buffer: the FORCE
            # options (root) pass net.core.rmem_max/wmem_max (208 KB by default), else the caps
            for force, opt in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
                for o in (force, opt):
                    try:
                        s.setsockopt(socket.SOL_SOCKET, o, SOCK_BUF)
                        break
                    except OSError:
                        continue
            s.bind((self.settings.sync_local, self.settings.sync_port))
        except OSError:
            s.close()
            raise
        self.sock = s

    def hand_over(self, heir: SyncService) -> bool:
        """A reload replaces this service by ``heir`` (not attached yet): this one stops (its
        ring drained into the send queue) and, when ``heir`` talks to the same peer under the
        same key (only sync_local, sync_interval or sync_refresh changed), ``heir`` goes on
        with its wire state and queues: the boot id, sequence and echo (the peer confirmed
        them: what heir sends is taken at once), the decoder's windows, what waits to be sent
        (the ends among it: a new boot id's records are dropped by the peer until it is
        confirmed, a round trip and up to a heartbeat later, and the peer kept those sessions
        until they expired there) and what waits to be installed (an install job running
        hands its rest over when it ends), the counters and when the peer was last heard.
        The socket goes over too while sync_local is the same (what the peer sent and we had
        not read yet stays in its buffer, and no datagram of the peer's arrives at no socket
        between a close and a bind); another sync_local: ``heir`` binds its own first (when it
        cannot, it takes nothing: this one flushes, as below, and the error is raised) and
        what waits in this one's socket is read into the queues before it closes.
        Else this one flushes all it can before its socket goes (a new peer or key: a new
        boot id, as at a start).  Returns whether ``heir`` took over."""
        same = heir.peer == self.peer and hmac.compare_digest(heir._key, self._key)
        if same and heir.settings.sync_local != self.settings.sync_local and heir.sock is None:
            try:
                heir._bind()
            except BaseException:
                self.close()
                raise
        self.close(heir if same else None)
        return same

    def _adopt(self, old: SyncService) -> None:
        if old.sock is not None:
            if self.sock is None:  # (the same sync_local)
                old.loop.remove(old.sock)
                self.sock, old.sock = old.sock, None
            else:
                old._on_readable(drain=True)  # (into the queues taken below; closed: nothing installed here)
        self.encoder, self.decoder = old.encoder, old.decoder
        self._send, old._send = old._send, collections.deque()
        self._recv, old._recv = old._recv, collections.deque()
        self._installing = old._installing  # (its rest comes back through old._installed)
        self.counts, self.drops, self.installed = old.counts, old.drops, old.installed
        self.last_valid, self._stale_at_valid, self.last_error = old.last_valid, old._stale_at_valid, old.last_error

    def _hello(self) -> None:
        """A datagram of no records: at the start, under our new boot id, so that the peer sends
        its whole table at once (a gateway back from a reboot holds nothing, so it would have
        nothing to send, and the peer would learn of it only at its next refresh); then every
        sync_interval (a heartbeat: the peer sees we are there), and at once when the peer's boot
        id changes (it takes our records only once it hears us echo its new one)."""
        if self.sock is None:
            return
        try:
            self.sock.sendto(self.encoder.datagram([]), self.peer)
        except OSError as e:  # the peer not there yet: it says hello itself when it starts
            self.counts["send_errors"] += 1
            self.last_error = f"send: {e.strerror or e}"
        else:
            self.counts["sent_datagrams"] += 1

    def own_ring(self, on: bool) -> None:
        """Read the datapath's ring here (``on``: no audit log reads it) or not."""
        if on and self.ring is None and self.loop is not None and not self._closed:
            make = getattr(self.backend, "audit_source", None)
            if make is None:
                return
            try:
                self.ring = make()
            except Exception as e:  # noqa: BLE001 - the refresh walk still carries everything, later
                self.log.error("sync_ring_failed", error=str(e))
                self.ring = None
                return
            self.loop.add_reader(self.ring.fileno(), self._drain_ring)
        elif not on and self.ring is not None:
            self._drain_ring()
            self.loop.remove(self.ring.fileno())
            self.ring.close()
            self.ring = None

    def close(self, heir: SyncService | None = None) -> None:
        """Stop; ``heir`` (hand_over): it takes the queues, else what is queued is flushed as
        far as the socket takes it (at most the whole queue)."""
        self.own_ring(False)  # (its last records into the queue first)
        self._closed = True
        if getattr(self.backend, "sync_sink", None) == self.on_ended:
            self.backend.sync_sink = None
        for t in self.timers:
            t.cancel()
        self.timers = []
        if heir is not None and self._heir is None:
            self._heir = heir
            heir._adopt(self)
        if self.sock is not None:
            try:
                while self._send and self._flush():  # (closed: no walk chunk follows)
                    pass
            except Exception:  # noqa: BLE001 - the last records are lost, nothing else
                pass
            if self.loop is not None:
                self.loop.remove(self.sock)
            self.sock.close()
            self.sock = None

    # ------------------------------------------------------------------ sending

    def _fit(self, items: list, room: int, drop: str) -> list:
        """The first ``room`` of ``items`` (a queue's bound); the rest dropped, counted as ``drop``."""
        if room < len(items):
            self.drops[drop] += len(items) - max(room, 0)
            items = items[: max(room, 0)]
        return items

    def _queue(self, packed: list[bytes], counted: str) -> int:
        packed = self._fit(packed, SEND_QUEUE_MAX - len(self._send), "send_queue")
        self._send.extend(packed)
        self.counts[counted] += len(packed)
        return len(packed)

    def on_ring(self, raws: list[bytes]) -> None:
        """The datapath's create/end records (loop thread): queued to be sent."""
        now = monotonic_ns()
        packed = [r.pack() for r in (audit_record(raw, now) for raw in raws) if r is not None]
        if packed:
            self._queue(packed, "ring_records")

    def on_ended(self, recs: list) -> None:
        """End records of sessions the control plane removed (a rule change; any thread):
        queued to be sent on the loop, as the datapath's own ends are."""
        packed = [r.pack() for r in recs]
        if packed and self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: self._queue_ends(packed))

    def _queue_ends(self, packed: list[bytes]) -> None:
        to = self
        while to is not None and to._closed:  # a reload replaced this service meanwhile (or more than one)
            to = to._heir
        if to is not None:
            to._queue(packed, "ring_records")

    def _drain_ring(self) -> None:
        if self.ring is not None:
            self.on_ring(self.ring.drain_raw(RING_BATCH))

    def _flush(self) -> bool:
        """Send what is queued (loop thread; bounded per call); False when the socket's buffer
        is full (the rest stays for the next flush)."""
        if self.sock is None:
            return False
        q = self._send
        for _ in range(FLUSH_DATAGRAMS):
            if not q:
                break
            n = min(len(q), C.MAX_RECORDS)
            gram = self.encoder.datagram([q[i] for i in range(n)])
            try:
                self.sock.sendto(gram, self.peer)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.ENOBUFS):
                    self._next_walk_chunk()
                    return False  # the records stay for the next flush (their number is spent: a gap, no harm)
                self.counts["send_errors"] += 1  # the peer unreachable: these records are lost
                self.last_error = f"send: {e.strerror or e}"
            else:
                self.counts["sent_datagrams"] += 1
                self.counts["sent_records"] += n
            for _ in range(n):
                q.popleft()
        self._next_walk_chunk()
        return True

    # ------------------------------------------------------------------ the refresh walk

    def _start_walk(self, again: bool = False) -> None:
        """A refresh walk now; ``again``: also when one runs (it may have passed sessions
        already): one more after it."""
        if self._walk is not None or self._walk_busy:
            self._walk_again = self._walk_again or again
        elif not self._closed:
            self._walk_busy = True
            self.worker.submit(self._walk_open, self._walked, bounded=False)

    def _walk_open(self):
        """The walk's generator (worker); its chunks are read once the send queue has room."""
        self._walk = self.backend.sync_pairs()
        return [], False

    def _walk_step(self):
        """(packed records of the next WALK_CHUNK pairs, whether the walk is done); worker."""
        now = monotonic_ns()
        out = []
        done = True
        seen = 0
        for p in self._walk:
            r = pair_record(p, now)
            if r is not None:
                out.append(r.pack())
            seen += 1
            if seen >= WALK_CHUNK:  # (pairs read, synced or not: ICMP ones cost a read too)
                done = False
                break
        return out, done

    def _walked(self, result, error) -> None:
        self._walk_busy = False
        if self._closed:  # (a reload replaced this service: the new one walks itself; nothing sends our queue)
            self._walk = None
            return
        if error is not None:
            self.last_error = f"walk: {error}"
            self.log.error("sync_walk_failed", error=str(error))
            self._walk = None
            return
        packed, done = result
        self._queue(packed, "walk_records")
        if done:
            self._walk = None
            self.counts["walks"] += 1
            if self._walk_again:
                self._walk_again = False
                self._start_walk()
        else:
            self._next_walk_chunk()

    def _next_walk_chunk(self) -> None:
        """The walk's next job, once the send queue has room for its records."""
        if self._walk is None or self._walk_busy or self._closed:
            return
        if SEND_QUEUE_MAX - len(self._send) < WALK_CHUNK:
            return  # the next flush looks again
        self._walk_busy = True
        self.worker.submit(self._walk_step, self._walked, bounded=False)

    # ------------------------------------------------------------------ receiving

    def _on_readable(self, drain: bool = False) -> None:
        """What the peer sent: at most RECV_BATCH datagrams; ``drain``: all the socket holds
        (a close that hands over: at most its receive buffer)."""
        for _ in range(RECV_QUEUE_MAX // RECV_BATCH if drain else 1):  # (bounded: a peer flooding still ends it)
            if self._read_batch() < RECV_BATCH:
                break
        self._install_next()

    def _read_batch(self) -> int:
        """Up to RECV_BATCH datagrams read and queued; how many were read."""
        got = 0
        for _ in range(RECV_BATCH):
            try:
                data, src = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # an ICMP error of an earlier send (ECONNREFUSED): nothing to read
                self.last_error = f"recv: {e.strerror or e}"
                got += 1
                continue
            got += 1
            if src != self.peer:
                self.counts["foreign"] += 1
                continue
            before = self.decoder.datagrams
            recs = self.decoder.decode(data)
            if self.decoder.peer_changed:  # our datagrams echo the peer's boot id as heard: say so at once
                self.encoder.echo = self.decoder.peer
                self._hello()
            if self.decoder.confirmed_changed:  # the peer (re)started and hears us: our whole table
                self.counts["peer_boots"] += 1
                self._start_walk(again=True)
            if self.decoder.datagrams == before:
                continue  # dropped (counted by the decoder; a stale one's records too)
            self.counts["received_datagrams"] = self.decoder.datagrams
            self.last_valid = self.clock()
            self._stale_at_valid = self.decoder.drops["stale"]
            self.counts["received_records"] += len(recs)
            self._recv.extend(self._fit(recs, RECV_QUEUE_MAX - len(self._recv) - self._installing, "recv_queue"))
        return got

    def _install_next(self) -> None:
        if self._installing or not self._recv or self._closed:
            return
        batch = [self._recv.popleft() for _ in range(min(INSTALL_BATCH, len(self._recv)))]
        self._installing = len(batch)
        self.worker.submit(lambda: self.backend.sync_install(batch, self.installed, INSTALL_SECONDS), self._installed,
                           bounded=False)  # fmt: skip

    def _installed(self, rest, error) -> None:
        """An install job ended: what it had no time for goes first next (other jobs, a control
        request, ran between); to the service a reload handed our queues to, if one did."""
        if self._closed and self._heir is not None:
            self._heir._installed(rest, error)
            return
        self._installing = 0
        if error is None and rest and not self._closed:
            self._recv.extendleft(reversed(rest))
        if error is not None:
            self.counts["install_errors"] += 1
            self.last_error = f"install: {error}"
            self.log.error("sync_install_failed", error=str(error))
        self._install_next()

    # ------------------------------------------------------------------ status

    def silent_for(self) -> float | None:
        """Seconds without a valid datagram from the peer (since we started when none came
        yet); None before attach."""
        since = self.last_valid if self.last_valid is not None else self.started
        return None if since is None else self.clock() - since

    def problems(self) -> list[str]:
        """What status reports as problems: a peer of another protocol version, a silent peer."""
        out = []
        who = f"session sync with {self.peer[0]}"
        other = self.decoder.other_version
        if other is not None:
            out.append(f"{who}: the peer speaks sync protocol version {other}, this gateway {C.VERSION}: nothing "
                       "it sends is taken (upgrade both gateways to the same snatgw)")  # fmt: skip
        silent, iv = self.silent_for(), self.settings.sync_interval
        if silent is not None and silent > SILENT_INTERVALS * iv:
            stale = self.decoder.drops["stale"] - self._stale_at_valid
            since = f"since this sync started {silent:.1f} s ago" if self.last_valid is None else f"for {silent:.1f} s"
            out.append(f"{who}: no valid datagram from the peer {since} (sync_interval {iv:g} s: it sends one at "
                       "least that often)" + (f"; {stale} stale ones meanwhile (not echoing our boot id: does the "
                                              "peer hear us?)" if stale else ""))  # fmt: skip
        return out

    def stats(self) -> dict:
        """For status, stats and metrics (any thread: plain counters)."""
        last = None if self.last_valid is None else round(self.clock() - self.last_valid, 3)
        return {
            "enabled": True, "peer": f"{self.peer[0]}:{self.peer[1]}",
            "local": f"{self.settings.sync_local}:{self.settings.sync_port}",
            "boot_id": f"{self.encoder.boot_id:016x}", **self.counts, **self.installed,
            "bad_records": self.decoder.bad_records,
            "drops": {**self.decoder.drops, **self.drops},
            "send_queue": len(self._send), "recv_queue": len(self._recv), "walking": self._walk is not None,
            "seconds_since_peer": last, "last_error": self.last_error,
            "interval": self.settings.sync_interval, "refresh": self.settings.sync_refresh,
            "peer_boot_id": f"{self.decoder.peer:016x}" if self.decoder.peer else None,
            "peer_version": self.decoder.other_version, "version": C.VERSION,
        }  # fmt: skip
