"""The organisation feed as an observer, over HTTP against flysim: what it keeps follows the instances, not
the organisation (a churning listing of other apps' machines leaves its memory flat), and a deleted instance
is forgotten."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

import pytest

from flysim import FlySimulator
from flysim.state import SimTimings
from harness import eventually
from kiloclaw_operator.config import Settings
from kiloclaw_operator.fly import FlyClient
from kiloclaw_operator.kube import KubeError
from kiloclaw_operator.models import Phase
from kiloclaw_operator.observe.feed import FeedObserver, FirstWindow, prepare_first_window
from test_lifecycle_decide import instance

TOKEN = "test-token-feed-observer"
UNNAMED_LIMIT = 100


@pytest.fixture
async def sim() -> AsyncIterator[FlySimulator]:
    simulator = FlySimulator(token=TOKEN, timings=SimTimings(start_delay=0.0), rate_limits=None)
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


def machine_body(name: str) -> dict[str, Any]:
    return {"name": name, "region": "iad", "config": {"image": "registry.fly.io/other:1"}}


def churn(sim: FlySimulator, app: str, count: int, prefix: str) -> None:
    """Create and destroy ``count`` machines of ``app`` (each shows in the listing)."""
    for index in range(count):
        machine = sim.state.create_machine(app, machine_body(f"{prefix}-{index}"))
        sim.state.destroy_machine(app, machine.id, force=True)


async def swept(feed: FeedObserver) -> None:
    """Until a whole sweep began after now (the churn before it made no await: all of it is listed)."""
    target = feed.sweeps + 2

    async def done() -> bool | None:
        return True if feed.sweeps >= target else None

    await eventually(done, timeout=60, what="a whole sweep of the organisation listing")


async def destroyed_seen(feed: FeedObserver, machine_id: str) -> None:
    async def seen() -> bool | None:
        known = feed.known(machine_id)
        return True if known is not None and known.state == "destroyed" else None

    await eventually(seen, timeout=30, what=f"the feed has listed {machine_id} destroyed")


def feed_memory(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes still held that were allocated with the feed's code on the stack."""
    kept = snapshot.filter_traces([tracemalloc.Filter(True, "*/observe/feed.py")])
    return sum(stat.size for stat in kept.statistics("filename"))


async def test_the_feeds_memory_stays_flat_while_the_organisation_churns_through_other_apps_machines(
    sim: FlySimulator,
) -> None:
    ours = sim.state.create_machine("ours", machine_body("sandbox"))
    tracked = instance(Phase.RUNNING, machine_id=ours.id, flyApp="ours")
    tracked.status.observed_at = datetime.now(UTC)
    settings = Settings(
        fly_api_base_url=sim.base_url,
        fly_api_token=TOKEN,
        fly_org_slug="kilo",
        feed_interval_seconds=0.05,
        feed_overlap_seconds=0,
    )

    async def no_instances() -> AsyncIterator[list[dict[str, Any]]]:
        yield []

    tracemalloc.start()
    async with FlyClient(sim.base_url, TOKEN) as fly:
        feed = FeedObserver(fly, settings, instance_pages=no_instances, unnamed_limit=UNNAMED_LIMIT)
        sweeping = asyncio.create_task(feed.run())
        try:
            feed.next_pass(tracked)  # the driver's pass tracks its machine
            held: list[int] = []
            kept: list[int] = []
            for round_ in range(4):
                churn(sim, "other", 1000, f"r{round_}")
                await swept(feed)
                kept.append(feed.machines_kept)
                held.append(feed_memory(tracemalloc.take_snapshot()))
            # Our machine's news still arrives, however much else changed.
            sim.state.destroy_machine("ours", ours.id, force=True)
            await destroyed_seen(feed, ours.id)
        finally:
            sweeping.cancel()
            await asyncio.gather(sweeping, return_exceptions=True)
            tracemalloc.stop()
    # The tracked machine (its state, consumed state and record) and at most the bound of others.
    assert all(count <= UNNAMED_LIMIT + 3 for count in kept), kept
    # 3,000 more machines listed after the first round: kept for good, their states alone would be >300 KB.
    assert held[-1] - held[0] < 64 * 1024, held


async def test_a_deleted_instance_is_forgotten_by_the_feed(sim: FlySimulator) -> None:
    ours = sim.state.create_machine("ours", machine_body("sandbox"))
    tracked = instance(Phase.RUNNING, machine_id=ours.id, flyApp="ours")
    tracked.status.observed_at = datetime.now(UTC)
    settings = Settings(
        fly_api_base_url=sim.base_url, fly_api_token=TOKEN, fly_org_slug="kilo", feed_interval_seconds=0.05
    )

    async def no_instances() -> AsyncIterator[list[dict[str, Any]]]:
        yield []

    async with FlyClient(sim.base_url, TOKEN) as fly:
        feed = FeedObserver(fly, settings, instance_pages=no_instances, unnamed_limit=0)
        sweeping = asyncio.create_task(feed.run())
        try:
            feed.next_pass(tracked)

            async def listed() -> bool | None:
                return True if feed.known(ours.id) is not None else None

            await eventually(listed, timeout=30, what="the feed has listed the tracked machine")
            observed, _ = await feed.observe(tracked)
            assert observed.state == ours.state
            assert feed.machines_kept == 3  # its state, the state its driver consumed, and its record
            feed.forget(tracked.ref.namespace, tracked.ref.name)
            assert feed.machines_kept == 0
            assert feed.known(ours.id) is None
        finally:
            sweeping.cancel()
            await asyncio.gather(sweeping, return_exceptions=True)


