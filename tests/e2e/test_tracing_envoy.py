"""Envoy's own OpenTelemetry tracing and the sidecar's spans, in one trace."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from extproc.devtools import envoy_config
from extproc.devtools.dev import envoy_binary
from tests.e2e.test_tracing import grpc_receiver, traceparent  # noqa: F401  (fixtures)
from tests.support.harness import Stack

pytestmark = pytest.mark.integration


def test_bootstrap_with_tracing_validates(tmp_path):
    boot = envoy_config.bootstrap(
        upstreams=[envoy_config.Upstream("/", "http://127.0.0.1:8000")], tracing_otlp="otel-collector.observability:4317"
    )
    hcm = envoy_config.to_dict(boot)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["tracing"]["provider"]["name"] == "envoy.tracers.opentelemetry"
    assert any(c.name == "otel_collector" for c in boot.static_resources.clusters)
    path = tmp_path / "envoy.yaml"
    path.write_text(envoy_config.dump(boot))
    p = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_one_trace_holds_envoys_spans_and_ours(tmp_path, mock_llm, grpc_receiver):  # noqa: F811
    cfg = {"tracing": {"otlpEndpoint": grpc_receiver.endpoint, "scheduleDelayMs": 50}}
    with Stack(tmp_path, mock_llm, sidecar_config=cfg, tracing_otlp=grpc_receiver.endpoint) as s:
        tp, trace_id, client_span = traceparent()
        r = httpx.post(
            s.url("/v1/chat/completions"), json={"model": "traced-by-envoy", "messages": []}, headers={"traceparent": tp}, timeout=10
        )
        assert r.status_code == 200
        ours = grpc_receiver.wait_trace(trace_id)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            envoy_spans = [x for x in grpc_receiver.spans if x.trace_id == trace_id and x.resource.get("service.name") == "envoy"]
            if any(x.span_id == ours.parent_span_id for x in envoy_spans) and any(x.parent_span_id == client_span for x in envoy_spans):
                break
            time.sleep(0.1)
    names = {x.span_id: x.name for x in envoy_spans}
    assert any(x.parent_span_id == client_span for x in envoy_spans), names  # Envoy continued the client's trace
    assert ours.parent_span_id in names, (ours.parent_span_id, names)  # our span hangs under Envoy's ext_proc span
    assert names[ours.parent_span_id].startswith("async envoy.service.ext_proc")
