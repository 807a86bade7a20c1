"""The driver's hold on the newest body, without I/O: which body it keeps, and what it keeps of it."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest

from builders import instance_body
from harness import eventually
from kiloclaw_operator.driving import Admission, Context, DriverRegistry, ObjectDriver, PassGate
from kiloclaw_operator.metrics import ObjectsCollector, instance_tally
from kiloclaw_operator.models import ObjectRef
from kiloclaw_operator.observe.wiring import EarlyPasses


class _Driver(ObjectDriver[Any]):
    def read(self, body: dict[str, Any]) -> Any:
        return SimpleNamespace(deleting=False, body=body)

    def log_fields(self, obj: Any) -> dict[str, Any]:
        return {}

    async def patch_status(self, ref: ObjectRef, patch: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("no writes here")

    def recheck_delay(self) -> float:
        return 1.0

    async def reconcile(self, obj: Any) -> float:
        return 1.0

    def tally(self, body: dict[str, Any]) -> tuple[Any, ...]:
        return instance_tally(body)


def _body(resource_version: str, generation: int = 1, **metadata: Any) -> dict[str, Any]:
    meta = {"resourceVersion": resource_version, "generation": generation, **metadata}
    return instance_body("a", "ns", metadata=meta, status={"phase": "Running"})


def _driver() -> _Driver:
    return _Driver("ns", "a", ctx=cast(Context, None))


def test_the_server_side_apply_bookkeeping_of_a_body_is_not_kept() -> None:
    driver = _driver()
    managed = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    assert driver.offer(_body("5", managedFields=managed))
    assert driver.latest is not None
    assert "managedFields" not in driver.latest["metadata"]
    assert driver.latest["metadata"]["resourceVersion"] == "5"


def test_an_older_body_never_replaces_a_newer_one_and_only_new_work_asks_for_a_pass() -> None:
    driver = _driver()
    assert driver.offer(_body("5"))
    assert not driver.offer(_body("4", generation=2)), "older than what is kept"
    assert driver.latest is not None and driver.latest["metadata"]["generation"] == 1
    assert not driver.offer(_body("6")), "a newer body with the same generation is no new work"
    assert driver.offer(_body("7", generation=2))


def test_the_watch_event_of_a_version_already_kept_is_not_encoded_again() -> None:
    """Our own write's response is kept at once; the watch event of the same write, which follows it, is
    the same stored object (its resourceVersion) and leaves the kept body as it is."""
    driver = _driver()
    driver.offer(_body("5"))
    assert driver.offer(_body("8", generation=2), own_write=True)
    kept = driver._body
    assert not driver.offer(_body("8", generation=2)), "the event of our own write is no news"
    assert driver._body is kept, "the same version was encoded again"


class _Counting(_Driver):
    """Counts its passes; the first ``failures`` of them raise what no pass handles."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__("ns", "a", ctx=cast(Context, None))
        self.passes = 0
        self.failures = failures

    async def reconcile(self, obj: Any) -> float:
        self.passes += 1
        if self.passes <= self.failures:
            raise RuntimeError("a bug in a pass")
        return 3600.0


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async def holds() -> bool | None:
        return True if check() else None

    await eventually(holds, timeout=timeout)


async def test_a_running_driver_passes_once_then_sleeps_and_a_wake_up_gives_one_more_pass() -> None:
    driver = _Counting()
    registry = DriverRegistry(lambda namespace, name: driver)
    assert registry.running("ns", "a") is driver
    driver.offer(_body("1"))
    driver.wake()
    await _until(lambda: driver.passes == 1)
    assert registry.running("ns", "a") is driver, "one loop per object"
    driver.wake()
    await _until(lambda: driver.passes == 2)
    await registry.aclose()


async def test_closing_the_registry_ends_every_loop_at_once() -> None:
    drivers = {name: _Counting() for name in "abc"}
    registry = DriverRegistry(lambda namespace, name: drivers[name])
    for name, driver in drivers.items():
        registry.running("ns", name)
        driver.offer(_body("1"))
        driver.wake()
    await _until(lambda: all(d.passes == 1 for d in drivers.values()))
    async with asyncio.timeout(1):
        await registry.aclose()
    assert all(d.stopping() for d in drivers.values())
    assert registry._loops == {}


