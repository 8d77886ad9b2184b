"""A real Arize Phoenix on free loopback ports, for ``make test-phoenix`` (tests/e2e/test_phoenix.py).

Phoenix is installed, pinned (``tests/phoenix-requirements.txt``), in a venv of its own
(``.venv-phoenix``), never in the project's: ``python -m tests.support.phoenix --install``, or the
test on first run. A stamp file (the pin file's hash) makes the install run once per pin.

``phoenix serve`` keeps its SQLite database in a working directory of the test's, listens on
127.0.0.1 only (HTTP: UI, REST, GraphQL and OTLP/HTTP on ``/v1/traces``; a gRPC port it must have),
with its telemetry off. The test reads what Phoenix made of our spans through Phoenix's own APIs:
REST ``/v1/projects/{project}/spans`` (attributes, kind, status) and GraphQL (the cost Phoenix
computed from its model price table, ``costSummary``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from extproc.devtools.dev import free_port

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-phoenix"
REQUIREMENTS = ROOT / "tests" / "phoenix-requirements.txt"
START_TIMEOUT_S = 240.0  # ~25 s on an idle 2-CPU machine (database migrations, UI assets); CI is busier


class InstallError(RuntimeError):
    """pip could not install the pinned Phoenix (no package index, no wheel for this platform...)."""


def pin() -> str:
    """The requirement line, e.g. ``arize-phoenix==20.26.1``."""
    return next(line.strip() for line in REQUIREMENTS.read_text().splitlines() if line.strip() and not line.startswith("#"))


def python() -> Path:
    return VENV / "bin" / "python"


def _stamp() -> Path:
    return VENV / ".installed-stamp"


def _wanted() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def installed() -> bool:
    """The venv exists and was installed from the current pin file."""
    try:
        return (VENV / "bin" / "phoenix").exists() and _stamp().read_text().strip() == _wanted()
    except OSError:
        return False


def install() -> None:
    """Create ``.venv-phoenix`` (if missing) and install the pin into it; raise :class:`InstallError`
    with pip's last words when that fails."""
    if installed():
        return
    base = getattr(sys, "_base_executable", sys.executable)  # a venv is made from the base interpreter
    steps = [[str(python()), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)]]
    if not python().exists():
        steps.insert(0, [base, "-m", "venv", str(VENV)])
    for cmd in steps:
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            said = [line for line in (p.stderr or p.stdout).splitlines() if line.strip() and not line.startswith("WARNING")]
            tail = " | ".join(line if len(line) <= 300 else line[:150] + " ... " + line[-150:] for line in said[-4:])
            raise InstallError(f"{' '.join(cmd[:4])} ... exited {p.returncode}: {tail}")
    _stamp().write_text(_wanted() + "\n")


class Phoenix:
    """``phoenix serve`` as a process: ``with Phoenix(workdir) as px: px.spans()``."""

    def __init__(self, workdir: Path) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.grpc_port = free_port()
        self.log = self.dir / "phoenix.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The base URL: UI, REST (``/v1``), GraphQL (``/graphql``), OTLP/HTTP (``/v1/traces``)."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Phoenix:
        env = {
            **os.environ,
            "PHOENIX_WORKING_DIR": str(self.dir),
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(self.port),
            "PHOENIX_GRPC_PORT": str(self.grpc_port),
            "PHOENIX_TELEMETRY_ENABLED": "false",
        }
        self.proc = subprocess.Popen(
            [str(VENV / "bin" / "phoenix"), "serve"], env=env, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=self.log.open("ab")
        )
        try:
            self._wait_healthy()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"phoenix serve exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"phoenix serve not healthy after {START_TIMEOUT_S:.0f}s: {self.log_tail()}")
            time.sleep(0.5)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    # ---- Phoenix's own APIs -------------------------------------------------------------------
    def spans(self, project: str = "default") -> list[dict[str, Any]]:
        """Every span of a project, as Phoenix's REST API returns them (pages followed)."""
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            r = httpx.get(f"{self.url}/v1/projects/{project}/spans", params=params, timeout=10)
            if r.status_code == 404:  # the project appears with its first span
                return out
            r.raise_for_status()
            doc = r.json()
            out += doc["data"]
            cursor = doc.get("next_cursor")
            if not cursor:
                return out

    def wait_spans(self, sessions: set[str], timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """The span of each session id (``session.id``; one span per session), by session id, once
        Phoenix has all of them."""
        deadline = time.monotonic() + timeout
        while True:
            got = {s["attributes"].get("session.id"): s for s in self.spans()}
            got = {k: v for k, v in got.items() if k in sessions}
            if len(got) == len(sessions):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"Phoenix has {len(got)} of {len(sessions)} spans after {timeout}s: {self.log_tail()}")
            time.sleep(0.5)

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        r = httpx.post(f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=10)
        r.raise_for_status()
        doc = r.json()
        assert not doc.get("errors"), doc["errors"]
        return doc["data"]

    def cost(self, span_id: str) -> dict[str, Any] | None:
        """What Phoenix computed a span costs (its ``costSummary``: prompt, completion, total, each
        ``{tokens, cost}``), from the REST span's ``id`` (a GraphQL node id); None: not priced."""
        q = """query($id: ID!) { node(id: $id) { ... on Span {
                 costSummary { prompt { tokens cost } completion { tokens cost } total { tokens cost } } } } }"""
        return self.graphql(q, id=span_id)["node"]["costSummary"]  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tests.support.phoenix", description="the pinned Arize Phoenix venv for make test-phoenix")
    ap.add_argument("--install", action="store_true", help=f"create {VENV.name} and install {REQUIREMENTS.name}")
    args = ap.parse_args(argv)
    if args.install and not installed():
        print(f"installing {pin()} into {VENV.name} (a few minutes, once)", flush=True)
        install()
    print(f"{VENV.name}: {'installed' if installed() else 'absent (or out of date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
