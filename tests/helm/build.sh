#!/usr/bin/env bash
# Helm's own CLI, built from the Go module pinned here (go.mod + go.sum: helm.sh/helm/v3), for the chart
# tests (helm lint, helm template) and the chart's server-side dry run:
#   build.sh         build (once, cached) and print the binary's path
#   build.sh --path  print where the cached binary is (or would be), without building
# The binary is cached under ~/.cache/kiloclaw/helm/<hash of go.mod, go.sum, go version>, so only a new
# machine (or a change of those inputs) pays the cold build (a few minutes on 2 cores). The same pattern as
# tests/promtool/build.sh and tests/controlplane/cluster.sh.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/kiloclaw/helm"
command -v go >/dev/null 2>&1 || { echo "helm: Go is needed to build helm (go: not found)" >&2; exit 2; }
version="$(sed -n 's/^[[:space:]]*helm.sh\/helm\/v3 \(v[0-9.]*\).*$/\1/p' "$HERE/go.mod")"
# As helm's own Makefile stamps them: the version, and the Kubernetes version its client modules speak
# (helm template's default capabilities; without it, 1.20).
k8s_minor="$(sed -n 's/^[[:space:]]*k8s.io\/client-go v0\.\([0-9]*\)\..*$/\1/p' "$HERE/go.mod")"
ldflags="-X helm.sh/helm/v3/internal/version.version=$version -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
done
key="$( (cat "$HERE/go.mod" "$HERE/go.sum"; go version; echo "$ldflags") | sha256sum | cut -c1-16)"
bin="$CACHE/$key/helm"
if [[ "${1:-}" == "--path" ]]; then
  # Only the path of the cached binary, built or not (the tests skip, saying so, when it is missing).
  echo "$bin"
  exit 0
fi
if [[ ! -x "$bin" ]]; then
  echo "helm: building $version from Go modules (cold build: a few minutes; cached in $CACHE/$key)" >&2
  mkdir -p "$CACHE/$key"
  started=$SECONDS
  (cd "$HERE" && GOFLAGS=-mod=readonly nice go build -trimpath -ldflags "$ldflags" -o "$bin.tmp.$$" \
    helm.sh/helm/v3/cmd/helm)
  mv "$bin.tmp.$$" "$bin"
  echo "helm: built in $((SECONDS - started)) s" >&2
fi
echo "$bin"
