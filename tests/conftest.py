from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers: fixtures, harness, replay_upstream

from fixtures import fixtures_dir as _fixtures_dir  # noqa: E402
from replay_upstream import ReplayUpstream  # noqa: E402


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Recorded provider responses: shared/ beside the repository, or $EXTPROC_FIXTURES.
    Missing fixtures are an error, not a skip: they are the ground truth of the parser tests."""
    return _fixtures_dir()


# The gRPC server implementations (config `server`): the end-to-end tests that matter run on each.
SERVERS = ("grpcio", "grpclib")


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def replay() -> Iterator[ReplayUpstream]:
    up = ReplayUpstream()
    yield up
    up.close()


@pytest.fixture
def load_case(request: pytest.FixtureRequest) -> Callable[[Any], bytes]:
    """A case's response body (built from the provider's documented format, or a recording)."""

    def load(case: Any) -> bytes:
        if case.body is not None:
            return bytes(case.body)
        return bytes(case.load(request.getfixturevalue("fixtures_dir")))

    return load
