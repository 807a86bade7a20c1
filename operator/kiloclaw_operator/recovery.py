"""Unexpected-stop recovery (DESIGN 3.3): the whole story in one file.

A recovery relocates a sandbox whose machine stopped on its own onto a fork of its volume and a new machine,
then cuts over. It is a sequence of named steps; each completed step is committed to ``status.recovery``
(confirmed by the API server) before the next Fly call, so an operator that restarts anywhere resumes from the
last recorded step, and every step is idempotent (it first looks for what a crashed attempt may have left).

Invariants:
- the source volume is never touched unless the cutover is committed;
- a committed cutover is never undone: after it, only the old volume is disposed of;
- every replacement resource id is in the status before the next Fly call, or found again by name/metadata.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from . import adoption, conditions, lifecycle, retained
from .config import Settings
from .driving import RetryLater
from .fly import Capacity, Fatal, FlyClient, FlyError, NotFound
from .fly import vocabulary as fly
from .fly.models import Guest, Machine, Snapshot, Volume
from .kube import KubeClient
from .metrics import RECOVERIES, RECOVERY_DURATION
from .models import (
    FINALIZER,
    INSTANCE_LABEL,
    InstanceStatus,
    LastRecovery,
    PendingCleanup,
    Phase,
    Provenance,
    RecoveryOutcome,
    RecoverySource,
    RecoveryStatus,
    RecoveryStep,
    RetainedVolumeSpec,
    step_reached,
)
from .models import Instance as InstanceModel
from .reasons import Reason
from .volumes import OwnershipMismatch, delete_volume_checked, destroy_recorded_machine

logger = logging.getLogger("kiloclaw.recovery")
analytics = logging.getLogger("kiloclaw.analytics")

TIMEOUT_MESSAGE = "unexpected stop recovery timed out"
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class RecoveryStepFailed(Exception):
    """A recovery step cannot succeed; the attempt fails and is cleaned up."""

    def __init__(self, message: str, reason: str = "step_failed") -> None:
        super().__init__(message)
        self.reason = reason


def failure_reason(exc: Exception) -> str:
    """The ``reason`` label of ``kiloclaw_recoveries_total{outcome="failed"}``: a small fixed vocabulary."""
    if isinstance(exc, RecoveryStepFailed):
        return exc.reason
    if isinstance(exc, OwnershipMismatch):
        return "ownership_mismatch"
    if isinstance(exc, Capacity):
        return "no_capacity"
    if isinstance(exc, NotFound):
        return "not_found"
    if isinstance(exc, Fatal):
        return "fly_rejected"
    return "step_failed"


def new_recovery_id() -> str:
    """A ULID: 48-bit millisecond time + 80 random bits, Crockford base32 (sortable by start time)."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def replacement_regions(
    regions: Sequence[str], source_region: str, rng: random.Random | None = None
) -> list[str]:
    """Where to fork the replacement volume: the configured regions shuffled, the source region dropped
    when three or more remain (a failed host's region is the worst bet) or tried last otherwise."""
    order = list(dict.fromkeys(regions))
    (rng or random).shuffle(order)
    if source_region in order:
        order.remove(source_region)
        if len(order) < 2:
            order.append(source_region)
    return order


#: Fresh budgets one recovery can get from operator processes that did not begin it (restarts, fail-overs).
MAX_RESUMPTIONS = 3


def resumed_deadline(
    deadline: datetime, now: datetime, timeout_seconds: float, resumptions: int = 0
) -> datetime:
    """The deadline of a recovery that an operator process takes over without having begun it (a restart,
    or a standby taking over from a dead leader).

    A recovery's deadline measures the recovery, not the operator's absence: the time the operator was down
    is not the recovery's fault, and how much of the recorded budget was really used before the crash is
    unknown. The rule: the recovery keeps its recorded deadline if that leaves at least half the recovery
    timeout, otherwise it gets half the timeout from the moment it is resumed. So a recovery interrupted
    early keeps its full remaining budget, and one found past its deadline gets a fair half budget; it then
    fails only on its own merits (a permanent error, or that budget running out while the operator is up).
    A recovery that has already been given ``MAX_RESUMPTIONS`` fresh budgets keeps its deadline: an operator
    that crashes again and again (and so never lets a budget run out) cannot keep a recovery alive forever.
    """
    if resumptions >= MAX_RESUMPTIONS:
        return deadline
    return max(deadline, now + timedelta(seconds=timeout_seconds / 2))


