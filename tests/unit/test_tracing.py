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
    obs = Observation(
        operation="chat",
        request_model="gpt-4o",
        response_model="gpt-4o-2024-08-06",
        response_id="chatcmpl-1",
        usage=Usage(input_tokens=7, output_tokens=5, total_tokens=12, cached_input_tokens=2, reasoning_tokens=1),
        finish_reasons=["stop"],
        params={"temperature": 0.5, "max_tokens": 100, "stop": "\n"},
    )
    if capture:
        obs.input_messages = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
        ]
        obs.output_text = ["hel", "lo"]
    claims = Struct()
    claims.update({"principal": {"sub": "alice", "team": "ml"}})
    return Call(
        obs=obs,
        provider="azure",
        api="openai.chat",
        method="POST",
        path="/v1/chat/completions?key=AIzaSECRET",
        host="api.example.com:443",
        headers={
            ":path": "/x",
            "authorization": "Bearer sk-x",
            "x-api-key": "k",
            "cookie": "c",
            "x-team": "blue",
            "x-conversation-id": "s-1",
            "x-session-id": "sess-secret",
        },
        forwarded={"envoy.filters.http.jwt_authn": claims},
        status=200,
        outcome=OK,
        start_time_ns=1_700_000_000_000_000_000,
        start=10.0,
        end=10.25,
        first_chunk=10.1,
        session_id="s-1",
    )


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
    assert json.loads(a["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "hello"}], "finish_reason": "stop"}
    ]
    assert "gen_ai.system_instructions" not in a  # a system message in the chat history stays in it


def test_fields_add_remove_and_cel_variables():
    cfg = tracing_cfg(
        fields={
            "remove": ["gen_ai.system", "gen_ai.usage.*"],
            "add": {
                "user": "jwt.sub",
                "team": "jwt.team + '/' + request.headers['x-team']",
                "path": "request.path",
                "hdrs": "request.headers",
                "req": "flatten(llm.params)",
                "missing": "jwt.nope",
                "status": "response.status",
                "gen_ai.usage.input_tokens": "llm.input_tokens * 10",
                "prompt": "llm.prompt",
            },
        }
    )
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
    "x-portkey-api-key",
    "cf-aig-authorization",
    "helicone-auth",
    "openai-api-key",
    "x-auth-token",
    "anthropic-api-key",
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "x-amz-security-token",
    "ocp-apim-subscription-key",
    "X-Client-Secret",
    "x-db-password",
    "x-session-token",
    "x-hub-signature-256",
    "x-amz-credential",
)


def test_credential_headers_are_removed_by_pattern():
    c = call(capture=False)
    c.headers = {**{h.lower(): f"SECRET-{i}" for i, h in enumerate(CREDENTIAL_HEADERS)}, "x-team": "blue", "user-agent": "ua"}
    cfg = tracing_cfg(fields={"add": {"all": "request.headers", "flat": "flatten(request.headers)", "h": "flatten_recursive(request)"}})
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
        (
            "jaeger.yaml",
            {
                "gen_ai.request.model": "gpt-4o",
                "gen_ai.usage.input_tokens": 7,
                "user.id": "alice",
                "gen_ai.request.temperature": 0.5,
                "gen_ai.usage.total_tokens": 12,
            },
        ),
        (
            "langfuse.yaml",
            {
                "langfuse.observation.type": "generation",
                "langfuse.observation.model.name": "gpt-4o-2024-08-06",
                "langfuse.user.id": "alice",
                "langfuse.session.id": "s-1",
                "gen_ai.usage.input_tokens": 7,
            },
        ),
        (
            "phoenix.yaml",
            {
                "openinference.span.kind": "LLM",
                "llm.model_name": "gpt-4o-2024-08-06",
                "llm.provider": "azure",
                "llm.system": "openai",
                "llm.token_count.prompt": 7,
                "llm.token_count.completion": 5,
                "llm.token_count.total": 12,
                "llm.token_count.prompt_details.cache_read": 2,
                "llm.token_count.completion_details.reasoning": 1,
                "input.mime_type": "application/json",
                "output.value": "hello",
                "user.id": "alice",
                "session.id": "s-1",
                "llm.input_messages.0.message.role": "system",
                "llm.input_messages.0.message.content": "be brief",
                "llm.output_messages.0.message.role": "assistant",
                "llm.output_messages.0.message.content": "hello",
                "gen_ai.request.model": None,
            },
        ),
        (
            "openllmetry.yaml",
            {
                "llm.request.type": "chat",
                "llm.is_streaming": False,
                "llm.usage.total_tokens": 12,
                "gen_ai.usage.prompt_tokens": 7,
                "gen_ai.usage.completion_tokens": 5,
                "gen_ai.prompt.0.content": "be brief",
                "gen_ai.completion.0.content": "hello",
                "gen_ai.system": "azure.ai.openai",
                "gen_ai.usage.input_tokens": 7,
            },
        ),
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


