"""Two replicas, one active: leader election on a ``coordination.k8s.io/v1`` Lease (DESIGN 3.7).

Only the leader runs kopf: the standby watches nothing, makes no changing Fly call and writes nothing; it
reads the Lease, and (with the feed) once the leader has missed its renewals for a while it prepares the
feed's first window for the leader it may become (``silence``; observe/standby.py). The protocol is
client-go's (``k8s.io/client-go/tools/leaderelection``):

- A candidate reads the Lease every retry period. It takes the Lease when there is none, when nobody holds it
  (released on a graceful shutdown), when it holds it already (the restarted container of the same pod), or
  when the record has not changed for ``leaseDurationSeconds`` *measured on the candidate's own clock from
  when it first saw that record* — clocks of different nodes are never compared.
- Every write carries the resourceVersion it read, so two candidates racing for an expired Lease cannot both
  win (the API server answers 409 to the second).
- The leader renews every retry period. When no renewal succeeded for the renew deadline (shorter than the
  lease duration), it stops acting at once — before any standby may consider the Lease expired — and the
  process exits so that its pod restarts as a standby.
- On a graceful shutdown the leader first stops kopf (in-flight steps end, each recorded), then releases the
  Lease (holder cleared), so the standby takes over within one retry period instead of a lease duration.

- Renewals run on an event loop of their own, in a thread (``ElectionLoop``), as client-go renews in a
  goroutine of its own: a burst of work on the operator's loop (thousands of instances starting at once) must
  not delay them past the renew deadline. The operator's loop proves it is alive with a heartbeat; the
  elector stops renewing for a loop whose last beat is older than ``KILOCLAW_LOOP_STALL_SECONDS`` (a loop that
  has really stopped, not merely fallen behind), so a hung leader still hands over. The fence (``acting``)
  reads the monotonic time of the last renewal, wherever it was made.

After a SIGKILL the standby takes over at most ``lease duration + retry period`` after the leader's last
renewal (it reads the Lease every retry period, and once more at the moment the record it waits on expires);
with the defaults (8 s, 1 s) that is about 9 s, plus kopf's start. The new leader's drivers read
every instance's status and resume in-flight recoveries from their recorded step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .config import Settings
from .kube import KubeConflict, KubeError
from .metrics import EVENT_LOOP_LAG, LEADER

logger = logging.getLogger("kiloclaw.leadership")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class LeadershipLost(Exception):
    """The leader could not renew its Lease in time: it stopped acting, and the process must exit."""


class LeaseStore(Protocol):
    """The three Lease calls the elector makes (KubeClient implements them)."""

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...

    async def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    name: str
    identity: str
    duration_seconds: int
    renew_deadline_seconds: float
    retry_period_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> LeaseConfig:
        return cls(
            namespace=settings.lease_namespace or default_lease_namespace(),
            name=settings.lease_name,
            identity=settings.lease_identity or default_identity(),
            duration_seconds=settings.lease_duration_seconds,
            renew_deadline_seconds=settings.lease_renew_deadline_seconds,
            retry_period_seconds=settings.lease_retry_period_seconds,
        )


def default_lease_namespace() -> str:
    """In a pod, its ServiceAccount's namespace (where deploy/ grants the Lease); elsewhere ``default``."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def default_identity() -> str:
    """Host name (the pod name) and process id: stable across restarts of the pod's container (pid 1), so a
    restarted leader takes its own Lease back at once, yet distinct for two processes on one laptop."""
    return f"{socket.gethostname()}_{os.getpid()}"


def micro_time(moment: datetime | None = None) -> str:
    """``metav1.MicroTime`` as the API server writes it."""
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- the decision (pure) --------------------------------------------------------------------------------


class Claim(Enum):
    """What a candidate may do with the Lease it has just read."""

    CREATE = "create"  # there is no Lease
    TAKE = "take"  # free, ours already, or expired: write ourselves in
    WAIT = "wait"  # another holder whose record is still fresh


def claim(record: dict[str, Any] | None, identity: str, unchanged_for: float) -> Claim:
    """``unchanged_for``: seconds on this candidate's clock since it first saw this exact record."""
    if record is None:
        return Claim.CREATE
    spec = record.get("spec") or {}
    holder = spec.get("holderIdentity") or ""
    if not holder or holder == identity:
        return Claim.TAKE
    duration = spec.get("leaseDurationSeconds") or 0
    return Claim.TAKE if unchanged_for >= duration else Claim.WAIT


