"""Talking to a real API server from the tests (``--cluster``): kubeconfig loading for plain httpx clients and
ServiceAccount tokens through TokenRequest.

Only what a test run needs: the kubeconfig of ``make cluster`` (client certificate) or any context whose user
has a token or client certificate. Exec credential plugins are the operator's business, not the tests'.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml


class NoCluster(Exception):
    """No kubeconfig, or one the tests cannot use; the text says which."""


@dataclass(frozen=True)
class ClusterAccess:
    server: str
    ssl_context: ssl.SSLContext | bool
    token: str | None = None

    def as_token(self, token: str) -> ClusterAccess:
        """The same server, authenticated with ``token`` (a ServiceAccount's) instead of the admin's
        credentials (a client certificate is dropped: the server would authenticate that first)."""
        context = self.ssl_context
        if isinstance(context, ssl.SSLContext):
            fresh = ssl.create_default_context()
            fresh.check_hostname = context.check_hostname
            fresh.verify_mode = context.verify_mode
            fresh.load_verify_locations(cadata=_ca_of(context))
            context = fresh
        return ClusterAccess(server=self.server, ssl_context=context, token=token)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(
            base_url=self.server, verify=self.ssl_context, headers=self.headers(), timeout=timeout
        )

    def async_client(self, timeout: float = 30, user_agent: str = "kiloclaw-tests") -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.server,
            verify=self.ssl_context,
            headers={**self.headers(), "User-Agent": user_agent},
            timeout=timeout,
        )


def kubeconfig_path() -> Path:
    path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or str(Path.home() / ".kube" / "config")
    return Path(path)


def load_access(path: Path | None = None) -> ClusterAccess:
    path = path or kubeconfig_path()
    try:
        config: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise NoCluster(f"no kubeconfig at {path}: {exc.strerror}") from exc
    contexts = {c["name"]: c["context"] for c in config.get("contexts") or []}
    context = contexts.get(config.get("current-context", ""))
    if context is None:
        raise NoCluster(f"{path} has no current context")
    cluster = {c["name"]: c["cluster"] for c in config.get("clusters") or []}[context["cluster"]]
    user = {u["name"]: u["user"] for u in config.get("users") or []}.get(context.get("user", ""), {})

    def material(data_key: str, file_key: str, source: dict[str, Any]) -> str | None:
        if source.get(data_key):
            return _temp_file(base64.b64decode(source[data_key]))
        file_path: str | None = source.get(file_key)
        return file_path

    server: str = cluster["server"]
    context_ssl: ssl.SSLContext | bool = True
    if server.startswith("https"):
        if cluster.get("insecure-skip-tls-verify"):
            context_ssl = False
        else:
            context_ssl = ssl.create_default_context(
                cafile=material("certificate-authority-data", "certificate-authority", cluster)
            )
            cert = material("client-certificate-data", "client-certificate", user)
            if cert:
                context_ssl.load_cert_chain(cert, material("client-key-data", "client-key", user))
    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = Path(user["tokenFile"]).read_text().strip()
    return ClusterAccess(server=server, ssl_context=context_ssl, token=token)


def _ca_of(context: ssl.SSLContext) -> str:
    """The CA certificates a context trusts, as PEM."""
    return "".join(ssl.DER_cert_to_PEM_cert(der) for der in context.get_ca_certs(binary_form=True))


def _temp_file(data: bytes) -> str:
    with tempfile.NamedTemporaryFile(prefix="kiloclaw-test-", suffix=".pem", delete=False) as handle:
        handle.write(data)
        return handle.name


def service_account_token(
    admin: httpx.Client, namespace: str, name: str, expiration_seconds: int = 3600
) -> str:
    """A token for the ServiceAccount from the TokenRequest API, as a projected volume would get one."""
    response = admin.post(
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
        json={
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": expiration_seconds},
        },
    )
    response.raise_for_status()
    token: str = response.json()["status"]["token"]
    return token


def write_token_kubeconfig(path: Path, admin_kubeconfig: Path, token: str) -> Path:
    """A kubeconfig for the admin's cluster that authenticates with ``token`` (a ServiceAccount's)."""
    config: dict[str, Any] = yaml.safe_load(admin_kubeconfig.read_text())
    contexts = {c["name"]: c["context"] for c in config["contexts"]}
    cluster_name = contexts[config["current-context"]]["cluster"]
    cluster = {c["name"]: c["cluster"] for c in config["clusters"]}[cluster_name]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "cluster", "cluster": cluster}],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [{"name": "operator", "context": {"cluster": "cluster", "user": "operator"}}],
                "current-context": "operator",
            }
        )
    )
    path.chmod(0o600)
    return path
