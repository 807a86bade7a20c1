"""The few direct Kubernetes API calls the operator makes besides kopf's watches: durable status writes,
retained-volume resources and Events.

kopf owns watching and finalizers; these calls exist because a recovery must know that a status write was
confirmed by the API server *before* its next Fly call, which a handler's return value cannot promise.
Async httpx over aiohttp, with the credentials kopf is given too (``KubeConnection``), so the event loop never
blocks.

The adapter has the Fly client's discipline: every failure is raised as a ``KubeError`` (no httpx error
escapes; ``KubeUnavailable`` when no answer came), and idempotent calls (GET, DELETE, merge-PATCH) are retried
with full-jitter exponential backoff on 429 (honouring ``Retry-After``), 5xx and lost connections or timeouts.
Creates and lease writes are never retried here: their callers decide (a lost create's reply is a conflict the
next time, and the leader election retries on its own cadence). The login itself (kubeconfig, ServiceAccount)
is the official client's configuration loading (:mod:`.kubeconfig`); ``kopf_connection_fields`` hands it to
kopf without importing kopf.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from . import __version__
from .fly import backoff_delay, parse_retry_after
from .kubeconfig import ClusterLogin, Credentials, load_login
from .models import GROUP, INSTANCE_PLURAL, RETAINED_PLURAL, VERSION, ObjectRef
from .reasons import Reason
from .transport import AiohttpTransport, CookielessClient

#: Objects per page of the client's listings unless its owner says otherwise (the operator passes
#: ``KILOCLAW_LIST_CHUNK_SIZE``, the page of kopf's listing too): each page is decoded whole.
LISTING_PAGE_SIZE = 250

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
    """Where the API server is and how to authenticate (see :mod:`.kubeconfig`), certificates in memory."""

    server: str
    token: str | None = None  # a fixed bearer token (tests, tools); ``credentials`` wins over it
    ca_pem: bytes | None = None
    insecure: bool = False
    client_certificate_pem: bytes | None = None
    client_key_pem: bytes | None = None
    credentials: Credentials | None = field(default=None, compare=False)


def connection_from_login(login: ClusterLogin) -> KubeConnection:
    return KubeConnection(
        server=login.server.rstrip("/"),
        ca_pem=login.ca_pem,
        insecure=login.insecure,
        client_certificate_pem=login.client_certificate_pem,
        client_key_pem=login.client_key_pem,
        credentials=login.credentials,
    )


async def login_connection() -> KubeConnection:
    """The operator's login (in a pod its ServiceAccount, elsewhere the kubeconfig, see :mod:`.kubeconfig`);
    raises ``KubeconfigError``."""
    return connection_from_login(await asyncio.to_thread(load_login))


class CredentialsAuth(httpx.Auth):
    """The login's ``Authorization`` per request, and one retry after a 401 with the login loaded again (an
    exec plugin's token may be revoked before it expires; a token file rotated; a kubeconfig changed)."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        sent = _authorize(request, self._credentials.header())
        response = yield request
        if response.status_code == 401:
            self._credentials.invalidate(sent)
            _authorize(request, self._credentials.header())
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        sent = self._credentials.cached() or await asyncio.to_thread(self._credentials.header)
        _authorize(request, sent)
        response = yield request
        if response.status_code == 401:
            self._credentials.invalidate(sent)
            _authorize(request, await asyncio.to_thread(self._credentials.header))
            yield request


def _authorize(request: httpx.Request, header: str | None) -> str | None:
    if header:
        request.headers["Authorization"] = header
    return header


def tls_context(conn: KubeConnection) -> ssl.SSLContext | bool:
    """The API server's TLS settings from memory. ``ssl`` loads a client key only from a file: it exists for
    the moment the context is built (as kopf does it), in a folder only this user can read."""
    if not conn.server.startswith("https"):
        return True
    context = ssl.create_default_context(cadata=conn.ca_pem.decode() if conn.ca_pem else None)
    if conn.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if conn.client_certificate_pem and conn.client_key_pem:
        with tempfile.TemporaryDirectory(prefix="kiloclaw-tls-") as private:
            certificate, key = Path(private, "certificate.pem"), Path(private, "key.pem")
            certificate.write_bytes(conn.client_certificate_pem)
            key.write_bytes(conn.client_key_pem)
            context.load_cert_chain(certificate, key)
    return context


