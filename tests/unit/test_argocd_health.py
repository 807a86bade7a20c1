"""The Argo CD health check for KiloClawInstance, run the way Argo CD runs it.

Argo CD evaluates `resource.customizations.health.<group>_<kind>` with gopher-lua (Lua 5.1): the live object
is the global `obj` and the script returns a table {status, message}. lupa's Lua 5.1 runtime stands in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa.lua51 as lua51
import pytest
import yaml

from builders import instance_body
from kiloclaw_operator.models import UNSETTLED_PHASES

DEPLOY_ARGOCD = Path(__file__).resolve().parents[2] / "deploy" / "argocd"
HEALTH_LUA = DEPLOY_ARGOCD / "health-kiloclaw.lua"
ARGOCD_CM_KEY = "resource.customizations.health.kiloclaw.kilo.ai_KiloClawInstance"
ARGOCD_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
# The phases in which the operator reports Reconciling=True (the product's set, not a copy of it).
BUSY_PHASES = sorted(phase.value for phase in UNSETTLED_PHASES)


def argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    """Evaluate the health script over `obj` in a fresh Lua 5.1 state, as Argo CD does per resource."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(HEALTH_LUA.read_text())
    health = {key: result[key] for key in ("status", "message")}
    assert health["status"] in ARGOCD_STATUSES
    assert isinstance(health["message"], str)
    return health


def condition(type_: str, status: str, reason: str, message: str = "", generation: int = 3) -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": "2026-11-25T12:00:00Z",
    }


def instance(
    *,
    state: str = "Running",
    generation: int = 3,
    status: dict[str, Any] | None = None,
) -> dict[str, Any]:
    metadata = {
        "generation": generation,
        "uid": "4f1c2a9e-8d6b-4c1e-9a57-0d3b2e6f7a81",
        "finalizers": ["kiloclaw.kilo.ai/finalizer"],
    }
    return instance_body(
        metadata=metadata,
        status=status,
        regions=["iad", "ord", "cdg"],
        state=state,
        recovery={"enabled": True},
    )


def settled_status(phase: str, *, fly_state: str, ready: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "phase": phase,
        "observedGeneration": 3,
        "machineId": "148ed726c24289",
        "volumeId": "vol_5xk2q8w1r9t3y7u0",
        "region": "ord",
        "flyState": fly_state,
        "observedAt": "2026-11-25T12:00:00Z",
        "conditions": [
            ready,
            condition("Reconciling", "False", "Settled"),
            condition("Stalled", "False", "Settled"),
        ],
        **extra,
    }


def test_running_instance_with_a_started_machine_is_healthy() -> None:
    obj = instance(
        status=settled_status("Running", fly_state="started", ready=condition("Ready", "True", "Running"))
    )
    health = argocd_health(obj)
    assert health["status"] == "Healthy"
    assert health["message"] == "Running in ord (machine 148ed726c24289)"


def test_instance_the_operator_has_not_seen_yet_is_progressing() -> None:
    assert argocd_health(instance()) == {"status": "Progressing", "message": "Waiting for operator"}


def test_spec_change_not_yet_acted_on_is_progressing_even_while_ready() -> None:
    # The user bumped the image (generation 4) while the old machine still runs and reports Ready.
    status = settled_status("Running", fly_state="started", ready=condition("Ready", "True", "Running"))
    assert argocd_health(instance(generation=4, status=status)) == {
        "status": "Progressing",
        "message": "Waiting for operator",
    }


def test_instance_stopped_on_purpose_is_suspended() -> None:
    status = settled_status("Stopped", fly_state="stopped", ready=condition("Ready", "True", "Stopped"))
    assert argocd_health(instance(state="Stopped", status=status))["status"] == "Suspended"


