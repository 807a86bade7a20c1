"""The operator in its image, run as deploy/ runs it (tests/operatorcontainer.py: same entrypoint, user,
read-only root filesystem, Fly token file, ServiceAccount token), against the real API server of
``make cluster`` and flysim: the lifecycle and recovery stories, leader fail-over between two containers, and
what a ``helm uninstall`` leaves behind (everything on Fly, every instance, the CRDs).

``make e2e`` runs this module in a pytest process of its own (no in-process operator holds the Lease) with
KILOCLAW_IMAGE set to the image it built; without the image, podman or a cluster every test skips, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import realcluster
from builders import sandbox_id
from charttools import CHART, helm_or_skip, objects
from harness import (
    FLY_TOKEN,
    ClusterUnavailable,
    Stack,
    condition,
    eventually,
    free_port,
    status,
)
from imagetools import image_or_skip
from kiloclaw_operator.models import GROUP
from operatorcontainer import (
    TEST_INTERVALS,
    OperatorContainer,
    cluster_ca,
    rendered_deployment,
    write_secret,
    write_service_account,
)

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "kiloclaw-system"
# A Lease is taken over once it has not been renewed for its duration (8 s by default, which the
# Deployment keeps); the standby checks every retry period (1 s). Allow for a loaded 2-core machine.
FAILOVER_BUDGET_SECONDS = 20


class Replicas:
    """The operator containers of this module: started from a Deployment, all removed at the end."""

    def __init__(self, stack: Stack, image: str, admin_kubeconfig: Path, workdir: Path) -> None:
        self.stack = stack
        self.image = image
        self.admin_kubeconfig = admin_kubeconfig
        self.workdir = workdir
        self.started: list[OperatorContainer] = []
        self.kubectl = shutil.which("kubectl") or "kubectl"

    def start(
        self, name: str, deployment: dict[str, Any] | None = None, service_account: str = "kiloclaw-operator"
    ) -> OperatorContainer:
        deployment = deployment or rendered_deployment(self.kubectl, ROOT)
        namespace = deployment["metadata"]["namespace"]
        access = realcluster.load_access(self.admin_kubeconfig)
        with access.client() as admin:
            token = realcluster.service_account_token(admin, namespace, service_account)
        sa_dir = write_service_account(
            self.workdir / name / "serviceaccount", token, cluster_ca(self.admin_kubeconfig), namespace
        )
        [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v]
        secret = volume["secret"]
        token_dir = write_secret(
            self.workdir / name / "fly", {secret["items"][0]["path"]: FLY_TOKEN}, secret["defaultMode"]
        )
        container = OperatorContainer(
            image=self.image,
            name=name,
            deployment=deployment,
            service_account_dir=sa_dir,
            secret_dirs={secret["secretName"]: token_dir},
            api_server=access.server,
            overrides={
                "FLY_API_BASE_URL": self.stack.fly.base_url,
                "KILOCLAW_HEALTH_PORT": str(free_port()),
                "KILOCLAW_METRICS_PORT": str(free_port()),
                **TEST_INTERVALS,
            },
        )
        self.started.append(container.start())
        return container

    def remove_all(self) -> None:
        for container in self.started:
            container.remove()


@pytest.fixture(scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> AsyncIterator[Stack]:
    """flysim and an admin client of the real API server, with the CRDs and deploy/'s ServiceAccount and RBAC
    applied; no operator in this process."""
    image_or_skip()
    if not request.config.getoption("--cluster"):
        pytest.skip("needs a real API server: --cluster (make cluster && make e2e)")
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    admin = realcluster.kubeconfig_path()
    stack = Stack(tmp_path_factory.mktemp("image-stack"), cluster=True)
    try:
        await stack.start(operator=False)
    except ClusterUnavailable as exc:
        pytest.skip(f"no reachable Kubernetes cluster: {exc}")
    os.environ["KUBECONFIG"] = str(admin)  # the containers get their own credentials; the tests are admin
    try:
        yield stack
    finally:
        await stack.close()


@pytest.fixture(scope="module")
def replicas(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    result = Replicas(stack, image_or_skip(), realcluster.kubeconfig_path(), tmp_path_factory.mktemp("pods"))
    try:
        yield result
    finally:
        for container in result.started:
            if container.running():
                print(f"--- {container.name} (last lines)\n{container.logs()}")
        result.remove_all()


async def wait_role(container: OperatorContainer, role: str, timeout: float = 60) -> float:
    """Seconds until ``container`` reports ``role``."""
    started = time.monotonic()

    async def check() -> bool | None:
        if not container.running():
            raise AssertionError(f"{container.name} exited:\n{container.logs()}")
        return True if await container.role() == role else None

    await eventually(check, timeout=timeout, what=f"{container.name} is {role}")
    return time.monotonic() - started


async def lease_holder(stack: Stack, name: str = "kiloclaw-operator", namespace: str = NAMESPACE) -> str:
    response = await stack.api.get(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}")
    response.raise_for_status()
    holder: str = response.json()["spec"].get("holderIdentity") or ""
    return holder


def running_and_ready(body: dict[str, Any]) -> bool:
    return (
        status(body).get("phase") == "Running"
        and status(body).get("flyState") == "started"
        and condition(body, "Ready").get("status") == "True"
    )


def app_of(namespace: str) -> str:
    return f"acct-{namespace}"


async def provisioned(stack: Stack, namespace: str, name: str) -> dict[str, Any]:
    await stack.create_instance(namespace, name, flyApp=app_of(namespace))
    return await stack.wait_instance(namespace, name, running_and_ready, timeout=60, what="Running and Ready")


async def recovered(stack: Stack, namespace: str, name: str, source_machine: str) -> dict[str, Any]:
    return await stack.wait_instance(
        namespace,
        name,
        lambda b: (
            running_and_ready(b)
            and status(b).get("machineId") not in (None, source_machine)
            and (status(b).get("lastRecovery") or {}).get("outcome") == "Succeeded"
        ),
        timeout=60,
        what="recovered onto a replacement",
    )


# --- the stories through the container ---------------------------------------------------------------------


async def test_the_container_leads_and_drives_an_instance_through_its_lifecycle_as_its_service_account(
    stack: Stack, replicas: Replicas
) -> None:
    a = replicas.start("kiloclaw-operator-a")
    await wait_role(a, "leader")
    assert await lease_holder(stack) == "kiloclaw-operator-a"
    namespace = await stack.create_namespace("img")
    app = app_of(namespace)
    body = await provisioned(stack, namespace, "life")
    machine_id, volume_id = status(body)["machineId"], status(body)["volumeId"]
    assert stack.fly.machine(machine_id)["state"] == "started"
    assert f"{GROUP}/finalizer" in body["metadata"]["finalizers"]

    await stack.patch_instance(namespace, "life", {"spec": {"state": "Stopped"}})
    await stack.wait_instance(
        namespace, "life", lambda b: status(b).get("flyState") == "stopped", timeout=30, what="stopped"
    )
    assert stack.fly.machine(machine_id)["state"] == "stopped"
    await stack.patch_instance(namespace, "life", {"spec": {"state": "Running"}})
    again = await stack.wait_instance(namespace, "life", running_and_ready, timeout=30, what="started again")
    assert status(again)["machineId"] == machine_id and status(again)["volumeId"] == volume_id

    await stack.delete_instance(namespace, "life")
    await stack.wait_gone(namespace, "life", timeout=30)
    assert stack.live_machines(app) == [] and stack.live_volumes(app) == []
    # The operator's Events were posted under its ServiceAccount (RBAC: events create).
    assert a.running()


async def test_the_container_recovers_an_instance_whose_host_failed(stack: Stack, replicas: Replicas) -> None:
    [leader] = [c for c in replicas.started if c.running()]
    assert await leader.role() == "leader"
    namespace = await stack.create_namespace("img")
    body = await provisioned(stack, namespace, "rec")
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    stack.fly.crash_machine(source_machine)
    done = await recovered(stack, namespace, "rec", source_machine)
    assert status(done)["volumeId"] != source_volume
    assert stack.fly.machine(source_machine)["state"] in ("destroyed", "destroying")
    live = stack.live_machines(app_of(namespace), sandbox_id=sandbox_id(namespace, "rec"))
    assert [m["id"] for m in live] == [status(done)["machineId"]]


async def test_a_second_container_takes_over_when_the_leader_is_killed_and_recovers_through_it(
    stack: Stack, replicas: Replicas, record_property: Callable[[str, object], None]
) -> None:
    [a] = [c for c in replicas.started if c.running()]
    b = replicas.start("kiloclaw-operator-b")
    await wait_role(b, "standby")
    assert await a.role() == "leader"
    namespace = await stack.create_namespace("img")
    body = await provisioned(stack, namespace, "fo")
    source_machine = status(body)["machineId"]

    a.kill()
    killed_at = time.monotonic()
    await wait_role(b, "leader", timeout=FAILOVER_BUDGET_SECONDS + 10)
    failover = time.monotonic() - killed_at
    record_property("failover_seconds", round(failover, 2))
    print(f"\nleader killed (SIGKILL) -> standby leads after {failover:.1f} s")
    assert failover < FAILOVER_BUDGET_SECONDS
    assert await lease_holder(stack) == "kiloclaw-operator-b"

    stack.fly.crash_machine(source_machine)
    await recovered(stack, namespace, "fo", source_machine)
    b.stop()


# --- helm uninstall destroys nothing ---------------------------------------------------------------------


def helm(helm_binary: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm_binary), *args], capture_output=True, text=True, timeout=180, env=dict(os.environ)
    )


def adopt_crds_into(release: str, namespace: str) -> None:
    """The CRDs exist already (applied with kubectl by the tests before): let the release own them, as an
    admin moving from ``kubectl apply -k`` to Helm does (README)."""
    for crd in ("kiloclawinstances", "kiloclawretainedvolumes"):
        for args in (
            ["label", "--overwrite", f"crd/{crd}.{GROUP}", "app.kubernetes.io/managed-by=Helm"],
            [
                "annotate",
                "--overwrite",
                f"crd/{crd}.{GROUP}",
                f"meta.helm.sh/release-name={release}",
                f"meta.helm.sh/release-namespace={namespace}",
            ],
        ):
            subprocess.run(["kubectl", *args], check=True, capture_output=True, timeout=60)


async def test_helm_uninstall_stops_the_operator_but_destroys_no_instance_no_crd_and_nothing_on_fly(
    stack: Stack, replicas: Replicas
) -> None:
    helm_binary = helm_or_skip()
    for container in replicas.started:
        container.remove()
    release = f"kiloclaw-operator-u{os.getpid()}"
    namespace = release
    created = await stack.api.post("/api/v1/namespaces", json={"metadata": {"name": namespace}})
    assert created.status_code == 201, created.text
    adopt_crds_into(release, namespace)
    # The cluster-wide tenancy objects (user roles, admission policies) are the test cluster's own install's,
    # as for a second release of the chart.
    installed = helm(
        helm_binary,
        "install",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--set",
        "tenancy.userRoles=false",
        "--set",
        "tenancy.admissionPolicies=false",
    )
    assert installed.returncode == 0, installed.stderr
    manifest = objects(helm(helm_binary, "get", "manifest", release, "--namespace", namespace).stdout)
    deployment = manifest[("apps/v1", "Deployment", namespace, release)]
    # The chart's own Deployment, in its container, with the release's ServiceAccount.
    operator = replicas.start(f"{release}-0", deployment, service_account=release)
    await wait_role(operator, "leader")
    tenant = await stack.create_namespace("img")
    body = await provisioned(stack, tenant, "kept")
    machine_id, volume_id = status(body)["machineId"], status(body)["volumeId"]
    log_before = len(stack.fly.request_log)

    uninstalled = helm(helm_binary, "uninstall", release, "--namespace", namespace, "--wait")
    assert uninstalled.returncode == 0, uninstalled.stderr
    assert "kept due to the resource policy" in uninstalled.stdout + uninstalled.stderr
    # What the kubelet does once the Deployment is gone: SIGTERM to the pod. (Its ServiceAccount is gone
    # too, so it may already have stopped on a 401: either way it acted on nothing.)
    operator.stop()
    assert not operator.running()

    after = stack.fly.request_log[log_before:]
    destructive = [(r.method, r.path) for r in after if r.method == "DELETE" or r.path.endswith("/stop")]
    assert destructive == [], destructive
    assert stack.fly.machine(machine_id)["state"] == "started"
    assert [v["id"] for v in stack.live_volumes(app_of(tenant))] == [volume_id]
    kept = await stack.get_instance(tenant, "kept")
    assert kept is not None and status(kept)["machineId"] == machine_id and running_and_ready(kept)
    for crd in ("kiloclawinstances", "kiloclawretainedvolumes"):
        response = await stack.api.get(
            f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}.{GROUP}"
        )
        assert response.status_code == 200, f"{crd} was deleted by the uninstall"
    # The release's own objects are gone (the uninstall did run): its ServiceAccount and ClusterRole.
    gone = await stack.api.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{release}")
    assert gone.status_code == 404
    gone = await stack.api.get(f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{release}")
    assert gone.status_code == 404
    print(f"\nafter helm uninstall: {json.dumps({'machine': machine_id, 'volume': volume_id})} untouched")
