from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers: fixtures, harness, replay_upstream

from fixtures import fixtures_dir as _fixtures_dir  # noqa: E402
from replay_upstream import ReplayUpstream  # noqa: E402


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return _fixtures_dir()


@pytest.fixture(scope="session")
def replay() -> Iterator[ReplayUpstream]:
    up = ReplayUpstream()
    yield up
    up.close()
