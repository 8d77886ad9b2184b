"""The OTLP metrics export thread, paced so an export never takes more than a small share of the
worker it runs in.

An export collects every data point and encodes it to protobuf in Python: ~50 us per point with
the OpenTelemetry SDK (18,000 points, 2,000 label sets: ~1 s of CPU). It runs on its own thread,
but under the GIL it competes with the event loop for the one core Python code gets: the SDK's
own reader, exporting every ``exportIntervalMs`` regardless of what an export costs, at 100 ms
took 69% of a worker's calls per second (``python -m bench.otlp_export_cost``). So the next
export waits at least the interval, and at least ``(1 - SHARE) / SHARE`` times the CPU the last
one used: exports use at most :data:`SHARE` of the worker's CPU whatever the interval and the
series. The cyclic garbage collector is paused during a collection: the export allocates tens of
thousands of short-lived objects, which would otherwise start full collections of the whole heap,
pauses every thread (the event loop too) waits out; they are freed by reference counting.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

from opentelemetry.sdk.metrics.export import MetricReader

log = logging.getLogger("extproc.telemetry.metrics")

SHARE = 0.05  # of the worker's CPU that exports may use


class Pacer:
    """Drives ``reader.collect()`` (an export) on a daemon thread every ``interval_s``, stretched
    to keep exports within :data:`SHARE` of the CPU; one last export at :meth:`close`."""

    def __init__(self, reader: MetricReader, interval_s: float, timeout_ms: float) -> None:
        self.reader = reader
        self.interval = interval_s
        self.timeout_ms = timeout_ms
        self.wait = interval_s  # until the next export
        self.exports = 0
        self.last_cpu = 0.0  # seconds of CPU the last export used
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="extproc-otlp-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.wait):
            self.export()
            self.wait = max(self.interval, self.last_cpu * (1 - SHARE) / SHARE)
        self.export()  # what the last interval recorded

    def export(self) -> None:
        cpu = time.thread_time()
        collecting = gc.isenabled()
        gc.disable()
        try:
            self.reader.collect(timeout_millis=self.timeout_ms)
        except Exception:  # a failed collection must not end the thread; the next one carries the totals
            log.warning("OTLP metrics collection failed", exc_info=True)
        finally:
            if collecting:
                gc.enable()
        self.last_cpu = time.thread_time() - cpu
        self.exports += 1

    def close(self, timeout_s: float) -> None:
        """Stop, after one last export (bounded by ``timeout_s``)."""
        self._stop.set()
        self._thread.join(timeout_s)
