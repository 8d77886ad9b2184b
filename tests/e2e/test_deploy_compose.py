"""docker-compose.yaml, the Dockerfile and the files they use: checked offline (tests/compose runs
them in Docker: `make test-compose`).

- the compose file against the compose-spec JSON schema (vendored by check-jsonschema);
- every image pinned to an explicit tag; every bind-mounted file exists;
- ports and addresses agree across docker-compose.yaml, envoy/envoy-compose.yaml, the sidecar's
  config and Prometheus' scrape targets; the sidecar config loads with extproc.core.config;
- the Dockerfile: pinned base, non-root user, HEALTHCHECK via `extproc health`, COPY sources exist,
  the entrypoint is a real CLI command.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.core import config as config_mod
from extproc.devtools import envoy_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_schema():
    p = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_compose_schema_check_catches_mistakes(tmp_path):
    """The validator really checks (an unknown service key fails)."""
    bad = tmp_path / "docker-compose.yaml"
    bad.write_text("services:\n  a:\n    image: x:1\n    imagee: typo\n")
    p = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0 and "imagee" in p.stdout


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest") and re.search(r"\d", tag) is not None


def test_images_pinned(compose):
    for name, svc in compose["services"].items():
        assert "image" in svc, f"{name}: no image"
        if "build" in svc:
            continue  # built from this repo's Dockerfile (whose base is pinned: see below)
        assert _pinned(svc["image"]), f"{name}: image {svc['image']} is not pinned to an explicit tag"
    assert compose["services"]["envoy"]["image"].startswith("envoyproxy/envoy:v1.40.")


def test_mounted_files_exist(compose):
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            assert src.startswith("./"), f"{name}: {vol}: only repo bind mounts expected"
            assert (REPO / src).is_file(), f"{name}: {src} does not exist"
        build = svc.get("build")
        if build is not None:
            assert (REPO / (build if isinstance(build, str) else build.get("context", ".")) / "Dockerfile").is_file()


def _mount(svc: dict[str, Any], target: str) -> Path:
    for vol in svc.get("volumes", []):
        src, dst = vol.split(":")[:2]
        if dst == target:
            return REPO / src
    raise AssertionError(f"nothing mounted at {target}")


def test_envoy_compose_config_is_generated(compose):
    path = _mount(compose["services"]["envoy"], "/etc/envoy/envoy.yaml")
    assert path == REPO / "envoy" / "envoy-compose.yaml"
    assert path.read_text() == envoy_config.render("compose"), "run `make envoy-config`"


def _published(svc: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for p in svc.get("ports", []):
        parts = str(p).split(":")
        out[int(parts[-1])] = int(parts[-2])
    return out


def test_ports_and_addresses_agree(compose):
    svcs = compose["services"]
    boot = yaml.safe_load(_mount(svcs["envoy"], "/etc/envoy/envoy.yaml").read_text())
    listeners = {l["name"]: l["address"]["socket_address"] for l in boot["static_resources"]["listeners"]}
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}

    def endpoint(cluster: str) -> tuple[str, int]:
        sa = clusters[cluster]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        return sa["address"], sa["port_value"]

    # Envoy's listener and admin are what docker-compose publishes.
    assert listeners["llm"]["port_value"] in _published(svcs["envoy"])
    admin = boot["admin"]["address"]["socket_address"]
    assert admin["port_value"] in _published(svcs["envoy"])
    # Envoy -> sidecar: the service name and the port the sidecar's config listens on (all interfaces).
    sidecar_cfg = config_mod.load(_mount(svcs["extproc"], "/etc/extproc/config.yaml"))
    host, _, port = sidecar_cfg.listen.rpartition(":")
    assert host == "0.0.0.0", "in compose the sidecar must listen beyond its container's loopback"
    assert endpoint("ext_proc") == ("extproc", int(port))
    assert clusters["ext_proc"]["type"] == "STRICT_DNS"
    # Envoy -> mock LLM: the service name and the port in its command.
    mock_cmd = svcs["mock-llm"]["command"]
    mock_port = int(mock_cmd[mock_cmd.index("--port") + 1])
    upstream = next(c for c in clusters if c.startswith("llm_"))
    assert endpoint(upstream) == ("mock-llm", mock_port)
    assert mock_cmd[mock_cmd.index("--host") + 1] == "0.0.0.0"
    # Prometheus scrapes the sidecar's stats port and Envoy's admin.
    prom = yaml.safe_load(_mount(svcs["prometheus"], "/etc/prometheus/prometheus.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    assert targets["extproc"] == [f"extproc:{sidecar_cfg.stats.port}"]
    assert sidecar_cfg.stats.port in _published(svcs["extproc"])
    # /metrics binds loopback by default; Prometheus is another container, so the file says so.
    assert sidecar_cfg.stats.address == "0.0.0.0" != config_mod.StatsConfig().address
    assert targets["envoy"] == [f"envoy:{admin['port_value']}"]
    assert admin["address"] == "0.0.0.0"
    # The rule file Prometheus is told to load is the one mounted.
    for rule_file in prom["rule_files"]:
        assert _mount(svcs["prometheus"], rule_file) == REPO / "deploy" / "prometheus" / "alerts.yml"
    # Grafana's datasource points at the Prometheus service, with the uid the dashboard uses.
    ds = yaml.safe_load(_mount(svcs["grafana"], "/etc/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090" and 9090 in _published(svcs["prometheus"])
    dash = json.loads(_mount(svcs["grafana"], "/var/lib/grafana/dashboards/envoy-ai-extproc.json").read_text())
    assert {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p} == {ds["datasources"][0]["uid"]}
    prov = yaml.safe_load(_mount(svcs["grafana"], "/etc/grafana/provisioning/dashboards/envoy-ai-extproc.yaml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    # Traces go to Jaeger's OTLP gRPC port.
    assert svcs["extproc"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    # Docker waits longer than the sidecar's own drain before SIGKILL.
    grace = svcs["extproc"]["stop_grace_period"]
    assert int(grace.rstrip("s")) > sidecar_cfg.shutdown_grace_seconds


def test_prometheus_config_and_rules_check():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    p = subprocess.run([promtool, "check", "rules", str(REPO / "deploy/prometheus/alerts.yml")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    # check config resolves rule_files; point it at the repo copy.
    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    prom["rule_files"] = [str(REPO / "deploy/prometheus/alerts.yml")]
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump(prom, f)
        f.flush()
        p = subprocess.run([promtool, "check", "config", f.name], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


# ---- Dockerfile ------------------------------------------------------------------------------
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def test_dockerfile():
    steps = _dockerfile()
    args = {k: v for i, a in steps if i == "ARG" for k, _, v in [a.partition("=")]}
    stages: list[str] = []
    for base, *rest in (a.split() for i, a in steps if i == "FROM"):
        if base not in stages:  # an earlier stage, else the (pinned) base image
            image = args.get(base.strip("${}"), base) if base.startswith("$") else base
            assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", image), f"base image {image} not pinned"
        stages.append(rest[-1] if len(rest) == 2 and rest[0].upper() == "AS" else "")
    # The default target (the last stage) is the runtime; `dev` adds the dev extra.
    assert stages[-1] == "runtime" and "dev" in stages
    dev_installs = [a for i, a in steps if i == "RUN" and "[dev]" in a]
    assert len(dev_installs) == 1, "only the dev target installs the dev extra"
    user = [a for i, a in steps if i == "USER"]
    assert user and not user[-1].startswith(("root", "0")), "must run as non-root"
    for i, a in steps:
        if i == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: missing"
    dockerignore = (REPO / ".dockerignore").read_text()
    for i, a in steps:
        if i == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                assert f"!{src.rstrip('/')}" in dockerignore.replace("/\n", "\n"), f"{src} excluded by .dockerignore"
    health = next(a for i, a in steps if i == "HEALTHCHECK")
    assert '"extproc", "health"' in health
    entry = json.loads(next(a for i, a in steps if i == "ENTRYPOINT"))
    cmd = json.loads(next(a for i, a in steps if i == "CMD"))
    assert entry == ["extproc"] and cmd[0] == "serve"
    config_path = cmd[cmd.index("--config") + 1]
    copied = next(a.split() for i, a in steps if i == "COPY" and a.split()[-1] == config_path)
    config_mod.load(REPO / copied[0])  # the baked-in default config is valid
    health_cmd = json.loads(health[health.index("[") :])
    assert health_cmd[health_cmd.index("--config") + 1] == config_path


def test_compose_builds_the_right_targets(compose):
    """The sidecar runs the runtime image (no dev stack); the mock LLM needs the dev extra."""
    svcs = compose["services"]
    assert svcs["extproc"]["build"] == "." or "target" not in svcs["extproc"]["build"]
    assert svcs["mock-llm"]["build"]["target"] == "dev"
    assert svcs["mock-llm"]["image"] != svcs["extproc"]["image"]


def test_dockerfile_commands_parse():
    """The entrypoint + CMD and the HEALTHCHECK command are accepted by the real CLI parser."""
    steps = _dockerfile()
    health = next(a for i, a in steps if i == "HEALTHCHECK")
    for argv in (json.loads(next(a for i, a in steps if i == "CMD")), json.loads(health[health.index("[") :])[1:]):
        p = subprocess.run([sys.executable, "-m", "extproc", argv[0], "--help"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0
        for flag in (a for a in argv[1:] if a.startswith("--")):
            assert flag in p.stdout, f"extproc {argv[0]}: no {flag}"