def kopf_connection_fields(conn: KubeConnection) -> dict[str, Any]:
    """The keyword arguments of the ``kopf.ConnectionInfo`` that logs kopf in with ``conn`` (kopf calls the
    login handler again after a 401 and before ``expiration``)."""
    header = conn.credentials.header() if conn.credentials is not None else None
    if header is None and conn.token:
        header = f"Bearer {conn.token}"
    scheme, _, token = (header or "").partition(" ")
    return {
        "server": conn.server,
        "scheme": scheme or None,
        "token": token or None,
        "ca_data": conn.ca_pem,
        "insecure": conn.insecure or None,
        "certificate_data": conn.client_certificate_pem,
        "private_key_data": conn.client_key_pem,
        "expiration": conn.credentials.expires_at if conn.credentials is not None else None,
        "priority": 30,
    }


def client_settings(conn: KubeConnection, user_agent: str = "") -> dict[str, Any]:
    """What every httpx client of the API server is built with: address, headers, credentials, TLS."""
    headers = {"Accept": "application/json", "User-Agent": user_agent or USER_AGENT}
    if conn.token and conn.credentials is None:
        headers["Authorization"] = f"Bearer {conn.token}"
    auth = CredentialsAuth(conn.credentials) if conn.credentials is not None else None
    return {
        "base_url": conn.server.rstrip("/"),
        "headers": headers,
        "auth": auth,
        "verify": tls_context(conn),
    }


def build_http_client(
    conn: KubeConnection, *, timeout: float = 30.0, user_agent: str = ""
) -> httpx.AsyncClient:
    """An httpx client that talks to the API server with ``conn``'s address, TLS settings and credentials."""
    settings = client_settings(conn, user_agent)
    verify = settings.pop("verify")
    return CookielessClient(
        **settings,
        timeout=timeout,
        transport=AiohttpTransport(max_connections=KUBE_MAX_CONNECTIONS, verify=verify),
    )


def _error_from(response: httpx.Response) -> KubeError:
    try:
        message = response.json().get("message", response.text)
    except ValueError:
        message = response.text
    error = {404: KubeNotFound, 409: KubeConflict}.get(response.status_code, KubeError)
    return error(response.status_code, message)


