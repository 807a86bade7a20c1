"""The few direct Kubernetes API calls the operator makes besides kopf's watches: durable status writes,
retained-volume resources and Events.

kopf owns watching and finalizers; these calls exist because a recovery must know that a status write was
confirmed by the API server *before* its next Fly call, which a handler's return value cannot promise.
Async httpx, sharing the credentials kopf logged in with (``KubeConnection``), so the event loop never blocks.

The adapter has the Fly client's discipline: every failure is raised as a ``KubeError`` (no httpx error
escapes; ``KubeUnavailable`` when no answer came), and idempotent calls (GET, DELETE, merge-PATCH) are retried
with full-jitter exponential backoff on 429 (honouring ``Retry-After``), 5xx and lost connections or timeouts.
Creates and lease writes are never retried here: their callers decide (a lost create's reply is a conflict the
next time, and the leader election retries on its own cadence). It also translates the credentials kopf logs
in with (``connection_from_kopf``, ``kopf_connection_fields``) without importing kopf.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import ssl
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from . import __version__
from .fly import backoff_delay, parse_retry_after
from .kubeconfig import ClusterLogin, TokenSource, load_kubeconfig
from .models import GROUP, INSTANCE_PLURAL, RETAINED_PLURAL, VERSION, ObjectRef
from .reasons import Reason
from .transport import AiohttpTransport

logger = logging.getLogger("kiloclaw.kube")

MERGE_PATCH = "application/merge-patch+json"
USER_AGENT = f"kiloclaw-operator/{__version__}"
KUBE_MAX_CONNECTIONS = 50


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API {status}: {message}")
        self.status = status


class KubeNotFound(KubeError):
    pass


class KubeConflict(KubeError):
    pass


class KubeUnavailable(KubeError):
    """No answer from the API server (connection refused or lost, timeout): status 0."""


class KubeNotLeading(KubeError):
    """A write refused before it was sent: this process no longer knows itself the leader (its Lease was not
    renewed within the renew deadline), so a standby may already be writing the same objects. Nothing reached
    the API server; the process is about to exit and the new leader repeats the step from what it reads."""

    def __init__(self, method: str, path: str) -> None:
        super().__init__(
            0, f"{method} {path} not sent: this replica is no longer sure it holds the leader Lease"
        )


#: Answers worth asking again for an idempotent call: the API server is busy or briefly unavailable.
RETRIED_STATUSES = frozenset({0, 429, 500, 502, 503, 504})
#: Calls that may be repeated after a lost reply with the same effect (a merge patch sets the same values).
IDEMPOTENT_METHODS = frozenset({"GET", "DELETE", "PATCH"})


@dataclass(frozen=True)
class KubeConnection:
    """Credentials for the API server, translated from whatever kopf logged in with."""

    server: str
    token: str | None = None
    scheme: str = "Bearer"
    ca_data: bytes | None = None
    ca_path: str | None = None
    insecure: bool = False
    certificate_path: str | None = None
    private_key_path: str | None = None
    username: str | None = None
    password: str | None = None
    # A token that changes (token file, exec credential plugin); it wins over ``token``.
    tokens: TokenSource | None = field(default=None, compare=False)


def connection_from_login(login: ClusterLogin) -> KubeConnection:
    """The connection for a kubeconfig context (see :mod:`.kubeconfig`)."""
    cert = login.client_certificate_path or (
        write_temp_pem(login.client_certificate_pem) if login.client_certificate_pem else None
    )
    key = login.client_key_path or (write_temp_pem(login.client_key_pem) if login.client_key_pem else None)
    return KubeConnection(
        server=login.server,
        token=login.token,
        ca_data=login.ca_pem,
        ca_path=login.ca_path,
        insecure=login.insecure,
        certificate_path=cert,
        private_key_path=key,
        username=login.username,
        password=login.password,
        tokens=login.tokens,
    )


def pem_bytes(data: str | bytes) -> bytes:
    """Certificate data as PEM: kubeconfigs and kopf carry it base64-encoded or as PEM text."""
    raw = data.encode() if isinstance(data, str) else data
    return raw if raw.lstrip().startswith(b"-----BEGIN ") else base64.b64decode(raw)


class RefreshingBearerAuth(httpx.Auth):
    """Bearer auth from a :class:`TokenSource`: a fresh token per request, and one retry after a 401 with a
    newly fetched token (exec plugins' tokens expire; token files are rotated)."""

    def __init__(self, tokens: TokenSource) -> None:
        self._tokens = tokens

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._tokens.token()}"
        response = yield request
        if response.status_code == 401:
            self._tokens.invalidate()
            request.headers["Authorization"] = f"Bearer {self._tokens.token()}"
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = self._tokens.cached() or await asyncio.to_thread(self._tokens.token)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            self._tokens.invalidate()
            request.headers["Authorization"] = f"Bearer {await asyncio.to_thread(self._tokens.token)}"
            yield request


