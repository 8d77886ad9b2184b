"""Getting finished spans to the collector without ever slowing traffic.

``BoundedBatchProcessor`` queues finished calls' span records in a bounded deque (append is O(1),
no lock held by the caller) and a daemon thread exports them in batches: over OTLP/gRPC (the
default) the records are the spans already written as bytes (``span_encoding``), the thread joins
a batch into the request and the SDK's exporter sends those bytes; over OTLP/HTTP it builds the SDK's
``ReadableSpan``s for the SDK's exporter. When the collector is slow or dead the
queue fills and the oldest spans are dropped; drops and failed exports are counted in
``ai_trace_spans_dropped_total{reason}``. The exporter is built from ``tracing`` config, falling
back to the standard ``OTEL_EXPORTER_OTLP_*`` variables (config wins where both are set)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from prometheus_client import Counter

from extproc.core.config import TracingConfig
from extproc.telemetry import span_encoding
from extproc.telemetry.otlp_settings import HTTP, http_traces_url
from extproc.telemetry.otlp_settings import traces_protocol as protocol

if TYPE_CHECKING:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

log = logging.getLogger("extproc.telemetry.tracing")

SPANS_DROPPED = Counter(
    "ai_trace_spans_dropped",
    "Spans not delivered to the OTLP collector (queue_full: the export queue overflowed; "
    "export_failed: the collector refused or could not be reached).",
    ["reason"],
)
for _reason in ("queue_full", "export_failed"):
    SPANS_DROPPED.labels(_reason)  # zero-valued series from the start: alerts see 0, not "absent"


def build_exporter(cfg: TracingConfig) -> SpanExporter:
    timeout = cfg.export_timeout_ms / 1000
    headers = dict(cfg.headers) or None  # None: the exporter reads OTEL_EXPORTER_OTLP_HEADERS
    if protocol(cfg) == HTTP:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        # A configured endpoint follows the base-URL rule too; the env vars are left to the SDK.
        url = http_traces_url(cfg.otlp_endpoint) if cfg.otlp_endpoint else None
        return HttpExporter(endpoint=url, headers=headers, timeout=timeout)
    ep = cfg.otlp_endpoint
    insecure = None
    if ep and "://" not in ep:
        insecure = True  # a bare host:port is a plaintext collector (set https:// for TLS)
    return grpc_exporter_class()(endpoint=ep, headers=headers, timeout=timeout, insecure=insecure)


class EncodedSpans:
    """A batch whose OTLP ``ExportTraceServiceRequest`` is already written (``request``, bytes):
    what ``BoundedBatchProcessor`` hands an exporter that ``takes_encoded`` instead of spans.
    ``spans``: those of the batch left to the SDK's encoder (their request is appended: a
    request's only field is repeated, so two serialised requests joined are one with both)."""

    __slots__ = ("count", "request", "spans")

    def __init__(self, request: bytes, count: int, spans: Sequence[ReadableSpan] = ()) -> None:
        self.request = request
        self.count = count
        self.spans = spans

    def __len__(self) -> int:  # the SDK exporter counts what it exports with len()
        return self.count


def _serialize(request: Any) -> bytes:
    """The request as sent: bytes as they are, a protobuf message (the SDK's encoder) serialised."""
    return request if type(request) is bytes else request.SerializeToString()