async def test_the_first_sweep_reaches_back_no_further_than_its_bound_and_an_older_instance_reads_its_machine(
    sim: FlySimulator,
) -> None:
    ours = sim.state.create_machine("ours", machine_body("sandbox"))
    long_ago = datetime.now(UTC) - timedelta(days=30)
    stale = instance(Phase.RUNNING, machine_id=ours.id, flyApp="ours", fly_state=ours.state)
    stale.status.observed_at = long_ago
    body = {
        "metadata": {"namespace": stale.ref.namespace, "name": stale.ref.name},
        "status": {"machineId": ours.id, "flyState": ours.state, "observedAt": long_ago.isoformat()},
    }
    settings = Settings(
        fly_api_base_url=sim.base_url,
        fly_api_token=TOKEN,
        fly_org_slug="kilo",
        feed_interval_seconds=0.05,
        feed_first_window_seconds=3600,
    )

    async def listed_at_start() -> AsyncIterator[list[dict[str, Any]]]:
        yield [body]

    async with FlyClient(sim.base_url, TOKEN) as fly:
        feed = FeedObserver(fly, settings, instance_pages=listed_at_start)
        sweeping = asyncio.create_task(feed.run())
        try:
            await swept(feed)
            reads_before = machine_reads(sim, ours.id)
            observed, _ = await feed.observe(stale)
        finally:
            sweeping.cancel()
            await asyncio.gather(sweeping, return_exceptions=True)
    windows = [
        datetime.fromisoformat(value.replace("Z", "+00:00"))
        for record in sim.request_log
        if record.route.endswith("/orgs/{org_slug}/machines")
        for key, value in parse_qsl(record.query)
        if key == "updated_after"
    ]
    earliest = min(window for window in windows if window < datetime.now(UTC))
    assert earliest >= datetime.now(UTC) - timedelta(seconds=3600 + 60), earliest
    # Observed before the first window: the feed cannot speak for it, so its first pass reads the machine.
    assert machine_reads(sim, ours.id) == reads_before + 1
    assert observed.state == ours.state


def machine_reads(sim: FlySimulator, machine_id: str) -> int:
    return sum(
        1
        for record in sim.request_log
        if record.method == "GET" and record.path.endswith(f"/machines/{machine_id}")
    )


async def test_a_pass_over_an_instance_with_a_machine_waits_for_the_first_listing_and_never_after_it(
    sim: FlySimulator,
) -> None:
    sim.state.create_machine("ours", machine_body("sandbox"))
    settings = Settings(
        fly_api_base_url=sim.base_url, fly_api_token=TOKEN, fly_org_slug="kilo", feed_interval_seconds=0.05
    )

    async def no_instances() -> AsyncIterator[list[dict[str, Any]]]:
        yield []

    async with FlyClient(sim.base_url, TOKEN) as fly:
        feed = FeedObserver(fly, settings, instance_pages=no_instances)
        waiting = feed.until_ready()
        assert waiting is not None, "no listing yet: a new leader's passes must wait for it"
        first = asyncio.ensure_future(waiting)
        await asyncio.sleep(0.2)
        assert not first.done(), "nothing lists the organisation yet"
        sweeping = asyncio.create_task(feed.run())
        try:
            await asyncio.wait_for(first, timeout=30)
            assert feed.until_ready() is None
        finally:
            sweeping.cancel()
            await asyncio.gather(sweeping, return_exceptions=True)


def feed_settings(sim: FlySimulator, **overrides: Any) -> Settings:
    """The feed of organisation ``kilo`` on flysim, sweeping every 50 ms."""
    values: dict[str, Any] = {
        "fly_api_base_url": sim.base_url,
        "fly_api_token": TOKEN,
        "fly_org_slug": "kilo",
        "feed_interval_seconds": 0.05,
        **overrides,
    }
    return Settings(**values)


class CountedListing:
    """A listing of the instances that counts how often it was asked for."""

    def __init__(self, bodies: list[dict[str, Any]]) -> None:
        self.bodies = bodies
        self.count = 0

    async def __call__(self) -> AsyncIterator[list[dict[str, Any]]]:
        self.count += 1
        yield self.bodies


