"""Run by tests/unit/test_stream_limits.py in its own process: a worker's gRPC server (grpclib)
and its memory trimmer, 3 rounds of 16 streams each holding a 4 MiB response body; prints the
process RSS (MiB) before and after each round as JSON."""

from __future__ import annotations

import asyncio
import gc
import json
import sys

import grpc

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.core.config import parse
from extproc.devtools.dev import free_port
from extproc.server.grpc_server import build_server
from extproc.server.memory import trim_loop
from extproc.server.processor import Processor
from tests.unit.test_processor import body, headers, req_headers

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


def rss_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


async def one(ch: grpc.aio.Channel, nbytes: int) -> None:
    call = ch.stream_stream(
        METHOD, request_serializer=lambda m: m.SerializeToString(), response_deserializer=pb.ProcessingResponse.FromString
    )()
    for m in (req_headers(), headers("response_headers", **{":status": "200", "content-type": "application/json"})):
        await call.write(m)
        await call.read()
    for i in range(nbytes // 65536):
        await call.write(body("response_body", (b'{"pad":"' if i == 0 else b"") + b"x" * 65536))
        await call.read()
    await call.write(body("response_body", b'"}', end=True))
    await call.read()
    await call.done_writing()
    await call.read()


async def main(trim: bool) -> None:
    address = f"127.0.0.1:{free_port()}"
    p = Processor(parse({"listen": address, "limits": {"maxHeldBytes": 256 << 20}}), [])
    server = build_server(p, address)
    await server.start()
    trimmer = asyncio.create_task(trim_loop(p.counters.trim_due, p.counters.trim_wanted, 0.1)) if trim else None
    out = {}
    async with grpc.aio.insecure_channel(address) as ch:
        await asyncio.gather(*(one(ch, 1 << 20) for _ in range(4)))
        await asyncio.sleep(0.3)
        out["before"] = rss_mib()
        out["after"] = []
        for _ in range(3):
            await asyncio.gather(*(one(ch, 4 << 20) for _ in range(16)))
            gc.collect()
            await asyncio.sleep(0.3)
            out["after"].append(rss_mib())
    out["held"] = p.counters.held
    if trimmer is not None:
        trimmer.cancel()
    await server.stop(0)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(trim=sys.argv[1:] != ["--no-trim"]))
