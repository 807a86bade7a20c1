"""Adoption: finding on Fly what an earlier attempt created but never recorded (a crash, or a lost reply,
between a create and its status write), shared by provisioning (sandbox.py) and recovery (recovery.py).

Only what proves to be the instance's is adopted: a volume by its sandbox name, unattached and live (each
caller adds its own time window and exclusions); a machine by its metadata, and, for provisioning, by a mount
of a volume the instance recorded (volume ids are unique; a sandbox id alone is not proof).
"""

from __future__ import annotations

from .fly import FlyClient
from .fly import vocabulary as fly
from .fly.models import Machine, Volume


def sandbox_volume_names(sandbox_id: str) -> set[str]:
    """The names a volume of this sandbox may carry: ours, and the legacy one (created before names carried a
    hash; each caller says when a legacy name may be adopted)."""
    return {fly.volume_name(sandbox_id), fly.legacy_volume_name(sandbox_id)}


def unattached_and_live(volume: Volume, names: set[str]) -> bool:
    """A live volume with one of ``names`` that no machine holds: what an interrupted create may have left
    (an attached one is in someone's use)."""
    return volume.name in names and not volume.attached_machine_id and not volume.is_gone


async def live_machines(client: FlyClient, app: str, metadata: dict[str, str]) -> list[Machine]:
    """The machines of ``app`` that carry ``metadata`` and are not gone."""
    return [machine for machine in await client.list_machines(app, metadata=metadata) if not machine.is_gone]


def mounts(machine: Machine, volume_id: str) -> bool:
    """Whether ``machine`` mounts the volume ``volume_id``."""
    return any(mount.volume == volume_id for mount in (machine.config.mounts if machine.config else []))


async def machines_on_volume(client: FlyClient, app: str, sandbox_id: str, volume_id: str) -> list[Machine]:
    """Live machines that prove they are the sandbox's: its id in their metadata *and* a mount of
    ``volume_id``, a volume the instance recorded."""
    machines = await live_machines(client, app, {fly.METADATA_SANDBOX_ID: sandbox_id})
    return [machine for machine in machines if mounts(machine, volume_id)]
