"""End-to-end lifecycle stories over HTTP: the real operator against kubesim and flysim.

Each story records every version of its instance from a watch stream (``History``) and checks, besides the
outcome, that the conditions and ``observedGeneration`` were consistent at every step a user could have seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from harness import FLY_TOKEN, Stack, condition, eventually, status
from kiloclaw_operator.conditions import is_ready
from kiloclaw_operator.fly import volume_name
from kiloclaw_operator.fly.vocabulary import legacy_volume_name, machine_name
from kiloclaw_operator.models import (
    FINALIZER,
    GROUP,
    INSTANCE_PLURAL,
    UNSETTLED_PHASES,
    DesiredState,
    Phase,
)
from test_tenancy_e2e import claimed_by_an_earlier_attempt, left_volume

BUSY = {phase.value for phase in UNSETTLED_PHASES}
NEW_IMAGE = "registry.fly.io/kiloclaw:2026.12.0"


# --- helpers ----------------------------------------------------------------------------------------------


class History:
    """Every stored version of the instances of one namespace, in order, from a watch stream."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def of(self, name: str) -> list[dict[str, Any]]:
        return [b for b in self.bodies if b["metadata"]["name"] == name]

    def phases(self, name: str) -> list[str]:
        seen: list[str] = []
        for body in self.of(name):
            phase = status(body).get("phase")
            if phase and (not seen or seen[-1] != phase):
                seen.append(phase)
        return seen

    def reconciling_reasons(self, name: str) -> set[str]:
        return {condition(b, "Reconciling").get("reason", "") for b in self.of(name)}

    def assert_consistent(self, name: str) -> None:
        """What kstatus clients rely on held in every version the API server stored."""
        versions = self.of(name)
        assert versions, f"no versions of {name} recorded"
        for body in versions:
            st, generation = status(body), body["metadata"]["generation"]
            where = f"{name} rv {body['metadata']['resourceVersion']}: {json.dumps(st)[:600]}"
            observed = st.get("observedGeneration")
            assert observed is None or observed <= generation, where
            conditions = {c["type"]: c for c in st.get("conditions", [])}
            if not conditions:
                continue
            assert set(conditions) == {"Ready", "Reconciling", "Stalled"}, where
            phase, ready = st.get("phase"), conditions["Ready"]["status"]
            wants = body["spec"].get("state", "Running")
            ready_expected = is_ready(Phase(phase), st.get("flyState"), DesiredState(wants))
            # The status write carries the generation it was computed for; a spec change lands in between.
            if conditions["Ready"].get("observedGeneration") == generation:
                assert (ready == "True") == ready_expected, where
            if phase in BUSY:
                assert conditions["Reconciling"]["status"] == "True", where
            if conditions["Reconciling"]["status"] == "False" and conditions["Stalled"]["status"] == "False":
                assert observed == conditions["Reconciling"]["observedGeneration"], where


async def _stream(stack: Stack, namespace: str, history: History, started: asyncio.Event) -> None:
    path = stack.path(INSTANCE_PLURAL, namespace)
    listing = (await stack.api.get(path)).json()
    version = listing["metadata"]["resourceVersion"]
    history.bodies.extend(listing["items"])
    params = {"watch": "true", "resourceVersion": version, "timeoutSeconds": "120"}
    async with (
        stack.new_client(timeout=None) as client,
        client.stream("GET", path, params=params) as response,
    ):
        started.set()
        async for line in response.aiter_lines():
            if line.strip():
                event = json.loads(line)
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    history.bodies.append(event["object"])


@contextlib.asynccontextmanager
async def watched(stack: Stack, namespace: str) -> AsyncIterator[History]:
    history = History()
    started = asyncio.Event()
    task = asyncio.create_task(_stream(stack, namespace, history, started))
    await asyncio.wait_for(started.wait(), 5)
    try:
        yield history
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def caught_up(history: History, body: dict[str, Any]) -> None:
    """Wait until the watch stream has delivered ``body`` (it may lag behind a GET)."""
    version = body["metadata"]["resourceVersion"]

    async def check() -> bool | None:
        return True if any(b["metadata"]["resourceVersion"] == version for b in history.bodies) else None

    await eventually(check, timeout=5, what=f"watch reached resourceVersion {version}")


def ready(body: dict[str, Any]) -> bool:
    return condition(body, "Ready").get("status") == "True"


