"""Pydantic models of the two custom resources, mirroring the CRDs in ``crds/``.

Field names are snake_case in Python and camelCase on the wire (aliases), so a model can be built from a
Kubernetes object with ``model_validate`` and written back with ``dump``. Unknown fields are ignored on read:
the CRD schema, not these models, is the authority on what the API server accepts.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "kiloclaw.kilo.ai"
VERSION = "v1alpha1"
INSTANCE_PLURAL = "kiloclawinstances"
RETAINED_PLURAL = "kiloclawretainedvolumes"
INSTANCE_KIND = "KiloClawInstance"
RETAINED_KIND = "KiloClawRetainedVolume"
INSTANCE_LABEL = f"{GROUP}/instance"
RETRY_ANNOTATION = f"{GROUP}/retry"
#: kopf's finalizer on both kinds (handlers.py configures it): deletion waits for the operator's cleanup.
FINALIZER = f"{GROUP}/finalizer"


class WireModel(BaseModel):
    """Base for models that travel as Kubernetes JSON (camelCase keys)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def dump(self) -> dict[str, Any]:
        """The wire form: camelCase, JSON types, and no keys for unset optional values."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Phase(StrEnum):
    PENDING = "Pending"
    PROVISIONING = "Provisioning"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    RECOVERING = "Recovering"
    DESTROYING = "Destroying"
    FAILED = "Failed"


BUSY_PHASES = frozenset(
    {Phase.PROVISIONING, Phase.STARTING, Phase.STOPPING, Phase.RECOVERING, Phase.DESTROYING}
)
#: Phases in which the instance is not settled: the busy ones and Pending (Reconciling is True, busy cadence).
UNSETTLED_PHASES = BUSY_PHASES | {Phase.PENDING}


class DesiredState(StrEnum):
    RUNNING = "Running"
    STOPPED = "Stopped"


class RecoveryStep(StrEnum):
    """The last recovery step durably completed (DESIGN 3.3), in execution order."""

    STARTED = "Started"
    SOURCE_VOLUME_CHECKED = "SourceVolumeChecked"
    SOURCE_MACHINE_DESTROYED = "SourceMachineDestroyed"
    REPLACEMENT_VOLUME_CREATED = "ReplacementVolumeCreated"
    REPLACEMENT_MACHINE_CREATED = "ReplacementMachineCreated"
    REPLACEMENT_MACHINE_STARTED = "ReplacementMachineStarted"
    CUT_OVER = "CutOver"


RECOVERY_STEP_ORDER: tuple[RecoveryStep, ...] = tuple(RecoveryStep)


def step_reached(current: RecoveryStep, wanted: RecoveryStep) -> bool:
    """True when ``current`` is ``wanted`` or a later step."""
    return RECOVERY_STEP_ORDER.index(current) >= RECOVERY_STEP_ORDER.index(wanted)


class GuestSpec(WireModel):
    cpu_kind: Literal["shared", "performance"] = "shared"
    cpus: int = 1
    memory_mb: int = Field(default=2048, alias="memoryMb")


class VolumeSpec(WireModel):
    size_gb: int = Field(default=10, alias="sizeGb")
    mount_path: str = "/root"


#: The default data-loss window a snapshot restore may cost (DESIGN 3.9): Fly snapshots volumes daily, so the
#: newest snapshot is at most a day old plus the snapshot's own run time; 26 hours accepts it.
DEFAULT_MAX_DATA_LOSS_SECONDS = 93600


class RecoverySpec(WireModel):
    enabled: bool = True
    #: The oldest snapshot a recovery may restore when the old volume's host is unreachable (the data written
    #: since is lost); 0 = never restore a snapshot, wait for the host instead.
    max_data_loss_seconds: int = DEFAULT_MAX_DATA_LOSS_SECONDS


class InstanceSpec(WireModel):
    sandbox_id: str
    user_id: str
    fly_app: str
    image: str
    regions: list[str] | None = None
    guest: GuestSpec = Field(default_factory=GuestSpec)
    volume: VolumeSpec = Field(default_factory=VolumeSpec)
    env: dict[str, str] = Field(default_factory=dict)
    state: DesiredState = DesiredState.RUNNING
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(WireModel):
    """metav1.Condition."""

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    last_transition_time: datetime
    observed_generation: int | None = None


class RecoverySource(StrEnum):
    """Where a recovery takes the sandbox's data from (DESIGN 3.9)."""

    FORK = "Fork"  # a fork of the old volume (its host is reachable): nothing is lost
    SNAPSHOT = "Snapshot"  # the newest snapshot (its host is not): what was written since is lost


