#!/usr/bin/env bash
# `make test-compose`: docker-compose.yaml built and run on this machine, tested from the host.
#
#  1. installs docker.io, docker-compose (v1) and debootstrap with apt-get when missing;
#  2. starts dockerd when none answers (and stops that one at the end);
#  3. without the public base images on this machine (no registry here), builds a local Debian
#     bookworm base with debootstrap (rootfs tarball cached in ~/.cache/envoy-ai-extproc/);
#  4. runs tests/compose/test_compose.py, whose session fixture builds the images, brings the
#     stack up (docker-compose.yaml + tests/compose/docker-compose.local.yaml) and takes it down;
#  5. on any exit (pass, failure, Ctrl-C): removes every container, network and volume of the test
#     project, and stops the dockerd it started.
#
# Environment:
#   COMPOSE_TEST_BASE=local|public  base images: a local debootstrap import (default when the public
#                                   ones are not already on this machine) or the public ones
#   COMPOSE_TEST_BREAK=no-sidecar|wrong-port   sabotage the stack (the tests must then fail)
#   COMPOSE_TEST_KEEP_IMAGES=0      also remove the images built (default: kept, for a warm rerun)
#   PYTEST_ARGS                     extra pytest arguments
#   run.sh --check                  exit 0 if Docker can run here (used by `make test`), else 1
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
PY=${PY:-$REPO/.venv/bin/python}
PROJECT=${COMPOSE_TEST_PROJECT:-envoy-ai-extproc-test}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/envoy-ai-extproc
PYTHON_IMAGE=python:3.11.10-slim-bookworm  # the Dockerfile's default base
DEBIAN_IMAGE=debian:12.8-slim              # tests/compose/images.Dockerfile's default base
LOCAL_ROOTFS_IMAGE=envoy-ai-extproc-rootfs:bookworm
LOCAL_BASE_IMAGE=envoy-ai-extproc-base:bookworm
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0  # the classic builder: no buildx plugin needed

log() { printf '[test-compose %s] %s\n' "$(date +%T)" "$*" >&2; }
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

docker_ok() { docker info >/dev/null 2>&1; }

if [ "${1:-}" = --check ]; then
  docker_ok && exit 0
  # No daemon answering: can one be started here? (root or sudo, the binaries or apt-get)
  { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; } && { command -v dockerd >/dev/null || command -v apt-get >/dev/null; } && exit 0
  exit 1
fi

# ---- 1. packages --------------------------------------------------------------------------
missing=""
command -v dockerd >/dev/null || missing="$missing docker.io"
command -v docker-compose >/dev/null || missing="$missing docker-compose"
if ! docker_ok && ! docker image inspect "$LOCAL_ROOTFS_IMAGE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || missing="$missing debootstrap"
fi
if [ -n "$missing" ]; then
  log "installing$missing (apt-get)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

# ---- 2. dockerd ---------------------------------------------------------------------------
STARTED_DOCKERD=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if docker_ok; then
    # Whatever the test session left (it takes the stack down itself; this is the safety net).
    local ids
    ids=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
    [ -z "$ids" ] || { log "removing leftover containers"; docker rm -f -v $ids >/dev/null || true; }
    ids=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
    [ -z "$ids" ] || docker network rm $ids >/dev/null || true
    ids=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
    [ -z "$ids" ] || docker volume rm -f $ids >/dev/null || true
    if [ "${COMPOSE_TEST_KEEP_IMAGES:-1}" = 0 ]; then
      ids=$(docker images -q --filter "label=org.opencontainers.image.title=envoy-ai-extproc-compose-test")
      [ -z "$ids" ] || docker rmi -f $ids >/dev/null || true
    fi
  fi
  if [ -n "$STARTED_DOCKERD" ]; then
    log "stopping the dockerd started here (pid $STARTED_DOCKERD)"
    $SUDO kill -TERM "$STARTED_DOCKERD" 2>/dev/null || true
    for _ in $(seq 1 60); do $SUDO kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 0.5; done
    if $SUDO kill -0 "$STARTED_DOCKERD" 2>/dev/null; then log "dockerd did not stop: SIGKILL"; $SUDO kill -KILL "$STARTED_DOCKERD" || true; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM

if ! docker_ok; then
  mkdir -p "$CACHE"
  log "starting dockerd (log: $CACHE/dockerd.log)"
  # Its own session: a Ctrl-C in this terminal reaches the tests (which take the stack down),
  # not the daemon they need for that.
  $SUDO setsid dockerd >"$CACHE/dockerd.log" 2>&1 </dev/null &
  launcher=$!
  for _ in $(seq 1 60); do docker_ok && break; sleep 0.5; done
  STARTED_DOCKERD=$(cat /var/run/docker.pid 2>/dev/null || echo "$launcher")
  docker_ok || { log "dockerd did not come up; see $CACHE/dockerd.log"; exit 1; }