def test_failed_recovery_is_degraded_with_the_recovery_error() -> None:
    status = settled_status(
        "Stopped", fly_state="stopped", ready=condition("Ready", "False", "RecoveryFailed")
    )
    status["conditions"][2] = condition(
        "Stalled", "True", "RecoveryFailed", "unexpected stop recovery timed out"
    )
    status["lastRecovery"] = {
        "id": "01JDQ6Z3V4K8M2N5P7R9S1T3W5",
        "outcome": "Failed",
        "message": "unexpected stop recovery timed out",
    }
    health = argocd_health(instance(status=status))
    assert health == {"status": "Degraded", "message": "RecoveryFailed: unexpected stop recovery timed out"}


def test_spec_that_fly_rejects_is_degraded() -> None:
    status = settled_status("Failed", fly_state="", ready=condition("Ready", "False", "InvalidSpec"))
    status["machineId"] = None
    status["conditions"][2] = condition(
        "Stalled", "True", "InvalidSpec", "invalid image: registry.fly.io/kiloclaw:nope not found"
    )
    health = argocd_health(instance(status=status))
    assert health["status"] == "Degraded"
    assert health["message"] == "InvalidSpec: invalid image: registry.fly.io/kiloclaw:nope not found"


def test_failed_phase_is_degraded_even_without_a_stalled_condition() -> None:
    status = settled_status(
        "Failed", fly_state="", ready=condition("Ready", "False", "FlyUnauthorized", "401")
    )
    status["conditions"] = [status["conditions"][0]]
    assert argocd_health(instance(status=status)) == {"status": "Degraded", "message": "FlyUnauthorized: 401"}


@pytest.mark.parametrize("phase", BUSY_PHASES)
def test_busy_phase_is_progressing(phase: str) -> None:
    status = settled_status(phase, fly_state="starting", ready=condition("Ready", "False", phase))
    status["conditions"] = [status["conditions"][0]]  # no Reconciling condition: the phase alone decides
    assert argocd_health(instance(status=status)) == {"status": "Progressing", "message": phase}


def test_recovery_in_flight_is_progressing_with_the_reconciling_reason() -> None:
    status = settled_status(
        "Recovering", fly_state="stopped", ready=condition("Ready", "False", "Recovering")
    )
    status["conditions"][1] = condition(
        "Reconciling", "True", "Recovering", "unexpected stop: relocating to a replacement volume"
    )
    status["recovery"] = {
        "id": "01JDQ6Z3V4K8M2N5P7R9S1T3W5",
        "startedAt": "2026-11-25T12:00:00Z",
        "deadline": "2026-11-25T12:10:00Z",
        "step": "ReplacementVolumeCreated",
    }
    assert argocd_health(instance(status=status)) == {
        "status": "Progressing",
        "message": "Recovering: unexpected stop: relocating to a replacement volume",
    }


def test_stop_requested_but_not_yet_stopped_is_progressing_not_suspended() -> None:
    status = settled_status("Stopping", fly_state="stopping", ready=condition("Ready", "False", "Stopping"))
    assert argocd_health(instance(state="Stopped", status=status))["status"] == "Progressing"


def test_machine_stopped_while_it_should_run_is_not_healthy() -> None:
    # Recovery disabled: the operator restarts it; Ready stays False meanwhile.
    status = settled_status(
        "Stopped", fly_state="stopped", ready=condition("Ready", "False", "MachineStopped")
    )
    assert argocd_health(instance(status=status))["status"] == "Progressing"


def test_argocd_cm_snippet_carries_the_health_script_verbatim() -> None:
    snippet = yaml.safe_load((DEPLOY_ARGOCD / "argocd-cm-snippet.yaml").read_text())
    assert snippet["kind"] == "ConfigMap"
    assert snippet["metadata"] == {
        "name": "argocd-cm",
        "namespace": "argocd",
        "labels": {"app.kubernetes.io/name": "argocd-cm", "app.kubernetes.io/part-of": "argocd"},
    }
    assert snippet["data"] == {ARGOCD_CM_KEY: HEALTH_LUA.read_text()}
