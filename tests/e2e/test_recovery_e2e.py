"""End-to-end unexpected-stop recovery stories (DESIGN 3.3): the real operator against kubesim and flysim.

Every story starts from a running instance (source machine and volume in ``iad``), makes its machine stop
unexpectedly (host failure or crash), and checks what Kubernetes and Fly look like afterwards. Fly requests
are observed as they arrive at flysim (``FlyTap``), so orderings such as "the old volume is deleted only
after the cutover is stored" are checked at the moment they happen, not inferred from polling.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from datetime import datetime
from typing import Any

import pytest
from prometheus_client import REGISTRY

from builders import sandbox_id as stack_sandbox_id
from flysim import FlyApiError
from harness import LogRecords, Stack, condition, eventually, status
from kiloclaw_operator.fly import volume_name
from kiloclaw_operator.models import INSTANCE_PLURAL
from kiloclaw_operator.recovery import TIMEOUT_MESSAGE

APP = "acct-test"
NAME = "r"  # short: the sandbox id (and so the Fly volume name) keeps the namespace's unique counter

# --- observing Fly and Kubernetes ---------------------------------------------------------------------


class FlyTap:
    """Sees every Fly request when it arrives at flysim (before latency and faults apply) and can run a
    callback at that moment (in flysim's thread). flysim has no public arrival hook; this wraps the one
    method every request passes first, and restores it on exit."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.arrivals: list[tuple[str, str, float]] = []
        self._callbacks: list[tuple[str, str, Callable[[], None]]] = []

    def on(self, method: str, path: str, callback: Callable[[], None]) -> None:
        self._callbacks.append((method, path, callback))

    def arrived(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.arrivals if m == method and p == path)

    def __enter__(self) -> FlyTap:
        fly = self.stack.fly
        original = fly._pick_latency_and_fault

        def observed(method: str, path: str) -> Any:
            self.arrivals.append((method, path, time.time()))
            for wanted_method, wanted_path, callback in list(self._callbacks):
                if wanted_method == method and wanted_path == path:
                    callback()
            return original(method, path)

        fly._pick_latency_and_fault = observed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.stack.fly._pick_latency_and_fault


@contextmanager
def replacement_machines_hang(stack: Stack) -> Iterator[None]:
    """Every machine created with a ``kiloclaw_recovery_id`` hangs in ``starting`` (a start that never
    completes); broken inside the create call, so no start can slip through first."""
    state = stack.fly.state
    original = state.create_machine

    def create(app_name: str, body: dict[str, Any]) -> Any:
        machine = original(app_name, body)
        if ((body.get("config") or {}).get("metadata") or {}).get("kiloclaw_recovery_id"):
            state.break_machine_start(machine.id, "hang")
        return machine

    state.create_machine = create  # type: ignore[method-assign]
    try:
        yield
    finally:
        del state.create_machine


class FlyCreates:
    """Every volume and machine create that flysim executes (or refuses) for one sandbox, in order: the
    request log cannot tell sandboxes apart, and other instances of the shared stack may recover at the same
    time (a host failure stops every machine on the host)."""

    def __init__(self, stack: Stack, namespace: str, name: str = NAME) -> None:
        self.stack = stack
        self.sandbox = sandbox_id(namespace, name)
        self.volume_name = volume_name(self.sandbox)
        self.calls: list[tuple[str, str, int, str | None]] = []  # (kind, region, status, id)

    def volumes(self) -> list[tuple[str, int]]:
        return [(region, code) for kind, region, code, _ in self.calls if kind == "volume"]

    def machines(self) -> list[tuple[str, int]]:
        return [(region, code) for kind, region, code, _ in self.calls if kind == "machine"]

    def created(self, kind: str) -> list[str]:
        return [id_ for k, _, code, id_ in self.calls if k == kind and code == 200 and id_]

    def __enter__(self) -> FlyCreates:
        state = self.stack.fly.state
        create_volume, create_machine = state.create_volume, state.create_machine

        def record(
            kind: str, call: Callable[[str, dict[str, Any]], Any], app: str, body: dict[str, Any]
        ) -> Any:
            region = str(body.get("region"))
            try:
                result = call(app, body)
            except FlyApiError as exc:
                self.calls.append((kind, region, exc.status, None))
                raise
            self.calls.append((kind, result.region, 200, result.id))
            return result

        def volume(app: str, body: dict[str, Any]) -> Any:
            if body.get("name") != self.volume_name:
                return create_volume(app, body)
            return record("volume", create_volume, app, body)

        def machine(app: str, body: dict[str, Any]) -> Any:
            metadata = (body.get("config") or {}).get("metadata") or {}
            if metadata.get("kiloclaw_sandbox_id") != self.sandbox:
                return create_machine(app, body)
            return record("machine", create_machine, app, body)

        state.create_volume = volume  # type: ignore[method-assign,assignment]
        state.create_machine = machine  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.stack.fly.state.create_volume
        del self.stack.fly.state.create_machine


def stored_status(stack: Stack, namespace: str, name: str = NAME) -> dict[str, Any]:
    """The instance's status as the API server holds it now (thread-safe: usable in FlyTap callbacks)."""
    body = stack.get_object_now(INSTANCE_PLURAL, namespace, name)
    return status(body) if body else {}


class History:
    """Every stored version of one instance, in order, from a watch: nothing is missed between polls."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def phases(self) -> list[str]:
        result: list[str] = []
        for body in self.bodies:
            phase = status(body).get("phase")
            if phase and (not result or result[-1] != phase):
                result.append(phase)
        return result

    def steps(self) -> list[str]:
        result: list[str] = []
        for body in self.bodies:
            step = (status(body).get("recovery") or {}).get("step")
            if step and (not result or result[-1] != step):
                result.append(step)
        return result

    def has_version(self, resource_version: str) -> bool:
        return any(b["metadata"]["resourceVersion"] == resource_version for b in self.bodies)


@asynccontextmanager
async def watch_instance(
    stack: Stack, namespace: str, since: dict[str, Any], name: str = NAME
) -> AsyncIterator[History]:
    history = History()
    params = {
        "watch": "true",
        "resourceVersion": since["metadata"]["resourceVersion"],
        "fieldSelector": f"metadata.name={name}",
        "timeoutSeconds": "300",
    }

    async def run() -> None:
        async with (
            stack.new_client(timeout=None) as client,
            client.stream("GET", stack.path(INSTANCE_PLURAL, namespace), params=params) as response,
        ):
            async for line in response.aiter_lines():
                if line.strip():
                    history.bodies.append(json.loads(line)["object"])

    task = asyncio.create_task(run())
    try:
        yield history
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def caught_up(history: History, body: dict[str, Any]) -> None:
    version = body["metadata"]["resourceVersion"]

    async def check() -> bool | None:
        return True if history.has_version(version) else None

    await eventually(check, timeout=5, what=f"watch reached resourceVersion {version}")


class AnalyticsRecords(LogRecords):
    """The ``kiloclaw.analytics`` records."""

    def events(self, namespace: str) -> list[str]:
        return [str(getattr(r, "event", r.getMessage())) for r in self.of(namespace)]


@pytest.fixture
def analytics() -> Iterator[AnalyticsRecords]:
    with AnalyticsRecords().capturing("kiloclaw.analytics") as handler:
        yield handler


def heal_hosts(stack: Stack) -> None:
    """Bring failed hosts back: the stack is shared by the tests of a worker, and three host failures in a
    region would leave it without a healthy host."""
    for region in stack.fly.state.regions:
        stack.fly.restore_host(region=region)


@pytest.fixture(autouse=True)
async def healthy_fly(stack: Stack) -> AsyncIterator[None]:
    yield
    stack.fly.clear_faults()
    stack.fly.clear_latency()
    for region in stack.fly.state.regions:
        stack.fly.restore_capacity(region)
    heal_hosts(stack)

    # A host failure also stops other tests' machines on that host: let their recoveries finish, so that
    # the next story's metrics and Fly calls are its own.
    async def quiet() -> bool | None:
        instances = await stack.list_all(INSTANCE_PLURAL)
        return None if any(status(i).get("recovery") for i in instances) else True

    await eventually(quiet, timeout=30, what="no instance recovering")


def field(record: logging.LogRecord, name: str) -> Any:
    """A structured field of a log record (passed as ``extra``)."""
    return record.__dict__.get(name)


def recoveries(outcome: str) -> float:
    """Recoveries with ``outcome``, whatever their reason."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "kiloclaw_recoveries"
        for sample in metric.samples
        if sample.name == "kiloclaw_recoveries_total" and sample.labels.get("outcome") == outcome
    )


