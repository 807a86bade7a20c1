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

Usage: ``.venv/bin/python tests/tools/benchmark.py --instances 50 --steady-seconds 10`` (``--help`` for all
knobs).
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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import httpx
import psutil

# The shared test support (harness, realcluster) is one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import realcluster
from apiserver_profile import ApiServerProfiler
from harness import binding
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, RETAINED_PLURAL, VERSION
from kiloclaw_operator.tenancy import CLAIM_LABEL_SELECTOR, claim_holder

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
FLY_TOKEN = "bench-token"
FLY_ORG = "bench-org"
MODES = ("polling", "feed")
IMAGE = "registry.fly.io/kiloclaw:2026.11.1"
RESULTS_MARKERS = {
    "kubesim": ("<!-- bench:results:start -->", "<!-- bench:results:end -->"),
    "kube-apiserver": ("<!-- bench:results-apiserver:start -->", "<!-- bench:results-apiserver:end -->"),
}
LIST_PATH = f"/apis/{GROUP}/{VERSION}/{INSTANCE_PLURAL}"
LEASE_NAMESPACE = "kiloclaw-system"
LEASES_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
#: Every instance of a run carries this label (value: the run's id): the benchmark lists, and cleans up, only
#: its own run's instances on a cluster that still holds an earlier run's.
RUN_LABEL = "bench.kiloclaw.kilo.ai/run"


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
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help="observation modes to run one after the other, each on fresh simulators: polling (per-instance "
        "GETs), feed (the organisation feed, FLY_ORG_SLUG); default both, reported side by side",
    )
    parser.add_argument(
        "--audit",
        type=float,
        default=1800,
        help="KILOCLAW_AUDIT_SECONDS in feed mode (operator default 1800)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the operator with py-spy from the first create until all are Running, and the new "
        "leader over the cold start's window; the top frames go into the report",
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        help="operator shards: each its own namespaces (KILOCLAW_NAMESPACES), Lease and replicas; namespaces "
        "are dealt round-robin, measured per shard and whole (the cold start and fail-overs hit shard 0)",
    )
    parser.add_argument(
        "--kill-during-burst",
        type=float,
        default=0.5,
        help="with a standby (--failovers > 0): SIGKILL shard 0's leader once this share of the instances "
        "is Running, failing the hosts under --fail-percent of the Running ones; 0: no kill in the burst",
    )
    parser.add_argument(
        "--lease",
        default="",
        help="DURATION,RENEW_DEADLINE seconds for the operators' Lease instead of the operator's defaults "
        "(8,5): only for runs that measure something else (e.g. --census) on a machine too loaded for the "
        "default; printed in the command",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="on a real cluster, leave the run's instances (default: strip their finalizers and delete "
        "them, their retained volumes and the run's Leases once the operators are stopped)",
    )
    parser.add_argument(
        "--census",
        action="store_true",
        help="run the first leader under tests/tools/operator_census.py and take a heap census of it once "
        "all instances are Running and again at the end of the recovery phase (each stalls its loop for "
        "seconds)",
    )
    parser.add_argument(
        "--census-trace",
        type=int,
        default=0,
        help="with --census: trace allocations (tracemalloc, this many frames) and report where the live "
        "memory was allocated instead of the deep census (quicker at thousands of instances)",
    )
    parser.add_argument(
        "--cold-start-seconds",
        type=float,
        default=30,
        help="after the leader is killed (and hosts fail while it is down): seconds Fly requests are counted",
    )
    args = parser.parse_args(argv)
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not args.modes or any(mode not in MODES for mode in args.modes):
        parser.error(f"--modes: a comma list of {', '.join(MODES)}")
    if min(args.instances, args.namespaces, args.instances_per_app, args.shards) < 1:
        parser.error("--instances, --namespaces, --instances-per-app and --shards must be at least 1")
    if args.namespaces < args.shards:
        parser.error("--namespaces must be at least --shards (a shard serves whole namespaces)")
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
    max_loop_lag_seconds: float = math.nan
    lease_get_max_seconds: float = math.nan
    cpu_seconds: float = 0.0
    total_seconds: float = 0.0
    list_seconds: list[float] = field(default_factory=list)
    #: The benchmark's watch of the run's instances (None: it lists them).
    view: InstanceWatch | None = field(default=None, repr=False)
    mode: str = "polling"
    run: str = ""
    profile: str = ""
    cold_profile: str = ""
    server_profile: str = ""
    provision_cpu_seconds: float = 0.0
    rate_limited: int = 0
    cold_affected: int = 0
    cold_detection: list[float] = field(default_factory=list)
    #: Failure → the operator wrote the stop it saw (``status.flyState`` and ``observedAt``), per instance.
    noticed: list[float] = field(default_factory=list)
    cold_noticed: list[float] = field(default_factory=list)
    cold_not_detected: int = 0
    cold_takeover_seconds: float = math.nan
    cold_fly_requests: int = 0
    cold_peak_fly_per_second: int = 0
    cold_kube_writes: int = 0
    failover_lease: list[float] = field(default_factory=list)
    failover_serving: list[float] = field(default_factory=list)
    graceful_lease: float = math.nan
    censuses: list[dict[str, Any]] = field(default_factory=list)
    cold_first_recovery: float = math.nan
    cold_other_shards: str = ""
    burst_killed_at_running: int = 0
    burst_affected: int = 0
    burst_lease: float = math.nan
    burst_first_recovery: float = math.nan
    burst_recovery_p99: float = math.nan
    burst_resumed: float = math.nan
    shard_rows: list[list[str]] = field(default_factory=list)


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
        #: The largest RSS of each 5-second window (clock time of the window's start, bytes).
        self.timeline: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            rss = self.process.memory_info().rss
            window = int(time.time()) // 5 * 5
            self.timeline[window] = max(rss, self.timeline.get(window, 0))
            if rss > self.peak_rss:
                self.peak_rss, self.peak_at = rss, time.strftime("%H:%M:%S")
            times = self.process.cpu_times()
            self.last_cpu = float(times.user + times.system)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    last_cpu = 0.0
    peak_at = ""

    def cpu_seconds(self) -> float:
        """CPU seconds so far (of a process that has exited: as last sampled)."""
        with contextlib.suppress(psutil.Error):
            times = self.process.cpu_times()
            self.last_cpu = float(times.user + times.system)
        return self.last_cpu

    def stop(self) -> None:
        self.sample()
        self._stop.set()
        self._thread.join(timeout=5)


