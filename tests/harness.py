"""The end-to-end stack for tests: flysim and kubesim on loopback (each in its own thread) and the real
operator (kopf, in-process, in a thread with its own event loop) with short intervals.

One stack per pytest worker process; tests isolate themselves by namespace. ``crash_operator`` cancels the
operator mid-flight (as a SIGKILL would: in-flight Fly calls may or may not have landed) and
``start_operator`` brings a fresh one up against the same state.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

import realcluster
from builders import FLY_TOKEN, TEST_APPS, binding, instance_body, namespace_body
from flysim import FlySimulator, SimTimings
from kiloclaw_operator.config import Settings
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, RETAINED_PLURAL, VERSION
from kiloclaw_operator.run import run_operator
from kiloclaw_operator.tenancy import FLY_APPS_ANNOTATION
from kubesim import KubeSim

ROOT = Path(__file__).resolve().parent.parent


CRDS = ROOT / "crds"
T = TypeVar("T")

_namespace_counter = itertools.count(1)


def bind_app(kube: KubeSim, namespace: str, app: str) -> None:
    """Add ``app`` to the namespace's binding (creating the namespace if needed), as the admin would."""
    existing = kube.get_object("", "v1", "namespaces", None, namespace) or {}
    annotations = (existing.get("metadata") or {}).get("annotations") or {}
    apps = [a for a in annotations.get(FLY_APPS_ANNOTATION, "").split(",") if a]
    kube.create_namespace(namespace, annotations=binding(*dict.fromkeys([*apps, app])))


def test_settings(fly_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "fly_api_token": FLY_TOKEN,
        "fly_api_base_url": fly_url,
        "default_regions": ["iad", "ord", "cdg"],
        "poll_running_seconds": 0.3,
        "poll_busy_seconds": 0.1,
        "poll_idle_seconds": 0.5,
        "recovery_timeout_seconds": 20,
        "retention_seconds": 3600,
        "retained_check_seconds": 0.3,
        # Long enough for a test that mints as the operator does (create, then the provenance) on a loaded
        # machine; the refusal stories wait it out.
        "retained_provenance_grace_seconds": 4,
        "retry_backoff_min_seconds": 0.1,
        "retry_backoff_max_seconds": 1.0,
        "wait_call_seconds": 1,
        "metrics_port": 0,
        "health_port": 0,
        # Small, so that the end-to-end tests provision through the bound with others waiting at it.
        "provisioning_concurrency": 2,
        # A requested stop gets this long to come back as a migration; a waiting instance looks again this
        # often; the brake is off (one shared stack sees many stops) except where a test turns it on.
        "migration_grace_seconds": 2.0,
        "source_recheck_seconds": 0.3,
        "brake_pause_stops": 1_000_000,
        "brake_pause_share": 1.0,
        "recovery_begin_rate": 100.0,
        # Where deploy/ grants the Lease (the operator runs as its ServiceAccount against a real cluster).
        "lease_namespace": "kiloclaw-system",
    }
    values.update(overrides)
    return Settings(**values)


