#!/usr/bin/env bash
# Build the operator image from the Dockerfile with podman and print its name:
#   image.sh                build on the Dockerfile's pinned public base (a registry must be reachable);
#                           BASE=<image> builds on another
#   image.sh --local-base   build on a locally made Debian bookworm + python3 base (tests/image/base.sh):
#                           what the tests and CI use, as no container registry is reachable there
# The image is tagged localhost/kiloclaw-operator:src-<hash of the Dockerfile, its build context and the
# base>, so an unchanged tree is not built twice (a warm run only checks that the tag exists); IMAGE (when
# set) is tagged as well. The build step's `pip install` needs the package registry: --network host, and the
# machine's CA bundle is mounted into the build (some networks re-sign TLS; the base has no bundle of its own).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/containers.conf}"
CA_BUNDLE="${KILOCLAW_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

command -v podman >/dev/null 2>&1 || { echo "image: podman is needed (apt-get install podman)" >&2; exit 2; }
build_args=()
base_id="default"
if [[ "${1:-}" == "--local-base" ]]; then
  base="$("$HERE/base.sh")"
  base_id="$(podman image inspect --format '{{.Id}}' "$base")"
  build_args+=(--build-arg "BASE=$base")
elif [[ -n "${1:-}" ]]; then
  echo "usage: $0 [--local-base]" >&2
  exit 2
elif [[ -n "${BASE:-}" ]]; then
  # Another base (e.g. the pinned one, fully qualified for podman): the Dockerfile's BASE build argument.
  base="$BASE"
  base_id="$BASE"
  build_args+=(--build-arg "BASE=$BASE")
fi

# The build context is what .dockerignore lets in: pyproject.toml, README.md and operator/ (no caches, no
# kiloclaw-dev).
key="$(
  cd "$ROOT"
  {
    sha256sum Dockerfile .dockerignore pyproject.toml README.md
    find operator -path operator/kiloclaw-dev -prune -o -type f ! -path '*/__pycache__/*' ! -name '*.py[cod]' \
      ! -path '*.egg-info/*' -print0 \
      | sort -z | xargs -0 sha256sum
    echo "$base_id"
  } | sha256sum | cut -c1-16
)"
image="localhost/kiloclaw-operator:src-$key"
if ! podman image exists "$image"; then
  echo "image: building $image (base: ${base:-pinned in the Dockerfile})" >&2
  started=$SECONDS
  mounts=()
  [[ -f "$CA_BUNDLE" ]] && mounts+=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
  podman build --quiet --network host --layers=false "${mounts[@]}" "${build_args[@]}" \
    -t "$image" -f "$ROOT/Dockerfile" "$ROOT" >&2
  echo "image: built in $((SECONDS - started)) s" >&2
fi
if [[ -n "${IMAGE:-}" ]]; then
  podman tag "$image" "$IMAGE"
fi
echo "$image"
