"""The worked example in docs/providers.md is real code: it routes, parses and declares."""
from __future__ import annotations

import re
import textwrap

from extproc.apis.routing import Router
from extproc.core.observation import Observation
from tests.support import REPO


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
    parser.feed_response(b'data: {"usage": {"in": 5, "out": 7}, "done": true}\n\n', True)
    assert parser.complete
    assert obs.request_model == "acme-large" and obs.streaming and obs.params == {"temperature": 0.2}
    assert (obs.usage.input_tokens, obs.usage.output_tokens, obs.usage.total()) == (5, 7, 12)
