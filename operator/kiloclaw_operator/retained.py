"""KiloClawRetainedVolume controller: keep an old volume until it expires, then delete it safely.

Contract: DESIGN sections 2 (KiloClawRetainedVolume), 3.4 and 3.5.

One ``RetainedVolumeDriver`` per resource is the single writer for it, in the same shape as the instance
driver: watch events hand it the newest body and wake it; its loop observes the Fly volume into status while
the volume is retained, and deletes it once ``spec.retainUntil`` has passed or ``spec.deleteNow`` is set.
``kubectl delete`` reaches the same delete through the finalizer (``finalize``).

Nothing on Fly is touched — not even read — for a resource the operator cannot prove it created: the recovery
that mints one writes ``status.provenance`` (recovery id, instance uid, the ids) through the status
subresource, which tenants cannot write, and admission refuses creates by anyone but the operator
(deploy/base/tenancy.yaml). Without provenance, or with a spec that names other ids, the resource is
``Blocked`` (``Stalled`` reason ``NotMintedByOperator``) and deleting it removes only the resource. Every Fly
call uses the ids in the provenance.

A delete goes through two guards before any Fly call that destroys something:
- the safety interlock: a volume that any instance's status names as its current volume or as part of a
  recovery in flight is never deleted (phase ``Blocked``, ``Stalled`` reason ``VolumeInUse``);
- the ownership-checked delete (DESIGN 3.5), which refuses to destroy a machine of another sandbox
  (phase ``Blocked``, ``Stalled`` reason ``OwnershipMismatch``).
Failed and blocked attempts are retried with a capped exponential backoff recorded in the status
(``attempts``, ``lastError``, ``nextAttemptAt``), so a restarted operator keeps the same pace.

Once Fly confirms the volume is gone, that fact is committed to the status (``Ready=False`` reason
``VolumeDeleted``) *before* the Event and the removal of the resource: a restart after that point only removes
the resource and never announces the deletion twice; a restart before it repeats the delete, where a 404 on
the volume counts as done.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar

from . import conditions
from .config import Settings
from .driving import Context, DriverRegistry, ObjectDriver, RetryLater
from .fly import Fatal, FlyError, NotFound, RateLimited, Unauthorized
from .kube import KubeClient, KubeConflict, KubeError, KubeNotFound
from .metrics import retained_tally
from .models import (
    INSTANCE_KIND,
    RETAINED_KIND,
    Condition,
    ConditionStatus,
    ObjectRef,
    Provenance,
    RetainedPhase,
    RetainedVolume,
    RetainedVolumeStatus,
)
from .reasons import Reason
from .volumes import OwnershipMismatch, delete_volume_checked, volumes_in_use

logger = logging.getLogger("kiloclaw.retained")
analytics = logging.getLogger("kiloclaw.analytics")

ANALYTICS_DELETED = "retained_volume.deleted"


# Never sleep less than this between passes, so a clock skew or an error path cannot spin the loop.
MIN_DELAY_SECONDS = 0.05


# --- minting: only the operator creates retained volumes, and proves it ------------------------------------

_IDENTITY_FIELDS = ("flyApp", "volumeId", "sandboxId", "recoveryId", "instanceName")


def _minted_as(stored: dict[str, Any], body: dict[str, Any], provenance: Provenance) -> bool:
    """Whether ``stored`` (found under the name) is the resource this mint creates: same ids in the spec, and
    no provenance, or this one (a retried mint finds its own earlier create)."""
    spec, wanted = stored.get("spec") or {}, body["spec"]
    recorded = (stored.get("status") or {}).get("provenance")
    return all(spec.get(f) == wanted.get(f) for f in _IDENTITY_FIELDS) and recorded in (
        None,
        provenance.dump(),
    )


async def mint(kube: KubeClient, body: dict[str, Any], provenance: Provenance) -> str:
    """Create the retained volume ``body`` and write its provenance through the status subresource (which
    tenants cannot write); returns the name it got. Idempotent: a retry finds its own earlier create. A name
    taken by a resource this mint did not create (a tenant may create one where admission does not refuse it)
    is never stamped: the next name, derived from the recovery id, is tried; then ``KubeConflict``."""
    meta = body["metadata"]
    namespace, base = meta["namespace"], meta["name"]
    suffix = "".join(ch for ch in provenance.recovery_id.lower() if ch.isalnum())[-6:] or "x"
    for name in (base, f"{base}-{suffix}"):
        candidate = {**body, "metadata": {**meta, "name": name}}
        stored = await kube.create_retained_volume(namespace, candidate)
        if not _minted_as(stored, candidate, provenance):
            logger.warning(
                "retained volume name %s is taken by a resource the operator did not create",
                name,
                extra={"namespace": namespace, "retained_volume": name},
            )
            continue
        if (stored.get("status") or {}).get("provenance") is None:
            ref = ObjectRef(namespace=namespace, name=name, kind=RETAINED_KIND)
            await kube.patch_retained_status(ref, {"provenance": provenance.dump()})
        return name
    raise KubeConflict(409, f"retained volume names {base} and {base}-{suffix} are taken by other resources")


# --- the pure core: what is due, when to retry, what blocks a delete ----------------------------------------


class Trigger(StrEnum):
    """Why a retained volume is being deleted."""

    EXPIRED = "Expired"  # spec.retainUntil has passed
    DELETE_NOW = "DeleteNow"  # an admin set spec.deleteNow
    RESOURCE_DELETED = "ResourceDeleted"  # kubectl delete, through the finalizer


class Step(StrEnum):
    """What the driver does on a pass."""

    OBSERVE = "Observe"  # not due: record the Fly volume's state
    WAIT = "Wait"  # due, but a failed or blocked attempt waits for status.nextAttemptAt
    DELETE = "Delete"  # due: interlock, then the ownership-checked delete
    RELEASE = "Release"  # Fly confirmed the volume gone: only the resource is left to remove
    UNPROVEN = "Unproven"  # not minted by the operator (or altered): nothing on Fly is touched


@dataclass(frozen=True)
class RetainedDecision:
    step: Step
    trigger: Trigger | None = None
    retry_at: datetime | None = None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _rfc3339(moment: datetime) -> str:
    return _aware(moment).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def deletion_trigger(retained: RetainedVolume, now: datetime) -> Trigger | None:
    """Why the volume must go now, or None while it is still retained."""
    if retained.deleting:
        return Trigger.RESOURCE_DELETED
    if retained.spec.delete_now:
        return Trigger.DELETE_NOW
    if _aware(now) >= _aware(retained.spec.retain_until):
        return Trigger.EXPIRED
    return None


def volume_confirmed_deleted(status: RetainedVolumeStatus) -> bool:
    """True once a pass committed that Fly no longer has the volume: the durable mark of a finished delete."""
    ready = next((c for c in status.conditions if c.type == conditions.READY), None)
    return ready is not None and ready.reason == Reason.VOLUME_DELETED


def pending_retry(retained: RetainedVolume, now: datetime) -> datetime | None:
    """When a failed or blocked delete may be tried again, or None if it may be tried now.

    A spec change after the failure (new generation, e.g. an admin fixing things and setting ``deleteNow``, or
    ``kubectl delete``) skips the wait: the person acting expects an attempt at once.
    """
    status = retained.status
    if status.next_attempt_at is None or _aware(now) >= _aware(status.next_attempt_at):
        return None
    generations = {c.observed_generation for c in status.conditions}
    if generations and max((g or 0) for g in generations) < retained.generation:
        return None
    return _aware(status.next_attempt_at)


def provenance_problem(retained: RetainedVolume) -> str | None:
    """Why the operator may not act on ``retained`` (None: it may). Only a resource whose status carries the
    provenance the operator wrote when it minted it, naming the same ids as the spec, is acted on."""
    proof = retained.status.provenance
    if proof is None:
        return (
            "not created by the operator (no status.provenance): nothing on Fly is touched; "
            "deleting this resource removes only the resource"
        )
    spec = retained.spec
    differing = [
        field
        for field, recorded, named in (
            ("flyApp", proof.fly_app, spec.fly_app),
            ("volumeId", proof.volume_id, spec.volume_id),
            ("sandboxId", proof.sandbox_id, spec.sandbox_id),
            ("recoveryId", proof.recovery_id, spec.recovery_id),
        )
        if recorded != named
    ]
    if differing:
        return (
            f"spec.{', spec.'.join(differing)} differ from what the operator recorded when it retained the "
            "volume: nothing on Fly is touched"
        )
    return None


def provenance_grace_left(retained: RetainedVolume, now: datetime, settings: Settings) -> float:
    """Seconds during which a new resource without provenance is not reported yet: the operator creates the
    resource, then writes the provenance through the status subresource (two calls), and the watch may show
    the first alone."""
    if retained.created_at is None:
        return 0.0
    age = (_aware(now) - _aware(retained.created_at)).total_seconds()
    return max(0.0, settings.retained_provenance_grace_seconds - age)


def decide_retained(retained: RetainedVolume, now: datetime) -> RetainedDecision:
    if provenance_problem(retained) is not None:
        return RetainedDecision(Step.UNPROVEN)
    trigger = deletion_trigger(retained, now)
    if trigger is None:
        return RetainedDecision(Step.OBSERVE)
    if volume_confirmed_deleted(retained.status):
        return RetainedDecision(Step.RELEASE, trigger)
    retry_at = pending_retry(retained, now)
    if retry_at is not None:
        return RetainedDecision(Step.WAIT, trigger, retry_at)
    return RetainedDecision(Step.DELETE, trigger)


def next_backoff(attempts: int, settings: Settings) -> float:
    """Seconds before retry number ``attempts`` (1 = after the first failure): doubling from the minimum,
    capped at the maximum."""
    exponent = max(0, min(attempts - 1, 32))
    return float(min(settings.retry_backoff_max_seconds, settings.retry_backoff_min_seconds * 2**exponent))


def next_check_delay(retained: RetainedVolume, now: datetime, settings: Settings) -> float:
    """Seconds until the next pass: the check interval, but no later than ``retainUntil`` (so expiry lags by
    at most a moment) or a scheduled retry."""
    now = _aware(now)
    candidates = [settings.retained_check_seconds]
    if retained.status.next_attempt_at is not None:
        candidates.append((_aware(retained.status.next_attempt_at) - now).total_seconds())
    if deletion_trigger(retained, now) is None:
        candidates.append((_aware(retained.spec.retain_until) - now).total_seconds())
    grace = provenance_grace_left(retained, now, settings)
    if grace > 0 and provenance_problem(retained) is not None:
        candidates.append(grace)
    return max(MIN_DELAY_SECONDS, min(candidates))


# --- status transitions (pure) -----------------------------------------------------------------------------


def _with_conditions(
    status: RetainedVolumeStatus,
    generation: int,
    now: datetime,
    ready: tuple[ConditionStatus, Reason, str],
    stalled: tuple[ConditionStatus, Reason, str],
) -> list[Condition]:
    result = conditions.set_condition(status.conditions, conditions.READY, *ready, now, generation)
    return conditions.set_condition(result, conditions.STALLED, *stalled, now, generation)


def observed_status(
    retained: RetainedVolume,
    now: datetime,
    *,
    volume_exists: bool,
    attached_machine_id: str | None,
    snapshot_count: int | None,
) -> RetainedVolumeStatus:
    """Phase Retained with what Fly has; a delete that is no longer due forgets its failures."""
    status = retained.status
    spec = retained.spec
    if volume_exists:
        ready: tuple[ConditionStatus, Reason, str] = (
            "True",
            Reason.RETAINED,
            f"volume {spec.volume_id} is retained until {_rfc3339(spec.retain_until)}",
        )
    else:
        ready = (
            "False",
            Reason.VOLUME_NOT_FOUND,
            f"volume {spec.volume_id} no longer exists in Fly app {spec.fly_app}",
        )
    return status.model_copy(
        update={
            "phase": RetainedPhase.RETAINED,
            "snapshot_count": snapshot_count,
            "attached_machine_id": attached_machine_id,
            "last_error": None,
            "next_attempt_at": None,
            "attempts": 0,
            "conditions": _with_conditions(
                status, retained.generation, now, ready, ("False", Reason.RETAINED, "")
            ),
        }
    )


def _in_progress(retained: RetainedVolume, now: datetime, reason: Reason, message: str) -> list[Condition]:
    """Ready=False and Stalled=False for the same ``reason``: the delete is under way, nothing blocks it."""
    return _with_conditions(
        retained.status, retained.generation, now, ("False", reason, message), ("False", reason, "")
    )


def deleting_status(retained: RetainedVolume, now: datetime, trigger: Trigger) -> RetainedVolumeStatus:
    status = retained.status
    message = f"deleting volume {retained.spec.volume_id} ({trigger.value})"
    return status.model_copy(
        update={
            "phase": RetainedPhase.DELETING,
            "conditions": _in_progress(retained, now, Reason.DELETING, message),
        }
    )


def deleted_status(retained: RetainedVolume, now: datetime) -> RetainedVolumeStatus:
    status = retained.status
    return status.model_copy(
        update={
            "phase": RetainedPhase.DELETING,
            "attached_machine_id": None,
            "last_error": None,
            "next_attempt_at": None,
            "conditions": _in_progress(
                retained, now, Reason.VOLUME_DELETED, f"volume {retained.spec.volume_id} is deleted in Fly"
            ),
        }
    )


@dataclass(frozen=True)
class DeleteFailure:
    """A delete attempt that did not finish, classified for the status."""

    reason: Reason
    message: str
    blocked: bool  # phase Blocked: a safety check refused; a person or another party must act
    stalled: bool  # Stalled=True: no progress without a person (or the party holding the volume)
    delay: float  # seconds until the next attempt
    counts: bool = True  # counts toward the backoff (waiting for an instance is not a failure)


def classify_failure(exc: Exception, attempts: int, settings: Settings) -> DeleteFailure:
    """Map what stopped a delete attempt to the status it leaves; ``attempts`` includes this one."""
    delay = next_backoff(attempts, settings)
    if isinstance(exc, OwnershipMismatch):
        return DeleteFailure(Reason.OWNERSHIP_MISMATCH, str(exc), blocked=True, stalled=True, delay=delay)
    if isinstance(exc, Unauthorized):
        return DeleteFailure(Reason.FLY_UNAUTHORIZED, str(exc), blocked=False, stalled=True, delay=delay)
    if isinstance(exc, Fatal):
        return DeleteFailure(Reason.FLY_REJECTED, str(exc), blocked=False, stalled=True, delay=delay)
    if isinstance(exc, RateLimited) and exc.retry_after is not None:
        delay = max(delay, exc.retry_after)
    return DeleteFailure(Reason.DELETE_FAILED, str(exc), blocked=False, stalled=False, delay=delay)


def unproven_failure(message: str, settings: Settings) -> DeleteFailure:
    """Not the operator's to act on: Blocked for good (checked again each interval; a forged provenance
    cannot appear, but a mint interrupted between its two calls is completed by the recovery's retry)."""
    return DeleteFailure(
        Reason.NOT_MINTED_BY_OPERATOR,
        message,
        blocked=True,
        stalled=True,
        delay=settings.retained_check_seconds,
        counts=False,
    )


