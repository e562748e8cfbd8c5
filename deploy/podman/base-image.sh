#!/bin/sh
# Build a stand-in for `python:3.11-slim` from Debian packages, for machines that reach Debian's
# mirror and PyPI but no image registry (deploy/podman/README.md). Debian 12 ships Python 3.11, so
# the server image's `FROM python:3.11-slim` resolves to this image and builds unchanged.
#
# Usage: base-image.sh [TAG]     (default docker.io/library/python:3.11-slim)
# Needs: mmdebstrap, podman (as root). Takes about 3 minutes; does nothing if TAG exists.
#
# What differs from the official image: python is Debian's /usr/bin/python3 (python and pip on
# PATH as in the official image, with Debian's "externally managed" marker removed so that pip
# installs system-wide, as it does there), and the host's CA bundle is copied in, so pip inside
# a build trusts what the host trusts (a host behind a TLS-inspecting proxy needs that).
set -eu

tag=${1:-docker.io/library/python:3.11-slim}
mirror=${PUM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
if podman image exists "$tag"; then
    echo "base-image: $tag exists"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The hooks' "$1" is the new root, expanded by mmdebstrap, not here.
# shellcheck disable=SC2016
mmdebstrap --variant=apt --include=python3,python3-pip,python3-venv,ca-certificates,passwd \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    --customize-hook='ln -sf python3 "$1"/usr/bin/python' \
    --customize-hook='copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs' \
    --customize-hook='printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" > "$1"/etc/pip.conf' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$work/rootfs.tar" "$mirror"
podman import --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' "$work/rootfs.tar" "$tag"
echo "base-image: built $tag"
