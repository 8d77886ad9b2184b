"""CPU of the servicer's own code, without gRPC, HTTP/2 or Envoy: the Processor per call and
per streamed chunk, and one metadata encoding, best of 9 rounds (process CPU time, so a busy
machine's preemption does not count).

    python -m bench.handler_cost                                   # this checkout
    python -m bench.handler_cost --checkout BASE --checkout .      # an A/B, alternated --reps times

The rows:

- *non-streamed call* / *streamed call, 50 chunks*: an OpenAI chat completion driven through the
  Processor as the server drives it (``open_stream``, each message, ``close_stream``), with the
  headers Envoy forwards for one: non-streamed (4 messages, 2 replies with metadata) and streamed
  (50 SSE chunks, then the usage and ``[DONE]``), in the default mode and in observability mode.
  Each message is dispatched as ``grpc_server._Exchange.one`` dispatches it: a message that is a
  response body and nothing else (a streamed chunk in the default mode) read from its bytes by
  ``wire.response_body_only`` and handled by ``Stream.handle_body_chunk``; any other (headers,
  bodies ending a stream, a stream's first message in observability mode) by ``Stream.handle``,
  its protobuf parse not counted; once a message got no reply on a stream in observability mode
  (``Stream.observe_only``), its later messages are dispatched as ``_Exchange.one_observed``
  dispatches them: a streamed chunk's (which carries ``observability_mode`` last) read from its
  bytes with the flag where the checkout's ``wire.response_body_only`` reads it (``observed``),
  else every message to ``Stream.handle`` untested. Every message
  carries the empty ``metadata_context`` Envoy adds when its ext_proc filter forwards metadata
  namespaces (the generated config forwards jwt_authn's), as Envoy's messages do.
- *metadata encoding*: one ``metadata.encoded`` of a call's fields.
- *message path*: what comes before the Processor, per message: a DATA frame taken from the
  stream's buffer and acknowledged on an h2 connection.
- *stream path*: a stream's HEADERS and Envoy's RST_STREAM through a server connection, the
  Processor opening and closing the stream, per stream (alone, and with 32 other streams open).
- *chunk path*: a streamed chunk's DATA frame through a server connection, its buffer, the
  Processor and its reply written, per chunk, on the workers' event loop (uvloop): the whole of
  the server's Python per chunk but the socket. Also in observability mode (every message
  carries ``observability_mode``; no reply).
- *report path*: a stream's start hooks (what ``Processor.open_stream`` calls) and its call's end
  (``Processor.report``) through the default observers (the call log and the Prometheus
  metrics), per call, a call object per report (as the server reports each call once): in one worker's registry, and in prometheus-client's
  multiprocess files, as ``extproc serve`` with several workers (the default: one per CPU) records.

``--checkout`` runs each measurement in a subprocess importing ``extproc`` from that directory.
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any

CHAT = (
    b'{"id":"c1","model":"gpt-4o-2024","choices":[{"finish_reason":"stop","message":{"content":"hi"}}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}'
)
# A text delta as OpenAI streams it with ``stream_options.include_usage`` (as ``bench.upstream``
# does): every chunk carries ``"usage":null``.
CHUNK = (
    b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,'
    b'"delta":{"content":"hello "},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
)
LAST = (
    b'data: {"id":"c","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":50,'
    b'"total_tokens":53}}\n\ndata: [DONE]\n\n'
)

# What Envoy adds to every ext_proc message when its filter forwards metadata namespaces and the
# request has none of them (serialised: ``42 00``)
ENVOY_CONTEXT: dict[str, Any] = {}

# Headers as Envoy forwards them for an OpenAI call (the request's, then the response's besides
# its status and content type).
REQUEST_HEADERS = {
    ":authority": "api.openai.com",
    ":path": "/v1/chat/completions",
    ":method": "POST",
    ":scheme": "https",
    "user-agent": "OpenAI/Python 1.54.0",
    "accept": "application/json",
    "content-type": "application/json",
    "content-length": "61",
    "authorization": "Bearer sk-proj-0123456789abcdef0123456789abcdef",
    "x-forwarded-proto": "https",
    "x-request-id": "6f1c1b52-3c1e-4d55-9b39-7d0f7f0e7c11",
}
RESPONSE_HEADERS = {
    "date": "Mon, 07 Dec 2026 08:00:00 GMT",
    "openai-processing-ms": "412",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-remaining-tokens": "29999000",
    "x-request-id": "req_0123456789abcdef",
    "x-envoy-upstream-service-time": "415",
}


class _NullTransport:
    """A server connection's transport that drops what it is given: the rows that drive a
    connection in process measure the server's Python, not the socket."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def _not_read(data: bytes, context: bool = False, observed: bool = False) -> bytes | None:
    return None


