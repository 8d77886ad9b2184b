"""Our traces in a real Arize Phoenix (``make test-phoenix``; ``make test`` runs it under CI=true).

The pinned ``arize-phoenix`` (tests/phoenix-requirements.txt, its own venv) serves on free loopback
ports; Envoy + the sidecar run with ``deploy/tracing/phoenix.yaml`` pointed at it (the preset as a
user would deploy it, plus ``attribution.endUserHeader`` so the Gemini call has a user too). Five
calls go through Envoy to a replay upstream: OpenAI non-streamed with cached tokens, OpenAI
streamed, Anthropic streamed with cache read and write, Gemini with thoughts, and an OpenAI 429.
Everything is then read back through Phoenix's own REST and GraphQL APIs: span kind, model,
provider, status, every token count and detail, the messages and the answer, session and user,
and the cost Phoenix computes from its own model price table, which must equal the access log's
``cost_usd`` (ours, from genai-prices). The models are ones both tables price.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import yaml

from tests.support import REPO
from tests.support.harness import Stack
from tests.support.phoenix import InstallError, Phoenix, install, pin, python
from tests.support.replay_upstream import ReplayUpstream

pytestmark = [pytest.mark.integration, pytest.mark.phoenix]

SSE = "text/event-stream"
JSON = "application/json"


def sse(*events: tuple[str | None, Any]) -> bytes:
    """An SSE body: ``(event name or None, data)`` per event; data that is not a str becomes JSON."""
    out = b""
    for name, data in events:
        if name:
            out += f"event: {name}\n".encode()
        out += b"data: " + (data if isinstance(data, str) else json.dumps(data)).encode() + b"\n\n"
    return out


@dataclass(frozen=True)
class Call:
    """One request through Envoy, the upstream's answer, and what Phoenix must show for it."""

    name: str
    path: str
    request: dict[str, Any]
    status: int
    content_type: str
    response: bytes
    messages: list[dict[str, str]]  # input.value's messages: the system prompt first, wherever the API puts it
    answer: str | None  # the answer text (output.value); None: no answer
    model: str  # llm.model_name: the model that served (the response's), else the requested one
    provider: str  # llm.provider, OpenInference's value
    tokens: dict[str, int] = field(default_factory=dict)  # llm.token_count.* attribute -> value
    user: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status < 400


def _chat_chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {
        "id": "chatcmpl-phx-stream",
        "object": "chat.completion.chunk",
        "created": 1765000000,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_phx",
        "choices": choices,
        "usage": usage,
    }


