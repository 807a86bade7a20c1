"""The operator-side tenancy checks, each on its own: verify before destroy (over HTTP to flysim), the
namespace ↔ Fly app binding, claim names, volume and machine names (kiloclaw_operator, no Kubernetes)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from flysim import FlySimulator, SimTimings
from kiloclaw_operator.fly import FlyClient
from kiloclaw_operator.fly.models import Guest, MachineConfig, Mount, RestartPolicy
from kiloclaw_operator.volumes import MachineNotProven, destroy_recorded_machine

TOKEN = "fo1_tenancy"
APP = "acct-a"


@pytest.fixture
async def sim() -> AsyncIterator[FlySimulator]:
    simulator = FlySimulator(token=TOKEN, regions=("iad", "ord"), timings=SimTimings(start_delay=0.02))
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


@pytest.fixture
async def fly(sim: FlySimulator) -> AsyncIterator[FlyClient]:
    async with FlyClient(sim.base_url, TOKEN, backoff_base=0.01, backoff_cap=0.5, max_retries=3) as client:
        yield client


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
