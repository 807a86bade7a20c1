"""The decisions of stops.py, one test per row: what a read of the machine says about a reported stop, where
a recovery takes its data from, and whether a stop seen while starting is a failed start."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from builders import instance
from kiloclaw_operator import lifecycle
from kiloclaw_operator.fly.models import Machine, Snapshot, Volume
from kiloclaw_operator.models import Phase, RecoverySource
from kiloclaw_operator.reasons import Reason
from kiloclaw_operator.stops import Verdict, choose_source, judge_failed_start, judge_stop, migrated_volume

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
VOLUME = "vol_recorded"


def machine(
    state: str = "stopped",
    *,
    volume: str = VOLUME,
    host_status: str | None = "ok",
    requested_stop: bool | None = False,
    exit_event: bool = True,
    exited_at: datetime | None = None,
    sandbox: str | None = None,
) -> Machine:
    events: list[dict[str, Any]] = []
    if exit_event:
        request: dict[str, Any] = {"exit_event": {"exit_code": 1}}
        if requested_stop is not None:
            request["exit_event"]["requested_stop"] = requested_stop
        event = {"type": "exit", "status": "stopped", "source": "flyd", "request": request}
        if exited_at is not None:
            event["timestamp"] = int(exited_at.timestamp() * 1000)
        events.append(event)
    return Machine.model_validate(
        {
            "id": "m1",
            "state": state,
            "region": "iad",
            "host_status": host_status,
            "events": events,
            "config": {
                "image": "img",
                "mounts": [{"volume": volume, "path": "/root"}],
                "metadata": {"kiloclaw_sandbox_id": sandbox} if sandbox else {},
            },
        }
    )


@pytest.mark.parametrize(
    ("observed", "verdict"),
    [
        (None, Verdict.GONE),
        (machine("destroyed"), Verdict.GONE),
        (machine("started"), Verdict.NOT_STOPPED),
        (machine("starting"), Verdict.NOT_STOPPED),
        (machine("started", volume="vol_new"), Verdict.MIGRATED),
        (machine("starting", volume="vol_new"), Verdict.MIGRATED),
        (machine("stopped", volume="vol_new"), Verdict.MAYBE_MIGRATING),
        (machine("stopped", host_status="unreachable"), Verdict.RECOVER),
        (machine("stopped", host_status="unknown", requested_stop=True), Verdict.RECOVER),
        (machine("stopped", requested_stop=False), Verdict.RECOVER),
        (machine("stopped", requested_stop=True), Verdict.MAYBE_MIGRATING),
        (machine("stopped", exit_event=False), Verdict.MAYBE_MIGRATING),
        (machine("stopped", requested_stop=None), Verdict.MAYBE_MIGRATING),
    ],
    ids=[
        "404",
        "destroyed",
        "started: a wrong listing",
        "starting: a stale listing",
        "started on a new volume: migrated",
        "starting on a new volume: migrating",
        "stopped on a new volume: between fork and start",
        "dead host",
        "unknown host",
        "crash",
        "requested stop: maybe a migration",
        "no exit event: cannot tell",
        "exit without requested_stop: cannot tell",
    ],
)
def test_a_read_of_the_machine_judges_a_reported_stop(observed: Machine | None, verdict: Verdict) -> None:
    assert judge_stop(VOLUME, observed) is verdict


def volume(host_status: str | None) -> Volume:
    return Volume.model_validate({"id": VOLUME, "region": "iad", "host_status": host_status})


def snapshot(age: timedelta, snapshot_id: str = "vs_1") -> Snapshot:
    return Snapshot.model_validate(
        {"id": snapshot_id, "created_at": (NOW - age).isoformat(), "status": "created"}
    )


def test_a_reachable_host_is_forked_whatever_the_snapshots() -> None:
    assert (
        choose_source(volume("ok"), [snapshot(timedelta(hours=1))], NOW, 93600).source is RecoverySource.FORK
    )
    assert choose_source(volume(None), None, NOW, 0).source is RecoverySource.FORK


def test_an_unreachable_host_restores_the_newest_snapshot_within_the_policy() -> None:
    choice = choose_source(
        volume("unreachable"),
        [snapshot(timedelta(hours=20), "vs_old"), snapshot(timedelta(hours=2), "vs_new")],
        NOW,
        93600,
    )
    assert choice.source is RecoverySource.SNAPSHOT
    assert choice.snapshot is not None and choice.snapshot.id == "vs_new"


def test_an_unreachable_host_waits_when_the_newest_snapshot_is_older_than_the_policy() -> None:
    choice = choose_source(volume("unreachable"), [snapshot(timedelta(hours=30))], NOW, 93600)
    assert choice.source is None
    assert "30h00m old" in choice.reason and "maxDataLossSeconds" in choice.reason


def test_an_unreachable_host_waits_without_snapshots_or_when_the_policy_is_zero() -> None:
    assert choose_source(volume("unreachable"), [], NOW, 93600).source is None
    zero = choose_source(volume("unreachable"), [snapshot(timedelta(minutes=5))], NOW, 0)
    assert zero.source is None and "is 0" in zero.reason
    unlisted = choose_source(volume("unknown"), None, NOW, 93600)
    assert unlisted.source is None and "cannot be listed" in unlisted.reason


STALL = lifecycle.Decision(lifecycle.Action.SETTLE, Phase.STOPPED, stall=Reason.START_FAILED)


@pytest.mark.parametrize(
    ("observed", "action", "stalls"),
    [
        (machine("started"), lifecycle.Action.SETTLE, False),
        (machine("starting"), lifecycle.Action.NOTHING, False),
        (machine("stopped", exit_event=False), lifecycle.Action.START, False),
        (machine("stopped", requested_stop=True), lifecycle.Action.START, False),
        (machine("stopped", requested_stop=False), lifecycle.Action.SETTLE, True),
        (machine("failed"), lifecycle.Action.SETTLE, True),
        (machine("stopped", host_status="unreachable"), lifecycle.Action.BEGIN_RECOVERY, False),
        (machine("failed", host_status="unknown"), lifecycle.Action.BEGIN_RECOVERY, False),
    ],
    ids=[
        "started meanwhile",
        "still starting",
        "its own stop landed late (no exit event)",
        "a requested stop",
        "exited by itself",
        "failed",
        "stopped on a host that died",
        "failed on a host Fly cannot see",
    ],
)
def test_a_stop_seen_while_starting_is_a_failed_start_only_when_the_machine_says_so(
    observed: Machine, action: lifecycle.Action, stalls: bool
) -> None:
    decided = judge_failed_start(observed, STALL)
    assert decided.action is action
    assert (decided.stall is not None) is stalls


@pytest.mark.parametrize(
    ("exited", "action", "stalls"),
    [
        (timedelta(seconds=-30), lifecycle.Action.START, False),
        (timedelta(seconds=1), lifecycle.Action.START, False),
        (timedelta(seconds=10), lifecycle.Action.SETTLE, True),
    ],
    ids=[
        "exited before the stop was recorded: the start never reached it",
        "exited within the clock's tolerance of the record: the same exit",
        "exited after the record: the start ran and the machine exited",
    ],
)
def test_a_machine_that_has_not_run_since_the_stop_the_status_recorded_is_started_again(
    exited: timedelta, action: lifecycle.Action, stalls: bool
) -> None:
    """A leader killed between writing ``Starting`` and its start call: the next one finds the machine still
    stopped by the exit the status recorded (chaos seed 9033 stalled such an instance as a failed start)."""
    observed_at = NOW
    stopped = machine("stopped", requested_stop=False, exited_at=observed_at + exited)
    decided = judge_failed_start(stopped, STALL, observed_at=observed_at)
    assert decided.action is action
    assert (decided.stall is not None) is stalls


def test_a_start_that_a_dead_host_stopped_without_recovery_stalls_saying_so() -> None:
    decided = judge_failed_start(machine("stopped", host_status="unreachable"), STALL, relocatable=False)
    assert decided.stall == Reason.HOST_UNAVAILABLE and "recovery is disabled" in decided.reason


def test_an_exit_events_time_reads_the_same_in_milliseconds_or_seconds() -> None:
    """The spec types ``MachineEvent.timestamp`` only as an integer: either unit gives the same moment."""
    in_ms = machine("stopped", exited_at=NOW).last_exit
    assert in_ms is not None and in_ms.at == NOW
    in_seconds = in_ms.model_copy(update={"timestamp": int(NOW.timestamp())})
    assert in_seconds.at == NOW


def test_only_the_recorded_machine_carrying_the_instances_sandbox_id_proves_a_migration() -> None:
    subject = instance(status={"phase": "Running", "machineId": "m1", "volumeId": VOLUME})
    ours = subject.spec.sandbox_id
    assert migrated_volume(subject, machine("started", volume="vol_new", sandbox=ours))
    assert migrated_volume(subject, machine("stopped", volume="vol_new", sandbox=ours))
    assert not migrated_volume(subject, machine("started", volume="vol_new", sandbox="ki_someone_else"))
    assert not migrated_volume(subject, machine("started", volume="vol_new"))  # no sandbox id at all
    assert not migrated_volume(subject, machine("started", sandbox=ours))  # still on the recorded volume
    assert not migrated_volume(subject, machine("destroyed", volume="vol_new", sandbox=ours))