async def test_a_loop_whose_pass_fails_unexpectedly_is_restarted() -> None:
    driver = _Counting(failures=1)
    registry = DriverRegistry(lambda namespace, name: driver)
    driver.offer(_body("1"))
    registry.running("ns", "a")
    await _until(lambda: driver.passes == 2, timeout=10)
    await registry.aclose()


async def test_a_forgotten_object_ends_its_loop() -> None:
    driver = _Counting()
    registry = DriverRegistry(lambda namespace, name: driver)
    driver.offer(_body("1"))
    registry.running("ns", "a")
    await _until(lambda: driver.passes == 1)
    registry.forget("ns", "a")
    await _until(lambda: registry._loops == {})


class _Admitted(_Driver):
    """Passes under a shared admission; driver "a"'s pass steps aside until the driver is asked to stop."""

    def __init__(self, name: str, gate: asyncio.Semaphore) -> None:
        super().__init__("ns", name, ctx=cast(Context, None))
        self.gate = gate
        self.passes = 0
        self.aside_entered = False
        self.stopped_while_aside = False
        self.finished = False

    def admission(self, body: dict[str, Any], urgent: bool) -> Admission | None:
        return self.gate

    async def reconcile(self, obj: Any) -> float:
        self.passes += 1
        if self.name == "a":
            interrupted = asyncio.Event()
            async with self.aside(interrupted.set) as stopping:
                self.aside_entered = True
                await interrupted.wait()
                self.stopped_while_aside = stopping()
            self.finished = True
        return 3600.0


async def test_a_pass_waiting_aside_gives_its_admission_to_another_pass_and_a_stop_ends_its_wait() -> None:
    gate = asyncio.Semaphore(1)
    registry: DriverRegistry[_Admitted] = DriverRegistry(lambda namespace, name: _Admitted(name, gate))
    try:
        a = registry.running("ns", "a")
        a.offer(_body("1"))
        await _until(lambda: a.aside_entered)
        b = registry.running("ns", "b")
        b.offer(_body("1"))
        await _until(lambda: b.passes == 1)  # the only place was a's: it gave it up while waiting
        a.stop()
        await _until(lambda: a.finished)
        assert a.stopped_while_aside
    finally:
        await registry.aclose()
    assert not gate.locked(), "every place taken was given back"


class _Holding(_Admitted):
    """Driver "a" steps aside until stopped; "b"'s pass holds the admission until it is released."""

    def __init__(self, name: str, gate: asyncio.Semaphore, release: asyncio.Event) -> None:
        super().__init__(name, gate)
        self.release = release

    async def reconcile(self, obj: Any) -> float:
        if self.name == "b":
            self.passes += 1
            await self.release.wait()
            return 3600.0
        return await super().reconcile(obj)


async def test_a_pass_whose_wait_aside_ended_finishes_without_waiting_for_an_admission_again() -> None:
    # Taken back, the admission was waited for behind every new pass, each waiting pass holding its models:
    # thousands at once when 10,000 instances were provisioned.
    gate, release = asyncio.Semaphore(1), asyncio.Event()
    registry: DriverRegistry[_Holding] = DriverRegistry(lambda namespace, name: _Holding(name, gate, release))
    try:
        a, b = registry.running("ns", "a"), registry.running("ns", "b")
        a.offer(_body("1"))
        await _until(lambda: a.aside_entered)
        b.offer(_body("1"))
        await _until(lambda: b.passes == 1)
        assert gate.locked(), "b holds the only admission"
        a.stop()
        await _until(lambda: a.finished)
        assert gate.locked() and not release.is_set()
    finally:
        release.set()
        await registry.aclose()
    assert not gate.locked(), "every place taken was given back"


class _Waiting(_Admitted):
    """Drivers "a" and "c" step aside until stopped; the waiting room has one place."""

    def __init__(self, name: str, gate: asyncio.Semaphore, room: asyncio.Semaphore) -> None:
        super().__init__(name, gate)
        self.room = room

    def waiting_room(self, gate: Admission) -> asyncio.Semaphore | None:
        return self.room

    async def reconcile(self, obj: Any) -> float:
        self.passes += 1
        if self.name in ("a", "c"):
            interrupted = asyncio.Event()
            async with self.aside(interrupted.set):
                self.aside_entered = True
                await interrupted.wait()
        return 3600.0