def recovery_durations() -> float:
    return REGISTRY.get_sample_value("kiloclaw_recovery_duration_seconds_count") or 0.0


def fly_requests(stack: Stack, method: str, path: str) -> list[Any]:
    return [r for r in stack.fly.request_log if r.method == method and r.path == f"/v1/apps/{APP}/{path}"]


def live_volume_ids(stack: Stack, namespace: str, name: str = NAME) -> set[str]:
    return {v["id"] for v in stack.live_volumes(name=volume_name(sandbox_id(namespace, name)))}


def live_machine_ids(stack: Stack, namespace: str, name: str = NAME) -> set[str]:
    return {m["id"] for m in stack.live_machines(sandbox_id=sandbox_id(namespace, name))}


def sandbox_id(namespace: str, name: str = NAME) -> str:
    return stack_sandbox_id(namespace, name)


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- stories' building blocks ---------------------------------------------------------------------------


async def running_instance(stack: Stack, namespace: str, name: str = NAME, **spec: Any) -> dict[str, Any]:
    await stack.create_instance(namespace, name, **spec)
    body = await stack.wait_instance(
        namespace,
        name,
        lambda b: (
            status(b).get("phase") == "Running"
            and status(b).get("flyState") == "started"
            and condition(b, "Ready").get("status") == "True"
        ),
        what="Running and Ready",
    )
    # A region of the preference list: the first one unless earlier tests of this worker's shared flysim
    # filled its hosts, when falling through to the next is the designed behaviour (DESIGN 3.1).
    preference = spec.get("regions") or (stack.settings.default_regions if stack.settings else ["iad"])
    assert status(body)["region"] in preference
    return body


async def wait_recovered(
    stack: Stack, namespace: str, source_machine: str, name: str = NAME, timeout: float = 20
) -> dict[str, Any]:
    return await stack.wait_instance(
        namespace,
        name,
        lambda b: (
            status(b).get("phase") == "Running"
            and status(b).get("machineId") not in (None, source_machine)
            and not status(b).get("recovery")
            and (status(b).get("lastRecovery") or {}).get("outcome") == "Succeeded"
        ),
        timeout,
        what="recovered onto a replacement",
    )


async def wait_step(stack: Stack, namespace: str, step: str, name: str = NAME) -> dict[str, Any]:
    return await stack.wait_instance(
        namespace,
        name,
        lambda b: (status(b).get("recovery") or {}).get("step") == step,
        what=f"recovery step {step}",
    )


