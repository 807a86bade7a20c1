"""What the operator asks of kopf at start-up (handlers.configure): the settings that bound its memory and its
writes at scale."""

from __future__ import annotations

from types import SimpleNamespace

import kopf

from kiloclaw_operator import handlers
from kiloclaw_operator.config import Settings


async def configured(**values: object) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    runtime = SimpleNamespace(settings=Settings(fly_api_token="t", **values))  # type: ignore[arg-type]
    await handlers.configure(settings=settings, memo=kopf.Memo(runtime=runtime))
    return settings


async def test_a_new_leader_lists_the_instances_in_pages_not_the_whole_fleet_at_once() -> None:
    assert (await configured()).watching.chunk_size == 250
    assert (await configured(list_chunk_size=50)).watching.chunk_size == 50


async def test_kopf_lets_go_of_a_quiet_objects_worker_and_its_last_body_within_a_second() -> None:
    assert (await configured()).queueing.idle_timeout <= 1.0


async def test_kopf_keeps_no_last_handled_configuration_on_the_objects() -> None:
    settings = await configured()
    assert isinstance(settings.persistence.diffbase_storage, handlers.NoDiffBase)
    assert settings.persistence.finalizer == "kiloclaw.kilo.ai/finalizer"
