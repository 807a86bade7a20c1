"""The composition root: running the operator. Builds, and passes down, everything a run works with: the
leader election (leadership.py, which only elects), the health endpoint, signal handling, the fenced Fly and
Kubernetes clients, the observer (observe/wiring.py), the driver context and registries. kopf (handlers.py)
only hands watch events and deletions to what is built here. Used by ``kiloclaw-operator run`` and ``dev``
(``__main__``, ``dev.py``) and by the tests; also the metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import kopf
from prometheus_client import start_http_server

from .brake import RecoveryBrake
from .config import Settings
from .driving import Context, DriverRegistry
from .guards import claims_namespace
from .kube import KubeClient, KubeConnection
from .leadership import (
    ElectionLoop,
    Heartbeat,
    LeaderElector,
    LeaseConfig,
    Serve,
    default_lease_namespace,
    lead,
)
from .metrics import OBJECTS
from .observe import wiring
from .observe.feed import FirstWindow
from .reconciler import InstanceDriver, instance_drivers
from .retained import RetainedVolumeDriver, retained_volume_drivers

#: The longest kopf's start waits for the observer's first window (``Runtime.connect``): a feed that cannot
#: reach Fly must not keep deletions and retained volumes waiting long.
FIRST_WINDOW_HEAD_START_SECONDS = 10.0


def exit_with(message: str, code: int = 1) -> NoReturn:
    print(f"kiloclaw-operator: {message}", file=sys.stderr)
    raise SystemExit(code)


async def run_operator(
    settings: Settings,
    *,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    liveness: bool = True,
    watch_server_timeout: int = 300,
) -> None:
    """Run the kopf operator in the current event loop until ``stop_flag`` is set (or forever); with leader
    election (the default), only while this process holds the Lease (leadership.py)."""
    from . import handlers  # registers the handlers in kopf's default registry

    async def serve(
        stop: asyncio.Event | threading.Event | None,
        liveness_endpoint: str | None,
        fence: Callable[[], bool] | None = None,
        prepared: Awaitable[FirstWindow] | None = None,
    ) -> None:
        memo = kopf.Memo(
            runtime=Runtime(settings, fence, prepared=prepared), watch_server_timeout=watch_server_timeout
        )
        await kopf.operator(
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=liveness_endpoint,
            stop_flag=stop,
            ready_flag=ready_flag,
            memo=memo,
        )

    if not settings.leader_election:
        await serve(stop_flag, f"http://0.0.0.0:{settings.health_port}/healthz" if liveness else None)
        return

    # The Lease client lives on the election loop (a thread of its own) and is used and closed there only.
    election = ElectionLoop().start()
    kube = KubeClient(await handlers.login_outside_kopf())
    elector = LeaderElector(kube, LeaseConfig.from_settings(settings))
    head_start = wiring.head_start(settings, elector.silence, handlers.login_outside_kopf)
    preparing = asyncio.create_task(head_start.run()) if head_start is not None else None
    try:
        await run_elected(
            elector,
            lambda stop: serve(
                stop, None, elector.acting, head_start.take() if head_start is not None else None
            ),
            election=election,
            loop_stall_seconds=settings.loop_stall_seconds,
            stop_flag=stop_flag,
            health_port=settings.health_port if liveness else None,
        )
    finally:
        if preparing is not None:
            preparing.cancel()
            await asyncio.gather(preparing, return_exceptions=True)
        await election.run(kube.aclose())
        election.stop()


class Runtime:
    """Everything one kopf run works with, built here and handed to the handlers in kopf's memo (never in
    module globals, so an in-process restart starts clean): the fenced Fly client now, and at kopf's first
    login (which gives the Kubernetes connection) the fenced Kubernetes client, the observer, the driver
    context and registries, and the recovery brake."""

    def __init__(
        self,
        settings: Settings,
        fence: Callable[[], bool] | None = None,
        *,
        prepared: Awaitable[FirstWindow] | None = None,
    ) -> None:
        self.settings = settings
        self._fence = fence
        self._prepared = prepared
        self.fly = wiring.fly_client(settings, fence)
        self._ctx: Context | None = None
        self._feed: asyncio.Task[None] | None = None
        self._early: wiring.EarlyPasses | None = None
        self._instances: DriverRegistry[InstanceDriver] | None = None
        self._retained: DriverRegistry[RetainedVolumeDriver] | None = None

    async def connect(self, conn: KubeConnection) -> None:
        if self._ctx is not None:
            return
        self._build(conn)
        await self._first_window_first()

    async def _first_window_first(self) -> None:
        """kopf's login (and so its listings) waits for the observer's first window, at most
        ``FIRST_WINDOW_HEAD_START_SECONDS``: a new leader first learns which machines changed while no
        operator ran, and starts their passes, before it lists every instance. At 10,000 instances the feed's
        first listing took 7.4 s beside kopf's (one event loop, one API server), and every pass over an
        instance with a machine waits for that window anyway (``Observer.until_ready``); only new instances
        start provisioning up to that much later. Then, within the same bound, the passes it started record
        what they saw (``EarlyPasses.settled``) before kopf's listing competes with them."""
        assert self._ctx is not None
        ready = self._ctx.observer.until_ready()
        if ready is None:
            return
        # The feed's own wait is bounded by ``feed_stale_seconds`` too: the shorter bound ends it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_WINDOW_HEAD_START_SECONDS):
                await ready
                if self._early is not None:
                    await self._early.settled()

    def _build(self, conn: KubeConnection) -> None:
        kube = KubeClient(conn, fence=self._fence, page_size=self.settings.list_chunk_size)
        # Handed over, not kept: the window's listing of every instance goes once the feed has adopted it.
        prepared, self._prepared = self._prepared, None
        observer, self._feed = wiring.start_observer(self.settings, self.fly, kube, prepared)
        self._ctx = Context(settings=self.settings, fly=self.fly, kube=kube, observer=observer)
        self._instances = instance_drivers(self._ctx)
        instances = self._instances
        self._ctx.brake = RecoveryBrake(
            self.settings,
            kube,
            self.settings.lease_namespace or default_lease_namespace(),
            # A new leader's first passes (the machines that changed while no operator ran) run before
            # kopf's listing has made every driver: the share is of every instance known, not of those.
            instances=lambda: max(len(instances), observer.instances_listed()),
        )
        self._retained = retained_volume_drivers(self._ctx)
        self._early = wiring.bind_wakeups(observer, self._instances, kube)
        # Beside the feed's first listing, before kopf's listing of the instances asks for the claims.
        self._ctx.claim_listing.start(claims_namespace(self.settings))
        OBJECTS.attach(self, self._instances.tallies, self._retained.tallies)

    def claims_seen(self, body: kopf.Body, event_type: str | None) -> None:
        """Every instance event keeps the claim book current (see ownership.ClaimBook)."""
        if self._ctx is None:
            return
        if event_type == "DELETED":
            self._ctx.claim_book.forget(body)
        else:
            self._ctx.claim_book.seen(body)

    @property
    def instances(self) -> DriverRegistry[InstanceDriver]:
        assert self._instances is not None, "not logged in yet"
        return self._instances

    @property
    def retained(self) -> DriverRegistry[RetainedVolumeDriver]:
        assert self._retained is not None, "not logged in yet"
        return self._retained

    async def aclose(self) -> None:
        OBJECTS.detach(self)
        if self._feed is not None:
            self._feed.cancel()
        for registry in (self._instances, self._retained):
            if registry is not None:
                await registry.aclose()
        await self.fly.aclose()
        if self._ctx is not None:
            await self._ctx.claim_listing.aclose()
            await self._ctx.kube.aclose()


