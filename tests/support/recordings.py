"""Recorded provider responses: tests/fixtures/providers (sources and licences in its MANIFEST.txt)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from tests.support import REPO

FIXTURES = REPO / "tests" / "fixtures" / "providers"


def fixtures_dir() -> Path:
    return FIXTURES


@dataclass(frozen=True)
class Recording:
    name: str
    status: int
    content_type: str
    body: bytes
    path: str = "/v1/chat/completions"
    request_body: bytes | None = None


_TYPES = {".sse": "text/event-stream", ".json": "application/json", ".bin": "application/vnd.amazon.eventstream"}


@cache
def load(name: str) -> Recording:
    """A recording by file name: go-vcr cassettes (.yaml) carry request and response."""
    path = fixtures_dir() / name
    if path.suffix == ".yaml":
        from urllib.parse import urlsplit

        inter = yaml.safe_load(path.read_text())["interactions"][0]
        req, resp = inter["request"], inter["response"]
        headers = {k.lower(): v[0] for k, v in resp["headers"].items()}
        url = urlsplit(req["url"])
        return Recording(
            name,
            int(resp["code"]),
            headers.get("content-type", "application/json"),
            resp["body"].encode(),
            url.path + (f"?{url.query}" if url.query else ""),
            req["body"].encode() if req.get("body") else None,
        )
    return Recording(name, 200, _TYPES.get(path.suffix, "application/octet-stream"), path.read_bytes())