class Profiler:
    """py-spy sampling one process into a raw (collapsed-stack) file until stopped."""

    #: The profilers sampling, by the pid they sample (see ``reap``).
    sampling: ClassVar[dict[int, Profiler]] = {}

    def __init__(self, pid: int, path: Path) -> None:
        executable = Path(sys.executable).with_name("py-spy")
        self.path = path
        self.pid = pid
        self.process = subprocess.Popen(
            [str(executable), "record", "-p", str(pid), "-o", str(path), "--format", "raw", "--rate", "67"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        Profiler.sampling[pid] = self

    def stop(self) -> str:
        Profiler.sampling.pop(self.pid, None)
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return summarize_profile(self.path)


async def remove_claim(client: httpx.AsyncClient, gate: asyncio.Semaphore, name: str) -> None:
    async with gate:
        response = await client.delete(f"{LEASES_PATH}/{name}")
        if response.status_code not in (200, 202, 404):
            raise BenchmarkError(f"cannot delete the claim {name}: {response.text}")


def reap(process: subprocess.Popen[Any]) -> None:
    """Wait for a SIGKILLed process. A process py-spy has stopped to sample can stay in its tracing stop,
    never dying (a 10,000 run hung here for ten minutes): if it outlives the grace, its sampler goes."""
    try:
        process.wait(timeout=30)
        return
    except subprocess.TimeoutExpired:
        profiler = Profiler.sampling.pop(process.pid, None)
        say(f"pid {process.pid} outlived its SIGKILL by 30 s; stopping its sampler ({profiler is not None})")
        if profiler is not None:
            profiler.process.kill()
    process.wait()


PROFILE_BUCKETS = (
    ("httpx / httpcore / anyio (the adapters' HTTP interface)", ("httpcore", "httpx", "anyio", "h11")),
    ("aiohttp (connections: the adapters' transport and kopf's client)", ("aiohttp", "yarl", "multidict")),
    ("kopf", ("/kopf/",)),
    ("pydantic", ("pydantic",)),
    ("json", ("/json/",)),
    ("logging", ("/logging/",)),
    ("kiloclaw_operator", ("kiloclaw_operator",)),
    ("asyncio (event loop)", ("/asyncio/",)),
)


def summarize_profile(path: Path, top: int = 12) -> str:
    """Top frames by own samples, and the share of samples under each library (the innermost match)."""
    own: dict[str, int] = {}
    buckets: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return "(no profile)"
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames and frames[-1].startswith("process "):
            continue
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        bucket = "other"
        for frame in reversed(frames):
            match = next(
                (name for name, needles in PROFILE_BUCKETS if any(n in frame for n in needles)), None
            )
            if match is not None:
                bucket = match
                break
        buckets[bucket] = buckets.get(bucket, 0) + count
    if not total:
        return "(no samples)"
    by_bucket = ", ".join(
        f"{name} {count / total * 100:.0f} %" for name, count in sorted(buckets.items(), key=lambda i: -i[1])
    )
    frames = "\n".join(
        f"  {count / total * 100:5.1f} %  {frame}"
        for frame, count in sorted(own.items(), key=lambda i: -i[1])[:top]
    )
    return f"{total} samples; innermost library: {by_bucket}\ntop frames (own samples):\n{frames}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def operator_env(
    args: argparse.Namespace,
    fly_url: str,
    kubeconfig: Path,
    health_port: int,
    identity: str,
    namespaces: str,
    lease_name: str,
) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KILOCLAW_", "FLY_"))}
    if args.mode == "feed":
        env.update({"FLY_ORG_SLUG": FLY_ORG, "KILOCLAW_AUDIT_SECONDS": str(args.audit)})
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
            # Lease timings are the operator's defaults (8 s duration, 5 s renew deadline, 1 s retry) at every
            # N (renewals run on a thread of their own, never behind the burst); the Lease lives where deploy/
            # grants it (on a cluster the operator runs as its ServiceAccount).
            "KILOCLAW_LEASE_IDENTITY": identity,
            "KILOCLAW_LEASE_NAMESPACE": LEASE_NAMESPACE,
            # Scoped to this run's (shard's) namespaces, with a Lease of its own: an earlier run's instances
            # left on the same cluster are none of this operator's business.
            "KILOCLAW_NAMESPACES": namespaces,
            "KILOCLAW_LEASE_NAME": lease_name,
            **(
                {
                    "KILOCLAW_LEASE_DURATION_SECONDS": args.lease.split(",")[0],
                    "KILOCLAW_LEASE_RENEW_DEADLINE_SECONDS": args.lease.split(",")[1],
                }
                if args.lease
                else {}
            ),
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


def instance_body(namespace: str, name: str, app: str, run: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "KiloClawInstance",
        "metadata": {"name": name, "namespace": namespace, "labels": {RUN_LABEL: run}},
        "spec": {
            # Like real sandbox ids (ki_ + 32 hex): the volume name keeps only 21 characters of the id.
            "sandboxId": "ki_" + hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:32],
            "userId": f"user-{namespace}-{name}",
            "flyApp": app,
            "image": IMAGE,
        },
    }


async def list_instances(api: httpx.AsyncClient, results: Results) -> dict[tuple[str, str], dict[str, Any]]:
    """This run's instances, key (namespace, name) → status: from the run's watch once it is synced, else one
    cluster-wide list (not one GET per instance)."""
    view = results.view
    if view is not None and view.synced.is_set():
        return view.snapshot()
    started = time.monotonic()
    found: dict[tuple[str, str], dict[str, Any]] = {}
    # In pages (the API server's chunked list): one 10,000-item answer kept kubesim's single loop busy for
    # seconds, long enough to delay the leader's Lease renewals past their deadline on a loaded machine.
    params: dict[str, Any] = {"labelSelector": f"{RUN_LABEL}={results.run}", "limit": 500}
    while True:
        response = await api.get(LIST_PATH, params=params)
        response.raise_for_status()
        page = response.json()
        for item in page["items"]:
            found[(item["metadata"]["namespace"], item["metadata"]["name"])] = item.get("status") or {}
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            break
        params = {**params, "continue": token}
    results.list_seconds.append(time.monotonic() - started)
    return found


class InstanceWatch:
    """The run's instances as one watch sees them: every status change as it happens (the exact moment an
    instance turns `Running`), at the cost of one event per change. Before it, the benchmark listed the whole
    fleet every few seconds (every 5 s at 10,000: ±5 s resolution, and 2,000 objects a second serialised by
    the API server and parsed here, on the machine that runs the operator)."""

    def __init__(self, client: httpx.AsyncClient, run: str) -> None:
        self._client = client
        self._selector = f"{RUN_LABEL}={run}"
        self.statuses: dict[tuple[str, str], dict[str, Any]] = {}
        #: When each instance was first seen `Running` (monotonic), and when first seen at all.
        self.first_running: dict[tuple[str, str], float] = {}
        self.synced = asyncio.Event()
        self.events = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="instance-watch")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def snapshot(self) -> dict[tuple[str, str], dict[str, Any]]:
        if self._task is not None and self._task.done():
            self._task.result()  # a failed watch ends the run here, saying why
        return dict(self.statuses)

    def _seen(self, item: dict[str, Any]) -> None:
        key = (item["metadata"]["namespace"], item["metadata"]["name"])
        status = item.get("status") or {}
        self.statuses[key] = status
        if status.get("phase") == "Running" and key not in self.first_running:
            self.first_running[key] = time.monotonic()

    async def _list(self) -> str:
        params: dict[str, Any] = {"labelSelector": self._selector, "limit": 500}
        self.statuses.clear()
        while True:
            response = await self._client.get(LIST_PATH, params=params)
            response.raise_for_status()
            page = response.json()
            for item in page["items"]:
                self._seen(item)
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return str(page["metadata"]["resourceVersion"])
            params = {**params, "continue": token}

    async def _run(self) -> None:
        version = await self._list()
        self.synced.set()
        while True:
            params = {
                "watch": "1",
                "labelSelector": self._selector,
                "resourceVersion": version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": "50",
            }
            expired = False
            try:
                async with self._client.stream("GET", LIST_PATH, params=params, timeout=90) as response:
                    if response.status_code == 410:
                        expired = True
                    else:
                        response.raise_for_status()
                        async for line in response.aiter_lines():
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            item = event.get("object") or {}
                            kind = event.get("type")
                            if kind == "ERROR":
                                expired = item.get("code") == 410
                                break
                            version = str((item.get("metadata") or {}).get("resourceVersion") or version)
                            if kind in ("ADDED", "MODIFIED"):
                                self.events += 1
                                self._seen(item)
                            elif kind == "DELETED":
                                key = (item["metadata"]["namespace"], item["metadata"]["name"])
                                self.statuses.pop(key, None)
            except (httpx.TransportError, httpx.RemoteProtocolError):
                await asyncio.sleep(0.5)  # the stream broke: watch again from the last version seen
            if expired:
                version = await self._list()


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


def list_interval(args: argparse.Namespace, results: Results | None = None) -> float:
    """Seconds between the benchmark's looks at the instances: 0.5 s from the watch; without it, longer for
    big fleets (each list returns every instance, and it must not load the machine the operator is measured
    on)."""
    if results is not None and results.view is not None and results.view.synced.is_set():
        return 0.5
    return max(0.5, args.instances / 2000)


def route_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        route: count - before.get(route, 0)
        for route, count in sorted(after.items())
        if count - before.get(route, 0) > 0
    }


class ServerProcess:
    """A simulator in a process of its own (not a thread of the benchmark: it must not share a core with the
    benchmark's own loop); stopped with SIGTERM."""

    def __init__(self, name: str, command: list[str], workdir: Path) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        with self.log.open("wb") as log_file:
            self.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env=server_env()
            )

    def check(self) -> None:
        if self.process.poll() is not None:
            raise BenchmarkError(f"{self.name} exited with {self.process.returncode}:\n{log_tail(self.log)}")

    def stop(self) -> None:
        stop_process(self.process)


def server_env() -> dict[str, str]:
    paths = [str(ROOT / "operator"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), NO_PROXY="127.0.0.1,localhost")


