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


def _bootstrap() -> dict:
    from extproc.devtools import envoy_config

    return envoy_config.to_dict(
        envoy_config.bootstrap(
            upstreams=[envoy_config.Upstream("/", "http://127.0.0.1:1")],
            listen="127.0.0.1:2",
            extproc="127.0.0.1:3",
            access_log="/dev/null",
            admin="127.0.0.1:4",
        )
    )


def test_envoy_variant_choices_are_the_named_variants() -> None:
    action = next(x for x in ab.parser()._actions if x.dest == "envoy_variant")
    assert list(action.choices) == list(ab.ENVOY_VARIANTS)


@pytest.mark.parametrize("name", [n for n in ab.ENVOY_VARIANTS if n != "base"])
def test_each_envoy_variant_changes_the_generated_bootstrap(name: str) -> None:
    base, boot = _bootstrap(), _bootstrap()
    ab.ENVOY_VARIANTS[name](boot)
    assert boot != base


def test_envoy_variant_base_leaves_the_bootstrap_alone() -> None:
    boot = _bootstrap()
    ab.ENVOY_VARIANTS["base"](boot)
    assert boot == _bootstrap()


def test_runtime_variants_set_the_flag_in_a_static_layer() -> None:
    boot = _bootstrap()
    ab.ENVOY_VARIANTS["oghttp2-off"](boot)
    assert boot["layered_runtime"]["layers"][0]["static_layer"] == {"envoy.reloadable_features.http2_use_oghttp2": False}


def test_google_grpc_variant_targets_the_ext_proc_endpoint() -> None:
    boot = _bootstrap()
    ab.ENVOY_VARIANTS["google-grpc"](boot)
    assert ab._ext_proc_filter(boot)["grpc_service"]["google_grpc"]["target_uri"] == "127.0.0.1:3"
