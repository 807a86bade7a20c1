"""The pure parts of the unexpected-stop recovery (DESIGN 3.3): region order, recovery ids, retained names,
and the trigger as the decision core sees it."""

from __future__ import annotations

import random
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import builders
from kiloclaw_operator import lifecycle
from kiloclaw_operator.fly.vocabulary import TRANSIENT_MACHINE_STATES
from kiloclaw_operator.lifecycle import Action, Observation
from kiloclaw_operator.models import Instance, Phase
from kiloclaw_operator.recovery import (
    new_recovery_id,
    replacement_regions,
    resumed_deadline,
    retained_volume_name,
)

_ULID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# --- replacement_regions ------------------------------------------------------------------------------


def test_with_three_or_more_regions_the_source_region_is_not_a_candidate() -> None:
    for seed in range(50):
        order = replacement_regions(["iad", "ord", "cdg", "ams"], "iad", random.Random(seed))
        assert sorted(order) == ["ams", "cdg", "ord"]


def test_with_two_regions_the_source_region_is_tried_last() -> None:
    for seed in range(20):
        assert replacement_regions(["iad", "ord"], "iad", random.Random(seed)) == ["ord", "iad"]
        assert replacement_regions(["iad", "ord"], "ord", random.Random(seed)) == ["iad", "ord"]


def test_a_single_region_that_is_the_source_is_still_tried() -> None:
    assert replacement_regions(["iad"], "iad", random.Random(1)) == ["iad"]


def test_a_source_region_outside_the_list_leaves_every_configured_region_a_candidate() -> None:
    assert sorted(replacement_regions(["ord", "cdg"], "iad", random.Random(3))) == ["cdg", "ord"]


def test_duplicate_regions_are_tried_once() -> None:
    order = replacement_regions(["iad", "ord", "ord", "cdg", "cdg"], "iad", random.Random(4))
    assert sorted(order) == ["cdg", "ord"]


def test_candidate_regions_are_shuffled_so_recoveries_spread_over_regions() -> None:
    regions = ["iad", "ord", "cdg", "ams", "sjc"]
    orders = {tuple(replacement_regions(regions, "iad", random.Random(seed))) for seed in range(60)}
    assert len(orders) > 5
    assert {order[0] for order in orders} == {"ord", "cdg", "ams", "sjc"}


def test_replacement_regions_never_changes_the_callers_list() -> None:
    regions = ["iad", "ord", "cdg"]
    replacement_regions(regions, "iad", random.Random(5))
    assert regions == ["iad", "ord", "cdg"]


# --- recovery ids ---------------------------------------------------------------------------------------


def _ulid_millis(value: str) -> int:
    number = 0
    for char in value[:10]:
        number = number * 32 + _CROCKFORD.index(char)
    return number


def test_a_recovery_id_is_a_ulid_carrying_its_start_time() -> None:
    before = int(time.time() * 1000)
    value = new_recovery_id()
    after = int(time.time() * 1000)
    assert _ULID.match(value), value
    assert before <= _ulid_millis(value) <= after


def test_recovery_ids_are_unique() -> None:
    ids = {new_recovery_id() for _ in range(5000)}
    assert len(ids) == 5000


def test_recovery_ids_sort_by_start_time() -> None:
    earlier = new_recovery_id()
    start = int(time.time() * 1000)
    while int(time.time() * 1000) == start:  # the next millisecond, without a fixed sleep
        pass
    later = new_recovery_id()
    assert earlier < later
    assert sorted([later, earlier]) == [earlier, later]


# --- retained volume names ------------------------------------------------------------------------------


def test_a_retained_volume_is_named_after_its_instance_and_volume() -> None:
    assert retained_volume_name("alice", "vol_5XK2abcdefgh1234") == "alice-vol-5xk2abcd"


def test_retained_volume_names_of_different_volumes_differ() -> None:
    assert retained_volume_name("alice", "vol_aaaaaaaa0000") != retained_volume_name(
        "alice", "vol_bbbbbbbb0000"
    )