def volume_in_use_failure(volume_id: str, holder: str, settings: Settings) -> DeleteFailure:
    """The interlock refused: checked again every interval until the instance lets go of the volume."""
    return DeleteFailure(
        Reason.VOLUME_IN_USE,
        f"refusing to delete volume {volume_id}: in use by {holder}",
        blocked=True,
        stalled=True,
        delay=settings.retained_check_seconds,
        counts=False,
    )


def failed_status(retained: RetainedVolume, now: datetime, failure: DeleteFailure) -> RetainedVolumeStatus:
    status = retained.status
    attempts = status.attempts + 1 if failure.counts else status.attempts
    phase = RetainedPhase.BLOCKED if failure.blocked else RetainedPhase.DELETING
    stalled: tuple[ConditionStatus, Reason, str] = (
        ("True", failure.reason, failure.message) if failure.stalled else ("False", failure.reason, "")
    )
    return status.model_copy(
        update={
            "phase": phase,
            "attempts": attempts,
            "last_error": failure.message,
            "next_attempt_at": now + timedelta(seconds=failure.delay),
            "conditions": _with_conditions(
                status, retained.generation, now, ("False", failure.reason, failure.message), stalled
            ),
        }
    )


def starts_blocked_episode(before: RetainedVolumeStatus, after: RetainedVolumeStatus) -> bool:
    """True when a delete becomes blocked, or blocked for a different reason: that deserves one Event; the
    retries of the same block do not."""
    if after.phase is not RetainedPhase.BLOCKED:
        return False
    if before.phase is not RetainedPhase.BLOCKED:
        return True
    stalled_before = next((c for c in before.conditions if c.type == conditions.STALLED), None)
    stalled_after = next((c for c in after.conditions if c.type == conditions.STALLED), None)
    return (stalled_before.reason if stalled_before else None) != (
        stalled_after.reason if stalled_after else None
    )


