"""`FlySimulator`: the aiohttp server, fault-injection knobs and Python API (see the package docstring)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import json
import math
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .state import (
    GONE_STATES,
    JSON,
    RENDER_SHIFT,
    SETTLED_STATES,
    WAITABLE_STATES,
    CapacityKind,
    FlyApiError,
    FlyState,
    HostStatus,
    SimTimings,
    StartBreak,
    UnreachableFork,
    parse_rfc3339,
    rfc3339,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_DEFAULT_FAULT_MESSAGES = {
    408: "request timeout",
    429: "rate limit exceeded",
    500: "internal server error",
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
}
_MAX_WAIT_SECONDS = 60.0
_MAX_ORG_PAGE = 1000


@dataclass(frozen=True)
class RequestRecord:
    """One served request (Fly API only; control routes are not recorded)."""

    method: str
    path: str
    query: str
    route: str
    status: int
    at: float


def _route_regex(pattern: str) -> tuple[str, re.Pattern[str]]:
    """`"POST /v1/apps/*/volumes"` → (method glob, path regex). `*` stays inside one segment, `**` crosses."""
    method, _, path = pattern.strip().partition(" ")
    if not path:
        method, path = "*", method
    parts = re.split(r"(\*\*|\*|\?)", path.strip())
    translated = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    regex = "".join(translated.get(part, re.escape(part)) for part in parts)
    return method.upper(), re.compile(f"^{regex}$")


@dataclass
class FaultRule:
    pattern: str
    method: str
    path: re.Pattern[str]
    status: int
    rate: float
    remaining: int | None
    retry_after: float | None
    message: str
    apply_first: bool

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method)) and self.path.match(path) is not None


@dataclass(frozen=True)
class RateLimits:
    """Fly's documented Machines API limits, enforced per token bucket: every mutating action (create,
    update, start, stop, destroy; volume create/delete) per machine (or per app for creates) at `action_rate`
    requests/s with a burst of `action_burst`; reads (GET machine, wait, lists) per machine or app at
    `read_rate` with `read_burst`. Beyond them: 429 with `Retry-After` (whole seconds)."""

    action_rate: float = 1.0
    action_burst: int = 3
    read_rate: float = 5.0
    read_burst: int = 10


@dataclass
class _Bucket:
    tokens: float
    at: float


# Route (aiohttp canonical) and method → (bucket name, match_info key naming the bucket's subject, mutating).
_RATE_CLASSES: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("POST", "/v1/apps/{app_name}/machines"): ("create_machine", "app_name", True),
    ("GET", "/v1/apps/{app_name}/machines"): ("list_machines", "app_name", False),
    ("GET", "/v1/apps/{app_name}/machines/{machine_id}"): ("get_machine", "machine_id", False),
    ("POST", "/v1/apps/{app_name}/machines/{machine_id}"): ("update_machine", "machine_id", True),
    ("DELETE", "/v1/apps/{app_name}/machines/{machine_id}"): ("destroy_machine", "machine_id", True),
    ("POST", "/v1/apps/{app_name}/machines/{machine_id}/start"): ("start_machine", "machine_id", True),
    ("POST", "/v1/apps/{app_name}/machines/{machine_id}/stop"): ("stop_machine", "machine_id", True),
    ("GET", "/v1/apps/{app_name}/machines/{machine_id}/wait"): ("wait_machine", "machine_id", False),
    ("GET", "/v1/apps/{app_name}/volumes"): ("list_volumes", "app_name", False),
    ("POST", "/v1/apps/{app_name}/volumes"): ("create_volume", "app_name", True),
    ("GET", "/v1/apps/{app_name}/volumes/{volume_id}"): ("get_volume", "volume_id", False),
    ("DELETE", "/v1/apps/{app_name}/volumes/{volume_id}"): ("delete_volume", "volume_id", True),
    ("GET", "/v1/apps/{app_name}/volumes/{volume_id}/snapshots"): ("list_snapshots", "volume_id", False),
    ("POST", "/v1/apps/{app_name}/volumes/{volume_id}/snapshots"): ("create_snapshot", "volume_id", True),
    ("GET", "/v1/orgs/{org_slug}/machines"): ("list_org_machines", "org_slug", False),
}


@dataclass
class LatencyRule:
    method: str
    path: re.Pattern[str]
    seconds: float


class FlySimulator:
    """A Fly Machines API on loopback with in-memory state. See the package docstring for the contract."""

    def __init__(
        self,
        token: str = "test-token",
        regions: Sequence[str] = ("iad", "ord", "cdg", "ams", "sjc"),
        timings: SimTimings = SimTimings(),
        *,
        hosts_per_region: int = 3,
        org_slug: str | None = None,
        control_token: str | None = None,
        seed: int | None = None,
        request_log_size: int = 10000,
        rate_limits: RateLimits | None = RateLimits(),
    ) -> None:
        self.token = token
        #: Fly's rate limits (None: unlimited); 429s are counted in `rate_limited`.
        self.rate_limits = rate_limits
        self.rate_limited = 0
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        #: The organisation listing: seconds a cursor stays valid, and the most machines one page holds.
        self.org_cursor_ttl = 60.0
        self.org_page_limit = _MAX_ORG_PAGE
        self._expire_cursors = 0
        self.org_slug = org_slug
        self.control_token = control_token
        self.state = FlyState(regions, timings, hosts_per_region=hosts_per_region, seed=seed)
        self._rng = random.Random(seed)
        self._control_lock = threading.Lock()
        self._faults: list[FaultRule] = []
        self._latency_default = 0.0
        self._latency_rules: list[LatencyRule] = []
        self._request_log: deque[RequestRecord] = deque(maxlen=request_log_size)
        self._request_counts: Counter[str] = Counter()
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._host = "127.0.0.1"
        self._thread: threading.Thread | None = None
        self.state.bind(self._schedule, self._notify)

    # --- lifecycle ----------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve on `host:port` (0 = a free port) in the running event loop."""
        if self._runner is not None:
            raise RuntimeError("the simulator is already running")
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        runner = web.AppRunner(self._build_app(), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        self._host = host
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.cancel()
        self._waiters.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._loop = None
        self._loop_thread_id = None

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Run the server in its own thread and event loop; returns once it accepts connections."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start(host, port))
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="flysim", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def stop_thread(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the simulator is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """`http://HOST:PORT` without `/v1` (clients append `/v1/...`)."""
        return f"http://{self._host}:{self.port}"

    # --- loop plumbing (thread-safe) ----------------------------------------------------------------

    def _schedule(self, delay: float, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the simulator is not running: call start() or start_in_thread() first")
        if threading.get_ident() == self._loop_thread_id:
            loop.call_later(delay, callback, *args)
        else:
            loop.call_soon_threadsafe(loop.call_later, delay, callback, *args)

    def _notify(self, machine_id: str) -> None:
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread_id:
            self._wake(machine_id)
        else:
            loop.call_soon_threadsafe(self._wake, machine_id)

    def _wake(self, machine_id: str) -> None:
        for future in self._waiters.pop(machine_id, set()):
            if not future.done():
                future.set_result(None)

    # --- Python API: apps and data ------------------------------------------------------------------

    @property
    def known_apps(self) -> set[str] | None:
        """If a set, only these apps exist (others → 404 "app not found"); None: apps appear when used."""
        return self.state.known_apps

    @known_apps.setter
    def known_apps(self, apps: set[str] | None) -> None:
        with self.state.lock:
            self.state.known_apps = None if apps is None else set(apps)

    def create_volume(self, app: str, name: str, region: str, size_gb: int = 10) -> JSON:
        """Create a volume directly (no HTTP, no faults); returns its API dict."""
        return self.state.create_volume(app, {"name": name, "region": region, "size_gb": size_gb}).to_api()

    def add_snapshot(self, volume_id: str) -> JSON:
        """Add a snapshot to a volume; returns the snapshot's API dict."""
        return self.state.add_snapshot(volume_id).to_api()

    # --- Python API: faults -------------------------------------------------------------------------

    def fail_host(
        self,
        machine_id: str | None = None,
        *,
        region: str | None = None,
        host: str | None = None,
        status: HostStatus = "unreachable",
    ) -> list[str]:
        """Fail the host of a machine, a named host, or every host of a region; returns the host ids. Its
        machines and volumes show `host_status` `status` until `restore_host`."""
        return self.state.fail_host(machine_id=machine_id, region=region, host=host, status=status)

    def restore_host(
        self, machine_id: str | None = None, *, region: str | None = None, host: str | None = None
    ) -> list[str]:
        """Failed hosts return: machines stay `stopped`, pending destroys complete, blocked forks hydrate."""
        return self.state.restore_host(machine_id=machine_id, region=region, host=host)

    @property
    def unreachable_fork(self) -> UnreachableFork:
        """How a fork of a volume on an unreachable host shows: `hydrating` (default) or `refused`."""
        return self.state.unreachable_fork

    @unreachable_fork.setter
    def unreachable_fork(self, mode: UnreachableFork) -> None:
        if mode not in ("hydrating", "refused"):
            raise ValueError("unreachable_fork must be 'hydrating' or 'refused'")
        with self.state.lock:
            self.state.unreachable_fork = mode

    @property
    def whole_second_timestamps(self) -> bool:
        """`updated_at`/`created_at` shown with whole seconds, as Fly shows them (default False: ms)."""
        return self.state.whole_second_timestamps

    @whole_second_timestamps.setter
    def whole_second_timestamps(self, value: bool) -> None:
        with self.state.lock:
            self.state.whole_second_timestamps = bool(value)

    def limit_capacity(self, region: str, machines: int | None) -> None:
        """Finite capacity: at most `machines` live machines (and volumes) in `region`; None: unlimited."""
        self.state.limit_capacity(region, machines)

    def migrate_machine(self, machine_id: str, *, to_host: str | None = None) -> str:
        """A platform migration: stop, fork the volume to another host, start the same machine id there."""
        return self.state.migrate_machine(machine_id, to_host=to_host)

    def lie_in_listing(
        self, machine_ids: list[str] | None = None, *, fraction: float | None = None, state: str = "stopped"
    ) -> list[str]:
        """The organisation listing misreports machines (GET still tells the truth); returns their ids."""
        return self.state.lie_in_listing(machine_ids, fraction=fraction, state=state)

    def end_listing_lies(self) -> list[str]:
        return self.state.end_listing_lies()

    def exhaust_capacity(self, region: str, kind: CapacityKind = "both", *, status: int = 412) -> None:
        """Creates of `kind` in `region` fail with a capacity error (status 412, or 409 memory-style)."""
        if status not in (409, 412):
            raise ValueError("capacity errors use status 409 or 412")
        self.state.exhaust_capacity(region, kind, status=status)

    def restore_capacity(self, region: str) -> None:
        self.state.restore_capacity(region)

    def inject_faults(
        self,
        route: str,
        status: int,
        *,
        rate: float | None = None,
        count: int | None = None,
        retry_after: float | None = None,
        message: str | None = None,
        apply_first: bool = False,
    ) -> None:
        """Answer matching requests with `status` — every request (`rate` 1), a fraction, or the next `count`.

        `route` is `"METHOD /path/glob"` (`*` = one path segment, `**` = any, method `*` = any).
        `apply_first=True` performs the request and then replaces the response (a lost reply).
        """
        if rate is not None and not 0 <= rate <= 1:
            raise ValueError("rate must be within 0..1")
        if count is not None and count < 1:
            raise ValueError("count must be positive")
        method, path = _route_regex(route)
        rule = FaultRule(
            pattern=route,
            method=method,
            path=path,
            status=status,
            rate=1.0 if rate is None else rate,
            remaining=count,
            retry_after=retry_after,
            message=message or _DEFAULT_FAULT_MESSAGES.get(status, "injected fault"),
            apply_first=apply_first,
        )
        with self._control_lock:
            self._faults.append(rule)

    def expire_cursors(self, count: int = 1) -> None:
        """The next `count` organisation listings that carry a cursor answer 400 "cursor expired"."""
        with self._control_lock:
            self._expire_cursors += count

    @property
    def clock_offset(self) -> float:
        """Seconds Fly's clock runs ahead of the host's (negative: behind): timestamps and the Date header."""
        return self.state.clock_offset

    @clock_offset.setter
    def clock_offset(self, seconds: float) -> None:
        with self.state.lock:
            self.state.clock_offset = seconds

    def clear_faults(self) -> None:
        with self._control_lock:
            self._faults.clear()

    def set_latency(self, seconds: float, route: str | None = None) -> None:
        """Delay every Fly API request (route None) or those matching `route` by `seconds`."""
        with self._control_lock:
            if route is None:
                self._latency_default = seconds
            else:
                method, path = _route_regex(route)
                self._latency_rules.append(LatencyRule(method, path, seconds))

    def clear_latency(self) -> None:
        with self._control_lock:
            self._latency_default = 0.0
            self._latency_rules.clear()

    def crash_machine(self, machine_id: str, *, exit_code: int = 1, oom: bool = False) -> None:
        """The machine stops by itself (exit event); it can be started again."""
        self.state.crash_machine(machine_id, exit_code=exit_code, oom=oom)

    def break_machine_start(self, machine_id: str, mode: StartBreak = "hang") -> None:
        """Starts of this machine hang in `starting` ("hang") or end in `failed` ("fail") until repaired."""
        self.state.break_machine_start(machine_id, mode)

    def repair_machine_start(self, machine_id: str) -> None:
        """Starts work again; a start hanging in `starting` completes (after the start delay)."""
        self.state.repair_machine_start(machine_id)

    # --- Python API: introspection ------------------------------------------------------------------

    def machines(self, app: str | None = None) -> list[JSON]:
        """API-shaped copies of all machines (incl. destroyed ones still retained) plus `app_name`, `host`."""
        return self.state.machine_dicts(app)

    def volumes(self, app: str | None = None) -> list[JSON]:
        """API-shaped copies of live volumes plus `app_name`, `host`, `source_volume_id`, `snapshots`."""
        return self.state.volume_dicts(app)

    def machine(self, machine_id: str) -> JSON:
        return next(m for m in self.machines() if m["id"] == machine_id)

    def volume(self, volume_id: str) -> JSON:
        return next(v for v in self.volumes() if v["id"] == volume_id)

    @property
    def request_log(self) -> list[RequestRecord]:
        with self._control_lock:
            return list(self._request_log)

    @property
    def request_counts(self) -> dict[str, int]:
        """Requests per `"METHOD /v1/route/{template}"`, e.g. `"POST /v1/apps/{app_name}/volumes"`."""
        with self._control_lock:
            return dict(self._request_counts)

    @property
    def pending_waits(self) -> int:
        """Wait requests currently blocked on a machine state."""
        return sum(len(futures) for futures in list(self._waiters.values()))

    def request_count(self, route: str) -> int:
        with self._control_lock:
            return self._request_counts.get(route, 0)

    # --- HTTP: application --------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=4 * 1024 * 1024)
        fly = [
            web.get("/v1/apps/{app_name}", self._get_app),
            web.get("/v1/apps/{app_name}/machines", self._list_machines),
            web.post("/v1/apps/{app_name}/machines", self._create_machine),
            web.get("/v1/apps/{app_name}/machines/{machine_id}", self._get_machine),
            web.post("/v1/apps/{app_name}/machines/{machine_id}", self._update_machine),
            web.delete("/v1/apps/{app_name}/machines/{machine_id}", self._destroy_machine),
            web.post("/v1/apps/{app_name}/machines/{machine_id}/start", self._start_machine),
            web.post("/v1/apps/{app_name}/machines/{machine_id}/stop", self._stop_machine),
            web.get("/v1/apps/{app_name}/machines/{machine_id}/wait", self._wait_machine),
            web.get("/v1/apps/{app_name}/volumes", self._list_volumes),
            web.post("/v1/apps/{app_name}/volumes", self._create_volume),
            web.get("/v1/apps/{app_name}/volumes/{volume_id}", self._get_volume),
            web.delete("/v1/apps/{app_name}/volumes/{volume_id}", self._delete_volume),
            web.get("/v1/apps/{app_name}/volumes/{volume_id}/snapshots", self._list_snapshots),
            web.post("/v1/apps/{app_name}/volumes/{volume_id}/snapshots", self._create_snapshot),
            web.get("/v1/orgs/{org_slug}/machines", self._list_org_machines),
        ]
        control = [
            web.post("/_sim/hosts/fail", self._control_fail_host),
            web.post("/_sim/hosts/restore", self._control_restore_host),
            web.put("/_sim/forks", self._control_forks),
            web.post("/_sim/capacity/limit", self._control_limit),
            web.post("/_sim/machines/{machine_id}/migrate", self._control_migrate),
            web.post("/_sim/listing/lies", self._control_lie),
            web.delete("/_sim/listing/lies", self._control_end_lies),
            web.post("/_sim/capacity/exhaust", self._control_exhaust),
            web.post("/_sim/capacity/restore", self._control_restore),
            web.post("/_sim/faults", self._control_inject),
            web.delete("/_sim/faults", self._control_clear_faults),
            web.post("/_sim/latency", self._control_latency),
            web.delete("/_sim/latency", self._control_clear_latency),
            web.post("/_sim/machines/{machine_id}/crash", self._control_crash),
            web.post("/_sim/machines/{machine_id}/break_start", self._control_break_start),
            web.post("/_sim/machines/{machine_id}/repair_start", self._control_repair_start),
            web.post("/_sim/volumes", self._control_create_volume),
            web.post("/_sim/volumes/{volume_id}/snapshots", self._control_add_snapshot),
            web.put("/_sim/known_apps", self._control_known_apps),
            web.get("/_sim/state", self._control_state),
            web.get("/_sim/requests", self._control_requests),
        ]
        app.add_routes(fly + control)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            return await self._serve_control(request, handler)
        response = await self._serve_fly(request, handler)
        if self.state.clock_offset:
            response.headers["Date"] = email.utils.format_datetime(self.state.clock(), usegmt=True)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        record = RequestRecord(
            request.method, request.path, request.query_string, route, response.status, time.time()
        )
        with self._control_lock:
            self._request_log.append(record)
            self._request_counts[f"{request.method} {route}"] += 1
        return response

    async def _serve_fly(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        RENDER_SHIFT.set(self.state.clock_offset)
        delay, fault = self._pick_latency_and_fault(request.method, request.path)
        if delay > 0:
            # Read the body first, as a server does before it works on a request: a request whose client
            # disconnects during the delay (a crashed operator) is still carried out, like a real lost reply.
            await request.read()
            await asyncio.sleep(delay)
        if fault is not None and not fault.apply_first:
            return self._fault_response(fault)
        if request.headers.get("Authorization", "") != f"Bearer {self.token}":
            return _error(401, "unauthorized: missing or invalid bearer token")
        limited = self._rate_limit(request)
        if limited is not None:
            return limited
        try:
            response = await handler(request)
        except FlyApiError as exc:
            response = web.json_response(exc.body(), status=exc.status)
        except web.HTTPException as exc:
            response = _error(exc.status, exc.reason.lower())
        if fault is not None:
            return self._fault_response(fault)
        return response

    def _rate_limit(self, request: web.Request) -> web.Response | None:
        """429 with Retry-After when the request's token bucket is empty (see `RateLimits`)."""
        limits = self.rate_limits
        if limits is None:
            return None
        resource = request.match_info.route.resource
        rate_class = _RATE_CLASSES.get((request.method, resource.canonical if resource else ""))
        if rate_class is None:
            return None
        name, subject, mutating = rate_class
        rate, burst = (
            (limits.action_rate, limits.action_burst) if mutating else (limits.read_rate, limits.read_burst)
        )
        key = (name, request.match_info.get(subject, ""))
        now = time.monotonic()
        with self._control_lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(tokens=float(burst), at=now)
            bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.at) * rate)
            bucket.at = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            self.rate_limited += 1
            wait = (1.0 - bucket.tokens) / rate
        response = _error(429, f"rate limit exceeded for {name.replace('_', ' ')}")
        response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return response

    def _pick_latency_and_fault(self, method: str, path: str) -> tuple[float, FaultRule | None]:
        with self._control_lock:
            delay = self._latency_default
            for rule in self._latency_rules:
                if rule.method in ("*", method) and rule.path.match(path):
                    delay = rule.seconds
            for fault in self._faults:
                if not fault.matches(method, path):
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return delay, fault
                if self._rng.random() < fault.rate:
                    return delay, fault
            return delay, None

    @staticmethod
    def _fault_response(fault: FaultRule) -> web.Response:
        response = _error(fault.status, fault.message)
        if fault.retry_after is not None:
            response.headers["Retry-After"] = f"{fault.retry_after:g}"
        return response

    async def _serve_control(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.control_token is not None and request.headers.get("Authorization") != (
            f"Bearer {self.control_token}"
        ):
            return _error(401, "unauthorized: missing or invalid control token")
        try:
            return await handler(request)
        except FlyApiError as exc:
            return web.json_response(exc.body(), status=exc.status)
        except (KeyError, ValueError, TypeError) as exc:
            return _error(400, str(exc))
        except web.HTTPException as exc:
            return _error(exc.status, exc.reason.lower())

    # --- HTTP: Fly API ------------------------------------------------------------------------------

    async def _get_app(self, request: web.Request) -> web.Response:
        name = request.match_info["app_name"]
        with self.state.lock:
            app = self.state.app(name)
            body = {
                "id": app.name,
                "name": app.name,
                "status": "deployed",
                "machine_count": sum(1 for m in app.machines.values() if m.state not in GONE_STATES),
                "volume_count": len(app.volumes),
                "organization": {"name": self.org_slug or "personal", "slug": self.org_slug or "personal"},
            }
        return web.json_response(body)

    async def _list_machines(self, request: web.Request) -> web.Response:
        query = request.query
        metadata = {
            key[len("metadata.") :]: value for key, value in query.items() if key.startswith("metadata.")
        }
        machines = self.state.list_machines(
            request.match_info["app_name"],
            include_deleted=_flag(query.get("include_deleted")),
            region=query.get("region") or None,
            states=_states(query),
            metadata=metadata,
        )
        summary = _flag(query.get("summary"))
        with self.state.lock:
            body = [m.to_api(summary=summary) for m in machines]
        return _json(body)

    async def _create_machine(self, request: web.Request) -> web.Response:
        body = await _body(request)
        with self.state.lock:
            return _json(self.state.create_machine(request.match_info["app_name"], body).to_api())

    async def _get_machine(self, request: web.Request) -> web.Response:
        with self.state.lock:
            machine = self.state.machine(request.match_info["app_name"], request.match_info["machine_id"])
            return _json(machine.to_api())

    async def _update_machine(self, request: web.Request) -> web.Response:
        body = await _body(request)
        with self.state.lock:
            machine = self.state.update_machine(
                request.match_info["app_name"], request.match_info["machine_id"], body
            )
            return _json(machine.to_api())

    async def _start_machine(self, request: web.Request) -> web.Response:
        previous = self.state.start_machine(request.match_info["app_name"], request.match_info["machine_id"])
        return web.json_response({"previous_state": previous, "migrated": False, "new_host": ""})

    async def _stop_machine(self, request: web.Request) -> web.Response:
        self.state.stop_machine(request.match_info["app_name"], request.match_info["machine_id"])
        return web.json_response({"ok": True})

    async def _destroy_machine(self, request: web.Request) -> web.Response:
        self.state.destroy_machine(
            request.match_info["app_name"],
            request.match_info["machine_id"],
            force=_flag(request.query.get("force")),
        )
        return web.json_response({"ok": True})

    async def _wait_machine(self, request: web.Request) -> web.Response:
        app_name, machine_id = request.match_info["app_name"], request.match_info["machine_id"]
        wanted: set[str] = set()
        for value in request.query.getall("state", ["started"]):
            for state in value.split(","):
                state = state.strip()
                if state not in WAITABLE_STATES:
                    raise FlyApiError(400, f"invalid_argument: invalid state '{state}'")
                wanted |= SETTLED_STATES if state == "settled" else {state}
        try:
            timeout = float(request.query.get("timeout", _MAX_WAIT_SECONDS))
        except ValueError:
            raise FlyApiError(400, "invalid_argument: timeout must be a number of seconds") from None
        timeout = min(max(timeout, 0.0), _MAX_WAIT_SECONDS)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with self.state.lock:
                machine = self.state.machine(app_name, machine_id)
                if machine.state in wanted:
                    return web.json_response(
                        {"ok": True, "state": machine.state, "version": machine.instance_id, "event_id": ""}
                    )
                current = machine.state
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise FlyApiError(
                    408,
                    f"deadline_exceeded: machine {machine_id} did not reach state "
                    f"{'|'.join(sorted(wanted))} within {timeout:g}s (current state: {current})",
                )
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(machine_id, set()).add(future)
            try:
                await asyncio.wait_for(future, remaining)
            except TimeoutError:
                pass
            finally:
                waiting = self._waiters.get(machine_id)
                if waiting is not None:
                    waiting.discard(future)
                    if not waiting:
                        del self._waiters[machine_id]

    async def _list_volumes(self, request: web.Request) -> web.Response:
        volumes = self.state.list_volumes(request.match_info["app_name"])
        with self.state.lock:
            return _json([v.to_api() for v in volumes])

    async def _create_volume(self, request: web.Request) -> web.Response:
        body = await _body(request)
        with self.state.lock:
            return _json(self.state.create_volume(request.match_info["app_name"], body).to_api())

    async def _get_volume(self, request: web.Request) -> web.Response:
        with self.state.lock:
            return _json(
                self.state.volume(request.match_info["app_name"], request.match_info["volume_id"]).to_api()
            )

    async def _delete_volume(self, request: web.Request) -> web.Response:
        with self.state.lock:
            volume = self.state.delete_volume(request.match_info["app_name"], request.match_info["volume_id"])
            return _json(volume.to_api())

    async def _list_snapshots(self, request: web.Request) -> web.Response:
        with self.state.lock:
            volume = self.state.volume(request.match_info["app_name"], request.match_info["volume_id"])
            return _json([s.to_api() for s in volume.snapshots])

    async def _create_snapshot(self, request: web.Request) -> web.Response:
        with self.state.lock:
            volume = self.state.volume(request.match_info["app_name"], request.match_info["volume_id"])
            self.state.add_snapshot(volume.id)
        return web.Response(status=200)

    async def _list_org_machines(self, request: web.Request) -> web.Response:
        slug = request.match_info["org_slug"]
        if self.org_slug is not None and slug != self.org_slug:
            raise FlyApiError(404, "organization not found")
        query = request.query
        after_seq = None
        if query.get("cursor"):
            after_seq, issued = _decode_cursor(query["cursor"])
            with self._control_lock:
                expire = self._expire_cursors > 0
                if expire:
                    self._expire_cursors -= 1
            if expire or (issued is not None and time.time() - issued > self.org_cursor_ttl):
                raise FlyApiError(400, "invalid_argument: cursor expired, start again from updated_after")
        updated_after = None
        if after_seq is None and query.get("updated_after"):
            try:
                updated_after = parse_rfc3339(query["updated_after"])
            except ValueError:
                raise FlyApiError(
                    400, "invalid_argument: updated_after must be an RFC 3339 timestamp"
                ) from None
        try:
            limit = int(query.get("limit", _MAX_ORG_PAGE))
        except ValueError:
            raise FlyApiError(400, "invalid_argument: limit must be an integer") from None
        # The limit is advisory (the spec): the server may answer with fewer machines even when more remain.
        limit = min(max(limit, 1), _MAX_ORG_PAGE, self.org_page_limit)
        summary = _flag(query.get("summary"))
        with self.state.lock:
            page, more = self.state.list_org_machines(
                after_seq=after_seq,
                updated_after=updated_after,
                include_deleted=_flag(query.get("include_deleted")),
                region=query.get("region") or None,
                states=_states(query),
                limit=limit,
            )
            body: JSON = {"machines": [m.to_org_api(summary=summary, version=v) for m, v in page]}
            if page:
                body["last_machine_id"] = page[-1][0].id
                body["last_updated_at"] = rfc3339(page[-1][1].updated_at)
            if more:
                body["next_cursor"] = _encode_cursor(page[-1][1].seq, time.time())
        return _json(body)

    # --- HTTP: control API --------------------------------------------------------------------------

    async def _control_fail_host(self, request: web.Request) -> web.Response:
        body = await _body(request)
        hosts = self.fail_host(
            body.get("machine_id"),
            region=body.get("region"),
            host=body.get("host"),
            status=body.get("status", "unreachable"),
        )
        with self.state.lock:
            stopped = self.state.machines_on_hosts(set(hosts), state="stopped")
        return web.json_response({"failed_hosts": hosts, "stopped_machines": stopped})

    async def _control_restore_host(self, request: web.Request) -> web.Response:
        body = await _body(request)
        hosts = self.restore_host(body.get("machine_id"), region=body.get("region"), host=body.get("host"))
        return web.json_response({"restored_hosts": hosts})

    async def _control_forks(self, request: web.Request) -> web.Response:
        body = await _body(request)
        self.unreachable_fork = body["unreachable"]
        return web.json_response({"ok": True})

    async def _control_limit(self, request: web.Request) -> web.Response:
        body = await _body(request)
        machines = body.get("machines")
        self.limit_capacity(body["region"], None if machines is None else int(machines))
        return web.json_response({"ok": True})

    async def _control_migrate(self, request: web.Request) -> web.Response:
        body = await _body(request, optional=True)
        host = self.migrate_machine(request.match_info["machine_id"], to_host=body.get("to_host"))
        return web.json_response({"to_host": host})

    async def _control_lie(self, request: web.Request) -> web.Response:
        body = await _body(request)
        ids = self.lie_in_listing(
            body.get("machine_ids"), fraction=body.get("fraction"), state=body.get("state", "stopped")
        )
        return web.json_response({"machine_ids": ids})

    async def _control_end_lies(self, request: web.Request) -> web.Response:
        return web.json_response({"machine_ids": self.end_listing_lies()})

    async def _control_exhaust(self, request: web.Request) -> web.Response:
        body = await _body(request)
        self.exhaust_capacity(body["region"], body.get("kind", "both"), status=int(body.get("status", 412)))
        return web.json_response({"ok": True})

    async def _control_restore(self, request: web.Request) -> web.Response:
        body = await _body(request)
        self.restore_capacity(body["region"])
        return web.json_response({"ok": True})

    async def _control_inject(self, request: web.Request) -> web.Response:
        body = await _body(request)
        self.inject_faults(
            body["route"],
            int(body["status"]),
            rate=body.get("rate"),
            count=body.get("count"),
            retry_after=body.get("retry_after"),
            message=body.get("message"),
            apply_first=bool(body.get("apply_first", False)),
        )
        return web.json_response({"ok": True})

    async def _control_clear_faults(self, request: web.Request) -> web.Response:
        self.clear_faults()
        return web.json_response({"ok": True})

    async def _control_latency(self, request: web.Request) -> web.Response:
        body = await _body(request)
        self.set_latency(float(body["seconds"]), body.get("route"))
        return web.json_response({"ok": True})

    async def _control_clear_latency(self, request: web.Request) -> web.Response:
        self.clear_latency()
        return web.json_response({"ok": True})

    async def _control_crash(self, request: web.Request) -> web.Response:
        body = await _body(request, optional=True)
        self.crash_machine(
            request.match_info["machine_id"],
            exit_code=int(body.get("exit_code", 1)),
            oom=bool(body.get("oom")),
        )
        return web.json_response({"ok": True})

    async def _control_break_start(self, request: web.Request) -> web.Response:
        body = await _body(request, optional=True)
        mode = body.get("mode", "hang")
        if mode not in ("hang", "fail"):
            raise ValueError("mode must be 'hang' or 'fail'")
        self.break_machine_start(request.match_info["machine_id"], mode)
        return web.json_response({"ok": True})

    async def _control_repair_start(self, request: web.Request) -> web.Response:
        self.repair_machine_start(request.match_info["machine_id"])
        return web.json_response({"ok": True})

    async def _control_create_volume(self, request: web.Request) -> web.Response:
        body = await _body(request)
        volume = self.create_volume(body["app"], body["name"], body["region"], int(body.get("size_gb", 10)))
        return web.json_response(volume)

    async def _control_add_snapshot(self, request: web.Request) -> web.Response:
        return web.json_response(self.add_snapshot(request.match_info["volume_id"]))

    async def _control_known_apps(self, request: web.Request) -> web.Response:
        body = await _body(request)
        apps = body.get("apps")
        self.known_apps = None if apps is None else set(apps)
        return web.json_response({"ok": True})

    async def _control_state(self, request: web.Request) -> web.Response:
        app = request.query.get("app")
        return _json({"machines": self.machines(app), "volumes": self.volumes(app)})

    async def _control_requests(self, request: web.Request) -> web.Response:
        tail = int(request.query.get("tail", 200))
        log = self.request_log[-tail:] if tail > 0 else []
        return _json(
            {
                "counts": self.request_counts,
                "rate_limited": self.rate_limited,
                "log": [
                    {"method": r.method, "path": r.path, "query": r.query, "status": r.status, "at": r.at}
                    for r in log
                ],
            }
        )


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(body, separators=(",", ":")), status=status, content_type="application/json"
    )


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


async def _body(request: web.Request, *, optional: bool = False) -> JSON:
    raw = await request.read()
    if not raw.strip():
        if optional:
            return {}
        raise FlyApiError(400, "invalid_argument: request body is required")
    try:
        body = json.loads(raw)
    except ValueError:
        raise FlyApiError(400, "invalid_argument: request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise FlyApiError(400, "invalid_argument: request body must be a JSON object")
    return body


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def _states(query: Any) -> set[str] | None:
    raw = query.get("state")
    if not raw:
        return None
    return {state.strip() for state in raw.split(",") if state.strip()}


def _encode_cursor(seq: int, issued: float) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}:{issued:.3f}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, float | None]:
    """`(position, issued at)`; cursors expire `org_cursor_ttl` seconds after they were issued."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, rest = text.partition(":")
        if prefix != "seq":
            raise ValueError(cursor)
        number, _, issued = rest.partition(":")
        return int(number), (float(issued) if issued else None)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise FlyApiError(400, "invalid_argument: invalid cursor") from None
