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

import logging
import os
import shutil
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob("*.db"):
            stale.unlink()
        self._previous = given
        os.environ[ENV] = str(self.path)
        if "prometheus_client.values" in sys.modules:  # imported before us: switch it over too
            from prometheus_client import values

            values.ValueClass = values.get_value_class()

    def worker_exited(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.path))

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
            # Nothing started after this (a test in the same process, a child) may write there.
            if self._previous is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = self._previous


def _handler(render: Any) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, content_type = render(self.headers.get("Accept", ""))
                self._send(200, body, content_type)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (scrapes are not news)
            pass

    return Handler


class Endpoint:
    """``/metrics`` and ``/healthz`` on ``address:port``, served from a daemon thread."""

    def __init__(self, address: str, port: int, registry: Any) -> None:
        from prometheus_client import disable_created_metrics
        from prometheus_client.exposition import choose_encoder

        disable_created_metrics()  # no *_created series: half the series, nothing PromQL needs

        def render(accept: str) -> tuple[bytes, str]:
            encoder, content_type = choose_encoder(accept)
            return encoder(registry), content_type

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer((address, port), _handler(render))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        # A forked worker must not keep the listening socket open (only the parent serves it).
        os.register_at_fork(after_in_child=self._close_in_child)
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-endpoint", daemon=True)
        self.thread.start()
        log.info("metrics endpoint listening", extra={"address": f"{address}:{self.port}"})

    def _close_in_child(self) -> None:
        self.server.socket.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
        self.endpoint = Endpoint(stats.address, stats.port, registry)

    def worker_exited(self, pid: int) -> None:
        if self.multiproc is not None:
            self.multiproc.worker_exited(pid)

    def close(self) -> None:
        self.endpoint.close()
        if self.multiproc is not None:
            self.multiproc.close()
