"""flysim — a Fly Machines API simulator (aiohttp, in-memory state) for tests, `dev` and benchmarks.

Shaped by the Fly OpenAPI spec (`../shared/fly/machines-openapi.json`): field names, response shapes and
status codes follow it; `tests/simulators/test_flysim.py` validates responses against its schemas. Imports
nothing of the operator.

Usage::

    sim = FlySimulator(token="t", regions=("iad", "ord"), timings=SimTimings(start_delay=0.01))
    sim.start_in_thread()          # or: await sim.start() in the current loop
    client = FlyClient(base_url=sim.base_url, token="t")   # base_url has no /v1
    ...
    sim.stop_thread()              # or: await sim.stop()

    python -m flysim --port 4280 --token t        # standalone until Ctrl-C

Fly API served (all under `/v1`, `Authorization: Bearer <token>` required, else 401 `{"error": ...}`):

- `GET  /v1/apps/{app}`; apps exist implicitly once used, unless `sim.known_apps` is a set (then unknown
  apps → 404 `{"error": "app not found"}`).
- `GET  /v1/apps/{app}/machines` — `?include_deleted=true`, `region=`, `state=a,b`, `summary=true` (omits
  config/events/checks/host_status), `metadata.KEY=VALUE` (repeatable, all must match).
- `POST /v1/apps/{app}/machines` (CreateMachineRequest; `skip_launch` honoured) → 200 Machine in state
  `created`, then `starting` → `started` after `start_delay`.
- `GET|POST|DELETE /v1/apps/{app}/machines/{id}`; POST = update: config replaced, new `instance_id`; a
  running machine goes `replacing` → `starting` → `started`. DELETE needs `?force=true` unless the machine is
  created/stopped/suspended/failed (else 412); → `destroying` → `destroyed`. A destroyed machine stays
  visible (GET 200, state `destroyed`; listed only with `include_deleted`) for
  `SimTimings.destroyed_retention` seconds, then 404. DELETE of a `destroyed` machine → 404, of a
  `destroying` one → 200.
- `POST .../machines/{id}/start` → `{"previous_state", "migrated", "new_host"}`; started/starting: no-op.
  `POST .../stop` → `{"ok": true}`; stopped/failed: no-op. Both 412 on destroying/destroyed machines.
- `GET  .../machines/{id}/wait?state=started|stopped|suspended|destroyed|failed|settled` (repeatable or
  comma-separated; default started) `&timeout=SECONDS` (default and max 60; fractions allowed) → 200
  `{"ok": true, "state", "version", "event_id"}` or 408 `{"error": "deadline_exceeded: ..."}`.
  `instance_id`/`version` are accepted and ignored.
- `GET|POST /v1/apps/{app}/volumes`; create needs `region`, `name` (≤ 30 of `[a-z0-9_]`, duplicates allowed)
  and `size_gb` (1..500) unless forking (`source_volume_id`: same app; lands in the requested region on a
  healthy host, size defaults to the source's, smaller → 400, no snapshots) or restoring (`snapshot_id`).
  Forks/restores are `hydrating` for `hydrate_delay`, then `created`. `compute` etc. are accepted.
- `GET|DELETE /v1/apps/{app}/volumes/{id}`; DELETE → 200 Volume with state `pending_destroy`, then 404.
- `GET|POST /v1/apps/{app}/volumes/{id}/snapshots`; POST → 200 with an empty body (as the spec says).
- `GET  /v1/orgs/{org}/machines?updated_after=RFC3339&cursor=&limit=&summary=&include_deleted=&region=&state=`
  → `{"machines": [OrgMachine...], "next_cursor"?, "last_machine_id"?, "last_updated_at"?}`: machines of all
  apps changed strictly after `updated_after` (or after the `cursor` position; the cursor wins), oldest
  change first; `limit` default/max 1000; `next_cursor` is present only when more machines remain.
  `summary=true` omits `config` (else config = {image, guest, metadata}). Any org slug is accepted unless
  `FlySimulator(org_slug=...)` is given (then others → 404). Destroyed machines only with include_deleted.
  As on Fly, the listing is "a point in time" whose recent changes propagate late: a change shows only
  after a delay drawn from ½..1 × `SimTimings.org_propagation_delay` (default 0), the machine's previous
  version until then, so a change can surface behind a cursor. `limit` is advisory
  (`sim.org_page_limit` caps pages, default 1000); cursors expire after `sim.org_cursor_ttl` seconds
  (default 60) and `sim.expire_cursors(n)` makes the next n cursor requests fail: 400
  `invalid_argument: cursor expired, ...`. `sim.clock_offset` shifts Fly's clock (every timestamp and the
  `Date` header) against the host's.

Rate limits (`FlySimulator(rate_limits=RateLimits())`, Fly's documented limits, on by default; None turns
them off): one token bucket per action and machine (per app for creates, per org for the org listing);
mutating actions 1 request/s with a burst of 3, reads (GET machine, wait, lists) 5/s with a burst of 10;
beyond them 429 `{"error": "rate limit exceeded for ..."}` with `Retry-After` in whole seconds. Refusals are
counted in `sim.rate_limited` (and in the request log and `/_sim/requests`).

Timestamps are RFC 3339 UTC with milliseconds (`2026-11-25T14:20:00.123Z`). `updated_at` changes on every
state transition and update. Ids: machines 14 hex chars, volumes `vol_` + 16 `[a-z0-9]`, snapshots `vs_…`,
`instance_id` 26-char ULID-like. Volume `attached_machine_id`/`attached_alloc_id` are JSON `null` when unset.

Errors (`{"error": message}`; capacity errors also carry `"status": "insufficient_capacity"`):

- capacity (`exhaust_capacity`, or no healthy host in the region): 412
  `insufficient resources: no capacity available for volumes|machines in region 'R'`; with
  `exhaust_capacity(..., status=409)`: 409 `aborted: could not reserve resource for machine: insufficient
  memory available to fulfill request`.
- pinning: mount of a volume in another region → 400 `invalid_argument: volume 'V' is in region 'A',
  machine requested region 'B'`; volume already bound to a live machine → 412 `failed_precondition: volume
  'V' is currently bound to machine: M`; unknown volume → 400; more than one mount → 400.
- DELETE of a bound volume → 412 `failed_precondition: volume is currently bound to machine: M` (bound until
  the machine is `destroyed` + `detach_delay`).
- duplicate machine name among non-destroyed machines of an app → 409 `invalid_argument: unique machine name
  violation, ...`.
- start/update of a machine whose host failed → 412 `failed_precondition: machine host is unreachable`.
- not found → 404 `machine not found` / `volume not found` / `app not found`.

Hosts: every region has `hosts_per_region` hosts. A volume lives on a host; a machine with a mount runs on
its volume's host. `fail_host(...)` → the host's active machines go `stopped` with an `exit` event
(`host_status: unreachable`); they cannot start again; their volumes stay readable, deletable (once the
machine is destroyed) and forkable (the fork lands on a healthy host).

Constructor: `FlySimulator(token="test-token", regions=("iad", "ord", "cdg", "ams", "sjc"),
timings=SimTimings(), *, hosts_per_region=3, org_slug=None, control_token=None, seed=None,
request_log_size=10000)`. `sim.state` is the underlying `FlyState` (thread-safe; e.g.
`sim.state.create_machine(app, body)` bypasses HTTP).

Fault injection — Python API (thread-safe) and control routes (no auth unless `control_token` is set, then
`Authorization: Bearer <control_token>`; bodies are JSON; not recorded in the request log):

- `fail_host(machine_id=None, *, region=None, host=None) -> list[str]`   POST /_sim/hosts/fail
  `{"machine_id"|"region"|"host"}`
- `exhaust_capacity(region, kind="both"|"volumes"|"machines", *, status=412)` POST /_sim/capacity/exhaust
  `{"region","kind","status"}`; `restore_capacity(region)` POST /_sim/capacity/restore `{"region"}`
- `inject_faults(route, status, *, rate=None, count=None, retry_after=None, message=None, apply_first=False)`
  POST /_sim/faults `{"route","status","rate","count","retry_after","message","apply_first"}`;
  `clear_faults()` DELETE /_sim/faults. `route` = `"METHOD /path-glob"` (`*` one segment, `**` any depth,
  method `*` any). `count` = the next N matching requests; otherwise each matches with probability `rate`
  (default 1). 429/503 with `retry_after` send `Retry-After`. `apply_first` performs the request, then
  answers with the fault (a lost reply).
- `set_latency(seconds, route=None)` POST /_sim/latency `{"seconds","route"}`; `clear_latency()`
  DELETE /_sim/latency.
- `crash_machine(id, *, exit_code=1, oom=False)` POST /_sim/machines/{id}/crash → `stopped` (exit event).
- `break_machine_start(id, mode="hang"|"fail")` POST /_sim/machines/{id}/break_start `{"mode"}`: starts hang
  in `starting` or end `failed`; `repair_machine_start(id)` POST /_sim/machines/{id}/repair_start (a start
  hanging in `starting` then completes).
- `create_volume(app, name, region, size_gb=10)` POST /_sim/volumes `{"app","name","region","size_gb"}`;
  `add_snapshot(volume_id)` POST /_sim/volumes/{id}/snapshots; `known_apps` PUT /_sim/known_apps
  `{"apps": [...] | null}`.
- Introspection: `pending_waits` (blocked wait requests), `machines(app=None)`, `volumes(app=None)`,
  `machine(id)`, `volume(id)`, `request_log`
  (list of `RequestRecord(method, path, query, route, status, at)`, last 10,000), `request_counts`
  (`{"POST /v1/apps/{app_name}/volumes": n, ...}`), `request_count(route)`; GET /_sim/state?app=,
  GET /_sim/requests?tail=200.
"""

from .simulator import FlySimulator, RateLimits, RequestRecord
from .state import FlyApiError, SimTimings

__all__ = ["FlyApiError", "FlySimulator", "RateLimits", "RequestRecord", "SimTimings"]