async def wait_failed(stack: Stack, namespace: str, name: str = NAME, timeout: float = 20) -> dict[str, Any]:
    return await stack.wait_instance(
        namespace,
        name,
        lambda b: (
            (status(b).get("lastRecovery") or {}).get("outcome") == "Failed"
            and status(b).get("phase") == "Stopped"
            and not status(b).get("recovery")
        ),
        timeout,
        what="recovery failed and cleaned up",
    )


async def wait_events(stack: Stack, namespace: str, *reasons: str, name: str = NAME) -> list[str]:
    async def check() -> list[str] | None:
        seen = await stack.event_reasons(namespace, name)
        return seen if all(r in seen for r in reasons) else None

    return await eventually(check, timeout=10, what=f"events {reasons}")


async def wait_analytics(records: AnalyticsRecords, namespace: str, event: str) -> logging.LogRecord:
    async def check() -> logging.LogRecord | None:
        return next((r for r in records.of(namespace) if getattr(r, "event", None) == event), None)

    return await eventually(check, timeout=10, what=f"analytics record {event}")


def assert_failed_cleanly(stack: Stack, namespace: str, body: dict[str, Any], source_volume: str) -> None:
    """After a failed recovery: no replacement resource anywhere, the source volume untouched, stalled."""
    st = status(body)
    assert live_volume_ids(stack, namespace) == {source_volume}
    assert not [
        m
        for m in stack.live_machines()
        if (m["config"].get("metadata") or {}).get("kiloclaw_recovery_id") == st["lastRecovery"]["id"]
    ]
    assert not fly_requests(stack, "DELETE", f"volumes/{source_volume}")
    assert st["volumeId"] == source_volume
    assert st["region"] == "iad"
    assert "pendingCleanup" not in st
    stalled = condition(body, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "RecoveryFailed")
    assert condition(body, "Ready")["status"] == "False"


# --- success ----------------------------------------------------------------------------------------------


async def test_a_crash_moves_the_sandbox_onto_a_fork_in_another_region_and_deletes_the_old_volume(
    stack: Stack, namespace: str, analytics: AnalyticsRecords
) -> None:
    body = await running_instance(stack, namespace)
    source = status(body)
    source_machine, source_volume = source["machineId"], source["volumeId"]
    status_at_old_volume_delete: list[dict[str, Any]] = []
    with FlyTap(stack) as tap, FlyCreates(stack, namespace) as creates:
        tap.on(
            "DELETE",
            f"/v1/apps/{APP}/volumes/{source_volume}",
            lambda: status_at_old_volume_delete.append(stored_status(stack, namespace)),
        )
        async with watch_instance(stack, namespace, body) as history:
            stack.fly.crash_machine(source_machine)
            done = await wait_recovered(stack, namespace, source_machine)
            await caught_up(history, done)

    st = status(done)
    assert history.phases() == ["Running", "Recovering", "Running"]
    assert history.steps() == [
        "Started",
        "SourceVolumeChecked",
        "SourceMachineDestroyed",
        "ReplacementVolumeCreated",
        "ReplacementMachineCreated",
        "ReplacementMachineStarted",
        "CutOver",
    ]
    # The replacement: a fork of the source, in another region than the failed one, with a new machine.
    assert st["region"] in ("ord", "cdg")
    assert st["volumeId"] != source_volume
    assert st["flyState"] == "started"
    assert condition(done, "Ready")["status"] == "True"
    assert live_volume_ids(stack, namespace) == {st["volumeId"]}
    assert live_machine_ids(stack, namespace) == {st["machineId"]}
    machine = stack.fly.machine(st["machineId"])
    assert machine["region"] == st["region"]
    assert machine["config"]["mounts"][0]["volume"] == st["volumeId"]
    assert machine["config"]["metadata"]["kiloclaw_recovery_id"] == st["lastRecovery"]["id"]
    assert machine["config"]["metadata"]["kiloclaw_sandbox_id"] == sandbox_id(namespace)
    assert stack.fly.volume(st["volumeId"])["region"] == st["region"]
    assert creates.created("volume") == [st["volumeId"]]
    assert creates.created("machine") == [st["machineId"]]
    # The old volume had no snapshots: deleted once, after the ownership check, after the stored cutover.
    deletes = fly_requests(stack, "DELETE", f"volumes/{source_volume}")
    assert len(deletes) == 1
    checks = [r for r in fly_requests(stack, "GET", f"volumes/{source_volume}") if r.at <= deletes[0].at]
    assert len(checks) >= 2  # step 2, and the ownership check right before the delete
    assert len(status_at_old_volume_delete) == 1
    at_delete = status_at_old_volume_delete[0]
    assert at_delete["volumeId"] == st["volumeId"] and at_delete["recovery"]["step"] == "CutOver"
    assert source_volume not in {v["id"] for v in stack.live_volumes()}
    assert stack.fly.machine(source_machine)["state"] in ("destroyed", "destroying")
    assert await stack.list_retained(namespace) == []
    # What a kubectl user sees.
    last = st["lastRecovery"]
    assert last["outcome"] == "Succeeded"
    assert last["durationSeconds"] > 0
    assert parse_time(last["startedAt"]) <= parse_time(last["finishedAt"])
    assert last.get("retainedVolume") is None
    assert last["id"] == history.bodies[-1]["status"]["lastRecovery"]["id"]
    # Events, analytics and metrics: once each, with the outcome.
    reasons = await wait_events(stack, namespace, "RecoveryStarted", "RecoverySucceeded")
    assert reasons.count("RecoveryStarted") == 1 and reasons.count("RecoverySucceeded") == 1
    assert "RecoveryFailed" not in reasons
    finished = await wait_analytics(analytics, namespace, "instance.unexpected_stop_recovery_succeeded")
    assert analytics.events(namespace) == [
        "instance.unexpected_stop_recovery_started",
        "instance.unexpected_stop_recovery_succeeded",
    ]
    assert field(finished, "durationMs") == int(last["durationSeconds"] * 1000)
    assert field(finished, "recovery_id") == last["id"]