def settled(body: dict[str, Any]) -> bool:
    """Acted on the newest generation and not working on anything."""
    st = status(body)
    return (
        st.get("observedGeneration") == body["metadata"]["generation"]
        and condition(body, "Reconciling").get("status") == "False"
        and st.get("phase") not in BUSY
    )


async def running(stack: Stack, namespace: str, name: str, timeout: float = 15) -> dict[str, Any]:
    return await stack.wait_instance(
        namespace,
        name,
        lambda b: settled(b) and ready(b) and status(b).get("phase") == "Running",
        timeout,
        what="settled Running and Ready",
    )


async def stopped(stack: Stack, namespace: str, name: str, timeout: float = 15) -> dict[str, Any]:
    return await stack.wait_instance(
        namespace,
        name,
        lambda b: settled(b) and status(b).get("phase") == "Stopped",
        timeout,
        what="settled Stopped",
    )


async def destroy_machine_behind_the_operators_back(stack: Stack, app: str, machine_id: str) -> None:
    async with httpx.AsyncClient(
        base_url=stack.fly.base_url, headers={"Authorization": f"Bearer {FLY_TOKEN}"}
    ) as fly:
        response = await fly.delete(f"/v1/apps/{app}/machines/{machine_id}", params={"force": "true"})
        assert response.status_code == 200, response.text


def own_app(namespace: str) -> str:
    """A Fly app per test, so request counts and injected faults touch nobody else (and other tests' counts,
    e.g. of forks when a host fails under our machines too, are not touched by ours)."""
    return f"acct-{namespace}"


# --- stories ---------------------------------------------------------------------------------------------


async def test_a_new_instance_creates_its_volume_and_machine_without_listing_anything_first(
    stack: Stack, namespace: str
) -> None:
    # Its first claim proves that no earlier attempt left anything to adopt, and a volume created in the
    # pass has no machine yet: the two creates are its only Fly calls until the machine exists.
    app = own_app(namespace)
    await stack.create_instance(namespace, "ada", flyApp=app)
    done = await running(stack, namespace, "ada")
    calls = [(r.method, r.path) for r in stack.fly.request_log if r.path.startswith(f"/v1/apps/{app}/")]
    machine_create = calls.index(("POST", f"/v1/apps/{app}/machines"))
    assert calls[: machine_create + 1] == [
        ("POST", f"/v1/apps/{app}/volumes"),
        ("POST", f"/v1/apps/{app}/machines"),
    ]
    assert status(done)["volumeId"] and status(done)["machineId"]


async def test_a_machine_created_without_a_listing_whose_reply_was_lost_is_adopted_not_created_twice(
    stack: Stack, namespace: str
) -> None:
    # The first pass skips the listing before its machine create; the create lands but its reply is lost, so
    # the next pass (which lists) must find that machine rather than create a second one.
    app = own_app(namespace)
    machines_path = f"/v1/apps/{app}/machines"
    stack.fly.inject_faults(f"POST {machines_path}", 503, count=1, apply_first=True)
    try:
        await stack.create_instance(namespace, "lou", flyApp=app)
        done = await running(stack, namespace, "lou", timeout=30)
    finally:
        stack.fly.clear_faults()
    machines = stack.live_machines(app)
    assert [m["id"] for m in machines] == [status(done)["machineId"]]
    creates = [r for r in stack.fly.request_log if r.method == "POST" and r.path == machines_path]
    assert len(creates) == 1, "the lost reply's machine was adopted, not created again"
    assert [m["config"]["mounts"][0]["volume"] for m in machines] == [status(done)["volumeId"]]


