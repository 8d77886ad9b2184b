"""The metrics HTTP endpoint (``/metrics``, ``/healthz``), served once per ``extproc serve``.

One worker: the process serves its own registry from a thread. Several workers: prometheus-client
multiprocess mode. :func:`start` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh per-run directory
*before* prometheus-client is imported and before the workers fork (so every worker writes its
values to files there), and the parent serves the sum over all files: one scrape shows the total
over workers, including workers that died and were restarted. A directory given by the user is
emptied at start-up so a previous run's files cannot leak into the totals.

This module imports prometheus-client only inside functions, after the directory is set up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from extproc.core.config import StatsConfig

log = logging.getLogger("extproc.telemetry.metrics")
ENV = "PROMETHEUS_MULTIPROC_DIR"


class MultiprocDir:
    """The per-run directory where workers' metric files live."""

    def __init__(self) -> None:
        # An operator's own directory is used as given, but only as an absolute path: a relative
        # one (say ".") would scatter counter_<pid>.db files wherever a process happens to run.
        given = os.environ.get(ENV)
        self.owned = not (given and os.path.isabs(given))
        self.path = Path(given) if not self.owned else Path(tempfile.mkdtemp(prefix="extproc-metrics-"))  # type: ignore[arg-type]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in self.path.glob("*.db"):
                stale.unlink()
        except OSError as e:  # metrics will fail to store (logged by the workers); ext_proc still serves
            log.error("metrics directory unusable", extra={"dir": str(self.path), "error": str(e)})
        self._previous = given
        os.environ[ENV] = str(self.path)
        if "prometheus_client.values" in sys.modules:  # imported before us: switch it over too
            from prometheus_client import values

            values.ValueClass = values.get_value_class()
        from extproc.telemetry import prometheus_store

        prometheus_store.install()  # a full or unwritable directory costs metrics, never a worker (SIGBUS)

    def worker_exited(self, pid: int) -> None:
        from prometheus_client import multiprocess

        try:
            multiprocess.mark_process_dead(pid, str(self.path))
        except OSError as e:
            log.warning("could not remove a dead worker's gauge files", extra={"pid": pid, "error": str(e)})

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
            # Nothing started after this (a test in the same process, a child) may write there.
            if self._previous is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = self._previous


