"""The request side's reads, held to their definitions for any input: the request headers as
protobuf gives them (a ``raw_value`` decoded as UTF-8, invalid bytes replaced; ``value`` when there
is no raw value; the last of a repeated name wins), and a request body's parameters, end user and
system prompt as each API declares them (``param_keys`` in their order, the first non-empty
``end_user_keys`` string, ``system_keys``), whichever shortcut the parser takes to them."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import apis
from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.apis.base import ApiParser, dig, system_message
from extproc.core.config import parse
from extproc.core.observation import Observation
from extproc.server.processor import Processor

_NAMES = st.sampled_from([":path", ":method", ":authority", "host", "x-session-id", "a", "b", "content-type"])
_RAW = st.one_of(st.binary(max_size=12), st.text(max_size=6).map(str.encode), st.sampled_from([b"\xff", b"caf\xc3\xa9", b"\xc3", b""]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_NAMES, _RAW, st.text(max_size=4)), max_size=10))
def test_request_headers_are_read_as_protobuf_gives_them_invalid_utf8_replaced(entries: list[tuple[str, bytes, str]]) -> None:
    msg = pb.HttpHeaders(end_of_stream=True)
    for key, raw, value in entries:
        msg.headers.headers.add(key=key, raw_value=raw, value=value)
    expected = {h.key: h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value for h in msg.headers.headers}
    proc = Processor(parse({}), [])
    stream = proc.open_stream()
    stream.handle(pb.ProcessingRequest(request_headers=msg))
    assert stream.call.headers == expected
    assert list(stream.call.headers) == list(expected)


def _parsers() -> list[type[ApiParser]]:
    for module in pkgutil.iter_modules(apis.__path__):
        importlib.import_module(f"{apis.__name__}.{module.name}")
    found: list[type[ApiParser]] = []
    todo = [ApiParser]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.append(sub)
            todo.append(sub)
    return [p for p in found if not p.__name__.startswith("_")]


PARSERS = _parsers()
_VALUES = st.one_of(
    st.none(),
    st.sampled_from(["", "u1", "you"]),
    st.integers(-2, 2),
    st.lists(st.sampled_from(["a", "b"]), max_size=2),
    st.fixed_dictionaries({}, optional={"user_id": st.sampled_from(["", "id7"]), "parts": st.just([{"text": "s"}])}),
)


def _keys(p: type[ApiParser]) -> list[str]:
    return [*p.param_keys, *p.system_keys, *p.input_keys, *(path[0] for path in p.end_user_keys), "model", "other"]


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_a_request_bodys_parameters_end_user_and_system_prompt_are_read_as_declared(data: st.DataObject) -> None:
    parser_cls = data.draw(st.sampled_from(PARSERS))
    body: dict[str, Any] = data.draw(st.dictionaries(st.sampled_from(_keys(parser_cls)), _VALUES, max_size=8))
    obs = Observation()
    parser = parser_cls(obs)
    parser.feed_request(orjson.dumps(body), complete=True)
    params = {k: body[k] for k in parser_cls.param_keys if body.get(k) is not None}
    assert obs.params == params and list(obs.params) == list(params)
    users = [u for path in parser_cls.end_user_keys if isinstance(u := dig(body, *path), str) and u]
    assert obs.end_user == (users[0] if users else None)
    inputs = [body[k] for k in parser_cls.input_keys if body.get(k) is not None]
    if inputs:
        system = any(system_message(body.get(k)) is not None for k in parser_cls.system_keys)
        assert obs.message_count == (len(inputs[0]) if isinstance(inputs[0], list) else 1) + system
