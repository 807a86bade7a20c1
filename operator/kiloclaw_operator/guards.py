"""What must hold before an instance touches Fly, and what a refusal says: the namespace's binding allows the
instance's app and image (tenancy.py), and the instance holds its sandbox's claim (ownership.py, one Lease per
``(flyApp, sandboxId)``). A refusal is Stalled with a Warning Event, once per message; nothing on Fly is
touched. Before a destroy: the binding again, and the claim (another instance may own what the ids name).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from . import conditions, leadership, ownership, tenancy
from .config import Settings
from .driving import Context, RetryLater
from .kube import KubeError
from .models import FINALIZER, Instance, InstanceStatus, Phase
from .reasons import Reason
from .volumes import MachineNotProven

logger = logging.getLogger("kiloclaw.instance")


class Guarded(Protocol):
    """The driver pass a guard checks for (reconciler.InstanceDriver)."""

    ctx: Context

    @property
    def latest(self) -> dict[str, Any] | None: ...

    #: Whether this process confirmed that the instance holds its claim (the Lease, tenancy.py).
    claim_confirmed: bool
    #: Whether the current pass made the instance's first claim (nobody held it before: ``_claim``).
    first_claim: bool

    async def commit(self, instance: Instance, status: InstanceStatus, why: str) -> Instance: ...

    def current(self) -> Instance: ...

    def log_fields(self, instance: Instance) -> dict[str, Any]: ...

    def backoff(self, hint: float | None = None) -> float: ...


async def admit(driver: Guarded, instance: Instance) -> tuple[Instance, bool]:
    """Before any Fly call of a pass: the binding, then the claim (taken once kopf's finalizer guards the
    instance). Returns the instance to go on with and whether the pass may go on."""
    claimed = ownership.has_claim(instance.status)
    # The namespace's binding first, before any Fly call (read afresh before a claim).
    refusal = await _binding_refusal(driver, instance, fresh=not claimed)
    if refusal is not None:
        await stall(
            driver,
            instance,
            instance.status.model_copy(update={"observed_generation": instance.generation}),
            refusal.reason,
            refusal.message,
        )
        return driver.current(), False
    if conditions.stalled_reason(instance.status) in (
        Reason.APP_NOT_ALLOWED,
        Reason.IMAGE_NOT_ALLOWED,
    ):
        instance = await driver.commit(
            instance,
            conditions.clear_stalled(instance.status, driver.ctx.clock(), instance.generation),
            "the namespace's binding allows the instance again",
        )
    if claimed and not driver.claim_confirmed:
        # Claimed by an earlier process (or before claims were Leases): hold the Lease too. Most are
        # confirmed by the start-up listing of the claims; any other is read (and taken, if free).
        namespace = claims_namespace(driver.ctx.settings)
        holder = None
        if not await driver.ctx.claim_listing.holds(namespace, instance.spec, instance.ref):
            holder = await tenancy.acquire_claim(driver.ctx.kube, namespace, instance.spec, instance.ref)
        if holder is not None:
            await _refuse_duplicate(driver, instance, ownership.Owner(holder.namespace, holder.name))
            return driver.current(), False
        driver.claim_confirmed = True
    if not claimed:
        if FINALIZER not in ((driver.latest or {}).get("metadata", {}).get("finalizers") or ()):
            # kopf adds its finalizer when it first handles the instance: claim (and touch Fly) only once
            # deletion is guarded by it. Claiming first also made kopf's finalizer patch, which carries a
            # resourceVersion test, fail and be sent again: one more write per instance.
            return instance, False
        claimant = await _claim(driver, instance)
        if claimant is None:
            return driver.current(), False
        instance = claimant
    return instance, True


async def _claim(driver: Guarded, instance: Instance) -> Instance | None:
    """Claim the instance's (flyApp, sandboxId) before its first Fly call, or refuse it as a duplicate.

    Checked against the claim book and reserved there under one process-wide lock, so two instances never
    both claim; the claim (phase Provisioning) is confirmed by the API server before the first Fly call.
    See ownership.py for the rule.
    """
    book = driver.ctx.claim_book
    async with driver.ctx.claims:
        owner = await book.owner(instance, driver.latest or {})
        if owner is not None:
            await _refuse_duplicate(driver, instance, owner)
            return None
        # Counted as a claimant from here on; the write itself need not hold up the other claimants.
        book.reserve(driver.latest or {})
    try:
        # The claim book decides among the instances this process sees; the Lease, created atomically by
        # the API server, decides across shards and replicas (tenancy.py).
        namespace = claims_namespace(driver.ctx.settings)
        created = await tenancy.create_claim(driver.ctx.kube, namespace, instance.spec, instance.ref)
        holder = (
            None
            if created
            else await tenancy.acquire_claim(driver.ctx.kube, namespace, instance.spec, instance.ref)
        )
        if holder is not None:
            await _refuse_duplicate(driver, instance, ownership.Owner(holder.namespace, holder.name))
            return None
        driver.claim_confirmed = True
        # Unclaimed in its status and in the Lease: no pass of this instance ever got past its claim, so
        # no Fly call was ever made for it, and this pass has nothing unrecorded to look for (sandbox.py).
        driver.first_claim = created
        now = driver.ctx.clock()
        status = instance.status.model_copy(
            update={"phase": Phase.PROVISIONING, "observed_generation": instance.generation}
        )
        if conditions.is_stalled(status):
            status = conditions.clear_stalled(status, now, instance.generation)
        return await driver.commit(instance, status, "claim the sandbox before any Fly call")
    finally:
        book.settle(driver.latest or {})


def claims_namespace(settings: Settings) -> str:
    """Where the claims on a (flyApp, sandboxId) live (one namespace for every shard and replica)."""
    return settings.claims_namespace or settings.lease_namespace or leadership.default_lease_namespace()


async def _binding_refusal(
    driver: Guarded, instance: Instance, *, fresh: bool, check_image: bool = True
) -> tenancy.Refusal | None:
    annotations = await driver.ctx.bindings.annotations(instance.ref.namespace, fresh=fresh)
    return tenancy.binding_refusal(
        instance.ref.namespace, annotations, instance.spec, check_image=check_image
    )


async def stall(
    driver: Guarded, instance: Instance, status: InstanceStatus, reason: Reason, message: str
) -> None:
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
    logger.warning("%s", message, extra=driver.log_fields(instance))
    status = conditions.mark_stalled(status, reason, message, driver.ctx.clock(), instance.generation)
    instance = await driver.commit(instance, status, f"refused ({reason}): nothing on Fly is touched")
    await driver.ctx.kube.post_event(instance.ref, reason, message, warning=True)


async def _refuse_duplicate(driver: Guarded, instance: Instance, owner: ownership.Owner) -> None:
    message = ownership.duplicate_message(instance, owner)
    stalled = instance.status.condition(conditions.STALLED)
    if (
        stalled is not None
        and stalled.status == "True"
        and stalled.reason == Reason.DUPLICATE_SANDBOX
        and stalled.message == message
    ):
        return
    logger.warning("%s", message, extra=driver.log_fields(instance))
    status = conditions.mark_stalled(
        instance.status.model_copy(update={"observed_generation": instance.generation}),
        Reason.DUPLICATE_SANDBOX,
        message,
        driver.ctx.clock(),
        instance.generation,
    )
    await driver.commit(instance, status, "refused as a duplicate claimant: nothing on Fly is touched")
    await driver.ctx.kube.post_event(instance.ref, Reason.DUPLICATE_SANDBOX, message, warning=True)


async def may_destroy(driver: Guarded, instance: Instance) -> bool:
    """Before a destroy touches Fly: the namespace must still be bound to the app (else the deletion
    waits, Stalled, RetryLater), and the instance must hold the sandbox's claim (else it is released
    without touching Fly: another instance owns what the ids name)."""
    try:
        refusal = await _binding_refusal(driver, instance, fresh=True, check_image=False)
        if refusal is not None:
            message = (
                f"{refusal.message}; the deletion waits until the app is bound again (or an admin "
                "removes the finalizer, leaving Fly as it is)"
            )
            await stall(driver, instance, instance.status, refusal.reason, message)
            raise RetryLater(message, driver.backoff())
        holder = await tenancy.acquire_claim(
            driver.ctx.kube, claims_namespace(driver.ctx.settings), instance.spec, instance.ref
        )
    except KubeError as exc:
        raise RetryLater(
            f"Kubernetes API call failed: {exc}", driver.ctx.settings.retry_backoff_min_seconds
        ) from exc
    if holder is not None:
        logger.warning(
            "deleted without touching Fly: the sandbox's claim is held by instance %s/%s",
            holder.namespace,
            holder.name,
            extra=driver.log_fields(instance),
        )
        return False
    return True


async def refuse_destroy(driver: Guarded, instance: Instance, exc: MachineNotProven) -> None:
    """Say why the deletion waits (Stalled, one Warning Event per message); nothing was destroyed. It goes
    on once the machine is gone or proves ours, or when an admin removes the finalizer."""
    message = str(exc)
    stalled = instance.status.condition(conditions.STALLED)
    if stalled is not None and stalled.status == "True" and stalled.message == message:
        return
    logger.warning("%s", message, extra=driver.log_fields(instance))
    status = conditions.mark_stalled(
        instance.status, Reason.MACHINE_NOT_OWNED, message, driver.ctx.clock(), instance.generation
    )
    instance = await driver.commit(instance, status, "destroy refused: the recorded machine is not ours")
    await driver.ctx.kube.post_event(instance.ref, Reason.MACHINE_NOT_OWNED, message, warning=True)
