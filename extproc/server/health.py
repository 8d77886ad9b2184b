"""The standard gRPC health service (``grpc.health.v1.Health``), server side and a tiny client.

The sidecar reports SERVING once its ext_proc server has started and NOT_SERVING from the moment
it starts draining (SIGTERM). Both the overall status (service ``""``) and the ext_proc service
name are reported, so Kubernetes' native ``grpc:`` probes, ``grpc_health_probe`` and Envoy's gRPC
health checker can all ask. ``extproc health`` (the Docker HEALTHCHECK) is :func:`check`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health_pb2
from grpclib.const import Cardinality, Status
from grpclib.server import Stream

from extproc.core.config import Config, ConfigError
from extproc.core.envoy_names import EXT_PROC_SERVICE

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", EXT_PROC_SERVICE)


class HealthServicer:
    """``grpc.health.v1.Health`` with grpcio-health-checking's semantics: Check answers the
    status of a known service or NOT_FOUND; Watch sends the status (SERVICE_UNKNOWN for an unknown
    service) and every change; after ``enter_graceful_shutdown`` all is NOT_SERVING for good."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._watchers: dict[str, set[asyncio.Queue[int]]] = {}
        self._shutdown = False

    def set(self, service: str, status: int) -> None:
        if self._shutdown:
            return
        self._status[service] = status
        for q in self._watchers.get(service, ()):
            q.put_nowait(status)

    def enter_graceful_shutdown(self) -> None:
        for service in list(self._status):
            self.set(service, NOT_SERVING)
        self._shutdown = True

    async def Check(self, stream: Stream) -> None:
        req = await stream.recv_message()
        assert req is not None
        status = self._status.get(req.service)
        if status is None:
            await stream.send_trailing_metadata(status=Status.NOT_FOUND)
            return
        await stream.send_message(health_pb2.HealthCheckResponse(status=status))

    async def Watch(self, stream: Stream) -> None:
        req = await stream.recv_message()
        assert req is not None
        q: asyncio.Queue[int] = asyncio.Queue()
        watchers = self._watchers.setdefault(req.service, set())
        watchers.add(q)
        try:
            last = self._status.get(req.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            await stream.send_message(health_pb2.HealthCheckResponse(status=last))
            while True:
                status = await q.get()
                if status != last:
                    last = status
                    await stream.send_message(health_pb2.HealthCheckResponse(status=status))
        finally:
            watchers.discard(q)

    def add_to(self, server: Any) -> None:
        req, resp = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        server.add_method("/grpc.health.v1.Health/Check", self.Check, Cardinality.UNARY_UNARY, req, resp)
        server.add_method("/grpc.health.v1.Health/Watch", self.Watch, Cardinality.UNARY_STREAM, req, resp)


class Health:
    """The health service of one worker; starts NOT_SERVING until :meth:`serving`."""

    def __init__(self, *servers: Any) -> None:
        self._servicer = HealthServicer()
        for server in servers:
            self._servicer.add_to(server)

    async def not_ready(self) -> None:
        for service in SERVICES:
            self._servicer.set(service, NOT_SERVING)

    async def serving(self) -> None:
        for service in SERVICES:
            self._servicer.set(service, SERVING)

    async def draining(self) -> None:
        self._servicer.enter_graceful_shutdown()


def probe_address(config: Config) -> str:
    """The address ``extproc health --config`` asks: ``healthListen`` if set, else ``listen``.

    Probes are plaintext. With ``tls`` on ``listen``, set ``healthListen`` (health service only,
    plaintext, like Kubernetes' gRPC probes need); without it the probe cannot reach a TLS listener.
    """
    if config.health_listen is not None:
        return config.health_listen
    if config.tls.enabled:
        raise ConfigError("tls is set on listen and probes are plaintext: set healthListen for probes (or pass --address)")
    return config.listen


def probe_target(listen: str) -> str:
    """Where a local probe reaches a server listening on ``listen`` (a wildcard bind -> loopback)."""
    if listen.startswith("unix:"):
        return listen
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


def check(target: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """One Check call: (True, "SERVING") or (False, what went wrong). grpcio is imported here,
    by the probe command only: in a serving worker it would cost ~20 MB of RSS for nothing."""
    import grpc
    from grpc_health.v1 import health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return False, f"{e.code().name}: {e.details() or ''}".rstrip(": ")
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == SERVING, name