class FlyProcess(ServerProcess):
    """flysim (``python -m flysim``) with Fly's rate limits on; read and driven through its control routes."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.port = free_port()
        hosts_per_region = args.hosts_per_region or max(3, 2 * args.instances)
        command = [
            sys.executable,
            "-m",
            "flysim",
            f"--port={self.port}",
            f"--token={FLY_TOKEN}",
            f"--start-delay={args.start_delay}",
            f"--stop-delay={args.stop_delay}",
            "--destroy-delay=0.5",
            "--hydrate-delay=1.0",
            f"--hosts-per-region={hosts_per_region}",
            f"--seed={args.seed}",
            "--request-log-size=1000",
        ]
        super().__init__("flysim", command, workdir)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.control = httpx.AsyncClient(base_url=f"{self.base_url}/_sim", timeout=60)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.check()
            with contextlib.suppress(httpx.HTTPError):
                await self.control.get("/requests", params={"tail": 0})
                return
            await asyncio.sleep(0.1)
        raise BenchmarkError("flysim did not start in 60 s")

    async def counts(self) -> dict[str, int]:
        body = (await self.control.get("/requests", params={"tail": 0})).json()
        counts: dict[str, int] = body["counts"]
        return counts

    async def rate_limited(self) -> int:
        return int((await self.control.get("/requests", params={"tail": 0})).json()["rate_limited"])

    async def add_snapshot(self, volume_id: str) -> None:
        await self.control.post(f"/volumes/{volume_id}/snapshots")

    async def volumes(self) -> list[dict[str, Any]]:
        """Every live volume, with its snapshots."""
        volumes: list[dict[str, Any]] = (await self.control.get("/state")).json()["volumes"]
        return volumes

    async def fail_host(self, machine_id: str) -> tuple[list[str], list[str]]:
        """Fail the host of a machine: (failed hosts, machines stopped on them)."""
        body = (await self.control.post("/hosts/fail", json={"machine_id": machine_id})).json()
        return list(body["failed_hosts"]), list(body["stopped_machines"])

    async def aclose(self) -> None:
        await self.control.aclose()
        self.stop()


class KubeProcess(ServerProcess):
    """kubesim in a process of its own (``tests/tools/bench_kubesim.py``): writes and instance lists are
    counted there and read through its control endpoint."""

    name = "kubesim"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ready_file = workdir / "kubesim.ready"
        self.kubeconfig = workdir / "kubeconfig"
        self.url = ""
        self.control: httpx.AsyncClient | None = None

    def start(self, workdir: Path) -> Path:
        command = [
            sys.executable,
            str(ROOT / "tests" / "tools" / "bench_kubesim.py"),
            f"--crds={CRDS}",
            f"--kubeconfig={self.kubeconfig}",
            f"--ready-file={self.ready_file}",
            f"--namespace={LEASE_NAMESPACE}",  # deploy/base's namespace, where the Lease lives
        ]
        super().__init__("kubesim", command, workdir)
        deadline = time.monotonic() + 60
        while not self.ready_file.exists():
            self.check()
            if time.monotonic() > deadline:
                raise BenchmarkError("kubesim did not start in 60 s")
            time.sleep(0.1)
        ready = json.loads(self.ready_file.read_text())
        self.url = ready["url"]
        self.control = httpx.AsyncClient(base_url=ready["control"], timeout=60)
        return self.kubeconfig

    def client(self, limits: httpx.Limits) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits)

    async def _counts(self) -> dict[str, int]:
        assert self.control is not None
        counts: dict[str, int] = (await self.control.get("/counts")).json()
        return counts

    async def create_namespace(self, name: str, annotations: dict[str, str]) -> None:
        assert self.control is not None
        (await self.control.post(f"/namespaces/{name}", json={"annotations": annotations})).raise_for_status()

    async def writes(self) -> int:
        """Kubernetes writes so far (events included; not the leader's Lease renewals), a monotonic count."""
        return (await self._counts())["writes"]

    async def list_mark(self) -> int:
        return (await self._counts())["instance_lists"]

    async def lists_since(self, mark: int) -> bool | None:
        """Whether kopf listed the instances since ``mark``."""
        return (await self._counts())["instance_lists"] > mark


class RealKube:
    """A real kube-apiserver (``--cluster``: the current KUBECONFIG, e.g. ``make cluster``). The operator
    authenticates as its ServiceAccount, as in production; writes are counted from the server's own
    ``apiserver_request_total`` metric."""

    name = "kube-apiserver"
    WRITE_VERBS = ("POST", "PATCH", "PUT", "DELETE")

    async def list_mark(self) -> int:
        return 0

    async def lists_since(self, mark: int) -> bool | None:
        return None

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
        # The operator's renewals in the `leader-election` priority level, as deploy/ installs it.
        subprocess.run(
            ["kubectl", "apply", "-k", str(ROOT / "deploy" / "flowcontrol")], check=True, timeout=120
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

    async def create_namespace(self, name: str, annotations: dict[str, str]) -> None:
        async with self.access.async_client() as client:
            body = {"metadata": {"name": name, "annotations": annotations}}
            response = await client.post("/api/v1/namespaces", json=body)
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
                # The operator's writes only: its objects and its Events. Not Leases (the leader's renewals,
                # one per retry period whatever the number of instances, and the claims, one per instance
                # created once), nor a node's or a controller's writes (`make cluster NODES=1`).
                and ('group="kiloclaw.kilo.ai"' in line or 'resource="events"' in line)
            ):
                total += int(float(line.rsplit(" ", 1)[1]))
        return total

    @staticmethod
    async def _claim_pages(client: httpx.AsyncClient) -> AsyncIterator[list[dict[str, Any]]]:
        params = {"labelSelector": CLAIM_LABEL_SELECTOR, "limit": "500"}
        while True:
            response = await client.get(LEASES_PATH, params=params)
            response.raise_for_status()
            body = response.json()
            yield body["items"]
            token = (body.get("metadata") or {}).get("continue")
            if not token:
                return
            params = {**params, "continue": token}

    async def clean_up(self, run: str, namespaces: list[str], leases: list[str]) -> None:
        """Delete what one run left, its operators stopped: strip the finalizers of the run's instances and
        retained volumes (no operator is left to release them; their Fly resources were flysim's, gone with
        it) and delete them, then the run's Leases. The namespaces stay (empty): without
        kube-controller-manager a deleted namespace would stay Terminating for good."""
        started = time.monotonic()
        gate = asyncio.Semaphore(16)
        removed = 0
        async with self.access.async_client(timeout=120) as client:

            async def remove(path: str) -> None:
                nonlocal removed
                async with gate:
                    patch = {"metadata": {"finalizers": None}}
                    headers = {"Content-Type": "application/merge-patch+json"}
                    response = await client.patch(path, json=patch, headers=headers)
                    if response.status_code not in (200, 404):
                        raise BenchmarkError(f"cannot strip the finalizers of {path}: {response.text}")
                    response = await client.delete(path)
                    if response.status_code not in (200, 202, 404):
                        raise BenchmarkError(f"cannot delete {path}: {response.text}")
                    removed += 1

            for namespace in namespaces:
                for plural, selector in ((INSTANCE_PLURAL, f"{RUN_LABEL}={run}"), (RETAINED_PLURAL, "")):
                    base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}"
                    response = await client.get(
                        base, params={"labelSelector": selector} if selector else None
                    )
                    response.raise_for_status()
                    names = [item["metadata"]["name"] for item in response.json()["items"]]
                    await asyncio.gather(*(remove(f"{base}/{name}") for name in names))
            for lease in leases:
                await client.delete(f"{LEASES_PATH}/{lease}")
            # The claims the run's instances held: with no operator left to release them they stayed, and a
            # later run's new leader listed every one of them (40,000 after four runs on one cluster).
            ours = set(namespaces)
            claims = [
                lease["metadata"]["name"]
                async for page in self._claim_pages(client)
                for lease in page
                if claim_holder(lease)[0] in ours
            ]
            await asyncio.gather(*(remove_claim(client, gate, name) for name in claims))
            removed += len(claims)
        say(f"cleaned up run {run}: {removed} objects deleted in {time.monotonic() - started:.0f} s")


KubeTarget = KubeProcess | RealKube


