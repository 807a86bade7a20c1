"""``kubectl apply -k deploy/`` on a real cluster with nodes (``make cluster`` + ``tests/node/node.sh up``:
kube-controller-manager, kube-scheduler and two kubelets on containerd): the two replicas become Ready on
different nodes, exactly one leads, a recovery runs through it, deleting the leader Pod hands over the Lease
(measured), and a node drain is held by the PodDisruptionBudget.

The one substitute (README, "A real node"): there is no Pod network here, so a test overlay on top of deploy/
runs the pods with ``hostNetwork`` (each node has a network namespace of its own, so the two replicas are on
two machines), points them at the API server and flysim on the node's loopback, relaxes the namespace's Pod
Security level from ``restricted`` to ``privileged`` (host networking is not allowed by ``restricted``; the
apply's warnings must name nothing but the host network and ports), and uses the locally loaded image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import realcluster
from harness import FLY_TOKEN, ClusterUnavailable, Stack, condition, eventually, status
from imagetools import image_or_skip
from kiloclaw_operator.models import GROUP
from operatorcontainer import TEST_INTERVALS

ROOT = Path(__file__).resolve().parents[2]
NODE_SH = ROOT / "tests" / "node" / "node.sh"
NAMESPACE = "kiloclaw-system"
DEPLOYMENT = "kiloclaw-operator"
SELECTOR = "app.kubernetes.io/name=kiloclaw-operator,app.kubernetes.io/instance=kiloclaw-operator"
# The Deployment's grace period is 60 s; a graceful leader releases the Lease as it stops.
HANDOVER_BUDGET_SECONDS = 20


def kubectl(*args: str, timeout: float = 180, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=timeout, input=stdin)


def node_sh(*args: str) -> None:
    result = subprocess.run([str(NODE_SH), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"node.sh {' '.join(args)}: {result.stderr}"


def cluster_dir() -> Path:
    return Path(os.environ.get("KILOCLAW_CLUSTER_DIR", ROOT / ".cluster"))


def node_netns(node: str) -> str:
    port = os.environ.get("KILOCLAW_CLUSTER_PORT", "16443")
    return f"kiloclaw-{port}-{node.removeprefix('kiloclaw-node-')}"


def write_overlay(directory: Path, image: str, fly_url: str, api_port: str) -> Path:
    """deploy/ as it is, plus what this machine needs (the module docstring says why)."""
    directory.mkdir(parents=True, exist_ok=True)
    repository, tag = image.rsplit(":", 1)
    env = {
        "FLY_API_BASE_URL": fly_url,
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": api_port,
        **TEST_INTERVALS,
    }
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "deploy", directory)],
        "images": [{"name": "ghcr.io/kilo-org/kiloclaw-operator", "newName": repository, "newTag": tag}],
        "patches": [
            {
                "patch": yaml.safe_dump(
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "metadata": {"name": DEPLOYMENT, "namespace": NAMESPACE},
                        "spec": {
                            "template": {
                                "spec": {
                                    "hostNetwork": True,
                                    "containers": [
                                        {
                                            "name": "operator",
                                            "imagePullPolicy": "Never",
                                            "env": [{"name": k, "value": v} for k, v in env.items()],
                                        }
                                    ],
                                }
                            }
                        },
                    }
                )
            },
            {
                "patch": yaml.safe_dump(
                    {
                        "apiVersion": "v1",
                        "kind": "Namespace",
                        "metadata": {
                            "name": NAMESPACE,
                            "labels": {
                                "pod-security.kubernetes.io/enforce": "privileged",
                                "pod-security.kubernetes.io/warn": "restricted",
                                "pod-security.kubernetes.io/warn-version": "latest",
                            },
                        },
                    }
                )
            },
        ],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return directory


class Node:
    """The installed operator on the nodes, read through kubectl as an admin would."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def pods(self) -> list[dict[str, Any]]:
        result = kubectl("-n", NAMESPACE, "get", "pods", "-l", SELECTOR, "-o", "json")
        assert result.returncode == 0, result.stderr
        pods: list[dict[str, Any]] = json.loads(result.stdout)["items"]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    def ready_pods(self) -> list[dict[str, Any]]:
        return [
            p
            for p in self.pods()
            if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        ]

    async def wait_ready(self, count: int, timeout: float = 180) -> list[dict[str, Any]]:
        async def check() -> list[dict[str, Any]] | None:
            pods = self.ready_pods()
            return pods if len(pods) == count else None

        return await eventually(check, timeout=timeout, what=f"{count} operator pods Ready")

    async def holder(self) -> str:
        response = await self.stack.api.get(
            f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/{DEPLOYMENT}"
        )
        if response.status_code == 404:
            return ""
        response.raise_for_status()
        holder: str = response.json()["spec"].get("holderIdentity") or ""
        return holder

    @staticmethod
    def role(pod: dict[str, Any]) -> str | None:
        """/healthz of the pod, asked on its node's loopback (the pod uses the node's network)."""
        result = subprocess.run(
            ["ip", "netns", "exec", node_netns(pod["spec"]["nodeName"]), "curl", "-sf", "--max-time", "3",
             "http://127.0.0.1:8080/healthz"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if result.returncode != 0:
            return None
        role: str = json.loads(result.stdout)["role"]
        return role


@pytest.fixture(scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> AsyncIterator[Stack]:
    image = image_or_skip()
    if not request.config.getoption("--cluster"):
        pytest.skip("needs a real API server: --cluster (make cluster && make e2e)")
    if not (cluster_dir() / "node" / "up").exists():
        pytest.skip("no nodes: tests/node/node.sh up (make cluster NODES=1) starts them")
    if shutil.which("kubectl") is None or shutil.which("curl") is None:
        pytest.skip("kubectl and curl are needed")
    admin = realcluster.kubeconfig_path()
    stack = Stack(tmp_path_factory.mktemp("node-stack"), cluster=True)
    try:
        await stack.start(operator=False)
    except ClusterUnavailable as exc:
        pytest.skip(f"no reachable Kubernetes cluster: {exc}")
    os.environ["KUBECONFIG"] = str(admin)
    try:
        node_sh("load", image)
        node_sh("forward", stack.fly.base_url.rsplit(":", 1)[1])
        yield stack
    finally:
        # Stop the operator before flysim goes; the CRDs and instances stay (never `delete -k deploy/`).
        kubectl("-n", NAMESPACE, "delete", "deployment", DEPLOYMENT, "--wait=true", "--timeout=90s")
        await stack.close()


@pytest.fixture(scope="module")
def node(stack: Stack) -> Node:
    return Node(stack)


def running_and_ready(body: dict[str, Any]) -> bool:
    return (
        status(body).get("phase") == "Running"
        and status(body).get("flyState") == "started"
        and condition(body, "Ready").get("status") == "True"
    )


async def recovery_through_the_leader(stack: Stack, name: str) -> None:
    namespace = await stack.create_namespace("node")
    await stack.create_instance(namespace, name, flyApp=f"acct-{namespace}")
    body = await stack.wait_instance(namespace, name, running_and_ready, timeout=90, what="Running")
    source = status(body)["machineId"]
    stack.fly.crash_machine(source)
    await stack.wait_instance(
        namespace,
        name,
        lambda b: (
            running_and_ready(b)
            and status(b).get("machineId") not in (None, source)
            and (status(b).get("lastRecovery") or {}).get("outcome") == "Succeeded"
        ),
        timeout=90,
        what="recovered onto a replacement",
    )


async def test_kubectl_apply_k_deploy_runs_two_ready_replicas_on_two_nodes_and_exactly_one_leads(
    stack: Stack, node: Node, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    secret = kubectl("-n", NAMESPACE, "create", "secret", "generic", "kiloclaw-fly",
                     f"--from-literal=token={FLY_TOKEN}", "--dry-run=client", "-o", "yaml")  # fmt: skip
    namespace = kubectl("apply", "-f", str(ROOT / "deploy" / "base" / "namespace.yaml"))
    assert namespace.returncode == 0, namespace.stderr
    applied_secret = kubectl("apply", "-f", "-", stdin=secret.stdout)
    assert applied_secret.returncode == 0, applied_secret.stderr
    api_port = realcluster.load_access().server.rsplit(":", 1)[1]
    overlay = write_overlay(tmp_path / "overlay", image_or_skip(), stack.fly.base_url, api_port)
    started = time.monotonic()
    applied = kubectl("apply", "-k", str(overlay))
    assert applied.returncode == 0, applied.stderr
    # Everything but host networking meets the "restricted" Pod Security Standard.
    warnings = [line for line in applied.stderr.splitlines() if "violate PodSecurity" in line]
    assert len(warnings) == 1, applied.stderr
    violations = warnings[0].split('"restricted:latest": ', 1)[1].split("), ")
    assert all(v.startswith(("host namespaces", "hostPort")) for v in violations), warnings

    pods = await node.wait_ready(2)
    ready_after = time.monotonic() - started
    record_property("two_ready_seconds", round(ready_after, 1))
    print(f"\nkubectl apply -k -> 2/2 Ready in {ready_after:.1f} s")
    assert {p["spec"]["nodeName"] for p in pods} == {"kiloclaw-node-a", "kiloclaw-node-b"}
    for pod in pods:
        [container] = pod["spec"]["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] == 65532
        assert pod["spec"]["serviceAccountName"] == "kiloclaw-operator"

    async def one_leader() -> dict[str, str] | None:
        roles = {p["metadata"]["name"]: Node.role(p) for p in node.ready_pods()}
        return roles if sorted(map(str, roles.values())) == ["leader", "standby"] else None

    roles = await eventually(one_leader, timeout=60, what="one leader and one standby")
    [leader] = [name for name, role in roles.items() if role == "leader"]
    assert await node.holder() == leader


async def test_a_recovery_runs_through_the_leader_pod(stack: Stack, node: Node) -> None:
    assert len(node.ready_pods()) == 2
    await recovery_through_the_leader(stack, "rec")


async def test_deleting_the_leader_pod_hands_the_lease_to_the_other_replica(
    stack: Stack, node: Node, record_property: Callable[[str, object], None]
) -> None:
    leader = await node.holder()
    [other] = [p["metadata"]["name"] for p in node.ready_pods() if p["metadata"]["name"] != leader]
    deleted = kubectl("-n", NAMESPACE, "delete", "pod", leader, "--wait=false")
    assert deleted.returncode == 0, deleted.stderr
    started = time.monotonic()

    async def taken_over() -> bool | None:
        return True if await node.holder() == other else None

    await eventually(taken_over, timeout=HANDOVER_BUDGET_SECONDS, what=f"{other} holds the Lease")
    handover = time.monotonic() - started
    record_property("pod_delete_handover_seconds", round(handover, 2))
    print(f"\nleader pod deleted -> {other} leads after {handover:.1f} s")
    # The ReplicaSet replaces the deleted pod; the new one is the standby.
    pods = await node.wait_ready(2)
    assert leader not in {p["metadata"]["name"] for p in pods}
    await recovery_through_the_leader(stack, "after")


async def test_a_node_drain_evicts_one_replica_and_the_disruption_budget_holds_the_other(
    stack: Stack, node: Node
) -> None:
    pods = await node.wait_ready(2)
    first, second = sorted({p["spec"]["nodeName"] for p in pods})
    drained = kubectl("drain", first, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=120s")
    assert drained.returncode == 0, drained.stderr
    try:
        survivors = await node.wait_ready(1)
        assert survivors[0]["spec"]["nodeName"] == second
        # The evicted replica's replacement has nowhere to go (node a cordoned, its ports taken on b).
        blocked = kubectl("drain", second, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=15s")
        assert blocked.returncode != 0
        assert "disruption budget" in blocked.stderr, blocked.stderr
        [still] = node.ready_pods()
        assert still["metadata"]["name"] == survivors[0]["metadata"]["name"]

        async def leads() -> bool | None:
            return True if await node.holder() == still["metadata"]["name"] else None

        await eventually(leads, timeout=HANDOVER_BUDGET_SECONDS, what="the remaining replica leads")
    finally:
        for name in (first, second):
            kubectl("uncordon", name)
    await node.wait_ready(2)


async def test_uninstalling_as_the_readme_says_stops_the_operator_and_destroys_nothing(
    stack: Stack, node: Node
) -> None:
    """README, "Install with Helm": with kustomize, remove the operator's Deployment, PDB, RBAC, Service and
    ServiceAccount — never `kubectl delete -k deploy/`. Its pods stop (SIGTERM); nothing on Fly is stopped
    or deleted, and the instance and the CRDs stay."""
    await node.wait_ready(2)
    namespace = await stack.create_namespace("node")
    app = f"acct-{namespace}"
    await stack.create_instance(namespace, "kept", flyApp=app)
    body = await stack.wait_instance(namespace, "kept", running_and_ready, timeout=90, what="Running")
    machine_id, volume_id = status(body)["machineId"], status(body)["volumeId"]
    log_before = len(stack.fly.request_log)

    deleted = kubectl("delete", "-k", str(ROOT / "deploy" / "operator"), "--wait=true", "--timeout=120s")
    assert deleted.returncode == 0, deleted.stderr
    base = ROOT / "deploy" / "base"
    removed = kubectl(
        "delete", "-f", str(base / "rbac.yaml"), "-f", str(base / "service.yaml"), "-f",
        str(base / "serviceaccount.yaml"),
    )  # fmt: skip
    assert removed.returncode == 0, removed.stderr

    async def no_pods() -> bool | None:
        return True if not node.pods() else None

    await eventually(no_pods, timeout=120, what="the operator pods gone")
    after = stack.fly.request_log[log_before:]
    destructive = [(r.method, r.path) for r in after if r.method == "DELETE" or r.path.endswith("/stop")]
    assert destructive == [], destructive
    assert stack.fly.machine(machine_id)["state"] == "started"
    assert [v["id"] for v in stack.live_volumes(app)] == [volume_id]
    kept = await stack.get_instance(namespace, "kept")
    assert kept is not None and status(kept)["machineId"] == machine_id
    crds = kubectl("get", "crd", f"kiloclawinstances.{GROUP}", f"kiloclawretainedvolumes.{GROUP}")
    assert crds.returncode == 0, crds.stderr