async def test_past_the_waiting_rooms_places_a_waiting_pass_keeps_its_admission() -> None:
    gate, room = asyncio.Semaphore(1), asyncio.Semaphore(1)
    registry: DriverRegistry[_Waiting] = DriverRegistry(lambda namespace, name: _Waiting(name, gate, room))
    try:
        a, c, b = (registry.running("ns", name) for name in "acb")
        a.offer(_body("1"))
        await _until(lambda: a.aside_entered)
        c.offer(_body("1"))
        await _until(lambda: c.aside_entered)  # a lent its admission to c ...
        assert room.locked() and gate.locked(), "... but c found the room full: it waits holding it"
        b.offer(_body("1"))
        await asyncio.sleep(0.05)
        assert b.passes == 0, "no admission left for a third pass while two wait"
        c.stop()
        await _until(lambda: b.passes == 1)
        a.stop()
    finally:
        await registry.aclose()
    assert not gate.locked() and not room.locked(), "every place taken was given back"


async def test_a_drivers_loop_keeps_nothing_of_the_watch_event_that_started_it() -> None:
    # kopf runs a handler in a context that holds the event's cause and body (a whole object, managedFields
    # and all, on a real API server): a loop started from it must keep none of that for its lifetime.
    event_var: contextvars.ContextVar[object] = contextvars.ContextVar("event")

    class Event:
        pass

    driver = _Counting()
    registry = DriverRegistry(lambda namespace, name: driver)
    event = Event()
    seen = weakref.ref(event)

    async def handler(cause: object) -> None:
        event_var.set(cause)
        registry.running("ns", "a")

    await asyncio.create_task(handler(event))
    del event
    for _ in range(3):  # the loop lets go of the finished handler's context after a few more steps
        await asyncio.sleep(0)
    await asyncio.create_task(asyncio.sleep(0))
    gc.collect()
    assert seen() is None, "the loop (its task, its done-callback) holds the handler's context"
    await registry.aclose()


class _Prerequisite(_Counting):
    """Its passes wait for ``ready`` first; counts how often it read a body into a model."""

    def __init__(self) -> None:
        super().__init__()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reads = 0

    def prerequisite(self, body: dict[str, Any]) -> Any:
        return None if self.ready.done() else asyncio.shield(self.ready)

    def read(self, body: dict[str, Any]) -> Any:
        self.reads += 1
        return super().read(body)


async def test_a_pass_reads_nothing_into_a_model_until_its_prerequisite_is_met() -> None:
    driver = _Prerequisite()
    registry = DriverRegistry(lambda namespace, name: driver)
    registry.running("ns", "a")
    driver.offer(_body("1"))
    driver.wake()
    for _ in range(20):
        await asyncio.sleep(0)
    assert (driver.reads, driver.passes) == (0, 0)
    driver.ready.set_result(None)
    await _until(lambda: driver.passes == 1)
    assert driver.reads == 1
    await registry.aclose()


async def test_a_pass_asked_for_by_news_gets_the_next_place_before_every_routine_pass() -> None:
    gate = PassGate(1)
    await gate.acquire(urgent=False)  # the only place, taken
    order: list[str] = []

    async def waiter(name: str, urgent: bool) -> None:
        await gate.acquire(urgent)
        order.append(name)
        gate.release()

    routine = [asyncio.create_task(waiter(f"routine-{n}", False)) for n in range(3)]
    await asyncio.sleep(0)
    news = asyncio.create_task(waiter("news", True))
    await asyncio.sleep(0)
    assert gate.waiting == 4 and not order
    gate.release()
    await asyncio.gather(*routine, news)
    assert order == ["news", "routine-0", "routine-1", "routine-2"]


