"""The reply path encodes the dynamic metadata by hand (extproc.telemetry.metadata.encoded): it
must parse to exactly what google.protobuf builds (metadata.write), for every kind of value."""

from __future__ import annotations

import random

from google.protobuf.struct_pb2 import Struct

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.core.call import OK, Call
from extproc.core.config import BudgetsConfig
from extproc.core.observation import Observation, Usage
from extproc.core.pricing import UNKNOWN_MODEL, Cost
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


def _varied_calls() -> list[Call]:
    """Calls of every shape ``fields`` distinguishes: each key present or absent, every outcome,
    error statuses, streams with and without their timings, costs and budget charges."""
    rng = random.Random(7)
    calls = []
    for i in range(400):
        pick = rng.random
        usage = Usage(
            **{
                name: rng.choice([None, 0, 1, 127, 128, 300, 2**40])
                for name in (
                    "input_tokens",
                    "output_tokens",
                    "total_tokens",
                    "cached_input_tokens",
                    "cache_creation_input_tokens",
                    "reasoning_tokens",
                )
            }
        )
        obs = Observation(
            operation=rng.choice(["chat", "embeddings", "o" * 130]),
            request_model=rng.choice([None, "", "gpt-4o", "m" * 129, f"model-{i}"]),
            response_model=rng.choice([None, "", "gpt-4o-2024", "r" * 200, "é€😀"]),
            streaming=pick() < 0.5,
            usage=usage,
            params={"max_tokens": 50} if pick() < 0.3 else {},
        )
        if pick() < 0.6:
            obs.finish_reasons.extend(rng.sample(["stop", "length", "", "STOP ", "weird"], 2))
        call = Call(
            obs=obs,
            provider=rng.choice(["openai", "anthropic", "p" * 150]),
            outcome=rng.choice(["", OK, "error", "client_abort"]),
            status=rng.choice([0, 200, 429, 500]),
            priced=pick() < 0.7,
            start=1.0,
            first_chunk=rng.choice([None, 1.5]),
            completed=rng.choice([None, 2.0]),
            end=rng.choice([None, 3.0]),
            end_user_header=rng.choice([None, "", "alice"]),
            session_id=rng.choice([None, "", "s-1"]),
            key_id=rng.choice([None, "", "k-1"]),
        )
        if obs.end_user is None and pick() < 0.3:
            obs.end_user = "bob"
        call.cost = rng.choice([None, Cost(0.5, 0.25, 0.25, "m", "catalogue"), UNKNOWN_MODEL])
        calls.append(call)
    return calls


def test_encoded_metadata_parses_like_protobuf_for_calls_of_every_shape():
    """``encoded`` reads the call directly, not through ``fields``: they must agree on every
    key and value, whatever is known of the call."""
    budgets = [None, *(metadata.Budget(BudgetsConfig(enabled=True, unit=unit)) for unit in ("total_tokens", "micro_usd"))]
    seen: set[str] = set()
    for i, call in enumerate(_varied_calls()):
        budget = budgets[i % len(budgets)]
        want = pb.ProcessingResponse()
        metadata.write(want.dynamic_metadata, "ns", call, budget)
        got = pb.ProcessingResponse.FromString(metadata.encoded("ns", call, budget))
        assert got == want, metadata.fields(call, budget)
        seen.update(metadata.fields(call, budget))
    assert seen == {  # every key fields() writes came up
        *("provider", "streaming", "operation", "outcome", "model", "provider_model", "finish_reason"),
        *("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "cache_creation_tokens", "reasoning_tokens"),
        *("cost_usd", "ratelimit_cost", "ttft_ms", "tpot_ms", "end_user", "session_id", "key_id"),
    }


def test_kept_entries_are_bounded():
    def forget() -> None:
        for kept in metadata._entries.values():
            kept.clear()
        metadata._kept = 0

    forget()
    try:
        for i in range(metadata._ENTRIES_KEPT + 100):
            metadata.encoded("ns", Call(obs=Observation(request_model=f"model-{i}"), session_id=f"session-{i}"))
        assert sum(map(len, metadata._entries.values())) == metadata._kept == metadata._ENTRIES_KEPT
        assert "session_id" not in metadata._entries  # unique per call: never kept
        got = pb.ProcessingResponse.FromString(metadata.encoded("ns", Call(obs=Observation(request_model="past-the-bound"))))
        assert got.dynamic_metadata.fields["ns"].struct_value.fields["model"].string_value == "past-the-bound"
    finally:
        forget()


def test_kept_heads_serve_other_calls_of_the_same_length_and_are_bounded():
    """What goes in front of the entries is kept per namespace and entries' length: a call whose
    entries have another call's length (other values) reuses it, one with other lengths or in
    another namespace gets its own, every length across the varint boundaries of the four levels
    (and past the bound, nothing kept) parses as protobuf builds it."""

    def forget() -> None:
        metadata._heads.clear()
        metadata._heads_kept = 0

    def check(namespace: str, call: Call) -> None:
        want = pb.ProcessingResponse()
        metadata.write(want.dynamic_metadata, namespace, call)
        assert pb.ProcessingResponse.FromString(metadata.encoded(namespace, call)) == want

    forget()
    try:
        check("ns", Call(obs=Observation(request_model="model-a")))
        kept = dict(metadata._heads["ns"])
        check("ns", Call(obs=Observation(request_model="model-b")))  # the same length: the kept head
        assert metadata._heads["ns"] == kept and metadata._heads_kept == 1
        for namespace in ("ns", "n" * 200):
            for size in range(1, 400):  # entries of 60-460 bytes: 1- and 2-byte lengths at every level
                check(namespace, Call(obs=Observation(request_model="m" * size)))
        assert set(metadata._heads) == {"ns", "n" * 200}
        assert metadata._heads_kept == sum(map(len, metadata._heads.values()))
        forget()
        metadata._heads_kept = metadata._HEADS_KEPT - 3  # 3 more kept, then none
        for size in range(1, 20):
            check("ns", Call(obs=Observation(request_model="m" * size)))
        assert len(metadata._heads["ns"]) == 3 and metadata._heads_kept == metadata._HEADS_KEPT
    finally:
        forget()


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
