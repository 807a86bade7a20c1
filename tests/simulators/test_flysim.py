"""flysim, the Fly Machines API simulator: behaviour over HTTP, fault injection, control API, spec shapes."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from flysim import FlySimulator, SimTimings
from flysim_spec_check import check

TOKEN = "sim-token"
FAST = SimTimings(
    start_delay=0.02, stop_delay=0.02, destroy_delay=0.02, hydrate_delay=0.02, destroyed_retention=30.0
)
_app_numbers = itertools.count()


@pytest.fixture
def sim() -> Iterator[FlySimulator]:
    # These tests poll flysim as fast as they can (behaviour, not pacing); the rate limits have their own.
    simulator = FlySimulator(
        token=TOKEN, regions=("iad", "ord", "cdg"), timings=FAST, seed=7, rate_limits=None
    )
    simulator.start_in_thread()
    yield simulator
    simulator.stop_thread()


@pytest.fixture
def fly(sim: FlySimulator) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"{sim.base_url}/v1", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    ) as client:
        yield client


@pytest.fixture
def control(sim: FlySimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{sim.base_url}/_sim", timeout=10) as client:
        yield client


@pytest.fixture
def app() -> str:
    return f"app-{next(_app_numbers)}"


def eventually(condition: Callable[[], Any], timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.005)


def create_volume(fly: httpx.Client, app: str, region: str = "iad", name: str = "data", **extra: Any) -> Any:
    response = fly.post(f"/apps/{app}/volumes", json={"name": name, "region": region, "size_gb": 10, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def machine_body(volume_id: str | None = None, region: str = "iad", name: str = "m", **metadata: str) -> Any:
    config: dict[str, Any] = {
        "image": "registry.fly.io/kiloclaw:2026.11.1",
        "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 2048},
        "env": {"TZ": "Europe/Berlin"},
        "restart": {"policy": "no"},
        "metadata": metadata,
    }
    if volume_id is not None:
        config["mounts"] = [{"volume": volume_id, "path": "/root"}]
    return {"name": name, "region": region, "config": config}


def create_machine(fly: httpx.Client, app: str, volume_id: str | None = None, **kwargs: Any) -> Any:
    response = fly.post(f"/apps/{app}/machines", json=machine_body(volume_id, **kwargs))
    assert response.status_code == 200, response.text
    return response.json()


def state_of(fly: httpx.Client, app: str, machine_id: str) -> str:
    return str(fly.get(f"/apps/{app}/machines/{machine_id}").json()["state"])


def wait_state(
    fly: httpx.Client, app: str, machine_id: str, state: str, timeout: float = 3
) -> httpx.Response:
    return fly.get(f"/apps/{app}/machines/{machine_id}/wait", params={"state": state, "timeout": timeout})


def started_machine(fly: httpx.Client, app: str, volume_id: str | None = None, **kwargs: Any) -> Any:
    machine = create_machine(fly, app, volume_id, **kwargs)
    assert wait_state(fly, app, machine["id"], "started").status_code == 200
    return machine


# --- machine lifecycle ----------------------------------------------------------------------------------


def test_created_machine_passes_through_starting_to_started_and_stop_reaches_stopped(
    fly: httpx.Client, app: str
) -> None:
    machine = create_machine(fly, app)
    assert machine["state"] == "created"
    assert len(machine["id"]) == 14 and int(machine["id"], 16) >= 0
    seen: list[str] = []

    def reached_started() -> bool:
        seen.append(state_of(fly, app, machine["id"]))
        return seen[-1] == "started"

    eventually(reached_started)
    assert set(seen) <= {"created", "starting", "started"}
    assert fly.post(f"/apps/{app}/machines/{machine['id']}/stop").json() == {"ok": True}
    assert state_of(fly, app, machine["id"]) == "stopping"
    assert wait_state(fly, app, machine["id"], "stopped").json()["state"] == "stopped"
    started = fly.post(f"/apps/{app}/machines/{machine['id']}/start")
    assert started.json()["previous_state"] == "stopped"
    assert state_of(fly, app, machine["id"]) == "starting"
    assert wait_state(fly, app, machine["id"], "started").status_code == 200


def test_skip_launch_leaves_machine_created(fly: httpx.Client, app: str) -> None:
    body = machine_body() | {"skip_launch": True}
    machine = fly.post(f"/apps/{app}/machines", json=body).json()
    assert wait_state(fly, app, machine["id"], "started", timeout=0.2).status_code == 408
    assert state_of(fly, app, machine["id"]) == "created"


def test_destroying_started_machine_without_force_is_refused_with_412(fly: httpx.Client, app: str) -> None:
    machine = started_machine(fly, app)
    response = fly.delete(f"/apps/{app}/machines/{machine['id']}")
    assert response.status_code == 412
    assert "not currently stopped" in response.json()["error"]
    assert state_of(fly, app, machine["id"]) == "started"


def test_force_destroy_goes_destroying_then_destroyed_and_hides_machine_from_default_listing(
    fly: httpx.Client, app: str
) -> None:
    machine = started_machine(fly, app)
    assert fly.delete(f"/apps/{app}/machines/{machine['id']}", params={"force": "true"}).status_code == 200
    assert state_of(fly, app, machine["id"]) == "destroying"
    assert wait_state(fly, app, machine["id"], "destroyed").status_code == 200
    assert state_of(fly, app, machine["id"]) == "destroyed"
    assert fly.get(f"/apps/{app}/machines").json() == []
    deleted = fly.get(f"/apps/{app}/machines", params={"include_deleted": "true"}).json()
    assert [m["id"] for m in deleted] == [machine["id"]]
    again = fly.delete(f"/apps/{app}/machines/{machine['id']}", params={"force": "true"})
    assert again.status_code == 404


def test_stopped_machine_can_be_destroyed_without_force(fly: httpx.Client, app: str) -> None:
    machine = started_machine(fly, app)
    fly.post(f"/apps/{app}/machines/{machine['id']}/stop")
    assert wait_state(fly, app, machine["id"], "stopped").status_code == 200
    assert fly.delete(f"/apps/{app}/machines/{machine['id']}").status_code == 200


def test_destroyed_machine_answers_404_after_the_retention_time(app: str) -> None:
    simulator = FlySimulator(
        token=TOKEN, timings=SimTimings(0.01, 0.01, 0.01, 0.01, 0.0, 0.05), rate_limits=None
    )
    simulator.start_in_thread()
    try:
        with httpx.Client(
            base_url=f"{simulator.base_url}/v1", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as fly:
            machine = create_machine(fly, app)
            fly.delete(f"/apps/{app}/machines/{machine['id']}", params={"force": "true"})
            eventually(lambda: fly.get(f"/apps/{app}/machines/{machine['id']}").status_code == 404)
            assert fly.get(f"/apps/{app}/machines/{machine['id']}").json() == {"error": "machine not found"}
    finally:
        simulator.stop_thread()


def test_update_of_started_machine_restarts_it_with_new_instance_id_and_config(
    fly: httpx.Client, app: str
) -> None:
    machine = started_machine(fly, app)
    body = machine_body()
    body["config"]["image"] = "registry.fly.io/kiloclaw:2026.12.0"
    updated = fly.post(f"/apps/{app}/machines/{machine['id']}", json=body).json()
    assert updated["state"] == "replacing"
    assert updated["instance_id"] != machine["instance_id"]
    assert updated["config"]["image"].endswith("2026.12.0")
    assert updated["updated_at"] > machine["updated_at"]
    assert wait_state(fly, app, machine["id"], "started").json()["version"] == updated["instance_id"]


def test_update_of_stopped_machine_keeps_it_stopped(fly: httpx.Client, app: str) -> None:
    machine = started_machine(fly, app)
    fly.post(f"/apps/{app}/machines/{machine['id']}/stop")
    wait_state(fly, app, machine["id"], "stopped")
    updated = fly.post(f"/apps/{app}/machines/{machine['id']}", json=machine_body()).json()
    assert updated["state"] == "stopped"
    assert wait_state(fly, app, machine["id"], "started", timeout=0.15).status_code == 408


def test_machine_names_are_unique_among_live_machines_of_an_app(fly: httpx.Client, app: str) -> None:
    first = create_machine(fly, app, name="sandbox")
    duplicate = fly.post(f"/apps/{app}/machines", json=machine_body(name="sandbox"))
    assert duplicate.status_code == 409
    assert "unique machine name" in duplicate.json()["error"]
    fly.delete(f"/apps/{app}/machines/{first['id']}", params={"force": "true"})
    assert fly.post(f"/apps/{app}/machines", json=machine_body(name="sandbox")).status_code == 200


def test_machine_list_filters_by_metadata_region_and_state(fly: httpx.Client, app: str) -> None:
    alice = create_machine(fly, app, name="a", kiloclaw_sandbox_id="alice", kiloclaw_user_id="u1")
    bob = create_machine(fly, app, name="b", region="ord", kiloclaw_sandbox_id="bob", kiloclaw_user_id="u1")
    listed = fly.get(f"/apps/{app}/machines", params={"metadata.kiloclaw_sandbox_id": "alice"}).json()
    assert [m["id"] for m in listed] == [alice["id"]]
    both = fly.get(f"/apps/{app}/machines", params={"metadata.kiloclaw_user_id": "u1"}).json()
    assert {m["id"] for m in both} == {alice["id"], bob["id"]}
    none = fly.get(
        f"/apps/{app}/machines",
        params={"metadata.kiloclaw_user_id": "u1", "metadata.kiloclaw_sandbox_id": "x"},
    )
    assert none.json() == []
    assert [m["id"] for m in fly.get(f"/apps/{app}/machines", params={"region": "ord"}).json()] == [bob["id"]]
    wait_state(fly, app, alice["id"], "started")
    wait_state(fly, app, bob["id"], "started")
    fly.post(f"/apps/{app}/machines/{bob['id']}/stop")
    wait_state(fly, app, bob["id"], "stopped")
    stopped = fly.get(f"/apps/{app}/machines", params={"state": "stopped,suspended"}).json()
    assert [m["id"] for m in stopped] == [bob["id"]]
    summary = fly.get(f"/apps/{app}/machines", params={"summary": "true"}).json()
    assert all("config" not in m for m in summary)


# --- wait -----------------------------------------------------------------------------------------------


def test_wait_returns_200_once_the_state_is_reached(fly: httpx.Client, app: str) -> None:
    machine = create_machine(fly, app)
    response = wait_state(fly, app, machine["id"], "started")
    assert response.status_code == 200
    assert response.json()["ok"] is True
    assert response.json()["state"] == "started"


def test_wait_answers_408_when_the_state_is_not_reached_in_time(fly: httpx.Client, app: str) -> None:
    machine = started_machine(fly, app)
    started_at = time.monotonic()
    response = wait_state(fly, app, machine["id"], "stopped", timeout=0.2)
    assert response.status_code == 408
    assert "deadline_exceeded" in response.json()["error"]
    assert 0.15 < time.monotonic() - started_at < 2


def test_wait_accepts_several_states_instance_id_and_rejects_unknown_states(
    fly: httpx.Client, app: str
) -> None:
    machine = started_machine(fly, app)
    params = {"state": "stopped,started", "timeout": 1, "instance_id": machine["instance_id"]}
    assert fly.get(f"/apps/{app}/machines/{machine['id']}/wait", params=params).status_code == 200
    settled = fly.get(f"/apps/{app}/machines/{machine['id']}/wait", params={"state": "settled", "timeout": 1})
    assert settled.status_code == 200
    bad = fly.get(f"/apps/{app}/machines/{machine['id']}/wait", params={"state": "dancing"})
    assert bad.status_code == 400
    assert fly.get(f"/apps/{app}/machines/00000000000000/wait").status_code == 404


def test_wait_wakes_up_when_another_thread_crashes_the_machine(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    machine = started_machine(fly, app)
    results: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: results.append(wait_state(fly, app, machine["id"], "stopped", 5))
    )
    waiter.start()
    eventually(lambda: sim.pending_waits == 1)
    sim.crash_machine(machine["id"])
    waiter.join(timeout=5)
    assert results and results[0].status_code == 200


# --- volumes, pinning, forks, snapshots -----------------------------------------------------------------


def test_volume_has_fly_shaped_id_and_duplicate_names_are_allowed(fly: httpx.Client, app: str) -> None:
    first = create_volume(fly, app, name="kiloclaw_alice")
    second = create_volume(fly, app, name="kiloclaw_alice")
    assert first["id"] != second["id"]
    for volume in (first, second):
        assert volume["id"].startswith("vol_") and len(volume["id"]) == 20
        assert volume["id"][4:].isalnum()
        assert volume["state"] == "created"
        assert volume["attached_machine_id"] is None
        assert volume["snapshot_retention"] == 5
        assert volume["created_at"].endswith("Z")
    assert {v["id"] for v in fly.get(f"/apps/{app}/volumes").json()} == {first["id"], second["id"]}


def test_volume_create_validates_name_size_and_region(fly: httpx.Client, app: str) -> None:
    bad = [
        {"name": "Has-Dash", "region": "iad", "size_gb": 1},
        {"name": "x" * 31, "region": "iad", "size_gb": 1},
        {"name": "ok", "region": "iad", "size_gb": 0},
        {"name": "ok", "region": "iad"},
        {"name": "ok", "region": "mars", "size_gb": 1},
        {"name": "ok", "size_gb": 1},
    ]
    for body in bad:
        response = fly.post(f"/apps/{app}/volumes", json=body)
        assert response.status_code == 400, body
        assert response.json()["error"].startswith("invalid_argument")


def test_machine_must_be_created_in_its_volume_region(fly: httpx.Client, app: str) -> None:
    volume = create_volume(fly, app, region="ord")
    response = fly.post(f"/apps/{app}/machines", json=machine_body(volume["id"], region="iad"))
    assert response.status_code == 400
    assert "is in region 'ord'" in response.json()["error"]
    machine = create_machine(fly, app, volume["id"], region="ord")
    assert machine["region"] == "ord"


def test_machine_runs_on_its_volume_host(sim: FlySimulator, fly: httpx.Client, app: str) -> None:
    volume = create_volume(fly, app)
    machine = create_machine(fly, app, volume["id"])
    assert sim.machine(machine["id"])["host"] == sim.volume(volume["id"])["host"]


def test_volume_bound_to_a_live_machine_cannot_be_mounted_by_another(fly: httpx.Client, app: str) -> None:
    volume = create_volume(fly, app)
    first = create_machine(fly, app, volume["id"], name="first")
    assert fly.get(f"/apps/{app}/volumes/{volume['id']}").json()["attached_machine_id"] == first["id"]
    response = fly.post(f"/apps/{app}/machines", json=machine_body(volume["id"], name="second"))
    assert response.status_code == 412
    assert f"currently bound to machine: {first['id']}" in response.json()["error"]


def test_attached_volume_cannot_be_deleted_until_its_machine_is_destroyed(
    fly: httpx.Client, app: str
) -> None:
    volume = create_volume(fly, app)
    machine = started_machine(fly, app, volume["id"])
    refused = fly.delete(f"/apps/{app}/volumes/{volume['id']}")
    assert refused.status_code == 412
    assert (
        refused.json()["error"]
        == f"failed_precondition: volume is currently bound to machine: {machine['id']}"
    )
    fly.post(f"/apps/{app}/machines/{machine['id']}/stop")
    wait_state(fly, app, machine["id"], "stopped")
    assert fly.delete(f"/apps/{app}/volumes/{volume['id']}").status_code == 412
    fly.delete(f"/apps/{app}/machines/{machine['id']}", params={"force": "true"})
    wait_state(fly, app, machine["id"], "destroyed")
    assert fly.get(f"/apps/{app}/volumes/{volume['id']}").json()["attached_machine_id"] is None
    deleted = fly.delete(f"/apps/{app}/volumes/{volume['id']}")
    assert deleted.status_code == 200
    assert deleted.json()["state"] == "pending_destroy"
    assert fly.get(f"/apps/{app}/volumes/{volume['id']}").status_code == 404


def test_volume_stays_bound_for_the_detach_delay_after_destroy(app: str) -> None:
    timings = SimTimings(0.01, 0.01, 0.01, 0.01, detach_delay=0.3)
    simulator = FlySimulator(token=TOKEN, timings=timings, rate_limits=None)
    simulator.start_in_thread()
    try:
        with httpx.Client(
            base_url=f"{simulator.base_url}/v1", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as fly:
            volume = create_volume(fly, app)
            machine = create_machine(fly, app, volume["id"])
            fly.delete(f"/apps/{app}/machines/{machine['id']}", params={"force": "true"})
            wait_state(fly, app, machine["id"], "destroyed")
            assert fly.delete(f"/apps/{app}/volumes/{volume['id']}").status_code == 412
            eventually(lambda: fly.delete(f"/apps/{app}/volumes/{volume['id']}").status_code == 200)
    finally:
        simulator.stop_thread()


def test_fork_lands_in_requested_region_with_source_size_and_no_snapshots(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    source = create_volume(fly, app, region="iad", size_gb=20)
    sim.add_snapshot(source["id"])
    fork = fly.post(
        f"/apps/{app}/volumes",
        json={
            "name": "kiloclaw_alice",
            "region": "cdg",
            "source_volume_id": source["id"],
            "compute": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 2048},
        },
    )
    assert fork.status_code == 200, fork.text
    forked = fork.json()
    assert forked["region"] == "cdg"
    assert forked["size_gb"] == 20
    assert forked["id"] != source["id"]
    assert forked["state"] == "hydrating"
    eventually(lambda: fly.get(f"/apps/{app}/volumes/{forked['id']}").json()["state"] == "created")
    assert fly.get(f"/apps/{app}/volumes/{forked['id']}/snapshots").json() == []
    assert sim.volume(forked["id"])["source_volume_id"] == source["id"]
    smaller = fly.post(
        f"/apps/{app}/volumes",
        json={"name": "x", "region": "iad", "size_gb": 5, "source_volume_id": source["id"]},
    )
    assert smaller.status_code == 400
    missing = fly.post(
        f"/apps/{app}/volumes", json={"name": "x", "region": "iad", "source_volume_id": "vol_nope"}
    )
    assert missing.status_code == 404


def test_snapshots_are_listed_in_creation_order_and_can_be_created_over_http(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    volume = create_volume(fly, app)
    assert fly.get(f"/apps/{app}/volumes/{volume['id']}/snapshots").json() == []
    first = sim.add_snapshot(volume["id"])
    created = fly.post(f"/apps/{app}/volumes/{volume['id']}/snapshots")
    assert created.status_code == 200
    snapshots = fly.get(f"/apps/{app}/volumes/{volume['id']}/snapshots").json()
    assert len(snapshots) == 2
    assert snapshots[0]["id"] == first["id"] and first["id"].startswith("vs_")
    assert snapshots[0]["status"] == "created"
    assert fly.get(f"/apps/{app}/volumes/vol_0000000000000000/snapshots").status_code == 404


def test_volume_restored_from_snapshot_takes_its_size(sim: FlySimulator, fly: httpx.Client, app: str) -> None:
    volume = create_volume(fly, app, size_gb=30)
    snapshot = sim.add_snapshot(volume["id"])
    restored = fly.post(
        f"/apps/{app}/volumes", json={"name": "restored", "region": "ord", "snapshot_id": snapshot["id"]}
    )
    assert restored.status_code == 200
    assert restored.json()["size_gb"] == 30
    assert restored.json()["region"] == "ord"


# --- org listing ----------------------------------------------------------------------------------------


def test_org_listing_pages_all_apps_by_cursor_in_update_order(fly: httpx.Client, app: str) -> None:
    other = f"{app}-other"
    owners = {}
    for n in range(7):
        owner = app if n % 2 else other
        owners[create_machine(fly, owner, name=f"m{n}")["id"]] = owner
    for machine_id, owner in owners.items():
        wait_state(fly, owner, machine_id, "started")
    ids = list(owners)
    pages: list[list[dict[str, Any]]] = []
    params: dict[str, Any] = {"limit": 3, "summary": "true"}
    while True:
        body = fly.get("/orgs/personal/machines", params=params).json()
        pages.append(body["machines"])
        if "next_cursor" not in body:
            break
        assert body["last_machine_id"] == body["machines"][-1]["id"]
        params = {"limit": 3, "summary": "true", "cursor": body["next_cursor"]}
    listed = [m for page in pages for m in page]
    assert [len(page) for page in pages] == [3, 3, 1]
    assert sorted(m["id"] for m in listed) == sorted(ids)
    assert [m["updated_at"] for m in listed] == sorted(m["updated_at"] for m in listed)
    assert {m["app_name"] for m in listed} == {app, other}
    assert all("config" not in m for m in listed)


def test_org_listing_with_updated_after_returns_only_later_changes(fly: httpx.Client, app: str) -> None:
    quiet = started_machine(fly, app, name="quiet")
    busy = started_machine(fly, app, name="busy")
    body = fly.get("/orgs/personal/machines").json()
    assert {m["id"] for m in body["machines"]} >= {quiet["id"], busy["id"]}
    watermark = body["last_updated_at"]
    assert fly.get("/orgs/personal/machines", params={"updated_after": watermark}).json()["machines"] == []
    fly.post(f"/apps/{app}/machines/{busy['id']}/stop")
    wait_state(fly, app, busy["id"], "stopped")
    later = fly.get("/orgs/personal/machines", params={"updated_after": watermark}).json()
    assert [(m["id"], m["state"]) for m in later["machines"]] == [(busy["id"], "stopped")]
    assert later["machines"][0]["config"]["metadata"] == {}
    fly.delete(f"/apps/{app}/machines/{busy['id']}", params={"force": "true"})
    wait_state(fly, app, busy["id"], "destroyed")
    assert fly.get("/orgs/personal/machines", params={"updated_after": watermark}).json()["machines"] == []
    with_deleted = fly.get(
        "/orgs/personal/machines", params={"updated_after": watermark, "include_deleted": "true"}
    ).json()
    assert [m["state"] for m in with_deleted["machines"]] == ["destroyed"]
    assert fly.get("/orgs/personal/machines", params={"cursor": "garbage!"}).status_code == 400
    assert fly.get("/orgs/personal/machines", params={"updated_after": "yesterday"}).status_code == 400


def test_org_listing_checks_the_slug_when_one_is_configured(app: str) -> None:
    simulator = FlySimulator(token=TOKEN, timings=FAST, org_slug="kilo", rate_limits=None)
    simulator.start_in_thread()
    try:
        with httpx.Client(
            base_url=f"{simulator.base_url}/v1", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as fly:
            assert fly.get("/orgs/kilo/machines").status_code == 200
            assert fly.get("/orgs/other/machines").status_code == 404
    finally:
        simulator.stop_thread()


# --- auth and apps --------------------------------------------------------------------------------------


def test_requests_without_the_right_bearer_token_get_401(sim: FlySimulator, app: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = httpx.get(f"{sim.base_url}/v1/apps/{app}/machines", headers=headers)
        assert response.status_code == 401
        assert "error" in response.json()
    assert sim.machines() == []


def test_unknown_app_is_404_once_known_apps_is_set(sim: FlySimulator, fly: httpx.Client) -> None:
    sim.known_apps = {"acct-1"}
    response = fly.get("/apps/acct-2/machines")
    assert response.status_code == 404
    assert response.json() == {"error": "app not found"}
    assert fly.get("/apps/acct-1/machines").status_code == 200
    assert fly.get("/apps/acct-1").json()["name"] == "acct-1"
    sim.known_apps = None
    assert fly.get("/apps/acct-2/machines").status_code == 200


def test_unknown_route_answers_json_404(fly: httpx.Client) -> None:
    response = fly.get("/nope")
    assert response.status_code == 404
    assert "error" in response.json()


# --- fault injection ------------------------------------------------------------------------------------


def test_failed_host_stops_its_machines_which_cannot_start_again_and_shows_unreachable_on_both(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    volume = create_volume(fly, app)
    machine = started_machine(fly, app, volume["id"])
    hosts = sim.fail_host(machine["id"])
    assert hosts == [sim.machine(machine["id"])["host"]]
    assert wait_state(fly, app, machine["id"], "stopped").status_code == 200
    observed = fly.get(f"/apps/{app}/machines/{machine['id']}").json()
    assert observed["host_status"] == "unreachable"
    assert observed["events"][0]["type"] == "exit"
    refused = fly.post(f"/apps/{app}/machines/{machine['id']}/start")
    assert refused.status_code == 412
    assert "unreachable" in refused.json()["error"]
    shown = fly.get(f"/apps/{app}/volumes/{volume['id']}")
    assert shown.status_code == 200
    assert shown.json()["host_status"] == "unreachable"
    other = create_volume(fly, app, region="ord", name="other")
    assert other["host_status"] == "ok"


def test_a_machine_create_mounting_a_volume_on_a_failed_host_is_refused_naming_the_host(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    volume = create_volume(fly, app)
    sim.fail_host(host=sim.volume(volume["id"])["host"])
    refused = fly.post(f"/apps/{app}/machines", json=machine_body(volume["id"]))
    assert refused.status_code == 412
    assert refused.json()["error"] == f"failed_precondition: host of volume '{volume['id']}' is unreachable"


def test_a_host_can_fail_with_host_status_unknown(sim: FlySimulator, fly: httpx.Client, app: str) -> None:
    volume = create_volume(fly, app)
    machine = started_machine(fly, app, volume["id"])
    sim.fail_host(machine["id"], status="unknown")
    assert fly.get(f"/apps/{app}/machines/{machine['id']}").json()["host_status"] == "unknown"
    assert fly.get(f"/apps/{app}/volumes/{volume['id']}").json()["host_status"] == "unknown"


def test_fork_from_an_unreachable_host_stays_hydrating_and_its_machine_starts_only_when_the_host_returns(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    volume = create_volume(fly, app)
    machine = started_machine(fly, app, volume["id"])
    hosts = sim.fail_host(machine["id"])
    fork = fly.post(
        f"/apps/{app}/volumes", json={"name": "f", "region": "ord", "source_volume_id": volume["id"]}
    )
    assert fork.status_code == 200
    assert fork.json()["state"] == "hydrating"
    replacement = create_machine(fly, app, fork.json()["id"], region="ord", name="replacement")
    assert wait_state(fly, app, replacement["id"], "started", timeout=0.3).status_code == 408
    assert state_of(fly, app, replacement["id"]) == "starting"
    assert fly.get(f"/apps/{app}/volumes/{fork.json()['id']}").json()["state"] == "hydrating"
    assert sim.restore_host(host=hosts[0]) == hosts
    assert wait_state(fly, app, replacement["id"], "started").status_code == 200
    assert fly.get(f"/apps/{app}/volumes/{fork.json()['id']}").json()["state"] == "created"


def test_fork_of_a_volume_on_an_unreachable_host_can_be_refused_instead(
    sim: FlySimulator, fly: httpx.Client, control: httpx.Client, app: str
) -> None:
    volume = create_volume(fly, app)
    started_machine(fly, app, volume["id"])
    sim.fail_host(host=sim.volume(volume["id"])["host"])
    assert control.put("/forks", json={"unreachable": "refused"}).status_code == 200
    assert control.put("/forks", json={"unreachable": "sometimes"}).status_code == 400
    refused = fly.post(
        f"/apps/{app}/volumes", json={"name": "f", "region": "ord", "source_volume_id": volume["id"]}
    )
    assert refused.status_code == 412
    assert "unreachable" in refused.json()["error"]


def test_snapshot_restore_works_while_the_source_host_is_down(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    volume = create_volume(fly, app)
    snapshot = sim.add_snapshot(volume["id"])
    machine = started_machine(fly, app, volume["id"])
    sim.fail_host(machine["id"])
    snapshots = fly.get(f"/apps/{app}/volumes/{volume['id']}/snapshots")
    assert [s["id"] for s in snapshots.json()] == [snapshot["id"]]
    restored = fly.post(
        f"/apps/{app}/volumes", json={"name": "r", "region": "ord", "snapshot_id": snapshot["id"]}
    )
    assert restored.status_code == 200
    replacement = create_machine(fly, app, restored.json()["id"], region="ord", name="replacement")
    assert wait_state(fly, app, replacement["id"], "started").status_code == 200


def test_destroy_on_an_unreachable_host_stays_destroying_until_the_host_returns(
    sim: FlySimulator, fly: httpx.Client, control: httpx.Client, app: str
) -> None:
    volume = create_volume(fly, app)
    machine = started_machine(fly, app, volume["id"])
    sim.fail_host(machine["id"])
    assert fly.delete(f"/apps/{app}/machines/{machine['id']}", params={"force": "true"}).status_code == 200
    assert wait_state(fly, app, machine["id"], "destroyed", timeout=0.3).status_code == 408
    assert state_of(fly, app, machine["id"]) == "destroying"
    assert fly.get(f"/apps/{app}/volumes/{volume['id']}").json()["attached_machine_id"] == machine["id"]
    restored = control.post("/hosts/restore", json={"machine_id": machine["id"]})
    assert restored.json()["restored_hosts"] == [sim.machine(machine["id"])["host"]]
    assert wait_state(fly, app, machine["id"], "destroyed").status_code == 200
    eventually(lambda: fly.get(f"/apps/{app}/volumes/{volume['id']}").json()["attached_machine_id"] is None)


def test_machines_come_back_stopped_when_their_host_returns_and_can_start_again(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    volume = create_volume(fly, app)
    machine = started_machine(fly, app, volume["id"])
    sim.fail_host(machine["id"])
    sim.restore_host(machine["id"])
    observed = fly.get(f"/apps/{app}/machines/{machine['id']}").json()
    assert (observed["state"], observed["host_status"]) == ("stopped", "ok")
    assert fly.post(f"/apps/{app}/machines/{machine['id']}/start").status_code == 200
    assert wait_state(fly, app, machine["id"], "started").status_code == 200


def test_platform_migration_stops_forks_to_a_new_host_and_starts_the_same_machine_on_a_new_volume(
    sim: FlySimulator, fly: httpx.Client, control: httpx.Client, app: str
) -> None:
    volume = create_volume(fly, app)
    machine = started_machine(fly, app, volume["id"])
    old_host = sim.machine(machine["id"])["host"]
    moved = control.post(f"/machines/{machine['id']}/migrate", json={})
    assert moved.status_code == 200
    assert moved.json()["to_host"] != old_host
    assert wait_state(fly, app, machine["id"], "stopped").status_code == 200
    stopped = fly.get(f"/apps/{app}/machines/{machine['id']}").json()
    exit_event = stopped["events"][0]
    assert (exit_event["type"], exit_event["source"]) == ("exit", "flyd")
    assert exit_event["request"]["exit_event"]["requested_stop"] is True
    assert wait_state(fly, app, machine["id"], "started").status_code == 200
    after = fly.get(f"/apps/{app}/machines/{machine['id']}").json()
    new_volume = after["config"]["mounts"][0]["volume"]
    assert new_volume != volume["id"]
    assert sim.machine(machine["id"])["host"] == moved.json()["to_host"]
    assert fly.get(f"/apps/{app}/volumes/{new_volume}").json()["attached_machine_id"] == machine["id"]
    # Once the fork has hydrated, Fly removes the volume the machine left.
    eventually(lambda: fly.get(f"/apps/{app}/volumes/{volume['id']}").status_code == 404)


def test_region_capacity_is_finite_when_limited(
    sim: FlySimulator, fly: httpx.Client, control: httpx.Client, app: str
) -> None:
    assert control.post("/capacity/limit", json={"region": "ord", "machines": 1}).status_code == 200
    create_machine(fly, app, region="ord", name="first")
    refused = fly.post(f"/apps/{app}/machines", json=machine_body(region="ord", name="second"))
    assert refused.status_code == 412
    assert refused.json()["status"] == "insufficient_capacity"
    control.post("/capacity/limit", json={"region": "ord", "machines": None})
    create_machine(fly, app, region="ord", name="second")


def test_a_lying_listing_reports_running_machines_stopped_while_get_tells_the_truth(
    sim: FlySimulator, fly: httpx.Client, control: httpx.Client, app: str
) -> None:
    machine = started_machine(fly, app, create_volume(fly, app)["id"])
    lied = control.post("/listing/lies", json={"machine_ids": [machine["id"]]}).json()["machine_ids"]
    assert lied == [machine["id"]]

    def listed() -> str:
        page = fly.get("/orgs/personal/machines", params={"summary": "true"}).json()
        return next(m["state"] for m in page["machines"] if m["id"] == machine["id"])

    assert listed() == "stopped"
    assert state_of(fly, app, machine["id"]) == "started"
    assert control.delete("/listing/lies").json()["machine_ids"] == [machine["id"]]
    assert listed() == "started"


def test_whole_second_timestamps_give_changes_in_one_second_the_same_updated_at(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    sim.whole_second_timestamps = True
    machine = create_machine(fly, app)
    assert machine["updated_at"].endswith(".000Z")
    assert wait_state(fly, app, machine["id"], "started").status_code == 200
    assert fly.get(f"/apps/{app}/machines/{machine['id']}").json()["updated_at"].endswith(".000Z")


def test_failing_every_host_of_a_region_makes_creates_there_fail_with_capacity(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    sim.fail_host(region="cdg")
    response = fly.post(f"/apps/{app}/volumes", json={"name": "v", "region": "cdg", "size_gb": 1})
    assert response.status_code == 412
    assert "insufficient resources" in response.json()["error"]


def test_exhausted_capacity_rejects_creates_in_that_region_until_restored(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    sim.exhaust_capacity("iad", "volumes")
    refused = fly.post(f"/apps/{app}/volumes", json={"name": "v", "region": "iad", "size_gb": 1})
    assert refused.status_code == 412
    assert refused.json()["status"] == "insufficient_capacity"
    assert "insufficient resources" in refused.json()["error"]
    create_volume(fly, app, region="ord")
    create_machine(fly, app, name="still-fine")
    sim.exhaust_capacity("iad", "machines", status=409)
    memory = fly.post(f"/apps/{app}/machines", json=machine_body(name="other"))
    assert memory.status_code == 409
    assert "insufficient memory" in memory.json()["error"]
    sim.restore_capacity("iad")
    create_volume(fly, app, region="iad")
    create_machine(fly, app, name="other")


def test_injected_fault_with_count_answers_the_next_n_matching_requests(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    sim.inject_faults("POST /v1/apps/*/volumes", 503, count=2)
    body = {"name": "v", "region": "iad", "size_gb": 1}
    assert fly.get(f"/apps/{app}/volumes").status_code == 200
    assert [fly.post(f"/apps/{app}/volumes", json=body).status_code for _ in range(3)] == [503, 503, 200]
    assert len(sim.volumes(app)) == 1


def test_injected_429_carries_retry_after_and_rate_one_hits_every_request(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    sim.inject_faults("GET /v1/apps/*/machines", 429, rate=1.0, retry_after=2)
    for _ in range(3):
        response = fly.get(f"/apps/{app}/machines")
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "2"
        assert response.json() == {"error": "rate limit exceeded"}
    assert fly.get(f"/apps/{app}/volumes").status_code == 200
    sim.clear_faults()
    assert fly.get(f"/apps/{app}/machines").status_code == 200


def test_injected_fault_rate_hits_roughly_that_fraction(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    sim.inject_faults("GET /v1/apps/*/volumes", 500, rate=0.5)
    statuses = [fly.get(f"/apps/{app}/volumes").status_code for _ in range(200)]
    assert set(statuses) == {200, 500}
    assert 60 < statuses.count(500) < 140


def test_single_star_stays_in_one_segment_and_double_star_crosses(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    machine = started_machine(fly, app)
    sim.inject_faults("GET /v1/apps/*/machines/*", 502)
    assert fly.get(f"/apps/{app}/machines/{machine['id']}").status_code == 502
    assert wait_state(fly, app, machine["id"], "started").status_code == 200
    sim.clear_faults()
    sim.inject_faults("* /v1/apps/**", 500)
    assert wait_state(fly, app, machine["id"], "started").status_code == 500


def test_fault_applied_after_the_request_loses_the_reply_but_keeps_the_effect(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    sim.inject_faults("POST /v1/apps/*/volumes", 502, count=1, apply_first=True)
    response = fly.post(f"/apps/{app}/volumes", json={"name": "lost", "region": "iad", "size_gb": 1})
    assert response.status_code == 502
    assert [v["name"] for v in fly.get(f"/apps/{app}/volumes").json()] == ["lost"]


def test_latency_delays_matching_requests(sim: FlySimulator, fly: httpx.Client, app: str) -> None:
    sim.set_latency(0.2, "GET /v1/apps/*/volumes")
    started = time.monotonic()
    fly.get(f"/apps/{app}/volumes")
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    fly.get(f"/apps/{app}/machines")
    assert time.monotonic() - started < 0.2
    sim.clear_latency()
    sim.set_latency(0.15)
    started = time.monotonic()
    fly.get(f"/apps/{app}/machines")
    assert time.monotonic() - started >= 0.15


def test_a_delayed_request_whose_client_hangs_up_is_still_carried_out(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    sim.set_latency(0.5, "POST /v1/apps/*/volumes")
    with pytest.raises(httpx.ReadTimeout):
        fly.post(f"/apps/{app}/volumes", json={"name": "orphan", "region": "iad", "size_gb": 1}, timeout=0.1)
    sim.clear_latency()
    deadline = time.monotonic() + 5
    while not any(v["name"] == "orphan" for v in sim.volumes(app)):
        assert time.monotonic() < deadline, "the abandoned create never landed"
        time.sleep(0.05)


def test_crashed_machine_stops_with_an_exit_event_and_can_be_started_again(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    machine = started_machine(fly, app)
    sim.crash_machine(machine["id"], exit_code=137, oom=True)
    observed = fly.get(f"/apps/{app}/machines/{machine['id']}").json()
    assert observed["state"] == "stopped"
    assert observed["events"][0]["request"]["exit_event"]["oom_killed"] is True
    assert observed["updated_at"] > machine["updated_at"]
    fly.post(f"/apps/{app}/machines/{machine['id']}/start")
    assert wait_state(fly, app, machine["id"], "started").status_code == 200


def test_broken_start_hangs_in_starting_until_repaired(
    sim: FlySimulator, fly: httpx.Client, app: str
) -> None:
    machine = started_machine(fly, app)
    sim.break_machine_start(machine["id"], "hang")
    fly.post(f"/apps/{app}/machines/{machine['id']}/stop")
    wait_state(fly, app, machine["id"], "stopped")
    fly.post(f"/apps/{app}/machines/{machine['id']}/start")
    assert wait_state(fly, app, machine["id"], "started", timeout=0.2).status_code == 408
    assert state_of(fly, app, machine["id"]) == "starting"
    sim.repair_machine_start(machine["id"])
    fly.post(f"/apps/{app}/machines/{machine['id']}/stop")
    wait_state(fly, app, machine["id"], "stopped")
    fly.post(f"/apps/{app}/machines/{machine['id']}/start")
    assert wait_state(fly, app, machine["id"], "started").status_code == 200


def test_broken_start_in_fail_mode_ends_in_failed(sim: FlySimulator, fly: httpx.Client, app: str) -> None:
    machine = create_machine(fly, app)
    sim.break_machine_start(machine["id"], "fail")
    assert wait_state(fly, app, machine["id"], "failed").status_code == 200
    assert wait_state(fly, app, machine["id"], "started", timeout=0.1).status_code == 408


# --- control API ----------------------------------------------------------------------------------------


def test_control_api_drives_every_fault_kind_over_http(
    sim: FlySimulator, fly: httpx.Client, control: httpx.Client, app: str
) -> None:
    volume = control.post("/volumes", json={"app": app, "name": "v", "region": "iad", "size_gb": 3}).json()
    assert fly.get(f"/apps/{app}/volumes/{volume['id']}").json()["size_gb"] == 3
    snapshot = control.post(f"/volumes/{volume['id']}/snapshots").json()
    assert [s["id"] for s in fly.get(f"/apps/{app}/volumes/{volume['id']}/snapshots").json()] == [
        snapshot["id"]
    ]

    machine = started_machine(fly, app, volume["id"])
    assert control.post(f"/machines/{machine['id']}/crash", json={"exit_code": 2}).status_code == 200
    assert state_of(fly, app, machine["id"]) == "stopped"
    assert control.post(f"/machines/{machine['id']}/break_start", json={"mode": "fail"}).status_code == 200
    fly.post(f"/apps/{app}/machines/{machine['id']}/start")
    assert wait_state(fly, app, machine["id"], "failed").status_code == 200
    assert control.post(f"/machines/{machine['id']}/repair_start").status_code == 200
    assert (
        control.post(f"/machines/{machine['id']}/break_start", json={"mode": "sideways"}).status_code == 400
    )

    failed = control.post("/hosts/fail", json={"machine_id": machine["id"]}).json()
    assert failed["failed_hosts"] == [sim.machine(machine["id"])["host"]]
    assert fly.post(f"/apps/{app}/machines/{machine['id']}/start").status_code == 412

    control.post("/capacity/exhaust", json={"region": "ord", "kind": "both"})
    assert (
        fly.post(f"/apps/{app}/volumes", json={"name": "v", "region": "ord", "size_gb": 1}).status_code == 412
    )
    control.post("/capacity/restore", json={"region": "ord"})
    assert (
        fly.post(f"/apps/{app}/volumes", json={"name": "v", "region": "ord", "size_gb": 1}).status_code == 200
    )

    control.post("/faults", json={"route": "GET /v1/apps/*/volumes", "status": 500, "count": 1})
    assert fly.get(f"/apps/{app}/volumes").status_code == 500
    control.post("/faults", json={"route": "GET /v1/apps/*/volumes", "status": 503})
    assert fly.get(f"/apps/{app}/volumes").status_code == 503
    control.delete("/faults")
    assert fly.get(f"/apps/{app}/volumes").status_code == 200

    control.post("/latency", json={"seconds": 0.15})
    started = time.monotonic()
    fly.get(f"/apps/{app}/volumes")
    assert time.monotonic() - started >= 0.15
    control.delete("/latency")

    control.put("/known_apps", json={"apps": ["someone-else"]})
    assert fly.get(f"/apps/{app}/volumes").status_code == 404
    control.put("/known_apps", json={"apps": None})

    state = control.get("/state", params={"app": app}).json()
    assert {m["id"] for m in state["machines"]} == {machine["id"]}
    assert len(state["volumes"]) == 2
    requests = control.get("/requests", params={"tail": 5}).json()
    assert len(requests["log"]) == 5
    assert requests["counts"]["GET /v1/apps/{app_name}/volumes"] >= 5


def test_control_api_requires_its_token_when_one_is_configured() -> None:
    simulator = FlySimulator(token=TOKEN, timings=FAST, control_token="ctl", rate_limits=None)
    simulator.start_in_thread()
    try:
        assert httpx.get(f"{simulator.base_url}/_sim/state").status_code == 401
        ok = httpx.get(f"{simulator.base_url}/_sim/state", headers={"Authorization": "Bearer ctl"})
        assert ok.status_code == 200
    finally:
        simulator.stop_thread()


# --- introspection, serving modes ------------------------------------------------------------------------


def test_request_log_records_method_path_and_status(sim: FlySimulator, fly: httpx.Client, app: str) -> None:
    fly.get(f"/apps/{app}/machines/00000000000000")
    fly.get(f"/apps/{app}/machines")
    log = sim.request_log
    assert [(r.method, r.path, r.status) for r in log[-2:]] == [
        ("GET", f"/v1/apps/{app}/machines/00000000000000", 404),
        ("GET", f"/v1/apps/{app}/machines", 200),
    ]
    assert sim.request_counts["GET /v1/apps/{app_name}/machines/{machine_id}"] == 1


def test_request_log_is_capped(app: str) -> None:
    simulator = FlySimulator(token=TOKEN, timings=FAST, request_log_size=5, rate_limits=None)
    simulator.start_in_thread()
    try:
        with httpx.Client(
            base_url=f"{simulator.base_url}/v1", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as fly:
            for _ in range(8):
                fly.get(f"/apps/{app}/volumes")
        assert len(simulator.request_log) == 5
        assert simulator.request_count("GET /v1/apps/{app_name}/volumes") == 8
    finally:
        simulator.stop_thread()


async def test_simulator_serves_in_the_current_event_loop(app: str) -> None:
    simulator = FlySimulator(token=TOKEN, timings=FAST, rate_limits=None)
    await simulator.start()
    try:
        async with httpx.AsyncClient(
            base_url=f"{simulator.base_url}/v1", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as fly:
            created = (await fly.post(f"/apps/{app}/machines", json=machine_body())).json()
            waited = await fly.get(f"/apps/{app}/machines/{created['id']}/wait", params={"timeout": 2})
            assert waited.status_code == 200
    finally:
        await simulator.stop()


def test_standalone_module_serves_until_interrupted() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "flysim", "--port", str(port), "--token", "cli-token"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:

        def answers() -> bool:
            try:
                response = httpx.get(
                    f"http://127.0.0.1:{port}/v1/apps/cli/machines",
                    headers={"Authorization": "Bearer cli-token"},
                )
            except httpx.TransportError:
                return False
            return response.status_code == 200

        eventually(answers, timeout=15)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_thousand_machines_are_listed_quickly(sim: FlySimulator, fly: httpx.Client, app: str) -> None:
    for n in range(1000):
        sim.state.create_machine(app, machine_body(name=f"bulk-{n}", kiloclaw_sandbox_id=f"s{n}"))
    eventually(lambda: all(m["state"] == "started" for m in sim.machines(app)), timeout=10)
    started = time.monotonic()
    body = fly.get("/orgs/personal/machines", params={"summary": "true", "limit": 1000}).json()
    one = fly.get(f"/apps/{app}/machines", params={"metadata.kiloclaw_sandbox_id": "s500"}).json()
    elapsed = time.monotonic() - started
    assert len(body["machines"]) == 1000
    assert [m["name"] for m in one] == ["bulk-500"]
    assert elapsed < 1.0


# --- spec shapes ----------------------------------------------------------------------------------------


def test_responses_validate_against_the_openapi_spec(sim: FlySimulator, fly: httpx.Client, app: str) -> None:
    volume = create_volume(fly, app)
    check(volume, "Volume")
    machine = started_machine(fly, app, volume["id"], kiloclaw_sandbox_id="alice")
    check(machine, "Machine")
    check(machine["config"], "fly.MachineConfig")
    check(fly.get(f"/apps/{app}/machines/{machine['id']}").json(), "Machine")
    check(fly.get(f"/apps/{app}/machines").json(), "Machine", array=True)
    check(fly.get(f"/apps/{app}/machines", params={"summary": "true"}).json(), "Machine", array=True)
    check(wait_state(fly, app, machine["id"], "started").json(), "WaitMachineResponse")
    attached = fly.get(f"/apps/{app}/volumes/{volume['id']}").json()
    assert attached["attached_machine_id"] == machine["id"]
    check(attached, "Volume")
    check(fly.get(f"/apps/{app}/volumes").json(), "Volume", array=True)
    sim.add_snapshot(volume["id"])
    check(fly.get(f"/apps/{app}/volumes/{volume['id']}/snapshots").json(), "VolumeSnapshot", array=True)
    check(fly.get("/orgs/personal/machines").json(), "OrgMachinesResponse")
    check(
        fly.get("/orgs/personal/machines", params={"summary": "true", "limit": 1}).json(),
        "OrgMachinesResponse",
    )
    check(fly.get(f"/apps/{app}").json(), "App")
    sim.crash_machine(machine["id"])
    check(fly.get(f"/apps/{app}/machines/{machine['id']}").json(), "Machine")
    errors = [
        fly.get(f"/apps/{app}/machines/00000000000000"),
        fly.delete(f"/apps/{app}/volumes/{volume['id']}"),
        wait_state(fly, app, machine["id"], "started", timeout=0.05),
        httpx.get(f"{sim.base_url}/v1/apps/{app}/machines"),
    ]
    sim.exhaust_capacity("ord")
    errors.append(fly.post(f"/apps/{app}/volumes", json={"name": "v", "region": "ord", "size_gb": 1}))
    assert [e.status_code for e in errors] == [404, 412, 408, 401, 412]
    for error in errors:
        check(error.json(), "ErrorResponse")
    fly.delete(f"/apps/{app}/machines/{machine['id']}", params={"force": "true"})
    wait_state(fly, app, machine["id"], "destroyed")
    check(fly.delete(f"/apps/{app}/volumes/{volume['id']}").json(), "Volume")


def test_spec_check_rejects_misspelt_fields() -> None:
    with pytest.raises(AssertionError, match="attached_machine"):
        check({"id": "vol_x", "attached_machine": "m"}, "Volume")
    with pytest.raises(Exception, match="is not of type"):
        check({"id": 5}, "Machine")