@pytest.mark.parametrize(
    "expr,msg",
    [("llm.(", "invalid CEL expression"), ("secrets.key", "unknown variable 'secrets'"), ("flatten(llm.", "invalid CEL expression")],
)
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
    code = (
        "import os, sys; [os.environ.pop(k) for k in list(os.environ) if k.startswith('OTEL_')];"
        "from extproc.core import config; from extproc.telemetry import observers as app; from extproc.server.processor import Processor;"
        "cfg = config.parse({}); obs = app.observers(cfg); p = Processor(cfg, obs);"
        "print(len(obs), p.capture, any(m.startswith('opentelemetry') or m == 'cel' for m in sys.modules),"
        " any(type(o).__name__ == 'Tracer' for o in obs))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout.split()
    # CallLog + McpMetrics + MetricsObserver; no tracer, no capture, no SDK loaded
    assert out == ["3", "False", "False", "False"]


def test_usage_attributes_follow_the_genai_conventions():
    """The normalised counts as they are, the breakdowns in their own attributes."""
    c = call(capture=False)
    c.obs.usage = Usage(input_tokens=2800, output_tokens=40, cached_input_tokens=2000, cache_creation_input_tokens=300, reasoning_tokens=10)
    a = spans_for(tracing_cfg(), c)
    assert a["gen_ai.usage.input_tokens"] == 2800 and a["gen_ai.usage.output_tokens"] == 40
    assert a["gen_ai.usage.cache_read.input_tokens"] == 2000
    assert a["gen_ai.usage.cache_creation.input_tokens"] == 300
    assert a["gen_ai.usage.reasoning.output_tokens"] == 10


def test_a_successful_call_has_status_ok_and_no_error_type():
    a = spans_for(tracing_cfg(), call(capture=False))
    assert a["span"].status.status_code is StatusCode.OK and "error.type" not in a


@pytest.mark.parametrize(
    "outcome, status, provider_error, expected",
    [
        (ERROR, 429, "rate_limit_exceeded", "rate_limit_exceeded"),  # the provider's error type first
        (ERROR, 503, None, "503"),  # else the HTTP status
        (CLIENT_ABORT, 200, None, "client_abort"),
        (NO_RESPONSE, 0, None, "no_response"),
        (OK, 200, "tool_error", "tool_error"),  # complete, but the body reported an error
    ],
)
def test_a_failed_call_has_status_error_with_its_error_type(outcome, status, provider_error, expected):
    c = call(capture=False)
    c.outcome, c.status, c.obs.error_type = outcome, status, provider_error
    a = spans_for(tracing_cfg(), c)
    assert a["span"].status.status_code is StatusCode.ERROR
    assert a["error.type"] == expected and a["span"].status.description == expected


# ---- OpenInference (tracing.conventions) -----------------------------------------------------
def test_openinference_names_are_the_packages_constants():
    """Every attribute name and value openinference.py writes is the package's own constant."""
    from openinference.semconv import trace as sc

    from extproc.telemetry import openinference as oi

    names = {
        **{k: getattr(sc.SpanAttributes, k) for k in dir(sc.SpanAttributes) if k.isupper()},
        **{k: getattr(sc.MessageAttributes, k) for k in dir(sc.MessageAttributes) if k.isupper()},
        **{k: getattr(sc.ToolAttributes, k) for k in dir(sc.ToolAttributes) if k.isupper()},
    }
    ours = {"SPAN_KIND": "OPENINFERENCE_SPAN_KIND"}
    constants = [k for k in dir(oi) if k.isupper() and isinstance(getattr(oi, k), str) and "." in getattr(oi, k)]
    assert len(constants) >= 25
    for k in constants:
        assert getattr(oi, k) == names[ours.get(k, k)], k
    assert oi.KIND_LLM == sc.OpenInferenceSpanKindValues.LLM.value and oi.KIND_TOOL == sc.OpenInferenceSpanKindValues.TOOL.value
    assert oi.MIME_JSON == sc.OpenInferenceMimeTypeValues.JSON.value and oi.MIME_TEXT == sc.OpenInferenceMimeTypeValues.TEXT.value


def test_openinference_provider_and_system_are_values_phoenix_knows():
    """Phoenix prices from llm.provider: every built-in provider maps to the package's values
    (openrouter, which the package does not list, is sent by its own name)."""
    from openinference.semconv.trace import OpenInferenceLLMProviderValues, OpenInferenceLLMSystemValues

    from extproc import apis
    from extproc.telemetry.openinference import provider_values

    providers = {v.value for v in OpenInferenceLLMProviderValues}
    systems = {v.value for v in OpenInferenceLLMSystemValues}
    for p in apis.all_providers():
        for model in (None, "gpt-4o", "anthropic.claude-3-5-sonnet-20240620-v1:0", "claude-sonnet-4@20250514", "gemini-2.5-pro"):
            provider, system = provider_values(p.name, model)
            if p.name == "openrouter":
                assert (provider, system) == ("openrouter", None)
                continue
            assert provider in providers, p.name
            assert system is None or system in systems, (p.name, model)
    assert provider_values("azure", "gpt-4o") == ("azure", "openai")
    assert provider_values("bedrock", "anthropic.claude-3-5-sonnet-20240620-v1:0") == ("aws", "anthropic")
    assert provider_values("vertex_ai", "claude-sonnet-4@20250514") == ("google", "anthropic")
    assert provider_values("vertex_ai", "gemini-2.5-pro") == ("google", "vertexai")
    assert provider_values("gemini", "gemini-2.5-pro") == ("google", None)
    assert provider_values("acme-llm", "m") == ("acme-llm", None)


def priced_call(capture: bool) -> Call:
    from extproc.core.pricing import Cost

    c = call(capture)
    c.obs.usage = Usage(
        input_tokens=2800,
        output_tokens=40,
        total_tokens=2840,
        cached_input_tokens=2000,
        cache_creation_input_tokens=300,
        reasoning_tokens=10,
    )
    c.obs.message_count = 2
    c.obs.end_user = "u-1"
    c.cost = Cost(total=0.0125, input=0.01, output=0.0025, model="gpt-4o", source="catalogue")
    return c


def test_openinference_span_with_content_capture():
    a = spans_for(tracing_cfg(conventions=["openinference"], captureContent=True), priced_call(capture=True))
    span = a.pop("span")
    assert span.status.status_code is StatusCode.OK
    assert not any(k.startswith("gen_ai.") for k in a)  # only the convention asked for
    assert a == {
        "openinference.span.kind": "LLM",
        "llm.model_name": "gpt-4o-2024-08-06",
        "llm.provider": "azure",
        "llm.system": "openai",
        "llm.invocation_parameters": '{"temperature":0.5,"max_tokens":100,"stop":"\\n"}',
        "llm.token_count.prompt": 2800,
        "llm.token_count.completion": 40,
        "llm.token_count.total": 2840,
        "llm.token_count.prompt_details.cache_read": 2000,
        "llm.token_count.prompt_details.cache_write": 300,
        "llm.token_count.completion_details.reasoning": 10,
        "llm.cost.prompt": 0.01,
        "llm.cost.completion": 0.0025,
        "llm.cost.total": 0.0125,
        "input.value": '{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}',
        "input.mime_type": "application/json",
        "llm.input_messages.0.message.role": "system",
        "llm.input_messages.0.message.content": "be brief",
        "llm.input_messages.1.message.role": "user",
        "llm.input_messages.1.message.content": "hi",
        "output.value": "hello",
        "output.mime_type": "text/plain",
        "llm.output_messages.0.message.role": "assistant",
        "llm.output_messages.0.message.content": "hello",
        "session.id": "s-1",
        "user.id": "u-1",
        "server.address": "api.example.com",
        "http.response.status_code": 200,
    }


def test_openinference_without_capture_summarises_the_input_and_sends_no_content():
    a = spans_for(tracing_cfg(conventions=["openinference"]), priced_call(capture=False))
    assert a["input.value"] == "chat gpt-4o: 2 messages" and a["input.mime_type"] == "text/plain"
    assert "output.value" not in a and not any(k.startswith(("llm.input_messages", "llm.output_messages")) for k in a)
    assert a["llm.token_count.prompt"] == 2800 and a["llm.cost.total"] == 0.0125


def test_openinference_failed_call_has_status_error():
    c = priced_call(capture=False)
    c.outcome, c.status, c.obs.error_type = ERROR, 429, "rate_limit_exceeded"
    a = spans_for(tracing_cfg(conventions=["openinference"]), c)
    assert a["span"].status.status_code is StatusCode.ERROR and a["error.type"] == "rate_limit_exceeded"


def test_both_conventions_on_one_span():
    a = spans_for(tracing_cfg(conventions=["genai", "openinference"], captureContent=True), priced_call(capture=True))
    assert a["gen_ai.usage.input_tokens"] == a["llm.token_count.prompt"] == 2800
    assert a["gen_ai.usage.cache_read.input_tokens"] == a["llm.token_count.prompt_details.cache_read"] == 2000
    assert a["gen_ai.usage.cost"] == a["llm.cost.total"] == 0.0125
    assert "gen_ai.input.messages" in a and "input.value" in a


def test_openinference_input_messages_are_capped():
    c = priced_call(capture=True)
    c.obs.input_messages = [{"role": "user", "content": "x" * 10} for _ in range(40)]
    a = spans_for(tracing_cfg(conventions=["openinference"], captureContent=True, maxContentChars=25), c)
    messages = json.loads(a["input.value"])["messages"]
    assert len(messages) == 40 and "".join(m["content"] for m in messages) == "x" * 25  # text capped in all
    assert sum(k.startswith("llm.input_messages.") for k in a) == 2 * 16  # the last 16 as attributes


def test_openinference_mcp_request_is_a_tool_span():
    c = Call(
        obs=Observation(
            operation="execute_tool", extra={"mcp.method": "tools/call", "mcp.tool": "get_weather", "mcp.arguments": {"city": "Paris"}}
        ),
        provider="mcp",
        api="mcp",
        status=200,
        outcome=OK,
        start=1.0,
        end=1.1,
    )
    a = spans_for(tracing_cfg(conventions=["openinference"], captureContent=True), c)
    assert a["openinference.span.kind"] == "TOOL" and a["tool.name"] == "get_weather"
    assert a["input.value"] == '{"city":"Paris"}' and a["input.mime_type"] == "application/json"
    a = spans_for(tracing_cfg(conventions=["openinference"]), c)
    assert a["input.value"] == "tools/call get_weather" and "Paris" not in json.dumps(a, default=str)


@pytest.mark.parametrize("value", [["genai", "zipkin"], [], "openinference"])
def test_bad_conventions_exit_2_naming_the_key(tmp_path, value):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"tracing": {"conventions": value}}))
    p = subprocess.run([sys.executable, "-m", "extproc", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "tracing.conventions" in p.stderr


def test_gemini_contents_parts_are_captured_and_model_turns_are_assistant_in_every_convention():
    """The Gemini parser captures its ``{role, parts}`` contents in the common shape the spans read,
    and its ``model`` role (Gemini's name for the model's turns) is ``assistant``, the name the GenAI
    conventions and OpenInference give them, on every convention and in the CEL ``llm.prompt``."""
    from extproc.apis.gemini import GeminiGenerate

    c = call(capture=True)
    request = {
        "contents": [
            {"role": "user", "parts": [{"text": "why is the sky "}, {"text": "blue"}]},
            {"role": "model", "parts": [{"text": "air"}]},
            {"role": "user", "parts": [{"text": "and at sunset?"}]},
        ]
    }
    GeminiGenerate(c.obs, path_model="gemini-2.5-flash", capture=True).feed_request(json.dumps(request).encode())
    cfg = tracing_cfg(
        conventions=["genai", "openinference", "langfuse", "openllmetry"],
        captureContent=True,
        fields={"add": {"prompt": "llm.prompt"}},
    )
    a = spans_for(cfg, c)
    expected = [("user", "why is the sky blue"), ("assistant", "air"), ("user", "and at sunset?")]
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "why is the sky "}, {"type": "text", "content": "blue"}]},
        {"role": "assistant", "parts": [{"type": "text", "content": "air"}]},
        {"role": "user", "parts": [{"type": "text", "content": "and at sunset?"}]},
    ]
    as_dicts = [{"role": r, "content": t} for r, t in expected]
    assert json.loads(a["input.value"]) == {"messages": as_dicts}  # OpenInference
    assert [(a[f"llm.input_messages.{i}.message.role"], a[f"llm.input_messages.{i}.message.content"]) for i in range(3)] == expected
    assert json.loads(a["langfuse.observation.input"]) == as_dicts  # Langfuse
    assert [(a[f"gen_ai.prompt.{i}.role"], a[f"gen_ai.prompt.{i}.content"]) for i in range(3)] == expected  # OpenLLMetry
    assert json.loads(a["prompt"]) == as_dicts  # CEL llm.prompt


