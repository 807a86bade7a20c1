"""Recovery on the Fly that really exists (DESIGN 3.9), end to end: the real operator against kubesim and a
flysim that behaves as Fly's documents say (operator/flysim/README.md). A dead host's volume cannot be
forked, a destroy on it stays ``destroying`` until it returns, snapshots restore while it is down, and Fly
migrates machines by itself.

The instances here live in ``sjc``/``ams`` and every story brings its failed hosts back: the stack is shared
by the tests of a worker, and a failed host stops every machine on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from builders import sandbox_id
from harness import LogRecords, Stack, condition, eventually, status
from kiloclaw_operator.fly import volume_name
from kiloclaw_operator.models import INSTANCE_PLURAL

# Imported at collection, before the stack points KUBECONFIG at the operator's: the plugin runs as the admin.
from test_kubectl_plugin import plugin, plugin_json
from test_recovery_e2e import wait_recovered

pytestmark = pytest.mark.xdist_group("fly-reality")

APP = "acct-test"
NAME = "r"
REGIONS = ["sjc", "ams"]


@pytest.fixture(autouse=True)
async def hosts_come_back(stack: Stack, namespace: str) -> AsyncIterator[None]:
    yield
    for region in stack.fly.state.regions:
        stack.fly.restore_host(region=region)
    stack.fly.unreachable_fork = "hydrating"

    # This story's instances that waited for their host recover now: let them finish, so that the next
    # story's Fly calls (and the faults it injects) are its own.
    async def quiet() -> bool | None:
        for body in await stack.list_all(INSTANCE_PLURAL):
            if body["metadata"]["namespace"] != namespace:
                continue  # other files' instances on a shared (real) cluster are not this story's
            if status(body).get("recovery") or condition(body, "Stalled").get("reason") in (
                "WaitingForSource",
                "RecoveryPaused",
            ):
                return None
        return True

    await eventually(quiet, timeout=30, what="no instance recovering or waiting for a source")


async def running_instance(stack: Stack, namespace: str, **spec: Any) -> dict[str, Any]:
    await stack.create_instance(namespace, NAME, regions=REGIONS, **spec)
    return await stack.wait_instance(
        namespace,
        NAME,
        lambda b: status(b).get("phase") == "Running" and condition(b, "Ready").get("status") == "True",
        what="Running and Ready",
    )


async def waiting_for_source(stack: Stack, namespace: str) -> dict[str, Any]:
    """The instance once it is Stalled WaitingForSource (host down, nothing to recover from)."""
    return await stack.wait_instance(
        namespace,
        NAME,
        lambda b: condition(b, "Stalled").get("reason") == "WaitingForSource",
        what="Stalled WaitingForSource",
    )


async def migrated_when_its_host_returns(stack: Stack, namespace: str) -> tuple[str, str]:
    """A Running instance whose host fails (it waits for a source), then returns, and Fly migrates its
    machine at once: the machine's id and the volume the status records."""
    body = await running_instance(stack, namespace)
    machine, old_volume = status(body)["machineId"], status(body)["volumeId"]
    stack.fly.fail_host(machine_id=machine)
    await waiting_for_source(stack, namespace)
    stack.fly.restore_host(machine_id=machine)
    stack.fly.migrate_machine(machine)
    return machine, old_volume


def requests(stack: Stack, method: str, path: str) -> list[Any]:
    return [r for r in stack.fly.request_log if r.method == method and r.path == f"/v1/apps/{APP}/{path}"]


def sandbox_volumes(stack: Stack, namespace: str) -> list[dict[str, Any]]:
    return stack.live_volumes(name=volume_name(sandbox_id(namespace, NAME)))


async def event_messages(stack: Stack, namespace: str, reason: str) -> list[str]:
    """The messages of the instance's events with this reason, once there is one: the operator posts an event
    after the status write a test waits for, so on a real API server it can land a moment later."""

    events = await stack.events_with(namespace, NAME, reason)
    return [e.get("message", "") for e in events if e.get("reason") == reason]


