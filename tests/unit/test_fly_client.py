"""The Fly Machines API client: error taxonomy, retry policy, payload models, round trips against flysim."""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from builders import FLY_TOKEN as TOKEN
from flysim import FlySimulator, RequestRecord
from kiloclaw_operator.fly import (
    Capacity,
    Fatal,
    FlyClient,
    FlyError,
    Guest,
    HostUnavailable,
    Machine,
    MachineConfig,
    Mount,
    NotFound,
    NotLeading,
    OrgMachinesPage,
    RateLimited,
    RestartPolicy,
    Transient,
    Unauthorized,
    Volume,
    backoff_delay,
    classify,
    parse_retry_after,
)

# Classification


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, '{"error":"machine not found"}', NotFound),
        (401, '{"error":"unauthorized"}', Unauthorized),
        (403, '{"error":"you do not have access to this app"}', Unauthorized),
        (429, '{"error":"rate limited"}', RateLimited),
        (408, '{"error":"request timeout"}', Transient),
        (500, "internal error", Transient),
        (502, "<html>bad gateway</html>", Transient),
        (503, "", Transient),
        (None, "", Transient),
        (400, '{"error":"invalid image"}', Fatal),
        (422, '{"error":"invalid config"}', Fatal),
        (409, '{"error":"volume is attached to a machine"}', Fatal),
        (412, '{"error":"precondition failed"}', Fatal),
        (412, '{"error":"failed_precondition: machine host is unreachable"}', HostUnavailable),
        (412, '{"error":"failed_precondition: host of volume \'vol_1\' is unreachable"}', HostUnavailable),
        (
            412,
            '{"error":"failed_precondition: host of source volume \'vol_1\' is unreachable"}',
            HostUnavailable,
        ),
        (412, '{"error":"failed_precondition: machine host is unavailable"}', HostUnavailable),
        (412, '{"error":"failed_precondition: volume is unreachable"}', Fatal),
    ],
)
def test_status_and_body_map_to_one_error_type(
    status: int | None, body: str, expected: type[FlyError]
) -> None:
    assert classify(status, body) is expected


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, '{"error":"no capacity available in region iad"}'),
        (403, '{"error":"Insufficient resources to place machine"}'),
        (409, "INSUFFICIENT MEMORY on all hosts"),
        (412, '{"error":"you are over the allowed quota for volumes"}'),
        (500, '{"error":"could not reserve resource","status":"insufficient_capacity"}'),
        (422, '{"status":"insufficient_capacity"}'),
    ],
)
def test_capacity_bodies_are_capacity_errors(status: int, body: str) -> None:
    assert classify(status, body) is Capacity


@pytest.mark.parametrize("status", [404, 422, 500, 401])
def test_capacity_phrases_outside_placement_statuses_are_not_capacity(status: int) -> None:
    assert classify(status, '{"error":"no capacity"}') is not Capacity


def test_error_text_names_method_templated_route_and_status() -> None:
    error = NotFound("machine not found", status=404, method="GET", route="/apps/{app}/machines/{id}")
    assert str(error) == "GET /apps/{app}/machines/{id} 404: machine not found"
    assert "NotFound(status=404" in repr(error)


def test_rate_limited_error_carries_the_servers_retry_hint() -> None:
    error = RateLimited("slow down", status=429, method="GET", route="/apps/{app}/machines", retry_after=2.5)
    assert error.retry_after == 2.5
    assert "retry_after=2.5" in repr(error)


# Retry policy


def test_retry_after_in_seconds_is_read_as_a_delay() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.25 ") == 0.25


def test_retry_after_as_http_date_is_the_time_until_that_date() -> None:
    now = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert parse_retry_after(header, now=now) == pytest.approx(7.0)


def test_retry_after_in_the_past_means_no_wait() -> None:
    now = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after(format_datetime(now - timedelta(minutes=5), usegmt=True), now=now) == 0.0
    assert parse_retry_after("-4") == 0.0