def retained_volume_name(instance_name: str, volume_id: str) -> str:
    """A valid DNS-subdomain name for every admissible input: the CRD keeps instance names to 63 characters,
    and the volume-id suffix keeps only characters a name may end with."""
    suffix = "".join(ch for ch in volume_id.removeprefix("vol_").lower() if ch.isascii() and ch.isalnum())[:8]
    return f"{instance_name[:63]}-vol-{suffix or 'x'}"


@dataclass(frozen=True)
class Port:
    """What a recovery needs from its instance's driver, and nothing more: commit a status (confirmed by the
    API server), settings, the clients, the clock, whether the driver is asked to stop, the hook run between
    steps, and the ids of the recoveries this process drives."""

    commit: Callable[[InstanceModel, InstanceStatus, str], Awaitable[InstanceModel]]
    settings: Settings
    fly: FlyClient
    kube: KubeClient
    clock: Callable[[], datetime]
    stopping: Callable[[], bool]
    #: Between the steps of a recovery: pick up the newest body and announce a deferred spec change.
    between_steps: Callable[[InstanceModel], Awaitable[InstanceModel]]
    #: Recoveries this process began or took over (a recovery it did not begin gets a fair budget once).
    driven: set[str]
    #: The mass-failure brake and recovery budget (brake.py); None: no brake (tests of single recoveries).
    brake: Any = None
    #: Wakes the instance's driver now (a paused recovery looks again as soon as the brake is released).
    wake: Callable[[], None] | None = None
    #: The pass goes on without its admission: a stop's handling waits (a migration's grace, the brake, the
    #: budget) and recovers under bounds of its own, never holding up the passes of other instances.
    release_admission: Callable[[], None] | None = None


# --- entry points ---------------------------------------------------------------------------------------


async def begin(
    port: Port,
    instance: InstanceModel,
    source: RecoverySource = RecoverySource.FORK,
    snapshot: Snapshot | None = None,
) -> InstanceModel:
    """Step 1: record the attempt (phase Recovering, ids, the chosen source) before any destructive Fly call;
    then run the steps. The source is chosen by ``stops.choose_source`` (fork, or a snapshot when the old
    volume's host is unreachable)."""
    status = instance.status
    if status.volume_id is None or status.region is None:
        return await port.commit(
            instance,
            status.model_copy(update={"phase": Phase.STOPPED}),
            "stopped without a recorded volume: nothing to recover from",
        )
    now = port.clock()
    record = RecoveryStatus(
        id=new_recovery_id(),
        started_at=now,
        deadline=now + timedelta(seconds=port.settings.recovery_timeout_seconds),
        step=RecoveryStep.STARTED,
        source_machine_id=status.machine_id,
        source_volume_id=status.volume_id,
        source_region=status.region,
        **_source_fields(source, snapshot),
    )
    port.driven.add(record.id)
    begun = status.model_copy(
        update={"phase": Phase.RECOVERING, "recovery": record, "observed_generation": instance.generation}
    )
    if conditions.is_stalled(begun):  # a new attempt after a failed one
        begun = conditions.clear_stalled(begun, now, instance.generation)
    instance = await port.commit(
        instance, begun, "recovery begins: the attempt is recorded before any Fly call"
    )
    await _announce(
        port,
        instance,
        "started",
        _fields(instance),
        event=(
            Reason.RECOVERY_STARTED,
            f"machine {record.source_machine_id} stopped unexpectedly; recovery {record.id}"
            + _source_note(record),
        ),
    )
    return await resume(port, instance)


def _source_fields(source: RecoverySource, snapshot: Snapshot | None) -> dict[str, Any]:
    if source is RecoverySource.SNAPSHOT:
        assert snapshot is not None
        return {"source": source, "snapshot_id": snapshot.id, "snapshot_created_at": snapshot.created_at}
    return {"source": source}


def data_loss_seconds(record: RecoveryStatus) -> float | None:
    """The data-loss window of a snapshot recovery: the snapshot's age when the recovery began."""
    if record.source is not RecoverySource.SNAPSHOT or record.snapshot_created_at is None:
        return None
    return max(0.0, round((record.started_at - record.snapshot_created_at).total_seconds(), 3))


