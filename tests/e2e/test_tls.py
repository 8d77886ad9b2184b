"""TLS and mTLS on the ext_proc listener (config ``tls``) and Envoy's side (``ExtProcTls``).

Certificates are made here with ``cryptography``: a CA, a server certificate for localhost /
127.0.0.1 and a client certificate (Envoy's), all signed by that CA.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.core.config import ConfigError, parse
from extproc.devtools import envoy_config
from extproc.devtools.dev import envoy_binary, free_port
from extproc.server import health, tls
from extproc.server.grpc_server import GrpclibServer
from tests.support.harness import Stack
from tests.support.recordings import load

FIXTURE = "aigw__chat-basic.yaml"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool = False, san=None, eku=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(d: Path, name: str, cert: x509.Certificate, key) -> tuple[str, str]:
    c, k = d / f"{name}.crt", d / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(c), str(k)


def make_pki(d: Path, ca_cn: str = "test-ca") -> dict[str, str]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_cn, ca_key, _name(ca_cn), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert(
        "extproc",
        server_key,
        ca.subject,
        ca_key,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        eku=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert("envoy", client_key, ca.subject, ca_key, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    ca_file, _ = _write(d, "ca", ca, ca_key)
    server_cert, server_key_file = _write(d, "server", server, server_key)
    client_cert, client_key_file = _write(d, "client", client, client_key)
    return {
        "ca": ca_file,
        "server_cert": server_cert,
        "server_key": server_key_file,
        "client_cert": client_cert,
        "client_key": client_key_file,
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _sidecar_tls(pki: dict[str, str], mtls: bool = True) -> dict[str, str]:
    out = {"certFile": pki["server_cert"], "keyFile": pki["server_key"]}
    if mtls:
        out["clientCaFile"] = pki["ca"]
    return out


def _envoy_tls(pki: dict[str, str]) -> envoy_config.ExtProcTls:
    return envoy_config.ExtProcTls(ca_file=pki["ca"], cert_file=pki["client_cert"], key_file=pki["client_key"], sni="localhost")


def _post(stack: Stack) -> tuple[httpx.Response, dict]:
    rid = str(uuid.uuid4())
    h = {"content-type": "application/json", "x-fixture": FIXTURE, "x-request-id": rid}
    r = httpx.post(stack.url("/v1/chat/completions"), content=load(FIXTURE).request_body, headers=h, timeout=20)
    return r, stack.log_entry(rid)


def _check(target: str, creds: grpc.ChannelCredentials | None) -> str:
    channel = grpc.secure_channel(target, creds) if creds is not None else grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# ---- end to end: real Envoy + sidecar --------------------------------------------------------


@pytest.mark.integration
def test_mtls_end_to_end_and_clients_without_a_certificate_are_refused(tmp_path, replay, pki):
    health_port = free_port()
    cfg = {"tls": _sidecar_tls(pki), "healthListen": f"127.0.0.1:{health_port}"}
    with Stack(tmp_path, replay.url, sidecar_config=cfg, extproc_tls=_envoy_tls(pki)) as s:
        r, entry = _post(s)
        assert r.status_code == 200
        assert entry["total_tokens"] == 385  # Envoy reached the sidecar over mTLS
        assert s.envoy_stat("cluster.ext_proc.ssl.handshake") >= 1

        target = f"127.0.0.1:{s.sidecar_port}"
        ca = Path(pki["ca"]).read_bytes()
        # TLS without a client certificate: the handshake is refused.
        assert _check(target, grpc.ssl_channel_credentials(root_certificates=ca)) == "UNAVAILABLE"
        # Plaintext against the TLS listener: refused too.
        assert _check(target, None) == "UNAVAILABLE"
        # With the client certificate: served (the health service shares the TLS listener).
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=Path(pki["client_key"]).read_bytes(), certificate_chain=Path(pki["client_cert"]).read_bytes()
        )
        assert _check(target, creds) == "SERVING"
        # Probes go to the plaintext healthListen: `extproc health --config` picks it.
        p = subprocess.run(
            [sys.executable, "-m", "extproc", "health", "--config", str(s.sidecar_config_path)], capture_output=True, text=True, timeout=30
        )
        assert p.returncode == 0 and p.stdout.strip() == "SERVING", p.stderr
        # The same traffic still works after the refused handshakes.
        r, entry = _post(s)
        assert r.status_code == 200 and entry["total_tokens"] == 385
        assert '"tls": false' not in s.sidecar_stderr()  # loopback TLS: no plaintext warning


@pytest.mark.integration
def test_client_certificate_from_another_ca_is_refused(tmp_path, replay, pki):
    (tmp_path / "other").mkdir()
    other = make_pki(tmp_path / "other", "other-ca")
    envoy_tls = envoy_config.ExtProcTls(ca_file=pki["ca"], cert_file=other["client_cert"], key_file=other["client_key"], sni="localhost")
    with Stack(tmp_path / "stack", replay.url, sidecar_config={"tls": _sidecar_tls(pki)}, extproc_tls=envoy_tls) as s:
        r, entry = _post(s)
        assert r.status_code == 200  # fail open
        assert entry["total_tokens"] is None


@pytest.mark.integration
def test_plaintext_envoy_against_tls_sidecar_fails_open(tmp_path, replay, pki):
    with Stack(tmp_path, replay.url, sidecar_config={"tls": _sidecar_tls(pki)}) as s:
        r, entry = _post(s)
        assert r.status_code == 200 and r.content == load(FIXTURE).body
        assert entry["total_tokens"] is None  # served, unobserved


@pytest.mark.integration
def test_server_only_tls_end_to_end(tmp_path, replay, pki):
    """TLS without clientCaFile: Envoy verifies the sidecar, no client certificate needed."""
    envoy_tls = envoy_config.ExtProcTls(ca_file=pki["ca"], sni="localhost")
    with Stack(tmp_path, replay.url, sidecar_config={"tls": _sidecar_tls(pki, mtls=False)}, extproc_tls=envoy_tls) as s:
        r, entry = _post(s)
        assert r.status_code == 200 and entry["total_tokens"] == 385


# ---- Envoy config ----------------------------------------------------------------------------


def test_envoy_config_with_extproc_tls_validates(tmp_path, pki):
    cfg = envoy_config.bootstrap(
        upstreams=[envoy_config.Upstream("/", "http://127.0.0.1:8000")], extproc="10.0.0.7:18080", extproc_tls=_envoy_tls(pki)
    )
    cluster = next(c for c in envoy_config.to_dict(cfg)["static_resources"]["clusters"] if c["name"] == "ext_proc")
    ctx = cluster["transport_socket"]["typed_config"]
    assert ctx["@type"].endswith("/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext")
    assert ctx["common_tls_context"]["alpn_protocols"] == ["h2"]
    assert ctx["sni"] == "localhost"
    assert ctx["common_tls_context"]["tls_certificates"][0]["certificate_chain"]["filename"] == pki["client_cert"]
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    f = tmp_path / "envoy.yaml"
    f.write_text(envoy_config.dump(cfg))
    p = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]


def test_extproc_tls_needs_cert_and_key_together(pki):
    with pytest.raises(ValueError, match="cert_file and key_file"):
        envoy_config.ExtProcTls(ca_file=pki["ca"], cert_file=pki["client_cert"])


def test_no_transport_socket_without_extproc_tls():
    cfg = envoy_config.bootstrap(upstreams=[envoy_config.Upstream("/", "http://127.0.0.1:8000")])
    cluster = next(c for c in cfg.static_resources.clusters if c.name == "ext_proc")
    assert cluster.transport_socket is None


# ---- config ----------------------------------------------------------------------------------


def test_tls_config_parses(pki):
    cfg = parse({"listen": "0.0.0.0:18080", "tls": _sidecar_tls(pki)})
    assert cfg.tls.enabled and cfg.tls.client_ca_file == pki["ca"]
    assert not parse({}).tls.enabled


@pytest.mark.parametrize(
    "tls_cfg,key",
    [
        ({"certFile": "/nonexistent/server.crt", "keyFile": "K"}, "tls.certFile: cannot read /nonexistent/server.crt"),
        ({"certFile": "C", "keyFile": "/nonexistent/server.key"}, "tls.keyFile: cannot read"),
        ({"certFile": "C", "keyFile": "K", "clientCaFile": "/nonexistent/ca.crt"}, "tls.clientCaFile: cannot read"),
        ({"certFile": "C"}, "tls: set both certFile and keyFile"),
        ({"keyFile": "K"}, "tls: set both certFile and keyFile"),
        ({"clientCaFile": "CA"}, "tls: clientCaFile needs certFile and keyFile"),
        ({"certFile": "CA", "keyFile": "K"}, "tls: certFile/keyFile: not a matching"),  # CA cert, server key
        ({"certFile": "C", "keyFile": "K", "clientCaFile": "K"}, "tls: clientCaFile: no PEM CA"),
        ({"certfile": "C"}, "tls.certfile: unknown key"),
    ],
)
def test_bad_tls_config_names_the_key(pki, tls_cfg, key):
    paths = {"C": pki["server_cert"], "K": pki["server_key"], "CA": pki["ca"]}
    data = {k: paths.get(v, v) for k, v in tls_cfg.items()}
    with pytest.raises(ConfigError) as e:
        parse({"tls": data}, "c.yaml")
    assert key in str(e.value) and "\n" not in str(e.value)


def test_tls_on_a_unix_socket_is_refused(pki):
    with pytest.raises(ConfigError, match="tls: not used on a unix: listen address"):
        parse({"listen": "unix:/tmp/x.sock", "tls": _sidecar_tls(pki)})


def test_serve_with_bad_tls_config_exits_2_naming_the_key(tmp_path, pki):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tls": {"certFile": pki["server_cert"], "keyFile": str(tmp_path / "missing.key")}}))
    p = subprocess.run([sys.executable, "-m", "extproc", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "tls.keyFile" in p.stderr and "missing.key" in p.stderr and len(p.stderr.strip().splitlines()) == 1


# ---- listener and probes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "address,local",
    [
        ("127.0.0.1:1", True),
        ("127.0.0.2:1", True),
        ("[::1]:1", True),
        ("localhost:1", True),
        ("unix:/tmp/x", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("10.1.2.3:1", False),
        ("extproc:1", False),
    ],
)
def test_is_local(address, local):
    assert tls.is_local(address) is local


def test_plaintext_off_loopback_logs_a_warning(caplog, pki):
    async def bind(address: str, tls_cfg) -> None:
        server = GrpclibServer(address, tls_cfg)
        await server.start()
        await server.stop(0)

    with caplog.at_level(logging.WARNING, logger="extproc"):
        asyncio.run(bind(f"0.0.0.0:{free_port()}", None))
    [rec] = [r for r in caplog.records if "without TLS" in r.getMessage()]
    assert rec.levelno == logging.WARNING and rec.address.startswith("0.0.0.0:") and rec.tls is False
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="extproc"):
        asyncio.run(bind(f"127.0.0.1:{free_port()}", None))
        asyncio.run(bind(f"0.0.0.0:{free_port()}", parse({"tls": _sidecar_tls(pki)}).tls))
    assert not [r for r in caplog.records if "without TLS" in r.getMessage()]


def test_probe_address(pki):
    assert health.probe_address(parse({"listen": "0.0.0.0:1"})) == "0.0.0.0:1"
    assert health.probe_address(parse({"listen": "0.0.0.0:1", "healthListen": "0.0.0.0:2"})) == "0.0.0.0:2"
    with pytest.raises(ConfigError, match="set healthListen"):
        health.probe_address(parse({"listen": "0.0.0.0:1", "tls": _sidecar_tls(pki)}))
