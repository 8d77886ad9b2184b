"""`make bench`: Envoy alone vs Envoy + sidecar, side by side, on 127.0.0.1 (see docs/performance.md)."""
