"""The I/O floor: the CPU a Python server on this machine spends per message before doing anything
with it, for comparison with the sidecar's CPU per streamed chunk.

    .venv/bin/python -m bench.floor            # asyncio and uvloop, 3,000 messages each

A client process sends a 120-byte message over loopback TCP, waits for it to come back and sleeps
1 ms (a streamed chunk reaches the sidecar the same way: alone, to an idle process); the server
echoes it from ``data_received`` (one ``epoll_wait``, one ``recv``, one ``send`` per message).
Printed: the server's user and system CPU per message (``getrusage``), for each event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import subprocess
import sys
import time


def client(port: int, n: int) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 120
    for _ in range(n):
        s.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(s.recv(65536))
        time.sleep(0.001)
    s.close()


class Echo(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def serve(n: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    server = await loop.create_server(lambda: Echo(done), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    before = resource.getrusage(resource.RUSAGE_SELF)
    peer = subprocess.Popen([sys.executable, "-m", "bench.floor", "--client", str(port), "--messages", str(n)])
    await done
    after = resource.getrusage(resource.RUSAGE_SELF)
    peer.wait()
    server.close()
    return (after.ru_utime - before.ru_utime) / n * 1e6, (after.ru_stime - before.ru_stime) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench.floor")
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--loops", default="asyncio,uvloop")
    ap.add_argument("--client", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.client:
        client(a.client, a.messages)
        return
    for name in a.loops.split(","):
        if name == "uvloop":
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
                user, system = r.run(serve(a.messages))
        else:
            user, system = asyncio.run(serve(a.messages))
        print(f"{name:8} echo: user {user:6.1f} us + system {system:6.1f} us = {user + system:6.1f} us CPU per message")


if __name__ == "__main__":
    main()
