"""TLS / mTLS for the ext_proc listener (config section ``tls``, checked by ``extproc.config``).

The sidecar binds loopback by default (or a unix socket), where plaintext is fine. For a
non-local setup (Envoy in another pod or host), set ``tls.certFile``/``tls.keyFile``, and
``tls.clientCaFile`` to require and verify client certificates (mTLS). See docs/security-tls.md.
"""
from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import grpc

from extproc.config import TlsConfig

log = logging.getLogger("extproc")


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """gRPC server credentials; with ``clientCaFile``, client certificates are required."""
    assert tls.cert_file is not None and tls.key_file is not None
    key = Path(tls.key_file).read_bytes()
    cert = Path(tls.cert_file).read_bytes()
    ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file is not None else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def is_local(address: str) -> bool:
    """True for a unix socket or a loopback host; a wildcard, another IP or a DNS name is not."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_port(server: grpc.aio.Server, address: str, tls: TlsConfig | None) -> int:
    """Bind ``address``: TLS if configured, else plaintext (with a warning off loopback)."""
    if tls is not None and tls.enabled:
        return server.add_secure_port(address, server_credentials(tls))
    if not is_local(address):
        log.warning("ext_proc listens without TLS on a non-loopback address; set tls.certFile/keyFile (and clientCaFile)",
                    extra={"address": address, "tls": False})
    return server.add_insecure_port(address)