async def test_a_dead_host_with_a_recent_snapshot_is_recovered_from_the_snapshot_and_says_how_old_it_was(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace)
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    snapshot = stack.fly.add_snapshot(source_volume)
    stack.fly.fail_host(machine_id=source_machine)

    done = await wait_recovered(stack, namespace, source_machine)
    last = status(done)["lastRecovery"]
    assert (last["source"], last["snapshotId"]) == ("Snapshot", snapshot["id"])
    assert 0 <= last["dataLossSeconds"] < 60
    replacement = stack.fly.volume(status(done)["volumeId"])
    assert replacement["source_volume_id"] is None  # a restore, not a fork of the unreachable volume
    assert replacement["host_status"] == "ok"
    # Never a fork of the volume on the dead host, never a delete of it.
    assert not [v for v in stack.fly.volumes() if v["source_volume_id"] == source_volume]
    assert not requests(stack, "DELETE", f"volumes/{source_volume}")
    # Destroying is Fly's fence: the recovery did not wait for a `destroyed` that cannot come.
    assert stack.fly.machine(source_machine)["state"] == "destroying"
    assert last["durationSeconds"] < 10
    started = await event_messages(stack, namespace, "RecoveryStarted")
    assert any(f"snapshot {snapshot['id']}" in m and "lost" in m for m in started)
    succeeded = await event_messages(stack, namespace, "RecoverySucceeded")
    assert any("data-loss window" in m for m in succeeded)
    retained = await stack.list_retained(namespace)
    assert [r["spec"]["volumeId"] for r in retained] == [source_volume]

    # The host returns: the pending destroy completes; the old volume is still kept.
    stack.fly.restore_host(machine_id=source_machine)

    async def destroyed() -> bool | None:
        return True if stack.fly.machine(source_machine)["state"] == "destroyed" else None

    await eventually(destroyed, timeout=10, what="the fenced machine destroyed once its host returned")
    assert not requests(stack, "DELETE", f"volumes/{source_volume}")


async def test_a_dead_host_without_a_snapshot_waits_stalled_and_recovers_by_itself_when_the_host_returns(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace)
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    stack.fly.fail_host(machine_id=source_machine)

    waiting = await waiting_for_source(stack, namespace)
    st = status(waiting)
    assert st["phase"] == "Stopped"
    assert "recovery" not in st and "lastRecovery" not in st  # no attempt, no deadline burnt
    assert "no snapshot" in condition(waiting, "Stalled")["message"]
    await stack.events_with(namespace, NAME, "WaitingForSource")
    assert [v["id"] for v in sandbox_volumes(stack, namespace)] == [source_volume]
    assert not requests(stack, "DELETE", f"machines/{source_machine}")
    assert condition(waiting, "Ready")["status"] == "False"

    # Observation goes on: the instance keeps reading its machine while it waits.
    path = f"/v1/apps/{APP}/machines/{source_machine}"
    reads = len([r for r in stack.fly.request_log if r.method == "GET" and r.path == path])

    async def read_again() -> bool | None:
        now = len([r for r in stack.fly.request_log if r.method == "GET" and r.path == path])
        return True if now >= reads + 2 else None

    await eventually(read_again, timeout=10, what="the waiting instance reading its machine again")

    stack.fly.restore_host(machine_id=source_machine)
    done = await wait_recovered(stack, namespace, source_machine)
    assert status(done)["lastRecovery"]["source"] == "Fork"
    assert condition(done, "Stalled")["status"] == "False"