@pytest.mark.parametrize(
    ("instance_name", "volume_id"),
    [
        ("a" * 63, "vol_0123456789abcdef"),
        ("a." * 31 + "b", "vol_0123456789abcdef"),
        ("alice", "vol_ab_cd-.EF"),
        ("alice", "vol_"),
        ("alice", "vol_........"),
    ],
)
def test_a_retained_volume_name_is_a_valid_kubernetes_name_for_every_admissible_instance_name(
    instance_name: str, volume_id: str
) -> None:
    name = retained_volume_name(instance_name, volume_id)
    assert len(name) <= 253
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name)


# --- the trigger, as the decision core sees it ----------------------------------------------------------


def _instance(
    phase: str = "Running", *, state: str = "Running", recovery: bool = True, **status: Any
) -> Instance:
    recorded = {"phase": phase, "observedGeneration": 1, "machineId": "m1", "volumeId": "vol_1"}
    return builders.instance(
        status={**recorded, "region": "iad", **status}, state=state, recovery={"enabled": recovery}
    )


def test_a_running_instance_whose_machine_stopped_begins_a_recovery() -> None:
    decision = lifecycle.decide(_instance(), Observation.found("stopped"))
    assert decision.action is Action.BEGIN_RECOVERY


@pytest.mark.parametrize("state", sorted(TRANSIENT_MACHINE_STATES | {"started", "suspended"}))
def test_created_and_transient_fly_states_never_trigger_a_recovery(state: str) -> None:
    decision = lifecycle.decide(_instance(), Observation.found(state))
    assert decision.action is not Action.BEGIN_RECOVERY


def test_a_transient_api_error_never_triggers_a_recovery() -> None:
    decision = lifecycle.decide(_instance(), Observation.unknown("GET machine 503"))
    assert decision.action is Action.NOTHING


def test_a_failed_machine_settles_in_stopped_without_recovery() -> None:
    decision = lifecycle.decide(_instance(), Observation.found("failed"))
    assert (decision.action, decision.phase) == (Action.SETTLE, Phase.STOPPED)


def test_a_stopped_machine_does_not_trigger_when_recovery_is_disabled_or_the_user_wants_it_stopped() -> None:
    for instance in (_instance(recovery=False), _instance(state="Stopped")):
        decision = lifecycle.decide(instance, Observation.found("stopped"))
        assert decision.action is not Action.BEGIN_RECOVERY


def test_a_stopped_machine_seen_again_while_recovering_resumes_the_same_recovery() -> None:
    recovering = _instance("Recovering")
    assert lifecycle.decide(recovering, Observation.found("stopped")).action is Action.RESUME_RECOVERY


@pytest.mark.parametrize("phase", ["Starting", "Stopping", "Stopped", "Provisioning", "Failed", "Pending"])
def test_a_stopped_machine_outside_running_never_triggers_a_recovery(phase: str) -> None:
    decision = lifecycle.decide(_instance(phase), Observation.found("stopped"))
    assert decision.action is not Action.BEGIN_RECOVERY


# --- the deadline of a resumed recovery (issue 10: downtime is not the recovery's fault) ------------------

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_a_recovery_resumed_with_more_than_half_its_budget_left_keeps_its_deadline() -> None:
    deadline = T0 + timedelta(seconds=500)
    assert resumed_deadline(deadline, T0, 600) == deadline


def test_a_recovery_resumed_past_its_deadline_gets_half_the_timeout_from_now() -> None:
    assert resumed_deadline(T0 - timedelta(hours=2), T0, 600) == T0 + timedelta(seconds=300)


def test_a_recovery_resumed_with_little_budget_left_gets_half_the_timeout_from_now() -> None:
    assert resumed_deadline(T0 + timedelta(seconds=10), T0, 600) == T0 + timedelta(seconds=300)


def test_a_recovery_that_had_its_fresh_budgets_keeps_its_deadline_even_when_past() -> None:
    deadline = T0 - timedelta(hours=2)
    assert resumed_deadline(deadline, T0, 600, resumptions=2) == T0 + timedelta(seconds=300)
    assert resumed_deadline(deadline, T0, 600, resumptions=3) == deadline
