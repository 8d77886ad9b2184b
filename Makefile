# envoy-ai-extproc: `make run` starts the local stack, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test protos envoy-config deploy-rules bench soak clean prometheus bench-metrics

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# Envoy + sidecar + built-in mock LLM on 127.0.0.1 (Envoy on :10000, metrics on :9092).
run: $(STAMP)
	$(VENV)/bin/extproc dev $(ARGS)

test: $(STAMP) prometheus
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The Prometheus server tests/test_metrics_e2e.py scrapes the sidecar with (Debian's package),
# installed when `prometheus` is not on PATH. If that fails the test says so and is skipped.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing prometheus (apt-get)"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
	  || echo "warning: could not install prometheus; tests needing it will be skipped" >&2; }

# Cost of the metrics observer per call (single-process and multiprocess mode).
bench-metrics: $(STAMP)
	$(PY) bench/metrics_cost.py

# Regenerate extproc/_pb from protos/ (the result is committed; tests/test_protos.py checks it).
protos: $(STAMP)
	$(PY) protos/generate.py

# Regenerate the Envoy configs from extproc/envoy_config.py (tests check they agree):
# envoy/envoy.yaml (reference), envoy/envoy-compose.yaml, deploy/kubernetes/envoy.yaml.
envoy-config: $(STAMP)
	$(VENV)/bin/extproc envoy-config > envoy/envoy.yaml
	$(VENV)/bin/extproc envoy-config --variant compose > envoy/envoy-compose.yaml
	$(VENV)/bin/extproc envoy-config --variant kubernetes > deploy/kubernetes/envoy.yaml

# Regenerate deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/alerts.yml (tests check).
deploy-rules: $(STAMP)
	$(PY) deploy/render_rules.py

# Envoy alone vs Envoy + sidecar (inline, observability-only), side by side; ~5 min on 2 CPUs.
# Results: bench/results/latest.{md,json}. BENCH_ARGS=--quick for a few-second smoke run.
bench: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# 10 minutes of mixed traffic with client aborts; prints expected vs counted tokens and RSS.
soak: $(STAMP)
	$(PY) bench/soak.py $(SOAK_ARGS)
