"""kstatus conditions: Ready, Reconciling and Stalled as DESIGN section 2 defines them, and the rule that
``lastTransitionTime`` moves only when a condition's status flips."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from builders import instance_spec
from kiloclaw_operator import conditions
from kiloclaw_operator.conditions import READY, RECONCILING, STALLED, set_condition, summarize
from kiloclaw_operator.models import Condition, InstanceSpec, InstanceStatus, Phase
from kiloclaw_operator.reasons import Reason

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)
T2 = T0 + timedelta(minutes=10)


def spec(state: str = "Running") -> InstanceSpec:
    return instance_spec(state=state)


def status(
    phase: Phase, *, fly_state: str | None = None, observed_generation: int = 1, **extra: Any
) -> InstanceStatus:
    return InstanceStatus(phase=phase, fly_state=fly_state, observed_generation=observed_generation, **extra)


def cond(st: InstanceStatus, type_: str) -> Condition:
    found = st.condition(type_)
    assert found is not None, f"{type_} missing"
    return found


# --- Ready ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "fly_state", "desired", "ready"),
    [
        (Phase.RUNNING, "started", "Running", "True"),
        (Phase.STOPPED, "stopped", "Stopped", "True"),
        (Phase.STOPPED, None, "Stopped", "True"),
        (Phase.RUNNING, "stopped", "Running", "False"),
        (Phase.RUNNING, "starting", "Running", "False"),
        (Phase.RUNNING, None, "Running", "False"),
        (Phase.STOPPED, "stopped", "Running", "False"),
        (Phase.STOPPED, "failed", "Running", "False"),
        (Phase.PENDING, None, "Running", "False"),
        (Phase.PROVISIONING, None, "Running", "False"),
        (Phase.STARTING, "started", "Running", "False"),
        (Phase.STOPPING, "stopped", "Stopped", "False"),
        (Phase.RECOVERING, "started", "Running", "False"),
        (Phase.DESTROYING, "started", "Running", "False"),
        (Phase.FAILED, None, "Running", "False"),
    ],
    ids=lambda v: str(v.value if isinstance(v, Phase) else v),
)
def test_ready_only_when_running_and_started_or_stopped_as_requested(
    phase: Phase, fly_state: str | None, desired: str, ready: str
) -> None:
    result = summarize(spec(desired), status(phase, fly_state=fly_state), 1, T0)
    assert cond(result, READY).status == ready
    if ready == "False":
        assert cond(result, READY).reason == phase.value
        assert phase.value in cond(result, READY).message


# --- Reconciling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "phase",
    [Phase.PENDING, Phase.PROVISIONING, Phase.STARTING, Phase.STOPPING, Phase.RECOVERING, Phase.DESTROYING],
    ids=lambda p: p.value,
)
def test_reconciling_while_busy(phase: Phase) -> None:
    result = summarize(spec(), status(phase), 1, T0)
    assert cond(result, RECONCILING).status == "True"
    assert cond(result, RECONCILING).reason == phase.value


@pytest.mark.parametrize("phase", [Phase.RUNNING, Phase.STOPPED, Phase.FAILED], ids=lambda p: p.value)
def test_reconciling_while_the_generation_is_not_yet_acted_on(phase: Phase) -> None:
    result = summarize(spec(), status(phase, observed_generation=1), 2, T0)
    reconciling = cond(result, RECONCILING)
    assert (reconciling.status, reconciling.reason) == ("True", "Progressing")
    assert reconciling.observed_generation == 2


@pytest.mark.parametrize("phase", [Phase.RUNNING, Phase.STOPPED], ids=lambda p: p.value)
def test_not_reconciling_when_settled_and_observed(phase: Phase) -> None:
    result = summarize(spec(), status(phase, fly_state="started"), 1, T0)
    assert cond(result, RECONCILING).status == "False"


def test_deferred_generation_is_reconciling_busy() -> None:
    result = summarize(spec(), status(Phase.PROVISIONING), 2, T0, deferred=True)
    reconciling = cond(result, RECONCILING)
    assert (reconciling.status, reconciling.reason) == ("True", "Busy")
    assert "2" in reconciling.message and "Provisioning" in reconciling.message
    assert reconciling.observed_generation == 2


def test_busy_reason_stays_while_the_deferred_generation_waits_for_the_phase() -> None:
    deferred = summarize(spec(), status(Phase.PROVISIONING), 2, T0, deferred=True)
    # Another write in the same busy phase (say, the volume id) keeps saying why the spec waits.
    later = summarize(spec(), deferred.model_copy(update={"phase": Phase.STARTING}), 2, T1)
    assert cond(later, RECONCILING).reason == "Busy"
    # Once the phase settles, the generation is still pending but no longer blocked.
    settled = summarize(
        spec(), later.model_copy(update={"phase": Phase.RUNNING, "fly_state": "started"}), 2, T2
    )
    assert cond(settled, RECONCILING).reason == "Progressing"


def test_busy_reason_is_per_generation() -> None:
    deferred = summarize(spec(), status(Phase.PROVISIONING), 2, T0, deferred=True)
    newer = summarize(spec(), deferred, 3, T1)
    assert cond(newer, RECONCILING).reason == "Provisioning"


def test_stalled_instance_is_not_reconciling() -> None:
    stalled = conditions.mark_stalled(status(Phase.STOPPED), "RecoveryFailed", "boom", T0, 1)
    result = summarize(spec(), stalled, 1, T0)
    assert (cond(result, RECONCILING).status, cond(result, RECONCILING).reason) == ("False", "Stalled")
    assert cond(result, STALLED).status == "True"


# --- Stalled --------------------------------------------------------------------------------------------


def test_stalled_defaults_to_false_and_summarize_never_sets_it() -> None:
    result = summarize(spec(), status(Phase.RUNNING, fly_state="started"), 1, T0)
    assert (cond(result, STALLED).status, cond(result, STALLED).reason) == ("False", "Progressing")


@pytest.mark.parametrize(
    "reason",
    [Reason.RECOVERY_FAILED, Reason.INVALID_SPEC, Reason.FLY_UNAUTHORIZED],
)
def test_mark_stalled_records_reason_message_and_generation(reason: str) -> None:
    result = conditions.mark_stalled(status(Phase.FAILED), reason, "Fly said: app not found", T0, 4)
    stalled = cond(result, STALLED)
    assert (stalled.status, stalled.reason, stalled.message) == ("True", reason, "Fly said: app not found")
    assert stalled.observed_generation == 4
    assert conditions.is_stalled(result)
    # summarize keeps an explicit stall
    assert cond(summarize(spec(), result, 4, T1), STALLED).status == "True"


def test_clear_stalled_flips_back_to_false() -> None:
    stalled = conditions.mark_stalled(status(Phase.FAILED), "InvalidSpec", "bad", T0, 1)
    cleared = conditions.clear_stalled(stalled, T1, 2)
    assert not conditions.is_stalled(cleared)
    assert cond(cleared, STALLED).last_transition_time == T1


# --- lastTransitionTime ---------------------------------------------------------------------------------


def test_last_transition_time_is_kept_when_only_reason_or_message_change() -> None:
    first = set_condition([], READY, "False", "Provisioning", "phase Provisioning", T0, 1)
    second = set_condition(first, READY, "False", "Starting", "phase Starting", T1, 2)
    assert second[0].last_transition_time == T0
    assert (second[0].reason, second[0].observed_generation) == ("Starting", 2)


def test_last_transition_time_moves_when_status_flips() -> None:
    first = set_condition([], READY, "False", "Starting", "", T0, 1)
    second = set_condition(first, READY, "True", "Running", "", T1, 1)
    third = set_condition(second, READY, "True", "Running", "", T2, 1)
    assert second[0].last_transition_time == T1
    assert third[0].last_transition_time == T1


def test_summarize_keeps_transition_times_across_repeated_writes() -> None:
    running = status(Phase.RUNNING, fly_state="started")
    first = summarize(spec(), running, 1, T0)
    again = summarize(spec(), first, 1, T2)
    assert again.conditions == first.conditions
    stopped = summarize(spec(), again.model_copy(update={"phase": Phase.STOPPING}), 1, T2)
    assert cond(stopped, READY).last_transition_time == T2
    assert cond(stopped, RECONCILING).last_transition_time == T2
    assert cond(stopped, STALLED).last_transition_time == T0


def test_conditions_are_one_per_type_sorted_by_type() -> None:
    result = summarize(spec(), status(Phase.RUNNING, fly_state="started"), 1, T0)
    result = summarize(spec(), result, 1, T1)
    assert [c.type for c in result.conditions] == [READY, RECONCILING, STALLED]


def test_condition_wire_shape_is_metav1_condition() -> None:
    result = summarize(spec(), status(Phase.RUNNING, fly_state="started"), 3, T0)
    wire = result.dump()["conditions"][0]
    assert set(wire) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
    assert wire["lastTransitionTime"] == "2026-11-25T12:00:00Z"
