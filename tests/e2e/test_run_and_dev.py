"""``kiloclaw-operator run`` and ``kiloclaw-dev`` as a new user meets them: one line and a non-zero exit when
the cluster is missing or a port is busy, kubeconfigs with exec credential plugins, and a dev stack that
serves /metrics and /healthz, logs JSON and ends its demo with a retained volume."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from flysim import FlySimulator
from harness import CRDS, ROOT
from kiloclaw_operator.models import GROUP, INSTANCE_PLURAL, VERSION
from kubesim import KubeSim
from processes import (
    clean_env,
    create_instance,
    free_port,
    operator_env,
    simulators,
    start_operator,
    stop,
)
from test_kubectl_plugin import exec_user, fake_exec_plugin, write_kubeconfig

# OS processes of the operator and the dev stack: `make stories` (run by `make e2e`), not `make test`.
pytestmark = pytest.mark.slow


def run_command(
    env: dict[str, str], *args: str, module: str = "kiloclaw_operator"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def wait_for(
    check: Callable[[], bool], what: str, process: subprocess.Popen[bytes], timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert process.poll() is None, f"the process exited while waiting for {what}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def cluster() -> Iterator[tuple[KubeSim, FlySimulator]]:
    with simulators(crds=False) as both:
        yield both


# --- run: what is missing, in one line ------------------------------------------------------------------


def test_run_without_a_kubeconfig_says_so_in_one_line_and_exits_1(tmp_path: Path) -> None:
    result = run_command(clean_env(KUBECONFIG=str(tmp_path / "absent"), HOME=str(tmp_path)), "run")
    assert result.returncode == 1
    assert one_line(result) == (
        f"kiloclaw-operator: no kubeconfig: KUBECONFIG={tmp_path / 'absent'} names no existing file"
    )


def test_run_against_an_unreachable_cluster_names_the_server_in_one_line_and_exits_1(tmp_path: Path) -> None:
    server = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    kubeconfig = write_kubeconfig(tmp_path, server, {"token": "t"})
    result = run_command(clean_env(KUBECONFIG=str(kubeconfig)), "run")
    assert result.returncode == 1
    assert one_line(result).startswith(
        f"kiloclaw-operator: cannot reach the Kubernetes API at {server} (context main): "
    )


def test_run_with_a_busy_metrics_port_names_the_port_and_the_variable(
    cluster: tuple[KubeSim, FlySimulator], tmp_path: Path
) -> None:
    kube, fly = cluster
    kube.load_crds([CRDS])
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = clean_env(
            KUBECONFIG=str(kube.write_kubeconfig(tmp_path / "kubeconfig")),
            FLY_API_BASE_URL=fly.base_url,
            KILOCLAW_METRICS_PORT=str(port),
        )
        result = run_command(env, "run")
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith(f"kiloclaw-operator: cannot serve metrics on port {port} ")
    assert line.endswith("choose another with KILOCLAW_METRICS_PORT=PORT")


@pytest.fixture
def operator_run(cluster: tuple[KubeSim, FlySimulator], tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Start `kiloclaw-operator run` with a kubeconfig; returns the path of its log."""
    processes: list[subprocess.Popen[bytes]] = []
    _, fly = cluster

    def start(kubeconfig: Path) -> Path:
        log = tmp_path / f"operator-{len(processes)}.log"
        processes.append(start_operator(operator_env(kubeconfig, fly.base_url), log))
        return log

    yield start
    for process in processes:
        stop(process, signal.SIGINT)


def test_run_logs_in_with_an_exec_credential_plugin_and_drives_an_instance(
    cluster: tuple[KubeSim, FlySimulator], operator_run: Callable[..., Path], tmp_path: Path
) -> None:
    kube, _ = cluster
    kube.load_crds([CRDS])
    kube.create_namespace("exec")
    fake_exec_plugin(tmp_path)
    seen = tmp_path / "seen.json"
    operator_run(write_kubeconfig(tmp_path, kube.url, exec_user(seen)))
    create_instance(kube, "exec", "via-exec", "acct-exec")

    def running() -> bool:
        body = kube.get_object(GROUP, VERSION, INSTANCE_PLURAL, "exec", "via-exec") or {}
        return (body.get("status") or {}).get("phase") == "Running"

    deadline = time.monotonic() + 30
    while not running():
        assert time.monotonic() < deadline, "the instance never ran"
        time.sleep(0.1)
    calls = json.loads(seen.read_text())
    assert calls and calls[0]["info"]["kind"] == "ExecCredential"


