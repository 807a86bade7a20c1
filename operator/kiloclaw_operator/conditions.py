"""kstatus conditions (Ready, Reconciling, Stalled) in metav1.Condition shape.

One small module in the style of Flux's runtime helpers: callers say *what* is true, these functions keep
``lastTransitionTime`` stable unless the status value really flips, and nobody hand-builds condition dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from .fly import vocabulary as fly
from .models import (
    BUSY_PHASES,
    UNSETTLED_PHASES,
    Condition,
    ConditionStatus,
    DesiredState,
    InstanceSpec,
    InstanceStatus,
    Phase,
)

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"

REASON_BUSY = "Busy"
REASON_RECOVERY_FAILED = "RecoveryFailed"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_FLY_UNAUTHORIZED = "FlyUnauthorized"
REASON_DUPLICATE_SANDBOX = "DuplicateSandbox"
REASON_HOST_UNAVAILABLE = "HostUnavailable"
REASON_APP_NOT_FOUND = "AppNotFound"
#: Failed: the volume recorded in the status is gone from Fly (deleted behind the operator's back); nothing is
#: created in its place (the sandbox's data was on it). Held until the retry annotation or the spec changes.
REASON_VOLUME_NOT_FOUND = "VolumeNotFound"
#: Stalled, but not held: no acceptable recovery source yet (host down, no snapshot the policy accepts), or
#: new recoveries paused by the mass-failure brake. The instance keeps looking and proceeds by itself.
REASON_WAITING_FOR_SOURCE = "WaitingForSource"
REASON_RECOVERY_PAUSED = "RecoveryPaused"
WAITING_REASONS = frozenset({REASON_WAITING_FOR_SOURCE, REASON_RECOVERY_PAUSED})


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
    observed_generation: int | None,
) -> list[Condition]:
    """Return ``conditions`` with ``type_`` set; the transition time moves only when the status changes."""
    previous = next((c for c in conditions if c.type == type_), None)
    transition = previous.last_transition_time if previous and previous.status == status else now
    updated = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=observed_generation,
    )
    result = [c for c in conditions if c.type != type_]
    result.append(updated)
    return sorted(result, key=lambda c: c.type)


def mark_stalled(
    status: InstanceStatus, reason: str, message: str, now: datetime, generation: int
) -> InstanceStatus:
    """Record that no progress is possible without a person; held until the spec or retry token changes."""
    conditions = set_condition(status.conditions, STALLED, "True", reason, message, now, generation)
    return status.model_copy(update={"conditions": conditions})


def clear_stalled(status: InstanceStatus, now: datetime, generation: int) -> InstanceStatus:
    conditions = set_condition(status.conditions, STALLED, "False", "Progressing", "", now, generation)
    return status.model_copy(update={"conditions": conditions})


def stalled_reason(status: InstanceStatus) -> str | None:
    """The reason of a Stalled=True condition, or None when not stalled."""
    stalled = status.condition(STALLED)
    return stalled.reason if stalled is not None and stalled.status == "True" else None


def is_stalled(status: InstanceStatus) -> bool:
    stalled = status.condition(STALLED)
    return stalled is not None and stalled.status == "True"


def is_ready(phase: Phase, fly_state: str | None, desired: DesiredState) -> bool:
    """The Ready rule: running with a started machine, or stopped as the spec asks."""
    return (phase is Phase.RUNNING and fly_state == fly.STARTED) or (
        phase is Phase.STOPPED and desired is DesiredState.STOPPED
    )


def summarize(
    spec: InstanceSpec,
    status: InstanceStatus,
    generation: int,
    now: datetime,
    *,
    deferred: bool = False,
) -> InstanceStatus:
    """Derive Ready and Reconciling from phase, Fly state and generations; Stalled is set explicitly."""
    stalled = is_stalled(status)
    conditions = list(status.conditions)
    if status.condition(STALLED) is None:
        conditions = set_condition(conditions, STALLED, "False", "Progressing", "", now, generation)

    if is_ready(status.phase, status.fly_state, spec.state):
        ready = (
            ("True", "Running", "machine is started")
            if status.phase is Phase.RUNNING
            else ("True", "Stopped", "machine is stopped as requested")
        )
    else:
        detail = f"phase {status.phase.value}" + (
            f", Fly state {status.fly_state}" if status.fly_state else ""
        )
        ready = ("False", status.phase.value, detail)
    conditions = set_condition(conditions, READY, ready[0], ready[1], ready[2], now, generation)  # type: ignore[arg-type]

    # A deferral holds until the phase settles: other writes in the same busy phase must not hide it (and
    # the driver relies on the Busy reason to post ActionDeferred only once per generation).
    previous = status.condition(RECONCILING)
    still_deferred = (
        previous is not None
        and previous.reason == REASON_BUSY
        and previous.observed_generation == generation
        and status.phase in BUSY_PHASES
        and status.observed_generation != generation
    )
    if deferred or still_deferred:
        reconciling: tuple[ConditionStatus, str, str] = (
            "True",
            REASON_BUSY,
            f"spec generation {generation} is deferred until phase {status.phase.value} settles",
        )
    elif stalled:
        reconciling = ("False", "Stalled", "waiting for a spec change or the retry annotation")
    elif status.phase in UNSETTLED_PHASES:
        reconciling = ("True", status.phase.value, f"phase {status.phase.value}")
    elif status.observed_generation != generation:
        reconciling = ("True", "Progressing", f"generation {generation} not yet acted on")
    else:
        reconciling = ("False", "Settled", f"phase {status.phase.value}")
    conditions = set_condition(conditions, RECONCILING, *reconciling, now, generation)
    return status.model_copy(update={"conditions": conditions})