async def test_new_instance_is_provisioned_to_running_with_ready_condition(
    stack: Stack, namespace: str
) -> None:
    async with watched(stack, namespace) as history:
        body = await stack.create_instance(namespace, "alice", flyApp=own_app(namespace))
        sandbox = body["spec"]["sandboxId"]
        done = await running(stack, namespace, "alice")
        await caught_up(history, done)
    st = status(done)
    assert st["phase"] == "Running"
    assert st["flyState"] == "started"
    assert st["observedGeneration"] == done["metadata"]["generation"]
    assert condition(done, "Reconciling")["status"] == "False"
    assert condition(done, "Stalled")["status"] == "False"
    machines = stack.live_machines(own_app(namespace), sandbox_id=sandbox)
    assert [m["id"] for m in machines] == [st["machineId"]]
    machine = machines[0]
    assert machine["name"] == machine_name(sandbox)
    assert machine["region"] == st["region"] == "iad"
    assert machine["config"]["restart"]["policy"] == "no"
    assert machine["config"]["metadata"]["kiloclaw_user_id"] == "user-alice"
    assert machine["config"]["metadata"]["kiloclaw_sandbox_id"] == sandbox
    assert machine["config"]["mounts"][0] == {"volume": st["volumeId"], "path": "/root"}
    assert machine["config"]["image"] == body["spec"]["image"]
    assert machine["config"]["guest"] == {"cpu_kind": "shared", "cpus": 1, "memory_mb": 2048}
    volumes = stack.live_volumes(own_app(namespace), name=volume_name(sandbox))
    assert [v["id"] for v in volumes] == [st["volumeId"]]
    assert volumes[0]["region"] == "iad" and volumes[0]["size_gb"] == 10
    assert history.phases("alice")[-3:] == ["Provisioning", "Starting", "Running"]
    history.assert_consistent("alice")


async def test_an_instance_is_claimed_only_once_the_finalizer_guards_its_deletion(
    stack: Stack, namespace: str
) -> None:
    # Claimed before kopf added its finalizer, a deletion right then would skip the cleanup of what Fly
    # creates next (and kopf's finalizer patch, which tests the resourceVersion, was refused and resent).
    async with watched(stack, namespace) as history:
        await stack.create_instance(namespace, "fin", flyApp=own_app(namespace))
        done = await running(stack, namespace, "fin")
        await caught_up(history, done)
    with_status = [b for b in history.of("fin") if status(b)]
    assert with_status
    assert all(FINALIZER in b["metadata"].get("finalizers", []) for b in with_status)


async def test_printer_columns_show_the_live_values(stack: Stack, namespace: str) -> None:
    await stack.create_instance(namespace, "carol", flyApp=own_app(namespace))
    done = await running(stack, namespace, "carol")
    response = await stack.api.get(
        stack.path(INSTANCE_PLURAL, namespace, "carol"),
        headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
    )
    response.raise_for_status()
    table = response.json()
    columns = [c["name"] for c in table["columnDefinitions"]]
    cells = dict(zip(columns, table["rows"][0]["cells"], strict=True))
    st = status(done)
    assert cells["Phase"] == "Running"
    assert cells["Fly-State"] == "started"
    assert cells["Region"] == st["region"]
    assert cells["Machine"] == st["machineId"]
    assert cells["Ready"] == "True"
    assert cells["Volume"] == st["volumeId"]


async def test_state_stopped_stops_the_machine_and_running_starts_the_same_machine_again(
    stack: Stack, namespace: str
) -> None:
    async with watched(stack, namespace) as history:
        await stack.create_instance(namespace, "bob", flyApp=own_app(namespace))
        first = await running(stack, namespace, "bob")
        machine_id = status(first)["machineId"]

        await stack.patch_instance(namespace, "bob", {"spec": {"state": "Stopped"}})
        down = await stopped(stack, namespace, "bob")
        assert down["metadata"]["generation"] == 2
        assert status(down)["flyState"] == "stopped"
        assert status(down)["machineId"] == machine_id
        assert ready(down), "Stopped as requested is Ready"
        assert stack.fly.machine(machine_id)["state"] == "stopped"

        await stack.patch_instance(namespace, "bob", {"spec": {"state": "Running"}})
        up = await running(stack, namespace, "bob")
        await caught_up(history, up)
        assert up["metadata"]["generation"] == 3
        assert status(up)["machineId"] == machine_id
        assert stack.fly.machine(machine_id)["state"] == "started"
    phases = history.phases("bob")
    assert phases[phases.index("Running") :] == ["Running", "Stopping", "Stopped", "Starting", "Running"]
    assert len(stack.live_machines(own_app(namespace), sandbox_id=first["spec"]["sandboxId"])) == 1
    history.assert_consistent("bob")


