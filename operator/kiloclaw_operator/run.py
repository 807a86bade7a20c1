"""Running the operator: kopf in the current event loop (behind the leader election), and the metrics
endpoint. Used by ``kiloclaw-operator run`` and ``dev`` (``__main__``, ``dev.py``) and by the tests."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

import kopf
from prometheus_client import start_http_server

from .config import Settings
from .kube import KubeClient


def exit_with(message: str, code: int = 1) -> NoReturn:
    print(f"kiloclaw-operator: {message}", file=sys.stderr)
    raise SystemExit(code)


async def run_operator(
    settings: Settings,
    *,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    liveness: bool = True,
    watch_server_timeout: int = 300,
) -> None:
    """Run the kopf operator in the current event loop until ``stop_flag`` is set (or forever); with leader
    election (the default), only while this process holds the Lease (leadership.py)."""
    from . import handlers  # registers the handlers in kopf's default registry

    async def serve(
        stop: asyncio.Event | threading.Event | None,
        liveness_endpoint: str | None,
        fence: Callable[[], bool] | None = None,
    ) -> None:
        memo = kopf.Memo(settings=settings, watch_server_timeout=watch_server_timeout, fence=fence)
        await kopf.operator(
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=liveness_endpoint,
            stop_flag=stop,
            ready_flag=ready_flag,
            memo=memo,
        )

    if not settings.leader_election:
        await serve(stop_flag, f"http://0.0.0.0:{settings.health_port}/healthz" if liveness else None)
        return
    from .leadership import ElectionLoop, LeaderElector, LeaseConfig, run_elected

    # The Lease client lives on the election loop (a thread of its own) and is used and closed there only.
    election = ElectionLoop().start()
    kube = KubeClient(await handlers.login_outside_kopf())
    elector = LeaderElector(kube, LeaseConfig.from_settings(settings))
    try:
        await run_elected(
            elector,
            lambda stop: serve(stop, None, elector.acting),
            election=election,
            loop_stall_seconds=settings.loop_stall_seconds,
            stop_flag=stop_flag,
            health_port=settings.health_port if liveness else None,
        )
    finally:
        await election.run(kube.aclose())
        election.stop()


def serve_metrics(port: int, variable: str) -> None:
    """Prometheus metrics on ``port``; a busy port is one line naming it and how to choose another."""
    try:
        start_http_server(port)
    except OSError as exc:
        exit_with(
            f"cannot serve metrics on port {port} ({exc.strerror}): choose another with {variable}=PORT"
        )
