"""A mixed LLM workload of known total usage, driven through Envoy concurrently.

Every item replays a recording whose usage is a literal below (read off the recording), so the
expected totals are known without trusting our own parsers.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass, field

import httpx

from tests.support.recordings import load


@dataclass(frozen=True)
class Item:
    fixture: str
    path: str | None
    body: bytes | None
    prompt: int
    completion: int | None
    total: int
    streaming: bool


ITEMS = [
    Item("aigw__chat-basic.yaml", None, None, 8, 377, 385, False),
    Item("aigw__chat-streaming-detailed-usage.yaml", None, None, 12, 100, 112, True),
    Item("aigw__completion-streaming-usage.yaml", None, None, 31, 25, 56, True),
    Item("aigw__embeddings-dimensions.yaml", None, None, 5, None, 5, False),
    Item("aigw__azure-chat-basic.yaml", None, None, 8, 271, 279, False),
    Item("agw__openai__responses_stream.sse", "/v1/responses", b'{"model":"gpt-4o","input":"hi","stream":true}', 12, 8, 20, True),
    Item("agw__openai__responses_basic.json", "/v1/responses", b'{"model":"gpt-4o","input":"story"}', 10, 10, 20, False),
]


@dataclass
class Result:
    rid: str
    item: Item
    team: str
    aborted: bool
    status: int = 0
    body_ok: bool = False
    error: str | None = None


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)

    def expected(self, team: str | None = None, include_aborted: bool = False) -> dict[str, int]:
        out = {"prompt": 0, "completion": 0, "total": 0}
        for r in self.results:
            if (team is None or r.team == team) and (include_aborted or not r.aborted):
                out["prompt"] += r.item.prompt
                out["completion"] += r.item.completion or 0
                out["total"] += r.item.total
        return out


async def drive(
    base_url: str,
    n: int,
    concurrency: int,
    tokens: dict[str, str],
    abort_ratio: float = 0.0,
    seed: int = 7,
    chunk_delay_ms: int = 0,
    upstream=None,
) -> Run:
    """Aborting clients need ``upstream`` (the ReplayUpstream): it holds their usage back until
    Envoy has dropped the upstream connection, so the usage is provably never sent."""
    rng = random.Random(seed)
    run = Run()
    sem = asyncio.Semaphore(concurrency)
    teams = sorted(tokens)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:

        async def one(i: int) -> None:
            item = ITEMS[i % len(ITEMS)]
            team = teams[i % len(teams)]
            aborted = item.streaming and rng.random() < abort_ratio
            res = Result(str(uuid.uuid4()), item, team, aborted)
            run.results.append(res)
            rec = load(item.fixture)
            headers = {
                "content-type": "application/json",
                "x-fixture": item.fixture,
                "x-request-id": res.rid,
                "authorization": f"Bearer {tokens[team]}",
            }
            if aborted:
                # the upstream holds its last chunk (the usage) until the client has hung up
                headers["x-gate"] = res.rid
            elif chunk_delay_ms:
                headers["x-chunk-delay-ms"] = str(chunk_delay_ms)
            async with sem:
                try:
                    async with client.stream(
                        "POST", item.path or rec.path, content=item.body if item.body is not None else rec.request_body, headers=headers
                    ) as r:
                        res.status = r.status_code
                        if aborted:
                            async for _ in r.aiter_raw():
                                break  # hang up after the first chunk
                            await r.aclose()
                            res.error = (
                                None if await asyncio.to_thread(upstream.wait_disconnected, res.rid) else "upstream never saw the hang-up"
                            )
                            return
                        res.body_ok = (await r.aread()) == rec.body
                except httpx.HTTPError as e:
                    res.error = repr(e)

        await asyncio.gather(*(one(i) for i in range(n)))
    return run
