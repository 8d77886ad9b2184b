"""Budgets end to end: a real Envoy charges each call's ``ratelimit_cost`` (set by the sidecar) to a
rate limit service double, checks the budget before the upstream is called, and lets traffic
through when the limiter is down (``failure_mode_deny: false``).

Ground truth for tokens is the known usage of the replayed recordings (tests/support/workload.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict

import httpx
import pytest

from extproc.core import config
from extproc.devtools.dev import free_port
from extproc.devtools.envoy_config import RateLimitService, Upstream
from tests.support.harness import Stack, scrape
from tests.support.jwt_keys import jwks_json, token
from tests.support.ratelimit_service import RateLimitDouble
from tests.support.recordings import load
from tests.support.workload import drive

pytestmark = pytest.mark.integration

TOKENS = {"dev": token("alice", "dev"), "ops": token("bob", "ops")}
DOMAIN = "ai-budgets"


def team(name: str) -> tuple[tuple[str, str], ...]:
    return (("team", name),)


@pytest.fixture
def rls():
    double = RateLimitDouble()
    yield double
    double.close()


def budget_stack(path, upstream: str, rls_address: str, fewer_messages: bool = False, **budgets) -> Stack:
    sidecar = {"budgets": {"enabled": True, **budgets}}
    return Stack(
        path,
        upstream,
        jwks_json=jwks_json(),
        sidecar_config=sidecar,
        fewer_messages=fewer_messages,
        ratelimit=RateLimitService(rls_address, config.parse(sidecar).budgets),
    )


def log_sums(stack: Stack, rids: set[str], key: str) -> dict[str, float]:
    entries = []
    for rid in rids:
        entries.append(stack.log_entry(rid))
    sums: dict[str, float] = defaultdict(float)
    for e in entries:
        sums[e["team"]] += e.get(key) or 0
    return sums


# A stream hung up before its usage is charged its request's output ceiling, else unreportedCharge.
UNREPORTED = 1000
ABORTED_CHARGE = {
    "aigw__chat-streaming-detailed-usage.yaml": 100,  # max_completion_tokens
    "aigw__completion-streaming-usage.yaml": 25,  # max_tokens
    "agw__openai__responses_stream.sse": UNREPORTED,
}  # no ceiling


def test_each_call_is_charged_exactly_its_tokens_under_its_team(tmp_path, replay, rls):
    """Mixed calls, streamed ones included, 30% of the streams hung up by their client before
    any usage was sent: each team's charges add up exactly to its tokens, plus the ceiling (or
    the unreported charge) of each stream hung up before its usage."""
    with budget_stack(tmp_path, replay.url, rls.address, unreportedCharge=UNREPORTED) as s:
        run = asyncio.run(drive(s.url(""), n=42, concurrency=8, tokens=TOKENS, abort_ratio=0.3, upstream=replay))
        assert all(r.error is None and r.status == 200 for r in run.results), [r.error for r in run.results if r.error][:3]
        assert any(r.aborted for r in run.results) and any(r.item.streaming and not r.aborted for r in run.results)
        logged = log_sums(s, {r.rid for r in run.results}, "ratelimit_cost")
        for name in TOKENS:
            want = run.expected(name)["total"] + sum(ABORTED_CHARGE[r.item.fixture] for r in run.results if r.team == name and r.aborted)
            assert want > 0
            assert rls.wait_charged(team(name), want) == want, name
            assert logged[name] == want, ("access log ratelimit_cost", name)
            mine = [r for r in run.results if r.team == name]
            hits = [h for h in rls.hits() if h.key == team(name)]
            # one budget check per request (hits_addend 0, before the upstream) ...
            assert sum(1 for h in hits if h.hits == 0) == len(mine)
            # ... and one charge per call, when its stream was done
            assert sum(1 for h in hits if h.hits > 0) == len(mine)
        assert all(h.explicit and h.domain == DOMAIN for h in rls.hits())
        assert {h.key for h in rls.hits()} == {team(n) for n in TOKENS}


def test_aborted_stream_is_charged_what_was_seen(tmp_path, replay, rls):
    """Anthropic reports input tokens in message_start (its output count is a placeholder, not
    counted): a stream the client drops right after it is charged those; a complete one its final usage."""
    rec = load("agw__anthropic__stream_basic.sse")  # message_start: 15 in; final: 15 + 21
    with budget_stack(tmp_path, replay.url, rls.address) as s:
        rid = str(uuid.uuid4())
        headers = {
            "authorization": f"Bearer {TOKENS['ops']}",
            "x-fixture": rec.name,
            "x-gate": rid,
            "x-request-id": rid,
            "content-type": "application/json",
        }
        body = b'{"model":"claude-haiku-4-5","stream":true,"max_tokens":64,"messages":[{"role":"user","content":"hi"}]}'
        with httpx.Client(timeout=10) as client, client.stream("POST", s.url("/v1/messages"), content=body, headers=headers) as r:
            assert r.status_code == 200
            next(r.iter_raw())  # message_start arrived; hang up
        assert replay.wait_disconnected(rid)
        assert rls.wait_charged(team("ops"), 15) == 15
        assert s.log_entry(rid)["ratelimit_cost"] == 15
        done = httpx.post(
            s.url("/v1/messages"),
            content=body,
            timeout=10,
            headers={k: v for k, v in headers.items() if k not in ("x-gate", "x-request-id")},
        )
        assert done.status_code == 200 and done.content == rec.body
        assert rls.wait_charged(team("ops"), 15 + 36) == 51


def test_micro_usd_charges_sum_to_each_teams_cost(tmp_path, replay, rls):
    with budget_stack(tmp_path, replay.url, rls.address, unit="micro_usd") as s:
        run = asyncio.run(drive(s.url(""), n=21, concurrency=6, tokens=TOKENS))
        assert all(r.error is None and r.status == 200 for r in run.results)
        rids = {r.rid for r in run.results}
        entries = [s.log_entry(rid) for rid in rids]
        for name in TOKENS:
            mine = [e for e in entries if e["team"] == name]
            want = sum(e["ratelimit_cost"] for e in mine)
            # each charge is that call's priced cost, in micro-dollars
            assert all(e["ratelimit_cost"] == round((e["cost_usd"] or 0) * 1_000_000) for e in mine)
            assert want > 0
            assert rls.wait_charged(team(name), want) == want, name


@pytest.mark.parametrize("mode", ["default", "fewer-messages"])
def test_over_budget_gets_429_without_reaching_the_upstream(tmp_path, replay, rls, mode):
    """dev may spend 500 tokens; each call costs 385. The check (hits 0) passes while the spend
    is within the budget: two calls go through, the third is refused by Envoy. ops is unaffected."""
    rls.limits[team("dev")] = 500
    rec = load("aigw__chat-basic.yaml")  # 385 tokens
    with budget_stack(tmp_path, replay.url, rls.address, fewer_messages=mode == "fewer-messages") as s:

        def call(who: str) -> tuple[httpx.Response, str]:
            rid = str(uuid.uuid4())
            return httpx.post(
                s.url(rec.path),
                content=rec.request_body,
                timeout=10,
                headers={
                    "authorization": f"Bearer {TOKENS[who]}",
                    "x-fixture": rec.name,
                    "x-request-id": rid,
                    "content-type": "application/json",
                },
            ), rid

        first, _ = call("dev")
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit"].startswith("500") and first.headers["x-ratelimit-remaining"] == "500"
        assert rls.wait_charged(team("dev"), 385, settle=0) == 385
        assert call("dev")[0].status_code == 200
        assert rls.wait_charged(team("dev"), 770, settle=0) == 770
        upstream_calls = len(replay.requests)
        refused, rid = call("dev")
        assert refused.status_code == 429
        assert refused.headers["x-envoy-ratelimited"] == "true"
        assert refused.headers["x-ratelimit-remaining"] == "0" and refused.headers["x-ratelimit-reset"] == "3600"
        assert len(replay.requests) == upstream_calls  # never reached the upstream
        entry = s.log_entry(rid)
        assert entry["response_code"] == 429 and entry["response_flags"] == "RL" and entry["ratelimit_cost"] is None
        # the limiter comes before ext_proc (it must, docs/budgets.md): the sidecar never sees the refusal
        assert not any(labels.get("status_code") == "429" for n, labels, v in scrape(s.metrics_port) if n == "ai_requests_total")
        assert call("ops")[0].status_code == 200  # another team's budget
        assert rls.wait_charged(team("dev"), 770) == 770  # the refused call was not charged


def test_limiter_down_lets_traffic_through_with_failure_mode_allow(tmp_path, replay):
    rec = load("aigw__chat-basic.yaml")
    with budget_stack(tmp_path, replay.url, f"127.0.0.1:{free_port()}") as s:  # nothing listens there
        r = httpx.post(
            s.url(rec.path),
            content=rec.request_body,
            timeout=10,
            headers={"authorization": f"Bearer {TOKENS['dev']}", "x-fixture": rec.name, "content-type": "application/json"},
        )
        assert r.status_code == 200 and r.content == rec.body
        # the filter's stats are under the route's cluster: the check failed, and was let through
        stats = f"cluster.{Upstream('/', replay.url).cluster}.ratelimit"
        assert s.envoy_stat(f"{stats}.error") >= 1 and s.envoy_stat(f"{stats}.failure_mode_allowed") >= 1
        assert s.envoy_stat(f"{stats}.over_limit") == 0


# Request bodies of several sizes, from empty to past Envoy's 1 MiB buffer limit (bodies up to
# 5 MiB in every mode without budgets: tests/e2e/test_request_bodies.py).
BODY_SIZES = (0, 1, 108, 4 << 10, 64 << 10, 900 << 10, 1_100_000, 2 << 20)
MODES = {"default": {}, "fewer-messages": {"fewer_messages": True}, "observability": {"observability_mode": True}}


def sized_body(size: int, seed: str) -> bytes:
    """A JSON chat request of exactly ``size`` bytes (beyond the smallest), unique per request."""
    head = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' + seed.encode()
    tail = b'"}]}'
    if size < len(head) + len(tail):
        return (head + tail)[:size]
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("mode", MODES)
def test_upstream_receives_every_request_body_byte_with_budgets_on(tmp_path, replay, rls, mode):
    """Budgets change nothing on the wire, in every mode: every byte of every request body, of
    every size, sent with a content-length or chunked, concurrently, reaches the upstream. (The
    fewer-messages mode once sent most of them on empty, and the default mode truncated some once
    ext_proc streamed request bodies: ext_proc lets the request headers through while it holds a
    body chunk, and a rate limit filter after it, resuming when the limiter answered, ended the
    request there; it comes before ext_proc now.) Observability mode takes no rate limit filter (the
    sidecar's metadata is ignored there): the sidecar runs with budgets on, Envoy without it."""
    rec = load("aigw__chat-basic.yaml")
    sidecar = {"budgets": {"enabled": True}}
    ratelimit = None if mode == "observability" else RateLimitService(rls.address, config.parse(sidecar).budgets)
    sent: dict[str, bytes] = {}
    with Stack(tmp_path, replay.url, jwks_json=jwks_json(), sidecar_config=sidecar, ratelimit=ratelimit, **MODES[mode]) as s:

        async def one(client: httpx.AsyncClient, size: int, chunked: bool) -> int:
            rid = str(uuid.uuid4())
            sent[rid] = body = sized_body(size, rid)

            async def pieces():
                for i in range(0, len(body), 16 << 10):
                    yield body[i : i + (16 << 10)]

            r = await client.post(
                s.url(rec.path),
                content=pieces() if chunked else body,
                headers={
                    "authorization": f"Bearer {TOKENS['dev']}",
                    "x-fixture": rec.name,
                    "x-request-id": rid,
                    "content-type": "application/json",
                },
            )
            assert r.content == rec.body, (size, chunked, r.status_code)
            return r.status_code

        async def run() -> list[int]:
            limit = asyncio.Semaphore(6)
            async with httpx.AsyncClient(timeout=30) as client:

                async def bounded(size: int, chunked: bool) -> int:
                    async with limit:
                        return await one(client, size, chunked)

                return await asyncio.gather(*(bounded(size, chunked) for _ in range(2) for size in BODY_SIZES for chunked in (False, True)))

        statuses = asyncio.run(run())
        assert statuses == [200] * len(statuses)
    got = {v: body for _, h, body in replay.requests for k, v in h.items() if k.lower() == "x-request-id"}
    wrong = {rid: (len(want), len(got.get(rid, b""))) for rid, want in sent.items() if got.get(rid) != want}
    assert not wrong, f"{len(wrong)} of {len(sent)} request bodies changed on the way (sent, received bytes): {list(wrong.values())[:5]}"


def call_budget(s: Stack, path: str, body: bytes, who: str = "dev", **headers: str) -> str:
    rid = str(uuid.uuid4())
    r = httpx.post(
        s.url(path),
        content=body,
        timeout=10,
        headers={"authorization": f"Bearer {TOKENS[who]}", "x-request-id": rid, "content-type": "application/json", **headers},
    )
    assert r.status_code == 200, r.text
    return rid


def test_percent_encoded_and_dotted_paths_are_observed_and_charged(tmp_path, replay, rls):
    """Upstream frameworks answer /v1/chat/%63ompletions as /v1/chat/completions: Envoy
    normalises the path (normalize_path, merge_slashes) and the router matches normalised, so
    each is observed and charged."""
    chat, emb = load("aigw__chat-basic.yaml"), load("aigw__embeddings-dimensions.yaml")  # 385, 5 tokens
    paths = [
        ("/v1/chat/%63ompletions", chat),
        ("/v1/%65mbeddings", emb),
        ("//v1//chat/completions", chat),
        ("/v1/x/../chat/completions", chat),
        ("/v1/chat%2Fcompletions", chat),
    ]
    with budget_stack(tmp_path, replay.url, rls.address) as s:
        for path, rec in paths:
            rid = call_budget(s, path, rec.request_body, **{"x-fixture": rec.name})
            entry = s.log_entry(rid)
            assert entry["ratelimit_cost"] == entry["total_tokens"] == (385 if rec is chat else 5), path
        assert rls.wait_charged(team("dev"), 4 * 385 + 5) == 4 * 385 + 5


@pytest.mark.parametrize("mode", ["default", "fewer-messages"])
def test_a_served_call_without_usage_is_never_free(tmp_path, replay, rls, mode):
    """A stream without stream_options.include_usage reports no usage: charged its request's
    output ceiling when it set one, else budgets.unreportedCharge."""
    rec = load("aigw__chat-streaming.yaml")  # no include_usage: no usage in the stream
    capped = b'{"model":"gpt-5-nano","stream":true,"max_completion_tokens":256,"messages":[{"role":"user","content":"Hello!"}]}'
    with budget_stack(tmp_path, replay.url, rls.address, fewer_messages=mode == "fewer-messages", unreportedCharge=UNREPORTED) as s:
        bare = s.log_entry(call_budget(s, rec.path, rec.request_body, **{"x-fixture": rec.name}))
        assert bare["total_tokens"] is None and bare["ratelimit_cost"] == UNREPORTED
        assert s.log_entry(call_budget(s, rec.path, capped, who="ops", **{"x-fixture": rec.name}))["ratelimit_cost"] == 256
        assert rls.wait_charged(team("dev"), UNREPORTED) == UNREPORTED
        assert rls.wait_charged(team("ops"), 256) == 256


@pytest.mark.parametrize("mode", ["default", "fewer-messages"])
def test_a_stream_hung_up_before_its_usage_is_charged_its_ceiling(tmp_path, replay, rls, mode):
    rec = load("aigw__chat-streaming-detailed-usage.yaml")  # include_usage, max_completion_tokens 100
    with budget_stack(tmp_path, replay.url, rls.address, fewer_messages=mode == "fewer-messages", unreportedCharge=UNREPORTED) as s:
        rid = str(uuid.uuid4())
        headers = {
            "authorization": f"Bearer {TOKENS['dev']}",
            "x-fixture": rec.name,
            "x-gate": rid,
            "x-request-id": rid,
            "content-type": "application/json",
        }
        with httpx.Client(timeout=10) as client, client.stream("POST", s.url(rec.path), content=rec.request_body, headers=headers) as r:
            assert r.status_code == 200
            next(r.iter_raw())  # the first chunk; the usage is held back until we hang up
        assert replay.wait_disconnected(rid)
        assert s.log_entry(rid)["ratelimit_cost"] == 100
        assert rls.wait_charged(team("dev"), 100) == 100


def usage_body(model: str, prompt: int, completion: int, total: int) -> str:
    return json.dumps(
        {
            "id": "c",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total},
        }
    )


