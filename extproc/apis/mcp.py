"""MCP over Streamable HTTP: ``POST /mcp`` carrying one JSON-RPC 2.0 request.

The response is either ``application/json`` (the JSON-RPC response) or ``text/event-stream``
(server messages, then the response whose ``id`` matches the request). Recorded in
``Observation.extra``: ``mcp.method``, ``mcp.tool`` (``tools/call``), ``jsonrpc.id``,
``jsonrpc.error_code``; ``obs.error_type`` is the JSON-RPC error code, or ``tool_error`` when a
tool result says ``isError``. The operation is ``execute_tool`` for ``tools/call``, else the
method. With content capture, the tool arguments are kept (``mcp.arguments``).
"""

from __future__ import annotations

from typing import Any

from extproc.apis.base import ApiParser
from extproc.apis.routing import Provider, route

TOOLS_CALL = "tools/call"
EXECUTE_TOOL = "execute_tool"  # the GenAI operation of a tools/call

# The MCP spec's methods: the values a metric label may take for an MCP method (others: "other"),
# so a client sending junk methods cannot grow a label set.
KNOWN_METHODS = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/roots/list_changed",
        "sampling/createMessage",
        "elicitation/create",
        "roots/list",
    }
)
_OPERATIONS = KNOWN_METHODS | {EXECUTE_TOOL, "mcp"}  # "mcp": a request without a method


def method_label(method: str) -> str:
    """An MCP method as a metric label value: one of the spec's methods, else ``other``."""
    return method if method in KNOWN_METHODS else "other"


def operation_label(operation: str) -> str:
    """An MCP call's operation (``execute_tool``, else its method) as a metric label value: never
    a client's free string (``other`` for a method the spec does not define)."""
    return operation if operation in _OPERATIONS else "other"


class McpParser(ApiParser):
    priced = False
    operation = "mcp"
    api = "mcp"
    default_provider = "mcp"

    def on_request_json(self, obj: dict[str, Any]) -> None:
        method = obj.get("method")
        if not isinstance(method, str) or not method:
            self.obs.parse_error("jsonrpc_no_method")
            return
        x = self.obs.extra
        x["mcp.method"] = method[:128]
        rid = obj.get("id")
        if isinstance(rid, (str, int)) and not isinstance(rid, bool):
            x["jsonrpc.id"] = rid
            self.stream_markers = True  # a request expects its response: that ends an SSE answer
        self.obs.operation = EXECUTE_TOOL if method == TOOLS_CALL else method[:128]
        params = obj.get("params")
        if method == TOOLS_CALL and isinstance(params, dict):
            name = params.get("name")
            if isinstance(name, str) and name:
                x["mcp.tool"] = name[:128]
            if self.capture and "arguments" in params:
                x["mcp.arguments"] = params["arguments"]

    def on_response_json(self, obj: Any) -> None:
        self._message(obj)

    def want_sse_event(self, event: bytes, data: bytes) -> bool:
        return data.find(b'"result"') >= 0 or data.find(b'"error"') >= 0  # responses; not notifications/requests

    def on_sse_event(self, event: bytes, obj: Any) -> None:
        self._message(obj)

    def on_error_json(self, obj: Any) -> None:
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            self._message(obj)  # a JSON-RPC error body on an HTTP error status
        else:
            super().on_error_json(obj)

    def _message(self, obj: Any) -> None:
        if not isinstance(obj, dict) or ("result" not in obj and "error" not in obj):
            return
        x = self.obs.extra
        if "jsonrpc.id" in x and obj.get("id") != x["jsonrpc.id"]:
            return  # a response to some other request (the server's own requests' answers)
        self.mark_complete()  # the JSON-RPC response (a JSON-RPC error is an answer, not a failed stream)
        err = obj.get("error")
        if isinstance(err, dict):
            code = err.get("code")
            if isinstance(code, int) and not isinstance(code, bool):
                x["jsonrpc.error_code"] = code
                self.obs.error_type = str(code)
            else:
                self.obs.error_type = "jsonrpc_error"
            return
        result = obj.get("result")
        if isinstance(result, dict) and result.get("isError") is True:
            self.obs.error_type = "tool_error"


ORDER = 10  # POST /mcp: JSON-RPC (tool calls); no LLM provider of its own
PROVIDERS: tuple[Provider, ...] = ()
FINISH_REASONS: dict[str, str] = {}
ROUTES = [route(r"/mcp$", McpParser)]
