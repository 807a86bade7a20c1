"""The organisation feed (DESIGN 3.2) end to end: the real operator with ``FLY_ORG_SLUG`` against flysim.

With the feed, a Running instance's machine is never read by itself: its changes come from the paged
organisation listing, which wakes the instance's driver. These stories check that changes arrive (detection,
provisioning) and that the feed survives what Fly's listing does: failing pages, stale cursors, more changes
than a page holds, late propagation, a restart of the operator, and a Fly clock that disagrees with ours.
The fallback audit is set to an hour, so anything detected here was detected by the feed. Machines stop by
crashing rather than by host failures: the stack is shared, and every failed host is one fewer for the
stories that follow.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import processes
from builders import sandbox_id
from flysim import FlySimulator
from harness import Stack, condition, eventually, status
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, VERSION
from test_lifecycle_e2e import History, caught_up, watched
from test_recovery_e2e import FlyTap

# The operator restarted in feed mode, and killed: `make stories` (run by `make e2e`), not `make test`.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("feed")]

APP = "acct-test"
ORG = "kilo"
FEED = {
    "fly_org_slug": ORG,
    "feed_interval_seconds": 0.2,
    "feed_overlap_seconds": 2.0,
    "feed_stale_seconds": 5.0,
    # Longer than any test: what completes, completed from the feed.
    "feed_busy_fallback_seconds": 60.0,
    "audit_seconds": 3600.0,
    # After a machine create, how long the feed has to report it started (operator default 10 s): longer
    # than any test, so that a loaded machine never makes the write count vary.
    "start_settle_seconds": 30.0,
}


@pytest.fixture(scope="module", autouse=True)
async def feed_operator(stack: Stack) -> AsyncIterator[None]:
    """This module's operator runs with the feed; the polling operator comes back afterwards."""
    await stack.restart_operator(**FEED)
    try:
        yield
    finally:
        stack.fly.clear_faults()
        stack.fly.org_page_limit = 1000
        stack.fly.clock_offset = 0.0
        stack.fly.state.timings = dataclasses.replace(stack.fly.state.timings, org_propagation_delay=0.0)
        await stack.restart_operator()


def machine_reads(stack: Stack, machine_id: str, before: float | None = None) -> int:
    """``GET /machines/{id}`` requests flysim served for one machine (``before``: only those served before
    that moment, e.g. a recovery's start: the recovery itself reads the source machine before it destroys
    it, to verify it is the sandbox's)."""
    return sum(
        1
        for r in stack.fly.request_log
        if r.method == "GET"
        and r.path == f"/v1/apps/{APP}/machines/{machine_id}"
        and (before is None or r.at < before)
    )


def org_listings(stack: Stack) -> list[Any]:
    return [r for r in stack.fly.request_log if r.path == f"/v1/orgs/{ORG}/machines"]


async def running(stack: Stack, namespace: str, name: str, timeout: float = 15) -> dict[str, Any]:
    body = await stack.wait_phase(namespace, name, "Running", timeout=timeout)
    return status(body)


async def recovering(stack: Stack, namespace: str, name: str, timeout: float = 15) -> float:
    """Waits until a recovery began; returns when it began (epoch seconds, recorded before any Fly call)."""
    body = await stack.wait_instance(
        namespace,
        name,
        lambda b: status(b).get("phase") == "Recovering" or bool(status(b).get("lastRecovery")),
        timeout=timeout,
        what="recovery started",
    )
    record = status(body).get("recovery") or status(body)["lastRecovery"]
    return datetime.fromisoformat(record["startedAt"].replace("Z", "+00:00")).timestamp()


async def test_with_the_feed_provisioning_completes_from_the_listing_without_reading_the_machine(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "a")
    machine_id = (await running(stack, namespace, "a"))["machineId"]
    assert machine_reads(stack, machine_id) == 0
    assert org_listings(stack), "the feed never listed the organisation"


async def test_with_the_feed_an_unexpected_stop_is_detected_from_the_listing_and_confirmed_by_one_read(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "b")
    machine_id = (await running(stack, namespace, "b"))["machineId"]
    assert machine_reads(stack, machine_id) == 0
    stack.fly.crash_machine(machine_id)
    began = await recovering(stack, namespace, "b")
    assert (
        machine_reads(stack, machine_id, before=began) == 1
    )  # one read confirms the listing's stop before anything is destroyed
    await running(stack, namespace, "b", timeout=20)


