"""The aiohttp transport under both adapters speaks httpx: same requests on the wire, same responses, and the
httpx errors the adapters classify as transient. Each test runs a raw HTTP server on loopback."""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from kiloclaw_operator.fly import FlyClient, Transient
from kiloclaw_operator.fly.models import MachineConfig
from kiloclaw_operator.transport import AiohttpTransport, CookielessClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return lines[0], headers, body


@asynccontextmanager
async def _server(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


def _client(base_url: str, timeout: float = 5.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url, timeout=timeout, transport=AiohttpTransport(max_connections=4)
    )


async def test_request_line_headers_and_body_reach_the_server_as_httpx_built_them() -> None:
    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await _read_request(reader))
        payload = b'{"ok": true}'
        writer.write(
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nX-Answer: 42\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        writer.close()

    async with _server(handler) as url, _client(url) as client:
        response = await client.post(
            "/v1/things?a=1", json={"name": "x"}, headers={"Authorization": "Bearer secret"}
        )
    assert response.status_code == 201
    assert response.json() == {"ok": True}
    assert response.headers["x-answer"] == "42"
    request_line, headers, body = seen[0]
    assert request_line == "POST /v1/things?a=1 HTTP/1.1"
    assert headers["authorization"] == "Bearer secret"
    assert headers["user-agent"].startswith("python-httpx/")
    assert json.loads(body) == {"name": "x"}


async def test_a_gzip_encoded_answer_is_decoded_exactly_once() -> None:
    document = {"items": [{"n": n} for n in range(500)]}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        payload = gzip.compress(json.dumps(document).encode())
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        writer.close()

    async with _server(handler) as url, _client(url) as client:
        response = await client.get("/list")
    assert response.json() == document


async def test_a_connection_closed_without_an_answer_is_an_httpx_transport_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.close()

    async with _server(handler) as url, _client(url) as client:
        with pytest.raises(httpx.TransportError):
            await client.get("/dropped")


async def test_an_answer_slower_than_the_read_timeout_is_an_httpx_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(5)
        writer.close()

    async with _server(handler) as url, _client(url, timeout=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/slow")


async def test_a_refused_connection_is_an_httpx_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with _client(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/")


async def _dropping_server_calls(call: Callable[[FlyClient], Awaitable[object]]) -> int:
    calls = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        await _read_request(reader)
        writer.close()

    async with _server(handler) as url:
        fly = FlyClient(url, "token", max_retries=2, backoff_base=0.01, backoff_cap=0.02, pacing=None)
        try:
            with pytest.raises(Transient):
                await call(fly)
        finally:
            await fly.aclose()
    return calls


async def test_a_read_dropped_by_the_server_ends_as_transient_after_the_retries() -> None:
    # Three attempts by the client; aiohttp sends an idempotent request once more when the connection drops
    # (a pooled connection the server closed meanwhile), so the server sees each attempt twice.
    assert await _dropping_server_calls(lambda fly: fly.get_machine("app", "m1")) == 6


async def test_a_create_dropped_by_the_server_is_sent_exactly_once() -> None:
    config = MachineConfig(image="sandbox:1")
    calls = await _dropping_server_calls(
        lambda fly: fly.create_machine("app", name="sandbox", region="ams", config=config)
    )
    assert calls == 1


async def test_a_server_that_drips_bytes_cannot_hold_a_fly_call_past_its_total_deadline() -> None:
    """Every byte arrives well within the per-read timeout, but the answer never completes: the call's total
    deadline ends it as a transient error (the instance's lock is not held for ever)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        try:
            while True:
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.05)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async with _server(handler) as url:
        fly = FlyClient(url, "token", timeout=5.0, call_deadline=0.5, max_retries=0, pacing=None)
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(Transient, match="total deadline"):
                await fly.get_machine("app", "m1")
            assert loop.time() - began < 3.0
        finally:
            await fly.aclose()


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
async def test_a_body_larger_than_the_cap_is_not_read_and_fails_the_call(announced: bool) -> None:
    body = b"[" + b'"x",' * 20000 + b'"x"]'

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        if announced:
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            writer.write(head + body)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for start in range(0, len(body), 4096):
                chunk = body[start : start + 4096]
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async with _server(handler) as url:
        fly = FlyClient(url, "token", max_body_bytes=16 * 1024, max_retries=0, pacing=None)
        try:
            with pytest.raises(Transient, match="cap"):
                await fly.list_volumes("app")
        finally:
            await fly.aclose()


async def test_connections_are_reused_across_requests() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                await _read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async with _server(handler) as url, _client(url) as client:
        for _ in range(5):
            assert (await client.get("/again")).status_code == 200
    assert connections == 1


async def test_a_proxy_from_the_environment_carries_requests_unless_no_proxy_names_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxied: list[str] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line, _, _ = await _read_request(reader)
        proxied.append(request_line)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    async with _server(proxy) as proxy_url:
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        monkeypatch.setenv("NO_PROXY", "direct.invalid")
        async with _client("http://sandbox.invalid") as client:
            assert (await client.get("/via-proxy")).status_code == 200
        async with _client("http://direct.invalid") as client:
            with pytest.raises(httpx.ConnectError):
                await client.get("/not-via-proxy")
    assert proxied == ["GET http://sandbox.invalid/via-proxy HTTP/1.1"]


async def test_the_adapters_clients_keep_no_cookie_a_server_sets_and_send_none() -> None:
    seen: list[dict[str, str]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                _, headers, _ = await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            seen.append(headers)
            writer.write(b"HTTP/1.1 200 OK\r\nSet-Cookie: session=abc; Path=/\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
        writer.close()

    async with _server(handler) as url:
        client = CookielessClient(base_url=url, timeout=5, transport=AiohttpTransport(max_connections=1))
        try:
            for _ in range(2):
                assert (await client.get("/x")).status_code == 200
        finally:
            await client.aclose()
    assert len(seen) == 2 and "cookie" not in seen[1], "a cookie set by the server is never sent back"
    assert not client.cookies


async def test_a_response_read_whole_is_freed_by_reference_counting_without_the_garbage_collector() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(
            b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"a": true}'
        )
        await writer.drain()
        writer.close()

    transport = AiohttpTransport(max_connections=4)
    async with _server(handler) as url, CookielessClient(base_url=url, transport=transport) as client:
        gc.disable()
        try:
            response = await client.get("/thing")
            assert response.json() == {"a": True}
            gone = weakref.ref(response)
            del response
            assert gone() is None, "the response is part of a reference cycle"
        finally:
            gc.enable()
