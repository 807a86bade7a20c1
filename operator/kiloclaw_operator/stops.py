"""An unexpected stop on the Fly that really exists (DESIGN 3.9): confirm it, tell it apart from a platform
migration and from a listing that is wrong, and choose where the sandbox's data comes from — before a
recovery makes its first destructive call.

The decisions are plain functions (``judge_stop``, ``choose_source``); ``handle_stop`` is the one entry the
driver calls where it used to begin a recovery. It reads the machine itself (``GET /machines/{id}``, with
``host_status`` and its events: a listing can be wrong or late), and then:

- the machine is not stopped (a wrong or stale listing) → no recovery; the observation is recorded;
- the machine runs, or is on its way, mounting a volume the instance did not record → Fly migrated it (same
  machine id, new volume id): ``status.volumeId`` follows, Event ``MachineMigrated``, nothing is deleted;
- the machine is stopped on a reachable host and its exit was *requested* (a stop the operator did not send:
  Fly's own graceful stop before a migration, or a person) or Fly shows no exit at all (cannot tell) → wait up
  to ``migration_grace_seconds`` for it to come back started; if it does, the migration is followed, if not,
  the recovery goes ahead (fork: the old volume is intact and stays);
- otherwise (a crash, an OOM, a dead host) → a recovery, from the source ``choose_source`` picks: a fork when
  the old volume's host is reachable; when it is not, the newest snapshot if the instance's policy
  (``spec.recovery.maxDataLossSeconds``) accepts its age; else no recovery at all: phase ``Stopped``,
  ``Stalled`` reason ``WaitingForSource`` with what the admin can do, and the instance looks again every
  ``source_recheck_seconds`` (no deadline is burnt; it proceeds by itself when the host returns or a snapshot
  appears).
Mass failure passes through the brake (brake.py) before any recovery begins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from . import conditions, lifecycle, reasons, recovery
from .fly import Fatal, FlyClient, FlyError, HostUnavailable, NotFound
from .fly import vocabulary as fly
from .fly.models import Machine, Snapshot, Volume
from .metrics import STOP_VERDICTS
from .models import DesiredState, Instance, PendingCleanup, Phase, RecoverySource
from .reasons import Reason

logger = logging.getLogger("kiloclaw.stops")


class Verdict(Enum):
    NOT_STOPPED = "not_stopped"  # the machine is not stopped: the listing was wrong or late
    MIGRATED = "migrated"  # same machine id, on a new volume, running or on its way
    MAYBE_MIGRATING = "maybe_migrating"  # a requested stop (or no exit shown) on a reachable host
    GONE = "gone"  # 404 or destroyed: the lifecycle's "machine gone" path handles it
    RECOVER = "recover"  # a real unexpected stop


#: Machine states on the way to (or at) running after a migration.
_RUNNING_OR_ON_ITS_WAY = frozenset({fly.STARTED, fly.STARTING, fly.CREATED, fly.REPLACING})


def judge_stop(recorded_volume_id: str | None, machine: Machine | None) -> Verdict:
    """What a per-machine read says about a stop a listing (or a poll) reported."""
    if machine is None or machine.is_gone:
        return Verdict.GONE
    moved = bool(machine.volume_ids) and recorded_volume_id not in machine.volume_ids
    if machine.state != fly.STOPPED:
        if moved and machine.state in _RUNNING_OR_ON_ITS_WAY:
            return Verdict.MIGRATED
        return Verdict.NOT_STOPPED
    if moved:
        return Verdict.MAYBE_MIGRATING  # stopped between the fork and the start on the new host
    if not machine.host_reachable:
        return Verdict.RECOVER
    last_exit = machine.last_exit
    if last_exit is None or last_exit.requested_stop is not False:
        # Fly's own graceful stop (requested_stop), or nothing that says the machine exited by itself.
        return Verdict.MAYBE_MIGRATING
    return Verdict.RECOVER


@dataclass(frozen=True)
class SourceChoice:
    """Where a recovery takes the data from; ``source`` None = no acceptable source (wait, ``reason``)."""

    source: RecoverySource | None
    reason: str
    snapshot: Snapshot | None = None

    @property
    def waits(self) -> bool:
        return self.source is None


def newest_snapshot(snapshots: list[Snapshot]) -> Snapshot | None:
    usable = [s for s in snapshots if s.created_at is not None and s.status in ("", "created", "complete")]
    return max(usable, key=lambda s: s.created_at or datetime.min, default=None)


def choose_source(
    volume: Volume, snapshots: list[Snapshot] | None, now: datetime, max_data_loss_seconds: int
) -> SourceChoice:
    """Fork when the old volume's host is reachable (nothing lost); otherwise the newest snapshot if the
    policy accepts its age; otherwise nothing (wait). ``snapshots`` None: they could not be listed."""
    if volume.host_reachable:
        return SourceChoice(RecoverySource.FORK, "the old volume's host is reachable")
    host = volume.host_status or "unknown"
    if max_data_loss_seconds <= 0:
        return SourceChoice(
            None,
            f"the host of volume {volume.id} is {host} (a fork cannot complete) and "
            "spec.recovery.maxDataLossSeconds is 0 (never restore a snapshot): waiting for the host to "
            "return; raise maxDataLossSeconds to restore the newest snapshot instead",
        )
    if snapshots is None:
        return SourceChoice(
            None, f"the host of volume {volume.id} is {host} and its snapshots cannot be listed yet"
        )
    snapshot = newest_snapshot(snapshots)
    if snapshot is None or snapshot.created_at is None:
        return SourceChoice(
            None,
            f"the host of volume {volume.id} is {host} (a fork cannot complete) and the volume has no "
            "snapshot: waiting for the host to return or a snapshot to appear",
        )
    age = (now - snapshot.created_at).total_seconds()
    if age > max_data_loss_seconds:
        return SourceChoice(
            None,
            f"the host of volume {volume.id} is {host} (a fork cannot complete) and its newest snapshot "
            f"{snapshot.id} is {_age(age)} old, more than spec.recovery.maxDataLossSeconds "
            f"({max_data_loss_seconds}): waiting for the host to return; raise maxDataLossSeconds to accept "
            "that loss",
        )
    return SourceChoice(
        RecoverySource.SNAPSHOT,
        f"the host of volume {volume.id} is {host}: restoring snapshot {snapshot.id} ({_age(age)} old)",
        snapshot,
    )


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


# --- a start that seems to have failed -------------------------------------------------------------------


#: How far a machine's last exit may lie after the status's last observation (in Fly's clock, read from its
#: ``Date`` header to the second) and still be the exit that observation saw.
SEEN_EXIT_TOLERANCE = timedelta(seconds=2)


def judge_failed_start(
    machine: Machine,
    decision: lifecycle.Decision,
    *,
    relocatable: bool = True,
    observed_at: datetime | None = None,
) -> lifecycle.Decision:
    """``Starting`` saw the machine stopped: before stalling it as a failed start, what the machine says.
    A stop that was *requested* (the operator's own earlier stop landing late, chaos seed 563737) is not a
    failed start: start it again. Started or on its way: no stall. Stopped on a host Fly reports unreachable
    (the host died while the machine started): the sandbox is not at fault, so it is relocated as an
    unexpected stop is (``relocatable``: recovery on and a volume recorded), else stalled saying so. An exit
    no later than the status's last observation (``observed_at``, in Fly's clock) is the stop the status
    already recorded, not the outcome of the start: the start never reached the machine (a leader killed
    between writing ``Starting`` and its start call, chaos seed 9033), so it is started again. Failed, or an
    exit by itself after the start: the stall."""
    if machine.state == fly.STARTED:
        return lifecycle.Decision(lifecycle.Action.SETTLE, Phase.RUNNING, reason="machine started")
    if machine.state in fly.TRANSIENT_MACHINE_STATES and not machine.is_gone:
        return lifecycle.Decision(lifecycle.Action.NOTHING, reason=f"machine {machine.state}")
    if machine.state in (fly.STOPPED, fly.FAILED) and not machine.host_reachable:
        if relocatable:
            return lifecycle.Decision(
                lifecycle.Action.BEGIN_RECOVERY,
                reason=f"machine {machine.id} stopped while starting on a host Fly reports "
                f"{machine.host_status}: relocating the sandbox",
            )
        return lifecycle.Decision(
            lifecycle.Action.SETTLE,
            Phase.STOPPED,
            stall=Reason.HOST_UNAVAILABLE,
            reason=f"machine {machine.id} stopped while starting on a host Fly reports {machine.host_status} "
            "and recovery is disabled: enable spec.recovery to relocate the sandbox, or set the "
            "kiloclaw.kilo.ai/retry annotation once the host is back",
        )
    if machine.state == fly.STOPPED:
        last_exit = machine.last_exit
        if last_exit is None or last_exit.requested_stop is True:
            return lifecycle.Decision(
                lifecycle.Action.START,
                reason=f"machine {machine.id} is stopped by a requested stop (not a failed start): "
                "starting it again",
            )
        exited_at = last_exit.at
        if exited_at and observed_at and exited_at - observed_at <= SEEN_EXIT_TOLERANCE:
            return lifecycle.Decision(
                lifecycle.Action.START,
                reason=f"machine {machine.id} has not run since the stop already recorded (the start did not "
                "reach it): starting it again",
            )
    return decision


async def confirm_failed_start(
    client: FlyClient, instance: Instance, decision: lifecycle.Decision
) -> tuple[lifecycle.Decision, Machine | None]:
    """Read the machine before a ``StartFailed`` stall (a listing or a wait may report an older stop)."""
    machine_id = instance.status.machine_id
    if machine_id is None:
        return decision, None
    try:
        machine = await client.get_machine(instance.spec.fly_app, machine_id)
    except NotFound:
        return decision, None
    except FlyError as exc:
        if isinstance(exc, Fatal):
            raise
        return lifecycle.Decision(lifecycle.Action.NOTHING, reason=f"cannot confirm the stop: {exc}"), None
    relocatable = bool(
        instance.spec.recovery.enabled and instance.status.volume_id and instance.status.region
    )
    observed_at = instance.status.observed_at
    in_fly_clock = None if observed_at is None else observed_at + timedelta(seconds=client.clock_offset)
    return judge_failed_start(machine, decision, relocatable=relocatable, observed_at=in_fly_clock), machine


def waiting(instance: Instance) -> bool:
    """Stalled on something that passes by itself (no source yet, recoveries paused): not a hold."""
    return conditions.stalled_reason(instance.status) in reasons.WAITING


# --- the entry the driver calls ------------------------------------------------------------------------


async def handle_stop(port: recovery.Port, instance: Instance) -> Instance:
    """Confirm an unexpected stop with a read of the machine, then follow a migration, ignore a wrong
    listing, wait for a source, or begin the recovery (through the brake)."""
    if port.release_admission is not None:
        port.release_admission()
    if port.brake is not None and not waiting(instance):
        await port.brake.note_reported()
    machine = await _read_machine(port, instance)
    if machine is None and not _has_machine(instance):
        verdict = Verdict.RECOVER  # no machine recorded (a new attempt after a failed one): its volume counts
    else:
        verdict = judge_stop(instance.status.volume_id, machine)
    if verdict is Verdict.MAYBE_MIGRATING and machine is not None:
        machine = await _await_migration(port, instance, machine)
        verdict = judge_stop(instance.status.volume_id, machine)
        if verdict is Verdict.MAYBE_MIGRATING and migrated_volume(instance, machine):
            # Fly forked the volume to a new host and left the machine stopped there (it was not running when
            # Fly moved it, or its start is late): the data now lives on the new volume, and the old one is
            # Fly's to remove. The instance follows; if the machine stays stopped, the next pass recovers from
            # the volume it follows (a fork of the old one would fail once Fly removed it).
            verdict = Verdict.MIGRATED
        elif verdict is Verdict.MAYBE_MIGRATING:
            # Still stopped after the grace: not a migration we can see. The old volume is not touched by a
            # fork-based recovery, so going ahead loses nothing.
            verdict = Verdict.RECOVER
    STOP_VERDICTS.labels(verdict=verdict.value).inc()
    if verdict is Verdict.GONE:
        return instance  # the next observation sees it gone and the lifecycle recreates it
    assert machine is not None or verdict is Verdict.RECOVER
    if verdict is Verdict.NOT_STOPPED:
        return await _not_stopped(port, instance, machine)
    if verdict is Verdict.MIGRATED:
        return await follow_migration(port, instance, machine)
    return await _recover_from_chosen_source(port, instance)


def _has_machine(instance: Instance) -> bool:
    return instance.status.machine_id is not None


async def _read_machine(port: recovery.Port, instance: Instance) -> Machine | None:
    machine_id = instance.status.machine_id
    if machine_id is None:
        return None
    try:
        return await port.fly.get_machine(instance.spec.fly_app, machine_id)
    except NotFound:
        return None


async def _await_migration(port: recovery.Port, instance: Instance, machine: Machine) -> Machine | None:
    """Give a requested stop ``migration_grace_seconds`` to come back started (Fly's migrations stop, fork
    and start within seconds), bounded by Fly's wait call; then read the machine again."""
    grace = port.settings.migration_grace_seconds
    if grace > 0:
        logger.info(
            "machine %s stopped on request (not the operator's): waiting up to %ss for a platform migration",
            machine.id,
            grace,
            extra=_fields(instance),
        )
        deadline = port.clock() + timedelta(seconds=grace)
        while port.clock() < deadline and not port.stopping():
            remaining = (deadline - port.clock()).total_seconds()
            seconds = max(1, min(port.settings.wait_call_seconds, int(remaining + 0.999)))
            try:
                state = await port.fly.wait_for_states(
                    instance.spec.fly_app, machine.id, (fly.STARTED,), timeout_seconds=seconds
                )
            except NotFound:
                return None
            if state is not None:
                break
    try:
        return await port.fly.get_machine(instance.spec.fly_app, machine.id)
    except NotFound:
        return None


