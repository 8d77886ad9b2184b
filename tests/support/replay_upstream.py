"""A test upstream that replays recorded provider responses byte for byte.

Request headers choose the behaviour:
- ``x-fixture: NAME``: the recording to replay (status, content type, body), or a response a test
  registered under that name with :meth:`ReplayUpstream.add`.
- ``x-chunk-delay-ms``: pause between streamed chunks (SSE events / eventstream frames).
- ``x-body-delay-ms``: pause between the response headers and the body.
- ``x-gate: ID``: send the first chunk, hold the rest until the test calls ``open_gate(ID)``.
- ``x-case: NAME`` (instead of ``x-fixture``): a body of tests/support/provider_cases, sent one
  protocol unit (SSE event, NDJSON line, eventstream frame, JSON-array element) per chunk.
- ``x-hold-after: N`` with ``x-gate``: send N chunks, then hold (N = all of them: hold before the
  end of the body) until the gate opens or the client hangs up.
- ``x-encode: gzip|br|zstd|deflate``: compress the body (streamed compressors flush per chunk).
- ``x-status: N`` with ``x-body``: a synthetic response (error cases).
- ``x-reset-after: N``: send N chunks, then drop the connection (upstream reset).
It runs an aiohttp server on its own event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import Iterator

from aiohttp import web

from tests.support.recordings import Recording, load


def split_stream(body: bytes, content_type: str) -> list[bytes]:
    """The chunks a provider would send: one per SSE event; fixed slices for binary streams."""
    if content_type.startswith("text/event-stream"):
        parts = body.split(b"\n\n")
        chunks = [p + b"\n\n" for p in parts[:-1]]
        if parts[-1]:
            chunks.append(parts[-1])
        return chunks
    if "eventstream" in content_type or "ndjson" in content_type:
        return [body[i : i + 97] for i in range(0, len(body), 97)]
    return [body]


class _Encoder:
    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        if encoding == "gzip":
            self._z = zlib.compressobj(6, zlib.DEFLATED, 31)
        elif encoding == "deflate":
            self._z = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS)
        elif encoding == "br":
            import brotli

            self._b = brotli.Compressor()
        elif encoding == "zstd":
            import zstandard

            self._c = zstandard.ZstdCompressor().compressobj()
        else:
            raise ValueError(encoding)

    def chunk(self, data: bytes) -> bytes:
        if self.encoding in ("gzip", "deflate"):
            return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)
        if self.encoding == "br":
            return self._b.process(data) + self._b.flush()
        import zstandard

        return self._c.compress(data) + self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def finish(self) -> bytes:
        if self.encoding in ("gzip", "deflate"):
            return self._z.flush()
        if self.encoding == "br":
            return self._b.finish()
        return self._c.flush()


class ReplayUpstream:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._gates: dict[str, asyncio.Event] = {}
        self.port = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.disconnected: set[str] = set()  # gates whose client (Envoy) hung up while held
        self._added: dict[str, Recording] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        started = threading.Event()
        self._started = started
        self._thread.start()
        started.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._started.set()
        self.loop.run_forever()

    def add(self, name: str, status: int, content_type: str, body: bytes) -> None:
        """A response a test built (``x-fixture: name`` replays it like a recording)."""
        self._added[name] = Recording(name, status, content_type, body)

    def open_gate(self, gate: str) -> None:
        self.loop.call_soon_threadsafe(self._gate(gate).set)

    def _gate(self, gate: str) -> asyncio.Event:
        return self._gates.setdefault(gate, asyncio.Event())

    async def _hold(self, gate: str, request: web.Request) -> bool:
        """Wait for the gate; False if the connection closed first (nothing more is sent)."""
        event = self._gate(gate)
        while not event.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                self.disconnected.add(gate)
                return False
            try:
                await asyncio.wait_for(event.wait(), 0.02)
            except TimeoutError:
                pass
        return True

    def wait_disconnected(self, gate: str, timeout: float = 10.0) -> bool:
        import time

        deadline = time.monotonic() + timeout
        while gate not in self.disconnected:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        h = request.headers
        self.requests.append((request.path_qs, dict(h), body))
        if "x-status" in h:
            status = int(h["x-status"])
            payload = h.get("x-body", "").encode()
            return web.Response(status=status, body=payload, content_type=h.get("x-content-type", "application/json"))
        if "x-case" in h:
            from tests.support.provider_cases import BY_NAME, units

            case = BY_NAME[h["x-case"]]
            status, content_type = case.status, case.content_type
            chunks = [raw for raw, _ in units(case.load(), content_type)]
        else:
            rec = self._added.get(h["x-fixture"]) or load(h["x-fixture"])
            status, content_type = rec.status, rec.content_type
            chunks = split_stream(rec.body, rec.content_type)
        delay = int(h.get("x-chunk-delay-ms", "0")) / 1000
        gate = h.get("x-gate")
        hold_after = int(h.get("x-hold-after", "1"))
        encoding = h.get("x-encode")
        headers = {"content-type": content_type}
        if encoding:
            headers["content-encoding"] = encoding
        resp = web.StreamResponse(status=status, headers=headers)
        if len(chunks) == 1 and not encoding and not gate:
            resp.content_length = len(chunks[0])
        await resp.prepare(request)
        if "x-body-delay-ms" in h:  # prepare() has sent the headers
            await asyncio.sleep(int(h["x-body-delay-ms"]) / 1000)
        enc = _Encoder(encoding) if encoding else None
        reset_after = int(h.get("x-reset-after", "-1"))
        for i, chunk in enumerate(chunks):
            if i == reset_after:
                request.transport.close()  # type: ignore[union-attr]
                return resp
            if gate and i == hold_after and not await self._hold(gate, request):
                return resp
            await resp.write(enc.chunk(chunk) if enc else chunk)
            if delay and i < len(chunks) - 1:
                await asyncio.sleep(delay)
        if gate and hold_after == len(chunks) and not await self._hold(gate, request):
            return resp
        if enc:
            await resp.write(enc.finish())
        await resp.write_eof()
        return resp


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
