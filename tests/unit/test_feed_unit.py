"""Pure parts of the organisation feed: where a restarted operator resumes, which instances go first."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from builders import instance_body
from kiloclaw_operator.observe.feed import (
    ListedInstance,
    MachineState,
    changed_while_away,
    oldest_observation,
)

OBSERVED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def body(name: str, machine_id: str | None, fly_state: str = "started", observed: datetime = OBSERVED) -> Any:
    status: dict[str, Any] = {"phase": "Running", "flyState": fly_state, "observedAt": observed.isoformat()}
    if machine_id is not None:
        status["machineId"] = machine_id
    return instance_body(name, "ns", status=status)


def listed(*bodies: dict[str, Any]) -> list[ListedInstance]:
    return [record for record in map(ListedInstance.of, bodies) if record is not None]


def names(refs: list[tuple[str, str]]) -> list[str]:
    return [name for _, name in refs]


def test_an_instance_whose_machine_stopped_after_its_observation_is_taken_first() -> None:
    latest = {"m1": MachineState("stopped", OBSERVED + timedelta(seconds=5))}
    assert names(changed_while_away(listed(body("a", "m1")), latest, 0.0)) == ["a"]


def test_a_machine_in_the_recorded_state_is_not_a_change() -> None:
    latest = {"m1": MachineState("started", OBSERVED + timedelta(seconds=5))}
    assert changed_while_away(listed(body("a", "m1")), latest, 0.0) == []


def test_a_state_older_than_the_observation_is_not_a_change() -> None:
    latest = {"m1": MachineState("stopped", OBSERVED - timedelta(seconds=5))}
    assert changed_while_away(listed(body("a", "m1")), latest, 0.0) == []


def test_the_observation_is_compared_in_flys_clock() -> None:
    # Fly's clock runs an hour behind ours: a change 5 s after our observation carries Fly's earlier stamp.
    latest = {"m1": MachineState("stopped", OBSERVED - timedelta(hours=1) + timedelta(seconds=5))}
    assert names(changed_while_away(listed(body("a", "m1")), latest, -3600.0)) == ["a"]
    assert changed_while_away(listed(body("a", "m1")), latest, 0.0) == []


def test_instances_without_a_machine_or_unknown_to_the_feed_are_left_to_kopf() -> None:
    latest = {"m1": MachineState("stopped", OBSERVED + timedelta(seconds=5))}
    assert changed_while_away(listed(body("a", None), body("b", "m2")), latest, 0.0) == []


def test_the_feed_resumes_from_the_oldest_observation_of_an_instance_with_a_machine() -> None:
    earlier = OBSERVED - timedelta(minutes=3)
    bodies = [
        body("a", "m1"),
        body("b", "m2", observed=earlier),
        body("c", None, observed=earlier - timedelta(1)),
    ]
    assert oldest_observation(listed(*bodies)) == earlier
    assert oldest_observation(listed(body("c", None))) is None


def test_an_instance_without_a_readable_observation_is_not_listed() -> None:
    unreadable = body("a", "m1")
    unreadable["status"]["observedAt"] = "yesterday"
    assert listed(unreadable) == []
    assert listed({"metadata": {"name": "b"}}) == []


def test_a_different_state_with_the_same_whole_second_updated_at_is_news_marked_ambiguous() -> None:
    from kiloclaw_operator.config import Settings
    from kiloclaw_operator.observe.feed import FeedObserver

    feed = FeedObserver(
        None,  # type: ignore[arg-type]  # no Fly call in this test
        Settings(fly_org_slug="kilo", fly_api_token="t"),
        instance_pages=lambda: None,  # type: ignore[arg-type,return-value]
    )
    assert feed._remember("m1", MachineState("starting", OBSERVED))
    assert not feed._remember("m1", MachineState("starting", OBSERVED))
    assert feed._remember("m1", MachineState("started", OBSERVED))
    known = feed.known("m1")
    assert known is not None and (known.state, known.ambiguous) == ("started", True)
    assert not feed._remember("m1", MachineState("stopped", OBSERVED - timedelta(seconds=1)))
    assert feed._remember("m1", MachineState("stopped", OBSERVED + timedelta(seconds=1)))
    assert not feed.known("m1").ambiguous  # type: ignore[union-attr]
