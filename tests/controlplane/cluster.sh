#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for the real-cluster test tier:
#   cluster.sh up     build (once, cached) and start kube-apiserver + etcd; writes .cluster/kubeconfig
#   cluster.sh down   stop it and remove .cluster/
#   cluster.sh build  only build; prints the binary's path
# The binary is cached under ~/.cache/kiloclaw/controlplane/<hash of go.mod, go.sum, main.go, go version>,
# so only a new machine (or a change of those inputs) pays the cold build.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
STATE="${KILOCLAW_CLUSTER_DIR:-$ROOT/.cluster}"
PORT="${KILOCLAW_CLUSTER_PORT:-16443}"
ETCD_PORT="${KILOCLAW_CLUSTER_ETCD_PORT:-12379}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/kiloclaw/controlplane"

binary() {
  command -v go >/dev/null 2>&1 || { echo "cluster: Go is needed to build kube-apiserver (go: not found)" >&2; exit 2; }
  # The version kube-apiserver reports (kubectl compares it with its own); the module's version, as the
  # upstream release build stamps it.
  local k8s_version
  k8s_version="$(sed -n 's/^[[:space:]]*k8s.io\/kubernetes v\([0-9.]*\)$/\1/p' "$HERE/go.mod")"
  local pkg=k8s.io/component-base/version
  local ldflags="-X $pkg.gitVersion=v$k8s_version -X $pkg.gitMajor=${k8s_version%%.*} -X $pkg.gitMinor=$(cut -d. -f2 <<<"$k8s_version") -X $pkg.gitTreeState=clean"
  local key
  key="$( (cat "$HERE/go.mod" "$HERE/go.sum" "$HERE/main.go"; go version; echo "$ldflags") | sha256sum | cut -c1-16)"
  local bin="$CACHE/$key/kiloclaw-controlplane"
  if [[ ! -x "$bin" ]]; then
    echo "cluster: building kube-apiserver + etcd from Go modules (cold build: a few minutes; cached in $CACHE/$key)" >&2
    mkdir -p "$CACHE/$key"
    local started=$SECONDS
    (cd "$HERE" && go build -trimpath -ldflags "$ldflags" -o "$bin.tmp" .)
    mv "$bin.tmp" "$bin"
    echo "cluster: built in $((SECONDS - started)) s" >&2
  fi
  echo "$bin"
}

ready() {
  curl -sf --max-time 2 --cacert "$STATE/pki/ca.crt" --cert "$STATE/pki/admin.crt" --key "$STATE/pki/admin.key" \
    "https://127.0.0.1:$PORT/readyz" >/dev/null 2>&1
}

up() {
  if [[ -f "$STATE/pid" ]] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
    echo "cluster: already running (pid $(cat "$STATE/pid")); KUBECONFIG=$STATE/kubeconfig"
    return
  fi
  local port
  for port in "$PORT" "$ETCD_PORT" "$((ETCD_PORT + 1))"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "cluster: port $port on 127.0.0.1 is in use (another cluster?); choose others with KILOCLAW_CLUSTER_PORT and KILOCLAW_CLUSTER_ETCD_PORT" >&2
      exit 1
    fi
  done
  local bin
  bin="$(binary)"
  rm -rf "$STATE" && mkdir -p "$STATE"
  local started=$SECONDS
  setsid "$bin" --dir "$STATE" --port "$PORT" --etcd-port "$ETCD_PORT" >"$STATE/apiserver.log" 2>&1 &
  echo $! >"$STATE/pid"
  for _ in $(seq 1 120); do
    if ready; then
      echo "cluster: kube-apiserver ready on https://127.0.0.1:$PORT in $((SECONDS - started)) s; KUBECONFIG=$STATE/kubeconfig"
      return
    fi
    if ! kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
      echo "cluster: the control plane exited; last lines of $STATE/apiserver.log:" >&2
      tail -20 "$STATE/apiserver.log" >&2
      exit 1
    fi
    sleep 0.5
  done
  echo "cluster: not ready after 60 s; see $STATE/apiserver.log" >&2
  exit 1
}

down() {
  if [[ -f "$STATE/pid" ]]; then
    local pid
    pid="$(cat "$STATE/pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -rf "$STATE"
  echo "cluster: stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  build) binary ;;
  *) echo "usage: $0 up|down|build" >&2; exit 2 ;;
esac
