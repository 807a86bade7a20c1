"""The single-writer pattern shared by both kinds: one driver per object, its lock, its wake-ups, its loop.

kopf runs event handlers and deletion handlers concurrently on one object. A driver makes them
take turns: watch events only hand over the newest body and wake the driver when the body asks for work;
the driver's loop (a task per object while it has work, a timer while it sleeps, see ``DriverRegistry``) does
every pass under its lock, and so does deletion.

``ObjectDriver`` is the one loop of both kinds, parameterised by the kind's model: reading the newest body,
the durable status write (``write``), the log fields, and the pass skeleton; a kind supplies its pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import time
import zlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import ValidationError

from . import ownership, tenancy
from .config import Settings
from .fly import FlyClient
from .fly import set_log_context as set_fly_log_context
from .kube import KubeClient
from .metrics import PASSES_IN_FLIGHT
from .models import ObjectRef, WireModel
from .observe.protocol import Observer


def utcnow() -> datetime:
    return datetime.now(UTC)


class RetryLater(Exception):
    """The work could not finish now and must be retried after ``delay`` seconds (the handler maps it)."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


class Admission(Protocol):
    """A process-wide bound a pass waits for before it starts (an ``asyncio.Semaphore`` is one)."""

    async def acquire(self) -> Any: ...

    def release(self) -> None: ...


class PassGate:
    """At most ``limit`` routine passes at once, and a pass woken by news (the feed saw its machine change, a
    user changed its spec) goes before every pass woken by nothing but its timer or its first sight.

    A new leader sees 10,000 instances at once: unbounded, their first passes all became ready together, and
    the pass of an instance whose machine had just stopped took each of its steps behind all of them."""

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._routine: deque[asyncio.Future[None]] = deque()

    def lane(self, urgent: bool) -> Admission:
        return _Lane(self, urgent)

    @property
    def waiting(self) -> int:
        return len(self._urgent) + len(self._routine)

    async def acquire(self, urgent: bool) -> None:
        if self._free > 0 and not self._urgent and not self._routine:
            self._free -= 1
            return
        place: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._urgent if urgent else self._routine
        queue.append(place)
        try:
            await place
        except asyncio.CancelledError:
            if place.done() and not place.cancelled():
                self.release()  # handed a place just as it was cancelled: pass it on
            elif place in queue:
                # Not there when a release ran between the cancellation and now: it dropped the cancelled
                # place and handed the place on. (Raising here made a shutdown restart the driver loops.)
                queue.remove(place)
            raise

    def release(self) -> None:
        for queue in (self._urgent, self._routine):
            while queue:
                place = queue.popleft()
                if not place.done():
                    place.set_result(None)  # the place goes straight to the next pass
                    return
        self._free += 1


@dataclass(frozen=True)
class _Lane:
    gate: PassGate
    urgent: bool

    async def acquire(self) -> None:
        await self.gate.acquire(self.urgent)

    def release(self) -> None:
        self.gate.release()


@dataclass
class Context:
    """Everything a driver needs from the outside world; built once at start-up."""

    settings: Settings
    fly: FlyClient
    kube: KubeClient
    observer: Observer
    clock: Callable[[], datetime] = utcnow
    # Claims of a (flyApp, sandboxId) are checked and recorded one at a time (see ownership.py).
    claims: asyncio.Lock = field(default_factory=asyncio.Lock)
    claim_book: ownership.ClaimBook = field(init=False)
    # Passes that provision at once (see ObjectDriver.admission), and as many again that may wait aside
    # without it (see ObjectDriver.aside).
    provisioning: asyncio.Semaphore = field(init=False)
    provisioning_aside: asyncio.Semaphore = field(init=False)
    # Passes over settled instances (see PassGate).
    passes: PassGate = field(init=False)
    # Which Fly apps and image repositories each namespace is bound to (tenancy.py).
    bindings: tenancy.NamespaceBindings = field(init=False)
    # The claims already held when this process started (one listing instead of a read per instance).
    claim_listing: tenancy.ClaimListing = field(init=False)
    #: The recovery budget and mass-failure brake (brake.py); None: none (set at start-up by run.Runtime).
    brake: Any = None

    def __post_init__(self) -> None:
        self.claim_book = ownership.ClaimBook(self.kube.instance_pages)
        self.bindings = tenancy.NamespaceBindings(self.kube.get_namespace, time.monotonic)
        self.claim_listing = tenancy.ClaimListing(self.kube, time.monotonic)
        self.provisioning = asyncio.Semaphore(self.settings.provisioning_concurrency)
        self.provisioning_aside = asyncio.Semaphore(self.settings.provisioning_concurrency)
        self.passes = PassGate(self.settings.pass_concurrency)


