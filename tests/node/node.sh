#!/usr/bin/env bash
# The rest of a real cluster beside `make cluster`'s control plane, so that `kubectl apply -k deploy/` runs:
#   node.sh up          kube-controller-manager and kube-scheduler, and two nodes (a, b): each a kubelet on
#                       Debian's containerd + runc in a network namespace of its own; waits until both are Ready
#   node.sh load IMAGE  put a podman image into both nodes' containerd (as a registry pull would)
#   node.sh forward PORT  make 127.0.0.1:PORT of the host answer on both nodes' loopback (e.g. flysim)
#   node.sh down        stop all of it, unmount what the kubelets and containerd mounted, remove the namespaces
# Binaries: tests/node/build.sh (the same Kubernetes modules as the control plane, cached in ~/.cache).
#
# Why two network namespaces: no Pod network here (no CNI bridge, no kube-proxy), so the operator's pods use
# the host network (a test overlay sets hostNetwork) and two replicas on one network would collide on their
# ports; a namespace per node makes them two machines. The API server and flysim listen on the host's
# loopback; `kiloclaw-node forward` listens on each node's loopback and connects from the host. Settings the
# sandbox needs (measured): containerd's CRI with restrict_oom_score_adj (lowering oom_score_adj is refused),
# cgroupfs (no systemd), a local sandbox image; the kubelet with cgroupsPerQOS off, no node-allocatable
# enforcement, swap and cgroup v1 tolerated, no local-storage isolation (it cannot size the root disk).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CLUSTER="${KILOCLAW_CLUSTER_DIR:-$ROOT/.cluster}"
STATE="$CLUSTER/node"
PORT="${KILOCLAW_CLUSTER_PORT:-16443}"
NODES=(a b)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/tests/image/containers.conf}"
PAUSE_IMAGE="localhost/kiloclaw-pause:1"

netns() { echo "kiloclaw-$PORT-$1"; }
node_ip() { case "$1" in a) echo 192.0.2.1 ;; b) echo 192.0.2.2 ;; esac; }
sock() { echo "$STATE/$1/containerd.sock"; }
ctr_() { local node=$1; shift; ctr --address "$(sock "$node")" --namespace k8s.io "$@"; }