async def _not_stopped(port: recovery.Port, instance: Instance, machine: Machine | None) -> Instance:
    assert machine is not None
    logger.warning(
        "machine %s was reported stopped but Fly says %s: no recovery",
        machine.id,
        machine.state,
        extra=_fields(instance),
    )
    if machine.state == instance.status.fly_state:
        return instance
    return await port.commit(
        instance,
        instance.status.model_copy(update={"fly_state": machine.state, "observed_at": port.clock()}),
        "a reported stop the machine itself does not confirm",
    )


async def follow_migration(port: recovery.Port, instance: Instance, machine: Machine | None) -> Instance:
    """Fly moved the machine (same id) onto a new volume: the instance follows; nothing is deleted (the old
    volume is Fly's to clean up, and no recovery begins)."""
    assert machine is not None
    new_volume, old_volume = _moved_to(instance, machine), instance.status.volume_id
    status = instance.status.model_copy(
        update={
            "volume_id": new_volume,
            "region": machine.region or instance.status.region,
            "fly_state": machine.state,
            "observed_at": port.clock(),
        }
    )
    if conditions.stalled_reason(status) in reasons.WAITING:
        status = conditions.clear_stalled(status, port.clock(), instance.generation)
        if instance.spec.state is DesiredState.RUNNING:
            # No longer waiting, and the sandbox should run: Running, even while the machine is still stopped
            # on its new host, so that the next pass treats that stop as the unexpected stop it is (a read
            # confirms it, then a start or a recovery from the new volume). Left Stopped, a settled phase,
            # nothing would ever start it (chaos seed 20261397).
            status = status.model_copy(update={"phase": Phase.RUNNING})
    instance = await port.commit(
        instance, status, "Fly migrated the machine: follow its new volume (nothing is deleted)"
    )
    message = (
        f"Fly migrated machine {machine.id} to another host: volume {old_volume} → {new_volume} "
        "(followed; the old volume was not deleted)"
    )
    logger.info("%s", message, extra=_fields(instance))
    await port.kube.post_event(instance.ref, Reason.MACHINE_MIGRATED, message)
    return instance