_APART = [  # a system prompt the API takes beside the messages: (parser, path model, request)
    (
        "anthropic:AnthropicMessages",
        None,
        {"model": "m", "system": [{"type": "text", "text": "be brief"}], "messages": [{"role": "user", "content": "hi"}]},
    ),
    (
        "gemini:GeminiGenerate",
        "gemini-2.5-flash",
        {"systemInstruction": {"parts": [{"text": "be brief"}]}, "contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
    ),
    ("openai:OpenAIResponses", None, {"model": "m", "instructions": "be brief", "input": "hi"}),
]


@pytest.mark.parametrize(("parser", "path_model", "request_body"), _APART, ids=[p for p, _, _ in _APART])
def test_system_prompt_given_apart_is_genai_system_instructions_and_leads_the_other_conventions(parser, path_model, request_body):
    """GenAI conventions: instructions given separately from the chat history go in
    ``gen_ai.system_instructions`` (an array of parts), not in ``gen_ai.input.messages``. OpenInference,
    Langfuse, OpenLLMetry and the CEL ``llm.prompt`` have no such attribute: the system prompt leads their messages."""
    import importlib

    module, name = parser.split(":")
    c = call(capture=True)
    cls = getattr(importlib.import_module(f"extproc.apis.{module}"), name)
    cls(c.obs, path_model=path_model, capture=True).feed_request(json.dumps(request_body).encode())
    cfg = tracing_cfg(
        conventions=["genai", "openinference", "langfuse", "openllmetry"], captureContent=True, fields={"add": {"prompt": "llm.prompt"}}
    )
    a = spans_for(cfg, c)
    assert json.loads(a["gen_ai.system_instructions"]) == [{"type": "text", "content": "be brief"}]
    assert json.loads(a["gen_ai.input.messages"]) == [{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]
    leading = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert json.loads(a["input.value"]) == {"messages": leading}
    assert (a["llm.input_messages.0.message.role"], a["llm.input_messages.0.message.content"]) == ("system", "be brief")
    assert json.loads(a["langfuse.observation.input"]) == leading
    assert (a["gen_ai.prompt.0.role"], a["gen_ai.prompt.0.content"]) == ("system", "be brief")
    assert json.loads(a["prompt"]) == leading
    assert "gen_ai.system_instructions" not in spans_for(tracing_cfg(), c)  # content capture off: none


def test_responses_instructions_apart_and_a_system_message_in_the_input_stays_there():
    """The conventions' own example: Responses ``instructions`` beside an ``input`` holding a system message."""
    from extproc.apis.openai import OpenAIResponses

    c = call(capture=True)
    request = {
        "model": "gpt-4",
        "instructions": "You must never tell jokes",
        "input": [{"role": "system", "content": "You are a helpful assistant"}, {"role": "user", "content": "Tell me a joke"}],
    }
    OpenAIResponses(c.obs, capture=True).feed_request(json.dumps(request).encode())
    a = spans_for(tracing_cfg(captureContent=True, maxContentChars=40), c)
    assert json.loads(a["gen_ai.system_instructions"]) == [{"type": "text", "content": "You must never tell jokes"}]
    assert json.loads(a["gen_ai.input.messages"]) == [  # one budget for the input: the instructions spent 25 of 40
        {"role": "system", "parts": [{"type": "text", "content": "You are a helpf"}]},
        {"role": "user", "parts": [{"type": "text", "content": ""}]},
    ]


# ---- per-request privacy (tracing.noCaptureHeader) ------------------------------------------
def _through_processor(cfg: config.Config, **request_headers: str) -> tuple[dict, Call]:
    """One streamed chat through a real Processor with the Tracer as its observer."""
    from extproc.server.processor import Processor
    from tests.unit.test_processor import body, headers, req_headers, run

    exporter = InMemorySpanExporter()
    tracer = Tracer(cfg.tracing, processor=SimpleSpanProcessor(exporter))
    calls: list[Call] = []

    class Keep:
        def on_call_end(self, c: Call) -> None:
            calls.append(c)

    sse = (
        b'data: {"id":"c1","model":"gpt-4o","choices":[{"delta":{"content":"the secret answer"}}]}\n\n'
        b'data: {"id":"c1","model":"gpt-4o","choices":[{"delta":{},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}\n\ndata: [DONE]\n\n'
    )
    run(
        Processor(cfg, [tracer, Keep()]),
        [
            req_headers(**request_headers),
            body(
                "request_body", b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"my private question"}]}', end=True
            ),
            headers("response_headers", **{":status": "200", "content-type": "text/event-stream"}),
            body("response_body", sse, end=True),
        ],
    )
    (span,) = exporter.get_finished_spans()
    return {"span": span, **dict(span.attributes)}, calls[0]


