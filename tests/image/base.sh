#!/usr/bin/env bash
# A local stand-in for the Dockerfile's public base image (python:3.11-slim-bookworm), for machines that
# cannot reach a container registry (this project's CI): a Debian bookworm minbase root filesystem with
# Python 3.11 and venv, made by mmdebstrap from the machine's own apt sources and imported into podman.
#   base.sh    make it (once, cached) and print the image's name
# The root filesystem is cached under ~/.cache/kiloclaw/image-base/<hash of this script and the apt sources>,
# so only a new machine (or a change of those inputs) pays the ~30 s of mmdebstrap; the podman import of the
# cached tarball takes a few seconds.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/kiloclaw/image-base"
SOURCES="${KILOCLAW_APT_SOURCES:-/etc/apt/sources.list.d/debian.sources}"
# python3-venv brings ensurepip's wheels (a venv with pip for the build stage); nothing else is needed at
# run time. The CA bundle is not in the base: the build mounts the machine's (see image.sh).
PACKAGES="python3,python3-venv"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/containers.conf}"

for tool in mmdebstrap podman; do
  command -v "$tool" >/dev/null 2>&1 || { echo "base: $tool is needed (apt-get install $tool)" >&2; exit 2; }
done
[[ -f "$SOURCES" ]] || { echo "base: no apt sources at $SOURCES (set KILOCLAW_APT_SOURCES)" >&2; exit 2; }

key="$( (cat "$0" "$SOURCES"; echo "$PACKAGES") | sha256sum | cut -c1-16)"
image="localhost/kiloclaw-test-base:$key"
tarball="$CACHE/$key/rootfs.tar"
if [[ ! -s "$tarball" ]]; then
  echo "base: building a bookworm root filesystem with mmdebstrap (cached in $CACHE/$key)" >&2
  mkdir -p "$CACHE/$key"
  started=$SECONDS
  mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
    bookworm "$tarball.$$.tar" "$SOURCES" >&2
  mv "$tarball.$$.tar" "$tarball"
  echo "base: root filesystem built in $((SECONDS - started)) s" >&2
fi
if ! podman image exists "$image"; then
  podman import --quiet --change 'CMD ["python3"]' "$tarball" "$image" >/dev/null
fi
echo "$image"
