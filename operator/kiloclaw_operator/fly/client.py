"""Async client for the Fly Machines API (`{base_url}/v1/...`).

One pooled `httpx.AsyncClient` per `FlyClient`. Every failure is raised as a type from `fly.errors`.
Idempotent calls are retried with full-jitter exponential backoff on 429 (honouring `Retry-After`), 5xx, 408
and connection failures; creates are never retried here, because a create whose response was lost may still
have happened — the caller adopts the resource by name or metadata instead of creating a twin.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from ..transport import AiohttpTransport, CookielessClient
from .errors import FlyError, NotLeading, RateLimited, Transient, classify
from .metrics import CONNECTION_ERROR_CODE, FLY_REQUEST_DURATION, FLY_REQUESTS, FLY_UNAUTHORIZED
from .models import Guest, Machine, MachineConfig, OrgMachinesPage, Snapshot, Volume
from .pacing import Pacer, PacingLimits

__all__ = ["FlyClient", "TokenSource", "backoff_delay", "parse_retry_after"]

log = logging.getLogger("kiloclaw.fly")

# Who a Fly call is made for (namespace, instance, sandbox_id, ...): set by the driver of the object for its
# own task, so the client's log lines name the instance without every call passing it down.
REQUEST_CONTEXT: ContextVar[Mapping[str, str] | None] = ContextVar(
    "kiloclaw_fly_request_context", default=None
)


def set_log_context(**fields: str) -> None:
    """Name the object the current task's Fly calls are made for, in their log lines."""
    REQUEST_CONTEXT.set(fields)


def _subject(route: str, path_params: Mapping[str, str]) -> dict[str, str]:
    """The app, and the machine or volume a call addresses, for its log lines."""
    subject = {"app": path_params["app"]} if "app" in path_params else {}
    if "id" in path_params:
        subject["machine" if route.startswith("/apps/{app}/machines/") else "volume"] = path_params["id"]
    return subject


_M = TypeVar("_M", bound=BaseModel)

# Templated routes: the metric label and the error's `route`. Path parameters are filled in per request.
MACHINES = "/apps/{app}/machines"
MACHINE = "/apps/{app}/machines/{id}"
MACHINE_START = "/apps/{app}/machines/{id}/start"
MACHINE_STOP = "/apps/{app}/machines/{id}/stop"
MACHINE_WAIT = "/apps/{app}/machines/{id}/wait"
VOLUMES = "/apps/{app}/volumes"
VOLUME = "/apps/{app}/volumes/{id}"
VOLUME_SNAPSHOTS = "/apps/{app}/volumes/{id}/snapshots"
ORG_MACHINES = "/orgs/{org}/machines"
#: The `Date` header has whole seconds and the answer takes time to arrive: a smaller clock offset is noise.
CLOCK_NOISE_SECONDS = 1.5

# Error bodies can be whole HTML pages from a proxy; a log line needs only the start.
_MAX_MESSAGE_CHARS = 500
_REDACTED = "[redacted]"

_MACHINE_LIST = TypeAdapter(list[Machine])
_VOLUME_LIST = TypeAdapter(list[Volume])
_SNAPSHOT_LIST = TypeAdapter(list[Snapshot])


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait per a `Retry-After` header (delta-seconds or HTTP date); None when absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # NaN is not a delay
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now if now is not None else datetime.now(UTC)
    return max(0.0, (when - reference).total_seconds())


