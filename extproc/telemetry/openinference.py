"""OpenInference span attributes (``tracing.conventions: [openinference]``), what Arize Phoenix reads.

OpenInference is Phoenix's own convention: an LLM span carries ``openinference.span.kind=LLM``,
the model and provider, token counts with their cache/reasoning details, the cost, the input and
output, session and user. Phoenix prices a span from ``llm.model_name`` + ``llm.provider`` +
``llm.token_count.*``, so ``llm.provider``/``llm.system`` take the values the
``openinference-semantic-conventions`` package lists (``tests/unit/test_tracing.py`` compares
every name and value here with that package; it is a test dependency only). We also send our own
price as ``llm.cost.*``.

Token counts are the sidecar's normalised ones: ``llm.token_count.prompt`` is every input token
(cache reads and writes included), ``.completion`` every output token (reasoning included); the
breakdowns are ``prompt_details.cache_read/cache_write`` and ``completion_details.reasoning``.

Content: with capture on, ``input.value`` is ``{"messages": [{role, content}, ...]}`` (JSON) and
``output.value`` the answer text, plus ``llm.input_messages.N.message.*`` (the last 16 messages) and
``llm.output_messages.0.message.*``. With capture off, ``input.value`` is a one-line summary with
no content (``chat gpt-4o: 3 messages``) and there is no ``output.value``.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.apis.routing import declared, model_makers
from extproc.core import cel
from extproc.core.bounded import MAX_LIST_ITEMS, bounded_attribute, clip, clip_opt
from extproc.core.call import Call
from extproc.core.pricing import Cost

# Attribute names (openinference.semconv.trace.SpanAttributes / MessageAttributes / ToolAttributes).
SPAN_KIND = "openinference.span.kind"
LLM_MODEL_NAME = "llm.model_name"
LLM_PROVIDER = "llm.provider"
LLM_SYSTEM = "llm.system"
LLM_INVOCATION_PARAMETERS = "llm.invocation_parameters"
INPUT_VALUE = "input.value"
INPUT_MIME_TYPE = "input.mime_type"
OUTPUT_VALUE = "output.value"
OUTPUT_MIME_TYPE = "output.mime_type"
LLM_TOKEN_COUNT_PROMPT = "llm.token_count.prompt"
LLM_TOKEN_COUNT_COMPLETION = "llm.token_count.completion"
LLM_TOKEN_COUNT_TOTAL = "llm.token_count.total"
LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_READ = "llm.token_count.prompt_details.cache_read"
LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_WRITE = "llm.token_count.prompt_details.cache_write"
LLM_TOKEN_COUNT_COMPLETION_DETAILS_REASONING = "llm.token_count.completion_details.reasoning"
LLM_COST_PROMPT = "llm.cost.prompt"
LLM_COST_COMPLETION = "llm.cost.completion"
LLM_COST_TOTAL = "llm.cost.total"
LLM_INPUT_MESSAGES = "llm.input_messages"
LLM_OUTPUT_MESSAGES = "llm.output_messages"
MESSAGE_ROLE = "message.role"
MESSAGE_CONTENT = "message.content"
TOOL_NAME = "tool.name"
SESSION_ID = "session.id"
USER_ID = "user.id"

# Values (OpenInferenceSpanKindValues, OpenInferenceMimeTypeValues).
KIND_LLM = "LLM"
KIND_TOOL = "TOOL"
MIME_JSON = "application/json"
MIME_TEXT = "text/plain"


def provider_values(provider: str, model: str | None) -> tuple[str, str | None]:
    """``(llm.provider, llm.system)`` for one of our provider names and the call's model, from
    the provider's declaration (``Provider.openinference`` in ``extproc/apis/<provider>.py``). A
    provider that declares none (a configured route's own name) is sent as llm.provider as it
    is. On a host of other makers' models (Bedrock, Vertex AI) the model id names the system."""
    known = declared().get(provider)
    if known is None or known.openinference is None:
        return clip(provider), None
    value, system = known.openinference
    if known.hosts_others and model:
        m = model.lower()
        for marker, maker in model_makers():
            if marker in m and maker.openinference is not None:
                return value, maker.openinference[1]
    return value, system


def add_attributes(a: dict[str, Any], call: Call, capture: bool, max_chars: int) -> None:
    """Add the OpenInference attributes of ``call`` to ``a`` (session.id / user.id are set by the
    caller for every convention)."""
    if call.api == "mcp":
        _tool(a, call, capture, max_chars)
        return
    obs = call.obs
    u = obs.usage
    a[SPAN_KIND] = KIND_LLM
    model = obs.response_model or obs.request_model
    if model:
        a[LLM_MODEL_NAME] = clip(model)
    provider, system = provider_values(call.provider, model)
    a[LLM_PROVIDER] = provider
    if system is not None:
        a[LLM_SYSTEM] = system
    if obs.params:
        params = {k: bounded_attribute(cel.to_attribute(v)) for k, v in obs.params.items()}
        a[LLM_INVOCATION_PARAMETERS] = orjson.dumps(params).decode()
    if u.input_tokens is not None:
        a[LLM_TOKEN_COUNT_PROMPT] = u.input_tokens
    if u.output_tokens is not None:
        a[LLM_TOKEN_COUNT_COMPLETION] = u.output_tokens
    total = u.total()
    if total is not None:
        a[LLM_TOKEN_COUNT_TOTAL] = total
    if u.cached_input_tokens is not None:
        a[LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_READ] = u.cached_input_tokens
    if u.cache_creation_input_tokens is not None:
        a[LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_WRITE] = u.cache_creation_input_tokens
    if u.reasoning_tokens is not None:
        a[LLM_TOKEN_COUNT_COMPLETION_DETAILS_REASONING] = u.reasoning_tokens
    cost = call.cost
    if isinstance(cost, Cost):
        a[LLM_COST_PROMPT] = cost.input
        a[LLM_COST_COMPLETION] = cost.output
        a[LLM_COST_TOTAL] = cost.total
    if capture and obs.input_messages is not None:
        messages = prompt_messages(obs.input_messages, max_chars)
        a[INPUT_VALUE] = orjson.dumps({"messages": messages}).decode()
        a[INPUT_MIME_TYPE] = MIME_JSON
        first = max(len(messages) - MAX_LIST_ITEMS, 0)
        for i, m in enumerate(messages[first:]):
            a[f"{LLM_INPUT_MESSAGES}.{i}.{MESSAGE_ROLE}"] = m["role"]
            a[f"{LLM_INPUT_MESSAGES}.{i}.{MESSAGE_CONTENT}"] = m["content"]
    else:
        a[INPUT_VALUE] = summary(call)
        a[INPUT_MIME_TYPE] = MIME_TEXT
    if capture and obs.output_text:
        text = "".join(obs.output_text)[:max_chars]
        a[OUTPUT_VALUE] = text
        a[OUTPUT_MIME_TYPE] = MIME_TEXT
        a[f"{LLM_OUTPUT_MESSAGES}.0.{MESSAGE_ROLE}"] = "assistant"
        a[f"{LLM_OUTPUT_MESSAGES}.0.{MESSAGE_CONTENT}"] = text


def summary(call: Call) -> str:
    """What the input was, without its content: ``chat gpt-4o: 3 messages``."""
    obs = call.obs
    text = clip(obs.operation)
    if obs.request_model:
        text += " " + clip(obs.request_model)
    n = obs.message_count
    if n is not None:
        text += f": {n} message" if n == 1 else f": {n} messages"
    return text


def prompt_messages(value: Any, max_chars: int) -> list[dict[str, str]]:
    """Request messages as ``[{role, content}]``, text parts joined, ``max_chars`` of text in all."""
    budget = max_chars
    out = []
    for m in value if isinstance(value, list) else [value]:
        if isinstance(m, str):
            role, text = "user", m
        elif isinstance(m, dict):
            role, text = clip(str(m.get("role", "user"))), _text(m.get("content"))
        else:
            continue
        out.append({"role": role, "content": text[: max(budget, 0)]})
        budget -= len(text)
    return out


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _tool(a: dict[str, Any], call: Call, capture: bool, max_chars: int) -> None:
    """An MCP JSON-RPC request: a TOOL span (the tool's name for ``tools/call``)."""
    x = call.obs.extra
    a[SPAN_KIND] = KIND_TOOL
    tool = clip_opt(x.get("mcp.tool"))
    if tool is not None:
        a[TOOL_NAME] = tool
    args = x.get("mcp.arguments")
    if capture and args is not None:
        text = orjson.dumps(args).decode()
        a[INPUT_VALUE] = text[:max_chars]
        a[INPUT_MIME_TYPE] = MIME_JSON if len(text) <= max_chars else MIME_TEXT  # cut JSON is not JSON
    else:
        a[INPUT_VALUE] = clip(f"{x.get('mcp.method') or 'mcp'} {tool}" if tool else str(x.get("mcp.method") or "mcp"))
        a[INPUT_MIME_TYPE] = MIME_TEXT
