"""In-memory Fly state: machines, volumes, snapshots, hosts, and their state machines.

Everything here runs under one `threading.RLock` held by `FlyState`; the HTTP layer and the Python fault /
introspection API (possibly called from another thread) both go through it. Delayed transitions are
scheduled on the simulator's event loop through the `Scheduler` callbacks, so a transition never runs
concurrently with a request handler.
"""

from __future__ import annotations

import hashlib
import random
import string
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

JSON = dict[str, Any]

#: States in which a machine may be destroyed without `force=true` (Fly's rule).
DESTROYABLE_WITHOUT_FORCE = frozenset({"created", "stopped", "suspended", "failed"})
#: States that count as "running or about to run" for stop/update/host failure.
ACTIVE_STATES = frozenset({"created", "starting", "started", "replacing", "stopping"})
GONE_STATES = frozenset({"destroying", "destroyed"})
SETTLED_STATES = frozenset({"started", "stopped", "suspended", "failed", "destroyed"})
WAITABLE_STATES = frozenset({"started", "stopped", "suspended", "destroyed", "failed", "settled"})

CapacityKind = Literal["volumes", "machines", "both"]
StartBreak = Literal["hang", "fail"]
#: How a fork whose source volume's host is unreachable shows (Fly copies a fork's blocks from its source
#: lazily, so it cannot complete without that host): refused at once (412), or accepted and left `hydrating`
#: until the host returns, a machine on it never reaching `started` meanwhile.
UnreachableFork = Literal["hydrating", "refused"]
#: What `host_status` a failed host shows (the OpenAPI enum: ok, unknown, unreachable).
HostStatus = Literal["unknown", "unreachable"]

_VOLUME_NAME_CHARS = frozenset(string.ascii_lowercase + string.digits + "_")
_ALNUM = string.ascii_lowercase + string.digits
_ULID_CHARS = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_MAX_EVENTS = 10


@dataclass(frozen=True)
class SimTimings:
    """Delays (seconds) of the simulated state machines. Defaults keep tests fast."""

    start_delay: float = 0.05
    stop_delay: float = 0.05
    destroy_delay: float = 0.05
    #: Forks and snapshot restores stay `hydrating` this long before becoming `created`.
    hydrate_delay: float = 0.05
    #: A destroyed machine keeps its volume bound this long (Fly can take up to a minute).
    detach_delay: float = 0.0
    #: A destroyed machine stays visible (state `destroyed`) this long, then GET answers 404.
    destroyed_retention: float = 60.0
    #: The organisation listing shows a change only after a delay drawn uniformly from half this to this (Fly:
    #: "recent machine changes may take time to propagate"); until then it shows the previous version.
    org_propagation_delay: float = 0.0
    #: A platform migration keeps the machine `stopped` this long before it is started on its new host.
    migration_pause: float = 0.2


