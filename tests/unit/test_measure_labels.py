"""``Measurer`` keeps the label sets of the calls it measured, by what they are made of: a call
measured from a kept set must get exactly the labels, and the guard exactly the folds, that
measuring it afresh gives."""

from __future__ import annotations

import random

from extproc.core import config
from extproc.core.call import CLIENT_ABORT, OK, Call
from extproc.core.observation import Observation
from extproc.telemetry import measurements
from extproc.telemetry.labels import OVERFLOW
from extproc.telemetry.measurements import Measurer


def _calls(n: int, seed: int) -> list[Call]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        obs = Observation(
            operation=rng.choice(["chat", "embeddings", "tools/call", "x" * 300]),
            request_model=rng.choice([None, "", "gpt-4o", f"m-{rng.randrange(12)}", "m" * 300, OVERFLOW]),
            response_model=rng.choice([None, "gpt-4o-2024", f"r-{rng.randrange(12)}"]),
            error_type=rng.choice([None, "rate_limit_exceeded", f"e-{rng.randrange(6)}"]),
        )
        out.append(
            Call(
                obs=obs,
                provider=rng.choice(["openai", "anthropic", f"p-{rng.randrange(6)}"]),
                api=rng.choice(["openai.chat", "mcp"]),
                status=rng.choice([0, 200, 429, 500]),
                outcome=rng.choice([OK, "error", CLIENT_ABORT, "no_response"]),
            )
        )
    return out


def test_kept_label_sets_give_what_measuring_afresh_gives_and_count_every_fold() -> None:
    stats = config.StatsConfig(max_label_values=8)  # small: many values fold, repeatedly
    kept, fresh = Measurer(stats), Measurer(stats)
    for call in _calls(3000, seed=3):
        got = kept.measure(call)
        want = fresh._labels(call)  # what every call went through before label sets were kept
        assert got is not None and got.labels == want
        assert kept.guard.overflowed == fresh.guard.overflowed
    assert any(OVERFLOW in labels for labels in (fresh._labels(c) for c in _calls(50, seed=4)))
    assert kept._kept and all(OVERFLOW not in labels for labels in kept._kept.values())


def test_kept_label_sets_are_bounded(monkeypatch) -> None:
    monkeypatch.setattr(measurements, "_LABELS_KEPT", 5)
    m = Measurer(config.StatsConfig())
    for i in range(12):
        call = Call(obs=Observation(request_model=f"model-{i}"), provider="openai", api="openai.chat", status=200, outcome=OK)
        assert m.measure(call).labels[2] == f"model-{i}"  # type: ignore[union-attr]
        assert len(m._kept) <= 5
