"""``make chaos``: seeded, randomised runs of two operator replicas (leader election) against flysim and
kubesim, under injected Fly faults, host failures, leader SIGKILLs and API watch disconnects; each run ends by
stopping the faults, letting things settle and checking the invariants (issue 10, item 6).

One run (about 15 s): fresh flysim + kubesim (small watch history, so a reconnect may get 410 Gone), two
``kiloclaw-operator run`` processes with a short Lease, a few instances; then, at random times:

- Fly faults on ~20 % of requests (503/502/500, 429 with Retry-After, 408, a few lost replies) and latency;
- host failures under random instances' machines (unexpected stops → recoveries);
- the leader (sometimes the standby) SIGKILLed, restarted after a random delay as a kubelet restarts a pod;
- every open watch stream cut (kopf reconnects from its last resourceVersion, often into 410 Gone);
- snapshots added to instances' volumes (their old volume must then be retained, never deleted);
- spec.state flipped to Stopped and back to Running;
- failed hosts returning mid-run (and all of them once the faults stop): an instance that waited for a source
  recovers by itself; platform migrations (same machine id, new volume id); in feed-mode runs, a listing
  that reports running machines stopped for a few seconds;
- one instance deleted, or a duplicate claimant of another instance's sandbox created and deleted, after the
  others have settled: nothing the other instances use may be touched.

Then the faults stop and, within 60 s, every invariant must hold:

1. every instance that should run is Running and Ready, with no recovery in flight and exactly one live
   machine mounting ``status.volumeId`` (its ``status.machineId``, started);
2. no Fly machine or volume exists that no instance status (machine, volume, recovery, pendingCleanup) or
   retained volume accounts for;
3. no volume with snapshots was deleted without a KiloClawRetainedVolume for it;
4. no instance lost a machine or volume while another instance was being deleted;
5. no machine was destroyed because of a false stop (a lie of the listing, a migration);
6. no recovery restored a snapshot older than its instance's policy allows;
7. no volume was deleted while its host was unreachable.

Seeded and replayable: run ``i`` of ``--seed S`` uses seed ``S + i``; ``--seed X --runs 1`` replays run X (the
event schedule and the simulators' fault draws are the seed's; process timing is not).

Usage: ``.venv/bin/python tests/tools/chaos.py --runs 200 --seed 1 --write RELIABILITY.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The shared test support (harness) is one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flysim import FlySimulator, SimTimings
from harness import CRDS, FLY_TOKEN, OperatorProcess, binding, lease_holder, operator_env
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, RETAINED_PLURAL, VERSION
from kubesim import KubeSim

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "chaos"
APP = "acct-chaos"
RESULTS_START = "<!-- chaos:results:start -->"
RESULTS_END = "<!-- chaos:results:end -->"
GONE_MACHINE = ("destroyed", "destroying")
GONE_VOLUME = ("destroyed", "pending_destroy")

#: (status, share of all Fly requests, Retry-After, lost reply: the request is performed, the answer lost)
FAULTS: tuple[tuple[int, float, float | None, bool], ...] = (
    (503, 0.05, None, False),
    (502, 0.02, None, False),
    (500, 0.02, None, False),
    (429, 0.05, 0.2, False),
    (408, 0.04, None, False),
    (503, 0.02, None, True),
)

#: Violations of open, understood bugs (each explained with its seeds in RELIABILITY.md). The short profile in
#: `make test` reports them without failing; the long profile counts them as failures. Remove an entry with
#: its fix.
KNOWN_OPEN: dict[str, str] = {}


def known_open(violation: str) -> str | None:
    """The KNOWN_OPEN entry a violation belongs to, if any."""
    for name, pattern in KNOWN_OPEN.items():
        if re.search(pattern, violation):
            return name
    return None


EVENT_WEIGHTS = {
    "host_failure": 4,
    "kill_leader": 3,
    "kill_standby": 1,
    "drop_watches": 2,
    "snapshot": 2,
    "stop_start": 1,
    "host_return": 2,
    "migration": 2,
    "lying_listing": 2,
}
ORG = "chaos-org"


@dataclass
class RunConfig:
    seed: int
    instances: int
    chaos_seconds: float
    latency: float
    watch_window: int
    deletion: str  # "instance", "duplicate" or "none"
    events: list[tuple[float, str]]
    feed: bool = False  # the operators observe through the organisation feed

    @classmethod
    def draw(cls, seed: int, chaos_seconds: float) -> RunConfig:
        rng = random.Random(seed)
        instances = rng.randint(2, 3)
        seconds = chaos_seconds * rng.uniform(0.7, 1.3)
        count = rng.randint(3, 6)
        kinds = list(EVENT_WEIGHTS)
        weights = [EVENT_WEIGHTS[kind] for kind in kinds]
        events = sorted((rng.uniform(0, seconds), rng.choices(kinds, weights)[0]) for _ in range(count))
        deletion = rng.choice(["instance", "duplicate", "none"])
        if deletion != "none":
            events.append((seconds * rng.uniform(0.3, 0.9), f"delete_{deletion}"))
            events.sort()
        return cls(
            seed=seed,
            instances=instances,
            chaos_seconds=seconds,
            latency=rng.choice([0.0, 0.01, 0.03, 0.08]),
            watch_window=rng.choice([30, 100, 10_000]),
            deletion=deletion,
            events=events,
            feed=rng.random() < 0.5,
        )


@dataclass
class RunResult:
    seed: int
    violations: list[str] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    fly_requests: int = 0
    fly_faults: int = 0
    recoveries: int = 0
    takeovers: int = 0
    self_exits: int = 0
    seconds: float = 0.0
    error: str | None = None
    logs: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.violations and self.error is None


class Replicas:
    """Two operator processes; a killed one comes back after its delay, as a pod's container restarts."""

    def __init__(
        self, kube: KubeSim, fly: FlySimulator, workdir: Path, result: RunResult, *, feed: bool = False
    ) -> None:
        kubeconfig = kube.write_kubeconfig(workdir / "kubeconfig")
        overrides = {
            **({"FLY_ORG_SLUG": ORG, "KILOCLAW_FEED_INTERVAL_SECONDS": "0.3"} if feed else {}),
            "KILOCLAW_RECOVERY_TIMEOUT_SECONDS": "60",
            # Short, yet with room for a CPU-starved event loop (kopf's start-up burst, a loaded machine):
            # with 1.5 s the leaders of a loaded 2-core machine lost the Lease every few seconds.
            "KILOCLAW_LEASE_DURATION_SECONDS": "4",
            "KILOCLAW_LEASE_RENEW_DEADLINE_SECONDS": "3",
            "KILOCLAW_LEASE_RETRY_PERIOD_SECONDS": "0.5",
        }
        self.kube = kube
        self.result = result
        self.processes = {
            name: OperatorProcess(
                operator_env(fly.base_url, kubeconfig, name, **overrides), workdir / f"operator-{name}.log"
            )
            for name in ("replica-a", "replica-b")
        }
        self.down_until: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        for process in self.processes.values():
            process.start()
        self._task = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        while True:
            now = time.monotonic()
            for name, process in self.processes.items():
                if process.alive:
                    continue
                if name not in self.down_until:
                    # Exited by itself (a leader that could not renew in time exits; its pod restarts).
                    self.result.self_exits += 1
                    self.down_until[name] = now
                if now >= self.down_until[name]:
                    del self.down_until[name]
                    await asyncio.to_thread(process.kill)  # reap
                    process.start()
            await asyncio.sleep(0.1)

    def leader(self) -> str:
        return lease_holder(self.kube)

    async def kill(self, name: str, down_for: float) -> None:
        process = self.processes.get(name)
        if process is None or not process.alive:
            return
        self.down_until[name] = time.monotonic() + down_for
        await asyncio.to_thread(process.kill)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for process in self.processes.values():
            await asyncio.to_thread(process.kill)


