"""MCP over Streamable HTTP through Envoy: a span per JSON-RPC request and mcp_requests_total."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import httpx
import pytest

from extproc.core import config
from extproc.telemetry import observers as app
from extproc.telemetry.mcp import MCP_REQUESTS
from tests.e2e.test_tracing import CLIENT, STATUS_ERROR, traceparent
from tests.support.harness import Stack
from tests.support.inproc_sidecar import InProcessSidecar
from tests.support.mcp_upstream import McpUpstream
from tests.support.otlp_receiver import GrpcReceiver

pytestmark = pytest.mark.integration
_ids = itertools.count(100)


@pytest.fixture(scope="module")
def receiver() -> Iterator[GrpcReceiver]:
    r = GrpcReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, receiver) -> Iterator[Stack]:
    up = McpUpstream()
    s = Stack(tmp_path_factory.mktemp("mcp"), up.url, start_sidecar=False)
    cfg = config.parse({"listen": f"127.0.0.1:{s.sidecar_port}", "tracing": {"otlpEndpoint": receiver.endpoint, "scheduleDelayMs": 50}})
    sidecar = InProcessSidecar(cfg, app.observers(cfg))
    try:
        with s:
            yield s
    finally:
        sidecar.close()
        up.close()


def count(method: str, tool: str, status: str) -> float:
    return MCP_REQUESTS.labels(method, tool, status)._value.get()


def rpc(stack: Stack, method: str, params: dict | None = None, sse: bool = False) -> tuple[httpx.Response, str, str, int]:
    tp, trace_id, span_id = traceparent()
    rid = next(_ids)
    h = {
        "traceparent": tp,
        "mcp-session-id": "sess-1",
        "mcp-protocol-version": "2025-06-18",
        "accept": "application/json, text/event-stream",
        "authorization": "Bearer mcp-secret-token",
    }
    if sse:
        h["x-sse"] = "1"
    r = httpx.post(stack.url("/mcp"), json={"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}}, headers=h, timeout=10)
    return r, trace_id, span_id, rid


@pytest.mark.parametrize("sse", [False, True], ids=["json", "sse"])
def test_tools_call_span(stack, receiver, sse):
    before = count("tools/call", "get_weather", "ok")
    r, trace_id, span_id, rid = rpc(stack, "tools/call", {"name": "get_weather", "arguments": {"city": "Oslo"}}, sse=sse)
    assert r.status_code == 200
    span = receiver.wait_trace(trace_id)
    assert span.name == "tools/call get_weather"
    assert span.kind == CLIENT and span.parent_span_id == span_id
    a = span.attributes
    assert a["gen_ai.operation.name"] == "execute_tool"
    assert a["mcp.method.name"] == "tools/call"
    assert a["gen_ai.tool.name"] == "get_weather"
    assert a["mcp.session.id"] == "sess-1"
    assert a["jsonrpc.request.id"] == str(rid)
    assert "error.type" not in a and span.status_code != STATUS_ERROR
    assert "gen_ai.tool.call.arguments" not in a  # content capture is off
    assert count("tools/call", "get_weather", "ok") == before + 1
    assert b"mcp-secret-token" not in receiver.all_bytes()


@pytest.mark.parametrize("sse", [False, True], ids=["json", "sse"])
def test_jsonrpc_error_span(stack, receiver, sse):
    before = count("tools/call", "boom", "error")
    r, trace_id, _, _ = rpc(stack, "tools/call", {"name": "boom"}, sse=sse)
    assert r.status_code == 200
    span = receiver.wait_trace(trace_id)
    assert span.attributes["error.type"] == "-32602"
    assert span.attributes["rpc.jsonrpc.error_code"] == -32602
    assert span.status_code == STATUS_ERROR
    assert count("tools/call", "boom", "error") == before + 1


def test_tool_error_result(stack, receiver):
    before = count("tools/call", "flaky", "tool_error")
    _, trace_id, _, _ = rpc(stack, "tools/call", {"name": "flaky"})
    span = receiver.wait_trace(trace_id)
    assert span.attributes["error.type"] == "tool_error"
    assert count("tools/call", "flaky", "tool_error") == before + 1


def test_other_methods(stack, receiver):
    before = count("tools/list", "", "ok")
    _, trace_id, _, _ = rpc(stack, "tools/list")
    span = receiver.wait_trace(trace_id)
    assert span.name == "tools/list"
    assert span.attributes["gen_ai.operation.name"] == "tools/list"
    assert "gen_ai.tool.name" not in span.attributes
    assert count("tools/list", "", "ok") == before + 1
    before_other = count("other", "", "ok")
    rpc(stack, "vendor/custom-method")
    receiver.wait_for(lambda s: s.attributes.get("mcp.method.name") == "vendor/custom-method")
    assert count("other", "", "ok") == before_other + 1  # unknown methods do not grow the label set