CALLS = (
    Call(
        "openai_cached",
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",
            "temperature": 0.2,
            "user": "user-openai",
            "messages": [
                {"role": "system", "content": "You answer from the policy document."},
                {"role": "user", "content": "What does the refund policy say?"},
            ],
        },
        200,
        JSON,
        json.dumps(
            {
                "id": "chatcmpl-phx-cached",
                "object": "chat.completion",
                "created": 1765000000,
                "model": "gpt-4o-mini-2024-07-18",
                "system_fingerprint": "fp_phx",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Refunds are accepted within 30 days."},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 1200,
                    "completion_tokens": 80,
                    "total_tokens": 1280,
                    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
                },
            }
        ).encode(),
        [
            {"role": "system", "content": "You answer from the policy document."},
            {"role": "user", "content": "What does the refund policy say?"},
        ],
        "Refunds are accepted within 30 days.",
        "gpt-4o-mini-2024-07-18",
        "openai",
        {"prompt": 1200, "completion": 80, "total": 1280, "prompt_details.cache_read": 1024, "completion_details.reasoning": 0},
        user="user-openai",
    ),
    Call(
        "openai_stream",
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "user-openai-stream",
            "messages": [{"role": "user", "content": "Name a quick animal."}],
        },
        200,
        SSE,
        sse(
            (None, _chat_chunk({"role": "assistant", "content": ""})),
            (None, _chat_chunk({"content": "The quick"})),
            (None, _chat_chunk({"content": " brown fox."})),
            (None, _chat_chunk({}, "stop")),
            (
                None,
                _chat_chunk(
                    {},
                    usage={
                        "prompt_tokens": 20,
                        "completion_tokens": 12,
                        "total_tokens": 32,
                        "prompt_tokens_details": {"cached_tokens": 0},
                        "completion_tokens_details": {"reasoning_tokens": 0},
                    },
                ),
            ),
            (None, "[DONE]"),
        ),
        [{"role": "user", "content": "Name a quick animal."}],
        "The quick brown fox.",
        "gpt-4o-mini-2024-07-18",
        "openai",
        {"prompt": 20, "completion": 12, "total": 32, "prompt_details.cache_read": 0, "completion_details.reasoning": 0},
        user="user-openai-stream",
    ),
    Call(
        "anthropic_cache_stream",
        "/v1/messages",
        {
            "model": "claude-haiku-4-5",
            "max_tokens": 256,
            "stream": True,
            "system": "You read contracts.",
            "metadata": {"user_id": "user-anthropic"},
            "messages": [{"role": "user", "content": "When does the cached contract renew?"}],
        },
        200,
        SSE,
        sse(
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_phx_cache",
                        "type": "message",
                        "role": "assistant",
                        "model": "claude-haiku-4-5-20251001",
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": 500,
                            "cache_creation_input_tokens": 300,
                            "cache_read_input_tokens": 2000,
                            "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 0},
                            "output_tokens": 1,
                            "service_tier": "standard",
                        },
                    },
                },
            ),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "It renews"}}),
            ("ping", {"type": "ping"}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " on 1 March."}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 40}},
            ),
            ("message_stop", {"type": "message_stop"}),
        ),
        [{"role": "system", "content": "You read contracts."}, {"role": "user", "content": "When does the cached contract renew?"}],
        "It renews on 1 March.",
        "claude-haiku-4-5-20251001",
        "anthropic",
        # input = uncached 500 + cache read 2,000 + cache write 300 (one meaning for every provider)
        {"prompt": 2800, "completion": 40, "total": 2840, "prompt_details.cache_read": 2000, "prompt_details.cache_write": 300},
        user="user-anthropic",
        headers={"anthropic-version": "2023-06-01"},
    ),
    Call(
        "gemini_thoughts",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        {
            "systemInstruction": {"parts": [{"text": "You forecast weather."}]},
            "contents": [{"role": "user", "parts": [{"text": "Is it sunny in Lisbon?"}]}],
            "generationConfig": {"temperature": 0.4, "thinkingConfig": {"includeThoughts": True}},
        },
        200,
        JSON,
        json.dumps(
            {
                "candidates": [
                    {
                        "content": {
                            "role": "model",
                            "parts": [{"text": "Let me think about the forecast.", "thought": True}, {"text": "Yes, it is sunny."}],
                        },
                        "finishReason": "STOP",
                        "index": 0,
                    }
                ],
                "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 50, "thoughtsTokenCount": 100, "totalTokenCount": 250},
                "modelVersion": "gemini-2.5-flash",
                "responseId": "gem-phx-thoughts",
            }
        ).encode(),
        [{"role": "system", "content": "You forecast weather."}, {"role": "user", "content": "Is it sunny in Lisbon?"}],
        "Yes, it is sunny.",
        "gemini-2.5-flash",
        "google",
        # output = visible 50 + thoughts 100 (billed as output)
        {"prompt": 100, "completion": 150, "total": 250, "completion_details.reasoning": 100},
        user="user-gemini",
        headers={"x-end-user": "user-gemini"},
    ),
    Call(
        "openai_429",
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "user": "user-rate-limited", "messages": [{"role": "user", "content": "One more, please."}]},
        429,
        JSON,
        json.dumps(
            {
                "error": {
                    "message": "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3.",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            }
        ).encode(),
        [{"role": "user", "content": "One more, please."}],
        None,
        "gpt-4o-mini",
        "openai",
        {},
        user="user-rate-limited",
    ),
)
BY_NAME = {c.name: c for c in CALLS}
TOKEN_KEYS = ("prompt", "completion", "total", "prompt_details.cache_read", "prompt_details.cache_write", "completion_details.reasoning")


def preset_config(endpoint: str) -> dict[str, Any]:
    """deploy/tracing/phoenix.yaml as shipped, its endpoint pointed at the test's Phoenix (the harness
    picks the listen address), export every 100 ms, and the end-user header."""
    cfg = yaml.safe_load((REPO / "deploy" / "tracing" / "phoenix.yaml").read_text())
    cfg.pop("listen", None)
    cfg["tracing"] |= {"otlpEndpoint": endpoint, "scheduleDelayMs": 100}
    cfg.setdefault("attribution", {})["endUserHeader"] = "x-end-user"
    return cfg


