"""A threaded HTTP server on a free loopback port, for in-test upstreams and collectors."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from extproc.devtools.dev import free_port


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing and answers in one call (``respond``)."""

    def respond(self, status: int, body: bytes = b"", content_type: str | None = None, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("content-type", content_type)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def serve_http(handler: type[BaseHTTPRequestHandler], port: int | None = None) -> tuple[int, Callable[[], None]]:
    """(port, stop) of a threaded HTTP server on 127.0.0.1 running ``handler``."""
    port = port or free_port()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()

    return port, stop
