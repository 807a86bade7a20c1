"""``make bench``: the real operator against kubesim + flysim with N instances; prints one table and writes it
into BENCHMARKS.md (a benchmark, not a test: pytest does not collect this file).

The simulators run in this process (each in its own thread and event loop); the operator runs as a subprocess
(``kiloclaw-operator run``, configured only through its environment as a deployment would be) so that its
resident memory and CPU time can be measured alone. Everything listens on loopback.

Steps:
1. create N instances spread over K namespaces (bounded concurrency) and poll the cluster-wide list until
   every instance is ``Running``: per-instance time from its create to the first list showing it ``Running``;
2. steady state: Fly (and Kubernetes write) requests per instance per minute over ``--steady-seconds``;
3. fail the hosts under ``--fail-percent`` of the instances' machines and measure, per affected instance, the
   time from the failure to ``Recovering`` (detection) and to ``Running`` again (recovery);
4. fail-over: a standby replica has run beside the operator all along (leader election on a Lease); the
   leader is SIGKILLed ``--failovers`` times (the killed one restarts as the standby, as its pod would) and
   once stopped with SIGTERM; measured: kill → the standby holds the Lease, → its kopf lists the instances.

Usage: ``.venv/bin/python tests/benchmark.py --instances 50 --steady-seconds 10`` (``--help`` for all knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

import realcluster
from flysim import FlySimulator, SimTimings
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, VERSION
from kubesim import KubeSim

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "crds"
FLY_TOKEN = "bench-token"
IMAGE = "registry.fly.io/kiloclaw:2026.11.1"
RESULTS_MARKERS = {
    "kubesim": ("<!-- bench:results:start -->", "<!-- bench:results:end -->"),
    "kube-apiserver": ("<!-- bench:results-apiserver:start -->", "<!-- bench:results-apiserver:end -->"),
}
LIST_PATH = f"/apis/{GROUP}/{VERSION}/{INSTANCE_PLURAL}"
LEASE_NAMESPACE = "kiloclaw-system"
LEASE_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/kiloclaw-operator"


class BenchmarkError(Exception):
    """The run cannot produce a result (the operator died, or a phase did not finish in its time limit)."""


# --- parameters and results ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=1000, help="instances to create (default 1000)")
    parser.add_argument("--namespaces", type=int, default=10, help="namespaces to spread them over")
    parser.add_argument("--steady-seconds", type=float, default=60, help="steady-state measurement window")
    parser.add_argument("--fail-percent", type=float, default=1.0, help="share of instances whose host fails")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="results file")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument(
        "--poll-running", type=float, default=60, help="KILOCLAW_POLL_RUNNING_SECONDS (operator default 60)"
    )
    parser.add_argument(
        "--poll-busy", type=float, default=5, help="KILOCLAW_POLL_BUSY_SECONDS (operator default 5)"
    )
    parser.add_argument(
        "--poll-idle", type=float, default=300, help="KILOCLAW_POLL_IDLE_SECONDS (operator default 300)"
    )
    parser.add_argument(
        "--recovery-timeout", type=float, default=600, help="KILOCLAW_RECOVERY_TIMEOUT_SECONDS (default 600)"
    )
    parser.add_argument(
        "--wait-call", type=int, default=60, help="KILOCLAW_WAIT_CALL_SECONDS (operator default 60)"
    )
    parser.add_argument(
        "--start-delay", type=float, default=1.0, help="flysim: seconds a machine takes to start"
    )
    parser.add_argument(
        "--stop-delay", type=float, default=0.5, help="flysim: seconds a machine takes to stop"
    )
    parser.add_argument(
        "--hosts-per-region",
        type=int,
        default=0,
        help="flysim hosts per region (0: two per instance, so that a failed host affects few instances)",
    )
    parser.add_argument(
        "--instances-per-app", type=int, default=1, help="instances sharing one Fly app (default 1)"
    )
    parser.add_argument("--create-concurrency", type=int, default=32, help="concurrent creates")
    parser.add_argument("--phase-timeout", type=float, default=900, help="limit for each waiting phase (s)")
    parser.add_argument("--seed", type=int, default=20261125, help="random seed (host choice, victims)")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="use the real API server of the current KUBECONFIG (make cluster) instead of kubesim; "
        "results go to their own section of the results file",
    )
    parser.add_argument(
        "--failovers", type=int, default=3, help="leader SIGKILLs in the fail-over phase (0: no standby)"
    )
    args = parser.parse_args(argv)
    if min(args.instances, args.namespaces, args.instances_per_app) < 1:
        parser.error("--instances, --namespaces and --instances-per-app must be at least 1")
    return args


@dataclass
class Results:
    instances: int
    namespaces: int
    started_at: datetime
    create_seconds: float = 0.0
    provision_fly_routes: dict[str, int] = field(default_factory=dict)
    provision_kube_writes: int = 0
    to_running: list[float] = field(default_factory=list)
    all_running_seconds: float = 0.0
    settle_seconds: float = 0.0
    steady_seconds: float = 0.0
    steady_fly_requests: int = 0
    steady_fly_routes: dict[str, int] = field(default_factory=dict)
    steady_kube_writes: int = 0
    steady_cpu_seconds: float = 0.0
    affected: int = 0
    failed_hosts: int = 0
    detection: list[float] = field(default_factory=list)
    recovered: list[float] = field(default_factory=list)
    not_detected: int = 0
    not_recovered: int = 0
    peak_rss_bytes: int = 0
    cpu_seconds: float = 0.0
    total_seconds: float = 0.0
    list_seconds: list[float] = field(default_factory=list)
    failover_lease: list[float] = field(default_factory=list)
    failover_serving: list[float] = field(default_factory=list)
    graceful_lease: float = math.nan


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 10 values is the largest)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


# --- measuring the operator process --------------------------------------------------------------------


class ProcessSampler:
    """Peak RSS of one process, sampled every ``interval`` seconds in a background thread."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        self.sample()
        self._stop.set()
        self._thread.join(timeout=5)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def operator_env(
    args: argparse.Namespace, fly_url: str, kubeconfig: Path, health_port: int, identity: str = "replica-a"
) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KILOCLAW_", "FLY_"))}
    env.update(
        {
            "KUBECONFIG": str(kubeconfig),
            "FLY_API_TOKEN": FLY_TOKEN,
            "FLY_API_BASE_URL": fly_url,
            "KILOCLAW_POLL_RUNNING_SECONDS": str(args.poll_running),
            "KILOCLAW_POLL_BUSY_SECONDS": str(args.poll_busy),
            "KILOCLAW_POLL_IDLE_SECONDS": str(args.poll_idle),
            "KILOCLAW_RECOVERY_TIMEOUT_SECONDS": str(args.recovery_timeout),
            "KILOCLAW_WAIT_CALL_SECONDS": str(args.wait_call),
            "KILOCLAW_METRICS_PORT": str(free_port()),
            "KILOCLAW_HEALTH_PORT": str(health_port),
            # Lease timings are the operator's defaults (8 s duration, 5 s renew deadline, 1 s retry); the
            # Lease lives where deploy/ grants it (on a cluster the operator runs as its ServiceAccount).
            "KILOCLAW_LEASE_IDENTITY": identity,
            "KILOCLAW_LEASE_NAMESPACE": LEASE_NAMESPACE,
            # Proxies must not see loopback traffic.
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    return env


def operator_command() -> list[str]:
    beside = Path(sys.executable).with_name("kiloclaw-operator")
    executable = str(beside) if beside.exists() else shutil.which("kiloclaw-operator")
    if executable is None:
        raise BenchmarkError("kiloclaw-operator is not installed (make venv)")
    return [executable, "run"]


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- talking to the emulated API -----------------------------------------------------------------------


def instance_body(namespace: str, name: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "KiloClawInstance",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            # Like real sandbox ids (ki_ + 32 hex): the volume name keeps only 21 characters of the id.
            "sandboxId": "ki_" + hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:32],
            "userId": f"user-{namespace}-{name}",
            "flyApp": app,
            "image": IMAGE,
        },
    }


