"""In-test OTLP receivers (gRPC and HTTP/protobuf): trace receivers keep every span, metric receivers the latest points."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from extproc.devtools.dev import free_port
from tests.support.http_server import QuietHandler, serve_http


@dataclass
class SpanRecord:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_ns: int
    end_ns: int
    status_code: int
    status_message: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)  # transport headers the exporter sent


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _records(req: trace_service_pb2.ExportTraceServiceRequest, headers: dict[str, str]) -> list[SpanRecord]:
    out = []
    for rs in req.resource_spans:
        res = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    SpanRecord(
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        kind=s.kind,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        status_code=s.status.code,
                        status_message=s.status.message,
                        attributes={kv.key: _value(kv.value) for kv in s.attributes},
                        resource=res,
                        headers=headers,
                    )
                )
    return out


class _Store:
    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self.raw: list[bytes] = []  # every request body as received (to grep for leaked text)
        self._lock = threading.Lock()

    def add(self, body: bytes, headers: dict[str, str]) -> None:
        req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        with self._lock:
            self.raw.append(body)
            self.spans.extend(_records(req, headers))

    def wait_for(self, pred, timeout: float = 15.0) -> SpanRecord:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for s in self.spans:
                    if pred(s):
                        return s
            time.sleep(0.05)
        raise AssertionError(f"no matching span in {timeout}s; got {[s.name for s in self.spans]}")

    def wait_trace(self, trace_id: str, timeout: float = 15.0) -> SpanRecord:
        return self.wait_for(lambda s: s.trace_id == trace_id and s.attributes.get("gen_ai.operation.name") is not None, timeout)

    def all_bytes(self) -> bytes:
        with self._lock:
            return b"".join(self.raw)


class _Served:
    """An OTLP service on a free loopback port, served from threads (see :func:`_serve_grpc`,
    :func:`_serve_http`)."""

    port: int
    _stop: Any

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop()


def _serve_grpc(add_servicer: Any, servicer: Any) -> tuple[int, Any]:
    """(port, stop) of a gRPC server with one servicer (``add_<Service>Servicer_to_server``)."""
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    add_servicer(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return port, lambda: server.stop(0)


def _serve_http(path: str, accept: Any, reply: bytes) -> tuple[int, Any]:
    """(port, stop) of an OTLP/HTTP endpoint: a protobuf POST to ``path`` goes to
    ``accept(body, headers)`` and is answered ``reply``; any other path gets 404."""

    class Handler(QuietHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.path != path:
                self.respond(404)
                return
            accept(body, {k.lower(): v for k, v in self.headers.items()})
            self.respond(200, reply, "application/x-protobuf")

    return serve_http(Handler)


class GrpcReceiver(_Store, _Served):
    def __init__(self) -> None:
        super().__init__()
        store = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802
                md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
                store.add(request.SerializeToString(), md)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.port, self._stop = _serve_grpc(trace_service_pb2_grpc.add_TraceServiceServicer_to_server, Service())


class HttpReceiver(_Store, _Served):
    """POST {path} with application/x-protobuf, like Langfuse's /api/public/otel/v1/traces."""

    def __init__(self, path: str = "/api/public/otel/v1/traces") -> None:
        super().__init__()
        self.path = path
        self.port, self._stop = _serve_http(path, self.add, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())


# ---- metrics -------------------------------------------------------------------------------------
CUMULATIVE = 2  # AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


class MetricStore:
    """Keeps what OTLP metric exports say: for each (service.instance.id, metric, attributes) the
    latest cumulative value (a counter's value, a histogram's sum and count), deltas added up."""

    def __init__(self) -> None:
        self.points: dict[tuple[str, str, frozenset], dict[str, float]] = {}
        self.exports = 0
        self.raw: list[bytes] = []
        self._lock = threading.Lock()

    def add(self, body: bytes) -> None:
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

        req = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
        with self._lock:
            self.exports += 1
            self.raw.append(body)
            for rm in req.resource_metrics:
                res = {kv.key: _value(kv.value) for kv in rm.resource.attributes}
                instance = str(res.get("service.instance.id", ""))
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        data = getattr(m, kind)
                        for p in data.data_points:
                            attrs = frozenset((kv.key, _value(kv.value)) for kv in p.attributes)
                            if kind == "histogram":
                                value = {"sum": p.sum, "count": float(p.count)}
                            else:
                                value = {"value": p.as_double if p.WhichOneof("value") == "as_double" else float(p.as_int)}
                            key = (instance, m.name, attrs)
                            if getattr(data, "aggregation_temporality", CUMULATIVE) != CUMULATIVE and key in self.points:
                                old = self.points[key]
                                value = {k: old.get(k, 0.0) + v for k, v in value.items()}
                            self.points[key] = value

    def total(self, name: str, field: str = "value", **match: str) -> float:
        """The sum over instances and attribute sets of ``name`` whose attributes include ``match``."""
        with self._lock:
            return sum(
                v.get(field, 0.0)
                for (_, n, attrs), v in self.points.items()
                if n == name and all((k, w) in attrs for k, w in match.items())
            )

    def instances(self, name: str) -> set[str]:
        with self._lock:
            return {i for (i, n, _) in self.points if n == name}

    def attribute_sets(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(attrs) for (_, n, attrs) in self.points if n == name]


class MetricsGrpcReceiver(MetricStore, _Served):
    def __init__(self) -> None:
        super().__init__()
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

        store = self

        class Service(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):  # noqa: N802
                store.add(request.SerializeToString())
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self.port, self._stop = _serve_grpc(metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server, Service())


class MetricsHttpReceiver(MetricStore, _Served):
    """POST /v1/metrics with application/x-protobuf."""

    def __init__(self, path: str = "/v1/metrics") -> None:
        super().__init__()
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

        self.path = path
        self.port, self._stop = _serve_http(
            path, lambda body, _headers: self.add(body), metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"
