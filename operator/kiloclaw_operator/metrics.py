"""Prometheus metrics of the operator (DESIGN 4); the Fly request metrics live with the Fly client."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

RECOVERIES = Counter("kiloclaw_recoveries_total", "Unexpected-stop recoveries by outcome", ["outcome"])
RECOVERY_DURATION = Histogram(
    "kiloclaw_recovery_duration_seconds",
    "Duration of unexpected-stop recoveries, from trigger to cutover or failure",
    buckets=(5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900),
)
INSTANCES = Gauge("kiloclaw_instances", "KiloClawInstances by phase", ["phase"])
RETAINED_VOLUMES = Gauge("kiloclaw_retained_volumes", "KiloClawRetainedVolumes by phase", ["phase"])
INSTANCES_STALLED = Gauge(
    "kiloclaw_instances_stalled", "KiloClawInstances with Stalled=True, by the condition's reason", ["reason"]
)


class PhaseCounter:
    """Keeps one phase per object and publishes the counts as a gauge, so the gauge never drifts."""

    def __init__(self, gauge: Gauge, label: str = "phase") -> None:
        self._gauge = gauge
        self._label = label
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()

    def set(self, uid: str, phase: str) -> None:
        with self._lock:
            previous = self._phases.get(uid)
            if previous == phase:
                return
            self._phases[uid] = phase
            if previous is not None:
                self._gauge.labels(**{self._label: previous}).dec()
            self._gauge.labels(**{self._label: phase}).inc()

    def forget(self, uid: str) -> None:
        with self._lock:
            previous = self._phases.pop(uid, None)
            if previous is not None:
                self._gauge.labels(**{self._label: previous}).dec()


INSTANCE_PHASES = PhaseCounter(INSTANCES)
RETAINED_PHASES = PhaseCounter(RETAINED_VOLUMES)
# Stalled instances by reason (RecoveryFailed, InvalidSpec, FlyUnauthorized, DuplicateSandbox...): the alerts'
# "needs a person" signal; a Failed phase is always Stalled too.
STALLED_REASONS = PhaseCounter(INSTANCES_STALLED, label="reason")

LEADER = Gauge("kiloclaw_leader", "1 while this replica holds the leader Lease and runs the operator")
