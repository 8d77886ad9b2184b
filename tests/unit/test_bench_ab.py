"""`python -m bench.ab`'s command line: its ext_proc modes are the CLI's (``extproc.devtools.modes``)."""

from __future__ import annotations

import pytest

from bench import ab
from extproc.devtools import modes


def _mode_action():
    return next(x for x in ab.parser()._actions if x.dest == "mode")


def test_mode_choices_and_default_are_the_clis() -> None:
    action = _mode_action()
    assert list(action.choices) == list(modes.MODES)
    assert action.default == modes.DEFAULT


@pytest.mark.parametrize("name", list(modes.MODES))
def test_each_cli_mode_name_selects_that_mode(name: str) -> None:
    assert ab.mode_of(ab.parser().parse_args(["--mode", name])) is modes.MODES[name]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--observe"], "observability"),
        (["--observe", "--mode", "fewer-messages"], "observability-fewer-messages"),
        (["--observe", "--mode", "observability"], "observability"),
    ],
)
def test_observe_still_selects_the_observability_modes(argv: list[str], expected: str) -> None:
    assert ab.mode_of(ab.parser().parse_args(argv)) == modes.MODES[expected]
