"""``kiloclaw-dev``: the embedded default stack, for trying the operator on a laptop.

Starts the emulated Kubernetes API (kubesim) and the Fly simulator (flysim) on loopback, writes a kubeconfig,
runs the real operator against them, applies ``examples/`` and narrates what happens: the instance is
provisioned, then a simulated host failure stops its machine and the operator recovers it. It keeps running
afterwards so that you can use ``kubectl`` against it. The CRDs and examples are the repository's, carried
in this package.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from flysim import FlySimulator, SimTimings
from kiloclaw_operator.config import Settings, load_settings
from kiloclaw_operator.fly import vocabulary as fly_vocabulary
from kiloclaw_operator.logs import configure_json_logging
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, RETAINED_PLURAL, VERSION
from kiloclaw_operator.run import run_operator, serve_metrics
from kubesim import KubeSim

DEV_TOKEN = "dev-token"


def _packaged(folder: str) -> Path:
    """crds/ or examples/ as this package carries them (links to the repository's own in a clone)."""
    return Path(str(importlib.resources.files(__package__ or "kiloclaw_dev") / folder))


def _say(message: str) -> None:
    stamp = f"[dev {time.strftime('%H:%M:%S')}]"
    if sys.stdout.isatty():
        stamp = f"\033[1m{stamp}\033[0m"
    print(f"{stamp} {message}", flush=True)


def _port_free(port: int, host: str) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _check_ports(ports: list[tuple[int, str, str, str]]) -> None:
    """One line naming a busy port and the flag that chooses another (a second ``make dev``, say)."""
    for port, host, what, flag in ports:
        if port and not _port_free(port, host):
            print(
                f"kiloclaw-dev: port {port} ({what}) is in use, perhaps by another `make dev`: "
                f"choose another with {flag}",
                file=sys.stderr,
            )
            raise SystemExit(1)


def run_dev(
    *,
    port: int,
    fly_port: int,
    workdir: str,
    metrics_port: int = 9090,
    health_port: int = 8080,
    demo_failure: bool = True,
) -> None:
    _check_ports(
        [
            (port, "127.0.0.1", "emulated Kubernetes API", "--port (or KILOCLAW_DEV_KUBE_PORT)"),
            (fly_port, "127.0.0.1", "Fly simulator", "--fly-port (or KILOCLAW_DEV_FLY_PORT)"),
            (metrics_port, "0.0.0.0", "operator /metrics", "--metrics-port (or KILOCLAW_METRICS_PORT)"),
            (health_port, "0.0.0.0", "operator /healthz", "--health-port (or KILOCLAW_HEALTH_PORT)"),
        ]
    )
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # The operator logs JSON on stderr as in production; the narration goes to stdout.
    configure_json_logging(logging.INFO)

    fly = FlySimulator(
        token=DEV_TOKEN,
        timings=SimTimings(start_delay=1.5, stop_delay=0.5, destroy_delay=0.5, hydrate_delay=1.0),
    )
    fly.start_in_thread(port=fly_port)
    kube = KubeSim()
    kube.start_in_thread(port=port)
    kube.load_crds([_packaged("crds")])
    kubeconfig = kube.write_kubeconfig(work / "kubeconfig")
    os.environ["KUBECONFIG"] = str(kubeconfig)
    settings = load_settings(
        require_token=False,
        fly_api_token=DEV_TOKEN,
        fly_api_base_url=fly.base_url,
        poll_running_seconds=2,
        poll_busy_seconds=0.5,
        poll_idle_seconds=5,
        recovery_timeout_seconds=120,
        retained_check_seconds=5,
        metrics_port=metrics_port,
        health_port=health_port,
    )
    serve_metrics(settings.metrics_port, "--metrics-port")
    _say(f"emulated Kubernetes API on {kube.url}, Fly simulator on {fly.base_url}")
    _say(
        f"operator metrics on http://127.0.0.1:{settings.metrics_port}/metrics, "
        f"liveness on http://127.0.0.1:{settings.health_port}/healthz"
    )
    _say(f"kubeconfig written to {kubeconfig}")
    try:
        asyncio.run(_dev(settings, kube.url, fly, _packaged("examples"), kubeconfig, demo_failure))
    except KeyboardInterrupt:
        _say("stopped")
    finally:
        kube.stop_thread()
        fly.stop_thread()


async def _dev(
    settings: Settings, kube_url: str, fly: FlySimulator, examples: Path, kubeconfig: Path, demo_failure: bool
) -> None:
    # The narrator exists before kopf starts: kopf cancels every task created after it, when it stops.
    narrator = asyncio.create_task(_narrate(kube_url, fly, examples, kubeconfig, demo_failure))
    try:
        await run_operator(settings, liveness=True)
    finally:
        narrator.cancel()


async def _apply_examples(api: httpx.AsyncClient, examples: Path) -> list[tuple[str, str]]:
    instances: list[tuple[str, str]] = []
    for name in ("00-namespace.yaml", "instance.yaml", "instance-minimal.yaml"):
        for doc in yaml.safe_load_all((examples / name).read_text()):
            if not isinstance(doc, dict):
                continue
            meta = doc["metadata"]
            if doc["kind"] == "Namespace":
                response = await api.post("/api/v1/namespaces", json=doc)
            else:
                namespace = meta.get("namespace", "default")
                response = await api.post(
                    f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{INSTANCE_PLURAL}", json=doc
                )
                instances.append((namespace, meta["name"]))
            if response.status_code not in (200, 201, 409):
                raise SystemExit(f"applying examples/{name} failed: {response.status_code} {response.text}")
    _say("applied examples/ (namespace tenants, instances " + ", ".join(n for _, n in instances) + ")")
    return instances


async def _narrate(
    kube_url: str, fly: FlySimulator, examples: Path, kubeconfig: Path, demo_failure: bool
) -> None:
    async with httpx.AsyncClient(base_url=kube_url, timeout=10) as api:
        await asyncio.sleep(1.0)  # let kopf list the (empty) cluster first
        instances = await _apply_examples(api, examples)
        namespace, name = instances[0]
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{INSTANCE_PLURAL}/{name}"
        last: tuple[Any, ...] = ()
        failed_at: float | None = None
        running_since: float | None = None
        while True:
            body = (await api.get(path)).json()
            status = body.get("status") or {}
            seen = (
                status.get("phase"),
                status.get("flyState"),
                status.get("region"),
                status.get("machineId"),
            )
            if seen != last:
                last = seen
                _say(
                    f"{namespace}/{name}: phase={seen[0]} flyState={seen[1]} "
                    f"region={seen[2]} machine={seen[3]}"
                )
            if status.get("phase") == "Running" and status.get("flyState") == fly_vocabulary.STARTED:
                running_since = running_since or time.monotonic()
            if demo_failure and failed_at is None and running_since and time.monotonic() - running_since > 3:
                fly.add_snapshot(status["volumeId"])
                _say(
                    f"took a snapshot of volume {status['volumeId']} (so the old volume is kept as a "
                    "retained volume after the recovery)"
                )
                _say(f"simulating a host failure under machine {status['machineId']} (flysim fail_host)")
                fly.fail_host(machine_id=status["machineId"])
                failed_at = time.monotonic()
            last_recovery = status.get("lastRecovery") or {}
            if failed_at is not None and last_recovery and not status.get("recovery"):
                _say(
                    f"recovery {last_recovery.get('outcome')} in {last_recovery.get('durationSeconds')} s: "
                    f"{last_recovery.get('message')}; retained volume: {last_recovery.get('retainedVolume')}"
                )
                retained = (
                    await api.get(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{RETAINED_PLURAL}")
                ).json()
                for item in retained.get("items", []):
                    _say(f"retained volume {item['metadata']['name']} until {item['spec']['retainUntil']}")
                break
            if not demo_failure and running_since:
                break
            await asyncio.sleep(0.3)
        _print_next_steps(kubeconfig, fly.base_url, namespace, name)


def _print_next_steps(kubeconfig: Path, fly_url: str, namespace: str, name: str) -> None:
    rel = os.path.relpath(kubeconfig)
    print(
        f"""
The operator keeps running (Ctrl-C stops everything). Next, in another terminal:

  export KUBECONFIG={rel}
  kubectl kiloclaw list -A                       # every instance; "!" marks those that need you
  kubectl kiloclaw status {name} -n {namespace}          # the card: phase, recovery, retained volumes, Events
  kubectl kiloclaw retained -A                   # retained volumes and their time left
  kubectl get kci -A -w                          # printer columns, live
  kubectl patch kci {name} -n {namespace} --type merge -p '{{"spec":{{"state":"Stopped"}}}}'

  # cause trouble through the Fly simulator (README, "The Fly simulator's /_sim routes"):
  MACHINE=$(kubectl get kci {name} -n {namespace} -o jsonpath='{{.status.machineId}}')
  curl -s -X POST {fly_url}/_sim/hosts/fail -d "{{\\"machine_id\\": \\"$MACHINE\\"}}"
  curl -s -X POST {fly_url}/_sim/capacity/exhaust -d '{{"region": "ord", "kind": "volumes"}}'
  curl -s -X POST {fly_url}/_sim/faults -d '{{"route": "POST /v1/apps/*/volumes", "status": 503, "count": 3}}'
""",
        file=sys.stdout,
        flush=True,
    )
