"""``make bench-outage``: the Fly that really exists, measured (issue 19). One fleet of N instances spread
over three regions (feed mode, Fly's rate limits on, the operator as its own process as in ``make bench``),
then three scenarios in order:

1. **Platform migration of 1 %** of the machines: Fly stops each, forks its volume to another host and starts
   the same machine id on the new volume. Measured: time until every migrated instance's ``status.volumeId``
   names the new volume, recoveries started (must be 0), deletes sent (must be 0).
2. **A lying feed**: the organisation listing reports 30 % of the machines ``stopped`` while they run, for
   ``--lie-seconds``. Measured: destructive calls (machine destroys, volume deletes, creates: must be 0),
   recoveries started (0), stop confirmations, and time until everything is back to normal after the feed
   recovers.
3. **Region outage**: every host of one region fails (~1/3 of the machines on unreachable hosts). Half of the
   volumes there have a daily snapshot, half have none. The brake engages (a third of the fleet is above its
   share); the benchmark re-arms it at once, as an admin would with ``kubectl kiloclaw rearm``. Measured: time
   until every instance with a snapshot runs again elsewhere, that every one without is ``Stalled``
   ``WaitingForSource`` (and no fork was attempted), Fly requests and 429s, peak operator CPU and RSS.

Usage: ``.venv/bin/python tests/tools/bench_outage.py --instances 1000`` (``--cluster`` for the real API
server).
Results go into BENCHMARKS.md between the ``bench:outage`` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark as bench

REGIONS = ("iad", "ord", "cdg")
LOST_REGION = "iad"
BRAKE_LEASE = (
    f"/apis/coordination.k8s.io/v1/namespaces/{bench.LEASE_NAMESPACE}/leases/kiloclaw-recovery-brake"
)
MARKERS = {
    "kubesim": ("<!-- bench:outage:start -->", "<!-- bench:outage:end -->"),
    "kube-apiserver": ("<!-- bench:outage-apiserver:start -->", "<!-- bench:outage-apiserver:end -->"),
}


@dataclass
class Outcome:
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, value: object) -> None:
        self.rows.append((name, str(value)))
        bench.say(f"{name}: {value}")


def instance_body(namespace: str, name: str, app: str) -> dict[str, Any]:
    """As ``make bench``, with the three regions in an order of its own per instance (spread evenly)."""
    body = bench.bench_instance_body(namespace, name, app)
    turn = int(hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest(), 16) % len(REGIONS)
    body["spec"]["regions"] = list(REGIONS[turn:] + REGIONS[:turn])
    return body


async def sim_state(fly: bench.FlyProcess) -> dict[str, Any]:
    response = await fly.control.get("/state")
    response.raise_for_status()
    state: dict[str, Any] = response.json()
    return state


def destructive(routes: dict[str, int]) -> int:
    return sum(
        count
        for route, count in routes.items()
        if route.startswith("DELETE ")
        or route == "POST /v1/apps/{app_name}/volumes"
        or route == "POST /v1/apps/{app_name}/machines"
    )


async def migration(
    api: httpx.AsyncClient, fly: bench.FlyProcess, args: argparse.Namespace, out: Outcome
) -> None:
    statuses = await bench.list_instances(api, bench.Results(0, 0, datetime.now(UTC)))
    started = [(key, s["machineId"]) for key, s in sorted(statuses.items()) if s.get("machineId")]
    victims = random.Random(args.seed).sample(started, max(1, round(len(started) * 0.01)))
    before = await fly.counts()
    began = time.monotonic()
    for _, machine_id in victims:
        (await fly.control.post(f"/machines/{machine_id}/migrate", json={})).raise_for_status()
    pending = dict(victims)
    while pending and time.monotonic() - began < args.phase_timeout:
        await asyncio.sleep(1.0)
        machines = {m["id"]: m for m in (await sim_state(fly))["machines"]}
        statuses = await bench.list_instances(api, bench.Results(0, 0, datetime.now(UTC)))
        for key, machine_id in list(pending.items()):
            mounts = (machines[machine_id].get("config") or {}).get("mounts") or []
            new_volume = mounts[0]["volume"] if mounts else None
            if statuses[key].get("volumeId") == new_volume and machines[machine_id]["state"] == "started":
                del pending[key]
    seconds = time.monotonic() - began
    recoveries = sum(1 for key, _ in victims if statuses[key].get("lastRecovery"))
    routes = bench.route_delta(before, await fly.counts())
    out.add("Migration: machines migrated by Fly", len(victims))
    out.add(
        "Migration: every status.volumeId followed after", f"{seconds:.1f} s" if not pending else "NOT DONE"
    )
    out.add("Migration: not followed", len(pending))
    out.add("Migration: recoveries started", recoveries)
    out.add("Migration: destructive Fly calls (destroy, delete, create)", destructive(routes))


async def lying_feed(
    api: httpx.AsyncClient, fly: bench.FlyProcess, args: argparse.Namespace, out: Outcome
) -> None:
    before = await fly.counts()
    lied = (await fly.control.post("/listing/lies", json={"fraction": 0.3})).json()["machine_ids"]
    began = time.monotonic()
    engaged_after: float | None = None
    while (waited := time.monotonic() - began) < args.lie_seconds:
        if engaged_after is None and await brake_state(api) == "Engaged":
            engaged_after = waited
        await asyncio.sleep(min(1.0, max(args.lie_seconds - waited, 0)))
    during = bench.route_delta(before, await fly.counts())
    statuses = await bench.list_instances(api, bench.Results(0, 0, datetime.now(UTC)))
    brake = await brake_state(api)
    not_running = sum(1 for s in statuses.values() if s.get("phase") != "Running")
    recoveries = sum(1 for s in statuses.values() if s.get("recovery") or s.get("lastRecovery"))
    await fly.control.delete("/listing/lies")
    if brake == "Engaged":
        await rearm(api)
    ended = time.monotonic()
    while time.monotonic() - ended < args.phase_timeout:
        statuses = await bench.list_instances(api, bench.Results(0, 0, datetime.now(UTC)))
        if all(s.get("phase") == "Running" and s.get("flyState") == "started" for s in statuses.values()):
            break
        await asyncio.sleep(1.0)
    normal = time.monotonic() - ended
    if await brake_state(api) == "Engaged":
        # Engaged by the confirmations still queued when the lie ended: the admin re-arms it afterwards.
        await rearm(api)
    reads = during.get("GET /v1/apps/{app_name}/machines/{machine_id}", 0)
    out.add("Lying feed: machines reported stopped while running", f"{len(lied)} (30 %)")
    out.add("Lying feed: lie held for", f"{args.lie_seconds:g} s")
    out.add("Lying feed: destructive Fly calls (destroy, delete, create)", destructive(during))
    out.add("Lying feed: recoveries started", recoveries)
    out.add("Lying feed: instances not Running during the lie", not_running)
    out.add("Lying feed: per-machine confirming reads", reads)
    out.add("Lying feed: brake state at the end of the lie (re-armed after it)", brake)
    out.add(
        "Lying feed: brake engaged after",
        "not during the lie" if engaged_after is None else f"{engaged_after:.1f} s",
    )
    out.add("Lying feed: back to normal after the listing recovered", f"{normal:.1f} s")


async def brake_state(api: httpx.AsyncClient) -> str:
    lease = await api.get(BRAKE_LEASE)
    if not lease.is_success:
        return "Armed"
    annotations = (lease.json().get("metadata") or {}).get("annotations") or {}
    return str(annotations.get("kiloclaw.kilo.ai/brake-state", "Armed"))


async def rearm(api: httpx.AsyncClient) -> None:
    """What ``kubectl kiloclaw rearm`` does."""
    patch = {"metadata": {"annotations": {"kiloclaw.kilo.ai/brake-state": "Released"}}}
    response = await api.patch(
        BRAKE_LEASE, json=patch, headers={"Content-Type": "application/merge-patch+json"}
    )
    response.raise_for_status()


async def region_outage(
    api: httpx.AsyncClient,
    fly: bench.FlyProcess,
    args: argparse.Namespace,
    sampler: bench.ProcessSampler,
    out: Outcome,
) -> None:
    statuses = await bench.list_instances(api, bench.Results(0, 0, datetime.now(UTC)))
    lost = {key for key, s in statuses.items() if s.get("region") == LOST_REGION}
    keys = sorted(lost)
    random.Random(args.seed).shuffle(keys)
    with_snapshot = set(keys[: len(keys) // 2])
    gate = asyncio.Semaphore(32)

    async def snapshot(volume_id: str) -> None:
        async with gate:
            await fly.add_snapshot(volume_id)

    await asyncio.gather(*(snapshot(statuses[key]["volumeId"]) for key in with_snapshot))
    source_volumes = {statuses[key]["volumeId"] for key in lost}
    before = await fly.counts()
    limited_before = await fly.rate_limited()
    cpu_before = sampler.cpu_seconds()
    began = time.monotonic()
    (await fly.control.post("/hosts/fail", json={"region": LOST_REGION})).raise_for_status()
    engaged_after: float | None = None
    running: dict[tuple[str, str], float] = {}
    waiting: set[tuple[str, str]] = set()
    while time.monotonic() - began < args.phase_timeout:
        await asyncio.sleep(1.0)
        statuses = await bench.list_instances(api, bench.Results(0, 0, datetime.now(UTC)))
        if engaged_after is None and await brake_state(api) == "Engaged":
            engaged_after = time.monotonic() - began
            bench.say(f"brake engaged after {engaged_after:.1f} s: re-arming it (as kubectl kiloclaw rearm)")
            await rearm(api)
        now = time.monotonic() - began
        for key in with_snapshot:
            s = statuses[key]
            if key not in running and s.get("phase") == "Running" and s.get("region") != LOST_REGION:
                running[key] = now
        waiting = {
            key
            for key in lost - with_snapshot
            if any(
                c.get("type") == "Stalled"
                and c.get("status") == "True"
                and c.get("reason") == "WaitingForSource"
                for c in statuses[key].get("conditions") or []
            )
        }
        if len(running) == len(with_snapshot) and waiting == lost - with_snapshot:
            break
    routes = bench.route_delta(before, await fly.counts())
    volumes = (await sim_state(fly))["volumes"]
    forks_of_lost = sum(1 for v in volumes if v.get("source_volume_id") in source_volumes)
    losses = [
        float((statuses[key].get("lastRecovery") or {}).get("dataLossSeconds") or 0.0) for key in running
    ]
    out.add("Region outage: instances on the lost region's hosts", f"{len(lost)} of {len(statuses)}")
    out.add("Region outage: with a snapshot → Running elsewhere", f"{len(running)} of {len(with_snapshot)}")
    if running:
        times = sorted(running.values())
        out.add(
            "Region outage: failure → Running, p50 / p99 / all",
            f"{bench.percentile(times, 50):.1f} s / {bench.percentile(times, 99):.1f} s / {times[-1]:.1f} s",
        )
        out.add("Region outage: data-loss window restored, max", f"{max(losses):.0f} s")
    out.add(
        "Region outage: without a snapshot → Stalled WaitingForSource",
        f"{len(waiting)} of {len(lost - with_snapshot)}",
    )
    out.add("Region outage: forks of a volume on the lost region (must be 0)", forks_of_lost)
    out.add(
        "Region outage: brake engaged after (re-armed at once)",
        f"{engaged_after:.1f} s" if engaged_after is not None else "not engaged",
    )
    out.add("Region outage: Fly requests", sum(routes.values()))
    out.add("Region outage: Fly 429 answers", await fly.rate_limited() - limited_before)
    out.add("Region outage: operator CPU seconds", f"{sampler.cpu_seconds() - cpu_before:.1f} s")


async def run(args: argparse.Namespace, workdir: Path, out: Outcome) -> None:
    kube: bench.KubeTarget = bench.RealKube() if args.cluster else bench.KubeProcess(workdir)
    fly = bench.FlyProcess(args, workdir)
    try:
        await fly.wait_ready()
        kubeconfig = await asyncio.to_thread(kube.start, workdir)
        prefix = f"outage-{datetime.now(UTC):%H%M%S}" if args.cluster else "outage"
        namespaces = [f"{prefix}-{index:03d}" for index in range(args.namespaces)]
        names = [(namespaces[i % len(namespaces)], f"inst-{i:05d}") for i in range(args.instances)]
        apps = {key: f"acct-outage-{index:05d}" for index, key in enumerate(names)}
        for namespace in namespaces:
            # Each namespace bound to the apps of its instances (tenancy.py), as the cluster admin binds them.
            bound = sorted({app for (ns, _), app in apps.items() if ns == namespace})
            await kube.create_namespace(namespace, bench.binding(*bound))
        leader = bench.Replica(args, fly.base_url, kubeconfig, workdir, "replica-a")
        leader.env["KILOCLAW_BRAKE_WINDOW_SECONDS"] = "60"
        # One replica and no standby: this benchmark measures recovery, not fail-over (tests/benchmark.py
        # does, with the default Lease). A wide Lease keeps a renewal that the API server answers late
        # (kubesim is one Python process serving 10,000 objects on the same two cores) from ending the run.
        leader.env["KILOCLAW_LEASE_DURATION_SECONDS"] = "60"
        leader.env["KILOCLAW_LEASE_RENEW_DEADLINE_SECONDS"] = "40"
        process = leader.start()
        sampler = bench.ProcessSampler(process.pid)
        sampler.start()
        results = bench.Results(
            instances=args.instances, namespaces=args.namespaces, started_at=datetime.now(UTC)
        )
        try:
            await bench.wait_operator_ready(leader.health_port, process, leader.log)
            async with kube.client(httpx.Limits(max_connections=args.create_concurrency + 4)) as api:
                bench.say(f"creating {args.instances} instances over {', '.join(REGIONS)}")
                await bench.create_and_wait_running(
                    api, fly, kube, args, names, apps, results, process, leader.log, sampler
                )
                out.add("Fleet: all Running after", f"{results.all_running_seconds:.1f} s")
                await bench.wait_settled(args, kube, results, process, leader.log)
                bench.say("scenario 1: platform migration of 1 %")
                await migration(api, fly, args, out)
                bench.say("scenario 2: a lying feed (30 % reported stopped)")
                await lying_feed(api, fly, args, out)
                # The brake arms itself again after a whole window without stops (60 s here).
                bench.say("waiting for the brake to arm again (a quiet window)")
                await asyncio.sleep(65)
                bench.say(f"scenario 3: region {LOST_REGION} lost")
                await region_outage(api, fly, args, sampler, out)
            out.add("Operator peak RSS (whole run)", f"{sampler.peak_rss / 2**20:.0f} MiB")
            out.add("Operator CPU seconds (whole run)", f"{sampler.cpu_seconds():.1f} s")
            out.add("Fly 429 answers (whole run)", await fly.rate_limited())
        finally:
            sampler.stop()
            bench.stop_process(process)
            bench.say(f"operator log: {leader.log}")
    finally:
        await fly.aclose()
        kube.stop()


def report(args: argparse.Namespace, out: Outcome, began: datetime, wall: float) -> str:
    server = "kube-apiserver" if args.cluster else "kubesim"
    start, end = MARKERS[server]
    rows = "\n".join(f"| {name} | {value} |" for name, value in out.rows)
    cluster_flag = " --cluster" if args.cluster else ""
    return f"""{start}