def _privacy_cfg(**tracing) -> config.Config:
    return config.parse(
        {
            "tracing": {
                "otlpEndpoint": "127.0.0.1:1",
                "captureContent": True,
                "conventions": ["genai", "openinference"],
                "fields": {"add": {"prompt": "llm.prompt", "completion": "llm.completion"}},
                **tracing,
            }
        }
    )


def test_capture_is_on_without_the_no_capture_header():
    a, c = _through_processor(_privacy_cfg())
    assert "my private question" in a["gen_ai.input.messages"] and "my private question" in a["input.value"]
    assert a["output.value"] == "the secret answer" and "my private question" in a["prompt"]


@pytest.mark.parametrize("tracing, header", [({}, "x-extproc-no-capture"), ({"noCaptureHeader": "X-Private"}, "x-private")])
def test_the_no_capture_header_turns_capture_off_for_that_call(tracing, header):
    a, c = _through_processor(_privacy_cfg(**tracing), **{header: "1"})
    assert c.obs.input_messages is None and c.obs.output_text is None  # the parser never held the content
    dump = json.dumps({k: v for k, v in a.items() if k != "span"}, default=list)
    assert "my private question" not in dump and "the secret answer" not in dump
    assert not any(
        k.startswith(("gen_ai.input", "gen_ai.output", "output.", "llm.input_messages", "llm.output_messages", "prompt", "completion"))
        for k in a
    )
    assert a["input.value"] == "chat gpt-4o: 1 message" and a["input.mime_type"] == "text/plain"
    assert a["gen_ai.usage.input_tokens"] == 5 and a["llm.token_count.completion"] == 3  # the rest of the span as usual