class FlyApiError(Exception):
    """A request the simulated Fly API rejects: rendered as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, *, capacity: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.capacity = capacity

    def body(self) -> JSON:
        body: JSON = {"error": self.message}
        if self.capacity:
            body["status"] = "insufficient_capacity"
        return body


#: Seconds Fly's clock is ahead of the host's, as shown to the request being served (`clock_offset`):
#: timestamps are kept in host time (so their order never breaks) and shifted only when shown or read.
RENDER_SHIFT: ContextVar[float] = ContextVar("flysim_render_shift", default=0.0)


def rfc3339(moment: datetime) -> str:
    """Millisecond-precision RFC 3339 in UTC with a `Z` suffix (in Fly's clock, see `RENDER_SHIFT`)."""
    shift = RENDER_SHIFT.get()
    if shift:
        moment = moment + timedelta(seconds=shift)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_rfc3339(text: str) -> datetime:
    moment = datetime.fromisoformat(text.strip().replace("z", "Z").replace(" ", "+"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC) - timedelta(seconds=RENDER_SHIFT.get())


@dataclass
class Host:
    id: str
    region: str
    zone: str
    failed: bool = False
    #: The `host_status` a failed host shows (`unreachable`, or `unknown`).
    failed_status: str = "unreachable"

    @property
    def status(self) -> str:
        """`host_status` of the machines and volumes on this host (OpenAPI: ok, unknown, unreachable)."""
        return self.failed_status if self.failed else "ok"


@dataclass
class Snapshot:
    id: str
    app: str
    volume_id: str
    created_at: datetime
    size: int
    volume_size: int
    digest: str

    def to_api(self) -> JSON:
        return {
            "id": self.id,
            "created_at": rfc3339(self.created_at),
            "digest": self.digest,
            "retention_days": 5,
            "size": self.size,
            "status": "created",
            "volume_size": self.volume_size,
        }


@dataclass
class Volume:
    id: str
    app: str
    name: str
    region: str
    host: Host
    size_gb: int
    created_at: datetime
    updated_at: datetime
    state: str = "created"
    attached_machine_id: str | None = None
    snapshot_retention: int = 5
    encrypted: bool = True
    auto_backup_enabled: bool = True
    source_volume_id: str | None = None
    #: The host a fork copies its blocks from (lazily, while `hydrating`); None for plain volumes/restores.
    source_host: Host | None = None
    #: A platform migration's fork: the volume it replaces, which Fly removes once this one has hydrated.
    replaces: str | None = None
    snapshots: list[Snapshot] = field(default_factory=list)

    @property
    def hydration_blocked(self) -> bool:
        """A fork still `hydrating` whose source host is down: it cannot finish, nor serve a machine."""
        return self.state == "hydrating" and self.source_host is not None and self.source_host.failed

    def to_api(self) -> JSON:
        blocks = self.size_gb * 262144
        used = min(blocks // 100, 2600)
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "size_gb": self.size_gb,
            "region": self.region,
            "zone": self.host.zone,
            "encrypted": self.encrypted,
            "attached_machine_id": self.attached_machine_id,
            "attached_alloc_id": None,
            "created_at": rfc3339(self.created_at),
            "blocks": blocks,
            "block_size": 4096,
            "blocks_free": blocks - used,
            "blocks_avail": blocks - used,
            "bytes_total": blocks * 4096,
            "bytes_used": used * 4096,
            "fstype": "ext4",
            "snapshot_retention": self.snapshot_retention,
            "auto_backup_enabled": self.auto_backup_enabled,
            "host_status": self.host.status,
        }


@dataclass(frozen=True)
class OrgVersion:
    """One change of a machine as the organisation listing sees it, visible from `visible_at` (monotonic)."""

    seq: int
    updated_at: datetime
    state: str
    instance_id: str
    visible_at: float


_ORG_VERSIONS_KEPT = 8


@dataclass
class Machine:
    id: str
    app: str
    name: str
    region: str
    host: Host
    config: JSON
    instance_id: str
    private_ip: str
    created_at: datetime
    updated_at: datetime
    seq: int
    state: str = "created"
    #: Bumped on every transition so a stale scheduled transition can tell it was overtaken.
    op: int = 0
    start_break: StartBreak | None = None
    events: deque[JSON] = field(default_factory=lambda: deque(maxlen=_MAX_EVENTS))
    org_versions: deque[OrgVersion] = field(default_factory=lambda: deque(maxlen=_ORG_VERSIONS_KEPT))

    def org_version(self, now: float) -> OrgVersion | None:
        """The newest change the organisation listing shows at monotonic time `now` (None: none yet)."""
        for version in reversed(self.org_versions):
            if version.visible_at <= now:
                return version
        return None

    def mounted_volume_ids(self) -> list[str]:
        return [
            m["volume"] for m in self.config.get("mounts") or [] if isinstance(m, dict) and m.get("volume")
        ]

    def image_ref(self) -> JSON:
        image = str(self.config.get("image", ""))
        name, tag = image, "latest"
        if ":" in image.rsplit("/", 1)[-1]:
            name, _, tag = image.rpartition(":")
        first, _, rest = name.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, rest
        else:
            registry, repository = "docker.io", name
        digest = "sha256:" + hashlib.sha256(image.encode()).hexdigest()
        return {"registry": registry, "repository": repository, "tag": tag, "digest": digest, "labels": {}}

    def to_api(self, *, summary: bool = False) -> JSON:
        body: JSON = {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "instance_id": self.instance_id,
            "private_ip": self.private_ip,
            "image_ref": self.image_ref(),
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        }
        if not summary:
            body["config"] = self.config
            body["events"] = list(reversed(self.events))
            body["checks"] = []
            body["host_status"] = self.host.status
        return body

    def to_org_api(self, *, summary: bool, version: OrgVersion | None = None) -> JSON:
        state, updated_at, instance_id = self.state, self.updated_at, self.instance_id
        if version is not None:
            state, updated_at, instance_id = version.state, version.updated_at, version.instance_id
        body: JSON = {
            "id": self.id,
            "app_name": self.app,
            "name": self.name,
            "state": state,
            "region": self.region,
            "instance_id": instance_id,
            "version": instance_id,
            "private_ip": self.private_ip,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(updated_at),
        }
        if not summary:
            body["config"] = {
                key: self.config[key] for key in ("image", "guest", "metadata") if key in self.config
            }
        return body


@dataclass
class App:
    name: str
    machines: dict[str, Machine] = field(default_factory=dict)
    volumes: dict[str, Volume] = field(default_factory=dict)


#: Schedules `callback(*args)` on the simulator loop after `delay` seconds (thread-safe).
Scheduler = Callable[..., None]
#: Tells the HTTP layer a machine changed state (wakes /wait requests); thread-safe.
Notifier = Callable[[str], None]


class FlyState:
    """The simulated Fly organisation. All public methods are thread-safe."""

    def __init__(
        self,
        regions: Sequence[str],
        timings: SimTimings,
        *,
        hosts_per_region: int = 3,
        seed: int | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self.timings = timings
        self.regions = tuple(regions)
        self.known_apps: set[str] | None = None
        self._rng = random.Random(seed)
        self._hosts: dict[str, list[Host]] = {
            region: [
                Host(id=f"{region}-h{n}", region=region, zone=f"{self._rng.getrandbits(16):04x}")
                for n in range(1, hosts_per_region + 1)
            ]
            for region in self.regions
        }
        self._apps: dict[str, App] = {}
        self._machines: dict[str, Machine] = {}
        self._volumes: dict[str, Volume] = {}
        self._snapshots: dict[str, Snapshot] = {}
        #: Machine ids ordered by last change (== updated_at order): the org listing walks it from the end.
        self._org_order: OrderedDict[str, None] = OrderedDict()
        self._seq = 0
        #: Fly's clock may disagree with its clients': seconds added to every timestamp flysim shows.
        self.clock_offset = 0.0
        self._last_now = datetime.now(UTC)
        self._exhausted: dict[str, set[str]] = {}
        self._exhausted_status: dict[str, int] = {}
        #: Finite capacity: at most this many live machines (and as many volumes) per region (absent: no cap).
        self._region_limits: dict[str, int] = {}
        #: Machines the organisation listing currently misreports (`lie_in_listing`).
        self._listing_lies: set[str] = set()
        #: Machines whose start waits for a blocked fork to hydrate, by volume id.
        self._blocked_starts: dict[str, set[str]] = {}
        #: How a fork of a volume on an unreachable host shows (see `UnreachableFork`).
        self.unreachable_fork: UnreachableFork = "hydrating"
        #: Fly shows `updated_at` with whole seconds (two changes in one second carry the same `updated_at`);
        #: False keeps milliseconds, the order of changes readable from the timestamps alone.
        self.whole_second_timestamps = False
        self._schedule: Scheduler = self._no_loop
        self._notify: Notifier = lambda machine_id: None

    # --- wiring -------------------------------------------------------------------------------------

    def bind(self, schedule: Scheduler, notify: Notifier) -> None:
        self._schedule = schedule
        self._notify = notify

    @staticmethod
    def _no_loop(*_: Any) -> None:
        raise RuntimeError("the simulator is not running: call start() or start_in_thread() first")

    # --- ids, clock ---------------------------------------------------------------------------------

    def clock(self) -> datetime:
        """Fly's wall clock (the host's, shifted by `clock_offset`)."""
        return datetime.now(UTC) + timedelta(seconds=self.clock_offset)

    def _now(self) -> datetime:
        # Millisecond precision (what the API shows) and never decreasing, so that the order of changes is
        # also updated_at order: the org listing walks changes backwards and stops at `updated_after`.
        now = datetime.now(UTC)
        now = max(now.replace(microsecond=now.microsecond // 1000 * 1000), self._last_now)
        self._last_now = now
        if self.whole_second_timestamps:
            # What the API shows; the listing's own order (its cursor) still follows the order of changes.
            return now.replace(microsecond=0)
        return now

    def _machine_id(self) -> str:
        while True:
            candidate = f"{self._rng.getrandbits(56):014x}"
            if candidate not in self._machines:
                return candidate

    def _volume_id(self) -> str:
        while True:
            candidate = "vol_" + "".join(self._rng.choices(_ALNUM, k=16))
            if candidate not in self._volumes:
                return candidate

    def _snapshot_id(self) -> str:
        return "vs_" + "".join(self._rng.choices(string.ascii_letters + string.digits, k=16))

    def _ulid(self) -> str:
        return "01" + "".join(self._rng.choices(_ULID_CHARS, k=24))

    def _private_ip(self) -> str:
        return "fdaa:0:{:x}:a7b:{:x}:{:x}:{:x}:2".format(*(self._rng.getrandbits(16) for _ in range(4)))

    # --- apps ---------------------------------------------------------------------------------------

    def app(self, name: str) -> App:
        """The app called `name`, created on first use unless `known_apps` restricts the names."""
        with self.lock:
            if self.known_apps is not None and name not in self.known_apps:
                raise FlyApiError(404, "app not found")
            app = self._apps.get(name)
            if app is None:
                app = self._apps[name] = App(name=name)
            return app

    # --- lookups ------------------------------------------------------------------------------------

    def machine(self, app: str, machine_id: str) -> Machine:
        with self.lock:
            machine = self.app(app).machines.get(machine_id)
            if machine is None:
                raise FlyApiError(404, "machine not found")
            return machine

    def volume(self, app: str, volume_id: str) -> Volume:
        with self.lock:
            volume = self.app(app).volumes.get(volume_id)
            if volume is None:
                raise FlyApiError(404, "volume not found")
            return volume

    def find_machine(self, machine_id: str) -> Machine:
        with self.lock:
            machine = self._machines.get(machine_id)
            if machine is None:
                raise KeyError(f"no machine {machine_id}")
            return machine

    def find_volume(self, volume_id: str) -> Volume:
        with self.lock:
            volume = self._volumes.get(volume_id)
            if volume is None:
                raise KeyError(f"no volume {volume_id}")
            return volume

    # --- capacity and hosts -------------------------------------------------------------------------

    def _check_region(self, region: str) -> None:
        if region not in self._hosts:
            raise FlyApiError(400, f"invalid_argument: region '{region}' is not a valid region")

    def _check_capacity(self, region: str, kind: str, detail: str) -> None:
        limit = self._region_limits.get(region)
        if limit is not None and self._live_in_region(region, kind) >= limit:
            raise FlyApiError(
                412,
                f"insufficient resources: no capacity available for {detail} in region '{region}'",
                capacity=True,
            )
        if kind in self._exhausted.get(region, set()):
            status = self._exhausted_status.get(region, 412)
            if status == 409:
                message = (
                    "aborted: could not reserve resource for machine: "
                    "insufficient memory available to fulfill request"
                )
            else:
                message = f"insufficient resources: no capacity available for {detail} in region '{region}'"
            raise FlyApiError(status, message, capacity=True)

    def _healthy_host(self, region: str, kind: str) -> Host:
        hosts = self._hosts[region]
        # A draw usually hits a healthy host: O(1) with thousands of hosts (the 10,000-instance benchmark).
        for _ in range(4):
            host = self._rng.choice(hosts)
            if not host.failed:
                return host
        healthy = [host for host in hosts if not host.failed]
        if not healthy:
            raise FlyApiError(
                412,
                f"insufficient resources: no healthy hosts for {kind} in region '{region}'",
                capacity=True,
            )
        return self._rng.choice(healthy)

    def _live_in_region(self, region: str, kind: str) -> int:
        if kind == "volumes":
            return sum(1 for v in self._volumes.values() if v.region == region)
        return sum(1 for m in self._machines.values() if m.region == region and m.state not in GONE_STATES)

    def limit_capacity(self, region: str, machines: int | None) -> None:
        """At most `machines` live machines (and as many volumes) in `region`; None lifts the limit."""
        with self.lock:
            self._check_known_region(region)
            if machines is None:
                self._region_limits.pop(region, None)
            else:
                self._region_limits[region] = machines

    def exhaust_capacity(self, region: str, kind: CapacityKind = "both", *, status: int = 412) -> None:
        with self.lock:
            self._check_known_region(region)
            kinds = {"volumes", "machines"} if kind == "both" else {kind}
            self._exhausted.setdefault(region, set()).update(kinds)
            self._exhausted_status[region] = status

    def restore_capacity(self, region: str) -> None:
        with self.lock:
            self._exhausted.pop(region, None)
            self._exhausted_status.pop(region, None)

    def _check_known_region(self, region: str) -> None:
        if region not in self._hosts:
            raise ValueError(f"unknown region {region!r}; regions: {', '.join(self.regions)}")

    def _select_hosts(self, machine_id: str | None, region: str | None, host: str | None) -> list[Host]:
        if machine_id is not None:
            return [self.find_machine(machine_id).host]
        if host is not None:
            hosts = [h for region_hosts in self._hosts.values() for h in region_hosts if h.id == host]
            if not hosts:
                raise ValueError(f"unknown host {host!r}")
            return hosts
        if region is not None:
            self._check_known_region(region)
            return list(self._hosts[region])
        raise ValueError("needs machine_id, region or host")

    def restore_host(
        self, *, machine_id: str | None = None, region: str | None = None, host: str | None = None
    ) -> list[str]:
        """Failed hosts come back: their machines are `stopped` (they went down with the host) and can start
        again, destroys asked for meanwhile complete, forks hydrating from their volumes finish. Returns the
        host ids that were failed."""
        with self.lock:
            hosts = [h for h in self._select_hosts(machine_id, region, host) if h.failed]
            for returned in hosts:
                returned.failed = False
            back = {h.id for h in hosts}
            for machine in self._machines.values():
                if machine.host.id in back and machine.state == "destroying":
                    self._later(self.timings.destroy_delay, machine, self._finish_destroy)
            for volume in list(self._volumes.values()):
                if (
                    volume.state == "hydrating"
                    and volume.source_host is not None
                    and volume.source_host.id in back
                ):
                    self._schedule(self.timings.hydrate_delay, self._hydrated, volume.id)
            return sorted(back)

    def fail_host(
        self,
        *,
        machine_id: str | None = None,
        region: str | None = None,
        host: str | None = None,
        status: HostStatus = "unreachable",
    ) -> list[str]:
        """Fail hosts; their machines go `stopped` (exit event) and cannot start again; their machines and
        volumes show `host_status` `status`. Returns host ids."""
        if status not in ("unknown", "unreachable"):
            raise ValueError("host status must be 'unknown' or 'unreachable'")
        with self.lock:
            if machine_id is not None:
                hosts = [self.find_machine(machine_id).host]
            elif host is not None:
                hosts = [h for region_hosts in self._hosts.values() for h in region_hosts if h.id == host]
                if not hosts:
                    raise ValueError(f"unknown host {host!r}")
            elif region is not None:
                self._check_known_region(region)
                hosts = list(self._hosts[region])
            else:
                raise ValueError("fail_host needs machine_id, region or host")
            for failed in hosts:
                failed.failed = True
                failed.failed_status = status
            failed_ids = {h.id for h in hosts}
            for machine in self._machines.values():
                if machine.host.id in failed_ids and machine.state in ACTIVE_STATES:
                    self._exit(machine, exit_code=-1, reason="host failure", oom=False)
            return sorted(failed_ids)

    def machines_on_hosts(self, host_ids: set[str], *, state: str | None = None) -> list[str]:
        """Ids of the machines on these hosts (in `state`, if given)."""
        with self.lock:
            return sorted(
                m.id
                for m in self._machines.values()
                if m.host.id in host_ids and (state is None or m.state == state)
            )

    # --- machine transitions ------------------------------------------------------------------------

    def _touch(self, machine: Machine, state: str | None = None) -> None:
        if state is not None:
            machine.state = state
        machine.op += 1
        self._seq += 1
        machine.seq = self._seq
        machine.updated_at = self._now()
        delay = self.timings.org_propagation_delay
        machine.org_versions.append(
            OrgVersion(
                seq=machine.seq,
                updated_at=machine.updated_at,
                state=machine.state,
                instance_id=machine.instance_id,
                visible_at=time.monotonic() + (self._rng.uniform(delay / 2, delay) if delay > 0 else 0.0),
            )
        )
        self._org_order[machine.id] = None
        self._org_order.move_to_end(machine.id)
        self._notify(machine.id)

    def _event(
        self, machine: Machine, kind: str, status: str, source: str, request: JSON | None = None
    ) -> None:
        machine.events.append(
            {
                "id": self._ulid(),
                "type": kind,
                "status": status,
                "source": source,
                "timestamp": int(machine.updated_at.timestamp() * 1000),
                "request": request or {},
            }
        )

    def _later(self, delay: float, machine: Machine, step: Callable[[Machine], None]) -> None:
        op = machine.op

        def run() -> None:
            with self.lock:
                current = self._machines.get(machine.id)
                if current is machine and machine.op == op:
                    step(machine)

        self._schedule(delay, run)

    def _begin_start(self, machine: Machine, source: str = "user") -> None:
        self._touch(machine, "starting")
        self._event(machine, "start", "starting", source)
        if machine.start_break == "hang" or self._on_blocked_fork(machine):
            return
        if machine.start_break == "fail":
            self._later(self.timings.start_delay, machine, self._fail_start)
            return
        self._later(self.timings.start_delay, machine, self._finish_start)

    def _on_blocked_fork(self, machine: Machine) -> bool:
        """Mounted on a fork whose source host is down: its blocks cannot be fetched, it never starts (it
        goes on when the fork hydrates, see `_hydrated`)."""
        for volume_id in machine.mounted_volume_ids():
            volume = self._volumes.get(volume_id)
            if volume is not None and volume.hydration_blocked:
                self._blocked_starts.setdefault(volume_id, set()).add(machine.id)
                return True
        return False

    def _finish_start(self, machine: Machine) -> None:
        if self._on_blocked_fork(machine):
            return
        self._touch(machine, "started")
        self._event(machine, "start", "started", "flyd")

    def _fail_start(self, machine: Machine) -> None:
        self._touch(machine, "failed")
        self._event(
            machine, "exit", "failed", "flyd", {"exit_event": {"exit_code": 1, "requested_stop": False}}
        )

    def _finish_stop(self, machine: Machine) -> None:
        self._touch(machine, "stopped")
        self._event(machine, "stop", "stopped", "flyd")

    def _exit(self, machine: Machine, *, exit_code: int, reason: str, oom: bool) -> None:
        self._touch(machine, "stopped")
        self._event(
            machine,
            "exit",
            "stopped",
            "flyd",
            {
                "exit_event": {
                    "exit_code": exit_code,
                    "oom_killed": oom,
                    "requested_stop": False,
                    "restarting": False,
                    "guest_exit_code": exit_code,
                    "exited_at": rfc3339(machine.updated_at),
                    "reason": reason,
                }
            },
        )

    def _finish_destroy(self, machine: Machine) -> None:
        self._touch(machine, "destroyed")
        self._event(machine, "destroy", "destroyed", "flyd")
        volume_ids = machine.mounted_volume_ids()
        if self.timings.detach_delay > 0:
            self._schedule(self.timings.detach_delay, self._detach, machine.id, volume_ids)
        else:
            self._detach(machine.id, volume_ids)
        self._schedule(self.timings.destroyed_retention, self._purge, machine.id)

    def _detach(self, machine_id: str, volume_ids: Iterable[str]) -> None:
        with self.lock:
            for volume_id in volume_ids:
                volume = self._volumes.get(volume_id)
                if volume is not None and volume.attached_machine_id == machine_id:
                    volume.attached_machine_id = None
                    volume.updated_at = self._now()

    def _purge(self, machine_id: str) -> None:
        with self.lock:
            machine = self._machines.pop(machine_id, None)
            if machine is None:
                return
            self._org_order.pop(machine_id, None)
            app = self._apps.get(machine.app)
            if app is not None:
                app.machines.pop(machine_id, None)

    # --- machine API --------------------------------------------------------------------------------

    def _check_mounts(
        self, app: App, config: JSON, region: str | None, machine_id: str | None
    ) -> Volume | None:
        mounts = config.get("mounts") or []
        if not isinstance(mounts, list):
            raise FlyApiError(400, "invalid_argument: config.mounts must be a list")
        if len(mounts) > 1:
            raise FlyApiError(400, "invalid_argument: a machine can only have one mount")
        if not mounts:
            return None
        mount = mounts[0]
        if not isinstance(mount, dict) or not mount.get("volume") or not mount.get("path"):
            raise FlyApiError(400, "invalid_argument: mount needs 'volume' and 'path'")
        volume = app.volumes.get(str(mount["volume"]))
        if volume is None:
            raise FlyApiError(400, f"invalid_argument: volume '{mount['volume']}' not found")
        if region is not None and region != volume.region:
            raise FlyApiError(
                400,
                f"invalid_argument: volume '{volume.id}' is in region '{volume.region}', "
                f"machine requested region '{region}'",
            )
        bound = volume.attached_machine_id
        if bound is not None and bound != machine_id:
            raise FlyApiError(
                412, f"failed_precondition: volume '{volume.id}' is currently bound to machine: {bound}"
            )
        return volume

    def _check_unique_name(self, app: App, name: str, machine_id: str | None) -> None:
        for other in app.machines.values():
            if other.name == name and other.id != machine_id and other.state not in GONE_STATES:
                raise FlyApiError(
                    409,
                    f"invalid_argument: unique machine name violation, machine ID '{other.id}' "
                    f'already exists with name "{name}"',
                )

    def create_machine(self, app_name: str, body: JSON) -> Machine:
        with self.lock:
            app = self.app(app_name)
            config = body.get("config")
            if not isinstance(config, dict) or not config.get("image"):
                raise FlyApiError(400, "invalid_argument: config.image is required")
            region = body.get("region")
            if region is not None:
                self._check_region(str(region))
            volume = self._check_mounts(app, config, region, None)
            if region is None:
                region = volume.region if volume is not None else self.regions[0]
            self._check_capacity(region, "machines", "machines")
            if volume is not None:
                if volume.host.failed:
                    raise FlyApiError(
                        412, f"failed_precondition: host of volume '{volume.id}' is unreachable"
                    )
                host = volume.host
            else:
                host = self._healthy_host(region, "machines")
            machine_id = self._machine_id()
            name = str(body.get("name") or f"machine-{machine_id[:8]}")
            self._check_unique_name(app, name, None)
            now = self._now()
            machine = Machine(
                id=machine_id,
                app=app.name,
                name=name,
                region=region,
                host=host,
                config=dict(config),
                instance_id=self._ulid(),
                private_ip=self._private_ip(),
                created_at=now,
                updated_at=now,
                seq=0,
            )
            self._machines[machine.id] = machine
            app.machines[machine.id] = machine
            if volume is not None:
                volume.attached_machine_id = machine.id
                volume.updated_at = now
            self._touch(machine, "created")
            self._event(machine, "launch", "created", "user")
            if not body.get("skip_launch"):
                self._later(0, machine, self._begin_start)
            return machine

    def update_machine(self, app_name: str, machine_id: str, body: JSON) -> Machine:
        with self.lock:
            app = self.app(app_name)
            machine = self.machine(app_name, machine_id)
            if machine.state in GONE_STATES:
                raise FlyApiError(
                    412, f"failed_precondition: unable to update machine in state '{machine.state}'"
                )
            config = body.get("config")
            if not isinstance(config, dict) or not config.get("image"):
                raise FlyApiError(400, "invalid_argument: config.image is required")
            region = body.get("region")
            if region is not None and region != machine.region:
                raise FlyApiError(400, "invalid_argument: a machine cannot change region")
            volume = self._check_mounts(app, config, machine.region, machine.id)
            if volume is not None and volume.host is not machine.host:
                raise FlyApiError(
                    400,
                    f"invalid_argument: volume '{volume.id}' is on another host than machine {machine.id}",
                )
            was_running = machine.state in {"starting", "started", "replacing"}
            if was_running and not body.get("skip_launch") and machine.host.failed:
                raise FlyApiError(412, "failed_precondition: machine host is unreachable")
            if body.get("name"):
                self._check_unique_name(app, str(body["name"]), machine.id)
                machine.name = str(body["name"])
            old_volumes = set(machine.mounted_volume_ids())
            machine.config = dict(config)
            machine.instance_id = self._ulid()
            self._detach(machine.id, old_volumes - set(machine.mounted_volume_ids()))
            if volume is not None:
                volume.attached_machine_id = machine.id
            if was_running and not body.get("skip_launch"):
                self._touch(machine, "replacing")
                self._event(machine, "update", "replacing", "user")
                self._later(self.timings.stop_delay, machine, self._begin_start)
            else:
                self._touch(machine)
                self._event(machine, "update", machine.state, "user")
            return machine

    def start_machine(self, app_name: str, machine_id: str) -> str:
        with self.lock:
            machine = self.machine(app_name, machine_id)
            previous = machine.state
            if previous in GONE_STATES:
                raise FlyApiError(
                    412, f"failed_precondition: unable to start machine from current state: '{previous}'"
                )
            if machine.host.failed:
                raise FlyApiError(412, "failed_precondition: machine host is unreachable")
            if previous in {"starting", "started", "replacing"}:
                return previous
            self._begin_start(machine)
            return previous

    def stop_machine(self, app_name: str, machine_id: str) -> None:
        with self.lock:
            machine = self.machine(app_name, machine_id)
            if machine.state in GONE_STATES:
                raise FlyApiError(
                    412, f"failed_precondition: unable to stop machine from current state: '{machine.state}'"
                )
            if machine.state in {"stopped", "stopping", "suspended", "failed"}:
                return
            self._touch(machine, "stopping")
            self._event(machine, "stop", "stopping", "user")
            self._later(self.timings.stop_delay, machine, self._finish_stop)

    def destroy_machine(self, app_name: str, machine_id: str, *, force: bool) -> None:
        with self.lock:
            machine = self.machine(app_name, machine_id)
            if machine.state == "destroyed":
                raise FlyApiError(404, "machine not found")
            if machine.state == "destroying":
                return
            if not force and machine.state not in DESTROYABLE_WITHOUT_FORCE:
                raise FlyApiError(
                    412,
                    "failed_precondition: unable to destroy machine, "
                    "not currently stopped, suspended, or failed",
                )
            self._touch(machine, "destroying")
            self._event(machine, "destroy", "destroying", "user")
            if machine.host.failed:
                # Fly's fence: flagged to be destroyed, destroyed when (if ever) the host returns.
                return
            self._later(self.timings.destroy_delay, machine, self._finish_destroy)

    def list_machines(
        self,
        app_name: str,
        *,
        include_deleted: bool = False,
        region: str | None = None,
        states: set[str] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[Machine]:
        with self.lock:
            result = []
            for machine in self.app(app_name).machines.values():
                if machine.state in GONE_STATES and not include_deleted:
                    continue
                if region is not None and machine.region != region:
                    continue
                if states and machine.state not in states:
                    continue
                if metadata:
                    have = machine.config.get("metadata") or {}
                    if any(have.get(key) != value for key, value in metadata.items()):
                        continue
                result.append(machine)
            return result

    def list_org_machines(
        self,
        *,
        after_seq: int | None,
        updated_after: datetime | None,
        include_deleted: bool,
        region: str | None,
        states: set[str] | None,
        limit: int,
    ) -> tuple[list[tuple[Machine, OrgVersion]], bool]:
        """Changes visible now after a cursor position or time, oldest change first; `(page, more)`.

        A change becomes visible only after its propagation delay; until then a machine shows its previous
        version (if that one is inside the window), so a late change can surface behind the cursor.
        """
        with self.lock:
            now = time.monotonic()
            found: list[tuple[Machine, OrgVersion]] = []
            for machine_id in reversed(self._org_order):
                machine = self._machines[machine_id]
                if after_seq is not None and machine.seq <= after_seq:
                    break
                changed_at = (
                    machine.org_versions[-1].updated_at if machine.org_versions else machine.updated_at
                )
                if after_seq is None and updated_after is not None and changed_at <= updated_after:
                    break
                version = machine.org_version(now)
                if version is None:
                    continue
                if after_seq is not None and version.seq <= after_seq:
                    continue
                if after_seq is None and updated_after is not None and version.updated_at <= updated_after:
                    continue
                if version.state in GONE_STATES and not include_deleted:
                    continue
                if region is not None and machine.region != region:
                    continue
                if states and version.state not in states:
                    continue
                found.append((machine, version))
            found.sort(key=lambda pair: pair[1].seq)
            return found[:limit], len(found) > limit

    # --- volumes ------------------------------------------------------------------------------------

    def create_volume(self, app_name: str, body: JSON) -> Volume:
        with self.lock:
            app = self.app(app_name)
            region = body.get("region")
            if not region:
                raise FlyApiError(400, "invalid_argument: region is required")
            region = str(region)
            self._check_region(region)
            source: Volume | None = None
            snapshot: Snapshot | None = None
            if body.get("source_volume_id"):
                source = app.volumes.get(str(body["source_volume_id"]))
                if source is None:
                    raise FlyApiError(404, f"source volume '{body['source_volume_id']}' not found")
            elif body.get("snapshot_id"):
                snapshot = self._snapshots.get(str(body["snapshot_id"]))
                if snapshot is None or snapshot.app != app.name:
                    raise FlyApiError(404, f"snapshot '{body['snapshot_id']}' not found")
            name = body.get("name") or (source.name if source is not None else None)
            if not name:
                raise FlyApiError(400, "invalid_argument: name is required")
            name = str(name)
            if len(name) > 30 or not set(name) <= _VOLUME_NAME_CHARS:
                raise FlyApiError(
                    400,
                    "invalid_argument: volume name must be at most 30 characters of lowercase letters, "
                    "digits and underscores",
                )
            base_size = source.size_gb if source is not None else snapshot.volume_size if snapshot else None
            size = body.get("size_gb")
            if size is None:
                if base_size is None:
                    raise FlyApiError(400, "invalid_argument: size_gb is required")
                size = base_size
            if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 500:
                raise FlyApiError(400, "invalid_argument: size_gb must be an integer between 1 and 500")
            if base_size is not None and size < base_size:
                raise FlyApiError(
                    400, f"invalid_argument: size_gb must be at least {base_size} (the source size)"
                )
            if source is not None and source.host.failed and self.unreachable_fork == "refused":
                raise FlyApiError(
                    412, f"failed_precondition: host of source volume '{source.id}' is unreachable"
                )
            self._check_capacity(region, "volumes", "volumes")
            host = self._healthy_host(region, "volumes")
            now = self._now()
            volume = Volume(
                id=self._volume_id(),
                app=app.name,
                name=name,
                region=region,
                host=host,
                size_gb=size,
                created_at=now,
                updated_at=now,
                state="hydrating" if source is not None or snapshot is not None else "created",
                snapshot_retention=int(body.get("snapshot_retention") or 5),
                encrypted=bool(body.get("encrypted", True)),
                auto_backup_enabled=bool(body.get("auto_backup_enabled", True)),
                source_volume_id=source.id if source is not None else None,
                source_host=source.host if source is not None else None,
            )
            self._volumes[volume.id] = volume
            app.volumes[volume.id] = volume
            if volume.state == "hydrating" and not volume.hydration_blocked:
                self._schedule(self.timings.hydrate_delay, self._hydrated, volume.id)
            return volume

    def _hydrated(self, volume_id: str) -> None:
        with self.lock:
            volume = self._volumes.get(volume_id)
            if volume is None or volume.state != "hydrating" or volume.hydration_blocked:
                return  # a blocked fork finishes when its source host returns (restore_host)
            volume.state = "created"
            volume.updated_at = self._now()
            if volume.replaces is not None:
                self._remove_migrated_volume(volume.replaces)
            # A machine that could not start on the blocked fork starts now.
            for machine_id in self._blocked_starts.pop(volume.id, set()):
                machine = self._machines.get(machine_id)
                if machine is not None and machine.state == "starting" and machine.start_break is None:
                    self._later(self.timings.start_delay, machine, self._finish_start)

    def _remove_migrated_volume(self, volume_id: str) -> None:
        """After a migration, Fly cleans up the volume the machine left (unless it was mounted since)."""
        old = self._volumes.get(volume_id)
        if old is None or old.attached_machine_id is not None:
            return
        del self._volumes[old.id]
        self._apps[old.app].volumes.pop(old.id, None)
        old.state = "pending_destroy"
        old.updated_at = self._now()

    def delete_volume(self, app_name: str, volume_id: str) -> Volume:
        with self.lock:
            app = self.app(app_name)
            volume = self.volume(app_name, volume_id)
            if volume.attached_machine_id is not None:
                raise FlyApiError(
                    412,
                    "failed_precondition: volume is currently bound to machine: "
                    f"{volume.attached_machine_id}",
                )
            del app.volumes[volume.id]
            del self._volumes[volume.id]
            volume.state = "pending_destroy"
            volume.updated_at = self._now()
            return volume

    def list_volumes(self, app_name: str) -> list[Volume]:
        with self.lock:
            return list(self.app(app_name).volumes.values())

    def add_snapshot(self, volume_id: str) -> Snapshot:
        with self.lock:
            volume = self.find_volume(volume_id)
            snapshot = Snapshot(
                id=self._snapshot_id(),
                app=volume.app,
                volume_id=volume.id,
                created_at=self._now(),
                size=volume.size_gb * 1024 * 1024 * 64,
                volume_size=volume.size_gb,
                digest=hashlib.sha256(f"{volume.id}{self._seq}{len(volume.snapshots)}".encode()).hexdigest(),
            )
            volume.snapshots.append(snapshot)
            self._snapshots[snapshot.id] = snapshot
            return snapshot

    # --- platform migrations -----------------------------------------------------------------------

    def migrate_machine(self, machine_id: str, *, to_host: str | None = None) -> str:
        """Fly moves a machine off its host by itself (fly.io/docs/reference/machine-migration): stop it (an
        exit event with `requested_stop`, source flyd), keep it `stopped` for `migration_pause`, fork its
        volume to another host of the region (a new volume id), then start the same machine id there (if it
        was running); once the fork has hydrated, the old volume is removed (Fly's to clean up; the harsher
        case for an operator that kept its id). Returns the destination host id."""
        with self.lock:
            machine = self.find_machine(machine_id)
            if machine.host.failed:
                raise ValueError(f"machine {machine_id} is on an unreachable host: Fly cannot migrate it")
            if machine.state not in ("started", "stopped"):
                raise ValueError(f"machine {machine_id} is {machine.state}: only started/stopped migrate")
            candidates = [h for h in self._hosts[machine.region] if h is not machine.host and not h.failed]
            if to_host is not None:
                candidates = [h for h in candidates if h.id == to_host]
            if not candidates:
                raise ValueError(f"no other healthy host in {machine.region} to migrate {machine_id} to")
            destination = self._rng.choice(candidates)
            was_running = machine.state == "started"
            if was_running:
                self._touch(machine, "stopping")
                self._event(machine, "stop", "stopping", "flyd")
                self._later(
                    self.timings.stop_delay,
                    machine,
                    lambda m: self._migration_stopped(m, destination, was_running),
                )
            else:
                self._migration_stopped(machine, destination, was_running)
            return destination.id

    def _migration_stopped(self, machine: Machine, destination: Host, was_running: bool) -> None:
        self._touch(machine, "stopped")
        self._event(
            machine,
            "exit",
            "stopped",
            "flyd",
            {
                "exit_event": {
                    "exit_code": 0,
                    "oom_killed": False,
                    "requested_stop": True,
                    "restarting": False,
                }
            },
        )
        self._later(
            self.timings.migration_pause, machine, lambda m: self._migration_move(m, destination, was_running)
        )

    def _migration_move(self, machine: Machine, destination: Host, was_running: bool) -> None:
        mounts = []
        for mount in machine.config.get("mounts") or []:
            old = self._volumes.get(str(mount.get("volume")))
            if old is None:
                mounts.append(mount)
                continue
            now = self._now()
            fork = Volume(
                id=self._volume_id(),
                app=old.app,
                name=old.name,
                region=old.region,
                host=destination,
                size_gb=old.size_gb,
                created_at=now,
                updated_at=now,
                state="hydrating",
                snapshot_retention=old.snapshot_retention,
                encrypted=old.encrypted,
                auto_backup_enabled=old.auto_backup_enabled,
                source_volume_id=old.id,
                source_host=old.host,
                attached_machine_id=machine.id,
                replaces=old.id,
            )
            self._volumes[fork.id] = fork
            self._apps[fork.app].volumes[fork.id] = fork
            self._schedule(self.timings.hydrate_delay, self._hydrated, fork.id)
            if old.attached_machine_id == machine.id:
                old.attached_machine_id = None
                old.updated_at = now
            mounts.append({**mount, "volume": fork.id})
        machine.config = {**machine.config, "mounts": mounts}
        machine.host = destination
        machine.instance_id = self._ulid()
        machine.private_ip = self._private_ip()
        if was_running:
            self._begin_start(machine, source="flyd")
        else:
            self._touch(machine)
            self._event(machine, "update", machine.state, "flyd")

    # --- a listing that lies ------------------------------------------------------------------------

    def lie_in_listing(
        self,
        machine_ids: Iterable[str] | None = None,
        *,
        fraction: float | None = None,
        state: str = "stopped",
    ) -> list[str]:
        """The organisation listing reports these machines (or a random `fraction` of the started ones) in
        `state` with a fresh `updated_at`, while `GET /machines/{id}` keeps telling the truth. Returns ids."""
        with self.lock:
            if machine_ids is None:
                started = sorted(m.id for m in self._machines.values() if m.state == "started")
                count = round(len(started) * (fraction or 0.0))
                machine_ids = self._rng.sample(started, count)
            chosen = [self.find_machine(machine_id) for machine_id in machine_ids]
            for machine in chosen:
                self._org_version(machine, state)
                self._listing_lies.add(machine.id)
            return [m.id for m in chosen]

    def end_listing_lies(self) -> list[str]:
        """The listing tells the truth again: each lied-about machine shows its real state, newly stamped."""
        with self.lock:
            ended = sorted(self._listing_lies)
            for machine_id in ended:
                machine = self._machines.get(machine_id)
                if machine is not None:
                    self._org_version(machine, machine.state)
            self._listing_lies.clear()
            return ended

    def _org_version(self, machine: Machine, state: str) -> None:
        self._seq += 1
        machine.seq = self._seq
        machine.org_versions.append(
            OrgVersion(
                seq=machine.seq,
                updated_at=self._now(),
                state=state,
                instance_id=machine.instance_id,
                visible_at=time.monotonic(),
            )
        )
        self._org_order[machine.id] = None
        self._org_order.move_to_end(machine.id)

    # --- faults on machines -------------------------------------------------------------------------

    def crash_machine(self, machine_id: str, *, exit_code: int = 1, oom: bool = False) -> None:
        with self.lock:
            machine = self.find_machine(machine_id)
            if machine.state in GONE_STATES:
                raise ValueError(f"machine {machine_id} is {machine.state}")
            self._exit(machine, exit_code=exit_code, reason="oom" if oom else "crash", oom=oom)

    def break_machine_start(self, machine_id: str, mode: StartBreak = "hang") -> None:
        with self.lock:
            machine = self.find_machine(machine_id)
            machine.start_break = mode
            if machine.state == "starting":
                if mode == "fail":
                    self._fail_start(machine)
                else:
                    machine.op += 1  # cancels the pending `started`

    def repair_machine_start(self, machine_id: str) -> None:
        """Starts work again; a start hanging in `starting` completes (after the start delay)."""
        with self.lock:
            machine = self.find_machine(machine_id)
            hung = machine.start_break == "hang" and machine.state == "starting"
            machine.start_break = None
            if hung:
                self._later(self.timings.start_delay, machine, self._finish_start)

    # --- introspection ------------------------------------------------------------------------------

    def machine_dicts(self, app: str | None = None) -> list[JSON]:
        with self.lock:
            machines = (
                self._machines.values()
                if app is None
                else (self._apps[app].machines.values() if app in self._apps else [])
            )
            return [self._introspect_machine(m) for m in machines]

    def _introspect_machine(self, machine: Machine) -> JSON:
        body = machine.to_api()
        body["app_name"] = machine.app
        body["host"] = machine.host.id
        body["config"] = _deep_copy(body["config"])
        return body

    def volume_dicts(self, app: str | None = None) -> list[JSON]:
        with self.lock:
            volumes = (
                self._volumes.values()
                if app is None
                else (self._apps[app].volumes.values() if app in self._apps else [])
            )
            result = []
            for volume in volumes:
                body = volume.to_api()
                body["app_name"] = volume.app
                body["host"] = volume.host.id
                body["source_volume_id"] = volume.source_volume_id
                body["snapshots"] = [s.to_api() for s in volume.snapshots]
                result.append(body)
            return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy(item) for item in value]
    return value