def test_run_without_the_crds_says_so_in_one_line_and_waits_for_them(
    cluster: tuple[KubeSim, FlySimulator], operator_run: Callable[..., Path], tmp_path: Path
) -> None:
    kube, _ = cluster
    log = operator_run(kube.write_kubeconfig(tmp_path / "kubeconfig"))

    def warned() -> bool:
        return "are not installed" in log.read_text()

    deadline = time.monotonic() + 30
    while not warned():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    [line] = [json.loads(x) for x in log.read_text().splitlines() if "are not installed" in x]
    assert line["level"] == "warning"
    assert line["message"] == (
        f"the KiloClaw CRDs ({GROUP}/{VERSION}) are not installed in context kubesim: "
        "waiting for them (kubectl apply -k crds/)"
    )


def test_top_level_run_and_dev_help_show_no_docstring_markup() -> None:
    for module, args in (
        ("kiloclaw_operator", ["--help"]),
        ("kiloclaw_operator", ["run", "--help"]),
        ("kiloclaw_dev", ["--help"]),
    ):
        result = run_command(clean_env(), *args, module=module)
        assert result.returncode == 0
        assert "``" not in result.stdout and ":class:" not in result.stdout
    dev_help = run_command(clean_env(), "--help", module="kiloclaw_dev").stdout
    assert "port of the emulated Kubernetes API" in dev_help and "port of the Fly simulator" in dev_help


def succeeded_recoveries(metrics: str) -> float:
    prefix = 'kiloclaw_recoveries_total{outcome="succeeded"'  # whatever the reason label says
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix))


# --- dev ------------------------------------------------------------------------------------------------


def test_dev_serves_metrics_and_healthz_logs_json_and_its_demo_leaves_a_retained_volume_from_any_folder(
    tmp_path: Path,
) -> None:
    ports = {name: free_port() for name in ("port", "fly-port", "metrics-port", "health-port")}
    args = [arg for name, port in ports.items() for arg in (f"--{name}", str(port))]
    out, err = tmp_path / "dev.out", tmp_path / "dev.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "kiloclaw_dev", *args, "--workdir", str(tmp_path / "dev")],
            env=clean_env(),
            stdout=stdout,
            stderr=stderr,
            # Not the repository: the CRDs and examples come with the package.
            cwd=tmp_path,
        )
    try:
        wait_for(lambda: "The operator keeps running" in out.read_text(), "the demo to finish", process, 90)
        narration = out.read_text()
        assert "recovery Succeeded" in narration
        [retained] = [line for line in narration.splitlines() if "] retained volume alice-vol-" in line]
        assert " until " in retained
        kubeconfig = yaml.safe_load((tmp_path / "dev" / "kubeconfig").read_text())
        server = kubeconfig["clusters"][0]["cluster"]["server"]
        listed = httpx.get(f"{server}/apis/{GROUP}/{VERSION}/kiloclawretainedvolumes").json()["items"]
        assert "alice" in [item["metadata"]["labels"][f"{GROUP}/instance"] for item in listed]
        metrics_url = f"http://127.0.0.1:{ports['metrics-port']}/metrics"
        # Counted once the old volume is disposed of, a moment after the cutover the narration reports (the
        # failed host may have carried bob's machine too, so there may be two).
        wait_for(
            lambda: succeeded_recoveries(httpx.get(metrics_url).text) >= 1,
            "the recovery in the metrics",
            process,
        )
        assert httpx.get(f"http://127.0.0.1:{ports['health-port']}/healthz").status_code == 200
        logs = [line for line in err.read_text().splitlines() if line.strip()]
        assert logs, "the operator logged nothing"
        assert all(json.loads(line)["level"] for line in logs)

        # A second `make dev` while this one runs: one line naming the port and the flag.
        second = run_command(
            clean_env(), "--port", str(ports["port"]), "--workdir", str(tmp_path / "b"), module="kiloclaw_dev"
        )
        assert second.returncode == 1
        assert one_line(second) == (
            f"kiloclaw-dev: port {ports['port']} (emulated Kubernetes API) is in use, perhaps by "
            "another `make dev`: choose another with --port (or KILOCLAW_DEV_KUBE_PORT)"
        )
    finally:
        stop(process, signal.SIGINT)