async def follow_migration_before_destroy(port: recovery.Port, instance: Instance) -> Instance:
    """At a deletion: Fly may have moved the machine onto a new volume that no pass followed (the deletion
    came first, or the instance waited for its dead host). The recorded machine, read now, proves that volume
    the instance's (``migrated_volume``), so the destroy acts on it; the old volume, still recorded, goes as
    pending cleanup. Whether Fly removes it by itself is not documented (flysim does once the fork has
    hydrated, which deleting the fork first prevents), and it is this instance's record to clean up."""
    machine_id = instance.status.machine_id
    if instance.status.recovery is not None or machine_id is None:
        return instance
    try:
        machine = await port.fly.get_machine(instance.spec.fly_app, machine_id)
    except NotFound:
        return instance
    if not migrated_volume(instance, machine):
        return instance
    new_volume, old_volume = _moved_to(instance, machine), instance.status.volume_id
    logger.info(
        "Fly migrated machine %s from volume %s to %s before the deletion: destroying what it mounts now",
        machine_id,
        old_volume,
        new_volume,
        extra=_fields(instance),
    )
    update: dict[str, Any] = {"volume_id": new_volume, "region": machine.region or instance.status.region}
    if instance.status.pending_cleanup is None and old_volume is not None:
        update["pending_cleanup"] = PendingCleanup(volume_id=old_volume)
    return await port.commit(
        instance,
        instance.status.model_copy(update=update),
        "Fly migrated the machine: record the volume it mounts, and the old one, before destroying them",
    )