# --- reading the two worlds ----------------------------------------------------------------------------


def instances(kube: KubeSim) -> dict[str, dict[str, Any]]:
    return {
        item["metadata"]["name"]: item
        for item in kube.list_objects(GROUP, VERSION, INSTANCE_PLURAL, NAMESPACE)
    }


def status_of(body: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = body.get("status") or {}
    return result


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in status_of(body).get("conditions") or []:
        if cond.get("type") == type_:
            result: dict[str, Any] = cond
            return result
    return {}


def live_machines(fly: FlySimulator) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in fly.machines(APP) if m["state"] not in GONE_MACHINE}


def live_volumes(fly: FlySimulator) -> dict[str, dict[str, Any]]:
    return {v["id"]: v for v in fly.volumes(APP) if v["state"] not in GONE_VOLUME}


def mounted_volumes(machine: dict[str, Any]) -> list[str]:
    return [mount.get("volume") for mount in (machine.get("config") or {}).get("mounts") or []]


def recorded_ids(status: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(machine ids, volume ids) an instance status accounts for."""
    recovery = status.get("recovery") or {}
    cleanup = status.get("pendingCleanup") or {}
    machines = {
        status.get("machineId"),
        recovery.get("sourceMachineId"),
        recovery.get("replacementMachineId"),
        cleanup.get("machineId"),
    }
    volumes = {
        status.get("volumeId"),
        recovery.get("sourceVolumeId"),
        recovery.get("replacementVolumeId"),
        cleanup.get("volumeId"),
    }
    return {m for m in machines if m}, {v for v in volumes if v}


def should_run(body: dict[str, Any]) -> bool:
    spec = body.get("spec") or {}
    return spec.get("state", "Running") == "Running" and not body["metadata"].get("deletionTimestamp")


def running_problem(body: dict[str, Any], machines: dict[str, dict[str, Any]]) -> str | None:
    """Why an instance that should run is not Running with exactly one live machine on its volume, or None."""
    name, status = body["metadata"]["name"], status_of(body)
    phase = status.get("phase")
    if phase != "Running":
        stalled = condition(body, "Stalled")
        why = (
            f" (Stalled {stalled.get('reason')}: {stalled.get('message')})"
            if stalled.get("status") == "True"
            else ""
        )
        return f"{name}: phase {phase}, expected Running{why}"
    if condition(body, "Ready").get("status") != "True":
        return f"{name}: Running but not Ready"
    if status.get("recovery"):
        return f"{name}: a recovery is still in flight (step {status['recovery'].get('step')})"
    volume_id = status.get("volumeId")
    on_volume = [m for m in machines.values() if volume_id in mounted_volumes(m)]
    if len(on_volume) != 1:
        return f"{name}: {len(on_volume)} live machines mount its volume {volume_id}"
    machine = on_volume[0]
    if machine["id"] != status.get("machineId") or machine["state"] != "started":
        return (
            f"{name}: the machine on its volume is {machine['id']} ({machine['state']}), "
            f"status names {status.get('machineId')}"
        )
    return None


def check_invariants(
    kube: KubeSim, fly: FlySimulator, snapshotted: set[str], expected: set[str]
) -> list[str]:
    """Invariants 1-3 on the current state (4 is checked when the deletion happens)."""
    problems: list[str] = []
    bodies = instances(kube)
    machines, volumes = live_machines(fly), live_volumes(fly)
    for name in sorted(expected - bodies.keys()):
        problems.append(f"{name}: the instance is gone")
    for name, body in sorted(bodies.items()):
        if name in expected and should_run(body):
            problem = running_problem(body, machines)
            if problem:
                problems.append(problem)
    known_machines: set[str] = set()
    known_volumes: set[str] = set()
    for body in bodies.values():
        m, v = recorded_ids(status_of(body))
        known_machines |= m
        known_volumes |= v
    retained = kube.list_objects(GROUP, VERSION, RETAINED_PLURAL, NAMESPACE)
    retained_volumes = {item["spec"]["volumeId"] for item in retained}
    for machine_id in sorted(machines.keys() - known_machines):
        sandbox = machines[machine_id].get("config", {}).get("metadata", {}).get("kiloclaw_sandbox_id")
        problems.append(f"orphan machine {machine_id} (sandbox {sandbox}, {machines[machine_id]['state']})")
    for volume_id in sorted(volumes.keys() - known_volumes - retained_volumes):
        volume = volumes[volume_id]
        fork = f", a fork of {volume['source_volume_id']}" if volume.get("source_volume_id") else ""
        problems.append(
            f"orphan volume {volume_id} ({volume['name']}{fork}, created {volume.get('created_at')}, "
            f"attached to {volume.get('attached_machine_id')})"
        )
    for volume_id in sorted(snapshotted - volumes.keys() - retained_volumes):
        problems.append(f"volume {volume_id} had snapshots and was deleted without a retained volume")
    return problems


# --- one run -------------------------------------------------------------------------------------------


def instance_body(name: str, sandbox_id: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "KiloClawInstance",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "sandboxId": sandbox_id,
            "userId": f"user-{name}",
            "flyApp": APP,
            "image": "registry.fly.io/kiloclaw:2026.11.1",
        },
    }


async def wait_for(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.1)
    return bool(check())


class Run:
    def __init__(self, config: RunConfig, workdir: Path) -> None:
        self.config = config
        self.rng = random.Random(config.seed * 7919 + 1)
        self.workdir = workdir
        self.result = RunResult(seed=config.seed, logs=workdir)
        self.kube = KubeSim(window_size=config.watch_window)
        self.fly = FlySimulator(
            token=FLY_TOKEN,
            org_slug=ORG,
            timings=SimTimings(start_delay=0.1, stop_delay=0.05, destroy_delay=0.05, hydrate_delay=0.1),
            seed=config.seed,
            request_log_size=500_000,
        )
        self.replicas: Replicas | None = None
        self.expected: set[str] = set()  # instances that must be Running at the end
        self.snapshotted: set[str] = set()
        # Volumes a migration left: Fly removes them once the fork has hydrated, snapshots or not.
        self.migrated_from: set[str] = set()
        # Invariants 5-7: machines the listing lied about or Fly migrated, machines a real event touched
        # (host failure, flip, deletion), and what flysim destroyed or deleted.
        self.lied_about: set[str] = set()
        self.migrated: set[str] = set()
        self.touched: set[str] = set()
        self.destroyed_machines: set[str] = set()
        self.deleted_unreachable: set[str] = set()
        #: Instances whose deletion waits for their host to return (checked once the hosts are back).
        self.deleted_later: set[str] = set()

    async def execute(self) -> RunResult:
        started = time.monotonic()
        self.kube.start_in_thread()
        self.fly.start_in_thread()
        try:
            self.kube.load_crds([CRDS])
            self.kube.create_namespace(NAMESPACE, annotations=binding(APP))
            self.replicas = Replicas(self.kube, self.fly, self.workdir, self.result, feed=self.config.feed)
            self._watch_deletes()
            self.replicas.start()
            self.inject_faults()
            for index in range(self.config.instances):
                name = f"inst-{index}"
                self.kube.create_object(
                    GROUP,
                    VERSION,
                    INSTANCE_PLURAL,
                    instance_body(name, f"ki_chaos_{index}"),
                    namespace=NAMESPACE,
                )
                self.expected.add(name)

            def provisioned() -> bool:
                machines, bodies = live_machines(self.fly), instances(self.kube)
                return all(running_problem(bodies[name], machines) is None for name in self.expected)

            # Faults are on from the start (provisioning under faults), the rest of the chaos begins once
            # every instance runs.
            if not await wait_for(provisioned, timeout=90):
                self.result.violations.append("the instances did not all reach Running within 90 s")
            await self.chaos()
            self.fly.clear_faults()
            self.fly.clear_latency()
            # Failed hosts return (Fly: "a host can be down for an hour, or a day"): an instance whose old
            # volume had no acceptable snapshot waited Stalled WaitingForSource and now recovers by itself.
            for region in self.fly.state.regions:
                self.fly.restore_host(region=region)
            self.result.fly_faults = sum(
                1 for r in self.fly.request_log if r.status in (408, 429, 500, 502, 503)
            )
            problems: list[str] = []

            def settled() -> bool:
                nonlocal problems
                problems = check_invariants(self.kube, self.fly, self.snapshotted, self.expected)
                bodies = instances(self.kube)
                problems += [
                    f"{name}: deletion did not finish after its host returned"
                    for name in sorted(self.deleted_later)
                    if name in bodies
                ]
                return not problems

            await wait_for(settled, timeout=60)
            self.result.violations.extend(problems)
            self.result.violations.extend(self.reality_problems())
            self.result.recoveries = sum(
                1
                for body in instances(self.kube).values()
                if (status_of(body).get("lastRecovery") or {}).get("outcome")
            )
            self.result.fly_requests = len(self.fly.request_log)
        except Exception as exc:  # a harness failure is reported with the run, never hidden
            self.result.error = f"{type(exc).__name__}: {exc}"
        finally:
            if self.replicas is not None:
                await self.replicas.stop()
            self.fly.stop_thread()
            self.kube.stop_thread()
            self.result.seconds = time.monotonic() - started
        return self.result

    def inject_faults(self) -> None:
        taken = 0.0
        for status, share, retry_after, lost in FAULTS:
            # Rules are tried in order: each rule's rate is its share of what the earlier rules let through.
            rate = share / (1 - taken)
            taken += share
            self.fly.inject_faults(
                "* /v1/apps/**", status, rate=rate, retry_after=retry_after, apply_first=lost
            )
        if self.config.latency:
            self.fly.set_latency(self.config.latency)

    async def chaos(self) -> None:
        began = time.monotonic()
        for at, kind in self.config.events:
            delay = began + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.result.events[kind] += 1
            await getattr(self, f"event_{kind}")()
        remaining = began + self.config.chaos_seconds - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)

    # --- invariants 5-7: the Fly that really exists ---

    def _watch_deletes(self) -> None:
        """Record every machine destroy and volume delete flysim executes, and what was true at the time."""
        state = self.fly.state
        destroy_machine, delete_volume = state.destroy_machine, state.delete_volume

        def destroy(app: str, machine_id: str, *, force: bool) -> None:
            self.destroyed_machines.add(machine_id)
            destroy_machine(app, machine_id, force=force)

        def delete(app: str, volume_id: str) -> Any:
            with state.lock:
                volume = state._volumes.get(volume_id)
                if volume is not None and volume.host.failed:
                    self.deleted_unreachable.add(volume_id)
            return delete_volume(app, volume_id)

        state.destroy_machine = destroy  # type: ignore[method-assign]
        state.delete_volume = delete  # type: ignore[method-assign,assignment]

    def reality_problems(self) -> list[str]:
        problems = [
            f"machine {m} was destroyed after a false stop (a lying listing or a migration)"
            for m in sorted((self.lied_about | self.migrated) & self.destroyed_machines - self.touched)
        ]
        problems += [
            f"volume {v} was deleted while its host was unreachable" for v in sorted(self.deleted_unreachable)
        ]
        for name, body in sorted(instances(self.kube).items()):
            last = status_of(body).get("lastRecovery") or {}
            policy = ((body.get("spec") or {}).get("recovery") or {}).get("maxDataLossSeconds", 93600)
            loss = last.get("dataLossSeconds")
            if isinstance(loss, int | float) and loss > policy:
                problems.append(f"{name}: restored a snapshot {loss:.0f}s old, policy {policy}s")
        return problems

    # --- events ---

    def _live_instance(self) -> tuple[str, dict[str, Any]] | None:
        bodies = [(n, b) for n, b in sorted(instances(self.kube).items()) if n in self.expected]
        return self.rng.choice(bodies) if bodies else None

    async def event_host_failure(self) -> None:
        picked = self._live_instance()
        machine_id = status_of(picked[1]).get("machineId") if picked else None
        if machine_id and machine_id in live_machines(self.fly):
            hosts = self.fly.fail_host(machine_id=machine_id)
            with self.fly.state.lock:
                self.touched.update(self.fly.state.machines_on_hosts(set(hosts)))

    async def event_host_return(self) -> None:
        failed = sorted(h.id for hosts in self.fly.state._hosts.values() for h in hosts if h.failed)
        if failed:
            self.fly.restore_host(host=self.rng.choice(failed))

    async def event_migration(self) -> None:
        picked = self._live_instance()
        machine_id = status_of(picked[1]).get("machineId") if picked else None
        machine = live_machines(self.fly).get(machine_id or "")
        if machine_id and machine and machine["state"] == "started":
            with contextlib.suppress(ValueError):  # no other healthy host in the region
                self.fly.migrate_machine(machine_id)
                self.migrated.add(machine_id)
                # Fly removes the volume a migration left (flysim README): not the operator's delete.
                self.migrated_from |= set(mounted_volumes(machine))
                self.snapshotted -= self.migrated_from

    async def event_lying_listing(self) -> None:
        started = [m for m, body in live_machines(self.fly).items() if body["state"] == "started"]
        if not started:
            return
        lied = self.fly.lie_in_listing(self.rng.sample(started, max(1, round(len(started) * 0.3))))
        self.lied_about.update(lied)
        await asyncio.sleep(self.rng.uniform(1.0, 3.0))
        self.fly.end_listing_lies()

    async def event_kill_leader(self) -> None:
        assert self.replicas is not None
        leader = self.replicas.leader()
        if leader:
            await self.replicas.kill(leader, self.rng.uniform(0, 2))

    async def event_kill_standby(self) -> None:
        assert self.replicas is not None
        leader = self.replicas.leader()
        for name in self.replicas.processes:
            if name != leader:
                await self.replicas.kill(name, self.rng.uniform(0, 2))
                return

    async def event_drop_watches(self) -> None:
        self.kube.store.close_watchers()

    async def event_snapshot(self) -> None:
        picked = self._live_instance()
        volume_id = status_of(picked[1]).get("volumeId") if picked else None
        if volume_id and volume_id in live_volumes(self.fly):
            self.fly.add_snapshot(volume_id)
            # A volume a migration left is still live until Fly removes it (and the status may still name
            # it): a snapshot there does not make its removal the operator's.
            if volume_id not in self.migrated_from:
                self.snapshotted.add(volume_id)

    async def event_stop_start(self) -> None:
        picked = self._live_instance()
        if picked is None:
            return
        name = picked[0]
        self.touched.add(status_of(picked[1]).get("machineId") or "")
        await self._patch_state(name, "Stopped")
        await asyncio.sleep(self.rng.uniform(0.3, 2.0))
        await self._patch_state(name, "Running")

    async def _patch_state(self, name: str, state: str) -> None:
        def patch(obj: dict[str, Any]) -> dict[str, Any]:
            return {**obj, "spec": {**obj["spec"], "state": state}}

        resource_type = self.kube.store.find_type(GROUP, VERSION, INSTANCE_PLURAL)
        assert resource_type is not None
        self.kube.store.patch(resource_type, VERSION, NAMESPACE, name, patch, None)

    async def event_delete_instance(self) -> None:
        names = sorted(self.expected)
        if len(names) < 2:
            return
        victim = self.rng.choice(names)
        self.expected.discard(victim)
        # Deleting an instance deletes its own volumes, snapshots or not (DESIGN 3.1): invariant 3 is about
        # volumes a recovery replaced.
        body = instances(self.kube).get(victim)
        if body is not None:
            self.snapshotted -= recorded_ids(status_of(body))[1]
            self.touched |= recorded_ids(status_of(body))[0]
        await self._delete_checking_others(victim)

    async def event_delete_duplicate(self) -> None:
        names = sorted(self.expected)
        original = self.rng.choice(names)
        body = instances(self.kube).get(original)
        if body is None:
            return
        duplicate = f"{original}-copy"
        self.kube.create_object(
            GROUP,
            VERSION,
            INSTANCE_PLURAL,
            instance_body(duplicate, body["spec"]["sandboxId"]),
            namespace=NAMESPACE,
        )
        await asyncio.sleep(self.rng.uniform(0.5, 2.0))
        await self._delete_checking_others(duplicate)

    def _on_a_failed_host(self, victim: str) -> bool:
        body = instances(self.kube).get(victim)
        if body is None:
            return False
        machine_ids, volume_ids = recorded_ids(status_of(body))
        with self.fly.state.lock:
            hosts = [self.fly.state._machines[m].host for m in machine_ids if m in self.fly.state._machines]
            hosts += [self.fly.state._volumes[v].host for v in volume_ids if v in self.fly.state._volumes]
            return any(host.failed for host in hosts)

    async def _delete_checking_others(self, victim: str) -> None:
        """Invariant 4: while ``victim`` is deleted, nothing another instance uses may go."""

        def quiet() -> bool:
            machines = live_machines(self.fly)
            bodies = instances(self.kube)
            return all(
                name in bodies and running_problem(bodies[name], machines) is None
                for name in self.expected
                if should_run(bodies.get(name, {"spec": {}, "metadata": {}}))
            )

        resource_type = self.kube.store.find_type(GROUP, VERSION, INSTANCE_PLURAL)
        assert resource_type is not None
        if not await wait_for(quiet, timeout=30):
            # Deleted anyway, but the isolation check needs a quiet start (no recovery of another in flight).
            self.result.events["deletion_unchecked"] += 1
            self.kube.store.delete(resource_type, VERSION, NAMESPACE, victim)
            return
        protected_machines: dict[str, str] = {}
        protected_volumes: dict[str, str] = {}
        for name, body in instances(self.kube).items():
            if name in self.expected:
                status = status_of(body)
                if status.get("machineId"):
                    protected_machines[status["machineId"]] = name
                if status.get("volumeId"):
                    protected_volumes[status["volumeId"]] = name
        self.kube.store.delete(resource_type, VERSION, NAMESPACE, victim)
        gone = await wait_for(lambda: victim not in instances(self.kube), timeout=45)
        if not gone and self._on_a_failed_host(victim):
            # Fly keeps a machine on an unreachable host `destroying` (its volume bound) until the host
            # returns: the deletion completes then (checked once the hosts are back).
            self.result.events["deletion_waits_for_host"] += 1
            self.deleted_later.add(victim)
        elif not gone:
            self.result.violations.append(f"{victim}: deletion did not finish in 45 s")
        machines, volumes = live_machines(self.fly), live_volumes(self.fly)
        for machine_id, owner in protected_machines.items():
            if machine_id not in machines:
                self.result.violations.append(f"deleting {victim} destroyed {owner}'s machine {machine_id}")
        for volume_id, owner in protected_volumes.items():
            if volume_id not in volumes:
                self.result.violations.append(f"deleting {victim} deleted {owner}'s volume {volume_id}")


# --- the campaign --------------------------------------------------------------------------------------


async def run_one(seed: int, args: argparse.Namespace) -> RunResult:
    workdir = Path(tempfile.mkdtemp(prefix=f"kiloclaw-chaos-{seed}-"))
    config = RunConfig.draw(seed, args.chaos_seconds)
    result = await Run(config, workdir).execute()
    if result.ok and not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
        result.logs = None
    return result


def describe(result: RunResult) -> str:
    verdict = "ok" if result.ok else "FAILED"
    events = ", ".join(f"{kind} {count}" for kind, count in sorted(result.events.items()))
    line = (
        f"seed {result.seed}: {verdict} in {result.seconds:.1f} s ({events}; "
        f"{result.fly_faults} of {result.fly_requests} Fly requests faulted; "
        f"{result.self_exits} replica exits of their own)"
    )
    for violation in result.violations:
        line += f"\n    violation: {violation}"
    if result.error:
        line += f"\n    error: {result.error}"
    if result.logs is not None:
        line += f"\n    operator logs: {result.logs}"
    return line


async def campaign(args: argparse.Namespace) -> list[RunResult]:
    seeds = [args.seed + index for index in range(args.runs)]
    limit = asyncio.Semaphore(args.jobs)
    results: list[RunResult] = []

    async def one(seed: int) -> None:
        async with limit:
            result = await run_one(seed, args)
        results.append(result)
        print(describe(result), flush=True)

    await asyncio.gather(*(one(seed) for seed in seeds))
    return sorted(results, key=lambda r: r.seed)


def results_section(results: list[RunResult], args: argparse.Namespace, wall: float) -> str:
    failed = [r for r in results if not r.ok]
    events: Counter[str] = Counter()
    for result in results:
        events.update(result.events)
    requests = sum(r.fly_requests for r in results)
    faults = sum(r.fly_faults for r in results)
    rows = [
        ("Runs", str(len(results))),
        ("Runs with an invariant violation (or a harness error)", str(len(failed))),
        (
            "Fly requests / answered with an injected or rate-limit fault",
            f"{requests} / {faults} ({faults / max(requests, 1):.0%})",
        ),
        ("Host failures", str(events["host_failure"])),
        ("Leader SIGKILLs (+ standby SIGKILLs)", f"{events['kill_leader']} (+ {events['kill_standby']})"),
        (
            "Leaders that exited by themselves (missed renew deadline)",
            str(sum(r.self_exits for r in results)),
        ),
        ("Watch disconnects (all streams)", str(events["drop_watches"])),
        ("Snapshots added / Stopped→Running flips", f"{events['snapshot']} / {events['stop_start']}"),
        (
            "Instance deletions / duplicate claimants deleted",
            f"{events['delete_instance']} / {events['delete_duplicate']}",
        ),
        ("Recoveries completed (lastRecovery present at the end)", str(sum(r.recoveries for r in results))),
        (
            "Median run time",
            f"{sorted(r.seconds for r in results)[len(results) // 2]:.1f} s" if results else "n/a",
        ),
        ("Wall time", f"{wall / 60:.1f} min"),
    ]
    width = max(len(label) for label, _ in rows)
    value_width = max(len(value) for _, value in rows)
    table = [
        f"| {'Measure'.ljust(width)} | {'Value'.ljust(value_width)} |",
        f"|{'-' * (width + 2)}|{'-' * (value_width + 2)}|",
    ]
    table += [f"| {label.ljust(width)} | {value.ljust(value_width)} |" for label, value in rows]
    failures = "\n".join(
        f"- seed {r.seed}: " + "; ".join(r.violations + ([r.error] if r.error else [])) for r in failed
    )
    return f"""{RESULTS_START}
## Latest campaign

- Date: {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
- Command: `tests/tools/chaos.py --runs {args.runs} --seed {args.seed} --jobs {args.jobs} \
--chaos-seconds {args.chaos_seconds:g}`
  (replay one run: `make chaos SEED=<seed> RUNS=1`)

{chr(10).join(table)}

Failed seeds: {"none" if not failed else ""}
{failures}
{RESULTS_END}"""


def write_results(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Reliability\n"
    pattern = re.compile(re.escape(RESULTS_START) + r".*?" + re.escape(RESULTS_END), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200, help="number of runs (default 200)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first run (default: random)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (default 1)")
    parser.add_argument("--chaos-seconds", type=float, default=6.0, help="mean length of the chaos phase")
    parser.add_argument("--write", type=Path, default=None, help="write the results table into this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the operator logs of passing runs")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 1_000_000)
    return args


def _terminate(signum: int, _frame: object) -> None:
    # Unwind through every run's finally block, so that no operator process outlives the campaign.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    print(
        f"chaos: {args.runs} runs from seed {args.seed} (replay one: make chaos SEED=<seed> RUNS=1)",
        flush=True,
    )
    began = time.monotonic()
    results = asyncio.run(campaign(args))
    wall = time.monotonic() - began
    failed = [r.seed for r in results if not r.ok]
    print(f"chaos: {len(results)} runs, {len(failed)} failed" + (f": seeds {failed}" if failed else ""))
    if args.write is not None:
        write_results(args.write, results_section(results, args, wall))
        print(f"chaos: results written to {args.write}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
