"""The driver's hold on the newest body, without I/O: which body it keeps, and what it keeps of it."""

from __future__ import annotations

from typing import Any, cast

from kiloclaw_operator.driving import Context, ObjectDriver
from kiloclaw_operator.models import ObjectRef


class _Driver(ObjectDriver[Any]):
    def read(self, body: dict[str, Any]) -> Any:
        return body

    def log_fields(self, obj: Any) -> dict[str, Any]:
        return {}

    async def patch_status(self, ref: ObjectRef, patch: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("no writes here")

    def recheck_delay(self) -> float:
        return 1.0

    async def reconcile(self, obj: Any) -> float:
        return 1.0


def _body(resource_version: str, generation: int = 1, **metadata: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "a", "resourceVersion": resource_version, "generation": generation, **metadata},
        "status": {"phase": "Running"},
    }


def _driver() -> _Driver:
    return _Driver("ns", "a", ctx=cast(Context, None))


def test_the_server_side_apply_bookkeeping_of_a_body_is_not_kept() -> None:
    driver = _driver()
    managed = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    assert driver.offer(_body("5", managedFields=managed))
    assert driver.latest is not None
    assert "managedFields" not in driver.latest["metadata"]
    assert driver.latest["metadata"]["resourceVersion"] == "5"


def test_an_older_body_never_replaces_a_newer_one_and_only_new_work_asks_for_a_pass() -> None:
    driver = _driver()
    assert driver.offer(_body("5"))
    assert not driver.offer(_body("4", generation=2)), "older than what is kept"
    assert driver.latest is not None and driver.latest["metadata"]["generation"] == 1
    assert not driver.offer(_body("6")), "a newer body with the same generation is no new work"
    assert driver.offer(_body("7", generation=2))