def test_the_tracer_alone_honours_the_no_capture_header():
    """Content a parser did hold (captured before the switch was read) still never reaches the span."""
    c = call(capture=True)
    c.headers["x-extproc-no-capture"] = "yes"
    a = spans_for(_privacy_cfg().tracing, c)
    assert not any(k.startswith(("gen_ai.input", "gen_ai.output", "output.", "llm.input_messages", "prompt", "completion")) for k in a)
    assert "be brief" not in json.dumps({k: v for k, v in a.items() if k != "span"}, default=list)


def test_no_capture_header_null_disables_the_switch():
    a, c = _through_processor(_privacy_cfg(noCaptureHeader=None), **{"x-extproc-no-capture": "1"})
    assert "my private question" in a["input.value"]


@pytest.mark.parametrize(
    "data, key",
    [
        ({"stats": {"customLabels": [{"name": "nc", "header": "X-Extproc-No-Capture"}]}}, "stats.customLabels.0.header"),
        ({"attribution": {"endUserHeader": "x-extproc-no-capture"}}, "attribution.endUserHeader"),
        ({"attribution": {"sessionHeaders": ["x-s", "x-extproc-no-capture"]}}, "attribution.sessionHeaders.1"),
        (
            {"budgets": {"descriptors": [{"entries": [{"key": "k", "header": "x-extproc-no-capture"}]}]}},
            "budgets.descriptors.0.entries.0.header",
        ),
        (
            {"tracing": {"noCaptureHeader": "x-mine"}, "stats": {"customLabels": [{"name": "nc", "header": "x-mine"}]}},
            "stats.customLabels.0.header",
        ),
        ({"tracing": {"noCaptureHeader": "no capture"}}, "tracing.noCaptureHeader"),
    ],
)
def test_the_no_capture_header_is_never_a_label_or_a_value(data, key):
    with pytest.raises(config.ConfigError, match=rf"^c\.yaml: {key.replace('.', '[.]')}: "):
        config.parse(data, "c.yaml")


