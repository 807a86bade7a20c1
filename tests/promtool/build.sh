#!/usr/bin/env bash
# Prometheus's own promtool, built from the Go modules pinned here (go.mod + go.sum), for the monitoring tests:
#   build.sh    build (once, cached) and print the binary's path
# The binary is cached under ~/.cache/kiloclaw/promtool/<hash of go.mod, go.sum, go version>, so only a new
# machine (or a change of those inputs) pays the cold build (about 3 minutes on 2 cores). Prometheus's
# service-discovery plugins are left out (build tag remove_all_sd): `check rules|metrics` and `test rules`
# do not use them.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/kiloclaw/promtool"
command -v go >/dev/null 2>&1 || { echo "promtool: Go is needed to build promtool (go: not found)" >&2; exit 2; }
key="$( (cat "$HERE/go.mod" "$HERE/go.sum"; go version) | sha256sum | cut -c1-16)"
bin="$CACHE/$key/promtool"
if [[ ! -x "$bin" ]]; then
  echo "promtool: building from Go modules (cold build: a few minutes; cached in $CACHE/$key)" >&2
  mkdir -p "$CACHE/$key"
  started=$SECONDS
  (cd "$HERE" && GOFLAGS=-mod=readonly nice go build -trimpath -tags remove_all_sd -o "$bin.tmp.$$" \
    github.com/prometheus/prometheus/cmd/promtool)
  mv "$bin.tmp.$$" "$bin"
  echo "promtool: built in $((SECONDS - started)) s" >&2
fi
echo "$bin"
