"""The pure decision core of an instance's lifecycle: given what the API server says (spec, status) and what
Fly says (an ``Observation``), decide the next ``Action``. No I/O, no kopf, no clients: the reconciler
executes the decision.

The whole table is ``decide``; ``tests/unit/test_lifecycle_decide.py`` enumerates every phase × observation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from . import reasons
from .conditions import STALLED
from .config import Settings
from .fly import vocabulary as fly
from .fly.models import Guest, MachineConfig, Mount, RestartPolicy
from .models import (
    BUSY_PHASES,
    UNSETTLED_PHASES,
    DesiredState,
    Instance,
    InstanceSpec,
    Phase,
    RecoveryOutcome,
)
from .reasons import Reason

# Why an instance whose spec wants it running sits Stopped (Stalled reason and Event reason), and the Event
# of a machine recreated because it vanished (DESIGN 3.6: converge, or say why).


class ObservationKind(Enum):
    NO_MACHINE = "no_machine"  # status names no machine
    FOUND = "found"  # Fly answered with the machine
    GONE = "gone"  # 404, or the machine is destroyed
    UNKNOWN = "unknown"  # Fly did not answer usefully (transient error): decide nothing from it


@dataclass(frozen=True)
class Observation:
    """What Fly says about the instance's current machine. Built by the observer, or by hand in tests."""

    kind: ObservationKind
    state: str | None = None
    config_in_sync: bool = True
    error: str | None = None

    @classmethod
    def found(cls, state: str, *, config_in_sync: bool = True) -> Observation:
        return cls(ObservationKind.FOUND, state=state, config_in_sync=config_in_sync)

    @classmethod
    def no_machine(cls) -> Observation:
        return cls(ObservationKind.NO_MACHINE)

    @classmethod
    def gone(cls) -> Observation:
        return cls(ObservationKind.GONE, state=fly.DESTROYED)

    @classmethod
    def unknown(cls, error: str) -> Observation:
        return cls(ObservationKind.UNKNOWN, error=error)


class Action(Enum):
    NOTHING = "nothing"  # nothing to do now (settled, or waiting for Fly)
    PROVISION = "provision"  # ensure volume, then machine, then Starting
    START = "start"  # bring the existing (or recreated) machine up with the desired config
    STOP = "stop"
    UPDATE_CONFIG = "update_config"  # running machine with an outdated config: Fly restarts it
    BEGIN_RECOVERY = "begin_recovery"
    RESUME_RECOVERY = "resume_recovery"
    SETTLE = "settle"  # a phase change implied by the observation, no Fly call
    ACKNOWLEDGE = "acknowledge"  # the new generation needs no Fly call: record it as observed


@dataclass(frozen=True)
class Decision:
    action: Action
    phase: Phase | None = None  # the phase to record (for SETTLE/ACKNOWLEDGE), None = unchanged
    clear_machine: bool = False  # the machine is gone: forget its id
    reason: str = ""
    stall: Reason | None = None  # also mark Stalled with this reason (and post it as a Warning Event)
    event: Reason | None = None  # also post this Event (reason; ``reason`` above is the message)
    held: bool = False  # stalled: no action on Fly, but the observation is still recorded


def is_held(instance: Instance) -> bool:
    """A stalled instance is left alone until its generation or its retry annotation changes.

    Not for an unauthorized Fly token: that is the operator's problem, not the instance's; such instances
    keep being retried and the stall clears by itself once the token works again.
    """
    stalled = instance.status.condition(STALLED)
    if stalled is None or stalled.status != "True" or stalled.reason == Reason.FLY_UNAUTHORIZED:
        return False
    if stalled.reason in reasons.WAITING:
        return False  # waiting for a source or a released brake: looks again by itself (waiting_for_source)
    return (
        stalled.observed_generation == instance.generation
        and (instance.status.acknowledged_retry or "") == instance.retry_token
    )


def waiting_for_source(instance: Instance) -> bool:
    """Stalled without a hold: no acceptable recovery source yet, or recoveries paused (DESIGN 3.9)."""
    stalled = instance.status.condition(STALLED)
    return stalled is not None and stalled.status == "True" and stalled.reason in reasons.WAITING


def recovery_in_flight(instance: Instance) -> bool:
    """A recovery owns the instance: it observes Fly itself, step by step (recovery.py)."""
    return instance.status.phase is Phase.RECOVERING or instance.status.recovery is not None


def has_unobserved_generation(instance: Instance) -> bool:
    return instance.status.observed_generation != instance.generation


def should_recover(instance: Instance) -> bool:
    spec = instance.spec
    return spec.state is DesiredState.RUNNING and spec.recovery.enabled


