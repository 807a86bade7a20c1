"""The mass-failure brake's thresholds (brake.py): when it engages, that it stays engaged until released, and
that a released brake arms itself again once a window passes quietly."""

from __future__ import annotations

from typing import Any

from kiloclaw_operator.brake import ARMED, ENGAGED, RELEASED, RecoveryBrake
from kiloclaw_operator.config import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def brake(instances: int, clock: Clock, **settings: object) -> RecoveryBrake:
    values = {"fly_api_token": "t", "brake_window_seconds": 100, "brake_pause_stops": 5, **settings}
    return RecoveryBrake(Settings(**values), None, "kiloclaw-system", lambda: instances, monotonic=clock)  # type: ignore[arg-type]


async def test_the_brake_engages_past_the_number_of_stops_within_the_window() -> None:
    clock = Clock()
    subject = brake(10, clock)
    assert [await subject.admit(None) for _ in range(5)] == [None] * 5
    paused = await subject.admit(None)
    assert (
        paused is not None and "6 confirmed unexpected stops" in paused and "kubectl kiloclaw rearm" in paused
    )
    assert subject.state == ENGAGED
    clock.now += 1000  # engaged stays engaged: only a person releases it
    assert await subject.admit(None) is not None


async def test_stops_spread_over_more_than_the_window_never_engage_it() -> None:
    clock = Clock()
    subject = brake(10, clock)
    for _ in range(20):
        assert await subject.admit(None) is None
        clock.now += 30
    assert subject.state == ARMED


async def test_with_enough_instances_a_share_of_them_engages_it_earlier() -> None:
    clock = Clock()
    subject = brake(100, clock, brake_pause_share=0.02, brake_min_instances=50)
    assert subject.threshold() == 2
    assert [await subject.admit(None) for _ in range(2)] == [None, None]
    assert await subject.admit(None) is not None
    small = brake(10, Clock(), brake_pause_share=0.02, brake_min_instances=50)
    assert small.threshold() == 5  # below the minimum fleet the share does not apply


async def test_a_released_brake_lets_recoveries_through_and_arms_again_after_a_quiet_window() -> None:
    clock = Clock()
    subject = brake(10, clock)
    for _ in range(6):
        await subject.admit(None)
    subject.state = RELEASED  # what the Lease read does after `kubectl kiloclaw rearm`
    assert [await subject.admit(None) for _ in range(10)] == [None] * 10
    clock.now += 200
    assert await subject.admit(None) is None
    assert subject.state == ARMED


async def test_many_reported_stops_engage_it_even_when_the_reads_refute_them() -> None:
    """A listing that lies: the reads protect every machine, the brake tells a person."""
    clock = Clock()
    subject = brake(10, clock)
    for _ in range(5):
        await subject.note_reported()
    assert subject.state == ARMED
    await subject.note_reported()
    assert subject.state == ENGAGED and "6 reported unexpected stops" in subject.reason
    assert await subject.admit(None) is not None  # a real stop meanwhile waits for a person


async def test_recoveries_begin_at_once_up_to_the_burst_then_at_the_paced_rate(monkeypatch: Any) -> None:
    clock = Clock()
    subject = brake(10, clock, recovery_begin_rate=10, recovery_begin_burst=4)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(round(seconds, 6))

    monkeypatch.setattr("kiloclaw_operator.brake.asyncio.sleep", sleep)
    for _ in range(6):
        await subject.paced_begin()
    assert waits == [0.1, 0.2], "four at once, then one every 1/rate seconds"
    clock.now += 10  # a quiet while refills the bucket: the next burst begins at once again
    waits.clear()
    for _ in range(4):
        await subject.paced_begin()
    assert waits == []