def merge_patch(old: Any, new: Any) -> Any:
    """RFC 7386 patch turning ``old`` into ``new``: nested dicts diffed, removed keys set to null."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def resource_version(body: dict[str, Any]) -> int:
    try:
        return int(body.get("metadata", {}).get("resourceVersion", 0))
    except (TypeError, ValueError):
        return 0


class KindModel(Protocol):
    """What the loop needs of a kind's model (``Instance``, ``RetainedVolume``)."""

    @property
    def ref(self) -> ObjectRef: ...

    @property
    def status(self) -> WireModel: ...

    @property
    def deleting(self) -> bool: ...


M = TypeVar("M", bound=KindModel)


#: zlib's fastest level: a body of ~1.5 KB of JSON keeps ~0.7 KB.
BODY_COMPRESSION = 1

#: The context of the drivers' timers: empty, as their loops' (see ``DriverRegistry.running``).
_EMPTY = contextvars.Context()


@dataclass
class ObjectDriver(ABC, Generic[M]):
    namespace: str
    name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ctx: Context = field(kw_only=True)
    # The newest body as compact JSON, compressed, with the two things every watch event compares: ~0.7 KB
    # per object instead of ~5 KB of dicts and strings, or 1.5 KB of JSON (at 10,000 objects the largest part
    # of what the operator keeps; a pass decompresses it once, in microseconds).
    _body: bytes | None = field(default=None, init=False, repr=False)
    _version: int = field(default=0, init=False, repr=False)
    _signature: tuple[Any, ...] = field(default=(), init=False, repr=False)
    # What the metrics count of the newest body (``tally``), kept so that a scrape decodes no body.
    _tally: tuple[Any, ...] | None = field(default=None, init=False, repr=False)
    # Wake-ups and the stop request are two flags. Between passes a driver has no task: only a timer for its
    # next pass, and what starts its loop again (set by its registry); a wake-up cancels the timer and starts
    # it at once. A sleeping task, its coroutines' frames and a future were ~1.8 KB per object, and at 10,000
    # objects nearly all of them sleep.
    _woken: bool = field(default=False, init=False, repr=False)
    # Whether the next pass was asked for by news (see PassGate).
    _urgent: bool = field(default=False, init=False, repr=False)
    _stopping: bool = field(default=False, init=False, repr=False)
    _idle_timer: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)
    _resume: Callable[[], None] | None = field(default=None, init=False, repr=False)
    # The admission the current pass holds (``admission``), given up while it steps ``aside``.
    _admitted: Admission | None = field(default=None, init=False, repr=False)
    # Set while the pass steps ``aside``: what a stop request calls to end the wait at once.
    _interrupt: Callable[[], None] | None = field(default=None, init=False, repr=False)

    @property
    def known(self) -> bool:
        """Whether a body of the object has been seen."""
        return self._body is not None

    @property
    def latest(self) -> dict[str, Any] | None:
        """The newest body known (decoded on each read: a pass reads it once)."""
        return None if self._body is None else json.loads(zlib.decompress(self._body))

    #: The kind's logger, and how its objects are named in messages.
    logger: ClassVar[logging.Logger] = logging.getLogger("kiloclaw")
    kind: ClassVar[str] = "object"

    # --- what a kind supplies ---------------------------------------------------------------------------

    @abstractmethod
    def read(self, body: dict[str, Any]) -> M:
        """The kind's model of a body."""
        ...

    @abstractmethod
    def log_fields(self, obj: M) -> dict[str, Any]:
        """The structured fields of every log record about ``obj``."""
        ...

    @abstractmethod
    async def patch_status(self, ref: ObjectRef, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource; returns the object as the API server stored it."""
        ...

    @abstractmethod
    def recheck_delay(self) -> float:
        """Seconds until the next pass when this one may not act (no body yet, unreadable, being deleted)."""
        ...

    @abstractmethod
    async def reconcile(self, obj: M) -> float:
        """One pass over ``obj`` (under the lock); returns seconds until the next pass."""
        ...

    def admission(self, body: dict[str, Any], urgent: bool) -> Admission | None:
        """The process-wide bound a pass over ``body`` waits for before it starts, if any (taken before the
        lock and before the body is read into a model, so a waiting pass holds neither); ``urgent``: the pass
        was asked for by news."""
        return None

    def release_admission(self) -> None:
        """The pass goes on without its admission (what follows has a bound of its own: a recovery's is the
        budget), so that other passes are not held up behind it."""
        gate, self._admitted = self._admitted, None
        if gate is not None:
            gate.release()

    def prerequisite(self, body: dict[str, Any]) -> Awaitable[None] | None:
        """What a pass over ``body`` awaits before it begins, if anything (awaited before the admission, with
        nothing of the body held: thousands of passes may wait at once)."""
        return None

    def waiting_room(self, gate: Admission) -> asyncio.Semaphore | None:
        """The places for passes that wait ``aside`` without ``gate`` (None: unbounded)."""
        if self.ctx is not None and gate is self.ctx.provisioning:
            return self.ctx.provisioning_aside
        return None

    @contextlib.asynccontextmanager
    async def aside(self, interrupt: Callable[[], None]) -> AsyncIterator[Callable[[], bool]]:
        """The pass waits for something outside it (news of a machine it just created): its admission goes to
        another pass, and the rest of the pass (a status write) goes on without it; a stop request calls
        ``interrupt`` (the wait ends at once). Yields whether the driver was asked to stop.

        Only while a place among the waiting passes is free (``waiting_room``): a waiting pass holds its
        models, its Fly answers and its frames (~40 KB), and at 10,000 new instances thousands of them waited
        at once when the feed's news came late; past that bound a pass waits holding its admission, which
        slows the admission of new passes instead.

        The admission is not taken back after the wait: a pass that took it back waited for it behind every
        new pass, holding all of that, and since it left the waiting room first, the room's bound did not
        hold them (1,800 such passes, 73 MiB, at half of 4,000 new instances on the real API server)."""
        gate = self._admitted
        room = self.waiting_room(gate) if gate is not None else None
        if gate is not None and room is not None and room.locked():
            gate = None  # no free place: keep the admission while waiting
        self._interrupt = interrupt
        if gate is not None:
            self._admitted = None
            if room is not None:
                await room.acquire()  # free (checked above): returns at once
            gate.release()
        try:
            yield self.stopping
        finally:
            self._interrupt = None
            if gate is not None and room is not None:
                room.release()

    @abstractmethod
    def tally(self, body: dict[str, Any]) -> tuple[Any, ...]:
        """What the objects metrics count of a body (metrics.py)."""
        ...

    def work_signature(self, body: dict[str, Any]) -> tuple[Any, ...]:
        """What in a body asks the driver for a pass; other changes (echoes of our own status writes, kopf's
        bookkeeping patches) wake nobody, since each wasted pass costs a Fly call."""
        meta = body.get("metadata", {})
        return (meta.get("generation"), bool(meta.get("deletionTimestamp")))

    def offer(self, body: dict[str, Any], *, own_write: bool = False) -> bool:
        """Keep whichever is newer, a watch event's body or our own last write's response; return whether
        the body asks for work. At an equal ``resourceVersion`` (the same object as stored) the body kept
        stays: the watch event of our own write is not encoded again (four of a new instance's nine bodies).
        Without a version (0), only our own write's response gives way to a body offered later."""
        newer = resource_version(body)
        if self._body is not None and (
            newer < self._version or (newer == self._version and (own_write or newer > 0))
        ):
            return False
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and "managedFields" in metadata:
            # A real API server's server-side-apply bookkeeping: often the largest part of a body, never read.
            body = {**body, "metadata": {k: v for k, v in metadata.items() if k != "managedFields"}}
        first = self._body is None
        previous = self._signature
        self._body = zlib.compress(json.dumps(body, separators=(",", ":")).encode(), BODY_COMPRESSION)
        self._version = newer
        self._signature = self.work_signature(body)
        self._tally = self.tally(body)
        return first or previous != self._signature

    def wake(self, urgent: bool = True) -> None:
        """Ask for a pass now; ``urgent`` (news: a machine changed, a spec changed) unless it is the first
        sight of the object, which is routine work (see PassGate)."""
        self._woken = True
        self._urgent = self._urgent or urgent
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None:
            timer.cancel()
            if not self._stopping and self._resume is not None:
                self._resume()

    def stop(self) -> None:
        self._stopping = True
        self.wake()
        self._resume = None  # never started again (and no cycle through the registry is left)
        if self._interrupt is not None:
            self._interrupt()

    @property
    def idle(self) -> bool:
        """Whether the driver waits for its next pass without a loop running (a timer armed)."""
        return self._idle_timer is not None

    def _sleep(self, delay: float) -> None:
        """Between passes: the next one in ``delay`` seconds, or at a wake-up, by a new run of the loop."""
        if self._resume is None:
            raise RuntimeError(f"{self.kind} {self.namespace}/{self.name} sleeps with nothing to resume it")
        self._idle_timer = asyncio.get_running_loop().call_later(delay, self._wake_up, context=_EMPTY)

    def _wake_up(self) -> None:
        self.wake(urgent=False)

    def stopping(self) -> bool:
        """Whether the driver was asked to stop (its loop ends after the current pass)."""
        return self._stopping

    # --- the loop ---------------------------------------------------------------------------------------

    def current(self) -> M:
        body = self.latest
        if body is None:
            raise RuntimeError(f"{self.kind} {self.namespace}/{self.name} has no known body yet")
        return self.read(body)

    async def reconcile_once(self, admitted: Admission | None = None) -> float:
        """One pass under the lock; returns seconds until the next pass. ``admitted``: the admission the
        caller took for it, released when the pass ends (or sooner: ``release_admission``, ``aside``). It is
        the pass's only once the pass holds the lock: another pass (early, or deletion) may hold it now."""
        holding = admitted
        try:
            async with self.lock:
                self._admitted, holding = admitted, None
                try:
                    return await self._locked_pass()
                finally:
                    holding, self._admitted = self._admitted, None
        finally:
            if holding is not None:
                holding.release()

    async def _locked_pass(self) -> float:
        if self._body is None:
            return self.recheck_delay()
        try:
            obj = self.current()
        except ValidationError as exc:
            # The CRD schema should make this impossible; never let one bad object end its loop.
            self.logger.error("cannot read %s/%s: %s", self.namespace, self.name, exc)
            return self.recheck_delay()
        if obj.deleting:
            # The finalizer owns an object that is being deleted.
            return self.recheck_delay()
        set_fly_log_context(**self.log_fields(obj))
        in_flight = PASSES_IN_FLIGHT.labels(self.kind)
        in_flight.inc()
        try:
            return await self.reconcile(obj)
        finally:
            in_flight.dec()

    async def run(self) -> float | None:
        """Reconcile while there is work; returns the seconds until the next pass when the driver may sleep,
        or None once it was asked to stop (a stop ends the loop after the current pass; the registry cancels
        a pass in flight when the operator stops)."""
        while not self._stopping:
            # Cleared before the pass, not after: a change that arrives during a pass wakes the next one.
            self._woken = False
            urgent, self._urgent = self._urgent, False
            body = self.latest
            before = self.prerequisite(body) if body is not None else None
            gate = self.admission(body, urgent) if body is not None else None
            body = None  # not held while waiting for the prerequisite or the gate
            if before is not None:
                await before
                if self._stopping:
                    return None
            if gate is not None:
                await gate.acquire()
            delay = await self.reconcile_once(gate)
            if self._stopping:
                return None
            if not self._woken:
                return delay
        return None

    async def write(self, obj: M, status: WireModel, why: str) -> M:
        """The one durable status write: a merge patch from ``obj``'s stored status to ``status``; returns
        only once the API server has stored it, as the object it stored (kept as the latest body).

        ``why`` names the step that must survive a crash; it goes into the debug log with the write.
        """
        # Diff against what is stored (the fields present in the body), not the model's defaults: a new value
        # that equals a default (phase Pending, attempts 0) must still be written.
        before = obj.status.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_unset=True)
        patch = merge_patch(before, status.dump())
        if not patch:
            return obj
        body = await self.patch_status(obj.ref, patch)
        self.offer(body, own_write=True)
        self.logger.debug("status committed: %s", why, extra=self.log_fields(obj))
        return self.read(body)

    def forgotten(self) -> None:
        """The object is gone from the API server: stop, and drop what is kept about it."""
        self.stop()


D = TypeVar("D", bound=ObjectDriver[Any])


class DriverRegistry(Generic[D]):
    """The drivers of all known objects of one kind, keyed by namespace/name, and their loops: one task per
    object while it has work, started by the first watch event that names it, ended when the driver sleeps
    (a timer or a wake-up starts it again), when the object is forgotten (deleted) or when the operator
    stops. Not a kopf daemon per object: kopf's per-daemon machinery (coroutine chain, invocation context,
    stop flags, loggers) was ~20 KB per object: most of the memory at 10,000."""

    def __init__(self, make: Callable[[str, str], D]) -> None:
        self._make = make
        self._drivers: dict[tuple[str, str], D] = {}
        self._loops: dict[tuple[str, str], asyncio.Task[None]] = {}

    def get(self, namespace: str, name: str) -> D:
        key = (namespace, name)
        driver = self._drivers.get(key)
        if driver is None:
            driver = self._drivers[key] = self._make(namespace, name)
            driver._resume = functools.partial(self._start, key, driver)
        return driver

    def running(self, namespace: str, name: str) -> D:
        """The object's driver, its loop started if it is neither running nor asleep until its next pass."""
        driver = self.get(namespace, name)
        key = (namespace, name)
        if key not in self._loops and not driver.idle and not driver.stopping():
            self._start(key, driver)
        return driver

    def _start(self, key: tuple[str, str], driver: D) -> None:
        """Run the driver's loop until it sleeps (or stops); a wake-up or its timer starts it again."""
        # In a context of its own: a task copies the current one, and here that may be kopf's handler context,
        # which holds the first watch event's cause, body and logger for as long as the loop runs. So does a
        # done-callback (it keeps a copy of the context it was added in): both get the empty one.
        own = contextvars.Context()
        task = asyncio.get_running_loop().create_task(
            _keep_running(driver), name=f"{key[0]}/{key[1]}", context=own
        )
        self._loops[key] = task
        task.add_done_callback(functools.partial(self._loop_ended, key), context=own)

    def _loop_ended(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        if self._loops.get(key) is task:
            del self._loops[key]

    async def aclose(self) -> None:
        """Stop every loop now, a pass in flight included (cancelled where it stands: what it leaves is what a
        crash leaves, which every step is written to survive; a graceful stop ends no sooner than kopf's)."""
        for driver in self._drivers.values():
            driver.stop()
        loops = list(self._loops.values())
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    def find(self, namespace: str, name: str) -> D | None:
        """The driver of a known object, without creating one."""
        return self._drivers.get((namespace, name))

    def forget(self, namespace: str, name: str) -> None:
        driver = self._drivers.pop((namespace, name), None)
        if driver is not None:
            driver.forgotten()

    def __len__(self) -> int:
        return len(self._drivers)

    def tallies(self) -> list[tuple[Any, ...]]:
        """What the metrics count of every known object (``ObjectDriver.tally``; at scrape time, from another
        thread: the copy is taken in one step, and a resize racing it is simply retried)."""
        for _ in range(3):
            try:
                drivers = list(self._drivers.values())
            except RuntimeError:
                continue
            return [tally for tally in (driver._tally for driver in drivers) if tally is not None]
        return []


async def _keep_running(driver: ObjectDriver[Any]) -> None:
    """A driver's loop until it sleeps, restarted with backoff if a pass fails in a way no pass handles (a
    bug): one object's failure never stops the others, nor its own next attempts."""
    failures = 0
    while not driver.stopping():
        try:
            delay = await driver.run()
            if delay is not None and not driver.stopping():
                driver._sleep(delay)
            return
        except Exception:
            failures += 1
            delay = min(60.0, 2.0**failures)
            driver.logger.exception(
                "%s loop failed, restarting in %.0f s",
                driver.kind,
                delay,
                extra={"namespace": driver.namespace, "object": driver.name},
            )
            await asyncio.sleep(delay)
