"""The organisation feed (DESIGN 3.2): one paged listing of the organisation's changed machines per interval,
for all instances, instead of one ``GET /machines/{id}`` per instance per interval.

``FeedObserver`` is an ``Observer`` (observe/protocol.py, the seam the driver calls). Its loop sweeps
``GET /orgs/{org}/machines?updated_after=…&summary=true&include_deleted=true`` page by page (cursor), keeps
the newest state per machine (de-duplicated by machine id + ``updated_at``), and wakes the driver of the
instance whose ``status.machineId`` names a changed machine; that driver's next pass reads the state from
here, with no Fly call. Detection latency is then the sweep interval, whatever the number of instances.

The window is measured in Fly's clock, never ours: the next sweep starts at the newest ``updated_at`` seen,
minus an overlap, because Fly warns that recent changes propagate late (a change can surface behind the
cursor). After a restart the first window starts at the oldest ``status.observedAt`` of all instances minus
the overlap, corrected by the clock offset read from Fly's ``Date`` header, so no change made while the
operator was down is lost; at most ``feed_first_window_seconds`` back (an instance observed before that is
read on its first pass instead of listing the organisation's whole history). That listing of the instances is
cluster-wide and keeps only those of the operator's namespaces (kopf's patterns); the instances whose machine
changed meanwhile get a pass at once, and kopf logs in only once this first window is in
(``run.Runtime.connect``). A standby whose leader has gone silent prepares that first window ahead
(``prepare_first_window``, observe/standby.py); the leader it becomes adopts it, and its first sweep covers
only what changed since. A page that fails (5xx, 429) is retried; a cursor that went stale restarts the sweep
from its window; a page may hold fewer machines than asked (the limit is advisory) and paging goes on until
Fly gives no cursor.

A driver that has just created a machine (its id not in any status yet) waits in ``settled_start`` for the
short settle window after the create: the feed tells it of the machine's news, so that its id and ``Running``
can go into one status write (sandbox.py).

Memory follows the instances, not the organisation: the states kept are those of machines an instance names
(tracked, just created, or listed at start); the organisation's other machines pass through a bounded
buffer; a deleted instance is forgotten (``forget``).

Where the feed cannot speak, the driver still reads the machine itself: a spec change to act on (the feed has
no config), a busy phase with no news newer than what the driver last saw (a slow fallback, since the feed
wakes it), a machine the feed has never covered, a feed that has failed for a while (then plain polling), and
a slow, jittered safety-net audit of every machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from .. import lifecycle
from ..config import Settings, namespace_matches
from ..fly import Fatal, FlyClient, FlyError, NotFound, OrgMachine, RateLimited, Unauthorized
from ..fly import vocabulary as fly
from ..fly.models import Machine
from ..lifecycle import Observation
from ..models import Instance, Phase
from .protocol import Aside, MachineState

logger = logging.getLogger("kiloclaw.feed")

#: Phases whose completion the feed reports (a newer state than the one acted on).
WAITING_PHASES = frozenset({Phase.STARTING, Phase.STOPPING})
#: Phases in which the driver does not observe at all (recovery and deletion own them): no wake-ups.
SELF_DRIVEN_PHASES = frozenset({Phase.RECOVERING, Phase.DESTROYING, Phase.PROVISIONING, Phase.PENDING})
_STALE_CURSOR_RESTARTS = 3


@dataclass(slots=True)
class _Tracked:
    namespace: str
    name: str
    phase: Phase
    audit_at: float
    prompted: MachineState | None = None
    #: When the driver last learned something about the machine (news or a read), monotonic.
    heard_at: float = 0.0


class FeedObserver:
    """Observer backed by the organisation feed; falls back to per-instance reads where the feed is silent."""

    def __init__(
        self,
        fly: FlyClient,
        settings: Settings,
        *,
        instance_pages: Callable[[], AsyncIterator[list[dict[str, Any]]]],
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        unnamed_limit: int = 4096,
        prepared: Awaitable[FirstWindow] | None = None,
    ) -> None:
        assert settings.fly_org_slug, "the feed needs FLY_ORG_SLUG"
        self._fly = fly
        #: The first window a standby prepared while its leader was silent (observe/standby.py), if any.
        self._prepared = prepared
        self._settings = settings
        self._org = settings.fly_org_slug
        self._instance_pages = instance_pages
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        #: The newest known state of each machine an instance names (tracked, expected, or listed at start).
        self._latest: dict[str, MachineState] = {}
        #: The newest states of machines no instance names (yet), oldest first, at most ``unnamed_limit``:
        #: the organisation's other machines come and go here, so memory follows the instances, not the
        #: organisation. A machine named meanwhile (its id written in the pass that created it) takes its
        #: state from here.
        self._unnamed: dict[str, MachineState] = {}
        self._unnamed_limit = unnamed_limit
        #: Machines named by the instances listed at start, until each is tracked or forgotten.
        self._listed_machines: set[str] = set()
        #: The state (and its ``updated_at``) each machine's driver last acted on.
        self._consumed: dict[str, MachineState] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._machine_of: dict[tuple[str, str], str] = {}
        #: Machines a driver just created and has not recorded yet, and how to tell it of their news.
        self._expected: dict[str, Callable[[], None]] = {}
        self._wake: Callable[[str, str], None] = lambda namespace, name: None
        self._start_early: Callable[[list[tuple[str, str]]], None] = lambda refs: None
        #: The instances listed at start, until the first sweep has told which machines changed meanwhile.
        self._listed_at_start: list[ListedInstance] = []
        #: Fly-clock start of the first window (None: the whole history was listed).
        self._origin: datetime | None = None
        self._watermark: datetime | None = None
        #: Fly's clock minus ours, from the ``Date`` header (seconds).
        self.clock_offset = 0.0
        self._synced = asyncio.Event()
        self._last_success: float | None = None
        self._reads = asyncio.Semaphore(settings.feed_fallback_concurrency)
        self.sweeps = 0
        self.changes = 0
        #: The instances of this operator's namespaces in the listing at start (0 until it is in).
        self._instances_listed = 0

    # --- wiring ----------------------------------------------------------------------------------------

    def bind(
        self,
        wake: Callable[[str, str], None],
        start_early: Callable[[list[tuple[str, str]]], None] | None = None,
    ) -> None:
        """How to wake the driver of instance (namespace, name), and how to give the instances whose machine
        changed while no operator ran a pass before kopf reaches them: given once the drivers exist."""
        self._wake = wake
        if start_early is not None:
            self._start_early = start_early

    @property
    def healthy(self) -> bool:
        """The feed has synced and a sweep succeeded recently: its silence means "nothing changed"."""
        return (
            self._last_success is not None
            and self._monotonic() - self._last_success <= self._settings.feed_stale_seconds
        )

    @property
    def failing(self) -> bool:
        """A sweep succeeded once but none has for ``feed_stale_seconds``: no news is to be expected. (Before
        the first sweep the feed is not healthy yet, but it is not failing: its news is on the way.)"""
        return self._last_success is not None and not self.healthy

    def known(self, machine_id: str) -> MachineState | None:
        return self._latest.get(machine_id) or self._unnamed.get(machine_id)

    @property
    def machines_kept(self) -> int:
        """How many machines' states are kept (named and unnamed): what its memory grows with."""
        return len(self._latest) + len(self._unnamed) + len(self._consumed) + len(self._tracked)

    # --- a machine not recorded yet (the settle window after a create) --------------------------------

    async def settled_start(self, machine_id: str, aside: Aside) -> MachineState | None:
        """Wait up to ``start_settle_seconds`` for a sweep to report the machine just created settled
        (started, or anything but on its way there), so that its id and ``Running`` go into one status write
        instead of two. Returns what the feed knows of it by then (None: nothing).

        No Fly call is made for this instance meanwhile, so its id still reaches the status before the next
        one; a crash in the window leaves what a crash between the create and its write leaves (the machine
        is adopted by its metadata and mount), and so does a shutdown that cancels the pass. A deletion ends
        the window at once (the driver's stop request): the pass writes the id, and the destroy, which waits
        for the driver's lock, finds it recorded. A failing feed is not waited for.
        """
        seconds = self._settings.start_settle_seconds
        if seconds <= 0 or self.failing:
            return None
        news = asyncio.Event()
        # Known to no status yet (its driver holds it in memory until the write): its news is passed on.
        self._expected[machine_id] = news.set
        self._name(machine_id)
        try:
            # Waiting on the feed is not provisioning work: the pass's admission goes to another meanwhile.
            async with aside(news.set) as stopping:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(seconds):
                        while not stopping():
                            known = self.known(machine_id)
                            if known is not None and lifecycle.start_settled(known.state):
                                break
                            news.clear()
                            await news.wait()
        finally:
            self._expected.pop(machine_id, None)
            self._unname(machine_id)
        return self.known(machine_id)

    def acted_on(self, machine_id: str, change: MachineState) -> None:
        """The driver recorded ``change`` itself (with the machine's id): it is no news to its next pass. A
        newer change that arrived meanwhile still is."""
        self._name(machine_id)
        consumed = self._consumed.get(machine_id)
        if consumed is None or change.newer_than(consumed):
            self._consumed[machine_id] = change

    def forget(self, namespace: str, name: str) -> None:
        """The instance was deleted: nothing about it or its machine is kept (news of its machine, destroyed
        by now, lands among the unnamed ones)."""
        machine_id = self._machine_of.pop((namespace, name), None)
        if machine_id is not None:
            self._drop(machine_id)

    # --- what is kept, and for which machines ----------------------------------------------------------

    def _named(self, machine_id: str) -> bool:
        return (
            machine_id in self._tracked or machine_id in self._expected or machine_id in self._listed_machines
        )

    def _name(self, machine_id: str) -> None:
        """An instance names the machine now: its state, if any, is kept for good."""
        state = self._unnamed.pop(machine_id, None)
        if state is not None and machine_id not in self._latest:
            self._latest[machine_id] = state

    def _unname(self, machine_id: str) -> None:
        """No instance names the machine any more (for now): its state goes back among the unnamed ones."""
        if self._named(machine_id):
            return
        state = self._latest.pop(machine_id, None)
        if state is not None:
            self._keep_unnamed(machine_id, state)

    def _drop(self, machine_id: str) -> None:
        self._tracked.pop(machine_id, None)
        self._consumed.pop(machine_id, None)
        self._listed_machines.discard(machine_id)
        if not self._named(machine_id):
            self._latest.pop(machine_id, None)
            self._unnamed.pop(machine_id, None)

    def _store(self, machine_id: str, state: MachineState) -> None:
        if self._named(machine_id):
            self._unnamed.pop(machine_id, None)
            self._latest[machine_id] = state
        else:
            self._keep_unnamed(machine_id, state)

    def _keep_unnamed(self, machine_id: str, state: MachineState) -> None:
        self._unnamed.pop(machine_id, None)  # re-inserted as the newest
        self._unnamed[machine_id] = state
        while len(self._unnamed) > self._unnamed_limit:
            del self._unnamed[next(iter(self._unnamed))]

    # --- the Observer seam -----------------------------------------------------------------------------

    def until_ready(self) -> Awaitable[None] | None:
        """Until the first listing after a start (at most ``feed_stale_seconds``): a new leader's passes over
        10,000 instances would otherwise wait for it inside ``observe``, each holding its instance read."""
        return None if self._synced.is_set() else self._await_first_sync()

    async def observe(self, instance: Instance) -> tuple[Observation, Machine | None]:
        machine_id = instance.status.machine_id
        if machine_id is None:
            return Observation.no_machine(), None
        await self._await_first_sync()
        tracked = self._track(instance)
        if not self.healthy:
            return await self._read(instance)
        now = self._monotonic()
        if lifecycle.has_unobserved_generation(instance) or now >= tracked.audit_at:
            # A spec change needs the machine's config, which the feed does not carry; the audit is the
            # safety net for a change the feed missed.
            tracked.audit_at = now + self._audit_interval()
            return await self._read(instance)
        news = self._news(machine_id)
        phase = instance.status.phase
        if news is not None and news.ambiguous:
            # Two states within one second of Fly's clock: which is newer only the machine itself can say.
            tracked.heard_at = now
            return await self._read(instance)
        if phase in WAITING_PHASES:
            if news is not None:
                tracked.heard_at = now
                return self._consume(machine_id, news), None
            if now - tracked.heard_at >= self._settings.feed_busy_fallback_seconds:
                # No news for a while: read the machine itself (a change the feed has not shown yet).
                tracked.heard_at = now
                return await self._read(instance)
            return Observation.unknown("no news from the organisation feed yet"), None
        if news is not None and self._changed_behind_the_same_state(instance, news):
            # The machine changed and came back in the state the status records (Fly migrated it, or someone
            # restarted it): the listing has no config, so read it (a migration moves it to a new volume).
            tracked.heard_at = now
            return await self._read(instance)
        known = self.known(machine_id)
        if known is not None:
            return self._consume(machine_id, known), None
        if self._covers(instance) and instance.status.fly_state:
            # Nothing changed since the status was written: the feed has listed every change since then.
            return self._as_observation(instance.status.fly_state), None
        return await self._read(instance)

    def instances_listed(self) -> int:
        return self._instances_listed

    def next_pass(self, instance: Instance) -> float:
        """Seconds until the driver's next pass: the feed wakes it on news, so only the fallbacks count."""
        self._track(instance)
        phase = instance.status.phase
        if not self.healthy or phase in SELF_DRIVEN_PHASES or instance.status.machine_id is None:
            return lifecycle.poll_interval(phase, self._settings)
        if lifecycle.has_unobserved_generation(instance):
            # A spec change deferred while busy (e.g. Running again while Stopping) is applied once the phase
            # settles: soon, not at the next audit (a settle from the feed's news wakes nobody else).
            return self._settings.poll_busy_seconds * self._rng.uniform(0.9, 1.1)
        tracked = self._tracked[instance.status.machine_id]
        news = self._news(instance.status.machine_id)
        if news is not None and tracked.prompted != news:
            # News that arrived before this machine was tracked (e.g. during the pass that recorded it) woke
            # nobody: take it now (once: a pass that does not observe, e.g. a held instance, must not spin).
            tracked.prompted = news
            return 0.0
        if phase in WAITING_PHASES:
            return self._settings.feed_busy_fallback_seconds * self._rng.uniform(0.9, 1.1)
        return max(0.01, tracked.audit_at - self._monotonic())

    # --- observation helpers ---------------------------------------------------------------------------

    def _news(self, machine_id: str) -> MachineState | None:
        """The newest state if it is newer than the one the driver last acted on."""
        latest = self.known(machine_id)
        if latest is None:
            return None
        return latest if latest.newer_than(self._consumed.get(machine_id)) else None

    def _changed_behind_the_same_state(self, instance: Instance, news: MachineState) -> bool:
        """A Running instance's machine is ``started`` again, stamped after the status last observed it: it
        went somewhere and came back without the operator (which starts through ``Starting``), perhaps with
        only a transient state seen in between."""
        observed_at = instance.status.observed_at
        if observed_at is None or news.state != fly.STARTED or instance.status.phase is not Phase.RUNNING:
            return False
        if instance.status.fly_state != fly.STARTED:
            return True  # it was seen on its way somewhere (stopping, stopped) and is back
        # Whole-second stamps: a change in the second the status was written is not "after" it.
        return news.updated_at > observed_at + timedelta(seconds=self.clock_offset + 1)

    def _consume(self, machine_id: str, news: MachineState) -> Observation:
        self._consumed[machine_id] = news
        return self._as_observation(news.state)

    @staticmethod
    def _as_observation(state: str) -> Observation:
        if state == fly.DESTROYED:
            return Observation.gone()
        # The feed has no config: only a spec change compares it, and a spec change always reads the machine.
        return Observation.found(state)

    def _covers(self, instance: Instance) -> bool:
        if not self._synced.is_set():
            return False
        if self._origin is None:
            return True
        observed_at = instance.status.observed_at
        if observed_at is None:
            return False
        in_fly_clock = observed_at + timedelta(seconds=self.clock_offset)
        return in_fly_clock - timedelta(seconds=self._settings.feed_overlap_seconds) >= self._origin

    async def _read(self, instance: Instance) -> tuple[Observation, Machine | None]:
        """One ``GET /machines/{id}``, bounded so that a cold start or a failed feed does not stampede Fly."""
        machine_id = instance.status.machine_id
        assert machine_id is not None
        async with self._reads:
            try:
                machine = await self._fly.get_machine(instance.spec.fly_app, machine_id)
            except NotFound:
                self._consume_latest(machine_id)
                return Observation.gone(), None
            except (Unauthorized, Fatal):
                raise
            except FlyError as exc:
                return Observation.unknown(str(exc)), None
        if machine.updated_at is not None:
            read = MachineState(machine.state, machine.updated_at)
            known = self.known(machine_id)
            if known is None or known.updated_at <= read.updated_at:
                # The read is the truth at its stamp (it settles an ambiguous same-second pair too).
                self._store(machine_id, read)
            self._consume_latest(machine_id)
        if machine.state == fly.DESTROYED:
            return Observation.gone(), machine
        in_sync = lifecycle.config_in_sync(instance.spec, machine.config)
        return Observation.found(machine.state, config_in_sync=in_sync), machine

    def _consume_latest(self, machine_id: str) -> None:
        """Whatever the feed knows of the machine is no news to its driver any more."""
        latest = self.known(machine_id)
        self._consumed[machine_id] = latest or MachineState("", datetime.min.replace(tzinfo=UTC))

    def _track(self, instance: Instance) -> _Tracked:
        ref = (instance.ref.namespace, instance.ref.name)
        machine_id = instance.status.machine_id
        previous = self._machine_of.get(ref)
        if previous is not None and previous != machine_id:
            self._machine_of.pop(ref, None)
            self._drop(previous)
        if machine_id is None:
            return _Tracked(ref[0], ref[1], instance.status.phase, float("inf"))
        tracked = self._tracked.get(machine_id)
        if tracked is None:
            # The first audit lands anywhere in the interval, so that a fleet started together is spread.
            first = self._monotonic() + self._settings.audit_seconds * self._rng.uniform(0.1, 1.0)
            tracked = self._tracked[machine_id] = _Tracked(
                ref[0], ref[1], instance.status.phase, first, heard_at=self._monotonic()
            )
            self._machine_of[ref] = machine_id
            self._name(machine_id)
            self._listed_machines.discard(machine_id)
        tracked.phase = instance.status.phase
        return tracked

    def _audit_interval(self) -> float:
        return self._settings.audit_seconds * self._rng.uniform(0.9, 1.1)

    async def _await_first_sync(self) -> None:
        if self._synced.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), self._settings.feed_stale_seconds)

    # --- the feed loop ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Sweep every ``feed_interval_seconds`` until cancelled; failures back off and never end the loop."""
        failures = 0
        was_healthy = False
        opened = False
        while True:
            delay = self._settings.feed_interval_seconds
            try:
                if not opened:
                    await self._open_first_window()
                    opened = True
                await self._sweep()
                self._start_changed_while_away()
                failures = 0
            except asyncio.CancelledError:
                raise
            except FlyError as exc:
                failures += 1
                hint = exc.retry_after if isinstance(exc, RateLimited) else None
                delay = max(hint or 0.0, min(60.0, delay * 2**failures) * self._rng.uniform(0.5, 1.0))
                logger.warning("organisation feed sweep failed, retrying: %s", exc, extra={"retry_in": delay})
            except Exception:
                failures += 1
                delay = min(60.0, delay * 2**failures)
                logger.exception("organisation feed sweep crashed, retrying")
            healthy = self.healthy
            if was_healthy and not healthy:
                # Drivers sleep until the audit while the feed speaks for them: wake them to poll instead.
                logger.warning("organisation feed is stale: instances fall back to polling")
                self._wake_all()
            was_healthy = healthy
            await asyncio.sleep(delay)

    async def _open_first_window(self) -> None:
        """The first window: the one a standby prepared, else listed now (``_start_window``)."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            try:
                self._adopt(await prepared)
                logger.info(
                    "the first window prepared as a standby is adopted",
                    extra={"instances": self._instances_listed},
                )
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("the standby's first window is not usable: listing it now", exc_info=True)
        await self._start_window()

    def _adopt(self, window: FirstWindow) -> None:
        """Take over the first window this process prepared as a standby (``prepare_first_window``): its
        listing of the instances and what the feed swept since; the next sweep goes on from there."""
        self._listed_at_start = list(window.listed)
        self._instances_listed = window.instances_listed
        self._listed_machines = {listed.machine_id for listed in window.listed}
        self._origin = window.origin
        self._watermark = window.watermark
        self.clock_offset = window.clock_offset
        for machine_id, state in window.states.items():
            self._store(machine_id, state)

    def _prepared_window(self) -> FirstWindow:
        return FirstWindow(
            listed=tuple(self._listed_at_start),
            instances_listed=self._instances_listed,
            origin=self._origin,
            watermark=self._watermark,
            clock_offset=self.clock_offset,
            states={**self._unnamed, **self._latest},
        )

    async def _start_window(self) -> None:
        """After a (re)start: from the oldest observation minus the overlap, in Fly's clock."""
        # Page by page, keeping a few fields of each: at 10,000 the whole list at once is ~100 MB of JSON.
        # The listing is cluster-wide; only the instances of this operator's namespaces (kopf's) count:
        # another shard's instances are that shard's to drive.
        self._listed_at_start = []
        listed_instances = 0
        async for page in self._instance_pages():
            for body in page:
                if not namespace_matches(_namespace_of(body), self._settings.namespaces):
                    continue
                listed_instances += 1
                listed = ListedInstance.of(body)
                if listed is not None:
                    self._listed_at_start.append(listed)
        self._instances_listed = listed_instances
        self._listed_machines = {listed.machine_id for listed in self._listed_at_start}
        oldest = oldest_observation(self._listed_at_start)
        await self._measure_clock_offset()
        offset = timedelta(seconds=self.clock_offset)
        # Bounded: an instance observed before the first window is read on its first pass instead (bounded by
        # ``feed_fallback_concurrency``), not the organisation's whole history listed.
        earliest = datetime.now(UTC) + offset - timedelta(seconds=self._settings.feed_first_window_seconds)
        if oldest is None:
            self._origin = earliest
            return
        overlap = timedelta(seconds=self._settings.feed_overlap_seconds)
        self._origin = max(oldest + offset - overlap, earliest)

    async def _measure_clock_offset(self) -> None:
        """Fly's clock minus ours, as the client measures it on every answer, from one empty page at start."""
        await self._fly.list_org_machines(
            self._org or "", updated_after=datetime.now(UTC) + timedelta(days=1), limit=1, summary=True
        )
        self.clock_offset = self._fly.clock_offset

    def _window(self) -> datetime | None:
        overlap = timedelta(seconds=self._settings.feed_overlap_seconds)
        if self._watermark is not None:
            start = self._watermark - overlap
            return start if self._origin is None else max(start, self._origin - overlap)
        return self._origin

    async def _sweep(self) -> None:
        start = self._window()
        cursor: str | None = None
        restarts = 0
        newest = self._watermark
        pages = 0
        while True:
            try:
                page = await self._fly.list_org_machines(
                    self._org or "",
                    updated_after=start if cursor is None else None,
                    cursor=cursor,
                    limit=self._settings.feed_page_limit,
                    summary=True,
                    include_deleted=True,
                )
            except (Fatal, NotFound) as exc:
                if cursor is None or restarts >= _STALE_CURSOR_RESTARTS:
                    raise
                # A cursor Fly no longer accepts: list the same window again (the de-duplication absorbs
                # what was already seen).
                restarts += 1
                logger.info("organisation feed cursor went stale, restarting the window: %s", exc)
                cursor = None
                continue
            pages += 1
            for machine in page.machines:
                if machine.updated_at is not None and (newest is None or machine.updated_at > newest):
                    newest = machine.updated_at
                self._apply(machine)
            if not page.next_cursor:
                break
            cursor = page.next_cursor
        # The window moves only once the whole sweep is in: a failed or restarted sweep repeats it.
        self._watermark = newest
        self._last_success = self._monotonic()
        self.sweeps += 1
        self._synced.set()

    def _start_changed_while_away(self) -> None:
        """After the first sweep: the instances whose machine changed while no operator ran go first."""
        if not self._listed_at_start:
            return
        listed, self._listed_at_start = self._listed_at_start, []
        changed = changed_while_away(listed, self._latest, self.clock_offset)
        if changed:
            logger.info(
                "machines changed while no operator ran: their instances go first",
                extra={"instances": len(changed)},
            )
            self._start_early(changed)

    def _apply(self, machine: OrgMachine) -> None:
        if machine.updated_at is None or not machine.state:
            return
        change = MachineState(machine.state, machine.updated_at)
        if not self._remember(machine.id, change):
            return
        self.changes += 1
        expected = self._expected.get(machine.id)
        if expected is not None:
            expected()
        tracked = self._tracked.get(machine.id)
        if tracked is not None and tracked.phase not in SELF_DRIVEN_PHASES:
            self._wake(tracked.namespace, tracked.name)

    def _remember(self, machine_id: str, change: MachineState) -> bool:
        """Keep the newer of what is known and ``change``; True when ``change`` is news. A different state at
        the same (whole-second) ``updated_at`` is news too, marked ambiguous: the driver reads the machine."""
        known = self.known(machine_id)
        if known is not None:
            if known.updated_at > change.updated_at:
                return False
            if known.updated_at == change.updated_at:
                if known.state == change.state:
                    return False
                change = MachineState(change.state, change.updated_at, ambiguous=True)
        self._store(machine_id, change)
        return True

    def _wake_all(self) -> None:
        for tracked in list(self._tracked.values()):
            self._wake(tracked.namespace, tracked.name)