def backoff_delay(
    attempt: int, *, base: float, cap: float, random_fraction: Callable[[], float] = random.random
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)], attempt from 0."""
    ceiling = min(cap, base * (2 ** min(attempt, 62)))
    return ceiling * random_fraction()


def _first_problem(exc: ValidationError) -> str:
    problem = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in problem["loc"]) or "body"
    return f"{where}: {problem['msg']} ({exc.error_count()} problems)"


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class TokenSource:
    """The Fly API token: a fixed value, or a file (a mounted Kubernetes Secret) that is re-read when it
    changes and after a 401, so rotating the Secret needs no restart. A file that cannot be read keeps the
    last token (the kubelet swaps Secret files atomically, but a read can still race the swap)."""

    def __init__(self, token: str = "", path: str | None = None) -> None:
        self._token = token
        self._path = path
        self._stamp: tuple[int, int] | None = None
        if path:
            self.refresh()

    @property
    def value(self) -> str:
        if self._path:
            try:
                stat = os.stat(self._path)
            except OSError:
                return self._token
            if (stat.st_mtime_ns, stat.st_ino) != self._stamp:
                self.refresh()
        return self._token

    def refresh(self) -> bool:
        """Re-read the file; True when the token changed."""
        if not self._path:
            return False
        try:
            stat = os.stat(self._path)
            with open(self._path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            log.warning("cannot read the Fly API token file %s: %s", self._path, exc)
            return False
        except UnicodeDecodeError as exc:
            # A bad write of the Secret: keep the last good token (said so once per change of the file).
            self._stamp = (stat.st_mtime_ns, stat.st_ino)
            log.warning(
                "the Fly API token file %s is not UTF-8 text (byte 0x%02x at offset %d); keeping the last "
                "good token",
                self._path,
                exc.object[exc.start],
                exc.start,
            )
            return False
        self._stamp = (stat.st_mtime_ns, stat.st_ino)
        changed = token != self._token
        if changed and token:
            log.info("Fly API token read from %s", self._path)
            self._token = token
        return changed and bool(token)

    def known(self) -> list[str]:
        return [self._token] if self._token else []


class FlyClient:
    """Typed, retrying access to the Fly Machines API for one token."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        token_file: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff_base: float = 0.2,
        backoff_cap: float = 10.0,
        max_connections: int = 100,
        pacing: PacingLimits | None = PacingLimits(),
        fence: Callable[[], bool] | None = None,
        call_deadline: float | None = None,
        max_body_bytes: int | None = 64 * 1024 * 1024,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        #: Whether this process may still change things on Fly (leader election); checked right before every
        #: changing call is sent. None: no election, always.
        self._fence = fence
        self._tokens = TokenSource(token, token_file)
        self._redacted: set[str] = set(self._tokens.known())
        # False from the first 401 until any answer that is not a 401: the operator-level token problem.
        self.authorized = True
        self._timeout = timeout
        #: Every attempt's total deadline (connect, send, headers, the whole body), on top of the per-read
        #: timeout: a server that drips bytes cannot hold a call (and its instance's lock) for ever. A wait
        #: call gets its own timeout on top. None: twice the per-read timeout.
        self._call_deadline = call_deadline if call_deadline is not None else 2 * timeout
        self._max_retries = max_retries
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._http = CookielessClient(
            base_url=f"{self._base_url}/v1",
            headers={"Accept": "application/json"},
            timeout=httpx.Timeout(timeout),
            transport=AiohttpTransport(max_connections=max_connections, max_body_bytes=max_body_bytes),
        )
        # Requests name absolute URLs: httpx parses a relative one twice more to merge it with the base.
        self._api_root = str(self._http.base_url).rstrip("/")
        # Calls wait here for one of the pool's connections, outside their own timeouts (a burst of
        # thousands would otherwise time out in the pool's queue).
        self._slots = asyncio.Semaphore(max_connections)
        #: Seconds Fly's clock runs ahead of ours (negative: behind), from the `Date` header of the last
        #: answer; see `in_our_clock`.
        self.clock_offset = 0.0
        #: Fly's rate limits, kept by design (None: unpaced, for tests of the retry logic only).
        self.pacer = Pacer(pacing) if pacing is not None else None

    def __repr__(self) -> str:
        return f"FlyClient(base_url={self._base_url!r})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # Machines

    async def list_machines(
        self, app: str, *, metadata: Mapping[str, str] | None = None, include_deleted: bool = False
    ) -> list[Machine]:
        """Machines of `app`; with `metadata`, only those whose config metadata has all the given pairs."""
        query: dict[str, str | bool] = {}
        if include_deleted:
            query["include_deleted"] = True
        # Fly filters server-side on `metadata.KEY=VALUE`; the filter is repeated here because the spec does
        # not promise it and a wrong adoption would be far worse than a longer list.
        for key, value in (metadata or {}).items():
            query[f"metadata.{key}"] = value
        response = await self._request("GET", MACHINES, {"app": app}, query=query)
        machines = self._parse_list(response, _MACHINE_LIST, "GET", MACHINES)
        if metadata:
            wanted = dict(metadata)
            machines = [m for m in machines if all(m.metadata.get(k) == v for k, v in wanted.items())]
        return machines

    async def get_machine(self, app: str, machine_id: str) -> Machine:
        response = await self._request("GET", MACHINE, {"app": app, "id": machine_id})
        return self._parse(response, Machine, "GET", MACHINE)

    async def create_machine(self, app: str, *, name: str, region: str, config: MachineConfig) -> Machine:
        """Create (and launch) a machine. Never retried: on any error the caller adopts by name/metadata."""
        body = {"name": name, "region": region, "config": self._dump(config)}
        response = await self._request("POST", MACHINES, {"app": app}, body=body, retry=False, create=True)
        return self._parse(response, Machine, "POST", MACHINES)

    async def update_machine(self, app: str, machine_id: str, config: MachineConfig) -> Machine:
        """Replace the machine's config (Fly restarts it). Retried: the same config twice gives one result."""
        body = {"config": self._dump(config)}
        response = await self._request("POST", MACHINE, {"app": app, "id": machine_id}, body=body)
        return self._parse(response, Machine, "POST", MACHINE)

    async def start_machine(self, app: str, machine_id: str) -> None:
        await self._request("POST", MACHINE_START, {"app": app, "id": machine_id})

    async def stop_machine(self, app: str, machine_id: str) -> None:
        await self._request("POST", MACHINE_STOP, {"app": app, "id": machine_id})

    async def destroy_machine(self, app: str, machine_id: str, *, force: bool = True) -> None:
        """Destroy a machine. A missing machine raises NotFound: the caller decides if that is success."""
        query = {"force": True} if force else {}
        await self._request("DELETE", MACHINE, {"app": app, "id": machine_id}, query=query)

    async def wait_machine(
        self,
        app: str,
        machine_id: str,
        state: str = "started",
        *,
        timeout_seconds: int = 60,
        instance_id: str | None = None,
    ) -> bool:
        """Block until the machine reaches `state`: True when it did, False when Fly's wait timed out."""
        query: dict[str, str | int] = {"state": state, "timeout": timeout_seconds}
        if instance_id is not None:
            query["instance_id"] = instance_id
        response = await self._request(
            "GET",
            MACHINE_WAIT,
            {"app": app, "id": machine_id},
            query=query,
            # The server holds the request for up to timeout_seconds before answering.
            read_timeout=self._timeout + timeout_seconds,
            result_statuses=frozenset({408}),
        )
        return response.status_code != 408

    async def wait_for_states(
        self, app: str, machine_id: str, states: Sequence[str], *, timeout_seconds: int = 60
    ) -> str | None:
        """Block until the machine is in one of `states`: the state it reached, or None when Fly's wait timed
        out (a long poll: the answer comes the moment the machine gets there)."""
        response = await self._request(
            "GET",
            MACHINE_WAIT,
            {"app": app, "id": machine_id},
            query={"state": ",".join(states), "timeout": timeout_seconds},
            read_timeout=self._timeout + timeout_seconds,
            result_statuses=frozenset({408}),
        )
        if response.status_code == 408:
            return None
        try:
            state = json.loads(response.content).get("state")
        except (ValueError, AttributeError):
            state = None
        return str(state) if state else states[0]

    # Volumes

    async def list_volumes(self, app: str) -> list[Volume]:
        response = await self._request("GET", VOLUMES, {"app": app})
        return self._parse_list(response, _VOLUME_LIST, "GET", VOLUMES)

    async def get_volume(self, app: str, volume_id: str) -> Volume:
        response = await self._request("GET", VOLUME, {"app": app, "id": volume_id})
        return self._parse(response, Volume, "GET", VOLUME)

    async def create_volume(
        self,
        app: str,
        *,
        name: str,
        region: str,
        size_gb: int | None = None,
        source_volume_id: str | None = None,
        snapshot_id: str | None = None,
        compute: Guest | None = None,
    ) -> Volume:
        """Create a volume, a fork (`source_volume_id`) or a restore (`snapshot_id`). Never retried."""
        body: dict[str, Any] = {"name": name, "region": region}
        if size_gb is not None:
            body["size_gb"] = size_gb
        if source_volume_id is not None:
            body["source_volume_id"] = source_volume_id
        if snapshot_id is not None:
            body["snapshot_id"] = snapshot_id
        if compute is not None:
            body["compute"] = self._dump(compute)
        response = await self._request("POST", VOLUMES, {"app": app}, body=body, retry=False, create=True)
        return self._parse(response, Volume, "POST", VOLUMES)

    async def delete_volume(self, app: str, volume_id: str) -> None:
        """Delete a volume. A missing volume raises NotFound: whether that is success is the caller's call."""
        await self._request("DELETE", VOLUME, {"app": app, "id": volume_id})

    async def list_volume_snapshots(self, app: str, volume_id: str) -> list[Snapshot]:
        response = await self._request("GET", VOLUME_SNAPSHOTS, {"app": app, "id": volume_id})
        return self._parse_list(response, _SNAPSHOT_LIST, "GET", VOLUME_SNAPSHOTS)

    # Organisation

    async def list_org_machines(
        self,
        org_slug: str,
        *,
        updated_after: datetime | None = None,
        cursor: str | None = None,
        limit: int | None = None,
        summary: bool = True,
        include_deleted: bool = False,
    ) -> OrgMachinesPage:
        """One page of the organisation's machines, oldest `updated_at` first; follow `next_cursor`.

        `updated_after` is in Fly's clock, not ours (see `clock_offset`).
        """
        query: dict[str, str | int | bool] = {"summary": summary}
        if include_deleted:
            query["include_deleted"] = True
        if updated_after is not None:
            query["updated_after"] = _rfc3339(updated_after)
        if cursor is not None:
            query["cursor"] = cursor
        if limit is not None:
            query["limit"] = limit
        response = await self._request("GET", ORG_MACHINES, {"org": org_slug}, query=query)
        return self._parse(response, OrgMachinesPage, "GET", ORG_MACHINES)

    # Transport

    async def _request(
        self,
        method: str,
        route: str,
        path_params: Mapping[str, str],
        *,
        query: Mapping[str, str | int | bool] | None = None,
        body: Mapping[str, Any] | None = None,
        retry: bool = True,
        read_timeout: float | None = None,
        result_statuses: frozenset[int] = frozenset(),
        create: bool = False,
    ) -> httpx.Response:
        """Send one logical call, retrying it if allowed; return a 2xx (or `result_statuses`) response."""
        if create and self.pacer is not None:
            async with self.pacer.creates:
                return await self._request(
                    method, route, path_params, query=query, body=body, retry=retry, read_timeout=read_timeout
                )
        path = route.format(**{key: quote(value, safe="") for key, value in path_params.items()})
        request_timeout = httpx.Timeout(read_timeout) if read_timeout is not None else self._http.timeout
        # A wait call is held by the server for its timeout (read_timeout = timeout + the usual): on top.
        deadline = self._call_deadline + max(0.0, (read_timeout or self._timeout) - self._timeout)
        # Fly limits an action per machine, or per app for creates and lists, or per organisation.
        subject = path_params.get("id") or path_params.get("app") or path_params.get("org") or ""
        attempt = 0
        reread_after_401 = False
        while True:
            if self.pacer is not None:
                await self.pacer.wait(f"{method} {route}", subject, mutating=method != "GET")
            started = time.monotonic()
            token = self._tokens.value
            self._redacted.add(token)
            try:
                async with self._slots:
                    # Checked once the slot is ours, right before sending: waiting for a slot (or the pacer)
                    # may have outlasted the Lease.
                    if method != "GET" and self._fence is not None and not self._fence():
                        raise NotLeading(
                            "not sent: this replica is no longer sure it holds the leader Lease",
                            method=method,
                            route=route,
                        )
                    async with asyncio.timeout(deadline):
                        response = await self._http.request(
                            method,
                            self._api_root + path,
                            params=dict(query) if query else None,
                            json=body,
                            timeout=request_timeout,
                            headers={"Authorization": f"Bearer {token}"},
                        )
            except TimeoutError:
                elapsed = time.monotonic() - started
                self._observe(method, route, CONNECTION_ERROR_CODE, elapsed)
                error: FlyError = Transient(
                    f"no complete answer within the call's total deadline of {deadline:g}s",
                    method=method,
                    route=route,
                )
            except httpx.TransportError as exc:
                elapsed = time.monotonic() - started
                self._observe(method, route, CONNECTION_ERROR_CODE, elapsed)
                error = Transient(
                    self._redact(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__),
                    method=method,
                    route=route,
                )
            else:
                elapsed = time.monotonic() - started
                self._observe(method, route, str(response.status_code), elapsed)
                self._measure_clock(response.headers.get("date"))
                if response.status_code == 401 and not reread_after_401:
                    # Perhaps the Secret was rotated: read the token again once and repeat the call with
                    # it (a 401 means Fly did nothing, so even a create is safe to repeat).
                    reread_after_401 = True
                    if self._tokens.refresh():
                        continue
                self._token_state(response.status_code != 401)
                if response.is_success or response.status_code in result_statuses:
                    log.debug(
                        "fly request ok",
                        extra={
                            "method": method,
                            "route": route,
                            "status": response.status_code,
                            "attempt": attempt,
                            "duration_ms": round(elapsed * 1000, 1),
                        },
                    )
                    return response
                error = self._error_from(method, route, response)

            delay = self._retry_delay(error, attempt) if retry else None
            fields = {
                **(REQUEST_CONTEXT.get() or {}),
                **_subject(route, path_params),
                "method": method,
                "route": route,
                "status": error.status,
                "attempt": attempt,
                "duration_ms": round(elapsed * 1000, 1),
                "error": error.message,
                "error_type": type(error).__name__,
            }
            if delay is None:
                log.warning("fly request failed", extra=fields)
                raise error
            log.info("fly request retrying", extra={**fields, "retry_in_ms": round(delay * 1000, 1)})
            await asyncio.sleep(delay)
            attempt += 1

    def _retry_delay(self, error: FlyError, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None when the error must be raised now."""
        if not isinstance(error, Transient | RateLimited) or attempt >= self._max_retries:
            return None
        delay = backoff_delay(attempt, base=self._backoff_base, cap=self._backoff_cap)
        if isinstance(error, RateLimited) and error.retry_after is not None:
            # A server asking for a longer pause than we would ever back off gets it, but not inside this
            # call: the caller sees RateLimited(retry_after) and reschedules instead of holding a worker.
            if error.retry_after > self._backoff_cap:
                return None
            delay = max(delay, error.retry_after)
        return delay

    def _error_from(self, method: str, route: str, response: httpx.Response) -> FlyError:
        text = response.text
        error_type = classify(response.status_code, text)
        message = self._redact(self._message_from(text) or response.reason_phrase or "error")
        if error_type is RateLimited:
            return RateLimited(
                message,
                status=response.status_code,
                method=method,
                route=route,
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        return error_type(message, status=response.status_code, method=method, route=route)

    @staticmethod
    def _message_from(text: str) -> str:
        try:
            payload = json.loads(text)
        except ValueError:
            return text.strip()[:_MAX_MESSAGE_CHARS]
        if isinstance(payload, dict) and isinstance(payload.get("error"), str):
            return str(payload["error"])[:_MAX_MESSAGE_CHARS]
        return text.strip()[:_MAX_MESSAGE_CHARS]

    def _redact(self, text: str) -> str:
        for token in self._redacted:
            if token:
                text = text.replace(token, _REDACTED)
        return text

    def _token_state(self, authorized: bool) -> None:
        """Track the operator-level token problem: a metric, and one log line when it starts and ends."""
        if authorized == self.authorized:
            return
        self.authorized = authorized
        FLY_UNAUTHORIZED.set(0 if authorized else 1)
        if authorized:
            log.warning("the Fly API token is accepted again")
        else:
            log.error(
                "the Fly API token is unauthorized (401): every instance is blocked until it is fixed; "
                "the token file is re-read on change"
            )

    def _measure_clock(self, date: str | None) -> None:
        """Fly's clock minus ours from an answer's `Date` header, taken against the arrival time (the header
        is written as the answer leaves, also for a long poll). It has whole seconds: an offset within
        `CLOCK_NOISE_SECONDS` is noise and counts as none."""
        if not date:
            return
        try:
            server = parsedate_to_datetime(date).astimezone(UTC)
        except (TypeError, ValueError, IndexError):
            return
        offset = (server - datetime.now(UTC)).total_seconds()
        self.clock_offset = offset if abs(offset) > CLOCK_NOISE_SECONDS else 0.0

    def in_our_clock(self, fly_time: datetime) -> datetime:
        """A timestamp Fly wrote (``created_at``, ``updated_at``), in this process's clock: what adoption
        compares with the times the operator recorded."""
        return fly_time - timedelta(seconds=self.clock_offset)

    @staticmethod
    def _observe(method: str, route: str, code: str, seconds: float) -> None:
        FLY_REQUESTS.labels(method=method, route=route, code=code).inc()
        FLY_REQUEST_DURATION.labels(method=method, route=route).observe(seconds)

    @staticmethod
    def _dump(model: BaseModel) -> dict[str, Any]:
        return model.model_dump(mode="json", exclude_none=True)

    def _parse(self, response: httpx.Response, model: type[_M], method: str, route: str) -> _M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise self._unreadable(method, route, response, exc) from exc

    def _parse_list(
        self, response: httpx.Response, adapter: TypeAdapter[list[_M]], method: str, route: str
    ) -> list[_M]:
        try:
            return adapter.validate_json(response.content)
        except ValidationError as exc:
            raise self._unreadable(method, route, response, exc) from exc

    def _unreadable(
        self, method: str, route: str, response: httpx.Response, exc: ValidationError
    ) -> Transient:
        # A body we cannot read is most likely truncated or from a proxy; the next observation may do better.
        return Transient(
            self._redact(f"unreadable response: {_first_problem(exc)}"),
            status=response.status_code,
            method=method,
            route=route,
        )