def test_an_inconsistent_total_is_charged_input_plus_output(tmp_path, replay, rls):
    body = usage_body("gpt-4o-mini", 200_000, 10, 0)  # total_tokens 0 beside 200k input tokens
    with budget_stack(tmp_path, replay.url, rls.address) as s:
        rid = call_budget(s, "/v1/chat/completions", b'{"model":"gpt-4o-mini","messages":[]}', **{"x-status": "200", "x-body": body})
        assert s.log_entry(rid)["ratelimit_cost"] == 200_010
        assert rls.wait_charged(team("dev"), 200_010) == 200_010


def test_micro_usd_unpriced_models_and_client_provider_headers_cost_money(tmp_path, replay, rls):
    """An unpriced model is charged its tokens at budgets.unpricedUsdPerMillionTokens; a client's
    x-llm-provider (ollama: no catalogue prices it) does not make a priced call free."""
    chat = b'{"model":"gpt-4o-mini","messages":[]}'
    with budget_stack(tmp_path, replay.url, rls.address, unit="micro_usd", unpricedUsdPerMillionTokens=40) as s:
        private = s.log_entry(
            call_budget(
                s,
                "/v1/chat/completions",
                b'{"model":"acme-private-1","messages":[]}',
                **{"x-status": "200", "x-body": usage_body("acme-private-1", 1000, 500, 1500)},
            )
        )
        assert private["cost_usd"] is None and private["ratelimit_cost"] == 1500 * 40
        dodged = s.log_entry(
            call_budget(
                s,
                "/v1/chat/completions",
                chat,
                who="ops",
                **{"x-llm-provider": "ollama", "x-status": "200", "x-body": usage_body("gpt-4o-mini", 1000, 500, 1500)},
            )
        )
        assert dodged["provider"] == "openai" and dodged["cost_usd"] > 0
        assert dodged["ratelimit_cost"] == round(dodged["cost_usd"] * 1_000_000)
        assert rls.wait_charged(team("dev"), 60_000) == 60_000
        assert rls.wait_charged(team("ops"), dodged["ratelimit_cost"]) == dodged["ratelimit_cost"]