@pytest.mark.parametrize("header", [None, "", "soon", "nan", "Wed, 99 Foo 20x"])
def test_unreadable_retry_after_is_ignored(header: str | None) -> None:
    assert parse_retry_after(header) is None


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    ceilings = [
        backoff_delay(attempt, base=0.2, cap=10.0, random_fraction=lambda: 1.0) for attempt in range(8)
    ]
    assert ceilings == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0])
    assert backoff_delay(10_000, base=0.2, cap=10.0, random_fraction=lambda: 1.0) == 10.0


def test_backoff_is_full_jitter_between_zero_and_the_ceiling() -> None:
    assert backoff_delay(3, base=0.2, cap=10.0, random_fraction=lambda: 0.0) == 0.0
    delays = [backoff_delay(3, base=0.2, cap=10.0) for _ in range(200)]
    assert all(0.0 <= delay <= 1.6 for delay in delays)
    assert len(set(delays)) > 100


# Payload models


def test_machine_payload_from_the_spec_parses_and_exposes_metadata() -> None:
    machine = Machine.model_validate(
        {
            "id": "148ed123",
            "name": "ki_abc",
            "state": "started",
            "region": "iad",
            "instance_id": "01JDXYZ",
            "private_ip": "fdaa::3",
            "config": {
                "image": "registry.fly.io/kiloclaw:1",
                "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 2048},
                "env": {"TZ": "UTC"},
                "mounts": [{"volume": "vol_1", "path": "/root", "name": "data"}],
                "restart": {"policy": "no"},
                "metadata": {"kiloclaw_sandbox_id": "ki_abc"},
                "services": [],
            },
            "created_at": "2026-11-25T12:00:00Z",
            "updated_at": "2026-11-25T12:00:01.123456789Z",
            "events": [],
        }
    )
    assert machine.metadata == {"kiloclaw_sandbox_id": "ki_abc"}
    assert machine.config is not None and machine.config.mounts[0].volume == "vol_1"
    assert machine.created_at == datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_machine_without_config_has_empty_metadata() -> None:
    assert Machine.model_validate({"id": "m1", "state": "destroyed"}).metadata == {}


def test_volume_with_blank_attachment_is_detached() -> None:
    volume = Volume.model_validate(
        {"id": "vol_1", "attached_machine_id": "", "size_gb": 10, "state": "created"}
    )
    assert volume.attached_machine_id is None


def test_org_page_without_cursor_is_the_last_page() -> None:
    page = OrgMachinesPage.model_validate(
        {"machines": [{"id": "m1", "app_name": "a", "state": "stopped"}], "next_cursor": ""}
    )
    assert page.next_cursor is None
    assert page.machines[0].metadata == {}


def test_machine_config_request_body_omits_unset_parts() -> None:
    body = MachineConfig(image="img").model_dump(mode="json", exclude_none=True)
    assert body == {"image": "img", "env": {}, "mounts": [], "metadata": {}}


async def test_client_repr_never_shows_the_token() -> None:
    async with FlyClient("http://127.0.0.1:1", "s3cr3t-token") as client:
        assert "s3cr3t-token" not in repr(client)


def test_metrics_module_can_be_imported_twice() -> None:
    import kiloclaw_operator.fly.metrics as metrics

    first = metrics.FLY_REQUESTS
    reloaded = importlib.reload(metrics)
    assert reloaded.FLY_REQUESTS is first


# Round trips against flysim

APP = "acct-fly-client"


def sandbox_config(
    volume_id: str, *, sandbox_id: str = "ki_one", image: str = "registry.fly.io/kc:1"
) -> MachineConfig:
    return MachineConfig(
        image=image,
        guest=Guest(cpu_kind="shared", cpus=1, memory_mb=2048),
        env={"TZ": "Europe/Berlin"},
        mounts=[Mount(volume=volume_id, path="/root")],
        restart=RestartPolicy(policy="no"),
        metadata={"kiloclaw_sandbox_id": sandbox_id, "kiloclaw_user_id": "user-1"},
    )


