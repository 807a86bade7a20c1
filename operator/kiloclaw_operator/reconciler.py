"""One driver per instance: the single writer that observes Fly, asks the decision core, acts, and commits.

kopf runs event and deletion handlers concurrently on the same object; here every piece of work on an
instance — observation ticks, spec changes, recovery steps and deletion — goes through the driver's lock, so
exactly one of them touches Fly and the status at a time (DESIGN 3.3, "Single writer").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar

from . import conditions, leadership, lifecycle, ownership, recovery, stops, tenancy
from .config import Settings
from .driving import Context, DriverRegistry, ObjectDriver, RetryLater
from .feed import FeedObserver, MachineState
from .fly import (
    AppNotFound,
    Capacity,
    Fatal,
    FlyClient,
    FlyError,
    HostUnavailable,
    NotFound,
    RateLimited,
    Unauthorized,
)
from .fly import set_log_context as set_fly_log_context
from .fly import vocabulary as fly
from .fly.models import Machine, Volume
from .kube import KubeError
from .lifecycle import Action, Decision, Observation
from .models import FINALIZER, RETRY_ANNOTATION, DesiredState, Instance, InstanceStatus, ObjectRef, Phase
from .volumes import (
    MachineNotProven,
    OwnershipMismatch,
    delete_volume_checked,
    destroy_machine_if_present,
    destroy_recorded_machine,
    volumes_in_use,
)

logger = logging.getLogger("kiloclaw.instance")

ACTION_DEFERRED = "ActionDeferred"
DUPLICATE_SANDBOX = "DuplicateSandbox"
#: A machine id in status that does not prove to be the instance's: the destroy is refused.
REASON_MACHINE_NOT_PROVEN = "MachineNotOwned"
#: Stalls that refuse the instance before any Fly call; looked at again at the idle cadence.
_REFUSALS = frozenset(
    {
        conditions.REASON_DUPLICATE_SANDBOX,
        tenancy.REASON_APP_NOT_ALLOWED,
        tenancy.REASON_IMAGE_NOT_ALLOWED,
    }
)


#: What a driver decides on while a recovery owns the instance (the recovery observes Fly itself).
NOT_OBSERVED = Observation.unknown("a recovery observes Fly itself")

#: What ``Starting``/``Stopping`` wait for with Fly's ``/wait`` (any settled state ends the wait).
_WAIT_STATES = {
    Phase.STARTING: (fly.STARTED, fly.STOPPED, fly.FAILED, fly.DESTROYED),
    Phase.STOPPING: (fly.STOPPED, fly.FAILED, fly.SUSPENDED, fly.DESTROYED),
}


class PollingObserver:
    """Observes an instance by ``GET /machines/{id}``; read paths never change the phase.

    ``Starting`` and ``Stopping`` first long-poll Fly's ``/wait`` (at most the busy cadence, so that deletion
    never waits long for the driver), which answers the moment the machine gets there."""

    def __init__(self, fly: FlyClient, settings: Settings) -> None:
        self._fly = fly
        self._settings = settings

    def next_pass(self, instance: Instance) -> float:
        if instance.status.phase in _WAIT_STATES:
            # The next pass long-polls /wait, which paces it: come back soon, not after a busy interval.
            return min(self._settings.poll_busy_seconds, 1.0) * random.uniform(0.9, 1.1)
        return lifecycle.poll_interval(instance.status.phase, self._settings)

    async def observe(self, instance: Instance) -> tuple[Observation, Machine | None]:
        machine_id = instance.status.machine_id
        if machine_id is None:
            return Observation.no_machine(), None
        waited_for = _WAIT_STATES.get(instance.status.phase)
        if waited_for is not None and not lifecycle.has_unobserved_generation(instance):
            try:
                seconds = max(
                    1, min(self._settings.wait_call_seconds, round(self._settings.poll_busy_seconds))
                )
                state = await self._fly.wait_for_states(
                    instance.spec.fly_app, machine_id, waited_for, timeout_seconds=seconds
                )
            except FlyError as exc:
                return _failed_read(exc), None
            if state is not None and state != fly.DESTROYED:
                return Observation.found(state), None
            if state is None and instance.status.phase is Phase.STARTING:
                # Not started, stopped or failed yet: still on its way, nothing to decide.
                return Observation.unknown("still starting"), None
        try:
            machine = await self._fly.get_machine(instance.spec.fly_app, machine_id)
        except FlyError as exc:
            return _failed_read(exc), None
        if machine.is_destroyed:
            return Observation.gone(), machine
        in_sync = lifecycle.config_in_sync(instance.spec, machine.config)
        return Observation.found(machine.state, config_in_sync=in_sync), machine


def _failed_read(exc: FlyError) -> Observation:
    """What a failed read of the machine says: gone on a 404, nothing (unknown) on a transient failure. An
    unauthorized token or a rejected request is not an observation: re-raised for the driver."""
    if isinstance(exc, AppNotFound | Unauthorized | Fatal):
        raise exc
    if isinstance(exc, NotFound):
        return Observation.gone()
    return Observation.unknown(str(exc))


#: Phases whose passes provision (the claim, the volume, the machine): bounded process-wide.
_PROVISIONING_PHASES = frozenset({Phase.PENDING.value, Phase.PROVISIONING.value})


@dataclass
class InstanceDriver(ObjectDriver[Instance]):
    """The single writer of one KiloClawInstance: observation, decisions, Fly calls, status, deletion."""

    failures: int = 0
    # Whether this process confirmed that the instance holds its claim (the Lease, tenancy.py).
    claim_confirmed: bool = False
    # Recoveries this process began or took over (a recovery it did not begin gets a fair budget once).
    recoveries_driven: set[str] = field(default_factory=set)
    # Set while the driver waits for news of a machine it just created (the settle window), else None.
    _start_news: asyncio.Event | None = field(default=None, init=False, repr=False)
    # The admission the current pass holds (``admission``), given up while it waits in the settle window.
    _admitted: asyncio.Semaphore | None = field(default=None, init=False, repr=False)

    def admission(self, body: dict[str, Any]) -> asyncio.Semaphore | None:
        """Passes that provision take a place among ``provisioning_concurrency``; no other pass waits."""
        meta = body.get("metadata") or {}
        phase = (body.get("status") or {}).get("phase") or Phase.PENDING.value
        gate = None
        if phase in _PROVISIONING_PHASES and not meta.get("deletionTimestamp"):
            gate = self.ctx.provisioning
        self._admitted = gate
        return gate

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

    async def patch_status(self, ref: ObjectRef, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.ctx.kube.patch_instance_status(ref, patch)

    def recheck_delay(self) -> float:
        return self.ctx.settings.recheck_seconds

    def stop(self) -> None:
        super().stop()
        if self._start_news is not None:
            # A deletion ends a settle window at once: the machine's id is written before the destroy.
            self._start_news.set()

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

    def _backoff(self, hint: float | None = None) -> float:
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
            return self._backoff()
        except RetryLater as exc:
            logger.info("retrying later: %s", exc, extra=self.log_fields(instance))
            return self._backoff(exc.delay)
        except KubeError as exc:
            logger.warning("Kubernetes API call failed, will retry: %s", exc, extra=self.log_fields(instance))
            return self._backoff()
        self.failures = 0
        if (
            conditions.stalled_reason(instance.status) == conditions.REASON_FLY_UNAUTHORIZED
            and self.ctx.fly.authorized
        ):
            instance = await self.commit(
                instance,
                conditions.clear_stalled(instance.status, self.ctx.clock(), instance.generation),
                "the Fly token works again",
            )
        if conditions.stalled_reason(instance.status) in _REFUSALS:
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
                conditions.REASON_FLY_UNAUTHORIZED,
                f"the operator's Fly API token is not authorized ({exc.message}); fix the token "
                "(FLY_API_TOKEN_FILE is re-read on change) and this clears by itself",
                self.ctx.clock(),
                instance.generation,
            )
            await self.commit(instance, status, "blocked by an unauthorized Fly token")
            # Backed off, but never longer than a Running instance's cadence: a fixed token must be noticed
            # (and observation resumed) soon, not after the hour-long cap of failing deletes.
            return min(self._backoff(), self.ctx.settings.poll_running_seconds)
        if isinstance(exc, AppNotFound):
            message = (
                f"Fly app {instance.spec.fly_app} does not exist, or the operator's token cannot see it "
                f"({exc.message}): create the app or change spec.flyApp, then this is tried again"
            )
            logger.error("%s", message, extra=fields)
            status = instance.status.model_copy(
                update={"phase": Phase.FAILED, "observed_generation": instance.generation}
            )
            await self._stall(instance, status, conditions.REASON_APP_NOT_FOUND, message)
            return lifecycle.poll_interval(Phase.FAILED, self.ctx.settings)
        if isinstance(exc, HostUnavailable) and instance.spec.state is DesiredState.RUNNING:
            return await self._on_host_unavailable(instance, exc)
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
                status, conditions.REASON_INVALID_SPEC, exc.message, now, instance.generation
            )
            await self.commit(instance, status, "permanent Fly error: stall until the spec changes")
            return lifecycle.poll_interval(Phase.FAILED, self.ctx.settings)
        hint = exc.retry_after if isinstance(exc, RateLimited) else None
        logger.warning("Fly call failed, will retry: %s", exc, extra=fields)
        return self._backoff(hint)

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
        await self._stall(instance, status, conditions.REASON_VOLUME_NOT_FOUND, message)
        return lifecycle.poll_interval(Phase.FAILED, self.ctx.settings)

    async def _on_host_unavailable(self, instance: Instance, exc: HostUnavailable) -> float:
        """The machine cannot start on its host again (e.g. the host died around a Stopped → Running flip).
        The spec is fine and the sandbox should run: relocate it as an unexpected stop is relocated, or, with
        recovery off, say why it stays stopped."""
        fields = self.log_fields(instance)
        if instance.spec.recovery.enabled and instance.status.volume_id and instance.status.region:
            logger.warning("machine host unreachable, relocating the sandbox: %s", exc, extra=fields)
            relocated = await stops.handle_stop(self.recovery_port(), instance)
            return lifecycle.poll_interval(relocated.status.phase, self.ctx.settings)
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
            status, conditions.REASON_HOST_UNAVAILABLE, message, self.ctx.clock(), instance.generation
        )
        instance = await self.commit(
            instance, status, "host unreachable: stall until the host or the spec changes"
        )
        await self.ctx.kube.post_event(
            instance.ref, conditions.REASON_HOST_UNAVAILABLE, message, warning=True
        )
        return lifecycle.poll_interval(Phase.STOPPED, self.ctx.settings)

    async def _reconcile(self, instance: Instance) -> Instance:
        claimed = ownership.has_claim(instance.status)
        # The namespace's binding first, before any Fly call (read afresh before a claim).
        refusal = await self._binding_refusal(instance, fresh=not claimed)
        if refusal is not None:
            await self._stall(
                instance,
                instance.status.model_copy(update={"observed_generation": instance.generation}),
                refusal.reason,
                refusal.message,
            )
            return self.current()
        if conditions.stalled_reason(instance.status) in (
            tenancy.REASON_APP_NOT_ALLOWED,
            tenancy.REASON_IMAGE_NOT_ALLOWED,
        ):
            instance = await self.commit(
                instance,
                conditions.clear_stalled(instance.status, self.ctx.clock(), instance.generation),
                "the namespace's binding allows the instance again",
            )
        if claimed and not self.claim_confirmed:
            # Claimed before claims were Leases (or by an earlier process): hold the Lease too.
            holder = await tenancy.acquire_claim(
                self.ctx.kube, self._claims_namespace(), instance.spec, instance.ref
            )
            if holder is not None:
                await self._refuse_duplicate(instance, ownership.Owner(holder.namespace, holder.name))
                return self.current()
            self.claim_confirmed = True
        if not claimed:
            if FINALIZER not in ((self.latest or {}).get("metadata", {}).get("finalizers") or ()):
                # kopf adds its finalizer when it first handles the instance: claim (and touch Fly) only once
                # deletion is guarded by it. Claiming first also made kopf's finalizer patch, which carries a
                # resourceVersion test, fail and be sent again: one more write per instance.
                return instance
            claimant = await self._claim(instance)
            if claimant is None:
                return self.current()
            instance = claimant
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
        if decision.stall == lifecycle.REASON_START_FAILED:
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

    async def _claim(self, instance: Instance) -> Instance | None:
        """Claim the instance's (flyApp, sandboxId) before its first Fly call, or refuse it as a duplicate.

        Checked against the claim book and reserved there under one process-wide lock, so two instances never
        both claim; the claim (phase Provisioning) is confirmed by the API server before the first Fly call.
        See ownership.py for the rule.
        """
        book = self.ctx.claim_book
        async with self.ctx.claims:
            owner = await book.owner(instance, self.latest or {})
            if owner is not None:
                await self._refuse_duplicate(instance, owner)
                return None
            # Counted as a claimant from here on; the write itself need not hold up the other claimants.
            book.reserve(self.latest or {})
        try:
            # The claim book decides among the instances this process sees; the Lease, created atomically by
            # the API server, decides across shards and replicas (tenancy.py).
            holder = await tenancy.acquire_claim(
                self.ctx.kube, self._claims_namespace(), instance.spec, instance.ref
            )
            if holder is not None:
                await self._refuse_duplicate(instance, ownership.Owner(holder.namespace, holder.name))
                return None
            self.claim_confirmed = True
            now = self.ctx.clock()
            status = instance.status.model_copy(
                update={"phase": Phase.PROVISIONING, "observed_generation": instance.generation}
            )
            if conditions.is_stalled(status):
                status = conditions.clear_stalled(status, now, instance.generation)
            return await self.commit(instance, status, "claim the sandbox before any Fly call")
        finally:
            book.settle(self.latest or {})

    def _claims_namespace(self) -> str:
        settings = self.ctx.settings
        return settings.claims_namespace or settings.lease_namespace or leadership.default_lease_namespace()

    async def _binding_refusal(
        self, instance: Instance, *, fresh: bool, check_image: bool = True
    ) -> tenancy.Refusal | None:
        annotations = await self.ctx.bindings.annotations(instance.ref.namespace, fresh=fresh)
        return tenancy.binding_refusal(
            instance.ref.namespace, annotations, instance.spec, check_image=check_image
        )

    async def _stall(self, instance: Instance, status: InstanceStatus, reason: str, message: str) -> None:
        """Stalled with ``reason`` and a Warning Event, once per message (a refusal repeated is not news)."""
        stalled = instance.status.condition(conditions.STALLED)
        if (
            stalled is not None
            and stalled.status == "True"
            and stalled.reason == reason
            and stalled.message == message
            and instance.status.phase is status.phase
        ):
            return
        logger.warning("%s", message, extra=self.log_fields(instance))
        status = conditions.mark_stalled(status, reason, message, self.ctx.clock(), instance.generation)
        instance = await self.commit(instance, status, f"refused ({reason}): nothing on Fly is touched")
        await self.ctx.kube.post_event(instance.ref, reason, message, warning=True)

    async def _refuse_duplicate(self, instance: Instance, owner: ownership.Owner) -> None:
        message = ownership.duplicate_message(instance, owner)
        stalled = instance.status.condition(conditions.STALLED)
        if (
            stalled is not None
            and stalled.status == "True"
            and stalled.reason == conditions.REASON_DUPLICATE_SANDBOX
            and stalled.message == message
        ):
            return
        logger.warning("%s", message, extra=self.log_fields(instance))
        status = conditions.mark_stalled(
            instance.status.model_copy(update={"observed_generation": instance.generation}),
            conditions.REASON_DUPLICATE_SANDBOX,
            message,
            self.ctx.clock(),
            instance.generation,
        )
        await self.commit(instance, status, "refused as a duplicate claimant: nothing on Fly is touched")
        await self.ctx.kube.post_event(instance.ref, DUPLICATE_SANDBOX, message, warning=True)

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
            and reconciling.reason == conditions.REASON_BUSY
            and reconciling.observed_generation == instance.generation
        ):
            return instance
        await self.ctx.kube.post_event(
            instance.ref,
            ACTION_DEFERRED,
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
            return await self._provision(instance, base)
        if action is Action.START:
            if decision.clear_machine:
                base, machine = base.model_copy(update={"machine_id": None}), None
            return await self._start(instance, base, machine)
        if action is Action.STOP:
            return await self._stop(instance, base)
        if action is Action.UPDATE_CONFIG:
            return await self._update_config(instance, base)
        raise AssertionError(f"unhandled action {action}")

    async def _provision(self, instance: Instance, base: InstanceStatus) -> Instance:
        if base.phase is not Phase.PROVISIONING:
            base = base.model_copy(
                update={"phase": Phase.PROVISIONING, "observed_generation": instance.generation}
            )
            instance = await self.commit(instance, base, "provisioning begins")
        logger.info(
            "provisioning: volume and machine in app %s",
            instance.spec.fly_app,
            extra=self.log_fields(instance),
        )
        if instance.status.volume_id is None:
            volume = await self._adopt_or_create_volume(instance)
            instance = await self.commit(
                instance,
                instance.status.model_copy(update={"volume_id": volume.id, "region": volume.region}),
                "volume created: record its id before creating the machine",
            )
        return await self._ensure_machine(instance)

    async def _adopt_or_create_volume(self, instance: Instance) -> Volume:
        spec = instance.spec
        name = fly.volume_name(spec.sandbox_id)
        adoptable = await self._adoptable_volumes(instance)
        if adoptable:
            logger.info(
                "adopting volume %s left by an earlier attempt",
                adoptable[0].id,
                extra=self.log_fields(instance),
            )
            return adoptable[0]
        errors: list[str] = []
        for region in lifecycle.ordered_regions(spec, self.ctx.settings):
            try:
                return await self.ctx.fly.create_volume(
                    spec.fly_app, name=name, region=region, size_gb=spec.volume.size_gb
                )
            except Capacity as exc:
                errors.append(f"{region}: {exc.message}")
        raise RetryLater("no region has capacity for the volume: " + "; ".join(errors), 0)

    async def _adoptable_volumes(self, instance: Instance) -> list[Volume]:
        """Volumes this instance created but did not record (crash between create and status write).

        Our name (or, for a create before names carried a hash, the legacy name, if no other instance of the
        app in any namespace maps to that name too), unattached, created after the instance, and held by no
        instance and no retained volume in any namespace.
        """
        spec = instance.spec
        volumes = await self.ctx.fly.list_volumes(spec.fly_app)
        names = {fly.volume_name(spec.sandbox_id), fly.legacy_volume_name(spec.sandbox_id)}
        candidates = [
            v
            for v in volumes
            if v.name in names
            and not v.is_gone
            and not v.attached_machine_id
            and (
                instance.created_at is None
                or v.created_at is None
                or v.created_at >= instance.created_at - timedelta(seconds=60)
            )
        ]
        if not candidates:
            return []
        instances = await self.ctx.kube.list_instances()
        if any(v.name != fly.volume_name(spec.sandbox_id) for v in candidates) and _legacy_name_shared(
            instance, instances
        ):
            candidates = [v for v in candidates if v.name == fly.volume_name(spec.sandbox_id)]
        taken = set(volumes_in_use(instances))
        taken.update(
            str((item.get("spec") or {}).get("volumeId"))
            for item in await self.ctx.kube.list_retained_volumes()
        )
        return sorted((v for v in candidates if v.id not in taken), key=lambda v: str(v.created_at))

    async def _ensure_machine(self, instance: Instance) -> Instance:
        spec = instance.spec
        volume_id = instance.status.volume_id
        assert volume_id is not None
        machine = await self._adoptable_machine(instance)
        if machine is None:
            machine = await self.ctx.fly.create_machine(
                spec.fly_app,
                name=fly.machine_name(spec.sandbox_id),
                region=instance.status.region or lifecycle.ordered_regions(spec, self.ctx.settings)[0],
                config=lifecycle.desired_machine_config(spec, volume_id),
            )
        # No Fly call for this instance until the id is written; the feed's listing is not one.
        news = await self._settle_window(machine.id)
        phase = lifecycle.phase_after_create(news.state if news is not None else None)
        update: dict[str, Any] = {
            "machine_id": machine.id,
            "region": machine.region or instance.status.region,
            "phase": phase,
            "fly_state": machine.state,
            "observed_at": self.ctx.clock(),
        }
        if phase is not Phase.RUNNING:
            return await self.commit(
                instance,
                instance.status.model_copy(update=update),
                "machine created: record its id before waiting for it",
            )
        assert news is not None and isinstance(self.ctx.observer, FeedObserver)
        update["fly_state"] = news.state
        instance = await self.commit(
            instance,
            instance.status.model_copy(update=update),
            "machine created and started: record its id and Running in one write",
        )
        self.ctx.observer.acted_on(machine.id, news)
        return instance

    async def _settle_window(self, machine_id: str) -> MachineState | None:
        """In feed mode, wait up to ``start_settle_seconds`` for the organisation feed to report the machine
        just created settled (started, or anything but on its way there), so that its id and ``Running`` go
        into one status write instead of two. Returns what the feed knows of it by then (None: nothing).

        No Fly call is made for this instance meanwhile, so its id still reaches the status before the next
        one; a crash in the window leaves what a crash between the create and its write leaves (the machine
        is adopted by its metadata and mount), and so does a shutdown that cancels the pass. A deletion ends
        the window at once (``stop``): the pass writes the id, and the destroy, which waits for the lock,
        finds it recorded.
        Polling mode never waits: its next step is a Fly call (``/wait``), so the id must be written first.
        """
        feed = self.ctx.observer
        seconds = self.ctx.settings.start_settle_seconds
        if not isinstance(feed, FeedObserver) or seconds <= 0 or feed.failing:
            return None
        news = self._start_news = asyncio.Event()
        feed.expect(machine_id, news.set)
        # Waiting on the feed is not provisioning work: the pass's place goes to another instance meanwhile.
        gate, self._admitted = self._admitted, None
        if gate is not None:
            gate.release()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    while not self.stopping():
                        known = feed.known(machine_id)
                        if known is not None and lifecycle.start_settled(known.state):
                            break
                        news.clear()
                        await news.wait()
        finally:
            feed.unexpect(machine_id)
            self._start_news = None
            if gate is not None:
                # Taken back for the loop, which releases it after the pass; shielded, so that a cancelled
                # pass still takes it back (later) rather than leaving the loop's release unmatched.
                await asyncio.shield(gate.acquire())
                self._admitted = gate
        return feed.known(machine_id)

    async def _adoptable_machine(self, instance: Instance) -> Machine | None:
        volume_id = instance.status.volume_id
        assert volume_id is not None
        machines = await self._machines_on_volume(instance, volume_id)
        return machines[0] if machines else None

    async def _machines_on_volume(self, instance: Instance, volume_id: str) -> list[Machine]:
        """Live machines that prove they are this instance's: our sandbox id in their metadata *and* a mount
        of a volume id this instance recorded (volume ids are unique; a sandbox id alone is not proof)."""
        machines = await self.ctx.fly.list_machines(
            instance.spec.fly_app, metadata={fly.METADATA_SANDBOX_ID: instance.spec.sandbox_id}
        )
        return [
            machine
            for machine in machines
            if not machine.is_gone
            and any(m.volume == volume_id for m in (machine.config.mounts if machine.config else []))
        ]

    async def _start(self, instance: Instance, base: InstanceStatus, machine: Machine | None) -> Instance:
        spec = instance.spec
        machine_id = base.machine_id
        begin = base.model_copy(update={"phase": Phase.STARTING, "observed_generation": instance.generation})
        if machine_id is None:
            instance = await self.commit(
                instance, begin.model_copy(update={"phase": Phase.PROVISIONING}), "start: create a machine"
            )
            return await self._ensure_machine(instance)
        instance = await self.commit(instance, begin, "starting the machine")
        try:
            if machine is None or not lifecycle.config_in_sync(spec, machine.config):
                assert instance.status.volume_id is not None
                await self.ctx.fly.update_machine(
                    spec.fly_app,
                    machine_id,
                    lifecycle.desired_machine_config(spec, instance.status.volume_id),
                )
            await self.ctx.fly.start_machine(spec.fly_app, machine_id)
        except NotFound:
            logger.info(
                "machine %s is gone; creating a new one on the volume",
                machine_id,
                extra=self.log_fields(instance),
            )
            instance = await self._forget_gone_machine(
                instance, Phase.PROVISIONING, "machine gone: forget it before creating another"
            )
            return await self._ensure_machine(instance)
        return instance

    async def _stop(self, instance: Instance, base: InstanceStatus) -> Instance:
        status = base.model_copy(update={"phase": Phase.STOPPING, "observed_generation": instance.generation})
        instance = await self.commit(instance, status, "stopping the machine")
        assert instance.status.machine_id is not None
        logger.info("stopping machine %s", instance.status.machine_id, extra=self.log_fields(instance))
        try:
            await self.ctx.fly.stop_machine(instance.spec.fly_app, instance.status.machine_id)
        except NotFound:
            return await self._forget_gone_machine(instance, Phase.STOPPED, "machine gone while stopping")
        return instance

    async def _update_config(self, instance: Instance, base: InstanceStatus) -> Instance:
        status = base.model_copy(update={"phase": Phase.STARTING, "observed_generation": instance.generation})
        instance = await self.commit(instance, status, "updating the machine config")
        assert instance.status.machine_id is not None and instance.status.volume_id is not None
        try:
            await self.ctx.fly.update_machine(
                instance.spec.fly_app,
                instance.status.machine_id,
                lifecycle.desired_machine_config(instance.spec, instance.status.volume_id),
            )
        except NotFound:
            # Gone between the observation and the update: the same outcome as observing it gone (not a
            # rejected spec, which a 404 on a POST would otherwise mean).
            return await self._forget_gone_machine(
                instance, Phase.STOPPED, "machine gone while updating its config"
            )
        return instance

    async def _forget_gone_machine(self, instance: Instance, phase: Phase, why: str) -> Instance:
        """The machine vanished between the observation and a Fly call on it: forget its id (never act on a
        machine that is gone) and record the phase that follows; the volume stays the instance's."""
        return await self.commit(
            instance, instance.status.model_copy(update={"machine_id": None, "phase": phase}), why
        )

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
            if ownership.holds_fly_ids(instance.status) and not await self._may_destroy(instance):
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
            app = instance.spec.fly_app
            status = instance.status
            try:
                # Only what this instance recorded, or proves it owns: a machine with our sandbox id that
                # mounts our recorded volume (a create whose id never reached the status). Never every
                # machine carrying the sandbox id: another instance may name the same sandbox.
                proven: set[str] = set()
                if status.volume_id:
                    proven.update(m.id for m in await self._machines_on_volume(instance, status.volume_id))
                if status.machine_id and status.machine_id not in proven:
                    # An id read from status is verified first: our sandbox id and a mount of our volume.
                    await destroy_recorded_machine(
                        self.ctx.fly,
                        app,
                        status.machine_id,
                        sandbox_id=instance.spec.sandbox_id,
                        volume_id=status.volume_id,
                        wait_seconds=self.ctx.settings.wait_call_seconds,
                    )
                for machine_id in sorted(proven):
                    await destroy_machine_if_present(
                        self.ctx.fly, app, machine_id, wait_seconds=self.ctx.settings.wait_call_seconds
                    )
                machine_ids = proven | ({status.machine_id} if status.machine_id else set())
                await recovery.remove_pending_cleanup(self.recovery_port(), instance)
                if status.volume_id:
                    await delete_volume_checked(
                        self.ctx.fly,
                        app,
                        status.volume_id,
                        instance.spec.sandbox_id,
                        recorded_machine_ids=machine_ids,
                        wait_seconds=self.ctx.settings.wait_call_seconds,
                    )
            except (FlyError, OwnershipMismatch) as exc:
                if isinstance(exc, MachineNotProven):
                    await self._refuse_destroy(instance, exc)
                if isinstance(exc, Unauthorized):
                    raise RetryLater(
                        f"destroy blocked, Fly token unauthorized: {exc}",
                        self.ctx.settings.retry_backoff_min_seconds,
                    ) from exc
                raise RetryLater(f"destroy incomplete: {exc}", self._backoff()) from exc
            await self.commit(
                instance,
                instance.status.model_copy(
                    update={"machine_id": None, "volume_id": None, "pending_cleanup": None}
                ),
                "Fly confirmed machine and volume gone",
            )
            try:
                await tenancy.release_claim(
                    self.ctx.kube, self._claims_namespace(), instance.spec, instance.ref
                )
            except KubeError as exc:
                raise RetryLater(
                    f"could not release the sandbox's claim: {exc}",
                    self.ctx.settings.retry_backoff_min_seconds,
                ) from exc

    async def _may_destroy(self, instance: Instance) -> bool:
        """Before a destroy touches Fly: the namespace must still be bound to the app (else the deletion
        waits, Stalled, RetryLater), and the instance must hold the sandbox's claim (else it is released
        without touching Fly: another instance owns what the ids name)."""
        try:
            refusal = await self._binding_refusal(instance, fresh=True, check_image=False)
            if refusal is not None:
                message = (
                    f"{refusal.message}; the deletion waits until the app is bound again (or an admin "
                    "removes the finalizer, leaving Fly as it is)"
                )
                await self._stall(instance, instance.status, refusal.reason, message)
                raise RetryLater(message, self._backoff())
            holder = await tenancy.acquire_claim(
                self.ctx.kube, self._claims_namespace(), instance.spec, instance.ref
            )
        except KubeError as exc:
            raise RetryLater(
                f"Kubernetes API call failed: {exc}", self.ctx.settings.retry_backoff_min_seconds
            ) from exc
        if holder is not None:
            logger.warning(
                "deleted without touching Fly: the sandbox's claim is held by instance %s/%s",
                holder.namespace,
                holder.name,
                extra=self.log_fields(instance),
            )
            return False
        return True

    async def _refuse_destroy(self, instance: Instance, exc: MachineNotProven) -> None:
        """Say why the deletion waits (Stalled, one Warning Event per message); nothing was destroyed. It goes
        on once the machine is gone or proves ours, or when an admin removes the finalizer."""
        message = str(exc)
        stalled = instance.status.condition(conditions.STALLED)
        if stalled is not None and stalled.status == "True" and stalled.message == message:
            return
        logger.warning("%s", message, extra=self.log_fields(instance))
        status = conditions.mark_stalled(
            instance.status, REASON_MACHINE_NOT_PROVEN, message, self.ctx.clock(), instance.generation
        )
        instance = await self.commit(instance, status, "destroy refused: the recorded machine is not ours")
        await self.ctx.kube.post_event(instance.ref, REASON_MACHINE_NOT_PROVEN, message, warning=True)


def _legacy_name_shared(instance: Instance, instances: list[dict[str, Any]]) -> bool:
    """Whether another instance of the same Fly app (any namespace) maps to this one's legacy volume name."""
    legacy = fly.legacy_volume_name(instance.spec.sandbox_id)
    for body in instances:
        spec = body.get("spec") or {}
        if (body.get("metadata") or {}).get("uid") == instance.ref.uid or spec.get(
            "flyApp"
        ) != instance.spec.fly_app:
            continue
        if fly.legacy_volume_name(str(spec.get("sandboxId") or "")) == legacy:
            return True
    return False


def instance_drivers(ctx: Context) -> DriverRegistry[InstanceDriver]:
    return DriverRegistry(lambda namespace, name: InstanceDriver(namespace, name, ctx=ctx))
