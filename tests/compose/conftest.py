"""tests/compose: the docker-compose.yaml stack in Docker (see compose_stack.py). Skipped unless
tests/compose/run.sh (`make test-compose`) runs them."""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compose_stack import BREAK, ENABLED, ENVOY_ADMIN, HERE, JAEGER, PROMETHEUS, Compose, http_get, wait_until


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="runs in Docker: `make test-compose` (tests/compose/run.sh)")
    for item in items:
        if Path(str(item.fspath)).is_relative_to(HERE):
            item.add_marker(pytest.mark.compose)
            if not ENABLED:
                item.add_marker(skip)


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
