"""The span export queue (``extproc.telemetry.trace_export.BoundedBatchProcessor``): what
``force_flush`` promises."""

from __future__ import annotations

import threading
import time
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from extproc.telemetry.trace_export import BoundedBatchProcessor


class _SlowExporter(SpanExporter):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.exported: list[Any] = []
        self.started = threading.Event()

    def export(self, spans: Any) -> SpanExportResult:
        self.started.set()
        time.sleep(self.seconds)
        self.exported.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _processor(exporter: SpanExporter, delay_s: float = 60.0) -> BoundedBatchProcessor:
    return BoundedBatchProcessor(exporter, list, max_queue_size=100, max_batch=50, delay_s=delay_s)


def test_force_flush_right_after_adding_waits_for_the_spans_to_be_exported() -> None:
    exporter = _SlowExporter(0.05)
    processor = _processor(exporter)  # the thread would otherwise sleep for a minute
    try:
        processor.add("a")
        processor.add("b")
        assert processor.force_flush(5000) is True
        assert exporter.exported == ["a", "b"]
    finally:
        processor.shutdown()


def test_force_flush_waits_for_a_batch_taken_but_not_yet_sent() -> None:
    exporter = _SlowExporter(0.2)
    processor = _processor(exporter)
    try:
        processor.add("a")
        processor._wake.set()
        assert exporter.started.wait(5)  # the batch has left the queue; its export is under way
        assert processor.force_flush(5000) is True
        assert exporter.exported == ["a"]
    finally:
        processor.shutdown()


def test_force_flush_reports_failure_when_the_export_outlasts_the_timeout() -> None:
    exporter = _SlowExporter(1.0)
    processor = _processor(exporter)
    try:
        processor.add("a")
        started = time.monotonic()
        assert processor.force_flush(100) is False
        assert time.monotonic() - started < 0.9
    finally:
        processor.shutdown()
