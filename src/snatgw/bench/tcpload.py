"""TCP connect/close cycles for the new-session benchmark: a tiny asyncio server (accept,
close) and client (many parallel short connections), both bounded in time and count.

    python -m snatgw.bench.tcpload server --port 5001 --duration 10
    python -m snatgw.bench.tcpload client --host 198.19.1.2 --port 5001 --duration 3
The client prints one JSON line: {"connections": n, "errors": e, "seconds": s}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time


async def _serve(port: int, duration: float) -> None:
    async def handle(reader, writer):
        writer.close()

    server = await asyncio.start_server(handle, "0.0.0.0", port, backlog=4096, reuse_address=True)
    async with server:
        await asyncio.sleep(duration)


async def _client(host: str, port: int, duration: float, concurrency: int, limit: int) -> dict:
    done = errors = 0
    stop = time.monotonic() + duration

    async def worker():
        nonlocal done, errors
        while time.monotonic() < stop and done + errors < limit:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
                # the server closes first; wait for its FIN so the connection really cycled
                await asyncio.wait_for(reader.read(1), 2.0)
                sock = writer.get_extra_info("socket")
                if sock is not None:  # RST-free close without TIME_WAIT pile-up on our side
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                writer.close()
                done += 1
            except (OSError, asyncio.TimeoutError):
                errors += 1
                await asyncio.sleep(0.01)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"connections": done, "errors": errors, "seconds": time.monotonic() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m snatgw.bench.tcpload")
    p.add_argument("role", choices=("server", "client"))
    p.add_argument("--host", default="198.19.1.2")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--limit", type=int, default=200000, help="at most this many connections")
    a = p.parse_args(argv)
    if a.role == "server":
        asyncio.run(_serve(a.port, min(a.duration, 600)))
        return 0
    res = asyncio.run(_client(a.host, a.port, min(a.duration, 600), a.concurrency, a.limit))
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