def _restored_note(record: RecoveryStatus) -> str:
    loss = data_loss_seconds(record)
    if loss is None:
        return ""
    return f", restored from snapshot {record.snapshot_id}: data-loss window {int(loss)}s"


def _source_note(record: RecoveryStatus) -> str:
    loss = data_loss_seconds(record)
    if loss is None:
        return " from a fork of its volume"
    return (
        f" from snapshot {record.snapshot_id} of its volume (the host of {record.source_volume_id} is "
        f"unreachable): up to {int(loss)}s of writes are lost"
    )


async def resume(port: Port, instance: InstanceModel) -> InstanceModel:
    """Run the remaining steps from the last one recorded, until done, failed, or asked to stop."""
    instance = await _take_over(port, instance)
    while instance.status.recovery is not None:
        record = instance.status.recovery
        if step_reached(record.step, RecoveryStep.CUT_OVER):
            return await _dispose_of_source_volume(port, instance)
        if port.stopping():
            return instance
        if port.clock() >= record.deadline:
            return await fail(port, instance, TIMEOUT_MESSAGE, label="timeout", reason="timeout")
        instance = await port.between_steps(instance)
        try:
            instance = await _step_within_deadline(port, instance, record.deadline)
        except (Fatal, NotFound, Capacity, OwnershipMismatch, RecoveryStepFailed) as exc:
            # Only permanent errors fail a step. Transient ones (5xx, 408, 429 after the client's own
            # retries, timeouts, lost replies) and an unauthorized token propagate to the driver, which
            # retries the pass with backoff (honouring Retry-After) until the deadline; the step then runs
            # again from the last recorded one, and a create first adopts what a lost reply left behind.
            message = f"step after {record.step.value} failed: {exc}"
            return await fail(port, instance, message, label="step_failed", reason=failure_reason(exc))
    if instance.status.phase is Phase.RECOVERING:
        # A Recovering phase without a recovery record cannot be resumed: settle it, never guess ids.
        return await port.commit(
            instance,
            instance.status.model_copy(update={"phase": Phase.STOPPED}),
            "no recovery record to resume",
        )
    return instance


async def _step_within_deadline(port: Port, instance: InstanceModel, deadline: datetime) -> InstanceModel:
    """One step, never outliving the recovery's deadline (a Fly call that hangs, retries that go on): cut
    off at the deadline, the pass ends and the next one, from the newest stored body, fails the recovery as
    timed out (the failure cleanup then sees every id the cut-off step may have recorded)."""
    remaining = (deadline - port.clock()).total_seconds()
    try:
        async with asyncio.timeout(max(remaining, 0.001)):
            return await _run_step(port, instance)
    except TimeoutError:
        raise RetryLater("the recovery step was cut off at the recovery deadline", 0.01) from None


async def _take_over(port: Port, instance: InstanceModel) -> InstanceModel:
    """A recovery this operator process did not begin gets a fair budget (``resumed_deadline``), recorded
    before the next Fly call so that the rule's outcome is visible in ``status.recovery.deadline``."""
    record = instance.status.recovery
    if record is None or record.id in port.driven:
        return instance
    port.driven.add(record.id)
    if step_reached(record.step, RecoveryStep.CUT_OVER):
        return instance
    deadline = resumed_deadline(
        record.deadline, port.clock(), port.settings.recovery_timeout_seconds, record.resumptions
    )
    if deadline == record.deadline:
        return instance
    logger.info(
        "resuming recovery %s after an operator restart: deadline moved from %s to %s",
        record.id,
        record.deadline.isoformat(),
        deadline.isoformat(),
        extra=_fields(instance),
    )
    return await port.commit(
        instance,
        instance.status.model_copy(
            update={
                "recovery": record.model_copy(
                    update={"deadline": deadline, "resumptions": record.resumptions + 1}
                )
            }
        ),
        "a resumed recovery gets a fair budget: the new deadline is recorded before the next Fly call",
    )


async def settle_for_deletion(port: Port, instance: InstanceModel) -> InstanceModel:
    """Deletion during a recovery: finish disposing of the old volume if the cutover is committed (the
    replacement is then the instance's own), otherwise run the failure cleanup."""
    record = instance.status.recovery
    if record is None:
        return instance
    if step_reached(record.step, RecoveryStep.CUT_OVER):
        return await _dispose_of_source_volume(port, instance)
    return await fail(port, instance, "instance deleted during recovery", label="deleted", reason="deleted")


