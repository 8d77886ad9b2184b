"""The dynamic metadata we hand Envoy, for its access log (``%DYNAMIC_METADATA(ns:key)%``).

Keys (numbers as numbers, booleans as booleans; a key is absent until its value is known):
``model`` (requested), ``provider_model`` (from the response), ``provider``, ``streaming``,
``operation``, ``prompt_tokens``, ``completion_tokens``, ``total_tokens``, ``cached_tokens``,
``cache_creation_tokens``, ``reasoning_tokens``, ``cost_usd`` (US dollars, absent when unpriced),
``outcome``, ``finish_reason`` (normalised: stop, length, tool_calls, content_filter, error,
other; see ``extproc.apis.finish``); streams only: ``ttft_ms`` (request start to the first
response chunk) and ``tpot_ms`` (mean time per output token after the first, once the response
is complete), milliseconds, the same values the TTFT/TPOT histograms record; with
``budgets.enabled``, ``ratelimit_cost``: the call's cost so far in ``budgets.unit``, an integer,
which Envoy's rate limit filter charges when the stream is done (docs/budgets.md); attribution
(``extproc.core.attribution``): ``end_user``, ``session_id``, ``key_id``.

``outcome`` is what the call amounted to, as in ``ai_requests_total``: written as
``client_abort`` with the response headers, and replaced by ``ok``/``error`` on the message that
completes the response (the API's end marker, or the end of a non-streamed body). Envoy writes
the access log when the exchange is over, so a call the client abandoned before the end logs
``client_abort`` (what the sidecar records too), and a complete one ``ok``.
"""

from __future__ import annotations

import struct
from typing import Any

from google.protobuf.struct_pb2 import Struct

from extproc.apis.finish import finish_reason
from extproc.core.bounded import clip
from extproc.core.call import CLIENT_ABORT, OK, Call
from extproc.core.config import MAX_CHARGE, BudgetsConfig
from extproc.core.observation import Usage
from extproc.core.pricing import Cost

# Envoy rejects a hits_addend above this (RateLimit.HitsAddend): the charge is capped to it.
MAX_RATELIMIT_COST = MAX_CHARGE
# Request parameters declaring the most output tokens a call may produce (parsers copy them to
# Observation.params under these names): the charge of a served call whose usage never came.
CEILING_PARAMS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def _charge(value: float) -> int:
    """A charge Envoy accepts: an integer in 0 .. MAX_RATELIMIT_COST, whatever ``value`` is
    (huge, infinite: capped; NaN or negative: 0). Never raises."""
    if not value > 0:  # NaN, 0, negatives
        return 0
    if value >= MAX_RATELIMIT_COST:
        return MAX_RATELIMIT_COST
    return round(value)