def _best(f, n: int) -> float:
    """Seconds per call of ``f``, best of 9 rounds of ``n``."""
    return min(timeit.repeat(f, number=n, repeat=9, timer=time.process_time)) / n


def measure() -> dict[str, float]:
    from extproc._pb.envoy_api import external_processor_pb2 as pb
    from extproc.core.call import OK, Call
    from extproc.core.config import parse
    from extproc.server.processor import Processor
    from extproc.telemetry import metadata

    def call_messages(streamed: bool, observe: bool) -> list:
        def headers(kind: str, **h: str):
            hm = pb.HttpHeaders()
            for k, v in h.items():
                hm.headers.headers.add(key=k, raw_value=v.encode())
            return pb.ProcessingRequest(**{kind: hm}, observability_mode=observe, metadata_context=ENVOY_CONTEXT)

        def body(kind: str, data: bytes, end: bool = False):
            body = pb.HttpBody(body=data, end_of_stream=end)
            return pb.ProcessingRequest(**{kind: body}, observability_mode=observe, metadata_context=ENVOY_CONTEXT)

        start = [
            headers("request_headers", **REQUEST_HEADERS),
            body("request_body", b'{"model":"gpt-4o","stream":%s,"messages":[]}' % (b"true" if streamed else b"false"), True),
            headers(
                "response_headers",
                **{":status": "200", "content-type": "text/event-stream" if streamed else "application/json"},
                **RESPONSE_HEADERS,
            ),
        ]
        if streamed:
            return start + [body("response_body", CHUNK) for _ in range(50)] + [body("response_body", LAST, True)]
        return start + [body("response_body", CHAT, True)]

    try:
        from extproc.server.wire import response_body_only
    except ImportError:  # a checkout from before streamed chunks were read from their bytes
        response_body_only = _not_read  # every message through ``handle``
    # a checkout whose server reads a chunk after Envoy's metadata context (``_Exchange.one``)
    with_context = "context" in inspect.signature(response_body_only).parameters
    # a checkout whose server reads a chunk in observability mode (``_Exchange.one_observed``)
    with_observed = "observed" in inspect.signature(response_body_only).parameters

    p = Processor(parse({}), [])

    def drive(messages: list) -> None:
        """A call's messages, each dispatched as ``grpc_server._Exchange.one`` does
        (``messages``: each message and its bytes)."""
        s = p.open_stream({})
        handle, body_only = s.handle, response_body_only
        handle_chunk: Any = getattr(s, "handle_body_chunk", None)  # called only where body_only read a body
        picks = hasattr(type(s), "observe_only")  # absent from older checkouts: every message tested
        test = True
        for m, data in messages:
            if not test:
                body = body_only(data, s.call.forwarded is not None, True) if with_observed else None
            elif with_context:
                body = body_only(data, s.call.forwarded is not None)
            else:
                body = body_only(data)
            if body is not None:
                handle_chunk(body)
            elif handle(m) is None and picks and s.observe_only:
                test = False
        p.close_stream(s)

    def with_bytes(messages: list) -> list:
        return [(m, m.SerializeToString()) for m in messages]

    out = {}
    for observe in (False, True):
        mode = "observability mode" if observe else "default mode"
        out[f"{mode}: non-streamed call (us)"] = 1e6 * _best(lambda m=with_bytes(call_messages(False, observe)): drive(m), 2000)
        out[f"{mode}: streamed call, 50 chunks (us)"] = 1e6 * _best(lambda m=with_bytes(call_messages(True, observe)): drive(m), 200)
    c = Call(provider="openai", api="openai.chat", status=200, outcome=OK)
    c.obs.request_model, c.obs.response_model, c.obs.operation = "gpt-4o", "gpt-4o-2024-08-06", "chat"
    c.obs.usage.input_tokens, c.obs.usage.output_tokens, c.obs.usage.cached_input_tokens = 1234, 567, 100
    c.obs.finish_reasons.append("stop")
    fields = len(metadata.fields(c))
    out[f"metadata encoding, {fields} fields (us)"] = 1e6 * _best(lambda: metadata.encoded("ai.gateway.kgateway.dev", c), 20000)
    out["message path: a streamed chunk's DATA frame taken and acknowledged (us)"] = 1e6 * _best(_message_path(), 1000)
    out["stream path: an ext_proc stream opened by its HEADERS and closed by Envoy's RST_STREAM (us)"] = 1e6 * _stream_path()
    out["stream path, 32 other streams open on the connection (us)"] = 1e6 * _stream_path(32)
    out["chunk path: a streamed chunk's DATA frame through a server connection to its reply (us)"] = 1e6 * _chunk_path()
    out["chunk path, observability mode (no reply) (us)"] = 1e6 * _chunk_path(observe=True)
    out["report path: a stream's start and end, default observers (Prometheus), one worker (us)"] = _report_path(multiprocess=False)
    out["report path, several workers (Prometheus multiprocess files) (us)"] = _report_path(multiprocess=True)
    return out


