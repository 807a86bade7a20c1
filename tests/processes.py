"""The operator as a process of its own (``python -m kiloclaw_operator run``) against the simulators
running in threads of the test process: the one implementation of starting it, stopping it and reading
its /metrics.

Leader election and chaos use ``harness.OperatorProcess`` (a replica with a Lease identity); this module
serves the tests that want one plain ``run`` process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from builders import instance_body
from flysim import FlySimulator
from harness import CRDS, FLY_TOKEN, ROOT, bind_app, free_port
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, VERSION
from kubesim import KubeSim

__all__ = [
    "clean_env",
    "create_instance",
    "free_port",
    "operator_env",
    "simulators",
    "start_operator",
    "stop",
    "wait_for_metrics",
]

SETTINGS_PREFIXES = ("KILOCLAW_", "FLY_")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the operator's settings or a kubeconfig, plus the Fly token."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_PREFIXES) and k != "KUBECONFIG"}
    return {**base, "FLY_API_TOKEN": FLY_TOKEN, **extra}


def operator_env(kubeconfig: Path, fly_url: str, **overrides: str) -> dict[str, str]:
    """The environment of a `run` process: short poll intervals and metrics and health on free ports."""
    settings = {
        "KUBECONFIG": str(kubeconfig),
        "FLY_API_BASE_URL": fly_url,
        "KILOCLAW_POLL_BUSY_SECONDS": "0.2",
        "KILOCLAW_POLL_RUNNING_SECONDS": "0.5",
        "KILOCLAW_METRICS_PORT": str(free_port()),
        "KILOCLAW_HEALTH_PORT": str(free_port()),
    }
    return clean_env(**{**settings, **overrides})


def start_operator(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``kiloclaw-operator run`` (or another command) with stdout and stderr in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kiloclaw_operator", *(args or ("run",))],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def stop(process: subprocess.Popen[Any], sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> None:
    """Ask the process to stop; kill it when it has not within ``timeout``."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def simulators(*namespaces: str, crds: bool = True) -> Iterator[tuple[KubeSim, FlySimulator]]:
    """kubesim and flysim in threads, with the KiloClaw CRDs (unless ``crds=False``) and the namespaces."""
    kube, fly = KubeSim(), FlySimulator(token=FLY_TOKEN)
    kube.start_in_thread()
    fly.start_in_thread()
    try:
        if crds:
            kube.load_crds([CRDS])
        for namespace in namespaces:
            kube.create_namespace(namespace)
        yield kube, fly
    finally:
        kube.stop_thread()
        fly.stop_thread()


def create_instance(
    kube: KubeSim, namespace: str, name: str, app: str, sandbox: str | None = None
) -> dict[str, Any]:
    """A KiloClawInstance written straight into kubesim (as `kubectl apply` would), in a namespace bound to
    its app (as the cluster admin binds it)."""
    bind_app(kube, namespace, app)
    spec = {"flyApp": app, **({"sandboxId": sandbox} if sandbox else {})}
    return kube.create_object(
        GROUP, VERSION, INSTANCE_PLURAL, instance_body(name, namespace, **spec), namespace=namespace
    )


def wait_for_metrics(url: str, process: subprocess.Popen[bytes], line: str, timeout: float = 30) -> str:
    """The text of ``url`` once it has ``line``, scraped while the operator process lives."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        assert process.poll() is None, "the operator exited"
        try:
            text = httpx.get(url, timeout=2).text
        except httpx.HTTPError:
            text = ""
        if line in text.splitlines():
            return text
        time.sleep(0.2)
    raise AssertionError(f"{line!r} never appeared in {url}:\n{text[-2000:]}")
