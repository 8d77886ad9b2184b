"""Run the servicer: one gRPC server per worker process (grpc.aio, or grpclib: config ``server``).

With ``workers > 1`` the parent forks the workers before any gRPC state exists; each binds the
same TCP port with SO_REUSEPORT (the kernel spreads Envoy's HTTP/2 connections over them) and the
parent supervises: a worker that dies is restarted. SIGTERM/SIGINT drain: the health service
(``grpc.health.v1.Health``) turns NOT_SERVING, new streams are refused (Envoy fails open), in-flight
streams get ``shutdownGraceSeconds`` to finish and report to the observers, then the process exits 0.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grpc

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.call import CallObserver
from extproc.config import Config, TlsConfig
from extproc.health import Health, health_only_server
from extproc.processor import Processor
from extproc.tls import add_port

log = logging.getLogger("extproc")

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# grpc.aio hands work between its threads and the event loop; the default 5 ms GIL switch interval
# throttles that hand-off (measured in bench/: see docs/performance.md).
SWITCH_INTERVAL = 0.0005


def _serialize(reply: bytes) -> bytes:
    return reply  # replies are already serialised (most are constants)


def build_server(processor: Processor, address: str, options: Sequence[tuple[str, int]] = (),
                 tls: TlsConfig | None = None) -> grpc.aio.Server:
    """The ext_proc server on ``address``: TLS/mTLS when ``tls`` is enabled, else plaintext."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1), *options])
    handler = grpc.stream_stream_rpc_method_handler(
        processor.Process,
        request_deserializer=pb.ProcessingRequest.FromString,
        response_serializer=_serialize,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Process": handler}),))
    if add_port(server, address, tls) == 0:
        raise OSError(f"cannot listen on {address}")
    return server


class Backend(NamedTuple):
    """One gRPC server implementation. Its servers have grpc.aio's ``start()`` / ``stop(grace)``
    (stop: refuse new streams, give the ones in flight ``grace`` seconds, then cancel them)."""

    build_server: Callable[..., Any]  # (processor, address, tls=...) -> server
    health_only_server: Callable[[str], Any]  # healthListen: health service only
    health: Callable[..., Any]  # Health(*servers): not_ready() / serving() / draining()


def backend(name: str) -> Backend:
    if name == "grpclib":
        from extproc import server_grpclib as g

        return Backend(g.build_server, g.health_only_server, g.Health)
    return Backend(build_server, health_only_server, Health)


ObserverFactory = Callable[[Config], Sequence[CallObserver]]


# Keys a SIGHUP reload cannot change in a running process (sockets, metric label sets).
RESTART_ONLY = ("listen", "health_listen", "stats", "server")

Reloader = Callable[[], Config]


async def run_worker(config: Config, observers: Sequence[CallObserver], grace: float | None = None,
                     ready: Callable[[], None] | None = None, reload: Reloader | None = None,
                     observer_factory: ObserverFactory | None = None) -> None:
    grace = config.shutdown_grace_seconds if grace is None else grace
    impl = backend(config.server)
    processor = Processor(config, observers)
    server = impl.build_server(processor, config.listen, tls=config.tls)
    health_server = impl.health_only_server(config.health_listen) if config.health_listen else None
    health = impl.health(server, *([health_server] if health_server else []))
    await health.not_ready()
    if health_server is not None:
        await health_server.start()
    await server.start()
    await health.serving()
    log.info("ext_proc listening", extra={"address": config.listen, "pid": os.getpid(), "server": config.server})
    if ready is not None:
        ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None and observer_factory is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: reconfigure(processor, reload, observer_factory))
    await stop.wait()
    await drain(server, health, processor, grace)
    if health_server is not None:
        await health_server.stop(0)
    close_observers(processor.observers)
    log.info("stopped", extra={"pid": os.getpid()})


def reconfigure(processor: Processor, reload: Reloader, observer_factory: ObserverFactory) -> bool:
    """SIGHUP: re-read the config file and apply it without dropping a stream or resetting a
    counter (metric instruments are registered once per process and reused). A bad file, or a
    change to a key only a restart can apply, leaves the running config in place."""
    from extproc.config import ConfigError

    try:
        new = reload()
    except ConfigError as e:
        log.error("config reload failed; keeping the running config", extra={"error": str(e)})
        return False
    old = processor.config
    changed = [k for k in RESTART_ONLY if getattr(new, k) != getattr(old, k)]
    if changed:
        log.error("config reload: these keys need a restart; keeping the running config", extra={"keys": changed})
        return False
    previous = processor.observers
    try:
        processor.reconfigure(new, observer_factory(new))
    except ConfigError as e:
        log.error("config reload failed; keeping the running config", extra={"error": str(e)})
        return False
    close_observers([o for o in previous if o not in processor.observers])  # e.g. the old tracer
    logging.getLogger().setLevel(new.logging.level.upper())
    log.info("config reloaded", extra={"pid": os.getpid()})
    return True


