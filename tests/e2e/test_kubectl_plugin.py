"""``kubectl kiloclaw``: the real kubectl binary finds the plugin on PATH and runs it against the emulated
API, with instances driven by the real operator and flysim."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from prometheus_client import REGISTRY, start_http_server

from harness import Stack, condition, eventually, status
from kiloclaw_operator.models import GROUP, RETAINED_PLURAL, VERSION
from kubesim import KubeSim
from test_recovery_e2e import wait_failed

KUBECTL = shutil.which("kubectl")
pytestmark = [
    # The plugin runs as OS processes (kubectl, python): `make stories` (run by `make e2e`), not `make test`.
    pytest.mark.slow,
    pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (.ci/run installs it)"),
    pytest.mark.xdist_group("kubectl-plugin"),
]
VENV_BIN = str(Path(sys.executable).parent)
# With --cluster (make e2e) the admin's kubeconfig, read before the stack points KUBECONFIG at the operator's.
ADMIN_KUBECONFIG = os.environ.get("KUBECONFIG", "")


def kubectl(*args: str, kubeconfig: Path | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``kubectl ARGS`` with the venv's bin on PATH, where ``pip install`` put ``kubectl-kiloclaw``."""
    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    assert KUBECTL is not None
    return subprocess.run(
        [KUBECTL, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def stack_kubeconfig(stack: Stack) -> Path:
    """kubesim's kubeconfig, or with ``--cluster`` (make e2e) the real cluster admin's."""
    return Path(ADMIN_KUBECONFIG.split(os.pathsep)[0]) if stack.cluster else stack.workdir / "kubeconfig"


async def plugin(stack: Stack, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        kubectl, "kiloclaw", *args, kubeconfig=stack_kubeconfig(stack), stdin=stdin
    )


async def plugin_json(stack: Stack, *args: str) -> Any:
    result = await plugin(stack, *args, "-o", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def running(stack: Stack, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    await stack.create_instance(namespace, name, **spec)
    return await stack.wait_instance(
        namespace,
        name,
        lambda b: status(b).get("phase") == "Running" and condition(b, "Ready").get("status") == "True",
        what="Running and Ready",
    )


async def recovered_with_retained_volume(stack: Stack, namespace: str, name: str) -> dict[str, Any]:
    body = await running(stack, namespace, name)
    source_machine = status(body)["machineId"]
    stack.fly.add_snapshot(status(body)["volumeId"])
    stack.fly.crash_machine(source_machine)
    return await stack.wait_instance(
        namespace,
        name,
        lambda b: (
            status(b).get("phase") == "Running"
            and (status(b).get("lastRecovery") or {}).get("outcome") == "Succeeded"
            and not status(b).get("recovery")
            and bool((status(b).get("lastRecovery") or {}).get("retainedVolume"))
        ),
        timeout=30,
        what="recovered, old volume retained",
    )


async def failed_recovery(stack: Stack, namespace: str, name: str) -> dict[str, Any]:
    """A recovery that fails because no region has capacity for the fork (regions of its own)."""
    body = await running(stack, namespace, name, regions=["ams", "sjc"])
    for region in ("ams", "sjc"):
        stack.fly.exhaust_capacity(region, "volumes")
    try:
        stack.fly.crash_machine(status(body)["machineId"])
        return await wait_failed(stack, namespace, name, timeout=30)
    finally:
        for region in ("ams", "sjc"):
            stack.fly.restore_capacity(region)


# --- status --------------------------------------------------------------------------------------------


async def test_status_shows_the_card_of_a_recovered_instance_with_its_retained_volume_and_events(
    stack: Stack, namespace: str
) -> None:
    body = await recovered_with_retained_volume(stack, namespace, "alice")
    st = status(body)
    await stack.wait_instance(namespace, "alice", lambda b: True)

    async def events_seen() -> list[str] | None:
        reasons = await stack.event_reasons(namespace, "alice")
        return reasons if "RecoverySucceeded" in reasons else None

    from harness import eventually

    await eventually(events_seen, what="RecoverySucceeded event")
    card = await plugin_json(stack, "status", "alice", "-n", namespace)
    assert (card["phase"], card["attention"]) == ("Running", [])
    assert card["fly"] == {
        "state": "started",
        "observedAt": st["observedAt"],
        "region": st["region"],
        "machineId": st["machineId"],
        "volumeId": st["volumeId"],
    }
    assert {c["type"]: (c["status"], c["reason"]) for c in card["conditions"]}["Ready"][0] == "True"
    last = card["lastRecovery"]
    assert (last["outcome"], last["fromRegion"], last["toRegion"]) == ("Succeeded", "iad", st["region"])
    assert last["durationSeconds"] == st["lastRecovery"]["durationSeconds"]
    assert card["recovery"] is None and card["pendingCleanup"] is None
    [retained] = card["retainedVolumes"]
    assert retained["name"] == st["lastRecovery"]["retainedVolume"]
    assert (retained["phase"], retained["region"]) == ("Retained", "iad")
    assert retained["timeLeft"].startswith("in ")
    reasons = [e["reason"] for e in card["events"]]
    assert reasons.index("RecoveryStarted") < reasons.index("RecoverySucceeded")
    assert "RetainedVolumeCreated" in reasons

    human = await plugin(stack, "status", "alice", "-n", namespace)
    assert human.returncode == 0, human.stderr
    text = human.stdout
    assert f"iad → {st['region']}" in text
    assert retained["name"] in text
    assert text.index("RecoveryStarted") < text.index("RecoverySucceeded")
    assert "Attention:    none" in text


async def test_status_of_a_missing_instance_exits_3_with_one_line(stack: Stack, namespace: str) -> None:
    result = await plugin(stack, "status", "nobody", "-n", namespace)
    assert result.returncode == 3
    assert result.stderr == f"error: no KiloClawInstance nobody in namespace {namespace}\n"
    assert result.stdout == ""


# --- list, retry, recoveries -----------------------------------------------------------------------------


async def test_list_marks_a_failed_recovery_recoveries_lists_it_and_retry_asks_the_operator_again(
    stack: Stack, namespace: str
) -> None:
    await running(stack, namespace, "healthy")
    failed = await failed_recovery(stack, namespace, "broken")
    failed_id = status(failed)["lastRecovery"]["id"]

    # The alerts' signal: the operator counts the instance as Stalled for its reason (from the bodies it
    # knows, which on a loaded machine may reach it a moment after the API server showed them to us).
    async def counted_stalled() -> bool | None:
        value = REGISTRY.get_sample_value("kiloclaw_instances_stalled", {"reason": "RecoveryFailed"}) or 0
        return True if value >= 1 else None

    await eventually(counted_stalled, timeout=10, what="the instance counted as Stalled RecoveryFailed")
    rows = {r["name"]: r for r in await plugin_json(stack, "list", "-n", namespace)}
    assert rows["broken"]["attention"] == ["Stalled: RecoveryFailed"]
    assert rows["healthy"]["attention"] == []
    human = (await plugin(stack, "list", "-n", namespace)).stdout.splitlines()
    assert human[1].startswith("!") and " broken " in human[1]  # those that need attention come first
    assert any(" healthy " in line and not line.startswith("!") for line in human)

    card_text = (await plugin(stack, "status", "broken", "-n", namespace)).stdout
    assert "! Stalled: RecoveryFailed" in card_text
    assert f"kubectl kiloclaw retry broken -n {namespace}" in card_text
    assert status(failed)["lastRecovery"]["message"] in card_text

    requested = await plugin_json(stack, "retry", "broken", "-n", namespace)
    assert requested["message"].startswith(f"retry requested for {namespace}/broken")
    # The operator takes up the request (what it then does is the recovery's business, tested there).
    await stack.wait_instance(
        namespace,
        "broken",
        lambda b: status(b).get("acknowledgedRetry") == requested["value"],
        what="the retry request acknowledged",
    )
    attempts = await plugin_json(stack, "recoveries", "-n", namespace)
    [attempt] = [a for a in attempts if a["id"] == failed_id]
    assert (attempt["instance"], attempt["outcome"]) == ("broken", "Failed")
    # The retry starts a new attempt (issue 10), which replaces lastRecovery: the failed one is then known
    # from its Events, whose timestamps give its duration to a tenth of a second.
    assert attempt["durationSeconds"] == pytest.approx(
        status(failed)["lastRecovery"]["durationSeconds"], abs=1
    )
    assert status(failed)["lastRecovery"]["message"] in attempt["message"]
    human_attempts = (await plugin(stack, "recoveries", "-n", namespace)).stdout
    assert failed_id in human_attempts and "Failed" in human_attempts
    listed = await plugin_json(stack, "list", "-A")
    assert {(r["namespace"], r["name"]) for r in listed} >= {(namespace, "broken"), (namespace, "healthy")}


# --- retained volumes ------------------------------------------------------------------------------------


async def test_retained_delete_asks_first_and_with_yes_deletes_the_fly_volume(
    stack: Stack, namespace: str
) -> None:
    body = await recovered_with_retained_volume(stack, namespace, "carol")
    name = status(body)["lastRecovery"]["retainedVolume"]
    rows = await plugin_json(stack, "retained", "-n", namespace)
    [row] = [r for r in rows if r["name"] == name]
    volume = row["volumeId"]
    assert (row["instance"], row["phase"]) == ("carol", "Retained")

    declined = await plugin(stack, "retained", "delete", name, "-n", namespace, stdin="n\n")
    assert declined.returncode == 6
    assert "[y/N]" in declined.stderr and volume in declined.stderr
    kcrv = (await stack.api.get(stack.path(RETAINED_PLURAL, namespace, name))).json()
    assert not kcrv["spec"].get("deleteNow")

    deleted = await plugin(stack, "retained", "delete", name, "-n", namespace, "--yes")
    assert deleted.returncode == 0, deleted.stderr
    from harness import eventually

    async def gone() -> bool | None:
        response = await stack.api.get(stack.path(RETAINED_PLURAL, namespace, name))
        return True if response.status_code == 404 else None

    await eventually(gone, timeout=20, what="retained volume deleted")
    assert volume not in {v["id"] for v in stack.live_volumes()}
    missing = await plugin(stack, "retained", "delete", name, "-n", namespace, "--yes")
    assert (missing.returncode, missing.stderr) == (
        3,
        f"error: no KiloClawRetainedVolume {name} in namespace {namespace}\n",
    )


# --- report ----------------------------------------------------------------------------------------------


@pytest.fixture
def metrics_url() -> Iterator[str]:
    """The operator's metrics (it runs in this process) served as its Deployment serves them."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server, thread = start_http_server(port, addr="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        thread.join(5)


async def test_report_bundles_spec_status_events_and_metrics_without_env_values_or_the_token(
    stack: Stack, namespace: str, metrics_url: str, tmp_path: Path
) -> None:
    manifest = tmp_path / "dave.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "KiloClawInstance",
                "metadata": {"name": "dave", "namespace": namespace},
                "spec": {
                    "sandboxId": f"ki_dave_{namespace}".replace("-", "_"),
                    "userId": "user-dave",
                    "flyApp": "acct-test",
                    "image": "registry.fly.io/kiloclaw:2026.11.1",
                    "env": {"OPENAI_API_KEY": "sk-very-secret-value"},
                },
            }
        )
    )
    applied = await asyncio.to_thread(
        kubectl, "apply", "-f", str(manifest), kubeconfig=stack_kubeconfig(stack)
    )
    assert applied.returncode == 0, applied.stderr
    await stack.wait_phase(namespace, "dave", "Running")
    out = tmp_path / "report.json"
    result = await plugin(
        stack, "report", "dave", "-n", namespace, "-o", "json", "--metrics-url", metrics_url, "-f", str(out)
    )
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "sk-very-secret-value" not in text
    assert "test-token" not in text
    report = json.loads(text)
    assert report["instance"]["spec"]["env"] == {"OPENAI_API_KEY": "<redacted>"}
    annotations = report["instance"]["metadata"]["annotations"]
    assert annotations["kubectl.kubernetes.io/last-applied-configuration"] == "<redacted>"
    assert report["instance"]["status"]["phase"] == "Running"
    assert report["card"]["name"] == "dave"
    assert "kiloclaw_fly_requests_total" in report["operatorMetrics"]["text"]
    assert all(e["involvedObject"]["name"] == "dave" for e in report["events"])


# --- errors ----------------------------------------------------------------------------------------------


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_without_a_kubeconfig_the_plugin_says_so_and_exits_4(tmp_path: Path) -> None:
    result = kubectl("kiloclaw", "list", "--kubeconfig", str(tmp_path / "absent"))
    assert result.returncode == 4
    assert one_line(result) == f"error: kubeconfig {tmp_path / 'absent'} does not exist"


def test_an_unreachable_cluster_is_one_line_naming_the_server_and_exit_4(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    kubeconfig = write_kubeconfig(tmp_path, f"http://127.0.0.1:{port}", {"token": "t"})
    result = kubectl("kiloclaw", "list", kubeconfig=kubeconfig)
    assert result.returncode == 4
    assert one_line(result).startswith(f"error: cannot reach the Kubernetes API at http://127.0.0.1:{port}")


def test_a_cluster_without_the_crds_is_reported_with_how_to_install_them(tmp_path: Path) -> None:
    kube = KubeSim()
    kube.start_in_thread()
    try:
        result = kubectl("kiloclaw", "status", "x", kubeconfig=kube.write_kubeconfig(tmp_path / "kc"))
    finally:
        kube.stop_thread()
    assert result.returncode == 4
    assert "are not installed" in one_line(result) and "kubectl apply -k crds/" in one_line(result)


class FakeApiServer:
    """An API server whose RBAC denies everything (kubesim has no RBAC or authentication): it records the
    Authorization headers it sees, answers 401 to the tokens in ``expired`` and 403 to everything else."""

    def __init__(self) -> None:
        self.url = ""
        self.authorizations: list[str] = []
        self.expired: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        self.authorizations.append(authorization)
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure"}
        if authorization.removeprefix("Bearer ") in self.expired:
            return web.json_response({**body, "reason": "Unauthorized", "code": 401}, status=401)
        message = f'{request.path} is forbidden: User "dev" cannot get resource in API group "{GROUP}"'
        return web.json_response({**body, "reason": "Forbidden", "message": message, "code": 403}, status=403)


@pytest.fixture
async def fake_api_server() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        yield server
    finally:
        await runner.cleanup()


async def test_a_forbidden_request_is_one_line_and_exit_5(
    fake_api_server: FakeApiServer, tmp_path: Path
) -> None:
    kubeconfig = write_kubeconfig(tmp_path, fake_api_server.url, {"token": "t"})
    result = await asyncio.to_thread(kubectl, "kiloclaw", "list", "-A", kubeconfig=kubeconfig)
    assert result.returncode == 5
    assert one_line(result).startswith("error: forbidden: /apis/kiloclaw.kilo.ai/v1alpha1 is forbidden")
    assert fake_api_server.authorizations == ["Bearer t"]


def test_an_unknown_command_is_a_usage_error_with_exit_2() -> None:
    assert kubectl("kiloclaw", "explode").returncode == 2


# --- kubeconfig: --context, token files, exec credential plugins -----------------------------------------


def write_kubeconfig(
    tmp_path: Path, server: str, user: dict[str, Any], *, extra_context: bool = False, name: str = "kc"
) -> Path:
    config: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "main", "context": {"cluster": "c", "user": "u", "namespace": "default"}}],
        "current-context": "main",
    }
    if extra_context:
        config["clusters"].append({"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}})
        config["contexts"].append({"name": "broken", "context": {"cluster": "nowhere", "user": "u"}})
        config["current-context"] = "broken"
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


FAKE_EXEC_PLUGIN = """#!{python}
# A cloud's credential plugin: each call hands out a new token (exec-token-1, -2, ...).
import json, os, pathlib, sys
seen = pathlib.Path(sys.argv[1])
calls = json.loads(seen.read_text()) if seen.exists() else []
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
calls.append({{"info": info, "env": os.environ.get("FAKE_REGION")}})
seen.write_text(json.dumps(calls))
if os.environ.get("FAKE_FAIL"):
    print("the identity provider said no", file=sys.stderr)
    sys.exit(1)
status = {{"token": f"exec-token-{{len(calls)}}", "expirationTimestamp": "2099-01-01T00:00:00Z"}}
print(json.dumps({{"apiVersion": info["apiVersion"], "kind": "ExecCredential", "status": status}}))
"""


def fake_exec_plugin(tmp_path: Path) -> Path:
    script = tmp_path / "bin" / "fake-cloud-auth"
    script.parent.mkdir(exist_ok=True)
    script.write_text(FAKE_EXEC_PLUGIN.format(python=sys.executable))
    script.chmod(0o755)
    return script


async def test_context_flag_picks_a_context_other_than_the_current_one(stack: Stack, tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path, stack.kube.url, {"token": "t"}, extra_context=True)
    broken = await asyncio.to_thread(kubectl, "kiloclaw", "list", "-A", "--kubeconfig", str(kubeconfig))
    assert broken.returncode == 4
    chosen = await asyncio.to_thread(
        kubectl, "kiloclaw", "list", "-A", "--kubeconfig", str(kubeconfig), "--context", "main"
    )
    assert chosen.returncode == 0, chosen.stderr


def exec_user(seen: Path, **extra: Any) -> dict[str, Any]:
    return {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": "./bin/fake-cloud-auth",  # relative to the kubeconfig's folder, as kubectl has it
            "args": [str(seen)],
            "env": [{"name": "FAKE_REGION", "value": "eu-west-1"}],
            "interactiveMode": "Never",
            **extra,
        }
    }


async def test_an_exec_credential_plugin_logs_the_plugin_in(stack: Stack, tmp_path: Path) -> None:
    fake_exec_plugin(tmp_path)
    seen = tmp_path / "seen.json"
    kubeconfig = write_kubeconfig(tmp_path, stack.kube.url, exec_user(seen))
    result = await asyncio.to_thread(kubectl, "kiloclaw", "list", "-A", kubeconfig=kubeconfig)
    assert result.returncode == 0, result.stderr
    [called] = json.loads(seen.read_text())
    assert called["info"]["apiVersion"] == "client.authentication.k8s.io/v1beta1"
    assert called["info"]["kind"] == "ExecCredential"
    assert called["env"] == "eu-west-1"


async def test_an_exec_credential_token_is_sent_and_fetched_again_after_a_401(
    fake_api_server: FakeApiServer, tmp_path: Path
) -> None:
    fake_exec_plugin(tmp_path)
    fake_api_server.expired = {"exec-token-1"}
    kubeconfig = write_kubeconfig(tmp_path, fake_api_server.url, exec_user(tmp_path / "seen.json"))
    result = await asyncio.to_thread(kubectl, "kiloclaw", "list", kubeconfig=kubeconfig)
    assert result.returncode == 5  # the fake server forbids everything
    assert fake_api_server.authorizations == ["Bearer exec-token-1", "Bearer exec-token-2"]


def test_a_failing_exec_credential_plugin_is_one_line_with_its_message(tmp_path: Path) -> None:
    fake_exec_plugin(tmp_path)
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": "./bin/fake-cloud-auth",
            "args": [str(tmp_path / "seen")],
            "env": [{"name": "FAKE_FAIL", "value": "1"}],
        }
    }
    result = kubectl("kiloclaw", "list", kubeconfig=write_kubeconfig(tmp_path, "http://127.0.0.1:9", user))
    assert result.returncode == 4
    assert one_line(result) == (
        "error: exec credential plugin 'fake-cloud-auth' failed: process returned 1. "
        "the identity provider said no"
    )


def test_a_missing_exec_credential_plugin_shows_its_install_hint(tmp_path: Path) -> None:
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": "gke-gcloud-auth-plugin-absent",
            "installHint": "Install it with gcloud.",
        }
    }
    result = kubectl("kiloclaw", "list", kubeconfig=write_kubeconfig(tmp_path, "http://127.0.0.1:9", user))
    assert result.returncode == 4
    assert one_line(result) == (
        "error: exec credential plugin 'gke-gcloud-auth-plugin-absent' not found (Install it with gcloud.)"
    )


@pytest.mark.parametrize("missing", ["cluster", "user"])
def test_a_context_naming_a_missing_entry_is_one_line_and_exit_4(tmp_path: Path, missing: str) -> None:
    config = yaml.safe_load(write_kubeconfig(tmp_path, "http://127.0.0.1:9", {"token": "t"}).read_text())
    config["contexts"][0]["context"][missing] = "absent"
    (tmp_path / "kc").write_text(yaml.safe_dump(config))
    result = kubectl("kiloclaw", "list", kubeconfig=tmp_path / "kc")
    assert result.returncode == 4
    assert one_line(result) == f"error: context 'main' names {missing} 'absent', which is not defined"


def test_an_exec_section_without_an_api_version_is_refused_as_kubectl_refuses_it(tmp_path: Path) -> None:
    user = {"exec": {"command": "./bin/fake-cloud-auth"}}
    result = kubectl("kiloclaw", "list", kubeconfig=write_kubeconfig(tmp_path, "http://127.0.0.1:9", user))
    assert result.returncode == 4
    assert "apiVersion" in one_line(result)


async def test_a_token_file_is_read_for_the_bearer_token(
    fake_api_server: FakeApiServer, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("file-token\n")
    kubeconfig = write_kubeconfig(tmp_path, fake_api_server.url, {"tokenFile": "token"})
    result = await asyncio.to_thread(kubectl, "kiloclaw", "retained", "-A", kubeconfig=kubeconfig)
    assert result.returncode == 5
    assert fake_api_server.authorizations == ["Bearer file-token"]
