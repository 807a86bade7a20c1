"""The builders every tier shares: KiloClawInstance and KiloClawRetainedVolume bodies as the API server holds
them (and their models), instance specs, and a Fly simulator with a client for it. Each has defaults that make
a valid object; a test overrides only what it is about."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from flysim import FlySimulator, SimTimings
from kiloclaw_operator.fly import FlyClient
from kiloclaw_operator.models import GROUP, VERSION, Instance, InstanceSpec, RetainedVolume
from kiloclaw_operator.tenancy import FLY_APPS_ANNOTATION, IMAGE_REPOSITORIES_ANNOTATION

IMAGE = "registry.fly.io/kiloclaw:2026.11.1"
#: The app every instance names unless the test says otherwise; every test namespace is bound to it.
APP = "acct-test"
#: The Fly token the simulators accept (flysim's default) and the operator under test sends.
FLY_TOKEN = "test-token"


#: The Fly apps every test namespace of the stack is bound to (tenancy.py), besides ``acct-<namespace>``, and
#: the image repositories (``img``: bare images some unit tests use).
TEST_APPS = (APP, "acct-a", "acct-other", "acct-x", "acct-paging", "acct-3f9a1c")
TEST_IMAGE_REPOSITORIES = ("registry.fly.io/", "img")


def binding(*apps: str, repositories: tuple[str, ...] = TEST_IMAGE_REPOSITORIES) -> dict[str, str]:
    """The Namespace annotations a cluster admin sets to bind a namespace to ``apps``."""
    return {FLY_APPS_ANNOTATION: ",".join(apps), IMAGE_REPOSITORIES_ANNOTATION: ",".join(repositories)}


def namespace_body(name: str, *apps: str) -> dict[str, Any]:
    """A Namespace, bound to ``apps`` (and the test image repositories) when any are named."""
    metadata: dict[str, Any] = {"name": name}
    if apps:
        metadata["annotations"] = binding(*apps)
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata}


def sandbox_id(namespace: str, name: str) -> str:
    """The sandbox id an instance gets unless the test names one (unique per namespace and name)."""
    return f"ki_{name}_{namespace}".replace("-", "_")[:64]


def instance_body(
    name: str = "alice",
    namespace: str = "tenants",
    *,
    metadata: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A KiloClawInstance: ``spec`` (its own field names: ``sandboxId=``, ``flyApp=``, ``state=``...) over
    valid defaults, ``metadata`` added to the name and namespace, a ``status`` only when given."""
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "KiloClawInstance",
        "metadata": {"name": name, "namespace": namespace, **(metadata or {})},
        "spec": {
            "sandboxId": sandbox_id(namespace, name),
            "userId": f"user-{name}",
            "flyApp": APP,
            "image": IMAGE,
            **spec,
        },
    }
    if status is not None:
        body["status"] = status
    return body


def instance(
    name: str = "alice",
    namespace: str = "tenants",
    *,
    metadata: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> Instance:
    """The model of :func:`instance_body` (generation 1 and a resourceVersion unless ``metadata`` says)."""
    meta = {"generation": 1, "resourceVersion": "7", **(metadata or {})}
    return Instance.from_body(instance_body(name, namespace, metadata=meta, status=status, **spec))


def instance_spec(**spec: Any) -> InstanceSpec:
    """The spec of :func:`instance_body`, with the same overrides."""
    return InstanceSpec.model_validate(instance_body(**spec)["spec"])


def retained_body(
    name: str = "alice-vol-retained",
    namespace: str = "tenants",
    *,
    metadata: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A KiloClawRetainedVolume of instance alice's old volume: ``spec`` over valid defaults, as
    :func:`instance_body`."""
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "KiloClawRetainedVolume",
        "metadata": {"name": name, "namespace": namespace, **(metadata or {})},
        "spec": {
            "flyApp": APP,
            "volumeId": "vol_retained0000001",
            "sandboxId": sandbox_id(namespace, "alice"),
            "instanceName": "alice",
            "region": "iad",
            "retainUntil": "2026-12-02T12:00:00Z",
            **spec,
        },
    }
    if status is not None:
        body["status"] = status
    return body


def retained(
    name: str = "alice-vol-retained",
    namespace: str = "tenants",
    *,
    metadata: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> RetainedVolume:
    """The model of :func:`retained_body`."""
    meta = {"uid": "uid-1", "generation": 1, "resourceVersion": "10", **(metadata or {})}
    return RetainedVolume.from_body(retained_body(name, namespace, metadata=meta, status=status, **spec))


@asynccontextmanager
async def flysim(
    token: str, regions: tuple[str, ...] = ("iad", "ord"), **timings: float
) -> AsyncIterator[FlySimulator]:
    """A Fly simulator on loopback in this event loop, machines starting in 20 ms unless ``timings`` say."""
    simulator = FlySimulator(
        token=token, regions=regions, timings=SimTimings(**{"start_delay": 0.02, **timings})
    )
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


@asynccontextmanager
async def fly_client(sim: FlySimulator, token: str) -> AsyncIterator[FlyClient]:
    """The operator's Fly client for ``sim``, retrying quickly (a test waits for nothing but the answer)."""
    async with FlyClient(sim.base_url, token, backoff_base=0.01, backoff_cap=0.5, max_retries=3) as client:
        yield client
