"""The bench's LiteLLM stack: its generated config, the token counter it scrapes, the ratios and the
side-by-side summary (pure logic; LiteLLM itself is not needed)."""

from __future__ import annotations

import orjson
import yaml

from bench import litellm
from bench.run import QUICK, Profile, Stack, delta, litellm_side_by_side, wrk_script
from bench.upstream import MODEL, STREAM_REQUEST


def test_config_two_deployments_on_the_bench_upstreams() -> None:
    cfg = litellm.config("http://127.0.0.1:1/v1", "http://127.0.0.1:2/sse/v1", MODEL, master_key="sk-x")
    by_name = {m["model_name"]: m["litellm_params"] for m in cfg["model_list"]}
    # LiteLLM posts to <api_base>/chat/completions: the Envoy stacks' upstream paths
    assert by_name[MODEL] == {"model": f"openai/{MODEL}", "api_base": "http://127.0.0.1:1/v1", "api_key": "bench"}
    assert by_name[litellm.SSE_MODEL]["api_base"] == "http://127.0.0.1:2/sse/v1"
    assert by_name[litellm.SSE_MODEL]["model"] == f"openai/{MODEL}"  # the upstream sees the same model
    assert cfg["litellm_settings"]["callbacks"] == ["prometheus"]  # token metrics on
    general = cfg["general_settings"]
    assert general["master_key"] == "sk-x"
    assert general["forward_client_headers_to_llm_api"] is True  # x-chunks reaches the stream upstream
    assert "database_url" not in general
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg


def test_command_workers_and_quiet_env() -> None:
    cmd = litellm.command(litellm.VENV / "c.yaml", 4000, 3)
    assert cmd[cmd.index("--num_workers") + 1] == "3"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert litellm.ENV["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    assert litellm.ENV["LITELLM_TELEMETRY_DISABLED"] == "true"


def test_prompt_tokens_sums_label_sets() -> None:
    text = (
        "# HELP litellm_input_tokens_metric_total Total number of input tokens from LLM requests\n"
        "# TYPE litellm_input_tokens_metric_total counter\n"
        'litellm_input_tokens_metric_total{model="gpt-4o-mini",requested_model="gpt-4o-mini"} 36.0\n'
        'litellm_input_tokens_metric_total{model="gpt-4o-mini",requested_model="gpt-4o-mini-sse"} 9.0\n'
        'litellm_input_tokens_metric_created{model="gpt-4o-mini"} 1.7e9\n'
        'litellm_output_tokens_metric_total{model="gpt-4o-mini"} 144.0\n'
    )
    assert litellm.prompt_tokens(text) == 45.0
    assert litellm.prompt_tokens("") == 0.0


def test_times_less() -> None:
    assert litellm.times_less(40_000, 2_000) == 20.0
    assert litellm.times_less(None, 2_000) is None
    assert litellm.times_less(40_000, 0) is None


def test_litellm_stack_requests() -> None:
    s = Stack("litellm", litellm.VENV, [], 2, 2)
    assert not s.has_sidecar and s.is_litellm
    assert s.sse_path == "/v1/chat/completions"  # one path; the deployment is picked by model name
    assert orjson.loads(s.stream_body) == {**orjson.loads(STREAM_REQUEST), "model": litellm.SSE_MODEL}
    assert s.headers == {"authorization": f"Bearer {litellm.MASTER_KEY}"}
    inline = Stack("inline", litellm.VENV, [], 2, 2)
    assert inline.has_sidecar and inline.sse_path.startswith("/sse/") and inline.headers == {}


def test_wrk_script_headers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    text = wrk_script(tmp_path / "s.lua", b"{}", {"authorization": "Bearer k"}).read_text()
    assert 'wrk.headers["authorization"] = "Bearer k"' in text


def test_delta_leaves_the_scrape_out() -> None:
    def snap(cpu: float, end: float, t: float) -> dict:
        c = {"sidecar_cpu": None, "envoy_cpu": None, "litellm_cpu": cpu, "worker_cpu": {1: cpu / 2, 2: cpu / 2}}
        e = {**c, "litellm_cpu": end}
        return {**c, "end": e, "counts": {"observed": t}, "msgs": {}, "t": t}

    d = delta(snap(1.0, 1.2, 0.0), snap(3.2, 3.4, 10.0))
    assert d["litellm_cpu_s"] == 2.0  # 3.2 - 1.2: neither scrape counted
    assert d["proxy_cpu_s"] == 2.0
    assert d["sidecar_cpu_s"] is None and d["envoy_cpu_s"] is None
    assert d["counts"] == {"observed": 10.0}


def _res(proxy: float, sidecar: float | None, envoy: float | None, p50: float, rss: float | None) -> dict:
    scen = {
        "requests": 1000,
        "events": 1000,
        "proxy_cpu_s": proxy,
        "sidecar_cpu_s": sidecar,
        "envoy_cpu_s": envoy,
        "p50_ms": p50,
        "p99_ms": 2 * p50,
        "ttfb_p50_ms": p50,
        "chunk_p50_ms": p50,
    }
    r = {f"c{QUICK.concurrency[-1]}": scen, f"rate{QUICK.rates[0]}": scen, "stream": scen}
    if rss is not None:
        r["hold"] = {"rss_idle_max_mb": rss, "rss_streams_max_mb": rss + 1}
    return r


def test_side_by_side_ratios() -> None:
    res = {
        "envoy": _res(proxy=0.5, sidecar=0.0, envoy=0.5, p50=1.0, rss=None),
        "inline": _res(proxy=2.5, sidecar=2.0, envoy=0.5, p50=2.0, rss=50.0),
        "litellm": _res(proxy=40.0, sidecar=None, envoy=None, p50=21.0, rss=400.0),
    }
    md = litellm_side_by_side(res, QUICK)
    cpu_row = next(line for line in md.splitlines() if line.startswith(f"| CPU per call, c={QUICK.concurrency[-1]}"))
    # LiteLLM 40,000 us per call; Envoy alone 500 (x80); the sidecar 2,000 (x20); Envoy + sidecar 2,500 (x16)
    assert "| 40,000 | 500 (x80.0 less) | sidecar 2,000: **x20.0 less**; Envoy + sidecar 2,500: x16.0 less |" in cpu_row
    added = next(line for line in md.splitlines() if line.startswith("| added p50 / p99"))
    assert "+20.00 / +40.00" in added and "+1.00 / +2.00 (LiteLLM adds x20.0 / x20.0)" in added
    assert "| 400.0 / 401.0 | - / - | 50.0 / 51.0 |" in md
    assert litellm_side_by_side({k: v for k, v in res.items() if k != "litellm"}, QUICK) == ""


def test_profile_litellm_rate_is_sustainable() -> None:
    assert Profile().litellm_rate <= Profile().litellm_max_rate < min(Profile().rates)
