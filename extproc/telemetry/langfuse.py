"""Langfuse span attributes (``tracing.conventions: [langfuse]``): what Langfuse's OTLP endpoint
reads first, before ``gen_ai.*``.

Names and meanings follow Langfuse's documentation:
- property mapping: https://langfuse.com/integrations/native/opentelemetry#property-mapping
  (``langfuse.*`` wins over ``gen_ai.*``; ``langfuse.user.id`` / ``langfuse.session.id``);
- the attribute names its own SDK writes (``LangfuseOtelSpanAttributes`` in langfuse-python,
  ``langfuse/_client/attributes.py``): ``langfuse.observation.type``, ``.model.name``,
  ``.model.parameters``, ``.usage_details``, ``.cost_details``, ``.input``, ``.output``,
  ``.level``, ``.status_message``, ``.completion_start_time`` (values JSON-encoded, like the SDK);
- usage types: https://langfuse.com/docs/model-usage-and-cost - the UI adds up every usage type
  whose name contains ``input`` (resp. ``output``). So ``usage_details`` splits our normalised
  counts into parts that do not overlap: ``input`` (uncached), ``input_cache_read``,
  ``input_cache_creation``, ``output`` (visible), ``output_reasoning``, plus ``total``; their
  sums are our input and output. ``cost_details`` is our price (Langfuse then does not re-price).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from extproc.core import cel
from extproc.core.bounded import bounded_attribute, clip, clip_opt
from extproc.core.call import Call
from extproc.core.pricing import Cost
from extproc.telemetry.openinference import prompt_messages

OBSERVATION_TYPE = "langfuse.observation.type"
OBSERVATION_MODEL = "langfuse.observation.model.name"
OBSERVATION_MODEL_PARAMETERS = "langfuse.observation.model.parameters"
OBSERVATION_USAGE_DETAILS = "langfuse.observation.usage_details"
OBSERVATION_COST_DETAILS = "langfuse.observation.cost_details"
OBSERVATION_INPUT = "langfuse.observation.input"
OBSERVATION_OUTPUT = "langfuse.observation.output"
OBSERVATION_LEVEL = "langfuse.observation.level"
OBSERVATION_STATUS_MESSAGE = "langfuse.observation.status_message"
OBSERVATION_COMPLETION_START_TIME = "langfuse.observation.completion_start_time"
USER_ID = "langfuse.user.id"
SESSION_ID = "langfuse.session.id"

GENERATION = "generation"
TOOL = "tool"
ERROR_LEVEL = "ERROR"


def add_attributes(a: dict[str, Any], call: Call, capture: bool, max_chars: int, error: str | None) -> None:
    """Add the Langfuse attributes of ``call`` to ``a``; ``error``: the call's error type, if any."""
    obs = call.obs
    if call.end_user:
        a[USER_ID] = call.end_user
    if call.session_id:
        a[SESSION_ID] = call.session_id
    if error is not None:
        a[OBSERVATION_LEVEL] = ERROR_LEVEL
        a[OBSERVATION_STATUS_MESSAGE] = clip(error)
    if call.api == "mcp":
        a[OBSERVATION_TYPE] = TOOL
        args = obs.extra.get("mcp.arguments")
        if capture and args is not None:
            a[OBSERVATION_INPUT] = orjson.dumps(args).decode()[:max_chars]
        return
    a[OBSERVATION_TYPE] = GENERATION
    model = clip_opt(obs.response_model or obs.request_model)
    if model:
        a[OBSERVATION_MODEL] = model
    if obs.params:
        a[OBSERVATION_MODEL_PARAMETERS] = orjson.dumps({k: bounded_attribute(cel.to_attribute(v)) for k, v in obs.params.items()}).decode()
    usage = usage_details(call)
    if usage:
        a[OBSERVATION_USAGE_DETAILS] = orjson.dumps(usage).decode()
    cost = call.cost
    if isinstance(cost, Cost):
        a[OBSERVATION_COST_DETAILS] = orjson.dumps({"input": cost.input, "output": cost.output, "total": cost.total}).decode()
    if call.ttft is not None and obs.streaming:
        first = datetime.fromtimestamp((call.start_time_ns / 1e9) + call.ttft, UTC)
        a[OBSERVATION_COMPLETION_START_TIME] = orjson.dumps(first.isoformat()).decode()
    if capture and obs.input_messages is not None:
        a[OBSERVATION_INPUT] = orjson.dumps(prompt_messages(obs.input_messages, max_chars)).decode()
    if capture and obs.output_text:
        a[OBSERVATION_OUTPUT] = orjson.dumps({"role": "assistant", "content": "".join(obs.output_text)[:max_chars]}).decode()


def usage_details(call: Call) -> dict[str, int]:
    """Our normalised usage as Langfuse usage types that do not overlap (see the module doc)."""
    u = call.obs.usage
    out: dict[str, int] = {}
    read = u.cached_input_tokens or 0
    write = u.cache_creation_input_tokens or 0
    if u.input_tokens is not None:
        out["input"] = max(u.input_tokens - read - write, 0)
    if u.cached_input_tokens is not None:
        out["input_cache_read"] = read
    if u.cache_creation_input_tokens is not None:
        out["input_cache_creation"] = write
    reasoning = u.reasoning_tokens or 0
    if u.output_tokens is not None:
        out["output"] = max(u.output_tokens - reasoning, 0)
    if u.reasoning_tokens is not None:
        out["output_reasoning"] = reasoning
    total = u.total()
    if total is not None:
        out["total"] = total
    return out