def close_observers(observers: Sequence[CallObserver]) -> None:
    """Flush what observers buffer (spans) before the process exits or they are replaced."""
    for o in observers:
        shutdown = getattr(o, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # a failing flush must not block exit or a reload
                log.exception("observer shutdown failed")


# How long, after the grace period, we wait for cancelled streams to report (their ``finally``).
REPORT_WAIT = 5.0


async def drain(server: Any, health: Any, processor: Processor, grace: float) -> None:
    """Graceful stop: NOT_SERVING, no new streams, in-flight streams finish, every call reported."""
    await health.draining()
    log.info("draining", extra={"grace_seconds": grace, "active_streams": processor.active})
    # stop() refuses new RPCs at once (GOAWAY; Envoy's ext_proc fails open for requests that start
    # now, they pass unobserved), waits up to `grace` for the streams in flight, then cancels them.
    await server.stop(grace)
    # Observers run in Process()'s `finally` (Stream.finish); a stream cancelled at the deadline
    # gets there as its task unwinds. Don't let the process exit (and lose its metrics) before.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REPORT_WAIT
    while processor.active and loop.time() < deadline:
        await asyncio.sleep(0.01)
    if processor.active:
        log.warning("streams still open after drain", extra={"active_streams": processor.active})


def serve(config: Config, workers: int, observer_factory: ObserverFactory, grace: float | None = None,
          on_worker_exit: Callable[[int], None] | None = None, reload: Reloader | None = None) -> int:
    """Run ``workers`` worker processes (1: this process). ``on_worker_exit(pid)`` runs in the
    supervising parent whenever a worker exits (metrics: prometheus-client ``mark_process_dead``).
    ``reload`` re-reads the config on SIGHUP (each worker applies it; see ``reconfigure``)."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    if workers <= 1:
        asyncio.run(run_worker(config, observer_factory(config), grace, reload=reload, observer_factory=observer_factory))
        return 0
    if config.listen.startswith("unix:"):
        log.error("several workers need a TCP listen address (SO_REUSEPORT); got %s", config.listen)
        return 2
    return _supervise(config, workers, observer_factory, config.shutdown_grace_seconds if grace is None else grace,
                      on_worker_exit, reload)


def _supervise(config: Config, workers: int, observer_factory: ObserverFactory, grace: float,
               on_worker_exit: Callable[[int], None] | None = None, reload: Reloader | None = None) -> int:
    children: dict[int, int] = {}  # pid -> slot
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # child: its own event loop and gRPC server, nothing inherited but config
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until its event loop installs the reload handler
            code = 0
            try:
                asyncio.run(run_worker(config, observer_factory(config), grace, reload=reload, observer_factory=observer_factory))
            except BaseException:
                log.exception("worker failed")
                code = 1
            os._exit(code)
        children[pid] = slot

    stop_deadline = float("inf")

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping, stop_deadline
        if not stopping:
            stop_deadline = time.monotonic() + grace + REPORT_WAIT + 5
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def on_hup(_signum: int, _frame: object) -> None:
        # Workers reload themselves; the parent keeps the new config for workers it restarts later.
        nonlocal config
        if reload is not None:
            try:
                new = reload()
                if all(getattr(new, k) == getattr(config, k) for k in RESTART_ONLY):
                    config = new
            except ValueError:  # ConfigError: the workers log it
                pass
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    for slot in range(workers):
        spawn(slot)
    restarts: list[float] = []
    killed = False
    # Poll rather than block in os.wait(): after SIGTERM the parent must notice a worker that
    # overstays its grace period. (The parent lives on until every worker has exited, so anything
    # it serves, such as multiprocess /metrics, stays up while the workers drain.)
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if stopping and not killed and time.monotonic() > stop_deadline:
                log.error("workers still running after the grace period; killing them", extra={"pids": list(children)})
                killed = True
                for child in list(children):
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)
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
    return 1 if killed else 0
