"""How a call ended, in six words: the providers' finish reasons normalised.

``stop`` (a natural end or a stop sequence), ``length`` (cut by a token limit: a truncated
answer), ``tool_calls`` (the model asks for a tool), ``content_filter`` (a provider-side block:
safety, recitation, refusal, guardrail), ``error`` (the generation failed, or the stream ended
with an error event), ``other`` (anything else). The provider's raw value stays on the span
(``gen_ai.response.finish_reasons``). A call whose response has no finish reason (an error
status, an embedding, a client abort before the end) has none.

Each parser module declares ``FINISH_REASONS``, its API's raw values (as on the wire; compared
without case) -> one of :data:`REASONS`. The table here is their union, built once: a raw value
two modules map differently is refused at start-up, so one raw value always means one thing.
"""

from __future__ import annotations

from extproc.core.call import Call

STOP, LENGTH, TOOL_CALLS, CONTENT_FILTER, ERROR, OTHER = "stop", "length", "tool_calls", "content_filter", "error", "other"
REASONS = (STOP, LENGTH, TOOL_CALLS, CONTENT_FILTER, ERROR, OTHER)

_table: dict[str, str] | None = None


def table() -> dict[str, str]:
    """Lower-cased raw finish reason -> normalised, from every module's ``FINISH_REASONS``."""
    global _table
    if _table is None:
        from extproc import apis

        out: dict[str, str] = {}
        for module in apis.modules():
            for raw, reason in module.FINISH_REASONS.items():
                key = raw.lower()
                if reason not in REASONS:
                    raise TypeError(f"{module.__name__}.FINISH_REASONS[{raw!r}] = {reason!r}: not one of {REASONS}")
                if out.setdefault(key, reason) != reason:
                    raise TypeError(f"{module.__name__}.FINISH_REASONS[{raw!r}] = {reason!r}, but another module maps it to {out[key]!r}")
        _table = out
    return _table


def normalise(raw: str) -> str:
    """One provider finish reason as one of :data:`REASONS`."""
    return (_table if _table is not None else table()).get(raw.strip().lower(), OTHER)


def finish_reason(call: Call) -> str | None:
    """The call's normalised finish reason (its last one: with several choices, the last to
    finish), or None when the response gave none."""
    reasons = call.obs.finish_reasons
    for raw in reversed(reasons):
        if isinstance(raw, str) and raw:
            return normalise(raw)
    return None
