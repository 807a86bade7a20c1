"""The plugin's view of the Kubernetes API: a small synchronous client over the shared kubeconfig loader, and
errors that carry the plugin's exit codes."""

from __future__ import annotations

from typing import Any

import httpx

from ..kube import client_settings, connection_from_login
from ..kubeconfig import KubeconfigError, load_kubeconfig
from ..models import GROUP, INSTANCE_PLURAL, RETAINED_PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"

# Exit codes scripts can rely on (also in the README and `kubectl kiloclaw --help`).
EXIT_OK = 0
EXIT_ERROR = 1  # any other API error
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_NOT_FOUND = 3  # no such instance / retained volume
EXIT_NO_CLUSTER = 4  # no kubeconfig, cluster unreachable, KiloClaw CRDs not installed
EXIT_FORBIDDEN = 5  # credentials rejected (401) or RBAC forbids the request (403)
EXIT_ABORTED = 6  # a confirmation prompt was declined


class PluginError(Exception):
    """One line for stderr and the exit code that goes with it."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


class Api:
    """Just the reads and patches the plugin needs, with one-line errors."""

    def __init__(self, kubeconfig: str | None, context: str | None, timeout: float = 15.0) -> None:
        try:
            login = load_kubeconfig(kubeconfig, context)
        except KubeconfigError as exc:
            raise PluginError(str(exc), EXIT_NO_CLUSTER) from None
        self.server = login.server
        self.context = login.context
        self.default_namespace = login.namespace
        self._http = httpx.Client(
            **client_settings(connection_from_login(login), user_agent="kubectl-kiloclaw"),
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, what: str = "", **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except KubeconfigError as exc:  # an exec plugin failing on a refresh
            raise PluginError(str(exc), EXIT_NO_CLUSTER) from None
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise PluginError(
                f"cannot reach the Kubernetes API at {self.server} (context {self.context}): {reason}",
                EXIT_NO_CLUSTER,
            ) from None
        if response.status_code < 400:
            result: dict[str, Any] = response.json()
            return result
        try:
            message = str(response.json().get("message") or response.text)
        except ValueError:
            message = response.text.strip() or response.reason_phrase
        message = " ".join(message.split())
        if response.status_code == 401:
            raise PluginError(
                f"unauthorized: the API server at {self.server} rejected the credentials of context "
                f"{self.context}",
                EXIT_FORBIDDEN,
            )
        if response.status_code == 403:
            raise PluginError(f"forbidden: {message}", EXIT_FORBIDDEN)
        if response.status_code == 404:
            if what:
                raise PluginError(what, EXIT_NOT_FOUND)
            raise PluginError(f"not found: {message}", EXIT_NOT_FOUND)
        raise PluginError(f"Kubernetes API {response.status_code}: {message}")

    # --- KiloClaw resources ------------------------------------------------------------------------------

    def check_crds(self) -> None:
        try:
            self.request("GET", f"/apis/{GROUP}/{VERSION}")
        except PluginError as exc:
            if exc.code == EXIT_NOT_FOUND:
                raise PluginError(
                    f"the KiloClaw CRDs ({GROUP}/{VERSION}) are not installed in context {self.context} "
                    "(kubectl apply -k crds/)",
                    EXIT_NO_CLUSTER,
                ) from None
            raise

    @staticmethod
    def _path(plural: str, namespace: str | None, name: str | None = None) -> str:
        base = f"/apis/{GROUP}/{VERSION}"
        path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
        return f"{path}/{name}" if name else path

    def _list(self, plural: str, namespace: str | None, **params: str) -> list[dict[str, Any]]:
        self.check_crds_once()
        items: list[dict[str, Any]] = self.request("GET", self._path(plural, namespace), params=params).get(
            "items", []
        )
        return items

    _crds_checked = False

    def check_crds_once(self) -> None:
        if not self._crds_checked:
            self.check_crds()
            self._crds_checked = True

    def instance(self, namespace: str, name: str) -> dict[str, Any]:
        self.check_crds_once()
        return self.request(
            "GET",
            self._path(INSTANCE_PLURAL, namespace, name),
            what=f"no KiloClawInstance {name} in namespace {namespace}",
        )

    def instances(self, namespace: str | None) -> list[dict[str, Any]]:
        return self._list(INSTANCE_PLURAL, namespace)

    def retained_volume(self, namespace: str, name: str) -> dict[str, Any]:
        self.check_crds_once()
        return self.request(
            "GET",
            self._path(RETAINED_PLURAL, namespace, name),
            what=f"no KiloClawRetainedVolume {name} in namespace {namespace}",
        )

    def retained_volumes(self, namespace: str | None, instance: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": f"{GROUP}/instance={instance}"} if instance else {}
        return self._list(RETAINED_PLURAL, namespace, **params)

    def events(self, namespace: str | None) -> list[dict[str, Any]]:
        path = f"/api/v1/namespaces/{namespace}/events" if namespace else "/api/v1/events"
        items: list[dict[str, Any]] = self.request("GET", path).get("items", [])
        return items

    def merge_patch(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        kind = "KiloClawInstance" if plural == INSTANCE_PLURAL else "KiloClawRetainedVolume"
        return self.request(
            "PATCH",
            self._path(plural, namespace, name),
            json=patch,
            headers={"Content-Type": MERGE_PATCH},
            what=f"no {kind} {name} in namespace {namespace}",
        )

    # --- the mass-failure brake (a Lease in the operator's namespace, brake.py) --------------------------

    @staticmethod
    def _brake_path(namespace: str) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/kiloclaw-recovery-brake"

    def brake_lease(self, namespace: str) -> dict[str, Any]:
        try:
            return self.request("GET", self._brake_path(namespace))
        except PluginError as exc:
            if exc.code == EXIT_NOT_FOUND:
                return {}  # never engaged: armed
            raise

    def patch_brake_lease(self, namespace: str, annotations: dict[str, str]) -> dict[str, Any]:
        return self.request(
            "PATCH",
            self._brake_path(namespace),
            json={"metadata": {"annotations": annotations}},
            headers={"Content-Type": MERGE_PATCH},
            what=f"the brake has never engaged (no Lease kiloclaw-recovery-brake in namespace {namespace})",
        )

    def version(self) -> dict[str, Any]:
        try:
            return self.request("GET", "/version")
        except PluginError as exc:
            return {"error": str(exc)}

    def get_text(self, url_or_path: str) -> str:
        """Plain text (the operator's /metrics) from a URL, or an API-server path (service proxy)."""
        try:
            if url_or_path.startswith(("http://", "https://")):
                response = httpx.get(url_or_path, timeout=10)
            else:
                response = self._http.get(url_or_path, headers={"Accept": "text/plain"})
        except httpx.HTTPError as exc:
            raise PluginError(f"cannot fetch {url_or_path}: {exc}") from None
        if response.status_code >= 400:
            raise PluginError(f"cannot fetch {url_or_path}: HTTP {response.status_code}")
        return response.text