async def list_instances(api: httpx.AsyncClient, results: Results) -> dict[tuple[str, str], dict[str, Any]]:
    """One cluster-wide list (not one GET per instance); key (namespace, name) → status."""
    started = time.monotonic()
    response = await api.get(LIST_PATH)
    response.raise_for_status()
    results.list_seconds.append(time.monotonic() - started)
    return {
        (item["metadata"]["namespace"], item["metadata"]["name"]): item.get("status") or {}
        for item in response.json()["items"]
    }


def check_operator(process: subprocess.Popen[bytes], log: Path) -> None:
    if process.poll() is not None:
        raise BenchmarkError(f"the operator exited with {process.returncode}:\n{log_tail(log)}")


async def wait_operator_ready(health_port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            check_operator(process, log)
            try:
                if (await client.get(f"http://127.0.0.1:{health_port}/healthz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise BenchmarkError(f"the operator did not become ready in 60 s:\n{log_tail(log)}")


def parse_time(text: str | None) -> float | None:
    """An RFC 3339 timestamp written by the operator → epoch seconds (None when absent)."""
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- the phases ----------------------------------------------------------------------------------------


def route_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        route: count - before.get(route, 0)
        for route, count in sorted(after.items())
        if count - before.get(route, 0) > 0
    }


class EmbeddedKube:
    """kubesim in a thread of this process; writes are counted from its request log."""

    name = "kubesim"

    def __init__(self) -> None:
        self.sim = KubeSim(request_log_size=5_000_000)

    def start(self, workdir: Path) -> Path:
        self.sim.start_in_thread()
        self.sim.load_crds([CRDS])
        self.sim.create_namespace(LEASE_NAMESPACE)  # deploy/base's namespace, where the Lease lives
        return self.sim.write_kubeconfig(workdir / "kubeconfig")

    def stop(self) -> None:
        self.sim.stop_thread()

    def client(self, limits: httpx.Limits) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.sim.url, timeout=120, limits=limits)

    async def create_namespace(self, name: str) -> None:
        self.sim.create_namespace(name)

    async def writes(self) -> int:
        """Kubernetes writes so far (events included; not the leader's Lease renewals), a monotonic count."""
        return sum(
            1
            for r in list(self.sim.request_log)
            if r.verb in ("create", "update", "patch", "delete") and r.resource != "leases"
        )


class RealKube:
    """A real kube-apiserver (``--cluster``: the current KUBECONFIG, e.g. ``make cluster``). The operator
    authenticates as its ServiceAccount, as in production; writes are counted from the server's own
    ``apiserver_request_total`` metric."""

    name = "kube-apiserver"
    WRITE_VERBS = ("POST", "PATCH", "PUT", "DELETE")

    def __init__(self) -> None:
        self.access = realcluster.load_access()

    def start(self, workdir: Path) -> Path:
        admin_kubeconfig = realcluster.kubeconfig_path()
        subprocess.run(
            ["kubectl", "apply", "--server-side", "--force-conflicts", "-k", str(CRDS)],
            check=True,
            timeout=120,
        )
        for crd in ("kiloclawinstances", "kiloclawretainedvolumes"):
            subprocess.run(
                ["kubectl", "wait", "--for=condition=Established", f"crd/{crd}.{GROUP}"],
                check=True,
                timeout=120,
            )
        for manifest in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml"):
            subprocess.run(
                ["kubectl", "apply", "-f", str(ROOT / "deploy" / "base" / manifest)], check=True, timeout=120
            )
        with self.access.client() as admin:
            token = realcluster.service_account_token(admin, "kiloclaw-system", "kiloclaw-operator", 7200)
        return realcluster.write_token_kubeconfig(workdir / "kubeconfig", admin_kubeconfig, token)

    def stop(self) -> None:
        pass

    def client(self, limits: httpx.Limits) -> httpx.AsyncClient:
        client = self.access.async_client(timeout=120)
        return httpx.AsyncClient(
            base_url=client.base_url,
            headers=client.headers,
            verify=self.access.ssl_context,
            limits=limits,
            timeout=120,
        )

    async def create_namespace(self, name: str) -> None:
        async with self.access.async_client() as client:
            response = await client.post("/api/v1/namespaces", json={"metadata": {"name": name}})
            if response.status_code not in (201, 409):
                raise BenchmarkError(f"cannot create namespace {name}: {response.text}")

    async def writes(self) -> int:
        async with self.access.async_client() as client:
            text = (await client.get("/metrics")).text
        total = 0
        for line in text.splitlines():
            if (
                line.startswith("apiserver_request_total{")
                and any(f'verb="{verb}"' in line for verb in self.WRITE_VERBS)
                # The leader's Lease renewals: one per retry period, whatever the number of instances.
                and 'resource="leases"' not in line
            ):
                total += int(float(line.rsplit(" ", 1)[1]))
        return total


KubeTarget = EmbeddedKube | RealKube


async def create_and_wait_running(
    api: httpx.AsyncClient,
    fly: FlySimulator,
    kube: KubeTarget,
    args: argparse.Namespace,
    names: list[tuple[str, str]],
    apps: dict[tuple[str, str], str],
    results: Results,
    process: subprocess.Popen[bytes],
    log: Path,
) -> dict[tuple[str, str], dict[str, Any]]:
    created_at: dict[tuple[str, str], float] = {}
    running_at: dict[tuple[str, str], float] = {}
    limit = asyncio.Semaphore(args.create_concurrency)

    async def create(key: tuple[str, str]) -> None:
        namespace, name = key
        async with limit:
            response = await api.post(
                f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{INSTANCE_PLURAL}",
                json=instance_body(namespace, name, apps[key]),
            )
            if response.status_code != 201:
                raise BenchmarkError(f"create {namespace}/{name}: {response.status_code} {response.text}")
            created_at[key] = time.monotonic()

    async def watch_running() -> dict[tuple[str, str], dict[str, Any]]:
        deadline = time.monotonic() + args.phase_timeout
        last: dict[tuple[str, str], dict[str, Any]] = {}
        while time.monotonic() < deadline:
            check_operator(process, log)
            last = await list_instances(api, results)
            now = time.monotonic()
            for key, status in last.items():
                if status.get("phase") == "Running" and key not in running_at and key in created_at:
                    running_at[key] = now
                if status.get("phase") == "Failed":
                    raise BenchmarkError(f"{key[0]}/{key[1]} is Failed: {status.get('conditions')}")
            if len(running_at) == len(names):
                return last
            await asyncio.sleep(0.5)
        phases: dict[str, int] = {}
        for status in last.values():
            phases[str(status.get("phase"))] = phases.get(str(status.get("phase")), 0) + 1
        raise BenchmarkError(
            f"{len(names) - len(running_at)} instances not Running after {args.phase_timeout:.0f} s "
            f"(phases: {phases})"
        )

    fly_before = fly.request_counts
    kube_before = await kube.writes()
    started = time.monotonic()
    watcher = asyncio.create_task(watch_running())
    try:
        await asyncio.gather(*(create(key) for key in names))
        results.create_seconds = time.monotonic() - started
        final = await watcher
    finally:
        watcher.cancel()
    results.all_running_seconds = max(running_at.values()) - started
    results.to_running = [running_at[key] - created_at[key] for key in names]
    results.provision_fly_routes = route_delta(fly_before, fly.request_counts)
    # Minus the benchmark's own creates: what remains is the operator's (status patches, events, annotations).
    results.provision_kube_writes = await kube.writes() - kube_before - len(names)
    return final


async def wait_settled(
    args: argparse.Namespace,
    kube: KubeTarget,
    results: Results,
    process: subprocess.Popen[bytes],
    log: Path,
    quiet_seconds: float = 5.0,
) -> None:
    """Wait until the operator has written nothing to Kubernetes for ``quiet_seconds`` (kopf works off its
    backlog of events after the last instance is Running); the steady-state window starts after that."""
    started = time.monotonic()
    deadline = started + args.phase_timeout
    mark, quiet_since = await kube.writes(), time.monotonic()
    while time.monotonic() - quiet_since < quiet_seconds:
        if time.monotonic() > deadline:
            raise BenchmarkError(f"the operator kept writing to Kubernetes for {args.phase_timeout:.0f} s")
        check_operator(process, log)
        await asyncio.sleep(0.5)
        now = await kube.writes()
        if now != mark:
            mark, quiet_since = now, time.monotonic()
    results.settle_seconds = quiet_since - started


async def measure_steady_state(
    args: argparse.Namespace,
    fly: FlySimulator,
    kube: KubeTarget,
    sampler: ProcessSampler,
    results: Results,
    process: subprocess.Popen[bytes],
    log: Path,
) -> None:
    """Requests over a fixed window: the measurement is the window itself, not a wait for a condition."""
    fly_before = fly.request_counts
    kube_before = await kube.writes()
    cpu_before = sampler.cpu_seconds()
    started = time.monotonic()
    deadline = started + args.steady_seconds
    while time.monotonic() < deadline:
        check_operator(process, log)
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    results.steady_seconds = time.monotonic() - started
    results.steady_cpu_seconds = sampler.cpu_seconds() - cpu_before
    results.steady_fly_routes = route_delta(fly_before, fly.request_counts)
    results.steady_fly_requests = sum(results.steady_fly_routes.values())
    results.steady_kube_writes = await kube.writes() - kube_before


async def fail_hosts_and_measure(
    api: httpx.AsyncClient,
    args: argparse.Namespace,
    fly: FlySimulator,
    statuses: dict[tuple[str, str], dict[str, Any]],
    results: Results,
    process: subprocess.Popen[bytes],
    log: Path,
) -> None:
    by_machine = {status["machineId"]: key for key, status in statuses.items() if status.get("machineId")}
    target = max(1, round(len(statuses) * args.fail_percent / 100))
    candidates = sorted(by_machine)
    random.Random(args.seed).shuffle(candidates)
    running = {m["id"] for m in fly.machines() if m["state"] == "started"}
    failed_wall = time.time()
    failed_mono = time.monotonic()
    hosts: set[str] = set()
    affected: set[tuple[str, str]] = set()
    # A failed host stops every machine on it: fail hosts until the target share of instances is affected.
    for machine_id in candidates:
        if len(affected) >= target:
            break
        if by_machine[machine_id] in affected:
            continue
        hosts.update(fly.fail_host(machine_id=machine_id))
        stopped = {m["id"] for m in fly.machines() if m["state"] != "started"}
        affected = {by_machine[m] for m in running & stopped if m in by_machine}
    results.failed_hosts = len(hosts)
    results.affected = len(affected)
    detected: dict[tuple[str, str], float] = {}
    recovered: dict[tuple[str, str], float] = {}
    deadline = time.monotonic() + max(args.phase_timeout, 3 * args.poll_running + args.recovery_timeout)
    while time.monotonic() < deadline and len(recovered) < len(affected):
        check_operator(process, log)
        current = await list_instances(api, results)
        observed = time.monotonic() - failed_mono
        for key in affected - recovered.keys():
            status = current.get(key) or {}
            recovery = status.get("recovery") or {}
            last_recovery = status.get("lastRecovery") or {}
            # Prefer the operator's own timestamps (exact); the list-poll time is the fallback (±0.5 s).
            started = parse_time(recovery.get("startedAt")) or parse_time(last_recovery.get("startedAt"))
            if key not in detected and (status.get("phase") == "Recovering" or started is not None):
                detected[key] = started - failed_wall if started is not None else observed
            finished = parse_time(last_recovery.get("finishedAt"))
            if key in detected and status.get("phase") == "Running" and not recovery:
                recovered[key] = max(finished - failed_wall, 0.0) if finished is not None else observed
        await asyncio.sleep(0.5)
    results.detection = list(detected.values())
    results.recovered = list(recovered.values())
    results.not_detected = len(affected) - len(detected)
    results.not_recovered = len(affected) - len(recovered)


class Replica:
    """One operator process of the two (leader election); restarted with the same identity after a kill, as
    the container of a pod restarts."""

    def __init__(self, args: argparse.Namespace, fly_url: str, kubeconfig: Path, workdir: Path, name: str):
        self.name = name
        self.health_port = free_port()
        self.env = operator_env(args, fly_url, kubeconfig, self.health_port, identity=name)
        self.workdir = workdir
        self.log = workdir / f"operator-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(
                operator_command(), env=self.env, stdout=log_file, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        return self.process

    async def role(self) -> str | None:
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                body = (await client.get(f"http://127.0.0.1:{self.health_port}/healthz")).json()
        except (httpx.HTTPError, ValueError):
            return None
        role: str | None = body.get("role")
        return role


async def lease_holder(api: httpx.AsyncClient) -> str:
    response = await api.get(LEASE_PATH)
    if response.status_code == 404:
        return ""
    response.raise_for_status()
    holder: str = (response.json().get("spec") or {}).get("holderIdentity") or ""
    return holder


def instance_lists_since(kube: KubeTarget, since: int) -> bool | None:
    """Whether kopf listed the instances since request ``since`` (kubesim's request log; None elsewhere)."""
    if not isinstance(kube, EmbeddedKube):
        return None
    records = list(kube.sim.request_log)[since:]
    return any(r.verb == "list" and r.resource == INSTANCE_PLURAL for r in records)


async def measure_failover(
    args: argparse.Namespace,
    api: httpx.AsyncClient,
    kube: KubeTarget,
    leader: Replica,
    standby: Replica,
    results: Results,
) -> None:
    """SIGKILL the leader ``--failovers`` times, then SIGTERM it once; the killed replica restarts as the
    standby each time."""
    for round_ in range(args.failovers + 1):
        graceful = round_ == args.failovers
        await wait_role(standby, "standby", args.phase_timeout)
        assert leader.process is not None
        since = len(kube.sim.request_log) if isinstance(kube, EmbeddedKube) else 0
        killed = time.monotonic()
        if graceful:
            leader.process.send_signal(signal.SIGTERM)
        else:
            leader.process.kill()
        took_lease = served = math.nan
        deadline = killed + args.phase_timeout
        serving_known = isinstance(kube, EmbeddedKube)
        while time.monotonic() < deadline and (
            math.isnan(took_lease) or (serving_known and math.isnan(served))
        ):
            now = time.monotonic() - killed
            if math.isnan(took_lease) and await lease_holder(api) == standby.name:
                took_lease = now
            if not math.isnan(took_lease) and math.isnan(served) and instance_lists_since(kube, since):
                served = now
            await asyncio.sleep(0.02)
        if math.isnan(took_lease):
            raise BenchmarkError(f"the standby did not take over in {args.phase_timeout:g} s")
        if graceful:
            results.graceful_lease = took_lease
        else:
            results.failover_lease.append(took_lease)
            results.failover_serving.append(served)
        say(f"fail-over {round_ + 1}: Lease after {took_lease:.2f} s, serving after {served:.2f} s")
        await asyncio.to_thread(leader.process.wait)
        leader.start()
        leader, standby = standby, leader


async def wait_role(replica: Replica, role: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if replica.process is not None and replica.process.poll() is not None:
            raise BenchmarkError(f"replica {replica.name} exited:\n{log_tail(replica.log)}")
        if await replica.role() == role:
            return
        await asyncio.sleep(0.1)
    raise BenchmarkError(f"replica {replica.name} is not {role} after {timeout:g} s")


# --- the report ----------------------------------------------------------------------------------------


def fmt_seconds(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} s"


def table(results: Results, args: argparse.Namespace) -> str:
    n = results.instances
    per_minute = (
        results.steady_fly_requests / n / (results.steady_seconds / 60) if results.steady_seconds else 0
    )
    kube_per_minute = (
        results.steady_kube_writes / n / (results.steady_seconds / 60) if results.steady_seconds else 0
    )
    steady_cpu = results.steady_cpu_seconds / results.steady_seconds * 100 if results.steady_seconds else 0
    detection_note = ""
    if results.not_detected:
        detection_note = f" ({results.not_detected} of {results.affected} never detected)"
    recovery_note = ""
    if results.not_recovered:
        recovery_note = f" ({results.not_recovered} of {results.affected} not Running again)"
    rows = [
        ("Instances (namespaces)", f"{n} ({results.namespaces})"),
        ("Create requests, all accepted", fmt_seconds(results.create_seconds)),
        ("Create → `Running`, p50", fmt_seconds(percentile(results.to_running, 50))),
        ("Create → `Running`, p99", fmt_seconds(percentile(results.to_running, 99))),
        ("First create → all `Running`", fmt_seconds(results.all_running_seconds)),
        (
            "Fly requests / instance to reach `Running`",
            f"{sum(results.provision_fly_routes.values()) / n:.1f}",
        ),
        ("Kubernetes writes / instance to reach `Running`", f"{results.provision_kube_writes / n:.1f}"),
        ("All `Running` → operator's last Kubernetes write", fmt_seconds(results.settle_seconds)),
        (
            f"Fly requests / instance / minute, steady ({results.steady_seconds:.0f} s)",
            f"{per_minute:.2f}",
        ),
        ("Kubernetes writes / instance / minute, steady", f"{kube_per_minute:.2f}"),
        ("Operator CPU at steady state", f"{steady_cpu:.1f} % of one core"),
        ("Operator peak RSS", f"{results.peak_rss_bytes / 2**20:.0f} MiB"),
        ("Operator CPU seconds (whole run)", f"{results.cpu_seconds:.1f} s"),
        (
            "Failed hosts → affected instances",
            f"{results.failed_hosts} → {results.affected} ({results.affected / n * 100:.1f} %)",
        ),
        ("Failure → `Recovering`, p50", fmt_seconds(percentile(results.detection, 50)) + detection_note),
        ("Failure → `Recovering`, p99", fmt_seconds(percentile(results.detection, 99))),
        ("Failure → `Running` again, p50", fmt_seconds(percentile(results.recovered, 50)) + recovery_note),
        ("Failure → `Running` again, p99", fmt_seconds(percentile(results.recovered, 99))),
        (
            f"Leader SIGKILL → standby holds the Lease, max of {len(results.failover_lease)}",
            fmt_seconds(max(results.failover_lease, default=math.nan)),
        ),
        (
            "Leader SIGKILL → new leader lists the instances, max",
            fmt_seconds(max(results.failover_serving, default=math.nan)),
        ),
        ("Leader SIGTERM → standby holds the Lease (released)", fmt_seconds(results.graceful_lease)),
        ("Benchmark wall time", f"{results.total_seconds:.0f} s"),
    ]
    width = max(len(label) for label, _ in rows)
    value_width = max(len(value) for _, value in rows)
    lines = [
        f"| {'Measure'.ljust(width)} | {'Value'.ljust(value_width)} |",
        f"|{'-' * (width + 2)}|{'-' * (value_width + 2)}|",
    ]
    lines += [f"| {label.ljust(width)} | {value.ljust(value_width)} |" for label, value in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> str:
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} CPUs (`nproc` {len(os.sched_getaffinity(0))}), {cpu_model()}, "
        f"{memory:.1f} GiB memory, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def results_section(results: Results, args: argparse.Namespace, table_text: str) -> str:
    routes = ", ".join(f"`{route}` {count}" for route, count in results.steady_fly_routes.items()) or "none"
    provision_routes = ", ".join(
        f"`{route}` {count}" for route, count in results.provision_fly_routes.items()
    )
    lists = results.list_seconds
    command = (
        f"tests/benchmark.py{' --cluster' if args.cluster else ''} --instances {args.instances} "
        f"--namespaces {args.namespaces} "
        f"--steady-seconds {args.steady_seconds:g} --fail-percent {args.fail_percent:g} "
        f"--instances-per-app {args.instances_per_app} --failovers {args.failovers} "
        f"--poll-running {args.poll_running:g} --poll-busy {args.poll_busy:g} --poll-idle {args.poll_idle:g}"
    )
    start, end = RESULTS_MARKERS["kube-apiserver" if args.cluster else "kubesim"]
    server = "a real kube-apiserver (make cluster)" if args.cluster else "kubesim (the emulated API)"
    return f"""{start}
## Latest run against {server}

- Date: {results.started_at.strftime("%Y-%m-%d %H:%M UTC")}
- Machine: {machine_info()}
- Command: `{command}`
- Operator settings: running poll {args.poll_running:g} s, busy poll {args.poll_busy:g} s, idle poll \
{args.poll_idle:g} s (each ±10 % jitter), Fly wait call {args.wait_call} s, recovery timeout \
{args.recovery_timeout:g} s.
- flysim timings: machine start {args.start_delay:g} s, stop {args.stop_delay:g} s;
  {args.hosts_per_region or max(3, 2 * args.instances)} hosts per region.

{table_text}

Fly requests by route until all were `Running`: {provision_routes or "none"}.
Steady-state Fly requests by route: {routes}.
Benchmark list calls (cluster-wide, all instances): {len(lists)}, median \
{fmt_seconds(percentile(lists, 50))}, max {fmt_seconds(max(lists) if lists else math.nan)}.
{end}"""


def write_results(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = section.split("\n", 1)[0], section.rsplit("\n", 1)[1]
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


# --- the run -------------------------------------------------------------------------------------------


async def run_benchmark(
    args: argparse.Namespace,
    fly: FlySimulator,
    kube: KubeTarget,
    workdir: Path,
    results: Results,
) -> None:
    kubeconfig = await asyncio.to_thread(kube.start, workdir)
    # A real API server keeps deleted namespaces Terminating without kube-controller-manager: each run gets
    # namespaces of its own (run against a fresh `make cluster` for numbers without leftovers).
    prefix = f"bench-{results.started_at:%H%M%S}" if isinstance(kube, RealKube) else "bench"
    namespaces = [f"{prefix}-{index:03d}" for index in range(args.namespaces)]
    for namespace in namespaces:
        await kube.create_namespace(namespace)
    names = [(namespaces[index % len(namespaces)], f"inst-{index:05d}") for index in range(args.instances)]
    # One sandbox per user, one Fly app per account: the operator's adoption look-ups list the app's machines
    # and volumes, so sharing apps would make them grow with the instances per app.
    apps = {key: f"acct-bench-{index // args.instances_per_app:05d}" for index, key in enumerate(names)}
    leader = Replica(args, fly.base_url, kubeconfig, workdir, "replica-a")
    standby = Replica(args, fly.base_url, kubeconfig, workdir, "replica-b")
    health_port, log = leader.health_port, leader.log
    process = leader.start()
    sampler: ProcessSampler | None = None
    try:
        sampler = ProcessSampler(process.pid)
        sampler.start()
        await wait_operator_ready(health_port, process, log)
        await wait_role(leader, "leader", 60)
        if args.failovers:
            standby.start()
        limits = httpx.Limits(max_connections=args.create_concurrency + 4)
        async with kube.client(limits) as api:
            say(f"creating {args.instances} instances in {args.namespaces} namespaces")
            statuses = await create_and_wait_running(api, fly, kube, args, names, apps, results, process, log)
            say(f"all Running after {results.all_running_seconds:.1f} s; waiting for the operator to settle")
            await wait_settled(args, kube, results, process, log)
            say(
                f"settled after {results.settle_seconds:.1f} s more; "
                f"steady state for {args.steady_seconds:g} s"
            )
            await measure_steady_state(args, fly, kube, sampler, results, process, log)
            say(f"failing hosts under {args.fail_percent:g} % of the instances")
            await fail_hosts_and_measure(api, args, fly, statuses, results, process, log)
        results.cpu_seconds = sampler.cpu_seconds()
        sampler.stop()
        results.peak_rss_bytes = sampler.peak_rss
        sampler = None
        if args.failovers:
            say(f"fail-over: SIGKILL the leader {args.failovers} times, then SIGTERM it")
            async with kube.client(httpx.Limits(max_connections=4)) as api:
                await measure_failover(args, api, kube, leader, standby, results)
    finally:
        if sampler is not None:
            sampler.stop()
            results.peak_rss_bytes = sampler.peak_rss
        for replica in (leader, standby):
            if replica.process is not None:
                stop_process(replica.process)
        say(f"operator log: {log} ({log.stat().st_size / 2**20:.1f} MiB)")


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _terminate(signum: int, _frame: object) -> None:
    # Unwind through every finally block so that the operator subprocess is stopped too.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    hosts_per_region = args.hosts_per_region or max(3, 2 * args.instances)
    fly = FlySimulator(
        token=FLY_TOKEN,
        timings=SimTimings(
            start_delay=args.start_delay,
            stop_delay=args.stop_delay,
            destroy_delay=0.5,
            hydrate_delay=1.0,
        ),
        hosts_per_region=hosts_per_region,
        seed=args.seed,
        request_log_size=1000,
    )
    kube: KubeTarget = RealKube() if args.cluster else EmbeddedKube()
    results = Results(instances=args.instances, namespaces=args.namespaces, started_at=datetime.now(UTC))
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="kiloclaw-bench-"))
    fly.start_in_thread()
    try:
        try:
            asyncio.run(run_benchmark(args, fly, kube, workdir, results))
        finally:
            kube.stop()
    except BenchmarkError as exc:
        say(f"benchmark failed: {exc}")
        return 1
    finally:
        fly.stop_thread()
    results.total_seconds = time.monotonic() - began
    table_text = table(results, args)
    print(table_text)
    print(json.dumps({"fly_routes_steady": results.steady_fly_routes}))
    if not args.no_write:
        write_results(args.output, results_section(results, args, table_text))
        say(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