@functools.cache
def grpc_exporter_class() -> type[OTLPSpanExporter]:
    """The SDK's OTLP/gRPC span exporter (channel, retries, headers, compression, timeout: all
    the SDK's), sending requests written as bytes by ``span_encoding`` instead of the SDK's
    per-attribute protobuf objects: an ``EncodedSpans`` batch as it is; ``ReadableSpan``s
    encoded here, and any span that encoder does not handle, or a failure in it, by the SDK's."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: F811
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

    class GrpcSpanExporter(OTLPSpanExporter):
        takes_encoded = True

        def _initialize_channel_and_stub(self) -> None:
            """The SDK's channel; its stub's ``Export`` given a serializer that sends bytes as they are."""
            super()._initialize_channel_and_stub()
            channel: Any = self._channel
            client: Any = self._client
            client.Export = channel.unary_unary(
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                request_serializer=_serialize,
                response_deserializer=ExportTraceServiceResponse.FromString,
                _registered_method=True,
            )

        def _translate_data(self, data: Sequence[ReadableSpan] | EncodedSpans) -> Any:
            if isinstance(data, EncodedSpans):
                if not data.spans:
                    return data.request
                return data.request + _serialize(self._translate_data(data.spans))
            try:
                return span_encoding.encode_spans(data)
            except span_encoding.Unsupported:
                pass
            except Exception:
                log.exception("span encoding failed; using the SDK's encoder")
            return super()._translate_data(data)

    return GrpcSpanExporter


class BoundedBatchProcessor:
    """``add(record)`` on the call's path; ``prepare(batch of records)`` (what the exporter's
    ``export`` takes: ``ReadableSpan``s, or ``EncodedSpans``) and the export in the thread. Only
    sampled spans are added, so every drop counted is a span lost."""

    def __init__(
        self,
        exporter: SpanExporter,
        prepare: Callable[[list[Any]], Any],
        *,
        max_queue_size: int,
        max_batch: int,
        delay_s: float,
    ) -> None:
        self._exporter = exporter
        self.prepare = prepare
        self._queue: deque[Any] = deque()
        self._max_queue = max_queue_size
        self._max_batch = max_batch
        self._delay = delay_s
        self._wake = threading.Event()
        self._full = False  # add() woke the thread for a full batch (not the timer, a flush, shutdown)
        self._parked = True  # the thread waits with no timeout: the next add() must wake it
        self._stopped = False
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="extproc-span-export", daemon=True)
        self._thread.start()

    def add(self, record: Any) -> None:
        if self._stopped:
            return
        queue = self._queue
        if len(queue) >= self._max_queue:
            queue.popleft()  # oldest first: the newest spans are the most useful
            SPANS_DROPPED.labels("queue_full").inc()
        queue.append(record)
        if len(queue) >= self._max_batch:
            self._full = True
            self._wake.set()
        elif self._parked:  # the thread sleeps with no timer: this span starts its schedule delay
            self._parked = False
            self._wake.set()

    def _run(self) -> None:
        """Export on the schedule delay while spans come; sleep with no timer while none do.

        A wake-up of a sleeping thread costs ~50-100 us of CPU on a small VM, so the thread of an
        idle worker must not wake every schedule delay to find nothing. When a whole delay has
        passed with nothing queued (and at start) the thread *parks*: it waits with no timeout,
        and the next ``add()`` wakes it (one attribute read on ``add()``'s path, a wake-up only
        for the span that comes to a parked thread). That span waits the schedule delay counted
        from its arrival, as with the OpenTelemetry SDK's batch processor; while spans keep
        coming the thread wakes once a delay as it always did. Either way no span waits longer
        than the delay (and an export under way)."""
        parked = True  # the queue starts empty
        while not self._stopped:
            if parked:
                self._parked = True  # before looking at the queue: add() appends, then reads this
                if not self._queue:
                    self._wake.wait()  # until a span comes, a full batch, a flush or shutdown
                self._parked = False
                self._wake.clear()
                if not self._full:
                    # A span (its delay starts now: the timed wait below), or a flush or shutdown
                    # with nothing queued (park again). A flush of queued spans sets the event
                    # again until they are sent, which ends the timed wait at once.
                    parked = not self._queue
                    continue
                parked = False
            elif not self._wake.wait(self._delay) and not self._queue:
                parked = True  # a whole delay and nothing came: no timer until the next span
                continue
            else:
                self._wake.clear()
            full, self._full = self._full, False
            # Woken for a full batch: only full batches go, the rest waits to fill one (or for the
            # timer). Draining to the last span instead sent a few spans per call as they came in
            # while the big batch was written: the same gRPC call's cost for a handful.
            self._drain(self._max_batch if full else 1)
        self._drain(1)

    def _drain(self, least: int) -> None:
        """Export batches while ``least`` spans or more are queued."""
        self._idle.clear()
        try:
            while len(self._queue) >= least:
                batch: list[Any] = []
                while self._queue and len(batch) < self._max_batch:
                    batch.append(self._queue.popleft())
                self._export(batch)
        finally:
            self._idle.set()

    def _export(self, batch: list[Any]) -> None:
        try:
            result = self._exporter.export(self.prepare(batch))
        except Exception:  # an exporter bug must not kill the export thread
            log.exception("span export raised")
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            SPANS_DROPPED.labels("export_failed").inc(len(batch))

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Until every span queued so far is exported (True), or ``timeout_millis`` (False).
        The export thread is woken; spans it has taken but not yet sent count as queued (it is
        not idle), so a flush called before the thread picks the queue up waits for it."""
        deadline = time.monotonic() + timeout_millis / 1000
        while True:
            self._full = False  # everything, not only full batches
            self._wake.set()
            if not self._queue and self._idle.is_set():
                return True
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return not self._queue and self._idle.is_set()
            time.sleep(0.002)

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(5)
        self._exporter.shutdown()
