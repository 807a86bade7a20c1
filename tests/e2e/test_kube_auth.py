"""The operator's Kubernetes login on a real API server (``--cluster``), through the official client's
configuration loading: the in-cluster login reads a rotated ServiceAccount token again after a 401; a
kubeconfig's client certificate, token file and exec credential plugin (token or certificate) each log in, and
no certificate or key is left on disk; the RBAC of deploy/base is what the real authorizer enforces."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import realcluster
from kiloclaw_operator.kube import KubeClient, KubeConnection, build_http_client, connection_from_login
from kiloclaw_operator.kubeconfig import load_in_cluster, load_kubeconfig

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


def _admin_kubeconfig() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(realcluster.kubeconfig_path().read_text())
    return config


def _current(config: dict[str, Any], section: str) -> dict[str, Any]:
    context = {c["name"]: c["context"] for c in config["contexts"]}[config["current-context"]]
    entry: dict[str, Any] = {e["name"]: e[section[:-1]] for e in config[section]}[context[section[:-1]]]
    return entry


def _in_cluster_connection(tmp_path: Path, token_file: Path) -> KubeConnection:
    """The library's in-cluster login, as in a pod: the kubelet's variables, the CA and the token file."""
    cluster = _current(_admin_kubeconfig(), "clusters")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    host, port = cluster["server"].removeprefix("https://").rsplit(":", 1)
    environ = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
    return connection_from_login(load_in_cluster(str(token_file), str(ca), environ))


def _kubeconfig_with_user(tmp_path: Path, user: dict[str, Any]) -> Path:
    """The admin's kubeconfig with another user."""
    config = _admin_kubeconfig()
    config["users"] = [{"name": _current_user_name(config), "user": user}]
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def _current_user_name(config: dict[str, Any]) -> str:
    name: str = {c["name"]: c["context"] for c in config["contexts"]}[config["current-context"]]["user"]
    return name


def _token(admin: realcluster.ClusterAccess) -> str:
    with admin.client() as client:
        return realcluster.service_account_token(client, NAMESPACE, SERVICE_ACCOUNT, 600)


async def test_a_rotated_service_account_token_is_read_again_after_a_401_without_a_restart(
    admin: realcluster.ClusterAccess, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("not-a-valid-token")
    client = build_http_client(_in_cluster_connection(tmp_path, token_file))
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
    client = build_http_client(_in_cluster_connection(tmp_path, token_file))
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
            kube = KubeClient(_in_cluster_connection(tmp_path, token_file))
            try:
                pages = [page async for page in kube.instance_pages(namespace, page_size=2)]
            finally:
                await kube.aclose()
        finally:
            # No operator ran here (no finalizers), and without kube-controller-manager a deleted namespace
            # keeps its objects: delete the instances themselves, so no later listing meets them.
            for name in names:
                client.delete(
                    f"/apis/kiloclaw.kilo.ai/v1alpha1/namespaces/{namespace}/kiloclawinstances/{name}"
                )
            client.delete(f"/api/v1/namespaces/{namespace}")
    assert [len(page) for page in pages] == [2, 2, 1]
    assert sorted(item["metadata"]["name"] for page in pages for item in page) == names


# --- kubeconfig logins on the real server ------------------------------------------------------------------


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The process's temporary folder, here: what a login leaves behind is seen."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


async def _status_of_a_list(conn: KubeConnection) -> int:
    client = build_http_client(conn)
    try:
        return (await client.get(INSTANCES)).status_code
    finally:
        await client.aclose()


async def test_the_admin_kubeconfigs_client_certificate_logs_in_and_leaves_no_key_on_disk(
    admin: realcluster.ClusterAccess, private_tmp: Path
) -> None:
    for _ in range(2):  # the library caches the files it wrote: a second load must not bring them back
        login = load_kubeconfig(str(realcluster.kubeconfig_path()))
        assert login.client_key_pem and login.ca_pem
        assert await _status_of_a_list(connection_from_login(login)) == 200
    assert not any(os.scandir(private_tmp))


async def test_a_kubeconfig_token_file_is_read_again_after_a_401(
    admin: realcluster.ClusterAccess, tmp_path: Path
) -> None:
    """The library reads a token file once; the login is loaded again after a 401, so a rotated file is
    picked up by the same client."""
    token_file = tmp_path / "token"
    token_file.write_text("not-a-valid-token")
    kubeconfig = _kubeconfig_with_user(tmp_path, {"tokenFile": "token"})  # relative to the kubeconfig
    client = build_http_client(connection_from_login(load_kubeconfig(str(kubeconfig))))
    try:
        assert (await client.get(INSTANCES)).status_code == 401
        token_file.write_text(_token(admin))
        assert (await client.get(INSTANCES)).status_code == 200
    finally:
        await client.aclose()


EXEC_PLUGIN = """#!{python}
# A cloud's credential plugin: prints what the file named by its argument holds, as an ExecCredential.
import json, os, sys
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
with open(sys.argv[1]) as handle:
    status = json.load(handle)
print(json.dumps({{"apiVersion": info["apiVersion"], "kind": "ExecCredential", "status": status}}))
"""


def _exec_user(tmp_path: Path, status: dict[str, Any]) -> dict[str, Any]:
    plugin = tmp_path / "cloud-auth"
    plugin.write_text(EXEC_PLUGIN.format(python=sys.executable))
    plugin.chmod(0o755)
    answer = tmp_path / "answer.json"
    answer.write_text(json.dumps(status))
    return {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": str(plugin),
            "args": [str(answer)],
            "interactiveMode": "Never",
        }
    }


async def test_an_exec_plugins_token_logs_in(admin: realcluster.ClusterAccess, tmp_path: Path) -> None:
    user = _exec_user(tmp_path, {"token": _token(admin), "expirationTimestamp": "2099-01-01T00:00:00Z"})
    login = load_kubeconfig(str(_kubeconfig_with_user(tmp_path, user)))
    assert login.credentials is not None and login.credentials.expires_at is not None
    assert await _status_of_a_list(connection_from_login(login)) == 200


async def test_an_exec_plugins_client_certificate_logs_in_and_leaves_no_key_on_disk(
    admin: realcluster.ClusterAccess, tmp_path: Path, private_tmp: Path
) -> None:
    admin_user = _current("users" and _admin_kubeconfig(), "users")
    status = {
        "clientCertificateData": base64.b64decode(admin_user["client-certificate-data"]).decode(),
        "clientKeyData": base64.b64decode(admin_user["client-key-data"]).decode(),
    }
    login = load_kubeconfig(str(_kubeconfig_with_user(tmp_path, _exec_user(tmp_path, status))))
    assert await _status_of_a_list(connection_from_login(login)) == 200
    assert not any(os.scandir(private_tmp))
