"""Reading a kubeconfig as kubectl does: the operator's ``run`` and the ``kubectl kiloclaw`` plugin share it.

Supported users: client certificates (files or inline data), bearer tokens, token files (re-read, as they are
rotated on disk), basic auth, and exec credential plugins (``client.authentication.k8s.io`` v1/v1beta1: the
default for EKS, GKE and AKS with kubelogin), whose tokens are cached until their ``expirationTimestamp``
and fetched again after a 401. Every problem is a :class:`KubeconfigError` with a one-line message.

Only the standard library and PyYAML: no Kubernetes client, no kopf.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

EXEC_TIMEOUT_SECONDS = 60
TOKEN_FILE_REREAD_SECONDS = 60
# A token that expires within this margin is fetched again before it is used.
EXPIRY_MARGIN_SECONDS = 10


class KubeconfigError(Exception):
    """The kubeconfig cannot be used; the message is one line that says what is missing."""


def kubeconfig_paths(explicit: str | None = None) -> list[Path]:
    """``--kubeconfig``, else ``$KUBECONFIG`` (a path list), else ``~/.kube/config``; only existing files
    of a list count, as with kubectl."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise KubeconfigError(f"kubeconfig {explicit} does not exist")
        return [path]
    env = os.environ.get("KUBECONFIG", "")
    if env:
        paths = [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
        existing = [p for p in paths if p.is_file()]
        if not existing:
            raise KubeconfigError(f"no kubeconfig: KUBECONFIG={env} names no existing file")
        return existing
    default = Path.home() / ".kube" / "config"
    if not default.is_file():
        raise KubeconfigError("no kubeconfig: set KUBECONFIG or create ~/.kube/config (kubectl config ...)")
    return [default]


@dataclass(frozen=True)
class ExecPlugin:
    """``users[].user.exec``: a command that prints an ExecCredential."""

    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    api_version: str = "client.authentication.k8s.io/v1"
    install_hint: str = ""
    provide_cluster_info: bool = False
    base_dir: Path = Path()


@dataclass(frozen=True)
class Credential:
    """What an exec plugin printed."""

    token: str | None = None
    client_certificate_pem: bytes | None = None
    client_key_pem: bytes | None = None
    expires_at: datetime | None = None


class TokenSource:
    """A bearer token that can change: a token file (re-read) or an exec plugin (cached until it expires).

    Thread-safe and synchronous: the async HTTP clients call it from a worker thread.
    """

    def __init__(
        self, *, token_file: Path | None = None, plugin: ExecPlugin | None = None, server: str = ""
    ) -> None:
        self._token_file = token_file
        self._plugin = plugin
        self._server = server
        self._lock = threading.Lock()
        self._token: str | None = None
        self._fresh_until = 0.0
        self.last_credential: Credential | None = None

    def token(self) -> str | None:
        with self._lock:
            if self._token is None or time.time() >= self._fresh_until:
                self._refresh()
            return self._token

    def cached(self) -> str | None:
        """The token when it is still fresh, without blocking (None: call ``token()``)."""
        return self._token if time.time() < self._fresh_until else None

    def invalidate(self) -> None:
        """After a 401: the next ``token()`` fetches a new one."""
        with self._lock:
            self._fresh_until = 0.0

    @property
    def expires_at(self) -> datetime | None:
        return self.last_credential.expires_at if self.last_credential else None

    def _refresh(self) -> None:
        if self._token_file is not None:
            try:
                self._token = self._token_file.read_text().strip()
            except OSError as exc:
                raise KubeconfigError(f"cannot read token file {self._token_file}: {exc.strerror}") from None
            self._fresh_until = time.time() + TOKEN_FILE_REREAD_SECONDS
            return
        assert self._plugin is not None
        credential = run_exec_plugin(self._plugin, self._server)
        self.last_credential = credential
        self._token = credential.token
        if credential.expires_at is None:
            self._fresh_until = float("inf")
        else:
            self._fresh_until = credential.expires_at.timestamp() - EXPIRY_MARGIN_SECONDS


@dataclass(frozen=True)
class ClusterLogin:
    """One context of a kubeconfig, resolved: where the API server is and how to authenticate."""

    server: str
    context: str
    namespace: str = "default"
    ca_pem: bytes | None = None
    ca_path: str | None = None
    insecure: bool = False
    client_certificate_pem: bytes | None = None
    client_key_pem: bytes | None = None
    client_certificate_path: str | None = None
    client_key_path: str | None = None
    token: str | None = None
    username: str | None = None
    password: str | None = None
    tokens: TokenSource | None = field(default=None, compare=False)


def _data(section: dict[str, Any], key: str) -> bytes | None:
    """Inline base64 certificate data, decoded to PEM."""
    if not section.get(key):
        return None
    try:
        return base64.b64decode(section[key], validate=False)
    except ValueError:
        raise KubeconfigError(f"kubeconfig: {key} is not base64") from None


def _resolve(path: str, base_dir: Path) -> str:
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else base_dir / candidate)


