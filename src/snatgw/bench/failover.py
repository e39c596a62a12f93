"""Link failover, measured in the multi-ISP lab (`snatgw bench --scenario failover`, or
`python -m snatgw.bench.failover [--backend bpf|nft] [--interval S] [--rounds N]`).

The gateway runs the lab's rules plus ``link isp1`` (probes through eth1 to the servers, backup
198.19.3.1 with ISP 2's pool).  An inside host sends one UDP datagram every GAP seconds on one
socket (one flow) to the echo server, which answers with the link and address it saw.  Then:

  cut        `ip link set dev up down` in isp1: eth1 loses carrier (netlink event)
  blackhole  an nft rule in isp1 drops everything it would forward: carrier stays up, only the
             probes can tell (dead timer: fall x interval)

For each, the failover time is from the cut to the first answer that came through isp2 from an
ISP 2 address, and the failback time from the repair to the first answer through isp1 again
(it includes rise x interval and the hold).  Limit of issue 13: failover within
3 x interval + 200 ms.  Everything runs in namespaces this module creates and removes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time

GAP = 0.005  # seconds between the flow's datagrams
SERVER = "203.0.113.10"


def config_text(interval: float, fall: int, rise: int, hold: float, backend: str) -> str:
    from ..lab.demo import REF_RULES, config_text as rules_text

    link = (f"link isp1 {{\n    gw 198.19.2.1\n    oif eth1\n    probe 203.0.113.10 198.51.100.10\n"
            f"    interval {interval:g}\n    fall {fall}\n    rise {rise}\n    hold {hold:g}\n"
            f"    backup_gw 198.19.3.1\n    backup_snat_ip 198.19.3.71-198.19.3.73\n}}\n")
    return rules_text(REF_RULES).replace("unmatched pass", f"unmatched pass\n    backend {backend}") + link


class Flow:
    """One UDP flow from in40 to the echo server; answers kept as (time, link, address)."""

    def __init__(self, lab):
        from ..lab.clients import ECHO_PORT
        from ..lab.netns import ns_socket

        self.sock = ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("198.18.40.10", 0))
        self.sock.connect((SERVER, ECHO_PORT))
        self.sock.settimeout(0.2)
        self.seen: list[tuple[float, str, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._recv, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        n = 0
        while not self.stop.is_set() and n < 200_000:  # bounded: 1000 s at GAP
            try:
                self.sock.send(b"failover-%d" % n)
            except OSError:
                pass  # ENETUNREACH etc. while the link is cut
            n += 1
            time.sleep(GAP)

    def _recv(self) -> None:
        while not self.stop.is_set():
            try:
                d = json.loads(self.sock.recv(65536))
            except (TimeoutError, socket.timeout, ValueError, OSError):
                continue
            self.seen.append((time.monotonic(), d.get("link", "?"), d.get("peer", "?").rsplit(":", 1)[0]))

    def first_after(self, t0: float, link: str, prefix: str, timeout: float) -> float | None:
        """Seconds from t0 to the first answer through ``link`` from an address starting ``prefix``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for t, lk, addr in list(self.seen):
                if t >= t0 and lk == link and addr.startswith(prefix):
                    return t - t0
            time.sleep(0.01)
        return None

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=2)
        self.sock.close()


def _blackhole(lab, on: bool) -> None:
    if on:
        lab.run("isp1", "nft", "-f", "-", input="table ip sgfail {\n chain blackhole {\n"
                "  type filter hook forward priority 0; policy drop;\n }\n}\n")
    else:
        lab.run("isp1", "nft", "delete table ip sgfail", check=False)


def measure(backend: str = "bpf", interval: float = 0.2, fall: int = 3, rise: int = 2, hold: float = 1.0,
            rounds: int = 3, echo=print) -> dict:
    from ..lab.topology import Lab
    from ..rules import Rule, RuleSet
    from ..lab.demo import FAILOVER_RULES, REF_RULES

    limit = 3 * interval + 0.2
    out: dict = {"backend": backend, "interval": interval, "fall": fall, "rise": rise, "hold": hold,
                 "limit_ms": round(limit * 1e3, 1), "cut": [], "blackhole": [], "cut_back": [], "blackhole_back": []}
    lab = Lab.up(f"failover-{os.getpid()}", prefix=f"sgf{os.getpid() % 0xFFFF:04x}")
    try:
        servers = lab.start_servers()
        for rules in (REF_RULES, FAILOVER_RULES):
            lab.add_snat_addresses(RuleSet([Rule.from_dict(d) for d in rules]))
        conf = os.path.join(lab.workdir, "failover.conf")
        with open(conf, "w") as f:
            f.write(config_text(interval, fall, rise, hold, backend))
        lab.start_gateway(conf, backend)
        flow = Flow(lab)
        try:
            if flow.first_after(time.monotonic() - 5, "isp1", "198.19.2.", 5.0) is None:
                raise RuntimeError("the flow does not reach the server through isp1 before any cut")
            for r in range(rounds):
                for kind in ("cut", "blackhole"):
                    time.sleep(hold + rise * interval + 0.5)  # settled on isp1
                    t0 = time.monotonic()
                    if kind == "cut":
                        lab.run("isp1", "ip", "link", "set", "dev", "up", "down")
                    else:
                        _blackhole(lab, True)
                    dt = flow.first_after(t0, "isp2", "198.19.3.", 10 + fall * interval)
                    t1 = time.monotonic()
                    if kind == "cut":
                        lab.run("isp1", "ip", "link", "set", "dev", "up", "up")
                    else:
                        _blackhole(lab, False)
                    back = flow.first_after(t1, "isp1", "198.19.2.", 10 + hold + 2 * rise * interval)
                    out[kind].append(None if dt is None else round(dt * 1e3, 1))
                    out[kind + "_back"].append(None if back is None else round(back * 1e3, 1))
                    echo(f"round {r + 1} {kind}: failover {out[kind][-1]} ms, failback {out[kind + '_back'][-1]} ms")
        finally:
            flow.close()
            servers.stop()
            lab.stop_gateway()
    finally:
        lab.down()
    for kind in ("cut", "blackhole", "cut_back", "blackhole_back"):
        got = [x for x in out[kind] if x is not None]
        out[kind + "_median_ms"] = statistics.median(got) if got else None
        out[kind + "_max_ms"] = max(got) if got else None
    out["within_limit"] = all(x is not None and x <= limit * 1e3 for x in out["cut"] + out["blackhole"])
    return out


def render(res: dict) -> str:
    lines = [f"link failover, {res['backend']}: interval {res['interval']:g} s, fall {res['fall']}, rise {res['rise']}, "
             f"hold {res['hold']:g} s; limit 3 x interval + 200 ms = {res['limit_ms']:g} ms",
             f"{'event':<12} {'failover ms (each round)':<32} {'median':>8} {'max':>8}   failback ms (median)"]
    for kind in ("cut", "blackhole"):
        lines.append(f"{kind:<12} {' '.join(str(x) for x in res[kind]):<32} {res[kind + '_median_ms']!s:>8} "
                     f"{res[kind + '_max_ms']!s:>8}   {res[kind + '_back_median_ms']}")
    lines.append("within the limit: " + ("yes" if res["within_limit"] else "NO"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m snatgw.bench.failover", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("bpf", "nft"), action="append")
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    results = [measure(b, a.interval, rounds=a.rounds, echo=lambda s: print(s, file=sys.stderr, flush=True))
               for b in (a.backend or ["bpf", "nft"])]
    print(json.dumps(results, indent=1) if a.json else "\n\n".join(render(r) for r in results))
    return 0 if all(r["within_limit"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