@dataclass(frozen=True, slots=True)
class FirstWindow:
    """A feed's first window, prepared by a standby before it holds the Lease (``prepare_first_window``):
    the instances it listed, the window's origin, and the machine states swept since, up to ``watermark``."""

    listed: tuple[ListedInstance, ...]
    instances_listed: int
    origin: datetime | None
    watermark: datetime | None
    clock_offset: float
    states: Mapping[str, MachineState]


async def prepare_first_window(
    fly: FlyClient,
    settings: Settings,
    instance_pages: Callable[[], AsyncIterator[list[dict[str, Any]]]],
) -> FirstWindow:
    """What a new leader's feed does first (list the instances, read Fly's clock, sweep the organisation from
    the oldest observation), done ahead by a standby whose leader has gone silent: it makes no write and no
    changing Fly call. The leader it becomes adopts the result, and its first sweep only covers what changed
    since (``FeedObserver(prepared=…)``)."""
    feed = FeedObserver(fly, settings, instance_pages=instance_pages)
    await feed._start_window()
    await feed._sweep()
    return feed._prepared_window()


class ListedInstance(NamedTuple):
    """What the feed keeps of an instance listed at start: where to resume, and whether it changed since."""

    namespace: str
    name: str
    machine_id: str
    fly_state: str | None
    observed_at: datetime

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> ListedInstance | None:
        """The instance's record, if it names a machine and when it last observed it."""
        status = body.get("status")
        if not isinstance(status, dict) or not status.get("machineId"):
            return None
        text = status.get("observedAt")
        if not isinstance(text, str):
            return None
        try:
            observed_at = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
        metadata = body.get("metadata") or {}
        return cls(
            str(metadata.get("namespace", "")),
            str(metadata.get("name", "")),
            str(status["machineId"]),
            status.get("flyState"),
            observed_at,
        )


def _namespace_of(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("namespace", ""))


def oldest_observation(listed: Sequence[ListedInstance]) -> datetime | None:
    """The oldest ``status.observedAt`` among instances that name a machine (where the feed must resume)."""
    return min((instance.observed_at for instance in listed), default=None)


def changed_while_away(
    listed: Sequence[ListedInstance], latest: Mapping[str, MachineState], clock_offset: float
) -> list[tuple[str, str]]:
    """The instances (namespace, name) whose machine the feed shows in another state than their status
    recorded, changed after that observation (Fly's clock): after a restart, the ones with work to do.

    At 10,000 instances kopf takes seconds to reach the last one of its initial listing; these must not wait
    for it (a machine that stopped while the operator was down is noticed within the feed's interval)."""
    changed: list[tuple[str, str]] = []
    for instance in listed:
        known = latest.get(instance.machine_id)
        if known is None or known.state == instance.fly_state:
            continue
        if known.updated_at > instance.observed_at + timedelta(seconds=clock_offset):
            changed.append((instance.namespace, instance.name))
    return changed