def lease_body(
    config: LeaseConfig, previous: dict[str, Any] | None, *, holder: str, now: datetime
) -> dict[str, Any]:
    """The Lease to write: renewing keeps acquireTime, a new holder counts a transition."""
    spec = (previous or {}).get("spec") or {}
    previous_holder = spec.get("holderIdentity") or ""
    same_holder = bool(holder) and previous_holder == holder
    metadata: dict[str, Any] = {"name": config.name, "namespace": config.namespace}
    if previous is not None:
        metadata["resourceVersion"] = previous["metadata"]["resourceVersion"]
    transitions = int(spec.get("leaseTransitions") or 0)
    if holder and previous_holder and not same_holder:
        transitions += 1
    new_spec: dict[str, Any] = {
        "leaseDurationSeconds": config.duration_seconds,
        "leaseTransitions": transitions,
        "renewTime": micro_time(now),
        "acquireTime": spec.get("acquireTime") if same_holder else micro_time(now),
    }
    if holder:
        new_spec["holderIdentity"] = holder
    else:
        # Released (client-go's ReleaseOnCancel): no holder, and a 1 s duration for older candidates.
        new_spec["leaseDurationSeconds"] = 1
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": new_spec,
    }


# --- the elector ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Silence:
    """The Lease record a standby last saw another replica hold, and how long it has not changed."""

    version: str
    seconds: float