def test_the_no_capture_header_is_a_fewer_messages_attribute():
    """In fewer-messages mode Envoy sends only the request headers it is told to: the default switch is one."""
    from extproc.devtools.envoy_config import ATTRIBUTE_HEADERS

    assert config.DEFAULT_NO_CAPTURE_HEADER in ATTRIBUTE_HEADERS


# ---- Langfuse and OpenLLMetry presets: every attribute they produce, by name and value ----------
def streamed_priced_call() -> Call:
    c = priced_call(capture=True)
    c.obs.streaming = True
    c.first_chunk = 10.05  # 50 ms after the start: completion_start_time
    return c


def _only(a: dict, names: set[str] | None = None, prefixes: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in a.items() if (names is not None and k in names) or (prefixes and k.startswith(prefixes))}


def test_langfuse_preset_attributes():
    """https://langfuse.com/integrations/native/opentelemetry#property-mapping: langfuse.* first."""
    a = spans_for(config.load(PRESETS / "langfuse.yaml").tracing, streamed_priced_call())
    assert _only(a, prefixes=("langfuse.",)) == {
        "langfuse.observation.type": "generation",
        "langfuse.observation.model.name": "gpt-4o-2024-08-06",
        "langfuse.observation.model.parameters": '{"temperature":0.5,"max_tokens":100,"stop":"\\n"}',
        # parts that do not overlap: Langfuse adds up every usage type containing input / output
        "langfuse.observation.usage_details": '{"input":500,"input_cache_read":2000,"input_cache_creation":300,'
        '"output":30,"output_reasoning":10,"total":2840}',
        "langfuse.observation.cost_details": '{"input":0.01,"output":0.0025,"total":0.0125}',
        "langfuse.observation.completion_start_time": '"2023-11-14T22:13:20.050000+00:00"',
        "langfuse.observation.input": '[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]',
        "langfuse.observation.output": '{"role":"assistant","content":"hello"}',
        "langfuse.user.id": "u-1",
        "langfuse.session.id": "s-1",
    }
    usage = json.loads(a["langfuse.observation.usage_details"])
    assert sum(v for k, v in usage.items() if "input" in k) == a["gen_ai.usage.input_tokens"] == 2800
    assert sum(v for k, v in usage.items() if "output" in k) == a["gen_ai.usage.output_tokens"] == 40
    assert a["gen_ai.usage.cost"] == json.loads(a["langfuse.observation.cost_details"])["total"]


def test_langfuse_failed_call_is_an_error_level_generation():
    c = priced_call(capture=False)
    c.outcome, c.status, c.obs.error_type = ERROR, 429, "rate_limit_exceeded"
    a = spans_for(config.load(PRESETS / "langfuse.yaml").tracing, c)
    assert a["langfuse.observation.level"] == "ERROR" and a["langfuse.observation.status_message"] == "rate_limit_exceeded"
    assert "langfuse.observation.input" not in a and "langfuse.observation.output" not in a  # no content: capture is off
    assert "langfuse.observation.completion_start_time" not in a  # not streamed


