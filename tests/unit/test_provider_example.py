"""The worked example in docs/providers.md is real code: it routes, parses and declares, and that
one module is all a provider needs (router, host table, tracing name, prices, finish reasons)."""

from __future__ import annotations

import re
import textwrap
from types import ModuleType

import pytest

from extproc import apis
from extproc.apis import finish, routing
from extproc.apis.routing import Router
from extproc.core.config import parse
from extproc.core.observation import Observation
from extproc.server.processor import Processor
from tests.support import REPO
from tests.unit.test_processor import Recorder, body, headers, meta, run


def _example() -> dict:
    text = (REPO / "docs" / "providers.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None
    ns: dict = {"__name__": "acme_example"}
    exec(compile(textwrap.dedent(block.group(1)), "docs/providers.md", "exec"), ns)  # noqa: S102
    return ns


def test_the_documented_provider_module_works():
    ns = _example()
    assert ns["ORDER"] < 100 and [p.name for p in ns["PROVIDERS"]] == ["acme"]
    match = Router(ns["ROUTES"]).resolve("/acme/v1/generate?x=1")
    assert match is not None and match.parser is ns["AcmeGenerate"]

    obs = Observation()
    parser = match.parser(obs)
    parser.feed_request(b'{"model": "acme-large", "stream": true, "temperature": 0.2}')
    parser.start_response(200, "text/event-stream")
    parser.feed_response(b'data: {"usage": {"in": 5, "out": 1}}\n\n', False)
    assert not parser.complete  # usage went by, but no end marker yet: a hang-up now is an abort
    parser.feed_response(b'data: {"usage": {"in": 5, "out": 7}, "stop": "done", "done": true}\n\n', True)
    assert parser.complete
    assert obs.request_model == "acme-large" and obs.streaming and obs.params == {"temperature": 0.2}
    assert (obs.usage.input_tokens, obs.usage.output_tokens, obs.usage.total()) == (5, 7, 12)


@pytest.fixture
def acme_installed(monkeypatch):
    """The example as if saved as extproc/apis/acme.py: discovered like every parser module."""
    module = ModuleType("extproc.apis.acme")
    module.__dict__.update(_example())
    real = apis.modules()
    monkeypatch.setattr(apis, "modules", lambda: tuple(sorted((*real, module), key=lambda m: m.ORDER)))
    monkeypatch.setattr(finish, "_table", None)
    caches = (routing._host_table, routing.provider_for_host, routing.declared, routing.model_makers)
    for cached in caches:
        cached.cache_clear()
    yield module
    for cached in caches:
        cached.cache_clear()


def test_the_example_module_alone_makes_a_provider(acme_installed):
    cfg = parse({"pricing": {"models": [{"model": "acme-large", "provider": "acme", "inputPerMillion": 1.0, "outputPerMillion": 2.0}]}})
    rec = Recorder()
    replies = run(
        Processor(cfg, [rec]),
        [
            headers("request_headers", **{":path": "/acme/v1/generate", ":method": "POST", ":authority": "api.acme.example"}),
            body("request_body", b'{"model": "acme-large"}', end=True),
            headers("response_headers", **{":status": "200", "content-type": "application/json"}),
            body("response_body", b'{"usage": {"in": 1000, "out": 500}, "stop": "token_limit"}', end=True),
        ],
    )
    call, m = rec.calls[0], meta(replies[-1])
    assert call.api == "acme.generate" and call.provider == "acme"  # from the module's host suffix
    assert routing.semconv_name("acme") == "acme"
    assert m["finish_reason"] == "length"  # from the module's FINISH_REASONS
    assert (m["prompt_tokens"], m["completion_tokens"], m["total_tokens"]) == (1000, 500, 1500)
    assert m["cost_usd"] == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)
    assert routing.catalogue_ids().get("acme") is None  # not in the catalogue: overrides only
