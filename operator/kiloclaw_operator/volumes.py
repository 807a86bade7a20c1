"""Volume safety shared by destroy, recovery, provisioning and retained volumes: the ownership-checked delete
(DESIGN 3.5), force-destroy that treats "already gone" as done, and which volumes instances hold."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from .fly import FlyClient, NotFound, Transient
from .fly.vocabulary import DESTROYED


class OwnershipMismatch(Exception):
    """The volume is attached to a machine of another sandbox (or of none), or to one the operator never
    recorded for this volume: nothing was destroyed."""

    def __init__(self, machine_id: str, volume_id: str, expected: str, found: str | None) -> None:
        # The message is shown in the instance's namespace: the machine and what it carries may be another
        # tenant's, so neither is named (the operator's log has the machine id).
        detail = (
            f"a machine that is not one of sandbox {expected}"
            if found != expected
            else "a machine not recorded for this volume"
        )
        super().__init__(
            f"refusing to delete volume {volume_id}: it is attached to {detail}; nothing was destroyed"
        )
        self.machine_id = machine_id
        self.volume_id = volume_id
        self.expected = expected
        self.found = found


class MachineNotProven(OwnershipMismatch):
    """A machine id read from status does not prove to be this instance's (our sandbox id in its metadata and
    a mount of the volume recorded with it): nothing was destroyed. The message names only what the instance
    itself recorded."""

    def __init__(self, machine_id: str, volume_id: str | None, expected: str, found: str | None) -> None:
        Exception.__init__(
            self,
            f"refusing to destroy machine {machine_id} recorded in status: "
            + (
                f"it is not a machine of sandbox {expected}"
                if found != expected
                else f"it does not mount the recorded volume {volume_id or '(none recorded)'}"
            )
            + "; nothing was destroyed",
        )
        self.machine_id = machine_id
        self.volume_id = volume_id or ""
        self.expected = expected
        self.found = found


async def destroy_recorded_machine(
    fly: FlyClient,
    app: str,
    machine_id: str,
    *,
    sandbox_id: str,
    volume_id: str | None,
    wait_seconds: int,
) -> None:
    """Force-destroy a machine whose id was read from a status (the instance's, a recovery's source or
    replacement, a pending cleanup), once it proves ours: read it first (404 or destroyed: done), and require
    our sandbox id in its metadata **and** a mount of ``volume_id``, the volume recorded with it. Whoever can
    write a status could otherwise name any machine the operator's token reaches. Raises ``MachineNotProven``
    before anything is destroyed."""
    try:
        machine = await fly.get_machine(app, machine_id)
    except NotFound:
        return
    if machine.is_destroyed:
        return
    mounted = {m.volume for m in machine.config.mounts} if machine.config else set()
    if machine.sandbox_id != sandbox_id or volume_id is None or volume_id not in mounted:
        raise MachineNotProven(machine_id, volume_id, sandbox_id, machine.sandbox_id)
    await destroy_machine_if_present(fly, app, machine_id, wait_seconds=wait_seconds)


async def destroy_machine_if_present(fly: FlyClient, app: str, machine_id: str, *, wait_seconds: int) -> None:
    """Force-destroy; a machine that is already gone counts as destroyed.

    It also waits (at most ``wait_seconds``) until Fly reports it destroyed, because Fly keeps the volume
    attached until then and a volume delete right after the destroy call would be refused.
    """
    try:
        await fly.destroy_machine(app, machine_id, force=True)
        if wait_seconds:
            await fly.wait_machine(app, machine_id, DESTROYED, timeout_seconds=wait_seconds)
    except NotFound:
        return


async def delete_volume_checked(
    fly: FlyClient,
    app: str,
    volume_id: str,
    expected_sandbox_id: str,
    *,
    recorded_machine_ids: Collection[str | None],
    wait_seconds: int,
) -> None:
    """Delete ``volume_id`` only if whatever is attached to it is provably ours (DESIGN 3.5).

    404 on the volume means done. An attached machine is force-destroyed first (it would block the delete),
    but only if its sandbox-id metadata is ``expected_sandbox_id`` **and** its id is one the
    operator recorded for this volume (``recorded_machine_ids``: the instance's or the recovery's machine).
    A sandbox id alone proves nothing (a second instance may name the same sandbox): anything else raises
    ``OwnershipMismatch`` before anything is destroyed.
    """
    try:
        volume = await fly.get_volume(app, volume_id)
    except NotFound:
        return
    if not volume.host_reachable:
        # Never delete what cannot be checked (DESIGN 3.9): a volume on an unreachable host may be the only
        # copy of data written since its last snapshot, and its machine may still be `destroying`. Retried.
        raise Transient(
            f"volume {volume_id} is on a host Fly reports {volume.host_status}: not deleted until it returns",
            method="DELETE",
            route="/apps/{app}/volumes/{id}",
        )
    attached = volume.attached_machine_id
    if attached:
        try:
            machine = await fly.get_machine(app, attached)
        except NotFound:
            machine = None
        if machine is not None and not machine.is_destroyed:
            found = machine.sandbox_id
            if found != expected_sandbox_id or attached not in recorded_machine_ids:
                raise OwnershipMismatch(attached, volume_id, expected_sandbox_id, found)
            await destroy_machine_if_present(fly, app, attached, wait_seconds=wait_seconds)
    try:
        await fly.delete_volume(app, volume_id)
    except NotFound:
        return


def volumes_in_use(instances: Iterable[Mapping[str, Any]], *, viewer: str | None = None) -> dict[str, str]:
    """Volume ids that instances' statuses name as current, or as source or replacement of a recovery in
    flight, mapped to a description of who holds them (for the Stalled message). The description names an
    instance only when it is in ``viewer``'s namespace: a message shown in one namespace names nothing of
    another."""
    held: dict[str, str] = {}
    for body in instances:
        meta = body.get("metadata", {})
        who = f"instance {meta.get('name', '?')}"
        if viewer is not None and meta.get("namespace") != viewer:
            who = "an instance in another namespace"
        status = body.get("status") or {}
        recovery = status.get("recovery") or {}
        roles = (
            (status.get("volumeId"), "current volume"),
            (recovery.get("sourceVolumeId"), "source volume of recovery in flight"),
            (recovery.get("replacementVolumeId"), "replacement volume of recovery in flight"),
        )
        for volume_id, role in roles:
            if volume_id and volume_id not in held:
                held[volume_id] = f"{who} ({role})"
    return held