class OperatorThread:
    """The real operator (kopf) in a thread with its own event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, name="operator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._task = self._loop.create_task(
                run_operator(
                    self.settings,
                    stop_flag=self.stop_flag,
                    ready_flag=self.ready_flag,
                    liveness=False,
                    watch_server_timeout=30,
                )
            )
            self._loop.run_until_complete(self._task)
        except BaseException as exc:  # a crash test cancels the task on purpose
            self.error = exc
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def wait_ready(self, timeout: float) -> None:
        if not self.ready_flag.wait(timeout):
            raise AssertionError(f"operator not ready after {timeout}s: {self.error!r}")

    def stop(self, timeout: float) -> None:
        self.stop_flag.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "operator did not stop"

    def crash(self, timeout: float) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "operator did not die"
        # kopf waits for the stop flag in an executor thread; unreleased, it blocks interpreter exit forever.
        self.stop_flag.set()


class ClusterUnavailable(Exception):
    """``make e2e`` asked for a real cluster but none is reachable; the suite is skipped with this text."""


class Stack:
    """flysim + an API server + the operator. The API server is kubesim, or with ``cluster=True`` the
    current kube context (``make e2e``): then ``kube`` is None and tests that need the emulator skip."""

    def __init__(self, workdir: Path, *, cluster: bool = False) -> None:
        self.fly = FlySimulator(token=FLY_TOKEN, timings=SimTimings(start_delay=0.05, stop_delay=0.05))
        self.cluster = cluster
        self._kube = None if cluster else KubeSim()
        self.workdir = workdir
        self._operator: OperatorThread | None = None
        self.settings: Settings | None = None
        self.api: httpx.AsyncClient
        #: A client that acts as the operator's ServiceAccount (on kubesim: the admin client), for tests that
        #: do what only the operator may (mint a retained volume).
        self.operator_api: httpx.AsyncClient
        self._access: realcluster.ClusterAccess | None = None
        #: The namespaces this stack made (their objects are removed when it closes, on a real cluster).
        self._namespaces: list[str] = []

    def get_object_now(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object as the API server holds it, read synchronously: usable from any thread (e.g. flysim's
        request callbacks), against kubesim or the real API server."""
        if self._access is None:
            return self.kube.get_object(GROUP, VERSION, plural, namespace, name)
        with self._access.client(timeout=10) as client:
            response = client.get(self.path(plural, namespace, name))
        if response.status_code == 404:
            return None
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def list_all(self, plural: str) -> list[dict[str, Any]]:
        """Every object of ``plural`` in every namespace."""
        response = await self.api.get(f"/apis/{GROUP}/{VERSION}/{plural}")
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    def new_client(self, timeout: float | None = None) -> httpx.AsyncClient:
        """Another admin client of the API server (its own connections, e.g. for a long watch)."""
        if self._access is not None:
            client = self._access.async_client()
            client.timeout = httpx.Timeout(timeout)
            return client
        return httpx.AsyncClient(base_url=str(self.api.base_url), timeout=timeout)

    @property
    def kube(self) -> KubeSim:
        """The emulated API server; tests that reach into it do not run against a real cluster."""
        if self._kube is None:
            import pytest

            pytest.skip("needs the emulated Kubernetes API (not available with a real cluster)")
        return self._kube

    async def start(self, *, operator: bool = True) -> None:
        """``operator=False``: the API server and flysim only (the operator runs elsewhere: its image)."""
        if self._kube is None:
            self.api, self._access, token = await _cluster_client(self.workdir)
            self.operator_api = self._access.as_token(token).async_client(timeout=10)
        else:
            self._kube.start_in_thread()
            self._kube.load_crds([CRDS])
            self._kube.create_namespace("kiloclaw-system")  # the operator's own namespace (its Lease)
            kubeconfig = self._kube.write_kubeconfig(self.workdir / "kubeconfig")
            os.environ["KUBECONFIG"] = str(kubeconfig)
            self.api = httpx.AsyncClient(
                base_url=self._kube.url, timeout=10, headers={"User-Agent": "kiloclaw-tests"}
            )
            self.operator_api = self.api
        self.fly.start_in_thread()
        if operator:
            await self.start_operator()

    async def close(self) -> None:
        await self.stop_operator()
        if self._access is not None:
            await self._remove_leftovers()
        if self.operator_api is not self.api:
            await self.operator_api.aclose()
        await self.api.aclose()
        if self._kube is not None:
            self._kube.stop_thread()
        self.fly.stop_thread()

    # --- the operator ---------------------------------------------------------------------------------

    async def start_operator(self, **overrides: Any) -> None:
        """Run the operator in its own thread and event loop, as a deployment would run it in its own process
        (kopf cancels every task of its loop when it stops, which must not include the tests)."""
        assert self._operator is None, "operator already running"
        self.settings = test_settings(self.fly.base_url, **overrides)
        operator = OperatorThread(self.settings)
        operator.start()
        self._operator = operator
        await asyncio.to_thread(operator.wait_ready, 30)

    async def stop_operator(self) -> None:
        if self._operator is not None:
            await asyncio.to_thread(self._operator.stop, 60)
            self._operator = None

    async def crash_operator(self) -> None:
        """Kill the operator where it stands: no graceful shutdown, no step gets to finish."""
        if self._operator is not None:
            await asyncio.to_thread(self._operator.crash, 60)
            self._operator = None

    async def restart_operator(self, **overrides: Any) -> None:
        await self.crash_operator()
        await self.start_operator(**overrides)

    # --- Kubernetes API ---------------------------------------------------------------------------------

    async def create_namespace(self, prefix: str = "t", *, bound: bool = True) -> str:
        """A fresh namespace, bound (``bound``) to the test apps and ``acct-<name>`` as a cluster admin binds
        a tenant's namespace."""
        name = f"{prefix}-{os.getpid()}-{next(_namespace_counter)}"
        body = namespace_body(name, *TEST_APPS, f"acct-{name}") if bound else namespace_body(name)
        response = await self.api.post("/api/v1/namespaces", json=body)
        assert response.status_code in (200, 201), response.text
        self._namespaces.append(name)
        return name

    async def _remove_leftovers(self) -> None:
        """On a real cluster a namespace stays (deleting it would leave it `Terminating` for good: no
        kube-controller-manager), and so would the instances and retained volumes of this run, which the
        next run's operator would pick up and retry against Fly resources that only this run's flysim had
        (a second `make e2e` on one cluster timed out on them). The operator has stopped: their finalizers
        are stripped and they are deleted."""
        merge = {"Content-Type": "application/merge-patch+json"}
        for namespace in self._namespaces:
            for plural in (INSTANCE_PLURAL, RETAINED_PLURAL):
                listed = await self.api.get(self.path(plural, namespace))
                if listed.status_code != 200:
                    continue
                for item in listed.json().get("items", []):
                    path = self.path(plural, namespace, item["metadata"]["name"])
                    await self.api.patch(path, json={"metadata": {"finalizers": None}}, headers=merge)
                    await self.api.delete(path)

    async def tenant_client(self, namespace: str, role: str = "kiloclaw-edit") -> httpx.AsyncClient:
        """A client for a tenant of ``namespace``: a ServiceAccount there, bound to the ClusterRole ``role``
        in that namespace only (a RoleBinding), with a TokenRequest token. Real API server only: kubesim has
        no authorizer."""
        if self._access is None:
            import pytest

            pytest.skip("needs a real API server with RBAC (make cluster && make e2e)")
        account = {"metadata": {"name": "tenant"}}
        response = await self.api.post(f"/api/v1/namespaces/{namespace}/serviceaccounts", json=account)
        assert response.status_code in (201, 409), response.text
        binding_body = {
            "metadata": {"name": f"tenant-{role}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": namespace}],
        }
        response = await self.api.post(
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings", json=binding_body
        )
        assert response.status_code in (201, 409), response.text
        with self._access.client(timeout=10) as admin:
            token = await asyncio.to_thread(realcluster.service_account_token, admin, namespace, "tenant")
        return self._access.as_token(token).async_client(timeout=10, user_agent="kiloclaw-tenant")

    @staticmethod
    def path(plural: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}"
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def create_instance(self, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
        body = instance_body(name, namespace, **spec)
        response = await self.api.post(self.path(INSTANCE_PLURAL, namespace), json=body)
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result

    async def get_instance(self, namespace: str, name: str) -> dict[str, Any] | None:
        response = await self.api.get(self.path(INSTANCE_PLURAL, namespace, name))
        if response.status_code == 404:
            return None
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def patch_instance(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        response = await self.api.patch(
            self.path(INSTANCE_PLURAL, namespace, name),
            json=patch,
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def delete_instance(self, namespace: str, name: str) -> None:
        response = await self.api.delete(self.path(INSTANCE_PLURAL, namespace, name))
        assert response.status_code in (200, 202, 404), response.text

    async def list_retained(self, namespace: str) -> list[dict[str, Any]]:
        response = await self.api.get(self.path(RETAINED_PLURAL, namespace))
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    async def events(self, namespace: str, name: str | None = None) -> list[dict[str, Any]]:
        response = await self.api.get(f"/api/v1/namespaces/{namespace}/events")
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json()["items"]
        if name is not None:
            items = [e for e in items if e.get("involvedObject", {}).get("name") == name]
        return items

    async def event_reasons(self, namespace: str, name: str | None = None) -> list[str]:
        return [e["reason"] for e in await self.events(namespace, name)]

    async def events_with(
        self, namespace: str, name: str | None, *reasons: str, timeout: float = 10
    ) -> list[dict[str, Any]]:
        """The events once every one of ``reasons`` is among them: the operator posts events from a queue
        after the status writes a test waits for, so on a real API server they land a moment later."""

        async def check() -> list[dict[str, Any]] | None:
            events = await self.events(namespace, name)
            seen = {e.get("reason") for e in events}
            return events if all(reason in seen for reason in reasons) else None

        return await eventually(check, timeout=timeout, what=f"events {reasons} of {namespace}/{name}")

    async def wait_instance(
        self,
        namespace: str,
        name: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 15,
        what: str = "condition",
    ) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            body = await self.get_instance(namespace, name)
            return body if body is not None and predicate(body) else None

        return await eventually(check, timeout=timeout, what=f"{namespace}/{name}: {what}")

    async def wait_phase(self, namespace: str, name: str, phase: str, timeout: float = 15) -> dict[str, Any]:
        return await self.wait_instance(
            namespace, name, lambda b: status(b).get("phase") == phase, timeout, what=f"phase {phase}"
        )

    async def wait_gone(self, namespace: str, name: str, timeout: float = 15) -> None:
        async def check() -> bool | None:
            return True if await self.get_instance(namespace, name) is None else None

        await eventually(check, timeout=timeout, what=f"{namespace}/{name} deleted")

    # --- Fly ------------------------------------------------------------------------------------------

    def live_machines(self, app: str = "acct-test", sandbox_id: str | None = None) -> list[dict[str, Any]]:
        machines = [m for m in self.fly.machines(app) if m["state"] not in ("destroyed", "destroying")]
        if sandbox_id is not None:
            machines = [
                m
                for m in machines
                if (m.get("config") or {}).get("metadata", {}).get("kiloclaw_sandbox_id") == sandbox_id
            ]
        return machines

    def live_volumes(self, app: str = "acct-test", name: str | None = None) -> list[dict[str, Any]]:
        volumes = [v for v in self.fly.volumes(app) if v["state"] not in ("destroyed", "pending_destroy")]
        if name is not None:
            volumes = [v for v in volumes if v["name"] == name]
        return volumes


OPERATOR_NAMESPACE = "kiloclaw-system"
OPERATOR_SERVICE_ACCOUNT = "kiloclaw-operator"
OPERATOR_IDENTITY = tuple(
    ROOT / "deploy" / "base" / name
    for name in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml", "user-roles.yaml")
)
#: The admission policies of the tenancy model (the real API server runs them; kubesim does not).
ADMISSION = ROOT / "deploy" / "admission"


async def _kubectl(*args: str, kubeconfig: str | None = None) -> None:
    env = dict(os.environ, **({"KUBECONFIG": kubeconfig} if kubeconfig else {}))
    process = await asyncio.create_subprocess_exec(
        "kubectl", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise ClusterUnavailable(f"kubectl {' '.join(args)} failed: {stderr.decode().strip()}")


async def _cluster_client(workdir: Path) -> tuple[httpx.AsyncClient, realcluster.ClusterAccess, str]:
    """An admin client for the current kube context, after checking it answers; installs the CRDs and the
    operator's ServiceAccount and RBAC from deploy/, and points KUBECONFIG at a kubeconfig that authenticates
    as that ServiceAccount (a TokenRequest token), so the real authorizer enforces least privilege on the
    operator while the tests keep their admin client."""
    admin_kubeconfig = realcluster.kubeconfig_path()
    try:
        access = realcluster.load_access(admin_kubeconfig)
    except (realcluster.NoCluster, OSError, ValueError, KeyError) as exc:
        raise ClusterUnavailable(str(exc)) from exc
    client = access.async_client(timeout=10)
    try:
        (await client.get("/version")).raise_for_status()
    except httpx.HTTPError as exc:
        await client.aclose()
        raise ClusterUnavailable(
            f"the current kube context ({access.server}) does not answer: {exc}"
        ) from exc
    try:
        await _kubectl("apply", "--server-side", "--force-conflicts", "-k", str(CRDS))
        for crd in ("kiloclawinstances", "kiloclawretainedvolumes"):
            await _kubectl("wait", "--for=condition=Established", f"crd/{crd}.{GROUP}")
            # Established is not yet served: a fresh CRD's storage answers 429 "(re)initializing" for a while,
            # which kopf backs off from; start the operator only once a list succeeds.
            for _ in range(100):
                if (await client.get(f"/apis/{GROUP}/{VERSION}/{crd}")).status_code == 200:
                    break
                await asyncio.sleep(0.2)
        for manifest in OPERATOR_IDENTITY:
            await _kubectl("apply", "--server-side", "--force-conflicts", "-f", str(manifest))
        await _kubectl("apply", "--server-side", "--force-conflicts", "-k", str(ADMISSION))
        with access.client() as sync_admin:
            token = await asyncio.to_thread(
                realcluster.service_account_token, sync_admin, OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT
            )
    except BaseException:
        await client.aclose()
        raise
    operator_kubeconfig = realcluster.write_token_kubeconfig(
        workdir / "operator-kubeconfig", admin_kubeconfig, token
    )
    os.environ["KUBECONFIG"] = str(operator_kubeconfig)
    return client, access, token


def status(body: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = body.get("status") or {}
    return result


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in status(body).get("conditions", []):
        if cond["type"] == type_:
            result: dict[str, Any] = cond
            return result
    return {}


class LogRecords(logging.Handler):
    """The INFO and higher records of a logger while ``capturing`` (the Stack's operator runs in a thread of
    this process)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, namespace: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "namespace", None) == namespace]

    @contextmanager
    def capturing(self, logger_name: str) -> Iterator[Any]:
        logger = logging.getLogger(logger_name)
        level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)


async def eventually(
    check: Callable[[], Awaitable[T | None]], timeout: float = 15, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns something other than None or False (never a fixed sleep): a check
    written as a plain comparison must not pass on its first False."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        result = await check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.2)


# --- the operator as its own process (as a pod runs it): leader election and chaos -------------------------

LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL = "coordination.k8s.io", "v1", "leases"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def operator_env(fly_url: str, kubeconfig: Path, identity: str, **overrides: str) -> dict[str, str]:
    """The environment of one operator replica: short intervals (as test_settings) and a short Lease."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KILOCLAW_", "FLY_"))}
    env.update(
        {
            "KUBECONFIG": str(kubeconfig),
            "FLY_API_TOKEN": FLY_TOKEN,
            "FLY_API_BASE_URL": fly_url,
            "KILOCLAW_POLL_RUNNING_SECONDS": "0.3",
            "KILOCLAW_POLL_BUSY_SECONDS": "0.1",
            "KILOCLAW_POLL_IDLE_SECONDS": "0.5",
            "KILOCLAW_RETAINED_CHECK_SECONDS": "0.3",
            "KILOCLAW_RETRY_BACKOFF_MIN_SECONDS": "0.1",
            "KILOCLAW_RETRY_BACKOFF_MAX_SECONDS": "1",
            "KILOCLAW_WAIT_CALL_SECONDS": "1",
            "KILOCLAW_MIGRATION_GRACE_SECONDS": "2",
            "KILOCLAW_SOURCE_RECHECK_SECONDS": "0.5",
            "KILOCLAW_LEASE_IDENTITY": identity,
            "KILOCLAW_LEASE_DURATION_SECONDS": "3",
            "KILOCLAW_LEASE_RENEW_DEADLINE_SECONDS": "2",
            "KILOCLAW_LEASE_RETRY_PERIOD_SECONDS": "0.5",
            "KILOCLAW_METRICS_PORT": str(free_port()),
            "KILOCLAW_HEALTH_PORT": str(free_port()),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    env.update(overrides)
    return env


class OperatorProcess:
    """``kiloclaw-operator run`` in its own process, configured only by its environment; ``kill`` is a real
    SIGKILL (nothing gets to finish, the Lease is not released)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.identity = env["KILOCLAW_LEASE_IDENTITY"]
        self.health_port = int(env["KILOCLAW_HEALTH_PORT"])
        self.log_path = log_path
        self.process: Any = None

    def start(self) -> OperatorProcess:
        import subprocess
        import sys

        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kiloclaw_operator", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: the process, its event loop and its Lease renewals freeze (a stalled node, a long GC)."""
        import signal

        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        self.process.send_signal(signal.SIGCONT)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait for the exit code."""
        import signal
        import subprocess

        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code: int = self.process.returncode
        return code

    async def role(self) -> str | None:
        """``leader`` / ``standby`` from the health endpoint; None while it does not answer."""
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                response = await client.get(f"http://127.0.0.1:{self.health_port}/healthz")
            role: str = response.json()["role"]
            return role
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def lease_holder(kube: KubeSim, namespace: str = "default", name: str = "kiloclaw-operator") -> str:
    lease = kube.get_object(LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL, namespace, name) or {}
    holder: str = (lease.get("spec") or {}).get("holderIdentity") or ""
    return holder
