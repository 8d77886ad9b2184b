from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from extproc.devtools.dev import free_port, wait_port
from tests.support.recordings import fixtures_dir as _fixtures_dir  # noqa: E402
from tests.support.replay_upstream import ReplayUpstream  # noqa: E402


@pytest.fixture(scope="session")
def mock_llm() -> Iterator[str]:
    """The built-in mock LLM (``extproc mock-llm``, OpenAI-compatible) as a process: its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "mock-llm", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Recorded provider responses (tests/fixtures/providers)."""
    return _fixtures_dir()


@pytest.fixture(scope="session")
def replay() -> Iterator[ReplayUpstream]:
    up = ReplayUpstream()
    yield up
    up.close()


@pytest.fixture
def load_case() -> Callable[[Any], bytes]:
    """A case's response body (built from the provider's documented format, or a recording)."""
    return lambda case: bytes(case.load())