async def test_starting_a_stopped_instance_whose_host_died_relocates_it_instead_of_failing(
    stack: Stack, namespace: str
) -> None:
    """Chaos seed class 'start on a failed host': the host dies while the instance is Stopped; starting it
    again is answered 412 'machine host is unreachable'. The spec is fine, so the instance must not go
    Failed/InvalidSpec: it is relocated like an unexpected stop and converges to Running elsewhere."""
    await stack.create_instance(namespace, "hana", flyApp=own_app(namespace))
    first = await running(stack, namespace, "hana")
    old_machine, old_volume = status(first)["machineId"], status(first)["volumeId"]
    await stack.patch_instance(namespace, "hana", {"spec": {"state": "Stopped"}})
    await stopped(stack, namespace, "hana")
    stack.fly.add_snapshot(old_volume)  # the way back from a dead host (a fork cannot complete)
    stack.fly.fail_host(old_machine)
    try:
        await stack.patch_instance(namespace, "hana", {"spec": {"state": "Running"}})
        up = await stack.wait_instance(
            namespace,
            "hana",
            lambda b: status(b).get("phase") == "Running" and status(b).get("machineId") != old_machine,
            timeout=30,
            what="Running on a replacement machine",
        )
    finally:
        # A region has three hosts: a later story on this worker (a migration) needs a healthy other one.
        stack.fly.restore_host(old_machine)
    assert status(up)["volumeId"] != old_volume
    assert condition(up, "Stalled").get("status") != "True"
    assert (status(up).get("lastRecovery") or {}).get("outcome") == "Succeeded"
    assert (status(up).get("lastRecovery") or {}).get("source") == "Snapshot"
    await stack.events_with(namespace, "hana", "RecoveryStarted")


async def test_a_machine_create_refused_for_the_volumes_unreachable_host_relocates_instead_of_failing(
    stack: Stack, namespace: str
) -> None:
    """Seen at 10,000 instances on the real API server: a host died between an instance's volume create and
    its machine create, and Fly refused the create with 412 "host of volume … is unreachable", which the
    client did not take for a host failure: the instance went Failed/InvalidSpec with a spec that is fine.
    It is relocated as a start on a dead host is."""
    app = own_app(namespace)
    stack.fly.inject_faults(
        f"POST /v1/apps/{app}/machines",
        412,
        count=1,
        message="failed_precondition: host of volume 'vol_of_iris' is unreachable",
    )
    await stack.create_instance(namespace, "iris", flyApp=app)
    up = await stack.wait_instance(
        namespace,
        "iris",
        lambda b: status(b).get("phase") == "Running" and bool(status(b).get("lastRecovery")),
        timeout=30,
        what="Running after a relocation",
    )
    assert condition(up, "Stalled").get("status") != "True"
    assert (status(up).get("lastRecovery") or {}).get("outcome") == "Succeeded"
    assert len(stack.live_machines(app, sandbox_id=up["spec"]["sandboxId"])) == 1


async def test_starting_on_a_dead_host_with_recovery_disabled_stalls_saying_why(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "ines", flyApp=own_app(namespace), recovery={"enabled": False})
    first = await running(stack, namespace, "ines")
    await stack.patch_instance(namespace, "ines", {"spec": {"state": "Stopped"}})
    await stopped(stack, namespace, "ines")
    stack.fly.fail_host(status(first)["machineId"])
    try:
        await stack.patch_instance(namespace, "ines", {"spec": {"state": "Running"}})
        held = await stack.wait_instance(
            namespace,
            "ines",
            lambda b: condition(b, "Stalled").get("reason") == "HostUnavailable",
            what="Stalled HostUnavailable",
        )
    finally:
        stack.fly.restore_host(status(first)["machineId"])
    assert status(held)["phase"] == "Stopped"
    assert "unreachable" in condition(held, "Stalled")["message"]

    async def announced() -> bool | None:
        # Posted right after the status write: a real API server may show the status first.
        return True if "HostUnavailable" in await stack.event_reasons(namespace, "ines") else None

    await eventually(announced, timeout=10, what="Event HostUnavailable")


async def test_instance_created_stopped_settles_stopped_and_ready(stack: Stack, namespace: str) -> None:
    body = await stack.create_instance(namespace, "dora", flyApp=own_app(namespace), state="Stopped")
    down = await stopped(stack, namespace, "dora")
    assert ready(down)
    assert status(down)["volumeId"]
    machines = stack.live_machines(own_app(namespace), sandbox_id=body["spec"]["sandboxId"])
    assert [m["state"] for m in machines] == ["stopped"]


