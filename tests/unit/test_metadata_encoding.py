"""The reply path encodes the dynamic metadata by hand (extproc.telemetry.metadata.encoded): it
must parse to exactly what google.protobuf builds (metadata.write), for every kind of value."""

from __future__ import annotations

from google.protobuf.struct_pb2 import Struct

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.core.call import OK, Call
from extproc.core.config import BudgetsConfig
from extproc.core.observation import Observation, Usage
from extproc.core.pricing import Cost
from extproc.server.replies import CONTINUE_RESPONSE_BODY, HEADERS_STREAMED
from extproc.telemetry import metadata


def _calls() -> list[Call]:
    full = Call(
        obs=Observation(
            operation="chat",
            request_model="gpt-4o-mini",
            response_model="gpt-4o-mini-2024-07-18 é€😀",
            streaming=True,
            usage=Usage(
                input_tokens=12,
                output_tokens=300,
                total_tokens=312,
                cached_input_tokens=0,
                cache_creation_input_tokens=2**40,
                reasoning_tokens=7,
            ),
        ),
        provider="openai",
        outcome=OK,
    )
    full.cost = Cost(total=0.000123456789, input=0.0001, output=0.000023456789, model="gpt-4o-mini", source="catalogue")
    return [Call(), full, Call(obs=Observation(request_model="x" * 300), provider="p" * 200)]


def _attributed() -> Call:
    """Every other kind of field: attribution strings, finish reason, stream timings, a budget charge."""
    call = Call(
        obs=Observation(operation="chat", streaming=True, usage=Usage(input_tokens=3, output_tokens=5)),
        provider="anthropic",
        outcome=OK,
        status=200,
        start=1.0,
        first_chunk=1.25,
        completed=2.0,
        end_user_header="alice",
        session_id="s" * 128,
        key_id="k-1",
    )
    call.obs.finish_reasons.append("stop")
    return call


def test_encoded_metadata_parses_like_protobuf():
    budget = metadata.Budget(BudgetsConfig(enabled=True))
    long_namespace = "n" * 200  # lengths past one varint byte at every level
    for call in [*_calls(), _attributed()]:
        for namespace in ("ai.ns", long_namespace):
            want = pb.ProcessingResponse()
            want.response_body.SetInParent()
            metadata.write(want.dynamic_metadata, namespace, call, budget)
            for _ in range(2):  # made, then from the pieces kept
                got = pb.ProcessingResponse.FromString(CONTINUE_RESPONSE_BODY + metadata.encoded(namespace, call, budget))
                assert got == want
                assert got.WhichOneof("response") == "response_body"
    assert set(metadata.fields(_attributed(), budget)) >= {
        "end_user",
        "session_id",
        "key_id",
        "finish_reason",
        "ttft_ms",
        "tpot_ms",
        "ratelimit_cost",
    }


def test_a_value_of_another_kind_is_encoded_by_protobuf(monkeypatch):
    monkeypatch.setattr(metadata, "fields", lambda call, budget=None: {"provider": "p", "tags": ["a", 1.5], "extra": None})
    got = pb.ProcessingResponse.FromString(metadata.encoded("ns", Call()))
    want = Struct()
    want.fields["ns"].struct_value.update({"provider": "p", "tags": ["a", 1.5], "extra": None})
    assert got.dynamic_metadata == want


def test_kept_entries_are_bounded(monkeypatch):
    monkeypatch.setattr(metadata, "_entries", {})
    for i in range(metadata._ENTRIES_KEPT + 100):
        metadata.encoded("ns", Call(obs=Observation(request_model=f"model-{i}"), session_id=f"session-{i}"))
    assert len(metadata._entries) == metadata._ENTRIES_KEPT
    assert not any(key == "session_id" for key, _ in metadata._entries)  # unique per call: never kept


def test_encoded_metadata_follows_a_headers_reply():
    got = pb.ProcessingResponse.FromString(HEADERS_STREAMED + metadata.encoded("n", Call(provider="openai")))
    assert got.mode_override.response_body_mode == got.mode_override.STREAMED
    assert got.dynamic_metadata.fields["n"].struct_value.fields["provider"].string_value == "openai"
    assert isinstance(got.dynamic_metadata, Struct)


def test_encoder_writes_the_dynamic_metadata_field_tag():
    """The tag the encoder writes is ProcessingResponse.dynamic_metadata's, length-delimited."""
    (tag,) = metadata._DYNAMIC_METADATA_TAG
    assert pb.ProcessingResponse.DESCRIPTOR.fields_by_name["dynamic_metadata"].number == tag >> 3
    assert tag & 7 == 2
