"""Recorded provider responses from ../shared/fixtures/providers (see its MANIFEST.txt)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml


def fixtures_dir() -> Path:
    env = os.environ.get("EXTPROC_FIXTURES")
    if env:
        return Path(env)
    # CI: a fresh clone X/main with shared/ beside it; locally the same layout under /work.
    here = Path(__file__).resolve().parents[1]
    for base in (here.parent, *here.parents):
        candidate = base / "shared" / "fixtures" / "providers"
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("shared/fixtures/providers not found beside the repo; set EXTPROC_FIXTURES")


@dataclass(frozen=True)
class Recording:
    name: str
    status: int
    content_type: str
    body: bytes
    path: str = "/v1/chat/completions"
    request_body: bytes | None = None


_TYPES = {".sse": "text/event-stream", ".json": "application/json", ".bin": "application/vnd.amazon.eventstream"}


@lru_cache(maxsize=None)
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
            name, int(resp["code"]), headers.get("content-type", "application/json"),
            resp["body"].encode(), url.path + (f"?{url.query}" if url.query else ""),
            req["body"].encode() if req.get("body") else None,
        )
    return Recording(name, 200, _TYPES.get(path.suffix, "application/octet-stream"), path.read_bytes())
