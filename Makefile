# envoy-ai-extproc: `make run` starts the local stack, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test protos envoy-config bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# Envoy + sidecar + built-in mock LLM on 127.0.0.1 (Envoy on :10000, metrics on :9092).
run: $(STAMP)
	$(VENV)/bin/extproc dev $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Regenerate extproc/_pb from protos/ (the result is committed; tests/test_protos.py checks it).
protos: $(STAMP)
	$(PY) protos/generate.py

# Regenerate envoy/envoy.yaml from extproc/envoy_config.py (tests check they agree).
envoy-config: $(STAMP)
	$(VENV)/bin/extproc envoy-config > envoy/envoy.yaml

# Envoy alone vs Envoy + sidecar (inline, observability-only), side by side; ~5 min on 2 CPUs.
# Results: bench/results/latest.{md,json}. BENCH_ARGS=--quick for a few-second smoke run.
bench: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
