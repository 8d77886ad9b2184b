"""Clients hanging up early, through the real Envoy, for every streaming API.

The upstream sends a provider stream one protocol unit per chunk, stops after the hang-up point
and holds; the client reads exactly those bytes and hangs up. The access log, ai_requests_total,
the token counters and the span must all say the same: client_abort with the tokens the provider
had reported by then before the end marker, ok (with the final usage) after it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.harness import Stack, scrape, total
from tests.support.otlp_receiver import GrpcReceiver
from tests.support.provider_cases import BY_NAME, HANG_UPS, HangUp, units

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def collector() -> Iterator[GrpcReceiver]:
    c = GrpcReceiver()
    yield c
    c.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, replay, collector) -> Iterator[Stack]:
    cfg = {"tracing": {"otlpEndpoint": collector.endpoint, "randomSampling": True, "scheduleDelayMs": 100}}
    with Stack(tmp_path_factory.mktemp("hangups"), replay.url, sidecar_config=cfg) as s:
        yield s


def _until(check, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while (result := check()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return result


@pytest.mark.parametrize("h", HANG_UPS, ids=[f"{h.case}-{h.point}" for h in HANG_UPS])
def test_hang_up_through_envoy(stack, replay, collector, h: HangUp):
    case = BY_NAME[h.case]
    body = case.load()
    n_units = len(units(body, case.content_type))
    sent = h.cut(body)
    want_bytes = sum(map(len, sent))
    rid, trace_id = secrets.token_hex(8), secrets.token_hex(16)
    headers = {
        "content-type": "application/json",
        "x-case": h.case,
        "x-request-id": rid,
        "x-gate": rid,
        "x-hold-after": str(len(sent)),
        "accept-encoding": "identity",
        "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
    }
    before = scrape(stack.metrics_port)
    got = b""
    with httpx.stream("POST", stack.url(case.path), content=case.request or b"{}", headers=headers, timeout=20) as r:
        assert r.status_code == 200
        if want_bytes:
            for chunk in r.iter_raw():
                got += chunk
                if len(got) >= want_bytes:
                    break
    # the client hung up; the upstream saw Envoy drop the connection while it held the rest
    assert got == b"".join(sent)
    assert replay.wait_disconnected(rid), "the upstream never saw the hang-up"
    assert len(sent) <= n_units

    prompt, completion, total_tokens = h.tokens
    entry = stack.log_entry(rid)
    assert entry["outcome"] == h.outcome
    assert (entry["prompt_tokens"], entry["completion_tokens"], entry["total_tokens"]) == h.tokens

    calls = total(before, "ai_requests_total") + 1
    after = _until(lambda: (lambda s: s if total(s, "ai_requests_total") >= calls else None)(scrape(stack.metrics_port)))
    assert after is not None and total(after, "ai_requests_total") == calls, "recorded once"
    delta = {k: total(after, f"ai_{k}_tokens_total") - total(before, f"ai_{k}_tokens_total") for k in ("prompt", "completion")}
    assert delta == {"prompt": prompt or 0, "completion": completion or 0}
    assert total(after, "ai_requests_total", outcome=h.outcome) - total(before, "ai_requests_total", outcome=h.outcome) == 1
    if h.outcome != "ok":
        assert total(after, "ai_requests_total", outcome=h.outcome, error_type=h.outcome) > 0

    span = _until(lambda: next((s for s in collector.spans if s.trace_id == trace_id), None))
    assert span is not None, "a span for the call"
    assert span.attributes.get("error.type") == (None if h.outcome == "ok" else h.outcome)
    assert (span.attributes.get("gen_ai.usage.input_tokens"), span.attributes.get("gen_ai.usage.output_tokens")) == (prompt, completion)
