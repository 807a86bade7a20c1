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
from collections.abc import AsyncIterator
from typing import Any

import pytest

from harness import Stack, eventually, status

pytestmark = pytest.mark.xdist_group("feed")

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


def machine_reads(stack: Stack, machine_id: str) -> int:
    """``GET /machines/{id}`` requests flysim served for one machine."""
    return sum(
        1
        for r in stack.fly.request_log
        if r.method == "GET" and r.path == f"/v1/apps/{APP}/machines/{machine_id}"
    )


def org_listings(stack: Stack) -> list[Any]:
    return [r for r in stack.fly.request_log if r.path == f"/v1/orgs/{ORG}/machines"]


async def running(stack: Stack, namespace: str, name: str, timeout: float = 15) -> dict[str, Any]:
    body = await stack.wait_phase(namespace, name, "Running", timeout=timeout)
    return status(body)


async def recovering(stack: Stack, namespace: str, name: str, timeout: float = 15) -> None:
    await stack.wait_instance(
        namespace,
        name,
        lambda b: status(b).get("phase") == "Recovering" or bool(status(b).get("lastRecovery")),
        timeout=timeout,
        what="recovery started",
    )


async def test_with_the_feed_provisioning_completes_from_the_listing_without_reading_the_machine(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "a")
    machine_id = (await running(stack, namespace, "a"))["machineId"]
    assert machine_reads(stack, machine_id) == 0
    assert org_listings(stack), "the feed never listed the organisation"


async def test_with_the_feed_an_unexpected_stop_is_detected_without_reading_the_machine(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "b")
    machine_id = (await running(stack, namespace, "b"))["machineId"]
    stack.fly.crash_machine(machine_id)
    await recovering(stack, namespace, "b")
    assert machine_reads(stack, machine_id) == 0
    await running(stack, namespace, "b", timeout=20)


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
        for name in names:
            await recovering(stack, namespace, name, timeout=30)
    finally:
        stack.fly.org_page_limit = 1000
    expired = [r for r in org_listings(stack) if r.status == 400 and "cursor=" in r.query]
    assert len(expired) == 2
    assert all(machine_reads(stack, machine_id) == 0 for machine_id in machines)


async def test_a_change_that_reaches_the_listing_late_is_still_seen(stack: Stack, namespace: str) -> None:
    await stack.create_instance(namespace, "e")
    machine_id = (await running(stack, namespace, "e"))["machineId"]
    timings = stack.fly.state.timings
    # Later than a sweep interval, within the overlap: the window after it has already moved past the
    # change's updated_at when the change becomes visible.
    stack.fly.state.timings = dataclasses.replace(timings, org_propagation_delay=1.5)
    try:
        stack.fly.crash_machine(machine_id)
        await recovering(stack, namespace, "e", timeout=20)
    finally:
        stack.fly.state.timings = timings
    assert machine_reads(stack, machine_id) == 0


async def test_a_restarted_operator_notices_a_machine_that_stopped_while_it_was_down(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "f")
    machine_id = (await running(stack, namespace, "f"))["machineId"]
    await stack.crash_operator()
    stack.fly.crash_machine(machine_id)
    await stack.start_operator(**FEED)
    await recovering(stack, namespace, "f")
    assert machine_reads(stack, machine_id) == 0


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
    await recovering(stack, namespace, "h1")
    early = {
        record.__dict__.get("instance")
        for record in caplog.records
        if record.name == "kiloclaw.observation"
        and record.getMessage() == "early pass"
        and record.__dict__.get("namespace") == namespace
    }
    assert early == {"h1"}
    assert machine_reads(stack, stopped) == 0


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
    await stack.restart_operator(**{**FEED, "feed_busy_fallback_seconds": 1.0})
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
