"""The operator as a deployment starts it (its own process, configured by the environment), possibly before
its CRDs exist."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flysim import FlySimulator
from harness import CRDS, FLY_TOKEN, eventually
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, VERSION
from kubesim import KubeSim


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def empty_cluster(tmp_path: Path) -> Iterator[tuple[KubeSim, FlySimulator, Path]]:
    kube, fly = KubeSim(), FlySimulator(token=FLY_TOKEN)
    kube.start_in_thread()
    fly.start_in_thread()
    try:
        yield kube, fly, kube.write_kubeconfig(tmp_path / "kubeconfig")
    finally:
        kube.stop_thread()
        fly.stop_thread()


@pytest.fixture
def operator_process(
    empty_cluster: tuple[KubeSim, FlySimulator, Path], tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    _, fly, kubeconfig = empty_cluster
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "FLY_API_TOKEN": FLY_TOKEN,
        "FLY_API_BASE_URL": fly.base_url,
        "KILOCLAW_POLL_BUSY_SECONDS": "0.2",
        "KILOCLAW_POLL_RUNNING_SECONDS": "0.5",
        "KILOCLAW_METRICS_PORT": str(free_port()),
        "KILOCLAW_HEALTH_PORT": str(free_port()),
    }
    with (tmp_path / "operator.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kiloclaw_operator", "run"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def test_operator_started_before_its_crds_serves_them_once_they_appear(
    empty_cluster: tuple[KubeSim, FlySimulator, Path], operator_process: subprocess.Popen[bytes]
) -> None:
    kube, _, _ = empty_cluster

    async def watching_crds() -> bool | None:
        assert operator_process.poll() is None, "the operator exited"
        seen = kube.rbac_verbs_by_agent.get("kopf", frozenset())
        return True if ("watch", "apiextensions.k8s.io", "customresourcedefinitions") in seen else None

    # The operator has found no resources of its own and watches for CRDs to appear.
    await eventually(watching_crds, timeout=30, what="the operator to watch CRDs")
    # As with `kubectl apply -k deploy/`: the CRDs may be established after the operator is up.
    kube.load_crds([CRDS])
    kube.create_namespace("late")
    kube.create_object(
        GROUP,
        VERSION,
        INSTANCE_PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "KiloClawInstance",
            "metadata": {"name": "early-bird", "namespace": "late"},
            "spec": {"sandboxId": "ki_early", "userId": "u", "flyApp": "acct-late", "image": "img:1"},
        },
        namespace="late",
    )

    async def running() -> bool | None:
        body = kube.get_object(GROUP, VERSION, INSTANCE_PLURAL, "late", "early-bird") or {}
        return True if (body.get("status") or {}).get("phase") == "Running" else None

    await eventually(running, timeout=30, what="the late CRD's instance to run")