async def test_a_snapshot_older_than_the_policy_allows_is_not_restored_until_the_policy_accepts_it(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace, recovery={"maxDataLossSeconds": 0})
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    snapshot = stack.fly.add_snapshot(source_volume)
    stack.fly.fail_host(machine_id=source_machine)

    waiting = await waiting_for_source(stack, namespace)
    assert "maxDataLossSeconds is 0" in condition(waiting, "Stalled")["message"]
    assert [v["id"] for v in sandbox_volumes(stack, namespace)] == [source_volume]

    await stack.patch_instance(namespace, NAME, {"spec": {"recovery": {"maxDataLossSeconds": 3600}}})
    done = await wait_recovered(stack, namespace, source_machine)
    assert status(done)["lastRecovery"]["snapshotId"] == snapshot["id"]


async def test_a_fork_that_fly_refuses_for_an_unreachable_host_is_never_attempted(
    stack: Stack, namespace: str
) -> None:
    previous = stack.fly.unreachable_fork
    stack.fly.unreachable_fork = "refused"
    try:
        body = await running_instance(stack, namespace)
        source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
        # Only this story's requests: the stack is shared with other files' stories (capacity 412s).
        log_from = len(stack.fly.request_log)
        stack.fly.fail_host(machine_id=source_machine)
        await waiting_for_source(stack, namespace)
    finally:
        stack.fly.unreachable_fork = previous
    refused = [
        r
        for r in stack.fly.request_log[log_from:]
        if r.method == "POST" and r.path.endswith("/volumes") and r.status == 412
    ]
    assert not refused
    assert [v["id"] for v in sandbox_volumes(stack, namespace)] == [source_volume]


async def test_a_platform_migration_is_followed_without_a_recovery_or_a_delete(
    stack: Stack, namespace: str
) -> None:
    timings = stack.fly.state.timings
    # Stopped long enough for the operator to see it, shorter than its migration grace (2 s in tests).
    stack.fly.state.timings = dataclasses.replace(timings, migration_pause=0.6)
    try:
        body = await running_instance(stack, namespace)
        machine, old_volume = status(body)["machineId"], status(body)["volumeId"]
        stack.fly.migrate_machine(machine)
        moved = await stack.wait_instance(
            namespace,
            NAME,
            lambda b: (
                status(b).get("volumeId") not in (None, old_volume) and status(b).get("phase") == "Running"
            ),
            what="status.volumeId following the migration",
        )
    finally:
        stack.fly.state.timings = timings
    st = status(moved)
    assert st["machineId"] == machine
    assert st["volumeId"] == stack.fly.machine(machine)["config"]["mounts"][0]["volume"]
    assert "lastRecovery" not in st and "recovery" not in st
    reasons = [e["reason"] for e in await stack.events_with(namespace, NAME, "MachineMigrated")]
    assert "MachineMigrated" in reasons and "RecoveryStarted" not in reasons
    assert not requests(stack, "DELETE", f"machines/{machine}")
    assert stack.fly.machine(machine)["state"] == "started"
    assert not requests(stack, "DELETE", f"volumes/{old_volume}")  # Fly cleans it up, not the operator


@pytest.mark.slow  # waits out the whole recovery deadline
async def test_a_recovery_step_stuck_in_a_slow_fly_call_never_outlives_the_recovery_deadline(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace)
    source_machine = status(body)["machineId"]
    assert stack.settings is not None
    timeout = stack.settings.recovery_timeout_seconds
    # The fork's answer takes longer than the whole recovery may (but less than the call's own deadline).
    stack.fly.set_latency(timeout + 15, f"POST /v1/apps/{APP}/volumes")
    try:
        stack.fly.crash_machine(source_machine)
        failed = await stack.wait_instance(
            namespace,
            NAME,
            lambda b: (status(b).get("lastRecovery") or {}).get("outcome") == "Failed",
            timeout=timeout + 10,
            what="the recovery failed at its deadline",
        )
    finally:
        stack.fly.clear_latency()
    last = status(failed)["lastRecovery"]
    assert last["message"] == "unexpected stop recovery timed out"
    assert last["durationSeconds"] < timeout + 5


