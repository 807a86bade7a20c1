"""Who owns a (flyApp, sandboxId) when several instances name it (DESIGN 3.6): one row per rule."""

from __future__ import annotations

from typing import Any

from builders import instance_body
from kiloclaw_operator.models import Instance
from kiloclaw_operator.ownership import Owner, claim_owner, has_claim


def body(
    name: str,
    created: str,
    uid: str,
    *,
    status: dict[str, Any] | None = None,
    deleting: bool = False,
    **spec: Any,
) -> dict[str, Any]:
    """An instance in namespace ns naming the sandbox every instance here shares (unless ``spec`` says)."""
    meta: dict[str, Any] = {"uid": uid, "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-01T12:00:00Z"
    shared = {"sandboxId": "ki_same", "flyApp": "acct-a", **spec}
    return instance_body(name, "ns", metadata=meta, status=status or {}, **shared)


def owner_for(me: dict[str, Any], *others: dict[str, Any]) -> Owner | None:
    return claim_owner(Instance.from_body(me), [me, *others])


T1, T2 = "2026-12-01T10:00:00Z", "2026-12-01T10:00:05Z"


def test_an_instance_alone_owns_its_sandbox() -> None:
    assert owner_for(body("a", T1, "u1")) is None


def test_the_older_of_two_new_instances_owns_the_sandbox() -> None:
    older, younger = body("a", T1, "u1"), body("b", T2, "u2")
    assert owner_for(younger, older) == Owner("ns", "a")
    assert owner_for(older, younger) is None


def test_created_in_the_same_second_the_smaller_uid_wins() -> None:
    first, second = body("a", T1, "u1"), body("b", T1, "u2")
    assert owner_for(second, first) == Owner("ns", "a")
    assert owner_for(first, second) is None


def test_a_claimant_wins_over_an_older_instance_without_a_claim() -> None:
    older = body("a", T1, "u1")
    claimant = body("b", T2, "u2", status={"phase": "Running", "volumeId": "vol_1"})
    assert owner_for(older, claimant) == Owner("ns", "b")


def test_a_claimant_being_deleted_still_owns_its_sandbox_until_it_is_gone() -> None:
    leaving = body("a", T1, "u1", status={"phase": "Destroying", "volumeId": "vol_1"}, deleting=True)
    assert owner_for(body("b", T2, "u2"), leaving) == Owner("ns", "a")


def test_an_unclaimed_instance_being_deleted_claims_nothing() -> None:
    leaving = body("a", T1, "u1", status={"phase": "Destroying"}, deleting=True)
    assert owner_for(body("b", T2, "u2"), leaving) is None


def test_another_app_or_sandbox_is_no_rival() -> None:
    me = body("b", T2, "u2")
    assert owner_for(me, body("a", T1, "u1", flyApp="acct-other")) is None
    assert owner_for(me, body("c", T1, "u3", sandboxId="ki_other")) is None


def test_an_instance_in_another_namespace_is_a_rival_too() -> None:
    other = body("a", T1, "u1", status={"phase": "Running"})
    other["metadata"]["namespace"] = "elsewhere"
    assert owner_for(body("b", T2, "u2"), other) == Owner("elsewhere", "a")


def test_a_recorded_phase_or_fly_id_is_a_claim_and_pending_is_not() -> None:
    assert not has_claim(Instance.from_body(body("a", T1, "u1")).status)
    assert has_claim(Instance.from_body(body("a", T1, "u1", status={"phase": "Provisioning"})).status)
    assert has_claim(
        Instance.from_body(body("a", T1, "u1", status={"phase": "Destroying", "machineId": "m"})).status
    )
