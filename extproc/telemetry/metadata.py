"""The dynamic metadata we hand Envoy, for its access log (``%DYNAMIC_METADATA(ns:key)%``).

Keys (numbers as numbers, booleans as booleans; a key is absent until its value is known):
``model`` (requested), ``provider_model`` (from the response), ``provider``, ``streaming``,
``operation``, ``prompt_tokens``, ``completion_tokens``, ``total_tokens``, ``cached_tokens``,
``cache_creation_tokens``, ``reasoning_tokens``, ``cost_usd`` (US dollars, absent when unpriced),
``outcome``.

``outcome`` is what the call amounted to, as in ``ai_requests_total``: written as
``client_abort`` with the response headers, and replaced by ``ok``/``error`` on the message that
completes the response (the API's end marker, or the end of a non-streamed body). Envoy writes
the access log when the exchange is over, so a call the client abandoned before the end logs
``client_abort`` (what the sidecar records too), and a complete one ``ok``.
"""
from __future__ import annotations

from typing import Any

from google.protobuf.struct_pb2 import Struct

from extproc.core.bounded import clip
from extproc.core.call import CLIENT_ABORT, Call
from extproc.core.pricing import Cost


def fields(call: Call) -> dict[str, Any]:
    """String values are cut to 128 characters (client- or upstream-chosen: docs/security.md)."""
    obs = call.obs
    out: dict[str, Any] = {"provider": clip(call.provider), "streaming": obs.streaming, "operation": clip(obs.operation),
                           "outcome": call.outcome or CLIENT_ABORT}  # until complete, ending now would be an abort
    if obs.request_model:
        out["model"] = clip(obs.request_model)
    if obs.response_model:
        out["provider_model"] = clip(obs.response_model)
    u = obs.usage
    if u.input_tokens is not None:
        out["prompt_tokens"] = u.input_tokens
    if u.output_tokens is not None:
        out["completion_tokens"] = u.output_tokens
    total = u.total()
    if total is not None:
        out["total_tokens"] = total
    if u.cached_input_tokens is not None:
        out["cached_tokens"] = u.cached_input_tokens
    if u.cache_creation_input_tokens is not None:
        out["cache_creation_tokens"] = u.cache_creation_input_tokens
    if u.reasoning_tokens is not None:
        out["reasoning_tokens"] = u.reasoning_tokens
    if isinstance(call.cost, Cost):
        out["cost_usd"] = call.cost.total
    return out


def write(target: Struct, namespace: str, call: Call) -> None:
    """Fill ``target`` (a ProcessingResponse.dynamic_metadata) with the call's fields."""
    target.fields[namespace].struct_value.update(fields(call))
