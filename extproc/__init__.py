"""envoy-ai-extproc: an Envoy ext_proc sidecar that observes LLM traffic.

It never changes a byte of the traffic; it reads the model, streaming flag and token usage and
hands them to Envoy as dynamic metadata, to Prometheus as metrics and to OTLP as traces.
"""

__version__ = "0.1.0"