class Budget:
    """``budgets.unit`` as a function of the call: an integer in 0 .. 1e9, or None (nothing to
    charge yet, or the ``weighted`` expression failed: then nothing is charged).

    Never free (docs/budgets.md, "What is charged when"): a call served without usage is charged
    its request's output ceiling or ``budgets.unreportedCharge`` from its response's start (the
    reported usage replaces it when it comes); an unpriced call in ``micro_usd`` its tokens at
    ``budgets.unpricedUsdPerMillionTokens``; a total below input + output the latter."""

    def __init__(self, cfg: BudgetsConfig) -> None:
        self.unit = cfg.unit
        self.unreported = cfg.unreported
        self.unpriced_rate = cfg.unpriced_usd_per_million_tokens  # USD per million = micro-USD per token
        self.program: Any = None
        self.errors = 0  # weighted expressions that failed or gave no number
        if cfg.unit == "weighted":
            from extproc.core import cel  # only configs that use it pay for CEL

            assert cfg.weight is not None
            self.program = cel.compile_field(cfg.weight)[0]  # compiled once (config validation already did)

    def cost(self, call: Call) -> int | None:
        u = call.obs.usage
        if not u.seen():
            if call.priced and 0 < call.status < 400:
                return self._unreported(call)
            return None  # not an LLM call, not answered yet, or an error answer: nothing served
        unit = self.unit
        value: float | int | None
        if unit == "total_tokens":
            value = _total(u)
        elif unit == "input_tokens":
            value = u.input_tokens or 0
        elif unit == "output_tokens":
            value = u.output_tokens or 0
        elif unit == "micro_usd":
            cost = call.cost
            value = cost.total * 1_000_000 if isinstance(cost, Cost) else _total(u) * self.unpriced_rate
        else:
            value = self._weighted(call)
        if value is None:
            return None
        return _charge(value)

    def _unreported(self, call: Call) -> int:
        """A served call without usage (so far): its request's output ceiling, in token units,
        else the configured charge."""
        if self.unit != "micro_usd" and self.unit != "input_tokens":
            params = call.obs.params
            for key in CEILING_PARAMS:
                ceiling = params.get(key)
                if type(ceiling) is int and ceiling > 0:
                    return _charge(ceiling)
        return self.unreported

    def _weighted(self, call: Call) -> float | None:
        import cel

        from extproc.core.cel import EVAL_ERRORS

        obs = call.obs
        u = obs.usage
        llm: dict[str, Any] = {  # token counts the provider did not report count as 0
            "input_tokens": u.input_tokens or 0,
            "output_tokens": u.output_tokens or 0,
            "total_tokens": _total(u),
            "cached_tokens": u.cached_input_tokens or 0,
            "cache_creation_tokens": u.cache_creation_input_tokens or 0,
            "reasoning_tokens": u.reasoning_tokens or 0,
            "provider": call.provider,
            "operation": obs.operation,
            "streaming": obs.streaming,
        }
        if obs.request_model:
            llm["request_model"] = obs.request_model
        if obs.response_model:
            llm["response_model"] = obs.response_model
        try:
            value = self.program.execute(cel.Context(variables={"llm": llm}))
        except EVAL_ERRORS:
            self.errors += 1
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN
            self.errors += 1
            return None
        return value  # rounded and bounded by _charge (an infinite weight: the cap)


def _total(u: Usage) -> int:
    """The call's total tokens: the provider's total, but never less than input + output (a
    ``total_tokens: 0`` beside 200k input tokens is not a free call)."""
    return max(u.total_tokens or 0, (u.input_tokens or 0) + (u.output_tokens or 0))


def fields(call: Call, budget: Budget | None = None) -> dict[str, Any]:
    """String values are cut to 128 characters (client- or upstream-chosen: docs/security.md)."""
    obs = call.obs
    out: dict[str, Any] = {
        "provider": clip(call.provider),
        "streaming": obs.streaming,
        "operation": clip(obs.operation),
        "outcome": call.outcome or CLIENT_ABORT,
    }  # until complete, ending now would be an abort
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
    if budget is not None:
        charge = budget.cost(call)
        if charge is not None:
            out["ratelimit_cost"] = charge
    if obs.streaming and call.status < 400:
        ttft = call.ttft
        if ttft is not None:
            out["ttft_ms"] = round(ttft * 1000, 3)
            tpot = call.tpot if call.outcome == OK else None
            if tpot is not None:
                out["tpot_ms"] = round(tpot * 1000, 3)
    finish = finish_reason(call)
    if finish is not None:
        out["finish_reason"] = finish
    end_user = call.end_user
    if end_user:
        out["end_user"] = end_user  # already cut to 128 characters, like session_id
    if call.session_id:
        out["session_id"] = call.session_id
    if call.key_id:
        out["key_id"] = call.key_id
    return out


def write(target: Struct, namespace: str, call: Call, budget: Budget | None = None) -> None:
    """Fill ``target`` (a ProcessingResponse.dynamic_metadata) with the call's fields."""
    target.fields[namespace].struct_value.update(fields(call, budget))