async def test_an_old_volume_with_snapshots_is_kept_as_a_retained_volume_with_the_right_spec(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace)
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    stack.fly.add_snapshot(source_volume)
    stack.fly.crash_machine(source_machine)
    done = await wait_recovered(stack, namespace, source_machine)
    finished = time.time()

    st = status(done)
    retained = await stack.list_retained(namespace)
    assert len(retained) == 1
    kcrv = retained[0]
    spec = kcrv["spec"]
    assert kcrv["metadata"]["name"] == st["lastRecovery"]["retainedVolume"]
    assert kcrv["metadata"]["labels"] == {"kiloclaw.kilo.ai/instance": NAME}
    assert not kcrv["metadata"].get("ownerReferences")
    assert spec["volumeId"] == source_volume
    assert spec["sandboxId"] == sandbox_id(namespace)
    assert spec["instanceName"] == NAME
    assert spec["flyApp"] == APP
    assert spec["region"] == "iad"
    assert spec["reason"] == "UnexpectedStopRecovery"
    assert spec["recoveryId"] == st["lastRecovery"]["id"]
    assert spec.get("deleteNow", False) is False
    retention = stack.settings.retention_seconds if stack.settings else 3600
    assert abs(parse_time(spec["retainUntil"]).timestamp() - (finished + retention)) < 10
    # The old volume stays in Fly, untouched; the instance lives on the replacement.
    assert source_volume in {v["id"] for v in stack.live_volumes()}
    assert not fly_requests(stack, "DELETE", f"volumes/{source_volume}")
    assert live_volume_ids(stack, namespace) == {source_volume, st["volumeId"]}
    reasons = await wait_events(stack, namespace, "RetainedVolumeCreated", "RecoverySucceeded")
    assert reasons.count("RetainedVolumeCreated") == 1


async def test_an_old_volume_attached_to_a_foreign_machine_is_not_deleted_but_retained_for_a_retry(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace)
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    foreign: list[str] = []

    def attach_foreign_machine() -> None:
        if foreign:
            return
        machine = stack.fly.state.create_machine(
            APP,
            {
                "region": "iad",
                "config": {
                    "image": "someone/else:1",
                    "mounts": [{"volume": source_volume, "path": "/data"}],
                    "metadata": {"kiloclaw_sandbox_id": "ki_someone_else"},
                },
            },
        )
        foreign.append(machine.id)

    with FlyTap(stack) as tap:
        # Right when the old volume is about to be disposed of, someone else's machine mounts it.
        tap.on("GET", f"/v1/apps/{APP}/volumes/{source_volume}/snapshots", attach_foreign_machine)
        stack.fly.crash_machine(source_machine)
        done = await wait_recovered(stack, namespace, source_machine)

    assert foreign
    assert foreign[0] in {m["id"] for m in stack.live_machines()}
    assert source_volume in {v["id"] for v in stack.live_volumes()}
    assert not fly_requests(stack, "DELETE", f"machines/{foreign[0]}")
    assert not fly_requests(stack, "DELETE", f"volumes/{source_volume}")
    retained = await stack.list_retained(namespace)
    assert [r["spec"]["volumeId"] for r in retained] == [source_volume]
    # Expires at once, so the retained-volume controller retries the ownership-checked delete.
    assert parse_time(retained[0]["spec"]["retainUntil"]).timestamp() <= time.time() + 1
    assert status(done)["lastRecovery"]["retainedVolume"] == retained[0]["metadata"]["name"]
    stack.fly.state.destroy_machine(APP, foreign[0], force=True)


# --- regions and capacity --------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity_status", [412, 409])
async def test_with_two_regions_the_source_region_is_used_last_when_the_other_has_no_capacity(
    stack: Stack, namespace: str, capacity_status: int
) -> None:
    body = await running_instance(stack, namespace, regions=["iad", "ord"])
    source_machine = status(body)["machineId"]
    stack.fly.exhaust_capacity("ord", "volumes", status=capacity_status)
    try:
        with FlyCreates(stack, namespace) as creates:
            stack.fly.crash_machine(source_machine)
            done = await wait_recovered(stack, namespace, source_machine)
    finally:
        stack.fly.restore_capacity("ord")
    st = status(done)
    assert st["region"] == "iad"
    assert creates.volumes() == [("ord", capacity_status), ("iad", 200)]


async def test_a_candidate_region_without_capacity_is_skipped_for_the_next(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace, regions=["iad", "ord", "cdg"])
    source_machine = status(body)["machineId"]
    stack.fly.exhaust_capacity("ord", "volumes")
    try:
        with FlyCreates(stack, namespace) as creates:
            stack.fly.crash_machine(source_machine)
            done = await wait_recovered(stack, namespace, source_machine)
    finally:
        stack.fly.restore_capacity("ord")
    assert status(done)["region"] == "cdg"
    # Whichever candidate came first, an exhausted one was passed over for the next.
    assert creates.volumes() in ([("cdg", 200)], [("ord", 412), ("cdg", 200)])


