"""The operator-side tenancy checks, each on its own: verify before destroy (over HTTP to flysim), the
namespace ↔ Fly app binding, claim names, volume and machine names (kiloclaw_operator, no Kubernetes)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from builders import instance_spec
from flysim import FlySimulator
from kiloclaw_operator.fly import FlyClient
from kiloclaw_operator.fly.models import Guest, MachineConfig, Mount, RestartPolicy
from kiloclaw_operator.kube import KubeError
from kiloclaw_operator.models import InstanceSpec
from kiloclaw_operator.tenancy import (
    FLY_APPS_ANNOTATION,
    IMAGE_REPOSITORIES_ANNOTATION,
    NamespaceBindings,
    binding_refusal,
    claim_name,
    image_allowed,
)
from kiloclaw_operator.volumes import MachineNotProven, destroy_recorded_machine

APP = "acct-a"


def config(volume_id: str, sandbox_id: str | None) -> MachineConfig:
    return MachineConfig(
        image="registry.fly.io/kc:1",
        guest=Guest(cpu_kind="shared", cpus=1, memory_mb=256),
        mounts=[Mount(volume=volume_id, path="/root")],
        restart=RestartPolicy(policy="no"),
        metadata={"kiloclaw_sandbox_id": sandbox_id} if sandbox_id else {},
    )


async def machine_on_new_volume(fly: FlyClient, sandbox_id: str | None) -> tuple[str, str]:
    volume = await fly.create_volume(APP, name="kiloclaw_v", region="iad", size_gb=1)
    machine = await fly.create_machine(APP, name="m", region="iad", config=config(volume.id, sandbox_id))
    return machine.id, volume.id


def alive(sim: FlySimulator, machine_id: str) -> bool:
    return sim.machine(machine_id)["state"] not in ("destroyed", "destroying")


# --- verify before destroy -------------------------------------------------------------------------------


async def test_a_recorded_machine_with_our_sandbox_and_a_mount_of_the_recorded_volume_is_destroyed(
    sim: FlySimulator, fly: FlyClient
) -> None:
    machine_id, volume_id = await machine_on_new_volume(fly, "ki_ours")
    await destroy_recorded_machine(
        fly, APP, machine_id, sandbox_id="ki_ours", volume_id=volume_id, wait_seconds=5
    )
    assert not alive(sim, machine_id)


@pytest.mark.parametrize("found", ["ki_someone_else", None], ids=["other-sandbox", "no-metadata"])
async def test_a_recorded_machine_of_another_sandbox_is_refused_and_nothing_is_destroyed(
    sim: FlySimulator, fly: FlyClient, found: str | None
) -> None:
    machine_id, volume_id = await machine_on_new_volume(fly, found)
    with pytest.raises(MachineNotProven) as refused:
        await destroy_recorded_machine(
            fly, APP, machine_id, sandbox_id="ki_ours", volume_id=volume_id, wait_seconds=5
        )
    assert alive(sim, machine_id)
    assert str(refused.value) == (
        f"refusing to destroy machine {machine_id} recorded in status: it is not a machine of sandbox "
        "ki_ours; nothing was destroyed"
    )
    assert "ki_someone_else" not in str(refused.value)
    assert not [r for r in sim.request_log if r.method == "DELETE"]


async def test_a_recorded_machine_with_our_sandbox_that_mounts_another_volume_is_refused(
    sim: FlySimulator, fly: FlyClient
) -> None:
    machine_id, _ = await machine_on_new_volume(fly, "ki_ours")
    recorded = (await fly.create_volume(APP, name="kiloclaw_w", region="iad", size_gb=1)).id
    for volume_id in (recorded, None):
        with pytest.raises(MachineNotProven, match="does not mount the recorded volume"):
            await destroy_recorded_machine(
                fly, APP, machine_id, sandbox_id="ki_ours", volume_id=volume_id, wait_seconds=5
            )
    assert alive(sim, machine_id)


async def test_a_recorded_machine_that_is_gone_counts_as_destroyed(sim: FlySimulator, fly: FlyClient) -> None:
    await destroy_recorded_machine(
        fly, APP, "d8e7f0000000001", sandbox_id="ki_ours", volume_id="vol_x", wait_seconds=5
    )


# --- the namespace binding (the rule the admission policy states too) -------------------------------------


def spec(app: str = "acct-a", image: str = "registry.fly.io/kiloclaw:1") -> InstanceSpec:
    return instance_spec(flyApp=app, image=image)


BOUND = {FLY_APPS_ANNOTATION: "acct-a, acct-b", IMAGE_REPOSITORIES_ANNOTATION: "registry.fly.io/kiloclaw"}


def test_an_app_bound_to_the_namespace_with_an_image_of_a_bound_repository_is_allowed() -> None:
    assert binding_refusal("tenants", BOUND, spec()) is None
    assert (
        binding_refusal("tenants", BOUND, spec(app="acct-b", image="registry.fly.io/kiloclaw@sha256:ab"))
        is None
    )


@pytest.mark.parametrize(
    "annotations", [BOUND, {}, {FLY_APPS_ANNOTATION: ""}], ids=["other", "none", "empty"]
)
def test_an_app_not_bound_to_the_namespace_is_refused_naming_only_the_namespaces_own_input(
    annotations: dict[str, str],
) -> None:
    refusal = binding_refusal("tenants", annotations, spec(app="acct-victim"))
    assert refusal is not None and refusal.reason == "AppNotAllowed"
    assert refusal.message.startswith("Fly app acct-victim is not bound to namespace tenants")
    assert "acct-a" not in refusal.message


@pytest.mark.parametrize(
    "image",
    [
        "docker.io/mallory/miner:1",
        "registry.fly.io/kiloclaw-evil:1",  # a longer name is another repository
        "registry.fly.io/kiloclawx",
        "registry.fly.io/other:1",
    ],
)
def test_an_image_outside_the_bound_repositories_is_refused(image: str) -> None:
    refusal = binding_refusal("tenants", BOUND, spec(image=image))
    assert refusal is not None and refusal.reason == "ImageNotAllowed"
    assert binding_refusal("tenants", BOUND, spec(image=image), check_image=False) is None


def test_a_repository_entry_ending_in_a_slash_binds_every_repository_under_it() -> None:
    assert image_allowed("registry.example.com/team/a:1", ["registry.example.com/team/"])
    assert image_allowed("registry.example.com/team/sub/b@sha256:00", ["registry.example.com/team/"])
    assert not image_allowed("registry.example.com/team/", ["registry.example.com/team/"])
    assert not image_allowed("registry.example.com/teamx/a:1", ["registry.example.com/team/"])


async def test_the_binding_is_read_once_per_interval_unless_asked_fresh() -> None:
    reads: list[str] = []
    now = [0.0]

    async def read(namespace: str) -> dict[str, Any]:
        reads.append(namespace)
        return {"metadata": {"annotations": {FLY_APPS_ANNOTATION: f"acct-{len(reads)}", "other": "x"}}}

    bindings = NamespaceBindings(read, lambda: now[0], ttl=10)
    assert await bindings.annotations("t") == {FLY_APPS_ANNOTATION: "acct-1"}
    assert await bindings.annotations("t") == {FLY_APPS_ANNOTATION: "acct-1"}
    assert await bindings.annotations("t", fresh=True) == {FLY_APPS_ANNOTATION: "acct-2"}
    now[0] = 11
    assert await bindings.annotations("t") == {FLY_APPS_ANNOTATION: "acct-3"}


async def test_passes_that_miss_the_binding_at_once_share_one_read_and_a_failed_read_is_not_shared() -> None:
    reads: list[str] = []
    gate = asyncio.Event()
    failing = [True]

    async def read(namespace: str) -> dict[str, Any]:
        reads.append(namespace)
        number = len(reads)
        await gate.wait()
        if failing[0]:
            failing[0] = False
            raise KubeError(503, "unavailable")
        return {"metadata": {"annotations": {FLY_APPS_ANNOTATION: f"acct-{number}"}}}

    bindings = NamespaceBindings(read, lambda: 0.0, ttl=10)
    passes = [asyncio.create_task(bindings.annotations("t")) for _ in range(50)]
    await asyncio.sleep(0)
    assert reads == ["t"], "one read in flight for fifty passes"
    gate.set()
    results = await asyncio.gather(*passes, return_exceptions=True)
    # The first read failed: its caller sees the error; the others read again, and share that read.
    assert sum(isinstance(result, KubeError) for result in results) == 1
    assert [r for r in results if not isinstance(r, KubeError)] == [{FLY_APPS_ANNOTATION: "acct-2"}] * 49
    assert reads == ["t", "t"]


async def test_a_fresh_read_never_joins_a_read_that_began_before_it_was_asked_for() -> None:
    reads: list[str] = []
    now = [0.0]
    gate = asyncio.Event()

    async def read(namespace: str) -> dict[str, Any]:
        reads.append(namespace)
        number = len(reads)
        await gate.wait()
        return {"metadata": {"annotations": {FLY_APPS_ANNOTATION: f"acct-{number}"}}}

    bindings = NamespaceBindings(read, lambda: now[0], ttl=10)
    older = asyncio.create_task(bindings.annotations("t"))
    await asyncio.sleep(0)
    now[0] = 1.0
    fresh = asyncio.create_task(bindings.annotations("t", fresh=True))
    await asyncio.sleep(0)
    gate.set()
    assert await older == {FLY_APPS_ANNOTATION: "acct-1"}
    assert await fresh == {FLY_APPS_ANNOTATION: "acct-2"}
    assert len(reads) == 2


# --- claims -----------------------------------------------------------------------------------------------


def test_a_claim_is_named_by_the_exact_pair_so_similar_sandbox_ids_never_share_one() -> None:
    names = {claim_name("acct-a", s) for s in ("Alice-1", "alice-1", "alice_1", "alice-1 ")}
    assert len(names) == 4
    assert claim_name("acct-a", "alice_1") != claim_name("acct-b", "alice_1")
    assert claim_name("acct-a", "alice_1") == claim_name("acct-a", "alice_1")
    assert all(len(n) <= 63 and n.startswith("kiloclaw-claim-") for n in names)
