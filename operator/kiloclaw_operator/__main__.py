"""kiloclaw-operator: run the KiloClaw operator against the current cluster and Fly (run), or try it on an
embedded emulated Kubernetes API and Fly simulator (dev).

The dev command is the only place that imports the simulators, and only when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from collections.abc import Sequence

from .config import ConfigError, Settings, load_settings
from .leadership import LeadershipLost
from .logs import configure_json_logging
from .preflight import StartupError, check_cluster
from .run import exit_with, run_operator, serve_metrics

logger = logging.getLogger("kiloclaw.operator")


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
    try:
        warning = check_cluster()
    except StartupError as exc:
        exit_with(str(exc))
    configure_json_logging(logging.DEBUG if args.verbose else logging.INFO)
    # Thousands of instances make a large, long-lived heap: with the default thresholds every 700 allocations
    # start a collection and full collections rescan it all, stalling the event loop for seconds at 10,000
    # instances (long enough to miss a Lease renewal). Fewer, larger young collections; full ones stay rare.
    gc.set_threshold(50_000, 20, 100)
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