async def create_and_wait_running(
    api: httpx.AsyncClient,
    fly: FlyProcess,
    kube: KubeTarget,
    args: argparse.Namespace,
    names: list[tuple[str, str]],
    apps: dict[tuple[str, str], str],
    results: Results,
    ops: Operators,
) -> dict[tuple[str, str], dict[str, Any]]:
    created_at: dict[tuple[str, str], float] = {}
    running_at: dict[tuple[str, str], float] = {}
    limit = asyncio.Semaphore(args.create_concurrency)
    burst: asyncio.Task[None] | None = None
    census: asyncio.Task[dict[str, Any]] | None = None

    async def create(key: tuple[str, str]) -> None:
        namespace, name = key
        async with limit:
            response = await api.post(
                f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{INSTANCE_PLURAL}",
                json=instance_body(namespace, name, apps[key], results.run),
            )
            if response.status_code != 201:
                raise BenchmarkError(f"create {namespace}/{name}: {response.status_code} {response.text}")
            created_at[key] = time.monotonic()

    async def watch_running() -> dict[tuple[str, str], dict[str, Any]]:
        nonlocal burst, census
        deadline = time.monotonic() + args.phase_timeout
        last: dict[tuple[str, str], dict[str, Any]] = {}
        while time.monotonic() < deadline:
            ops.check()
            last = await list_instances(api, results)
            now = time.monotonic()
            seen_running = results.view.first_running if results.view is not None else {}
            for key, status in last.items():
                if status.get("phase") == "Running" and key not in running_at and key in created_at:
                    # The watch's moment when there is one (exact), else this list's (± its interval).
                    running_at[key] = max(seen_running.get(key, now), created_at[key])
                if status.get("phase") == "Failed":
                    raise BenchmarkError(f"{key[0]}/{key[1]} is Failed: {status.get('conditions')}")
            if (
                burst is None
                and args.failovers
                and args.kill_during_burst
                and len(running_at) >= args.kill_during_burst * len(names)
            ):
                burst = asyncio.create_task(burst_failover(api, fly, args, ops.shards[0], last, results))
            killing = bool(args.failovers and args.kill_during_burst)
            if census is None and args.census and not killing and len(running_at) >= len(names) / 2:
                census = asyncio.create_task(ops.shards[0].leader.census("half Running"))
            if (
                len(running_at) == len(names)
                and all(status.get("phase") == "Running" for status in last.values())
                and (burst is None or burst.done())
            ):
                return last
            if burst is not None and burst.done():
                burst.result()  # a failure of the burst's fail-over ends the run here
            await asyncio.sleep(list_interval(args, results))
        phases: dict[str, int] = {}
        for status in last.values():
            phases[str(status.get("phase"))] = phases.get(str(status.get("phase")), 0) + 1
        raise BenchmarkError(
            f"{len(names) - len(running_at)} instances not Running after {args.phase_timeout:.0f} s "
            f"(phases: {phases})"
        )

    fly_before = await fly.counts()
    kube_before = await kube.writes()
    cpu_before = ops.cpu_seconds()
    shard_cpu_before = [shard.cpu_seconds() for shard in ops.shards]
    first = ops.shards[0].leader
    assert first.process is not None
    profiler = (
        Profiler(first.process.pid, first.log.with_name(f"profile-{results.mode}.txt"))
        if args.profile
        else None
    )
    # The API server's side of the burst (a real server only): a CPU profile over its first minute.
    server_profiler = (
        ApiServerProfiler(first.log.with_name(f"apiserver-profile-{results.mode}.pb.gz"), 60)
        if args.profile and isinstance(kube, RealKube)
        else None
    )
    started = time.monotonic()
    watcher = asyncio.create_task(watch_running())
    probe = asyncio.create_task(probe_lease_reads(kube, ops.shards[0].lease, results))
    try:
        await asyncio.gather(*(create(key) for key in names))
        results.create_seconds = time.monotonic() - started
        final = await watcher
        if census is not None:
            results.censuses.append(await census)
    finally:
        watcher.cancel()
        probe.cancel()
        if burst is not None:
            burst.cancel()
    results.all_running_seconds = max(running_at.values()) - started
    results.to_running = [running_at[key] - created_at[key] for key in names]
    results.provision_cpu_seconds = ops.cpu_seconds() - cpu_before
    if profiler is not None:
        results.profile = profiler.stop()
        say(f"profile of the provisioning ({results.mode}):\n{results.profile}")
    if server_profiler is not None:
        results.server_profile = await asyncio.to_thread(server_profiler.summary)
        say(f"profile of the API server in the burst ({results.mode}):\n{results.server_profile}")
    results.provision_fly_routes = route_delta(fly_before, await fly.counts())
    # Minus the benchmark's own creates: what remains is the operator's (status patches, events, annotations).
    results.provision_kube_writes = await kube.writes() - kube_before - len(names)
    if len(ops.shards) > 1:
        for shard, cpu_before_shard in zip(ops.shards, shard_cpu_before, strict=True):
            keys = [key for key in names if ops.shard_of(key[0]) is shard]
            results.shard_rows.append(
                [
                    f"{shard.index} (`{shard.namespaces}`)",
                    str(len(keys)),
                    fmt_seconds(max(running_at[key] for key in keys) - started),
                    fmt_seconds(percentile([running_at[key] - created_at[key] for key in keys], 99)),
                    f"{(shard.cpu_seconds() - cpu_before_shard) / len(keys) * 1000:.0f} ms",
                ]
            )
    return final


async def probe_lease_reads(kube: KubeTarget, lease: str, results: Results) -> None:
    """One GET of the Lease a second on a connection of its own, as a renewal would read it: the worst answer
    time of the API server over the burst (a renewal that takes longer than the renew deadline loses the
    Lease however free the renewing thread is)."""
    async with kube.client(httpx.Limits(max_connections=1)) as client:
        while True:
            began = time.monotonic()
            with contextlib.suppress(httpx.HTTPError):
                await client.get(f"{LEASES_PATH}/{lease}")
            took = time.monotonic() - began
            results.lease_get_max_seconds = max(
                took, 0 if math.isnan(results.lease_get_max_seconds) else results.lease_get_max_seconds
            )
            await asyncio.sleep(1.0)