def slim_instance(body: dict[str, Any]) -> dict[str, Any]:
    """An instance body cut to what the cluster-wide ownership checks read (its identity, Fly app, sandbox id
    and the volume ids its status holds): a real API server's body, managedFields and all, is ~8 KB decoded,
    and such a check lists every instance of the cluster."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    recovery = status.get("recovery") or {}
    slim: dict[str, Any] = {
        "metadata": {key: meta[key] for key in ("namespace", "name", "uid") if key in meta},
        "spec": {key: spec[key] for key in ("flyApp", "sandboxId") if key in spec},
        "status": {key: status[key] for key in ("volumeId",) if key in status},
    }
    held = {key: recovery[key] for key in ("sourceVolumeId", "replacementVolumeId") if recovery.get(key)}
    if held:
        slim["status"]["recovery"] = held
    return slim


class _SharedListing:
    """One listing for every caller that asked while it was queued: each caller gets a listing that began
    after it asked (never one already under way, which may have read past a write it must see), and at most
    one runs and one waits at a time. A retained volume's delete and an adoption each check every instance
    of the cluster: at a burst of 100 recoveries or a take-over mid-provisioning they came dozens at once,
    each a whole listing (a new leader reached 1.5 GiB at 10,000 instances)."""

    def __init__(self, list_all: Callable[[], Any]) -> None:
        self._list_all = list_all
        self._queued: asyncio.Future[list[dict[str, Any]]] | None = None
        self._running: asyncio.Task[None] | None = None
        # The loop keeps only weak references to tasks: the listings are held here until they end.
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self) -> list[dict[str, Any]]:
        if self._queued is None:
            queued = self._queued = asyncio.get_running_loop().create_future()
            queued.add_done_callback(_retrieve)
            task = asyncio.get_running_loop().create_task(self._run(queued, self._running))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(self._queued)

    async def _run(
        self, queued: asyncio.Future[list[dict[str, Any]]], before: asyncio.Task[None] | None
    ) -> None:
        if before is not None:
            await asyncio.wait([before])
        self._queued, self._running = None, asyncio.current_task()  # begun: later callers queue another
        try:
            result = await self._list_all()
        except BaseException as exc:
            if not queued.done():
                queued.set_exception(exc if isinstance(exc, Exception) else KubeUnavailable(0, repr(exc)))
            if not isinstance(exc, Exception):
                raise
        else:
            if not queued.done():
                queued.set_result(result)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a shared listing's failure as seen (its callers may all have gone)."""
    if not future.cancelled():
        future.exception()


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
        page_size: int = LISTING_PAGE_SIZE,
    ) -> None:
        self._http = build_http_client(conn, timeout=timeout)
        # Requests name absolute URLs: httpx parses a relative one twice more to merge it with the base
        # (~15 us a request, a few percent of the operator's CPU in a burst).
        self._origin = str(self._http.base_url).rstrip("/")
        # A new leader's feed, claim book and claims list every instance or claim at once, beside kopf's
        # listing: what four listings of whole pages leave behind was most of the leader's memory.
        self._page_size = page_size
        # Whether this process may still write as the leader; checked once a connection slot is taken, right
        # before each changing request is sent (a pass that waited for a slot may have outlived the Lease).
        self._fence = fence
        # Calls wait here for one of the pool's connections, outside their own timeouts.
        self._slots = asyncio.Semaphore(KUBE_MAX_CONNECTIONS)
        self._slim_instances = _SharedListing(self._list_slim_instances)
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
                    response = await self._http.request(method, self._origin + path, **kwargs)
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

    async def every_instance_slim(self) -> list[dict[str, Any]]:
        """Every instance in every namespace as a slim body (``slim_instance``): what ownership checks read.
        Concurrent callers share one listing that began after they asked (``_SharedListing``)."""
        return await self._slim_instances.get()

    async def _list_slim_instances(self) -> list[dict[str, Any]]:
        slim: list[dict[str, Any]] = []
        async for page in self.instance_pages():
            slim.extend(slim_instance(body) for body in page)
            del page  # not held while the next page is read
        return slim

    async def instance_pages(
        self, namespace: str | None = None, page_size: int | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """All instances, ``page_size`` (default: the client's) at a time, for a caller that keeps only a
        little of each."""
        params: dict[str, str | int] = {"limit": page_size or self._page_size}
        async for items in self._pages(self._instances_path(namespace), params):
            yield items

    async def _pages(self, path: str, params: dict[str, str | int]) -> AsyncIterator[list[dict[str, Any]]]:
        """A list in pages (the API server's chunked list: ``limit`` and ``continue``); a page is not held
        here while the next one is read."""
        token: str | None = None
        while True:
            page = await self._request("GET", path, params={**params, "continue": token} if token else params)
            token = (page.get("metadata") or {}).get("continue")
            items: list[dict[str, Any]] = page.get("items", [])
            del page
            yield items
            del items
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

    async def lease_pages(
        self, namespace: str, label_selector: str, page_size: int | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The Leases of ``namespace`` that match ``label_selector``, ``page_size`` (default: the client's)
        at a time."""
        params: dict[str, str | int] = {
            "limit": page_size or self._page_size,
            "labelSelector": label_selector,
        }
        async for items in self._pages(self._lease_path(namespace), params):
            yield items

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
