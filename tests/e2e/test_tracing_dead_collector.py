"""A dead collector never slows traffic: spans are dropped (and counted), requests flow on."""

from __future__ import annotations

import signal
import socket
import threading
import time
import uuid

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
    cfg = config.parse(
        {
            "listen": f"127.0.0.1:{stack.sidecar_port}",
            "tracing": {"otlpEndpoint": dead, "maxQueueSize": 4, "maxExportBatchSize": 2, "scheduleDelayMs": 20, "exportTimeoutMs": 300},
        }
    )
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
    assert sidecar.processor.counters.internal_errors == 0
    hole.close()
    for o in observers:
        if hasattr(o, "shutdown"):
            o.shutdown()


def test_a_reload_with_a_dead_collector_loses_no_call(tmp_path, mock_llm):
    """SIGHUP replaces the tracer while its export thread hangs on a collector that accepts and
    never answers: the old one is shut down off the event loop, so no call waits past Envoy's
    500 ms message timeout and every call's tokens reach the access log."""
    hole = socket.socket()  # accepts (listen backlog), never answers
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    tracing = {
        "otlpEndpoint": f"127.0.0.1:{hole.getsockname()[1]}",
        "scheduleDelayMs": 20,
        "maxExportBatchSize": 4,
        "exportTimeoutMs": 3000,
    }
    ids: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def client(stack: Stack) -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                rid = str(uuid.uuid4())
                r = c.post(
                    stack.url("/v1/chat/completions"),
                    headers={"x-request-id": rid},
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                )
                ids.append(rid)
                if r.status_code != 200:
                    failures.append(f"{r.status_code}")

    try:
        with Stack(tmp_path, mock_llm, sidecar_config={"tracing": tracing}, message_timeout_ms=500) as s:
            threads = [threading.Thread(target=client, args=(s,)) for _ in range(4)]
            for t in threads:
                t.start()
            try:
                for n in (1, 2):
                    time.sleep(1.5)  # spans queued, the export thread hangs in an export
                    s.sidecar.send_signal(signal.SIGHUP)
                    deadline = time.monotonic() + 15
                    while s.sidecar_stderr().count('"msg":"config reloaded"') < n:
                        assert time.monotonic() < deadline, s.sidecar_stderr()[-1500:]
                        time.sleep(0.05)
                time.sleep(1.5)
            finally:
                stop.set()
                for t in threads:
                    t.join(20)
            assert not failures
            assert len(ids) > 40
            s.log_entry(ids[-1])  # the access log is written
            tokens = {e.get("request_id"): e.get("completion_tokens") for e in s.log_entries()}
            lost = [rid for rid in ids if tokens.get(rid) != 12]
            assert lost == [], f"{len(lost)} of {len(ids)} calls lost their tokens"
    finally:
        hole.close()
