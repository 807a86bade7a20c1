"""``python -m kubesim --port 6443 --crds crds/ --kubeconfig .dev/kubeconfig``: serve until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path

from kubesim.server import KubeSim


async def _serve(args: argparse.Namespace) -> None:
    sim = KubeSim()
    url = await sim.start(args.host, args.port)
    names = sim.load_crds(args.crds)
    for namespace in args.namespace:
        sim.create_namespace(namespace)
    if args.kubeconfig is not None:
        sim.write_kubeconfig(args.kubeconfig)
    print(f"kubesim serving {url} with CRDs: {', '.join(names) or 'none'}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Also SIGTERM (containers, make) and SIGINT when started in the background, where it is ignored.
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kubesim", description="Emulated Kubernetes API server (plain HTTP)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--crds", type=Path, action="append", default=[], help="CRD file or directory (repeatable)"
    )
    parser.add_argument(
        "--namespace", action="append", default=[], help="extra namespace to create (repeatable)"
    )
    parser.add_argument("--kubeconfig", type=Path, help="write a kubeconfig pointing at the server here")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
