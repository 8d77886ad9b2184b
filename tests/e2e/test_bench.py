"""`python -m bench --quick` runs end to end and produces every figure (targets are not asserted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import REPO

pytestmark = pytest.mark.integration


@pytest.mark.skipif(
    shutil.which("wrk") is None and not os.environ.get("CI"),
    reason="wrk not installed (`make tools` installs it; under CI this fails instead)",
)
def test_bench_quick(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((tmp_path / "latest-quick.json").read_text())
    assert "throughput c=64" in (tmp_path / "latest-quick.md").read_text()
    for row in doc["table"]:
        for stack, value in row["values"].items():
            if stack == "envoy" and row["compare"] == "none":
                continue  # sidecar-only figures
            assert value is not None, (row["metric"], stack)
    assert doc["results"]["inline"]["hold"]["open_streams"] > 0


@pytest.mark.litellm  # `make test-litellm` (installs the pinned LiteLLM first); not part of `make test`
def test_bench_quick_litellm(tmp_path: Path) -> None:
    """The litellm stack (LiteLLM's proxy on the same upstreams): its figures, token counts and the
    side-by-side summary."""
    p = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--stacks", "envoy,inline,litellm", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((tmp_path / "latest-quick.json").read_text())
    got = doc["results"]["litellm"]
    assert got["stream"]["events"] > 0 and got["stream"]["errors"] == 0
    assert got["hold"]["open_streams"] > 0
    rate = f"rate{doc['meta']['profile']['rates'][0]}"  # the rate LiteLLM keeps up with
    assert got[rate]["errors"] == 0
    assert got[rate]["counts"]["observed"] >= 0.9 * got[rate]["sent"]  # its Prometheus prompt-token counter
    assert got[rate]["litellm_cpu_s"] > 0 and got[rate]["envoy_cpu_s"] is None
    assert "**LiteLLM side by side**" in (tmp_path / "latest-quick.md").read_text()


def test_bench_floor() -> None:
    """`python -m bench.floor` measures the echo floor on both event loops."""
    p = subprocess.run([sys.executable, "-m", "bench.floor", "--messages", "100"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["asyncio", "uvloop"]
    assert all(float(line.split("=")[1].split()[0]) > 0 for line in lines)
