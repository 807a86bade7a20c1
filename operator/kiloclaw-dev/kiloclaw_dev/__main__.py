"""kiloclaw-dev: try the KiloClaw operator on an embedded emulated Kubernetes API and Fly simulator.

A command of its own, in the distribution that carries the simulators: the operator's wheel and image never
carry them, so ``kiloclaw-operator`` offers only what it can run.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from .stack import run_dev


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiloclaw-dev",
        description="Start the emulated Kubernetes API and the Fly simulator on loopback, run the operator "
        "against them, apply the examples and narrate a host failure and its recovery.",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("KILOCLAW_DEV_KUBE_PORT", "6443")),
        help="port of the emulated Kubernetes API on 127.0.0.1 (default %(default)s; KILOCLAW_DEV_KUBE_PORT)",
    )
    parser.add_argument(
        "--fly-port",
        type=int,
        default=int(os.environ.get("KILOCLAW_DEV_FLY_PORT", "4280")),
        help="port of the Fly simulator on 127.0.0.1 (default %(default)s; KILOCLAW_DEV_FLY_PORT)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("KILOCLAW_METRICS_PORT", "9090")),
        help="port of the operator's /metrics (default %(default)s; KILOCLAW_METRICS_PORT)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=int(os.environ.get("KILOCLAW_HEALTH_PORT", "8080")),
        help="port of the operator's /healthz (default %(default)s; KILOCLAW_HEALTH_PORT)",
    )
    parser.add_argument("--workdir", default=".dev", help="where the kubeconfig and logs go")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_dev(
        port=args.port,
        fly_port=args.fly_port,
        workdir=args.workdir,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
    )


if __name__ == "__main__":
    main()
