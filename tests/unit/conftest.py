"""Fixtures of the unit tier: a Fly simulator and the operator's Fly client for it (tests/builders.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from builders import FLY_TOKEN, fly_client, flysim
from flysim import FlySimulator
from kiloclaw_operator.fly import FlyClient


@pytest.fixture
async def sim() -> AsyncIterator[FlySimulator]:
    async with flysim(FLY_TOKEN) as simulator:
        yield simulator


@pytest.fixture
async def fly(sim: FlySimulator) -> AsyncIterator[FlyClient]:
    async with fly_client(sim, FLY_TOKEN) as client:
        yield client