# --- steps 2-7 --------------------------------------------------------------------------------------------


async def _run_step(port: Port, instance: InstanceModel) -> InstanceModel:
    record = instance.status.recovery
    assert record is not None
    client = port.fly
    app = instance.spec.fly_app
    step = record.step

    if step is RecoveryStep.STARTED:
        try:
            await client.get_volume(app, record.source_volume_id)
        except NotFound:
            raise RecoveryStepFailed(
                f"source volume missing: {record.source_volume_id}", "source_volume_missing"
            ) from None
        return await _record(port, instance, RecoveryStep.SOURCE_VOLUME_CHECKED, "source volume exists")

    if step is RecoveryStep.SOURCE_VOLUME_CHECKED:
        if record.source_machine_id:
            # Verified before destroyed: our sandbox id and a mount of the recorded source volume, or the
            # attempt fails (OwnershipMismatch) with nothing destroyed.
            await destroy_recorded_machine(
                client,
                app,
                record.source_machine_id,
                sandbox_id=instance.spec.sandbox_id,
                volume_id=record.source_volume_id,
                wait_seconds=_fence_wait_seconds(port, record),
            )
        return await _record(
            port, instance, RecoveryStep.SOURCE_MACHINE_DESTROYED, "source machine destroyed"
        )

    if step is RecoveryStep.SOURCE_MACHINE_DESTROYED:
        volume = await _replacement_volume(port, instance, record)
        return await _record(
            port,
            instance,
            RecoveryStep.REPLACEMENT_VOLUME_CREATED,
            "replacement volume exists: its id is recorded before the machine is created",
            replacement_volume_id=volume.id,
        )

    if step is RecoveryStep.REPLACEMENT_VOLUME_CREATED:
        machine = await _replacement_machine(port, instance, record)
        return await _record(
            port,
            instance,
            RecoveryStep.REPLACEMENT_MACHINE_CREATED,
            "replacement machine exists: its id is recorded before waiting for it",
            replacement_machine_id=machine.id,
        )

    if step is RecoveryStep.REPLACEMENT_MACHINE_CREATED:
        assert record.replacement_machine_id is not None
        remaining = (record.deadline - port.clock()).total_seconds()
        wait_seconds = max(1, min(port.settings.wait_call_seconds, int(remaining + 0.999)))
        try:
            started = await client.wait_machine(
                app, record.replacement_machine_id, fly.STARTED, timeout_seconds=wait_seconds
            )
        except NotFound:
            raise RecoveryStepFailed(
                f"replacement machine {record.replacement_machine_id} disappeared"
            ) from None
        if not started:
            return instance
        return await _record(
            port, instance, RecoveryStep.REPLACEMENT_MACHINE_STARTED, "replacement machine started"
        )

    if step is RecoveryStep.REPLACEMENT_MACHINE_STARTED:
        return await _cut_over(port, instance, record)

    raise AssertionError(f"unknown recovery step {step}")


def _fence_wait_seconds(port: Port, record: RecoveryStatus) -> int:
    """How long step 3 waits for the source machine to be ``destroyed``: never past the deadline, and not at
    all when its host is unreachable (a snapshot recovery): Fly then keeps it ``destroying`` until the host
    returns, which is the fence — the machine can never run again — and nothing waits on its volume."""
    if record.source is RecoverySource.SNAPSHOT:
        return 0
    remaining = (record.deadline - port.clock()).total_seconds()
    return max(0, min(port.settings.wait_call_seconds, int(remaining)))


async def _record(
    port: Port, instance: InstanceModel, step: RecoveryStep, why: str, **ids: str
) -> InstanceModel:
    record = instance.status.recovery
    assert record is not None
    updated = record.model_copy(update={"step": step, **ids})
    return await port.commit(instance, instance.status.model_copy(update={"recovery": updated}), why)


