"""``kiloclaw-operator`` — ``run`` against the current cluster and Fly; ``dev`` on the embedded stack.

``dev`` is the only place that imports the simulators, and only when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from collections.abc import Sequence

import kopf
from prometheus_client import start_http_server

from .config import ConfigError, Settings, load_settings
from .kube import KubeClient
from .leadership import LeadershipLost
from .logs import configure_json_logging

logger = logging.getLogger("kiloclaw.operator")


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

    async def serve(stop: asyncio.Event | threading.Event | None, liveness_endpoint: str | None) -> None:
        memo = kopf.Memo(settings=settings, watch_server_timeout=watch_server_timeout)
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
    from .leadership import LeaderElector, LeaseConfig, run_elected

    kube = KubeClient(await handlers.login_outside_kopf())
    try:
        await run_elected(
            LeaderElector(kube, LeaseConfig.from_settings(settings)),
            lambda stop: serve(stop, None),
            stop_flag=stop_flag,
            health_port=settings.health_port if liveness else None,
        )
    finally:
        await kube.aclose()


def _settings_or_exit(*, require_token: bool, **overrides: object) -> Settings:
    try:
        return load_settings(require_token=require_token, **overrides)
    except ConfigError as exc:
        print(f"kiloclaw-operator: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def command_run(args: argparse.Namespace) -> None:
    overrides: dict[str, object] = {}
    if args.namespaces is not None:
        overrides["KILOCLAW_NAMESPACES"] = args.namespaces
    settings = _settings_or_exit(require_token=True, **overrides)
    configure_json_logging(logging.DEBUG if args.verbose else logging.INFO)
    start_http_server(settings.metrics_port)
    logger.info(
        "starting",
        extra={"fly_api": settings.fly_api_base_url, "namespaces": settings.namespaces or "all"},
    )
    try:
        asyncio.run(run_operator(settings))
    except LeadershipLost as exc:
        # Another replica may lead now; the pod restarts as a standby.
        logger.error("stopping: %s", exc)
        raise SystemExit(1) from None


def command_dev(args: argparse.Namespace) -> None:
    from .dev import run_dev

    run_dev(port=args.port, fly_port=args.fly_port, workdir=args.workdir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiloclaw-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run against the current kube context and the Fly API (env config)")
    run.add_argument("--namespaces", help="comma list of namespaces to watch (KILOCLAW_NAMESPACES)")
    run.add_argument("--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=command_run)
    dev = sub.add_parser("dev", help="embedded emulated Kubernetes API + Fly simulator + operator")
    dev.add_argument("--port", type=int, default=int(os.environ.get("KILOCLAW_DEV_KUBE_PORT", "6443")))
    dev.add_argument("--fly-port", type=int, default=int(os.environ.get("KILOCLAW_DEV_FLY_PORT", "4280")))
    dev.add_argument("--workdir", default=".dev", help="where the kubeconfig and logs go")
    dev.set_defaults(func=command_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
