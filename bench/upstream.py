"""Fast local upstreams for the benchmark.

- Non-streaming: a second Envoy answering every request with ``direct_response`` (a fixed OpenAI
  chat completion with usage) once the request's body is in, on a connection it keeps open, as an
  LLM API does (``envoy_config.direct_response``). Python cannot serve 30k req/s; Envoy can, so the
  upstream is never the bottleneck of the Envoy-alone baseline.
- Streaming: ``python -m bench.upstream --port P``, a raw asyncio server answering any POST with an
  OpenAI chat-completion SSE stream of ``x-chunks`` events (default 50), one every
  ``x-chunk-interval-ms`` (default 1). Each event's content carries the upstream's
  CLOCK_MONOTONIC send time in ns (``"t<ns>"``) so the client measures each chunk's transit time
  through the proxy exactly (same host, same clock).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import cast

import orjson

MODEL = "gpt-4o-mini"
PROVIDER_MODEL = "gpt-4o-mini-2024-07-18"
PROMPT_TOKENS = 9  # every response's usage.prompt_tokens

CHAT_RESPONSE = orjson.dumps(
    {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion",
        "created": 1730000000,
        "model": PROVIDER_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today? " * 4, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": 36,
            "total_tokens": PROMPT_TOKENS + 36,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
        "service_tier": "default",
        "system_fingerprint": "fp_bench",
    }
).decode()

CHAT_REQUEST = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}]})
STREAM_REQUEST = orjson.dumps(
    {
        "model": MODEL,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Say hello."}],
    }
)


def direct_response_envoy(listen_port: int, admin_port: int | None = None) -> str:
    """Bootstrap (YAML) of the non-streaming upstream Envoy."""
    from extproc.devtools import envoy_config

    admin = f"127.0.0.1:{admin_port}" if admin_port else None
    return envoy_config.dump(envoy_config.direct_response(f"127.0.0.1:{listen_port}", CHAT_RESPONSE, admin=admin))


def _event(i: int, n: int, t_ns: int) -> bytes:
    head = b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1730000000,"model":"' + PROVIDER_MODEL.encode() + b'",'
    if i < n - 1:
        delta = b'{"role":"assistant","content":"' if i == 0 else b'{"content":"'
        body = (
            head
            + b'"choices":[{"index":0,"delta":'
            + delta
            + b"t"
            + str(t_ns).encode()
            + b' "},"logprobs":null,"finish_reason":null}],"usage":null}'
        )
    else:  # the last event: finish reason and usage (include_usage)
        body = (
            head + b'"choices":[{"index":0,"delta":{"content":"t' + str(t_ns).encode() + b' "},"logprobs":null,"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":'
            + str(PROMPT_TOKENS).encode()
            + b',"completion_tokens":'
            + str(n).encode()
            + b',"total_tokens":'
            + str(PROMPT_TOKENS + n).encode()
            + b"}}"
        )
    return b"data: " + body + b"\n\n"


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _chunked_end(buf: bytes, pos: int) -> int:
    """Where a chunked body starting at ``pos`` ends (after its last chunk and trailers); -1 if
    ``buf`` does not hold all of it yet."""
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return -1
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            trailers_end = buf.find(b"\r\n\r\n", eol)  # the empty line after optional trailers
            if buf.startswith(b"\r\n", eol + 2):
                return eol + 4
            return -1 if trailers_end < 0 else trailers_end + 4
        pos = eol + 2 + size + 2
        if pos > len(buf):
            return -1


class SSEServer(asyncio.Protocol):
    t: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)  # a TCP server's: asyncio's or uvloop's
        self.buf = b""
        self.busy = False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.busy:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].decode("latin-1").lower()
        length = 0
        chunked = False
        chunks, interval = 50, 1.0
        for line in head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            v = v.strip()
            if k == "content-length":
                length = int(v)
            elif k == "transfer-encoding":
                chunked = "chunked" in v
            elif k == "x-chunks":
                chunks = max(1, int(v))
            elif k == "x-chunk-interval-ms":
                interval = float(v)
        # Read the whole request before answering: Envoy forwards a body it buffered for ext_proc
        # chunked (BUFFERED_PARTIAL drops content-length). Answering early would leave the body
        # to be read as a second request, answered with an unsolicited response.
        body_end = _chunked_end(self.buf, end + 4) if chunked else end + 4 + length
        if body_end < 0 or len(self.buf) < body_end:
            return
        self.buf = self.buf[body_end:]
        self.busy = True
        asyncio.ensure_future(self.stream(chunks, interval / 1000))

    async def stream(self, n: int, interval: float) -> None:
        try:
            await self._stream(n, interval)
        except RuntimeError:  # the client (Envoy) hung up mid-stream
            pass

    async def _stream(self, n: int, interval: float) -> None:
        t = self.t
        t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n")
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(n):
            if t.is_closing():
                return
            if i:
                delay = start + i * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            t.write(_chunk(_event(i, n, time.monotonic_ns())))
        t.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.busy = False
        if self.buf:
            self.data_received(b"")


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SSEServer, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args.port))
    else:
        uvloop.run(_serve(args.port))


if __name__ == "__main__":
    main()
