"""What a driver needs from an observer of Fly: the seam between the reconciler and where observed state comes
from (``polling.PollingObserver``, ``feed.FeedObserver``). The reconciler knows this protocol only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from ..fly.models import Machine
from ..lifecycle import Observation
from ..models import Instance

#: How a pass steps aside while it waits for news outside it (``ObjectDriver.aside``): given what to call
#: when the driver is asked to stop meanwhile, it gives up the pass's admission until the wait ends and
#: yields whether the driver was asked to stop.
Aside = Callable[[Callable[[], None]], AbstractAsyncContextManager[Callable[[], bool]]]


@dataclass(frozen=True, slots=True)
class MachineState:
    """The newest known state of one machine, stamped with Fly's ``updated_at``.

    Fly's ``updated_at`` has whole seconds: two changes in one second carry the same stamp. A different state
    at the same stamp is kept as news, but ``ambiguous`` (which of the two is newer cannot be told from the
    listing): the driver reads the machine itself before acting on it."""

    state: str
    updated_at: datetime
    ambiguous: bool = False

    def newer_than(self, other: MachineState | None) -> bool:
        """News compared with ``other``: a later stamp, or another state at the same stamp."""
        if other is None:
            return True
        if self.updated_at != other.updated_at:
            return self.updated_at > other.updated_at
        return self.state != other.state


class Observer(Protocol):
    """Where observed Fly state comes from: per-instance polling, or the organisation feed."""

    async def observe(self, instance: Instance) -> tuple[Observation, Machine | None]: ...

    def until_ready(self) -> Awaitable[None] | None:
        """What a pass over an instance with a machine awaits before it begins, holding nothing of it (the
        feed's first listing after a start); None: observing can begin now."""
        ...

    def next_pass(self, instance: Instance) -> float:
        """Seconds until the instance's next pass, given the phase it is in (a wake-up may come first)."""
        ...

    def instances_listed(self) -> int:
        """How many instances of this operator's namespaces the observer listed at start (the feed's first
        window; 0 before it, and for an observer that lists none): a new leader may drive only a few of
        them yet."""
        ...

    async def settled_start(self, machine_id: str, aside: Aside) -> MachineState | None:
        """Right after a create, before the machine's id is written: what is known of it once it settled
        (started, or anything but on its way there), waiting for that at most a short while, stepped
        ``aside``; None: nothing known. An observer whose next step would be a Fly call never waits (the id
        must be written first)."""
        ...

    def acted_on(self, machine_id: str, change: MachineState) -> None:
        """The driver recorded ``change`` itself (with the machine's id): it is no news to its next pass."""
        ...

    def forget(self, namespace: str, name: str) -> None:
        """The instance is gone: drop whatever is kept about it and its machine."""
        ...