fi

# ---- 3. base images -----------------------------------------------------------------------
# The host's pip settings the builds need: the index (build argument INDEX_URL) and the CA bundle
# pip trusts (copied into the local base image, with PIP_CERT pointing at it).
pip_setting() {  # env var, else pip's config (global, then install section)
  local env=$1 key=$2 v
  v=${!env:-}
  [ -n "$v" ] || v=$("$PY" -m pip config get "global.$key" 2>/dev/null || true)
  [ -n "$v" ] || v=$("$PY" -m pip config get "install.$key" 2>/dev/null || true)
  printf '%s' "$v"
}
INDEX_URL=$(pip_setting PIP_INDEX_URL index-url)
case "$INDEX_URL" in file:*|*://localhost*|*://127.*) INDEX_URL="" ;; esac  # not reachable from a container
PIP_CERT_FILE=$(pip_setting PIP_CERT cert)
export COMPOSE_TEST_INDEX_URL=$INDEX_URL

debian_mirror() {
  local m=""
  m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v -- '-security' | head -1 || true)
  [ -n "$m" ] || m=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '$3 ~ /^bookworm$/ {print $2}' | head -1 || true)
  printf '%s' "${m:-http://deb.debian.org/debian}"
}

build_local_base() {
  local tarball="$CACHE/bookworm-minbase.tar"
  if ! docker image inspect "$LOCAL_ROOTFS_IMAGE" >/dev/null 2>&1; then
    if [ ! -s "$tarball" ]; then
      command -v debootstrap >/dev/null || { $SUDO apt-get update -qq; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap >/dev/null; }
      local mirror rootfs
      mirror=$(debian_mirror)
      rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
      log "debootstrap --variant=minbase bookworm (once; cached in $tarball)"
      $SUDO debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
        || { log "debootstrap failed; see $CACHE/debootstrap.log"; $SUDO rm -rf "$rootfs"; exit 1; }
      # As Debian's own images: no package cache or lists kept, and apt cleans up after itself.
      $SUDO tee "$rootfs/etc/apt/apt.conf.d/docker-clean" >/dev/null <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
EOF
      $SUDO tar -C "$rootfs" --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/lib/apt/lists/*' \
        --exclude='./var/cache/apt/*.bin' -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
      $SUDO rm -rf "$rootfs"
    fi
    log "docker import $tarball"
    docker import - "$LOCAL_ROOTFS_IMAGE" <"$tarball" >/dev/null
  fi
  # The base the builds use: the rootfs plus this machine's CA bundle for pip (when pip has one).
  local ctx
  ctx=$(mktemp -d)
  {
    echo "FROM $LOCAL_ROOTFS_IMAGE"
    echo "LABEL org.opencontainers.image.title=envoy-ai-extproc-compose-test"
    if [ -n "$PIP_CERT_FILE" ] && [ -r "$PIP_CERT_FILE" ]; then
      cp "$PIP_CERT_FILE" "$ctx/pip-cert.pem"
      echo "COPY pip-cert.pem /usr/local/share/envoy-ai-extproc/pip-cert.pem"
      echo "ENV PIP_CERT=/usr/local/share/envoy-ai-extproc/pip-cert.pem"
    fi
  } >"$ctx/Dockerfile"
  local out
  out=$(docker build -q -t "$LOCAL_BASE_IMAGE" "$ctx" 2>&1) || { printf '%s\n' "$out" >&2; rm -rf "$ctx"; exit 1; }
  rm -rf "$ctx"
}

BASE_MODE=${COMPOSE_TEST_BASE:-}
if [ -z "$BASE_MODE" ]; then
  if docker image inspect "$PYTHON_IMAGE" >/dev/null 2>&1 && docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
    BASE_MODE=public
  else
    BASE_MODE=local
  fi
fi
if [ "$BASE_MODE" = local ]; then
  build_local_base
  export COMPOSE_TEST_PYTHON_IMAGE=$LOCAL_BASE_IMAGE COMPOSE_TEST_DEBIAN_IMAGE=$LOCAL_BASE_IMAGE
else
  export COMPOSE_TEST_PYTHON_IMAGE=$PYTHON_IMAGE COMPOSE_TEST_DEBIAN_IMAGE=$DEBIAN_IMAGE
fi
log "base images: $BASE_MODE ($COMPOSE_TEST_PYTHON_IMAGE)"

# ---- 4. the tests (build, up, test, down: the `stack` fixture in tests/compose/compose_stack.py)
export EXTPROC_COMPOSE_TEST=1 COMPOSE_TEST_PROJECT=$PROJECT
# shellcheck disable=SC2086
"$PY" -m pytest -q -p no:cacheprovider -m compose tests/compose ${PYTEST_ARGS:-}
