"""TLS / mTLS for the ext_proc listener (config section ``tls``, checked by ``extproc.core.config``).

The sidecar binds loopback by default (or a unix socket), where plaintext is fine. For a
non-local setup (Envoy in another pod or host), set ``tls.certFile``/``tls.keyFile``, and
``tls.clientCaFile`` to require and verify client certificates (mTLS). See docs/security-tls.md.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl

from extproc.core.config import TlsConfig

log = logging.getLogger("extproc")


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


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """TLS 1.2+, ALPN ``h2``; with ``clientCaFile``, client certificates are required and
    verified against it (mTLS)."""
    assert tls.cert_file is not None and tls.key_file is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    ctx.set_alpn_protocols(["h2"])
    if tls.client_ca_file is not None:
        ctx.load_verify_locations(cafile=tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def warn_if_plaintext(address: str, tls: TlsConfig | None) -> bool:
    """True if ``address`` is served with TLS; logs a warning for plaintext off loopback."""
    if tls is not None and tls.enabled:
        return True
    if not is_local(address):
        log.warning(
            "ext_proc listens without TLS on a non-loopback address; set tls.certFile/keyFile (and clientCaFile)",
            extra={"address": address, "tls": False},
        )
    return False