async def test_image_update_changes_the_machine_config_and_advances_observed_generation(
    stack: Stack, namespace: str
) -> None:
    async with watched(stack, namespace) as history:
        await stack.create_instance(namespace, "erin", flyApp=own_app(namespace))
        first = await running(stack, namespace, "erin")
        machine_id = status(first)["machineId"]
        await stack.patch_instance(
            namespace, "erin", {"spec": {"image": NEW_IMAGE, "env": {"TZ": "UTC"}, "guest": {"cpus": 2}}}
        )
        updated = await running(stack, namespace, "erin")
    assert updated["metadata"]["generation"] == 2
    assert status(updated)["observedGeneration"] == 2
    assert status(updated)["machineId"] == machine_id
    config = stack.fly.machine(machine_id)["config"]
    assert config["image"] == NEW_IMAGE
    assert config["env"] == {"TZ": "UTC"}
    assert config["guest"]["cpus"] == 2
    assert config["mounts"][0]["volume"] == status(first)["volumeId"]
    assert config["metadata"]["kiloclaw_sandbox_id"] == first["spec"]["sandboxId"]
    history.assert_consistent("erin")


async def test_machine_destroyed_outside_the_operator_is_recreated_on_the_same_volume_with_an_event(
    stack: Stack, namespace: str
) -> None:
    app = own_app(namespace)
    async with watched(stack, namespace) as history:
        body = await stack.create_instance(namespace, "finn", flyApp=app)
        first = await running(stack, namespace, "finn")
        old_machine, volume_id = status(first)["machineId"], status(first)["volumeId"]

        await destroy_machine_behind_the_operators_back(stack, app, old_machine)
        again = await stack.wait_instance(
            namespace,
            "finn",
            lambda b: (
                status(b).get("machineId") not in (None, old_machine)
                and status(b).get("phase") == "Running"
                and ready(b)
            ),
            what="Running on a new machine",
        )
    new_machine = status(again)["machineId"]
    assert status(again)["volumeId"] == volume_id
    machines = stack.live_machines(app, sandbox_id=body["spec"]["sandboxId"])
    assert [m["id"] for m in machines] == [new_machine]
    assert machines[0]["config"]["mounts"][0]["volume"] == volume_id
    assert len(stack.live_volumes(app)) == 1
    recreated = await stack.events_with(namespace, "finn", "MachineRecreated")
    events = [e for e in recreated if e["reason"] == "MachineRecreated"]
    assert len(events) == 1 and old_machine in events[0]["message"]
    assert condition(again, "Stalled")["status"] == "False"
    history.assert_consistent("finn")


async def test_machine_destroyed_while_stopped_is_recreated_when_started(
    stack: Stack, namespace: str
) -> None:
    app = own_app(namespace)
    async with watched(stack, namespace) as history:
        body = await stack.create_instance(namespace, "otto", flyApp=app)
        first = await running(stack, namespace, "otto")
        old_machine, volume_id = status(first)["machineId"], status(first)["volumeId"]
        await stack.patch_instance(namespace, "otto", {"spec": {"state": "Stopped"}})
        await stopped(stack, namespace, "otto")

        await destroy_machine_behind_the_operators_back(stack, app, old_machine)
        forgotten = await stack.wait_instance(
            namespace, "otto", lambda b: "machineId" not in status(b), what="machine forgotten"
        )
        assert status(forgotten)["phase"] == "Stopped" and ready(forgotten)

        # Fly still shows the destroyed machine (GET 200, state destroyed) for a while: never start it.
        await stack.patch_instance(namespace, "otto", {"spec": {"state": "Running"}})
        again = await running(stack, namespace, "otto")
    assert status(again)["machineId"] != old_machine
    assert status(again)["volumeId"] == volume_id
    machines = stack.live_machines(app, sandbox_id=body["spec"]["sandboxId"])
    assert [m["config"]["mounts"][0]["volume"] for m in machines] == [volume_id]
    history.assert_consistent("otto")


