"""One driver per instance: the single writer that observes Fly, asks the decision core, acts, and commits.

kopf runs event and deletion handlers concurrently on the same object; here every piece of work on an
instance — observation ticks, spec changes, recovery steps and deletion — goes through the driver's lock, so
exactly one of them touches Fly and the status at a time (DESIGN 3.3, "Single writer").

The reconciler keeps the loop → decide → act → commit and the mapping of errors; the binding and claim
checks are guards.py's, observation is the observer's (observe/protocol.py, never a concrete one), the Fly
calls of the sandbox are sandbox.py's, and a recovery is stops.py's and recovery.py's.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import conditions, guards, lifecycle, ownership, reasons, recovery, stops, tenancy
from .driving import Admission, Context, DriverRegistry, ObjectDriver, RetryLater
from .fly import AppNotFound, Fatal, FlyError, HostUnavailable, NotFound, RateLimited, Unauthorized
from .fly import set_log_context as set_fly_log_context
from .fly import vocabulary as fly
from .fly.models import Machine
from .kube import KubeError
from .lifecycle import Action, Decision, Observation
from .metrics import instance_tally
from .models import FINALIZER, RETRY_ANNOTATION, DesiredState, Instance, InstanceStatus, ObjectRef, Phase
from .reasons import Reason
from .sandbox import Sandbox
from .volumes import MachineNotProven, OwnershipMismatch

logger = logging.getLogger("kiloclaw.instance")

#: What a driver decides on while a recovery owns the instance (the recovery observes Fly itself).
NOT_OBSERVED = Observation.unknown("a recovery observes Fly itself")

#: Phases whose passes provision (the claim, the volume, the machine): bounded process-wide.
_PROVISIONING_PHASES = frozenset({Phase.PENDING.value, Phase.PROVISIONING.value})
_SETTLED_PHASES = frozenset({Phase.RUNNING.value, Phase.STOPPED.value, Phase.FAILED.value})


@dataclass
class InstanceDriver(ObjectDriver[Instance]):
    """The single writer of one KiloClawInstance: observation, decisions, Fly calls, status, deletion."""

    #: The external client of the instance's sandbox (shared by every driver of a run).
    sandbox: Sandbox = field(kw_only=True)
    failures: int = 0
    # Whether this process confirmed that the instance holds its claim (the Lease, tenancy.py).
    claim_confirmed: bool = False
    # Whether the current pass made the instance's first claim (guards.py; sandbox.py reads it in that pass).
    first_claim: bool = False
    # Recoveries this process began or took over (a recovery it did not begin gets a fair budget once).
    recoveries_driven: set[str] = field(default_factory=set)

    def admission(self, body: dict[str, Any], urgent: bool) -> Admission | None:
        """Passes that provision take a place among ``provisioning_concurrency``; passes over a settled
        instance one among ``pass_concurrency`` (news first, see PassGate); no other pass waits (a recovery in
        flight has the budget, a start or a stop is short)."""
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return None
        status = body.get("status") or {}
        phase = status.get("phase") or Phase.PENDING.value
        if phase in _PROVISIONING_PHASES:
            return self.ctx.provisioning
        if phase in _SETTLED_PHASES and not status.get("recovery"):
            return self.ctx.passes.lane(urgent)
        return None

    def prerequisite(self, body: dict[str, Any]) -> Awaitable[None] | None:
        """An instance with a machine begins its pass once it can be observed (with the feed: once its first
        listing is in; the listing of the claims, begun at start-up beside it, is usually in by then)."""
        if not (body.get("status") or {}).get("machineId"):
            return None
        return self.ctx.observer.until_ready()

    def work_signature(self, body: dict[str, Any]) -> tuple[Any, ...]:
        meta = body.get("metadata", {})
        annotations = meta.get("annotations") or {}
        # The finalizer's arrival wakes a driver that waits for it before claiming (``_reconcile``).
        finalized = FINALIZER in (meta.get("finalizers") or ())
        return (*super().work_signature(body), annotations.get(RETRY_ANNOTATION), finalized)

    logger: ClassVar[logging.Logger] = logger
    kind: ClassVar[str] = "instance"

    def read(self, body: dict[str, Any]) -> Instance:
        return Instance.from_body(body)

    def tally(self, body: dict[str, Any]) -> tuple[Any, ...]:
        return instance_tally(body)

    async def patch_status(self, ref: ObjectRef, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.ctx.kube.patch_instance_status(ref, patch)

    def recheck_delay(self) -> float:
        return self.ctx.settings.recheck_seconds

    def forgotten(self) -> None:
        super().forgotten()
        self.ctx.observer.forget(self.namespace, self.name)

    async def commit(
        self, instance: Instance, status: InstanceStatus, why: str, *, deferred: bool = False
    ) -> Instance:
        """The one durable status write: returns only once the API server has stored it.

        ``why`` names the step that must survive a crash; it goes into the debug log with the write.
        """
        status = status.model_copy(update={"acknowledged_retry": instance.retry_token or None})
        status = conditions.summarize(
            instance.spec, status, instance.generation, self.ctx.clock(), deferred=deferred
        )
        return await self.write(instance, status, why)

    def recovery_port(self) -> recovery.Port:
        """The narrow interface a recovery works through (never the driver itself)."""
        return recovery.Port(
            commit=self.commit,
            settings=self.ctx.settings,
            fly=self.ctx.fly,
            kube=self.ctx.kube,
            clock=self.ctx.clock,
            stopping=self.stopping,
            between_steps=self.announce_deferral,
            driven=self.recoveries_driven,
            brake=self.ctx.brake,
            wake=self.wake,
            release_admission=self.release_admission,
        )

    def log_fields(self, instance: Instance) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "namespace": instance.ref.namespace,
            "instance": instance.ref.name,
            "sandbox_id": instance.spec.sandbox_id,
        }
        if instance.status.recovery is not None:
            fields["recovery_id"] = instance.status.recovery.id
        return fields

    # --- the loop -------------------------------------------------------------------------------------

    def backoff(self, hint: float | None = None) -> float:
        self.failures += 1
        base = self.ctx.settings.failure_backoff_base_seconds
        delay = min(self.ctx.settings.retry_backoff_max_seconds, base * (2 ** min(self.failures, 10)))
        delay = random.uniform(base, delay)
        return max(delay, hint or 0.0)

    async def reconcile(self, instance: Instance) -> float:
        try:
            instance = await self._reconcile(instance)
        except FlyError as exc:
            return await self._on_fly_error(self.current(), exc)
        except OwnershipMismatch as exc:
            logger.warning("%s", exc, extra=self.log_fields(instance))
            return self.backoff()
        except RetryLater as exc:
            logger.info("retrying later: %s", exc, extra=self.log_fields(instance))
            return self.backoff(exc.delay)
        except KubeError as exc:
            logger.warning("Kubernetes API call failed, will retry: %s", exc, extra=self.log_fields(instance))
            return self.backoff()
        self.failures = 0
        if conditions.stalled_reason(instance.status) == Reason.FLY_UNAUTHORIZED and self.ctx.fly.authorized:
            instance = await self.commit(
                instance,
                conditions.clear_stalled(instance.status, self.ctx.clock(), instance.generation),
                "the Fly token works again",
            )
        if conditions.stalled_reason(instance.status) in reasons.REFUSALS:
            # A refused instance looks again now and then: the owner may be gone, the binding changed.
            return lifecycle.poll_interval(Phase.STOPPED, self.ctx.settings)
        if lifecycle.waiting_for_source(instance):
            # No recovery source yet (or recoveries paused): look again soon, not after the idle cadence.
            return self.ctx.settings.source_recheck_seconds
        return self.ctx.observer.next_pass(instance)

    async def _on_fly_error(self, instance: Instance, exc: FlyError) -> float:
        fields = self.log_fields(instance)
        if isinstance(exc, Unauthorized):
            # An operator-level problem (the token), not the instance's: the phase stays, the instance says
            # why it cannot progress, and it is retried until the token works again (then the stall clears).
            logger.warning("Fly token unauthorized, will retry: %s", exc, extra=fields)
            status = conditions.mark_stalled(
                instance.status,
                Reason.FLY_UNAUTHORIZED,
                f"the operator's Fly API token is not authorized ({exc.message}); fix the token "
                "(FLY_API_TOKEN_FILE is re-read on change) and this clears by itself",
                self.ctx.clock(),
                instance.generation,
            )
            await self.commit(instance, status, "blocked by an unauthorized Fly token")
            # Backed off, but never longer than a Running instance's cadence: a fixed token must be noticed
            # (and observation resumed) soon, not after the hour-long cap of failing deletes.
            return min(self.backoff(), self.ctx.settings.poll_running_seconds)
        if isinstance(exc, AppNotFound):
            message = (
                f"Fly app {instance.spec.fly_app} does not exist, or the operator's token cannot see it "
                f"({exc.message}): create the app or change spec.flyApp, then this is tried again"
            )
            logger.error("%s", message, extra=fields)
            status = instance.status.model_copy(
                update={"phase": Phase.FAILED, "observed_generation": instance.generation}
            )
            await guards.stall(self, instance, status, Reason.APP_NOT_FOUND, message)
            return lifecycle.poll_interval(Phase.FAILED, self.ctx.settings)
        if isinstance(exc, HostUnavailable) and instance.spec.state is DesiredState.RUNNING:
            instance = await stops.host_unavailable(
                self.recovery_port(), instance, exc, self.log_fields(instance)
            )
            return lifecycle.poll_interval(instance.status.phase, self.ctx.settings)
        if (
            isinstance(exc, Fatal | NotFound)
            and exc.method == "POST"
            and await self._volume_vanished(instance)
        ):
            return await self._on_volume_vanished(instance, exc)
        if isinstance(exc, Fatal) or (isinstance(exc, NotFound) and exc.method == "POST"):
            logger.error("Fly rejected the instance: %s", exc, extra=fields)
            now = self.ctx.clock()
            status = instance.status.model_copy(
                update={"phase": Phase.FAILED, "observed_generation": instance.generation}
            )
            status = conditions.mark_stalled(
                status, Reason.INVALID_SPEC, exc.message, now, instance.generation
            )
            await self.commit(instance, status, "permanent Fly error: stall until the spec changes")
            return lifecycle.poll_interval(Phase.FAILED, self.ctx.settings)
        hint = exc.retry_after if isinstance(exc, RateLimited) else None
        logger.warning("Fly call failed, will retry: %s", exc, extra=fields)
        return self.backoff(hint)

    async def _volume_vanished(self, instance: Instance) -> bool:
        """After Fly refused a create: whether the volume the status records is gone (a confirming read, so a
        refusal for any other cause keeps its own reason)."""
        volume_id = instance.status.volume_id
        if not volume_id:
            return False
        try:
            volume = await self.ctx.fly.get_volume(instance.spec.fly_app, volume_id)
        except AppNotFound:
            return False
        except NotFound:
            return True
        except FlyError:
            return False
        return volume.is_gone

    async def _on_volume_vanished(self, instance: Instance, exc: FlyError) -> float:
        """The spec is fine; the volume it ran on was deleted outside the operator. Failed, and nothing is
        created in its place: a new empty volume would hide that the sandbox's data is gone."""
        message = (
            f"volume {instance.status.volume_id} recorded in status.volumeId no longer exists in Fly app "
            f"{instance.spec.fly_app} (deleted outside the operator; Fly said: {exc.message}); nothing was "
            f"deleted or created in its place. Restore the volume and set the {RETRY_ANNOTATION} annotation "
            "to try again, or delete this instance and create it anew to start with an empty volume"
        )
        status = instance.status.model_copy(
            update={"phase": Phase.FAILED, "observed_generation": instance.generation}
        )
        await guards.stall(self, instance, status, Reason.VOLUME_NOT_FOUND, message)
        return lifecycle.poll_interval(Phase.FAILED, self.ctx.settings)

    async def _reconcile(self, instance: Instance) -> Instance:
        try:
            return await self._admitted_pass(instance)
        finally:
            self.first_claim = False

    async def _admitted_pass(self, instance: Instance) -> Instance:
        instance, admitted = await guards.admit(self, instance)
        if not admitted:
            return instance
        instance = await recovery.retry_pending_cleanup(self.recovery_port(), instance)
        if lifecycle.recovery_in_flight(instance):
            observation, machine = NOT_OBSERVED, None  # a recovery observes Fly itself, step by step
        else:
            observation, machine = await self.ctx.observer.observe(instance)
            if stops.migrated_volume(instance, machine):
                # Fly moved the machine (same id) onto a new volume: follow it, start nothing, delete nothing.
                return await stops.follow_migration(self.recovery_port(), instance, machine)
        # Every route goes through the decision core, which owns the precedence. Decide before recording:
        # every commit acknowledges the retry annotation, so the observation write would otherwise consume a
        # retry request before the decision sees it.
        decision = lifecycle.decide(instance, observation)
        if decision.stall == Reason.START_FAILED:
            # Confirmed by a read first: a late-landing stop the operator sent itself is not a failed start.
            decision, machine = await stops.confirm_failed_start(self.ctx.fly, instance, decision)
        if decision.action is Action.RESUME_RECOVERY:
            return await stops.resume_within_budget(self.recovery_port(), instance)
        if decision.held:
            # Held: no action on Fly, but observation goes on (read paths are always safe).
            return await self._record_observation(instance, observation)
        deferring = lifecycle.is_busy(instance.status.phase) and lifecycle.has_unobserved_generation(instance)
        if decision.action is Action.SETTLE and not deferring:
            # No Fly call follows: the new Fly state goes into the settling write (one write, not two).
            return await self._act(instance, decision, machine, observed=observation)
        instance = await self._record_observation(instance, observation)
        if deferring:
            instance = await self._defer(instance)
        return await self._act(instance, decision, machine)

    async def _record_observation(self, instance: Instance, observation: Observation) -> Instance:
        """Fly state changes are written when they change, never on every poll (no status churn)."""
        if observation.kind is lifecycle.ObservationKind.UNKNOWN:
            return instance
        state = observation.state
        if state == instance.status.fly_state:
            return instance
        if instance.status.phase is Phase.STARTING and state in fly.TRANSIENT_MACHINE_STATES:
            # On its way to started, as the phase already says: the next settled state is written.
            return instance
        status = instance.status.model_copy(update={"fly_state": state, "observed_at": self.ctx.clock()})
        return await self.commit(instance, status, "observed a new Fly state")

    async def announce_deferral(self, instance: Instance) -> Instance:
        """Between the steps of long work (a recovery): pick up the newest body (watch events keep arriving
        while the lock is held) and announce a spec change that must wait (Reconciling Busy, one Event)."""
        latest = self.current()
        if latest.generation > instance.generation:
            instance = latest
        if lifecycle.is_busy(instance.status.phase) and lifecycle.has_unobserved_generation(instance):
            instance = await self._defer(instance)
        return instance

    async def _defer(self, instance: Instance) -> Instance:
        reconciling = instance.status.condition(conditions.RECONCILING)
        if (
            reconciling is not None
            and reconciling.reason == Reason.BUSY
            and reconciling.observed_generation == instance.generation
        ):
            return instance
        await self.ctx.kube.post_event(
            instance.ref,
            Reason.ACTION_DEFERRED,
            f"spec generation {instance.generation} deferred while {instance.status.phase.value}",
        )
        return await self.commit(instance, instance.status, "record the deferred generation", deferred=True)

    # --- acting -----------------------------------------------------------------------------------------

    async def _act(
        self,
        instance: Instance,
        decision: Decision,
        machine: Machine | None,
        *,
        observed: Observation | None = None,
    ) -> Instance:
        action = decision.action
        if action is Action.NOTHING:
            return instance
        if action is Action.BEGIN_RECOVERY:
            # Confirmed by a read of the machine first: a migration is followed, a wrong listing ignored, and
            # the source chosen by host health (stops.py), all before any destructive call.
            return await stops.handle_stop(self.recovery_port(), instance)
        now = self.ctx.clock()
        base = instance.status
        if conditions.is_stalled(base):
            base = conditions.clear_stalled(base, now, instance.generation)
        if decision.event is not None:
            await self.ctx.kube.post_event(instance.ref, decision.event, decision.reason)
        if action is Action.SETTLE or action is Action.ACKNOWLEDGE:
            update: dict[str, Any] = {"phase": decision.phase or base.phase}
            if (
                observed is not None
                and observed.kind is not lifecycle.ObservationKind.UNKNOWN
                and observed.state != base.fly_state
            ):
                update.update(fly_state=observed.state, observed_at=now)
            if decision.clear_machine:
                update["machine_id"] = None
            if action is Action.ACKNOWLEDGE:
                update["observed_generation"] = instance.generation
            status = base.model_copy(update=update)
            if decision.stall is not None:
                # Converge or say why: an instance that should run but cannot is never Stopped in silence.
                status = conditions.mark_stalled(
                    status, decision.stall, decision.reason, now, instance.generation
                )
            instance = await self.commit(instance, status, decision.reason or action.value)
            if decision.stall is not None:
                logger.warning("%s", decision.reason, extra=self.log_fields(instance))
                await self.ctx.kube.post_event(instance.ref, decision.stall, decision.reason, warning=True)
            return instance
        if action is Action.PROVISION:
            return await self.sandbox.provision(self, instance, base)
        if action is Action.START:
            if decision.clear_machine:
                base, machine = base.model_copy(update={"machine_id": None}), None
            return await self.sandbox.start(self, instance, base, machine)
        if action is Action.STOP:
            return await self.sandbox.stop(self, instance, base)
        if action is Action.UPDATE_CONFIG:
            return await self.sandbox.update(self, instance, base)
        raise AssertionError(f"unhandled action {action}")

    # --- deletion ---------------------------------------------------------------------------------------

    async def finalize(self) -> None:
        """Two-phase destroy behind the finalizer; raises RetryLater until Fly confirms both are gone."""
        self.stop()
        async with self.lock:
            instance = self.current()
            set_fly_log_context(**self.log_fields(instance))
            logger.info(
                "destroying: machine %s, volume %s",
                instance.status.machine_id,
                instance.status.volume_id,
                extra=self.log_fields(instance),
            )
            if ownership.holds_fly_ids(instance.status) and not await guards.may_destroy(self, instance):
                return
            if instance.status.recovery is not None:
                # Before the cutover: failure cleanup; after it: finish disposing of the old volume.
                instance = await recovery.settle_for_deletion(self.recovery_port(), instance)
            if instance.status.phase is not Phase.DESTROYING:
                instance = await self.commit(
                    instance,
                    instance.status.model_copy(update={"phase": Phase.DESTROYING}),
                    "record the ids to destroy before any delete call",
                )
            try:
                instance = await stops.follow_migration_before_destroy(self.recovery_port(), instance)
                destroyed = await self.sandbox.destroy_machines(instance)
                await recovery.remove_pending_cleanup(self.recovery_port(), instance)
                await self.sandbox.delete_volume(instance, destroyed)
            except (FlyError, OwnershipMismatch) as exc:
                if isinstance(exc, MachineNotProven):
                    await guards.refuse_destroy(self, instance, exc)
                if isinstance(exc, Unauthorized):
                    raise RetryLater(
                        f"destroy blocked, Fly token unauthorized: {exc}",
                        self.ctx.settings.retry_backoff_min_seconds,
                    ) from exc
                raise RetryLater(f"destroy incomplete: {exc}", self.backoff()) from exc
            await self.commit(
                instance,
                instance.status.model_copy(
                    update={"machine_id": None, "volume_id": None, "pending_cleanup": None}
                ),
                "Fly confirmed machine and volume gone",
            )
            try:
                await tenancy.release_claim(
                    self.ctx.kube, guards.claims_namespace(self.ctx.settings), instance.spec, instance.ref
                )
            except KubeError as exc:
                raise RetryLater(
                    f"could not release the sandbox's claim: {exc}",
                    self.ctx.settings.retry_backoff_min_seconds,
                ) from exc


def instance_drivers(ctx: Context) -> DriverRegistry[InstanceDriver]:
    sandbox = Sandbox(ctx.fly, ctx.kube, ctx.settings, ctx.observer, ctx.clock)
    return DriverRegistry(lambda namespace, name: InstanceDriver(namespace, name, ctx=ctx, sandbox=sandbox))