## The Fly that really exists ({server}): migration, lying feed, region outage

- Date: {began:%Y-%m-%d %H:%M UTC}; machine: {bench.machine_info()}; wall time {wall:.0f} s
- Command: `.venv/bin/python tests/tools/bench_outage.py --instances {args.instances}{cluster_flag}`
- Feed mode, Fly's rate limits on in flysim, one operator process (Lease 60 s / renew deadline 40 s: no
  standby, fail-over is `make bench`'s) with its default recovery budget and brake
  (concurrency 32, 5 begun/s, pause past 200 stops or 20 % of the fleet; window 60 s here, so that the brake
  arms again between the scenarios).

| Measure | Value |
|---|---|
{rows}
{end}"""


def main(argv: list[str] | None = None) -> int:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--lie-seconds", type=float, default=20.0)
    mine, rest = extra.parse_known_args(argv)
    args = bench.parse_args([*rest, "--modes", "feed"])
    args.lie_seconds = mine.lie_seconds
    args.mode = "feed"
    bench.bench_instance_body = bench.instance_body
    bench.instance_body = instance_body
    began = datetime.now(UTC)
    started = time.monotonic()
    out = Outcome()
    workdir = Path(tempfile.mkdtemp(prefix="kiloclaw-outage-"))
    bench.say(f"work directory {workdir}")
    asyncio.run(run(args, workdir, out))
    section = report(args, out, began, time.monotonic() - started)
    print(section)
    if not args.no_write:
        bench.write_results(args.output, section)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
