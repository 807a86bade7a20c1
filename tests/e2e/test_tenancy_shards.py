"""Two shards (the deploy/overlays/shard-b layout: two operator processes, disjoint KILOCLAW_NAMESPACES) never
both claim one ``(flyApp, sandboxId)`` (issue 17): each claim book sees only its own shard's watch events
after its first listing, so only the claim Lease, created atomically by the API server, can tell them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import processes
from flysim import FlySimulator
from harness import OperatorProcess, bind_app, eventually, operator_env
from kiloclaw_operator.fly.vocabulary import volume_name
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, VERSION
from kubesim import KubeSim

# Two operator processes: `make stories` (run by `make e2e`), not `make test`.
pytestmark = pytest.mark.slow

APP = "acct-shared"
SHARD_A = ("!tenants-b*", "kiloclaw-operator")
SHARD_B = ("tenants-b*", "kiloclaw-operator-shard-b")


@pytest.fixture
def shards(tmp_path: Path) -> Iterator[tuple[KubeSim, FlySimulator, list[OperatorProcess]]]:
    with processes.simulators() as (kube, fly):
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        started: list[OperatorProcess] = []
        try:
            for identity, (namespaces, lease) in (("shard-a", SHARD_A), ("shard-b", SHARD_B)):
                env = operator_env(
                    fly.base_url,
                    kubeconfig,
                    identity,
                    KILOCLAW_NAMESPACES=namespaces,
                    KILOCLAW_LEASE_NAME=lease,
                )
                started.append(OperatorProcess(env, tmp_path / f"{identity}.log").start())
            yield kube, fly, started
        finally:
            for process in started:
                process.terminate()


def phase_or_refusal(kube: KubeSim, namespace: str, name: str) -> str | None:
    body = kube.get_object(GROUP, VERSION, INSTANCE_PLURAL, namespace, name) or {}
    status: dict[str, Any] = body.get("status") or {}
    stalled = next((c for c in status.get("conditions") or [] if c["type"] == "Stalled"), {})
    if stalled.get("status") == "True":
        return str(stalled["reason"])
    return status.get("phase")


async def settled(kube: KubeSim, namespace: str, name: str, wanted: set[str], timeout: float = 30) -> str:
    async def check() -> str | None:
        found = phase_or_refusal(kube, namespace, name)
        return found if found in wanted else None

    return await eventually(check, timeout=timeout, what=f"{namespace}/{name} in {sorted(wanted)}")


@pytest.mark.xdist_group("operator-processes")
async def test_two_shards_never_both_provision_one_sandbox(
    shards: tuple[KubeSim, FlySimulator, list[OperatorProcess]],
) -> None:
    kube, fly, _ = shards
    for namespace in ("tenants-a", "tenants-b1"):
        bind_app(kube, namespace, APP)
    # Each shard claims something first: from then on its claim book sees only its own namespaces.
    processes.create_instance(kube, "tenants-a", "warm-a", APP, sandbox="ki_warm_a")
    processes.create_instance(kube, "tenants-b1", "warm-b", APP, sandbox="ki_warm_b")
    await settled(kube, "tenants-a", "warm-a", {"Running"})
    await settled(kube, "tenants-b1", "warm-b", {"Running"})

    processes.create_instance(kube, "tenants-a", "alice", APP, sandbox="ki_contested")
    await settled(kube, "tenants-a", "alice", {"Running"})
    processes.create_instance(kube, "tenants-b1", "mallory", APP, sandbox="ki_contested")
    assert await settled(kube, "tenants-b1", "mallory", {"DuplicateSandbox", "Running"}) == "DuplicateSandbox"

    contested = [
        m
        for m in fly.machines(APP)
        if m["state"] not in ("destroyed", "destroying")
        and (m.get("config") or {}).get("metadata", {}).get("kiloclaw_sandbox_id") == "ki_contested"
    ]
    assert len(contested) == 1
    volumes = [v for v in fly.volumes(APP) if v["name"] == volume_name("ki_contested")]
    assert len(volumes) == 1
