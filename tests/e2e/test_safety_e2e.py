"""End-to-end safety stories (issue 10): no instance can hurt another, transient Fly faults never fail a
recovery, an instance that should run converges or says why, and a restart does not eat a recovery's budget.

The real operator against kubesim and flysim over HTTP, with short intervals; waits have deadlines, nothing
asserts timings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client import REGISTRY

from harness import FLY_TOKEN, Stack, condition, eventually, status
from kiloclaw_operator.fly import volume_name
from test_recovery_e2e import set_fly_state

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "instance.yaml"


def example_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())["spec"]
    return spec


def stalled_reason(body: dict[str, Any]) -> str | None:
    stalled = condition(body, "Stalled")
    return stalled.get("reason") if stalled.get("status") == "True" else None


def mutating_fly_requests(stack: Stack, app: str) -> list[tuple[str, str]]:
    return [
        (r.method, r.path)
        for r in stack.fly.request_log
        if r.method in ("POST", "DELETE") and r.path.startswith(f"/v1/apps/{app}/")
    ]


async def wait_event(stack: Stack, namespace: str, name: str, reason: str) -> list[dict[str, Any]]:
    async def check() -> list[dict[str, Any]] | None:
        found = [e for e in await stack.events(namespace, name) if e["reason"] == reason]
        return found or None

    return await eventually(check, timeout=10, what=f"event {reason} on {name}")


async def running_and_ready(stack: Stack, namespace: str, name: str, timeout: float = 15) -> dict[str, Any]:
    return await stack.wait_instance(
        namespace,
        name,
        lambda b: status(b).get("phase") == "Running" and condition(b, "Ready").get("status") == "True",
        timeout,
        what="Running and Ready",
    )


# --- 1. ownership -----------------------------------------------------------------------------------------


async def test_a_copy_with_the_same_sandbox_is_refused_and_deleting_it_leaves_the_original_running(
    stack: Stack, namespace: str
) -> None:
    spec = example_spec()
    app, sandbox = spec["flyApp"], spec["sandboxId"]
    await stack.create_instance(namespace, "alice", **spec)
    original = status(await running_and_ready(stack, namespace, "alice"))
    before = mutating_fly_requests(stack, app)

    await stack.create_instance(namespace, "alice-copy", **spec)
    copy = await stack.wait_instance(
        namespace,
        "alice-copy",
        lambda b: stalled_reason(b) == "DuplicateSandbox",
        what="Stalled DuplicateSandbox",
    )
    message = condition(copy, "Stalled")["message"]
    assert "owned by instance alice;" in message  # same namespace: named (another namespace would not be)
    assert not {"volumeId", "machineId"} & set(status(copy))
    (event,) = await wait_event(stack, namespace, "alice-copy", "DuplicateSandbox")
    assert event["type"] == "Warning" and "instance alice;" in event["message"]

    await stack.delete_instance(namespace, "alice-copy")
    await stack.wait_gone(namespace, "alice-copy")

    assert mutating_fly_requests(stack, app) == before, "the copy touched Fly"
    machine = stack.fly.machine(original["machineId"])
    assert machine["state"] == "started"
    assert [v["id"] for v in stack.live_volumes(app, name=volume_name(sandbox))] == [original["volumeId"]]
    still = await stack.get_instance(namespace, "alice")
    assert still is not None
    assert status(still)["phase"] == "Running" and status(still)["machineId"] == original["machineId"]
    await stack.delete_instance(namespace, "alice")
    await stack.wait_gone(namespace, "alice")


async def test_the_refused_copy_takes_over_the_sandbox_once_the_original_is_deleted(
    stack: Stack, namespace: str
) -> None:
    app = f"acct-{namespace}"
    await stack.create_instance(namespace, "first", flyApp=app, sandboxId=f"ki_{namespace}".replace("-", "_"))
    await running_and_ready(stack, namespace, "first")
    await stack.create_instance(
        namespace, "second", flyApp=app, sandboxId=f"ki_{namespace}".replace("-", "_")
    )
    await stack.wait_instance(
        namespace, "second", lambda b: stalled_reason(b) == "DuplicateSandbox", what="refused"
    )
    await stack.delete_instance(namespace, "first")
    await stack.wait_gone(namespace, "first")
    taken = status(await running_and_ready(stack, namespace, "second"))
    assert [m["id"] for m in stack.live_machines(app)] == [taken["machineId"]]


# --- 3. a revoked Fly token is an operator-level hold that clears by itself --------------------------------


async def test_a_revoked_token_stalls_until_the_rotated_secret_file_is_read_and_an_outage_stop_is_recovered(
    stack: Stack, namespace: str, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(FLY_TOKEN + "\n")
    app = f"acct-{namespace}"
    await stack.restart_operator(fly_api_token_file=str(token_file), fly_api_token="")
    try:
        await stack.create_instance(namespace, "tess", flyApp=app)
        source = status(await running_and_ready(stack, namespace, "tess"))

        stack.fly.token = "rotated-token"  # Fly revokes the old token
        blocked = await stack.wait_instance(
            namespace,
            "tess",
            lambda b: stalled_reason(b) == "FlyUnauthorized",
            what="Stalled FlyUnauthorized",
        )
        assert status(blocked)["phase"] == "Running", "a token problem is not the instance's failure"
        assert "token" in condition(blocked, "Stalled")["message"]
        assert REGISTRY.get_sample_value("kiloclaw_fly_unauthorized") == 1
        stack.fly.crash_machine(source["machineId"])  # an unexpected stop during the outage

        token_file.write_text("rotated-token\n")  # the Secret is rotated; no restart
        recovered = await stack.wait_instance(
            namespace,
            "tess",
            lambda b: (
                status(b).get("phase") == "Running"
                and (status(b).get("lastRecovery") or {}).get("outcome") == "Succeeded"
                and condition(b, "Ready").get("status") == "True"
            ),
            timeout=30,
            what="recovered once the token works",
        )
        assert stalled_reason(recovered) is None
        assert status(recovered)["machineId"] != source["machineId"]
        assert REGISTRY.get_sample_value("kiloclaw_fly_unauthorized") == 0
    finally:
        stack.fly.token = FLY_TOKEN
        await stack.restart_operator()


async def test_deleting_an_instance_leaves_a_machine_that_merely_carries_its_sandbox_id(
    stack: Stack, namespace: str
) -> None:
    app = f"acct-{namespace}"
    body = await stack.create_instance(namespace, "own", flyApp=app)
    mine = status(await running_and_ready(stack, namespace, "own"))
    other_volume = stack.fly.create_volume(app, "someone_elses", "iad")["id"]
    async with httpx.AsyncClient(
        base_url=f"{stack.fly.base_url}/v1", headers={"Authorization": f"Bearer {FLY_TOKEN}"}
    ) as fly:

        async def created() -> httpx.Response | None:
            response = await fly.post(
                f"/apps/{app}/machines",
                json={
                    "region": "iad",
                    "config": {
                        "image": "registry.fly.io/other:1",
                        "metadata": {"kiloclaw_sandbox_id": body["spec"]["sandboxId"]},
                        "mounts": [{"volume": other_volume, "path": "/data"}],
                    },
                },
            )
            return None if response.status_code == 429 else response

        response = await eventually(created, timeout=10, what="a look-alike machine created")
        assert response.status_code == 200, response.text
        look_alike = response.json()["id"]

    await stack.delete_instance(namespace, "own")
    await stack.wait_gone(namespace, "own")
    assert stack.fly.machine(mine["machineId"])["state"] in ("destroyed", "destroying")
    assert stack.fly.machine(look_alike)["state"] not in ("destroyed", "destroying")
    assert other_volume in {v["id"] for v in stack.live_volumes(app)}


async def test_a_failed_machine_stalls_the_instance_saying_why_and_the_held_instance_is_still_observed(
    stack: Stack, namespace: str
) -> None:
    app = f"acct-{namespace}"
    await stack.create_instance(namespace, "fay", flyApp=app)
    machine_id = status(await running_and_ready(stack, namespace, "fay"))["machineId"]
    set_fly_state(stack, machine_id, "failed")
    held = await stack.wait_instance(
        namespace, "fay", lambda b: stalled_reason(b) == "MachineFailed", what="Stalled MachineFailed"
    )
    assert status(held)["phase"] == "Stopped"
    assert "kiloclaw.kilo.ai/retry" in condition(held, "Stalled")["message"]
    (event,) = await wait_event(stack, namespace, "fay", "MachineFailed")
    assert event["type"] == "Warning"

    set_fly_state(stack, machine_id, "stopped")  # held: no action, but what Fly says is still recorded
    observed = await stack.wait_instance(
        namespace, "fay", lambda b: status(b).get("flyState") == "stopped", what="flyState stopped"
    )
    assert stalled_reason(observed) == "MachineFailed" and status(observed)["phase"] == "Stopped"
    assert stack.fly.machine(machine_id)["state"] == "stopped", "a held instance touches nothing"

    await stack.patch_instance(
        namespace, "fay", {"metadata": {"annotations": {"kiloclaw.kilo.ai/retry": "1"}}}
    )
    again = status(await running_and_ready(stack, namespace, "fay"))
    assert again["machineId"] == machine_id
