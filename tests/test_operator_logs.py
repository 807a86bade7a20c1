"""What an admin reads in the operator's log: provisioning, stop and delete at INFO, and Fly request failures
that name the instance, the app and the machine."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from harness import Stack, eventually, status


class Records(logging.Handler):
    """The ``kiloclaw`` records (the operator runs in a thread of this process)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def about(self, namespace: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "namespace", None) == namespace]

    def messages(self, namespace: str) -> list[str]:
        return [r.getMessage() for r in self.about(namespace) if r.levelno >= logging.INFO]


@pytest.fixture
def records() -> Iterator[Records]:
    logger = logging.getLogger("kiloclaw")
    handler = Records()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


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
    for record in records.about(namespace):
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