async def test_volume_deleted_outside_the_operator_fails_the_instance_as_volume_not_found_creating_nothing(
    stack: Stack, namespace: str
) -> None:
    app = own_app(namespace)
    await stack.create_instance(namespace, "vera", flyApp=app)
    first = await running(stack, namespace, "vera")
    old_machine, volume_id = status(first)["machineId"], status(first)["volumeId"]
    await stack.patch_instance(namespace, "vera", {"spec": {"state": "Stopped"}})
    await stopped(stack, namespace, "vera")
    await destroy_machine_behind_the_operators_back(stack, app, old_machine)
    await stack.wait_instance(
        namespace, "vera", lambda b: "machineId" not in status(b), what="machine forgotten"
    )
    async with httpx.AsyncClient(
        base_url=stack.fly.base_url, headers={"Authorization": f"Bearer {FLY_TOKEN}"}
    ) as fly:
        response = await fly.delete(f"/v1/apps/{app}/volumes/{volume_id}")
        assert response.status_code == 200, response.text

    await stack.patch_instance(namespace, "vera", {"spec": {"state": "Running"}})
    failed = await stack.wait_instance(
        namespace,
        "vera",
        lambda b: status(b).get("phase") == "Failed" and condition(b, "Stalled").get("status") == "True",
        what="Failed and Stalled",
    )
    stalled = condition(failed, "Stalled")
    assert stalled["reason"] == "VolumeNotFound"
    assert volume_id in stalled["message"] and "kiloclaw.kilo.ai/retry" in stalled["message"]
    assert status(failed)["volumeId"] == volume_id  # the record stays: it names what vanished
    assert stack.live_volumes(app) == [] and stack.live_machines(app) == []

    async def volume_events() -> list[dict[str, Any]] | None:
        found = [e for e in await stack.events(namespace, "vera") if e["reason"] == "VolumeNotFound"]
        return found or None  # the Event is posted after the status is written

    events = await eventually(volume_events, timeout=10, what="a VolumeNotFound Event")
    assert len(events) == 1 and volume_id in events[0]["message"]


async def test_new_instance_never_adopts_a_volume_another_instance_holds_under_the_same_name(
    stack: Stack, namespace: str
) -> None:
    # Legacy volume names kept 21 characters of the sandbox id: these two share one. ada adopts a volume a
    # crash left under it (she alone maps to it then); bea, which maps to it too, must never take it.
    app = own_app(namespace)
    first_sandbox, second_sandbox = "ki_0123456789abcdef0123_a", "ki_0123456789abcdef0123_b"
    assert legacy_volume_name(first_sandbox) == legacy_volume_name(second_sandbox)
    assert volume_name(first_sandbox) != volume_name(second_sandbox)
    await claimed_by_an_earlier_attempt(stack, namespace, "ada", app, first_sandbox)
    left = left_volume(stack, app, legacy_volume_name(first_sandbox))
    await stack.create_instance(namespace, "ada", flyApp=app, sandboxId=first_sandbox, state="Stopped")
    first = await stopped(stack, namespace, "ada")
    assert status(first)["volumeId"] == left
    await destroy_machine_behind_the_operators_back(stack, app, status(first)["machineId"])
    await stack.wait_instance(
        namespace, "ada", lambda b: "machineId" not in status(b), what="machine forgotten"
    )

    # ada's volume is now unattached, recent and under a name bea would accept: still not adoptable (bea
    # looks: an earlier attempt of hers claimed too).
    await claimed_by_an_earlier_attempt(stack, namespace, "bea", app, second_sandbox)
    await stack.create_instance(namespace, "bea", flyApp=app, sandboxId=second_sandbox)
    second = await running(stack, namespace, "bea")
    assert status(second)["volumeId"] != left
    assert [v["id"] for v in stack.live_volumes(app, name=volume_name(second_sandbox))] == [
        status(second)["volumeId"]
    ]


