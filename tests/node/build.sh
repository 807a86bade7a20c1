#!/usr/bin/env bash
# The node's binaries, built from the Go modules pinned here (the same Kubernetes version as
# tests/controlplane; go.sum adds the kubelet's own dependencies, cadvisor and friends):
#   build.sh    build (once, cached) and print the directory holding kiloclaw-node and pause
# Cached under ~/.cache/kiloclaw/node/<hash of go.mod, go.sum, the sources, go version>.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/kiloclaw/node"
command -v go >/dev/null 2>&1 || { echo "node: Go is needed to build the kubelet (go: not found)" >&2; exit 2; }
k8s_version="$(sed -n 's/^[[:space:]]*k8s.io\/kubernetes v\([0-9.]*\)$/\1/p' "$HERE/go.mod")"
pkg=k8s.io/component-base/version
ldflags="-X $pkg.gitVersion=v$k8s_version -X $pkg.gitMajor=${k8s_version%%.*} -X $pkg.gitMinor=$(cut -d. -f2 <<<"$k8s_version") -X $pkg.gitTreeState=clean"
key="$( (cat "$HERE/go.mod" "$HERE/go.sum" "$HERE/main.go" "$HERE/pause/main.go"; go version; echo "$ldflags") | sha256sum | cut -c1-16)"
dir="$CACHE/$key"
if [[ ! -x "$dir/kiloclaw-node" || ! -x "$dir/pause" ]]; then
  echo "node: building kubelet, kube-controller-manager and kube-scheduler from Go modules (cold: minutes; cached in $dir)" >&2
  mkdir -p "$dir"
  started=$SECONDS
  (cd "$HERE" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -o "$dir/pause.tmp.$$" ./pause)
  (cd "$HERE" && GOFLAGS=-mod=readonly nice go build -trimpath -ldflags "$ldflags" -o "$dir/kiloclaw-node.tmp.$$" .)
  mv "$dir/pause.tmp.$$" "$dir/pause"
  mv "$dir/kiloclaw-node.tmp.$$" "$dir/kiloclaw-node"
  echo "node: built in $((SECONDS - started)) s" >&2
fi
echo "$dir"
