"""Traces end to end: real Envoy + the sidecar + the mock LLM, spans caught by in-test OTLP receivers."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator

import httpx
import pytest

from tests.support.harness import Stack
from tests.support.otlp_receiver import GrpcReceiver, HttpReceiver, SpanRecord

pytestmark = pytest.mark.integration

CLIENT = 3  # SpanKind.SPAN_KIND_CLIENT in OTLP
STATUS_OK = 1
STATUS_ERROR = 2
SECRET = "sk-" + "s3cr3t" * 4
PROMPT_WORD = "zebrafishmarmalade"


@pytest.fixture(scope="module")
def grpc_receiver() -> Iterator[GrpcReceiver]:
    r = GrpcReceiver()
    yield r
    r.close()


def _tracing(endpoint: str, **kw: object) -> dict:
    return {"tracing": {"otlpEndpoint": endpoint, "scheduleDelayMs": 50, **kw}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, mock_llm, grpc_receiver) -> Iterator[Stack]:
    cfg = _tracing(
        grpc_receiver.endpoint,
        serviceName="sidecar-under-test",
        resourceAttributes={"deployment.environment": "test"},
        conventions=["genai", "openinference"],
        fields={"add": {"team": 'request.headers["x-team"]', "tokens.total": "llm.total_tokens"}},
    )
    with Stack(tmp_path_factory.mktemp("tracing"), mock_llm, sidecar_config=cfg) as s:
        yield s


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def chat(stack: Stack, *, stream: bool = False, headers: dict[str, str] | None = None, **body: object) -> tuple[httpx.Response, str, str]:
    tp, trace_id, span_id = traceparent()
    payload = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"say {PROMPT_WORD} please"}],
        "temperature": 0.25,
        "max_tokens": 64,
        "top_p": 0.9,
        **body,
    }
    if stream:
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
    h = {"traceparent": tp, "authorization": f"Bearer {SECRET}", "cookie": f"session={SECRET}", "x-mock-chunk-ms": "2", **(headers or {})}
    r = httpx.post(stack.url("/v1/chat/completions"), json=payload, headers=h, timeout=20)
    return r, trace_id, span_id


def _common(span: SpanRecord, trace_id: str, parent: str) -> None:
    assert span.trace_id == trace_id
    assert span.parent_span_id == parent
    assert span.kind == CLIENT
    assert span.name == "chat gpt-4o-mini"
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai" and a["gen_ai.system"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.request.temperature"] == 0.25
    assert a["gen_ai.request.max_tokens"] == 64
    assert a["gen_ai.request.top_p"] == 0.9
    assert span.resource["service.name"] == "sidecar-under-test"
    assert span.resource["deployment.environment"] == "test"
    assert 0 < span.end_ns - span.start_ns < 10e9


def test_non_streaming_span(stack, grpc_receiver):
    r, trace_id, span_id = chat(stack, headers={"x-team": "blue"})
    assert r.status_code == 200
    span = grpc_receiver.wait_trace(trace_id)
    _common(span, trace_id, span_id)
    a = span.attributes
    body = r.json()
    assert a["gen_ai.response.model"] == "gpt-4o-mini"
    assert a["gen_ai.response.id"] == body["id"]
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.request.stream"] is False
    assert a["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"] == 3
    assert a["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"] == 12
    assert a["http.response.status_code"] == 200
    assert "error.type" not in a and span.status_code == STATUS_OK
    assert "gen_ai.response.time_to_first_chunk" not in a
    # fields.add, evaluated by CEL
    assert a["team"] == "blue" and a["tokens.total"] == 15
    # OpenInference, on the same span: the same counts, our price, a summary instead of content
    assert a["openinference.span.kind"] == "LLM" and a["llm.model_name"] == "gpt-4o-mini"
    assert a["llm.provider"] == "openai" and a["llm.system"] == "openai"
    assert a["llm.token_count.prompt"] == 3 and a["llm.token_count.completion"] == 12 and a["llm.token_count.total"] == 15
    assert a["llm.cost.total"] == a["gen_ai.usage.cost"] > 0
    assert a["llm.cost.prompt"] + a["llm.cost.completion"] == pytest.approx(a["llm.cost.total"])
    assert json.loads(a["llm.invocation_parameters"]) == {"temperature": 0.25, "max_tokens": 64, "top_p": 0.9}
    assert a["input.value"] == "chat gpt-4o-mini: 1 message" and a["input.mime_type"] == "text/plain"
    assert "output.value" not in a


def test_streaming_span_with_usage(stack, grpc_receiver):
    r, trace_id, span_id = chat(stack, stream=True, headers={"x-mock-words": "20", "x-mock-chunk-ms": "10"})
    assert r.status_code == 200 and b"[DONE]" in r.content
    span = grpc_receiver.wait_trace(trace_id)
    _common(span, trace_id, span_id)
    a = span.attributes
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.usage.input_tokens"] == 3 and a["gen_ai.usage.output_tokens"] == 20
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    ttfc = a["gen_ai.response.time_to_first_chunk"]
    duration = (span.end_ns - span.start_ns) / 1e9
    assert 0 < ttfc < duration and duration >= 0.15  # 20 chunks 10 ms apart: the span covers the stream
    assert "team" not in a  # the header was absent: the CEL field yields no attribute


def test_error_span(stack, grpc_receiver):
    r, trace_id, span_id = chat(stack, headers={"x-mock-status": "429"})
    assert r.status_code == 429
    span = grpc_receiver.wait_trace(trace_id)
    _common(span, trace_id, span_id)
    assert span.attributes["error.type"] == "rate_limit_exceeded"
    assert span.attributes["http.response.status_code"] == 429
    assert span.status_code == STATUS_ERROR
    assert "gen_ai.usage.input_tokens" not in span.attributes


def test_no_traceparent_starts_a_new_trace(stack, grpc_receiver):
    r = httpx.post(stack.url("/v1/chat/completions"), json={"model": "root-model", "messages": []}, timeout=20)
    assert r.status_code == 200
    span = grpc_receiver.wait_for(lambda s: s.attributes.get("gen_ai.request.model") == "root-model")
    assert span.parent_span_id == "" and len(span.trace_id) == 32


def test_no_secrets_and_no_content_when_capture_is_off(stack, grpc_receiver):
    r, trace_id, _ = chat(stack, stream=True)
    assert r.status_code == 200
    grpc_receiver.wait_trace(trace_id)
    sent = grpc_receiver.all_bytes()
    assert SECRET.encode() not in sent
    assert PROMPT_WORD.encode() not in sent  # prompt text
    assert b"lazy dog" not in sent  # completion text (the mock's words)
    assert not any(
        k.startswith(("gen_ai.input", "gen_ai.output", "output.", "llm.input_messages", "llm.output_messages"))
        for s in grpc_receiver.spans
        for k in s.attributes
    )


def test_untraced_paths_make_no_span(stack, grpc_receiver):
    tp, trace_id, _ = traceparent()
    httpx.get(stack.url("/healthz"), headers={"traceparent": tp}, timeout=10)
    chat(stack)  # a traced call after it: once its span is in, the health check's would be too
    assert not any(s.trace_id == trace_id for s in grpc_receiver.spans)


# ---- HTTP/protobuf exporter (Langfuse-style endpoint), content capture on ------------------
@pytest.fixture(scope="module")
def http_receiver() -> Iterator[HttpReceiver]:
    r = HttpReceiver("/api/public/otel/v1/traces")
    yield r
    r.close()


@pytest.fixture(scope="module")
def capture_stack(tmp_path_factory, mock_llm, http_receiver) -> Iterator[Stack]:
    cfg = _tracing(
        f"http://127.0.0.1:{http_receiver.port}/api/public/otel",
        otlpProtocol="http",
        headers={"authorization": "Basic cGs6c2s="},
        captureContent=True,
        maxContentChars=4096,
        conventions=["genai", "openinference"],
        fields={"add": {"prompt.count": "size(llm.prompt)", "completion": "llm.completion[0]"}},
    )
    with Stack(tmp_path_factory.mktemp("tracing-capture"), mock_llm, sidecar_config=cfg) as s:
        yield s


def test_content_capture_over_http_exporter(capture_stack, http_receiver):
    import json

    r, trace_id, span_id = chat(capture_stack, stream=True, headers={"x-mock-words": "9"})
    assert r.status_code == 200
    span = http_receiver.wait_trace(trace_id)
    assert span.headers["authorization"] == "Basic cGs6c2s="
    assert span.headers["content-type"] == "application/x-protobuf"
    assert span.parent_span_id == span_id
    a = span.attributes
    inputs = json.loads(a["gen_ai.input.messages"])
    assert inputs == [{"role": "user", "parts": [{"type": "text", "content": f"say {PROMPT_WORD} please"}]}]
    outputs = json.loads(a["gen_ai.output.messages"])
    text = "the quick brown fox jumps over the lazy dog "
    assert outputs == [{"role": "assistant", "parts": [{"type": "text", "content": text}], "finish_reason": "stop"}]
    assert a["prompt.count"] == 1 and a["completion"] == text
    assert json.loads(a["input.value"]) == {"messages": [{"role": "user", "content": f"say {PROMPT_WORD} please"}]}
    assert a["input.mime_type"] == "application/json"
    assert a["output.value"] == text and a["llm.output_messages.0.message.content"] == text
    assert a["llm.token_count.completion"] == 9
    assert SECRET.encode() not in http_receiver.all_bytes()


def test_no_capture_header_keeps_that_calls_content_off_the_span(capture_stack, http_receiver):
    r, trace_id, _ = chat(capture_stack, stream=True, headers={"x-extproc-no-capture": "1"})
    assert r.status_code == 200
    a = http_receiver.wait_trace(trace_id).attributes
    assert not any(k.startswith(("gen_ai.input", "gen_ai.output", "output.", "llm.input_messages", "completion")) for k in a)
    assert a["input.value"] == "chat gpt-4o-mini: 1 message" and "prompt.count" not in a
    assert a["gen_ai.usage.output_tokens"] > 0


def test_content_capture_is_capped(capture_stack, http_receiver):
    import json

    big = "word " * 3000
    r, trace_id, _ = chat(capture_stack, messages=[{"role": "user", "content": big}])
    assert r.status_code == 200
    a = http_receiver.wait_trace(trace_id).attributes
    assert len(json.loads(a["gen_ai.input.messages"])[0]["parts"][0]["content"]) == 4096


def test_otel_env_vars_configure_the_exporter(tmp_path, mock_llm, http_receiver, monkeypatch):
    """No tracing config at all: the standard OTEL_* variables turn tracing on and shape it."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{http_receiver.port}/api/public/otel")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-env-auth=yes")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    with Stack(tmp_path, mock_llm, sidecar_config={"tracing": {"scheduleDelayMs": 50}}) as s:
        r, trace_id, _ = chat(s)
        assert r.status_code == 200
        span = http_receiver.wait_trace(trace_id)
    assert span.resource["service.name"] == "from-env"
    assert span.headers["x-env-auth"] == "yes"
    assert os.environ["OTEL_SERVICE_NAME"] == "from-env"
