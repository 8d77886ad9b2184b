"""The self-cost metric: the time a call spends inside the sidecar's message handlers (not waiting
between messages) is accumulated per stream and observed in extproc_processing_duration_seconds,
on Prometheus and over OTLP."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from extproc.apis.openai import OpenAIChat
from extproc.core import config
from extproc.core.config import parse
from extproc.server import processor as processor_module
from extproc.server.processor import Processor
from extproc.telemetry.metrics import WORKER_CPU, MetricsObserver
from extproc.telemetry.otlp_metrics import OtlpMetrics
from tests.unit.test_otlp_metrics import StoreExporter
from tests.unit.test_processor import CHAT_JSON, Recorder, body, headers, req_headers

SLOW = 0.03  # seconds a slow parser hook spends per response chunk


def _messages() -> list:
    return [
        req_headers(),
        body("request_body", b'{"model":"gpt-4o","messages":[]}', end=True),
        headers("response_headers", **{":status": "200", "content-type": "application/json"}),
        body("response_body", CHAT_JSON[:40]),
        body("response_body", CHAT_JSON[40:], end=True),
    ]


def _drive(processor: Processor, between: Callable[[], None] = lambda: None) -> None:
    """One stream, message by message as the server drives it, calling ``between`` after each
    message (the time until the next one: Envoy, the upstream, the client, not the sidecar)."""
    stream = processor.open_stream()
    try:
        for req in _messages():
            stream.handle(req)
            between()
    finally:
        processor.close_stream(stream)


@pytest.fixture
def slow_parser(monkeypatch):
    inner = OpenAIChat.feed_response

    def feed_response(self, chunk, end):  # type: ignore[no-untyped-def]
        time.sleep(SLOW)  # a parser that blocks the worker for SLOW per chunk
        return inner(self, chunk, end)

    monkeypatch.setattr(OpenAIChat, "feed_response", feed_response)


def test_a_slow_handler_is_observed_in_both_backends(slow_parser):
    stats = config.StatsConfig.model_validate({"otlp": {"enabled": True}})
    exporter = StoreExporter()
    otlp = OtlpMetrics(stats, exporter)
    registry = CollectorRegistry()
    prom = MetricsObserver(stats, registry, otlp.measurer)
    rec = Recorder()
    try:
        _drive(Processor(parse({}), [rec, prom, otlp]))
        assert otlp.force_flush()
    finally:
        otlp.shutdown()
    (call,) = rec.calls
    assert call.processing >= 2 * SLOW  # two response chunks, each through the slow hook
    labels = {"llm": "openai", "operation": "chat"}
    observed = registry.get_sample_value("extproc_processing_duration_seconds_sum", labels)
    assert observed == call.processing
    assert registry.get_sample_value("extproc_processing_duration_seconds_count", labels) == 1
    assert registry.get_sample_value("extproc_processing_duration_seconds_bucket", {**labels, "le": "0.05"}) == 0
    assert exporter.store.total("extproc.processing.duration", "sum", llm="openai", operation="chat") == pytest.approx(observed)


def test_time_between_messages_is_not_counted(monkeypatch):
    # The sidecar's clock jumps an hour between two messages, far more than any handler takes
    # (real 50 ms pauses raced the handlers' time, which on a loaded machine includes its waits
    # for a CPU).
    skipped = [0.0]
    monkeypatch.setattr(processor_module, "_clock", lambda: time.perf_counter() + skipped[0])

    def an_hour_passes() -> None:
        skipped[0] += 3600

    rec = Recorder()
    _drive(Processor(parse({}), [rec]), between=an_hour_passes)
    (call,) = rec.calls
    assert skipped[0] == 5 * 3600
    assert 0 < call.processing < 3600  # five quick handlers; none of the hours between them


def test_worker_cpu_is_sampled_as_calls_end():
    prom = MetricsObserver(config.StatsConfig(), CollectorRegistry())
    before = WORKER_CPU._value.get()
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # burn CPU the gauge must then show
        pass
    rec = Recorder()
    processor = Processor(parse({}), [rec])
    _drive(processor)
    (call,) = rec.calls
    prom._cpu_sampled = call.end - 1.0  # a second since the last sample
    prom.on_call_end(call)
    assert WORKER_CPU._value.get() >= before + 0.05


def test_worker_cpu_time_is_pushed_over_otlp():
    exporter = StoreExporter()
    otlp = OtlpMetrics(config.StatsConfig.model_validate({"otlp": {"enabled": True}}), exporter)
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    try:
        assert otlp.force_flush()
    finally:
        otlp.shutdown()
    user = exporter.store.total("process.cpu.time", **{"cpu.mode": "user"})
    system = exporter.store.total("process.cpu.time", **{"cpu.mode": "system"})
    assert user + system >= 0.05 and user > 0
