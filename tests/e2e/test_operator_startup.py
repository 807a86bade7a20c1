"""The operator as a deployment starts it (its own process, configured by the environment), possibly before
its CRDs exist."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flysim import FlySimulator
from harness import CRDS, eventually
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, VERSION
from kubesim import KubeSim
from processes import create_instance, operator_env, simulators, start_operator, stop

# An operator process: `make stories` (run by `make e2e`), not `make test`.
pytestmark = pytest.mark.slow


@pytest.fixture
def empty_cluster(tmp_path: Path) -> Iterator[tuple[KubeSim, FlySimulator, Path]]:
    with simulators(crds=False) as (kube, fly):
        yield kube, fly, kube.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def operator_process(
    empty_cluster: tuple[KubeSim, FlySimulator, Path], tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    _, fly, kubeconfig = empty_cluster
    process = start_operator(operator_env(kubeconfig, fly.base_url), tmp_path / "operator.log")
    try:
        yield process
    finally:
        stop(process)


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
    create_instance(kube, "late", "early-bird", "acct-late")

    async def running() -> bool | None:
        body = kube.get_object(GROUP, VERSION, INSTANCE_PLURAL, "late", "early-bird") or {}
        return True if (body.get("status") or {}).get("phase") == "Running" else None

    await eventually(running, timeout=30, what="the late CRD's instance to run")
