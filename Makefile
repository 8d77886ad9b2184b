# envoy-ai-extproc: `make run` starts the local stack, `make test` runs every test, `make help`
# lists the targets (each target's help is the first line of the comment block right above it).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: help install run test test-unit test-compose lint format format-check tools protos envoy-config deploy-rules bench soak clean bench-metrics bench-litellm-install test-litellm test-phoenix

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	@touch $(STAMP)

# Create .venv with the package and its test and dev extras (redone when pyproject.toml changes).
install: $(STAMP)

# This list: every target with the first line of the comment above it.
help:
	@awk '/^# / { if (!doc) doc = substr($$0, 3); next } \
	     /^[a-z][a-z0-9-]*:/ && !/:=/ { if (doc) printf "  %-22s %s\n", substr($$1, 1, length($$1) - 1), doc } \
	     { doc = "" }' $(MAKEFILE_LIST)

# Envoy + sidecar + built-in mock LLM on 127.0.0.1 (Envoy on :10000, metrics on :9092).
run: $(STAMP)
	$(VENV)/bin/extproc dev $(ARGS)

# Lint, type check, then every test (unit and end-to-end).
test: lint $(STAMP) tools
	$(PY) -m pytest -q -m "not compose and not litellm and not phoenix" $(PYTEST_ARGS)
	@if [ "$$CI" = true ]; then $(MAKE) --no-print-directory test-compose; \
	elif tests/compose/run.sh --check; then echo "test-compose: not run (CI unset): \`make test-compose\` runs docker-compose.yaml in Docker"; \
	else echo "test-compose: SKIPPED: Docker cannot run on this machine (and CI is not set)"; fi
	@if [ "$$CI" = true ]; then $(MAKE) --no-print-directory test-phoenix; \
	else echo "test-phoenix: not run (CI unset): \`make test-phoenix\` checks our traces in a real Arize Phoenix (~1 min; its first install ~3 min)"; fi

# docker-compose.yaml built and run in Docker, tested from the host through its published ports.
# Torn down afterwards (tests/compose/run.sh: installs Docker if missing, starts and stops dockerd,
# builds a local Debian base image when the public ones cannot be pulled). ~1 min warm.
test-compose: $(STAMP)
	tests/compose/run.sh

# Our traces checked in a real Arize Phoenix (~1 min; its pinned install ~2 min, once).
# tests/e2e/test_phoenix.py: the pinned arize-phoenix (tests/phoenix-requirements.txt) is installed
# into its own venv, .venv-phoenix, once per pin, `phoenix serve` starts on free loopback ports, Envoy + the sidecar run with
# deploy/tracing/phoenix.yaml pointed at it, and five calls (OpenAI cached and streamed, Anthropic
# with cache read + write, Gemini with thoughts, a 429) are checked through Phoenix's own REST and
# GraphQL APIs: span kind, tokens and their details, input/output, status, session/user, and
# Phoenix's cost (from its own price table) equal to our access log's cost_usd. Where the install
# is impossible the test is skipped and says why (-rs); it never skips silently.
test-phoenix: $(STAMP) tools
	$(PY) -m pytest -q -rs -m phoenix tests/e2e/test_phoenix.py

# The fast loop: parsers, codecs, processor, metrics, tracing, the gRPC server in-process (~30 s).
test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

# ruff format check, ruff (style, imports, likely bugs) and mypy (types), configured in pyproject.toml.
lint: $(STAMP) format-check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Rewrite the Python files in ruff's format (the pinned ruff, configured in pyproject.toml).
format: $(STAMP)
	$(VENV)/bin/ruff format .

# Check the Python files are in ruff's format, changing nothing (`make format` fixes them).
format-check: $(STAMP)
	$(VENV)/bin/ruff format --check .

TOOLS := prometheus wrk
# Debian tools the tests drive: Prometheus (metrics and PromQL tests) and wrk (benchmark).
# Installed when missing; if that fails, the tests needing them say so (skipped on a developer
# machine, failed under CI=true).
tools:
	@missing=""; for t in $(TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing$$missing (apt-get)"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } \
	  || echo "warning: could not install$$missing" >&2; \
	fi

# Cost of the metrics observer per call (single-process and multiprocess mode).
bench-metrics: $(STAMP)
	$(PY) -m bench.metrics_cost

# Regenerate extproc/_pb from protos/ (the result is committed; tests/unit/test_protos.py checks it).
protos: $(STAMP)
	$(PY) protos/generate.py

# Regenerate the Envoy configs from extproc/devtools/envoy_config.py (tests check they agree).
# envoy/envoy.yaml (reference), envoy/envoy-compose.yaml, deploy/kubernetes/envoy.yaml, envoy/envoy-budgets.yaml.
envoy-config: $(STAMP)
	$(VENV)/bin/extproc envoy-config > envoy/envoy.yaml
	$(VENV)/bin/extproc envoy-config --variant compose > envoy/envoy-compose.yaml
	$(VENV)/bin/extproc envoy-config --variant kubernetes > deploy/kubernetes/envoy.yaml
	$(VENV)/bin/extproc envoy-config --variant budgets > envoy/envoy-budgets.yaml

# Regenerate deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/alerts.yml (tests check).
deploy-rules: $(STAMP)
	$(PY) deploy/render_rules.py

# Benchmark: Envoy alone vs Envoy + sidecar (inline, observability-only), side by side; ~5 min.
# Results: bench/results/latest.{md,json}. BENCH_ARGS=--quick for a few-second smoke run.
bench: $(STAMP) tools
	$(PY) -m bench $(BENCH_ARGS)

# The bench's litellm stack end to end (--quick), after installing the pinned LiteLLM (~1 min).
test-litellm: bench-litellm-install tools
	$(PY) -m pytest -q -m litellm tests/e2e/test_bench.py

# The pinned LiteLLM proxy (bench/litellm-requirements.txt) in its own venv, .venv-litellm.
# For the bench's litellm stack: BENCH_ARGS="--stacks envoy,inline,litellm" (which also installs it on first use).
bench-litellm-install: $(STAMP)
	$(PY) -m bench.litellm --install

# Remove the venvs, caches and build output.
clean:
	rm -rf $(VENV) .venv-litellm .venv-phoenix .pytest_cache build *.egg-info

# 10 minutes of mixed traffic with client aborts; prints expected vs counted tokens and RSS.
soak: $(STAMP)
	$(PY) -m bench.soak $(SOAK_ARGS)