def _file(section: dict[str, Any], key: str, base_dir: Path) -> str | None:
    """A file path, relative to the kubeconfig's folder as kubectl resolves it."""
    return _resolve(section[key], base_dir) if section.get(key) else None


def load_kubeconfig(kubeconfig: str | None = None, context: str | None = None) -> ClusterLogin:
    """The chosen (or current) context of the kubeconfig, resolved. Exec plugins run once here, so a broken
    plugin is reported before anything connects."""
    paths = kubeconfig_paths(kubeconfig)
    current: str | None = None
    contexts: dict[str, tuple[dict[str, Any], Path]] = {}
    clusters: dict[str, tuple[dict[str, Any], Path]] = {}
    users: dict[str, tuple[dict[str, Any], Path]] = {}
    for path in paths:
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise KubeconfigError(f"kubeconfig {path} is unreadable: {str(exc).splitlines()[0]}") from None
        if not isinstance(config, dict):
            raise KubeconfigError(f"kubeconfig {path} is not a kubeconfig (no mapping at the top)")
        current = current or config.get("current-context") or None
        for key, into, inner in (
            ("contexts", contexts, "context"),
            ("clusters", clusters, "cluster"),
            ("users", users, "user"),
        ):
            for item in config.get(key) or []:
                if isinstance(item, dict) and item.get("name") not in into:
                    into[str(item.get("name"))] = (item.get(inner) or {}, path.parent)
    name = context or current
    if not name:
        raise KubeconfigError(
            "no current context in the kubeconfig: pass --context or run kubectl config use-context"
        )
    if name not in contexts:
        raise KubeconfigError(f"context {name!r} is not in the kubeconfig")
    ctx, _ = contexts[name]
    if ctx.get("cluster") not in clusters:
        raise KubeconfigError(f"context {name!r} names cluster {ctx.get('cluster')!r}, which is not defined")
    cluster, cluster_dir = clusters[ctx["cluster"]]
    server = cluster.get("server")
    if not server:
        raise KubeconfigError(f"cluster {ctx['cluster']!r} has no server address")
    user, user_dir = users.get(ctx.get("user") or "", ({}, cluster_dir))

    ca_pem = _data(cluster, "certificate-authority-data")
    ca_path = _file(cluster, "certificate-authority", cluster_dir)
    cert_pem = _data(user, "client-certificate-data")
    key_pem = _data(user, "client-key-data")
    tokens: TokenSource | None = None
    if user.get("exec"):
        plugin = _exec_plugin(user["exec"], user_dir)
        tokens = TokenSource(plugin=plugin, server=server)
        tokens.token()  # runs the plugin now: a missing binary or a failing login is reported at start-up
        credential = tokens.last_credential
        if credential and credential.client_certificate_pem:
            cert_pem, key_pem = credential.client_certificate_pem, credential.client_key_pem
        if credential and not credential.token:
            tokens = None
    elif user.get("tokenFile"):
        tokens = TokenSource(token_file=Path(_resolve(user["tokenFile"], user_dir)))
        tokens.token()
    elif user.get("auth-provider") and not (user["auth-provider"].get("config") or {}).get("access-token"):
        provider = user["auth-provider"].get("name", "?")
        raise KubeconfigError(
            f"kubeconfig user {ctx.get('user')!r} uses the removed auth-provider {provider!r}: "
            "switch it to an exec credential plugin (e.g. kubelogin, gke-gcloud-auth-plugin)"
        )
    token = user.get("token") or (user.get("auth-provider") or {}).get("config", {}).get("access-token")
    return ClusterLogin(
        server=str(server).rstrip("/"),
        context=name,
        namespace=ctx.get("namespace") or "default",
        ca_pem=ca_pem,
        ca_path=ca_path,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        client_certificate_pem=cert_pem,
        client_key_pem=key_pem,
        client_certificate_path=_file(user, "client-certificate", user_dir),
        client_key_path=_file(user, "client-key", user_dir),
        token=None if tokens else token,
        username=user.get("username"),
        password=user.get("password"),
        tokens=tokens,
    )


