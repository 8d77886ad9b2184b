"""Metrics over OTLP end to end: two workers push to an in-test collector (gRPC and
HTTP); its token sums equal the Prometheus counters for the same traffic. A dead collector does
not slow calls (timing comparison; run with -s to see the figures)."""

from __future__ import annotations

import concurrent.futures
import socket
import statistics
import time
from typing import Any

import httpx
import pytest
import yaml

from tests.support.harness import Stack, scrape, total
from tests.support.otlp_receiver import MetricsGrpcReceiver, MetricsHttpReceiver

pytestmark = pytest.mark.integration


def chat(stack: Stack, i: int) -> dict[str, Any]:
    stream = i % 3 == 0
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "word " * (2 + i % 7)}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(
        stack.url("/v1/chat/completions"),
        json=body,
        timeout=20,
        headers={"x-mock-words": str(3 + i % 5), "x-mock-chunk-ms": "1", "x-session-id": f"s-{i % 4}"},
    )
    assert r.status_code == 200
    return {"prompt": 2 + i % 7, "completion": 3 + i % 5}


def wait_recorded(stack: Stack, n: int) -> list:
    deadline = time.monotonic() + 15
    while True:
        samples = scrape(stack.metrics_port)
        if total(samples, "ai_requests_total") >= n or time.monotonic() > deadline:
            assert total(samples, "ai_requests_total") == n
            return samples


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_otlp_token_sums_equal_the_prometheus_counters_with_two_workers(tmp_path, mock_llm, transport):
    receiver = MetricsGrpcReceiver() if transport == "grpc" else MetricsHttpReceiver()
    if transport == "grpc":  # configured in the file
        cfg: dict[str, Any] = {"stats": {"otlp": {"enabled": True, "endpoint": receiver.endpoint, "exportIntervalMs": 200}}}
        env: dict[str, str] = {}
    else:  # configured by the standard variables only
        cfg = {}
        env = {
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.url,
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
        }
    cfg["stats"] = {**cfg.get("stats", {}), "customLabels": [{"name": "session", "field": "session_id"}]}
    try:
        with Stack(
            tmp_path,
            mock_llm,
            sidecar_config=cfg,
            sidecar_env=env,
            workers=2,
            envoy_concurrency=8,
            extproc_streams_per_connection=1,
            message_timeout_ms=5000,
        ) as stack:
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                sent = list(pool.map(lambda i: chat(stack, i), range(64)))
            samples = wait_recorded(stack, len(sent))
            prom = {
                "prompt": total(samples, "ai_prompt_tokens_total"),
                "completion": total(samples, "ai_completion_tokens_total"),
                "input": total(samples, "gen_ai_client_token_usage_sum", gen_ai_token_type="input"),
                "output": total(samples, "gen_ai_client_token_usage_sum", gen_ai_token_type="output"),
                "s-1": total(samples, "ai_prompt_tokens_total", session="s-1"),
            }
            assert prom["prompt"] == prom["input"] == sum(s["prompt"] for s in sent)
            assert prom["completion"] == prom["output"] == sum(s["completion"] for s in sent)
            deadline = time.monotonic() + 15
            while True:
                got = {
                    "prompt": receiver.total("ai.prompt_tokens"),
                    "completion": receiver.total("ai.completion_tokens"),
                    "input": receiver.total("gen_ai.client.token.usage", "sum", **{"gen_ai.token.type": "input"}),
                    "output": receiver.total("gen_ai.client.token.usage", "sum", **{"gen_ai.token.type": "output"}),
                    "s-1": receiver.total("ai.prompt_tokens", session="s-1"),
                }
                if got == prom or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert got == prom
            assert receiver.total("ai.requests") == len(sent)
            # each worker pushes its own series (its service.instance.id); the collector sums them
            assert len(receiver.instances("ai.requests")) == 2
    finally:
        receiver.close()


def _latencies(stack: Stack, n: int) -> list[float]:
    out = []
    with httpx.Client(timeout=10) as client:
        for i in range(n):
            t = time.perf_counter()
            r = client.post(
                stack.url("/v1/chat/completions"),
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}], **({"stream": True} if i % 2 else {})},
                headers={"x-mock-chunk-ms": "0"},
            )
            out.append(time.perf_counter() - t)
            assert r.status_code == 200
    return sorted(out)


def _figures(lat: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(lat) * 1000, 2),
        "p95_ms": round(lat[int(len(lat) * 0.95)] * 1000, 2),
        "max_ms": round(lat[-1] * 1000, 2),
    }


def test_a_dead_collector_does_not_slow_calls(tmp_path, mock_llm):
    """Calls with the OTLP collector a black hole take as long as calls with a collector that
    answers. Both sides export every 500 ms (collecting and encoding the points costs the same
    whether or not anyone answers: comparing with OTLP off measured that, ~0.5-1.5 ms of p50 at
    this interval on 2 shared CPUs, not the dead collector). Measured in alternating rounds (the
    sidecar restarted with each config in turn) so a change in the shared machine's load during
    the test falls on both sides alike."""
    # A black hole: connections are accepted (listen backlog), nothing ever answers.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    receiver = MetricsGrpcReceiver()
    otlp = {"enabled": True, "exportIntervalMs": 500, "exportTimeoutMs": 300}
    rounds, n = 3, 100
    runs: dict[str, list[list[float]]] = {"live": [], "dead": []}
    try:
        with Stack(tmp_path, mock_llm, sidecar_config={}, message_timeout_ms=5000) as stack:
            base = yaml.safe_load(stack.sidecar_config_path.read_text())
            configs = {
                name: {**base, "stats": {**base.get("stats", {}), "otlp": {**otlp, "endpoint": endpoint}}}
                for name, endpoint in (("live", receiver.endpoint), ("dead", f"127.0.0.1:{hole.getsockname()[1]}"))
            }
            for _ in range(rounds):
                for name, cfg in configs.items():
                    stack.stop_sidecar()
                    stack.sidecar_config_path.write_text(yaml.safe_dump(cfg))
                    stack.start_sidecar()
                    _latencies(stack, 20)  # warm up
                    runs[name].append(_latencies(stack, n))
                    # this sidecar's exports reached the receiver, or failed and were counted
                    deadline = time.monotonic() + 10
                    while (
                        (dropped := total(scrape(stack.metrics_port), "ai_otlp_metric_points_dropped_total")) == 0
                        and name == "dead"
                        and time.monotonic() < deadline
                    ):
                        time.sleep(0.1)
                    assert (dropped > 0) == (name == "dead")
        assert receiver.exports > 0
    finally:
        hole.close()
        receiver.close()
    b, d = (_figures(sorted(x for r in runs[k] for x in r)) for k in ("live", "dead"))
    p50 = {k: statistics.median(statistics.median(r) * 1000 for r in runs[k]) for k in runs}  # median of the rounds' p50s
    print(
        f"\nOTLP metrics, {rounds} alternating rounds of {n} sequential calls (half streamed) through Envoy:\n"
        f"  live collector: {b}, round p50s {[round(statistics.median(r) * 1000, 2) for r in runs['live']]}\n"
        f"  dead collector: {d}, round p50s {[round(statistics.median(r) * 1000, 2) for r in runs['dead']]}"
    )
    assert p50["dead"] <= p50["live"] * 1.3 + 1.0
    assert d["p95_ms"] <= b["p95_ms"] * 2 + 5.0  # tails are noisy on small shared machines
    assert d["max_ms"] < 1000  # no call waited for an export (300 ms timeout, retried)
