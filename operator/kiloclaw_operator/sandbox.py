"""The sandbox as an external resource (crossplane's external client): one instance's Fly volume and machine,
provisioned (adopting what a crash left unrecorded), started, stopped, updated and destroyed.

Every method acts for one pass of the instance's driver (``Pass``), writing through its ``commit`` what must
survive a crash before the Fly call that depends on it (the phase before the call, a created volume's id
before the machine). Which action to take is the decision core's (lifecycle.py); the reconciler maps errors.
Destroys act only on what the instance recorded or proves it owns (adoption.py, volumes.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Any, Protocol

from . import adoption, lifecycle
from .config import Settings
from .driving import RetryLater
from .fly import Capacity, FlyClient, NotFound
from .fly import vocabulary as fly
from .fly.models import Machine, Volume
from .kube import KubeClient
from .models import Instance, InstanceStatus, Phase
from .observe.protocol import Observer
from .volumes import (
    delete_volume_checked,
    destroy_machine_if_present,
    destroy_recorded_machine,
    volumes_in_use,
)

logger = logging.getLogger("kiloclaw.instance")


class Pass(Protocol):
    """What the sandbox needs from the driver pass it acts for."""

    async def commit(self, instance: Instance, status: InstanceStatus, why: str) -> Instance:
        """The durable status write (returns once the API server stored it)."""
        ...

    def log_fields(self, instance: Instance) -> dict[str, Any]: ...

    def aside(self, interrupt: Callable[[], None]) -> AbstractAsyncContextManager[Callable[[], bool]]:
        """Give up the pass's admission while it waits outside it (driving.ObjectDriver.aside)."""
        ...

    #: Whether this pass made the instance's first claim: no Fly call was ever made for it (guards.py).
    first_claim: bool


