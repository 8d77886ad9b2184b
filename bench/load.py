"""Open-loop (fixed request rate) HTTP/1.1 load driver, in asyncio with raw sockets.

wrk only runs closed loops (a fixed number of connections, each waiting for its response before
sending the next request) and wrk2 is not packaged by Debian, so latency at a fixed rate is
measured here. Coordinated omission is avoided the way wrk2 does it: request i is *scheduled* at
``t0 + i / rate`` and its latency is counted from that scheduled time, not from when it was
actually written, so a stall of the system under test shows up in every request it delayed.
A request never waits for a busy connection: when none is idle a new one is opened (and counted).

Streams: the upstream stamps every SSE event with its send time (CLOCK_MONOTONIC ns, shared by
every process on the host), so each event's transit time through the proxy is measured directly.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

_STAMP = re.compile(rb'"content":"t(\d+) ')


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, pool: list[_Conn]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.fut: asyncio.Future | None = None
        self._reset()

    def _reset(self) -> None:
        self.buf = b""
        self.head_done = False
        self.status = 0
        self.length = -1  # content-length, -1 when chunked
        self.chunked = False
        self.body_len = 0
        self.need = 0  # chunked: data bytes left in the current chunk
        self.skip = 0  # chunked: CRLF bytes left after it
        self.events: list[tuple[int, int]] | None = None  # (arrival ns, upstream send ns)
        self.sse_tail = b""
        self.first_byte: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self in self.pool:
            self.pool.remove(self)
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionError("connection closed"))

    def request(self, raw: bytes, sse: bool) -> asyncio.Future:
        self._reset()
        if sse:
            self.events = []
        self.fut = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(raw)
        return self.fut

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if self.first_byte is None:
            self.first_byte = now
        if not self.head_done:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").lower()
            data = self.buf[end + 4 :]
            self.buf = b""
            self.head_done = True
            lines = head.split("\r\n")
            self.status = int(lines[0].split(" ", 2)[1])
            for line in lines[1:]:
                k, _, v = line.partition(":")
                if k == "content-length":
                    self.length = int(v)
                elif k == "transfer-encoding" and "chunked" in v:
                    self.chunked = True
            if self.length < 0 and not self.chunked:
                self.length = 0
        if self.chunked:
            self._chunked(data, now)
        else:
            self.body_len += len(data)
            if self.events is not None:
                self._sse(data, now)
            if self.body_len >= self.length:
                self._done()

    def _chunked(self, data: bytes, now: int) -> None:
        buf = self.buf + data if self.buf else data
        self.buf = b""
        pos = 0
        n = len(buf)
        while pos < n:
            if self.need:
                take = min(self.need, n - pos)
                piece = buf[pos : pos + take]
                self.need -= take
                pos += take
                if self.events is not None:
                    self._sse(piece, now)
                if not self.need:
                    self.skip = 2
                continue
            if self.skip:
                s = min(self.skip, n - pos)
                self.skip -= s
                pos += s
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                self.buf = buf[pos:]
                return
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if size == 0:
                self._done()  # (trailers are not used here)
                return
            self.need = size

    def _sse(self, piece: bytes, now: int) -> None:
        assert self.events is not None
        if b"\n\n" not in piece:
            self.sse_tail += piece
            return
        data = self.sse_tail + piece
        cut = data.rfind(b"\n\n")
        self.sse_tail = data[cut + 2 :]
        for m in _STAMP.finditer(data, 0, cut):
            self.events.append((now, int(m.group(1))))

    def _done(self) -> None:
        fut, self.fut = self.fut, None
        self.pool.append(self)
        if fut is not None and not fut.done():
            fut.set_result(self.status)


@dataclass
class RunResult:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    new_connections: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, from the scheduled time
    ttfb: list[float] = field(default_factory=list)  # streams: scheduled time -> first SSE event
    chunk_transit: list[float] = field(default_factory=list)  # streams: upstream send -> client arrival
    events: int = 0
    elapsed: float = 0.0
    lag_max: float = 0.0  # how late the driver itself fired a request (driver saturation check)


def raw_request(path: str, body: bytes, host: str, extra: dict[str, str] | None = None) -> bytes:
    h = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    for k, v in (extra or {}).items():
        h += f"{k}: {v}\r\n"
    return h.encode() + b"\r\n" + body


async def _connect(host: str, port: int, pool: list[_Conn]) -> _Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: _Conn(pool), host, port)
    return conn


async def fixed_rate(
    host: str, port: int, raw: bytes, rate: float, duration: float, *, sse: bool = False, warm_connections: int = 32, timeout: float = 30.0
) -> RunResult:
    loop = asyncio.get_running_loop()
    idle: list[_Conn] = []
    res = RunResult()
    for _ in range(warm_connections):
        idle.append(await _connect(host, port, idle))
    total = int(rate * duration)
    tasks: list[asyncio.Task] = []

    async def one(scheduled: float) -> None:
        conn = idle.pop() if idle else None
        if conn is None or conn.closed:
            res.new_connections += 1
            conn = await _connect(host, port, idle)
            if conn in idle:
                idle.remove(conn)
        try:
            status = await asyncio.wait_for(conn.request(raw, sse), timeout)
        except (TimeoutError, ConnectionError, OSError):
            res.errors += 1
            if conn.transport is not None:
                conn.transport.abort()
            return
        done = loop.time()
        if status != 200:
            res.errors += 1
            return
        res.ok += 1
        res.latencies.append(done - scheduled)
        if sse and conn.events:
            # scheduled time is loop.time() (CLOCK_MONOTONIC); events are monotonic_ns
            res.ttfb.append(conn.events[0][0] / 1e9 - scheduled)
            res.chunk_transit.extend((a - s) / 1e9 for a, s in conn.events)
            res.events += len(conn.events)

    t0 = loop.time() + 0.05
    for i in range(total):
        at = t0 + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            res.lag_max = max(res.lag_max, -delay)
        tasks.append(asyncio.ensure_future(one(at)))
        res.sent += 1
    await asyncio.gather(*tasks)
    res.elapsed = loop.time() - t0
    for c in list(idle):
        if c.transport is not None:
            c.transport.close()
    return res


async def hold_streams(host: str, port: int, raw: bytes, n: int, settle_timeout: float = 30.0) -> tuple[list[_Conn], int]:
    """Open ``n`` long streams and wait until each has received its first event. Returns the
    connections (close them with ``release``) and how many streams are open."""
    pool: list[_Conn] = []
    conns: list[_Conn] = []
    sem = asyncio.Semaphore(200)

    async def open_one() -> None:
        async with sem:
            try:
                c = await _connect(host, port, pool)
            except OSError:
                return
            if c in pool:
                pool.remove(c)
            c.request(raw, True)
            conns.append(c)

    await asyncio.gather(*(open_one() for _ in range(n)))
    deadline = asyncio.get_running_loop().time() + settle_timeout
    while asyncio.get_running_loop().time() < deadline:
        if all(c.events for c in conns if not c.closed):
            break
        await asyncio.sleep(0.1)
    open_ = sum(1 for c in conns if not c.closed and c.events and c.fut is not None and not c.fut.done())
    return conns, open_


def release(conns: list[_Conn]) -> None:
    for c in conns:
        if c.fut is not None and not c.fut.done():
            c.fut.cancel()
        if c.transport is not None:
            c.transport.abort()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]