async def test_a_pass_cancelled_while_it_waits_for_a_place_takes_none_and_loses_none() -> None:
    gate = PassGate(1)
    await gate.acquire(urgent=False)
    waiting = asyncio.create_task(gate.acquire(urgent=True))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert gate.waiting == 0
    gate.release()
    await asyncio.wait_for(gate.acquire(urgent=False), 1)  # the place came back: it is free again


async def test_a_pass_cancelled_as_the_gate_hands_places_on_stays_cancelled_and_the_place_goes_on() -> None:
    """A shutdown cancels every waiting pass while passes end and hand their places on: a release between a
    waiter's cancellation and its handling drops the cancelled place (10,000 loops restarted instead of
    stopping in a benchmark run)."""
    gate = PassGate(1)
    await gate.acquire(urgent=False)
    cancelled = asyncio.create_task(gate.acquire(urgent=False))
    next_in_line = asyncio.create_task(gate.acquire(urgent=False))
    await asyncio.sleep(0)
    cancelled.cancel()
    gate.release()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.wait_for(next_in_line, 1)
    assert gate.waiting == 0


class _Gated(_Driver):
    """Passes over settled objects under one shared PassGate; records which pass began in what order."""

    def __init__(self, name: str, gate: PassGate, began: list[str]) -> None:
        super().__init__("ns", name, ctx=cast(Context, None))
        self.gate = gate
        self.began = began

    def admission(self, body: dict[str, Any], urgent: bool) -> Admission | None:
        return self.gate.lane(urgent)

    async def reconcile(self, obj: Any) -> float:
        self.began.append(self.name)
        return 3600.0


async def test_a_first_sight_is_routine_and_a_change_is_news_that_overtakes_the_routine_queue() -> None:
    gate, began = PassGate(1), []
    registry: DriverRegistry[_Gated] = DriverRegistry(lambda namespace, name: _Gated(name, gate, began))
    await gate.acquire(urgent=False)  # busy: every pass below queues
    try:
        seen = [registry.running("ns", name) for name in ("a", "b", "c")]
        for driver in seen:
            driver.offer(_body("1"))
            driver.wake(urgent=False)  # first sight (as the watch handler wakes it)
        await _until(lambda: gate.waiting == 3)
        changed = registry.running("ns", "d")
        changed.offer(_body("1"))
        changed.wake()  # news
        await _until(lambda: gate.waiting == 4)
        gate.release()
        await _until(lambda: len(began) == 4)
        assert began == ["d", "a", "b", "c"]
    finally:
        await registry.aclose()


class _Handing(_Driver):
    """Its pass gives up its admission, then waits until ``go`` is set (as a stop's handling does)."""

    def __init__(self, name: str, go: asyncio.Event) -> None:
        super().__init__("ns", name, ctx=cast(Context, None))
        self.go = go
        self.waiting = False

    async def reconcile(self, obj: Any) -> float:
        self.release_admission()
        self.waiting = True
        await self.go.wait()
        return 3600.0


async def test_a_pass_gives_up_only_its_own_admission_not_that_of_a_pass_waiting_for_the_lock() -> None:
    go = asyncio.Event()
    driver = _Handing("a", go)
    driver.offer(_body("1"))
    first, second = asyncio.Semaphore(1), asyncio.Semaphore(1)
    await first.acquire()
    running = asyncio.create_task(driver.reconcile_once(first))
    await _until(lambda: driver.waiting)
    assert not first.locked(), "the pass gave its admission back"
    await second.acquire()
    queued = asyncio.create_task(driver.reconcile_once(second))  # waits for the lock
    await asyncio.sleep(0.01)
    assert second.locked(), "still the queued pass's: the pass under the lock gave up only its own"
    go.set()
    await asyncio.gather(running, queued)
    assert not first.locked() and not second.locked()


async def test_early_passes_give_their_places_back_when_a_stops_handling_begins() -> None:
    go = asyncio.Event()
    drivers = {name: _Handing(name, go) for name in "abc"}
    registry = DriverRegistry(lambda namespace, name: drivers[name])

    class _Kube:
        async def get_instance(self, namespace: str, name: str) -> dict[str, Any]:
            return _body("1")

    early = EarlyPasses(cast(Any, registry), cast(Any, _Kube()), concurrency=1)
    early.start([("ns", name) for name in "abc"])
    try:
        # One place, three recoveries: each gives it back as its stop's handling begins, so all three run.
        await _until(lambda: all(driver.waiting for driver in drivers.values()))
        # ...and each has settled (kopf's start waits for that), though none has ended.
        await asyncio.wait_for(early.settled(), 1)
    finally:
        go.set()
        await registry.aclose()