class Sandbox:
    """The external client of every instance's sandbox (one per operator run; no per-instance state)."""

    def __init__(
        self,
        fly_client: FlyClient,
        kube: KubeClient,
        settings: Settings,
        observer: Observer,
        clock: Callable[[], datetime],
    ) -> None:
        self._fly = fly_client
        self._kube = kube
        self._settings = settings
        self._observer = observer
        self._clock = clock

    # --- provision ------------------------------------------------------------------------------------

    async def provision(self, driver: Pass, instance: Instance, base: InstanceStatus) -> Instance:
        if base.phase is not Phase.PROVISIONING:
            base = base.model_copy(
                update={"phase": Phase.PROVISIONING, "observed_generation": instance.generation}
            )
            instance = await driver.commit(instance, base, "provisioning begins")
        logger.info(
            "provisioning: volume and machine in app %s",
            instance.spec.fly_app,
            extra=driver.log_fields(instance),
        )
        if instance.status.volume_id is not None:
            return await self._ensure_machine(driver, instance)
        volume, created = await self._adopt_or_create_volume(driver, instance)
        instance = await driver.commit(
            instance,
            instance.status.model_copy(update={"volume_id": volume.id, "region": volume.region}),
            "volume created: record its id before creating the machine",
        )
        # A volume created in this pass has no machine: a machine is created for a volume only once its id
        # is recorded, which happened just now.
        return await self._ensure_machine(driver, instance, machines=[] if created else None)

    async def _adopt_or_create_volume(self, driver: Pass, instance: Instance) -> tuple[Volume, bool]:
        """The volume to provision on, and whether it was created now (else adopted)."""
        spec = instance.spec
        name = fly.volume_name(spec.sandbox_id)
        # After the instance's first claim, in the same pass, no earlier attempt can have left a volume.
        adoptable = [] if driver.first_claim else await self._adoptable_volumes(instance)
        if adoptable:
            logger.info(
                "adopting volume %s left by an earlier attempt",
                adoptable[0].id,
                extra=driver.log_fields(instance),
            )
            return adoptable[0], False
        errors: list[str] = []
        for region in lifecycle.ordered_regions(spec, self._settings):
            try:
                volume = await self._fly.create_volume(
                    spec.fly_app, name=name, region=region, size_gb=spec.volume.size_gb
                )
            except Capacity as exc:
                errors.append(f"{region}: {exc.message}")
            else:
                return volume, True
        raise RetryLater("no region has capacity for the volume: " + "; ".join(errors), 0)

    async def _adoptable_volumes(self, instance: Instance) -> list[Volume]:
        """Volumes this instance created but did not record (crash between create and status write).

        Our name (or, for a create before names carried a hash, the legacy name, if no other instance of the
        app in any namespace maps to that name too), unattached, created after the instance, and held by no
        instance and no retained volume in any namespace.
        """
        spec = instance.spec
        volumes = await self._fly.list_volumes(spec.fly_app)
        names = adoption.sandbox_volume_names(spec.sandbox_id)
        candidates = [
            v
            for v in volumes
            if adoption.unattached_and_live(v, names) and _created_since(self._fly, v, instance.created_at)
        ]
        if not candidates:
            return []
        instances = await self._kube.every_instance_slim()
        if any(v.name != fly.volume_name(spec.sandbox_id) for v in candidates) and _legacy_name_shared(
            instance, instances
        ):
            candidates = [v for v in candidates if v.name == fly.volume_name(spec.sandbox_id)]
        taken = set(volumes_in_use(instances))
        taken.update(
            str((item.get("spec") or {}).get("volumeId")) for item in await self._kube.list_retained_volumes()
        )
        return sorted((v for v in candidates if v.id not in taken), key=lambda v: str(v.created_at))

    async def _ensure_machine(
        self, driver: Pass, instance: Instance, machines: list[Machine] | None = None
    ) -> Instance:
        """``machines``: the machines on the recorded volume, when the caller knows them (else listed)."""
        spec = instance.spec
        volume_id = instance.status.volume_id
        assert volume_id is not None
        if machines is None:
            machines = await self.machines_on_volume(instance, volume_id)
        machine = machines[0] if machines else None
        if machine is None:
            machine = await self._fly.create_machine(
                spec.fly_app,
                name=fly.machine_name(spec.sandbox_id),
                region=instance.status.region or lifecycle.ordered_regions(spec, self._settings)[0],
                config=lifecycle.desired_machine_config(spec, volume_id),
            )
        # No Fly call for this instance until the id is written (an observer's listing is not one).
        news = await self._observer.settled_start(machine.id, driver.aside)
        phase = lifecycle.phase_after_create(news.state if news is not None else None)
        update: dict[str, Any] = {
            "machine_id": machine.id,
            "region": machine.region or instance.status.region,
            "phase": phase,
            "fly_state": machine.state,
            "observed_at": self._clock(),
        }
        if phase is not Phase.RUNNING:
            return await driver.commit(
                instance,
                instance.status.model_copy(update=update),
                "machine created: record its id before waiting for it",
            )
        assert news is not None
        update["fly_state"] = news.state
        instance = await driver.commit(
            instance,
            instance.status.model_copy(update=update),
            "machine created and started: record its id and Running in one write",
        )
        self._observer.acted_on(machine.id, news)
        return instance

    async def machines_on_volume(self, instance: Instance, volume_id: str) -> list[Machine]:
        """Live machines that prove they are this instance's: our sandbox id in their metadata *and* a mount
        of a volume id this instance recorded (volume ids are unique; a sandbox id alone is not proof)."""
        return await adoption.machines_on_volume(
            self._fly, instance.spec.fly_app, instance.spec.sandbox_id, volume_id
        )

    # --- start, stop, update --------------------------------------------------------------------------

    async def start(
        self, driver: Pass, instance: Instance, base: InstanceStatus, machine: Machine | None
    ) -> Instance:
        spec = instance.spec
        machine_id = base.machine_id
        begin = base.model_copy(update={"phase": Phase.STARTING, "observed_generation": instance.generation})
        if machine_id is None:
            instance = await driver.commit(
                instance, begin.model_copy(update={"phase": Phase.PROVISIONING}), "start: create a machine"
            )
            return await self._ensure_machine(driver, instance)
        instance = await driver.commit(instance, begin, "starting the machine")
        try:
            if machine is None or not lifecycle.config_in_sync(spec, machine.config):
                assert instance.status.volume_id is not None
                await self._fly.update_machine(
                    spec.fly_app,
                    machine_id,
                    lifecycle.desired_machine_config(spec, instance.status.volume_id),
                )
            await self._fly.start_machine(spec.fly_app, machine_id)
        except NotFound:
            logger.info(
                "machine %s is gone; creating a new one on the volume",
                machine_id,
                extra=driver.log_fields(instance),
            )
            instance = await _forget_gone_machine(
                driver, instance, Phase.PROVISIONING, "machine gone: forget it before creating another"
            )
            return await self._ensure_machine(driver, instance)
        return instance

    async def stop(self, driver: Pass, instance: Instance, base: InstanceStatus) -> Instance:
        status = base.model_copy(update={"phase": Phase.STOPPING, "observed_generation": instance.generation})
        instance = await driver.commit(instance, status, "stopping the machine")
        assert instance.status.machine_id is not None
        logger.info("stopping machine %s", instance.status.machine_id, extra=driver.log_fields(instance))
        try:
            await self._fly.stop_machine(instance.spec.fly_app, instance.status.machine_id)
        except NotFound:
            return await _forget_gone_machine(driver, instance, Phase.STOPPED, "machine gone while stopping")
        return instance

    async def update(self, driver: Pass, instance: Instance, base: InstanceStatus) -> Instance:
        status = base.model_copy(update={"phase": Phase.STARTING, "observed_generation": instance.generation})
        instance = await driver.commit(instance, status, "updating the machine config")
        assert instance.status.machine_id is not None and instance.status.volume_id is not None
        try:
            await self._fly.update_machine(
                instance.spec.fly_app,
                instance.status.machine_id,
                lifecycle.desired_machine_config(instance.spec, instance.status.volume_id),
            )
        except NotFound:
            # Gone between the observation and the update: the same outcome as observing it gone (not a
            # rejected spec, which a 404 on a POST would otherwise mean).
            return await _forget_gone_machine(
                driver, instance, Phase.STOPPED, "machine gone while updating its config"
            )
        return instance

    # --- destroy (the driver records the ids first and maps the errors) -------------------------------

    async def destroy_machines(self, instance: Instance) -> set[str]:
        """Destroy the machines the instance recorded or proves it owns; returns their ids.

        Only what this instance recorded, or proves it owns: a machine with our sandbox id that mounts our
        recorded volume (a create whose id never reached the status). Never every machine carrying the
        sandbox id: another instance may name the same sandbox."""
        app = instance.spec.fly_app
        status = instance.status
        wait_seconds = self._settings.wait_call_seconds
        proven: set[str] = set()
        if status.volume_id:
            proven.update(m.id for m in await self.machines_on_volume(instance, status.volume_id))
        if status.machine_id and status.machine_id not in proven:
            # An id read from status is verified first: our sandbox id and a mount of our volume.
            await destroy_recorded_machine(
                self._fly,
                app,
                status.machine_id,
                sandbox_id=instance.spec.sandbox_id,
                volume_id=status.volume_id,
                wait_seconds=wait_seconds,
            )
        for machine_id in sorted(proven):
            await destroy_machine_if_present(self._fly, app, machine_id, wait_seconds=wait_seconds)
        return proven | ({status.machine_id} if status.machine_id else set())

    async def delete_volume(self, instance: Instance, machine_ids: Iterable[str]) -> None:
        """Delete the recorded volume, once no machine but the ones just destroyed ever held it."""
        if instance.status.volume_id:
            await delete_volume_checked(
                self._fly,
                instance.spec.fly_app,
                instance.status.volume_id,
                instance.spec.sandbox_id,
                recorded_machine_ids=set(machine_ids),
                wait_seconds=self._settings.wait_call_seconds,
            )


async def _forget_gone_machine(driver: Pass, instance: Instance, phase: Phase, why: str) -> Instance:
    """The machine vanished between the observation and a Fly call on it: forget its id (never act on a
    machine that is gone) and record the phase that follows; the volume stays the instance's."""
    return await driver.commit(
        instance, instance.status.model_copy(update={"machine_id": None, "phase": phase}), why
    )


def _created_since(fly_client: FlyClient, volume: Volume, instance_created: datetime | None) -> bool:
    """Created after the instance, compared in our clock (Fly stamps ``created_at`` with its own); a minute's
    slack; unknown times count."""
    if instance_created is None or volume.created_at is None:
        return True
    return fly_client.in_our_clock(volume.created_at) >= instance_created - timedelta(seconds=60)


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
