"""End-to-end stories of KiloClawRetainedVolume over HTTP: the real operator against kubesim and flysim.

Each test creates its Fly volume in flysim and mints its retained resource through the API as the recovery
does (the resource, then its provenance through the status subresource: ``mint_retained``), then acts as a
user would: waits, patches ``deleteNow``, deletes with the finalizer, or breaks Fly. A resource made by hand,
without the provenance, is never acted on (``test_a_hand_made_retained_volume_...``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from builders import retained_body
from harness import FLY_TOKEN, Stack, condition, eventually, status
from kiloclaw_operator.models import GROUP, RETAINED_PLURAL, VERSION

APP = "acct-test"
SANDBOX = "ki_owner_sandbox"


# --- builders and probes ------------------------------------------------------------------------------------


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
async def fly_api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """Plain HTTP to flysim, for what a test sets up as "someone else": machines attached to the volume."""
    async with httpx.AsyncClient(
        base_url=f"{stack.fly.base_url}/v1", headers={"Authorization": f"Bearer {FLY_TOKEN}"}, timeout=10
    ) as client:
        yield client


def fly_volume(stack: Stack, name: str = "kiloclaw_retained", region: str = "iad") -> str:
    volume_id: str = stack.fly.create_volume(APP, name, region)["id"]
    return volume_id


async def attach_machine(fly_api: httpx.AsyncClient, volume_id: str, sandbox_id: str | None) -> str:
    metadata = {"kiloclaw_sandbox_id": sandbox_id} if sandbox_id else {}
    body = {
        "region": "iad",
        "config": {
            "image": "registry.fly.io/other:1",
            "metadata": metadata,
            "mounts": [{"volume": volume_id, "path": "/data"}],
        },
    }

    async def created() -> httpx.Response | None:
        response = await fly_api.post(f"/apps/{APP}/machines", json=body)
        return None if response.status_code == 429 else response  # Fly's create rate limit: try again

    response = await eventually(created, timeout=10, what="a machine created past Fly's rate limit")
    assert response.status_code == 200, response.text
    machine_id: str = response.json()["id"]
    return machine_id


async def destroy_machine(fly_api: httpx.AsyncClient, machine_id: str) -> None:
    response = await fly_api.delete(f"/apps/{APP}/machines/{machine_id}", params={"force": "true"})
    assert response.status_code == 200, response.text


def volume_alive(stack: Stack, volume_id: str) -> bool:
    return any(v["id"] == volume_id for v in stack.live_volumes(APP))


def machine_alive(stack: Stack, machine_id: str) -> bool:
    return any(m["id"] == machine_id for m in stack.live_machines(APP))


def retained_path(namespace: str, name: str | None = None) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{RETAINED_PLURAL}" + (f"/{name}" if name else "")


RECOVERY_ID = "01JDTESTRECOVERY0000000000"


async def create_retained(
    stack: Stack,
    namespace: str,
    name: str,
    volume_id: str,
    *,
    retain_until: datetime | None = None,
    delete_now: bool = False,
    sandbox_id: str = SANDBOX,
    instance_name: str = "alice",
    app: str = APP,
    minted: bool = True,
) -> dict[str, Any]:
    """The resource as a recovery mints it (``minted``: then its provenance, written through the status
    subresource as the operator writes it), or as a tenant could make it by hand where admission does not
    stop it (no provenance). Sent as the operator's ServiceAccount: on the real API server, the admission
    policy refuses a create by anyone else (tests/e2e/test_tenancy_cluster.py)."""
    body = retained_body(
        name,
        namespace,
        # Minted as a recovery mints it: born with the operator's finalizer.
        metadata={
            "labels": {f"{GROUP}/instance": instance_name},
            **({"finalizers": [f"{GROUP}/finalizer"]} if minted else {}),
        },
        flyApp=app,
        volumeId=volume_id,
        sandboxId=sandbox_id,
        instanceName=instance_name,
        reason="UnexpectedStopRecovery",
        recoveryId=RECOVERY_ID,
        retainUntil=rfc3339(retain_until or datetime.now(UTC) + timedelta(days=7)),
        deleteNow=delete_now,
    )
    response = await stack.operator_api.post(retained_path(namespace), json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    if minted:
        provenance = {
            "instanceUid": f"uid-of-{instance_name}",
            "recoveryId": RECOVERY_ID,
            "flyApp": app,
            "volumeId": volume_id,
            "sandboxId": sandbox_id,
        }
        response = await stack.operator_api.patch(
            retained_path(namespace, name) + "/status",
            json={"status": {"provenance": provenance}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert response.status_code == 200, response.text
        result = response.json()
    return result


async def get_retained(stack: Stack, namespace: str, name: str) -> dict[str, Any] | None:
    response = await stack.api.get(retained_path(namespace, name))
    if response.status_code == 404:
        return None
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


async def patch_retained(stack: Stack, namespace: str, name: str, patch: dict[str, Any]) -> None:
    response = await stack.api.patch(
        retained_path(namespace, name), json=patch, headers={"Content-Type": "application/merge-patch+json"}
    )
    assert response.status_code == 200, response.text


async def delete_retained(stack: Stack, namespace: str, name: str) -> None:
    response = await stack.api.delete(retained_path(namespace, name))
    assert response.status_code in (200, 202), response.text


async def wait_retained(
    stack: Stack, namespace: str, name: str, predicate: Any, what: str, timeout: float = 15
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        body = await get_retained(stack, namespace, name)
        return body if body is not None and predicate(body) else None

    return await eventually(check, timeout=timeout, what=f"{namespace}/{name}: {what}")


async def wait_retained_gone(stack: Stack, namespace: str, name: str, timeout: float = 15) -> None:
    async def check() -> bool | None:
        return True if await get_retained(stack, namespace, name) is None else None

    await eventually(check, timeout=timeout, what=f"{namespace}/{name} removed")


async def wait_volume_gone(stack: Stack, volume_id: str, timeout: float = 15) -> None:
    async def check() -> bool | None:
        return None if volume_alive(stack, volume_id) else True

    await eventually(check, timeout=timeout, what=f"volume {volume_id} deleted in Fly")


def is_retained_and_ready(body: dict[str, Any]) -> bool:
    return status(body).get("phase") == "Retained" and condition(body, "Ready").get("status") == "True"


def stalled_reason(body: dict[str, Any]) -> str | None:
    stalled = condition(body, "Stalled")
    return stalled.get("reason") if stalled.get("status") == "True" else None


async def reasons(stack: Stack, namespace: str, involved: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in await stack.events(namespace, involved) if e["reason"] == reason]


async def posted(stack: Stack, namespace: str, involved: str, reason: str) -> list[dict[str, Any]]:
    """The events once at least one has arrived: the driver posts them right after the status write."""

    async def check() -> list[dict[str, Any]] | None:
        return await reasons(stack, namespace, involved, reason) or None

    return await eventually(check, timeout=10, what=f"event {reason} on {involved}")


# --- observation and expiry ------------------------------------------------------------------------------


async def test_retained_volume_reports_snapshots_and_attached_machine_and_is_ready(
    stack: Stack, namespace: str, fly_api: httpx.AsyncClient
) -> None:
    volume_id = fly_volume(stack)
    stack.fly.add_snapshot(volume_id)
    stack.fly.add_snapshot(volume_id)
    await create_retained(stack, namespace, "alice-vol-a", volume_id)
    body = await wait_retained(
        stack,
        namespace,
        "alice-vol-a",
        lambda b: is_retained_and_ready(b) and status(b).get("snapshotCount") == 2,
        "Retained, Ready, 2 snapshots",
    )
    assert status(body).get("attachedMachineId") is None
    assert condition(body, "Stalled")["status"] == "False"

    machine_id = await attach_machine(fly_api, volume_id, SANDBOX)
    await wait_retained(
        stack,
        namespace,
        "alice-vol-a",
        lambda b: status(b).get("attachedMachineId") == machine_id,
        "attached machine observed",
    )
    await destroy_machine(fly_api, machine_id)
    await delete_retained(stack, namespace, "alice-vol-a")
    await wait_retained_gone(stack, namespace, "alice-vol-a")


async def test_expiry_deletes_the_volume_and_the_resource(stack: Stack, namespace: str) -> None:
    volume_id = fly_volume(stack)
    retain_until = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    await create_retained(stack, namespace, "alice-vol-exp", volume_id, retain_until=retain_until)
    await wait_retained(stack, namespace, "alice-vol-exp", is_retained_and_ready, "Retained")
    assert volume_alive(stack, volume_id)
    # Retained first (however slow the machine), then its time comes: retainUntil moves to a moment ago.
    expired = (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    await patch_retained(stack, namespace, "alice-vol-exp", {"spec": {"retainUntil": expired}})

    # Eventually, not within a measured time: how soon after retainUntil is next_check_delay's (unit-tested).
    await wait_retained_gone(stack, namespace, "alice-vol-exp")
    assert not volume_alive(stack, volume_id)
    # The instance does not exist, so the Event lands on the retained volume itself.
    deleted = await posted(stack, namespace, "alice-vol-exp", "RetainedVolumeDeleted")
    assert len(deleted) == 1
    assert volume_id in deleted[0]["message"]


async def test_delete_now_patch_deletes_before_expiry_and_reports_on_the_instance(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "alice")
    await stack.wait_phase(namespace, "alice", "Running")
    volume_id = fly_volume(stack)
    await create_retained(stack, namespace, "alice-vol-now", volume_id)
    await wait_retained(stack, namespace, "alice-vol-now", is_retained_and_ready, "Retained")

    await patch_retained(stack, namespace, "alice-vol-now", {"spec": {"deleteNow": True}})
    await wait_retained_gone(stack, namespace, "alice-vol-now")
    assert not volume_alive(stack, volume_id)
    deleted = await posted(stack, namespace, "alice", "RetainedVolumeDeleted")
    assert len(deleted) == 1
    assert deleted[0]["involvedObject"]["kind"] == "KiloClawInstance"
    assert volume_id in deleted[0]["message"]
    instance = await stack.get_instance(namespace, "alice")
    assert instance is not None and status(instance)["phase"] == "Running"


async def test_kubectl_delete_deletes_the_volume_through_the_finalizer(stack: Stack, namespace: str) -> None:
    volume_id = fly_volume(stack)
    await create_retained(stack, namespace, "alice-vol-del", volume_id)
    body = await wait_retained(stack, namespace, "alice-vol-del", is_retained_and_ready, "Retained")
    assert f"{GROUP}/finalizer" in body["metadata"].get("finalizers", [])

    await delete_retained(stack, namespace, "alice-vol-del")
    await wait_retained_gone(stack, namespace, "alice-vol-del")
    assert not volume_alive(stack, volume_id)
    assert len(await posted(stack, namespace, "alice-vol-del", "RetainedVolumeDeleted")) == 1


# --- provenance: only what the operator minted ------------------------------------------------------------


def fly_requests_naming(stack: Stack, volume_id: str) -> list[str]:
    return [f"{r.method} {r.path}" for r in stack.fly.request_log if volume_id in r.path]


@pytest.mark.parametrize("how", ["expired", "deleteNow"])
async def test_a_hand_made_retained_volume_naming_another_namespaces_volume_never_touches_it(
    stack: Stack, namespace: str, fly_api: httpx.AsyncClient, how: str
) -> None:
    # The victim: an instance in another namespace whose machine was destroyed outside the operator, so its
    # current volume is unattached for a moment (the attack of issue 17, tried end to end on main).
    victim_ns = await stack.create_namespace("victim")
    victim = await stack.create_instance(victim_ns, "alice")
    running = await stack.wait_phase(victim_ns, "alice", "Running")
    volume_id = status(running)["volumeId"]
    await destroy_machine(fly_api, status(running)["machineId"])

    past = datetime.now(UTC) - timedelta(hours=1)
    await create_retained(
        stack,
        namespace,
        "stolen",
        volume_id,
        sandbox_id=victim["spec"]["sandboxId"],
        instance_name="alice",
        retain_until=past if how == "expired" else None,
        delete_now=how == "deleteNow",
        minted=False,
    )
    blocked = await wait_retained(
        stack,
        namespace,
        "stolen",
        lambda b: stalled_reason(b) == "NotMintedByOperator",
        "NotMintedByOperator",
    )
    assert status(blocked)["phase"] == "Blocked"
    message = condition(blocked, "Stalled")["message"]
    assert "not created by the operator" in message and victim_ns not in message
    # kubectl delete removes the resource only.
    await delete_retained(stack, namespace, "stolen")
    await wait_retained_gone(stack, namespace, "stolen")
    assert volume_alive(stack, volume_id)
    assert not [r for r in fly_requests_naming(stack, volume_id) if r.startswith("DELETE")]
    # The victim's own lifecycle goes on with its volume.
    await stack.delete_instance(victim_ns, "alice")
    await stack.wait_gone(victim_ns, "alice")


# --- ownership -----------------------------------------------------------------------------------------


async def test_ownership_mismatch_blocks_without_deleting_and_recovers_when_the_machine_is_gone(
    stack: Stack, namespace: str, fly_api: httpx.AsyncClient
) -> None:
    volume_id = fly_volume(stack)
    foreign = await attach_machine(fly_api, volume_id, "ki_someone_else")
    await create_retained(stack, namespace, "alice-vol-own", volume_id, delete_now=True)

    blocked = await wait_retained(
        stack,
        namespace,
        "alice-vol-own",
        lambda b: status(b).get("phase") == "Blocked" and status(b).get("attempts", 0) >= 3,
        "Blocked after three attempts",
    )
    message = condition(blocked, "Stalled")["message"]
    assert stalled_reason(blocked) == "OwnershipMismatch"
    assert message == (
        f"refusing to delete volume {volume_id}: it is attached to a machine that is not one of sandbox "
        f"{SANDBOX}; nothing was destroyed"
    )
    assert status(blocked)["lastError"] == message
    assert status(blocked)["nextAttemptAt"]
    assert volume_alive(stack, volume_id)
    assert machine_alive(stack, foreign)
    # Retries back off (0.1 s doubling to 1 s here): a few attempts, not a hot loop; one Event per episode.
    assert status(blocked)["attempts"] < 20
    assert len(await posted(stack, namespace, "alice-vol-own", "RetainedVolumeDeleteBlocked")) == 1
    assert (REGISTRY.get_sample_value("kiloclaw_retained_volumes", {"phase": "Blocked"}) or 0) >= 1

    await destroy_machine(fly_api, foreign)
    await wait_retained_gone(stack, namespace, "alice-vol-own")
    assert not volume_alive(stack, volume_id)


async def test_machine_without_sandbox_metadata_blocks_the_delete(
    stack: Stack, namespace: str, fly_api: httpx.AsyncClient
) -> None:
    volume_id = fly_volume(stack)
    unlabelled = await attach_machine(fly_api, volume_id, None)
    await create_retained(stack, namespace, "alice-vol-nolabel", volume_id, delete_now=True)
    blocked = await wait_retained(
        stack, namespace, "alice-vol-nolabel", lambda b: stalled_reason(b) == "OwnershipMismatch", "Blocked"
    )
    assert f"a machine that is not one of sandbox {SANDBOX}" in condition(blocked, "Stalled")["message"]
    assert machine_alive(stack, unlabelled) and volume_alive(stack, volume_id)
    await destroy_machine(fly_api, unlabelled)
    await wait_retained_gone(stack, namespace, "alice-vol-nolabel")


async def test_kubectl_delete_of_a_blocked_volume_stays_terminating_until_an_admin_abandons_it(
    stack: Stack, namespace: str, fly_api: httpx.AsyncClient
) -> None:
    volume_id = fly_volume(stack)
    foreign = await attach_machine(fly_api, volume_id, "ki_someone_else")
    await create_retained(stack, namespace, "alice-vol-term", volume_id)
    await wait_retained(stack, namespace, "alice-vol-term", is_retained_and_ready, "Retained")

    await delete_retained(stack, namespace, "alice-vol-term")
    terminating = await wait_retained(
        stack,
        namespace,
        "alice-vol-term",
        lambda b: stalled_reason(b) == "OwnershipMismatch" and status(b).get("attempts", 0) >= 2,
        "Terminating and blocked",
    )
    assert terminating["metadata"].get("deletionTimestamp")
    assert status(terminating)["phase"] == "Blocked"
    assert volume_alive(stack, volume_id) and machine_alive(stack, foreign)

    # The documented way out: drop the finalizer; the Fly volume is left alone for the admin to handle.
    await patch_retained(stack, namespace, "alice-vol-term", {"metadata": {"finalizers": None}})
    await wait_retained_gone(stack, namespace, "alice-vol-term")
    assert volume_alive(stack, volume_id) and machine_alive(stack, foreign)
    await destroy_machine(fly_api, foreign)


async def test_attached_machine_that_merely_carries_the_same_sandbox_id_blocks_the_delete(
    stack: Stack, namespace: str, fly_api: httpx.AsyncClient
) -> None:
    """DESIGN 3.5: a sandbox id alone proves nothing (another instance may name the same sandbox); no machine
    is recorded for a retained volume, so whatever is attached now is left alone."""
    volume_id = fly_volume(stack)
    same_sandbox = await attach_machine(fly_api, volume_id, SANDBOX)

    async def started() -> bool | None:
        return True if stack.fly.machine(same_sandbox)["state"] == "started" else None

    await eventually(started, what="machine started")
    await create_retained(stack, namespace, "alice-vol-att", volume_id, delete_now=True)
    blocked = await wait_retained(
        stack, namespace, "alice-vol-att", lambda b: stalled_reason(b) == "OwnershipMismatch", "Blocked"
    )
    assert condition(blocked, "Stalled")["message"] == (
        f"refusing to delete volume {volume_id}: it is attached to a machine not recorded for this volume; "
        "nothing was destroyed"
    )
    assert machine_alive(stack, same_sandbox) and volume_alive(stack, volume_id)
    await destroy_machine(fly_api, same_sandbox)
    await wait_retained_gone(stack, namespace, "alice-vol-att")
    assert not volume_alive(stack, volume_id)


# --- Fly errors -------------------------------------------------------------------------------------------


async def test_volume_already_gone_counts_as_deleted_and_the_resource_is_removed(
    stack: Stack, namespace: str
) -> None:
    await create_retained(
        stack, namespace, "alice-vol-404", "vol_doesnotexist0000", retain_until=datetime.now(UTC)
    )
    await wait_retained_gone(stack, namespace, "alice-vol-404")
    assert len(await posted(stack, namespace, "alice-vol-404", "RetainedVolumeDeleted")) == 1


async def test_missing_volume_before_expiry_is_reported_not_ready(stack: Stack, namespace: str) -> None:
    await create_retained(stack, namespace, "alice-vol-missing", "vol_doesnotexist0001")
    body = await wait_retained(
        stack,
        namespace,
        "alice-vol-missing",
        lambda b: condition(b, "Ready").get("reason") == "VolumeNotFound",
        "Ready=False VolumeNotFound",
    )
    assert status(body)["phase"] == "Retained"
    assert condition(body, "Ready")["status"] == "False"
    await patch_retained(stack, namespace, "alice-vol-missing", {"spec": {"deleteNow": True}})
    await wait_retained_gone(stack, namespace, "alice-vol-missing")


@pytest.mark.slow  # waits out the driver's backoff
async def test_fly_server_errors_are_retried_with_backoff_then_the_delete_succeeds(
    stack: Stack, namespace: str
) -> None:
    volume_id = fly_volume(stack)
    # The Fly client retries a 503 four times itself; ten faults make two whole attempts of the driver fail.
    stack.fly.inject_faults(f"DELETE /v1/apps/{APP}/volumes/{volume_id}", 503, count=10)
    try:
        await create_retained(stack, namespace, "alice-vol-503", volume_id, delete_now=True)
        failing = await wait_retained(
            stack,
            namespace,
            "alice-vol-503",
            lambda b: bool(status(b).get("lastError")) and status(b).get("attempts", 0) >= 1,
            "lastError recorded",
            timeout=30,
        )
        assert "503" in status(failing)["lastError"]
        assert status(failing)["nextAttemptAt"]
        assert status(failing)["phase"] == "Deleting"
        assert condition(failing, "Stalled")["status"] == "False"
        assert volume_alive(stack, volume_id)
        await wait_retained_gone(stack, namespace, "alice-vol-503", timeout=30)
        assert not volume_alive(stack, volume_id)
    finally:
        stack.fly.clear_faults()


# --- the safety interlock ----------------------------------------------------------------------------------


async def test_volume_in_use_by_an_instance_is_refused_until_the_instance_lets_go(
    stack: Stack, namespace: str
) -> None:
    instance = await stack.create_instance(namespace, "alice")
    running = await stack.wait_phase(namespace, "alice", "Running")
    volume_id = status(running)["volumeId"]
    await create_retained(
        stack,
        namespace,
        "alice-vol-use",
        volume_id,
        delete_now=True,
        sandbox_id=instance["spec"]["sandboxId"],
    )
    refused = await wait_retained(
        stack, namespace, "alice-vol-use", lambda b: stalled_reason(b) == "VolumeInUse", "VolumeInUse"
    )
    assert status(refused)["phase"] == "Blocked"
    assert condition(refused, "Stalled")["message"] == (
        f"refusing to delete volume {volume_id}: in use by instance alice (current volume)"
    )
    assert volume_alive(stack, volume_id)
    assert status(await stack.wait_phase(namespace, "alice", "Running"))["volumeId"] == volume_id
    assert len(await posted(stack, namespace, "alice", "RetainedVolumeDeleteBlocked")) == 1

    # Deleting the instance deletes its volume; the retained resource then finds it gone and goes too.
    await stack.delete_instance(namespace, "alice")
    await stack.wait_gone(namespace, "alice")
    await wait_retained_gone(stack, namespace, "alice-vol-use")
    assert not volume_alive(stack, volume_id)


# --- crash safety -------------------------------------------------------------------------------------------


async def test_operator_restart_in_the_middle_of_a_delete_completes_it_once(
    stack: Stack, namespace: str
) -> None:
    volume_id = fly_volume(stack)
    await create_retained(stack, namespace, "alice-vol-crash", volume_id)
    await wait_retained(stack, namespace, "alice-vol-crash", is_retained_and_ready, "Retained")
    # Hold the volume DELETE in flight so the operator dies between "Deleting" and Fly's answer.
    stack.fly.set_latency(1.5, f"DELETE /v1/apps/{APP}/volumes/{volume_id}")
    try:
        await patch_retained(stack, namespace, "alice-vol-crash", {"spec": {"deleteNow": True}})
        await wait_retained(
            stack, namespace, "alice-vol-crash", lambda b: status(b).get("phase") == "Deleting", "Deleting"
        )
        await stack.crash_operator()
    finally:
        stack.fly.clear_latency()
        await stack.start_operator()

    await wait_retained_gone(stack, namespace, "alice-vol-crash")
    assert not volume_alive(stack, volume_id)
    assert len(await posted(stack, namespace, "alice-vol-crash", "RetainedVolumeDeleted")) == 1


# --- with a real recovery ---------------------------------------------------------------------------------


async def test_old_volume_kept_by_a_recovery_is_deleted_early_while_the_instance_runs_on(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "alice")
    running = await stack.wait_phase(namespace, "alice", "Running")
    old_machine, old_volume = status(running)["machineId"], status(running)["volumeId"]
    stack.fly.add_snapshot(old_volume)
    stack.fly.crash_machine(old_machine)
    recovered = await stack.wait_instance(
        namespace,
        "alice",
        lambda b: (
            bool((status(b).get("lastRecovery") or {}).get("retainedVolume"))
            and not status(b).get("recovery")
        ),
        timeout=30,
        what="recovered with a retained old volume",
    )
    name = status(recovered)["lastRecovery"]["retainedVolume"]
    new_volume = status(recovered)["volumeId"]
    kept = await wait_retained(stack, namespace, name, is_retained_and_ready, "Retained")
    assert kept["spec"]["volumeId"] == old_volume
    assert status(kept)["snapshotCount"] == 1

    await patch_retained(stack, namespace, name, {"spec": {"deleteNow": True}})
    await wait_retained_gone(stack, namespace, name)
    assert not volume_alive(stack, old_volume)
    assert volume_alive(stack, new_volume)
    assert len(await posted(stack, namespace, "alice", "RetainedVolumeDeleted")) == 1
    instance = await stack.wait_phase(namespace, "alice", "Running")
    assert status(instance)["volumeId"] == new_volume
