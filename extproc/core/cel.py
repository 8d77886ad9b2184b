"""``tracing.fields``: span attributes computed by CEL expressions over one finished call.

Expressions are compiled once at start-up (``compile_field``; a bad one is a config error) and
evaluated once per call, at its end, against these variables (absent values are absent keys, so
``has(llm.input_tokens)`` works and an expression reading a missing value yields no attribute):

- ``llm``: ``provider``, ``operation``, ``request_model``, ``response_model``, ``response_id``,
  ``input_tokens``, ``output_tokens``, ``total_tokens``, ``cached_tokens``,
  ``cache_creation_tokens``, ``reasoning_tokens``, ``streaming``, ``params`` (map of request
  parameters), ``finish_reasons`` (list), ``end_user``, ``session_id``, ``key_id`` (see
  ``extproc.core.attribution``), ``prompt`` (list of ``{role, content}``) and
  ``completion`` (list of strings): these two only with ``tracing.captureContent: true``.
- ``jwt``: the verified JWT claims Envoy's jwt_authn forwarded (empty map without a token).
- ``request``: ``headers`` (lower-case names; credentials removed), ``path`` (no query string),
  ``method``, ``host``.
- ``response``: ``status``.
- ``mcp``: ``method``, ``tool``, ``id``, ``session_id``, ``error_code`` (MCP calls only).

A string value is cut to ``max_chars`` (1,024; with ``tracing.captureContent``, ``tracing.maxContentChars`` when
larger) a list to 128 items, and one ``flatten`` yields at most 64 attributes: an expression over client-chosen values cannot make a span
of unbounded size.

``flatten(expr)`` spreads a map (or list) into ``name.key`` attributes one level deep;
``flatten_recursive(expr)`` all the way down.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cel
import orjson

VARIABLES = frozenset({"llm", "jwt", "request", "response", "mcp"})
_MACRO_VAR = re.compile(r"\.\s*(?:map|filter|all|exists|exists_one)\s*\(\s*([A-Za-z_]\w*)\s*,")  # l.map(x, ...)
_FLATTEN = re.compile(r"^\s*(flatten|flatten_recursive)\s*\((.*)\)\s*$", re.S)
# What a failing expression raises at evaluation (missing key, bad operand, division by zero...).
EVAL_ERRORS = (KeyError, IndexError, TypeError, ValueError, ArithmeticError, RuntimeError)

AttrValue = str | bool | int | float | list[str] | list[bool] | list[int] | list[float]


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    program: Any  # cel.Program
    flatten: int  # 0: no, 1: one level, -1: recursive
    variables: frozenset[str]


@lru_cache(maxsize=256)
def compile_field(expr: str) -> tuple[Any, int, frozenset[str]]:
    """Compile one expression; ValueError (one line) if it is not valid CEL over our variables."""
    flatten = 0
    m = _FLATTEN.match(expr)
    if m is not None:
        flatten = 1 if m.group(1) == "flatten" else -1
        expr = m.group(2)
    try:
        program = cel.compile(expr)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"invalid CEL expression: {_first_line(e)}") from None
    used = frozenset(program.variables())
    unknown = used - VARIABLES - set(_MACRO_VAR.findall(expr))
    if unknown:
        raise ValueError(f"unknown variable {sorted(unknown)[0]!r} (known: {', '.join(sorted(VARIABLES))})")
    return program, flatten, used


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def compile_fields(add: Mapping[str, str]) -> list[Field]:
    out = []
    for name, expr in add.items():
        program, flatten, used = compile_field(expr)
        out.append(Field(name, program, flatten, used))
    return out


MAX_FIELD_CHARS = 1024  # a computed attribute's string value (at least)
MAX_FIELD_ITEMS = 128  # a computed list attribute's items
MAX_FLATTENED = 64  # attributes one flatten() may produce (a span keeps 128 at most)


def evaluate(fields: list[Field], variables: dict[str, Any], attrs: dict[str, Any], max_chars: int = MAX_FIELD_CHARS) -> int:
    """Set each field's attribute(s) in ``attrs``; return how many expressions failed."""
    failed = 0
    for f in fields:
        try:
            value = f.program.execute(cel.Context(variables=variables))
        except EVAL_ERRORS:
            failed += 1
            continue
        if f.flatten:
            flat: dict[str, Any] = {}
            _flatten_into(flat, f.name, value, f.flatten)
            for name in list(flat)[:MAX_FLATTENED]:
                _set(attrs, name[:max_chars], flat[name], max_chars)
        else:
            _set(attrs, f.name, value, max_chars)
    return failed


def _flatten_into(out: dict[str, Any], prefix: str, value: Any, depth: int) -> None:
    if len(out) >= MAX_FLATTENED:
        return
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        out[prefix] = value
        return
    for key, v in items:
        if len(out) >= MAX_FLATTENED:
            return
        name = f"{prefix}.{key}"
        if depth != 1 and isinstance(v, (Mapping, list)):
            _flatten_into(out, name, v, depth - 1)
        else:
            out[name] = v


def _set(attrs: dict[str, Any], name: str, value: Any, max_chars: int = MAX_FIELD_CHARS) -> None:
    v = to_attribute(value)
    if isinstance(v, str):
        attrs[name] = v[:max_chars]
    elif isinstance(v, list):
        attrs[name] = [x[:max_chars] if isinstance(x, str) else x for x in v[:MAX_FIELD_ITEMS]]
    elif v is not None:
        attrs[name] = v


def to_attribute(value: Any) -> AttrValue | None:
    """An OTel attribute value: primitives as is, homogeneous primitive lists as is, else JSON."""
    if value is None:
        return None
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, list) and value and all(type(v) is type(value[0]) and isinstance(v, (bool, int, float)) for v in value):
        return value
    return orjson.dumps(value, default=str).decode()
