"""Without the feed, ``Starting`` and ``Stopping`` complete from Fly's ``/wait`` (a long poll that answers
the moment the machine gets there), not from busy polling: here the busy cadence is longer than the tests'
deadline, so polling alone could not complete them in time."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from harness import Stack, status

# Waits out real Fly waits with busy polling slowed down: `make stories` (run by `make e2e`), not `make test`.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("wait")]

SLOW_BUSY_POLL = {"poll_busy_seconds": 30.0, "wait_call_seconds": 30}


@pytest.fixture(scope="module", autouse=True)
async def slow_busy_polling(stack: Stack) -> AsyncIterator[None]:
    await stack.restart_operator(**SLOW_BUSY_POLL)
    try:
        yield
    finally:
        await stack.restart_operator()


def waits_for(stack: Stack, machine_id: str) -> int:
    return sum(1 for r in stack.fly.request_log if r.path.endswith(f"/machines/{machine_id}/wait"))


async def test_starting_and_stopping_complete_from_flys_wait_rather_than_busy_polling(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "w")
    body = await stack.wait_phase(namespace, "w", "Running", timeout=15)
    machine_id = status(body)["machineId"]
    assert waits_for(stack, machine_id) >= 1
    await stack.patch_instance(namespace, "w", {"spec": {"state": "Stopped"}})
    await stack.wait_phase(namespace, "w", "Stopped", timeout=15)
    assert waits_for(stack, machine_id) >= 2