async def _replacement_volume(port: Port, instance: InstanceModel, record: RecoveryStatus) -> Volume:
    client = port.fly
    app = instance.spec.fly_app
    if record.replacement_volume_id:
        try:
            return await client.get_volume(app, record.replacement_volume_id)
        except NotFound:
            logger.warning(
                "recorded replacement volume %s is gone; forking again",
                record.replacement_volume_id,
                extra=_fields(instance),
            )
    names = _fork_names(instance)
    for volume in await client.list_volumes(app):
        if _is_fork_of_this_attempt(client, volume, names, record):
            logger.info("adopting replacement volume %s left by a crash", volume.id, extra=_fields(instance))
            return volume
    guest = instance.spec.guest
    regions = replacement_regions(
        lifecycle.ordered_regions(instance.spec, port.settings), record.source_region
    )
    errors: list[str] = []
    snapshot_id = record.snapshot_id if record.source is RecoverySource.SNAPSHOT else None
    for region in regions:
        try:
            return await client.create_volume(
                app,
                name=fly.volume_name(instance.spec.sandbox_id),
                region=region,
                # A snapshot restore when the old volume's host is unreachable (a fork could not complete).
                source_volume_id=None if snapshot_id else record.source_volume_id,
                snapshot_id=snapshot_id,
                compute=Guest(cpu_kind=guest.cpu_kind, cpus=guest.cpus, memory_mb=guest.memory_mb),
            )
        except Capacity as exc:
            errors.append(f"{region}: {exc.message}")
    raise RecoveryStepFailed(
        "no capacity for the replacement volume in any region (" + "; ".join(errors) + ")", "no_capacity"
    )


async def _replacement_machine(port: Port, instance: InstanceModel, record: RecoveryStatus) -> Machine:
    client = port.fly
    app = instance.spec.fly_app
    assert record.replacement_volume_id is not None
    if record.replacement_machine_id:
        try:
            return await client.get_machine(app, record.replacement_machine_id)
        except NotFound:
            pass
    for machine in await adoption.live_machines(client, app, _attempt_metadata(instance, record)):
        logger.info("adopting replacement machine %s left by a crash", machine.id, extra=_fields(instance))
        return machine
    volume = await client.get_volume(app, record.replacement_volume_id)
    return await client.create_machine(
        app,
        name=fly.machine_name(instance.spec.sandbox_id),
        region=volume.region,
        config=lifecycle.desired_machine_config(instance.spec, volume.id, recovery_id=record.id),
    )


async def _cut_over(port: Port, instance: InstanceModel, record: RecoveryStatus) -> InstanceModel:
    """Step 7: one status write moves the instance onto the replacement; from here on there is no undo."""
    assert record.replacement_machine_id and record.replacement_volume_id
    volume = await port.fly.get_volume(instance.spec.fly_app, record.replacement_volume_id)
    now = port.clock()
    last = LastRecovery(
        id=record.id,
        started_at=record.started_at,
        finished_at=now,
        outcome=RecoveryOutcome.SUCCEEDED,
        message=f"moved from {record.source_region} to {volume.region}"
        + (f", restored from snapshot {record.snapshot_id}" if record.snapshot_id else ""),
        duration_seconds=round((now - record.started_at).total_seconds(), 3),
        source=record.source,
        snapshot_id=record.snapshot_id,
        data_loss_seconds=data_loss_seconds(record),
    )
    status = instance.status.model_copy(
        update={
            "phase": Phase.RUNNING,
            "machine_id": record.replacement_machine_id,
            "volume_id": record.replacement_volume_id,
            "region": volume.region,
            "fly_state": fly.STARTED,
            "observed_at": now,
            "last_recovery": last,
            "recovery": record.model_copy(update={"step": RecoveryStep.CUT_OVER}),
        }
    )
    return await port.commit(
        instance, status, "cutover: the replacement becomes the instance's machine and volume"
    )


# --- step 8 -----------------------------------------------------------------------------------------------