class LeaderElector:
    def __init__(
        self,
        leases: LeaseStore,
        config: LeaseConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        loop_alive: Callable[[], bool] | None = None,
    ) -> None:
        self._leases = leases
        #: Whether the operator's event loop still makes progress (set when renewals run on a loop of their
        #: own); None: renewals share the operator's loop, so a stalled loop cannot renew anyway.
        self.loop_alive = loop_alive
        self.config = config
        self._clock = clock
        self.is_leader = False
        self._seen_version: str | None = None
        self._seen_at = 0.0
        #: (resourceVersion, holder, first seen at) of the record last read, as one value: a standby's
        #: operator loop reads it from another thread (``silence``).
        self._seen: tuple[str | None, str, float] = (None, "", 0.0)
        self._seen_duration = 0.0
        self._last_renewal = 0.0
        self._ours: dict[str, Any] | None = None  # the Lease as we last wrote it
        self._released = False  # set by release(): no renewal may follow it

    @property
    def _lease_ref(self) -> str:
        return f"{self.config.namespace}/{self.config.name}"

    def _observe(self, record: dict[str, Any] | None) -> float:
        """Remember when this record was first seen; return for how long it has not changed."""
        now = self._clock()
        version = None if record is None else record["metadata"].get("resourceVersion")
        if version != self._seen_version:
            self._seen_version, self._seen_at = version, now
            spec = (record or {}).get("spec") or {}
            self._seen_duration = float(spec.get("leaseDurationSeconds") or 0)
            self._seen = (version, spec.get("holderIdentity") or "", now)
        return now - self._seen_at

    def silence(self) -> Silence | None:
        """For a standby: the record another replica holds the Lease with, and for how long it has not
        changed (the leader renews every retry period); None while this process leads or nobody holds the
        Lease. Read from the operator's loop while the elector runs on its own (plain attribute reads)."""
        version, holder, seen_at = self._seen
        if self.is_leader or version is None or not holder or holder == self.config.identity:
            return None
        return Silence(version, self._clock() - seen_at)

    async def try_acquire_or_renew(self) -> bool:
        """One round: read the Lease and write ourselves in when the rules allow; True while we lead."""
        config = self.config
        if self._released:
            return False
        if self.loop_alive is not None and not self.loop_alive():
            # The operator's loop has stopped: holding the Lease for it would only keep the standby out.
            logger.warning(
                "not renewing: the operator's event loop has stopped making progress",
                extra={"lease": self._lease_ref, "identity": config.identity},
            )
            return False
        # A renewal counts from before its request: the API server may have written it at any moment until
        # the reply, so a slow reply must shrink the time left, never extend it (client-go times it so too).
        attempted_at = self._clock()
        if self.is_leader and self._ours is not None:
            # The leader's fast path (client-go's too): one update conditional on the resourceVersion we last
            # wrote, no read. It succeeds only if nobody wrote since, i.e. while we still hold the Lease; a
            # conflict falls through to the full round. One request per renewal, and the only Lease verb the
            # operator's FlowSchema (deploy/flowcontrol) lifts into the `leader-election` priority level.
            try:
                written = await self._leases.replace_lease(
                    config.namespace,
                    config.name,
                    lease_body(config, self._ours, holder=config.identity, now=datetime.now(UTC)),
                )
            except KubeConflict:
                pass
            except KubeError as exc:
                logger.warning(
                    "lease %s/%s: %s", config.namespace, config.name, exc, extra={"identity": config.identity}
                )
                return False
            else:
                self._ours = written
                self._observe(written)
                self._last_renewal = attempted_at
                return True
        try:
            record = await self._leases.get_lease(config.namespace, config.name)
            decision = claim(record, config.identity, self._observe(record))
            if decision is Claim.WAIT:
                self._set_leader(False)
                return False
            body = lease_body(config, record, holder=config.identity, now=datetime.now(UTC))
            if decision is Claim.CREATE:
                written = await self._leases.create_lease(config.namespace, body)
            else:
                written = await self._leases.replace_lease(config.namespace, config.name, body)
        except KubeConflict:
            return False  # another candidate wrote first; the next round reads what it wrote
        except KubeError as exc:
            logger.warning(
                "lease %s/%s: %s", config.namespace, config.name, exc, extra={"identity": config.identity}
            )
            return False
        self._ours = written
        self._last_renewal = attempted_at
        self._set_leader(True)
        return True

    def acting(self) -> bool:
        """Whether this process may still act as the leader: it holds the Lease and renewed it within the
        renew deadline (checked before every changing Fly call, so that a leader whose event loop fell behind
        its renewals stops before a standby can take over, not only when ``hold`` notices)."""
        return self.is_leader and self._clock() - self._last_renewal < self.config.renew_deadline_seconds

    def _set_leader(self, leader: bool) -> None:
        if leader != self.is_leader:
            logger.info(
                "became the leader" if leader else "not the leader",
                extra={"lease": self._lease_ref, "identity": self.config.identity},
            )
        self.is_leader = leader
        LEADER.set(1 if leader else 0)

    async def acquire(self) -> None:
        """Campaign until leader (cancel the call to give up)."""
        while True:
            if await self.try_acquire_or_renew():
                return
            await asyncio.sleep(self.next_attempt_in())

    def next_attempt_in(self) -> float:
        """A candidate's wait before its next round: the retry period, or less when the record it waits on
        expires sooner (it tries at that moment, not up to a retry period after it: a SIGKILLed leader's
        Lease is taken ~half a retry period sooner on average, and no request is added)."""
        retry = self.config.retry_period_seconds
        version, holder, seen_at = self._seen
        if self.is_leader or version is None or not holder:
            return retry
        expires_in = seen_at + self._seen_duration - self._clock()
        return min(retry, max(expires_in, 0.0))

    async def hold(self) -> None:
        """Renew every retry period; return as soon as leadership is lost (renew deadline passed, or another
        holder is in the Lease)."""
        config = self.config
        while True:
            await asyncio.sleep(config.retry_period_seconds)
            deadline = self._last_renewal + config.renew_deadline_seconds
            while True:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    self._lost("no renewal within the renew deadline")
                    return
                try:
                    async with asyncio.timeout(remaining):
                        renewed = await self.try_acquire_or_renew()
                except TimeoutError:
                    logger.warning(
                        "lease %s: no answer to the renewal within the %.1f s left of the renew deadline",
                        self._lease_ref,
                        remaining,
                        extra={"identity": config.identity},
                    )
                    renewed = False
                if renewed:
                    break
                if self._released:
                    return
                if not self.is_leader:
                    self._lost("another replica holds the lease")
                    return
                await asyncio.sleep(min(config.retry_period_seconds / 4, max(deadline - self._clock(), 0)))

    def _lost(self, why: str) -> None:
        logger.error(
            "leadership lost: %s",
            why,
            extra={"lease": self._lease_ref, "identity": self.config.identity},
        )
        self._set_leader(False)

    async def release(self) -> None:
        """Clear the holder so a standby takes over at once; best effort (the Lease expires anyway)."""
        self._released = True
        if not self.is_leader or self._ours is None:
            return
        self._set_leader(False)
        config = self.config
        record: dict[str, Any] | None = self._ours
        try:
            async with asyncio.timeout(config.renew_deadline_seconds):
                while record is not None:
                    body = lease_body(config, record, holder="", now=datetime.now(UTC))
                    try:
                        await self._leases.replace_lease(config.namespace, config.name, body)
                        break
                    except KubeConflict:
                        # A renewal of ours that was in flight when the renewals stopped landed first:
                        # release the Lease as it is now, if it is still ours.
                        record = await self._leases.get_lease(config.namespace, config.name)
                        holder = ((record or {}).get("spec") or {}).get("holderIdentity")
                        if holder != config.identity:
                            return
        except (KubeError, TimeoutError) as exc:
            logger.warning("could not release the lease: %s", exc)
            return
        logger.info("lease released", extra={"identity": config.identity})