@pytest.mark.slow  # two operator restarts and a paused recovery
async def test_past_the_brake_threshold_new_recoveries_pause_until_an_admin_rearms(
    stack: Stack, namespace: str
) -> None:
    # Two confirmed stops within the window are fine; the third engages the brake.
    await stack.restart_operator(brake_pause_stops=2, brake_window_seconds=600, brake_min_instances=100_000)
    try:
        names = ["b1", "b2", "b3"]
        machines = {}
        for name in names:
            await stack.create_instance(namespace, name, regions=REGIONS)
        for name in names:
            body = await stack.wait_instance(
                namespace, name, lambda b: status(b).get("phase") == "Running", what=f"{name} Running"
            )
            machines[name] = status(body)["machineId"]
        # Two stops, recovered; then the third within the window engages the brake.
        for name in names[:2]:
            stack.fly.crash_machine(machines[name])
        for name in names[:2]:
            await stack.wait_instance(
                namespace,
                name,
                lambda b: (status(b).get("lastRecovery") or {}).get("outcome") == "Succeeded",
                timeout=30,
                what=f"{name} recovered",
            )
        stack.fly.crash_machine(machines[names[2]])

        async def outcome() -> tuple[list[str], list[str]] | None:
            bodies = {name: await stack.get_instance(namespace, name) for name in names}
            done = [
                n for n, b in bodies.items() if b and (status(b).get("lastRecovery") or {}).get("outcome")
            ]
            paused = [
                n
                for n, b in bodies.items()
                if b and condition(b, "Stalled").get("reason") == "RecoveryPaused"
            ]
            return (done, paused) if len(done) == 2 and len(paused) == 1 else None

        _, [paused] = await eventually(outcome, timeout=30, what="two recovered, one paused")
        held = await stack.get_instance(namespace, paused)
        assert held is not None
        assert status(held)["phase"] == "Stopped" and "recovery" not in status(held)
        assert "kubectl kiloclaw rearm" in condition(held, "Stalled")["message"]
        assert stack.fly.machine(machines[paused])["state"] == "stopped"  # nothing destroyed
        await stack.events_with(namespace, paused, "RecoveryPaused")
        shown = await plugin_json(stack, "brake")
        assert shown["state"] == "Engaged" and "3 reported unexpected stops" in shown["reason"]
        assert REGISTRY.get_sample_value("kiloclaw_recovery_brake_engaged") == 1

        rearmed = await plugin(stack, "rearm")
        assert rearmed.returncode == 0, rearmed.stderr
        after = await stack.wait_instance(
            namespace,
            paused,
            lambda b: (
                (status(b).get("lastRecovery") or {}).get("outcome") == "Succeeded"
                and status(b).get("phase") == "Running"
            ),
            timeout=30,
            what="the paused instance recovered after the re-arm",
        )
        assert condition(after, "Stalled")["status"] == "False"
        assert (await plugin_json(stack, "brake"))["state"] == "Released"
        assert REGISTRY.get_sample_value("kiloclaw_recovery_brake_engaged") == 0
    finally:
        await stack.restart_operator()


async def test_a_stopped_machine_that_fly_migrated_is_followed_and_starts_on_its_new_volume(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace)
    machine, old_volume = status(body)["machineId"], status(body)["volumeId"]
    await stack.patch_instance(namespace, NAME, {"spec": {"state": "Stopped"}})
    await stack.wait_phase(namespace, NAME, "Stopped")
    stack.fly.migrate_machine(machine)
    moved = await stack.wait_instance(
        namespace,
        NAME,
        lambda b: status(b).get("volumeId") not in (None, old_volume),
        what="status.volumeId following the migration of a stopped machine",
    )
    assert status(moved)["phase"] == "Stopped"
    await stack.patch_instance(namespace, NAME, {"spec": {"state": "Running"}})
    up = await stack.wait_instance(
        namespace,
        NAME,
        lambda b: status(b).get("phase") == "Running" and condition(b, "Ready").get("status") == "True",
        what="Running on the migrated volume",
    )
    assert status(up)["machineId"] == machine and status(up)["volumeId"] == status(moved)["volumeId"]
    assert "lastRecovery" not in status(up)