def migrated_volume(instance: Instance, machine: Machine | None) -> bool:
    """A read of the instance's own machine (the recorded id, carrying the instance's sandbox id) shows it
    mounting a volume the instance did not record, whatever its state: only Fly moves a machine to another
    volume (a migration), so the status follows it before anything acts on the old volume id (a start or
    update would otherwise mount the volume Fly removed, a destroy refuse the machine)."""
    return (
        machine is not None
        and machine.id == instance.status.machine_id
        and machine.sandbox_id == instance.spec.sandbox_id
        and not machine.is_gone
        and bool(machine.volume_ids)
        and instance.status.volume_id not in machine.volume_ids
    )


def _moved_to(instance: Instance, machine: Machine) -> str:
    """The volume a migrated machine mounts now (``migrated_volume`` holds)."""
    return next(v for v in machine.volume_ids if v != instance.status.volume_id)


async def _recover_from_chosen_source(port: recovery.Port, instance: Instance) -> Instance:
    volume_id = instance.status.volume_id
    if volume_id is None:
        return await recovery.begin(port, instance)  # records "nothing to recover from"
    try:
        volume = await port.fly.get_volume(instance.spec.fly_app, volume_id)
    except (NotFound, Fatal):
        # Step 2 reads the volume again and fails the recovery the documented way ("source volume missing",
        # or the rejection): nothing destructive happens before it.
        return await recovery.begin(port, instance)
    snapshots: list[Snapshot] | None = None
    if not volume.host_reachable and instance.spec.recovery.max_data_loss_seconds > 0:
        try:
            snapshots = await port.fly.list_volume_snapshots(instance.spec.fly_app, volume_id)
        except NotFound:
            snapshots = []
        except FlyError as exc:
            logger.warning("cannot list snapshots of %s: %s", volume_id, exc, extra=_fields(instance))
    choice = choose_source(volume, snapshots, port.clock(), instance.spec.recovery.max_data_loss_seconds)
    if choice.source is None:
        return await stall_waiting(port, instance, Reason.WAITING_FOR_SOURCE, choice.reason)
    if port.brake is None:
        return await recovery.begin(port, instance, choice.source, choice.snapshot)
    paused = await port.brake.admit(instance, port.wake)
    if paused is not None:
        return await stall_waiting(port, instance, Reason.RECOVERY_PAUSED, paused)
    # The budget: begun at a paced rate, at most `recovery_concurrency` running at once.
    await port.brake.paced_begin()
    async with port.brake.slots:
        return await recovery.begin(port, instance, choice.source, choice.snapshot)