def tls_context(conn: KubeConnection) -> ssl.SSLContext | bool:
    if not conn.server.startswith("https"):
        return True
    if conn.insecure:
        return False
    context = ssl.create_default_context(cafile=conn.ca_path)
    if conn.ca_data:
        context.load_verify_locations(cadata=pem_bytes(conn.ca_data).decode())
    if conn.certificate_path:
        context.load_cert_chain(conn.certificate_path, conn.private_key_path)
    return context


def connection_from_kopf(info: Any) -> KubeConnection:
    """The connection for the credentials kopf found (a ``kopf.ConnectionInfo``, read by attribute)."""

    def path(value: object) -> str | None:
        return None if value is None else str(value)

    ca_data = pem_bytes(info.ca_data) if info.ca_data else None
    cert_path = path(info.certificate_path) or (
        write_temp_pem(info.certificate_data) if info.certificate_data else None
    )
    key_path = path(info.private_key_path) or (
        write_temp_pem(info.private_key_data) if info.private_key_data else None
    )
    return KubeConnection(
        server=info.server,
        token=info.token,
        scheme=info.scheme or "Bearer",
        ca_data=ca_data,
        ca_path=path(info.ca_path),
        insecure=bool(info.insecure),
        certificate_path=cert_path,
        private_key_path=key_path,
        username=info.username,
        password=info.password,
    )


def kopf_connection_fields(conn: KubeConnection) -> dict[str, Any]:
    """The keyword arguments of the ``kopf.ConnectionInfo`` that logs kopf in with ``conn``."""
    token, expiration = conn.token, None
    if conn.tokens is not None:
        token, expiration = conn.tokens.token(), conn.tokens.expires_at
    return {
        "server": conn.server,
        "token": token,
        "ca_path": conn.ca_path,
        "ca_data": conn.ca_data,
        "insecure": conn.insecure or None,
        "certificate_path": conn.certificate_path,
        "private_key_path": conn.private_key_path,
        "username": conn.username,
        "password": conn.password,
        "expiration": expiration,
        "priority": 30,
    }


