#!/usr/bin/env bash
# Build the CPU image from this repository's Dockerfile with podman on a machine like ours
# (../shared/CONTAINERS.md): the Python base made from Debian's packages
# (deploy/docker/debian-base.sh), torch's CPU wheel from $PIP_FIND_LINKS (bound in at build
# time), pip's CA bundle $PIP_CERT as a build secret. Only build arguments and mounts differ
# from a plain `docker build`; the Dockerfile is the one users build.
#
#   deploy/docker/build-image.sh [IMAGE]     (default localhost/greenroute:cpu)
#
# Prints the build's step lines as it goes, the log's path, and on success the seconds it took
# as its last line ("built IMAGE in N s"). BUILD_THREADS (2) is the ladder build's threads.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${1:-localhost/greenroute:cpu}
P=(podman --runtime runc --cgroup-manager cgroupfs)
nofile=$(ulimit -Hn)
if [ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ]; then nofile=1048576; fi
ULIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit nproc=16384:16384)
: "${PIP_FIND_LINKS:?PIP_FIND_LINKS (the directory holding the torch CPU wheel) is not set}"
ls "$PIP_FIND_LINKS"/torch-*+cpu-*.whl > /dev/null

base=$(deploy/docker/debian-base.sh python)
secret=()
if [ -n "${PIP_CERT:-}" ]; then secret=(--secret "id=ca,src=$PIP_CERT"); fi
build_log=$(mktemp /tmp/greenroute-image-build.XXXXXX)
echo "  build log: $build_log" >&2
start=$(date +%s)
set +e
"${P[@]}" build --format docker --network host "${ULIMITS[@]}" "${secret[@]}" \
    --volume "$PIP_FIND_LINKS:/mnt/torch-wheels:ro" \
    --build-arg "PYTHON_IMAGE=$base" \
    --build-arg TORCH_FIND_LINKS=/mnt/torch-wheels \
    --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
    --build-arg "BUILD_THREADS=${BUILD_THREADS:-2}" \
    -t "$IMAGE" . 2>&1 | tee "$build_log" | grep --line-buffered -E '^\[[0-9]/[0-9]\] STEP|Using cache|^Error|^error' | cut -c1-110 | sed -u 's/^/  build| /' >&2
rc=${PIPESTATUS[0]}
set -e
seconds=$(( $(date +%s) - start ))
if [ "$rc" != 0 ]; then
    tail -30 "$build_log" | sed 's/^/  build| /' >&2
    echo "podman build exited $rc after $seconds s" >&2
    exit 1
fi
echo "built $IMAGE in $seconds s"
