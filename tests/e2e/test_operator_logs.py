"""What an admin reads in the operator's log: provisioning, stop and delete at INFO, and Fly request failures
that name the instance, the app and the machine."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from harness import LogRecords, Stack, eventually, status


class Records(LogRecords):
    """The ``kiloclaw`` records."""

    def messages(self, namespace: str) -> list[str]:
        return [r.getMessage() for r in self.of(namespace) if r.levelno >= logging.INFO]


@pytest.fixture
def records() -> Iterator[Records]:
    with Records().capturing("kiloclaw") as handler:
        yield handler


async def test_provisioning_stop_and_delete_are_logged_at_info_with_the_instance(
    stack: Stack, namespace: str, records: Records
) -> None:
    await stack.create_instance(namespace, "logged")
    body = await stack.wait_phase(namespace, "logged", "Running")
    machine, volume = status(body)["machineId"], status(body)["volumeId"]
    await stack.patch_instance(namespace, "logged", {"spec": {"state": "Stopped"}})
    await stack.wait_phase(namespace, "logged", "Stopped")
    await stack.delete_instance(namespace, "logged")
    await stack.wait_gone(namespace, "logged")

    messages = records.messages(namespace)
    assert "provisioning: volume and machine in app acct-test" in messages
    assert f"stopping machine {machine}" in messages
    assert f"destroying: machine {machine}, volume {volume}" in messages
    for record in records.of(namespace):
        assert getattr(record, "instance", None) == "logged"


async def test_a_failed_fly_request_is_logged_with_the_instance_the_app_and_the_machine(
    stack: Stack, namespace: str, records: Records
) -> None:
    await stack.create_instance(namespace, "rejected")
    body = await stack.wait_phase(namespace, "rejected", "Running")
    machine = status(body)["machineId"]
    stack.fly.inject_faults(f"POST /v1/apps/acct-test/machines/{machine}/stop", 422, count=1)
    try:
        await stack.patch_instance(namespace, "rejected", {"spec": {"state": "Stopped"}})

        async def failure_logged() -> logging.LogRecord | None:
            failed = [
                r
                for r in records.records
                if r.getMessage() == "fly request failed" and getattr(r, "machine", None) == machine
            ]
            return failed[0] if failed else None

        record = await eventually(failure_logged, what="the failed stop request in the log")
    finally:
        stack.fly.clear_faults()
    assert record.levelno == logging.WARNING
    fields = {
        key: getattr(record, key, None) for key in ("namespace", "instance", "app", "machine", "status")
    }
    assert fields == {
        "namespace": namespace,
        "instance": "rejected",
        "app": "acct-test",
        "machine": machine,
        "status": 422,
    }
