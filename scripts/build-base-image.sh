#!/bin/sh
# Build a python:3.11-slim stand-in from Debian packages, for machines that can reach a
# Debian mirror but no image registry, and import it into podman:
#
#   sudo scripts/build-base-image.sh                       # -> localhost/memgw-base:py311
#   sudo podman build --format docker --build-arg BASE=localhost/memgw-base:py311 -t memphis-gateway .
#
# The rootfs is a minimal Debian bookworm (debootstrap --variant=minbase) with python3 (3.11),
# python3-venv, python3-pip and ca-certificates; `python` and `pip` resolve as in python:3.11-slim.
# Debian marks its python3 "externally managed" (PEP 668), so `pip install` outside a venv is
# refused there; the Dockerfile installs into a venv on either base.
#
# The image is labelled with a hash of this script and its inputs; when the tag already has that
# label the build is skipped (MEMGW_BASE_FORCE=1 rebuilds, e.g. to pick up Debian updates).
# Needs root, debootstrap and podman.
#
# Environment: MEMGW_BASE_SUITE (bookworm), MEMGW_BASE_MIRROR (http://deb.debian.org/debian),
# MEMGW_BASE_KEYRING (/usr/share/keyrings/debian-archive-keyring.gpg), MEMGW_BASE_FORCE (0),
# TMPDIR (where the rootfs is built, removed afterwards).
set -eu

tag=${1:-localhost/memgw-base:py311}
suite=${MEMGW_BASE_SUITE:-bookworm}
mirror=${MEMGW_BASE_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-venv,python3-pip,ca-certificates
label=org.memphis-gateway.base-key

for tool in debootstrap podman sha256sum tar; do
    command -v "$tool" > /dev/null || { echo "build-base-image: $tool not found (apt-get install debootstrap podman)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "build-base-image: debootstrap needs root" >&2; exit 2; }
keyring=${MEMGW_BASE_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
[ -r "$keyring" ] || { echo "build-base-image: $keyring missing (apt-get install debian-archive-keyring): the Release file must be verified" >&2; exit 2; }

key=$( { cat "$0"; echo "$suite $mirror $packages"; } | sha256sum | cut -c1-16)
have=$(podman image inspect --format "{{ index .Config.Labels \"$label\" }}" "$tag" 2> /dev/null || true)
if [ "$have" = "$key" ] && [ "${MEMGW_BASE_FORCE:-0}" != 1 ]; then
    echo "build-base-image: $tag is up to date (key $key)"
    exit 0
fi

previous=$(podman image inspect --format '{{ .Id }}' "$tag" 2> /dev/null || true)
work=$(mktemp -d "${TMPDIR:-/tmp}/memgw-base.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
root=$work/rootfs

start=$(date +%s)
echo "build-base-image: debootstrap $suite ($packages) from $mirror"
debootstrap --variant=minbase --keyring="$keyring" --include="$packages" "$suite" "$root" "$mirror" > "$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    echo "build-base-image: debootstrap failed" >&2
    exit 1
}
echo "build-base-image: debootstrap took $(( $(date +%s) - start )) s"

# python:3.11-slim has python, python3, pip, pip3 in /usr/local/bin, first on PATH
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
ln -sf /usr/bin/python3 "$root/usr/local/bin/python3"
ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip3"
chroot "$root" python -c 'import sys, venv; assert sys.version_info[:2] == (3, 11), sys.version'

# small: no package caches or lists, docs, man pages; the host's resolv.conf/hostname are not kept
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/debconf/*-old \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*
find "$root" -name __pycache__ -type d -prune -exec rm -rf {} +
: > "$root/etc/resolv.conf"
: > "$root/etc/hostname"

tar --numeric-owner -C "$root" -c . | podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change "LABEL $label=$key" \
    --message "debootstrap --variant=minbase $suite + $packages" \
    - "$tag" > /dev/null
echo "build-base-image: $tag built in $(( $(date +%s) - start )) s, $(podman image inspect --format '{{ .Size }}' "$tag") bytes (key $key)"
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{ .Id }}' "$tag")" ]; then
    podman rmi "$previous" > /dev/null 2>&1 || true  # the base this one replaces, unless images still use it
fi
