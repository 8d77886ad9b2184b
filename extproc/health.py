"""The standard gRPC health service (``grpc.health.v1.Health``), server side and a tiny client.

The sidecar reports SERVING once its ext_proc server has started and NOT_SERVING from the moment
it starts draining (SIGTERM). Both the overall status (service ``""``) and the ext_proc service
name are reported, so Kubernetes' native ``grpc:`` probes, ``grpc_health_probe`` and Envoy's gRPC
health checker can all ask. ``extproc health`` (the Docker HEALTHCHECK) is :func:`check`.
"""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from extproc.config import Config, ConfigError

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
SERVICES = ("", EXT_PROC_SERVICE)


class Health:
    """The health servicer of one worker; starts NOT_SERVING until :meth:`serving`."""

    def __init__(self, *servers: grpc.aio.Server) -> None:
        self._servicer = health_aio.HealthServicer()
        for server in servers:
            health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    async def not_ready(self) -> None:
        for service in SERVICES:
            await self._servicer.set(service, NOT_SERVING)

    async def serving(self) -> None:
        for service in SERVICES:
            await self._servicer.set(service, SERVING)

    async def draining(self) -> None:
        """NOT_SERVING for good (later ``set`` calls are ignored); Watch streams are told."""
        await self._servicer.enter_graceful_shutdown()


def health_only_server(address: str) -> grpc.aio.Server:
    """A server for ``healthListen``: the health service only (add it with :class:`Health`)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address} (healthListen)")
    return server


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
    """One Check call: (True, "SERVING") or (False, what went wrong)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return False, f"{e.code().name}: {e.details() or ''}".rstrip(": ")
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == SERVING, name
