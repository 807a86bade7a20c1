"""Which ``Observer`` an operator run uses, and its wiring: the organisation feed with ``FLY_ORG_SLUG``, per-
instance polling without it (DESIGN 3.2). Called once at login by ``handlers.Runtime``."""

from __future__ import annotations

import asyncio
from datetime import datetime

from .config import Settings
from .driving import DriverRegistry, Observer
from .feed import FeedObserver
from .fly import FlyClient, PacingLimits
from .kube import KubeClient
from .reconciler import InstanceDriver, PollingObserver


def pacing_limits(settings: Settings) -> PacingLimits:
    return PacingLimits(
        action_rate=settings.fly_action_rate,
        action_burst=settings.fly_action_burst,
        read_rate=settings.fly_read_rate,
        read_burst=settings.fly_read_burst,
        max_concurrent_creates=settings.fly_max_concurrent_creates,
    )


def start_observer(
    settings: Settings, fly: FlyClient, kube: KubeClient
) -> tuple[Observer, asyncio.Task[None] | None]:
    """The observer, and the feed's loop task when there is one (the caller cancels it at shutdown)."""
    if not settings.fly_org_slug:
        return PollingObserver(fly, settings), None

    async def oldest() -> datetime | None:
        return oldest_observation(await kube.list_instances())

    feed = FeedObserver(fly, settings, oldest_observation=oldest)
    return feed, asyncio.get_running_loop().create_task(feed.run(), name="kiloclaw-org-feed")


def bind_wakeups(observer: Observer, drivers: DriverRegistry[InstanceDriver]) -> None:
    """The feed wakes the driver of an instance whose machine changed (never creating a driver)."""
    if isinstance(observer, FeedObserver):

        def wake(namespace: str, name: str) -> None:
            driver = drivers.find(namespace, name)
            if driver is not None:
                driver.wake()

        observer.bind(wake)


def oldest_observation(bodies: list[dict[str, object]]) -> datetime | None:
    """The oldest ``status.observedAt`` among instances that name a machine (where the feed must resume)."""
    oldest: datetime | None = None
    for body in bodies:
        status = body.get("status")
        if not isinstance(status, dict) or not status.get("machineId"):
            continue
        text = status.get("observedAt")
        if not isinstance(text, str):
            continue
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            continue
        if oldest is None or moment < oldest:
            oldest = moment
    return oldest