async def _dispose_of_source_volume(port: Port, instance: InstanceModel) -> InstanceModel:
    """Step 8, only after a committed cutover: keep the old volume if it has snapshots (or we cannot tell),
    delete it if it has none; a failed delete falls back to a retained resource that expires at once."""
    record = instance.status.recovery
    assert record is not None
    client = port.fly
    app = instance.spec.fly_app
    settings = port.settings
    now = port.clock()
    retain_until: datetime | None
    try:
        snapshots = await client.list_volume_snapshots(app, record.source_volume_id)
    except NotFound:
        retain_until = None  # already gone (a previous pass deleted it): nothing left to keep
    except FlyError as exc:
        logger.warning(
            "cannot list snapshots of %s (%s): retaining it",
            record.source_volume_id,
            exc,
            extra=_fields(instance),
        )
        retain_until = now + timedelta(seconds=settings.retention_seconds)
    else:
        if snapshots or not await _source_host_reachable(port, instance, record):
            # Kept: it has snapshots, or its host is unreachable (never delete what cannot be checked).
            retain_until = now + timedelta(seconds=settings.retention_seconds)
        else:
            try:
                await delete_volume_checked(
                    client,
                    app,
                    record.source_volume_id,
                    instance.spec.sandbox_id,
                    recorded_machine_ids={record.source_machine_id},
                    wait_seconds=port.settings.wait_call_seconds,
                )
                retain_until = None
            except (FlyError, OwnershipMismatch) as exc:
                logger.warning(
                    "deleting old volume %s failed (%s): retaining it for a retry",
                    record.source_volume_id,
                    exc,
                    extra=_fields(instance),
                )
                retain_until = now
    retained_name: str | None = None
    if retain_until is not None:
        retained_name = retained_volume_name(instance.ref.name, record.source_volume_id)
        try:
            # Created, then proven: the provenance (recovery id, instance uid, ids) goes through the status
            # subresource, and the retained-volume driver acts only on what it names.
            retained_name = await retained.mint(
                port.kube,
                _retained_volume_body(instance, record, retained_name, retain_until),
                Provenance(
                    instance_uid=instance.ref.uid,
                    recovery_id=record.id,
                    fly_app=instance.spec.fly_app,
                    volume_id=record.source_volume_id,
                    sandbox_id=instance.spec.sandbox_id,
                ),
            )
        except Exception as exc:
            raise RetryLater(
                f"could not create retained volume {retained_name}: {exc}",
                settings.retained_create_retry_seconds,
            ) from exc
        await port.kube.post_event(
            instance.ref,
            Reason.RETAINED_VOLUME_CREATED,
            f"old volume {record.source_volume_id} kept as {retained_name}",
        )
    last = instance.status.last_recovery
    if last is not None and last.id == record.id:
        last = last.model_copy(update={"retained_volume": retained_name})
    instance = await port.commit(
        instance,
        instance.status.model_copy(update={"recovery": None, "last_recovery": last}),
        "recovery finished: old volume disposed of",
    )
    duration = last.duration_seconds if last is not None else (now - record.started_at).total_seconds()
    await _announce(
        port,
        instance,
        "succeeded",
        {**_fields(instance, record.id), "durationMs": int(duration * 1000), "retainedVolume": retained_name},
        event=(
            Reason.RECOVERY_SUCCEEDED,
            f"recovery {record.id} moved the sandbox to machine {instance.status.machine_id} "
            f"in {instance.status.region}" + _restored_note(record),
        ),
        duration=duration,
    )
    return instance


async def _source_host_reachable(port: Port, instance: InstanceModel, record: RecoveryStatus) -> bool:
    if record.source is RecoverySource.SNAPSHOT:
        return False
    try:
        volume = await port.fly.get_volume(instance.spec.fly_app, record.source_volume_id)
    except NotFound:
        return True  # gone already: the delete finds nothing
    except FlyError:
        return False
    return volume.host_reachable


def _retained_volume_body(
    instance: InstanceModel, record: RecoveryStatus, name: str, retain_until: datetime
) -> dict[str, Any]:
    spec = RetainedVolumeSpec(
        fly_app=instance.spec.fly_app,
        volume_id=record.source_volume_id,
        sandbox_id=instance.spec.sandbox_id,
        instance_name=instance.ref.name,
        region=record.source_region,
        reason=Reason.UNEXPECTED_STOP_RECOVERY,
        recovery_id=record.id,
        retain_until=retain_until,
    )
    return {
        "apiVersion": instance.ref.api_version,
        "kind": "KiloClawRetainedVolume",
        # Only our own label: nothing that would make Argo CD or Flux adopt or prune this safety copy.
        "metadata": {
            "name": name,
            "namespace": instance.ref.namespace,
            "labels": {INSTANCE_LABEL: instance.ref.name},
            # Born with the finalizer: a `kubectl delete` in the moment before kopf would add it must still
            # go through the volume's delete, never leave the Fly volume untracked.
            "finalizers": [FINALIZER],
        },
        "spec": spec.dump(),
    }