class Exposition:
    """The registry's exposition, rendered at most once per ``interval`` (per format) in one
    render thread and shared: scrapes arriving while a render runs wait for that render, scrapes
    within ``interval`` of it get its bytes. ``renders`` counts renders."""

    def __init__(self, registry: Any, interval: float) -> None:
        self.registry = registry
        self.interval = interval
        self.renders = 0
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="metrics-render")

    async def get(self, accept: str) -> tuple[bytes, str]:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept)
        cached = self._cache.get(content_type)
        if cached is not None and time.monotonic() - cached[0] < self.interval:
            return cached[1], content_type
        pending = self._pending.get(content_type)
        if pending is None:
            pending = asyncio.get_running_loop().run_in_executor(self._pool, self._render, encoder)
            self._pending[content_type] = pending
            pending.add_done_callback(lambda f: self._done(content_type, f))
        return await asyncio.shield(pending), content_type  # one waiter's timeout is not the others'

    def _render(self, encoder: Callable[[Any], bytes]) -> bytes:
        self.renders += 1
        return encoder(self.registry)

    def _done(self, content_type: str, f: asyncio.Future[bytes]) -> None:
        self._pending.pop(content_type, None)
        if not f.cancelled() and f.exception() is None:
            self._cache[content_type] = (time.monotonic(), f.result())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class EndpointStats:
    """The endpoint's own counters, as metrics of the registry it serves."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        e = self._endpoint
        yield CounterMetricFamily("extproc_metrics_renders", "Expositions rendered by the /metrics endpoint", value=e.exposition.renders)
        rejected = CounterMetricFamily(
            "extproc_metrics_rejected", "Connections to the /metrics endpoint refused or closed unanswered, by reason", labels=["reason"]
        )
        for reason, n in sorted(e.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected


_CHUNK = 256 << 10  # response bytes handed to the socket at a time (bounds what a slow reader buffers)
_MAX_HEAD = 16 << 10  # request line + headers


class Endpoint:
    """``/metrics`` and ``/healthz`` on ``address:port``: an asyncio HTTP/1.1 server in one daemon
    thread (an idle connection costs a socket, not a thread), rendering in a second one.

    Bounds (``stats.*``, docs/security.md): ``maxConnections`` open connections; at the cap a new
    connection closes the oldest one that is waiting on its client (for its request head, or to
    take its response) and takes its place, so connections held open cannot lock scrapes out; only
    when every connection waits for a render is the new one closed at once. The request head
    (16 KiB at most) must arrive within ``readTimeoutSeconds`` of the connection opening, else the
    connection is closed and nothing is rendered; at most ``maxConcurrentScrapes`` scrapes wait for
    a render at once (others get 503 at once); one exposition per ``renderIntervalSeconds``,
    shared; the response must be taken within ``writeTimeoutSeconds``. One request per
    connection (``Connection: close``).
    """

    def __init__(self, stats: StatsConfig, registry: Any) -> None:
        from prometheus_client import disable_created_metrics

        disable_created_metrics()  # no *_created series: half the series, nothing PromQL needs
        self.cfg = stats
        self.exposition = Exposition(registry, stats.render_interval_seconds)
        self.rejected: dict[str, int] = {}
        self.connections = 0
        self.scrapes = 0
        # Open connections waiting on their client, oldest first (dicts keep insertion order):
        # the ones a new connection may evict at the cap. Not in it: those waiting for a render.
        self._waiting: dict[asyncio.WriteTransport, None] = {}
        self._evicted: set[asyncio.WriteTransport] = set()
        self._registry = registry
        self._stats = EndpointStats(self)
        registry.register(self._stats)
        family = socket.AF_INET6 if ":" in stats.address else socket.AF_INET
        self._sock = socket.create_server((stats.address, stats.port), family=family, backlog=128)
        self.port = self._sock.getsockname()[1]
        # A forked worker must not keep the listening socket open (only the parent serves it).
        os.register_at_fork(after_in_child=self._close_in_child)
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), name="metrics-endpoint", daemon=True)
        self.thread.start()
        started.wait(10)
        log.info("metrics endpoint listening", extra={"address": f"{stats.address}:{self.port}"})

    def _run(self, started: threading.Event) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        self._stop = asyncio.Event()

        async def main() -> None:
            server = await asyncio.start_server(self._serve, sock=self._sock, limit=_MAX_HEAD)
            started.set()
            async with server:
                await self._stop.wait()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        if self.connections >= self.cfg.max_connections:
            victim = next(iter(self._waiting), None)
            if victim is None:  # every connection is waiting for a render: they are scrapes
                self._reject("connections")
                transport.abort()
                return
            del self._waiting[victim]  # the oldest connection waiting on its client makes room
            self._evicted.add(victim)
            self._reject("evicted")
            victim.abort()
        self.connections += 1
        self._waiting[transport] = None
        try:
            await self._exchange(reader, writer)
        except Exception:  # a bug here must not stop the endpoint; the connection is dropped
            log.exception("metrics endpoint: request failed")
        finally:
            self.connections -= 1
            self._waiting.pop(transport, None)
            self._evicted.discard(transport)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a reader too slow for writeTimeoutSeconds: drop what is left
            else:
                writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.cfg.read_timeout_seconds):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            self._reject("read_timeout")
            return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            if writer.transport not in self._evicted:  # (an evicted one is counted as such)
                self._reject("bad_request")  # closed before a complete request head, or a huge one
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._reject("bad_request")
            await self._send(writer, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await self._send(writer, 405, b"method not allowed\n")
            return
        if path == "/healthz":
            await self._send(writer, 200, b"ok\n", head_only=method == "HEAD")
        elif path == "/metrics":
            if self.scrapes >= self.cfg.max_concurrent_scrapes:
                self._reject("busy")
                await self._send(writer, 503, b"busy: too many scrapes in progress\n", extra=(("Retry-After", "1"),))
                return
            accept = ""
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "accept":
                    accept = value.strip()
            # Waiting for the render: not evictable, and holding one of the scrape slots. Taking
            # the (already rendered, shared) bytes is waiting on the client again: evictable, no slot.
            transport = writer.transport
            self._waiting.pop(transport, None)
            self.scrapes += 1
            try:
                body, content_type = await self.exposition.get(accept)
            except Exception:
                log.exception("rendering /metrics failed")
                body, content_type = b"", ""
            finally:
                self.scrapes -= 1
                if not transport.is_closing():
                    self._waiting[transport] = None
            if not content_type:
                await self._send(writer, 500, b"rendering failed\n")
                return
            await self._send(writer, 200, body, content_type, head_only=method == "HEAD")
        else:
            await self._send(writer, 404, b"not found: try /metrics or /healthz\n")

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        code: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        head_only: bool = False,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        reason = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            500: "Internal Server Error",
            503: "Service Unavailable",
        }[code]
        head = [
            f"HTTP/1.1 {code} {reason}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in extra),
        ]
        try:
            async with asyncio.timeout(self.cfg.write_timeout_seconds):
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
                if not head_only:
                    view = memoryview(body)
                    for off in range(0, len(view), _CHUNK):
                        writer.write(view[off : off + _CHUNK])
                        await writer.drain()
                await writer.drain()
        except TimeoutError:
            self._reject("write_timeout")
        except ConnectionError:
            pass

    def _close_in_child(self) -> None:
        self._sock.close()

    def close(self) -> None:
        if self.thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self.thread.join(10)
        self._sock.close()
        self.exposition.close()
        try:
            self._registry.unregister(self._stats)
        except KeyError:
            pass


class Runtime:
    """What ``extproc serve`` starts for metrics, and stops at exit."""

    def __init__(self, stats: StatsConfig, workers: int) -> None:
        self.multiproc = MultiprocDir() if workers > 1 else None
        from prometheus_client import CollectorRegistry

        if self.multiproc is not None:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(self.multiproc.path))
        else:
            from extproc.telemetry.metrics import process_registry

            registry = process_registry()
        self.endpoint = Endpoint(stats, registry)

    def worker_exited(self, pid: int) -> None:
        if self.multiproc is not None:
            self.multiproc.worker_exited(pid)

    def close(self) -> None:
        self.endpoint.close()
        if self.multiproc is not None:
            self.multiproc.close()
