#!/usr/bin/env bash
# Everything the compose stack needs, built on a host that cannot pull from Docker Hub: the Debian base, a
# wheelhouse per lock (made again only when the lock changes), the default model exported for the inference
# runtimes, the imsearch images (serve; infer: embedder service and ingestion without torch) and stand-ins for
# the images that cannot be pulled (Redis from Debian's package, S3 from moto's server). Prints each image's
# build time and size. Layers podman has already built are reused.
#   deploy/podman/images.sh            (root; podman, runc, debootstrap; the project's venv for pip and export)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}
PY=${PY:-.venv/bin/python}
base=localhost/imsearch-base:bookworm

wheelhouse() {  # ROLE PIP-ARGS... : deploy/wheels/ROLE, made again only when its requirements change
  local role=$1; shift
  local dir=deploy/wheels/$role stamp
  stamp=$(echo "$@" | cat - requirements/*.lock | sha256sum | cut -c1-16)
  [ -f "$dir/.made-from-$stamp" ] && return 0
  rm -rf "$dir" && mkdir -p "$dir"
  "$PY" -m pip download -q --only-binary=:all: -d "$dir" "setuptools>=68" wheel "$@" 2>&1 \
    | { grep -v "Location 'file" || true; }
  touch "$dir/.made-from-$stamp"
}

image() {  # NAME CONTAINERFILE [BUILD ARGS...]
  local name=$1 file=$2 start; shift 2
  start=$(date +%s)
  podman build -q -f "$file" --build-arg BASE="$base" "$@" -t "localhost/$name:latest" . >/dev/null
  echo "localhost/$name: built in $(( $(date +%s) - start )) s, $(podman image inspect "localhost/$name:latest" \
    --format '{{.Size}}' | awk '{printf "%.0f MB", $1 / 1e6}')"
}

deploy/podman/base.sh "$base"
wheelhouse serve -r requirements/serve.lock
wheelhouse infer -r requirements/infer.lock
wheelhouse s3 "$(grep -E '^moto==' requirements/dev.lock | sed 's/==/[server]==/')" -c requirements/dev.lock
IMSEARCH_MODEL_CACHE_DIR=deploy/models "$PY" -m services.cli model export >/dev/null
image imsearch-serve deploy/Dockerfile --build-arg ROLE=serve
image imsearch-infer deploy/Dockerfile --build-arg ROLE=infer
image imsearch-redis deploy/podman/Containerfile.redis
image imsearch-s3 deploy/podman/Containerfile.s3