async def test_when_no_candidate_region_has_capacity_the_recovery_fails_without_trying_the_failed_region(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace, regions=["iad", "ord", "cdg"])
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    stack.fly.exhaust_capacity("ord", "volumes")
    stack.fly.exhaust_capacity("cdg", "volumes")
    try:
        with FlyCreates(stack, namespace) as creates:
            stack.fly.crash_machine(source_machine)
            failed = await wait_failed(stack, namespace)
    finally:
        stack.fly.restore_capacity("ord")
        stack.fly.restore_capacity("cdg")
    assert sorted(creates.volumes()) == [("cdg", 412), ("ord", 412)]
    assert "no capacity" in status(failed)["lastRecovery"]["message"]
    assert_failed_cleanly(stack, namespace, failed, source_volume)


# --- what does and does not trigger ----------------------------------------------------------------------


def set_fly_state(stack: Stack, machine_id: str, state: str) -> None:
    """Make Fly report ``state`` for a machine; flysim has no control for states other than host failure,
    crash and broken starts, so this moves its state machine directly (under its lock)."""
    sim = stack.fly.state
    with sim.lock:
        sim._touch(sim.find_machine(machine_id), state)


async def observed_again(stack: Stack, machine_id: str, times: int = 3) -> None:
    """Wait until the operator has looked at the machine ``times`` more times."""
    path = f"/v1/apps/{APP}/machines/{machine_id}"
    before = len([r for r in stack.fly.request_log if r.method == "GET" and r.path == path])

    async def check() -> bool | None:
        seen = len([r for r in stack.fly.request_log if r.method == "GET" and r.path == path])
        return True if seen >= before + times else None

    await eventually(check, timeout=10, what=f"{times} more observations of {machine_id}")


@pytest.mark.parametrize("fly_state", ["created", "starting", "stopping"])
async def test_created_and_transient_fly_states_do_not_trigger_a_recovery(
    stack: Stack, namespace: str, fly_state: str
) -> None:
    body = await running_instance(stack, namespace)
    machine_id = status(body)["machineId"]
    set_fly_state(stack, machine_id, fly_state)
    try:
        await stack.wait_instance(
            namespace, NAME, lambda b: status(b).get("flyState") == fly_state, what=f"flyState {fly_state}"
        )
        await observed_again(stack, machine_id)
        current = await stack.get_instance(namespace, NAME)
        assert current is not None
        assert status(current)["phase"] == "Running"
        assert "recovery" not in status(current)
        assert "RecoveryStarted" not in await stack.event_reasons(namespace, NAME)
    finally:
        set_fly_state(stack, machine_id, "started")


async def test_a_failed_machine_settles_in_stopped_without_a_recovery(stack: Stack, namespace: str) -> None:
    body = await running_instance(stack, namespace)
    machine_id = status(body)["machineId"]
    set_fly_state(stack, machine_id, "failed")
    stopped = await stack.wait_phase(namespace, NAME, "Stopped")
    assert status(stopped)["machineId"] == machine_id
    assert "recovery" not in status(stopped) and "lastRecovery" not in status(stopped)
    assert "RecoveryStarted" not in await stack.event_reasons(namespace, NAME)
    assert live_volume_ids(stack, namespace) == {status(body)["volumeId"]}


async def test_one_unexpected_stop_starts_exactly_one_recovery_however_often_it_is_seen(
    stack: Stack, namespace: str, analytics: AnalyticsRecords
) -> None:
    body = await running_instance(stack, namespace)
    source_machine = status(body)["machineId"]
    succeeded, failed, durations = recoveries("succeeded"), recoveries("failed"), recovery_durations()
    stack.fly.set_latency(1.0, route="GET /v1/apps/*/machines/*/wait")
    with FlyCreates(stack, namespace) as creates:
        stack.fly.crash_machine(source_machine)
        await wait_step(stack, namespace, "ReplacementMachineCreated")
        # Wake the driver while it recovers (watch events) while the old machine still reports `stopped`.
        await stack.patch_instance(namespace, NAME, {"metadata": {"labels": {"poke": "1"}}})
        await stack.patch_instance(namespace, NAME, {"metadata": {"labels": {"poke": "2"}}})
        stack.fly.clear_latency()
        done = await wait_recovered(stack, namespace, source_machine)
    assert creates.created("volume") == [status(done)["volumeId"]]
    assert creates.created("machine") == [status(done)["machineId"]]
    assert live_machine_ids(stack, namespace) == {status(done)["machineId"]}
    reasons = await wait_events(stack, namespace, "RecoverySucceeded")
    assert reasons.count("RecoveryStarted") == 1
    assert reasons.count("RecoverySucceeded") == 1
    await wait_analytics(analytics, namespace, "instance.unexpected_stop_recovery_succeeded")
    assert analytics.events(namespace) == [
        "instance.unexpected_stop_recovery_started",
        "instance.unexpected_stop_recovery_succeeded",
    ]
    assert recoveries("succeeded") == succeeded + 1
    assert recoveries("failed") == failed
    assert recovery_durations() == durations + 1


# --- while recovering -----------------------------------------------------------------------------------


