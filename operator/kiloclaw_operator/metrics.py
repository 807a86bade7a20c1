"""Prometheus metrics of the operator (DESIGN 4); the Fly request metrics live with the Fly client."""

from __future__ import annotations

import platform
import sys
from collections import Counter as TallyCounter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .models import Phase, RetainedPhase

#: What a per-machine read said about each reported unexpected stop (stops.py): recover, not_stopped (a
#: listing that was wrong or late), migrated, maybe_migrating, gone.
STOP_VERDICTS = Counter(
    "kiloclaw_stop_verdicts_total",
    "Reported unexpected stops by what the confirming read of the machine said",
    ["verdict"],
)
#: 1 while new recoveries are paused by the mass-failure brake (brake.py) until an admin re-arms it.
RECOVERY_BRAKE_ENGAGED = Gauge(
    "kiloclaw_recovery_brake_engaged",
    "1 while new recoveries are paused by the mass-failure brake (re-arm: kubectl kiloclaw rearm)",
)
RECOVERIES = Counter(
    "kiloclaw_recoveries_total",
    "Unexpected-stop recoveries by outcome; failures carry a reason (timeout, no_capacity, "
    "source_volume_missing, fly_rejected, not_found, ownership_mismatch, deleted, step_failed)",
    ["outcome", "reason"],
)
RECOVERY_DURATION = Histogram(
    "kiloclaw_recovery_duration_seconds",
    "Duration of unexpected-stop recoveries, from trigger to cutover or failure",
    buckets=(5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900),
)
BUILD_INFO = Info("kiloclaw_build", "The running operator's version and Python")
BUILD_INFO.info({"version": __version__, "python": platform.python_version()})

#: What the objects collector counts of one instance: its phase, its Stalled=True reason (if any), and
#: whether a recovery is in flight. Kept by each driver when a body arrives, so that a scrape reads a few
#: shared strings per object instead of decoding every body (10,000 bodies, ~50 MB of dicts, per scrape).
InstanceTally = tuple[str, str | None, bool]
#: Of one retained volume: its phase.
RetainedTally = tuple[str]
Tallies = Callable[[], Iterable[tuple[Any, ...]]]


def instance_tally(body: Mapping[str, Any]) -> InstanceTally:
    status = body.get("status") or {}
    reason = next(
        (
            c.get("reason")
            for c in status.get("conditions") or []
            if c.get("type") == "Stalled" and c.get("status") == "True"
        ),
        None,
    )
    return (
        sys.intern(str(status.get("phase") or Phase.PENDING.value)),
        sys.intern(str(reason)) if reason else None,
        bool(status.get("recovery")),
    )


def retained_tally(body: Mapping[str, Any]) -> RetainedTally:
    return (sys.intern(str((body.get("status") or {}).get("phase") or RetainedPhase.RETAINED.value)),)


def _nothing() -> Iterable[tuple[Any, ...]]:
    return ()


class ObjectsCollector(Collector):
    """Counts the objects the operator knows, by phase (and stalled reason, and recoveries in flight), at
    scrape time from what its drivers keep of their newest bodies (``instance_tally``): true right after a
    restart, never drifting, and gone with the object. A running operator attaches its driver registries; a
    standby attaches nothing."""

    def __init__(self) -> None:
        # The most recently attached running operator counts; more than one exists only in tests that run
        # operators in one process, and one stopping must not blank out another.
        self._sources: list[tuple[object, Tallies, Tallies]] = []

    def attach(self, owner: object, instances: Tallies, retained: Tallies) -> None:
        self._sources.append((owner, instances, retained))

    def detach(self, owner: object) -> None:
        self._sources = [source for source in self._sources if source[0] is not owner]

    def describe(self) -> Iterable[Metric]:
        return self._families(_nothing, _nothing)

    def collect(self) -> Iterable[Metric]:
        sources = self._sources
        if not sources:
            return self._families(_nothing, _nothing)
        _, instances, retained = sources[-1]
        return self._families(instances, retained)

    @staticmethod
    def _families(instances: Tallies, retained: Tallies) -> list[Metric]:
        phases: TallyCounter[str] = TallyCounter({p.value: 0 for p in Phase})
        stalled: TallyCounter[str] = TallyCounter()
        in_flight = 0
        for phase, reason, recovering in instances():
            phases[phase] += 1
            if reason:
                stalled[reason] += 1
            if recovering:
                in_flight += 1
        retained_phases: TallyCounter[str] = TallyCounter({p.value: 0 for p in RetainedPhase})
        for (retained_phase,) in retained():
            retained_phases[retained_phase] += 1

        by_phase = GaugeMetricFamily("kiloclaw_instances", "KiloClawInstances by phase", labels=["phase"])
        for phase, count in sorted(phases.items()):
            by_phase.add_metric([phase], count)
        by_reason = GaugeMetricFamily(
            "kiloclaw_instances_stalled",
            "KiloClawInstances with Stalled=True, by the condition's reason",
            labels=["reason"],
        )
        for reason, count in sorted(stalled.items()):
            by_reason.add_metric([reason], count)
        recovering = GaugeMetricFamily(
            "kiloclaw_recoveries_in_flight", "Unexpected-stop recoveries begun and not yet finished"
        )
        recovering.add_metric([], in_flight)
        kept = GaugeMetricFamily(
            "kiloclaw_retained_volumes", "KiloClawRetainedVolumes by phase", labels=["phase"]
        )
        for phase, count in sorted(retained_phases.items()):
            kept.add_metric([phase], count)
        return [by_phase, by_reason, recovering, kept]


OBJECTS = ObjectsCollector()
REGISTRY.register(OBJECTS)

PASSES_IN_FLIGHT = Gauge(
    "kiloclaw_passes_in_flight",
    "Passes begun and not yet finished, by kind (each holds its object's model: a new leader's first passes "
    "wait for the organisation feed's first listing before they begin)",
    ["kind"],
)
EVENT_LOOP_LAG = Gauge(
    "kiloclaw_event_loop_lag_max_seconds",
    "Longest delay of the operator's event loop behind a scheduled heartbeat since the process started",
)
LEADER = Gauge("kiloclaw_leader", "1 while this replica holds the leader Lease and runs the operator")
