"""The pydantic models against the CRDs: the examples round-trip through the models, and what the models
write (a full instance status, a retained-volume status) is accepted by the CRD schemas without pruning —
the API server would silently drop a field the schema does not declare."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiloclaw_operator.conditions import mark_stalled, summarize
from kiloclaw_operator.models import (
    GROUP,
    INSTANCE_KIND,
    RETAINED_KIND,
    VERSION,
    Instance,
    InstanceSpec,
    InstanceStatus,
    LastRecovery,
    PendingCleanup,
    Phase,
    RecoveryOutcome,
    RecoveryStatus,
    RecoveryStep,
    RetainedPhase,
    RetainedVolume,
    RetainedVolumeSpec,
    RetainedVolumeStatus,
    step_reached,
)
from kubesim import crdschema

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def load(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict)
    return loaded


INSTANCE_SCHEMA = crdschema.load_crd_schema(load(ROOT / "crds" / "kiloclawinstances.yaml"), VERSION)
RETAINED_SCHEMA = crdschema.load_crd_schema(load(ROOT / "crds" / "kiloclawretainedvolumes.yaml"), VERSION)


def admitted(schema: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` as the API server would store it; fails on pruned fields or validation errors."""
    pruned, removed = crdschema.prune_unknown_fields(schema, obj)
    assert removed == [], f"the CRD schema would prune {removed}"
    defaulted = crdschema.apply_defaults(schema, pruned)
    errors = crdschema.validate(schema, defaulted)
    assert errors == [], errors
    return defaulted


@pytest.mark.parametrize("example", ["instance.yaml", "instance-minimal.yaml"])
def test_instance_example_round_trips_through_the_spec_model(example: str) -> None:
    stored = admitted(INSTANCE_SCHEMA, load(ROOT / "examples" / example))
    spec = InstanceSpec.model_validate(stored["spec"])
    assert spec.dump() == stored["spec"]
    # ...and what the model writes back is itself a valid object.
    admitted(INSTANCE_SCHEMA, {**stored, "spec": spec.dump()})


def test_minimal_example_gets_the_documented_defaults_from_the_crd() -> None:
    stored = admitted(INSTANCE_SCHEMA, load(ROOT / "examples" / "instance-minimal.yaml"))
    spec = InstanceSpec.model_validate(stored["spec"])
    assert spec.guest.dump() == {"cpuKind": "shared", "cpus": 1, "memoryMb": 2048}
    assert spec.volume.dump() == {"sizeGb": 10, "mountPath": "/root"}
    assert spec.state == "Running" and spec.recovery.enabled is True
    assert spec.regions is None


def test_model_defaults_match_the_crd_defaults() -> None:
    minimal = load(ROOT / "examples" / "instance-minimal.yaml")
    from_crd = admitted(INSTANCE_SCHEMA, minimal)["spec"]
    from_model = InstanceSpec.model_validate(minimal["spec"]).dump()
    assert from_model == from_crd


def test_instance_from_body_reads_identity_generation_and_status() -> None:
    body = admitted(INSTANCE_SCHEMA, load(ROOT / "examples" / "instance.yaml"))
    body["metadata"].update(
        {
            "uid": "uid-1",
            "generation": 3,
            "resourceVersion": "42",
            "annotations": {f"{GROUP}/retry": "1"},
            "deletionTimestamp": "2026-11-25T12:00:00Z",
        }
    )
    body["status"] = full_status().dump()
    instance = Instance.from_body(body)
    assert (instance.ref.namespace, instance.ref.name, instance.ref.uid) == ("tenants", "alice", "uid-1")
    assert (instance.generation, instance.resource_version, instance.deleting) == (3, "42", True)
    assert instance.retry_token == "1"
    assert instance.status == full_status()


