# envoy-ai-extproc: `make run` starts the local stack, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test protos envoy-config deploy-rules bench soak clean

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

# Regenerate the Envoy configs from extproc/envoy_config.py (tests check they agree):
# envoy/envoy.yaml (reference), envoy/envoy-compose.yaml, deploy/kubernetes/envoy.yaml.
envoy-config: $(STAMP)
	$(VENV)/bin/extproc envoy-config > envoy/envoy.yaml
	$(VENV)/bin/extproc envoy-config --variant compose > envoy/envoy-compose.yaml
	$(VENV)/bin/extproc envoy-config --variant kubernetes > deploy/kubernetes/envoy.yaml

# Regenerate deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/alerts.yml (tests check).
deploy-rules: $(STAMP)
	$(PY) deploy/render_rules.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# 10 minutes of mixed traffic with client aborts; prints expected vs counted tokens and RSS.
soak: $(STAMP)
	$(PY) bench/soak.py $(SOAK_ARGS)
