"""A dead collector never slows traffic: spans are dropped (and counted), requests flow on."""
from __future__ import annotations

import socket
import time

import httpx
import pytest

from extproc.core import config
from extproc.telemetry import observers as app
from extproc.telemetry.trace_export import SPANS_DROPPED
from tests.support.harness import Stack
from tests.support.inproc_sidecar import InProcessSidecar

pytestmark = pytest.mark.integration


def dropped() -> float:
    return sum(SPANS_DROPPED.labels(r)._value.get() for r in ("queue_full", "export_failed"))


def test_requests_flow_and_drops_are_counted_when_the_collector_is_dead(tmp_path, mock_llm):
    # A black hole: the TCP handshake completes (listen backlog) but nothing ever answers,
    # so every export hangs until its timeout: the worst kind of dead collector.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    dead = f"127.0.0.1:{hole.getsockname()[1]}"
    stack = Stack(tmp_path, mock_llm, start_sidecar=False)
    cfg = config.parse({"listen": f"127.0.0.1:{stack.sidecar_port}", "tracing": {
        "otlpEndpoint": dead, "maxQueueSize": 4, "maxExportBatchSize": 2, "scheduleDelayMs": 20, "exportTimeoutMs": 300}})
    observers = app.observers(cfg)
    sidecar = InProcessSidecar(cfg, observers)
    before = dropped()
    try:
        with stack, httpx.Client(timeout=10) as client:
            worst = 0.0
            for _i in range(40):
                t = time.perf_counter()
                r = client.post(stack.url("/v1/chat/completions"), json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                worst = max(worst, time.perf_counter() - t)
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12
            deadline = time.monotonic() + 10
            while dropped() - before < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        sidecar.close()
    assert worst < 1.0  # no request waited on the collector
    assert SPANS_DROPPED.labels("queue_full")._value.get() > 0
    assert dropped() - before >= 20
    assert sidecar.processor.internal_errors == 0
    hole.close()
    for o in observers:
        if hasattr(o, "shutdown"):
            o.shutdown()
