"""The operator image run as ``deploy/`` runs it, with podman instead of a kubelet: the Deployment's container
(as ``kubectl kustomize deploy/`` renders it) turned into ``podman run`` arguments — the same entrypoint and
arguments, user and group, read-only root filesystem with the ``/tmp`` emptyDir as a sized tmpfs, all
capabilities dropped, no privilege escalation, the Fly token as a file in a read-only directory mount (mode
0440, group 65532 as ``fsGroup`` makes it), and the ServiceAccount's token, CA and namespace where the kubelet
projects them, with ``KUBERNETES_SERVICE_HOST``/``PORT`` pointing at the API server.

What differs from a Pod, and why: the network is the host's (``--network host``: the API server and flysim
listen on loopback, and there is no Pod network here), so each replica gets its own health and metrics ports
and the Fly API base URL points at flysim; the tests' poll intervals are shortened through the same
environment an admin would set. Nothing else is overridden.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml

from imagetools import podman

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
RUNTIME_UID = 65532

# Shorter than the defaults so that the stories take seconds; the Lease keeps its defaults (8 s), so the
# fail-over measured here is the one a deployment gets.
TEST_INTERVALS = {
    "KILOCLAW_POLL_RUNNING_SECONDS": "0.3",
    "KILOCLAW_POLL_BUSY_SECONDS": "0.1",
    "KILOCLAW_POLL_IDLE_SECONDS": "0.5",
    "KILOCLAW_RETAINED_CHECK_SECONDS": "0.3",
    "KILOCLAW_RETRY_BACKOFF_MIN_SECONDS": "0.1",
    "KILOCLAW_RETRY_BACKOFF_MAX_SECONDS": "1",
    "KILOCLAW_WAIT_CALL_SECONDS": "1",
    "KILOCLAW_RECOVERY_TIMEOUT_SECONDS": "20",
}


def rendered_deployment(kubectl: str, root: Path) -> dict[str, Any]:
    """The operator Deployment exactly as ``kubectl apply -k deploy/`` would create it."""
    rendered = subprocess.run(
        [kubectl, "kustomize", str(root / "deploy")], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    [deployment] = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"]
    result: dict[str, Any] = deployment
    return result


def cluster_ca(kubeconfig: Path) -> bytes:
    config = yaml.safe_load(kubeconfig.read_text())
    context = {c["name"]: c["context"] for c in config["contexts"]}[config["current-context"]]
    cluster = {c["name"]: c["cluster"] for c in config["clusters"]}[context["cluster"]]
    if cluster.get("certificate-authority-data"):
        return base64.b64decode(cluster["certificate-authority-data"])
    return Path(cluster["certificate-authority"]).read_bytes()


def write_service_account(directory: Path, token: str, ca: bytes, namespace: str) -> Path:
    """What the kubelet projects into every Pod of the ServiceAccount."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    for name, data in (("token", token.encode()), ("ca.crt", ca), ("namespace", namespace.encode())):
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o644)
    return directory


