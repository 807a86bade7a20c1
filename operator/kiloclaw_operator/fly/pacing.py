"""Client-side pacing that keeps the operator under Fly's rate limits by design, not by retrying 429s.

Fly limits each action per machine (or per app, for creates) to about 1 request/s with a burst of 3, and reads
of one machine to about 5 requests/s with a burst of 10. ``Pacer`` keeps one token bucket per (action,
subject) with a little less than that, so a request waits here, briefly, instead of being refused there;
and it bounds how many creates are in flight at once (an organisation-wide provisioning burst).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Pacer", "PacingLimits"]


@dataclass(frozen=True)
class PacingLimits:
    """Per-bucket rates (requests/s) and bursts; a little under Fly's documented limits by default."""

    action_rate: float = 0.9
    action_burst: int = 2
    read_rate: float = 4.5
    read_burst: int = 8
    max_concurrent_creates: int = 32


@dataclass
class _Bucket:
    tokens: float
    at: float


class Pacer:
    """Token buckets keyed by (action, subject), in virtual-scheduling form: a caller takes a token at once,
    going into debt if none is left, and sleeps until the debt would have been refilled. Callers of one key
    are thus spaced exactly by the rate, in arrival order, without a lock or a queue."""

    # Full buckets are forgotten once there are this many (an idle bucket and a missing one are the same).
    _PRUNE_AT = 4096

    def __init__(self, limits: PacingLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._creates = asyncio.Semaphore(limits.max_concurrent_creates)
        #: Seconds callers spent waiting here in total (a metric for the benchmark and the logs).
        self.waited_seconds = 0.0

    @property
    def creates(self) -> asyncio.Semaphore:
        """Held around every create: at most ``max_concurrent_creates`` in flight."""
        return self._creates

    def delay(self, action: str, subject: str, *, mutating: bool) -> float:
        """Take a token for one request now; return the seconds to wait before sending it."""
        if mutating:
            rate, burst = self.limits.action_rate, self.limits.action_burst
        else:
            rate, burst = self.limits.read_rate, self.limits.read_burst
        now = self._clock()
        key = (action, subject)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._PRUNE_AT:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(tokens=float(burst), at=now)
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.at) * rate) - 1.0
        bucket.at = now
        return -bucket.tokens / rate if bucket.tokens < 0 else 0.0

    async def wait(self, action: str, subject: str, *, mutating: bool) -> None:
        delay = self.delay(action, subject, mutating=mutating)
        if delay > 0:
            self.waited_seconds += delay
            await asyncio.sleep(delay)

    def _prune(self, now: float) -> None:
        limits = self.limits
        refill = max(limits.action_burst / limits.action_rate, limits.read_burst / limits.read_rate)
        self._buckets = {key: b for key, b in self._buckets.items() if now - b.at < refill}
