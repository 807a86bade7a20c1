"""Crash safety of the unexpected-stop recovery (DESIGN 3.3): the operator is killed after each recorded step
and between a create call and its status write, then restarted against the same Kubernetes and Fly state.

To kill it right after step S is recorded, the Fly route of the call that follows S is slowed, the test waits
until ``status.recovery.step == S`` (so the operator is inside that slow call), and kills it. flysim completes
whatever request was in flight, as Fly would.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from aiohttp import web

from harness import Stack, eventually, status
from kiloclaw_operator.fly import volume_name
from kiloclaw_operator.models import INSTANCE_PLURAL
from kiloclaw_operator.recovery import TIMEOUT_MESSAGE
from test_recovery_e2e import (  # noqa: F401 (healthy_fly is an autouse fixture)
    APP,
    NAME,
    FlyCreates,
    FlyTap,
    caught_up,
    fly_requests,
    healthy_fly,
    live_machine_ids,
    live_volume_ids,
    parse_time,
    replacement_machines_hang,
    running_instance,
    sandbox_id,
    stored_status,
    wait_events,
    wait_failed,
    wait_recovered,
    wait_step,
    watch_instance,
)

# The operator killed and restarted mid-recovery: `make stories` (run by `make e2e`), not `make test`.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("operator-restart")]

LATENCY = 1.0

#: recorded step -> the route of the Fly call the operator makes next (slowed, so the kill lands in it)
NEXT_CALL = {
    "Started": "GET /v1/apps/*/volumes/*",  # step 2: read the source volume
    "SourceVolumeChecked": "DELETE /v1/apps/*/machines/*",  # step 3: destroy the source machine
    "SourceMachineDestroyed": "GET /v1/apps/*/volumes",  # step 4: look for a fork to adopt
    "ReplacementVolumeCreated": "GET /v1/apps/*/machines",  # step 5: look for a machine to adopt
    "ReplacementMachineCreated": "GET /v1/apps/*/machines/*/wait",  # step 6: wait for started
    "ReplacementMachineStarted": "GET /v1/apps/*/volumes/*",  # step 7: the replacement's region
    "CutOver": "GET /v1/apps/*/volumes/*/snapshots",  # step 8: dispose of the old volume
}


def watch_old_volume_deletes(tap: FlyTap, stack: Stack, namespace: str, source_volume: str) -> list[Any]:
    """The stored status at the moment each DELETE of the old volume reaches Fly."""
    seen: list[dict[str, Any]] = []
    tap.on(
        "DELETE",
        f"/v1/apps/{APP}/volumes/{source_volume}",
        lambda: seen.append(stored_status(stack, namespace)),
    )
    return seen


async def assert_recovered_once(
    stack: Stack,
    namespace: str,
    done: dict[str, Any],
    creates: FlyCreates,
    source_volume: str,
    deletes_seen: list[dict[str, Any]],
) -> None:
    st = status(done)
    replacement_volume, replacement_machine = st["volumeId"], st["machineId"]
    assert creates.created("volume") == [replacement_volume]
    assert creates.created("machine") == [replacement_machine]
    assert live_volume_ids(stack, namespace) == {replacement_volume}
    assert live_machine_ids(stack, namespace) == {replacement_machine}
    # The old volume: deleted exactly once, and only once the cutover was stored.
    assert len(fly_requests(stack, "DELETE", f"volumes/{source_volume}")) == 1
    assert len(deletes_seen) == 1
    assert deletes_seen[0]["volumeId"] == replacement_volume
    assert deletes_seen[0]["recovery"]["step"] == "CutOver"
    # The committed replacement is never deleted.
    assert not fly_requests(stack, "DELETE", f"volumes/{replacement_volume}")
    assert not fly_requests(stack, "DELETE", f"machines/{replacement_machine}")
    reasons = await wait_events(stack, namespace, "RecoverySucceeded")
    assert reasons.count("RecoverySucceeded") == 1
    assert reasons.count("RecoveryStarted") <= 1  # a kill right after the begin write may lose the event
    assert "RecoveryFailed" not in reasons


@pytest.mark.parametrize("step", list(NEXT_CALL))
async def test_an_operator_killed_after_a_recorded_step_completes_the_recovery_after_restart(
    stack: Stack, namespace: str, step: str
) -> None:
    body = await running_instance(stack, namespace)
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    with FlyTap(stack) as tap, FlyCreates(stack, namespace) as creates:
        deletes_seen = watch_old_volume_deletes(tap, stack, namespace, source_volume)
        stack.fly.set_latency(LATENCY, route=NEXT_CALL[step])
        try:
            stack.fly.crash_machine(source_machine)
            await wait_step(stack, namespace, step)
            await stack.crash_operator()
            killed_at = stored_status(stack, namespace)
        finally:
            stack.fly.clear_latency()
            await stack.restart_operator()
        assert killed_at["recovery"]["step"] == step
        done = await wait_recovered(stack, namespace, source_machine)
    assert status(done)["lastRecovery"]["id"] == killed_at["recovery"]["id"]
    await assert_recovered_once(stack, namespace, done, creates, source_volume, deletes_seen)


@contextmanager
def reply_to_create_held(
    stack: Stack, create: str, seconds: float, sandbox: str | None = None
) -> Iterator[list[str]]:
    """Fly executes the create at once but its reply is held back ``seconds``, so an operator killed meanwhile
    never learns the id (yields the ids created so far). flysim's latency applies before the request is
    executed, and a request whose client went away is never executed, so this wraps the step that serves a
    Fly request and delays its reply instead."""
    fly = stack.fly
    original = fly._serve_fly
    path = f"/v1/apps/{APP}/{create}"
    created: list[str] = []

    async def serve(request: Any, handler: Any) -> Any:
        response = await original(request, handler)
        if request.method == "POST" and request.path == path and response.status == 200:
            assert isinstance(response, web.Response) and response.text is not None
            made = json.loads(response.text)
            # Only this sandbox's creates: a host failure also makes neighbours on the host recover.
            if sandbox is None or sandbox in (
                ((made.get("config") or {}).get("metadata") or {}).get("kiloclaw_sandbox_id"),
                made.get("name"),
            ):
                created.append(made["id"])
                await asyncio.sleep(seconds)
        return response

    fly._serve_fly = serve  # type: ignore[method-assign]
    try:
        yield created
    finally:
        del fly._serve_fly


@contextmanager
def fly_clock_restored(stack: Stack) -> Iterator[None]:
    try:
        yield
    finally:
        stack.fly.clock_offset = 0.0


@pytest.mark.parametrize(
    ("recorded", "create", "fly_clock_offset"),
    [
        ("SourceMachineDestroyed", "volumes", 0.0),
        ("ReplacementVolumeCreated", "machines", 0.0),
        # Fly stamps the fork an hour before the attempt began by our clock: adoption compares in ours.
        ("SourceMachineDestroyed", "volumes", -3600.0),
    ],
    ids=["fork", "machine", "fork-with-fly-clock-an-hour-behind"],
)
async def test_an_operator_killed_between_a_create_call_and_its_status_write_adopts_what_was_created(
    stack: Stack, namespace: str, recorded: str, create: str, fly_clock_offset: float
) -> None:
    body = await running_instance(stack, namespace)
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    stack.fly.clock_offset = fly_clock_offset
    with FlyTap(stack) as tap, FlyCreates(stack, namespace) as creates, fly_clock_restored(stack):
        deletes_seen = watch_old_volume_deletes(tap, stack, namespace, source_volume)
        try:
            owned = sandbox_id(namespace) if create == "machines" else volume_name(sandbox_id(namespace))
            with reply_to_create_held(stack, create, LATENCY, owned) as created:
                stack.fly.crash_machine(source_machine)

                async def executed() -> bool | None:
                    return True if created else None

                await eventually(executed, timeout=10, what=f"POST {create} executed by Fly")
                await stack.crash_operator()
            unrecorded = stored_status(stack, namespace)["recovery"]
        finally:
            await stack.restart_operator()
        assert unrecorded["step"] == recorded
        done = await wait_recovered(stack, namespace, source_machine)
    replacement = status(done)["volumeId" if create == "volumes" else "machineId"]
    assert replacement == created[0]
    await assert_recovered_once(stack, namespace, done, creates, source_volume, deletes_seen)


async def test_an_operator_killed_after_the_cutover_retains_a_snapshotted_old_volume_exactly_once(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace)
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    stack.fly.add_snapshot(source_volume)
    stack.fly.set_latency(LATENCY, route=NEXT_CALL["CutOver"])
    try:
        stack.fly.crash_machine(source_machine)
        await wait_step(stack, namespace, "CutOver")
        await stack.crash_operator()
    finally:
        stack.fly.clear_latency()
        await stack.restart_operator()
    done = await wait_recovered(stack, namespace, source_machine)
    retained = await stack.list_retained(namespace)
    assert [r["spec"]["volumeId"] for r in retained] == [source_volume]
    assert status(done)["lastRecovery"]["retainedVolume"] == retained[0]["metadata"]["name"]
    assert not fly_requests(stack, "DELETE", f"volumes/{source_volume}")
    assert live_volume_ids(stack, namespace) == {source_volume, status(done)["volumeId"]}


async def test_an_operator_down_past_the_deadline_resumes_the_recovery_with_a_fair_budget_and_finishes_it(
    stack: Stack, namespace: str
) -> None:
    """Operator downtime does not count against a recovery: it is resumed, not failed, on restart."""
    body = await running_instance(stack, namespace)
    source_machine = status(body)["machineId"]
    await stack.restart_operator(recovery_timeout_seconds=2)
    try:
        stack.fly.set_latency(LATENCY, route=NEXT_CALL["ReplacementMachineCreated"])
        stack.fly.crash_machine(source_machine)
        held = await wait_step(stack, namespace, "ReplacementMachineCreated")
        await stack.crash_operator()
        record = status(held)["recovery"]
        await past(parse_time(record["deadline"]).timestamp())
    finally:
        stack.fly.clear_latency()
    async with watch_instance(stack, namespace, held) as history:
        await stack.restart_operator(recovery_timeout_seconds=2)
        done = await wait_recovered(stack, namespace, source_machine)
        await caught_up(history, done)
    await stack.restart_operator()
    st = status(done)
    assert st["lastRecovery"]["id"] == record["id"]
    assert st["machineId"] == record["replacementMachineId"]
    deadlines = {(status(b).get("recovery") or {}).get("deadline") for b in history.bodies} - {None}
    assert any(parse_time(d) > parse_time(record["deadline"]) for d in deadlines), "the budget was renewed"
    resumptions = {(status(b).get("recovery") or {}).get("resumptions") for b in history.bodies} - {None}
    assert resumptions == {1}, "the fresh budget is counted"
    reasons = await wait_events(stack, namespace, "RecoverySucceeded")
    assert "RecoveryFailed" not in reasons


async def test_a_resumed_recovery_still_fails_on_its_own_merits_and_cleans_up(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace)
    source_volume = status(body)["volumeId"]
    with replacement_machines_hang(stack):
        try:
            _, record = await kill_the_operator_of_a_hanging_recovery(stack, namespace, body)
            await past(parse_time(record["deadline"]).timestamp())
            await stack.start_operator(recovery_timeout_seconds=2)
            failed = await wait_failed(stack, namespace)
        finally:
            await stack.restart_operator()
    st = status(failed)
    assert st["lastRecovery"]["message"] == TIMEOUT_MESSAGE
    assert st["lastRecovery"]["id"] == record["id"]
    assert live_volume_ids(stack, namespace) == {source_volume}
    assert live_machine_ids(stack, namespace) == set()
    assert stack.fly.machine(record["replacementMachineId"])["state"] in ("destroyed", "destroying")
    assert not fly_requests(stack, "DELETE", f"volumes/{source_volume}")
    assert st["volumeId"] == source_volume and "pendingCleanup" not in st
    assert await stack.list_retained(namespace) == []


async def test_a_recovery_that_had_three_fresh_budgets_keeps_its_deadline_when_resumed_again(
    stack: Stack, namespace: str
) -> None:
    """An operator that crashes again and again cannot keep one recovery alive forever."""
    body = await running_instance(stack, namespace)
    source_volume = status(body)["volumeId"]
    with replacement_machines_hang(stack):
        try:
            held, record = await kill_the_operator_of_a_hanging_recovery(stack, namespace, body)
            # Three earlier operator processes each gave it a fresh budget.
            response = await stack.api.patch(
                stack.path(INSTANCE_PLURAL, namespace, NAME, sub="status"),
                json={"status": {"recovery": {"resumptions": 3}}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            assert response.status_code == 200, response.text
            await past(parse_time(record["deadline"]).timestamp())
            async with watch_instance(stack, namespace, held) as history:
                await stack.start_operator(recovery_timeout_seconds=2)
                failed = await wait_failed(stack, namespace)
                await caught_up(history, failed)
        finally:
            await stack.restart_operator()
    assert status(failed)["lastRecovery"]["message"] == TIMEOUT_MESSAGE
    deadlines = {(status(b).get("recovery") or {}).get("deadline") for b in history.bodies} - {None}
    assert deadlines == {record["deadline"]}, "the deadline was not moved again"
    assert live_volume_ids(stack, namespace) == {source_volume}


async def kill_the_operator_of_a_hanging_recovery(
    stack: Stack, namespace: str, body: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Under ``replacement_machines_hang``: an operator with a 2 s recovery timeout recovers ``body``'s
    instance and is killed once the replacement machine is recorded. Returns the stored body and its
    recovery record."""
    await stack.restart_operator(recovery_timeout_seconds=2)
    stack.fly.crash_machine(status(body)["machineId"])
    held = await wait_step(stack, namespace, "ReplacementMachineCreated")
    await stack.crash_operator()
    return held, status(held)["recovery"]


async def past(moment: float) -> None:
    async def passed() -> bool | None:
        return True if time.time() > moment else None

    await eventually(passed, timeout=5, what="the recovery deadline passed")
