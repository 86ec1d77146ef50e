#!/usr/bin/env bash
# A base image from Debian's own packages, for hosts that cannot pull from Docker Hub: Debian bookworm minbase
# with Python 3.11 (as the locks are) and its venv module, imported into podman as localhost/imsearch-base.
#   deploy/podman/base.sh [TAG]            (root; needs debootstrap; ~1 minute)
set -euo pipefail
tag=${1:-localhost/imsearch-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if podman image exists "$tag"; then echo "$tag: already there"; exit 0; fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "$tag: $(podman image inspect "$tag" --format '{{.Size}}') bytes"