def write_secret(directory: Path, items: dict[str, str], mode: int) -> Path:
    """A Secret volume: one file per item, owned by the fsGroup with the volume's defaultMode."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    for name, value in items.items():
        path = directory / name
        path.write_text(value)
        shutil.chown(path, 0, RUNTIME_UID)
        path.chmod(mode)
    return directory


def _size_bytes(quantity: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


class OperatorContainer:
    """One replica of the Deployment as a podman container named ``name`` (its pod name)."""

    def __init__(
        self,
        *,
        image: str,
        name: str,
        deployment: dict[str, Any],
        service_account_dir: Path,
        secret_dirs: dict[str, Path],
        api_server: str,
        overrides: dict[str, str],
    ) -> None:
        self.image = image
        self.name = name
        self.deployment = deployment
        self.service_account_dir = service_account_dir
        self.secret_dirs = secret_dirs
        self.api_server = api_server
        self.overrides = overrides
        self.health_port = int(overrides["KILOCLAW_HEALTH_PORT"])

    def run_args(self) -> list[str]:
        pod = self.deployment["spec"]["template"]
        spec = pod["spec"]
        [container] = spec["containers"]
        pod_security, security = spec.get("securityContext", {}), container["securityContext"]
        namespace = self.deployment["metadata"]["namespace"]
        field_values = {"metadata.namespace": namespace, "metadata.name": self.name}
        args = ["run", "--detach", "--name", self.name, "--network", "host", "--pull", "never"]
        uid = security.get("runAsUser", pod_security.get("runAsUser"))
        gid = security.get("runAsGroup", pod_security.get("runAsGroup"))
        assert uid is not None and gid is not None and uid != 0, "the Deployment must run as a non-root uid"
        # A kubelet adds no /etc/passwd entry for the user (podman would, unless told not to).
        args += ["--user", f"{uid}:{gid}", "--passwd=false"]
        if "fsGroup" in pod_security:
            args += ["--group-add", str(pod_security["fsGroup"])]
        if security.get("readOnlyRootFilesystem"):
            # podman would add its own tmpfs on /tmp, /run, /var/tmp; a Pod has only its volumes.
            args += ["--read-only", "--read-only-tmpfs=false"]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for capability in security.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", capability]
        assert not security.get("privileged"), "a privileged operator container is not how it ships"
        volumes = {v["name"]: v for v in spec["volumes"]}
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                size = _size_bytes(volume["emptyDir"].get("sizeLimit", "64Mi"))
                args += ["--tmpfs", f"{mount['mountPath']}:rw,size={size},mode=1777"]
            elif "secret" in volume:
                source = self.secret_dirs[volume["secret"]["secretName"]]
                args += ["--volume", f"{source}:{mount['mountPath']}:ro"]
            else:
                raise AssertionError(f"volume {volume} has no podman counterpart here")
        # The kubelet's additions to every Pod: the projected ServiceAccount token and the API's address.
        host, port = self.api_server.removeprefix("https://").rsplit(":", 1)
        args += ["--volume", f"{self.service_account_dir}:{SERVICE_ACCOUNT_DIR}:ro"]
        env: dict[str, str] = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
        for var in container["env"]:
            if "value" in var:
                env[var["name"]] = var["value"]
            else:
                env[var["name"]] = field_values[var["valueFrom"]["fieldRef"]["fieldPath"]]
        env.update(self.overrides)
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        args.append(self.image)
        # The Deployment sets neither command nor args: the image's entrypoint runs as built.
        assert "command" not in container and "args" not in container
        return args

    def start(self) -> OperatorContainer:
        podman("rm", "--force", "--ignore", self.name)
        podman(*self.run_args(), check=True)
        return self

    def kill(self) -> None:
        """SIGKILL, as a node loss or an OOM kill: nothing gets to finish, the Lease is not released."""
        podman("kill", "--signal", "KILL", self.name)

    def remove(self) -> None:
        podman("rm", "--force", "--ignore", "--time", "0", self.name)

    def stop(self, timeout: int = 60) -> int:
        """SIGTERM (what the kubelet sends a deleted Pod), then the exit code."""
        podman("stop", "--time", str(timeout), self.name, timeout=timeout + 30)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", self.name, check=True).stdout.strip()
        return int(code)

    def running(self) -> bool:
        result = podman("inspect", "--format", "{{.State.Running}}", self.name)
        return result.returncode == 0 and result.stdout.strip() == "true"

    def logs(self, lines: int = 40) -> str:
        return (
            podman("logs", "--tail", str(lines), self.name).stdout
            + podman("logs", "--tail", str(lines), self.name).stderr
        )

    async def role(self) -> str | None:
        """``leader`` / ``standby`` from the health endpoint; None while it does not answer."""
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                response = await client.get(f"http://127.0.0.1:{self.health_port}/healthz")
            role: str = response.json()["role"]
            return role
        except (httpx.HTTPError, ValueError, KeyError):
            return None
