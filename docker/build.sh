#!/usr/bin/env bash
# Build a raylign image with the pins from docker/versions.env.
#   docker/build.sh gpu|cpu [extra docker build args...]
# REGISTRY=my.registry.io/team docker/build.sh gpu  ->  my.registry.io/team/raylign:<version>-gpu
# Run from anywhere; the build context is the repository root.
set -euo pipefail
kind="${1:?usage: docker/build.sh gpu|cpu [docker build args...]}"
shift
case "$kind" in gpu|cpu) ;; *) echo "docker/build.sh: kind must be gpu or cpu, got '$kind'" >&2; exit 2 ;; esac
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
args=()
while IFS='=' read -r key value; do
    [[ -z "$key" || "$key" == \#* ]] && continue
    args+=(--build-arg "$key=$value")
    declare "$key=$value"
done < "$here/versions.env"
image="${REGISTRY:+$REGISTRY/}${IMAGE_NAME}:${RAYLIGN_VERSION}-${kind}"
DOCKER_BUILDKIT=1 docker build "${args[@]}" -f "$here/Dockerfile.$kind" -t "$image" "$@" "$root"
echo "$image"
