"""The benchmark's non-streaming upstream (``bench.upstream.direct_response_envoy``) behaves as an
LLM API does for connection reuse: it answers once the whole request has arrived, on a connection
that stays open, so the Envoy in front reuses its upstream connections instead of paying a connect
per call (which would inflate the Envoy-alone baseline every ratio is taken against)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from bench.upstream import CHAT_REQUEST, direct_response_envoy
from extproc.devtools.dev import envoy_command, free_port, wait_port

pytestmark = pytest.mark.integration


def _response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response (headers and its content-length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the upstream closed the connection: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the upstream closed the connection mid-body"
        body += chunk
    return head


def test_direct_response_upstream_answers_after_the_request_body_and_keeps_the_connection(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "up.yaml").write_text(direct_response_envoy(port))
    proc = subprocess.Popen(envoy_command(tmp_path / "up.yaml", "--concurrency", "1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
        length = b"content-length: %d\r\n\r\n" % len(CHAT_REQUEST)
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: up\r\ncontent-type: application/json\r\n" + length
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            for _ in range(2):  # the second request on the same connection
                s.sendall(head)  # the headers alone, as a proxy forwards them before the body
                s.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    s.recv(1)  # no answer before the body: a response ahead of its request ends the connection
                s.settimeout(5)
                s.sendall(CHAT_REQUEST)
                response = _response(s)
                assert response.startswith(b"HTTP/1.1 200"), response
                assert b"connection: close" not in response.lower(), response
    finally:
        proc.terminate()
        proc.wait(10)
