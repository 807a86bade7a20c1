"""How a new leader starts (run.Runtime.connect, called at kopf's login): the feed's first window goes first,
over HTTP against flysim and kubesim. kopf's listings wait for it, because kopf begins listing and watching
only once its login returned; a feed that cannot reach Fly holds kopf back for a bounded while only."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from builders import APP, FLY_TOKEN, binding, instance_body
from flysim import FlySimulator
from harness import CRDS, Stack
from kiloclaw_operator import run
from kiloclaw_operator.config import Settings
from kiloclaw_operator.kube import KubeConnection
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, VERSION
from kubesim import KubeSim

ORG = "kilo"
ORG_LISTING = f"GET /v1/orgs/{ORG}/machines"


def feed_settings(sim: FlySimulator, namespace: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "fly_api_base_url": sim.base_url,
        "fly_api_token": FLY_TOKEN,
        "fly_org_slug": ORG,
        "feed_interval_seconds": 0.05,
        "namespaces": [namespace],
        "claims_namespace": namespace,
        "lease_namespace": namespace,
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


async def connected(runtime: run.Runtime, stack: Stack) -> float:
    """Seconds ``connect`` (kopf's login) took."""
    began = time.monotonic()
    await runtime.connect(KubeConnection(server=str(stack.api.base_url).rstrip("/"), token="test"))
    return time.monotonic() - began


def sweeps_answered(sim: FlySimulator, before: float) -> int:
    """The feed's sweeps of the organisation listing flysim answered (200) before ``before`` (epoch)."""
    return sum(
        1
        for r in sim.request_log
        if r.path == f"/v1/orgs/{ORG}/machines"
        and "include_deleted" in r.query
        and r.status == 200
        and r.at < before
    )


async def test_kopfs_login_returns_only_once_the_feeds_first_window_is_in(
    stack: Stack, namespace: str, sim: FlySimulator
) -> None:
    sim.set_latency(0.5, route=ORG_LISTING)
    runtime = run.Runtime(feed_settings(sim, namespace))
    try:
        took = await connected(runtime, stack)
        returned = time.time()
        assert sweeps_answered(sim, before=returned) >= 1, (
            "kopf would list the instances before the feed knew what changed while no operator ran"
        )
        assert took >= 1.0  # the clock's empty page, then the first sweep: 0.5 s each
    finally:
        await runtime.aclose()


async def test_a_feed_that_cannot_reach_fly_holds_kopfs_login_back_no_longer_than_its_bound(
    stack: Stack, namespace: str, sim: FlySimulator
) -> None:
    sim.inject_faults(ORG_LISTING, 503)
    runtime = run.Runtime(feed_settings(sim, namespace, feed_stale_seconds=1.0))
    try:
        took = await connected(runtime, stack)
        assert sweeps_answered(sim, before=time.time()) == 0
        assert 0.9 <= took < 1.0 + run.FIRST_WINDOW_HEAD_START_SECONDS / 2
    finally:
        await runtime.aclose()


async def test_a_second_login_does_not_wait_again(stack: Stack, namespace: str, sim: FlySimulator) -> None:
    sim.inject_faults(ORG_LISTING, 503)
    runtime = run.Runtime(feed_settings(sim, namespace, feed_stale_seconds=1.0))
    try:
        await connected(runtime, stack)
        assert await connected(runtime, stack) < 0.5, "kopf logs in again on a 401: nothing is rebuilt"
    finally:
        await runtime.aclose()


async def test_a_new_leaders_brake_counts_every_instance_its_feed_listed_before_kopf_made_their_drivers(
    stack: Stack, namespace: str, sim: FlySimulator
) -> None:
    """A new leader's first passes run before kopf's listing has made the drivers: a share of the drivers
    made so far (51 at 10,000 in a benchmark run) engaged the brake on the stops of one host."""
    for index in range(60):
        await stack.create_instance(namespace, f"fleet-{index}", state="Stopped")
    settings = feed_settings(
        sim, namespace, brake_pause_stops=200, brake_pause_share=0.2, brake_min_instances=50
    )
    runtime = run.Runtime(settings)
    try:
        await connected(runtime, stack)
        assert len(runtime.instances) < 50, "kopf has not listed the instances: no driver made yet"
        brake = runtime._ctx.brake if runtime._ctx is not None else None
        assert brake is not None
        assert brake.threshold() == 12, "a fifth of the 60 instances listed, not of the drivers made so far"
    finally:
        await runtime.aclose()


@pytest.fixture
def quiet_kube() -> Iterator[KubeSim]:
    """An API server no other operator watches (the stack's operator would record the stops itself)."""
    kube = KubeSim()
    kube.start_in_thread()
    kube.load_crds([CRDS])
    try:
        yield kube
    finally:
        kube.stop_thread()


async def test_kopfs_login_waits_for_the_passes_over_machines_that_stopped_while_no_operator_ran(
    quiet_kube: KubeSim, sim: FlySimulator
) -> None:
    """The new leader's first passes record the stops before kopf's listing of every instance competes with
    them for the event loop and the API server: when kopf's login returns, each stop is in the status."""
    namespace = "early"
    quiet_kube.create_namespace(namespace, binding(APP))
    observed = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{INSTANCE_PLURAL}"
    async with httpx.AsyncClient(base_url=quiet_kube.url, timeout=10) as api:
        for index in range(3):
            name = f"sandbox-{index}"
            machine = sim.state.create_machine(APP, {"name": name, "region": "iad", "config": {"image": "x"}})
            created = await api.post(path, json=instance_body(name, namespace))
            assert created.status_code == 201, created.text
            status = {"phase": "Running", "machineId": machine.id, "flyState": "started"}
            status["observedAt"] = observed
            patched = await api.patch(
                f"{path}/{name}/status",
                json={"status": status},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            assert patched.status_code == 200, patched.text
            sim.crash_machine(machine.id)
        runtime = run.Runtime(feed_settings(sim, namespace))
        try:
            await runtime.connect(KubeConnection(server=quiet_kube.url, token="test"))
            bodies = [(await api.get(f"{path}/sandbox-{index}")).json() for index in range(3)]
            recorded = [body["status"].get("flyState") for body in bodies]
        finally:
            await runtime.aclose()
    assert recorded == ["stopped"] * 3, "kopf's listing would begin before the stops were recorded"
