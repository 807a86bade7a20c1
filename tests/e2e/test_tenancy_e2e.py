"""A namespace is a security boundary (issue 17), end to end on the fast tier: the real operator against
kubesim and flysim. kubesim does not run ValidatingAdmissionPolicies (the real API server does: see
tests/e2e/test_tenancy_cluster.py), so everything here is what the operator itself refuses before any Fly
call: an unbound Fly app or image repository, an app that does not exist, a sandbox another namespace holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from builders import instance_spec
from flysim.state import FlyApiError
from harness import Stack, binding, condition, eventually, status
from kiloclaw_operator.fly.vocabulary import legacy_volume_name, volume_name
from kiloclaw_operator.kube import KubeClient, KubeConnection, login_connection
from kiloclaw_operator.models import InstanceSpec, ObjectRef
from kiloclaw_operator.tenancy import (
    FLY_APPS_ANNOTATION,
    ClaimHolder,
    ClaimListing,
    acquire_claim,
    claim_body,
    claim_name,
    create_claim,
    release_claim,
)

CLAIMS_NAMESPACE = "kiloclaw-system"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


def stalled(body: dict[str, Any]) -> tuple[str | None, str]:
    found = condition(body, "Stalled")
    return (found.get("reason") if found.get("status") == "True" else None), found.get("message", "")


def fly_requests_for(stack: Stack, app: str) -> list[str]:
    return [f"{r.method} {r.path}" for r in stack.fly.request_log if r.path.startswith(f"/v1/apps/{app}")]


async def annotate(stack: Stack, namespace: str, annotations: dict[str, str]) -> None:
    response = await stack.api.patch(
        f"/api/v1/namespaces/{namespace}",
        json={"metadata": {"annotations": annotations}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    response.raise_for_status()


async def claim(stack: Stack, app: str, sandbox: str) -> dict[str, Any] | None:
    """The Lease that holds ``(app, sandbox)``, read through the API (kubesim or the real server)."""
    name = claim_name(app, sandbox)
    response = await stack.api.get(
        f"/apis/coordination.k8s.io/v1/namespaces/{CLAIMS_NAMESPACE}/leases/{name}"
    )
    if response.status_code == 404:
        return None
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def exempt_from_admission(stack: Stack, namespace: str) -> None:
    """On a real API server, let the create through the admission policy (kubesim runs none), as a cluster
    admin may: the operator's own check is what these tests prove, on both servers."""
    response = await stack.api.patch(
        f"/api/v1/namespaces/{namespace}",
        json={"metadata": {"labels": {"kiloclaw.kilo.ai/admission": "exempt"}}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    response.raise_for_status()


def left_volume(stack: Stack, app: str, name: str) -> str:
    """A volume left behind (by a crash before its record), in a region with a healthy host."""
    for region in ("iad", "ord", "cdg"):
        try:
            volume_id: str = stack.fly.create_volume(app, name, region)["id"]
        except FlyApiError:
            continue
        return volume_id
    raise AssertionError("no region of flysim has a healthy host")


async def claimed_by_an_earlier_attempt(
    stack: Stack, namespace: str, name: str, app: str, sandbox: str
) -> None:
    """The claim on ``(app, sandbox)`` that an earlier, crashed attempt held, naming an object of this name
    since replaced (another uid). A new instance takes it over, then looks for what that attempt left
    (``left_volume``); one that makes the first claim has nothing to look for, and looks for nothing."""
    body = claim_body(CLAIMS_NAMESPACE, app, sandbox, (namespace, name, f"uid-earlier-{name}"))
    response = await stack.api.post(LEASES.format(namespace=CLAIMS_NAMESPACE), json=body)
    assert response.status_code == 201, response.text


async def wait_stalled(stack: Stack, namespace: str, name: str, reason: str) -> dict[str, Any]:
    return await stack.wait_instance(
        namespace, name, lambda b: stalled(b)[0] == reason, what=f"Stalled {reason}"
    )


async def warning_event(stack: Stack, namespace: str, name: str, reason: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        found = [e for e in await stack.events(namespace, name) if e["reason"] == reason]
        return found[0] if found else None

    return await eventually(check, timeout=10, what=f"event {reason}")


# --- the binding ------------------------------------------------------------------------------------------


async def test_an_app_the_namespace_is_not_bound_to_stalls_with_nothing_sent_to_fly_until_the_admin_binds_it(
    stack: Stack, namespace: str
) -> None:
    app = "acct-unbound-victim"
    await exempt_from_admission(stack, namespace)
    await stack.create_instance(namespace, "mallory", flyApp=app)
    refused = await wait_stalled(stack, namespace, "mallory", "AppNotAllowed")
    _, message = stalled(refused)
    assert message.startswith(f"Fly app {app} is not bound to namespace {namespace}")
    # kstatus reads Stalled=True with Reconciling=False as Failed: GitOps learns why instead of waiting.
    assert condition(refused, "Reconciling")["status"] == "False"
    event = await warning_event(stack, namespace, "mallory", "AppNotAllowed")
    assert event["type"] == "Warning"
    assert fly_requests_for(stack, app) == []

    await annotate(stack, namespace, {FLY_APPS_ANNOTATION: f"acct-test,{app}"})
    await stack.patch_instance(
        namespace, "mallory", {"metadata": {"annotations": {"kiloclaw.kilo.ai/retry": "1"}}}
    )
    running = await stack.wait_phase(namespace, "mallory", "Running", timeout=20)
    assert stalled(running)[0] is None
    await stack.delete_instance(namespace, "mallory")
    await stack.wait_gone(namespace, "mallory")


async def test_an_image_outside_the_bound_repositories_is_refused_before_any_fly_call(
    stack: Stack, namespace: str
) -> None:
    app = f"acct-{namespace}"
    await exempt_from_admission(stack, namespace)
    for name, image in (
        ("evil", "docker.io/mallory/miner:1"),
        ("lookalike", "registry.fly.io-evil.example/kiloclaw:1"),
    ):
        await annotate(stack, namespace, binding("acct-test", app, repositories=("registry.fly.io/",)))
        await stack.create_instance(namespace, name, flyApp=app, image=image)
        refused = await wait_stalled(stack, namespace, name, "ImageNotAllowed")
        assert image in stalled(refused)[1]
    assert fly_requests_for(stack, app) == []


async def test_a_namespace_without_a_binding_may_use_no_app_at_all(stack: Stack) -> None:
    namespace = await stack.create_namespace("unbound", bound=False)
    await exempt_from_admission(stack, namespace)
    await stack.create_instance(namespace, "alice")
    await wait_stalled(stack, namespace, "alice", "AppNotAllowed")
    # Deleting a refused instance touches nothing on Fly either.
    await stack.delete_instance(namespace, "alice")
    await stack.wait_gone(namespace, "alice")


async def test_an_app_that_does_not_exist_ends_failed_and_stalled_saying_so(
    stack: Stack, namespace: str
) -> None:
    app = "acct-nope"
    await annotate(stack, namespace, binding("acct-test", app))
    stack.fly.known_apps = {"acct-test"}
    try:
        await stack.create_instance(namespace, "ghost", flyApp=app)
        failed = await wait_stalled(stack, namespace, "ghost", "AppNotFound")
    finally:
        stack.fly.known_apps = None
    assert status(failed)["phase"] == "Failed"
    assert stalled(failed)[1].startswith(f"Fly app {app} does not exist")
    assert condition(failed, "Reconciling")["status"] == "False"
    assert (await warning_event(stack, namespace, "ghost", "AppNotFound"))["type"] == "Warning"
    # Nothing was created in the missing app: its first call, the volume's create, was refused, and no
    # other create followed it.
    requests = fly_requests_for(stack, app)
    assert requests[0] == f"POST /v1/apps/{app}/volumes"
    assert [r for r in requests if r.startswith("POST")] == requests[:1]
    assert stack.fly.volumes(app) == [] and stack.fly.machines(app) == []
    await stack.delete_instance(namespace, "ghost")
    await stack.wait_gone(namespace, "ghost")


# --- claims -----------------------------------------------------------------------------------------------


async def test_a_sandbox_claimed_in_another_namespace_is_refused_without_naming_that_namespace(
    stack: Stack, namespace: str
) -> None:
    owner_ns = await stack.create_namespace("owner")
    contested = f"ki_contested_{unique(namespace)}"  # unique per run: a real cluster keeps what runs leave
    spec = {"sandboxId": contested, "flyApp": "acct-test"}
    await stack.create_instance(owner_ns, "secret-owner-name", **spec)
    await stack.wait_phase(owner_ns, "secret-owner-name", "Running")
    assert await claim(stack, "acct-test", contested) is not None

    await stack.create_instance(namespace, "squatter", **spec)
    refused = await wait_stalled(stack, namespace, "squatter", "DuplicateSandbox")
    message = stalled(refused)[1]
    assert "an instance in another namespace" in message
    assert owner_ns not in message and "secret-owner-name" not in message
    event = await warning_event(stack, namespace, "squatter", "DuplicateSandbox")
    assert owner_ns not in event["message"] and "secret-owner-name" not in event["message"]

    # The owner's deletion releases the claim; the waiting instance then takes the sandbox over.
    await stack.delete_instance(owner_ns, "secret-owner-name")
    await stack.wait_gone(owner_ns, "secret-owner-name")
    await stack.patch_instance(
        namespace, "squatter", {"metadata": {"annotations": {"kiloclaw.kilo.ai/retry": "1"}}}
    )
    await stack.wait_phase(namespace, "squatter", "Running", timeout=20)
    await stack.delete_instance(namespace, "squatter")
    await stack.wait_gone(namespace, "squatter")
    assert await claim(stack, "acct-test", contested) is None


@pytest.fixture
async def kube(stack: Stack) -> AsyncIterator[KubeClient]:
    # The operator's own client: on a real API server as its ServiceAccount (KUBECONFIG, see harness).
    conn = await login_connection() if stack.cluster else KubeConnection(server=stack.kube.url)
    client = KubeClient(conn)
    try:
        yield client
    finally:
        await client.aclose()


def spec_of(app: str, sandbox: str) -> InstanceSpec:
    return instance_spec(flyApp=app, sandboxId=sandbox)


async def test_a_claim_held_by_a_live_instance_is_refused_and_one_whose_holder_is_gone_is_taken_over(
    stack: Stack, namespace: str, kube: KubeClient
) -> None:
    live_sandbox, orphan_sandbox = (f"ki_claim_{kind}_{unique(namespace)}" for kind in ("live", "orphan"))
    # A live holder (here claimed by the operator itself; a shard's operator would create the same Lease).
    await stack.create_instance(namespace, "live", sandboxId=live_sandbox, flyApp="acct-x", state="Stopped")
    live = await stack.wait_phase(namespace, "live", "Stopped", timeout=20)
    rival = ObjectRef(namespace="elsewhere", name="rival", uid="uid-rival")
    holder = await acquire_claim(kube, CLAIMS_NAMESPACE, spec_of("acct-x", live_sandbox), rival)
    assert holder == ClaimHolder(namespace=namespace, name="live")
    # A new instance's claim creates first: the conflict then reads who holds it.
    spec = spec_of("acct-x", live_sandbox)
    assert not await create_claim(kube, CLAIMS_NAMESPACE, spec, rival)
    assert await acquire_claim(kube, CLAIMS_NAMESPACE, spec, rival) == holder
    await release_claim(kube, CLAIMS_NAMESPACE, spec_of("acct-x", live_sandbox), rival)
    lease = await kube.get_lease(CLAIMS_NAMESPACE, claim_name("acct-x", live_sandbox))
    assert lease is not None and lease["spec"]["holderIdentity"] == live["metadata"]["uid"]

    # A claim whose holder is gone (a finalizer removed by hand): taken over, then released by its holder.
    orphan = spec_of("acct-x", orphan_sandbox)
    await kube.create_lease(
        CLAIMS_NAMESPACE,
        claim_body(CLAIMS_NAMESPACE, "acct-x", orphan_sandbox, ("gone", "gone", "uid-gone")),
    )
    mine = ObjectRef(namespace=namespace, name="mine", uid="uid-mine")
    assert not await create_claim(kube, CLAIMS_NAMESPACE, orphan, mine)
    assert await acquire_claim(kube, CLAIMS_NAMESPACE, orphan, mine) is None
    assert await acquire_claim(kube, CLAIMS_NAMESPACE, orphan, mine) is None  # already ours
    taken = await kube.get_lease(CLAIMS_NAMESPACE, claim_name("acct-x", orphan_sandbox))
    assert taken is not None and taken["spec"]["holderIdentity"] == "uid-mine"
    await release_claim(kube, CLAIMS_NAMESPACE, orphan, mine)
    assert await kube.get_lease(CLAIMS_NAMESPACE, claim_name("acct-x", orphan_sandbox)) is None

    await stack.delete_instance(namespace, "live")
    await stack.wait_gone(namespace, "live")
    assert await kube.get_lease(CLAIMS_NAMESPACE, claim_name("acct-x", live_sandbox)) is None


async def test_a_new_process_confirms_the_claims_its_instances_hold_from_one_listing_and_nothing_else(
    stack: Stack, namespace: str, kube: KubeClient
) -> None:
    ours, theirs, unclaimed = (f"ki_listed_{kind}_{unique(namespace)}" for kind in ("ours", "theirs", "free"))
    mine = ObjectRef(namespace=namespace, name="mine", uid=f"uid-mine-{unique(namespace)}")
    for sandbox, holder in ((ours, mine), (theirs, ObjectRef(namespace="other", name="x", uid="uid-x"))):
        await kube.create_lease(
            CLAIMS_NAMESPACE,
            claim_body(CLAIMS_NAMESPACE, "acct-x", sandbox, (holder.namespace, holder.name, holder.uid)),
        )
    clock = [0.0]
    listing = ClaimListing(kube, lambda: clock[0], ttl=60)
    # The first asks start the listing and, until it is done, know nothing (those passes read their claim).
    assert not await listing.holds(CLAIMS_NAMESPACE, spec_of("acct-x", ours), mine)
    await eventually(lambda: listing.holds(CLAIMS_NAMESPACE, spec_of("acct-x", ours), mine), timeout=10)
    assert not await listing.holds(CLAIMS_NAMESPACE, spec_of("acct-x", theirs), mine), "held by another uid"
    assert not await listing.holds(CLAIMS_NAMESPACE, spec_of("acct-x", unclaimed), mine), "not held at all"
    clock[0] = 61
    assert not await listing.holds(CLAIMS_NAMESPACE, spec_of("acct-x", ours), mine), (
        "a stale listing proves nothing"
    )
    for sandbox in (ours, theirs):
        lease = await kube.get_lease(CLAIMS_NAMESPACE, claim_name("acct-x", sandbox))
        assert lease is not None
        await kube.delete_lease(
            CLAIMS_NAMESPACE, lease["metadata"]["name"], resource_version=lease["metadata"]["resourceVersion"]
        )


async def test_the_claim_listing_begun_at_start_up_confirms_a_held_claim_on_the_first_ask(
    stack: Stack, namespace: str, kube: KubeClient
) -> None:
    ours = f"ki_started_{unique(namespace)}"
    mine = ObjectRef(namespace=namespace, name="mine", uid=f"uid-started-{unique(namespace)}")
    await kube.create_lease(
        CLAIMS_NAMESPACE, claim_body(CLAIMS_NAMESPACE, "acct-x", ours, (mine.namespace, mine.name, mine.uid))
    )
    listing = ClaimListing(kube, time.monotonic, ttl=60)
    listing.start(CLAIMS_NAMESPACE)
    begun = listing._listing
    assert begun is not None, "begun without a pass asking"
    await asyncio.wait_for(asyncio.shield(begun), 10)
    # A pass asking once the start-up listing is in: confirmed without a read of its own.
    assert await listing.holds(CLAIMS_NAMESPACE, spec_of("acct-x", ours), mine)
    lease = await kube.get_lease(CLAIMS_NAMESPACE, claim_name("acct-x", ours))
    assert lease is not None
    await kube.delete_lease(
        CLAIMS_NAMESPACE, lease["metadata"]["name"], resource_version=lease["metadata"]["resourceVersion"]
    )


# --- adoption by name ---------------------------------------------------------------------------------------


def unique(namespace: str) -> str:
    return namespace.rsplit("-", 2)[-2] + namespace.rsplit("-", 1)[-1]


async def test_a_volume_left_under_the_legacy_name_is_adopted_when_no_other_sandbox_shares_that_name(
    stack: Stack, namespace: str
) -> None:
    sandbox = f"ki_legacy_{unique(namespace)}"
    app = f"acct-{namespace}"
    await claimed_by_an_earlier_attempt(stack, namespace, "heir", app, sandbox)
    left = left_volume(stack, app, legacy_volume_name(sandbox))  # a crash before names carried a hash
    await stack.create_instance(namespace, "heir", sandboxId=sandbox, flyApp=app)
    running = await stack.wait_phase(namespace, "heir", "Running", timeout=20)
    assert status(running)["volumeId"] == left
    await stack.delete_instance(namespace, "heir")
    await stack.wait_gone(namespace, "heir")


async def test_a_legacy_named_volume_two_sandboxes_map_to_is_adopted_by_neither(
    stack: Stack, namespace: str
) -> None:
    other_ns = await stack.create_namespace("other")
    n = unique(namespace)
    first, second = f"Leg-{n}", f"leg_{n}"  # one legacy name, two sandboxes
    assert legacy_volume_name(first) == legacy_volume_name(second)
    # Both look for what an earlier attempt left (each claimed before), and neither may take it.
    await claimed_by_an_earlier_attempt(stack, other_ns, "first", "acct-test", first)
    await claimed_by_an_earlier_attempt(stack, namespace, "second", "acct-test", second)
    ambiguous = left_volume(stack, "acct-test", legacy_volume_name(first))
    await stack.create_instance(other_ns, "first", sandboxId=first, flyApp="acct-test", state="Stopped")
    await stack.create_instance(namespace, "second", sandboxId=second, flyApp="acct-test")
    one = status(await stack.wait_phase(other_ns, "first", "Stopped", timeout=20))
    two = status(await stack.wait_phase(namespace, "second", "Running", timeout=20))
    assert ambiguous not in (one["volumeId"], two["volumeId"])
    assert one["volumeId"] != two["volumeId"]
    names = {v["id"]: v["name"] for v in stack.fly.volumes("acct-test")}
    assert names[one["volumeId"]] == volume_name(first) and names[two["volumeId"]] == volume_name(second)
    for ns, name in ((other_ns, "first"), (namespace, "second")):
        await stack.delete_instance(ns, name)
        await stack.wait_gone(ns, name)
    assert ambiguous in {v["id"] for v in stack.live_volumes("acct-test")}