def test_openllmetry_preset_attributes():
    """https://traceloop.com/docs/openllmetry/contributing/semantic-conventions, names as in
    opentelemetry-semantic-conventions-ai's SpanAttributes."""
    from extproc.telemetry import openllmetry

    a = spans_for(config.load(PRESETS / "openllmetry.yaml").tracing, streamed_priced_call())
    names = {getattr(openllmetry, k) for k in dir(openllmetry) if k.isupper() and isinstance(getattr(openllmetry, k), str)}
    assert _only(a, names, prefixes=("gen_ai.prompt.", "gen_ai.completion.")) == {
        "llm.request.type": "chat",
        "llm.is_streaming": True,
        "gen_ai.is_streaming": True,
        "llm.usage.total_tokens": 2840,
        "gen_ai.usage.total_tokens": 2840,
        "gen_ai.usage.prompt_tokens": 2800,
        "gen_ai.usage.completion_tokens": 40,
        "gen_ai.usage.cache_read_input_tokens": 2000,
        "gen_ai.usage.cache_creation_input_tokens": 300,
        "llm.usage.reasoning_tokens": 10,
        "gen_ai.usage.reasoning_tokens": 10,
        "llm.user": "u-1",
        "gen_ai.user": "u-1",
        "llm.response.finish_reason": "stop",
        "gen_ai.prompt.0.role": "system",
        "gen_ai.prompt.0.content": "be brief",
        "gen_ai.prompt.1.role": "user",
        "gen_ai.prompt.1.content": "hi",
        "gen_ai.completion.0.role": "assistant",
        "gen_ai.completion.0.content": "hello",
        "gen_ai.completion.0.finish_reason": "stop",
    }
    # and the OpenTelemetry GenAI names OpenLLMetry 0.5 moved to, from the genai convention
    assert a["gen_ai.usage.input_tokens"] == 2800 and a["gen_ai.usage.cache_read.input_tokens"] == 2000
    assert a["gen_ai.usage.cache_creation.input_tokens"] == 300 and a["gen_ai.request.model"] == "gpt-4o"


def test_openllmetry_names_are_the_packages_constants():
    from opentelemetry.semconv_ai import LLMRequestTypeValues, SpanAttributes

    from extproc.telemetry import openllmetry

    package = {k: getattr(SpanAttributes, k) for k in dir(SpanAttributes) if k.isupper()}
    constants = [k for k in dir(openllmetry) if k.isupper() and isinstance(getattr(openllmetry, k), str) and "." in getattr(openllmetry, k)]
    assert len(constants) == 16
    for k in constants:
        assert getattr(openllmetry, k) == package[k], k
    values = {v.value for v in LLMRequestTypeValues}
    assert set(openllmetry.REQUEST_TYPES.values()) | {openllmetry.UNKNOWN} <= values


def test_langfuse_usage_details_never_go_negative():
    """Before every provider reports input including cache reads, a count could be smaller than
    its parts: the uncached part is then 0, never negative."""
    from extproc.telemetry.langfuse import usage_details

    c = call(capture=False)
    c.obs.usage = Usage(input_tokens=500, output_tokens=5, cached_input_tokens=2000)
    assert usage_details(c) == {"input": 0, "input_cache_read": 2000, "output": 5, "total": 505}


def test_mcp_request_is_a_langfuse_tool_and_has_no_openllmetry_llm_attributes():
    c = Call(
        obs=Observation(
            operation="execute_tool", extra={"mcp.method": "tools/call", "mcp.tool": "get_weather", "mcp.arguments": {"city": "Paris"}}
        ),
        provider="mcp",
        api="mcp",
        status=200,
        outcome=OK,
        start=1.0,
        end=1.1,
    )
    a = spans_for(tracing_cfg(conventions=["langfuse", "openllmetry"], captureContent=True), c)
    assert a["langfuse.observation.type"] == "tool" and a["langfuse.observation.input"] == '{"city":"Paris"}'
    assert "llm.request.type" not in a and a["mcp.method.name"] == "tools/call"


def test_an_anthropic_cached_stream_reads_the_same_in_every_convention():
    """The issue's case: 500 input + 2,000 cache-read + 300 cache-write tokens. Every convention
    shows all 2,800 input tokens, the cache breakdown, and our price."""
    from extproc.server.processor import Processor
    from tests.unit.test_processor import body, headers, req_headers, run

    cfg = config.parse({"tracing": {"otlpEndpoint": "127.0.0.1:1", "conventions": ["genai", "openinference", "langfuse", "openllmetry"]}})
    exporter = InMemorySpanExporter()
    sse = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"claude-sonnet-4-20250514",'
        b'"usage":{"input_tokens":500,"cache_read_input_tokens":2000,"cache_creation_input_tokens":300,"output_tokens":1}}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":40}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    run(
        Processor(cfg, [Tracer(cfg.tracing, processor=SimpleSpanProcessor(exporter))]),
        [
            req_headers("/v1/messages", **{":authority": "api.anthropic.com"}),
            body(
                "request_body",
                b'{"model":"claude-sonnet-4-20250514","stream":true,"max_tokens":64,"messages":[{"role":"user","content":"x"}]}',
                end=True,
            ),
            headers("response_headers", **{":status": "200", "content-type": "text/event-stream"}),
            body("response_body", sse, end=True),
        ],
    )
    (span,) = exporter.get_finished_spans()
    a = dict(span.attributes)
    assert a["gen_ai.usage.input_tokens"] == a["llm.token_count.prompt"] == a["gen_ai.usage.prompt_tokens"] == 2800
    assert a["gen_ai.usage.cache_read.input_tokens"] == a["llm.token_count.prompt_details.cache_read"] == 2000
    assert a["gen_ai.usage.cache_creation.input_tokens"] == a["llm.token_count.prompt_details.cache_write"] == 300
    assert a["gen_ai.usage.output_tokens"] == a["llm.token_count.completion"] == 40
    usage = json.loads(a["langfuse.observation.usage_details"])
    assert usage == {"input": 500, "input_cache_read": 2000, "input_cache_creation": 300, "output": 40, "total": 2840}
    assert a["llm.provider"] == a["llm.system"] == "anthropic" and a["llm.model_name"] == "claude-sonnet-4-20250514"
    assert a["llm.cost.total"] == a["gen_ai.usage.cost"] == json.loads(a["langfuse.observation.cost_details"])["total"] > 0
    assert span.status.status_code is StatusCode.OK


