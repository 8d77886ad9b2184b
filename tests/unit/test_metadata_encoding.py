"""The reply path encodes the dynamic metadata by hand (extproc.telemetry.metadata.encoded): it
must parse to exactly what google.protobuf builds (metadata.write), for every kind of value."""
from __future__ import annotations

from google.protobuf.struct_pb2 import Struct

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.core.call import OK, Call
from extproc.core.observation import Observation, Usage
from extproc.core.pricing import Cost
from extproc.server.replies import CONTINUE_RESPONSE_BODY, HEADERS_STREAMED
from extproc.telemetry import metadata


def _calls() -> list[Call]:
    full = Call(obs=Observation(operation="chat", request_model="gpt-4o-mini", response_model="gpt-4o-mini-2024-07-18 é€😀",
                                streaming=True, usage=Usage(input_tokens=12, output_tokens=300, total_tokens=312,
                                                            cached_input_tokens=0, cache_creation_input_tokens=2**40,
                                                            reasoning_tokens=7)),
                provider="openai", outcome=OK)
    full.cost = Cost(total=0.000123456789, input=0.0001, output=0.000023456789, model="gpt-4o-mini", source="catalogue")
    return [Call(), full, Call(obs=Observation(request_model="x" * 300), provider="p" * 200)]


def test_encoded_metadata_parses_like_protobuf():
    for call in _calls():
        want = pb.ProcessingResponse()
        want.response_body.SetInParent()
        metadata.write(want.dynamic_metadata, "ai.ns", call)
        got = pb.ProcessingResponse.FromString(CONTINUE_RESPONSE_BODY + metadata.encoded("ai.ns", call))
        assert got == want
        assert got.WhichOneof("response") == "response_body"


def test_encoded_metadata_follows_a_headers_reply():
    got = pb.ProcessingResponse.FromString(HEADERS_STREAMED + metadata.encoded("n", Call(provider="openai")))
    assert got.mode_override.response_body_mode == got.mode_override.STREAMED
    assert got.dynamic_metadata.fields["n"].struct_value.fields["provider"].string_value == "openai"
    assert isinstance(got.dynamic_metadata, Struct)


def test_field_number():
    assert pb.ProcessingResponse.DESCRIPTOR.fields_by_name["dynamic_metadata"].number == metadata._DYNAMIC_METADATA_TAG >> 3
