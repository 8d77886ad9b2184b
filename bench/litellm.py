"""The LiteLLM proxy as a bench stack (``python -m bench --stacks envoy,inline,litellm``).

LiteLLM is installed, pinned (``bench/litellm-requirements.txt``), in a venv of its own
(``.venv-litellm``), never in the project's: ``make bench-litellm-install`` or
``python -m bench.litellm --install``, or ``python -m bench`` on first use of the stack.

The proxy runs on 127.0.0.1 with a generated ``config.yaml``: two deployments on the bench's
upstreams (``gpt-4o-mini`` on the ``direct_response`` Envoy, ``gpt-4o-mini-sse`` on
``bench/upstream.py``), its Prometheus callback on (token counters on ``/metrics/``; free in the
pinned release), client ``x-`` headers forwarded (the stream upstream reads ``x-chunks``), no
database, telemetry off, the model cost map read from the package (no fetch), logs at ERROR.
It refuses to start without a master key, so the bench sets one and the clients send it.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-litellm"
REQUIREMENTS = ROOT / "bench" / "litellm-requirements.txt"
MASTER_KEY = "sk-bench-8d2f0c1e4b7a49d6a3c5e0f1b2d3c4e5"  # local only: LiteLLM will not start without one
SSE_MODEL = "gpt-4o-mini-sse"  # the deployment on the stream upstream (a client picks it by model name)
TOKEN_METRIC = "litellm_input_tokens_metric_total"  # prompt tokens LiteLLM counted (its Prometheus callback)
ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map from GitHub at start
    "LITELLM_TELEMETRY_DISABLED": "true",
    "LITELLM_LOG": "ERROR",
}


def python() -> Path:
    return VENV / "bin" / "python"


def _stamp() -> Path:
    return VENV / ".installed-stamp"


def _wanted() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def installed() -> bool:
    """The venv exists and was installed from the current pin file."""
    try:
        return python().exists() and _stamp().read_text().strip() == _wanted()
    except OSError:
        return False


def install(log: Callable[[str], None] = print) -> None:
    """Create ``.venv-litellm`` (if missing) and install the pinned proxy into it."""
    if installed():
        return
    log(f"bench: installing the pinned LiteLLM proxy into {VENV} (a few minutes, once)")
    if not python().exists():
        base = getattr(sys, "_base_executable", sys.executable)  # a venv is made from the base interpreter
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python()), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True)
    _stamp().write_text(_wanted() + "\n")


def config(chat_base: str, sse_base: str, model: str, master_key: str = MASTER_KEY) -> dict[str, Any]:
    """LiteLLM's ``config.yaml``: ``model`` on ``chat_base``, ``SSE_MODEL`` on ``sse_base`` (LiteLLM
    posts to ``<api_base>/chat/completions``), token metrics on, no database."""

    def deployment(name: str, base: str) -> dict[str, Any]:
        return {"model_name": name, "litellm_params": {"model": f"openai/{model}", "api_base": base, "api_key": "bench"}}

    return {
        "model_list": [deployment(model, chat_base), deployment(SSE_MODEL, sse_base)],
        "litellm_settings": {"callbacks": ["prometheus"]},
        "general_settings": {"master_key": master_key, "forward_client_headers_to_llm_api": True},
    }


def command(cfg: Path, port: int, workers: int) -> list[str]:
    return [
        str(VENV / "bin" / "litellm"),
        "--config",
        str(cfg),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        str(workers),
        # a worker answers uvicorn's health check only once LiteLLM has imported (~10-60 s on a
        # loaded machine); the default 5 s has uvicorn kill and respawn it forever
        "--timeout_worker_healthcheck",
        "300",
    ]


def prompt_tokens(metrics_text: str) -> float:
    """Sum of LiteLLM's prompt-token counter over its label sets, from a ``/metrics`` page."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(TOKEN_METRIC) and line[len(TOKEN_METRIC) : len(TOKEN_METRIC) + 1] in ("{", " "):
            value = float(line.rsplit(" ", 1)[1])
            if math.isfinite(value):
                total += value
    return total


def times_less(theirs: float | None, ours: float | None) -> float | None:
    """How many times less ``ours`` is than ``theirs`` (None when either is missing or ours is 0)."""
    if theirs is None or ours is None or ours <= 0:
        return None
    return theirs / ours


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.litellm", description="the bench's pinned LiteLLM proxy venv")
    ap.add_argument("--install", action="store_true", help=f"create {VENV.name} and install {REQUIREMENTS.name}")
    args = ap.parse_args(argv)
    if args.install:
        install()
    print(f"{VENV}: {'installed' if installed() else 'absent (or out of date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