# --- the driver ------------------------------------------------------------------------------------------


@dataclass
class RetainedVolumeDriver(ObjectDriver[RetainedVolume]):
    """The single writer of one KiloClawRetainedVolume (status, Fly calls, removal)."""

    # Observation is a read path: a wake-up caused by our own status write must not cost two Fly calls.
    observed_generation: int | None = None
    observed_until: float = 0.0

    logger: ClassVar[logging.Logger] = logger
    kind: ClassVar[str] = "retained volume"

    def read(self, body: dict[str, Any]) -> RetainedVolume:
        return RetainedVolume.from_body(body)

    def tally(self, body: dict[str, Any]) -> tuple[Any, ...]:
        return retained_tally(body)

    def work_signature(self, body: dict[str, Any]) -> tuple[Any, ...]:
        # The provenance arrives in a status write of its own, right after the create: it asks for a pass.
        provenance = (body.get("status") or {}).get("provenance")
        return (*super().work_signature(body), bool(provenance))

    def log_fields(self, retained: RetainedVolume) -> dict[str, Any]:
        return {
            "namespace": retained.ref.namespace,
            "retained_volume": retained.ref.name,
            "instance": retained.spec.instance_name,
            "sandbox_id": retained.spec.sandbox_id,
            "volume_id": retained.spec.volume_id,
        }

    async def patch_status(self, ref: ObjectRef, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.ctx.kube.patch_retained_status(ref, patch)

    def recheck_delay(self) -> float:
        return self.ctx.settings.retained_check_seconds

    async def commit(
        self, retained: RetainedVolume, status: RetainedVolumeStatus, why: str
    ) -> RetainedVolume:
        """The one status write: a merge patch of what changed, confirmed by the API server."""
        return await self.write(retained, status, why)

    # --- the loop -------------------------------------------------------------------------------------

    async def reconcile(self, retained: RetainedVolume) -> float:
        try:
            retained = await self._reconcile(retained)
        except KubeNotFound:
            logger.info("resource is gone; driver stops", extra=self.log_fields(retained))
            self.stop()
            return 0.0
        except KubeError as exc:
            logger.warning("Kubernetes API call failed, will retry: %s", exc, extra=self.log_fields(retained))
            return self.ctx.settings.retry_backoff_min_seconds
        return next_check_delay(retained, self.ctx.clock(), self.ctx.settings)

    async def _reconcile(self, retained: RetainedVolume) -> RetainedVolume:
        decision = decide_retained(retained, self.ctx.clock())
        if decision.step is Step.UNPROVEN:
            return await self._refuse_unproven(retained)
        if decision.step is Step.OBSERVE:
            return await self._observe(retained)
        if decision.step is Step.WAIT:
            return retained
        assert decision.trigger is not None
        if decision.step is Step.DELETE:
            retained = await self._delete(retained, decision.trigger)
            if not volume_confirmed_deleted(retained.status):
                return retained
        await self._release(retained)
        return retained

    async def _refuse_unproven(self, retained: RetainedVolume) -> RetainedVolume:
        """No Fly call at all (not even a read: the ids may be another namespace's); say so once the grace for
        an operator's mint in progress is over."""
        if provenance_grace_left(retained, self.ctx.clock(), self.ctx.settings) > 0:
            return retained
        message = provenance_problem(retained)
        assert message is not None
        before = retained.status
        if before.phase is RetainedPhase.BLOCKED and before.last_error == message:
            return retained
        return await self._record_failure(retained, unproven_failure(message, self.ctx.settings))

    async def _observe(self, retained: RetainedVolume) -> RetainedVolume:
        loop_now = asyncio.get_running_loop().time()
        if self.observed_generation == retained.generation and loop_now < self.observed_until:
            return retained
        fly = self.ctx.fly
        spec = retained.status.provenance
        assert spec is not None  # decide_retained: only a proven resource is observed
        try:
            volume = await fly.get_volume(spec.fly_app, spec.volume_id)
        except NotFound:
            volume = None
        except FlyError as exc:
            logger.warning("cannot observe the volume: %s", exc, extra=self.log_fields(retained))
            return retained
        exists = volume is not None and not volume.is_gone
        snapshot_count = retained.status.snapshot_count if exists else None
        if exists:
            try:
                snapshot_count = len(await fly.list_volume_snapshots(spec.fly_app, spec.volume_id))
            except FlyError as exc:
                logger.warning("cannot list the volume's snapshots: %s", exc, extra=self.log_fields(retained))
        status = observed_status(
            retained,
            self.ctx.clock(),
            volume_exists=exists,
            attached_machine_id=volume.attached_machine_id if volume is not None and exists else None,
            snapshot_count=snapshot_count,
        )
        retained = await self.commit(retained, status, "observed the Fly volume")
        self.observed_generation = retained.generation
        self.observed_until = loop_now + self.ctx.settings.retained_check_seconds * 0.9
        return retained

    async def _delete(self, retained: RetainedVolume, trigger: Trigger) -> RetainedVolume:
        """Interlock, then the ownership-checked delete; records success or the failure and its retry time."""
        settings = self.ctx.settings
        # Only what the operator recorded when it retained the volume (equal to the spec, or no delete).
        spec = retained.status.provenance
        assert spec is not None
        if retained.status.phase is RetainedPhase.RETAINED:
            retained = await self.commit(
                retained, deleting_status(retained, self.ctx.clock(), trigger), "delete begins"
            )
        # Any instance in any namespace: a volume id is unique, whoever holds it must keep it.
        holder = volumes_in_use(await self.ctx.kube.every_instance_slim(), viewer=retained.ref.namespace).get(
            spec.volume_id
        )
        if holder is not None:
            return await self._record_failure(
                retained, volume_in_use_failure(spec.volume_id, holder, settings)
            )
        try:
            # No machine is recorded for a retained volume (its machine was destroyed by the recovery): any
            # machine attached now is someone else's, whatever sandbox id it carries (DESIGN 3.5).
            await delete_volume_checked(
                self.ctx.fly,
                spec.fly_app,
                spec.volume_id,
                spec.sandbox_id,
                recorded_machine_ids=(),
                wait_seconds=self.ctx.settings.wait_call_seconds,
            )
        except (FlyError, OwnershipMismatch) as exc:
            failure = classify_failure(exc, retained.status.attempts + 1, settings)
            return await self._record_failure(retained, failure)
        retained = await self.commit(
            retained,
            deleted_status(retained, self.ctx.clock()),
            "Fly confirmed the volume gone: recorded before the Event and the resource removal",
        )
        await self._announce_deleted(retained, trigger)
        return retained

    async def _record_failure(self, retained: RetainedVolume, failure: DeleteFailure) -> RetainedVolume:
        before = retained.status
        status = failed_status(retained, self.ctx.clock(), failure)
        fields = {**self.log_fields(retained), "reason": failure.reason, "attempts": status.attempts}
        if failure.stalled:
            logger.warning("delete refused: %s", failure.message, extra=fields)
        else:
            logger.info("delete failed, retrying in %.1fs: %s", failure.delay, failure.message, extra=fields)
        retained = await self.commit(retained, status, f"delete attempt failed ({failure.reason})")
        if starts_blocked_episode(before, retained.status):
            await self.ctx.kube.post_event(
                await self._event_target(retained),
                Reason.RETAINED_VOLUME_DELETE_BLOCKED,
                failure.message,
                warning=True,
            )
        return retained

    async def _event_target(self, retained: RetainedVolume) -> ObjectRef:
        """The instance the volume belonged to, or the retained volume itself once the instance is gone."""
        try:
            body = await self.ctx.kube.get_instance(retained.ref.namespace, retained.spec.instance_name)
        except KubeError:
            return retained.ref
        return ObjectRef(
            namespace=retained.ref.namespace,
            name=retained.spec.instance_name,
            uid=str(body.get("metadata", {}).get("uid", "")),
            kind=INSTANCE_KIND,
        )

    async def _announce_deleted(self, retained: RetainedVolume, trigger: Trigger) -> None:
        spec = retained.spec
        await self.ctx.kube.post_event(
            await self._event_target(retained),
            Reason.RETAINED_VOLUME_DELETED,
            f"retained volume {spec.volume_id} ({retained.ref.name}) deleted: {_describe(trigger)}",
        )
        analytics.info(
            ANALYTICS_DELETED,
            extra={
                "event": ANALYTICS_DELETED,
                **self.log_fields(retained),
                "fly_app": spec.fly_app,
                "trigger": trigger.value,
                "recovery_id": spec.recovery_id,
                "retain_until": _rfc3339(spec.retain_until),
                "failed_attempts": retained.status.attempts,
            },
        )

    async def _release(self, retained: RetainedVolume) -> None:
        """The volume is gone: delete the resource; the finalizer then finds nothing left to do."""
        await self.ctx.kube.delete_retained_volume(retained.ref.namespace, retained.ref.name)
        self.stop()

    # --- deletion through the finalizer -----------------------------------------------------------------

    async def finalize(self) -> None:
        """``kubectl delete`` (or our own release): returns once the volume is gone; raises RetryLater while a
        delete is failing or blocked, which keeps the resource Terminating with the reason in its status."""
        settings = self.ctx.settings
        async with self.lock:
            retained = self.current()
            try:
                decision = decide_retained(retained, self.ctx.clock())
                if decision.step is Step.UNPROVEN:
                    # Not the operator's: the resource goes, nothing on Fly is touched.
                    logger.info(
                        "removing a retained volume the operator did not mint; Fly untouched",
                        extra=self.log_fields(retained),
                    )
                    self.stop()
                    return
                if decision.step is Step.WAIT:
                    assert decision.retry_at is not None
                    raise RetryLater(
                        retained.status.last_error or "delete is waiting for its next attempt",
                        _seconds_until(decision.retry_at, self.ctx.clock()),
                    )
                if decision.step is Step.DELETE:
                    retained = await self._delete(retained, Trigger.RESOURCE_DELETED)
            except KubeNotFound:
                return
            except KubeError as exc:
                raise RetryLater(
                    f"Kubernetes API call failed: {exc}", settings.retry_backoff_min_seconds
                ) from exc
            if not volume_confirmed_deleted(retained.status):
                retry_at = retained.status.next_attempt_at or self.ctx.clock()
                raise RetryLater(
                    retained.status.last_error or "volume not deleted yet",
                    _seconds_until(retry_at, self.ctx.clock()),
                )
            self.stop()


def _seconds_until(moment: datetime, now: datetime) -> float:
    return max(MIN_DELAY_SECONDS, (_aware(moment) - _aware(now)).total_seconds())


def _describe(trigger: Trigger) -> str:
    return {
        Trigger.EXPIRED: "retention period ended",
        Trigger.DELETE_NOW: "early delete requested with spec.deleteNow",
        Trigger.RESOURCE_DELETED: "the resource was deleted",
    }[trigger]


def retained_volume_drivers(ctx: Context) -> DriverRegistry[RetainedVolumeDriver]:
    return DriverRegistry(lambda namespace, name: RetainedVolumeDriver(namespace, name, ctx=ctx))