async def burst_failover(
    api: httpx.AsyncClient,
    fly: FlyProcess,
    args: argparse.Namespace,
    shard: Shard,
    statuses: dict[tuple[str, str], dict[str, Any]],
    results: Results,
) -> None:
    """Mid-burst: SIGKILL the shard's leader and fail the hosts under ``--fail-percent`` of its Running
    instances at once; measured: kill → the standby holds the Lease, → the first of those recoveries started
    (the operator's own ``recovery.startedAt``), → the first instance that was not Running at the kill is."""
    mine = {
        key: status
        for key, status in statuses.items()
        if key[0].startswith(shard.namespaces.rstrip("*")) and status.get("phase") == "Running"
    }
    not_running = {
        key
        for key, status in statuses.items()
        if key[0].startswith(shard.namespaces.rstrip("*")) and status.get("phase") != "Running"
    }
    by_machine = {status["machineId"]: key for key, status in mine.items() if status.get("machineId")}
    candidates = sorted(by_machine)
    random.Random(args.seed + 2).shuffle(candidates)
    target = max(1, round(len(mine) * args.fail_percent / 100))
    results.burst_killed_at_running = sum(1 for s in statuses.values() if s.get("phase") == "Running")
    # Volumes have their daily snapshot (without one a recovery from a dead host waits for a source): every
    # volume of the shard, since a failed host may also carry machines of instances still provisioning.
    await daily_snapshots(
        fly, {k: v for k, v in statuses.items() if k[0].startswith(shard.namespaces.rstrip("*"))}
    )
    killed = shard.leader
    assert killed.process is not None
    killed_wall, killed_mono = time.time(), time.monotonic()
    killed.process.kill()
    shard.leader, shard.standby = shard.standby, killed
    _, affected = await fail_hosts(fly, by_machine, candidates, target, set())
    # Volumes created since the snapshots above (provisioning goes on) had theirs too: without it, an instance
    # provisioning on a failed host waits for its host (no source), correctly, and the run never ends.
    late = [v["id"] for v in await fly.volumes() if not v.get("snapshots")]
    await asyncio.gather(*(fly.add_snapshot(volume_id) for volume_id in late))
    say(f"burst: {len(late)} volumes created since the snapshots got theirs")
    results.burst_affected = len(affected)
    say(
        f"burst: killed {killed.name} at {results.burst_killed_at_running} Running, {len(affected)} hosts' "
        "instances stopped"
    )
    deadline = killed_mono + args.phase_timeout
    while await lease_holder(api, shard.lease) != shard.leader.name:
        if time.monotonic() > deadline:
            raise BenchmarkError(f"the standby did not take over in the burst in {args.phase_timeout:g} s")
        await asyncio.sleep(0.05)
    results.burst_lease = time.monotonic() - killed_mono
    shard.sample_leader()
    await asyncio.to_thread(reap, killed.process)
    killed.start()  # back as the standby, as its pod would
    first_recovery: float | None = None
    resumed: float | None = None
    recovery_started: dict[tuple[str, str], float] = {}
    pending = set(not_running)  # not Running at the kill, and not Running yet
    while time.monotonic() < deadline and (len(recovery_started) < len(affected) or pending):
        current = await list_instances(api, results)
        for key in affected - recovery_started.keys():
            status = current.get(key) or {}
            started_at = parse_time((status.get("recovery") or {}).get("startedAt")) or parse_time(
                (status.get("lastRecovery") or {}).get("startedAt")
            )
            if started_at is not None and started_at >= killed_wall - 1:
                recovery_started[key] = started_at - killed_wall
        for key in list(pending):
            status = current.get(key) or {}
            if status.get("phase") == "Running":
                pending.discard(key)
            ready: dict[str, Any] = next(
                (c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {}
            )
            became = parse_time(ready.get("lastTransitionTime")) if status.get("phase") == "Running" else None
            if became is not None and became >= killed_wall:
                resumed = min(resumed if resumed is not None else math.inf, became - killed_wall)
        if recovery_started:
            first_recovery = min(recovery_started.values())
        await asyncio.sleep(list_interval(args, results))
    results.burst_first_recovery = first_recovery if first_recovery is not None else math.nan
    results.burst_recovery_p99 = percentile(list(recovery_started.values()), 99)
    results.burst_resumed = resumed if resumed is not None else math.nan
    say(
        f"burst fail-over: Lease after {results.burst_lease:.2f} s, first recovery started "
        f"{fmt_seconds(results.burst_first_recovery)} after the kill, provisioning resumed "
        f"{fmt_seconds(results.burst_resumed)} after it"
    )


async def wait_settled(
    args: argparse.Namespace,
    kube: KubeTarget,
    results: Results,
    ops: Operators,
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
        ops.check()
        await asyncio.sleep(0.5)
        now = await kube.writes()
        if now != mark:
            mark, quiet_since = now, time.monotonic()
    results.settle_seconds = quiet_since - started


async def measure_steady_state(
    args: argparse.Namespace,
    fly: FlyProcess,
    kube: KubeTarget,
    results: Results,
    ops: Operators,
) -> None:
    """Requests over a fixed window: the measurement is the window itself, not a wait for a condition."""
    fly_before = await fly.counts()
    kube_before = await kube.writes()
    cpu_before = ops.cpu_seconds()
    started = time.monotonic()
    deadline = started + args.steady_seconds
    while time.monotonic() < deadline:
        ops.check()
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    results.steady_seconds = time.monotonic() - started
    results.steady_cpu_seconds = ops.cpu_seconds() - cpu_before
    results.steady_fly_routes = route_delta(fly_before, await fly.counts())
    results.steady_fly_requests = sum(results.steady_fly_routes.values())
    results.steady_kube_writes = await kube.writes() - kube_before


async def fail_hosts(
    fly: FlyProcess,
    by_machine: dict[str, tuple[str, str]],
    candidates: list[str],
    target: int,
    exclude: set[tuple[str, str]],
) -> tuple[set[str], set[tuple[str, str]]]:
    """Fail hosts under candidates' machines until ``target`` instances (not in ``exclude``) are affected: a
    failed host stops every machine on it. Returns (failed hosts, affected instances)."""
    hosts: set[str] = set()
    affected: set[tuple[str, str]] = set()
    for machine_id in candidates:
        if len(affected) >= target:
            break
        if by_machine[machine_id] in affected or by_machine[machine_id] in exclude:
            continue
        failed, stopped = await fly.fail_host(machine_id)
        hosts.update(failed)
        affected.update(by_machine[m] for m in stopped if m in by_machine and by_machine[m] not in exclude)
    return hosts, affected


async def daily_snapshots(fly: FlyProcess, statuses: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Fly snapshots every volume daily: the way back from a dead host (a fork cannot complete without it)."""
    gate = asyncio.Semaphore(32)

    async def one(volume_id: str) -> None:
        async with gate:
            await fly.add_snapshot(volume_id)

    await asyncio.gather(*(one(s["volumeId"]) for s in statuses.values() if s.get("volumeId")))


async def fail_hosts_and_measure(
    api: httpx.AsyncClient,
    args: argparse.Namespace,
    fly: FlyProcess,
    statuses: dict[tuple[str, str], dict[str, Any]],
    results: Results,
    ops: Operators,
) -> set[tuple[str, str]]:
    by_machine = {status["machineId"]: key for key, status in statuses.items() if status.get("machineId")}
    target = max(1, round(len(statuses) * args.fail_percent / 100))
    candidates = sorted(by_machine)
    random.Random(args.seed).shuffle(candidates)
    await daily_snapshots(fly, statuses)
    failed_wall = time.time()
    failed_mono = time.monotonic()
    hosts, affected = await fail_hosts(fly, by_machine, candidates, target, set())
    results.failed_hosts = len(hosts)
    results.affected = len(affected)
    noticed: dict[tuple[str, str], float] = {}
    detected, recovered = await measure_recoveries(
        api, args, affected, failed_wall, failed_mono, results, ops.check, noticed
    )
    results.noticed = list(noticed.values())
    results.detection = list(detected.values())
    results.recovered = list(recovered.values())
    results.not_detected = len(affected) - len(detected)
    results.not_recovered = len(affected) - len(recovered)
    return affected


async def measure_recoveries(
    api: httpx.AsyncClient,
    args: argparse.Namespace,
    affected: set[tuple[str, str]],
    failed_wall: float,
    failed_mono: float,
    results: Results,
    check: Callable[[], None],
    noticed: dict[tuple[str, str], float] | None = None,
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """Per affected instance: seconds from the failure to ``Recovering`` and to ``Running`` again; and into
    ``noticed``, to the operator's record of the stop (``observedAt`` of a ``flyState`` that is not
    ``started``, written as the stop is seen, before the recovery budget admits the recovery)."""
    noticed = {} if noticed is None else noticed
    detected: dict[tuple[str, str], float] = {}
    recovered: dict[tuple[str, str], float] = {}
    deadline = time.monotonic() + max(args.phase_timeout, 3 * args.poll_running + args.recovery_timeout)
    while time.monotonic() < deadline and len(recovered) < len(affected):
        check()
        current = await list_instances(api, results)
        observed = time.monotonic() - failed_mono
        for key in affected - recovered.keys():
            status = current.get(key) or {}
            recovery = status.get("recovery") or {}
            last_recovery = status.get("lastRecovery") or {}
            # Prefer the operator's own timestamps (exact); the list-poll time is the fallback.
            started = parse_time(recovery.get("startedAt")) or parse_time(last_recovery.get("startedAt"))
            if started is not None and started < failed_wall - 1:
                started = None  # an earlier recovery's (e.g. the burst's), not this failure's
            if key not in detected and (status.get("phase") == "Recovering" or started is not None):
                detected[key] = started - failed_wall if started is not None else observed
            seen_at = parse_time(status.get("observedAt"))
            if (
                key not in noticed
                and status.get("flyState") not in (None, "started")
                and seen_at is not None
                and seen_at >= failed_wall - 1
            ):
                noticed[key] = max(seen_at - failed_wall, 0.0)
            if key in detected:
                noticed[key] = min(noticed.get(key, math.inf), detected[key])
            finished = parse_time(last_recovery.get("finishedAt"))
            if key in detected and status.get("phase") == "Running" and not recovery:
                recovered[key] = max(finished - failed_wall, 0.0) if finished is not None else observed
        # The operator's own timestamps make the measure exact; the list only tells when to stop.
        await asyncio.sleep(list_interval(args, results))
    return detected, recovered


async def measure_cold_start(
    api: httpx.AsyncClient,
    args: argparse.Namespace,
    fly: FlyProcess,
    kube: KubeTarget,
    statuses: dict[tuple[str, str], dict[str, Any]],
    exclude: set[tuple[str, str]],
    ops: Operators,
    results: Results,
) -> None:
    """SIGKILL the leader, fail hosts while no operator runs, and let a new leader start cold (the standby,
    or the restarted replica without one): how soon it notices the machines that stopped while it was down,
    and how hard its first pass hits Fly (requests over ``--cold-start-seconds``, peak per second) and the
    API server. With shards, shard 0 is killed and the hosts under as many instances of the other shards
    fail at the same time: their detection shows what one shard's outage does to the others."""
    shard = ops.shards[0]
    leader, standby = shard.leader, shard.standby
    own = {key: status for key, status in statuses.items() if ops.shard_of(key[0]) is shard}
    others = {key: status for key, status in statuses.items() if ops.shard_of(key[0]) is not shard}
    by_machine = {status["machineId"]: key for key, status in statuses.items() if status.get("machineId")}
    candidates = sorted(m for m in by_machine if by_machine[m] in own)
    random.Random(args.seed + 1).shuffle(candidates)
    target = max(1, round(len(own) * args.fail_percent / 100))
    assert leader.process is not None
    fly_before = sum((await fly.counts()).values())
    kube_before = await kube.writes()
    killed_wall = time.time()
    leader.process.kill()
    await asyncio.to_thread(leader.process.wait)
    failed_wall, failed_mono = time.time(), time.monotonic()
    _, affected = await fail_hosts(fly, by_machine, candidates, target, exclude)
    results.cold_affected = len(affected)
    others_affected: set[tuple[str, str]] = set()
    if others:
        other_candidates = sorted(m for m in by_machine if by_machine[m] in others)
        random.Random(args.seed + 3).shuffle(other_candidates)
        other_failed_wall, other_failed_mono = time.time(), time.monotonic()
        _, others_affected = await fail_hosts(
            fly, by_machine, other_candidates, target, exclude | affected | set(own)
        )
    if standby.process is None:
        leader.start()
        new_leader, new_standby = leader, standby
    else:
        new_leader, new_standby = standby, leader
    await wait_role(new_leader, "leader", args.phase_timeout)
    results.cold_takeover_seconds = time.monotonic() - failed_mono
    shard.leader, shard.standby = new_leader, new_standby
    assert new_leader.process is not None
    profiler = (
        Profiler(new_leader.process.pid, new_leader.log.with_name(f"profile-cold-{results.mode}.txt"))
        if args.profile
        else None
    )
    # Watched from now on, beside the window: the stop is recorded before the recovery budget admits the
    # recovery, and by the window's end most have recovered (the status then shows only the recovery).
    noticed: dict[tuple[str, str], float] = {}
    watching = asyncio.create_task(
        measure_recoveries(api, args, affected, failed_wall, failed_mono, results, ops.check, noticed)
    )
    window_end = time.monotonic() + args.cold_start_seconds
    previous, peak = fly_before, 0
    while time.monotonic() < window_end:
        await asyncio.sleep(1.0)
        total = sum((await fly.counts()).values())
        peak = max(peak, total - previous)
        previous = total
    results.cold_fly_requests = previous - fly_before
    results.cold_peak_fly_per_second = peak
    results.cold_kube_writes = await kube.writes() - kube_before
    if profiler is not None:
        results.cold_profile = profiler.stop()
        say(f"profile of the cold start ({results.mode}):\n{results.cold_profile}")
    detected, _ = await watching
    results.cold_noticed = list(noticed.values())
    results.cold_detection = list(detected.values())
    results.cold_not_detected = len(affected) - len(detected)
    results.cold_first_recovery = min(detected.values(), default=math.nan) + (failed_wall - killed_wall)
    if others_affected:
        other_detected, _ = await measure_recoveries(
            api, args, others_affected, other_failed_wall, other_failed_mono, results, ops.check
        )
        results.cold_other_shards = f"{len(other_detected)} of {len(others_affected)} detected, p99 " + (
            fmt_seconds(percentile(list(other_detected.values()), 99))
        )
    if new_standby is leader and args.failovers:
        leader.start()  # the killed replica comes back as the standby, as its pod would


async def loop_lag(replica: Replica) -> float:
    """The operator's own measure of how far its event loop fell behind (its metrics endpoint)."""
    port = replica.env["KILOCLAW_METRICS_PORT"]
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError:
        return math.nan
    for line in text.splitlines():
        if line.startswith("kiloclaw_event_loop_lag_max_seconds "):
            return float(line.split()[1])
    return math.nan


class Replica:
    """One operator process of the two (leader election); restarted with the same identity after a kill, as
    the container of a pod restarts."""

    def __init__(
        self,
        args: argparse.Namespace,
        fly_url: str,
        kubeconfig: Path,
        workdir: Path,
        name: str,
        namespaces: str,
        lease_name: str,
        census: bool = False,
    ):
        self.name = name
        self.census_mode = census
        self.trace_frames = args.census_trace
        self.censuses = 0
        self.health_port = free_port()
        self.env = operator_env(args, fly_url, kubeconfig, self.health_port, name, namespaces, lease_name)
        self.workdir = workdir
        self.log = workdir / f"operator-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        census = self.census_mode
        command = (
            [sys.executable, str(Path(__file__).with_name("operator_census.py"))]
            if census
            else operator_command()
        )
        env = dict(self.env, KILOCLAW_CENSUS_DIR=str(self.workdir / self.name)) if census else self.env
        if census and self.trace_frames:
            env["KILOCLAW_CENSUS_TRACE"] = str(self.trace_frames)
        if census:
            (self.workdir / self.name).mkdir(exist_ok=True)
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(
                command, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        return self.process

    async def census(self, label: str, timeout: float = 300) -> dict[str, Any]:
        """A heap census of this replica (started with ``census=True``): SIGUSR1, then its JSON report."""
        assert self.process is not None
        self.censuses += 1
        done = self.workdir / self.name / f"census-{self.censuses}.done"
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not done.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise BenchmarkError(f"no census {label} from {self.name} in {timeout:g} s")
            await asyncio.sleep(0.5)
        report: dict[str, Any] = json.loads(
            (self.workdir / self.name / f"census-{self.censuses}.json").read_text()
        )
        say(f"census {label}: {census_summary(report)}")
        return report

    async def role(self) -> str | None:
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                body = (await client.get(f"http://127.0.0.1:{self.health_port}/healthz")).json()
        except (httpx.HTTPError, ValueError):
            return None
        role: str | None = body.get("role")
        return role


def census_summary(report: dict[str, Any]) -> str:
    n = max(1, int(report.get("instances") or 0))
    mib = 2**20
    if "traced" in report:
        lines = "\n".join(
            f"    {size / mib:7.1f} MiB {size / n:8.0f} B/inst {count:8d}  {where}"
            for where, size, count in report["lines"]
        )
        stacks = "\n".join(
            f"    {size / mib:7.1f} MiB {count:8d}\n" + "\n".join(f"        {frame}" for frame in frames)
            for frames, size, count in report["stacks"]
        )
        chains = "\n".join(
            f"    {name}: " + " <- ".join(chain)
            for name, found in report.get("chains", {}).items()
            for chain in found
        )
        garbage = report.get("garbage", {})
        peak = report.get("peak") or {}
        gone = ""
        if peak:
            gone = (
                f"\nthe traced memory's peak so far: {peak['traced'] / mib:.0f} MiB at {peak['at']}; "
                "of it gone since, by line:\n"
                + "\n".join(
                    f"    {size / mib:7.1f} MiB {size / n:8.0f} B/inst {count:8d}  {where}"
                    for where, size, count in peak["gone"]
                )
                + "\nby stack:\n"
                + "\n".join(
                    f"    {size / mib:7.1f} MiB {count:8d}\n" + "\n".join(f"        {f}" for f in frames)
                    for frames, size, count in peak["gone_stacks"]
                )
            )
        return (
            f"a full collection freed {garbage.get('freed', 0) / mib:.1f} MiB ({garbage.get('collected', 0)} "
            f"objects: {garbage.get('types', {})}; Instance models before it: "
            f"{garbage.get('instances_before', 0)}); its cycles:\n"
            + "\n".join(f"    {cycle}" for cycle in garbage.get("cycles", []))
            + "\nwho keeps them:\n"
            f"{chains}\n"
            f"{report['instances']} instances, RSS {report['rss'] / mib:.0f} MiB, traced "
            f"{report['traced'] / mib:.0f} MiB, took {report['seconds']} s; by line:\n{lines}\n"
            f"by stack:\n{stacks}{gone}"
        )
    holders = "; ".join(
        f"{name} {h['bytes'] / mib:.1f} MiB ({h['bytes'] / n / 1000:.2f} KB/instance)"
        for name, h in report["holders"].items()
    )
    pymalloc, glibc = report.get("pymalloc", {}), report.get("glibc", {})
    types = ", ".join(
        f"{t} {v['count']} × = {v['bytes'] / mib:.1f} MiB" for t, v in list(report["types"].items())[:12]
    )
    garbage = report.get("garbage", {})
    waiting = "; ".join(
        f"{place} ×{w['loops']} = {w['bytes'] / mib:.1f} MiB"
        for place, w in list(report.get("loops_waiting_at", {}).items())[:12]
    )
    return (
        f"{report['instances']} instances, RSS {report['rss'] / mib:.0f} MiB; a full collection freed "
        f"{garbage.get('collected', 0)} objects ({garbage.get('used_blocks_freed', 0) / mib:.1f} MiB of "
        f"{garbage.get('tracked_before', 0)} tracked); pymalloc arenas "
        f"{pymalloc.get('arenas_current', 0)} (used blocks {pymalloc.get('used_blocks', 0) / mib:.0f} MiB, "
        f"free blocks {pymalloc.get('free_blocks', 0) / mib:.0f} MiB, unused pools "
        f"{pymalloc.get('unused_pools', 0) / mib:.0f} MiB); glibc heap {glibc.get('heap', 0) / mib:.0f} MiB "
        f"(in use {glibc.get('in_use', 0) / mib:.0f}, free {glibc.get('free', 0) / mib:.0f}, mmapped "
        f"{glibc.get('mmapped', 0) / mib:.0f}); holders: {holders}; types: {types}; "
        f"took {report['seconds']} s; the loops wait at: {waiting}"
    )


@dataclass
class Shard:
    """One operator shard: its namespaces (a kopf glob), its Lease, its two replicas, and a sampler for every
    process that has led it while measured (a leader killed in the burst is succeeded by its standby)."""

    index: int
    namespaces: str
    lease: str
    leader: Replica
    standby: Replica
    samplers: list[ProcessSampler] = field(default_factory=list)

    def sample_leader(self) -> None:
        assert self.leader.process is not None
        sampler = ProcessSampler(self.leader.process.pid)
        sampler.start()
        self.samplers.append(sampler)

    def check(self) -> None:
        assert self.leader.process is not None
        check_operator(self.leader.process, self.leader.log)

    def cpu_seconds(self) -> float:
        return sum(sampler.cpu_seconds() for sampler in self.samplers)

    def peak_rss(self) -> int:
        return max((sampler.peak_rss for sampler in self.samplers), default=0)

    def stop_sampling(self) -> None:
        for sampler in self.samplers:
            sampler.stop()

    def peaks(self) -> str:
        """Each sampled leader's peak RSS and when (which phase of the run made it), and its RSS over time
        (the largest of every 5 s, MiB)."""
        return ", ".join(
            f"pid {sampler.process.pid}: {sampler.peak_rss / 2**20:.0f} MiB at {sampler.peak_at} (over time: "
            + " ".join(
                f"{time.strftime('%H:%M:%S', time.localtime(at))} {rss / 2**20:.0f}"
                for at, rss in sorted(sampler.timeline.items())
            )
            + ")"
            for sampler in self.samplers
        )


class Operators:
    """Every shard's leader, checked and measured together (CPU summed, peak RSS the largest of them)."""

    def __init__(self, shards: list[Shard]) -> None:
        self.shards = shards

    def check(self) -> None:
        for shard in self.shards:
            shard.check()

    def cpu_seconds(self) -> float:
        return sum(shard.cpu_seconds() for shard in self.shards)

    def peak_rss(self) -> int:
        return max(shard.peak_rss() for shard in self.shards)

    def stop_sampling(self) -> None:
        for shard in self.shards:
            shard.stop_sampling()

    def shard_of(self, namespace: str) -> Shard:
        return self.shards[int(namespace.rsplit("-s", 1)[1].split("-", 1)[0])]


async def lease_holder(api: httpx.AsyncClient, lease: str) -> str:
    response = await api.get(f"{LEASES_PATH}/{lease}")
    if response.status_code == 404:
        return ""
    response.raise_for_status()
    holder: str = (response.json().get("spec") or {}).get("holderIdentity") or ""
    return holder


async def measure_failover(
    args: argparse.Namespace,
    api: httpx.AsyncClient,
    kube: KubeTarget,
    shard: Shard,
    results: Results,
) -> None:
    """SIGKILL the shard's leader ``--failovers`` times, then SIGTERM it once; the killed replica restarts as
    the standby each time."""
    leader, standby = shard.leader, shard.standby
    for round_ in range(args.failovers + 1):
        graceful = round_ == args.failovers
        await wait_role(standby, "standby", args.phase_timeout)
        assert leader.process is not None
        since = await kube.list_mark()
        killed = time.monotonic()
        if graceful:
            leader.process.send_signal(signal.SIGTERM)
        else:
            leader.process.kill()
        took_lease = served = math.nan
        deadline = killed + args.phase_timeout
        serving_known = isinstance(kube, KubeProcess)
        while time.monotonic() < deadline and (
            math.isnan(took_lease) or (serving_known and math.isnan(served))
        ):
            now = time.monotonic() - killed
            if math.isnan(took_lease) and await lease_holder(api, shard.lease) == standby.name:
                took_lease = now
            if not math.isnan(took_lease) and math.isnan(served) and await kube.lists_since(since):
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


def rows_of(results: Results) -> list[tuple[str, str]]:
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
    cold_note = ""
    if results.cold_not_detected:
        cold_note = f" ({results.cold_not_detected} of {results.cold_affected} never detected)"
    return [
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
        ("Operator CPU / instance to reach `Running`", f"{results.provision_cpu_seconds / n * 1000:.1f} ms"),
        ("All `Running` → operator's last Kubernetes write", fmt_seconds(results.settle_seconds)),
        (
            f"Fly requests / instance / minute, steady ({results.steady_seconds:.0f} s)",
            f"{per_minute:.3f}",
        ),
        ("Kubernetes writes / instance / minute, steady", f"{kube_per_minute:.2f}"),
        ("Operator CPU at steady state", f"{steady_cpu:.1f} % of one core"),
        ("Operator peak RSS", f"{results.peak_rss_bytes / 2**20:.0f} MiB"),
        (
            "Operator event loop's worst lag (create → all `Running`)",
            fmt_seconds(results.max_loop_lag_seconds),
        ),
        (
            "API server: slowest Lease GET during the burst (1 / s)",
            fmt_seconds(results.lease_get_max_seconds),
        ),
        ("Operator CPU seconds (create → recovered)", f"{results.cpu_seconds:.1f} s"),
        ("Fly 429 answers (whole run)", str(results.rate_limited)),
        (
            "Failed hosts → affected instances",
            f"{results.failed_hosts} → {results.affected} ({results.affected / n * 100:.1f} %)",
        ),
        ("Failure → stop recorded (`flyState`), p50", fmt_seconds(percentile(results.noticed, 50))),
        ("Failure → stop recorded (`flyState`), p99", fmt_seconds(percentile(results.noticed, 99))),
        ("Failure → `Recovering`, p50", fmt_seconds(percentile(results.detection, 50)) + detection_note),
        ("Failure → `Recovering`, p99", fmt_seconds(percentile(results.detection, 99))),
        ("Failure → `Running` again, p50", fmt_seconds(percentile(results.recovered, 50)) + recovery_note),
        ("Failure → `Running` again, p99", fmt_seconds(percentile(results.recovered, 99))),
        (
            f"Burst: leader SIGKILL at {results.burst_killed_at_running} `Running` → standby holds the Lease",
            fmt_seconds(results.burst_lease),
        ),
        (
            f"Burst: SIGKILL → first recovery started ({results.burst_affected} stopped at the kill; p99)",
            f"{fmt_seconds(results.burst_first_recovery)} ({fmt_seconds(results.burst_recovery_p99)})",
        ),
        ("Burst: SIGKILL → provisioning resumed (next `Ready`)", fmt_seconds(results.burst_resumed)),
        ("Cold start: leader killed → new leader", fmt_seconds(results.cold_takeover_seconds)),
        ("Cold start: leader killed → first recovery started", fmt_seconds(results.cold_first_recovery)),
        (
            "Cold start: stopped while down → stop recorded, p50 / p99",
            f"{fmt_seconds(percentile(results.cold_noticed, 50))} / "
            f"{fmt_seconds(percentile(results.cold_noticed, 99))}",
        ),
        (
            "Cold start: stopped while down → `Recovering`, p50",
            fmt_seconds(percentile(results.cold_detection, 50)) + cold_note,
        ),
        (
            "Cold start: stopped while down → `Recovering`, p99",
            fmt_seconds(percentile(results.cold_detection, 99)),
        ),
        (
            "Cold start: Fly requests in the first window (peak / s)",
            f"{results.cold_fly_requests} ({results.cold_peak_fly_per_second})",
        ),
        ("Cold start: Kubernetes writes in the first window", str(results.cold_kube_writes)),
        *(
            [
                (
                    "Cold start of shard 0: hosts failed under the other shards → `Recovering`",
                    results.cold_other_shards,
                )
            ]
            if results.cold_other_shards
            else []
        ),
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


def table(runs: list[Results]) -> str:
    """One column per observation mode, side by side."""
    columns = [rows_of(results) for results in runs]
    labels = [label for label, _ in columns[0]]
    heads = ["Measure", *(f"{results.mode}" for results in runs)]
    cells = [[label, *(column[i][1] for column in columns)] for i, label in enumerate(labels)]
    widths = [max(len(row[c]) for row in [heads, *cells]) for c in range(len(heads))]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
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


def results_section(runs: list[Results], args: argparse.Namespace, table_text: str) -> str:
    details = []
    for results in runs:
        routes = ", ".join(f"`{r}` {c}" for r, c in results.steady_fly_routes.items()) or "none"
        provision = ", ".join(f"`{r}` {c}" for r, c in results.provision_fly_routes.items()) or "none"
        lists = results.list_seconds
        details.append(
            f"- **{results.mode}**: Fly requests by route until all were `Running`: {provision}. "
            f"Steady state: {routes}. Benchmark list calls: {len(lists)}, median "
            f"{fmt_seconds(percentile(lists, 50))}, max {fmt_seconds(max(lists) if lists else math.nan)}."
        )
    command = (
        f"tests/tools/benchmark.py{' --cluster' if args.cluster else ''} --instances {args.instances} "
        f"--namespaces {args.namespaces} --modes {','.join(args.modes)} "
        f"--steady-seconds {args.steady_seconds:g} --fail-percent {args.fail_percent:g} "
        f"--instances-per-app {args.instances_per_app} --failovers {args.failovers} "
        f"--poll-running {args.poll_running:g} --poll-busy {args.poll_busy:g} --poll-idle {args.poll_idle:g} "
        f"--audit {args.audit:g} --shards {args.shards} --kill-during-burst {args.kill_during_burst:g}"
        + (f" --lease {args.lease}" if args.lease else "")
    )
    start, end = RESULTS_MARKERS["kube-apiserver" if args.cluster else "kubesim"]
    server = "a real kube-apiserver (make cluster)" if args.cluster else "kubesim (the emulated API)"
    for results in runs:
        if results.shard_rows:
            heads = [
                "Shard",
                "Instances",
                "First create → all `Running`",
                "Create → `Running` p99",
                "Operator CPU / instance to reach `Running`",
                "Peak RSS",
            ]
            details.append(
                f"\nPer shard ({results.mode}):\n\n| "
                + " | ".join(heads)
                + " |\n|"
                + "---|" * len(heads)
                + "\n"
                + "\n".join("| " + " | ".join(row) + " |" for row in results.shard_rows)
            )
    detail_text = "\n".join(details)
    profiles = (
        "".join(
            f"\n\nProfile of the operator while provisioning ({r.mode}, py-spy):\n\n```\n{r.profile}\n```"
            for r in runs
            if r.profile
        )
        + "".join(
            f"\n\nProfile of the API server over the burst's first minute ({r.mode}, pprof):\n\n```\n"
            f"{r.server_profile}\n```"
            for r in runs
            if r.server_profile
        )
        + "".join(
            f"\n\nProfile of the new leader over the cold start's window ({r.mode}, py-spy):\n\n```\n"
            f"{r.cold_profile}\n```"
            for r in runs
            if r.cold_profile
        )
    )
    return f"""{start}
## Latest run against {server}

- Date: {runs[0].started_at.strftime("%Y-%m-%d %H:%M UTC")}
- Machine: {machine_info()}; load average before the run {args.load_before}
- Command: `{command}`
- Operator settings: running poll {args.poll_running:g} s, busy poll {args.poll_busy:g} s, idle poll \
{args.poll_idle:g} s (each ±10 % jitter), Fly wait call {args.wait_call} s, recovery timeout \
{args.recovery_timeout:g} s; feed: defaults (sweep every 2 s, overlap 10 s), audit {args.audit:g} s.
- flysim (own process, Fly's rate limits on): machine start {args.start_delay:g} s, stop \
{args.stop_delay:g} s; {args.hosts_per_region or max(3, 2 * args.instances)} hosts per region. The API \
server: {"kube-apiserver" if args.cluster else "kubesim in its own process"}.

{table_text}

{detail_text}{profiles}
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


async def run_mode(args: argparse.Namespace, kube: KubeTarget, workdir: Path, results: Results) -> None:
    """One observation mode from scratch: fresh flysim (and kubesim), operator replicas, all measurements."""
    args.mode = results.mode
    fly = FlyProcess(args, workdir)
    try:
        await fly.wait_ready()
        await run_benchmark(args, fly, kube, workdir, results)
        results.rate_limited = await fly.rate_limited()
    finally:
        await fly.aclose()


async def run_benchmark(
    args: argparse.Namespace,
    fly: FlyProcess,
    kube: KubeTarget,
    workdir: Path,
    results: Results,
) -> None:
    kubeconfig = await asyncio.to_thread(kube.start, workdir)
    # Each run has namespaces, instance labels and Leases of its own, and its operators watch only its
    # namespaces: a real API server keeps an earlier run's instances (and deleted namespaces stay Terminating
    # without kube-controller-manager); they must neither be adopted nor listed.
    prefix = f"bench-{results.run}"
    namespaces = [f"{prefix}-s{index % args.shards}-{index:03d}" for index in range(args.namespaces)]
    names = [(namespaces[index % len(namespaces)], f"inst-{index:05d}") for index in range(args.instances)]
    # One sandbox per user, one Fly app per account: the operator's adoption look-ups list the app's machines
    # and volumes, so sharing apps would make them grow with the instances per app.
    apps = {key: f"acct-bench-{index // args.instances_per_app:05d}" for index, key in enumerate(names)}
    for namespace in namespaces:
        # Each namespace bound to the apps of its instances (tenancy.py), as the cluster admin binds them.
        bound = sorted({app for (ns, _), app in apps.items() if ns == namespace})
        await kube.create_namespace(namespace, binding(*bound))
    shards = []
    for index in range(args.shards):
        scope, lease = f"{prefix}-s{index}-*", f"kiloclaw-{prefix}-s{index}"
        replicas = [
            Replica(
                args, fly.base_url, kubeconfig, workdir, f"s{index}-{x}", scope, lease, census=args.census
            )
            for x in ("a", "b")
        ]
        shards.append(Shard(index, scope, lease, replicas[0], replicas[1]))
    ops = Operators(shards)
    first = shards[0].leader
    try:
        for shard in shards:
            shard.leader.start()
            shard.sample_leader()
        for shard in shards:
            assert shard.leader.process is not None
            await wait_operator_ready(shard.leader.health_port, shard.leader.process, shard.leader.log)
            await wait_role(shard.leader, "leader", 60)
            if args.failovers:
                shard.standby.start()
        limits = httpx.Limits(max_connections=args.create_concurrency + 4)
        async with kube.client(limits) as api, kube.client(httpx.Limits(max_connections=2)) as watching:
            results.view = InstanceWatch(watching, results.run)
            results.view.start()
            await asyncio.wait_for(results.view.synced.wait(), 60)
            say(
                f"creating {args.instances} instances in {args.namespaces} namespaces, {args.shards} shard(s)"
            )
            statuses = await create_and_wait_running(api, fly, kube, args, names, apps, results, ops)
            results.max_loop_lag_seconds = max([await loop_lag(shard.leader) for shard in shards])
            if args.census:
                results.censuses.append(await shards[0].leader.census("all Running"))
            say(f"all Running after {results.all_running_seconds:.1f} s; waiting for the operator to settle")
            await wait_settled(args, kube, results, ops)
            say(
                f"settled after {results.settle_seconds:.1f} s more; "
                f"steady state for {args.steady_seconds:g} s"
            )
            await measure_steady_state(args, fly, kube, results, ops)
            say(f"failing hosts under {args.fail_percent:g} % of the instances")
            affected = await fail_hosts_and_measure(api, args, fly, statuses, results, ops)
            if args.census:
                results.censuses.append(await shards[0].leader.census("after the recoveries"))
            results.cpu_seconds = ops.cpu_seconds()
            ops.stop_sampling()
            results.peak_rss_bytes = ops.peak_rss()
            for index, shard in enumerate(shards):
                say(f"shard {index} leaders' peak RSS: {shard.peaks()}")
            for row, shard in zip(results.shard_rows, shards, strict=False):
                row.append(f"{shard.peak_rss() / 2**20:.0f} MiB")
            say(f"cold start: SIGKILL the leader, fail hosts under {args.fail_percent:g} % while it is down")
            await measure_cold_start(api, args, fly, kube, statuses, affected, ops, results)
            await results.view.aclose()
            results.view = None
        if args.failovers:
            say(f"fail-over: SIGKILL the leader {args.failovers} times, then SIGTERM it")
            async with kube.client(httpx.Limits(max_connections=4)) as api:
                await measure_failover(args, api, kube, shards[0], results)
    finally:
        if results.view is not None:
            await results.view.aclose()
            results.view = None
        ops.stop_sampling()
        if not results.peak_rss_bytes:
            results.peak_rss_bytes = ops.peak_rss()
        for shard in shards:
            for replica in (shard.leader, shard.standby):
                if replica.process is not None:
                    stop_process(replica.process)
        say(f"operator log: {first.log} ({first.log.stat().st_size / 2**20:.1f} MiB)")
        if isinstance(kube, RealKube) and not args.keep:
            await kube.clean_up(results.run, namespaces, [shard.lease for shard in shards])


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _terminate(signum: int, _frame: object) -> None:
    # Unwind through every finally block so that the operator subprocess is stopped too.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    args.load_before = " / ".join(f"{load:.2f}" for load in os.getloadavg())
    began_at = datetime.now(UTC)
    runs: list[Results] = []
    try:
        for mode in args.modes:
            results = Results(
                instances=args.instances,
                namespaces=args.namespaces,
                started_at=began_at,
                mode=mode,
                run=f"{mode[:4]}{datetime.now(UTC):%H%M%S}",
            )
            began = time.monotonic()
            workdir = Path(tempfile.mkdtemp(prefix=f"kiloclaw-bench-{mode}-"))
            say(f"--- mode {mode} (work directory {workdir})")
            kube: KubeTarget = RealKube() if args.cluster else KubeProcess(workdir)
            try:
                asyncio.run(run_mode(args, kube, workdir, results))
            finally:
                kube.stop()
            results.total_seconds = time.monotonic() - began
            runs.append(results)
            print(table([results]), flush=True)
            if not args.no_write:
                # After each mode, so that a long run that fails later still leaves what it measured.
                write_results(args.output, results_section(runs, args, table(runs)))
    except BenchmarkError as exc:
        say(f"benchmark failed: {exc}")
        return 1
    table_text = table(runs)
    print(table_text)
    print(json.dumps({r.mode: {"fly_routes_steady": r.steady_fly_routes} for r in runs}))
    if not args.no_write:
        write_results(args.output, results_section(runs, args, table_text))
        say(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