def decide(instance: Instance, observation: Observation) -> Decision:
    """The next step for one instance, in the one order of precedence: deletion, then a recovery in flight,
    then a stall, then what Fly reports, then the spec. Recovery and deletion own their phases."""
    status = instance.status
    phase = status.phase
    if instance.deleting or phase is Phase.DESTROYING:
        return Decision(Action.NOTHING, reason="deletion is handled by the finalizer")
    if recovery_in_flight(instance):
        return Decision(Action.RESUME_RECOVERY)
    if is_held(instance):
        return Decision(
            Action.NOTHING, held=True, reason="stalled: waiting for a spec change or the retry annotation"
        )
    if (
        waiting_for_source(instance)
        and phase is Phase.STOPPED
        and should_recover(instance)
        and not has_unobserved_generation(instance)
    ):
        # Looks again (a read of the machine, its volume's host, its snapshots): proceeds by itself when the
        # host returns, a snapshot appears, or the brake is released.
        return Decision(Action.BEGIN_RECOVERY, reason="looking again for a recovery source")
    if phase in (Phase.PENDING, Phase.PROVISIONING):
        return Decision(Action.PROVISION)
    if observation.kind is ObservationKind.UNKNOWN:
        return Decision(Action.NOTHING, reason=f"Fly state unknown: {observation.error}")
    if phase is Phase.FAILED:
        return _converge(instance, observation)

    wants_running = instance.spec.state is DesiredState.RUNNING
    # Facts first: what Fly reports moves a settled or waiting phase, before any spec is applied.
    if (
        observation.kind is ObservationKind.GONE
        and phase in (Phase.RUNNING, Phase.STARTING)
        and wants_running
    ):
        # Destroyed outside the operator: the volume is still ours, so converging is safe.
        return Decision(
            Action.START,
            clear_machine=True,
            event=Reason.MACHINE_RECREATED,
            reason=f"machine {status.machine_id} was destroyed outside the operator: creating a new one "
            f"on volume {status.volume_id}",
        )
    if observation.kind is ObservationKind.GONE and phase in (Phase.RUNNING, Phase.STARTING, Phase.STOPPING):
        return Decision(Action.SETTLE, Phase.STOPPED, clear_machine=True, reason="machine is gone")
    if observation.kind is ObservationKind.NO_MACHINE and phase in (Phase.STARTING, Phase.RUNNING):
        return Decision(Action.PROVISION, reason="no machine recorded")
    state = observation.state

    if phase is Phase.STARTING:
        if state == fly.STARTED:
            return Decision(Action.SETTLE, Phase.RUNNING, reason="machine started")
        if state in (fly.STOPPED, fly.FAILED):
            if wants_running:
                return Decision(
                    Action.SETTLE,
                    Phase.STOPPED,
                    stall=Reason.START_FAILED,
                    reason=f"machine {status.machine_id} is {state} instead of started; fix the cause and "
                    "set the kiloclaw.kilo.ai/retry annotation to start it again",
                )
            return Decision(Action.SETTLE, Phase.STOPPED, reason=f"machine {state} while starting")
        return Decision(Action.NOTHING, reason="waiting for the machine to start")

    if phase is Phase.STOPPING:
        if (
            state in (fly.STOPPED, fly.FAILED, fly.SUSPENDED)
            or observation.kind is ObservationKind.NO_MACHINE
        ):
            return Decision(Action.SETTLE, Phase.STOPPED, reason=f"machine {state or 'absent'}")
        if state == fly.STARTED:
            return Decision(Action.STOP, reason="machine still started")
        return Decision(Action.NOTHING, reason="waiting for the machine to stop")

    if phase is Phase.RUNNING:
        if state == fly.STOPPED:
            if should_recover(instance):
                return Decision(Action.BEGIN_RECOVERY, reason="machine stopped unexpectedly")
            if wants_running:
                return Decision(
                    Action.SETTLE,
                    Phase.STOPPED,
                    stall=Reason.RECOVERY_DISABLED,
                    reason=f"machine {status.machine_id} stopped unexpectedly and spec.recovery.enabled is "
                    "false; set the kiloclaw.kilo.ai/retry annotation to start it again",
                )
            return Decision(Action.SETTLE, Phase.STOPPED, reason="machine stopped")
        if state == fly.FAILED:
            if wants_running:
                return Decision(
                    Action.SETTLE,
                    Phase.STOPPED,
                    stall=Reason.MACHINE_FAILED,
                    reason=f"machine {status.machine_id} failed; set the kiloclaw.kilo.ai/retry annotation "
                    "to start it again",
                )
            return Decision(Action.SETTLE, Phase.STOPPED, reason="machine failed")
        # A spec that wants the machine stopped is applied even when its generation was acted on: an
        # instance created with state Stopped is provisioned (the machine launches) and then stopped here.
        wants_stop = instance.spec.state is DesiredState.STOPPED
        if state == fly.STARTED and (has_unobserved_generation(instance) or wants_stop):
            return _converge(instance, observation)
        return Decision(Action.NOTHING)

    # Stopped: settled; act only on a generation not yet acted on (or a retry after a stall).
    if has_unobserved_generation(instance) or _retry_requested(instance):
        return _converge(instance, observation)
    if observation.kind is ObservationKind.GONE:
        return Decision(Action.SETTLE, Phase.STOPPED, clear_machine=True, reason="machine is gone")
    return Decision(Action.NOTHING)