async def test_a_listing_that_reports_running_machines_stopped_destroys_nothing_and_starts_no_recovery(
    stack: Stack, namespace: str
) -> None:
    names = ["l1", "l2", "l3"]
    for name in names:
        await stack.create_instance(namespace, name)
    machines = [(await running(stack, namespace, name))["machineId"] for name in names]
    deletes_before = len([r for r in stack.fly.request_log if r.method == "DELETE"])
    creates_before = len(
        [r for r in stack.fly.request_log if r.method == "POST" and r.path.endswith("/volumes")]
    )
    stack.fly.lie_in_listing(machines)
    try:

        async def all_confirmed() -> bool | None:
            return True if all(machine_reads(stack, m) >= 1 for m in machines) else None

        await eventually(all_confirmed, timeout=10, what="every reported stop confirmed by a read")
    finally:
        stack.fly.end_listing_lies()
    for name in names:
        body = await stack.get_instance(namespace, name)
        assert body is not None
        assert status(body)["phase"] == "Running"
        assert "lastRecovery" not in status(body) and "recovery" not in status(body)
    assert len([r for r in stack.fly.request_log if r.method == "DELETE"]) == deletes_before
    assert (
        len([r for r in stack.fly.request_log if r.method == "POST" and r.path.endswith("/volumes")])
        == creates_before
    )
    assert all(stack.fly.machine(m)["state"] == "started" for m in machines)


async def test_with_the_feed_a_platform_migration_is_followed_even_when_its_stop_is_never_listed(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "mg")
    first = await running(stack, namespace, "mg")
    machine_id, old_volume = first["machineId"], first["volumeId"]
    stack.fly.migrate_machine(machine_id)
    moved = await stack.wait_instance(
        namespace,
        "mg",
        lambda b: status(b).get("volumeId") not in (None, old_volume),
        timeout=20,
        what="status.volumeId following the migration",
    )
    assert status(moved)["machineId"] == machine_id
    assert "lastRecovery" not in status(moved)
    await stack.events_with(namespace, "mg", "MachineMigrated")


async def test_with_the_feed_a_spec_flipped_back_to_running_while_stopping_is_applied_once_stopped(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "fl")
    await running(stack, namespace, "fl")
    await stack.patch_instance(namespace, "fl", {"spec": {"state": "Stopped"}})
    await stack.wait_phase(namespace, "fl", "Stopping")
    await stack.patch_instance(namespace, "fl", {"spec": {"state": "Running"}})
    # The audit is an hour away: only the deferred generation brings the instance back.
    body = await stack.wait_instance(
        namespace,
        "fl",
        lambda b: status(b).get("phase") == "Running" and status(b).get("observedGeneration") == 3,
        timeout=20,
        what="Running again at generation 3",
    )
    assert condition(body, "Ready")["status"] == "True"


async def test_changes_within_one_second_of_flys_clock_are_not_lost(stack: Stack, namespace: str) -> None:
    """Fly's updated_at has whole seconds: created, starting and started of a new machine share one stamp,
    and a stop and a start can too. The feed keeps every different state, so nothing waits for a fallback."""
    stack.fly.whole_second_timestamps = True
    try:
        await stack.create_instance(namespace, "s")
        first = await running(stack, namespace, "s", timeout=10)
        stack.fly.crash_machine(first["machineId"])
        await recovering(stack, namespace, "s", timeout=10)
        await running(stack, namespace, "s", timeout=20)
    finally:
        stack.fly.whole_second_timestamps = False


async def test_the_feed_survives_failing_and_rate_limited_pages(stack: Stack, namespace: str) -> None:
    await stack.create_instance(namespace, "c")
    machine_id = (await running(stack, namespace, "c"))["machineId"]
    stack.fly.inject_faults("GET /v1/orgs/*/machines", 503, count=6)
    stack.fly.inject_faults("GET /v1/orgs/*/machines", 429, count=3, retry_after=1)
    stack.fly.crash_machine(machine_id)
    await recovering(stack, namespace, "c", timeout=30)
    failed = [r.status for r in org_listings(stack) if r.status in (429, 503)]
    assert failed.count(503) == 6 and failed.count(429) == 3


