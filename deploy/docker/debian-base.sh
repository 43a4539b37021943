#!/usr/bin/env bash
# Base images made from Debian's packages with debootstrap, for machines that reach Debian's
# archive and PyPI but no image registry (../shared/CONTAINERS.md). Elsewhere the Dockerfile's
# default base (python:3.11-slim-bookworm from Docker Hub) needs none of this.
#
#   deploy/docker/debian-base.sh python       localhost/greenroute-base:python3.11-bookworm
#   deploy/docker/debian-base.sh prometheus   localhost/greenroute-prometheus:bookworm
#
# python: Debian's python3 (3.11) with a venv at /opt/venv first on PATH, so that `python` and
# `pip` are the venv's as in the official python image (Debian's pip refuses the system Python).
# prometheus: Debian's prometheus package, run like prom/prometheus (user nobody, /prometheus).
# An image that already exists is kept (FORCE=1 rebuilds it). Needs root, podman, runc,
# debootstrap. MIRROR overrides the Debian mirror.
set -euo pipefail

P=(podman --runtime runc --cgroup-manager cgroupfs)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PATH_ENV=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

kind=${1:?usage: debian-base.sh python|prometheus}
case "$kind" in
    python) tag=localhost/greenroute-base:python3.11-bookworm ;;
    prometheus) tag=localhost/greenroute-prometheus:bookworm ;;
    *) echo "debian-base.sh: unknown image '$kind' (python or prometheus)" >&2; exit 2 ;;
esac

if [ "${FORCE:-0}" != 1 ] && "${P[@]}" image exists "$tag"; then
    echo "$tag"
    exit 0
fi

rootfs=$(mktemp -d /var/tmp/greenroute-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

case "$kind" in
    python)
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$SUITE" "$rootfs" "$MIRROR" >&2
        chroot "$rootfs" /usr/bin/python3 -m venv /opt/venv
        changes=(--change "ENV PATH=/opt/venv/bin:$PATH_ENV" --change "ENV LANG=C.UTF-8"
                 --change 'CMD ["python3"]')
        ;;
    prometheus)
        debootstrap --variant=minbase --include=prometheus "$SUITE" "$rootfs" "$MIRROR" >&2
        mkdir -p "$rootfs/prometheus"
        chroot "$rootfs" chown nobody:nogroup /prometheus
        changes=(--change "ENV PATH=$PATH_ENV" --change "USER nobody"
                 --change "WORKDIR /prometheus" --change "EXPOSE 9090"
                 --change 'ENTRYPOINT ["/usr/bin/prometheus"]'
                 --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]')
        ;;
esac
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

tar -C "$rootfs" -c . | "${P[@]}" import "${changes[@]}" - "$tag" >&2
echo "$tag"