def last_recovery_failed(instance: Instance) -> bool:
    last = instance.status.last_recovery
    return last is not None and last.outcome is RecoveryOutcome.FAILED


def _retry_requested(instance: Instance) -> bool:
    return (instance.status.acknowledged_retry or "") != instance.retry_token


def _converge(instance: Instance, observation: Observation) -> Decision:
    """Apply the spec from a settled phase (Running with started machine, Stopped, Failed)."""
    status = instance.status
    state = observation.state if observation.kind is ObservationKind.FOUND else None
    if instance.spec.state is DesiredState.RUNNING:
        if status.volume_id is None:
            return Decision(Action.PROVISION, reason="no volume yet")
        if state in fly.TRANSIENT_MACHINE_STATES:
            return Decision(Action.NOTHING, reason=f"waiting for Fly state {state} to settle")
        if last_recovery_failed(instance) and should_recover(instance) and state != fly.STARTED:
            # The old volume may sit on a dead host: a new attempt (new id), never a plain start on it.
            return Decision(Action.BEGIN_RECOVERY, reason="the last recovery failed: a new attempt")
        if state == fly.STARTED:
            if not observation.config_in_sync:
                return Decision(Action.UPDATE_CONFIG, reason="machine config differs from spec")
            return Decision(Action.ACKNOWLEDGE, Phase.RUNNING)
        # A destroyed machine cannot be started: forget it and create another one on the volume.
        gone = observation.kind is ObservationKind.GONE
        return Decision(Action.START, clear_machine=gone, reason="spec wants the machine running")
    if state in (fly.STARTED, fly.STARTING, fly.CREATED):
        return Decision(Action.STOP, reason="spec wants the machine stopped")
    return Decision(Action.ACKNOWLEDGE, Phase.STOPPED, clear_machine=observation.kind is ObservationKind.GONE)


#: The states a just-created machine passes through on its way to ``started``: the settle window goes on.
_ON_THE_WAY_TO_STARTED = frozenset({fly.CREATED, fly.STARTING})


def start_settled(state: str | None) -> bool:
    """Whether a just-created machine's reported state ends the settle window after its create: ``started``,
    or any state it does not pass through on its way there (stopped, failed, destroyed, ...)."""
    return state is not None and state not in _ON_THE_WAY_TO_STARTED


def phase_after_create(state: str | None) -> Phase:
    """The phase recorded with a new machine's id. ``Running`` only when Fly (the organisation feed) already
    reported it ``started``: nothing is left to wait for, so the id and ``Running`` go into one write.
    Otherwise ``Starting`` with what is known, and the wait goes on as in every other ``Starting``
    (``decide`` settles stopped, failed or destroyed from there)."""
    return Phase.RUNNING if state == fly.STARTED else Phase.STARTING


def is_busy(phase: Phase) -> bool:
    return phase in BUSY_PHASES


def poll_interval(phase: Phase, settings: Settings, rng: random.Random | None = None) -> float:
    """Seconds until the next observation of an instance in ``phase``, with ±10 % jitter to spread load."""
    if phase in UNSETTLED_PHASES:
        base = settings.poll_busy_seconds
    elif phase is Phase.RUNNING:
        base = settings.poll_running_seconds
    else:
        base = settings.poll_idle_seconds
    jitter = (rng or random).uniform(-0.1, 0.1)
    return max(0.01, base * (1 + jitter))


def desired_machine_config(
    spec: InstanceSpec, volume_id: str, *, recovery_id: str | None = None
) -> MachineConfig:
    """The machine config the spec asks for (DESIGN 3.1)."""
    metadata = {fly.METADATA_USER_ID: spec.user_id, fly.METADATA_SANDBOX_ID: spec.sandbox_id}
    if recovery_id is not None:
        metadata[fly.METADATA_RECOVERY_ID] = recovery_id
    return MachineConfig(
        image=spec.image,
        guest=Guest(cpu_kind=spec.guest.cpu_kind, cpus=spec.guest.cpus, memory_mb=spec.guest.memory_mb),
        env=dict(spec.env),
        mounts=[Mount(volume=volume_id, path=spec.volume.mount_path)],
        restart=RestartPolicy(policy="no"),
        metadata=metadata,
    )


def config_in_sync(spec: InstanceSpec, actual: MachineConfig | None) -> bool:
    """Whether the machine runs what the spec asks for (image, guest, env); metadata and mounts are ours."""
    if actual is None:
        return False
    guest = actual.guest
    return (
        actual.image == spec.image
        and dict(actual.env) == dict(spec.env)
        and guest is not None
        and (guest.cpu_kind, guest.cpus, guest.memory_mb)
        == (spec.guest.cpu_kind, spec.guest.cpus, spec.guest.memory_mb)
    )


def ordered_regions(spec: InstanceSpec, settings: Settings) -> list[str]:
    """Provisioning region preference: the spec's list, else the operator default."""
    return list(spec.regions or settings.default_regions)
