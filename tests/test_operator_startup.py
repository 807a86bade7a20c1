"""The operator as a deployment starts it: possibly before its CRDs exist."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from flysim import FlySimulator
from harness import CRDS, FLY_TOKEN, OperatorThread, eventually
from harness import test_settings as operator_settings
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, VERSION
from kubesim import KubeSim


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


async def test_operator_started_before_its_crds_serves_them_once_they_appear(
    empty_cluster: tuple[KubeSim, FlySimulator, Path],
) -> None:
    kube, fly, kubeconfig = empty_cluster
    operator = OperatorThread(operator_settings(fly.base_url))
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)  # read by kopf's login, which happens during start-up
    try:
        operator.start()
        await asyncio.to_thread(operator.wait_ready, 30)
    finally:
        if previous is not None:
            os.environ["KUBECONFIG"] = previous
    try:

        async def watching_crds() -> bool | None:
            seen = kube.rbac_verbs_by_agent.get("kopf", frozenset())
            return True if ("watch", "apiextensions.k8s.io", "customresourcedefinitions") in seen else None

        # The operator has found no resources of its own and watches for CRDs to appear.
        await eventually(watching_crds, timeout=15, what="the operator to watch CRDs")
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
    finally:
        await asyncio.to_thread(operator.stop, 60)