@dataclass
class Seen:
    """One call as the client, the access log and Phoenix saw it."""

    call: Call
    session: str  # the x-session-id it was sent with
    log: dict[str, Any]
    span: dict[str, Any]  # Phoenix's REST span
    cost: dict[str, Any] | None  # Phoenix's GraphQL costSummary

    @property
    def attrs(self) -> dict[str, Any]:
        return self.span["attributes"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phoenix]:
    try:
        install()
    except InstallError as e:  # no package index, or no wheel for this platform: say so, loudly
        pytest.skip(f"{pin()} could not be installed into .venv-phoenix, so Phoenix was not tested: {e}")
    with Phoenix(tmp_path_factory.mktemp("phoenix")) as px:
        yield px


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory, phoenix: Phoenix, replay: ReplayUpstream) -> dict[str, Seen]:
    for c in CALLS:
        replay.add(f"phoenix-{c.name}", c.status, c.content_type, c.response)
    run = secrets.token_hex(4)  # session ids of this run: how its spans are found in Phoenix
    sessions = {c.name: f"session-{c.name}-{run}" for c in CALLS}
    logs = {}
    with Stack(tmp_path_factory.mktemp("phoenix-stack"), replay.url, sidecar_config=preset_config(phoenix.url)) as stack:
        for c in CALLS:
            # no traceparent: each call is a trace of its own, which Phoenix lists (a span whose
            # parent Phoenix never receives is only found with the default root-span filter off)
            headers = {
                "x-fixture": f"phoenix-{c.name}",
                "x-request-id": f"{sessions[c.name]}-request",
                "x-session-id": sessions[c.name],
                "authorization": "Bearer sk-test",
                **c.headers,
            }
            r = httpx.post(stack.url(c.path), json=c.request, headers=headers, timeout=20)
            assert r.status_code == c.status and r.content == c.response  # the client got the upstream's bytes
        for c in CALLS:
            logs[c.name] = stack.log_entry(f"{sessions[c.name]}-request")
        spans = phoenix.wait_spans(set(sessions.values()))
    return {
        c.name: Seen(c, sessions[c.name], logs[c.name], spans[sessions[c.name]], phoenix.cost(spans[sessions[c.name]]["id"])) for c in CALLS
    }


@pytest.mark.parametrize("name", BY_NAME)
def test_phoenix_shows_an_llm_span_with_model_provider_and_status(seen: dict[str, Seen], name: str) -> None:
    s = seen[name]
    assert s.span["parent_id"] is None  # a root span: Phoenix lists it as a trace
    assert s.span["span_kind"] == "LLM"
    assert s.attrs["llm.model_name"] == s.call.model
    assert s.attrs["llm.provider"] == s.call.provider
    if s.call.ok:
        assert s.span["status_code"] == "OK"
    else:
        assert s.span["status_code"] == "ERROR"
        assert s.span["status_message"] == "rate_limit_exceeded"


@pytest.mark.parametrize("name", BY_NAME)
def test_phoenix_shows_every_token_count_and_detail(seen: dict[str, Seen], name: str) -> None:
    s = seen[name]
    got = {k: s.attrs[f"llm.token_count.{k}"] for k in TOKEN_KEYS if f"llm.token_count.{k}" in s.attrs}
    assert got == s.call.tokens
    for k in ("prompt", "completion", "total"):  # the access log counts the same tokens
        assert s.log.get(f"{k}_tokens") == s.call.tokens.get(k)


@pytest.mark.parametrize("name", BY_NAME)
def test_phoenix_shows_the_messages_and_the_answer(seen: dict[str, Seen], name: str) -> None:
    s = seen[name]
    assert s.attrs["input.mime_type"] == "application/json"
    assert json.loads(s.attrs["input.value"]) == {"messages": s.call.messages}
    assert s.attrs.get("output.value") == s.call.answer


@pytest.mark.parametrize("name", BY_NAME)
def test_phoenix_shows_session_and_user(seen: dict[str, Seen], name: str) -> None:
    s = seen[name]
    assert s.attrs["session.id"] == s.session
    assert s.attrs["user.id"] == s.call.user
    assert (s.log["session_id"], s.log["end_user"]) == (s.session, s.call.user)  # the access log's attribution


@pytest.mark.parametrize("name", BY_NAME)
def test_phoenix_cost_equals_the_access_log_cost(seen: dict[str, Seen], name: str) -> None:
    """Phoenix prices the span from its own model table and the token details; the sum must be the
    dollars our access log reports. A failed call costs nothing in either."""
    s = seen[name]
    if not s.call.ok:
        assert s.log.get("cost_usd") is None
        assert s.cost is None or not s.cost["total"]["cost"]
        return
    ours = s.log["cost_usd"]
    assert ours > 0
    assert s.cost is not None, f"Phoenix did not price {s.call.model}"
    assert s.cost["total"]["cost"] == pytest.approx(ours, rel=1e-9, abs=1e-12)
    # and our own figures on the span (llm.cost.*) say the same
    assert s.attrs["llm.cost.total"] == pytest.approx(ours, rel=1e-9, abs=1e-12)
    assert s.attrs["llm.cost.prompt"] == pytest.approx(s.cost["prompt"]["cost"], rel=1e-9, abs=1e-12)
    assert s.attrs["llm.cost.completion"] == pytest.approx(s.cost["completion"]["cost"], rel=1e-9, abs=1e-12)


def test_the_pinned_phoenix_is_the_one_tested(phoenix: Phoenix) -> None:
    """The venv holds the version tests/phoenix-requirements.txt pins (a venv from an older pin is reinstalled)."""
    got = subprocess.run(
        [str(python()), "-c", "import importlib.metadata as m; print(m.version('arize-phoenix'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert f"arize-phoenix=={got}" == pin()
