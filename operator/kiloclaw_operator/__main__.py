"""kiloclaw-operator: run the KiloClaw operator against the current cluster and Fly (run), or try it on an
embedded emulated Kubernetes API and Fly simulator (dev).

The dev command is the only place that imports the simulators, and only when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

import kopf
from prometheus_client import start_http_server

from .config import ConfigError, Settings, load_settings
from .kube import KubeClient
from .leadership import LeadershipLost
from .logs import configure_json_logging
from .preflight import StartupError, check_cluster

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


def _exit(message: str, code: int = 1) -> NoReturn:
    print(f"kiloclaw-operator: {message}", file=sys.stderr)
    raise SystemExit(code)


def serve_metrics(port: int, variable: str) -> None:
    """Prometheus metrics on ``port``; a busy port is one line naming it and how to choose another."""
    try:
        start_http_server(port)
    except OSError as exc:
        _exit(f"cannot serve metrics on port {port} ({exc.strerror}): choose another with {variable}=PORT")


def command_run(args: argparse.Namespace) -> None:
    overrides: dict[str, object] = {}
    if args.namespaces is not None:
        overrides["KILOCLAW_NAMESPACES"] = args.namespaces
    settings = _settings_or_exit(require_token=True, **overrides)
    try:
        warning = check_cluster()
    except StartupError as exc:
        _exit(str(exc))
    configure_json_logging(logging.DEBUG if args.verbose else logging.INFO)
    if warning:
        logger.warning(warning)
    serve_metrics(settings.metrics_port, "KILOCLAW_METRICS_PORT")
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

    run_dev(
        port=args.port,
        fly_port=args.fly_port,
        workdir=args.workdir,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiloclaw-operator", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run against the current kube context and the Fly API (env config)",
        description="Run the operator against the current kube context (KUBECONFIG, or the pod's service "
        "account) and the Fly Machines API. Configuration comes from the environment (FLY_API_TOKEN, "
        "KILOCLAW_*; see the README); an invalid value or an unusable cluster stops it with one line.",
    )
    run.add_argument(
        "--namespaces",
        help="comma list of namespaces or globs to watch, !glob excludes (KILOCLAW_NAMESPACES; default all)",
    )
    run.add_argument("--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=command_run)
    dev = sub.add_parser(
        "dev",
        help="embedded emulated Kubernetes API + Fly simulator + operator",
        description="Start the emulated Kubernetes API and the Fly simulator on loopback, run the operator "
        "against them, apply examples/ and narrate a host failure and its recovery.",
    )
    dev.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("KILOCLAW_DEV_KUBE_PORT", "6443")),
        help="port of the emulated Kubernetes API on 127.0.0.1 (default %(default)s; KILOCLAW_DEV_KUBE_PORT)",
    )
    dev.add_argument(
        "--fly-port",
        type=int,
        default=int(os.environ.get("KILOCLAW_DEV_FLY_PORT", "4280")),
        help="port of the Fly simulator on 127.0.0.1 (default %(default)s; KILOCLAW_DEV_FLY_PORT)",
    )
    dev.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("KILOCLAW_METRICS_PORT", "9090")),
        help="port of the operator's /metrics (default %(default)s; KILOCLAW_METRICS_PORT)",
    )
    dev.add_argument(
        "--health-port",
        type=int,
        default=int(os.environ.get("KILOCLAW_HEALTH_PORT", "8080")),
        help="port of the operator's /healthz (default %(default)s; KILOCLAW_HEALTH_PORT)",
    )
    dev.add_argument("--workdir", default=".dev", help="where the kubeconfig and logs go")
    dev.set_defaults(func=command_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