async def resume_within_budget(port: recovery.Port, instance: Instance) -> Instance:
    """A recovery in flight goes on holding a place of the budget (``recovery_concurrency``): one that a
    transient error interrupted does not run beside the full budget when it resumes. Like a recovery that
    begins, it gives the pass's admission back: the budget is its bound."""
    if port.release_admission is not None:
        port.release_admission()
    if port.brake is None:
        return await recovery.resume(port, instance)
    async with port.brake.slots:
        return await recovery.resume(port, instance)


async def stall_waiting(port: recovery.Port, instance: Instance, reason: Reason, message: str) -> Instance:
    """No recovery now: phase Stopped, Stalled with ``reason`` (not a hold: the instance looks again every
    ``source_recheck_seconds``); the Event is posted when the message changes."""
    before = instance.status.condition(conditions.STALLED)
    now = port.clock()
    status = instance.status.model_copy(
        update={"phase": Phase.STOPPED, "observed_generation": instance.generation}
    )
    status = conditions.mark_stalled(status, reason, message, now, instance.generation)
    instance = await port.commit(instance, status, f"no recovery yet: {reason}")
    if before is None or before.reason != reason or before.message != message:
        logger.warning("%s", message, extra=_fields(instance))
        await port.kube.post_event(instance.ref, reason, message, warning=True)
    return instance