# ---- the reply path: the metadata serialised once per message, appended to a constant reply ------
# A serialised ProcessingResponse is the concatenation of its fields, so a reply carrying metadata
# is a constant, pre-serialised reply (e.g. ``response_body {}``) followed by ``encoded(...)``: no
# ProcessingResponse is built per message. The Struct is written by hand, from pieces made once:
# google.protobuf's ``Struct.update`` is Python code that dispatches on each value's type and
# sets it through the C layer, 7.1 us for an 11-field message against 2.3 us here (a first
# hand encoder without the pieces made once measured 15.8 us; this one walking the dict of
# ``fields`` 3.6 us). A Struct is a map, i.e. repeated (key, Value) entries in any order: each
# entry is encoded on its own, an entry of a string or a boolean once per (key, value) (most
# repeat: provider, operation, model, outcome), a number's entry as a per-key prefix plus its
# 8-byte double, and the four levels around them (their tags and lengths) kept per namespace and
# entries' length, written in front (``_head``).
_DYNAMIC_METADATA_TAG = b"\x42"  # ProcessingResponse.dynamic_metadata = 8, length-delimited (8 << 3 | 2)
_pack_double = struct.Struct("<d").pack
# Entries of string and boolean values kept, per key by value: bounded (values are client-chosen;
# past the bound an entry is encoded each time), and only keys whose values repeat across calls.
_ENTRIES_KEPT = 2048
_REPEATING_KEYS = frozenset({"provider", "streaming", "operation", "outcome", "model", "provider_model", "finish_reason"})
_entries: dict[str, dict[Any, bytes]] = {key: {} for key in _REPEATING_KEYS}
_kept = 0  # entries in _entries, all keys
_number_prefix: dict[str, bytes] = {}  # entry up to the double: key, Value tag and length, number_value tag
_namespace_key: dict[str, bytes] = {}  # the outer entry's key field, per namespace


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: ``tag``, the length as a varint, ``payload``."""
    n = len(payload)
    return tag + (bytes((n,)) if n < 0x80 else _varint(n)) + payload


def _entry(key: str, value: Any) -> bytes:
    """One Struct map entry (field 1): key (1) and a Value (2) of string_value (3) or bool_value (4)."""
    global _kept
    kept = _entries.get(key)
    entry = kept.get(value) if kept is not None else None
    if entry is None:
        v = (b"\x20\x01" if value else b"\x20\x00") if value.__class__ is bool else _field(b"\x1a", value.encode())
        entry = _field(b"\x0a", _field(b"\x0a", key.encode()) + _field(b"\x12", v))
        if kept is not None and _kept < _ENTRIES_KEPT:
            kept[value] = entry
            _kept += 1
    return entry


def _number(key: str) -> bytes:
    prefix = _number_prefix.get(key)
    if prefix is None:
        k = _field(b"\x0a", key.encode())
        # entry length: the key field, the Value's tag and length (2), its number_value (1 + 8)
        prefix = _number_prefix[key] = b"\x0a" + _varint(len(k) + 11) + k + b"\x12\x09\x11"
    return prefix


def encoded(namespace: str, call: Call, budget: Budget | None = None) -> bytes:
    """The call's fields as a serialised ``ProcessingResponse.dynamic_metadata`` field (tag
    included), to append to a serialised reply; parses to what :func:`write` builds.

    The same keys and values as :func:`fields`, read from the call directly (no dict of them
    built and walked per message: a change to one is a change to both;
    tests/unit/test_metadata_encoding.py compares them on calls of every shape)."""
    obs = call.obs
    provider = call.provider
    operation = obs.operation
    outcome = call.outcome or CLIENT_ABORT  # until complete, ending now would be an abort
    streaming = obs.streaming
    parts = [
        _PROVIDERS.get(provider) or _entry("provider", clip(provider)),
        _STREAMING.get(streaming) or _entry("streaming", streaming),
        _OPERATIONS.get(operation) or _entry("operation", clip(operation)),
        _OUTCOMES.get(outcome) or _entry("outcome", outcome),
    ]
    add = parts.append
    model = obs.request_model
    if model:
        add(_MODELS.get(model) or _entry("model", clip(model)))
    model = obs.response_model
    if model:
        add(_PROVIDER_MODELS.get(model) or _entry("provider_model", clip(model)))
    u = obs.usage
    n = u.input_tokens
    if n is not None:
        add(_PROMPT_TOKENS + _pack_double(n))
    n = u.output_tokens
    if n is not None:
        add(_COMPLETION_TOKENS + _pack_double(n))
    n = u.total()
    if n is not None:
        add(_TOTAL_TOKENS + _pack_double(n))
    n = u.cached_input_tokens
    if n is not None:
        add(_CACHED_TOKENS + _pack_double(n))
    n = u.cache_creation_input_tokens
    if n is not None:
        add(_CACHE_CREATION_TOKENS + _pack_double(n))
    n = u.reasoning_tokens
    if n is not None:
        add(_REASONING_TOKENS + _pack_double(n))
    cost = call.cost
    if isinstance(cost, Cost):
        add(_COST_USD + _pack_double(cost.total))
    if budget is not None:
        charge = budget.cost(call)
        if charge is not None:
            add(_RATELIMIT_COST + _pack_double(charge))
    if streaming and call.status < 400:
        ttft = call.ttft
        if ttft is not None:
            add(_TTFT_MS + _pack_double(round(ttft * 1000, 3)))
            tpot = call.tpot if call.outcome == OK else None
            if tpot is not None:
                add(_TPOT_MS + _pack_double(round(tpot * 1000, 3)))
    if obs.finish_reasons:
        finish = finish_reason(call)
        if finish is not None:
            add(_FINISH_REASONS.get(finish) or _entry("finish_reason", finish))
    end_user = call.end_user
    if end_user:
        add(_entry("end_user", end_user))  # already cut to 128 characters, like session_id
    if call.session_id:
        add(_entry("session_id", call.session_id))
    if call.key_id:
        add(_entry("key_id", call.key_id))
    entries = b"".join(parts)  # Struct (the entries)
    n0 = len(entries)
    heads = _heads.get(namespace)
    head = heads.get(n0) if heads is not None else None
    if head is None:
        head = _head(namespace, n0)
    return head + entries


# What goes in front of the entries, per namespace by the entries' length (a reply's metadata
# differs from call to call in its values, rarely in its length): kept, at most _HEADS_KEPT.
_HEADS_KEPT = 4096
_heads: dict[str, dict[int, bytes]] = {}
_heads_kept = 0


def _head(namespace: str, n0: int) -> bytes:
    """The dynamic_metadata field up to its entries (``n0`` bytes of them): Struct{fields:
    {namespace: Value{struct_value: Struct{fields: entries}}}}, the four tags and lengths around
    the entries computed from the inside out."""
    global _heads_kept
    ns = _namespace_key.get(namespace)
    if ns is None:
        ns = _namespace_key[namespace] = _field(b"\x0a", namespace.encode())
    v0 = _length(n0)
    n1 = 1 + len(v0) + n0  # Value{struct_value}
    v1 = _length(n1)
    n2 = len(ns) + 1 + len(v1) + n1  # the map entry: key, value
    v2 = _length(n2)
    head = b"".join((_DYNAMIC_METADATA_TAG, _length(1 + len(v2) + n2), b"\x0a", v2, ns, b"\x12", v1, b"\x2a", v0))
    if _heads_kept < _HEADS_KEPT:
        _heads.setdefault(namespace, {})[n0] = head
        _heads_kept += 1
    return head


# the kept entries of each repeating key, by value (one dict lookup per entry, no (key, value) tuple)
_PROVIDERS = _entries["provider"]
_STREAMING = _entries["streaming"]
_OPERATIONS = _entries["operation"]
_OUTCOMES = _entries["outcome"]
_MODELS = _entries["model"]
_PROVIDER_MODELS = _entries["provider_model"]
_FINISH_REASONS = _entries["finish_reason"]
_PROMPT_TOKENS = _number("prompt_tokens")
_COMPLETION_TOKENS = _number("completion_tokens")
_TOTAL_TOKENS = _number("total_tokens")
_CACHED_TOKENS = _number("cached_tokens")
_CACHE_CREATION_TOKENS = _number("cache_creation_tokens")
_REASONING_TOKENS = _number("reasoning_tokens")
_COST_USD = _number("cost_usd")
_RATELIMIT_COST = _number("ratelimit_cost")
_TTFT_MS = _number("ttft_ms")
_TPOT_MS = _number("tpot_ms")


_SHORT_LENGTHS = tuple(bytes((n,)) for n in range(0x80))


def _length(n: int) -> bytes:
    """``n`` as a varint: one byte below 128, two below 16,384 (every metadata reply), else
    :func:`_varint`."""
    if n < 0x80:
        return _SHORT_LENGTHS[n]
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    return _varint(n)