async def test_machine_that_fails_to_start_leaves_the_instance_stopped_and_stalled_saying_why(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "gus", flyApp=own_app(namespace))
    first = await running(stack, namespace, "gus")
    machine_id = status(first)["machineId"]
    await stack.patch_instance(namespace, "gus", {"spec": {"state": "Stopped"}})
    await stopped(stack, namespace, "gus")
    stack.fly.break_machine_start(machine_id, mode="fail")

    await stack.patch_instance(namespace, "gus", {"spec": {"state": "Running"}})
    failed = await stack.wait_instance(
        namespace,
        "gus",
        lambda b: settled(b) and status(b).get("flyState") == "failed",
        what="settled with Fly state failed",
    )
    assert status(failed)["phase"] == "Stopped"
    assert status(failed)["machineId"] == machine_id
    assert condition(failed, "Ready")["status"] == "False"
    stalled = condition(failed, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "StartFailed")
    assert "kiloclaw.kilo.ai/retry" in stalled["message"]

    async def start_failed_event() -> bool | None:
        return True if "StartFailed" in await stack.event_reasons(namespace, "gus") else None

    await eventually(start_failed_event, timeout=10, what="StartFailed event")
    starts = stack.fly.request_count("POST /v1/apps/{app_name}/machines/{machine_id}/start")
    # Stopped is settled: a failed machine is not restarted in a loop.
    await running_polls(stack, namespace, "gus", polls=3)
    assert stack.fly.request_count("POST /v1/apps/{app_name}/machines/{machine_id}/start") == starts
    assert status(await stack.get_instance(namespace, "gus") or {})["phase"] == "Stopped"


async def running_polls(stack: Stack, namespace: str, name: str, polls: int) -> None:
    """Wait until the operator has observed the instance's machine ``polls`` more times."""
    body = await stack.get_instance(namespace, name)
    assert body is not None
    path = f"/v1/apps/{body['spec']['flyApp']}/machines/{status(body)['machineId']}"

    def count() -> int:
        return sum(1 for r in stack.fly.request_log if r.method == "GET" and r.path == path)

    target = count() + polls

    async def enough() -> bool | None:
        return True if count() >= target else None

    await eventually(enough, timeout=10, what=f"{polls} observations of {name}")


@pytest.mark.xdist_group("fly-capacity")
async def test_volume_falls_through_to_the_next_region_without_capacity(stack: Stack, namespace: str) -> None:
    app = own_app(namespace)
    stack.fly.exhaust_capacity("iad", "volumes")
    try:
        body = await stack.create_instance(namespace, "hana", flyApp=app)
        done = await running(stack, namespace, "hana")
    finally:
        stack.fly.restore_capacity("iad")
    assert status(done)["region"] == "ord"
    [volume] = stack.live_volumes(app, name=volume_name(body["spec"]["sandboxId"]))
    assert volume["region"] == "ord" and volume["id"] == status(done)["volumeId"]
    assert [m["region"] for m in stack.live_machines(app)] == ["ord"]


@pytest.mark.xdist_group("fly-capacity")
async def test_spec_regions_are_tried_in_order(stack: Stack, namespace: str) -> None:
    app = own_app(namespace)
    stack.fly.exhaust_capacity("cdg", "volumes")
    try:
        await stack.create_instance(namespace, "ines", flyApp=app, regions=["cdg", "ord"])
        done = await running(stack, namespace, "ines")
    finally:
        stack.fly.restore_capacity("cdg")
    assert status(done)["region"] == "ord"
    creates = [
        r.status for r in stack.fly.request_log if r.method == "POST" and r.path == f"/v1/apps/{app}/volumes"
    ]
    assert creates == [412, 200]


async def test_deletion_destroys_machine_and_volume_and_releases_the_finalizer(
    stack: Stack, namespace: str
) -> None:
    app = own_app(namespace)
    async with watched(stack, namespace) as history:
        body = await stack.create_instance(namespace, "jack", flyApp=app)
        done = await running(stack, namespace, "jack")
        assert f"{GROUP}/finalizer" in done["metadata"]["finalizers"]
        await stack.delete_instance(namespace, "jack")
        await stack.wait_gone(namespace, "jack")
    assert stack.live_machines(app) == []
    assert stack.live_volumes(app) == []
    assert stack.fly.machine(status(done)["machineId"])["state"] == "destroyed"
    assert "Destroying" in history.phases("jack")
    last = history.of("jack")[-1]
    assert "machineId" not in status(last) and "volumeId" not in status(last)
    assert body["spec"]["sandboxId"]