class RecoveryStatus(WireModel):
    id: str
    started_at: datetime
    deadline: datetime
    resumptions: int = 0
    step: RecoveryStep
    source_machine_id: str | None = None
    source_volume_id: str
    source_region: str
    replacement_volume_id: str | None = None
    replacement_machine_id: str | None = None
    source: RecoverySource = RecoverySource.FORK
    snapshot_id: str | None = None
    snapshot_created_at: datetime | None = None


class PendingCleanup(WireModel):
    volume_id: str | None = None
    machine_id: str | None = None


class RecoveryOutcome(StrEnum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class LastRecovery(WireModel):
    id: str
    started_at: datetime
    finished_at: datetime
    outcome: RecoveryOutcome
    message: str = ""
    duration_seconds: float
    retained_volume: str | None = None
    source: RecoverySource | None = None
    snapshot_id: str | None = None
    #: The data-loss window of a snapshot restore: how old the snapshot was when the recovery began.
    data_loss_seconds: float | None = None


class InstanceStatus(WireModel):
    phase: Phase = Phase.PENDING
    observed_generation: int | None = None
    machine_id: str | None = None
    volume_id: str | None = None
    region: str | None = None
    fly_state: str | None = None
    observed_at: datetime | None = None
    conditions: list[Condition] = Field(default_factory=list)
    recovery: RecoveryStatus | None = None
    pending_cleanup: PendingCleanup | None = None
    last_recovery: LastRecovery | None = None
    acknowledged_retry: str | None = None

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class ObjectRef(WireModel):
    """Where an object lives; enough to address it and to attach Events to it."""

    namespace: str
    name: str
    uid: str = ""
    api_version: str = f"{GROUP}/{VERSION}"
    kind: str = INSTANCE_KIND

    @classmethod
    def of(cls, body: dict[str, Any], kind: str) -> ObjectRef:
        meta = body.get("metadata", {})
        return cls(
            namespace=meta.get("namespace", ""), name=meta.get("name", ""), uid=meta.get("uid", ""), kind=kind
        )


class Instance(BaseModel):
    """A KiloClawInstance as read from the API server: identity, generation, spec and status."""

    model_config = ConfigDict(extra="ignore")

    ref: ObjectRef
    generation: int
    resource_version: str
    created_at: datetime | None = None
    deleting: bool
    annotations: dict[str, str]
    spec: InstanceSpec
    status: InstanceStatus

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Instance:
        meta = body.get("metadata", {})
        return cls(
            ref=ObjectRef.of(body, body.get("kind", INSTANCE_KIND)),
            generation=int(meta.get("generation") or 1),
            resource_version=str(meta.get("resourceVersion", "")),
            created_at=meta.get("creationTimestamp"),
            deleting=bool(meta.get("deletionTimestamp")),
            annotations=dict(meta.get("annotations") or {}),
            spec=InstanceSpec.model_validate(body.get("spec") or {}),
            status=InstanceStatus.model_validate(body.get("status") or {}),
        )

    @property
    def retry_token(self) -> str:
        return self.annotations.get(RETRY_ANNOTATION, "")


class RetainedPhase(StrEnum):
    RETAINED = "Retained"
    DELETING = "Deleting"
    BLOCKED = "Blocked"


class RetainedVolumeSpec(WireModel):
    fly_app: str
    volume_id: str
    sandbox_id: str
    instance_name: str
    region: str
    reason: str = "UnexpectedStopRecovery"
    recovery_id: str | None = None
    retain_until: datetime
    delete_now: bool = False


class Provenance(WireModel):
    """What the operator wrote, through the status subresource, when it minted a retained volume: the proof
    that it created the resource, and the only ids it acts on. Tenants' roles grant neither create nor status
    writes on retained volumes (deploy/base/tenancy.yaml), so a tenant can neither forge nor alter it."""

    instance_uid: str
    recovery_id: str
    fly_app: str
    volume_id: str
    sandbox_id: str


class RetainedVolumeStatus(WireModel):
    phase: RetainedPhase = RetainedPhase.RETAINED
    provenance: Provenance | None = None
    snapshot_count: int | None = None
    attached_machine_id: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    attempts: int = 0


class RetainedVolume(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ref: ObjectRef
    generation: int
    created_at: datetime | None = None
    deleting: bool
    spec: RetainedVolumeSpec
    status: RetainedVolumeStatus

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> RetainedVolume:
        meta = body.get("metadata", {})
        return cls(
            ref=ObjectRef.of(body, RETAINED_KIND),
            generation=int(meta.get("generation") or 1),
            created_at=meta.get("creationTimestamp"),
            deleting=bool(meta.get("deletionTimestamp")),
            spec=RetainedVolumeSpec.model_validate(body.get("spec") or {}),
            status=RetainedVolumeStatus.model_validate(body.get("status") or {}),
        )