async def first_passes(feed: FeedObserver) -> list[tuple[str, str]]:
    """Run the feed until a whole sweep is in; the instances it gave a pass first (changed while away)."""
    taken: list[tuple[str, str]] = []
    feed.bind(lambda namespace, name: None, taken.extend)
    sweeping = asyncio.create_task(feed.run())
    try:
        await swept(feed)
    finally:
        sweeping.cancel()
        await asyncio.gather(sweeping, return_exceptions=True)
    return taken


async def test_a_new_leader_takes_first_only_its_own_namespaces_instances_and_counts_only_those(
    sim: FlySimulator,
) -> None:
    """The listing at start is cluster-wide: another shard's instances, whose machines stopped too, are that
    shard's to drive (no early pass here), and the brake's share counts this shard's instances only."""
    observed = datetime.now(UTC) - timedelta(minutes=1)
    bodies = []
    for namespace in ("tenants-a1", "tenants-a2", "tenants-b1"):
        machine = sim.state.create_machine("ours", machine_body(f"sandbox-{namespace}"))
        bodies.append(
            {
                "metadata": {"namespace": namespace, "name": "sandbox"},
                "status": {
                    "machineId": machine.id,
                    "flyState": "started",
                    "observedAt": observed.isoformat(),
                },
            }
        )
        sim.state.stop_machine("ours", machine.id)
    settings = Settings(
        fly_api_base_url=sim.base_url,
        fly_api_token=TOKEN,
        fly_org_slug="kilo",
        feed_interval_seconds=0.05,
        namespaces="tenants-*,!tenants-b*",  # type: ignore[arg-type]
    )

    async with FlyClient(sim.base_url, TOKEN) as fly:
        feed = FeedObserver(fly, settings, instance_pages=CountedListing(bodies))
        taken_first = await first_passes(feed)
    assert sorted(taken_first) == [("tenants-a1", "sandbox"), ("tenants-a2", "sandbox")]
    assert feed.instances_listed() == 2


def sweep_windows(sim: FlySimulator, since: float) -> list[datetime]:
    """``updated_after`` of every sweep's first page flysim answered after ``since`` (epoch)."""
    return [
        datetime.fromisoformat(value.replace("Z", "+00:00"))
        for record in sim.request_log
        if record.at >= since and "include_deleted" in record.query
        for key, value in parse_qsl(record.query)
        if key == "updated_after"
    ]


def listed_fleet(sim: FlySimulator, count: int) -> list[dict[str, Any]]:
    """``count`` instances, each with a started machine, as a listing of the instances shows them."""
    observed = datetime.now(UTC) - timedelta(minutes=1)
    bodies = []
    for index in range(count):
        machine = sim.state.create_machine("ours", machine_body(f"sandbox-{index}"))
        bodies.append(
            {
                "metadata": {"namespace": "tenants", "name": f"sandbox-{index}"},
                "status": {
                    "machineId": machine.id,
                    "flyState": "started",
                    "observedAt": observed.isoformat(),
                },
            }
        )
    return bodies


async def test_a_leader_adopting_the_first_window_it_prepared_as_a_standby_lists_nothing_again(
    sim: FlySimulator,
) -> None:
    """A standby prepared the first window while its leader was silent (one machine had stopped already);
    another stops before it holds the Lease. The new leader's feed takes both instances first, without
    listing the instances again, and its first sweep starts where the standby's ended (minus the overlap)."""
    bodies = listed_fleet(sim, 3)
    settings = feed_settings(sim, feed_overlap_seconds=2)
    listing = CountedListing(bodies)
    sim.state.stop_machine("ours", bodies[0]["status"]["machineId"])
    async with FlyClient(sim.base_url, TOKEN) as fly:
        window = await prepare_first_window(fly, settings, listing)
        assert window.watermark is not None
        assert window.instances_listed == 3 and listing.count == 1
        sim.state.stop_machine("ours", bodies[1]["status"]["machineId"])
        took_over = time.time()

        async def prepared() -> FirstWindow:
            return window

        feed = FeedObserver(fly, settings, instance_pages=listing, prepared=prepared())
        taken_first = await first_passes(feed)
    assert listing.count == 1, "the leader listed the instances again"
    assert sorted(taken_first) == [("tenants", "sandbox-0"), ("tenants", "sandbox-1")]
    assert feed.instances_listed() == 3
    assert min(sweep_windows(sim, took_over)) == window.watermark - timedelta(seconds=2)


async def test_a_first_window_the_standby_failed_to_prepare_is_listed_by_the_leader(
    sim: FlySimulator,
) -> None:
    bodies = listed_fleet(sim, 2)
    settings = feed_settings(sim)
    listing = CountedListing(bodies)

    async def failed() -> FirstWindow:
        raise KubeError(503, "the standby's listing failed")

    sim.state.stop_machine("ours", bodies[1]["status"]["machineId"])
    async with FlyClient(sim.base_url, TOKEN) as fly:
        feed = FeedObserver(fly, settings, instance_pages=listing, prepared=failed())
        taken_first = await first_passes(feed)
    assert listing.count == 1
    assert taken_first == [("tenants", "sandbox-1")]