async def test_only_the_recovery_touches_the_replacement_volume_and_deleting_the_instance_leaves_nothing(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace)
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    with replacement_machines_hang(stack):
        stack.fly.crash_machine(source_machine)
        held = await wait_step(stack, namespace, "ReplacementMachineCreated")
        record = status(held)["recovery"]
        replacement_volume = record["replacementVolumeId"]
        wait_path = f"machines/{record['replacementMachineId']}/wait"

        async def waited_twice() -> bool | None:
            return True if len(fly_requests(stack, "GET", wait_path)) >= 2 else None

        await eventually(waited_twice, timeout=10, what="two wait calls on the replacement machine")
        current = await stack.get_instance(namespace, NAME)
        assert current is not None
        st = status(current)
        assert st["phase"] == "Recovering"
        assert st["volumeId"] == source_volume and st["machineId"] == source_machine
        touches = [r for r in stack.fly.request_log if replacement_volume in r.path]
        # Only the recovery itself looked it up (to place the machine in its region).
        assert [(r.method, r.path) for r in touches] == [
            ("GET", f"/v1/apps/{APP}/volumes/{replacement_volume}")
        ]

        await stack.delete_instance(namespace, NAME)
        await stack.wait_gone(namespace, NAME)
    assert live_volume_ids(stack, namespace) == set()
    assert live_machine_ids(stack, namespace) == set()
    assert await stack.list_retained(namespace) == []


async def test_deleting_an_instance_after_the_cutover_leaves_only_the_retained_old_volume(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace)
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    stack.fly.add_snapshot(source_volume)
    stack.fly.set_latency(1.0, route=f"GET /v1/apps/*/volumes/{source_volume}/snapshots")
    try:
        stack.fly.crash_machine(source_machine)
        await wait_step(stack, namespace, "CutOver")
        await stack.delete_instance(namespace, NAME)
        await stack.wait_gone(namespace, NAME, timeout=20)
    finally:
        stack.fly.clear_latency()
    assert live_machine_ids(stack, namespace) == set()
    assert live_volume_ids(stack, namespace) == {source_volume}
    retained = await stack.list_retained(namespace)
    assert [r["spec"]["volumeId"] for r in retained] == [source_volume]


# --- failure ---------------------------------------------------------------------------------------------


async def test_a_replacement_that_never_starts_is_removed_at_the_deadline_and_the_retry_annotation_acts_again(
    stack: Stack, namespace: str, analytics: AnalyticsRecords
) -> None:
    body = await running_instance(stack, namespace)
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    failed_before, durations = recoveries("failed"), recovery_durations()
    await stack.restart_operator(recovery_timeout_seconds=2)
    try:
        with replacement_machines_hang(stack):
            stack.fly.crash_machine(source_machine)
            held = await wait_step(stack, namespace, "ReplacementMachineCreated")
            replacement = status(held)["recovery"]
            failed = await wait_failed(stack, namespace)
    finally:
        await stack.restart_operator()

    st = status(failed)
    last = st["lastRecovery"]
    assert last["message"] == TIMEOUT_MESSAGE
    assert last["outcome"] == "Failed"
    assert 2 <= last["durationSeconds"] < 10
    assert condition(failed, "Stalled")["message"] == TIMEOUT_MESSAGE
    assert st.get("machineId") is None
    assert stack.fly.machine(replacement["replacementMachineId"])["state"] in ("destroyed", "destroying")
    assert replacement["replacementVolumeId"] not in {v["id"] for v in stack.live_volumes()}
    assert_failed_cleanly(stack, namespace, failed, source_volume)
    reasons = await wait_events(stack, namespace, "RecoveryFailed")
    assert reasons.count("RecoveryStarted") == 1 and reasons.count("RecoveryFailed") == 1
    assert "RecoverySucceeded" not in reasons
    record = await wait_analytics(analytics, namespace, "instance.unexpected_stop_recovery_failed")
    assert (field(record, "label"), field(record, "error")) == ("timeout", TIMEOUT_MESSAGE)
    assert recoveries("failed") == failed_before + 1
    assert recovery_durations() == durations + 1

    # No automatic retry; a changed retry annotation starts a new recovery attempt (new id) from the source
    # volume — never a plain start on the old volume, which may sit on a dead host.
    current = await stack.get_instance(namespace, NAME)
    assert current is not None and status(current)["phase"] == "Stopped"
    with FlyCreates(stack, namespace) as creates:
        await stack.patch_instance(
            namespace, NAME, {"metadata": {"annotations": {"kiloclaw.kilo.ai/retry": "1"}}}
        )
        running = await wait_recovered(stack, namespace, source_machine)
    st = status(running)
    assert st["lastRecovery"]["id"] != last["id"]
    assert st["volumeId"] != source_volume and st["region"] != "iad"
    assert condition(running, "Stalled")["status"] == "False"
    assert [code for _, code in creates.volumes()] == [200] and [code for _, code in creates.machines()] == [
        200
    ]
    assert "iad" not in [region for region, _ in creates.machines()]
    reasons = await wait_events(stack, namespace, "RecoverySucceeded")
    assert reasons.count("RecoveryStarted") == 2


FLY_STEP_FAULTS = {
    # step: (method, path template, status, apply_first: the request lands but the reply is lost)
    "2 GET source volume": ("GET", "volumes/{source_volume}", 422, False),
    "3 destroy source machine": ("DELETE", "machines/{source_machine}", 422, False),
    "4 fork volume": ("POST", "volumes", 422, False),
    "4 fork volume, reply lost": ("POST", "volumes", 422, True),
    "5 create machine": ("POST", "machines", 422, False),
    "5 create machine, reply lost": ("POST", "machines", 422, True),
}


