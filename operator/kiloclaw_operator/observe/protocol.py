"""What a driver needs from an observer of Fly: the seam between the reconciler and where observed state comes
from (polling.py, feed.py)."""

from __future__ import annotations

from typing import Protocol

from ..fly.models import Machine
from ..lifecycle import Observation
from ..models import Instance


class Observer(Protocol):
    """Where observed Fly state comes from: per-instance polling, or the organisation feed (feed.py)."""

    async def observe(self, instance: Instance) -> tuple[Observation, Machine | None]: ...

    def next_pass(self, instance: Instance) -> float:
        """Seconds until the instance's next pass, given the phase it is in (a wake-up may come first)."""
        ...
