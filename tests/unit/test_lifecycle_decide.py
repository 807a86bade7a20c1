"""The pure decision core: every phase × observation pair of ``lifecycle.decide``, plus the rules around it
(held instances, unobserved generations, the retry annotation), the polling cadence, the machine config the
spec asks for, and the volume name rule. Instances and observations are built by hand; no I/O."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from builders import instance_spec
from kiloclaw_operator.config import Settings
from kiloclaw_operator.fly import volume_name
from kiloclaw_operator.fly.models import Guest, MachineConfig, Mount
from kiloclaw_operator.fly.vocabulary import legacy_volume_name, machine_name
from kiloclaw_operator.lifecycle import (
    Action,
    Decision,
    Observation,
    config_in_sync,
    decide,
    desired_machine_config,
    is_held,
    ordered_regions,
    phase_after_create,
    poll_interval,
    start_settled,
)
from kiloclaw_operator.models import (
    RETRY_ANNOTATION,
    Condition,
    Instance,
    InstanceSpec,
    InstanceStatus,
    LastRecovery,
    ObjectRef,
    Phase,
    RecoveryOutcome,
    RecoveryStatus,
    RecoveryStep,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SANDBOX = "ki_0a1b2c3d4e5f4a5b8c9d0e1f2a3b4c5d"

# --- builders -------------------------------------------------------------------------------------------


def spec(**overrides: Any) -> InstanceSpec:
    values = {
        "sandboxId": SANDBOX,
        "userId": "user-123",
        "flyApp": "acct-3f9a1c",
        "env": {"TZ": "Europe/Berlin"},
    }
    return instance_spec(**{**values, **overrides})


def stalled(generation: int, reason: str = "RecoveryFailed") -> Condition:
    return Condition(
        type="Stalled",
        status="True",
        reason=reason,
        message="recovery failed at step ReplacementVolumeCreated",
        last_transition_time=NOW,
        observed_generation=generation,
    )


def instance(
    phase: Phase,
    *,
    generation: int = 2,
    observed_generation: int | None = None,
    state: str = "Running",
    deleting: bool = False,
    annotations: dict[str, str] | None = None,
    acknowledged_retry: str | None = None,
    conditions: list[Condition] | None = None,
    recovery_status: RecoveryStatus | None = None,
    volume_id: str | None = "vol_0123456789abcdef",
    machine_id: str | None = "148e0123456789",
    **spec_overrides: Any,
) -> Instance:
    """An instance in ``phase`` whose generation was acted on, unless ``observed_generation`` says not."""
    return Instance(
        ref=ObjectRef(namespace="tenants", name="alice", uid="uid-1"),
        generation=generation,
        resource_version="7",
        deleting=deleting,
        annotations=annotations or {},
        spec=spec(state=state, **spec_overrides),
        status=InstanceStatus(
            phase=phase,
            observed_generation=generation if observed_generation is None else observed_generation,
            machine_id=machine_id,
            volume_id=volume_id,
            region="iad",
            conditions=conditions or [],
            recovery=recovery_status,
            acknowledged_retry=acknowledged_retry,
        ),
    )


def changed_spec(phase: Phase, **kwargs: Any) -> Instance:
    """An instance whose newest generation (3) has not been acted on yet."""
    return instance(phase, generation=3, observed_generation=2, **kwargs)


OBSERVATIONS: dict[str, Observation] = {
    "no-machine": Observation.no_machine(),
    "created": Observation.found("created"),
    "starting": Observation.found("starting"),
    "started": Observation.found("started"),
    "stopping": Observation.found("stopping"),
    "stopped": Observation.found("stopped"),
    "failed": Observation.found("failed"),
    "suspended": Observation.found("suspended"),
    "gone": Observation.gone(),
    "unknown": Observation.unknown("503 from Fly"),
}

NOTHING = Decision(Action.NOTHING)
PROVISION = Decision(Action.PROVISION)
START = Decision(Action.START)
STOP = Decision(Action.STOP)
UPDATE = Decision(Action.UPDATE_CONFIG)
RESUME = Decision(Action.RESUME_RECOVERY)
BEGIN_RECOVERY = Decision(Action.BEGIN_RECOVERY)
TO_RUNNING = Decision(Action.SETTLE, Phase.RUNNING)
TO_STOPPED = Decision(Action.SETTLE, Phase.STOPPED)
TO_STOPPED_FORGET = Decision(Action.SETTLE, Phase.STOPPED, clear_machine=True)
ACK_RUNNING = Decision(Action.ACKNOWLEDGE, Phase.RUNNING)
ACK_STOPPED = Decision(Action.ACKNOWLEDGE, Phase.STOPPED)
ACK_STOPPED_FORGET = Decision(Action.ACKNOWLEDGE, Phase.STOPPED, clear_machine=True)
START_FORGET = Decision(Action.START, clear_machine=True)
# Converge or say why (DESIGN 3.6): a machine destroyed outside the operator is recreated with an Event; an
# instance that should run but stops without a recovery is Stalled with the reason (and an Event).
RECREATE = Decision(Action.START, clear_machine=True, event="MachineRecreated")
START_FAILED = Decision(Action.SETTLE, Phase.STOPPED, stall="StartFailed")
MACHINE_FAILED = Decision(Action.SETTLE, Phase.STOPPED, stall="MachineFailed")
RECOVERY_DISABLED = Decision(Action.SETTLE, Phase.STOPPED, stall="RecoveryDisabled")


def same(decision: Decision, expected: Decision) -> bool:
    """Decisions compare on what the reconciler acts on; the reason is for humans."""
    return (decision.action, decision.phase, decision.clear_machine, decision.stall, decision.event) == (
        expected.action,
        expected.phase,
        expected.clear_machine,
        expected.stall,
        expected.event,
    )


def table(
    name: str, build: Any, expected: dict[str, Decision]
) -> list[Any]:  # one pytest.param per observation
    assert set(expected) == set(OBSERVATIONS), f"{name}: every observation needs a row"
    return [
        pytest.param(build, OBSERVATIONS[obs], want, id=f"{name}-{obs}") for obs, want in expected.items()
    ]


def every(decision: Decision) -> dict[str, Decision]:
    return dict.fromkeys(OBSERVATIONS, decision)


# --- the table: phase × observation ------------------------------------------------------------------------

ROWS: list[Any] = [
    # Nothing exists yet, or provisioning was interrupted: provisioning is idempotent (adopts what it finds).
    *table("pending", lambda: instance(Phase.PENDING, observed_generation=0), every(PROVISION)),
    *table("provisioning", lambda: instance(Phase.PROVISIONING), every(PROVISION)),
    *table(
        "starting",
        lambda: instance(Phase.STARTING),
        {
            "no-machine": PROVISION,
            "created": NOTHING,
            "starting": NOTHING,
            "started": TO_RUNNING,
            "stopping": NOTHING,
            "stopped": START_FAILED,
            "failed": START_FAILED,
            "suspended": NOTHING,
            "gone": RECREATE,
            "unknown": NOTHING,
        },
    ),
    *table(
        "running",
        lambda: instance(Phase.RUNNING),
        {
            "no-machine": PROVISION,
            "created": NOTHING,
            "starting": NOTHING,
            "started": NOTHING,
            "stopping": NOTHING,
            "stopped": BEGIN_RECOVERY,
            "failed": MACHINE_FAILED,
            "suspended": NOTHING,
            "gone": RECREATE,
            "unknown": NOTHING,
        },
    ),
    *table(
        "running-recovery-disabled",
        lambda: instance(Phase.RUNNING, recovery={"enabled": False}),
        {
            "no-machine": PROVISION,
            "created": NOTHING,
            "starting": NOTHING,
            "started": NOTHING,
            "stopping": NOTHING,
            "stopped": RECOVERY_DISABLED,
            "failed": MACHINE_FAILED,
            "suspended": NOTHING,
            "gone": RECREATE,
            "unknown": NOTHING,
        },
    ),
    *table(
        "stopping",
        lambda: instance(Phase.STOPPING, state="Stopped"),
        {
            "no-machine": TO_STOPPED,
            "created": NOTHING,
            "starting": NOTHING,
            "started": STOP,
            "stopping": NOTHING,
            "stopped": TO_STOPPED,
            "failed": TO_STOPPED,
            "suspended": TO_STOPPED,
            "gone": TO_STOPPED_FORGET,
            "unknown": NOTHING,
        },
    ),
    # Settled and acted on: Stopped never reacts to Fly by itself (a failed machine must not restart-loop).
    # A machine found gone is forgotten (phase unchanged), so that a later start creates a new one.
    *table("stopped-settled", lambda: instance(Phase.STOPPED), {**every(NOTHING), "gone": TO_STOPPED_FORGET}),
    *table(
        "stopped-settled-as-requested",
        lambda: instance(Phase.STOPPED, state="Stopped"),
        {**every(NOTHING), "gone": TO_STOPPED_FORGET},
    ),
    *table(
        "stopped-spec-wants-running",
        lambda: changed_spec(Phase.STOPPED),
        {
            "no-machine": START,
            "created": NOTHING,
            "starting": NOTHING,
            "started": ACK_RUNNING,
            "stopping": NOTHING,
            "stopped": START,
            "failed": START,
            "suspended": START,
            "gone": START_FORGET,
            "unknown": NOTHING,
        },
    ),
    *table(
        "stopped-spec-wants-stopped",
        lambda: changed_spec(Phase.STOPPED, state="Stopped"),
        {
            "no-machine": ACK_STOPPED,
            "created": STOP,
            "starting": STOP,
            "started": STOP,
            "stopping": ACK_STOPPED,
            "stopped": ACK_STOPPED,
            "failed": ACK_STOPPED,
            "suspended": ACK_STOPPED,
            "gone": ACK_STOPPED_FORGET,
            "unknown": NOTHING,
        },
    ),
    *table("recovering", lambda: instance(Phase.RECOVERING), every(RESUME)),
    *table("destroying", lambda: instance(Phase.DESTROYING), every(NOTHING)),
    *table(
        "failed-held",
        lambda: instance(Phase.FAILED, conditions=[stalled(2, "InvalidSpec")]),
        every(NOTHING),
    ),
    *table(
        "failed-after-spec-change",
        lambda: changed_spec(Phase.FAILED, conditions=[stalled(2, "InvalidSpec")]),
        {
            "no-machine": START,
            "created": NOTHING,
            "starting": NOTHING,
            "started": ACK_RUNNING,
            "stopping": NOTHING,
            "stopped": START,
            "failed": START,
            "suspended": START,
            "gone": START_FORGET,
            "unknown": NOTHING,
        },
    ),
    *table(
        "failed-before-any-volume",
        lambda: changed_spec(Phase.FAILED, volume_id=None, machine_id=None, conditions=[stalled(2)]),
        {**every(PROVISION), "unknown": NOTHING},
    ),
]


@pytest.mark.parametrize(("build", "observation", "expected"), ROWS)
def test_decision_table_row(build: Any, observation: Observation, expected: Decision) -> None:
    decision = decide(build(), observation)
    assert same(decision, expected), f"got {decision}, want {expected}"


# --- rows that depend on more than phase and observation -------------------------------------------------


@pytest.mark.parametrize(
    ("build", "observation", "expected"),
    [
        pytest.param(
            lambda: changed_spec(Phase.RUNNING),
            Observation.found("started"),
            ACK_RUNNING,
            id="running-new-generation-config-in-sync-is-acknowledged",
        ),
        pytest.param(
            lambda: changed_spec(Phase.RUNNING),
            Observation.found("started", config_in_sync=False),
            UPDATE,
            id="running-new-image-updates-the-machine-config",
        ),
        pytest.param(
            lambda: changed_spec(Phase.STOPPED),
            Observation.found("started", config_in_sync=False),
            UPDATE,
            id="stopped-phase-but-started-machine-with-old-config-is-updated",
        ),
        pytest.param(
            lambda: changed_spec(Phase.RUNNING, state="Stopped"),
            Observation.found("started"),
            STOP,
            id="running-spec-says-stopped-stops",
        ),
        pytest.param(
            lambda: instance(Phase.RUNNING, state="Stopped"),
            Observation.found("started"),
            STOP,
            id="instance-created-stopped-is-stopped-once-it-has-started",
        ),
        pytest.param(
            lambda: changed_spec(Phase.RUNNING, state="Stopped"),
            Observation.found("stopped"),
            TO_STOPPED,
            id="running-spec-says-stopped-and-machine-stopped-settles-without-recovery",
        ),
        pytest.param(
            lambda: instance(Phase.RUNNING),
            Observation.found("started", config_in_sync=False),
            NOTHING,
            id="running-acted-on-generation-leaves-config-drift-alone",
        ),
        pytest.param(
            lambda: changed_spec(Phase.STOPPED, volume_id=None, machine_id=None),
            Observation.no_machine(),
            PROVISION,
            id="stopped-without-volume-wanting-running-provisions",
        ),
        pytest.param(
            lambda: instance(Phase.RUNNING, deleting=True),
            Observation.found("stopped"),
            NOTHING,
            id="deleting-instance-is-left-to-the-finalizer",
        ),
        pytest.param(
            lambda: instance(
                Phase.RUNNING,
                recovery_status=RecoveryStatus(
                    id="01JD",
                    started_at=NOW,
                    deadline=NOW,
                    step=RecoveryStep.STARTED,
                    source_volume_id="vol_0123456789abcdef",
                    source_region="iad",
                ),
            ),
            Observation.found("stopped"),
            RESUME,
            id="recovery-in-status-resumes-whatever-the-phase",
        ),
        pytest.param(
            lambda: changed_spec(Phase.STARTING, state="Stopped"),
            Observation.found("started"),
            TO_RUNNING,
            id="starting-settles-first-and-applies-a-changed-spec-afterwards",
        ),
    ],
)
def test_decision_beyond_the_table(build: Any, observation: Observation, expected: Decision) -> None:
    decision = decide(build(), observation)
    assert same(decision, expected), f"got {decision}, want {expected}"


# --- held (stalled) instances ----------------------------------------------------------------------------


def stopped_after_failed_recovery(**kwargs: Any) -> Instance:
    return instance(Phase.STOPPED, conditions=[stalled(2)], **kwargs)


def test_stalled_instance_is_held_and_fly_is_not_touched() -> None:  # not even a gone machine is forgotten
    held = stopped_after_failed_recovery()
    assert is_held(held)
    for observation in OBSERVATIONS.values():
        assert decide(held, observation).action is Action.NOTHING


def test_stalled_running_instance_does_not_start_a_second_recovery() -> None:
    held = instance(Phase.RUNNING, conditions=[stalled(2)])
    assert decide(held, Observation.found("stopped")).action is Action.NOTHING


def test_new_generation_releases_a_stalled_instance() -> None:
    released = changed_spec(Phase.STOPPED, conditions=[stalled(2)])
    assert not is_held(released)
    assert same(decide(released, Observation.found("stopped")), START)


def test_retry_annotation_change_releases_a_stalled_instance_and_starts_it() -> None:
    released = stopped_after_failed_recovery(annotations={RETRY_ANNOTATION: "1"})
    assert not is_held(released)
    assert same(decide(released, Observation.found("stopped")), START)


def test_a_vanished_volume_holds_the_instance_until_the_retry_annotation_then_creates_the_machine() -> None:
    held = instance(Phase.FAILED, machine_id=None, conditions=[stalled(2, "VolumeNotFound")])
    assert is_held(held)
    assert same(decide(held, Observation.no_machine()), NOTHING)
    retried = instance(
        Phase.FAILED,
        machine_id=None,
        conditions=[stalled(2, "VolumeNotFound")],
        annotations={RETRY_ANNOTATION: "restored"},
    )
    assert not is_held(retried)
    assert same(decide(retried, Observation.no_machine()), START)


def failed_recovery() -> LastRecovery:
    return LastRecovery(
        id="01JD",
        started_at=NOW,
        finished_at=NOW,
        outcome=RecoveryOutcome.FAILED,
        message="unexpected stop recovery timed out",
        duration_seconds=600,
    )


@pytest.mark.parametrize("observation", ["no-machine", "gone", "stopped", "failed"])
def test_retry_annotation_after_a_failed_recovery_starts_a_new_recovery_never_a_plain_start(
    observation: str,
) -> None:
    released = stopped_after_failed_recovery(annotations={RETRY_ANNOTATION: "1"}, machine_id=None)
    released.status.last_recovery = failed_recovery()
    assert same(decide(released, OBSERVATIONS[observation]), BEGIN_RECOVERY)


def test_new_generation_after_a_failed_recovery_starts_a_new_recovery() -> None:
    released = changed_spec(Phase.STOPPED, conditions=[stalled(2)], machine_id=None)
    released.status.last_recovery = failed_recovery()
    assert same(decide(released, Observation.no_machine()), BEGIN_RECOVERY)


def test_after_a_failed_recovery_with_recovery_disabled_the_retry_starts_the_machine() -> None:
    released = stopped_after_failed_recovery(annotations={RETRY_ANNOTATION: "1"}, recovery={"enabled": False})
    released.status.last_recovery = failed_recovery()
    assert same(decide(released, Observation.found("stopped")), START)


def test_an_unauthorized_fly_token_never_holds_an_instance() -> None:
    blocked = instance(Phase.RUNNING, conditions=[stalled(2, "FlyUnauthorized")])
    assert not is_held(blocked)
    assert same(decide(blocked, Observation.found("stopped")), BEGIN_RECOVERY)


def test_a_machine_that_stops_or_fails_while_the_spec_wants_it_stopped_just_settles() -> None:
    for state in ("stopped", "failed"):
        assert same(decide(instance(Phase.RUNNING, state="Stopped"), Observation.found(state)), TO_STOPPED)


def test_acknowledged_retry_annotation_keeps_the_instance_held() -> None:
    held = stopped_after_failed_recovery(annotations={RETRY_ANNOTATION: "1"}, acknowledged_retry="1")
    assert is_held(held)
    assert decide(held, Observation.found("stopped")).action is Action.NOTHING


def test_retry_annotation_changed_again_releases_once_more() -> None:
    released = stopped_after_failed_recovery(annotations={RETRY_ANNOTATION: "2"}, acknowledged_retry="1")
    assert not is_held(released)


def test_stalled_false_condition_does_not_hold() -> None:
    cleared = stalled(2).model_copy(update={"status": "False", "reason": "Progressing"})
    assert not is_held(instance(Phase.STOPPED, conditions=[cleared]))


def test_unacknowledged_retry_annotation_on_settled_instance_reconverges() -> None:
    # The retry annotation without a stall is still "something changed": the spec is applied again.
    settled = instance(Phase.STOPPED, annotations={RETRY_ANNOTATION: "x"})
    assert same(decide(settled, Observation.found("stopped")), START)


def test_acknowledged_retry_annotation_on_settled_instance_does_nothing() -> None:
    settled = instance(Phase.STOPPED, annotations={RETRY_ANNOTATION: "x"}, acknowledged_retry="x")
    assert decide(settled, Observation.found("stopped")).action is Action.NOTHING


# --- polling cadence --------------------------------------------------------------------------------------

CADENCE = Settings(poll_running_seconds=60, poll_busy_seconds=5, poll_idle_seconds=300)


@pytest.mark.parametrize(
    ("phase", "base"),
    [
        (Phase.PENDING, 5),
        (Phase.PROVISIONING, 5),
        (Phase.STARTING, 5),
        (Phase.STOPPING, 5),
        (Phase.RECOVERING, 5),
        (Phase.DESTROYING, 5),
        (Phase.RUNNING, 60),
        (Phase.STOPPED, 300),
        (Phase.FAILED, 300),
    ],
    ids=lambda v: v.value if isinstance(v, Phase) else str(v),
)
def test_poll_interval_follows_the_phase_cadence_within_ten_percent_jitter(phase: Phase, base: int) -> None:
    rng = random.Random(7)
    samples = [poll_interval(phase, CADENCE, rng) for _ in range(200)]
    assert all(base * 0.9 <= s <= base * 1.1 for s in samples)
    assert len(set(samples)) > 100, "jitter spreads the polls"
    assert min(samples) < base * 0.95 and max(samples) > base * 1.05


def test_poll_interval_uses_the_configured_cadences() -> None:
    fast = Settings(poll_running_seconds=0.3, poll_busy_seconds=0.1, poll_idle_seconds=0.5)
    assert 0.27 <= poll_interval(Phase.RUNNING, fast) <= 0.33
    assert 0.09 <= poll_interval(Phase.STARTING, fast) <= 0.11
    assert 0.45 <= poll_interval(Phase.STOPPED, fast) <= 0.55


# --- machine config ---------------------------------------------------------------------------------------


def test_desired_machine_config_follows_the_spec() -> None:
    wanted = spec(
        guest={"cpuKind": "performance", "cpus": 2, "memoryMb": 4096}, volume={"mountPath": "/data"}
    )
    config = desired_machine_config(wanted, "vol_0123456789abcdef")
    assert config.image == "registry.fly.io/kiloclaw:2026.11.1"
    assert config.guest == Guest(cpu_kind="performance", cpus=2, memory_mb=4096)
    assert config.env == {"TZ": "Europe/Berlin"}
    assert config.mounts == [Mount(volume="vol_0123456789abcdef", path="/data")]
    assert config.restart is not None and config.restart.policy == "no"
    assert config.metadata == {"kiloclaw_user_id": "user-123", "kiloclaw_sandbox_id": SANDBOX}


def test_desired_machine_config_during_recovery_carries_the_recovery_id() -> None:
    config = desired_machine_config(spec(), "vol_0123456789abcdef", recovery_id="01JDQ8Z6V4")
    assert config.metadata["kiloclaw_recovery_id"] == "01JDQ8Z6V4"
    assert config.metadata["kiloclaw_sandbox_id"] == SANDBOX


def test_desired_machine_config_defaults_to_shared_cpu_1x_2048_at_root() -> None:
    minimal = instance_spec()
    config = desired_machine_config(minimal, "vol_x")
    assert config.guest == Guest(cpu_kind="shared", cpus=1, memory_mb=2048)
    assert config.mounts == [Mount(volume="vol_x", path="/root")]
    assert config.env == {}


def test_desired_machine_config_is_in_sync_with_its_own_spec() -> None:
    assert config_in_sync(spec(), desired_machine_config(spec(), "vol_x"))


@pytest.mark.parametrize(
    "change",
    [
        {"image": "registry.fly.io/kiloclaw:2026.12.0"},
        {"env": {"TZ": "UTC"}},
        {"env": {}},
        {"guest": {"cpus": 2}},
        {"guest": {"memoryMb": 4096}},
        {"guest": {"cpuKind": "performance"}},
    ],
    ids=["image", "env-value", "env-removed", "cpus", "memory", "cpu-kind"],
)
def test_config_out_of_sync_when_the_spec_changes(change: dict[str, Any]) -> None:
    running = desired_machine_config(spec(), "vol_x")
    assert not config_in_sync(spec(**change), running)


def test_config_in_sync_ignores_metadata_mounts_and_restart_policy() -> None:
    running = desired_machine_config(spec(), "vol_other", recovery_id="01JD")
    running = running.model_copy(update={"restart": None})
    assert config_in_sync(spec(), running)


def test_config_without_guest_or_without_config_is_out_of_sync() -> None:
    assert not config_in_sync(spec(), None)
    bare = MachineConfig(image="registry.fly.io/kiloclaw:2026.11.1", env={"TZ": "Europe/Berlin"})
    assert not config_in_sync(spec(), bare)


def test_regions_come_from_the_spec_else_from_the_operator_default() -> None:
    settings = Settings(default_regions=["ams", "fra"])
    assert ordered_regions(spec(regions=["ord", "iad"]), settings) == ["ord", "iad"]
    assert ordered_regions(spec(), settings) == ["ams", "fra"]


# --- after a machine create (the settle window) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "settled", "phase"),
    [
        (None, False, Phase.STARTING),
        ("created", False, Phase.STARTING),
        ("starting", False, Phase.STARTING),
        ("started", True, Phase.RUNNING),
        ("stopped", True, Phase.STARTING),
        ("failed", True, Phase.STARTING),
        ("destroyed", True, Phase.STARTING),
    ],
)
def test_only_a_reported_start_records_a_new_machine_as_running_and_any_other_settled_state_ends_the_wait(
    state: str | None, settled: bool, phase: Phase
) -> None:
    assert start_settled(state) is settled
    assert phase_after_create(state) is phase


# --- volume name ------------------------------------------------------------------------------------------


def sha10(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@pytest.mark.parametrize(
    ("sandbox_id", "prefix"),
    [
        ("abc", "kiloclaw_abc_"),
        ("ki_0a1b2c3d4e5f4a5b8c9d0e1f2a3b4c5d", "kiloclaw_ki_0a1b2c3_"),
        ("Ki_ABC", "kiloclaw_ki_abc_"),
        ("a-b-c", "kiloclaw_a_b_c_"),
        ("x" * 64, "kiloclaw_xxxxxxxxxx_"),
    ],
    ids=["short", "cut-to-10", "lower-cased", "dashes-replaced", "max-length-sandbox"],
)
def test_volume_name_rule(sandbox_id: str, prefix: str) -> None:
    assert volume_name(sandbox_id) == prefix + sha10(sandbox_id)


@pytest.mark.parametrize(
    ("one", "other"),
    [("Alice-1", "alice_1"), ("ki_" + "a" * 30 + "1", "ki_" + "a" * 30 + "2"), ("A", "a")],
    ids=["case-and-dash", "same-first-characters", "case"],
)
def test_sandboxes_that_the_legacy_name_merged_get_volume_and_machine_names_of_their_own(
    one: str, other: str
) -> None:
    assert legacy_volume_name(one) == legacy_volume_name(other)
    assert volume_name(one) != volume_name(other)
    assert machine_name(one) != machine_name(other)


def test_the_legacy_volume_name_is_the_rule_before_names_carried_a_hash() -> None:
    assert legacy_volume_name("ki_0a1b2c3d4e5f4a5b8c9d0e1f2a3b4c5d") == "kiloclaw_ki_0a1b2c3d4e5f4a5b8c"
    assert legacy_volume_name("a-b-c") == "kiloclaw_a_b_c"


@pytest.mark.parametrize("sandbox_id", ["ki_" + "Z-9_" * 15, "-", "A" * 64, "ki_0a1b-2C3D"])
def test_volume_name_is_always_a_valid_fly_volume_name(sandbox_id: str) -> None:
    name = volume_name(sandbox_id)
    assert len(name) <= 30
    assert name.startswith("kiloclaw_")
    assert all(ch in "abcdefghijklmnopqrstuvwxyz0123456789_" for ch in name)


# --- waiting for a recovery source (DESIGN 3.9) ----------------------------------------------------------


@pytest.mark.parametrize("reason", ["WaitingForSource", "RecoveryPaused"])
def test_an_instance_waiting_for_a_source_is_not_held_and_looks_again_for_one(reason: str) -> None:
    waiting = instance(Phase.STOPPED, conditions=[stalled(2, reason)])
    assert not is_held(waiting)
    assert decide(waiting, Observation.found("stopped")).action is Action.BEGIN_RECOVERY


def test_an_instance_waiting_for_a_source_whose_spec_now_wants_it_stopped_settles_stopped() -> None:
    waiting = instance(Phase.STOPPED, conditions=[stalled(2, "WaitingForSource")], state="Stopped")
    decided = decide(waiting, Observation.found("stopped"))
    assert decided.action is not Action.BEGIN_RECOVERY


def test_an_instance_waiting_for_a_source_with_recovery_disabled_does_not_look_again() -> None:
    waiting = instance(
        Phase.STOPPED, conditions=[stalled(2, "WaitingForSource")], recovery={"enabled": False}
    )
    assert decide(waiting, Observation.found("stopped")).action is not Action.BEGIN_RECOVERY
