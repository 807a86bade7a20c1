"""The Kubernetes adapter's discipline, as for the Fly client: only typed errors leave it, and idempotent
calls are retried (bounded, with backoff) when the API server is busy or does not answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from harness import Stack
from kiloclaw_operator.kube import (
    KubeClient,
    KubeConnection,
    KubeError,
    KubeNotFound,
    KubeNotLeading,
    KubeUnavailable,
)
from kiloclaw_operator.models import ObjectRef

Handler = Callable[[httpx.Request], httpx.Response]
REF = ObjectRef(namespace="tenants", name="alice", uid="u1", kind="KiloClawInstance")


def _client(
    handler: Handler, *, max_retries: int = 3, fence: Callable[[], bool] | None = None
) -> tuple[KubeClient, list[str]]:
    calls: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        return handler(request)

    client = KubeClient(
        KubeConnection(server="http://kube.invalid"), max_retries=max_retries, backoff_base=0.001, fence=fence
    )
    client._http = httpx.AsyncClient(base_url="http://kube.invalid", transport=httpx.MockTransport(record))
    return client, calls


def _answers(*statuses: int) -> Handler:
    remaining = list(statuses)

    def handler(request: httpx.Request) -> httpx.Response:
        status = remaining.pop(0) if remaining else 200
        return httpx.Response(status, json={"message": f"status {status}", "items": []})

    return handler


@pytest.mark.parametrize("status", [429, 500, 503, 504])
async def test_a_read_answered_busy_is_asked_again_until_it_succeeds(status: int) -> None:
    client, calls = _client(_answers(status, status))
    assert await client.every_instance_slim() == []
    assert calls == ["GET", "GET", "GET"]


async def test_a_status_patch_that_timed_out_is_sent_again() -> None:
    attempts = iter([httpx.ReadTimeout("slow"), None])

    def handler(request: httpx.Request) -> httpx.Response:
        exc = next(attempts)
        if exc is not None:
            raise exc
        return httpx.Response(200, json={"metadata": {"name": "alice"}})

    client, calls = _client(handler)
    assert await client.patch_instance_status(REF, {"phase": "Running"}) == {"metadata": {"name": "alice"}}
    assert calls == ["PATCH", "PATCH"]


async def test_retries_are_bounded_and_end_in_a_typed_error() -> None:
    client, calls = _client(_answers(503, 503, 503, 503, 503), max_retries=2)
    with pytest.raises(KubeError) as raised:
        await client.get_instance("tenants", "alice")
    assert raised.value.status == 503
    assert calls == ["GET", "GET", "GET"]


async def test_a_create_is_never_repeated_by_the_adapter() -> None:
    client, calls = _client(_answers(503))
    with pytest.raises(KubeError):
        await client.create_lease("kiloclaw-system", {"metadata": {"name": "lease"}})
    assert calls == ["POST"]


async def test_a_refusal_is_not_retried() -> None:
    client, calls = _client(_answers(404))
    with pytest.raises(KubeNotFound):
        await client.get_instance("tenants", "alice")
    assert calls == ["GET"]


async def test_no_answer_is_a_typed_error_not_an_httpx_one() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    client, calls = _client(handler, max_retries=1)
    with pytest.raises(KubeUnavailable):
        await client.every_instance_slim()
    assert calls == ["GET", "GET"]


async def test_instances_are_listed_page_by_page_until_the_server_gives_no_continue_token(
    stack: Stack, namespace: str
) -> None:
    for index in range(5):
        await stack.create_instance(namespace, f"paged-{index}", state="Stopped")
    server = str(stack.api.base_url).rstrip("/")
    client = KubeClient(KubeConnection(server=server, token="test"))
    sized = KubeClient(KubeConnection(server=server, token="test"), page_size=3)
    try:
        pages = [page async for page in client.instance_pages(namespace, page_size=2)]
        by_default = [len(page) async for page in sized.instance_pages(namespace)]
    finally:
        await client.aclose()
        await sized.aclose()
    assert [len(page) for page in pages] == [2, 2, 1]
    assert by_default == [3, 2], "without a page size of its own a listing takes the client's"
    assert sorted(item["metadata"]["name"] for page in pages for item in page) == [
        f"paged-{index}" for index in range(5)
    ]


async def test_a_replica_that_is_not_sure_it_leads_writes_nothing_but_still_reads() -> None:
    leading = False
    client, calls = _client(_answers(), fence=lambda: leading)
    with pytest.raises(KubeNotLeading):
        await client.patch_instance_status(REF, {"phase": "Recovering"})
    with pytest.raises(KubeNotLeading):
        await client.create_retained_volume("tenants", {"metadata": {"name": "alice-vol"}})
    with pytest.raises(KubeNotLeading):
        await client.delete_retained_volume("tenants", "alice-vol")
    assert calls == [], "nothing reached the API server, and a refused write is not retried"
    await client.get_instance("tenants", "alice")
    leading = True
    await client.patch_instance_status(REF, {"phase": "Recovering"})
    assert calls == ["GET", "PATCH"]


async def test_the_cluster_wide_instance_listing_keeps_only_what_ownership_checks_read(
    stack: Stack, namespace: str
) -> None:
    await stack.create_instance(namespace, "slim-a", state="Stopped")
    client = KubeClient(KubeConnection(server=str(stack.api.base_url).rstrip("/"), token="test"))
    try:
        await client.patch_instance_status(
            ObjectRef(namespace=namespace, name="slim-a"),
            {"volumeId": "vol_a", "phase": "Recovering", "recovery": {"sourceVolumeId": "vol_a", "id": "r1"}},
        )
        slim = [item for item in await client.every_instance_slim() if item["metadata"]["name"] == "slim-a"]
    finally:
        await client.aclose()
    assert len(slim) == 1
    assert slim[0]["metadata"].keys() == {"namespace", "name", "uid"}
    assert slim[0]["spec"].keys() == {"flyApp", "sandboxId"}
    assert slim[0]["status"] == {"volumeId": "vol_a", "recovery": {"sourceVolumeId": "vol_a"}}


async def test_callers_asking_together_share_one_listing_and_a_later_one_gets_one_begun_after_it_asked() -> (
    None
):
    release = [asyncio.Event(), asyncio.Event()]
    begun = asyncio.Event()
    served = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal served
        listing = served
        served += 1
        begun.set()
        await release[listing].wait()
        item = {"metadata": {"name": f"listing-{listing}"}}
        return httpx.Response(200, json={"metadata": {}, "items": [item]})

    client = KubeClient(KubeConnection(server="http://kube.invalid"))
    client._http = httpx.AsyncClient(base_url="http://kube.invalid", transport=httpx.MockTransport(handler))
    first = [asyncio.create_task(client.every_instance_slim()) for _ in range(3)]
    async with asyncio.timeout(5):
        await begun.wait()
    later = [asyncio.create_task(client.every_instance_slim()) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert served == 1, "the later callers wait for the listing under way to end, and do not join it"
    release[0].set()
    release[1].set()
    names = [[item["metadata"]["name"] for item in await task] for task in (*first, *later)]
    assert names == [["listing-0"]] * 3 + [["listing-1"]] * 3
    assert served == 2
