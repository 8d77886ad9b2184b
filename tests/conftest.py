from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def fixtures_path() -> Path:
    """Recorded provider responses: ``shared/`` beside the repository (X/main + X/shared), or
    ``$EXTPROC_FIXTURES``."""
    beside = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "providers"
    if beside.is_dir():
        return beside
    env = os.environ.get("EXTPROC_FIXTURES")
    if env and Path(env).is_dir():
        return Path(env)
    return beside


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    path = fixtures_path()
    if not path.is_dir():
        pytest.skip(f"provider fixtures not found at {path} (set EXTPROC_FIXTURES)")
    return path


@pytest.fixture
def load_case(request: pytest.FixtureRequest) -> Callable[[Any], bytes]:
    """A case's response body; needs (and skips without) the fixtures only for recorded files."""

    def load(case: Any) -> bytes:
        if case.body is not None:
            return bytes(case.body)
        return bytes(case.load(request.getfixturevalue("fixtures_dir")))

    return load
