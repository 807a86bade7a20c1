"""An httpx transport over aiohttp's connection pool, shared by the Fly and Kubernetes adapters.

The adapters keep httpx's interface (requests, responses, auth flows, errors); only the connection handling
underneath changes. httpcore's pool checks every pooled connection on each request and on each response
(`has_expired` → a socket readability probe per connection) and rescans its whole wait queue on every
completion (encode/httpcore#1035): at thousands of concurrent drivers that bookkeeping was ~70 % of the
operator's CPU (BENCHMARKS.md). aiohttp's connector keeps idle connections per host in a deque and its waiters
in a FIFO, so a request costs the same whatever the pool size; kopf already depends on aiohttp.

Bodies are read whole: every call of the adapters is a small JSON document (watches are kopf's, not ours).
"""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Mapping
from typing import Any

import aiohttp
import httpx

#: How long an idle pooled connection is kept (httpx's default keep-alive expiry).
KEEPALIVE_SECONDS = 5.0


class BodyTooLarge(aiohttp.ClientPayloadError):
    """A response body larger than the transport's cap (read no further; the connection is dropped)."""


class _NoCookies(httpx.Cookies):
    """Neither Fly's API nor the API server's sets cookies the adapters should send back: httpx's cookie
    handling (urllib's cookie jar, compatibility wrappers built for every response) was ~6 % of the
    operator's CPU in a provisioning burst."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None


_NO_COOKIES = _NoCookies()


class CookielessClient(httpx.AsyncClient):
    """The adapters' httpx client: keeps no cookies and sends none, and leaves no reference cycle behind a
    response it has read whole."""

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = await super().send(request, **kwargs)
        if not kwargs.get("stream") and response.is_closed:
            # httpx binds every response's stream to the response itself, a cycle that only the garbage
            # collector frees (with a request, its headers and URL): at a few requests a second it was most
            # of what a leader of 2,000 instances gained between two full collections. The body is read,
            # so the binding has nothing left to do.
            response.stream = httpx.ByteStream(response.content)
        return response

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        if cookies:
            raise ValueError("the adapters' clients keep no cookies")


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx requests sent through one aiohttp session (created in the running loop on first use)."""

    def __init__(
        self, *, max_connections: int, verify: ssl.SSLContext | bool = True, max_body_bytes: int | None = None
    ) -> None:
        self._max_connections = max_connections
        #: The largest response body read; a longer one fails the request (None: no cap).
        self._max_body_bytes = max_body_bytes
        # aiohttp: True verifies with the default context, False skips verification, a context is used as is.
        self._ssl: ssl.SSLContext | bool = verify
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str, int | None], str | None] = {}

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=KEEPALIVE_SECONDS,
                ssl=self._ssl,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # httpx decodes Content-Encoding itself and sets every header it sends (Host, Accept,
                # Accept-Encoding, User-Agent): aiohttp must neither decompress nor add its own.
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
                # Not aiohttp's trust_env: it reads ~/.netrc in a thread for every request. Proxies from the
                # environment are applied below, per origin.
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session_for_loop()
        timeout = _client_timeout(request.extensions.get("timeout", {}))
        body = await request.aread()
        try:
            async with session.request(
                request.method,
                str(request.url),
                headers=[
                    (key.decode("latin-1"), value.decode("latin-1")) for key, value in request.headers.raw
                ],
                data=body or None,
                allow_redirects=False,
                proxy=self._proxy_for(request.url),
                timeout=timeout,
                compress=None,
            ) as response:
                content = await self._read_body(response)
                return httpx.Response(
                    response.status,
                    headers=[(bytes(key), bytes(value)) for key, value in response.raw_headers],
                    stream=httpx.ByteStream(content),
                    extensions={"http_version": b"HTTP/1.1"},
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _httpx_error(exc, request) from exc

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole body, but never more than the cap: a server that sends more is cut off."""
        if self._max_body_bytes is None:
            return await response.read()
        cap = self._max_body_bytes
        if response.content_length is not None and response.content_length > cap:
            raise BodyTooLarge(f"response body of {response.content_length} bytes exceeds the {cap}-byte cap")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > cap:
                raise BodyTooLarge(f"response body exceeds the {cap}-byte cap")
            chunks.append(chunk)
        return b"".join(chunks)

    def _proxy_for(self, url: httpx.URL) -> str | None:
        """HTTP(S)_PROXY / NO_PROXY from the environment, as httpx applies them (read once per origin)."""
        origin = (url.scheme, url.host, url.port)
        if origin not in self._proxies:
            proxies = urllib.request.getproxies_environment()
            proxy = proxies.get(url.scheme) or proxies.get("all")
            # Not in the type stubs, but part of urllib.request since Python 3.
            bypass = urllib.request.proxy_bypass_environment(url.host, proxies)  # type: ignore[attr-defined]
            if proxy and bypass:
                proxy = None
            self._proxies[origin] = proxy or None
        return self._proxies[origin]

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _client_timeout(timeouts: Mapping[str, float | None]) -> aiohttp.ClientTimeout:
    """httpx's per-phase timeouts (connect, read, write, pool) in aiohttp's terms."""
    connect = timeouts.get("connect")
    pool = timeouts.get("pool")
    # aiohttp's `connect` covers waiting for a free pooled connection as well as the TCP/TLS handshake.
    waiting = None if connect is None and pool is None else (connect or 0.0) + (pool or 0.0)
    return aiohttp.ClientTimeout(
        total=None, connect=waiting, sock_connect=connect, sock_read=timeouts.get("read")
    )


def _httpx_error(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    """The httpx error the adapters already classify (all are transient to them)."""
    message = str(exc) or type(exc).__name__
    error: type[httpx.TransportError]
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        error = httpx.ConnectTimeout
    elif isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        error = httpx.ReadTimeout
    elif isinstance(exc, aiohttp.ClientConnectorError):
        error = httpx.ConnectError
    elif isinstance(
        exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError
    ):
        error = httpx.RemoteProtocolError
    else:
        error = httpx.ReadError
    return error(message, request=request)