@pytest.mark.parametrize("step", list(FLY_STEP_FAULTS))
async def test_a_permanent_fly_error_at_any_step_fails_the_recovery_without_leaving_a_replacement_resource(
    stack: Stack, namespace: str, step: str, analytics: AnalyticsRecords
) -> None:
    method, template, fault_status, apply_first = FLY_STEP_FAULTS[step]
    body = await running_instance(stack, namespace)
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    path = template.format(source_volume=source_volume, source_machine=source_machine)
    failed_before = recoveries("failed")
    # A permanent error is permanent: the source volume is read twice (the source choice before the recovery
    # begins, then step 2), so the fault answers both reads.
    count = 2 if method == "GET" else 1
    stack.fly.inject_faults(
        f"{method} /v1/apps/{APP}/{path}", fault_status, count=count, apply_first=apply_first
    )
    try:
        stack.fly.crash_machine(source_machine)
        failed = await wait_failed(stack, namespace)
    finally:
        stack.fly.clear_faults()
    assert_failed_cleanly(stack, namespace, failed, source_volume)
    assert live_machine_ids(stack, namespace) <= {source_machine}
    assert str(fault_status) in status(failed)["lastRecovery"]["message"]
    record = await wait_analytics(analytics, namespace, "instance.unexpected_stop_recovery_failed")
    assert field(record, "label") == "step_failed"
    assert recoveries("failed") == failed_before + 1
    reasons = await wait_events(stack, namespace, "RecoveryFailed")
    assert reasons.count("RecoveryFailed") == 1


async def test_a_replacement_volume_that_cannot_be_deleted_is_kept_in_pending_cleanup_and_removed_later(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace)
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    stack.fly.inject_faults(f"POST /v1/apps/{APP}/machines", 422, count=1)
    stack.fly.inject_faults(f"DELETE /v1/apps/{APP}/volumes/*", 422, count=1)
    async with watch_instance(stack, namespace, body) as history:
        with FlyCreates(stack, namespace) as creates:
            stack.fly.crash_machine(source_machine)
            cleaned = await stack.wait_instance(
                namespace,
                NAME,
                lambda b: (
                    (status(b).get("lastRecovery") or {}).get("outcome") == "Failed"
                    and "pendingCleanup" not in status(b)
                ),
                what="failed recovery with its cleanup finished",
            )
            await caught_up(history, cleaned)
    [replacement_volume] = creates.created("volume")
    pending = [status(b)["pendingCleanup"] for b in history.bodies if status(b).get("pendingCleanup")]
    assert pending and pending[0] == {"volumeId": replacement_volume}
    # Never retried while the recovery was in flight: the pending id appears only once it is over.
    assert all(not status(b).get("recovery") for b in history.bodies if status(b).get("pendingCleanup"))
    assert live_volume_ids(stack, namespace) == {source_volume}
    assert_failed_cleanly(stack, namespace, cleaned, source_volume)


# --- transient Fly faults never fail a recovery (issue 10) -----------------------------------------------

TRANSIENT_STEP_FAULTS = {
    # name: (method, path template, status, count, apply_first: the request lands but the reply is lost)
    "2 GET source volume, five 429s in a row": ("GET", "volumes/{source_volume}", 429, 5, False),
    "3 destroy source machine, 503s": ("DELETE", "machines/{source_machine}", 503, 5, False),
    "4 fork volume 503": ("POST", "volumes", 503, 1, False),
    "4 fork volume 408": ("POST", "volumes", 408, 1, False),
    "4 fork volume 429": ("POST", "volumes", 429, 1, False),
    "4 fork volume, reply lost": ("POST", "volumes", 503, 1, True),
    "5 create machine 503": ("POST", "machines", 503, 1, False),
    "5 create machine 429": ("POST", "machines", 429, 1, False),
    "5 create machine, reply lost": ("POST", "machines", 503, 1, True),
    "6 wait for the machine, 503s": ("GET", "machines/*/wait", 503, 5, False),
}


@pytest.mark.parametrize("step", list(TRANSIENT_STEP_FAULTS))
async def test_a_transient_fly_error_at_any_step_is_retried_and_the_recovery_succeeds_without_twins(
    stack: Stack, namespace: str, step: str
) -> None:
    method, template, fault_status, count, apply_first = TRANSIENT_STEP_FAULTS[step]
    body = await running_instance(stack, namespace)
    source_machine, source_volume = status(body)["machineId"], status(body)["volumeId"]
    path = template.format(source_volume=source_volume, source_machine=source_machine)
    failed_before = recoveries("failed")
    stack.fly.inject_faults(
        f"{method} /v1/apps/{APP}/{path}",
        fault_status,
        count=count,
        apply_first=apply_first,
        retry_after=0.05 if fault_status == 429 else None,
    )
    with FlyCreates(stack, namespace) as creates:
        stack.fly.crash_machine(source_machine)
        done = await wait_recovered(stack, namespace, source_machine)
    st = status(done)
    assert recoveries("failed") == failed_before
    assert condition(done, "Stalled")["status"] == "False"
    # Creates are retried safely: a create whose reply was lost is adopted, never repeated.
    assert creates.created("volume") == [st["volumeId"]]
    assert creates.created("machine") == [st["machineId"]]
    assert live_volume_ids(stack, namespace) == {st["volumeId"]}
    assert live_machine_ids(stack, namespace) == {st["machineId"]}


