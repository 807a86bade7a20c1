"""Metrics that are true (issue 10, item 7): object counts computed at scrape time, right after a restart; a
recoveries-in-flight gauge; a ``reason`` on failed recoveries; ``kiloclaw_build_info``."""

from __future__ import annotations

import platform
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from flysim import FlySimulator
from harness import Stack, eventually, status
from kiloclaw_operator import __version__
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, VERSION
from kubesim import KubeSim
from processes import (
    create_instance,
    free_port,
    operator_env,
    simulators,
    start_operator,
    stop,
    wait_for_metrics,
)
from test_recovery_e2e import (  # noqa: F401 (healthy_fly is an autouse fixture)
    APP,
    healthy_fly,
    replacement_machines_hang,
    running_instance,
    wait_failed,
    wait_step,
)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_build_info_names_the_version_and_python() -> None:
    info = {"version": __version__, "python": platform.python_version()}
    assert REGISTRY.get_sample_value("kiloclaw_build_info", info) == 1


async def test_recoveries_in_flight_counts_a_recovery_until_it_ends_and_a_failure_carries_its_reason(
    stack: Stack, namespace: str
) -> None:
    body = await running_instance(stack, namespace)
    before = sample("kiloclaw_recoveries_total", outcome="failed", reason="fly_rejected")
    # Every machine create is refused until this recovery failed: a single injected answer could be taken by
    # another story's recovery still running on the worker's shared stack.
    stack.fly.inject_faults(f"POST /v1/apps/{APP}/machines", 422, count=1000)
    stack.fly.set_latency(1.0, route=f"POST /v1/apps/{APP}/volumes")  # a recovery in flight for a while
    try:
        stack.fly.crash_machine(status(body)["machineId"])
        await wait_step(stack, namespace, "SourceMachineDestroyed")

        async def counted() -> bool | None:
            return True if sample("kiloclaw_recoveries_in_flight") >= 1 else None

        await eventually(counted, timeout=5, what="the recovery counted in flight")
        await wait_failed(stack, namespace)
    finally:
        stack.fly.clear_faults()
        stack.fly.clear_latency()
    assert sample("kiloclaw_recoveries_total", outcome="failed", reason="fly_rejected") >= before + 1

    async def none_in_flight() -> bool | None:
        instances = await stack.api.get(f"/apis/{GROUP}/{VERSION}/{INSTANCE_PLURAL}")
        recovering = sum(1 for i in instances.json()["items"] if status(i).get("recovery"))
        return True if sample("kiloclaw_recoveries_in_flight") == recovering else None

    await eventually(none_in_flight, timeout=10, what="the gauge agrees with the API server")


@pytest.fixture
def cluster() -> Iterator[tuple[KubeSim, FlySimulator]]:
    with simulators("metrics") as both:
        yield both


def operator_process(
    tmp_path: Path, kube: KubeSim, fly: FlySimulator, metrics_port: int, log_name: str
) -> subprocess.Popen[bytes]:
    env = operator_env(
        kube.write_kubeconfig(tmp_path / "kubeconfig"), fly.base_url, KILOCLAW_METRICS_PORT=str(metrics_port)
    )
    return start_operator(env, tmp_path / log_name)


@pytest.mark.slow  # operator processes
def test_instance_phases_are_counted_right_after_a_restart_without_any_status_change(
    tmp_path: Path, cluster: tuple[KubeSim, FlySimulator]
) -> None:
    kube, fly = cluster
    create_instance(kube, "metrics", "counted", "acct-metrics")
    port = free_port()
    first = operator_process(tmp_path, kube, fly, port, "first.log")
    try:
        wait_for_metrics(f"http://127.0.0.1:{port}/metrics", first, 'kiloclaw_instances{phase="Running"} 1.0')
    finally:
        stop(first, signal.SIGKILL)
    stored = kube.get_object(GROUP, VERSION, INSTANCE_PLURAL, "metrics", "counted")
    assert stored is not None
    version = stored["metadata"]["resourceVersion"]

    port = free_port()
    second = operator_process(tmp_path, kube, fly, port, "second.log")
    try:
        text = wait_for_metrics(
            f"http://127.0.0.1:{port}/metrics", second, 'kiloclaw_instances{phase="Running"} 1.0'
        )
        assert 'kiloclaw_instances{phase="Stopped"} 0.0' in text.splitlines()
        assert "kiloclaw_recoveries_in_flight 0.0" in text.splitlines()
        assert "kiloclaw_build_info{" in text
    finally:
        stop(second)
    # Counted from what the restarted operator read, not from a status write it made.
    stored = kube.get_object(GROUP, VERSION, INSTANCE_PLURAL, "metrics", "counted")
    assert stored is not None and stored["metadata"]["resourceVersion"] == version