async def test_the_feed_pages_through_more_changes_than_a_page_holds_and_restarts_a_stale_cursor(
    stack: Stack, namespace: str
) -> None:
    names = ["d1", "d2", "d3"]
    for name in names:
        await stack.create_instance(namespace, name)
    machines = [(await running(stack, namespace, name))["machineId"] for name in names]
    stack.fly.org_page_limit = 1
    try:
        stack.fly.expire_cursors(2)
        for machine_id in machines:
            stack.fly.crash_machine(machine_id)
        began = [await recovering(stack, namespace, name, timeout=30) for name in names]
    finally:
        stack.fly.org_page_limit = 1000
    expired = [r for r in org_listings(stack) if r.status == 400 and "cursor=" in r.query]
    assert len(expired) == 2
    assert all(
        machine_reads(stack, m, before=b) == 1 for m, b in zip(machines, began, strict=True)
    )  # one read confirms the listing's stop before anything is destroyed


async def test_a_change_that_reaches_the_listing_late_is_still_seen(stack: Stack, namespace: str) -> None:
    await stack.create_instance(namespace, "e")
    machine_id = (await running(stack, namespace, "e"))["machineId"]
    timings = stack.fly.state.timings
    # Later than a sweep interval, within the overlap: the window after it has already moved past the
    # change's updated_at when the change becomes visible.
    stack.fly.state.timings = dataclasses.replace(timings, org_propagation_delay=1.5)
    try:
        stack.fly.crash_machine(machine_id)
        began = await recovering(stack, namespace, "e", timeout=20)
    finally:
        stack.fly.state.timings = timings
    assert (
        machine_reads(stack, machine_id, before=began) == 1
    )  # one read confirms the listing's stop before anything is destroyed


async def test_a_restarted_operator_notices_a_machine_that_stopped_while_it_was_down(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "f")
    machine_id = (await running(stack, namespace, "f"))["machineId"]
    await stack.crash_operator()
    stack.fly.crash_machine(machine_id)
    await stack.start_operator(**FEED)
    began = await recovering(stack, namespace, "f")
    assert (
        machine_reads(stack, machine_id, before=began) == 1
    )  # one read confirms the listing's stop before anything is destroyed


