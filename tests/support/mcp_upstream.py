"""A tiny MCP server (Streamable HTTP) for tests: answers tools/call in JSON, or in SSE when the
request carries ``x-sse: 1``. Tool ``boom`` is a JSON-RPC error (-32602), ``flaky`` an isError result."""

from __future__ import annotations

import json

from extproc.devtools.dev import free_port
from tests.support.http_server import QuietHandler, serve_http


class McpUpstream:
    def __init__(self) -> None:
        self.port = free_port()

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                req = json.loads(self._body())
                rid, method, params = req.get("id"), req.get("method"), req.get("params") or {}
                if rid is None:  # a notification: 202, no body
                    self.respond(202)
                    return
                if method == "tools/call" and params.get("name") == "boom":
                    msg = {"jsonrpc": "2.0", "id": rid, "error": {"code": -32602, "message": "unknown tool"}}
                elif method == "tools/call":
                    text = json.dumps(params.get("arguments"))
                    msg = {
                        "jsonrpc": "2.0",
                        "id": rid,
                        "result": {"content": [{"type": "text", "text": text}], "isError": params.get("name") == "flaky"},
                    }
                else:
                    msg = {"jsonrpc": "2.0", "id": rid, "result": {"tools": []}}
                if self.headers.get("x-sse") == "1":
                    note = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
                    body = f"event: message\ndata: {json.dumps(note)}\n\nevent: message\ndata: {json.dumps(msg)}\n\n".encode()
                    ctype = "text/event-stream"
                else:
                    body, ctype = json.dumps(msg).encode(), "application/json"
                self.respond(200, body, ctype, (("mcp-session-id", "sess-1"),))

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("content-length", "0")))
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size + 2)[:size]
                    if size == 0:
                        return out
                    out += chunk

        _, self._stop = serve_http(Handler, self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop()