# ---- sampling --------------------------------------------------------------------------------
_SAMPLED_PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "vendor=v1"}
_UNSAMPLED_PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
_BAD_PARENT = {"traceparent": "00-zz-b7ad6b7169203331-01"}


def _queued(tracing: dict, parent_headers: dict, *, ask_the_sampler: bool = False) -> list:
    """The records a tracer queues for one call with these trace headers (trace ids fixed)."""
    t = Tracer(
        config.parse({"tracing": {"otlpEndpoint": "127.0.0.1:1", **tracing}}).tracing, processor=SimpleSpanProcessor(InMemorySpanExporter())
    )
    if ask_the_sampler:
        t.parent_based_always_on = False
    records: list = []
    t._emit = records.append
    t.ids.generate_trace_id = lambda: 0xABC  # type: ignore[method-assign]
    c = call(capture=False)
    c.headers = {**c.headers, **parent_headers}
    t.on_call_end(c)
    return [(*r[:4], dict(r[4]), *r[5:]) for r in records]


@pytest.mark.parametrize("tracing", [{}, {"randomSampling": True}])
@pytest.mark.parametrize("parent", [{}, _SAMPLED_PARENT, _UNSAMPLED_PARENT, _BAD_PARENT])
def test_the_default_sampler_is_decided_in_place_as_the_sdks_decides(tracing, parent):
    """ParentBased(ALWAYS_ON) (no randomSampling, no OTEL_TRACES_SAMPLER; or randomSampling: true)
    is decided without calling it: the same spans, trace state and attributes as the SDK's."""
    t = Tracer(
        config.parse({"tracing": {"otlpEndpoint": "127.0.0.1:1", **tracing}}).tracing, processor=SimpleSpanProcessor(InMemorySpanExporter())
    )
    assert t.parent_based_always_on
    ours = _queued(tracing, parent)
    assert ours == _queued(tracing, parent, ask_the_sampler=True)
    assert len(ours) == (0 if parent is _UNSAMPLED_PARENT else 1)
    if parent is _SAMPLED_PARENT:
        assert ours[0][3].to_header() == "vendor=v1"


def test_other_samplers_are_asked(monkeypatch):
    """randomSampling false or a ratio, or another OTEL_TRACES_SAMPLER: the sampler decides."""
    for tracing in ({"randomSampling": False}, {"randomSampling": 0.0}):
        assert _queued(tracing, {}) == []  # no parent: randomSampling decides
        assert len(_queued(tracing, _SAMPLED_PARENT)) == 1
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert _queued({}, _SAMPLED_PARENT) == []
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_off")
    assert _queued({}, {}) == [] and len(_queued({}, _SAMPLED_PARENT)) == 1


_TRACEPARENTS = [
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    "  00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01  ",
    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more",
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" + " " * 500,
    "",
    "garbage",
]
_TRACESTATES = [None, "", "vendor=v1", "vendor=v1,other=x=y", "a=1,a=2", "bad key=1", "k=" + "v" * 600]


@pytest.mark.parametrize("traceparent", _TRACEPARENTS)
@pytest.mark.parametrize("tracestate", _TRACESTATES)
def test_the_remote_parent_is_the_one_the_w3c_propagator_extracts(traceparent, tracestate):
    """Read without the propagator's Context and span objects, by its rules: the same span
    context (ids, flags, trace state, remote) or none, for valid, malformed, zero and
    versioned headers and long or malformed trace states."""
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from extproc.telemetry.tracing import parent_context, remote_parent

    carrier = {"traceparent": traceparent} if tracestate is None else {"traceparent": traceparent, "tracestate": tracestate}
    extracted = TraceContextTextMapPropagator().extract(carrier)
    expected = get_current_span(extracted).get_span_context()
    ours = remote_parent(carrier)
    if not expected.is_valid:
        assert ours is None
    else:
        assert ours == expected and ours.is_remote
        assert ours.trace_flags == expected.trace_flags and ours.trace_state == expected.trace_state
    assert get_current_span(parent_context(ours)).get_span_context() == get_current_span(extracted).get_span_context()
