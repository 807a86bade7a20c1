"""The operator's Kubernetes credentials on a real API server (``--cluster``): the ServiceAccount token is
read from its file again when it rotates, and the RBAC of deploy/base is what the real authorizer enforces."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import realcluster
from kiloclaw_operator.kube import KubeClient, KubeConnection, build_http_client, with_token_file

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE, SERVICE_ACCOUNT = "kiloclaw-system", "kiloclaw-operator"
INSTANCES = "/apis/kiloclaw.kilo.ai/v1alpha1/kiloclawinstances"


@pytest.fixture(scope="module")
def admin(request: pytest.FixtureRequest) -> Iterator[realcluster.ClusterAccess]:
    if not request.config.getoption("--cluster"):
        pytest.skip("needs a real API server: --cluster (make cluster && make e2e)")
    try:
        access = realcluster.load_access()
    except realcluster.NoCluster as exc:
        pytest.skip(str(exc))
    for manifest in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml"):
        applied = subprocess.run(
            ["kubectl", "apply", "-f", str(ROOT / "deploy" / "base" / manifest)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert applied.returncode == 0, applied.stderr
    applied = subprocess.run(
        ["kubectl", "apply", "--server-side", "--force-conflicts", "-k", str(ROOT / "crds")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert applied.returncode == 0, applied.stderr
    yield access


def _connection_to_the_cluster() -> KubeConnection:
    config: dict[str, Any] = yaml.safe_load(realcluster.kubeconfig_path().read_text())
    contexts = {c["name"]: c["context"] for c in config["contexts"]}
    cluster_name = contexts[config["current-context"]]["cluster"]
    cluster = {c["name"]: c["cluster"] for c in config["clusters"]}[cluster_name]
    return KubeConnection(server=cluster["server"], ca_data=cluster["certificate-authority-data"].encode())


def _token(admin: realcluster.ClusterAccess) -> str:
    with admin.client() as client:
        return realcluster.service_account_token(client, NAMESPACE, SERVICE_ACCOUNT, 600)


async def test_a_rotated_service_account_token_is_read_again_after_a_401_without_a_restart(
    admin: realcluster.ClusterAccess, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("not-a-valid-token")
    client = build_http_client(with_token_file(_connection_to_the_cluster(), token_file))
    try:
        assert (await client.get(INSTANCES)).status_code == 401
        token_file.write_text(_token(admin))
        assert (await client.get(INSTANCES)).status_code == 200
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("path", "verb", "expected"),
    [
        (INSTANCES, "GET", 200),
        ("/api/v1/secrets", "GET", 403),
        ("/api/v1/namespaces/kiloclaw-system/configmaps", "GET", 403),
        (INSTANCES.replace("kiloclawinstances", "kiloclawretainedvolumes"), "GET", 200),
    ],
)
async def test_the_operator_service_account_gets_exactly_its_rbac(
    admin: realcluster.ClusterAccess, tmp_path: Path, path: str, verb: str, expected: int
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(_token(admin))
    client = build_http_client(with_token_file(_connection_to_the_cluster(), token_file))
    try:
        assert (await client.request(verb, path)).status_code == expected
    finally:
        await client.aclose()


def test_the_test_run_uses_a_real_api_server_not_kubesim(admin: realcluster.ClusterAccess) -> None:
    with admin.client() as client:
        version = client.get("/version").json()
    assert version["gitVersion"].startswith("v1.34."), version
    assert os.environ.get("KUBECONFIG")


async def test_the_operators_client_lists_instances_page_by_page_on_the_real_server(
    admin: realcluster.ClusterAccess, tmp_path: Path
) -> None:
    """The feed's start-up listing (``instance_pages``: limit and continue) as the real API server chunks it,
    read with the operator's own client (the aiohttp transport over TLS) and its ServiceAccount token."""
    namespace = f"paging-{os.getpid()}"
    names = [f"paged-{index}" for index in range(5)]
    with admin.client() as client:
        bound = {
            "kiloclaw.kilo.ai/fly-apps": "acct-paging",
            "kiloclaw.kilo.ai/image-repositories": "registry.fly.io/",
        }
        created = client.post(
            "/api/v1/namespaces", json={"metadata": {"name": namespace, "annotations": bound}}
        )
        assert created.status_code == 201, created.text
        try:
            for name in names:
                body = {
                    "apiVersion": "kiloclaw.kilo.ai/v1alpha1",
                    "kind": "KiloClawInstance",
                    "metadata": {"name": name},
                    "spec": {
                        "sandboxId": f"ki_{name}".replace("-", "_"),
                        "userId": f"user-{name}",
                        "flyApp": "acct-paging",
                        "image": "registry.fly.io/kiloclaw:2026.11.1",
                        "state": "Stopped",
                    },
                }
                response = client.post(
                    f"/apis/kiloclaw.kilo.ai/v1alpha1/namespaces/{namespace}/kiloclawinstances", json=body
                )
                assert response.status_code == 201, response.text
            token_file = tmp_path / "token"
            token_file.write_text(_token(admin))
            kube = KubeClient(with_token_file(_connection_to_the_cluster(), token_file))
            try:
                pages = [page async for page in kube.instance_pages(namespace, page_size=2)]
            finally:
                await kube.aclose()
        finally:
            client.delete(f"/api/v1/namespaces/{namespace}")
    assert [len(page) for page in pages] == [2, 2, 1]
    assert sorted(item["metadata"]["name"] for page in pages for item in page) == names
