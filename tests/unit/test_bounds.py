"""Client- and upstream-chosen values are cut to 128 characters before they become a metric
label, a dynamic-metadata value or a span attribute (docs/security.md)."""

from __future__ import annotations

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from extproc.core import config
from extproc.core.bounded import MAX_LIST_ITEMS, MAX_VALUE_CHARS
from extproc.core.call import ERROR, Call
from extproc.core.cel import MAX_FIELD_CHARS, MAX_FLATTENED
from extproc.core.observation import Observation, Usage
from extproc.telemetry import metadata
from extproc.telemetry.metrics import MetricsObserver
from extproc.telemetry.tracing import Tracer

BIG = 100_000


def hostile_call() -> Call:
    obs = Observation(
        operation="chat",
        request_model="m" * BIG,
        response_model="r" * BIG,
        response_id="i" * BIG,
        usage=Usage(input_tokens=3, output_tokens=4),
        error_type="e" * BIG,
        finish_reasons=[f"reason-{i}-" + "f" * BIG for i in range(100)],
        params={"stop": ["s" * BIG] * 100, "service_tier": "t" * BIG},
    )
    return Call(
        obs=obs,
        provider="p" * BIG,
        api="openai.chat",
        method="POST",
        path="/v1/chat/completions/" + "q" * BIG,
        host="h" * BIG,
        headers={"x-big": "v" * BIG, **{f"x-h{i}": "v" for i in range(1000)}},
        status=500,
        outcome=ERROR,
        start=1.0,
        end=2.0,
        start_time_ns=1,
    )


def test_metadata_values_are_cut():
    f = metadata.fields(hostile_call())
    assert f["model"] == "m" * MAX_VALUE_CHARS and f["provider_model"] == "r" * MAX_VALUE_CHARS
    assert f["provider"] == "p" * MAX_VALUE_CHARS


def test_metric_labels_are_cut():
    reg = CollectorRegistry()
    MetricsObserver(config.Config().stats, reg).on_call_end(hostile_call())
    samples = [s for m in reg.collect() for s in m.samples]
    assert samples and all(len(v) <= MAX_VALUE_CHARS for s in samples for v in s.labels.values())
    assert any(s.labels.get("model") == "m" * MAX_VALUE_CHARS for s in samples)
    assert any(s.labels.get("error_type") == "e" * MAX_VALUE_CHARS for s in samples)


def test_span_attributes_and_cel_fields_are_cut():
    cfg = config.parse(
        {
            "tracing": {
                "otlpEndpoint": "127.0.0.1:1",
                "fields": {"add": {"path": "request.path", "hdrs": "flatten(request.headers)", "all": "request.headers"}},
            }
        }
    ).tracing
    exporter = InMemorySpanExporter()
    Tracer(cfg, processor=SimpleSpanProcessor(exporter)).on_call_end(hostile_call())
    (span,) = exporter.get_finished_spans()
    a = dict(span.attributes)
    assert a["gen_ai.request.model"] == "m" * MAX_VALUE_CHARS and a["gen_ai.response.id"] == "i" * MAX_VALUE_CHARS
    assert a["gen_ai.provider.name"] == "p" * MAX_VALUE_CHARS and a["error.type"] == "e" * MAX_VALUE_CHARS
    assert a["server.address"] == "h" * MAX_VALUE_CHARS and a["openai.request.service_tier"] == "t" * MAX_VALUE_CHARS
    assert len(a["gen_ai.response.finish_reasons"]) == MAX_LIST_ITEMS
    assert len(a["gen_ai.request.stop_sequences"]) == MAX_LIST_ITEMS
    assert len(span.name) <= 2 * MAX_VALUE_CHARS
    # the operator's CEL fields: strings cut to 1,024 characters, one flatten() to 64 attributes
    assert len(a["path"]) == MAX_FIELD_CHARS and len(a["all"]) == MAX_FIELD_CHARS
    assert len([k for k in a if k.startswith("hdrs.")]) == MAX_FLATTENED
    for key, value in a.items():
        items = value if isinstance(value, tuple) else (value,)
        limit = MAX_FIELD_CHARS if key in ("path", "all") or key.startswith("hdrs.") else MAX_VALUE_CHARS
        assert all(not isinstance(v, str) or len(v) <= limit for v in items), key
