"""`python -m flysim --port N [--token T] [--host H]`: serve the simulator until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from .simulator import FlySimulator, RateLimits
from .state import SimTimings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="flysim", description="Fly Machines API simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4280)
    parser.add_argument("--token", default="test-token", help="bearer token clients must send")
    parser.add_argument(
        "--control-token", default=None, help="bearer token for /_sim/ routes (default: none)"
    )
    parser.add_argument("--regions", default="iad,ord,cdg,ams,sjc", help="comma-separated region codes")
    parser.add_argument(
        "--org", default=None, help="org slug served by /v1/orgs/{slug}/machines (default: any)"
    )
    parser.add_argument("--start-delay", type=float, default=0.5)
    parser.add_argument("--stop-delay", type=float, default=0.5)
    parser.add_argument("--destroy-delay", type=float, default=0.5)
    parser.add_argument("--hydrate-delay", type=float, default=0.5)
    parser.add_argument("--destroyed-retention", type=float, default=300.0)
    parser.add_argument("--org-propagation-delay", type=float, default=0.0)
    parser.add_argument("--hosts-per-region", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--request-log-size", type=int, default=10000)
    parser.add_argument(
        "--no-rate-limits", action="store_true", help="do not enforce Fly's rate limits (on by default)"
    )
    args = parser.parse_args(argv)
    timings = SimTimings(
        start_delay=args.start_delay,
        stop_delay=args.stop_delay,
        destroy_delay=args.destroy_delay,
        hydrate_delay=args.hydrate_delay,
        destroyed_retention=args.destroyed_retention,
        org_propagation_delay=args.org_propagation_delay,
    )
    simulator = FlySimulator(
        token=args.token,
        regions=[r.strip() for r in args.regions.split(",") if r.strip()],
        timings=timings,
        org_slug=args.org,
        control_token=args.control_token,
        hosts_per_region=args.hosts_per_region,
        seed=args.seed,
        request_log_size=args.request_log_size,
        rate_limits=None if args.no_rate_limits else RateLimits(),
    )

    async def serve() -> None:
        await simulator.start(args.host, args.port)
        print(f"flysim serving {simulator.base_url}/v1 (token {args.token!r})", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await simulator.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
