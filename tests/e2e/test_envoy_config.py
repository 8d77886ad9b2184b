"""Every Envoy config in the repo passes `envoy --mode validate`; the reference file is current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from envoy_data_plane.envoy.config.cluster.v3 import ClusterDiscoveryType

from extproc.core import config
from extproc.devtools import envoy_config
from extproc.devtools.dev import envoy_binary

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in REPO.rglob("*.yaml") if "static_resources" in p.read_text() and ".venv" not in p.parts)


def test_reference_config_is_generated():
    committed = (REPO / "envoy" / "envoy.yaml").read_text()
    assert committed == envoy_config.dump(envoy_config.reference(), envoy_config.HEADER), "run `make envoy-config`"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_repo_config_validates(path):
    p = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]


BUDGETS_BY_USER_AND_HEADER = config.parse(
    {
        "budgets": {
            "descriptors": [
                {"entries": [{"key": "user", "claim": "sub", "default": "anonymous"}]},
                {"entries": [{"key": "org", "claim": "org.id"}, {"key": "project", "header": "x-project"}]},
            ]
        }
    }
).budgets


@pytest.mark.parametrize(
    "variant",
    [
        "plain",
        "jwt",
        "no_extproc",
        "observability",
        "unix",
        "budgets",
        "fewer_messages",
        "fewer_messages_budgets",
        "passthrough",
        "fewer_messages_passthrough",
        "no_request_body",
        "fewer_messages_no_request_body",
        "observability_fewer_messages",
    ],
)
def test_built_configs_validate(tmp_path, variant):
    kw = {
        "plain": {},
        "jwt": {"jwks_json": envoy_config.EXAMPLE_JWKS},
        "no_extproc": {"extproc": None},
        "observability": {"observability_mode": True},
        "observability_fewer_messages": {"observability_mode": True, "fewer_messages": True},
        "unix": {"extproc": "unix:/tmp/extproc.sock"},
        "budgets": {
            "jwks_json": envoy_config.EXAMPLE_JWKS,
            "ratelimit": envoy_config.RateLimitService("127.0.0.1:8081", BUDGETS_BY_USER_AND_HEADER),
        },
        "fewer_messages": {"fewer_messages": True},
        "fewer_messages_budgets": {
            "fewer_messages": True,
            "jwks_json": envoy_config.EXAMPLE_JWKS,
            "ratelimit": envoy_config.RateLimitService("127.0.0.1:8081", BUDGETS_BY_USER_AND_HEADER),
        },
        # routes with ExtProcPerRoute {disabled: true} (tests/unit/test_envoy_config.py checks where)
        "passthrough": {
            "passthrough": ("/v1/files", "/health"),
            "jwks_json": envoy_config.EXAMPLE_JWKS,
            "ratelimit": envoy_config.RateLimitService("127.0.0.1:8081", BUDGETS_BY_USER_AND_HEADER),
        },
        "fewer_messages_passthrough": {"fewer_messages": True, "passthrough": ("/v1/files", "/health")},
        "no_request_body": {},
        "fewer_messages_no_request_body": {"fewer_messages": True},  # per-route processing_mode
    }[variant]
    up = envoy_config.Upstream(
        "/", "http://127.0.0.1:8000", "openai", http2=variant.startswith("fewer"), request_body="no_request_body" not in variant
    )
    cfg = envoy_config.bootstrap(upstreams=[up, envoy_config.Upstream("/tls/", "https://example.com", http2=True)], **kw)
    f = tmp_path / "envoy.yaml"
    f.write_text(envoy_config.dump(cfg))
    assert f.read_text().count("disabled: true") == (2 if "passthrough" in variant else 0)
    p = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]


def test_budget_descriptors_check_on_request_and_charge_when_done():
    per_route = envoy_config.to_dict(
        envoy_config.ratelimit_per_route(envoy_config.RateLimitService("rls:8081", BUDGETS_BY_USER_AND_HEADER), "my.ns")
    )
    limits = per_route["rate_limits"]
    assert len(limits) == 4  # two budgets, each a check and a charge
    check, charge = limits[0], limits[1]
    assert check["hits_addend"] == {"number": 0} and "apply_on_stream_done" not in check
    assert charge["hits_addend"] == {"format": "%DYNAMIC_METADATA(my.ns:ratelimit_cost)%"} and charge["apply_on_stream_done"] is True
    assert (
        check["actions"]
        == charge["actions"]
        == [
            {
                "metadata": {
                    "descriptor_key": "user",
                    "default_value": "anonymous",  # source DYNAMIC is the default
                    "metadata_key": {"key": "envoy.filters.http.jwt_authn", "path": [{"key": "principal"}, {"key": "sub"}]},
                }
            }
        ]
    )
    assert limits[2]["actions"][0]["metadata"]["metadata_key"]["path"] == [{"key": "principal"}, {"key": "org"}, {"key": "id"}]
    assert limits[2]["actions"][1] == {"request_headers": {"header_name": "x-project", "descriptor_key": "project"}}


def test_budgets_need_the_sidecar_out_of_observability_mode():
    with pytest.raises(ValueError, match="observability_mode"):
        envoy_config.bootstrap(
            upstreams=[envoy_config.Upstream("/", "http://127.0.0.1:8000")],
            observability_mode=True,
            ratelimit=envoy_config.RateLimitService("127.0.0.1:8081"),
        )


def test_receiving_namespace_matches_metadata_namespace():
    f = envoy_config.ext_proc_filter("my.ns")
    assert f.metadata_options is not None and f.metadata_options.receiving_namespaces is not None
    assert f.metadata_options.receiving_namespaces.untyped == ["my.ns"]
    assert f.failure_mode_allow is True


@pytest.mark.parametrize("variant", sorted(envoy_config.VARIANTS))
def test_generated_configs_are_current(variant):
    path = REPO / envoy_config.VARIANTS[variant][0]
    assert path.read_text() == envoy_config.render(variant), "run `make envoy-config`"


def test_service_name_ext_proc_cluster_is_strict_dns():
    cfg = envoy_config.bootstrap(upstreams=[envoy_config.Upstream("/", "http://mock-llm:8000")], extproc="extproc:18080")
    ext = next(c for c in cfg.static_resources.clusters if c.name == "ext_proc")
    assert ext.type == ClusterDiscoveryType.STRICT_DNS
    ip = envoy_config.bootstrap(upstreams=[envoy_config.Upstream("/", "http://127.0.0.1:8000")])
    assert next(c for c in ip.static_resources.clusters if c.name == "ext_proc").type == ClusterDiscoveryType.STATIC


@pytest.mark.integration
def test_ops_listener_exposes_only_ready_and_stats(tmp_path):
    """The Kubernetes layout: admin on loopback; the ops port answers /ready and
    /stats/prometheus (kubelet, Prometheus) and nothing else (no /quitquitquit from the network)."""
    import urllib.error
    import urllib.request

    from extproc.devtools.dev import envoy_command, free_port, wait_port

    ops, admin, listen = free_port(), free_port(), free_port()
    cfg = envoy_config.bootstrap(
        upstreams=[envoy_config.Upstream("/", "http://127.0.0.1:9")],
        listen=f"127.0.0.1:{listen}",
        access_log=str(tmp_path / "access.log"),
        admin=f"127.0.0.1:{admin}",
        ops_listen=f"127.0.0.1:{ops}",
    )
    f = tmp_path / "envoy.yaml"
    f.write_text(envoy_config.dump(cfg))
    proc = subprocess.Popen(envoy_command(f, "--concurrency", "1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(ops, proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{ops}/ready", timeout=5) as r:
            assert r.status == 200 and r.read().strip() == b"LIVE"
        with urllib.request.urlopen(f"http://127.0.0.1:{ops}/stats/prometheus", timeout=5) as r:
            assert b"envoy_server_live" in r.read()
        for method, path in (("POST", "/quitquitquit"), ("GET", "/config_dump"), ("POST", "/ready")):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(
                    urllib.request.Request(f"http://127.0.0.1:{ops}{path}", method=method, data=b"" if method == "POST" else None),
                    timeout=5,
                )
            assert e.value.code == 404
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("mode", ["observability", "observability-fewer-messages"])
def test_envoy_config_mode_observability_validates(tmp_path, mode):
    """`extproc envoy-config --mode observability` (the command line, not only the Python API) gives
    a config with Envoy's observability_mode on, which `envoy --mode validate` accepts."""
    out = subprocess.run(
        [sys.executable, "-m", "extproc", "envoy-config", "--mode", mode], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    ext_proc = next(f["typed_config"] for f in _http_filters(yaml.safe_load(out)) if f["name"] == "envoy.filters.http.ext_proc")
    assert ext_proc["observability_mode"] is True
    assert ext_proc["processing_mode"]["request_header_mode"] == ("SKIP" if mode.endswith("fewer-messages") else "SEND")
    f = tmp_path / "envoy.yaml"
    f.write_text(out)
    p = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]


def test_envoy_config_refuses_budgets_in_observability_mode():
    """Budgets charge the cost the sidecar returns, which Envoy ignores in observability mode."""
    p = subprocess.run(
        [sys.executable, "-m", "extproc", "envoy-config", "--variant", "budgets", "--mode", "observability"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert "--mode observability" in p.stderr and "Traceback" not in p.stderr


def _http_filters(cfg: dict) -> list[dict]:
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["http_filters"]