# --- failure ----------------------------------------------------------------------------------------------


async def fail(
    port: Port, instance: InstanceModel, message: str, *, label: str, reason: str
) -> InstanceModel:
    """Failure cleanup shared by errors, the deadline and deletion: remove the replacement resources (never
    the source volume), settle in Stopped, stall until a person acts."""
    record = instance.status.recovery
    assert record is not None
    assert not step_reached(record.step, RecoveryStep.CUT_OVER), "a committed cutover is never undone"
    client = port.fly
    app = instance.spec.fly_app
    leftover_machine: str | None = None
    leftover_volume: str | None = None
    replacement_machine = record.replacement_machine_id
    if replacement_machine is None and record.replacement_volume_id:
        # A crash between create and record leaves a machine only its metadata can find.
        try:
            found = await client.list_machines(app, metadata=_attempt_metadata(instance, record))
            replacement_machine = next((m.id for m in found if not m.is_destroyed), None)
        except FlyError:
            pass
    if replacement_machine:
        try:
            await destroy_recorded_machine(
                client,
                app,
                replacement_machine,
                sandbox_id=instance.spec.sandbox_id,
                volume_id=record.replacement_volume_id,
                wait_seconds=port.settings.wait_call_seconds,
            )
        except (FlyError, OwnershipMismatch) as exc:
            logger.warning(
                "could not destroy replacement machine %s: %s",
                replacement_machine,
                exc,
                extra=_fields(instance),
            )
            leftover_machine = replacement_machine
    replacement_volume = record.replacement_volume_id or await _unrecorded_replacement_volume(
        port, instance, record
    )
    if replacement_volume and replacement_volume != record.source_volume_id:
        try:
            if leftover_machine is not None:
                raise RecoveryStepFailed("its machine is not destroyed yet")
            await delete_volume_checked(
                client,
                app,
                replacement_volume,
                instance.spec.sandbox_id,
                recorded_machine_ids={replacement_machine},
                wait_seconds=port.settings.wait_call_seconds,
            )
        except (FlyError, OwnershipMismatch, RecoveryStepFailed) as exc:
            logger.warning(
                "could not delete replacement volume %s: %s", replacement_volume, exc, extra=_fields(instance)
            )
            leftover_volume = replacement_volume
    now = port.clock()
    source_machine_destroyed = step_reached(record.step, RecoveryStep.SOURCE_MACHINE_DESTROYED)
    pending = None
    if leftover_machine or leftover_volume:
        pending = PendingCleanup(machine_id=leftover_machine, volume_id=leftover_volume)
    duration = (now - record.started_at).total_seconds()
    # The generation the attempt acted on (recorded when it began): a spec change made during the attempt was
    # deferred, and stays unobserved, so it starts a new attempt now instead of being lost under the stall.
    acted_on = instance.status.observed_generation or instance.generation
    status = instance.status.model_copy(
        update={
            "phase": Phase.STOPPED,
            "machine_id": None if source_machine_destroyed else instance.status.machine_id,
            "volume_id": record.source_volume_id,
            "region": record.source_region,
            "recovery": None,
            "pending_cleanup": pending,
            "observed_generation": acted_on,
            "last_recovery": LastRecovery(
                id=record.id,
                started_at=record.started_at,
                finished_at=now,
                outcome=RecoveryOutcome.FAILED,
                message=message,
                duration_seconds=round(duration, 3),
            ),
        }
    )
    status = conditions.mark_stalled(status, Reason.RECOVERY_FAILED, message, now, acted_on)
    instance = await port.commit(
        instance, status, "recovery failed: replacement cleaned up, instance stalled"
    )
    await _announce(
        port,
        instance,
        "failed",
        {
            **_fields(instance, record.id),
            "error": message,
            "label": label,
            "durationMs": int(duration * 1000),
        },
        event=(Reason.RECOVERY_FAILED, f"recovery {record.id} failed: {message}"),
        duration=duration,
        reason=reason,
        warning=True,
    )
    return instance


