"""A throwaway kopf operator, defined here, runs in-process against kubesim and does everything kopf does.

This proves the emulated API is good enough for kopf (1.45) itself — watching, finalizers (JSON patch with a
``test`` on the resourceVersion), status patches through the status subresource, timers, delete handlers and
Events — independently of the project's operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import kopf
import pytest

from kubesim import KubeSim

GROUP, VERSION, PLURAL = "kopftest.example.com", "v1", "gadgets"
NAMESPACE = "kopf-test"
FINALIZER = "kopftest.example.com/cleanup"

GADGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "gadget", "kind": "Gadget", "shortNames": ["gdg"]},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    }
                },
            }
        ],
    },
}


async def async_wait_for(condition: Callable[[], Any], within: float = 10.0) -> Any:
    """Poll until ``condition()`` is truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    value = condition()
    while not value and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        value = condition()
    assert value, f"condition not met within {within}s"
    return value


@pytest.fixture(scope="module")
def sim() -> Iterator[KubeSim]:
    sim = KubeSim()
    sim.start_in_thread()
    sim.create_namespace(NAMESPACE)
    yield sim
    sim.stop_thread()
    assert sim.internal_errors == []


class Recorder:
    def __init__(self) -> None:
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.ticks: dict[str, int] = {}


@pytest.fixture()
async def operator(sim: KubeSim) -> AsyncIterator[Recorder]:
    # The CRD is registered over HTTP while kopf runs, so kopf must discover it through its CRD watch.
    registry = kopf.OperatorRegistry()
    recorder = Recorder()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=sim.url, insecure=True, token="kubesim", default_namespace="default"
        )

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.watching.server_timeout = 2
        settings.watching.client_timeout = 5
        settings.posting.enabled = True
        settings.posting.level = logging.INFO
        settings.networking.request_timeout = 10

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def created(name: str, body: kopf.Body, patch: kopf.Patch, **_: Any) -> dict[str, str]:
        recorder.created.append(name)
        kopf.info(body, reason="GadgetCreated", message=f"gadget {name} created")
        patch.status["phase"] = "Ready"
        return {"message": "done"}

    # Only on labelled gadgets: a 0.2 s timer on the bulk test's hundred objects would flood the API.
    @kopf.timer(GROUP, VERSION, PLURAL, interval=0.2, labels={"ticking": "yes"}, registry=registry)
    def tick(name: str, status: kopf.Status, patch: kopf.Patch, **_: Any) -> None:
        recorder.ticks[name] = recorder.ticks.get(name, 0) + 1
        patch.status["ticks"] = int(status.get("ticks") or 0) + 1

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def deleted(name: str, **_: Any) -> None:
        recorder.deleted.append(name)

    task = asyncio.create_task(kopf.operator(registry=registry, standalone=True, clusterwide=True))
    async with httpx.AsyncClient(base_url=sim.url) as client:
        response = await client.post(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=GADGET_CRD
        )
        assert response.status_code in (201, 409), response.text
    try:
        yield recorder
    finally:
        # Cancelling (rather than a stop flag) skips kopf's 5-second grace period for lingering tasks.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)


def gadget(sim: KubeSim, name: str) -> dict[str, Any] | None:
    return sim.get_object(GROUP, VERSION, PLURAL, NAMESPACE, name)


async def test_kopf_creates_finalizes_patches_status_ticks_and_deletes_a_resource(
    sim: KubeSim, operator: Recorder
) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as client:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Gadget",
            "metadata": {"name": "g1", "labels": {"ticking": "yes"}},
            "spec": {},
        }
        # kopf needs a moment to see the CRD and start its watch; objects created before are listed anyway.
        response = await client.post(f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}", json=body)
        assert response.status_code == 201, response.text

        await async_wait_for(lambda: "g1" in operator.created)
        finalized = await async_wait_for(
            lambda: (obj := gadget(sim, "g1")) and FINALIZER in obj["metadata"].get("finalizers", []) and obj
        )
        assert finalized["metadata"]["generation"] == 1
        await async_wait_for(
            lambda: (obj := gadget(sim, "g1")) and obj.get("status", {}).get("phase") == "Ready"
        )
        await async_wait_for(
            lambda: (obj := gadget(sim, "g1")) and int(obj.get("status", {}).get("ticks") or 0) >= 2
        )

        events = sim.list_objects("", "v1", "events", NAMESPACE)
        reasons = {event["reason"] for event in events if event["involvedObject"]["name"] == "g1"}
        assert "GadgetCreated" in reasons
        assert all(event["metadata"]["name"].startswith("kopf-event-") for event in events)

        response = await client.delete(f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}/g1")
        assert response.status_code == 200
        assert response.json()["metadata"]["deletionTimestamp"]
        await async_wait_for(lambda: "g1" in operator.deleted)
        await async_wait_for(lambda: gadget(sim, "g1") is None)


async def test_kopf_handles_a_hundred_resources_created_at_once(sim: KubeSim, operator: Recorder) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as client:
        for index in range(100):
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "Gadget",
                "metadata": {"name": f"bulk-{index}"},
            }
            response = await client.post(
                f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}", json=body
            )
            assert response.status_code == 201
        await async_wait_for(
            lambda: all(
                (obj := gadget(sim, f"bulk-{index}")) and obj.get("status", {}).get("phase") == "Ready"
                for index in range(100)
            ),
            within=60,
        )
        response = await client.delete(f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}")
        assert response.status_code == 200
        await async_wait_for(lambda: not sim.list_objects(GROUP, VERSION, PLURAL, NAMESPACE), within=60)
    assert {f"bulk-{index}" for index in range(100)} <= set(operator.deleted)
