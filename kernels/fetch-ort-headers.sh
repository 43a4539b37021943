#!/usr/bin/env bash
# Put onnxruntime's C/C++ API headers in $1 (default kernels/build/include): the custom-op
# library needs them to compile and nothing else (it does not link libonnxruntime; the Python
# wheel that loads it ships no headers). They come from Debian's libonnxruntime-dev (trixie,
# API version 21, which onnxruntime 1.32 serves), downloaded and unpacked with apt's own tools
# and a private package list: nothing is installed and the system's apt state is not touched.
# The mirror is the one this machine's apt already uses. Exits non-zero, with one line, when
# the package cannot be had (no network, no apt): the ladder then uses onnxruntime's operators.
set -euo pipefail
out=${1:-$(dirname "$0")/build/include}
suite=trixie
if [ -f "$out/onnxruntime_cxx_api.h" ]; then exit 0; fi
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
  || { echo "fetch-ort-headers: apt-get/dpkg-deb not found (a Debian-family system is needed)"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/lists/partial" "$tmp/archives/partial"
# the first Debian archive URI among this machine's apt sources (deb822 or one-line style)
uri=$(grep -rhoE '(URIs:|deb)[[:space:]]+[a-z]+://[^[:space:]]+/debian/?([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
      | grep -v security | head -n1 | awk '{print $2}' || true)
[ -n "$uri" ] || { echo "fetch-ort-headers: no Debian archive in this machine's apt sources"; exit 1; }
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $suite main" > "$tmp/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp" -o Debug::NoLocking=1
          -o APT::Sandbox::User=root -q=2)
apt-get "${apt_opts[@]}" update >/dev/null \
  || { echo "fetch-ort-headers: apt-get update for $suite failed (no network?)"; exit 1; }
(cd "$tmp" && apt-get "${apt_opts[@]}" download libonnxruntime-dev >/dev/null) \
  || { echo "fetch-ort-headers: apt-get download libonnxruntime-dev failed"; exit 1; }
dpkg-deb -x "$tmp"/libonnxruntime-dev_*.deb "$tmp/root"
mkdir -p "$out"
cp "$tmp"/root/usr/include/onnxruntime/*.h "$out/"
ver=$(grep -m1 -oE 'define ORT_API_VERSION [0-9]+' "$out/onnxruntime_c_api.h" | awk '{print $3}')
echo "fetch-ort-headers: onnxruntime API $ver headers from $(basename "$tmp"/libonnxruntime-dev_*.deb) in $out"
