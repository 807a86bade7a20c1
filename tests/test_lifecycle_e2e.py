"""End-to-end lifecycle stories over HTTP: the real operator against kubesim and flysim."""

from __future__ import annotations

from harness import Stack, condition, status


async def test_new_instance_is_provisioned_to_running_with_ready_condition(
    stack: Stack, namespace: str
) -> None:
    body = await stack.create_instance(namespace, "alice")
    sandbox = body["spec"]["sandboxId"]
    running = await stack.wait_instance(
        namespace, "alice", lambda b: condition(b, "Ready").get("status") == "True", what="Ready"
    )
    st = status(running)
    assert st["phase"] == "Running"
    assert st["flyState"] == "started"
    assert st["observedGeneration"] == running["metadata"]["generation"]
    assert condition(running, "Reconciling")["status"] == "False"
    assert condition(running, "Stalled")["status"] == "False"
    machines = stack.live_machines(sandbox_id=sandbox)
    assert [m["id"] for m in machines] == [st["machineId"]]
    machine = machines[0]
    assert machine["name"] == sandbox
    assert machine["region"] == st["region"] == "iad"
    assert machine["config"]["restart"]["policy"] == "no"
    assert machine["config"]["metadata"]["kiloclaw_user_id"] == "user-alice"
    assert machine["config"]["mounts"][0]["volume"] == st["volumeId"]
