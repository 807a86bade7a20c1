"""The Fly Machines API client: error taxonomy, retry policy, payload models, round trips against flysim."""

from __future__ import annotations

import importlib
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from kiloclaw_operator.fly import (
    Capacity,
    Fatal,
    FlyClient,
    FlyError,
    Machine,
    MachineConfig,
    NotFound,
    OrgMachinesPage,
    RateLimited,
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
