"""Driving the docker-compose.yaml stack for tests/compose (make test-compose).

The session fixture `stack` (below; test_compose.py imports it) writes the files the override
(tests/compose/docker-compose.local.yaml) mounts, builds the images, brings the stack up, waits for
it, and takes it down with its volumes at the end (tests/compose/run.sh sets up Docker around it
and removes whatever a killed session left).

COMPOSE_TEST_BREAK sabotages the stack, to show the tests look at real container traffic (they must
fail then): `no-sidecar` drops the extproc service, `wrong-port` points Envoy's ext_proc cluster at a
port nothing listens on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import jwt_keys

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
OVERRIDE = HERE / "docker-compose.local.yaml"
ENABLED = os.environ.get("EXTPROC_COMPOSE_TEST") == "1"
BREAK = os.environ.get("COMPOSE_TEST_BREAK", "")
JWT_NAMESPACE = "envoy.filters.http.jwt_authn"

ENVOY = "http://127.0.0.1:10000"
ENVOY_ADMIN = "http://127.0.0.1:9901"
PROMETHEUS = "http://127.0.0.1:9090"
JAEGER = "http://127.0.0.1:16686"
METRICS = "http://127.0.0.1:9092"


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(what: str, check, timeout: float, interval: float = 0.5) -> Any:
    """Poll check() until it returns something truthy; fail with the last value or error."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 (the stack is still starting: connection refused etc.)
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f}s (last: {last!r})")
        time.sleep(interval)


# ---- the files the override mounts -------------------------------------------------------------
def jwt_filter(jwks_json: str) -> dict[str, Any]:
    """The jwt_authn filter of envoy/envoy.yaml (claims under `principal`, tokens optional)."""
    return {
        "name": JWT_NAMESPACE,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"local": {"local_jwks": {"inline_string": jwks_json}, "forward": True, "payload_in_metadata": "principal"}},
            "rules": [
                {
                    "match": {"prefix": "/"},
                    "requires": {"requires_any": {"requirements": [{"provider_name": "local"}, {"allow_missing_or_failed": {}}]}},
                }
            ],
        },
    }


def envoy_config() -> dict[str, Any]:
    cfg = yaml.safe_load((REPO / "envoy" / "envoy-compose.yaml").read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, jwt_filter(jwt_keys.jwks_json()))
    if BREAK == "wrong-port":
        ext = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "ext_proc")
        ext["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = 18089
    return cfg


def sidecar_config() -> dict[str, Any]:
    cfg = yaml.safe_load((REPO / "deploy" / "compose" / "extproc.yaml").read_text())
    cfg.setdefault("stats", {})["customLabels"] = [{"name": "team", "metadataKey": "principal:team"}]
    return cfg


def compose_copy() -> dict[str, Any]:
    """docker-compose.yaml with the two edits docker-compose v1 and this machine need."""
    dc = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    dc.pop("name")  # v1 rejects the top-level `name`; the project name is given with -p instead
    envoy = dc["services"]["envoy"]
    envoy["ports"] = [p if str(p).count(":") > 1 else f"127.0.0.1:{p}" for p in envoy["ports"]]  # loopback only
    if BREAK == "no-sidecar":
        del dc["services"]["extproc"]
        del envoy["depends_on"]["extproc"]
    return dc


class Compose:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.project = os.environ.get("COMPOSE_TEST_PROJECT", "envoy-ai-extproc-test")
        self.files = [run_dir / "docker-compose.yaml", OVERRIDE]
        self.env = {**os.environ, "COMPOSE_TEST_RUN": str(run_dir), "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}

    def write_files(self) -> None:
        def write(name: str, data: dict[str, Any]) -> None:
            path = self.run_dir / name
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            path.chmod(0o644)  # read by the containers' non-root users

        write("docker-compose.yaml", compose_copy())
        write("envoy.yaml", envoy_config())
        write("extproc.yaml", sidecar_config())
        if BREAK == "no-sidecar":
            override = yaml.safe_load(OVERRIDE.read_text())
            del override["services"]["extproc"]
            write("docker-compose.local.yaml", override)
            self.files[1] = self.run_dir / "docker-compose.local.yaml"

    def cmd(self, *args: str) -> list[str]:
        out = ["docker-compose", "--project-directory", str(REPO), "-p", self.project]
        for f in self.files:
            out += ["-f", str(f)]
        return out + list(args)

    def run(self, *args: str, timeout: float = 120, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(self.cmd(*args), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if check and p.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)}: exit {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
        return p

    def container(self, service: str) -> str:
        cid = self.run("ps", "-q", service).stdout.strip()
        assert cid, f"no container for service {service}"
        return cid

    def inspect(self, service: str) -> dict[str, Any]:
        out = subprocess.run(["docker", "inspect", self.container(service)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)[0]

    def logs(self, service: str) -> str:
        """The container's own output (no compose prefixes): stdout then stderr."""
        p = subprocess.run(["docker", "logs", self.container(service)], capture_output=True, text=True, timeout=30)
        return p.stdout + p.stderr

    def access_log(self) -> list[dict[str, Any]]:
        out = []
        for line in subprocess.run(
            ["docker", "logs", self.container("envoy")], capture_output=True, text=True, timeout=30
        ).stdout.splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Iterator[Compose]:
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def say(line: str) -> None:  # progress on the terminal, past pytest's output capture
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n[test-compose] {line}")

    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose not on PATH (tests/compose/run.sh installs it)")
    run_dir = Path(tempfile.mkdtemp(prefix="envoy-ai-extproc-compose-"))
    run_dir.chmod(0o755)
    c = Compose(run_dir)
    c.write_files()
    if BREAK:
        say(f"COMPOSE_TEST_BREAK={BREAK}: the stack is sabotaged, the tests must fail")
    try:
        t0 = time.monotonic()
        # Two at once first (the classic builder has no cross-build cache: never the same stages
        # twice at once): the project's runtime image and Prometheus. Then the rest, whose stages
        # are mostly cached; mock-llm's dev image comes before the Envoy image taken from it.
        for args in (("build", "--parallel", "jaeger", "prometheus"), ("build",)):
            build = c.run(*args, timeout=1200, check=False)
            with open(run_dir / "build.log", "a") as f:
                f.write(build.stdout + build.stderr)
            if build.returncode != 0:
                pytest.fail(f"docker-compose {' '.join(args)} failed (exit {build.returncode}):\n{(build.stdout + build.stderr)[-6000:]}")
        t1 = time.monotonic()
        c.run("up", "-d", "--no-build", timeout=300)
        wait_until("Envoy ready", lambda: http_get(f"{ENVOY_ADMIN}/ready")[0] == 200, 60)
        wait_until("Prometheus ready", lambda: http_get(f"{PROMETHEUS}/-/ready")[0] == 200, 60)
        wait_until("OTLP receiver up", lambda: http_get(f"{JAEGER}/api/services")[0] == 200, 60)
        say(f"images built in {t1 - t0:.0f}s, stack up in {time.monotonic() - t1:.0f}s")
        yield c
    finally:
        down = c.run("down", "-v", "--remove-orphans", "--timeout", "35", timeout=180, check=False)
        if down.returncode != 0:
            say(f"docker-compose down failed (run.sh removes what is left): {down.stderr[-2000:]}")
        shutil.rmtree(run_dir, ignore_errors=True)