def _exec_plugin(spec: dict[str, Any], base_dir: Path) -> ExecPlugin:
    command = spec.get("command")
    if not command:
        raise KubeconfigError("kubeconfig exec credential plugin has no command")
    return ExecPlugin(
        command=str(command),
        args=tuple(str(a) for a in spec.get("args") or []),
        env=tuple((str(e["name"]), str(e.get("value", ""))) for e in spec.get("env") or []),
        api_version=spec.get("apiVersion") or "client.authentication.k8s.io/v1",
        install_hint=(spec.get("installHint") or "").strip(),
        provide_cluster_info=bool(spec.get("provideClusterInfo")),
        base_dir=base_dir,
    )


def run_exec_plugin(plugin: ExecPlugin, server: str = "") -> Credential:
    """Run the plugin as kubectl does (KUBERNETES_EXEC_INFO in its environment, stdout an ExecCredential)."""
    command = plugin.command
    if os.sep in command and not Path(command).is_absolute():
        command = str(plugin.base_dir / command)  # relative paths are relative to the kubeconfig's folder
    info: dict[str, Any] = {
        "apiVersion": plugin.api_version,
        "kind": "ExecCredential",
        "spec": {"interactive": False},
    }
    if plugin.provide_cluster_info:
        info["spec"]["cluster"] = {"server": server}
    env = {**os.environ, **dict(plugin.env), "KUBERNETES_EXEC_INFO": json.dumps(info)}
    name = Path(plugin.command).name
    try:
        result = subprocess.run(
            [command, *plugin.args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=EXEC_TIMEOUT_SECONDS,
            check=False,
        )
    except FileNotFoundError:
        hint = f" ({' '.join(plugin.install_hint.split())})" if plugin.install_hint else ""
        raise KubeconfigError(f"exec credential plugin {plugin.command!r} not found{hint}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KubeconfigError(f"exec credential plugin {name!r} could not run: {exc}") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise KubeconfigError(f"exec credential plugin {name!r} exited {result.returncode}: {last}")
    try:
        status = json.loads(result.stdout).get("status") or {}
    except (ValueError, AttributeError):
        raise KubeconfigError(f"exec credential plugin {name!r} printed no ExecCredential JSON") from None
    token = status.get("token")
    cert, key = status.get("clientCertificateData"), status.get("clientKeyData")
    if not token and not (cert and key):
        raise KubeconfigError(f"exec credential plugin {name!r} returned neither a token nor a certificate")
    expires: datetime | None = None
    if status.get("expirationTimestamp"):
        try:
            expires = datetime.fromisoformat(str(status["expirationTimestamp"]).replace("Z", "+00:00"))
        except ValueError:
            raise KubeconfigError(f"exec credential plugin {name!r}: bad expirationTimestamp") from None
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
    return Credential(
        token=token,
        client_certificate_pem=cert.encode() if cert else None,
        client_key_pem=key.encode() if key else None,
        expires_at=expires,
    )