need() {
  local missing=()
  for tool in containerd ctr runc ip nsenter openssl podman kubectl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  [[ -d /usr/lib/cni ]] || missing+=("containernetworking-plugins")
  if ((${#missing[@]})); then
    echo "node: missing ${missing[*]} (apt-get install containerd runc iproute2 util-linux openssl podman containernetworking-plugins)" >&2
    exit 2
  fi
  [[ -f "$CLUSTER/kubeconfig" ]] || { echo "node: no control plane: make cluster first" >&2; exit 1; }
}

start() { # name, command...: start in the background with a log and a pid file
  local name=$1; shift
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/pids/$name"
}

wait_for() { # what, timeout (s), command...
  local what=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      echo "node: $what not there after ${timeout} s; logs in $STATE/logs" >&2
      return 1
    fi
    sleep 0.5
  done
}

node_cert() { # node: a client certificate for system:node:<name> (group system:nodes), signed by the cluster CA
  local node=$1 dir="$STATE/$1"
  openssl ecparam -name prime256v1 -genkey -noout -out "$dir/kubelet.key" 2>/dev/null
  openssl req -new -key "$dir/kubelet.key" -subj "/O=system:nodes/CN=system:node:kiloclaw-node-$node" \
    -out "$dir/kubelet.csr" 2>/dev/null
  openssl x509 -req -in "$dir/kubelet.csr" -CA "$CLUSTER/pki/ca.crt" -CAkey "$CLUSTER/pki/ca.key" \
    -CAcreateserial -days 2 -out "$dir/kubelet.crt" 2>/dev/null
  KUBECONFIG="$dir/kubeconfig" kubectl config set-cluster local --server "https://127.0.0.1:$PORT" \
    --certificate-authority "$CLUSTER/pki/ca.crt" --embed-certs >/dev/null
  KUBECONFIG="$dir/kubeconfig" kubectl config set-credentials node --client-certificate "$dir/kubelet.crt" \
    --client-key "$dir/kubelet.key" --embed-certs >/dev/null
  KUBECONFIG="$dir/kubeconfig" kubectl config set-context node --cluster local --user node >/dev/null
  KUBECONFIG="$dir/kubeconfig" kubectl config use-context node >/dev/null
}

pause_archive() { # the sandbox image: the static pause binary alone, cached by its hash
  local bin=$1
  local key
  key="$(sha256sum "$bin/pause" | cut -c1-16)"
  local archive="${XDG_CACHE_HOME:-$HOME/.cache}/kiloclaw/node/pause-$key.tar"
  if [[ ! -s "$archive" ]]; then
    local context
    context="$(mktemp -d)"
    cp "$bin/pause" "$context/pause"
    printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$context/Containerfile"
    podman build --quiet --network none -t "$PAUSE_IMAGE" -f "$context/Containerfile" "$context" >/dev/null
    podman save --quiet --format oci-archive -o "$archive.$$" "$PAUSE_IMAGE"
    mv "$archive.$$" "$archive"
    rm -rf "$context"
  fi
  echo "$archive"
}

containerd_config() { # node
  local node=$1 dir="$STATE/$1"
  mkdir -p "$dir/cni"
  cat >"$dir/cni/10-loopback.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "kiloclaw-loopback", "plugins": [{"type": "loopback"}]}
EOF
  cat >"$dir/containerd.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$(sock "$node")"
[ttrpc]
  address = "$(sock "$node").ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni"
EOF
}

kubelet_config() { # node
  local node=$1 dir="$STATE/$1"
  cat >"$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: 10250
readOnlyPort: 0
healthzPort: 10248
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: "$CLUSTER/pki/ca.crt"}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://$(sock "$node")
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
failCgroupV1: false
localStorageCapacityIsolation: false
makeIPTablesUtilChains: false
resolvConf: /etc/resolv.conf
serializeImagePulls: false
maxPods: 16
podLogsDir: "$dir/pod-logs"
nodeStatusUpdateFrequency: 4s
evictionHard: {memory.available: "1Mi"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
}

up() {
  need
  if [[ -f "$STATE/up" ]]; then
    echo "node: already up"
    return
  fi
  local bin
  bin="$("$HERE/build.sh")"
  rm -rf "$STATE" && mkdir -p "$STATE/logs" "$STATE/pids"
  local started=$SECONDS
  local archive
  archive="$(pause_archive "$bin")"
  export KUBECONFIG="$CLUSTER/kubeconfig"
  # The Node authorizer is not enabled on this API server (RBAC only): the nodes' group gets the role the
  # Node authorizer would grant, cluster-wide.
  kubectl create clusterrolebinding kiloclaw-nodes --clusterrole=system:node --group=system:nodes \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  # Nodes of an earlier run would look Ready until their heartbeats are missed.
  kubectl delete node "${NODES[@]/#/kiloclaw-node-}" --ignore-not-found --wait=false >/dev/null
  start controller-manager "$bin/kiloclaw-node" controller-manager --kubeconfig "$CLUSTER/kubeconfig" \
    --leader-elect=false --secure-port=0 --root-ca-file "$CLUSTER/pki/ca.crt" \
    --service-account-private-key-file "$CLUSTER/pki/sa.key" --use-service-account-credentials=false \
    --node-monitor-grace-period=20s --v=1
  start scheduler "$bin/kiloclaw-node" scheduler --kubeconfig "$CLUSTER/kubeconfig" --leader-elect=false \
    --secure-port=0 --v=1
  local node
  for node in "${NODES[@]}"; do
    local dir="$STATE/$node" ns
    ns="$(netns "$node")"
    mkdir -p "$dir"
    ip netns del "$ns" 2>/dev/null || true
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # The node's address (a kubelet refuses a loopback node IP): a TEST-NET-1 address on the namespace's
    # loopback interface (the sandbox's kernel has no dummy links), reachable from nowhere else; the node's
    # pods use the node's network, so it is their address too.
    ip -n "$ns" addr add "$(node_ip "$node")/32" dev lo
    start "forward-api-$node" "$bin/kiloclaw-node" forward --netns "/var/run/netns/$ns" \
      --listen "127.0.0.1:$PORT" --connect "127.0.0.1:$PORT"
    node_cert "$node"
    containerd_config "$node"
    kubelet_config "$node"
    start "containerd-$node" nsenter --net="/var/run/netns/$ns" containerd --config "$dir/containerd.toml"
  done
  for node in "${NODES[@]}"; do
    wait_for "containerd of node $node" 60 ctr_ "$node" version
    ctr_ "$node" images import --all-platforms "$archive" >/dev/null
    local dir="$STATE/$node"
    start "kubelet-$node" nsenter --net="/var/run/netns/$(netns "$node")" "$bin/kiloclaw-node" kubelet \
      --config "$dir/kubelet.yaml" --kubeconfig "$dir/kubeconfig" --root-dir "$dir/kubelet" \
      --cert-dir "$dir/pki" --hostname-override "kiloclaw-node-$node" --node-ip "$(node_ip "$node")" --v=1
  done
  for node in "${NODES[@]}"; do
    wait_for "node kiloclaw-node-$node" 120 kubectl get node "kiloclaw-node-$node"
  done
  if ! kubectl wait --for=condition=Ready node --all --timeout=120s >/dev/null; then
    echo "node: nodes not Ready; last kubelet lines:" >&2
    tail -5 "$STATE/logs/kubelet-a.log" >&2
    exit 1
  fi
  touch "$STATE/up"
  echo "node: kube-controller-manager, kube-scheduler and nodes kiloclaw-node-a, -b Ready in $((SECONDS - started)) s"
}

load() { # image
  local image=$1
  local archive="$STATE/image.tar"
  rm -f "$archive"
  podman save --quiet --format oci-archive -o "$archive" "$image"
  local node
  for node in "${NODES[@]}"; do
    ctr_ "$node" images import --all-platforms "$archive" >/dev/null
  done
  rm -f "$archive"
  echo "node: $image loaded on ${NODES[*]}"
}

forward_port() { # port: host loopback port -> the same port on every node's loopback
  local port=$1 bin node
  bin="$("$HERE/build.sh")"
  for node in "${NODES[@]}"; do
    start "forward-$port-$node" "$bin/kiloclaw-node" forward --netns "/var/run/netns/$(netns "$node")" \
      --listen "127.0.0.1:$port" --connect "127.0.0.1:$port"
  done
}

stop_pid() {
  local file=$1 pid
  pid="$(cat "$file")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null || true
}

down() {
  [[ -d "$STATE" ]] || return 0
  local node
  for node in "${NODES[@]}"; do
    if [[ -f "$STATE/pids/kubelet-$node" ]]; then stop_pid "$STATE/pids/kubelet-$node"; fi
  done
  for node in "${NODES[@]}"; do
    if [[ -S "$(sock "$node")" ]]; then
      local task
      for task in $(ctr_ "$node" tasks ls -q 2>/dev/null); do
        ctr_ "$node" tasks kill --signal SIGKILL "$task" >/dev/null 2>&1 || true
      done
      for task in $(ctr_ "$node" tasks ls -q 2>/dev/null); do
        ctr_ "$node" tasks delete --force "$task" >/dev/null 2>&1 || true
      done
    fi
    if [[ -f "$STATE/pids/containerd-$node" ]]; then stop_pid "$STATE/pids/containerd-$node"; fi
    # A shim outlives containerd; each recorded its pid in this node's state directory.
    local shim
    for shim in "$STATE/$node"/containerd/state/io.containerd.runtime.v2.task/*/*/shim.pid; do
      [[ -f "$shim" ]] && kill -9 "$(cat "$shim")" 2>/dev/null || true
    done
  done
  local file
  for file in "$STATE"/pids/*; do
    if [[ -f "$file" ]]; then stop_pid "$file"; fi
  done
  # Whatever the kubelets and containerd mounted below the state directory, deepest first.
  { findmnt -rn -o TARGET | grep "^$STATE/" || true; } | sort -r | while read -r target; do
    umount -l "$target" 2>/dev/null || true
  done
  for node in "${NODES[@]}"; do
    ip netns del "$(netns "$node")" 2>/dev/null || true
  done
  rm -rf "$STATE"
  echo "node: stopped"
}

case "${1:-}" in
  up) up ;;
  load) load "${2:?image}" ;;
  forward) forward_port "${2:?port}" ;;
  down) down ;;
  *) echo "usage: $0 up|load IMAGE|forward PORT|down" >&2; exit 2 ;;
esac
