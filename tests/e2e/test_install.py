"""The install as a user performs it, on a real API server (``--cluster``; ``make cluster && make e2e``).

The real server checks what no emulator of ours can vouch for: the CRDs' structural schema and CEL cost
budget, every manifest of deploy/ against the built-in types (server-side dry run with strict field
validation), and the size limit of annotations at the largest instance the schema admits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import realcluster

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl")


@pytest.fixture(scope="module")
def kubeconfig(request: pytest.FixtureRequest) -> Iterator[str]:
    if not request.config.getoption("--cluster"):
        pytest.skip("needs a real API server: --cluster (make cluster && make e2e)")
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    try:
        realcluster.load_access()
    except realcluster.NoCluster as exc:
        pytest.skip(str(exc))
    yield str(realcluster.kubeconfig_path())


def kubectl(kubeconfig: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KUBECTL), *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        env=dict(os.environ, KUBECONFIG=kubeconfig),
    )


def test_the_crds_install_on_the_real_api_server_and_become_established(kubeconfig: str) -> None:
    applied = kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "-k", str(ROOT / "crds"))
    assert applied.returncode == 0, applied.stderr
    for crd in ("kiloclawinstances", "kiloclawretainedvolumes"):
        waited = kubectl(kubeconfig, "wait", "--for=condition=Established", f"crd/{crd}.kiloclaw.kilo.ai")
        assert waited.returncode == 0, waited.stderr


@pytest.mark.parametrize("kustomization", ["deploy", "deploy/overlays/shard-b"])
def test_the_whole_install_passes_server_side_validation(kubeconfig: str, kustomization: str) -> None:
    """``kubectl apply -k deploy/`` as a dry run on the server, with strict field validation; the namespace
    exists first, as a dry run cannot create what the rest is placed in."""
    namespace = kubectl(kubeconfig, "apply", "-f", str(ROOT / "deploy" / "base" / "namespace.yaml"))
    assert namespace.returncode == 0, namespace.stderr
    dry_run = kubectl(
        kubeconfig,
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-k",
        str(ROOT / kustomization),
    )
    assert dry_run.returncode == 0, dry_run.stderr
    assert "deployment.apps/" in dry_run.stdout and "clusterrole.rbac.authorization.k8s.io/" in dry_run.stdout


def test_the_examples_apply_on_the_real_api_server(kubeconfig: str) -> None:
    built = kubectl(kubeconfig, "kustomize", str(ROOT / "examples"))
    assert built.returncode == 0, built.stderr
    namespace = kubectl(kubeconfig, "apply", "-f", str(ROOT / "examples" / "00-namespace.yaml"))
    assert namespace.returncode == 0, namespace.stderr
    dry_run = kubectl(
        kubeconfig, "apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=built.stdout
    )
    assert dry_run.returncode == 0, dry_run.stderr


def _largest_instance(name: str, namespace: str) -> dict[str, Any]:
    env = {f"{'K' * 124}{i:04d}": "v" * 3968 for i in range(7)}
    env["LAST"] = "v" * (32768 - sum(len(k) + len(v) for k, v in env.items()) - len("LAST"))
    return {
        "apiVersion": "kiloclaw.kilo.ai/v1alpha1",
        "kind": "KiloClawInstance",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "sandboxId": "k" * 64,
            "userId": "u" * 128,
            "flyApp": "a" * 63,
            "image": "i" * 512,
            "regions": ["iad", "ord", "cdg"],
            "volume": {"sizeGb": 500, "mountPath": "/" + "m" * 254},
            "state": "Stopped",
            "env": env,
        },
    }


def test_the_largest_admissible_instance_survives_kubectl_apply_and_the_operators_annotations(
    kubeconfig: str,
) -> None:
    """kubectl apply copies the object into last-applied-configuration and kopf copies the spec into its
    last-handled-configuration: both fit the 256 KiB annotation limit at the schema's limits."""
    namespace = f"install-{os.getpid()}"
    created = kubectl(kubeconfig, "create", "namespace", namespace)
    assert created.returncode == 0, created.stderr
    name = "n" * 63
    body = _largest_instance(name, namespace)
    # Bound to the instance's app and image repository, as the admission policy asks (deploy/admission).
    bound = kubectl(
        kubeconfig,
        "annotate",
        "namespace",
        namespace,
        f"kiloclaw.kilo.ai/fly-apps={body['spec']['flyApp']}",
        f"kiloclaw.kilo.ai/image-repositories={body['spec']['image']}",
    )
    assert bound.returncode == 0, bound.stderr
    applied = kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(body))
    assert applied.returncode == 0, applied.stderr
    try:
        kopf_annotation = json.dumps({"spec": body["spec"]}, separators=(",", ":"))
        patch = {
            "metadata": {"annotations": {"kopf.zalando.org/last-handled-configuration": kopf_annotation}}
        }
        patched = kubectl(
            kubeconfig,
            "patch",
            "kci",
            name,
            "-n",
            namespace,
            "--type",
            "merge",
            "-p",
            json.dumps(patch),
        )
        assert patched.returncode == 0, patched.stderr
    finally:
        kubectl(kubeconfig, "delete", "kci", name, "-n", namespace, "--wait=false")


def test_the_operators_lease_renewals_are_served_in_the_leader_election_priority_level(
    kubeconfig: str,
) -> None:
    """deploy/flowcontrol on the real server's API Priority and Fairness: the operator's ServiceAccount
    renewing a Lease (one update, leadership.py) is classified into `leader-election`, while its other
    requests (a read here) stay in `workload-low` with the rest of its traffic. The server names the
    priority level of every answer in a response header."""
    for manifest in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml"):
        applied = kubectl(kubeconfig, "apply", "-f", str(ROOT / "deploy" / "base" / manifest))
        assert applied.returncode == 0, applied.stderr
    applied = kubectl(kubeconfig, "apply", "-k", str(ROOT / "deploy" / "flowcontrol"))
    assert applied.returncode == 0, applied.stderr
    admin_access = realcluster.load_access()
    with admin_access.client() as admin:
        levels = {
            item["metadata"]["name"]: item["metadata"]["uid"]
            for item in admin.get("/apis/flowcontrol.apiserver.k8s.io/v1/prioritylevelconfigurations").json()[
                "items"
            ]
        }
        token = realcluster.service_account_token(admin, "kiloclaw-system", "kiloclaw-operator")
        leases = "/apis/coordination.k8s.io/v1/namespaces/kiloclaw-system/leases"
        name = "kiloclaw-test-flowcontrol"
        admin.delete(f"{leases}/{name}")
        created = admin.post(
            leases, json={"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name}}
        )
        assert created.status_code == 201, created.text
    try:
        with admin_access.as_token(token).client() as operator:
            read = operator.get(f"{leases}/{name}")
            assert read.status_code == 200, read.text
            lease = read.json()
            lease["spec"] = {"holderIdentity": "test", "leaseDurationSeconds": 15}
            renewed = operator.put(f"{leases}/{name}", json=lease)
            assert renewed.status_code == 200, renewed.text
        header = "X-Kubernetes-PF-PriorityLevel-UID"
        assert renewed.headers[header] == levels["leader-election"]
        assert read.headers[header] == levels["workload-low"]
    finally:
        with admin_access.client() as admin:
            admin.delete(f"{leases}/{name}")
