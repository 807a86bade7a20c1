"""Pydantic models of the Fly Machines API payloads the operator reads and writes.

Field names follow the OpenAPI spec (`components.schemas`). Unknown fields are ignored so that Fly adding a
field never breaks parsing. Only the part of the machine config the operator owns is modelled: the operator
always sends the whole config it wants, so an update replaces whatever else was there.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .vocabulary import (
    DESTROYED,
    EVENT_EXIT,
    GONE_MACHINE_STATES,
    GONE_VOLUME_STATES,
    HOST_OK,
    METADATA_SANDBOX_ID,
)

__all__ = [
    "Guest",
    "Machine",
    "MachineConfig",
    "MachineEvent",
    "MachineSummaryConfig",
    "Mount",
    "OrgMachine",
    "OrgMachinesPage",
    "RestartPolicy",
    "Snapshot",
    "Volume",
]


class FlyModel(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


def _empty_to_none(value: object) -> object:
    # Fly sends "" as well as null for "no value" in some id fields; one spelling keeps callers simple.
    return None if value == "" else value


class Guest(FlyModel):
    """`fly.MachineGuest`: the VM size."""

    cpu_kind: str = "shared"
    cpus: int = 1
    memory_mb: int = 256


class Mount(FlyModel):
    """`fly.MachineMount`: a volume mounted into the machine."""

    volume: str
    path: str


class RestartPolicy(FlyModel):
    """`fly.MachineRestart`. The operator uses `no` so that a crash shows up as `stopped`."""

    policy: str = "no"


class MachineConfig(FlyModel):
    """The operator-owned subset of `fly.MachineConfig`."""

    image: str
    guest: Guest | None = None
    env: dict[str, str] = Field(default_factory=dict)
    mounts: list[Mount] = Field(default_factory=list)
    restart: RestartPolicy | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("env", "metadata", mode="before")
    @classmethod
    def _null_map_is_empty(cls, value: object) -> object:
        return {} if value is None else value

    @field_validator("mounts", mode="before")
    @classmethod
    def _null_list_is_empty(cls, value: object) -> object:
        return [] if value is None else value


class MachineEvent(FlyModel):
    """`fly.MachineEvent`: one entry of a machine's recent history (newest first on a GET)."""

    type: str = ""
    status: str = ""
    source: str = ""
    timestamp: int | None = None
    request: dict[str, object] | None = None

    @property
    def at(self) -> datetime | None:
        """When it happened, in Fly's clock. The spec says only "integer": milliseconds since the epoch as
        flysim gives it, or seconds (a value below 10^11 is seconds: that many milliseconds is 1973)."""
        if not self.timestamp:
            return None
        seconds = self.timestamp / 1000 if self.timestamp >= 10**11 else self.timestamp
        return datetime.fromtimestamp(seconds, UTC)

    @property
    def requested_stop(self) -> bool | None:
        """For an exit: whether the stop was asked for (a stop call, or Fly's own graceful stop) rather than
        the machine exiting by itself; None when the event does not say."""
        if self.type != EVENT_EXIT or not isinstance(self.request, dict):
            return None
        exit_event = self.request.get("exit_event")
        if not isinstance(exit_event, dict) or not isinstance(exit_event.get("requested_stop"), bool):
            return None
        return bool(exit_event["requested_stop"])


class Machine(FlyModel):
    """`Machine` as returned by get/list/create/update."""

    id: str
    name: str = ""
    state: str = ""
    region: str = ""
    instance_id: str | None = None
    config: MachineConfig | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    #: Whether Fly can reach the machine's host (`ok`, `unknown`, `unreachable`); None when not shown.
    host_status: str | None = None
    events: list[MachineEvent] = Field(default_factory=list)

    @field_validator("events", mode="before")
    @classmethod
    def _null_events_are_empty(cls, value: object) -> object:
        return [] if value is None else value

    @property
    def host_reachable(self) -> bool:
        """Fly can reach the host (a machine without the field is assumed reachable, as before)."""
        return self.host_status in (None, HOST_OK)

    @property
    def volume_ids(self) -> list[str]:
        return [m.volume for m in self.config.mounts] if self.config is not None else []

    @property
    def last_exit(self) -> MachineEvent | None:
        """The newest exit event Fly reports, if any."""
        return next((e for e in self.events if e.type == EVENT_EXIT), None)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.config.metadata) if self.config is not None else {}

    @property
    def sandbox_id(self) -> str | None:
        """The sandbox the operator created this machine for (its metadata), if any."""
        return self.metadata.get(METADATA_SANDBOX_ID)

    @property
    def is_gone(self) -> bool:
        """Destroyed or being destroyed: never adopted, never someone's live machine."""
        return self.state in GONE_MACHINE_STATES

    @property
    def is_destroyed(self) -> bool:
        """The destroy finished: the machine holds nothing (a destroying one still holds its volume)."""
        return self.state == DESTROYED


class Volume(FlyModel):
    """`Volume`."""

    id: str
    name: str = ""
    state: str = ""
    region: str = ""
    zone: str | None = None
    size_gb: int | None = None
    attached_machine_id: str | None = None
    attached_alloc_id: str | None = None
    encrypted: bool | None = None
    snapshot_retention: int | None = None
    auto_backup_enabled: bool | None = None
    host_status: str | None = None
    created_at: datetime | None = None

    @field_validator("attached_machine_id", "attached_alloc_id", "zone", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return _empty_to_none(value)

    @property
    def is_gone(self) -> bool:
        """Destroyed or on its way out: nothing left to retain or adopt."""
        return self.state in GONE_VOLUME_STATES

    @property
    def host_reachable(self) -> bool:
        """Fly can reach the volume's host (no field: assumed reachable, as before the field existed)."""
        return self.host_status in (None, HOST_OK)


class Snapshot(FlyModel):
    """`VolumeSnapshot`."""

    id: str
    created_at: datetime | None = None
    size: int | None = None
    status: str = ""
    digest: str | None = None
    retention_days: int | None = None
    volume_size: int | None = None


class MachineSummaryConfig(FlyModel):
    """`MachineOverviewConfig`: the slice of the config the organisation listing may include."""

    image: str | None = None
    guest: Guest | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("metadata", mode="before")
    @classmethod
    def _null_map_is_empty(cls, value: object) -> object:
        return {} if value is None else value


class OrgMachine(FlyModel):
    """`OrgMachine`: one entry of the organisation-wide machine listing."""

    id: str
    name: str = ""
    state: str = ""
    region: str = ""
    app_name: str = ""
    instance_id: str | None = None
    version: str | None = None
    config: MachineSummaryConfig | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.config.metadata) if self.config is not None else {}


class OrgMachinesPage(FlyModel):
    """`OrgMachinesResponse`: one cursor page of the organisation listing (oldest `updated_at` first)."""

    machines: list[OrgMachine] = Field(default_factory=list)
    next_cursor: str | None = None
    last_machine_id: str | None = None
    last_updated_at: datetime | None = None
    error_regions: list[str] = Field(default_factory=list)

    @field_validator("machines", "error_regions", mode="before")
    @classmethod
    def _null_list_is_empty(cls, value: object) -> object:
        return [] if value is None else value

    @field_validator("next_cursor", "last_machine_id", "last_updated_at", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return _empty_to_none(value)
