"""A namespace is a security boundary, proven on the real API server (``make e2e``; skipped on kubesim, which
does not run ValidatingAdmissionPolicies nor an authorizer).

A tenant — a ServiceAccount bound to the shipped ``kiloclaw-edit`` ClusterRole in its own namespace, and
nothing else — runs the legitimate paths (create, patch, recovery with a retained volume, early delete of
that volume, delete) and tries every attack of issue 17. Each attack is refused at admission (RBAC or the
policies of deploy/admission) or by the operator, and the victim's Fly machines and volumes are unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from builders import instance_body
from harness import Stack, condition, eventually, status
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, RETAINED_PLURAL, VERSION

MERGE = {"Content-Type": "application/merge-patch+json"}


def path(plural: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    return Stack.path(plural, namespace, name, sub)


def fly_state(stack: Stack, app: str) -> list[tuple[str, str, str]]:
    """Every machine and volume of ``app`` with its state: what no attack may change."""
    return sorted(
        [("machine", m["id"], m["state"]) for m in stack.fly.machines(app)]
        + [("volume", v["id"], v["state"]) for v in stack.fly.volumes(app)]
    )


def victim_fly_state(stack: Stack, app: str, shared_ids: set[str]) -> list[tuple[str, str, str]]:
    """The victim's app entire, and its resources in the app both namespaces share."""
    return fly_state(stack, app) + [item for item in fly_state(stack, "acct-test") if item[1] in shared_ids]


def refused(response: httpx.Response, *, by: str) -> str:
    assert response.status_code in (403, 422), (response.status_code, response.text)
    message: str = response.json().get("message", "")
    assert by in message, message
    return message


