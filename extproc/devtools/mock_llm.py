"""A small OpenAI-compatible mock upstream, so `make run` works offline.

Usage is deterministic: prompt tokens = words in the request's messages/prompt/input, completion
tokens = words in the reply (``x-mock-words``, default 12). Streams send one word per chunk every
``x-mock-chunk-ms`` milliseconds (default 20) and honour ``stream_options.include_usage``.
``x-mock-status: 429`` (any status >= 400) answers chat/completions with an OpenAI-style error body.
Endpoints: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, the Azure
``/openai/deployments/{name}/...`` forms of the first three, and /healthz.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

WORDS = "the quick brown fox jumps over the lazy dog while the sidecar counts every token".split()


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    if isinstance(value, dict):
        return _words(value.get("content")) + _words(value.get("text"))
    return 0


def _reply_words(request: web.Request) -> list[str]:
    n = int(request.headers.get("x-mock-words", "12"))
    return [WORDS[i % len(WORDS)] for i in range(max(n, 1))]


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def _stream(request: web.Request, chunks: list[bytes]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await resp.prepare(request)
    delay = int(request.headers.get("x-mock-chunk-ms", "20")) / 1000
    for chunk in chunks:
        await resp.write(chunk)
        if delay:
            await asyncio.sleep(delay)
    await resp.write_eof()
    return resp


def _error(status: int) -> web.Response:
    kind = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_exceeded"}.get(status, "server_error")
    err = {"error": {"message": f"mock error {status}", "type": kind, "param": None, "code": kind}}
    return web.json_response(err, status=status)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    status = int(request.headers.get("x-mock-status", "200"))
    if status >= 400:
        return _error(status)
    model = body.get("model") or request.match_info.get("deployment") or "mock-model"
    legacy = request.path.endswith("/completions") and not request.path.endswith("/chat/completions")
    prompt = _words(body.get("prompt") if legacy else body.get("messages"))
    words = _reply_words(request)
    usage = {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": prompt + len(words)}
    rid, created = f"mock-{time.time_ns()}", int(time.time())
    kind = "text_completion" if legacy else "chat.completion"
    if not body.get("stream"):
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        if legacy:
            choice["text"] = " ".join(words)
        else:
            choice["message"] = {"role": "assistant", "content": " ".join(words)}
        return web.json_response(
            {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice], "usage": usage},
            dumps=lambda o: orjson.dumps(o).decode(),
        )
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    obj = kind if legacy else "chat.completion.chunk"
    chunks = []
    for i, w in enumerate(words):
        delta: dict[str, Any] = {"text": w + " "} if legacy else {"content": w + " "}
        if i == 0 and not legacy:
            delta["role"] = "assistant"
        choice = {"index": 0, "finish_reason": None, **({"text": delta["text"]} if legacy else {"delta": delta})}
        chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        chunks.append(_sse(chunk))
    last: dict[str, Any] = {"index": 0, "finish_reason": "stop", **({"text": ""} if legacy else {"delta": {}})}
    chunks.append(
        _sse(
            {"id": rid, "object": obj, "created": created, "model": model, "choices": [last], **({"usage": None} if include_usage else {})}
        )
    )
    if include_usage:
        chunks.append(_sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}))
    chunks.append(b"data: [DONE]\n\n")
    return await _stream(request, chunks)


async def embeddings(request: web.Request) -> web.Response:
    body = await request.json()
    model = body.get("model") or request.match_info.get("deployment") or "mock-embedding"
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    n = _words(items)
    data = [{"object": "embedding", "index": i, "embedding": [0.1, -0.2, 0.3]} for i in range(len(items))]
    return web.json_response({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": n, "total_tokens": n}})


async def responses(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    model = body.get("model") or "mock-model"
    prompt = _words(body.get("input"))
    words = _reply_words(request)
    usage = {
        "input_tokens": prompt,
        "output_tokens": len(words),
        "total_tokens": prompt + len(words),
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    rid = f"resp_mock{time.time_ns()}"
    text = " ".join(words)
    done = {
        "id": rid,
        "object": "response",
        "status": "completed",
        "model": model,
        "usage": usage,
        "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}],
    }
    if not body.get("stream"):
        return web.json_response(done)
    chunks = [
        b"event: response.created\n"
        + _sse({"type": "response.created", "response": {**done, "status": "in_progress", "usage": None, "output": []}})
    ]
    for w in words:
        chunks.append(b"event: response.output_text.delta\n" + _sse({"type": "response.output_text.delta", "delta": w + " "}))
    chunks.append(b"event: response.completed\n" + _sse({"type": "response.completed", "response": done}))
    return await _stream(request, chunks)


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def app() -> web.Application:
    a = web.Application()
    for prefix in ("/v1", "/openai/deployments/{deployment}"):
        a.router.add_post(prefix + "/chat/completions", chat)
        a.router.add_post(prefix + "/completions", chat)
        a.router.add_post(prefix + "/embeddings", embeddings)
    a.router.add_post("/v1/responses", responses)
    a.router.add_get("/healthz", healthz)
    return a


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="extproc mock-llm", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    web.run_app(app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
