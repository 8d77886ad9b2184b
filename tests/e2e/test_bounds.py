"""Hostile values through the real Envoy: a client or upstream picks
label values, so none of them may grow the exposition, the access log or a span without bound.

- a 900 KB model string and a 4 KB provider header are cut to 128 characters in every
  place they are exported (metrics, our dynamic metadata in Envoy's access log, span attributes);
- the series budget (``stats.maxSeries``) holds however many distinct label sets the
  clients invent; folded calls keep their tokens (under ``__overflow__``) and are counted; MCP
  tool names are folded by the same rules.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid

import httpx
import pytest

from extproc.telemetry.labels import MAX_VALUE_CHARS, OVERFLOW
from tests.support.harness import Stack, scrape, total
from tests.support.mcp_upstream import McpUpstream
from tests.support.otlp_receiver import GrpcReceiver

pytestmark = pytest.mark.integration

PATIENT = {"message_timeout_ms": 5000}


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return r.read().decode()


def _wait_calls(port: int, n: float, timeout: float = 15) -> list:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if total(samples, "ai_requests_total") >= n or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_huge_model_and_provider_are_cut_everywhere(tmp_path, mock_llm):
    """One request, a 900 KB model and a 4 KB provider header: /metrics grows by a few KB, not
    the ~79 MB it did, and every exported copy of those values is at most 128 characters."""
    receiver = GrpcReceiver()
    cfg = {"tracing": {"otlpEndpoint": receiver.endpoint, "scheduleDelayMs": 50}}
    huge_model = "m" * 900_000
    huge_provider = "p" * 4_000
    try:
        with Stack(tmp_path, mock_llm, sidecar_config=cfg, **PATIENT) as s:
            rid = str(uuid.uuid4())
            r = httpx.post(
                s.url("/v1/chat/completions"),
                timeout=30,
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                headers={"x-request-id": rid},
            )
            assert r.status_code == 200
            _wait_calls(s.metrics_port, 1)
            before = len(_metrics_text(s.metrics_port))
            rid = str(uuid.uuid4())
            r = httpx.post(
                s.url("/v1/chat/completions"),
                timeout=60,
                json={"model": huge_model, "messages": [{"role": "user", "content": "hi there"}]},
                headers={"x-request-id": rid, "x-llm-provider": huge_provider},
            )
            assert r.status_code == 200 and r.json()["model"] == huge_model  # the upstream echoes it
            _wait_calls(s.metrics_port, 2)
            text = _metrics_text(s.metrics_port)
            entry = s.log_entry(rid)
            receiver.wait_for(lambda sp: sp.attributes.get("gen_ai.usage.input_tokens") == 2)
    finally:
        receiver.close()
    grown = len(text) - before
    assert grown < 200_000, f"/metrics grew by {grown} bytes for one call"
    cut_model, cut_provider = "m" * MAX_VALUE_CHARS, "p" * MAX_VALUE_CHARS
    assert f'model="{cut_model}"' in text and "m" * (MAX_VALUE_CHARS + 1) not in text
    assert f'llm="{cut_provider}"' in text and "p" * (MAX_VALUE_CHARS + 1) not in text
    # our dynamic metadata, as Envoy's access log shows it
    assert entry["model"] == cut_model and entry["provider_model"] == cut_model and entry["provider"] == cut_provider
    assert entry["prompt_tokens"] == 2  # the call itself was accounted
    span = next(sp for sp in receiver.spans if sp.attributes.get("gen_ai.usage.input_tokens") == 2)
    assert span.attributes["gen_ai.request.model"] == cut_model
    assert span.attributes["gen_ai.response.model"] == cut_model
    assert span.attributes["gen_ai.provider.name"] == cut_provider
    assert len(span.name) <= MAX_VALUE_CHARS * 2
    for value in span.attributes.values():
        assert not isinstance(value, str) or len(value) <= MAX_VALUE_CHARS, value[:40]


@pytest.mark.parametrize("workers", [1, 2])
def test_series_budget_folds_invented_label_sets(tmp_path, mock_llm, workers):
    """60 calls, each with a model and provider of its own (every value under its label's cap):
    no metric family shows more than ``maxSeries`` series (a histogram label set counts its
    buckets, _sum and _count) besides its __overflow__ ones, with one worker or several (the
    budget is the sidecar's, divided among its workers), the tokens of every call are still
    counted, and the folded calls are counted."""
    budget = 40
    with Stack(tmp_path, mock_llm, sidecar_config={"stats": {"maxSeries": budget}}, workers=workers, envoy_concurrency=4, **PATIENT) as s:
        sent_prompt = 0
        for i in range(60):
            r = httpx.post(
                s.url("/v1/chat/completions"),
                timeout=30,
                json={"model": f"model-{i}", "messages": [{"role": "user", "content": "a b c"}]},
                headers={"x-llm-provider": f"provider-{i % 7}"},
            )
            assert r.status_code == 200
            sent_prompt += r.json()["usage"]["prompt_tokens"]
        samples = _wait_calls(s.metrics_port, 60)
    assert total(samples, "ai_requests_total") == 60
    assert total(samples, "ai_prompt_tokens_total") == sent_prompt  # nothing lost, only folded
    series: dict[str, int] = {}
    overflow_sets: dict[str, set] = {}
    for name, labels, _ in samples:
        family = name.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        if OVERFLOW in labels.values():
            overflow_sets.setdefault(family, set()).add(tuple(sorted((k, v) for k, v in labels.items() if k != "le")))
        else:
            series[family] = series.get(family, 0) + 1
    for family in (
        "ai_requests",
        "ai_prompt_tokens",
        "ai_completion_tokens",
        "gen_ai_client_operation_duration_seconds",
        "gen_ai_client_token_usage",
    ):
        assert 0 < series[family] <= budget, (family, series[family])
        assert 1 <= len(overflow_sets[family]) <= 2, family  # the overflow label set(s)
    assert total(samples, "ai_prompt_tokens_total", model=OVERFLOW) > 0
    folded = total(samples, "ai_series_overflow_total", metric="ai_requests")
    assert folded == total(samples, "ai_requests_total", model=OVERFLOW) == 60 - series["ai_requests"]
    duration_sets = series["gen_ai_client_operation_duration_seconds"] // 19  # 16 buckets + +Inf, _sum, _count
    assert total(samples, "ai_series_overflow_total", metric="gen_ai_client_operation_duration_seconds") == 60 - duration_sets
    if workers == 1:
        assert series["ai_requests"] == budget and duration_sets == 2


def test_mcp_tool_names_are_folded(tmp_path):
    """30 tools/call requests with invented tool names, maxLabelValues 5: the tool label keeps
    5 values plus __overflow__, every request is counted, the folds are counted."""
    up = McpUpstream()
    try:
        with Stack(tmp_path, up.url, sidecar_config={"stats": {"maxLabelValues": 5}}, **PATIENT) as s:
            for i in range(30):
                r = httpx.post(
                    s.url("/mcp"),
                    timeout=10,
                    headers={"accept": "application/json, text/event-stream"},
                    json={
                        "jsonrpc": "2.0",
                        "id": i + 1,
                        "method": "tools/call",
                        "params": {"name": f"tool-{i}-" + "x" * 500, "arguments": {}},
                    },
                )
                assert r.status_code == 200
            deadline = time.monotonic() + 15
            while True:
                samples = scrape(s.metrics_port)
                if total(samples, "mcp_requests_total") >= 30 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
    finally:
        up.close()
    assert total(samples, "mcp_requests_total", method="tools/call") == 30
    tools = {labels["tool"] for name, labels, _ in samples if name == "mcp_requests_total"}
    assert len(tools) == 6 and OVERFLOW in tools
    assert all(len(t) <= MAX_VALUE_CHARS for t in tools)
    assert total(samples, "mcp_requests_total", tool=OVERFLOW) == 25
    assert total(samples, "ai_label_values_overflow_total", label="mcp_tool") == 25


def test_full_metrics_filesystem_keeps_workers_serving(tmp_path, mock_llm):
    """Two workers whose metrics directory is a tmpfs with room for their first files only: the
    calls that need more space lose their metric updates (logged once per worker, counted) but
    no worker dies (it did, with SIGBUS, on every respawn) and every call is still accounted in
    Envoy's access log."""
    from tests.support.tmpfs import tiny_tmpfs

    with tiny_tmpfs(tmp_path / "metrics", "448k") as d:
        with Stack(tmp_path / "stack", mock_llm, workers=2, sidecar_env={"PROMETHEUS_MULTIPROC_DIR": str(d)}, **PATIENT) as s:
            pids = s.listening_pids()
            for i in range(60):
                rid = str(uuid.uuid4())
                r = httpx.post(
                    s.url("/v1/chat/completions"),
                    timeout=30,
                    headers={"x-request-id": rid},
                    json={"model": f"model-{i:03d}-" + "x" * 100, "messages": [{"role": "user", "content": "a b"}]},
                )
                assert r.status_code == 200
                entry = s.log_entry(rid)
                assert entry["prompt_tokens"] == 2 and entry["model"].startswith(f"model-{i:03d}-")
            code = s.sidecar.poll() if s.sidecar else None
            text = _metrics_text(s.metrics_port)
            log = s.sidecar_stderr()
            assert s.listening_pids() == pids
    assert code is None, "the sidecar exited"
    assert "worker exited" not in log, log[-2000:]
    failures = [line for line in log.splitlines() if '"metrics storage failed' in line]
    assert 1 <= len(failures) <= 2 and all("No space left on device" in line for line in failures)
    assert len({json.loads(line)["pid"] for line in failures}) == len(failures)  # once per worker
    stored = [line for line in text.splitlines() if line.startswith("ai_metrics_storage_errors_total ")]
    assert stored and float(stored[0].split()[1]) > 0
