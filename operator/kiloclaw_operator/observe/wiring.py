"""Which ``Observer`` an operator run uses, and its wiring: the organisation feed with ``FLY_ORG_SLUG``, per-
instance polling without it (DESIGN 3.2). Called once at login by ``run.Runtime`` (the composition root)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..config import Settings
from ..driving import DriverRegistry
from ..fly import FlyClient, PacingLimits
from ..kube import KubeClient, KubeConnection, KubeNotFound
from ..leadership import Silence
from ..reconciler import InstanceDriver
from .feed import FeedObserver, FirstWindow, prepare_first_window
from .polling import PollingObserver
from .protocol import Observer
from .standby import HeadStart

logger = logging.getLogger("kiloclaw.observation")


def pacing_limits(settings: Settings) -> PacingLimits:
    return PacingLimits(
        action_rate=settings.fly_action_rate,
        action_burst=settings.fly_action_burst,
        read_rate=settings.fly_read_rate,
        read_burst=settings.fly_read_burst,
        max_concurrent_creates=settings.fly_max_concurrent_creates,
    )


def fly_client(settings: Settings, fence: Callable[[], bool] | None = None) -> FlyClient:
    return FlyClient(
        settings.fly_api_base_url,
        settings.fly_api_token,
        token_file=settings.fly_api_token_file,
        pacing=pacing_limits(settings),
        fence=fence,
        call_deadline=settings.fly_call_deadline_seconds,
        max_body_bytes=settings.fly_max_body_bytes,
    )


def start_observer(
    settings: Settings,
    fly: FlyClient,
    kube: KubeClient,
    prepared: Awaitable[FirstWindow] | None = None,
) -> tuple[Observer, asyncio.Task[None] | None]:
    """The observer, and the feed's loop task when there is one (the caller cancels it at shutdown);
    ``prepared``: the first window this process prepared as a standby (``head_start``)."""
    if not settings.fly_org_slug:
        return PollingObserver(fly, settings), None

    feed = FeedObserver(fly, settings, instance_pages=kube.instance_pages, prepared=prepared)
    return feed, asyncio.get_running_loop().create_task(feed.run(), name="kiloclaw-org-feed")


def head_start(
    settings: Settings,
    silence: Callable[[], Silence | None],
    login: Callable[[], Awaitable[KubeConnection]],
) -> HeadStart | None:
    """With the feed, a standby prepares its first window once the leader has missed several renewals (three
    retry periods, and at least a third of the Lease's duration): with the defaults (8 s, 1 s) 3 s into the
    silence, 5 s before it may take the Lease. Its clients only read; they are closed once it is done."""
    if not settings.fly_org_slug:
        return None

    async def prepare() -> FirstWindow:
        fly = fly_client(settings)
        kube = KubeClient(await login(), page_size=settings.list_chunk_size)
        try:
            return await prepare_first_window(fly, settings, kube.instance_pages)
        finally:
            await fly.aclose()
            await kube.aclose()

    retry = settings.lease_retry_period_seconds
    return HeadStart(
        silence,
        prepare,
        silent_after=max(3 * retry, settings.lease_duration_seconds / 3),
        check_every=retry,
    )


def bind_wakeups(
    observer: Observer, drivers: DriverRegistry[InstanceDriver], kube: KubeClient
) -> EarlyPasses | None:
    """The feed wakes the driver of an instance whose machine changed (never creating a driver); after a
    restart it starts a pass at once for the instances whose machine changed while no operator ran (returned,
    so that kopf's start can wait for them)."""
    if not isinstance(observer, FeedObserver):
        return None

    def wake(namespace: str, name: str) -> None:
        driver = drivers.find(namespace, name)
        if driver is not None:
            driver.wake()

    early = EarlyPasses(drivers, kube)
    observer.bind(wake, early.start)
    return early


class EarlyPasses:
    """Passes for instances kopf has not reached yet (its initial listing takes seconds at 10,000): each under
    its driver's lock, like every pass, so the loop's own first pass simply follows it."""

    def __init__(
        self, drivers: DriverRegistry[InstanceDriver], kube: KubeClient, concurrency: int = 32
    ) -> None:
        self._drivers = drivers
        self._kube = kube
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsettled = 0
        self._settled = asyncio.Event()
        self._settled.set()

    def start(self, refs: list[tuple[str, str]]) -> None:
        if refs:
            self._unsettled += len(refs)
            self._settled.clear()
        for namespace, name in refs:
            task = asyncio.get_running_loop().create_task(self._pass(namespace, name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def settled(self) -> None:
        """Until every pass started has given its place back: it ended, or it recorded what it saw and went
        on under a bound of its own (a recovery's budget)."""
        await self._settled.wait()

    def _one_settled(self) -> None:
        self._unsettled -= 1
        if self._unsettled <= 0:
            self._settled.set()

    async def _pass(self, namespace: str, name: str) -> None:
        fields = {"namespace": namespace, "instance": name}
        place = _Place(self._slots, self._one_settled)
        await place.acquire()
        try:
            logger.debug("early pass", extra=fields)
            # Read now: the feed kept only a few fields of each instance it listed.
            body = await self._kube.get_instance(namespace, name)
            driver = self._drivers.running(namespace, name)
            driver.offer(body)
            # The pass holds the place until it ends, or until a recovery's handling begins: a recovery runs
            # for seconds under the budget's bound, and 100 of them held 32 places for three rounds.
            await driver.reconcile_once(place)
        except KubeNotFound:
            return
        except Exception:
            # The loop's passes retry whatever this one could not finish.
            logger.exception("early pass failed", extra=fields)
        finally:
            place.release()


class _Place:
    """An early pass's place among the concurrent ones; given back once (by the pass, or by its driver when
    a recovery's handling begins), which settles the pass."""

    def __init__(self, slots: asyncio.Semaphore, settled: Callable[[], None]) -> None:
        self._slots = slots
        self._settled = settled
        self._held = False
        self._released = False

    async def acquire(self) -> None:
        await self._slots.acquire()
        self._held = True

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._held:
            self._slots.release()
        self._settled()
