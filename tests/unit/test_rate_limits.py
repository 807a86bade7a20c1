"""Fly's rate limits: flysim enforces them (429 + Retry-After per machine and action), and the operator's
client stays under them by design (token buckets per machine and action, a bound on creates in flight)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from builders import flysim
from flysim import FlySimulator, RateLimits
from kiloclaw_operator.fly import FlyClient, MachineConfig, Pacer, PacingLimits, RateLimited

TOKEN = "limits-token"
IMAGE = "registry.fly.io/kiloclaw:2026.11.1"


@pytest.fixture
async def sim() -> AsyncIterator[FlySimulator]:
    async with flysim(TOKEN, ("iad",), start_delay=0.01, stop_delay=0.01) as simulator:
        assert simulator.rate_limits == RateLimits()  # on by default, at Fly's documented limits
        yield simulator


async def a_machine(sim: FlySimulator, app: str = "acct-limits") -> str:
    async with FlyClient(sim.base_url, TOKEN) as fly:
        machine = await fly.create_machine(app, name="m", region="iad", config=MachineConfig(image=IMAGE))
    return machine.id


def raw(sim: FlySimulator) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"{sim.base_url}/v1", headers={"Authorization": f"Bearer {TOKEN}"})


async def test_flysim_refuses_a_fourth_action_on_one_machine_at_once_with_429_and_retry_after(
    sim: FlySimulator,
) -> None:
    machine_id = await a_machine(sim)
    other_id = await a_machine(sim, "acct-other")
    async with raw(sim) as fly:
        statuses = [
            (await fly.post(f"/apps/acct-limits/machines/{machine_id}/stop")).status_code for _ in range(3)
        ]
        refused = await fly.post(f"/apps/acct-limits/machines/{machine_id}/stop")
        # Buckets are per machine and per action: another machine, or another action, is not affected.
        assert (await fly.post(f"/apps/acct-other/machines/{other_id}/stop")).status_code == 200
        assert (await fly.get(f"/apps/acct-limits/machines/{machine_id}")).status_code == 200
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert sim.rate_limited == 1


async def test_flysim_allows_ten_reads_of_one_machine_at_once_and_refuses_the_eleventh(
    sim: FlySimulator,
) -> None:
    machine_id = await a_machine(sim)
    async with raw(sim) as fly:
        path = f"/apps/acct-limits/machines/{machine_id}"
        statuses = [(await fly.get(path)).status_code for _ in range(11)]
    assert statuses == [200] * 10 + [429]


async def test_an_unpaced_burst_is_refused_by_flysim(sim: FlySimulator) -> None:
    machine_id = await a_machine(sim)
    async with FlyClient(sim.base_url, TOKEN, pacing=None, max_retries=0) as fly:
        with pytest.raises(RateLimited) as refused:
            await asyncio.gather(*(fly.stop_machine("acct-limits", machine_id) for _ in range(5)))
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1


async def test_the_paced_client_sends_a_burst_of_actions_and_reads_without_a_single_429(
    sim: FlySimulator,
) -> None:
    machine_id = await a_machine(sim)
    async with FlyClient(sim.base_url, TOKEN) as fly:
        await asyncio.gather(
            *(fly.stop_machine("acct-limits", machine_id) for _ in range(4)),
            *(fly.get_machine("acct-limits", machine_id) for _ in range(14)),
        )
    assert sim.rate_limited == 0
    assert sim.request_count("POST /v1/apps/{app_name}/machines/{machine_id}/stop") == 4


async def test_creates_in_flight_never_exceed_the_configured_bound(sim: FlySimulator) -> None:
    in_flight, most = 0, 0
    original = sim._serve_fly

    async def counting(request: Any, handler: Any) -> Any:
        nonlocal in_flight, most
        creating = request.method == "POST" and request.path.endswith("/volumes")
        if creating:
            in_flight += 1
            most = max(most, in_flight)
        try:
            return await original(request, handler)
        finally:
            if creating:
                in_flight -= 1

    sim._serve_fly = counting  # type: ignore[method-assign]
    sim.set_latency(0.1, "POST /v1/apps/*/volumes")
    limits = PacingLimits(max_concurrent_creates=2)
    async with FlyClient(sim.base_url, TOKEN, pacing=limits) as fly:
        await asyncio.gather(
            *(fly.create_volume(f"acct-{n}", name="data", region="iad", size_gb=1) for n in range(6))
        )
    assert most == 2
    assert len(sim.volumes()) == 6


def test_the_pacer_spaces_one_machines_actions_by_the_rate_after_the_burst() -> None:
    now = [100.0]
    pacer = Pacer(PacingLimits(action_rate=1.0, action_burst=2), clock=lambda: now[0])
    delays = [pacer.delay("POST start", "m1", mutating=True) for _ in range(4)]
    assert delays == [0.0, 0.0, 1.0, 2.0]
    assert pacer.delay("POST start", "m2", mutating=True) == 0.0
    now[0] += 10
    assert pacer.delay("POST start", "m1", mutating=True) == 0.0