async def eventually_holds(predicate: Callable[[], bool], deadline: float = 5.0) -> None:
    async with asyncio.timeout(deadline):
        while not predicate():  # noqa: ASYNC110 - a plain predicate, nothing to await on
            await asyncio.sleep(0.01)


def requests_to(sim: FlySimulator, method: str, path: str) -> list[RequestRecord]:
    return [record for record in sim.request_log if record.method == method and record.path == path]


def fly_requests(method: str, route: str, code: str) -> float:
    labels = {"method": method, "route": route, "code": code}
    return REGISTRY.get_sample_value("kiloclaw_fly_requests_total", labels) or 0.0


async def eventually_not_found(check: Callable[[], Awaitable[object]], deadline: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline
    while True:
        try:
            await check()
        except NotFound:
            return
        assert loop.time() < give_up, "still found at the deadline"
        await asyncio.sleep(0.02)


async def test_machine_lifecycle_round_trips(fly: FlyClient) -> None:
    volume = await fly.create_volume(APP, name="kiloclaw_ki_one", region="iad", size_gb=10)
    machine = await fly.create_machine(APP, name="ki_one", region="iad", config=sandbox_config(volume.id))
    assert (machine.name, machine.region) == ("ki_one", "iad")
    assert machine.metadata["kiloclaw_sandbox_id"] == "ki_one"

    assert await fly.wait_machine(APP, machine.id, "started", timeout_seconds=5)
    fetched = await fly.get_machine(APP, machine.id)
    assert fetched.state == "started"
    assert fetched.config is not None and fetched.config.mounts == [Mount(volume=volume.id, path="/root")]
    assert (await fly.get_volume(APP, volume.id)).attached_machine_id == machine.id

    updated = await fly.update_machine(
        APP, machine.id, sandbox_config(volume.id, image="registry.fly.io/kc:2")
    )
    assert updated.config is not None and updated.config.image == "registry.fly.io/kc:2"
    assert updated.instance_id != fetched.instance_id

    await fly.stop_machine(APP, machine.id)
    assert await fly.wait_machine(APP, machine.id, "stopped", timeout_seconds=5)
    await fly.start_machine(APP, machine.id)
    assert await fly.wait_machine(APP, machine.id, "started", timeout_seconds=5)

    await fly.destroy_machine(APP, machine.id)
    assert await fly.wait_machine(APP, machine.id, "destroyed", timeout_seconds=5)
    assert [m.id for m in await fly.list_machines(APP)] == []
    assert [m.id for m in await fly.list_machines(APP, include_deleted=True)] == [machine.id]


async def test_machines_are_listed_by_metadata(fly: FlyClient) -> None:
    first = await fly.create_volume(APP, name="kiloclaw_a", region="iad", size_gb=1)
    second = await fly.create_volume(APP, name="kiloclaw_b", region="iad", size_gb=1)
    machine_a = await fly.create_machine(
        APP, name="a", region="iad", config=sandbox_config(first.id, sandbox_id="a")
    )
    await fly.create_machine(APP, name="b", region="iad", config=sandbox_config(second.id, sandbox_id="b"))

    found = await fly.list_machines(APP, metadata={"kiloclaw_sandbox_id": "a"})
    assert [m.id for m in found] == [machine_a.id]
    assert await fly.list_machines(APP, metadata={"kiloclaw_sandbox_id": "a", "kiloclaw_user_id": "x"}) == []
    assert len(await fly.list_machines(APP)) == 2


async def test_volume_fork_snapshots_and_delete_round_trip(sim: FlySimulator, fly: FlyClient) -> None:
    source = await fly.create_volume(APP, name="kiloclaw_src", region="iad", size_gb=3)
    assert (source.name, source.region, source.size_gb, source.attached_machine_id) == (
        "kiloclaw_src",
        "iad",
        3,
        None,
    )
    assert await fly.list_volume_snapshots(APP, source.id) == []
    sim.add_snapshot(source.id)
    snapshots = await fly.list_volume_snapshots(APP, source.id)
    assert len(snapshots) == 1 and snapshots[0].id

    fork = await fly.create_volume(
        APP, name="kiloclaw_src", region="ord", source_volume_id=source.id, compute=Guest(memory_mb=2048)
    )
    assert (fork.region, fork.size_gb) == ("ord", 3)
    assert {v.id for v in await fly.list_volumes(APP)} == {source.id, fork.id}

    await fly.delete_volume(APP, fork.id)
    await eventually_not_found(lambda: fly.get_volume(APP, fork.id))
    assert [v.id for v in await fly.list_volumes(APP)] == [source.id]


async def test_org_listing_pages_with_a_cursor_and_filters_by_update_time(fly: FlyClient) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    for name in ("p1", "p2", "p3"):
        volume = await fly.create_volume(APP, name=f"kiloclaw_{name}", region="ord", size_gb=1)
        await fly.create_machine(
            APP, name=name, region="ord", config=sandbox_config(volume.id, sandbox_id=name)
        )

    seen: list[str] = []
    page = await fly.list_org_machines("kilo", updated_after=before, limit=2)
    seen += [m.id for m in page.machines]
    while page.next_cursor is not None:
        page = await fly.list_org_machines("kilo", cursor=page.next_cursor, limit=2)
        seen += [m.id for m in page.machines]
    machines = await fly.list_machines(APP)
    assert set(seen) == {m.id for m in machines}
    assert all(m.app_name == APP for m in page.machines)

    future = await fly.list_org_machines("kilo", updated_after=datetime.now(UTC) + timedelta(hours=1))
    assert future.machines == [] and future.next_cursor is None

    full = await fly.list_org_machines("kilo", updated_after=before, summary=False)
    assert {m.metadata["kiloclaw_sandbox_id"] for m in full.machines} >= {"p1", "p2", "p3"}


async def test_missing_machine_and_volume_raise_not_found_with_templated_route(fly: FlyClient) -> None:
    with pytest.raises(NotFound) as missing_machine:
        await fly.get_machine(APP, "0123456789abcd")
    assert missing_machine.value.status == 404
    assert missing_machine.value.route == "/apps/{app}/machines/{id}"
    assert missing_machine.value.method == "GET"
    with pytest.raises(NotFound):
        await fly.delete_volume(APP, "vol_doesnotexist0000")


async def test_destroying_a_destroyed_machine_is_not_found_for_the_caller_to_judge(fly: FlyClient) -> None:
    volume = await fly.create_volume(APP, name="kiloclaw_gone", region="iad", size_gb=1)
    machine = await fly.create_machine(APP, name="gone", region="iad", config=sandbox_config(volume.id))
    await fly.destroy_machine(APP, machine.id)
    assert await fly.wait_machine(APP, machine.id, "destroyed", timeout_seconds=5)
    with pytest.raises(NotFound):
        await fly.destroy_machine(APP, machine.id)


async def test_wrong_token_is_unauthorized_and_never_shown(
    sim: FlySimulator, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "wrong-secret-token-9d2e"
    caplog.set_level(logging.DEBUG, logger="kiloclaw.fly")
    async with FlyClient(sim.base_url, secret, backoff_base=0.01) as client:
        with pytest.raises(Unauthorized) as raised:
            await client.list_machines(APP)
    assert raised.value.status == 401
    assert secret not in str(raised.value) and secret not in repr(raised.value)
    assert all(secret not in repr(record.__dict__) for record in caplog.records)
    assert len(requests_to(sim, "GET", f"/v1/apps/{APP}/machines")) == 1


async def test_echoed_token_is_redacted_from_error_messages(sim: FlySimulator, fly: FlyClient) -> None:
    sim.inject_faults("GET /v1/apps/*/volumes", 400, count=1, message=f"bad header Bearer {TOKEN}")
    with pytest.raises(Fatal) as raised:
        await fly.list_volumes(APP)
    assert TOKEN not in str(raised.value)
    assert "[redacted]" in raised.value.message


async def test_exhausted_region_raises_capacity(sim: FlySimulator, fly: FlyClient) -> None:
    sim.exhaust_capacity("iad", "volumes")
    with pytest.raises(Capacity):
        await fly.create_volume(APP, name="kiloclaw_cap", region="iad", size_gb=1)
    volume = await fly.create_volume(APP, name="kiloclaw_cap", region="ord", size_gb=1)

    sim.exhaust_capacity("ord", "machines", status=409)
    with pytest.raises(Capacity) as raised:
        await fly.create_machine(APP, name="cap", region="ord", config=sandbox_config(volume.id))
    assert raised.value.status == 409


async def test_two_service_unavailable_answers_are_retried_until_success(
    sim: FlySimulator, fly: FlyClient
) -> None:
    volume = await fly.create_volume(APP, name="kiloclaw_r", region="iad", size_gb=1)
    sim.inject_faults("GET /v1/apps/*/volumes/*", 503, count=2)
    assert (await fly.get_volume(APP, volume.id)).id == volume.id
    statuses = [r.status for r in requests_to(sim, "GET", f"/v1/apps/{APP}/volumes/{volume.id}")]
    assert statuses == [503, 503, 200]


async def test_update_is_retried_after_a_gateway_error(sim: FlySimulator, fly: FlyClient) -> None:
    volume = await fly.create_volume(APP, name="kiloclaw_u", region="iad", size_gb=1)
    machine = await fly.create_machine(APP, name="u", region="iad", config=sandbox_config(volume.id))
    sim.inject_faults("POST /v1/apps/*/machines/*", 502, count=1)
    updated = await fly.update_machine(APP, machine.id, sandbox_config(volume.id, image="img:2"))
    assert updated.config is not None and updated.config.image == "img:2"


async def test_rate_limit_waits_for_retry_after_before_retrying(sim: FlySimulator, fly: FlyClient) -> None:
    sim.inject_faults("GET /v1/apps/*/volumes", 429, count=1, retry_after=0.2)
    assert await fly.list_volumes(APP) == []
    first, second = requests_to(sim, "GET", f"/v1/apps/{APP}/volumes")
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 0.18


async def test_long_retry_after_is_handed_to_the_caller_without_waiting(
    sim: FlySimulator, fly: FlyClient
) -> None:
    sim.inject_faults("GET /v1/apps/*/volumes", 429, count=1, retry_after=30)
    with pytest.raises(RateLimited) as raised:
        await fly.list_volumes(APP)
    assert raised.value.retry_after == 30.0
    assert len(requests_to(sim, "GET", f"/v1/apps/{APP}/volumes")) == 1


async def test_persistent_rate_limit_raises_rate_limited_with_the_hint(
    sim: FlySimulator, fly: FlyClient
) -> None:
    sim.inject_faults("GET /v1/apps/*/machines", 429, retry_after=0.01)
    with pytest.raises(RateLimited) as raised:
        await fly.list_machines(APP)
    assert raised.value.retry_after == pytest.approx(0.01)
    assert len(requests_to(sim, "GET", f"/v1/apps/{APP}/machines")) == 4


async def test_create_volume_is_never_retried(sim: FlySimulator, fly: FlyClient) -> None:
    sim.inject_faults("POST /v1/apps/*/volumes", 500, count=1)
    with pytest.raises(Transient):
        await fly.create_volume(APP, name="kiloclaw_once", region="iad", size_gb=1)
    assert len(requests_to(sim, "POST", f"/v1/apps/{APP}/volumes")) == 1
    assert sim.volumes(APP) == []


async def test_create_machine_with_a_lost_reply_is_not_retried_and_can_be_adopted(
    sim: FlySimulator, fly: FlyClient
) -> None:
    volume = await fly.create_volume(APP, name="kiloclaw_lost", region="iad", size_gb=1)
    sim.inject_faults("POST /v1/apps/*/machines", 503, count=1, apply_first=True)
    with pytest.raises(Transient):
        await fly.create_machine(
            APP, name="lost", region="iad", config=sandbox_config(volume.id, sandbox_id="lost")
        )
    assert len(requests_to(sim, "POST", f"/v1/apps/{APP}/machines")) == 1
    adopted = await fly.list_machines(APP, metadata={"kiloclaw_sandbox_id": "lost"})
    assert [m.name for m in adopted] == ["lost"]


async def test_retries_exhausted_raise_transient(sim: FlySimulator, fly: FlyClient) -> None:
    sim.inject_faults("DELETE /v1/apps/*/machines/*", 503)
    with pytest.raises(Transient) as raised:
        await fly.destroy_machine(APP, "0123456789abcd")
    assert raised.value.status == 503
    assert len(requests_to(sim, "DELETE", f"/v1/apps/{APP}/machines/0123456789abcd")) == 4


async def test_unreachable_api_is_transient_and_counted_as_error() -> None:
    route = "/apps/{app}/volumes"
    before = fly_requests("GET", route, "error")
    async with FlyClient(
        "http://127.0.0.1:9", TOKEN, max_retries=1, backoff_base=0.01, timeout=2.0
    ) as client:
        with pytest.raises(Transient) as raised:
            await client.list_volumes(APP)
    assert raised.value.status is None
    assert fly_requests("GET", route, "error") == before + 2


async def test_wait_that_times_out_returns_false(sim: FlySimulator, fly: FlyClient) -> None:
    volume = await fly.create_volume(APP, name="kiloclaw_hang", region="iad", size_gb=1)
    machine = await fly.create_machine(APP, name="hang", region="iad", config=sandbox_config(volume.id))
    assert await fly.wait_machine(APP, machine.id, "started", timeout_seconds=5)
    await fly.stop_machine(APP, machine.id)
    assert await fly.wait_machine(APP, machine.id, "stopped", timeout_seconds=5)
    sim.break_machine_start(machine.id, "hang")
    await fly.start_machine(APP, machine.id)
    assert await fly.wait_machine(APP, machine.id, "started", timeout_seconds=1) is False
    waits = requests_to(sim, "GET", f"/v1/apps/{APP}/machines/{machine.id}/wait")
    assert [record.status for record in waits] == [200, 200, 408]


async def test_requests_are_counted_by_templated_route_and_status(sim: FlySimulator, fly: FlyClient) -> None:
    route = "/apps/{app}/machines/{id}"
    found_before, missing_before = fly_requests("GET", route, "200"), fly_requests("GET", route, "404")
    volume = await fly.create_volume(APP, name="kiloclaw_m", region="iad", size_gb=1)
    machine = await fly.create_machine(APP, name="m", region="iad", config=sandbox_config(volume.id))
    await fly.get_machine(APP, machine.id)
    with pytest.raises(NotFound):
        await fly.get_machine(APP, "0123456789abcd")
    # The registry is process-wide: an end-to-end operator of this worker may read machines meanwhile.
    assert fly_requests("GET", route, "200") >= found_before + 1
    assert fly_requests("GET", route, "404") == missing_before + 1
    observed = REGISTRY.get_sample_value(
        "kiloclaw_fly_request_duration_seconds_count", {"method": "GET", "route": route}
    )
    assert observed is not None and observed >= 2
    assert all(machine.id not in str(metric) for metric in REGISTRY.collect())


async def test_a_token_file_is_read_again_when_the_secret_is_rotated_and_the_401_state_clears(
    sim: FlySimulator, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("revoked-token\n")
    async with FlyClient(sim.base_url, "", token_file=str(token_file), backoff_base=0.01) as client:
        with pytest.raises(Unauthorized):
            await client.list_machines(APP)
        assert client.authorized is False
        assert REGISTRY.get_sample_value("kiloclaw_fly_unauthorized") == 1

        token_file.write_text(TOKEN + "\n")  # the kubelet updates the mounted Secret
        assert await client.list_machines(APP) == []
        assert client.authorized is True
        assert REGISTRY.get_sample_value("kiloclaw_fly_unauthorized") == 0
    # Every request carried the token of its moment, and the old one was never retried in a loop.
    assert len(requests_to(sim, "GET", f"/v1/apps/{APP}/machines")) == 2


async def test_a_rotated_token_file_that_is_not_utf8_keeps_the_last_good_token_and_says_so(
    sim: FlySimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    async with FlyClient(sim.base_url, "", token_file=str(token_file), backoff_base=0.01) as client:
        assert await client.list_machines(APP) == []
        token_file.write_bytes(b"\xff\xfe garbage")  # a bad write of the Secret
        with caplog.at_level(logging.WARNING):
            assert await client.list_machines(APP) == []
            assert await client.list_machines(APP) == []
        assert client.authorized is True
    warnings = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert warnings == [
        f"the Fly API token file {token_file} is not UTF-8 text (byte 0xff at offset 0); keeping the last "
        "good token"
    ]


async def test_a_replica_that_is_not_sure_it_leads_sends_no_changing_call_but_still_reads(
    sim: FlySimulator, fly: FlyClient
) -> None:
    volume = await fly.create_volume(APP, name="kiloclaw_ki_fenced", region="iad", size_gb=1)
    machine = await fly.create_machine(APP, name="ki_fenced", region="iad", config=sandbox_config(volume.id))
    leading = False
    fenced = FlyClient(sim.base_url, TOKEN, max_retries=3, fence=lambda: leading)
    try:
        sent_before = len(sim.request_log)
        with pytest.raises(NotLeading):
            await fenced.stop_machine(APP, machine.id)
        with pytest.raises(NotLeading):
            await fenced.create_volume(APP, name="kiloclaw_ki_other", region="iad", size_gb=1)
        with pytest.raises(NotLeading):
            await fenced.destroy_machine(APP, machine.id)
        assert len(sim.request_log) == sent_before, "nothing reached Fly"
        assert (await fenced.get_machine(APP, machine.id)).id == machine.id
        leading = True
        await fenced.stop_machine(APP, machine.id)
    finally:
        await fenced.aclose()
    assert requests_to(sim, "POST", f"/v1/apps/{APP}/machines/{machine.id}/stop")


async def test_a_changing_call_that_waited_for_a_connection_slot_is_not_sent_once_leadership_lapsed(
    sim: FlySimulator, fly: FlyClient
) -> None:
    volume = await fly.create_volume(APP, name="kiloclaw_ki_slot", region="iad", size_gb=1)
    machine = await fly.create_machine(APP, name="ki_slot", region="iad", config=sandbox_config(volume.id))
    leading = True
    fenced = FlyClient(sim.base_url, TOKEN, max_retries=3, max_connections=1, fence=lambda: leading)
    sim.set_latency(1.0, route="GET /v1/apps/*/machines/*")
    try:
        holding_the_slot = asyncio.create_task(fenced.get_machine(APP, machine.id))
        await eventually_holds(lambda: fenced._slots.locked())  # the one slot is taken by the slow read
        # Admitted while leading, then queued behind the slow read; the Lease lapses meanwhile.
        stopping = asyncio.create_task(fenced.stop_machine(APP, machine.id))
        await asyncio.sleep(0)
        leading = False
        with pytest.raises(NotLeading):
            await stopping
        await holding_the_slot
    finally:
        sim.set_latency(0.0, route="GET /v1/apps/*/machines/*")
        await fenced.aclose()
    assert not requests_to(sim, "POST", f"/v1/apps/{APP}/machines/{machine.id}/stop"), "nothing reached Fly"


@pytest.mark.parametrize("fly_ahead_seconds", [-3600.0, 600.0, 0.4])
async def test_a_fly_timestamp_is_told_in_our_clock_by_the_offset_its_date_header_shows(
    sim: FlySimulator, fly: FlyClient, fly_ahead_seconds: float
) -> None:
    sim.clock_offset = fly_ahead_seconds
    try:
        before = datetime.now(UTC)
        volume = await fly.create_volume(APP, name="kiloclaw_clock", region="iad", size_gb=1)
        after = datetime.now(UTC)
    finally:
        sim.clock_offset = 0.0
    assert volume.created_at is not None
    # The Date header has whole seconds: a small skew is within them.
    slack = timedelta(seconds=2)
    assert before - slack <= fly.in_our_clock(volume.created_at) <= after + slack