# --- running the operator as leader ------------------------------------------------------------------------

Serve = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
T = TypeVar("T")


class ElectionLoop:
    """A thread with an event loop of its own, where the Lease is read, renewed and released. The Lease store
    the elector uses must be used on this loop only (its connections belong to it)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kiloclaw-election", daemon=True)

    def start(self) -> ElectionLoop:
        self._thread.start()
        return self

    def run(self, work: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Start ``work`` on the election loop now (not when the caller's loop next gets round to it); the
        returned future, of the caller's loop, gives its result, and cancelling it cancels the work."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self._loop))

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


class Heartbeat:
    """The operator's event loop proving that it runs: a beat every ``interval``; how far a beat fell behind
    its schedule is the loop's lag (the worst is kept, logged when it grows past a second, and exported)."""

    def __init__(self, interval: float = 0.25, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self.last = clock()
        self.max_lag = 0.0

    def age(self) -> float:
        return self._clock() - self.last

    async def run(self) -> None:
        while True:
            due = self._clock() + self.interval
            await asyncio.sleep(self.interval)
            self.last = self._clock()
            lag = max(self.last - due, 0.0)
            if lag > self.max_lag:
                if lag >= 1.0:
                    logger.warning("event loop fell %.1f s behind", lag, extra={"lag_seconds": round(lag, 3)})
                self.max_lag = lag
                EVENT_LOOP_LAG.set(lag)


async def lead(
    elector: LeaderElector, serve: Serve, stop: asyncio.Event, *, election: ElectionLoop | None = None
) -> None:
    """Campaign; once leader, ``serve(serve_stop)`` (kopf) until ``stop`` or until kopf ends by itself (it got
    SIGTERM), then release the Lease. Losing the Lease cancels ``serve`` at once and raises LeadershipLost.
    With ``election``, every Lease call runs on that loop, never behind the work of this one."""

    def elected(work: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        return election.run(work) if election is not None else asyncio.ensure_future(work)

    acquiring: asyncio.Future[Any] = elected(elector.acquire())
    stopping: asyncio.Future[Any] = asyncio.create_task(stop.wait(), name="kiloclaw-stop")
    await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not acquiring.done():
        acquiring.cancel()
        await asyncio.gather(acquiring, stopping, return_exceptions=True)
        return
    holding: asyncio.Future[Any] = elected(elector.hold())  # renewing before the operator's work starts
    serve_stop = asyncio.Event()
    serving: asyncio.Future[Any] = asyncio.create_task(serve(serve_stop), name="kiloclaw-leader")
    try:
        await asyncio.wait({serving, holding, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not holding.done():
            # Graceful: let kopf finish its in-flight steps while the Lease is still renewed.
            serve_stop.set()
            await asyncio.wait({serving, holding}, return_when=asyncio.FIRST_COMPLETED)
        if holding.done():
            serve_stop.set()  # kopf must not treat the cancellation as a signal (no ultimate SIGKILL)
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving
            raise LeadershipLost(f"lease {elector.config.namespace}/{elector.config.name} lost")
        holding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holding
        await elected(elector.release())
        serving.result()  # kopf's own failure, if any, after the Lease is released
    finally:
        for task in (serving, holding, stopping):
            task.cancel()
        await asyncio.gather(serving, holding, stopping, return_exceptions=True)
