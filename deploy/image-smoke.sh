#!/usr/bin/env bash
# Build the CPU image from this repository's Dockerfile with podman and smoke-test it
# (`make image-test` runs this). On a machine like ours (../shared/CONTAINERS.md): no image
# registry (the base images are made from Debian packages, deploy/docker/debian-base.sh), torch's
# CPU wheel in $PIP_FIND_LINKS, pip's CA bundle in $PIP_CERT (a build secret).
#
# Checks, each printed PASS/FAIL, then a summary (image size, build time, time to /ready):
#   the runtime image has no torch, transformers or optimum; it runs as uid 10001 on a read-only
#   root filesystem (as deploy/k8s: --read-only, tmpfs /tmp, a volume for the cache, all
#   capabilities dropped, no new privileges); /ready turns 200 within the HEALTHCHECK's start
#   period and the HEALTHCHECK passes; the official openai client's chat request gets energy in
#   `usage`; /metrics has the contract metrics; a Prometheus container (Debian's prometheus,
#   image made the same way) with deploy/prometheus scrapes the service by DNS as in compose;
#   `podman stop` (SIGTERM) during a streamed generation lets it finish and the exit code is 0.
#
# Environment: IMAGE (localhost/greenroute:cpu), SMOKE_PORT (18000), SMOKE_PROM_PORT (19090),
# SMOKE_PYTHON (a python with `openai`; default: a venv made under ~/.cache/greenroute),
# BUILD_THREADS (2), KEEP=1 keeps the containers and network for inspection.
# Wrap it in `flock /tmp/heavy.lock` on a shared machine: the first build takes ~30 min on 2 CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/greenroute:cpu}
PORT=${SMOKE_PORT:-18000}
PROM_PORT=${SMOKE_PROM_PORT:-19090}
NET=greenroute-smoke
CTR=greenroute-smoke
PROM_CTR=greenroute-smoke-prometheus
VOLUME=greenroute-smoke-cache
PROM_VOLUME=greenroute-smoke-prometheus
P=(podman --runtime runc --cgroup-manager cgroupfs)
# Without systemd podman cannot schedule HEALTHCHECK timers and logs so on every run: hide that
# line (the health check is run explicitly below with `podman healthcheck run`).
quiet() { "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }
# podman's default rlimits (nofile 1048576, ...) exceed this VM's hard limits: runc would refuse
# to start the container. Stay within them.
nofile=$(ulimit -Hn)
if [ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ]; then nofile=1048576; fi
ULIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit nproc=16384:16384)

for tool in podman runc debootstrap curl; do
    command -v "$tool" > /dev/null || { echo "image-smoke: $tool is missing (apt-get install -y podman runc debootstrap curl)" >&2; exit 2; }
done
: "${PIP_FIND_LINKS:?PIP_FIND_LINKS (the directory holding the torch CPU wheel) is not set}"
ls "$PIP_FIND_LINKS"/torch-*+cpu-*.whl > /dev/null

stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }
echo "== image smoke test: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- || echo '+dirty'), $(stamp), $(nproc) CPUs"

cleanup() {
    if [ "${KEEP:-0}" = 1 ]; then return; fi
    "${P[@]}" rm -f -t 0 "$CTR" "$PROM_CTR" > /dev/null 2>&1 || true
    "${P[@]}" volume rm -f "$VOLUME" "$PROM_VOLUME" > /dev/null 2>&1 || true
    "${P[@]}" network rm -f "$NET" > /dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

# ---- base images (made once, kept) and the build ----------------------------------------------
base=$(deploy/docker/debian-base.sh python)
prom_image=$(deploy/docker/debian-base.sh prometheus)
if ! built=$(deploy/docker/build-image.sh "$IMAGE"); then
    echo "FAIL build: deploy/docker/build-image.sh failed"
    exit 1
fi
build_seconds=$(echo "$built" | tail -1 | awk '{print $(NF-1)}')
size_bytes=$("${P[@]}" image inspect --format '{{.Size}}' "$IMAGE")
base_bytes=$("${P[@]}" image inspect --format '{{.Size}}' "$base")
echo "PASS build: $IMAGE in ${build_seconds} s (layers cached from earlier builds are reused)"

failed=0
pass() { echo "PASS $1: $2"; }
fail() { echo "FAIL $1: $2"; failed=1; }

# ---- inside the image: no build stack, the user, the ladder -----------------------------------
inside=$(quiet "${P[@]}" run --rm -i "${ULIMITS[@]}" --read-only --network none "$IMAGE" python - <<'EOF' || true
import importlib.metadata as md, importlib.util as iu, json, os, sys
bad = [m for m in ("torch", "transformers", "optimum") if iu.find_spec(m) is not None]
dists = sorted(d.metadata["Name"].lower() for d in md.distributions())
bad += [d for d in dists if d in ("torch", "transformers", "optimum", "optimum-onnx", "accelerate")]
ladder = os.environ["GREENROUTE_LADDER_DIR"]
manifest = json.load(open(os.path.join(ladder, "manifest.json")))
names = [f"{n}({v.get('exporter')}, q={v.get('quality', 0):.3f})"
         for n, v in manifest["variants"].items()]
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "bad": bad, "variants": names,
                  "python": sys.version.split()[0], "dists": len(dists)}))
EOF
)
echo "  inside: $inside"
python3 - "$inside" <<'EOF' && pass "runtime image carries no torch, transformers or optimum" "checked with importlib and installed distributions inside the image" || fail "no build stack in the runtime image" "$inside"
import json, sys
sys.exit(0 if json.loads(sys.argv[1])["bad"] == [] else 1)
EOF
variants=$(python3 -c 'import json,sys; print(" ".join(json.loads(sys.argv[1])["variants"]))' "$inside" 2>/dev/null || echo "?")
echo "  baked ladder: $variants"