@pytest.mark.parametrize("watch_echo", ["prompt", "slow"])
async def test_a_spec_change_while_recovering_is_announced_as_busy_once_and_applied_after_the_cutover(
    stack: Stack, namespace: str, watch_echo: str
) -> None:
    if watch_echo == "slow":
        # The echo of the operator's own status writes arrives after the spec change's event (as on a real
        # API server): the announcement must still be made once.
        stack.kube.watch_delay = 0.3
    body = await running_instance(stack, namespace)
    source_machine = status(body)["machineId"]
    # Slow creates keep the recovery in flight long enough to see the announcement (no timing asserted).
    stack.fly.set_latency(1.0, route=f"POST /v1/apps/{APP}/volumes")
    stack.fly.set_latency(1.0, route=f"POST /v1/apps/{APP}/machines")
    async with watch_instance(stack, namespace, body) as history:
        stack.fly.crash_machine(source_machine)
        await wait_step(stack, namespace, "SourceMachineDestroyed")
        changed = await stack.patch_instance(namespace, NAME, {"spec": {"env": {"TZ": "UTC", "NEW": "1"}}})
        generation = changed["metadata"]["generation"]
        busy = await stack.wait_instance(
            namespace,
            NAME,
            lambda b: condition(b, "Reconciling").get("reason") == "Busy",
            what="Reconciling Busy",
        )
        assert status(busy)["phase"] == "Recovering"
        assert condition(busy, "Reconciling")["status"] == "True"
        done = await stack.wait_instance(
            namespace,
            NAME,
            lambda b: (
                status(b).get("observedGeneration") == generation
                and status(b).get("phase") == "Running"
                and condition(b, "Ready").get("status") == "True"
                and not status(b).get("recovery")
            ),
            what="recovered and the new generation applied",
        )
        await caught_up(history, done)
    assert stack.fly.machine(status(done)["machineId"])["config"]["env"]["NEW"] == "1"
    assert status(done)["machineId"] != source_machine
    reasons = [e["reason"] for e in await stack.events_with(namespace, NAME, "ActionDeferred")]
    assert reasons.count("ActionDeferred") == 1
    # observedGeneration never claimed the deferred generation before it was acted on.
    assert all(
        status(b).get("observedGeneration") != generation
        for b in history.bodies
        if status(b).get("phase") == "Recovering"
    )


@pytest.mark.slow  # waits out a failing recovery
async def test_a_spec_change_deferred_during_a_recovery_that_fails_is_not_lost_it_starts_a_new_attempt(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace)
    # 5 s: the spec change must land while the first attempt is still in flight, even on a loaded machine.
    await stack.restart_operator(recovery_timeout_seconds=5)
    try:
        with replacement_machines_hang(stack):
            stack.fly.crash_machine(status(body)["machineId"])
            await wait_step(stack, namespace, "ReplacementMachineCreated")
            changed = await stack.patch_instance(namespace, NAME, {"spec": {"env": {"TZ": "UTC"}}})
            generation = changed["metadata"]["generation"]

            async def two_attempts_failed() -> list[str] | None:
                reasons = await stack.event_reasons(namespace, NAME)
                return reasons if reasons.count("RecoveryFailed") >= 2 else None

            reasons = await eventually(two_attempts_failed, timeout=30, what="a second attempt, failed too")
    finally:
        await stack.restart_operator()
    assert reasons.count("RecoveryStarted") == 2
    assert reasons.count("ActionDeferred") == 1
    final = await wait_failed(stack, namespace)
    assert status(final)["observedGeneration"] == generation  # acted on by the second attempt
    assert condition(final, "Stalled")["reason"] == "RecoveryFailed"


async def test_a_recovery_under_twenty_percent_transient_fly_faults_succeeds(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace)
    source_machine = status(body)["machineId"]
    for fault, extra in ((503, {}), (429, {"retry_after": 0.05}), (408, {})):
        stack.fly.inject_faults(f"* /v1/apps/{APP}/**", fault, rate=0.07, **extra)  # type: ignore[arg-type]
    stack.fly.inject_faults(f"POST /v1/apps/{APP}/**", 503, rate=0.05, apply_first=True)  # lost replies
    with FlyCreates(stack, namespace) as creates:
        stack.fly.crash_machine(source_machine)
        done = await wait_recovered(stack, namespace, source_machine, timeout=40)
    stack.fly.clear_faults()
    st = status(done)
    assert creates.created("volume") == [st["volumeId"]]
    assert creates.created("machine") == [st["machineId"]]
    assert "RecoveryFailed" not in await stack.event_reasons(namespace, NAME)


async def test_a_recovery_in_flight_holds_no_place_among_the_passes_of_settled_instances(
    stack: Stack, namespace: str
) -> None:
    # One place for the passes over settled instances: the first instance's stop is handled in a pass that
    # began as one of them, and its recovery (slowed by a slow fork) must not keep the second one waiting.
    await stack.restart_operator(pass_concurrency=1)
    try:
        first = await running_instance(stack, namespace, "first")
        second = await running_instance(stack, namespace, "second")
        stack.fly.set_latency(6.0, route=f"POST /v1/apps/{APP}/volumes")
        stack.fly.crash_machine(status(first)["machineId"])
        await stack.wait_phase(namespace, "first", "Recovering")
        stack.fly.crash_machine(status(second)["machineId"])
        await stack.wait_phase(namespace, "second", "Recovering")
        still = await stack.get_instance(namespace, "first")
        assert still is not None and status(still)["phase"] == "Recovering", "the second waited for the first"
    finally:
        stack.fly.clear_latency()
        await stack.restart_operator()
