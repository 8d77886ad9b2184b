"""Tracing without processes: presets, CEL fields, redaction, config errors, zero cost when off."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.struct_pb2 import Struct
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from extproc.core import config
from extproc.core.call import CLIENT_ABORT, ERROR, NO_RESPONSE, OK, Call
from extproc.core.observation import Observation, Usage
from extproc.telemetry.tracing import Tracer

PRESETS = Path(__file__).resolve().parents[2] / "deploy" / "tracing"


def call(capture: bool = True) -> Call:
    obs = Observation(operation="chat", request_model="gpt-4o", response_model="gpt-4o-2024-08-06", response_id="chatcmpl-1",
                      usage=Usage(input_tokens=7, output_tokens=5, total_tokens=12, cached_input_tokens=2, reasoning_tokens=1),
                      finish_reasons=["stop"], params={"temperature": 0.5, "max_tokens": 100, "stop": "\n"})
    if capture:
        obs.input_messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}]
        obs.output_text = ["hel", "lo"]
    claims = Struct()
    claims.update({"principal": {"sub": "alice", "team": "ml"}})
    return Call(obs=obs, provider="azure", api="openai.chat", method="POST", path="/v1/chat/completions?key=AIzaSECRET",
                host="api.example.com:443", headers={":path": "/x", "authorization": "Bearer sk-x", "x-api-key": "k", "cookie": "c",
                                                     "x-team": "blue", "x-conversation-id": "s-1",
                                                     "x-session-id": "sess-secret"},
                forwarded={"envoy.filters.http.jwt_authn": claims}, status=200, outcome=OK,
                start_time_ns=1_700_000_000_000_000_000, start=10.0, end=10.25, first_chunk=10.1, session_id="s-1")


def spans_for(cfg: config.TracingConfig, c: Call) -> dict:
    exporter = InMemorySpanExporter()
    t = Tracer(cfg, processor=SimpleSpanProcessor(exporter))
    t.on_call_end(c)
    (span,) = exporter.get_finished_spans()
    return {"span": span, **dict(span.attributes)}


def tracing_cfg(**kw) -> config.TracingConfig:
    return config.parse({"tracing": {"otlpEndpoint": "127.0.0.1:1", **kw}}).tracing


def test_default_attributes_and_timing():
    a = spans_for(tracing_cfg(), call(capture=False))
    span = a.pop("span")
    assert span.name == "chat gpt-4o"
    assert span.start_time == 1_700_000_000_000_000_000 and span.end_time == span.start_time + 250_000_000
    assert a["gen_ai.provider.name"] == "azure.ai.openai" and a["gen_ai.system"] == "azure.ai.openai"
    assert a["gen_ai.usage.cache_read.input_tokens"] == 2 and a["gen_ai.usage.reasoning.output_tokens"] == 1
    assert a["gen_ai.request.stop_sequences"] == ("\n",)
    assert a["server.address"] == "api.example.com"
    assert not any(k.startswith("gen_ai.input") or k.startswith("gen_ai.output") for k in a)


def test_capture_uses_semconv_message_shape():
    a = spans_for(tracing_cfg(captureContent=True), call())
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": "hi"}, {"type": "image_url"}]},
    ]
    assert json.loads(a["gen_ai.output.messages"]) == [{"role": "assistant", "parts": [{"type": "text", "content": "hello"}], "finish_reason": "stop"}]


def test_fields_add_remove_and_cel_variables():
    cfg = tracing_cfg(fields={
        "remove": ["gen_ai.system", "gen_ai.usage.*"],
        "add": {"user": "jwt.sub", "team": "jwt.team + '/' + request.headers['x-team']", "path": "request.path",
                "hdrs": "request.headers", "req": "flatten(llm.params)", "missing": "jwt.nope", "status": "response.status",
                "gen_ai.usage.input_tokens": "llm.input_tokens * 10", "prompt": "llm.prompt"}})
    a = spans_for(cfg, call())
    assert "gen_ai.system" not in a and "gen_ai.usage.output_tokens" not in a
    assert a["gen_ai.usage.input_tokens"] == 70  # add runs after remove, and may override
    assert a["user"] == "alice" and a["team"] == "ml/blue" and a["status"] == 200
    assert a["path"] == "/v1/chat/completions"  # no query string (API keys travel there)
    headers = json.loads(a["hdrs"])
    assert headers == {"x-team": "blue", "x-conversation-id": "s-1"}  # credentials and pseudo-headers removed
    assert a["req.temperature"] == 0.5 and a["req.max_tokens"] == 100
    assert "missing" not in a
    assert "prompt" not in a  # captureContent is off: llm.prompt does not exist


def test_no_secret_reaches_any_attribute():
    cfg = tracing_cfg(captureContent=True, fields={"add": {"all": "request", "h": "flatten_recursive(request)"}})
    a = spans_for(cfg, call())
    dump = json.dumps({k: v if isinstance(v, (str, int, float)) else list(v) for k, v in a.items() if k != "span"})
    for secret in ("sk-x", "AIzaSECRET", '"k"', '"c"', "sess-secret"):
        assert secret not in dump


# Gateway and SDK credential headers seen in the wild, and the classic ones.
CREDENTIAL_HEADERS = (
    "x-portkey-api-key", "cf-aig-authorization", "helicone-auth", "openai-api-key", "x-auth-token", "anthropic-api-key",
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key", "x-goog-api-key",
    "x-amz-security-token", "ocp-apim-subscription-key", "X-Client-Secret", "x-db-password", "x-session-token",
    "x-hub-signature-256", "x-amz-credential",
)


def test_credential_headers_are_removed_by_pattern():
    c = call(capture=False)
    c.headers = {**{h.lower(): f"SECRET-{i}" for i, h in enumerate(CREDENTIAL_HEADERS)}, "x-team": "blue", "user-agent": "ua"}
    cfg = tracing_cfg(fields={"add": {"all": "request.headers", "flat": "flatten(request.headers)",
                                      "h": "flatten_recursive(request)"}})
    a = spans_for(cfg, c)
    dump = json.dumps({k: v if isinstance(v, (str, int, float)) else list(v) for k, v in a.items() if k != "span"})
    assert "SECRET-" not in dump
    assert json.loads(a["all"]) == {"x-team": "blue", "user-agent": "ua"}


@pytest.mark.parametrize("header", CREDENTIAL_HEADERS)
def test_credential_header_is_never_a_label(header):
    with pytest.raises(config.ConfigError, match=r"stats\.customLabels\.0\.header: .* may carry a credential"):
        config.parse({"stats": {"customLabels": [{"name": "who", "header": header}]}})


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("jaeger.yaml", {"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 7, "user.id": "alice",
                         "gen_ai.request.temperature": 0.5, "gen_ai.usage.total_tokens": 12}),
        ("langfuse.yaml", {"gen_ai.prompt.0.role": "system", "gen_ai.prompt.1.content": "hi",
                           "gen_ai.completion.0.role": "assistant", "gen_ai.completion.0.content": "hello",
                           "gen_ai.usage.prompt_tokens": 7, "gen_ai.usage.completion_tokens": 5, "gen_ai.usage.total_tokens": 12,
                           "langfuse.user.id": "alice", "langfuse.session.id": "s-1"}),
        ("phoenix.yaml", {"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o-2024-08-06", "llm.provider": "azure",
                          "llm.token_count.prompt": 7, "llm.token_count.completion": 5, "llm.token_count.total": 12,
                          "llm.input_messages.0.message.role": "system", "llm.input_messages.0.message.content": "be brief",
                          "llm.output_messages.0.message.role": "assistant", "llm.output_messages.0.message.content": "hello"}),
        ("openllmetry.yaml", {"llm.request.type": "chat", "llm.is_streaming": False, "llm.usage.total_tokens": 12,
                              "gen_ai.usage.prompt_tokens": 7, "gen_ai.usage.completion_tokens": 5,
                              "gen_ai.prompt.0.content": "be brief", "gen_ai.completion.0.content": "hello",
                              "gen_ai.system": "azure.ai.openai"}),
    ],
)
def test_presets_load_and_produce_their_attributes(preset, expected):
    cfg = config.load(PRESETS / preset).tracing
    a = spans_for(cfg, call())
    for key, value in expected.items():
        assert a.get(key) == value, (key, a.get(key))


@pytest.mark.parametrize("preset, key", [("langfuse.yaml", "langfuse.user.id"), ("jaeger.yaml", "user.id"), ("phoenix.yaml", "user.id")])
def test_presets_prefer_the_end_user_to_the_jwt_subject(preset, key):
    c = call()
    c.obs.end_user = "u-end"
    a = spans_for(config.load(PRESETS / preset).tracing, c)
    assert a[key] == "u-end"
    if preset == "langfuse.yaml":
        assert a["langfuse.session.id"] == "s-1"


def test_presets_cover_every_file():
    assert {p.name for p in PRESETS.glob("*.yaml")} == {"jaeger.yaml", "langfuse.yaml", "phoenix.yaml", "openllmetry.yaml"}


@pytest.mark.parametrize("expr,msg", [("llm.(", "invalid CEL expression"), ("secrets.key", "unknown variable 'secrets'"),
                                      ("flatten(llm.", "invalid CEL expression")])
def test_bad_expression_is_a_config_error_naming_the_field(expr, msg):
    with pytest.raises(config.ConfigError) as e:
        config.parse({"tracing": {"fields": {"add": {"my.attr": expr}}}}, "c.yaml")
    assert "tracing.fields.add.my.attr" in str(e.value) and msg in str(e.value) and "\n" not in str(e.value)


def test_bad_expression_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tracing:\n  fields:\n    add:\n      x: 'llm.input_tokens +'\n")
    p = subprocess.run([sys.executable, "-m", "extproc", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "tracing.fields.add.x" in p.stderr


def test_disabled_tracing_costs_nothing():
    code = ("import os, sys; [os.environ.pop(k) for k in list(os.environ) if k.startswith('OTEL_')];"
            "from extproc.core import config; from extproc.telemetry import observers as app; from extproc.server.processor import Processor;"
            "cfg = config.parse({}); obs = app.observers(cfg); p = Processor(cfg, obs);"
            "print(len(obs), p.capture, any(m.startswith('opentelemetry') or m == 'cel' for m in sys.modules),"
            " any(type(o).__name__ == 'Tracer' for o in obs))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout.split()
    # CallLog + McpMetrics + MetricsObserver; no tracer, no capture, no SDK loaded
    assert out == ["3", "False", "False", "False"]


def test_usage_attributes_follow_the_genai_conventions():
    """The normalised counts as they are, the breakdowns in their own attributes."""
    c = call(capture=False)
    c.obs.usage = Usage(input_tokens=2800, output_tokens=40, cached_input_tokens=2000, cache_creation_input_tokens=300,
                        reasoning_tokens=10)
    a = spans_for(tracing_cfg(), c)
    assert a["gen_ai.usage.input_tokens"] == 2800 and a["gen_ai.usage.output_tokens"] == 40
    assert a["gen_ai.usage.cache_read.input_tokens"] == 2000
    assert a["gen_ai.usage.cache_creation.input_tokens"] == 300
    assert a["gen_ai.usage.reasoning.output_tokens"] == 10


def test_a_successful_call_has_status_ok_and_no_error_type():
    a = spans_for(tracing_cfg(), call(capture=False))
    assert a["span"].status.status_code is StatusCode.OK and "error.type" not in a


@pytest.mark.parametrize("outcome, status, provider_error, expected", [
    (ERROR, 429, "rate_limit_exceeded", "rate_limit_exceeded"),  # the provider's error type first
    (ERROR, 503, None, "503"),  # else the HTTP status
    (CLIENT_ABORT, 200, None, "client_abort"),
    (NO_RESPONSE, 0, None, "no_response"),
    (OK, 200, "tool_error", "tool_error"),  # complete, but the body reported an error
])
def test_a_failed_call_has_status_error_with_its_error_type(outcome, status, provider_error, expected):
    c = call(capture=False)
    c.outcome, c.status, c.obs.error_type = outcome, status, provider_error
    a = spans_for(tracing_cfg(), c)
    assert a["span"].status.status_code is StatusCode.ERROR
    assert a["error.type"] == expected and a["span"].status.description == expected