# The report path runs in a process of its own: multiprocess mode is process-wide, and the
# observers register their metrics in the process's registry once.
REPORT = r"""
import copy, sys, time, timeit
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "1":
    from extproc.telemetry.prometheus_endpoint import MultiprocDir
    files = MultiprocDir()  # as ``extproc serve --workers N`` (N > 1) sets it up before the fork
from extproc.core.call import OK, Call
from extproc.core.config import parse
from extproc.server.processor import Processor
from extproc.telemetry import observers

p = Processor(parse({}), observers.observers(parse({})))
c = Call(provider="openai", api="openai.chat", status=200, outcome=OK, start=0.0, response_start=0.2, first_chunk=0.21, end=0.25)
c.obs.operation, c.obs.request_model, c.obs.response_model = "chat", "gpt-4o", "gpt-4o-2024-08-06"
c.obs.usage.input_tokens, c.obs.usage.output_tokens, c.obs.usage.total_tokens = 1234, 567, 1801
c.obs.finish_reasons.append("stop")
p.settings.pricer.warm()
c.cost = p.settings.pricer.price("openai", "gpt-4o", "gpt-4o-2024-08-06", c.obs.usage)
report = p.report
starts = [o.on_stream_start for o in p.observers if hasattr(o, "on_stream_start")]
# a call object per report, as the server reports each call once: the observers may keep what
# they measured of the last call they were given (the Measurer does, for its next backend)
calls = [copy.copy(c) for _ in range(5000)]


def batch() -> None:
    for call in calls:
        for start in starts:  # what ``Processor.open_stream`` calls
            start()
        report(call)


print(1e6 * min(timeit.repeat(batch, number=1, repeat=9, timer=time.process_time)) / len(calls))
if sys.argv[2] == "1":
    files.close()
"""