async def _announce(
    port: Port,
    instance: InstanceModel,
    outcome: str,
    fields: dict[str, Any],
    *,
    event: tuple[Reason, str],
    duration: float | None = None,
    reason: str = "",
    warning: bool = False,
) -> None:
    """A recovery's start or outcome, told everywhere in one order: the metrics (for an outcome), the
    analytics record ``instance.unexpected_stop_recovery_<outcome>``, then the Event. The analytics record and
    metrics come first: once the Event is visible, they are too."""
    if duration is not None:
        RECOVERIES.labels(outcome=outcome, reason=reason).inc()
        RECOVERY_DURATION.observe(duration)
    name = f"instance.unexpected_stop_recovery_{outcome}"
    analytics.info(name, extra={"event": name, **fields})
    await port.kube.post_event(instance.ref, *event, warning=warning)


# --- what a failed recovery left behind --------------------------------------------------------------------


async def remove_pending_cleanup(port: Port, instance: InstanceModel) -> None:
    """Destroy the replacement machine and delete the replacement volume a failed recovery could not remove
    (``status.pendingCleanup``); raises what stops it (FlyError, OwnershipMismatch)."""
    pending = instance.status.pending_cleanup
    if pending is None:
        return
    app = instance.spec.fly_app
    if pending.machine_id:
        await destroy_recorded_machine(
            port.fly,
            app,
            pending.machine_id,
            sandbox_id=instance.spec.sandbox_id,
            volume_id=pending.volume_id,
            wait_seconds=port.settings.wait_call_seconds,
        )
    if pending.volume_id:
        await delete_volume_checked(
            port.fly,
            app,
            pending.volume_id,
            instance.spec.sandbox_id,
            recorded_machine_ids={pending.machine_id},
            wait_seconds=port.settings.wait_call_seconds,
        )


async def retry_pending_cleanup(port: Port, instance: InstanceModel) -> InstanceModel:
    """Outside recoveries only: try again to remove what a failed recovery left behind; done is recorded."""
    if instance.status.recovery is not None or instance.status.pending_cleanup is None:
        return instance
    try:
        await remove_pending_cleanup(port, instance)
    except (FlyError, OwnershipMismatch) as exc:
        logger.warning("pending cleanup still failing: %s", exc, extra=_fields(instance))
        return instance
    return await port.commit(
        instance, instance.status.model_copy(update={"pending_cleanup": None}), "pending cleanup done"
    )


async def _unrecorded_replacement_volume(
    port: Port, instance: InstanceModel, record: RecoveryStatus
) -> str | None:
    """A fork created just before a crash, before its id reached the status (same rule as adoption)."""
    if not step_reached(record.step, RecoveryStep.SOURCE_MACHINE_DESTROYED):
        return None
    names = _fork_names(instance)
    try:
        volumes = await port.fly.list_volumes(instance.spec.fly_app)
    except FlyError:
        return None
    return next((v.id for v in volumes if _is_fork_of_this_attempt(port.fly, v, names, record)), None)


def _fork_names(instance: InstanceModel) -> set[str]:
    """The names a fork of this sandbox may carry: ours, and the legacy one (a recovery begun before names
    carried a hash; only this attempt's window counts, see ``_is_fork_of_this_attempt``)."""
    return adoption.sandbox_volume_names(instance.spec.sandbox_id)


def _is_fork_of_this_attempt(
    client: FlyClient, volume: Volume, names: set[str], record: RecoveryStatus
) -> bool:
    """A live, unattached volume with the sandbox's name, created since this attempt began, that is not its
    source: what step 4 of this attempt created (an older volume of the same name is a retained copy, never
    adopted; an attached one is in someone's use). Fly stamps ``created_at`` with its own clock, the attempt
    began by ours: compared in ours."""
    return (
        adoption.unattached_and_live(volume, names)
        and volume.id != record.source_volume_id
        and volume.created_at is not None
        and client.in_our_clock(volume.created_at) >= record.started_at
    )


def _attempt_metadata(instance: InstanceModel, record: RecoveryStatus) -> dict[str, str]:
    """What proves a machine belongs to this recovery attempt: its unique id and our sandbox id."""
    return {
        fly.METADATA_RECOVERY_ID: record.id,
        fly.METADATA_SANDBOX_ID: instance.spec.sandbox_id,
    }


def _fields(instance: InstanceModel, recovery_id: str | None = None) -> dict[str, Any]:
    record = instance.status.recovery
    return {
        "namespace": instance.ref.namespace,
        "instance": instance.ref.name,
        "sandbox_id": instance.spec.sandbox_id,
        "recovery_id": recovery_id or (record.id if record else None),
    }
