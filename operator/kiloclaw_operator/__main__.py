"""kiloclaw-operator: run the KiloClaw operator against the current cluster and Fly (run).

Trying it on an embedded emulated Kubernetes API and Fly simulator is ``kiloclaw-dev``, from the kiloclaw-dev
distribution (operator/kiloclaw-dev/), which carries the simulators.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from collections.abc import Sequence

from . import allocator
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
    tuned = allocator.tune()
    tls_read_buffer = allocator.shrink_tls_read_buffers()
    if warning:
        logger.warning(warning)
    serve_metrics(settings.metrics_port, "KILOCLAW_METRICS_PORT")
    logger.info(
        "starting",
        extra={
            "fly_api": settings.fly_api_base_url,
            "namespaces": settings.namespaces or "all",
            "allocator": tuned or "default",
            "tls_read_buffer": tls_read_buffer or "default",
        },
    )
    try:
        asyncio.run(run_operator(settings))
    except LeadershipLost as exc:
        # Another replica may lead now; the pod restarts as a standby.
        logger.error("stopping: %s", exc)
        raise SystemExit(1) from None


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
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