# ---- the service container, as deploy/k8s runs it ---------------------------------------------
start_period=$("${P[@]}" image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["StartPeriod"] // 10**9)')
"${P[@]}" network create "$NET" > /dev/null
"${P[@]}" volume create "$VOLUME" > /dev/null
t0=$(date +%s.%N)
quiet "${P[@]}" run -d --name "$CTR" "${ULIMITS[@]}" --network "$NET" --network-alias greenroute \
    -p "127.0.0.1:$PORT:8000" \
    --read-only --read-only-tmpfs=false --tmpfs /tmp --volume "$VOLUME:/var/cache/greenroute" \
    --cap-drop ALL --security-opt no-new-privileges --stop-timeout 45 \
    -e GREENROUTE_THREADS=2 -e GREENROUTE_QUEUE_SIZE=8 -e GREENROUTE_DEFAULT_MIN_QUALITY=0.0 \
    -e GREENROUTE_DEFAULT_LATENCY_MS=30000 -e GREENROUTE_DEVICE=cpu \
    "$IMAGE" > /dev/null
ready=""
while :; do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/ready" || true)
    now=$(date +%s.%N)
    if [ "$code" = 200 ]; then ready=$(python3 -c "print(f'{$now - $t0:.1f}')"); break; fi
    if python3 -c "import sys; sys.exit(0 if $now - $t0 > $start_period + 60 else 1)"; then break; fi
    if [ "$("${P[@]}" inspect --format '{{.State.Running}}' "$CTR")" != true ]; then break; fi
    sleep 0.5
done
if [ -n "$ready" ] && python3 -c "import sys; sys.exit(0 if $ready <= $start_period else 1)"; then
    pass "/ready turns 200 within the health check's start period" "${ready} s after podman run (start period ${start_period} s)"
else
    fail "/ready within the start period (${start_period} s)" "ready=${ready:-never}"
    "${P[@]}" logs --tail 30 "$CTR" | sed 's/^/  log| /'
fi
uid=$("${P[@]}" exec "$CTR" id -u)
user=$("${P[@]}" top "$CTR" user,huser,args | sed -n 2p | tr -s ' ')
if [ "$uid" = 10001 ] && [[ "$user" == 10001* || "$user" == greenroute* ]]; then
    pass "container runs as uid 10001" "$user"
else
    fail "container runs as uid 10001" "exec uid=$uid, process: $user"
fi
# the user's own home would be writable on a writable root: there the refusal is the mount's
root_opts=$("${P[@]}" exec "$CTR" awk '$2 == "/" {print $4}' /proc/mounts | tail -1)
home_write=$("${P[@]}" exec "$CTR" sh -c 'touch "$HOME/x" 2>&1 || true')
scratch=$("${P[@]}" exec "$CTR" sh -c 'touch /tmp/x /var/cache/greenroute/x && echo writable')
if [[ "$root_opts" == ro,* ]] && [[ "$home_write" == *"Read-only file system"* ]] && [ "$scratch" = writable ]; then
    pass "read-only root filesystem" "served with / mounted ro (home: ${home_write##*: }); /tmp (tmpfs) and /var/cache/greenroute (volume) writable"
else
    fail "read-only root filesystem" "/ mount options '$root_opts', home write '$home_write', scratch '$scratch'"
fi
if [ -n "$ready" ] && "${P[@]}" healthcheck run "$CTR" > /dev/null; then
    pass "HEALTHCHECK command" "healthy"
else
    fail "HEALTHCHECK command" "podman healthcheck run failed"
fi

# ---- Prometheus from deploy/prometheus, on the same network, as compose runs it ---------------
"${P[@]}" volume create "$PROM_VOLUME" > /dev/null
"${P[@]}" run -d --name "$PROM_CTR" "${ULIMITS[@]}" --network "$NET" \
    -p "127.0.0.1:$PROM_PORT:9090" \
    --volume "$PWD/deploy/prometheus:/etc/prometheus:ro" --volume "$PROM_VOLUME:/prometheus" \
    "$prom_image" --config.file=/etc/prometheus/prometheus.yml --storage.tsdb.path=/prometheus \
    --storage.tsdb.retention.time=15d > /dev/null
prom_version=$(quiet "${P[@]}" run --rm "${ULIMITS[@]}" --network none --entrypoint prometheus "$prom_image" --version 2>&1 | head -1)

# ---- client checks: openai, /metrics, Prometheus, SIGTERM ------------------------------------
SMOKE_PYTHON=$(deploy/docker/smoke-python.sh)
if [ -n "$ready" ]; then
    "$SMOKE_PYTHON" deploy/docker/smoke_checks.py --base "http://127.0.0.1:$PORT" \
        --prometheus "http://127.0.0.1:$PROM_PORT" --container "$CTR" \
        --podman "${P[*]}" || failed=1
fi
"${P[@]}" logs "$CTR" 2>&1 | grep -iE 'shutting down|finished server|waiting for|error' | tail -5 | sed 's/^/  log| /' || true

echo "== summary: $(git rev-parse --short HEAD), $(stamp)"
echo "  runtime image: $IMAGE, $(( size_bytes / 1000000 )) MB ($(( base_bytes / 1000000 )) MB of it the Debian python base); ladder: $variants"
echo "  build: ${build_seconds} s this run; time to /ready: ${ready:-never} s (start period ${start_period} s)"
echo "  prometheus: $prom_version; grafana: not run (no image registry, no Debian package)"
if [ "$failed" = 0 ]; then echo "== image smoke test PASSED"; else echo "== image smoke test FAILED"; fi
exit "$failed"
