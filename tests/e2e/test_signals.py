"""Per-call signals through a real Envoy: attribution (end user, session, key id),
finish_reason and stream timings reach the access log, the spans and the counters."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.support.harness import Stack, scrape, total
from tests.support.otlp_receiver import GrpcReceiver

pytestmark = pytest.mark.integration

SECRET = "op-secret-for-key-ids-0001"
MAX_USERS = 20  # also caps the model label: this module uses fewer models than that
LABELS = {"customLabels": [{"name": "end_user", "field": "end_user"}], "maxLabelValues": MAX_USERS}


@pytest.fixture(scope="module")
def collector() -> Iterator[GrpcReceiver]:
    r = GrpcReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, replay, collector) -> Iterator[Stack]:
    cfg = {"stats": LABELS, "tracing": {"otlpEndpoint": collector.endpoint, "scheduleDelayMs": 50}}
    with Stack(tmp_path_factory.mktemp("signals"), replay.url, sidecar_config=cfg, message_timeout_ms=5000) as s:
        yield s


def send(stack: Stack, path: str, body: dict, response: dict | None = None, **headers: str) -> dict:
    rid = str(uuid.uuid4())
    h = {"x-request-id": rid, **headers}
    if response is not None:
        h |= {"x-status": "200", "x-body": json.dumps(response)}
    r = httpx.post(stack.url(path), json=body, headers=h, timeout=20)
    assert r.status_code == 200, r.text
    return stack.log_entry(rid)


def openai_response(model: str, finish: str = "stop") -> dict:
    return {
        "id": "c",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "finish_reason": finish, "message": {"content": "a"}}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
    }


def test_session_and_end_user_in_the_access_log_and_on_spans(stack, collector):
    entry = send(
        stack,
        "/v1/chat/completions",
        {"model": "attr-openai", "messages": [], "user": "u-1"},
        openai_response("attr-openai"),
        **{"x-session-id": "s-1"},
    )
    assert (entry["end_user"], entry["session_id"]) == ("u-1", "s-1")
    assert entry["key_id"] is None  # no secret configured: no key ids
    span = collector.wait_for(lambda s: s.attributes.get("gen_ai.request.model") == "attr-openai")
    a = span.attributes
    assert (a["session.id"], a["gen_ai.conversation.id"], a["user.id"]) == ("s-1", "s-1", "u-1")


def test_anthropic_metadata_user_id_and_agent_session_id(stack):
    response = {
        "id": "m",
        "type": "message",
        "model": "attr-claude",
        "stop_reason": "end_turn",
        "content": [],
        "usage": {"input_tokens": 4, "output_tokens": 3},
    }
    entry = send(
        stack,
        "/v1/messages",
        {"model": "attr-claude", "max_tokens": 9, "messages": [], "metadata": {"user_id": "u-anth"}},
        response,
        **{"agent-session-id": "agent-7"},
    )
    assert (entry["end_user"], entry["session_id"]) == ("u-anth", "agent-7")


LENGTH = {
    "openai": ("/v1/chat/completions", {"model": "len-openai", "max_tokens": 3, "messages": []}, openai_response("len-openai", "length")),
    "anthropic": (
        "/v1/messages",
        {"model": "len-claude", "max_tokens": 3, "messages": []},
        {
            "id": "m",
            "type": "message",
            "model": "len-claude",
            "stop_reason": "max_tokens",
            "content": [],
            "usage": {"input_tokens": 4, "output_tokens": 3},
        },
    ),
    "gemini": (
        "/v1beta/models/len-gemini:generateContent",
        {"contents": [], "generationConfig": {"maxOutputTokens": 3}},
        {
            "candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": "MAX_TOKENS"}],
            "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 3, "totalTokenCount": 7},
        },
    ),
    "bedrock": (
        "/model/len-bedrock/converse",
        {"messages": [], "inferenceConfig": {"maxTokens": 3}},
        {
            "output": {"message": {"role": "assistant", "content": [{"text": "a"}]}},
            "stopReason": "max_tokens",
            "usage": {"inputTokens": 4, "outputTokens": 3, "totalTokens": 7},
        },
    ),
}


def test_max_tokens_stops_log_length_and_count_under_it(stack):
    for api, (path, body, response) in LENGTH.items():
        entry = send(stack, path, body, response)
        assert entry["finish_reason"] == "length", api
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(stack.metrics_port)
        counted = {
            m: total(samples, "ai_finish_reasons_total", model=m, finish_reason="length")
            for m in ("len-openai", "len-claude", "len-gemini", "len-bedrock")
        }
        if all(counted.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert counted == {"len-openai": 1, "len-claude": 1, "len-gemini": 1, "len-bedrock": 1}


def test_stream_timings_in_the_log_match_the_histograms(stack):
    entry = send(
        stack,
        "/v1/chat/completions",
        {"model": "stream-timing", "messages": [], "stream": True},
        **{"x-fixture": "aigw__chat-streaming-detailed-usage.yaml", "x-chunk-delay-ms": "40"},
    )
    assert entry["streaming"] is True and entry["outcome"] == "ok" and entry["finish_reason"] == "length"
    assert entry["ttft_ms"] > 0 and entry["tpot_ms"] > 0
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(stack.metrics_port)
        ttft = total(samples, "gen_ai_server_time_to_first_token_seconds_sum", gen_ai_request_model="stream-timing")
        tpot = total(samples, "gen_ai_server_time_per_output_token_seconds_sum", gen_ai_request_model="stream-timing")
        if tpot or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert entry["ttft_ms"] == pytest.approx(ttft * 1000, abs=0.001)
    assert entry["tpot_ms"] == pytest.approx(tpot * 1000, abs=0.001)
    # 100 completion tokens, two 40 ms gaps after the first chunk: about 0.8 ms per token
    assert 0.5 < entry["tpot_ms"] < 50
    plain = send(stack, "/v1/chat/completions", {"model": "not-streamed", "messages": []}, openai_response("not-streamed"))
    assert plain["ttft_ms"] is None and plain["tpot_ms"] is None


def test_end_user_label_on_the_counters_overflows_past_max_label_values(stack):
    users = [f"lbl-{i}" for i in range(MAX_USERS + 3)]  # with the earlier tests' users, at least 3 past the cap
    for user in users:
        send(stack, "/v1/chat/completions", {"model": "label-model", "messages": [], "user": user}, openai_response("label-model"))
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(stack.metrics_port)
        counted = total(samples, "ai_prompt_tokens_total", model="label-model")
        if counted == 4 * len(users) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert counted == 4 * len(users)
    values = {labels["end_user"] for n, labels, v in samples if n == "ai_prompt_tokens_total" and v}
    assert "__overflow__" in values and len(values - {"__overflow__", ""}) == MAX_USERS
    assert {"u-1", "u-anth"} <= values  # the first values seen keep their own series
    assert total(samples, "ai_prompt_tokens_total", model="label-model", end_user="__overflow__") >= 4 * 3
    assert total(samples, "ai_label_values_overflow_total", label="end_user") >= 3


# ---- API-key ids ---------------------------------------------------------------------------------
KEYS = ("sk-live-KEYMATERIAL-AAAA1111", "sk-live-KEYMATERIAL-BBBB2222")


def _key_ids(stack: Stack, n: int = 6) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {k: set() for k in KEYS}
    for i in range(n):
        key = KEYS[i % 2]
        hdr = {"authorization": f"Bearer {key}"} if i % 4 < 2 else {"x-api-key": key}
        entry = send(stack, "/v1/chat/completions", {"model": "keyed", "messages": []}, openai_response("keyed"), **hdr)
        out[key].add(entry["key_id"])
    return out


def test_key_ids_stable_across_restarts_and_workers_other_secret_other_ids(tmp_path, replay):
    collector = GrpcReceiver()
    cfg = {
        "attribution": {"keyIdSecret": SECRET},
        "stats": {"customLabels": [{"name": "key_id", "field": "key_id"}]},
        "logging": {"level": "debug"},
        "tracing": {"otlpEndpoint": collector.endpoint, "scheduleDelayMs": 50},
    }
    want = {k: hmac.new(SECRET.encode(), k.encode(), hashlib.sha256).hexdigest()[:12] for k in KEYS}
    try:
        with Stack(
            tmp_path,
            replay.url,
            sidecar_config=cfg,
            workers=2,
            envoy_concurrency=4,
            extproc_streams_per_connection=1,
            message_timeout_ms=5000,
        ) as s:
            assert _key_ids(s, 8) == {k: {want[k]} for k in KEYS}  # one id per key, whichever worker took the call
            s.stop_sidecar()
            s.start_sidecar()
            assert _key_ids(s) == {k: {want[k]} for k in KEYS}  # the same after a restart
            with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=5) as m:
                metrics_text = m.read().decode()
            assert want[KEYS[0]] in metrics_text  # the key_id custom label
            collector.wait_for(lambda sp: sp.attributes.get("extproc.key_id") == want[KEYS[1]])
            s.stop_sidecar()
            s.sidecar_config_path.write_text(s.sidecar_config_path.read_text().replace(SECRET, "another-secret-for-ids-02"))
            s.start_sidecar()
            other = _key_ids(s, 2)
            assert all(len(ids) == 1 and not ids & {want[k]} for k, ids in other.items())
            assert len(set().union(*other.values())) == 2
            time.sleep(0.3)
            emitted = {
                "access log": s.access_log.read_text(),
                "sidecar log": s.sidecar_stderr(),
                "metrics": metrics_text,
                "spans": collector.all_bytes().decode("utf-8", "replace"),
            }
    finally:
        collector.close()
    for where, text in emitted.items():
        assert "KEYMATERIAL" not in text, f"API key material in the {where}"