@pytest.mark.slow  # waits out the finalizer's retries
async def test_deletion_is_retried_after_fly_server_errors(stack: Stack, namespace: str) -> None:
    app = own_app(namespace)
    await stack.create_instance(namespace, "kate", flyApp=app)
    done = await running(stack, namespace, "kate")
    # More failures than the client retries inside one call, so the finalizer itself must retry.
    stack.fly.inject_faults(f"DELETE /v1/apps/{app}/machines/*", 503, count=6)
    stack.fly.inject_faults(f"DELETE /v1/apps/{app}/volumes/*", 500, count=6)
    try:
        await stack.delete_instance(namespace, "kate")
        destroying = await stack.wait_phase(namespace, "kate", "Destroying")
        assert status(destroying)["volumeId"] == status(done)["volumeId"], "ids stay until Fly confirms"
        await stack.wait_gone(namespace, "kate", timeout=30)
    finally:
        stack.fly.clear_faults()
    assert stack.live_machines(app) == []
    assert stack.live_volumes(app) == []
    deletes = [
        r for r in stack.fly.request_log if r.method == "DELETE" and r.path.startswith(f"/v1/apps/{app}/")
    ]
    assert sum(1 for r in deletes if r.status >= 500) == 12
    assert any(r.status == 200 and "/volumes/" in r.path for r in deletes)


async def test_spec_change_during_provisioning_is_deferred_then_applied(stack: Stack, namespace: str) -> None:
    app = own_app(namespace)
    stack.fly.set_latency(1.0, route=f"POST /v1/apps/{app}/machines")
    try:
        async with watched(stack, namespace) as history:
            await stack.create_instance(namespace, "liam", flyApp=app)
            await stack.wait_instance(
                namespace,
                "liam",
                lambda b: status(b).get("phase") == "Provisioning" and "volumeId" in status(b),
                what="volume recorded, machine being created",
            )
            await stack.patch_instance(namespace, "liam", {"spec": {"image": NEW_IMAGE}})

            async def deferral() -> dict[str, Any] | None:
                busy = [b for b in history.of("liam") if condition(b, "Reconciling").get("reason") == "Busy"]
                return busy[0] if busy else None

            deferred = await eventually(deferral, what="Reconciling=Busy")
            assert condition(deferred, "Reconciling")["status"] == "True"
            assert status(deferred)["phase"] in BUSY
            assert condition(deferred, "Reconciling")["observedGeneration"] == 2
            assert status(deferred)["observedGeneration"] == 1
            done = await running(stack, namespace, "liam")
    finally:
        stack.fly.clear_latency()
    assert status(done)["observedGeneration"] == 2
    [machine] = stack.live_machines(app)
    assert machine["config"]["image"] == NEW_IMAGE
    reasons = [e["reason"] for e in await stack.events_with(namespace, "liam", "ActionDeferred")]
    assert reasons.count("ActionDeferred") == 1, reasons
    history.assert_consistent("liam")


@pytest.mark.xdist_group("operator-restart")
async def test_operator_crash_between_volume_create_and_status_write_adopts_the_volume(
    stack: Stack, namespace: str
) -> None:
    app = own_app(namespace)
    volumes_path = f"/v1/apps/{app}/volumes"
    # The create lands in Fly but its reply is lost; the operator's next look (the adoption listing) is
    # held long enough to kill it there, so the volume id never reaches the status.
    stack.fly.inject_faults(f"POST {volumes_path}", 503, count=1, apply_first=True)
    # 3 s: the crash must land inside that look even on a loaded machine (cleared before the restart).
    stack.fly.set_latency(3.0, route=f"GET {volumes_path}")
    try:
        body = await stack.create_instance(namespace, "mia", flyApp=app)

        async def create_landed() -> bool | None:
            # The volume itself, not an answered request: on the worker's shared flysim a create can be
            # refused (a region full of earlier tests' volumes) and still answered with the injected 503.
            return True if stack.live_volumes(app) else None

        await eventually(create_landed, timeout=10, what="the volume create")
        await stack.crash_operator()
    finally:
        stack.fly.clear_latency()
        stack.fly.clear_faults()
        at_crash = await stack.get_instance(namespace, "mia")
        await stack.start_operator()
    assert at_crash is not None and "volumeId" not in status(at_crash), "crash came too late"
    assert len(stack.live_volumes(app)) == 1, "the crashed operator's create landed"

    done = await running(stack, namespace, "mia", timeout=30)
    volumes = stack.live_volumes(app)
    assert [v["name"] for v in volumes] == [volume_name(body["spec"]["sandboxId"])]
    assert status(done)["volumeId"] == volumes[0]["id"]
    creates = [r for r in stack.fly.request_log if r.method == "POST" and r.path == volumes_path]
    assert len(creates) == 1, "the restarted operator adopted the volume instead of creating another"
    assert len(stack.live_machines(app)) == 1