@pytest.fixture
async def tenant(stack: Stack, namespace: str) -> AsyncIterator[httpx.AsyncClient]:
    client = await stack.tenant_client(namespace, role="kiloclaw-edit")
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_tenant_with_kiloclaw_edit_runs_its_sandbox_and_every_attack_is_refused(
    stack: Stack, namespace: str, tenant: httpx.AsyncClient
) -> None:
    # The victim: another namespace with a running sandbox in its own Fly app, and one in the shared app.
    victim_ns = await stack.create_namespace("victim")
    victim_app = f"acct-{victim_ns}"
    # Unique per run: a real cluster keeps what earlier runs left.
    victim_sandbox, shared_sandbox = (
        f"ki_{kind}_{victim_ns}".replace("-", "_") for kind in ("victim", "shared")
    )
    await stack.create_instance(victim_ns, "alice", flyApp=victim_app, sandboxId=victim_sandbox)
    await stack.create_instance(victim_ns, "shared", flyApp="acct-test", sandboxId=shared_sandbox)
    victim = status(await stack.wait_phase(victim_ns, "alice", "Running", timeout=30))
    shared = status(await stack.wait_phase(victim_ns, "shared", "Running", timeout=30))
    before = victim_fly_state(stack, victim_app, {shared["machineId"], shared["volumeId"]})

    # --- the legitimate paths, as the tenant ---------------------------------------------------------
    app = f"acct-{namespace}"
    created = await tenant.post(
        path(INSTANCE_PLURAL, namespace), json=instance_body("mine", namespace, flyApp=app)
    )
    assert created.status_code == 201, created.text
    running = status(await stack.wait_phase(namespace, "mine", "Running", timeout=30))
    stopped = await tenant.patch(
        path(INSTANCE_PLURAL, namespace, "mine"), json={"spec": {"state": "Stopped"}}, headers=MERGE
    )
    assert stopped.status_code == 200, stopped.text
    await stack.wait_phase(namespace, "mine", "Stopped", timeout=30)
    started = await tenant.patch(
        path(INSTANCE_PLURAL, namespace, "mine"), json={"spec": {"state": "Running"}}, headers=MERGE
    )
    assert started.status_code == 200, started.text
    running = status(await stack.wait_phase(namespace, "mine", "Running", timeout=30))

    # --- the attacks ------------------------------------------------------------------------------------
    # 1. Mint a retained volume naming the victim's volume (past retainUntil, and deleteNow): RBAC refuses.
    forged = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "KiloClawRetainedVolume",
        "metadata": {"name": "stolen"},
        "spec": {
            "flyApp": victim_app,
            "volumeId": victim["volumeId"],
            "sandboxId": victim_sandbox,
            "instanceName": "alice",
            "region": victim["region"],
            "retainUntil": "2020-01-01T00:00:00Z",
            "deleteNow": True,
        },
    }
    refused(await tenant.post(path(RETAINED_PLURAL, namespace), json=forged), by="forbidden")
    # ... and even an identity RBAC lets create retained volumes (the cluster admin) is refused at admission.
    refused(await stack.api.post(path(RETAINED_PLURAL, namespace), json=forged), by="operator only")
    # 3. Name the victim's Fly app, or an image outside the bound repositories: the admission policy refuses.
    refused(
        await tenant.post(
            path(INSTANCE_PLURAL, namespace), json=instance_body("intruder", namespace, flyApp=victim_app)
        ),
        by=f"Fly app {victim_app} is not bound to namespace {namespace}",
    )
    refused(
        await tenant.post(
            path(INSTANCE_PLURAL, namespace),
            json=instance_body("miner", namespace, flyApp=app, image="docker.io/evil/miner:1"),
        ),
        by="is not in a repository bound",
    )
    refused(
        await tenant.patch(
            path(INSTANCE_PLURAL, namespace, "mine"),
            json={"spec": {"image": "docker.io/evil/miner:1"}},
            headers=MERGE,
        ),
        by="is not in a repository bound",
    )
    # 4. Point its own instance's status at the victim's machine and volume: the status is the operator's.
    refused(
        await tenant.patch(
            path(INSTANCE_PLURAL, namespace, "mine", "status"),
            json={"status": {"machineId": victim["machineId"], "volumeId": victim["volumeId"]}},
            headers=MERGE,
        ),
        by="forbidden",
    )
    # 5. Bind itself to the victim's app, or read the victim's namespace.
    refused(
        await tenant.patch(
            f"/api/v1/namespaces/{namespace}",
            json={"metadata": {"annotations": {"kiloclaw.kilo.ai/fly-apps": victim_app}}},
            headers=MERGE,
        ),
        by="forbidden",
    )
    refused(await tenant.get(path(INSTANCE_PLURAL, victim_ns)), by="forbidden")
    # 6. Claim the victim's sandbox in the app both namespaces share: the operator refuses, naming nothing
    #    of the victim's namespace.
    squat = await tenant.post(
        path(INSTANCE_PLURAL, namespace),
        json=instance_body("squatter", namespace, flyApp="acct-test", sandboxId=shared_sandbox),
    )
    assert squat.status_code == 201, squat.text
    squatter = await stack.wait_instance(
        namespace,
        "squatter",
        lambda b: condition(b, "Stalled").get("reason") == "DuplicateSandbox",
        timeout=30,
        what="Stalled DuplicateSandbox",
    )
    message = condition(squatter, "Stalled")["message"]
    assert "an instance in another namespace" in message and victim_ns not in message
    events = await stack.events_with(namespace, None, "DuplicateSandbox")
    assert events and all(
        victim_ns not in e["message"] and victim_sandbox not in e["message"] for e in events
    )
    deleted = await tenant.delete(path(INSTANCE_PLURAL, namespace, "squatter"))
    assert deleted.status_code == 200, deleted.text
    await stack.wait_gone(namespace, "squatter", timeout=30)

    # Nothing of the victim changed on Fly, and the victim still runs.
    assert victim_fly_state(stack, victim_app, {shared["machineId"], shared["volumeId"]}) == before
    assert status(await stack.wait_phase(victim_ns, "alice", "Running"))["machineId"] == victim["machineId"]

    # --- a recovery (the machine crashes on a healthy host) -----------------------------------------------
    # A recovery keeps the old volume (it has a snapshot) as a retained volume the operator mints.
    stack.fly.add_snapshot(running["volumeId"])
    stack.fly.crash_machine(running["machineId"])  # a healthy host: the old volume can be deleted early
    recovered = await stack.wait_instance(
        namespace,
        "mine",
        lambda b: (
            bool((status(b).get("lastRecovery") or {}).get("retainedVolume"))
            and not status(b).get("recovery")
        ),
        timeout=60,
        what="recovered, old volume retained",
    )
    retained_name = status(recovered)["lastRecovery"]["retainedVolume"]
    kept = (await tenant.get(path(RETAINED_PLURAL, namespace, retained_name))).json()
    assert kept["status"]["provenance"]["volumeId"] == running["volumeId"]

    # 2. Forge the provenance of the legitimate retained volume, or repoint it at the victim's volume.
    refused(
        await tenant.patch(
            path(RETAINED_PLURAL, namespace, retained_name, "status"),
            json={"status": {"provenance": {"volumeId": victim["volumeId"]}}},
            headers=MERGE,
        ),
        by="forbidden",
    )
    refused(
        await tenant.patch(
            path(RETAINED_PLURAL, namespace, retained_name),
            json={"spec": {"volumeId": victim["volumeId"], "flyApp": victim_app}},
            headers=MERGE,
        ),
        by="immutable",
    )
    # --- the legitimate early delete and the instance's deletion, as the tenant ------------------------
    early = await tenant.patch(
        path(RETAINED_PLURAL, namespace, retained_name), json={"spec": {"deleteNow": True}}, headers=MERGE
    )
    assert early.status_code == 200, early.text

    async def retained_gone() -> bool | None:
        response = await tenant.get(path(RETAINED_PLURAL, namespace, retained_name))
        return True if response.status_code == 404 else None

    await eventually(retained_gone, timeout=30, what="retained volume deleted early")
    assert running["volumeId"] not in {v["id"] for v in stack.live_volumes(app)}
    gone = await tenant.delete(path(INSTANCE_PLURAL, namespace, "mine"))
    assert gone.status_code == 200, gone.text
    await stack.wait_gone(namespace, "mine", timeout=30)
    assert stack.live_machines(app) == [] and stack.live_volumes(app) == []
    for name in ("alice", "shared"):
        await stack.delete_instance(victim_ns, name)
        await stack.wait_gone(victim_ns, name, timeout=30)
