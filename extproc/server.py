"""Run the servicer: one grpc.aio server per worker process.

With ``workers > 1`` the parent forks the workers before any gRPC state exists; each binds the
same TCP port with SO_REUSEPORT (the kernel spreads Envoy's HTTP/2 connections over them) and the
parent supervises: a worker that dies is restarted. SIGTERM/SIGINT drain: the health service turns
NOT_SERVING, in-flight streams get ``grace`` seconds, then the process exits 0.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

import grpc

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.call import CallObserver
from extproc.config import Config
from extproc.processor import Processor

log = logging.getLogger("extproc")

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# grpc.aio hands work between its threads and the event loop; the default 5 ms GIL switch interval
# throttles that hand-off (measured in bench/: see docs/performance.md).
SWITCH_INTERVAL = 0.0005


def _serialize(reply: bytes) -> bytes:
    return reply  # replies are already serialised (most are constants)


def build_server(processor: Processor, address: str, options: Sequence[tuple[str, int]] = ()) -> grpc.aio.Server:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1), *options])
    handler = grpc.stream_stream_rpc_method_handler(
        processor.Process,
        request_deserializer=pb.ProcessingRequest.FromString,
        response_serializer=_serialize,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Process": handler}),))
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    return server


ObserverFactory = Callable[[Config], Sequence[CallObserver]]


async def run_worker(config: Config, observers: Sequence[CallObserver], grace: float = 10.0,
                     ready: Callable[[], None] | None = None) -> None:
    processor = Processor(config, observers)
    server = build_server(processor, config.listen)
    await server.start()
    log.info("ext_proc listening", extra={"address": config.listen, "pid": os.getpid()})
    if ready is not None:
        ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining", extra={"grace_seconds": grace, "active_streams": processor.active})
    await server.stop(grace)
    log.info("stopped", extra={"pid": os.getpid()})


def serve(config: Config, workers: int, observer_factory: ObserverFactory, grace: float = 10.0,
          on_worker_exit: Callable[[int], None] | None = None) -> int:
    """Run ``workers`` worker processes (1: this process). ``on_worker_exit(pid)`` runs in the
    supervising parent whenever a worker exits (metrics: prometheus-client ``mark_process_dead``)."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    if workers <= 1:
        asyncio.run(run_worker(config, observer_factory(config), grace))
        return 0
    if config.listen.startswith("unix:"):
        log.error("several workers need a TCP listen address (SO_REUSEPORT); got %s", config.listen)
        return 2
    return _supervise(config, workers, observer_factory, grace, on_worker_exit)


def _supervise(config: Config, workers: int, observer_factory: ObserverFactory, grace: float,
               on_worker_exit: Callable[[int], None] | None = None) -> int:
    children: dict[int, int] = {}  # pid -> slot
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # child: its own event loop and gRPC server, nothing inherited but config
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 0
            try:
                asyncio.run(run_worker(config, observer_factory(config), grace))
            except BaseException:
                log.exception("worker failed")
                code = 1
            os._exit(code)
        children[pid] = slot

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for slot in range(workers):
        spawn(slot)
    restarts: list[float] = []
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        slot = children.pop(pid, None)
        if slot is not None and on_worker_exit is not None:
            on_worker_exit(pid)
        if slot is None or stopping:
            continue
        log.warning("worker exited; restarting", extra={"pid": pid, "status": status})
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > 10 * workers:
            log.error("workers keep dying; giving up")
            on_signal(signal.SIGTERM, None)
            continue
        spawn(slot)
    return 0