def test_retained_volume_example_round_trips_through_the_model() -> None:
    stored = admitted(RETAINED_SCHEMA, load(ROOT / "examples" / "reference" / "retainedvolume.yaml"))
    spec = RetainedVolumeSpec.model_validate(stored["spec"])
    assert spec.dump() == stored["spec"]
    volume = RetainedVolume.from_body(stored)
    assert volume.ref.kind == RETAINED_KIND
    assert volume.spec.retain_until == datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def full_status() -> InstanceStatus:
    """Every field the operator can write, as it writes them."""
    status = InstanceStatus(
        phase=Phase.RECOVERING,
        observed_generation=3,
        machine_id="148e0123456789",
        volume_id="vol_0123456789abcdef",
        region="iad",
        fly_state="stopped",
        observed_at=NOW,
        recovery=RecoveryStatus(
            id="01JDQ8Z6V4K7M2N9P3R5T8W1XY",
            started_at=NOW,
            deadline=NOW + timedelta(minutes=10),
            step=RecoveryStep.REPLACEMENT_MACHINE_CREATED,
            source_machine_id="148e0123456789",
            source_volume_id="vol_0123456789abcdef",
            source_region="iad",
            replacement_volume_id="vol_fedcba9876543210",
            replacement_machine_id="2865f0123456789",
        ),
        pending_cleanup=PendingCleanup(volume_id="vol_aaaaaaaaaaaaaaaa", machine_id="3d8e0123456789"),
        last_recovery=LastRecovery(
            id="01JDQ7",
            started_at=NOW - timedelta(days=1),
            finished_at=NOW - timedelta(days=1) + timedelta(seconds=42),
            outcome=RecoveryOutcome.FAILED,
            message="step ReplacementVolumeCreated: insufficient capacity",
            duration_seconds=42.5,
            retained_volume="alice-vol-5xk2",
        ),
        acknowledged_retry="2",
    )
    status = mark_stalled(status, "RecoveryFailed", "recovery failed", NOW, 3)
    spec = InstanceSpec.model_validate(load(ROOT / "examples" / "instance.yaml")["spec"])
    return summarize(spec, status, 3, NOW)


def test_full_instance_status_written_by_the_models_is_accepted_by_the_crd() -> None:
    body = load(ROOT / "examples" / "instance.yaml")
    wire = full_status().dump()
    body["status"] = wire
    stored = admitted(INSTANCE_SCHEMA, body)
    assert stored["status"] == wire
    assert InstanceStatus.model_validate(stored["status"]) == full_status()


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
def test_every_phase_is_accepted_by_the_crd(phase: Phase) -> None:
    body = load(ROOT / "examples" / "instance.yaml")
    body["status"] = InstanceStatus(phase=phase).dump()
    admitted(INSTANCE_SCHEMA, body)


@pytest.mark.parametrize("step", list(RecoveryStep), ids=lambda s: s.value)
def test_every_recovery_step_is_accepted_by_the_crd(step: RecoveryStep) -> None:
    body = load(ROOT / "examples" / "instance.yaml")
    status = full_status()
    assert status.recovery is not None
    body["status"] = status.model_copy(
        update={"recovery": status.recovery.model_copy(update={"step": step})}
    ).dump()
    admitted(INSTANCE_SCHEMA, body)


def test_succeeded_last_recovery_without_retained_volume_is_accepted() -> None:
    body = load(ROOT / "examples" / "instance.yaml")
    body["status"] = InstanceStatus(
        phase=Phase.RUNNING,
        last_recovery=LastRecovery(
            id="01JD",
            started_at=NOW,
            finished_at=NOW,
            outcome=RecoveryOutcome.SUCCEEDED,
            duration_seconds=3.0,
        ),
    ).dump()
    admitted(INSTANCE_SCHEMA, body)


@pytest.mark.parametrize("phase", list(RetainedPhase), ids=lambda p: p.value)
def test_retained_volume_status_written_by_the_models_is_accepted_by_the_crd(phase: RetainedPhase) -> None:
    body = load(ROOT / "examples" / "reference" / "retainedvolume.yaml")
    wire = RetainedVolumeStatus(
        phase=phase,
        snapshot_count=2,
        attached_machine_id="148e0123456789",
        conditions=mark_stalled(
            InstanceStatus(), "OwnershipMismatch", "expected sandbox A", NOW, 1
        ).conditions,
        last_error="refusing to destroy attached machine",
        next_attempt_at=NOW,
        attempts=3,
    ).dump()
    body["status"] = wire
    stored = admitted(RETAINED_SCHEMA, body)
    assert stored["status"] == wire


def test_wire_names_are_camel_case_and_unset_values_are_omitted() -> None:
    wire = InstanceStatus(phase=Phase.PENDING, volume_id="vol_x").dump()
    assert wire == {"phase": "Pending", "volumeId": "vol_x", "conditions": []}


def test_instance_kind_and_group_match_the_crd() -> None:
    crd = load(ROOT / "crds" / "kiloclawinstances.yaml")
    assert crd["spec"]["group"] == GROUP
    assert crd["spec"]["names"]["kind"] == INSTANCE_KIND


def test_recovery_steps_are_ordered() -> None:
    assert step_reached(RecoveryStep.CUT_OVER, RecoveryStep.STARTED)
    assert step_reached(RecoveryStep.REPLACEMENT_VOLUME_CREATED, RecoveryStep.REPLACEMENT_VOLUME_CREATED)
    assert not step_reached(RecoveryStep.SOURCE_VOLUME_CHECKED, RecoveryStep.SOURCE_MACHINE_DESTROYED)