def in_cluster_server(default: str, environ: Mapping[str, str] = os.environ) -> str:
    """The API server's address as the kubelet gives it to every container (``KUBERNETES_SERVICE_HOST`` and
    ``_PORT``, what client-go's in-cluster config reads); ``default`` without them. kopf's ServiceAccount
    login assumes ``https://kubernetes.default.svc``, a name only cluster DNS resolves: not from a
    hostNetwork pod (it uses the node's resolver), nor in a cluster without DNS."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return default
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def service_account_connection(info: Any) -> KubeConnection:
    """In a pod: kopf's ServiceAccount login, re-reading the projected token (it rotates, hourly by default)
    rather than keeping the token kopf read once."""
    return with_token_file(connection_from_kopf(info), SERVICE_ACCOUNT_TOKEN)


async def kubeconfig_connection() -> KubeConnection:
    """Outside a pod: the kubeconfig as kubectl reads it, including token files and exec credential plugins
    (kopf's own kubeconfig login has neither); raises ``KubeconfigError``."""
    return connection_from_login(await asyncio.to_thread(load_kubeconfig))


def write_temp_pem(data: str | bytes) -> str:
    """kopf may hand over inline client certificates; ssl only loads them from files."""
    raw = data.encode() if isinstance(data, str) else data
    with tempfile.NamedTemporaryFile(prefix="kiloclaw-", suffix=".pem", delete=False) as handle:
        handle.write(raw)
        return handle.name


SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def with_token_file(conn: KubeConnection, token_file: Path) -> KubeConnection:
    """``conn`` authenticating with whatever ``token_file`` holds now: re-read periodically and after a
    401, so a rotated token is picked up without a restart."""
    return dataclasses.replace(conn, token=None, tokens=TokenSource(token_file=token_file))


def build_http_client(
    conn: KubeConnection, *, timeout: float = 30.0, user_agent: str = ""
) -> httpx.AsyncClient:
    """An httpx client that talks to the API server with ``conn``'s address, TLS settings and credentials."""
    headers = {"Accept": "application/json", "User-Agent": user_agent or USER_AGENT}
    if conn.token:
        headers["Authorization"] = f"{conn.scheme} {conn.token}"
    auth: httpx.Auth | None = None
    if conn.tokens is not None:
        auth = RefreshingBearerAuth(conn.tokens)
    elif conn.username and conn.password:
        auth = httpx.BasicAuth(conn.username, conn.password)
    return httpx.AsyncClient(
        base_url=conn.server.rstrip("/"),
        headers=headers,
        auth=auth,
        timeout=timeout,
        transport=AiohttpTransport(max_connections=KUBE_MAX_CONNECTIONS, verify=tls_context(conn)),
    )


def _error_from(response: httpx.Response) -> KubeError:
    try:
        message = response.json().get("message", response.text)
    except ValueError:
        message = response.text
    error = {404: KubeNotFound, 409: KubeConflict}.get(response.status_code, KubeError)
    return error(response.status_code, message)


class KubeClient:
    def __init__(
        self,
        conn: KubeConnection,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        fence: Callable[[], bool] | None = None,
    ) -> None:
        self._http = build_http_client(conn, timeout=timeout)
        # Whether this process may still write as the leader; checked once a connection slot is taken, right
        # before each changing request is sent (a pass that waited for a slot may have outlived the Lease).
        self._fence = fence
        # Calls wait here for one of the pool's connections, outside their own timeouts.
        self._slots = asyncio.Semaphore(KUBE_MAX_CONNECTIONS)
        self._max_retries = max_retries
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self, method: str, path: str, *, retry: bool | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """One call; ``KubeError`` on any failure. ``retry`` defaults to whether the method is idempotent."""
        retry = method in IDEMPOTENT_METHODS if retry is None else retry
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                async with self._slots:
                    if method != "GET" and self._fence is not None and not self._fence():
                        raise KubeNotLeading(method, path)
                    response = await self._http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                error: KubeError = KubeUnavailable(0, f"{type(exc).__name__}: {exc}")
            else:
                if response.status_code < 400:
                    result: dict[str, Any] = response.json()
                    return result
                error = _error_from(response)
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            delay = self._retry_delay(error, attempt, retry_after) if retry else None
            if delay is None:
                raise error
            logger.info(
                "Kubernetes API call retrying",
                extra={"method": method, "path": path, "status": error.status, "attempt": attempt},
            )
            await asyncio.sleep(delay)
            attempt += 1

    def _retry_delay(self, error: KubeError, attempt: int, retry_after: float | None) -> float | None:
        """Seconds before the next attempt, or None when the error must be raised now (not worth repeating,
        out of attempts, or a server asking for a longer pause than this call should hold a worker)."""
        if error.status not in RETRIED_STATUSES or attempt >= self._max_retries:
            return None
        if retry_after is not None and retry_after > self._backoff_cap:
            return None
        delay = backoff_delay(attempt, base=self._backoff_base, cap=self._backoff_cap)
        return max(delay, retry_after or 0.0)

    @staticmethod
    def _path(plural: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path

    # --- instances -------------------------------------------------------------------------------------

    async def get_instance(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._request("GET", self._path(INSTANCE_PLURAL, namespace, name))

    async def patch_instance_status(self, ref: ObjectRef, status_patch: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch ``.status``; returns the object as the API server stored it."""
        return await self._request(
            "PATCH",
            self._path(INSTANCE_PLURAL, ref.namespace, ref.name, "status"),
            json={"status": status_patch},
            headers={"Content-Type": MERGE_PATCH},
        )

    # --- retained volumes ------------------------------------------------------------------------------

    async def create_retained_volume(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create, or return the existing one with the same name (a retried step must not fail on itself)."""
        try:
            return await self._request("POST", self._path(RETAINED_PLURAL, namespace), json=body)
        except KubeConflict:
            return await self.get_retained_volume(namespace, body["metadata"]["name"])

    async def get_retained_volume(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._request("GET", self._path(RETAINED_PLURAL, namespace, name))

    async def list_retained_volumes(self, namespace: str | None = None) -> list[dict[str, Any]]:
        path = (
            self._path(RETAINED_PLURAL, namespace)
            if namespace
            else f"/apis/{GROUP}/{VERSION}/{RETAINED_PLURAL}"
        )
        items: list[dict[str, Any]] = (await self._request("GET", path)).get("items", [])
        return items

    async def delete_retained_volume(self, namespace: str, name: str) -> None:
        """Ask the API server to delete the resource; our finalizer then runs before it really goes."""
        try:
            await self._request("DELETE", self._path(RETAINED_PLURAL, namespace, name))
        except KubeNotFound:
            return

    async def patch_retained_status(self, ref: ObjectRef, status_patch: dict[str, Any]) -> dict[str, Any]:
        return await self._request(
            "PATCH",
            self._path(RETAINED_PLURAL, ref.namespace, ref.name, "status"),
            json={"status": status_patch},
            headers={"Content-Type": MERGE_PATCH},
        )

    async def list_instances(self, namespace: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = (await self._request("GET", self._instances_path(namespace))).get(
            "items", []
        )
        return items

    async def instance_pages(
        self, namespace: str | None = None, page_size: int = 500
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """All instances, ``page_size`` at a time (the API server's chunked list: ``limit`` and ``continue``),
        for a caller that keeps only a little of each."""
        token: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": page_size}
            if token:
                params["continue"] = token
            page = await self._request("GET", self._instances_path(namespace), params=params)
            yield page.get("items", [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return

    def _instances_path(self, namespace: str | None) -> str:
        if namespace:
            return self._path(INSTANCE_PLURAL, namespace)
        return f"/apis/{GROUP}/{VERSION}/{INSTANCE_PLURAL}"

    # --- namespaces (the Fly app binding, tenancy.py) ---------------------------------------------------

    async def get_namespace(self, name: str) -> dict[str, Any]:
        return await self._request("GET", f"/api/v1/namespaces/{name}")

    # --- events ----------------------------------------------------------------------------------------

    async def post_event(
        self, ref: ObjectRef, reason: Reason, message: str, *, warning: bool = False
    ) -> None:
        """Best effort: an Event that cannot be posted is logged, never allowed to fail a step."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": ref.api_version,
                "kind": ref.kind,
                "name": ref.name,
                "namespace": ref.namespace,
                "uid": ref.uid,
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "kiloclaw-operator"},
            "reportingComponent": "kiloclaw-operator",
            "reportingInstance": "kiloclaw-operator",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "eventTime": None,
            "count": 1,
        }
        try:
            await self._request("POST", f"/api/v1/namespaces/{ref.namespace}/events", json=body)
        except KubeError as exc:
            logger.warning("could not post event %s on %s/%s: %s", reason, ref.namespace, ref.name, exc)

    # --- leases (leader election, leadership.py) -------------------------------------------------------

    @staticmethod
    def _lease_path(namespace: str, name: str | None = None) -> str:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        return f"{path}/{name}" if name else path

    async def _lease_request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        # Never retried here: the elector retries on its own cadence, within its renew deadline.
        return await self._request(method, path, retry=False, **kwargs)

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._lease_request("GET", self._lease_path(namespace, name))
        except KubeNotFound:
            return None

    async def delete_lease(self, namespace: str, name: str, *, resource_version: str) -> None:
        """Delete only the Lease as read (``resourceVersion`` precondition): KubeConflict when it changed
        since, KubeNotFound when it is gone."""
        await self._lease_request(
            "DELETE",
            self._lease_path(namespace, name),
            json={
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "preconditions": {"resourceVersion": resource_version},
            },
        )

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create; KubeConflict when another candidate created it first."""
        return await self._lease_request("POST", self._lease_path(namespace), json=body)

    async def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """PUT with the resourceVersion read: KubeConflict when someone wrote the Lease in between."""
        return await self._lease_request("PUT", self._lease_path(namespace, name), json=body)