async def test_after_a_restart_only_instances_whose_machine_changed_meanwhile_get_a_pass_before_kopf(
    stack: Stack, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    await stack.create_instance(namespace, "h1")
    await stack.create_instance(namespace, "h2")
    stopped = (await running(stack, namespace, "h1"))["machineId"]
    await running(stack, namespace, "h2")
    await stack.crash_operator()
    stack.fly.crash_machine(stopped)
    caplog.set_level(logging.DEBUG, logger="kiloclaw.observation")
    await stack.start_operator(**FEED)
    began = await recovering(stack, namespace, "h1")
    early = {
        record.__dict__.get("instance")
        for record in caplog.records
        if record.name == "kiloclaw.observation"
        and record.getMessage() == "early pass"
        and record.__dict__.get("namespace") == namespace
    }
    assert early == {"h1"}
    assert (
        machine_reads(stack, stopped, before=began) == 1
    )  # one read confirms the listing's stop before anything is destroyed


async def test_a_fly_clock_an_hour_behind_ours_loses_no_change_across_a_restart(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "g")
    machine_id = (await running(stack, namespace, "g"))["machineId"]
    await stack.crash_operator()
    stack.fly.clock_offset = -3600.0
    try:
        stack.fly.crash_machine(machine_id)
        await stack.start_operator(**FEED)
        await recovering(stack, namespace, "g")
        # Steady state under the skew: the windows follow Fly's clock, so the next change is seen too.
        await running(stack, namespace, "g", timeout=20)
        replacement = status(await stack.get_instance(namespace, "g") or {})["machineId"]
        stack.fly.crash_machine(replacement)
        await eventually(
            lambda: _has_two_recoveries(stack, namespace, "g"), timeout=20, what="a second recovery"
        )
    finally:
        stack.fly.clock_offset = 0.0


async def _has_two_recoveries(stack: Stack, namespace: str, name: str) -> bool | None:
    events = await stack.event_reasons(namespace, name)
    return True if events.count("RecoveryStarted") >= 2 else None


async def test_with_a_failing_feed_instances_fall_back_to_reading_their_machines(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "h")
    machine_id = (await running(stack, namespace, "h"))["machineId"]
    stack.fly.inject_faults("GET /v1/orgs/*/machines", 503)
    try:
        stack.fly.crash_machine(machine_id)
        await recovering(stack, namespace, "h", timeout=30)
    finally:
        stack.fly.clear_faults()
    assert machine_reads(stack, machine_id) >= 1


async def test_a_starting_instance_the_feed_has_no_news_for_reads_its_machine_after_the_fallback_interval(
    stack: Stack, namespace: str
) -> None:
    await stack.restart_operator(**{**FEED, "feed_busy_fallback_seconds": 1.0, "start_settle_seconds": 0.5})
    timings = stack.fly.state.timings
    # The listing shows no change for a minute: only the fallback read can see the machine start.
    stack.fly.state.timings = dataclasses.replace(timings, org_propagation_delay=60.0)
    try:
        await stack.create_instance(namespace, "i")
        machine_id = (await running(stack, namespace, "i"))["machineId"]
        assert machine_reads(stack, machine_id) >= 1
    finally:
        stack.fly.state.timings = timings
        await stack.restart_operator(**FEED)


# --- the settle window after a machine create (one write for the machine id and Running) -----------------


WRITE_VERBS = frozenset({"create", "update", "patch", "delete"})


async def operator_writes(stack: Stack, history: History, body: dict[str, Any]) -> int:
    """Kubernetes write requests into the instance's namespace (objects, status, events) as the benchmark
    counts them, refused ones included, minus the test's own create: what the operator sent to reach ``body``.
    Each of them stored a version of the instance (none was refused, none is an Event)."""
    await caught_up(history, body)
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    log = list(stack.kube.request_log)
    requests = sum(1 for r in log if r.namespace == namespace and r.verb in WRITE_VERBS) - 1
    versions = {b["metadata"]["resourceVersion"] for b in history.of(name)}
    assert requests == len(versions) - 1, "a write was refused or is not a write of the instance"
    return requests


@contextmanager
def machine_start_hangs(fly: FlySimulator, sandbox: str) -> Iterator[list[str]]:
    """Machines created for ``sandbox`` hang in ``starting`` until ``repair_machine_start`` (yields their
    ids); broken inside the create call, so no start slips through first."""
    state = fly.state
    original = state.create_machine
    created: list[str] = []

    def create(app_name: str, body: dict[str, Any]) -> Any:
        machine = original(app_name, body)
        if ((body.get("config") or {}).get("metadata") or {}).get("kiloclaw_sandbox_id") == sandbox:
            state.break_machine_start(machine.id, "hang")
            created.append(machine.id)
        return machine

    state.create_machine = create  # type: ignore[method-assign]
    try:
        yield created
    finally:
        del state.create_machine


async def in_settle_window(stack: Stack, namespace: str, name: str, created: list[str]) -> str:
    """Wait until Fly has the instance's machine while its status does not name it yet (the driver holds its
    id in memory); returns the machine id."""

    async def check() -> str | None:
        body = stack.get_object_now(INSTANCE_PLURAL, namespace, name)
        if not created or body is None:
            return None
        st = status(body)
        assert "machineId" not in st, "the settle window ended before the test could act in it"
        return created[0] if st.get("volumeId") and st.get("phase") == "Provisioning" else None

    return await eventually(check, timeout=10, what="machine created, id not yet written")


async def test_with_the_feed_a_new_instance_reaches_running_in_four_kubernetes_writes(
    stack: Stack, namespace: str
) -> None:
    # A fresh feed: after a test that failed it on purpose, it may still back off (it counts as failing, and
    # a failing feed is not waited for).
    await stack.restart_operator(**FEED)
    async with watched(stack, namespace) as history:
        await stack.create_instance(namespace, "w")
        body = await stack.wait_phase(namespace, "w", "Running")
        # kopf's finalizer, the claim, the volume id, and the machine id together with Running: the feed
        # reported the new machine started within the settle window, so no write says Starting.
        assert await operator_writes(stack, history, body) == 4
    assert history.phases("w") == ["Provisioning", "Running"]
    assert status(body)["flyState"] == "started"
    assert condition(body, "Ready")["status"] == "True"
    assert machine_reads(stack, status(body)["machineId"]) == 0


async def test_with_the_feed_silent_past_the_settle_window_the_machine_id_is_written_with_starting_first(
    stack: Stack, namespace: str
) -> None:
    await stack.restart_operator(**{**FEED, "start_settle_seconds": 1.0})
    try:
        with machine_start_hangs(stack.fly, sandbox_id(namespace, "x")) as created:
            async with watched(stack, namespace) as history:
                await stack.create_instance(namespace, "x")
                starting = await stack.wait_phase(namespace, "x", "Starting", timeout=20)
                # Still starting (the feed said nothing that settles it): its id went out alone.
                assert status(starting)["machineId"] == created[0]
                stack.fly.repair_machine_start(created[0])
                body = await stack.wait_phase(namespace, "x", "Running")
                assert await operator_writes(stack, history, body) == 5
    finally:
        await stack.restart_operator(**FEED)
    assert history.phases("x") == ["Provisioning", "Starting", "Running"]
    assert status(body)["machineId"] == created[0]
    # Completed from the feed, as every Starting is.
    assert machine_reads(stack, created[0]) == 0


async def test_with_the_feed_an_instance_deleted_in_the_settle_window_leaves_no_machine_or_volume_behind(
    stack: Stack, namespace: str
) -> None:
    # The module's window (30 s) is longer than the wait for the deletion below: only the deletion ends it.
    # A fresh feed, as above (a failing one is not waited for).
    await stack.restart_operator(**FEED)
    with machine_start_hangs(stack.fly, sandbox_id(namespace, "y")) as created, FlyTap(stack) as tap:
        await stack.create_instance(namespace, "y")
        machine_id = await in_settle_window(stack, namespace, "y", created)
        at_destroy: list[dict[str, Any]] = []
        tap.on(
            "DELETE",
            f"/v1/apps/{APP}/machines/{machine_id}",
            lambda: at_destroy.append(status(stack.get_object_now(INSTANCE_PLURAL, namespace, "y") or {})),
        )
        await stack.delete_instance(namespace, "y")
        await stack.wait_gone(namespace, "y", timeout=20)
    # The deletion ended the window: the pass wrote the machine's id, and the destroy, which waited for the
    # driver's lock, came after Destroying was recorded with that id.
    assert at_destroy and at_destroy[0]["phase"] == "Destroying"
    assert at_destroy[0].get("machineId") == machine_id
    assert stack.live_machines(APP, sandbox_id=sandbox_id(namespace, "y")) == []
    assert not [v for v in stack.live_volumes(APP) if v["id"] == at_destroy[0]["volumeId"]]


async def test_an_operator_sigkilled_in_the_settle_window_adopts_the_machine_it_created_and_leaves_no_orphan(
    tmp_path: Path,
) -> None:
    # A real SIGKILL (an operator process): a graceful stop or a cancelled task ends the window with the
    # machine's id written, and only a kill leaves the machine unrecorded.
    namespace, name, sandbox = "settle-crash", "k", "ki_settle_crash"
    with processes.simulators(namespace) as (kube, fly), machine_start_hangs(fly, sandbox) as created:
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        env = processes.operator_env(
            kubeconfig,
            fly.base_url,
            FLY_ORG_SLUG=ORG,
            KILOCLAW_FEED_INTERVAL_SECONDS="0.2",
            KILOCLAW_FEED_BUSY_FALLBACK_SECONDS="60",
            KILOCLAW_LEADER_ELECTION="false",
        )

        def stored() -> dict[str, Any]:
            return status(kube.get_object(GROUP, VERSION, INSTANCE_PLURAL, namespace, name) or {})

        first = processes.start_operator(
            {**env, "KILOCLAW_START_SETTLE_SECONDS": "60"}, tmp_path / "first.log"
        )
        try:
            processes.create_instance(kube, namespace, name, APP, sandbox=sandbox)

            async def in_window() -> str | None:
                assert first.poll() is None, "the operator exited"
                st = stored()
                assert "machineId" not in st, "the settle window ended before the kill"
                return created[0] if created and st.get("volumeId") else None

            machine_id = await eventually(in_window, timeout=30, what="machine created, id not written")
        finally:
            first.kill()
            first.wait()
        killed_at = stored()
        assert killed_at["phase"] == "Provisioning" and "machineId" not in killed_at
        # The machine starts while no operator runs; the next one must find it, not create another.
        fly.repair_machine_start(machine_id)
        second = processes.start_operator(env, tmp_path / "second.log")
        try:

            async def running_again() -> dict[str, Any] | None:
                assert second.poll() is None, "the operator exited"
                st = stored()
                return st if st.get("phase") == "Running" else None

            done = await eventually(running_again, timeout=30, what="Running after the restart")
        finally:
            processes.stop(second)
        assert created == [machine_id], "the restarted operator created another machine"
        assert done["machineId"] == machine_id
        live = [m["id"] for m in fly.machines(APP) if m["state"] not in ("destroyed", "destroying")]
        assert live == [machine_id]
