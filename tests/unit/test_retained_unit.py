"""The decision core of the retained-volume controller: when a delete is due, how retries back off, what the
interlock refuses, and which status each outcome leaves (kiloclaw_operator.retained, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import builders
from kiloclaw_operator.config import Settings
from kiloclaw_operator.fly import Fatal, NotFound, RateLimited, Transient, Unauthorized
from kiloclaw_operator.models import Provenance, RetainedPhase, RetainedVolume, RetainedVolumeStatus
from kiloclaw_operator.reasons import Reason
from kiloclaw_operator.retained import (
    Step,
    Trigger,
    classify_failure,
    decide_retained,
    deleted_status,
    deleting_status,
    failed_status,
    next_backoff,
    next_check_delay,
    observed_status,
    provenance_grace_left,
    provenance_problem,
    starts_blocked_episode,
    volume_in_use_failure,
    volumes_in_use,
)
from kiloclaw_operator.volumes import OwnershipMismatch

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
VOLUME = "vol_retained0000001"
SANDBOX = "ki_alice"
RECOVERY = "01JDRECOVERY0000000000000A"
PROOF = Provenance(
    instance_uid="uid-alice", recovery_id=RECOVERY, fly_app="acct-test", volume_id=VOLUME, sandbox_id=SANDBOX
)


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "retained_check_seconds": 60,
        "retry_backoff_min_seconds": 30,
        "retry_backoff_max_seconds": 3600,
    }
    values.update(overrides)
    return Settings(**values)


def retained(
    *,
    retain_until: datetime = NOW + timedelta(days=7),
    delete_now: bool = False,
    deleting: bool = False,
    generation: int = 1,
    status: RetainedVolumeStatus | None = None,
    proven: bool = True,
    created_at: datetime = NOW - timedelta(hours=1),
) -> RetainedVolume:
    metadata: dict[str, Any] = {"generation": generation, "creationTimestamp": created_at.isoformat()}
    if deleting:
        metadata["deletionTimestamp"] = NOW.isoformat()
    return builders.retained(
        metadata=metadata,
        status={
            **({"provenance": PROOF.dump()} if proven else {}),
            **(status or RetainedVolumeStatus()).dump(),
        },
        volumeId=VOLUME,
        sandboxId=SANDBOX,
        retainUntil=retain_until.isoformat(),
        deleteNow=delete_now,
        recoveryId=RECOVERY,
    )


def with_status(resource: RetainedVolume, status: RetainedVolumeStatus) -> RetainedVolume:
    if status.provenance is None:
        status = status.model_copy(update={"provenance": resource.status.provenance})
    return resource.model_copy(update={"status": status})


def condition(status: RetainedVolumeStatus, type_: str) -> tuple[str, str, str]:
    found = next(c for c in status.conditions if c.type == type_)
    return found.status, found.reason, found.message


def mismatch() -> OwnershipMismatch:
    return OwnershipMismatch("m1", VOLUME, SANDBOX, "ki_bob")


# --- when a delete is due ---------------------------------------------------------------------------------


def test_volume_before_retain_until_is_observed_not_deleted() -> None:
    assert decide_retained(retained(), NOW).step is Step.OBSERVE


def test_volume_past_retain_until_is_deleted_as_expired() -> None:
    decision = decide_retained(retained(retain_until=NOW - timedelta(seconds=1)), NOW)
    assert (decision.step, decision.trigger) == (Step.DELETE, Trigger.EXPIRED)


def test_volume_exactly_at_retain_until_is_due() -> None:
    assert decide_retained(retained(retain_until=NOW), NOW).step is Step.DELETE


def test_delete_now_deletes_before_expiry() -> None:
    decision = decide_retained(retained(delete_now=True), NOW)
    assert (decision.step, decision.trigger) == (Step.DELETE, Trigger.DELETE_NOW)


def test_deleted_resource_is_deleted_through_the_finalizer_before_expiry() -> None:
    decision = decide_retained(retained(deleting=True), NOW)
    assert (decision.step, decision.trigger) == (Step.DELETE, Trigger.RESOURCE_DELETED)


def test_failed_delete_waits_for_its_next_attempt() -> None:
    base = retained(delete_now=True)
    failed = with_status(base, failed_status(base, NOW, classify_failure(Transient("boom"), 1, settings())))
    decision = decide_retained(failed, NOW + timedelta(seconds=10))
    assert decision.step is Step.WAIT
    assert decision.retry_at == NOW + timedelta(seconds=30)


def test_failed_delete_is_retried_once_its_next_attempt_is_due() -> None:
    base = retained(delete_now=True)
    failed = with_status(base, failed_status(base, NOW, classify_failure(Transient("boom"), 1, settings())))
    assert decide_retained(failed, NOW + timedelta(seconds=30)).step is Step.DELETE


def test_spec_change_after_a_failure_retries_at_once() -> None:
    base = retained(delete_now=True, generation=1)
    status = failed_status(base, NOW, classify_failure(mismatch(), 1, settings()))
    changed = retained(delete_now=True, generation=2, status=status)
    assert decide_retained(changed, NOW + timedelta(seconds=1)).step is Step.DELETE


def test_kubectl_delete_during_a_backoff_retries_at_once() -> None:
    base = retained(delete_now=True, generation=1)
    status = failed_status(base, NOW, classify_failure(mismatch(), 1, settings()))
    terminating = retained(delete_now=True, deleting=True, generation=2, status=status)
    assert decide_retained(terminating, NOW + timedelta(seconds=1)).step is Step.DELETE


def test_confirmed_deleted_volume_only_releases_the_resource() -> None:
    base = retained(delete_now=True)
    done = with_status(base, deleted_status(base, NOW))
    decision = decide_retained(done, NOW)
    assert decision.step is Step.RELEASE
    assert decide_retained(retained(deleting=True, status=done.status), NOW).step is Step.RELEASE


def test_extending_retain_until_after_a_failure_returns_to_retained() -> None:
    base = retained(retain_until=NOW - timedelta(seconds=5))
    status = failed_status(base, NOW, classify_failure(Transient("boom"), 1, settings()))
    extended = retained(retain_until=NOW + timedelta(days=1), generation=2, status=status)
    assert decide_retained(extended, NOW).step is Step.OBSERVE
    observed = observed_status(extended, NOW, volume_exists=True, attached_machine_id=None, snapshot_count=1)
    assert observed.phase is RetainedPhase.RETAINED
    assert (observed.attempts, observed.last_error, observed.next_attempt_at) == (0, None, None)


# --- backoff ----------------------------------------------------------------------------------------------


def test_backoff_starts_at_the_minimum() -> None:
    assert next_backoff(1, settings()) == 30


def test_backoff_doubles_per_failed_attempt() -> None:
    assert [next_backoff(n, settings()) for n in (1, 2, 3, 4)] == [30, 60, 120, 240]


def test_backoff_is_capped_at_the_maximum() -> None:
    assert next_backoff(8, settings()) == 3600
    assert next_backoff(10_000, settings()) == 3600


def test_rate_limit_hint_longer_than_the_backoff_is_honoured() -> None:
    failure = classify_failure(RateLimited("slow down", retry_after=120), 1, settings())
    assert (failure.reason, failure.delay) == (Reason.DELETE_FAILED, 120)


def test_rate_limit_hint_shorter_than_the_backoff_does_not_shorten_it() -> None:
    assert classify_failure(RateLimited("slow down", retry_after=1), 3, settings()).delay == 120


# --- failure classification and the status it leaves ------------------------------------------------------


def test_ownership_mismatch_blocks_with_stalled_condition_naming_only_the_expected_sandbox() -> None:
    base = retained(delete_now=True)
    status = failed_status(base, NOW, classify_failure(mismatch(), 1, settings()))
    assert status.phase is RetainedPhase.BLOCKED
    stalled = condition(status, "Stalled")
    assert stalled[:2] == ("True", Reason.OWNERSHIP_MISMATCH)
    assert f"refusing to delete volume {VOLUME}: it is attached to a machine" in stalled[2]
    assert "sandbox ki_alice" in stalled[2]
    assert "ki_bob" not in stalled[2] and "m1" not in stalled[2]  # another tenant's, possibly
    assert condition(status, "Ready")[0] == "False"
    assert status.attempts == 1
    assert status.last_error == stalled[2]
    assert status.next_attempt_at == NOW + timedelta(seconds=30)


def test_transient_fly_error_keeps_deleting_without_stalling() -> None:
    base = retained(delete_now=True)
    status = failed_status(base, NOW, classify_failure(Transient("503 upstream"), 1, settings()))
    assert status.phase is RetainedPhase.DELETING
    assert condition(status, "Stalled")[0] == "False"
    assert condition(status, "Ready")[1] == Reason.DELETE_FAILED
    assert status.last_error is not None and "503 upstream" in status.last_error


def test_machine_lookup_not_found_during_delete_is_a_retryable_failure() -> None:
    failure = classify_failure(NotFound("app gone", status=404), 1, settings())
    assert (failure.reason, failure.stalled, failure.blocked) == (Reason.DELETE_FAILED, False, False)


def test_unauthorized_fly_token_stalls_the_delete() -> None:
    failure = classify_failure(Unauthorized("bad token", status=401), 1, settings())
    assert (failure.reason, failure.stalled, failure.blocked) == (Reason.FLY_UNAUTHORIZED, True, False)


def test_fly_rejecting_the_delete_stalls_it() -> None:
    failure = classify_failure(Fatal("bad request", status=400), 1, settings())
    assert (failure.reason, failure.stalled) == (Reason.FLY_REJECTED, True)


def test_repeated_failures_grow_attempts_and_backoff() -> None:
    resource = retained(delete_now=True)
    moment = NOW
    for attempt in (1, 2, 3):
        failure = classify_failure(Transient("boom"), resource.status.attempts + 1, settings())
        resource = with_status(resource, failed_status(resource, moment, failure))
        assert resource.status.attempts == attempt
        assert resource.status.next_attempt_at == moment + timedelta(seconds=30 * 2 ** (attempt - 1))
        moment = resource.status.next_attempt_at


# --- the safety interlock ---------------------------------------------------------------------------------


def instance_body(name: str, status: dict[str, Any]) -> dict[str, Any]:
    return builders.instance_body(name, status=status)


def test_interlock_finds_an_instances_current_volume() -> None:
    held = volumes_in_use([instance_body("alice", {"volumeId": VOLUME})])
    assert held == {VOLUME: "instance alice (current volume)"}


def test_interlock_finds_the_source_of_a_recovery_in_flight() -> None:
    held = volumes_in_use(
        [instance_body("alice", {"volumeId": "vol_new", "recovery": {"sourceVolumeId": VOLUME}})]
    )
    assert held[VOLUME] == "instance alice (source volume of recovery in flight)"


def test_interlock_finds_the_replacement_of_a_recovery_in_flight() -> None:
    held = volumes_in_use([instance_body("bob", {"recovery": {"replacementVolumeId": VOLUME}})])
    assert held[VOLUME] == "instance bob (replacement volume of recovery in flight)"


def test_interlock_ignores_volumes_no_instance_names() -> None:
    bodies = [
        instance_body("alice", {"volumeId": "vol_other", "lastRecovery": {"retainedVolume": "x"}}),
        instance_body("fresh", {}),
        {"metadata": {"name": "no-status"}},
    ]
    assert VOLUME not in volumes_in_use(bodies)


def test_volume_in_use_blocks_without_counting_as_a_failed_attempt() -> None:
    base = retained(delete_now=True)
    failure = volume_in_use_failure(VOLUME, "instance alice (current volume)", settings())
    status = failed_status(base, NOW, failure)
    assert status.phase is RetainedPhase.BLOCKED
    stalled = condition(status, "Stalled")
    assert stalled[:2] == ("True", Reason.VOLUME_IN_USE)
    assert stalled[2] == f"refusing to delete volume {VOLUME}: in use by instance alice (current volume)"
    assert status.attempts == 0
    assert status.next_attempt_at == NOW + timedelta(seconds=60)


# --- Events once per blocked episode ----------------------------------------------------------------------


def test_first_block_starts_an_episode() -> None:
    base = retained(delete_now=True)
    blocked = failed_status(base, NOW, classify_failure(mismatch(), 1, settings()))
    assert starts_blocked_episode(base.status, blocked)


def test_repeated_block_for_the_same_reason_is_the_same_episode() -> None:
    base = retained(delete_now=True)
    first = with_status(base, failed_status(base, NOW, classify_failure(mismatch(), 1, settings())))
    second = failed_status(first, NOW + timedelta(seconds=30), classify_failure(mismatch(), 2, settings()))
    assert not starts_blocked_episode(first.status, second)


def test_block_for_a_new_reason_starts_a_new_episode() -> None:
    base = retained(delete_now=True)
    first = with_status(base, failed_status(base, NOW, classify_failure(mismatch(), 1, settings())))
    in_use = volume_in_use_failure(VOLUME, "instance alice (current volume)", settings())
    assert starts_blocked_episode(first.status, failed_status(first, NOW, in_use))


def test_transient_failure_is_no_blocked_episode() -> None:
    base = retained(delete_now=True)
    failed = failed_status(base, NOW, classify_failure(Transient("boom"), 1, settings()))
    assert not starts_blocked_episode(base.status, failed)


# --- observation and status -------------------------------------------------------------------------------


def test_present_volume_is_retained_and_ready() -> None:
    status = observed_status(retained(), NOW, volume_exists=True, attached_machine_id="m9", snapshot_count=2)
    assert status.phase is RetainedPhase.RETAINED
    assert (status.snapshot_count, status.attached_machine_id) == (2, "m9")
    assert condition(status, "Ready")[:2] == ("True", Reason.RETAINED)
    assert condition(status, "Stalled")[0] == "False"


def test_missing_volume_is_retained_but_not_ready() -> None:
    status = observed_status(
        retained(), NOW, volume_exists=False, attached_machine_id=None, snapshot_count=None
    )
    assert condition(status, "Ready")[:2] == ("False", Reason.VOLUME_NOT_FOUND)


def test_unchanged_observation_keeps_the_transition_time() -> None:
    first = observed_status(retained(), NOW, volume_exists=True, attached_machine_id=None, snapshot_count=1)
    later = observed_status(
        retained(status=first),
        NOW + timedelta(hours=1),
        volume_exists=True,
        attached_machine_id=None,
        snapshot_count=1,
    )
    assert later == first


def test_delete_begins_with_phase_deleting_and_not_ready() -> None:
    status = deleting_status(retained(delete_now=True), NOW, Trigger.DELETE_NOW)
    assert status.phase is RetainedPhase.DELETING
    assert condition(status, "Ready")[0] == "False"


def test_confirmed_delete_clears_the_retry_schedule() -> None:
    base = retained(delete_now=True)
    failed = with_status(base, failed_status(base, NOW, classify_failure(mismatch(), 1, settings())))
    done = deleted_status(failed, NOW)
    assert (done.phase, done.last_error, done.next_attempt_at) == (RetainedPhase.DELETING, None, None)
    assert condition(done, "Ready")[1] == Reason.VOLUME_DELETED
    assert condition(done, "Stalled")[0] == "False"


# --- when to look again -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retain_in", "expected"),
    [(timedelta(days=7), 60.0), (timedelta(seconds=5), 5.0)],
    ids=["far-expiry-waits-one-interval", "near-expiry-wakes-at-retain-until"],
)
def test_next_check_is_the_interval_or_retain_until_whichever_is_first(
    retain_in: timedelta, expected: float
) -> None:
    assert next_check_delay(retained(retain_until=NOW + retain_in), NOW, settings()) == expected


def test_next_check_of_a_failed_delete_is_its_retry_time() -> None:
    base = retained(delete_now=True)
    failed = with_status(base, failed_status(base, NOW, classify_failure(Transient("x"), 1, settings())))
    assert next_check_delay(failed, NOW, settings()) == 30.0


# --- provenance: only what the operator minted is acted on --------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"retain_until": NOW - timedelta(seconds=1)},
        {"delete_now": True},
        {"deleting": True},
        {},
    ],
    ids=["expired", "delete-now", "kubectl-delete", "retained"],
)
def test_a_retained_volume_without_the_operators_provenance_is_never_acted_on_on_fly(
    kwargs: dict[str, Any],
) -> None:
    resource = retained(proven=False, **kwargs)
    assert decide_retained(resource, NOW).step is Step.UNPROVEN
    assert "not created by the operator" in (provenance_problem(resource) or "")


def test_a_spec_naming_another_volume_than_the_provenance_is_not_acted_on() -> None:
    resource = retained(delete_now=True)
    altered = resource.model_copy(
        update={"spec": resource.spec.model_copy(update={"volume_id": "vol_of_someone_else"})}
    )
    assert decide_retained(altered, NOW).step is Step.UNPROVEN
    assert "spec.volumeId" in (provenance_problem(altered) or "")
    assert decide_retained(resource, NOW).step is Step.DELETE


def test_an_unproven_resource_is_reported_only_after_the_grace_for_a_mint_in_progress() -> None:
    young = retained(proven=False, created_at=NOW - timedelta(seconds=5))
    grace = settings(retained_provenance_grace_seconds=30)
    assert provenance_grace_left(young, NOW, grace) == pytest.approx(25)
    assert next_check_delay(young, NOW, grace) == pytest.approx(25)
    old = retained(proven=False, created_at=NOW - timedelta(minutes=5))
    assert provenance_grace_left(old, NOW, grace) == 0


def test_the_interlock_message_names_no_instance_of_another_namespace() -> None:
    bodies = [
        {"metadata": {"name": "alice", "namespace": "tenants"}, "status": {"volumeId": "vol_a"}},
        {"metadata": {"name": "secret-bob", "namespace": "other"}, "status": {"volumeId": "vol_b"}},
    ]
    held = volumes_in_use(bodies, viewer="tenants")
    assert held["vol_a"] == "instance alice (current volume)"
    assert "secret-bob" not in held["vol_b"] and "other" not in held["vol_b"].replace("another", "")