async def host_unavailable(
    port: recovery.Port, instance: Instance, exc: HostUnavailable, fields: dict[str, Any]
) -> Instance:
    """The machine cannot start on its host again (e.g. the host died around a Stopped → Running flip).
    The spec is fine and the sandbox should run: relocate it as an unexpected stop is relocated, or, with
    recovery off, say why it stays stopped."""
    if instance.spec.recovery.enabled and instance.status.volume_id and instance.status.region:
        logger.warning("machine host unreachable, relocating the sandbox: %s", exc, extra=fields)
        return await handle_stop(port, instance)
    message = (
        f"the host of machine {instance.status.machine_id} is unreachable ({exc.message}) and recovery "
        "is disabled: enable spec.recovery to relocate the sandbox, or set the kiloclaw.kilo.ai/retry "
        "annotation once the host is back"
    )
    logger.warning("machine host unreachable, recovery disabled: %s", exc, extra=fields)
    status = instance.status.model_copy(
        update={"phase": Phase.STOPPED, "observed_generation": instance.generation}
    )
    status = conditions.mark_stalled(
        status, Reason.HOST_UNAVAILABLE, message, port.clock(), instance.generation
    )
    instance = await port.commit(
        instance, status, "host unreachable: stall until the host or the spec changes"
    )
    await port.kube.post_event(instance.ref, Reason.HOST_UNAVAILABLE, message, warning=True)
    return instance


def _fields(instance: Instance) -> dict[str, object]:
    return {
        "namespace": instance.ref.namespace,
        "instance": instance.ref.name,
        "sandbox_id": instance.spec.sandbox_id,
    }
