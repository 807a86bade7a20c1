"""Every kopf registration of the operator, and nothing else: each handler is a few lines that delegate.

Per instance, one ``InstanceDriver`` (the single writer) runs its loop, started by the first watch event that
names the instance. Watch events only hand the newest body to the driver and wake it; deletion waits for the
driver's lock, so nothing runs concurrently on one object. Retained volumes follow the same pattern with their
own driver.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import kopf

from .config import Settings
from .driving import DriverRegistry, RetryLater
from .kube import KubeConnection, kopf_connection_fields, login_connection
from .kubeconfig import KubeconfigError
from .models import FINALIZER, GROUP, INSTANCE_PLURAL, RETAINED_PLURAL, VERSION
from .reconciler import InstanceDriver
from .retained import RetainedVolumeDriver

logger = logging.getLogger("kiloclaw.operator")

#: How long kopf keeps an object's worker after its last event (its handler only hands the body over).
KOPF_WORKER_IDLE_SECONDS = 0.5


class Runtime(Protocol):
    """What the handlers reach through kopf's memo: built by the composition root (run.py)."""

    settings: Settings

    async def connect(self, conn: KubeConnection) -> None:
        """At kopf's login: build what needs the Kubernetes connection and let the observer's first window
        go first (once; later logins change nothing)."""
        ...

    def claims_seen(self, body: kopf.Body, event_type: str | None) -> None: ...

    @property
    def instances(self) -> DriverRegistry[InstanceDriver]: ...

    @property
    def retained(self) -> DriverRegistry[RetainedVolumeDriver]: ...

    async def aclose(self) -> None: ...


class NoDiffBase(kopf.DiffBaseStorage):
    """No create/update handlers are registered (drivers compare generations themselves; deletion is seen by
    its timestamp), so kopf's last-handled-configuration annotation would only cost one more write per object:
    every body counts as already handled."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        # Nothing reads the essence: an empty one saves deep copies of every body on every event.
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return kopf.BodyEssence()

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def _runtime(memo: Any) -> Runtime:
    runtime: Runtime = memo.runtime
    return runtime


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    # CRD scanning stays on (it needs list/watch on CRDs): an operator that starts before its CRDs are
    # established, as `kubectl apply -k deploy/` allows, begins serving them when they appear.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = memo.get("watch_server_timeout", 300)
    settings.watching.client_timeout = settings.watching.server_timeout + 30
    settings.watching.connect_timeout = 30
    settings.watching.chunk_size = _runtime(memo).settings.list_chunk_size
    settings.networking.request_timeout = 60
    # kopf keeps a worker per object that had an event, holding that event's whole body, until the object has
    # been quiet this long (5 s by default): a new leader's listing of 10,000 instances kept 10,000 of them.
    settings.queueing.idle_timeout = KOPF_WORKER_IDLE_SECONDS


@kopf.on.login()
async def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """In a pod the ServiceAccount, elsewhere the kubeconfig as kubectl reads it, both by the official
    client's configuration loading (kubeconfig.py); kopf calls this again on a 401 or before the credential
    expires."""
    conn = await login_outside_kopf()
    await _runtime(memo).connect(conn)
    return kopf.ConnectionInfo(**kopf_connection_fields(conn))


async def login_outside_kopf() -> KubeConnection:
    """The credentials the login handler above finds, also for the leader election (which starts before
    kopf)."""
    try:
        return await login_connection()
    except KubeconfigError as exc:
        raise kopf.LoginError(str(exc)) from None


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    await _runtime(memo).aclose()


# --- both kinds: watch events start and wake drivers (a loop each), deletion goes through them ------------


def _object_changed(registry: DriverRegistry[Any], body: kopf.Body, event_type: str | None) -> None:
    namespace, name = body.metadata.namespace or "", body.metadata.name or ""
    if event_type == "DELETED":
        registry.forget(namespace, name)
        return
    driver = registry.running(namespace, name)
    first = not driver.known
    if driver.offer(dict(body)):
        # The first sight of an object is routine work (a new leader sees 10,000 at once); a change is news.
        driver.wake(urgent=not first)


async def _finalize(driver: InstanceDriver | RetainedVolumeDriver, body: kopf.Body) -> None:
    driver.offer(dict(body))
    try:
        await driver.finalize()
    except RetryLater as exc:
        raise kopf.TemporaryError(str(exc), delay=exc.delay) from exc


def _driver(registry: DriverRegistry[Any], body: kopf.Body) -> Any:
    return registry.get(body.metadata.namespace or "", body.metadata.name or "")


# --- instances ---------------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, INSTANCE_PLURAL)
async def instance_changed(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    runtime = _runtime(memo)
    _object_changed(runtime.instances, body, type)
    runtime.claims_seen(body, type)


@kopf.on.delete(GROUP, VERSION, INSTANCE_PLURAL)
async def destroy_instance(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _finalize(_driver(_runtime(memo).instances, body), body)


# --- retained volumes --------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, RETAINED_PLURAL)
async def retained_volume_changed(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    _object_changed(_runtime(memo).retained, body, type)


@kopf.on.delete(GROUP, VERSION, RETAINED_PLURAL)
async def delete_retained_volume(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _finalize(_driver(_runtime(memo).retained, body), body)
