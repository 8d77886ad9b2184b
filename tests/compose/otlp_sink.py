"""The `jaeger` service of docker-compose.yaml when no Jaeger image can be had (make test-compose).

An OTLP/gRPC trace receiver on :4317 (where the sidecar exports: OTEL_EXPORTER_OTLP_ENDPOINT
http://jaeger:4317) that keeps every span in memory, and on :16686 the two read endpoints of
Jaeger's HTTP query API the compose tests use, with the same JSON shape:
  GET /api/services                -> {"data": ["envoy-ai-extproc", ...]}
  GET /api/traces?service=NAME     -> {"data": [{"traceID", "spans": [{"operationName", "tags"}...],
                                                  "processes": {...}}]}
So the same test runs against a real Jaeger all-in-one. Standalone: needs only grpcio and
opentelemetry-proto (both in the sidecar's runtime image, which runs it).
"""

from __future__ import annotations

import json
import signal
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

_lock = threading.Lock()
_traces: dict[str, dict[str, Any]] = {}  # trace id -> Jaeger-style trace


def _tag(key: str, v: AnyValue) -> dict[str, Any]:
    kind = v.WhichOneof("value")
    if kind == "int_value":
        return {"key": key, "type": "int64", "value": v.int_value}
    if kind == "double_value":
        return {"key": key, "type": "float64", "value": v.double_value}
    if kind == "bool_value":
        return {"key": key, "type": "bool", "value": v.bool_value}
    if kind == "string_value":
        return {"key": key, "type": "string", "value": v.string_value}
    # arrays, maps, bytes: Jaeger shows them as JSON strings
    from google.protobuf.json_format import MessageToDict

    return {"key": key, "type": "string", "value": json.dumps(MessageToDict(v))}


def _add(req: trace_service_pb2.ExportTraceServiceRequest) -> None:
    with _lock:
        for rs in req.resource_spans:
            res = [_tag(kv.key, kv.value) for kv in rs.resource.attributes]
            service = next((t["value"] for t in res if t["key"] == "service.name"), "unknown_service")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    tid = s.trace_id.hex()
                    trace = _traces.setdefault(tid, {"traceID": tid, "spans": [], "processes": {}})
                    pid = next((p for p, v in trace["processes"].items() if v["serviceName"] == service), None)
                    if pid is None:
                        pid = f"p{len(trace['processes']) + 1}"
                        trace["processes"][pid] = {"serviceName": service, "tags": res}
                    refs = [{"refType": "CHILD_OF", "traceID": tid, "spanID": s.parent_span_id.hex()}] if s.parent_span_id else []
                    trace["spans"].append(
                        {
                            "traceID": tid,
                            "spanID": s.span_id.hex(),
                            "operationName": s.name,
                            "references": refs,
                            "startTime": s.start_time_unix_nano // 1000,
                            "duration": (s.end_time_unix_nano - s.start_time_unix_nano) // 1000,
                            "tags": [_tag(kv.key, kv.value) for kv in s.attributes],
                            "processID": pid,
                        }
                    )


class _Trace(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):  # noqa: N802
        _add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Query(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        q = parse_qs(url.query)
        with _lock:
            if url.path == "/api/services":
                body: Any = {"data": sorted({p["serviceName"] for t in _traces.values() for p in t["processes"].values()})}
            elif url.path == "/api/traces":
                service = q.get("service", [""])[0]
                body = {"data": [t for t in _traces.values() if any(p["serviceName"] == service for p in t["processes"].values())]}
            elif url.path == "/":
                body = {"data": "ok"}
            else:
                self.send_error(404)
                return
            out = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Trace(), server)
    server.add_insecure_port("0.0.0.0:4317")
    server.start()
    httpd = ThreadingHTTPServer(("0.0.0.0", 16686), _Query)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print("otlp sink: OTLP/gRPC on :4317, Jaeger query API subset on :16686", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    httpd.shutdown()
    server.stop(1)


if __name__ == "__main__":
    main()