def _report_path(multiprocess: bool) -> float:
    """The observers' stream-start hooks and ``Processor.report`` of an OpenAI call, with the
    default observers (the call log and the Prometheus metrics, ``stats.port`` on), per call: in one process's registry, or (``extproc
    serve`` with several workers) in prometheus-client's multiprocess files."""
    import extproc

    checkout = str(Path(extproc.__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", REPORT, checkout, "1" if multiprocess else "0"], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def _message_path():
    """What the server does for each message before ``Stream.handle``: the stream's
    ``MessageBuffer`` takes a DATA frame holding one whole message and acknowledges it on a live
    h2 connection (grpclib's ``Connection``)."""
    import functools
    import types

    from grpclib.config import Configuration
    from grpclib.protocol import Connection
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    from extproc._pb.envoy_api import external_processor_pb2 as pb
    from extproc.server import h2compat
    from extproc.server.message_buffer import MessageBuffer

    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", "/x"), (":authority", "x")])
    server = H2Connection(H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    transport = types.SimpleNamespace(write=lambda data: None)
    connection = Connection(server, transport, config=Configuration())  # type: ignore[arg-type]
    stream = types.SimpleNamespace(connection=connection, id=1)
    acknowledger = getattr(h2compat, "acknowledger", None)  # absent from older checkouts
    ack = acknowledger(stream) if acknowledger is not None else functools.partial(connection.ack, 1)
    buf = MessageBuffer(ack, lambda: 4 << 20)
    buf.inline = lambda message: True
    buf.handover = lambda: None
    message = pb.ProcessingRequest(response_body=pb.HttpBody(body=CHUNK)).SerializeToString()
    frame = b"\0" + len(message).to_bytes(4, "big") + message
    add = buf.add
    size = len(frame)
    return lambda: add(frame, size)


def _stream_path(others: int = 0) -> float:
    """Seconds per stream, best of 9 rounds, of what the server does for an ext_proc stream
    besides its messages: a read with the stream's HEADERS (Envoy's header block, the same for
    every stream after a connection's first) and a read with Envoy's RST_STREAM, fed to a
    server connection (``_Protocol.data_received``, its writes dropped) with the Processor
    opening and closing the stream (no observers). ``others``: that many streams are open on
    the connection meanwhile (each stream is reset once ``others`` later ones opened), as Envoy
    keeps its concurrent calls' streams on a few connections."""
    import asyncio

    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.errors import ErrorCodes

    from extproc.core.config import parse
    from extproc.server.grpc_server import PROCESS, build_server
    from extproc.server.processor import Processor

    n, rounds = 2000, 9
    client = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    headers = [(":method", "POST"), (":scheme", "http"), (":path", PROCESS), (":authority", "ext_proc")]
    headers += [("content-type", "application/grpc"), ("te", "trailers"), ("x-envoy-internal", "true")]

    opened: list[int] = []

    def stream() -> tuple[bytes, bytes]:
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, headers)
        opened.append(sid)
        opening = client.data_to_send()
        if len(opened) > others:
            client.reset_stream(opened.pop(0), ErrorCodes.CANCEL)
        return opening, client.data_to_send()

    preface = client.data_to_send()
    first = [stream() for _ in range(others + 1)]
    reads = [stream() for _ in range(n * rounds)]

    async def run() -> float:
        server = build_server(Processor(parse({}), []), "127.0.0.1:1")
        proto = server._protocol_factory()
        proto.connection_made(_NullTransport())  # type: ignore[arg-type]
        proto.data_received(preface)
        for opening, reset in first:
            proto.data_received(opening)
            if reset:
                proto.data_received(reset)
        received = proto.data_received
        best = float("inf")
        for r in range(rounds):
            batch = reads[r * n : (r + 1) * n]
            t0 = time.process_time()
            for opening, reset in batch:
                received(opening)
                received(reset)
            best = min(best, time.process_time() - t0)
        assert len(server.exchanges) == others, "a stream was not closed"
        return best / n

    return asyncio.run(run())


def _chunk_path(observe: bool = False) -> float:
    """Seconds per chunk, best of 9 rounds, of what the server does for a streamed chunk: a read
    holding the DATA frame of one ``response_body`` message (an OpenAI text delta) on a stream
    handled without a task, fed to a server connection (``_Protocol.data_received``, its writes
    dropped), through the stream's buffer, the Processor and the reply written: everything per
    chunk but the socket and the event loop. The client's windows are opened wide, so no reply
    waits for one. ``observe``: every message carries ``observability_mode`` (no reply)."""
    import asyncio
    import struct

    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.settings import SettingCodes

    from extproc._pb.envoy_api import external_processor_pb2 as pb
    from extproc.core.config import parse
    from extproc.server.grpc_server import PROCESS, build_server
    from extproc.server.processor import Processor

    n, rounds = 2000, 9
    wide = 2**31 - 1
    client = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: wide})
    client.increment_flow_control_window(wide - 65535)
    headers = [(":method", "POST"), (":scheme", "http"), (":path", PROCESS), (":authority", "ext_proc")]
    headers += [("content-type", "application/grpc"), ("te", "trailers")]
    client.send_headers(1, headers)

    def message(**kw: object) -> bytes:
        data = pb.ProcessingRequest(**kw, metadata_context=ENVOY_CONTEXT, observability_mode=observe).SerializeToString()  # type: ignore[arg-type]
        return b"\0" + len(data).to_bytes(4, "big") + data

    def header_map(**h: str) -> object:
        hm = pb.HttpHeaders()
        for k, v in h.items():
            hm.headers.headers.add(key=k, raw_value=v.encode())
        return hm

    for m in (
        message(request_headers=header_map(**REQUEST_HEADERS)),
        message(request_body=pb.HttpBody(body=b'{"model":"gpt-4o","stream":true,"messages":[]}', end_of_stream=True)),
        message(response_headers=header_map(**{":status": "200", "content-type": "text/event-stream"}, **RESPONSE_HEADERS)),
    ):
        client.send_data(1, m)
    opening = client.data_to_send()
    chunk = message(response_body=pb.HttpBody(body=CHUNK))
    frame = struct.pack(">HBBBL", len(chunk) >> 8, len(chunk) & 0xFF, 0, 0, 1) + chunk  # DATA, no flags, stream 1

    async def run() -> float:
        server = build_server(Processor(parse({}), []), "127.0.0.1:1")
        proto = server._protocol_factory()
        proto.connection_made(_NullTransport())  # type: ignore[arg-type]
        proto.data_received(opening)
        (exchange,) = server.exchanges.values()
        received = proto.data_received
        best = float("inf")
        for _ in range(rounds):
            t0 = time.process_time()
            for _ in range(n):
                received(frame)
            await asyncio.sleep(0)  # what the reads scheduled runs (a flush each, if any)
            best = min(best, time.process_time() - t0)
        assert not exchange.tasked and not exchange.done, "the stream left the path measured"
        return best / n

    try:
        import uvloop  # the workers' default event loop
    except ImportError:
        return asyncio.run(run())
    return uvloop.run(run())  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench.handler_cost")
    ap.add_argument("--checkout", action="append", metavar="DIR", help="import extproc from this checkout (repeat for an A/B)")
    ap.add_argument("--reps", type=int, default=3, help="with --checkout: rounds, each measuring every checkout in turn")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        sys.path.insert(0, a.child)
        for k, v in measure().items():
            print(f"{k}\t{v:.2f}")
        return
    if not a.checkout:
        for k, v in measure().items():
            print(f"{k}: {v:.1f}")
        return
    results: dict[str, dict[str, list[float]]] = {c: {} for c in a.checkout}
    for _ in range(a.reps):
        for c in a.checkout:
            here = str(Path(__file__).resolve().parent.parent)
            out = subprocess.run(
                [sys.executable, "-m", "bench.handler_cost", "--child", str(Path(c).resolve())],
                cwd=here,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            for line in out.splitlines():
                k, value = line.split("\t")
                results[c].setdefault(k, []).append(float(value))
    for k in results[a.checkout[0]]:
        print(k)
        for c in a.checkout:
            print(f"  {c}: " + ", ".join(f"{v:.1f}" for v in results[c].get(k, [])))


if __name__ == "__main__":
    main()