# --- the process under leader election: signals, stop flags, the health endpoint ---------------------------


async def run_elected(
    elector: LeaderElector,
    serve: Serve,
    *,
    election: ElectionLoop | None = None,
    loop_stall_seconds: float = 15.0,
    stop_flag: asyncio.Event | threading.Event | None = None,
    health_port: int | None = None,
) -> None:
    """The process's life under leader election: a health endpoint in both roles, SIGTERM/SIGINT stop a
    standby too (kopf installs its own handlers once it leads), ``stop_flag`` stops either role. With
    ``election`` the Lease is renewed there, for as long as this loop beats within ``loop_stall_seconds``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    heartbeat = Heartbeat()
    beating = asyncio.create_task(heartbeat.run(), name="kiloclaw-heartbeat")
    if election is not None:
        elector.loop_alive = lambda: heartbeat.age() < loop_stall_seconds
    bridges: list[asyncio.Task[Any]] = [beating]
    if isinstance(stop_flag, asyncio.Event):
        bridges.append(asyncio.create_task(_set_when(stop_flag.wait(), stop)))
    elif isinstance(stop_flag, threading.Event):
        # Held in an executor thread until the flag is set (the caller sets it when it gives up on us).
        bridges.append(asyncio.create_task(_set_when(asyncio.to_thread(stop_flag.wait), stop)))
    # Signal handlers belong to the main thread; Windows event loops have none (the operator runs on Linux).
    if threading.current_thread() is threading.main_thread() and sys.platform != "win32":
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    health = await serve_health(health_port, elector) if health_port is not None else None
    try:
        await lead(elector, serve, stop, election=election)
    finally:
        for bridge in bridges:
            bridge.cancel()
        if health is not None:
            await health()


async def _set_when(waiting: Awaitable[Any], event: asyncio.Event) -> None:
    await waiting
    event.set()


async def serve_health(port: int, elector: LeaderElector) -> Callable[[], Awaitable[None]]:
    """``/healthz`` answers 200 in both roles (a standby is healthy, and Ready so that rollouts proceed); the
    body says which role. Returns the function that stops the server."""
    from aiohttp import web  # kopf's HTTP stack; only needed when the process serves its own probe

    async def healthz(_: web.Request) -> web.Response:
        role = "leader" if elector.is_leader else "standby"
        return web.Response(text=json.dumps({"role": role}), content_type="application/json")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner.cleanup


def serve_metrics(port: int, variable: str) -> None:
    """Prometheus metrics on ``port``; a busy port is one line naming it and how to choose another."""
    try:
        start_http_server(port)
    except OSError as exc:
        exit_with(
            f"cannot serve metrics on port {port} ({exc.strerror}): choose another with {variable}=PORT"
        )
