"""ttft_ms / tpot_ms in the metadata: set for streams only, and equal to the values the
histograms record."""

from __future__ import annotations

import time

from google.protobuf.json_format import MessageToDict
from prometheus_client import CollectorRegistry

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.core import config
from extproc.server.processor import Processor
from extproc.telemetry.metrics import MetricsObserver
from tests.support.stream_driver import drive
from tests.unit.test_processor import NS, Recorder, body, headers, req_headers

CHUNK = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"w "},"finish_reason":null}],"usage":null}\n\n'
LAST = (
    b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"c","model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}\n\n'
    b"data: [DONE]\n\n"
)


def spaced(processor: Processor, messages: list[tuple[float, pb.ProcessingRequest]]) -> list[dict]:
    """The metadata of the replies to ``messages``, each sent ``delay`` seconds after the last."""

    def requests():
        for delay, m in messages:
            time.sleep(delay)
            yield m

    return [MessageToDict(pb.ProcessingResponse.FromString(r).dynamic_metadata).get(NS, {}) for r in drive(processor, requests())]


def stream_call(stream: bool = True):
    registry = CollectorRegistry()
    metrics = MetricsObserver(config.StatsConfig(), registry)
    rec = Recorder()
    p = Processor(config.parse({}), [metrics, rec])
    ctype = "text/event-stream" if stream else "application/json"
    resp = [body("response_body", CHUNK)] + [body("response_body", CHUNK) for _ in range(4)] + [body("response_body", LAST)]
    if not stream:
        resp = [
            body(
                "response_body",
                b'{"id":"c","model":"m","choices":[{"finish_reason":"stop","message":{"content":"a"}}],'
                b'"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}',
                end=True,
            )
        ]
    out = spaced(
        p,
        [
            (0, req_headers()),
            (0, body("request_body", b'{"model":"m","stream":%s}' % (b"true" if stream else b"false"), end=True)),
            (0, headers("response_headers", **{":status": "200", "content-type": ctype})),
        ]
        + [(0.03, m) for m in resp],
    )
    return out[-1], rec.calls[0], registry


def test_stream_metadata_has_ttft_and_tpot_equal_to_the_histograms():
    m, call, registry = stream_call()
    labels = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "openai",
        "gen_ai_request_model": "m",
        "gen_ai_response_model": "m",
        "error_type": "",
    }
    ttft = registry.get_sample_value("gen_ai_server_time_to_first_token_seconds_sum", labels)
    tpot = registry.get_sample_value("gen_ai_server_time_per_output_token_seconds_sum", labels)
    assert ttft is not None and tpot is not None
    assert m["ttft_ms"] == round(ttft * 1000, 3) and m["ttft_ms"] >= 25  # the first chunk comes 30 ms after the request
    assert m["tpot_ms"] == round(tpot * 1000, 3)
    # 5 output tokens over the 5 chunks after the first (about 150 ms): about 37 ms per token after the first
    assert 25 <= m["tpot_ms"] <= 400
    assert m["outcome"] == "ok" and m["finish_reason"] == "stop"


def test_non_streamed_calls_have_no_stream_timings():
    m, _, _ = stream_call(stream=False)
    assert "ttft_ms" not in m and "tpot_ms" not in m and m["outcome"] == "ok"
