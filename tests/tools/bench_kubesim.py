"""kubesim in a process of its own for the benchmark (not sharing a core with the benchmark.s own
loop), with a small control endpoint that reports what the benchmark counts: the operator's writes (not the
leader's Lease renewals) and how often the instances were listed.

``python tests/tools/bench_kubesim.py --crds crds --kubeconfig PATH --ready-file PATH [--namespace NS ...]``:
writes ``{"url": ..., "control": ...}`` to the ready file once both listen; serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections import deque
from pathlib import Path
from typing import Any

from aiohttp import web

from kiloclaw_operator.models import INSTANCE_PLURAL
from kubesim import KubeSim

WRITE_VERBS = frozenset({"create", "update", "patch", "delete"})


class CountingLog(deque[Any]):
    """Stands in for kubesim's request log: counts as records arrive instead of keeping millions of them."""

    def __init__(self) -> None:
        super().__init__(maxlen=1000)
        self.total = 0
        self.writes = 0
        self.instance_lists = 0

    def append(self, record: Any) -> None:
        self.total += 1
        if record.verb in WRITE_VERBS and record.resource != "leases":
            self.writes += 1
        if record.verb == "list" and record.resource == INSTANCE_PLURAL:
            self.instance_lists += 1
        super().append(record)


async def serve(args: argparse.Namespace) -> None:
    sim = KubeSim(request_log_size=1000)
    log = CountingLog()
    sim.request_log = log
    url = await sim.start("127.0.0.1", 0)
    sim.load_crds([args.crds])
    for namespace in args.namespace:
        sim.create_namespace(namespace)
    sim.write_kubeconfig(args.kubeconfig)

    async def counts(_: web.Request) -> web.Response:
        return web.json_response(
            {"requests": log.total, "writes": log.writes, "instance_lists": log.instance_lists}
        )

    async def namespace(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        sim.create_namespace(request.match_info["name"], annotations=body.get("annotations"))
        return web.json_response({"ok": True})

    control = web.Application()
    control.add_routes([web.get("/counts", counts), web.post("/namespaces/{name}", namespace)])
    runner = web.AppRunner(control, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    args.ready_file.write_text(json.dumps({"url": url, "control": f"http://127.0.0.1:{port}"}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()
    await sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--crds", type=Path, required=True)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--namespace", action="append", default=[])
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