async def running_again_off(stack: Stack, namespace: str, old_volume: str, how: str) -> dict[str, Any]:
    """Wait until the instance really runs again (started, Ready, no recovery in flight) on a volume other
    than ``old_volume``, so that nothing of a story spills into the next one."""
    return await stack.wait_instance(
        namespace,
        NAME,
        lambda b: (
            status(b).get("volumeId") not in (None, old_volume)
            and status(b).get("phase") == "Running"
            and status(b).get("flyState") == "started"
            and condition(b, "Ready").get("status") == "True"
            and "recovery" not in status(b)
        ),
        timeout=60,
        what=f"Running again, {how}",
    )


async def test_a_machine_fly_left_stopped_on_a_migrated_volume_is_followed_not_recovered_from_the_old_one(
    stack: Stack, namespace: str
) -> None:
    """Found by the chaos campaign (seed 20261283): a stop the operator did not send, then Fly migrates the
    stopped machine (a new volume id, the old one removed once the fork hydrated) and leaves it stopped. After
    the migration grace the instance follows the new volume; it never forks the removed one (which failed the
    recovery with "source volume missing" and left the migrated volume behind)."""
    body = await running_instance(stack, namespace)
    machine, old_volume = status(body)["machineId"], status(body)["volumeId"]
    with LogRecords().capturing("kiloclaw.stops") as logs:
        stack.fly.state.stop_machine(body["spec"]["flyApp"], machine)  # someone else's stop: not a crash

        async def in_grace() -> bool | None:
            return any("waiting up to" in r.getMessage() for r in logs.of(namespace)) or None

        # The operator saw the stop on the old volume and waits for a migration; Fly moves the stopped machine
        # meanwhile and leaves it stopped on the new volume.
        await eventually(in_grace, timeout=10, what="the operator waiting out the migration grace")
        stack.fly.migrate_machine(machine)
    up = await running_again_off(stack, namespace, old_volume, "on the migrated volume or a recovery from it")
    last = status(up).get("lastRecovery") or {}
    assert last.get("outcome") in (None, "Succeeded"), last
    assert "RecoveryFailed" not in await stack.event_reasons(namespace, NAME)
    assert not requests(stack, "DELETE", f"volumes/{old_volume}")  # Fly removed it, not the operator


@pytest.mark.slow  # two operator restarts
async def test_an_instance_waiting_for_its_dead_host_runs_again_when_fly_migrates_its_machine_on_return(
    stack: Stack, namespace: str
) -> None:
    """Found by the chaos campaign (seed 20261397): the host returns and Fly moves the (stopped) machine to
    another host before the waiting instance looks again. Following the migration ends the wait, and the
    instance must then run again: it stayed Stopped with no stall, a settled phase nothing would start."""
    await stack.restart_operator(source_recheck_seconds=3)
    try:
        # Migrated before the instance looks again (every 3 s here).
        _, old_volume = await migrated_when_its_host_returns(stack, namespace)
        up = await running_again_off(stack, namespace, old_volume, "after the migration ended the wait")
        assert condition(up, "Stalled")["status"] == "False"
        assert (status(up).get("lastRecovery") or {}).get("outcome") in (None, "Succeeded")
    finally:
        await stack.restart_operator()


