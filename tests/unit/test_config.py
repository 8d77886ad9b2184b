from __future__ import annotations

import subprocess
import sys

import pytest

from extproc.core.config import ConfigError, load, parse


def test_defaults():
    cfg = parse({})
    assert cfg.listen == "127.0.0.1:18080"  # loopback by default
    assert cfg.metadata.namespace == "ai.gateway.kgateway.dev"


@pytest.mark.parametrize(
    "data,key",
    [
        ({"listne": "x"}, "listne: unknown key"),
        ({"limits": {"maxBodyBytes": "lots"}}, "limits.maxBodyBytes"),
        ({"listen": "no-port"}, "listen"),
        ({"metadata": {"namespace": 5}}, "metadata.namespace"),
        ({"providers": {"routes": [{"pathRegex": "(", "api": "openai.chat"}]}}, "providers.routes.0.pathRegex"),
        ({"logging": {"level": "loud"}}, "logging.level"),
    ],
)
def test_bad_config_names_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        parse(data, "c.yaml")
    assert key in str(e.value) and "\n" not in str(e.value)


def test_serve_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stats:\n  port: ninety\n")
    p = subprocess.run([sys.executable, "-m", "extproc", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "stats.port" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_unknown_api_in_route_mapping_is_a_config_error():
    from extproc.server.processor import Processor

    with pytest.raises(ConfigError, match="providers.routes.0.api"):
        Processor(parse({"providers": {"routes": [{"pathRegex": "^/x$", "api": "nope"}]}}))


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.yaml")
    (tmp_path / "b.yaml").write_text("a: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(tmp_path / "b.yaml")


@pytest.mark.parametrize("value, module", [(None, "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_event_loop(value, module):
    """eventLoop picks the workers' event loop (uvloop by default); anything else is a config error."""
    import asyncio

    from extproc.server.supervisor import run_loop

    seen = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])

    run_loop(parse({} if value is None else {"eventLoop": value}), main())
    assert seen == [module]
    with pytest.raises(ConfigError, match="eventLoop"):
        parse({"eventLoop": "trio"})
