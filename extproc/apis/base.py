"""The interface every API schema parser implements, and its helpers.

A parser is created per LLM call with the :class:`Observation` it fills. The servicer calls
``feed_request`` with each chunk of the request body (it parses the whole once the last arrived),
``start_response`` with the status and content type, then ``feed_response`` with every decoded
response chunk. Subclasses only implement the ``on_*`` hooks for their schema:

- ``on_request_json(obj)``: the request body as JSON.
- ``on_response_json(obj)``: a whole non-streamed response body, or one NDJSON line / JSON-array
  element of a streamed one.
- ``on_sse_event(event, data)``: one server-sent event (name may be ``b""``).
- ``want_sse_event(event, data)``: cheap filter: may this event hold anything we read? Events it
  rejects are never JSON-parsed (most stream chunks are text deltas).

Hooks set ``self.changed = True`` when usage or the response model became known, so the servicer
sends dynamic metadata on that very message (clients may hang up before end of stream).

Token semantics: hooks pass the counts to ``set_usage`` as the API reports them, and each parser
class declares what those mean (``input_excludes_cache``, ``output_excludes_reasoning``).
``set_usage`` keeps the reported pieces and derives ``Observation.usage`` in one meaning for every
API: input = every input token the model processed (uncached + cache read + cache write), output
= every output token billed (visible + reasoning), the breakdowns as reported. A stream whose
events overwrite pieces (Anthropic's ``message_start`` then ``message_delta``) is recomputed from
the latest pieces, never added twice. The table per API is in docs/metrics.md (Token semantics).
Nothing here raises on bad input: it is counted on the observation and the call goes on.

The response framing (``framing_for``: a JSON body, SSE, NDJSON, a streamed JSON array, or one a
subclass adds through ``feed_other``) picks a decoder from ``extproc.codecs``; this class hands its
items to the hooks and counts what the decoder refused.

Completion is a protocol fact: ``complete`` becomes True when the response is whole by the API's
own rules, and the servicer reads nothing else to decide a call's outcome. A non-streamed body is
complete when its last byte arrived. A streamed one, for parsers with ``stream_markers``, only
when the hook that sees the API's end marker calls ``mark_complete()`` (``[DONE]``,
``message_stop``, ``finishReason``, ...): a stream that stops before its marker is incomplete
whatever usage it showed on the way (Anthropic reports usage in ``message_start``, Gemini repeats
cumulative usage in every chunk). Parsers without ``stream_markers`` (no streamed form, or none we
know the end of) call a stream complete at its last byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from extproc.codecs import Framing
from extproc.codecs.json_array import JsonArrayDecoder
from extproc.codecs.ndjson import NDJSONDecoder
from extproc.codecs.sse import SSEDecoder
from extproc.core.bounded import clip
from extproc.core.observation import Observation, Usage

JSON, SSE, NDJSON, JSON_ARRAY, NONE = "json", "sse", "ndjson", "json_array", "none"


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 16 << 20  # largest non-streamed body we accumulate to parse
    max_event_bytes: int = 4 << 20  # largest SSE line or whole event / NDJSON line we hold
    max_capture_chars: int = 16384  # content capture cap (tracing)


DEFAULT_LIMITS = Limits()


# One token count of one call, at most (docs/security.md): a billion, a hundred times the largest
# context windows, and Envoy's largest hits_addend. Past it the count is a parse error, never counted.
MAX_TOKENS = 10**9


def as_int(value: Any) -> int | None:
    """A token count as the provider sent it, if it is a sane integer (bool, negatives, fractions
    and absurdly large values refused)."""
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    if type(value) is float and value.is_integer() and 0 <= value <= MAX_TOKENS:
        return int(value)
    return None


def items(value: Any) -> list[Any] | tuple[()]:
    """``value`` if it is a JSON array, else nothing to iterate (a hostile body may put anything
    where a list belongs)."""
    return value if isinstance(value, list) else ()


def system_message(value: Any) -> dict[str, Any] | None:
    """A system prompt given beside the messages as a message of role ``system``: a string or a
    list of text blocks as its ``content``, a Gemini ``Content`` (``{"parts": [...]}``) with its parts
    as the ``content``; None when there is none."""
    if isinstance(value, dict):
        parts = value.get("parts")
        return {"role": "system", "content": parts} if isinstance(parts, list) and parts else None
    if isinstance(value, (str, list)) and value:
        return {"role": "system", "content": value}
    return None


def renamed_roles(value: Any, names: dict[str, str]) -> Any:
    """Captured messages (``common_messages``' shape) with each role in ``names`` renamed; a renamed
    message is a new dict (the parsed request is never changed)."""
    if isinstance(value, list):
        return [renamed_roles(m, names) for m in value]
    if isinstance(value, dict):
        role = value.get("role")
        if isinstance(role, str) and role in names:
            return {**value, "role": names[role]}
    return value


def dig(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


class ApiParser:
    default_provider: ClassVar[str] = "unknown"  # provider when nothing else names one
    operation: ClassVar[str] = "unknown"
    api: ClassVar[str] = "unknown"  # short schema name, e.g. "openai.chat"
    # request-body keys copied to Observation.params (trace attributes), by their request name
    param_keys: ClassVar[tuple[str, ...]] = ()
    # request-body keys holding the prompt, first present wins (captured only with capture on)
    input_keys: ClassVar[tuple[str, ...]] = ()
    # request-body keys holding a system prompt given beside the messages (Anthropic ``system``,
    # Gemini ``systemInstruction``, Responses ``instructions``), first present wins: it leads the
    # captured messages as a ``system`` message, where OpenAI's chat API has it anyway (marked
    # ``Observation.system_apart``: the GenAI convention records it as gen_ai.system_instructions)
    system_keys: ClassVar[tuple[str, ...]] = ()
    # roles this API names otherwise than the tracing conventions (OpenTelemetry GenAI, OpenInference:
    # system, user, assistant, tool), renamed in the captured messages: Gemini's ``model`` turns are
    # ``assistant`` on every span, as any other API's
    role_names: ClassVar[dict[str, str]] = {}
    # request-body paths holding the end user the call is made for, first string found wins
    end_user_keys: ClassVar[tuple[tuple[str, ...], ...]] = ()
    # False for calls that consume no tokens (count_tokens, MCP): never priced, never "unpriced"
    priced: ClassVar[bool] = True
    # True: a streamed response is complete only when mark_complete() saw the API's end marker
    stream_markers: bool = False
    # Token semantics of the counts this API reports (see the module docstring):
    input_excludes_cache: ClassVar[bool] = False  # input leaves out cache reads and writes (Anthropic, Bedrock)
    output_excludes_reasoning: ClassVar[bool] = False  # output leaves out reasoning (Gemini's thoughts)
    # The servicer parses this call's bodies (False only for the servicer's pass-through parser)
    observed: ClassVar[bool] = True
    _param_set: ClassVar[frozenset[str]] = frozenset()  # param_keys as a set, made per class

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._param_set = frozenset(cls.param_keys)

    def __init__(
        self,
        obs: Observation,
        *,
        path_model: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        capture: bool = False,
    ) -> None:
        self.obs = obs
        obs.operation = self.operation
        if path_model:
            obs.request_model = path_model
        self.limits = limits
        self.capture = capture
        self.changed = False
        self.complete = False  # the response is whole by the API's own end marker (see module doc)
        self.stream_error = False  # it ended with an in-stream error event (a 200 that failed)
        self.status = 0
        # The counts as the API reported them; obs.usage is derived from them. An API that reports
        # in the normalised meaning already writes obs.usage itself (nothing to derive).
        self.reported = Usage() if self.input_excludes_cache or self.output_excludes_reasoning else obs.usage
        self._framing = JSON
        self._body: list[bytes] = []
        self._body_len = 0
        self._request: list[bytes] = []  # request-body chunks until its last (feed_request)
        self._request_len = 0  # their length; -1: over limits.max_body_bytes, not read
        self._sse: SSEDecoder | None = None
        self._lines: NDJSONDecoder | None = None
        self._array: JsonArrayDecoder | None = None
        self._stream: Framing | None = None  # whichever of them (or a subclass's) is in use

    # ---- request ---------------------------------------------------------------------------
    def feed_request(self, body: bytes, complete: bool = True) -> None:
        """One chunk of the request body (Envoy streams it); ``complete``: the body's last.
        Chunks are held until the last (at most ``limits.max_body_bytes``, counted in
        ``held_bytes``), then the whole body is parsed once; a body in one chunk is never copied."""
        held = self._request_len
        if held < 0:
            return  # over the cap: not read (the response still is)
        if not complete or held:
            held += len(body)
            if held > self.limits.max_body_bytes:
                self._request = []
                self._request_len = -1  # stop holding it, count once
                self.obs.parse_error("request_too_large")
                return
            if body:
                self._request.append(body)
            self._request_len = held
            if not complete:
                return
            body = b"".join(self._request)
            self._request = []
            self._request_len = 0
        if not body:
            return
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            self.obs.parse_error("request_json")
            return
        if isinstance(obj, dict):
            self.on_request_json(obj)
            if not self._param_set.isdisjoint(obj):  # no walk of param_keys for a body with none of them
                for key in self.param_keys:
                    value = obj.get(key)
                    if value is not None:
                        self.obs.params[key] = value
            for path in self.end_user_keys:
                user = obj.get(path[0]) if len(path) == 1 else dig(obj, *path)
                if isinstance(user, str) and user:
                    self.obs.end_user = clip(user)
                    break
            for key in self.input_keys:
                value = obj.get(key)
                if value is not None:
                    system = (
                        next((m for k in self.system_keys if (m := system_message(obj.get(k))) is not None), None)
                        if self.system_keys
                        else None
                    )
                    # how many messages (a summary that carries no content), the messages with capture on
                    self.obs.message_count = (len(value) if isinstance(value, list) else 1) + (system is not None)
                    if self.capture:
                        value = self.common_messages(value)
                        if self.role_names:
                            value = renamed_roles(value, self.role_names)
                        self.obs.input_messages = value if system is None else [system, *(value if isinstance(value, list) else [value])]
                        self.obs.system_apart = system is not None
                    break
        else:
            self.obs.parse_error("request_not_object")

    def common_messages(self, value: Any) -> Any:
        """The captured prompt (``input_keys``) in the shape telemetry reads whatever the API: a
        string, or messages ``{role, content}`` whose content is a string or a list of parts
        (``{"text": ...}`` or ``{"type": ...}``). An API shaped otherwise converts here (Gemini)."""
        return value

    # ---- response --------------------------------------------------------------------------
    def start_response(self, status: int, content_type: str) -> None:
        self.status = status
        self._framing = self.framing_for(status, content_type.lower())
        if self._framing == SSE:
            self.obs.streaming = True
            self._stream = self._sse = SSEDecoder(self.limits.max_event_bytes)
        elif self._framing == JSON_ARRAY:
            self.obs.streaming = True
            self._stream = self._array = JsonArrayDecoder(self.limits.max_body_bytes)
        elif self._framing == NDJSON:
            self.obs.streaming = True
            self._stream = self._lines = NDJSONDecoder(self.limits.max_event_bytes)

    def framing_for(self, status: int, content_type: str) -> str:
        if status >= 400:
            return JSON
        if content_type.startswith("text/event-stream"):
            return SSE
        if "ndjson" in content_type or content_type.startswith("application/jsonl"):
            return NDJSON
        return JSON

    def feed_response(self, chunk: bytes, end: bool) -> bool:
        """Feed one decoded response chunk; True if usage or response model changed."""
        framing = self._framing
        if framing == SSE:
            sse = self._sse
            assert sse is not None
            for event, data in sse.decode(chunk):
                # ``_sse_event``, inline (most chunks are one event the filter rejects)
                if data == b"[DONE]":
                    self.on_sse_done()
                elif data and self.want_sse_event(event, data):
                    self._sse_json(event, data)
            if end:
                for event, data in sse.flush():
                    self._sse_event(event, data)
                if sse.oversized:
                    self.obs.parse_error("sse_line_too_long")
        elif framing == JSON:
            self._accumulate(chunk, end)
            if end:
                self.mark_complete()  # a non-streamed body: whole when its last byte arrived
        elif framing == NDJSON:
            lines = self._lines
            assert lines is not None
            oversized = lines.oversized
            for line in lines.decode(chunk):
                self._ndjson_line(line)
            if lines.oversized != oversized:
                self.obs.parse_error("ndjson_line_too_long")
            if end:
                for line in lines.flush():
                    self._ndjson_line(line)
        elif framing == JSON_ARRAY:
            array = self._array
            assert array is not None
            bad = array.oversized + array.invalid
            for obj in array.decode(chunk):
                self._json_object(obj)
            if array.oversized + array.invalid != bad:
                self.obs.parse_error("json_array_element")
            if end and not array.complete:
                self.obs.parse_error("json_array_truncated")
        else:
            self.feed_other(chunk, end)
        if end and framing != JSON and not self.stream_markers:
            self.mark_complete()
        changed, self.changed = self.changed, False
        return changed

    def feed_other(self, chunk: bytes, end: bool) -> None:
        """Framings a subclass adds itself (AWS eventstream): it sets ``self._stream`` to its
        decoder (``extproc.codecs.Framing``), so ``held_bytes`` counts what that holds."""

    def mark_complete(self, error: bool = False) -> None:
        """The response is whole (its end marker arrived); ``error``: it ended with an error event.
        Sets ``changed`` so the servicer hands Envoy the outcome on this very message."""
        if error:
            self.stream_error = True
        if not self.complete:
            self.complete = True
            self.changed = True

    def work_items(self, chunk: bytes) -> int:
        """How many items (lines, array elements) ``chunk`` makes the parser handle one by one in
        Python: counted in C before parsing, so the servicer can refuse a message that would hold
        the event loop (many tiny ``data:`` lines) without doing that work."""
        framing = self._framing
        if framing == SSE or framing == NDJSON:
            return max(chunk.count(b"\n"), chunk.count(b"\r"))
        if framing == JSON_ARRAY:
            return chunk.count(b"{")
        return 0

    def held_bytes(self) -> int:
        """Bytes this parser holds between chunks (bodies, unfinished lines, events, frames)."""
        stream = self._stream
        held = stream.held if stream is not None else 0
        if self._body_len > 0:  # -1: over the cap, nothing held
            held += self._body_len
        if self._request_len > 0:
            held += self._request_len
        return held

    # ---- hooks -----------------------------------------------------------------------------
    def on_request_json(self, obj: dict[str, Any]) -> None:
        model = obj.get("model")
        if isinstance(model, str) and model:
            self.obs.request_model = model
        if obj.get("stream") is True:
            self.obs.streaming = True

    def on_response_json(self, obj: Any) -> None:
        """A whole JSON body (or one streamed JSON object)."""

    def want_sse_event(self, event: bytes, data: bytes) -> bool:
        return True

    def want_json_line(self, line: bytes) -> bool:
        """Cheap filter for NDJSON stream lines, like ``want_sse_event``."""
        return True

    def on_sse_event(self, event: bytes, obj: Any) -> None:
        """One SSE event whose data parsed as JSON."""

    def on_sse_done(self) -> None:
        """The ``data: [DONE]`` sentinel (OpenAI's end of stream)."""

    def on_error_json(self, obj: Any) -> None:
        """An error body (status >= 400): record the provider's error type.

        Order: ``error.code`` when it names the error class (a non-numeric string: OpenAI's
        ``rate_limit_exceeded`` is more precise than its ``type`` ``tokens``; a numeric code is
        only the HTTP status again), then ``error.type``, then ``error.status`` (Google's status
        name); the metrics fall back to the HTTP status when none is given."""
        err = obj.get("error") if isinstance(obj, dict) else None
        kind = None
        if isinstance(err, dict):
            code = err.get("code")
            if isinstance(code, str) and code and not code.strip().isdigit():
                kind = code
            else:
                kind = err.get("type") or err.get("status")
        elif isinstance(err, str):
            kind = err
        if isinstance(obj, dict) and kind is None:
            kind = obj.get("type") if obj.get("type") != "error" else None
        if isinstance(kind, (str, int)) and not isinstance(kind, bool):
            self.obs.error_type = str(kind)[:64]

    # ---- helpers for subclasses ------------------------------------------------------------
    def set_response_model(self, model: Any) -> None:
        if isinstance(model, str) and model and model != self.obs.response_model:
            self.obs.response_model = model
            self.changed = True

    def set_usage(self, **counts: Any) -> None:
        """Record counts as the API reports them (``Usage`` field names, the API's own meaning;
        a later value of a field replaces the earlier one), then derive ``obs.usage`` from the
        latest pieces. Values that are not sane integers are refused."""
        reported = self.reported
        fresh = False
        for name, value in counts.items():
            if value is None:
                continue
            if type(value) is not int or not 0 <= value <= MAX_TOKENS:  # (as_int's common case, inline)
                value = as_int(value)
                if value is None:
                    self.obs.parse_error("bad_token_count")
                    continue
            if getattr(reported, name) != value:
                setattr(reported, name, value)
                fresh = True
        if fresh:
            if reported is self.obs.usage:  # the API reports in the normalised meaning already
                self.changed = True
            else:
                self._derive()

    def _derive(self) -> None:
        """``obs.usage`` from the reported pieces (module docstring): input and output summed
        where the API reports parts apart, total and the breakdowns as reported."""
        r, u = self.reported, self.obs.usage
        inp, out = r.input_tokens, r.output_tokens
        read, write, reasoning = r.cached_input_tokens, r.cache_creation_input_tokens, r.reasoning_tokens
        if self.input_excludes_cache and (read is not None or write is not None):
            inp = min((inp or 0) + (read or 0) + (write or 0), MAX_TOKENS)
        if self.output_excludes_reasoning and reasoning is not None:
            out = min((out or 0) + reasoning, MAX_TOKENS)
        if (
            u.input_tokens != inp
            or u.output_tokens != out
            or u.total_tokens != r.total_tokens
            or u.cached_input_tokens != read
            or u.cache_creation_input_tokens != write
            or u.reasoning_tokens != reasoning
        ):
            u.input_tokens, u.output_tokens, u.total_tokens = inp, out, r.total_tokens
            u.cached_input_tokens, u.cache_creation_input_tokens, u.reasoning_tokens = read, write, reasoning
            self.changed = True

    def capture_text(self, text: Any) -> None:
        if not self.capture or not isinstance(text, str) or not text:
            return
        out = self.obs.output_text
        if out is None:
            out = self.obs.output_text = []
        used = sum(map(len, out))
        room = self.limits.max_capture_chars - used
        if room > 0:
            out.append(text[:room])

    # ---- framed items -> hooks --------------------------------------------------------------------------
    def _accumulate(self, chunk: bytes, end: bool) -> None:
        if end and not self._body_len and 0 < len(chunk) <= self.limits.max_body_bytes:
            # the whole body in one message (most non-streamed responses): parsed as it is, not
            # held and taken back
            self._json_body(chunk)
            return
        if chunk and self._body_len >= 0:
            self._body_len += len(chunk)
            if self._body_len > self.limits.max_body_bytes:
                self._body = []
                self._body_len = -1  # over the cap: stop holding it, count once
                self.obs.parse_error("body_too_large")
            else:
                self._body.append(chunk)
        if not end or self._body_len <= 0:
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        self._body_len = 0
        self._json_body(body)

    def _json_body(self, body: bytes) -> None:
        """A whole non-streamed body, parsed."""
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            if self.status < 400:  # a non-JSON error body is normal; a non-JSON success is not
                self.obs.parse_error("response_json")
            return
        self._json_object(obj)

    def _json_object(self, obj: Any) -> None:
        if self.status >= 400:
            self.on_error_json(obj)
        else:
            self.on_response_json(obj)

    def _sse_event(self, event: bytes, data: bytes) -> None:
        if data == b"[DONE]":
            self.on_sse_done()
            return
        if not data or not self.want_sse_event(event, data):
            return
        self._sse_json(event, data)

    def _sse_json(self, event: bytes, data: bytes) -> None:
        """An event the filter wants: its data parsed as JSON, for ``on_sse_event``."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.obs.parse_error("sse_json")
            return
        self.on_sse_event(event, obj)

    def _ndjson_line(self, line: bytes) -> None:
        if not self.want_json_line(line):
            return
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            self.obs.parse_error("ndjson")
            return
        self._json_object(obj)