def test_a_scrape_counts_what_the_drivers_kept_of_their_newest_bodies_without_decoding_any(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry: DriverRegistry[_Driver] = DriverRegistry(
        lambda ns, name: _Driver(ns, name, ctx=cast(Context, None))
    )
    stalled = {"type": "Stalled", "status": "True", "reason": "NoCapacity"}
    statuses = [
        {"phase": "Running"},
        {"phase": "Recovering", "recovery": {"id": "r1"}},
        {"phase": "Failed", "conditions": [stalled]},
        {},
    ]
    for index, status in enumerate(statuses):
        body = instance_body(f"i{index}", "ns", metadata={"resourceVersion": "1"}, status=status)
        registry.get("ns", f"i{index}").offer(body)
    registry.get("ns", "i0").offer(
        instance_body("i0", "ns", metadata={"resourceVersion": "2"}, status={"phase": "Stopped"})
    )

    def no_decoding(*_: Any, **__: Any) -> Any:
        raise AssertionError("a scrape decoded a body")

    monkeypatch.setattr(json, "loads", no_decoding)
    families = {f.name: f for f in ObjectsCollector._families(registry.tallies, lambda: ())}
    phases = {s.labels["phase"]: s.value for s in families["kiloclaw_instances"].samples}
    assert (
        phases["Running"],
        phases["Stopped"],
        phases["Recovering"],
        phases["Failed"],
        phases["Pending"],
    ) == (0, 1, 1, 1, 1)
    assert [(s.labels["reason"], s.value) for s in families["kiloclaw_instances_stalled"].samples] == [
        ("NoCapacity", 1)
    ]
    assert families["kiloclaw_recoveries_in_flight"].samples[0].value == 1


class _Ticking(_Counting):
    async def reconcile(self, obj: Any) -> float:
        self.passes += 1
        return 0.3


async def test_between_passes_a_driver_keeps_no_task_and_its_timer_or_a_wake_up_starts_the_next_pass() -> (
    None
):
    driver = _Ticking()
    registry = DriverRegistry(lambda namespace, name: driver)
    driver.offer(_body("1"))
    registry.running("ns", "a")
    await _until(lambda: driver.passes == 1 and registry._loops == {})
    assert driver.idle, "asleep until its next pass: a timer, no task"
    assert registry.running("ns", "a") is driver and registry._loops == {}, "a watch event does not start it"
    await _until(lambda: driver.passes == 2)  # its timer
    await _until(lambda: driver.idle)
    driver.wake()
    assert registry._loops, "a wake-up starts the loop at once"
    await _until(lambda: driver.passes == 3)
    await _until(lambda: driver.idle)
    driver.stop()
    assert not driver.idle and registry._loops == {}
    await asyncio.sleep(0.5)
    assert driver.passes == 3, "a stopped driver's timer never starts another pass"
    await registry.aclose()


def test_a_driver_keeps_its_newest_body_compressed_and_gives_it_back_whole() -> None:
    driver = _driver()
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "Running",
        "lastTransitionTime": "2026-12-07T00:35:01Z",
    }
    status = {"phase": "Running", "machineId": "909fe45d4b22b3", "volumeId": "vol_abcdefgh12345678"}
    body = instance_body(
        "a",
        "ns",
        metadata={"resourceVersion": "7", "uid": "8a7c1e2e-3c1f-4b59-9d0e-1f2e3d4c5b6a"},
        status={
            **status,
            "flyState": "started",
            "conditions": [ready, {**ready, "type": "Stalled", "status": "False"}],
        },
    )
    driver.offer(body)
    compact = json.dumps(body, separators=(",", ":")).encode()
    assert driver._body is not None and len(driver._body) < len(compact) * 0.7
    assert driver.latest == body
