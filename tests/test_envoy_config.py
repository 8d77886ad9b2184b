"""Every Envoy config in the repo passes `envoy --mode validate`; the reference file is current."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from extproc import envoy_config
from extproc.dev import envoy_binary

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in REPO.rglob("*.yaml") if "static_resources" in p.read_text() and ".venv" not in p.parts)


def test_reference_config_is_generated():
    committed = (REPO / "envoy" / "envoy.yaml").read_text()
    assert committed == envoy_config.dump(envoy_config.reference(), envoy_config.HEADER), "run `make envoy-config`"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_repo_config_validates(path):
    p = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]


@pytest.mark.parametrize("variant", ["plain", "jwt", "no_extproc", "observability", "unix"])
def test_built_configs_validate(tmp_path, variant):
    kw = {
        "plain": {},
        "jwt": {"jwks_json": envoy_config.EXAMPLE_JWKS},
        "no_extproc": {"extproc": None},
        "observability": {"observability_mode": True},
        "unix": {"extproc": "unix:/tmp/extproc.sock"},
    }[variant]
    cfg = envoy_config.bootstrap(upstreams=[envoy_config.Upstream("/", "http://127.0.0.1:8000")], **kw)
    f = tmp_path / "envoy.yaml"
    f.write_text(envoy_config.dump(cfg))
    p = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]


def test_receiving_namespace_matches_metadata_namespace():
    f = envoy_config.ext_proc_filter("my.ns")
    assert f["metadata_options"]["receiving_namespaces"]["untyped"] == ["my.ns"]
    assert f["failure_mode_allow"] is True
