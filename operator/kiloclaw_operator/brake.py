"""Mass failure without stampede or blind destruction (DESIGN 3.9): the recovery budget and the brake.

**Budget.** Recoveries in flight at once are bounded (``KILOCLAW_RECOVERY_CONCURRENCY``, default 32) and
begun at a paced rate (``KILOCLAW_RECOVERY_BEGIN_RATE`` per second, default 20, after a burst of
``KILOCLAW_RECOVERY_BEGIN_BURST``, default 32); every Fly call is also paced
under Fly's per-action limits by the client (fly/pacing.py), so a region's worth of recoveries queues here
instead of meeting 429s.

**Confirmation.** Every reported stop is confirmed by a read of the machine (``stops.handle_stop``: state,
``host_status`` and its exit event) before any destructive call, whatever the number of stops: a read is
cheap, and a wrong listing is exactly the case where many stop at once.

**Brake.** Confirmed stops that would begin a recovery, and separately every reported stop (confirmed or
refuted by its read: a listing that lies), are counted over a sliding window
(``KILOCLAW_BRAKE_WINDOW_SECONDS``, 300). When the count exceeds ``KILOCLAW_BRAKE_PAUSE_STOPS`` (200), or a
share ``KILOCLAW_BRAKE_PAUSE_SHARE`` (0.2) of the instances this operator knows (drives, or its feed listed at
start; only once it knows at least ``KILOCLAW_BRAKE_MIN_INSTANCES``, 50), the brake engages: new recoveries
pause (each instance is ``Stalled``, reason ``RecoveryPaused``, and looks again every
``KILOCLAW_SOURCE_RECHECK_SECONDS``, or at once when the brake is released), the gauge
``kiloclaw_recovery_brake_engaged`` is 1, the Lease ``kiloclaw-recovery-brake`` in the operator's namespace
carries the state and reason (cluster-wide), and each paused instance gets a Warning Event. Recoveries already
in flight go on. Why: that many confirmed stops at once is a region or platform event, where blind relocation
can cost more than it saves (capacity elsewhere, snapshot data loss, a Fly incident that makes reads lie too);
a person decides. ``kubectl kiloclaw rearm`` releases it (the operator reads the Lease every 2 s while
engaged): recoveries proceed (through the budget) and the brake stays released until a whole window passes
without a confirmed stop, then arms itself again for the next incident.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .config import Settings
from .kube import KubeClient, KubeError
from .metrics import RECOVERY_BRAKE_ENGAGED

logger = logging.getLogger("kiloclaw.brake")

BRAKE_LEASE = "kiloclaw-recovery-brake"
STATE_ANNOTATION = "kiloclaw.kilo.ai/brake-state"
REASON_ANNOTATION = "kiloclaw.kilo.ai/brake-reason"
CHANGED_AT_ANNOTATION = "kiloclaw.kilo.ai/brake-changed-at"
#: Brake states on the Lease: the operator writes Armed/Engaged, ``kubectl kiloclaw rearm`` writes Released.
ARMED, ENGAGED, RELEASED = "Armed", "Engaged", "Released"
_LEASE_READ_SECONDS = 2.0


class RecoveryBrake:
    """Process-wide: counts confirmed stops, pauses new recoveries past the threshold, paces their begin."""

    def __init__(
        self,
        settings: Settings,
        kube: KubeClient | None,
        namespace: str,
        instances: Callable[[], int],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._kube = kube
        self._namespace = namespace
        self._instances = instances
        self._monotonic = monotonic
        self._stops: deque[float] = deque()
        #: Every reported stop, confirmed or not (a listing that lies reports many that reads refute).
        self._reported: deque[float] = deque()
        self.state = ARMED
        self.reason = ""
        self._lease_read_at = float("-inf")
        self.slots = asyncio.Semaphore(settings.recovery_concurrency)
        self._next_begin = 0.0
        self._pace = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        #: The paused instances' wake-ups, run when an admin releases the brake (keyed by instance, so a
        #: paused instance that looks again is held once).
        self._paused: dict[tuple[str, str], Callable[[], None]] = {}

    def threshold(self) -> int:
        """Stops within the window above which the brake engages."""
        limit = self._settings.brake_pause_stops
        total = self._instances()
        if total >= self._settings.brake_min_instances:
            limit = min(limit, max(1, int(total * self._settings.brake_pause_share)))
        return limit

    async def note_reported(self) -> None:
        """A stop was reported (before the read that confirms or refutes it). Many at once engage the brake
        too: a listing that reports a fifth of the fleet stopped is an incident even if the reads refute it
        (they protect the machines; the brake tells a person and pauses the recoveries of any real ones)."""
        now = self._monotonic()
        window = self._settings.brake_window_seconds
        if self.state == ENGAGED:
            await self._read_lease()  # released by an admin since?
        await self._prune_and_rearm(now)
        self._reported.append(now)
        if self.state == ARMED and len(self._reported) > self.threshold():
            await self._engage(
                f"{len(self._reported)} reported unexpected stops within {window:g}s "
                f"(threshold {self.threshold()} of {self._instances()} instances; each is confirmed by a "
                "read before anything is destroyed): new recoveries are paused; check Fly's status and the "
                "kiloclaw_stop_verdicts_total metric, then re-arm with `kubectl kiloclaw rearm`"
            )

    async def _prune_and_rearm(self, now: float) -> None:
        window = self._settings.brake_window_seconds
        for stops in (self._stops, self._reported):
            while stops and stops[0] < now - window:
                stops.popleft()
        if self.state == RELEASED and not self._stops and not self._reported:
            # A whole window without a stop: the incident is over, the brake guards the next one.
            self.state = ARMED
            await self._write_lease(ARMED, "")

    async def _engage(self, reason: str) -> None:
        self.state = ENGAGED
        self.reason = reason
        logger.error("recovery brake engaged: %s", reason)
        RECOVERY_BRAKE_ENGAGED.set(1)
        await self._write_lease(ENGAGED, reason)
        if self._kube is not None and (self._watch is None or self._watch.done()):
            self._watch = asyncio.create_task(self._watch_for_release(), name="kiloclaw-brake-release")

    async def _watch_for_release(self) -> None:
        """While engaged, read the Lease every few seconds: an admin's re-arm takes effect at once, not at the
        next reported stop (which may be the next incident's first, counted against a brake still engaged)."""
        while self.state == ENGAGED:
            await asyncio.sleep(_LEASE_READ_SECONDS)
            await self._read_lease()

    async def admit(self, instance: Any, wake: Callable[[], None] | None = None) -> str | None:
        """Count this confirmed stop; None: the recovery may begin; else why it is paused (and ``wake`` is
        called when an admin releases the brake, so the instance does not wait for its next look)."""
        now = self._monotonic()
        window = self._settings.brake_window_seconds
        if self.state == ENGAGED:
            await self._read_lease()
        await self._prune_and_rearm(now)
        if self.state != ENGAGED:
            self._stops.append(now)
        count = len(self._stops)
        if self.state == ARMED and count > self.threshold():
            await self._engage(
                f"{count} confirmed unexpected stops within {window:g}s (threshold {self.threshold()} of "
                f"{self._instances()} instances): new recoveries are paused; check Fly's status, then re-arm "
                "with `kubectl kiloclaw rearm`"
            )
        if self.state == ENGAGED:
            if wake is not None:
                self._paused[(instance.ref.namespace, instance.ref.name)] = wake
            return self.reason
        return None

    async def paced_begin(self) -> None:
        """Wait for this recovery's turn: a token bucket of ``recovery_begin_burst`` refilled at
        ``recovery_begin_rate`` per second, in virtual-scheduling form (``_next_begin`` is when the bucket
        would be full again; a caller waits until it is at most a burst's worth of turns ahead)."""
        interval = 1.0 / self._settings.recovery_begin_rate
        tolerance = (self._settings.recovery_begin_burst - 1) * interval
        async with self._pace:
            now = self._monotonic()
            turn = max(now, self._next_begin)
            wait = turn - tolerance - now
            self._next_begin = turn + interval
        if wait > 1e-9:  # the sums' rounding, not a turn to wait for
            await asyncio.sleep(wait)

    # --- the cluster-wide record (a Lease: the operator already owns Leases in its namespace) -----------

    async def _read_lease(self) -> None:
        now = self._monotonic()
        if self._kube is None or now - self._lease_read_at < _LEASE_READ_SECONDS:
            return
        self._lease_read_at = now
        try:
            lease = await self._kube.get_lease(self._namespace, BRAKE_LEASE)
        except KubeError as exc:
            logger.warning("cannot read the brake Lease: %s", exc)
            return
        annotations = ((lease or {}).get("metadata") or {}).get("annotations") or {}
        # Reads overlap when the API server is slow: only the first that finds the release acts on it.
        if annotations.get(STATE_ANNOTATION) == RELEASED and self.state == ENGAGED:
            logger.warning("recovery brake released by an admin: recoveries proceed")
            self.state = RELEASED
            self.reason = ""
            RECOVERY_BRAKE_ENGAGED.set(0)
            paused, self._paused = self._paused, {}
            for wake in paused.values():
                wake()

    async def _write_lease(self, state: str, reason: str) -> None:
        if self._kube is None:
            return
        annotations = {
            STATE_ANNOTATION: state,
            REASON_ANNOTATION: reason,
            CHANGED_AT_ANNOTATION: datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        try:
            lease = await self._kube.get_lease(self._namespace, BRAKE_LEASE)
            if lease is None:
                await self._kube.create_lease(
                    self._namespace,
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": BRAKE_LEASE, "annotations": annotations},
                        "spec": {},
                    },
                )
                return
            metadata = lease.setdefault("metadata", {})
            metadata["annotations"] = {**(metadata.get("annotations") or {}), **annotations}
            await self._kube.replace_lease(self._namespace, BRAKE_LEASE, lease)
        except KubeError as exc:
            logger.warning("cannot record the brake state on its Lease: %s", exc)