@pytest.mark.slow  # two operator restarts and a paused recovery
async def test_an_admins_rearm_releases_the_brake_and_its_paused_recoveries_at_once(
    stack: Stack, namespace: str
) -> None:
    """The operator watches the brake's Lease while it is engaged: a re-arm takes effect in seconds even when
    no instance looks again (paused instances re-check only every source_recheck_seconds), so the next
    incident's first stops are not counted against a brake that the admin has already released, and the
    paused recoveries begin at once."""
    await stack.restart_operator(
        brake_pause_stops=1,
        brake_window_seconds=600,
        brake_min_instances=100_000,
        source_recheck_seconds=600,
    )
    try:
        names = ["w1", "w2"]
        machines = {}
        for name in names:
            await stack.create_instance(namespace, name, regions=REGIONS)
        for name in names:
            body = await stack.wait_instance(
                namespace, name, lambda b: status(b).get("phase") == "Running", what=f"{name} Running"
            )
            machines[name] = status(body)["machineId"]
        # The first stop is within the threshold and recovers; the second engages the brake.
        stack.fly.crash_machine(machines["w1"])
        await stack.wait_instance(
            namespace,
            "w1",
            lambda b: (
                (status(b).get("lastRecovery") or {}).get("outcome") == "Succeeded"
                and status(b).get("phase") == "Running"
            ),
            timeout=30,
            what="w1 recovered",
        )
        stack.fly.crash_machine(machines["w2"])

        async def engaged() -> bool | None:
            return REGISTRY.get_sample_value("kiloclaw_recovery_brake_engaged") == 1 or None

        await eventually(engaged, timeout=30, what="the brake engaged")

        async def settled() -> bool | None:
            first, second = [await stack.get_instance(namespace, name) for name in names]
            return (
                first
                and second
                and (status(first).get("lastRecovery") or {}).get("outcome") == "Succeeded"
                and status(first).get("phase") == "Running"
                and condition(second, "Stalled").get("reason") == "RecoveryPaused"
            ) or None

        # Nothing reports a stop any more: the first recovered before the brake engaged, the second is paused.
        await eventually(settled, timeout=30, what="w2 paused")
        rearmed = await plugin(stack, "rearm")
        assert rearmed.returncode == 0, rearmed.stderr

        async def released() -> bool | None:
            return REGISTRY.get_sample_value("kiloclaw_recovery_brake_engaged") == 0 or None

        await eventually(released, timeout=10, what="the operator saw the re-arm without a new stop")
        # ... and the paused instance proceeds at once, not at its next look (600 s away here).
        await stack.wait_instance(
            namespace,
            "w2",
            lambda b: (
                (status(b).get("lastRecovery") or {}).get("outcome") == "Succeeded"
                and status(b).get("phase") == "Running"
            ),
            timeout=30,
            what="w2 recovered after the re-arm",
        )
    finally:
        await stack.restart_operator()


@pytest.mark.slow  # two operator restarts
async def test_an_instance_deleted_before_it_followed_a_migration_deletes_the_machine_and_both_volumes(
    stack: Stack, namespace: str
) -> None:
    """Found by the chaos campaign (seed 9422): the host returns, Fly moves the waiting instance's machine to
    a new volume, and the instance is deleted before any pass follows. The destroy refused the machine for
    ever ("it does not mount the recorded volume") and left the new volume behind; now the machine read proves
    the new volume the instance's, and both volumes go with it."""
    # Last in the file: failing a host stops other tests' machines on it too, and the brake story counts
    # every confirmed stop it sees.
    await stack.restart_operator(source_recheck_seconds=60)  # no pass follows before the deletion
    try:
        machine, old_volume = await migrated_when_its_host_returns(stack, namespace)

        async def moved() -> str | None:
            mounted: str = stack.fly.machine(machine)["config"]["mounts"][0]["volume"]
            return mounted if mounted != old_volume else None

        new_volume = await eventually(moved, timeout=10, what="Fly moving the machine to a new volume")
        assert status(await stack.get_instance(namespace, NAME) or {})["volumeId"] == old_volume
        await stack.delete_instance(namespace, NAME)
        await stack.wait_gone(namespace, NAME, timeout=60)
    finally:
        await stack.restart_operator()
    assert sandbox_volumes(stack, namespace) == []
    assert stack.live_machines(APP, sandbox_id=sandbox_id(namespace, NAME)) == []
    assert requests(stack, "DELETE", f"volumes/{new_volume}")
