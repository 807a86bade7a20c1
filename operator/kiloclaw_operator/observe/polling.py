"""Observation by polling: one ``GET /machines/{id}`` per instance per pass (DESIGN 3.2), used without
``FLY_ORG_SLUG``."""

from __future__ import annotations

import random

from .. import lifecycle
from ..config import Settings
from ..fly import AppNotFound, Fatal, FlyClient, FlyError, NotFound, Unauthorized
from ..fly import vocabulary as fly
from ..fly.models import Machine
from ..lifecycle import Observation
from ..models import Instance, Phase
from .protocol import Aside, MachineState

#: What ``Starting``/``Stopping`` wait for with Fly's ``/wait`` (any settled state ends the wait).
_WAIT_STATES = {
    Phase.STARTING: (fly.STARTED, fly.STOPPED, fly.FAILED, fly.DESTROYED),
    Phase.STOPPING: (fly.STOPPED, fly.FAILED, fly.SUSPENDED, fly.DESTROYED),
}


class PollingObserver:
    """Observes an instance by ``GET /machines/{id}``; read paths never change the phase.

    ``Starting`` and ``Stopping`` first long-poll Fly's ``/wait`` (at most the busy cadence, so that deletion
    never waits long for the driver), which answers the moment the machine gets there."""

    def __init__(self, fly: FlyClient, settings: Settings) -> None:
        self._fly = fly
        self._settings = settings

    def until_ready(self) -> None:
        return None  # every pass reads its own machine

    def instances_listed(self) -> int:
        return 0  # kopf's listing creates every driver

    def next_pass(self, instance: Instance) -> float:
        if instance.status.phase in _WAIT_STATES:
            # The next pass long-polls /wait, which paces it: come back soon, not after a busy interval.
            return min(self._settings.poll_busy_seconds, 1.0) * random.uniform(0.9, 1.1)
        return lifecycle.poll_interval(instance.status.phase, self._settings)

    async def observe(self, instance: Instance) -> tuple[Observation, Machine | None]:
        machine_id = instance.status.machine_id
        if machine_id is None:
            return Observation.no_machine(), None
        waited_for = _WAIT_STATES.get(instance.status.phase)
        if waited_for is not None and not lifecycle.has_unobserved_generation(instance):
            try:
                seconds = max(
                    1, min(self._settings.wait_call_seconds, round(self._settings.poll_busy_seconds))
                )
                state = await self._fly.wait_for_states(
                    instance.spec.fly_app, machine_id, waited_for, timeout_seconds=seconds
                )
            except FlyError as exc:
                return _failed_read(exc), None
            if state is not None and state != fly.DESTROYED:
                return Observation.found(state), None
            if state is None and instance.status.phase is Phase.STARTING:
                # Not started, stopped or failed yet: still on its way, nothing to decide.
                return Observation.unknown("still starting"), None
        try:
            machine = await self._fly.get_machine(instance.spec.fly_app, machine_id)
        except FlyError as exc:
            return _failed_read(exc), None
        if machine.is_destroyed:
            return Observation.gone(), machine
        in_sync = lifecycle.config_in_sync(instance.spec, machine.config)
        return Observation.found(machine.state, config_in_sync=in_sync), machine

    async def settled_start(self, machine_id: str, aside: Aside) -> MachineState | None:
        """Never waits: the next step is a Fly call (``/wait``), so the machine's id must be written first."""
        return None

    def acted_on(self, machine_id: str, change: MachineState) -> None:
        """Nothing is kept between passes."""

    def forget(self, namespace: str, name: str) -> None:
        """Nothing is kept between passes."""


def _failed_read(exc: FlyError) -> Observation:
    """What a failed read of the machine says: gone on a 404, nothing (unknown) on a transient failure. An
    unauthorized token or a rejected request is not an observation: re-raised for the driver."""
    if isinstance(exc, AppNotFound | Unauthorized | Fatal):
        raise exc
    if isinstance(exc, NotFound):
        return Observation.gone()
    return Observation.unknown(str(exc))
