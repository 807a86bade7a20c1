"""Logging in to the API server through the official ``kubernetes`` client's configuration loading, shared by
the operator (in a pod: its ServiceAccount; elsewhere: the kubeconfig) and the ``kubectl kiloclaw`` plugin.
The calls themselves go over the operator's own clients (kube.py): this module only turns a kubeconfig or a
pod's ServiceAccount into an address, TLS material held in memory and an ``Authorization`` value.

The library reads: kubeconfig lists (``KUBECONFIG``) merged as kubectl merges them, contexts, clusters,
client certificates (files or inline), tokens, token files, basic auth, auth providers, exec credential
plugins (its ``ExecProvider``: ``KUBERNETES_EXEC_INFO``, the answer's checks) and the in-cluster config (the
kubelet's ``KUBERNETES_SERVICE_HOST``/``_PORT``, the projected token). On top of it, where it falls short:

- An exec plugin that fails is logged by the library, which then goes on unauthenticated; here the plugin is
  run (with the library's ``ExecProvider``) before the library reads the rest, and a failure is an error with
  the plugin's message, or, when its command is missing, the kubeconfig's ``installHint``.
- The library fetches an exec plugin's token again only when it expires and reads a token file once; here a
  login is also loaded again after a 401 (:class:`Credentials`), so a revoked token or a rotated file is
  picked up without a restart.
- The library writes inline certificates and keys to temporary files kept until the process exits; here
  they are read back into memory and those files deleted at once (TLS contexts are built from memory, see
  ``kube.tls_context``).
- Every problem, including a context that names a cluster, user or context the kubeconfig lacks, is a
  :class:`KubeconfigError` with one line that says what is missing.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import Configuration
from kubernetes.config import ConfigException, kube_config
from kubernetes.config.dateutil import parse_rfc3339
from kubernetes.config.exec_provider import ExecProvider
from kubernetes.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)

#: A token that expires within this margin is fetched again before it is used (the library's own margin).
EXPIRY_MARGIN_SECONDS = kube_config.EXPIRY_SKEW_PREVENTION_DELAY.total_seconds()
#: The projected ServiceAccount token is read again this often (the library's in-cluster period, client-go's).
SERVICE_ACCOUNT_REREAD_SECONDS = 60.0
# One load at a time: the library hands a file it wrote for one load to the next (a table by content), and
# each load deletes its files when it ends.
_LOADING = threading.Lock()


class KubeconfigError(Exception):
    """No usable login; the message is one line that says what is missing."""


@dataclass(frozen=True)
class Authorization:
    """What a login sends: the ``Authorization`` header's value, and until when it holds."""

    header: str | None
    expires_at: datetime | None = None
    fresh_for: float | None = None  # seconds, for a source read again on a schedule (the projected token)


class Credentials:
    """A login's ``Authorization`` value, loaded again when it expires and after a 401.

    Thread-safe and synchronous (a load may run an exec plugin): async callers use a worker thread.
    """

    def __init__(self, load: Callable[[], Authorization], first: Authorization) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._set(first)

    def _set(self, current: Authorization) -> None:
        self._current = current
        until = float("inf")
        if current.expires_at is not None:
            until = current.expires_at.timestamp() - EXPIRY_MARGIN_SECONDS
        if current.fresh_for is not None:
            until = min(until, time.time() + current.fresh_for)
        self._fresh_until = until

    def header(self) -> str | None:
        with self._lock:
            if time.time() >= self._fresh_until:
                self._set(self._load())
            return self._current.header

    def cached(self) -> str | None:
        """The header when it is still fresh, without blocking (None: call ``header()``)."""
        return self._current.header if time.time() < self._fresh_until else None

    def invalidate(self, rejected: str | None) -> None:
        """After a 401 to ``rejected``: the next ``header()`` loads the login again (once for many requests
        refused together: not when it was loaded again since)."""
        with self._lock:
            if self._current.header == rejected:
                self._fresh_until = 0.0

    @property
    def expires_at(self) -> datetime | None:
        return self._current.expires_at


@dataclass(frozen=True)
class ClusterLogin:
    """Where the API server is and how to authenticate, with every certificate in memory."""

    server: str
    context: str
    namespace: str = "default"
    ca_pem: bytes | None = None
    insecure: bool = False
    client_certificate_pem: bytes | None = None
    client_key_pem: bytes | None = None
    credentials: Credentials | None = field(default=None, compare=False)


def in_a_pod() -> bool:
    """Whether this process has a ServiceAccount token (as kopf decides for its own login)."""
    return os.path.exists(SERVICE_TOKEN_FILENAME)


def load_login(kubeconfig: str | None = None, context: str | None = None) -> ClusterLogin:
    """The operator's login: in a pod its ServiceAccount, elsewhere the kubeconfig (as kubectl reads it)."""
    if kubeconfig is None and context is None and in_a_pod():
        return load_in_cluster()
    return load_kubeconfig(kubeconfig, context)


def load_in_cluster(
    token_file: str = SERVICE_TOKEN_FILENAME,
    ca_file: str = SERVICE_CERT_FILENAME,
    environ: dict[str, str] | None = None,
) -> ClusterLogin:
    """The ServiceAccount's login by the library's in-cluster loader: the address the kubelet gives the pod
    (an IP, so no cluster DNS is needed), its CA, and the projected token, read again every minute and after
    a 401 (it rotates, hourly by default)."""
    loader = InClusterConfigLoader(token_file, ca_file, environ=os.environ if environ is None else environ)

    def load() -> tuple[Configuration, Authorization]:
        configuration = Configuration()
        try:
            loader.load_and_set(configuration)
        except (ConfigException, OSError) as exc:
            raise KubeconfigError(f"in-cluster login: {_one_line(exc)}") from None
        header = _header(configuration)
        return configuration, Authorization(header, fresh_for=SERVICE_ACCOUNT_REREAD_SECONDS)

    configuration, first = load()
    return ClusterLogin(
        server=configuration.host,
        context="in-cluster",
        ca_pem=_read(configuration.ssl_ca_cert),
        credentials=Credentials(lambda: load()[1], first),
    )


def kubeconfig_paths(explicit: str | None = None) -> list[Path]:
    """``--kubeconfig``, else ``$KUBECONFIG`` (a path list), else ``~/.kube/config``; only existing files
    of a list count, as with kubectl. (The library skips missing files silently and then finds "no
    configuration"; this says which file is missing.)"""
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


def load_kubeconfig(kubeconfig: str | None = None, context: str | None = None) -> ClusterLogin:
    """The chosen (or current) context of the kubeconfig. An exec plugin runs here, so a broken plugin is
    reported before anything connects; it runs again when its token expires or is refused."""
    paths = kubeconfig_paths(kubeconfig)
    login, first = _load_context(paths, context)
    return dataclasses.replace(
        login, credentials=Credentials(lambda: _load_context(paths, context)[1], first)
    )


def _load_context(paths: list[Path], context: str | None) -> tuple[ClusterLogin, Authorization]:
    """One load by the library, with the certificates read into memory and its temporary files gone."""
    with _LOADING:
        private = tempfile.mkdtemp(prefix="kiloclaw-login-")  # 0700: the library's files go here
        try:
            return _load_with_library(paths, context, private)
        except ConfigException as exc:
            raise KubeconfigError(f"kubeconfig: {_one_line(exc)}") from None
        except (OSError, yaml.YAMLError) as exc:
            raise KubeconfigError(f"kubeconfig is unreadable: {_one_line(exc)}") from None
        except TypeError:  # the library's merge of a file whose top is a list or a string
            raise KubeconfigError(f"{paths[0]} is not a kubeconfig (no mapping at the top)") from None
        finally:
            shutil.rmtree(private, ignore_errors=True)  # the library would keep them until the process exits


def _load_with_library(
    paths: list[Path], context: str | None, private: str
) -> tuple[ClusterLogin, Authorization]:
    merged = kube_config.KubeConfigMerger(os.pathsep.join(str(p) for p in paths)).config
    if merged is None or not isinstance(merged.value, dict):
        raise KubeconfigError(f"{paths[0]} is not a kubeconfig (no mapping at the top)")
    name = context or merged.value.get("current-context")
    if not name:
        raise KubeconfigError(
            "no current context in the kubeconfig: pass --context or run kubectl config use-context"
        )
    ctx = _named(merged, "contexts", name, f"context {name!r} is not in the kubeconfig")["context"]
    cluster_name = ctx.safe_get("cluster")
    cluster = _named(
        merged, "clusters", cluster_name, f"context {name!r} names cluster {{}}, which is not defined"
    )["cluster"]
    if not cluster.safe_get("server"):
        raise KubeconfigError(f"cluster {cluster_name!r} has no server address")
    expires_at: datetime | None = None
    if ctx.safe_get("user"):
        user = _named(merged, "users", ctx["user"], f"context {name!r} names user {{}}, which is not defined")
        expires_at = _run_exec_plugin(user["user"], cluster)
    loader = kube_config.KubeConfigLoader(
        config_dict=merged, active_context=name, config_base_path=None, temp_file_path=private
    )
    configuration = Configuration()
    loader.load_and_set(configuration)
    login = ClusterLogin(
        server=configuration.host,
        context=name,
        namespace=ctx.safe_get("namespace") or "default",
        # Read now, while the library's temporary files exist (they are deleted when this load ends).
        ca_pem=_read(configuration.ssl_ca_cert),
        insecure=not configuration.verify_ssl,
        client_certificate_pem=_read(configuration.cert_file),
        client_key_pem=_read(configuration.key_file),
    )
    return login, Authorization(_header(configuration), expires_at)


def _named(merged: Any, section: str, name: str | None, missing: str) -> Any:
    """The entry called ``name`` of a kubeconfig list, or a KubeconfigError with ``missing`` (``{}``: the
    name). The library's lookup says the same with its own words, and a missing user it skips silently."""
    found = merged[section].get_with_name(name, safe=True) if merged.safe_get(section) and name else None
    if found is None:
        raise KubeconfigError(missing.format(repr(name)))
    return found


def _run_exec_plugin(user: Any, cluster: Any) -> datetime | None:
    """Run the user's exec credential plugin with the library's ``ExecProvider`` and put what it printed in
    the user's place (a token, or a client certificate and key), so that the library, which would log a
    failure and go on without credentials, reads a plain credential instead. Returns its expiry."""
    if "exec" not in user:
        return None
    spec = user["exec"]
    command = str(spec.safe_get("command") or "")
    name = Path(command).name or "?"
    base = os.path.dirname(os.path.abspath(user.path)) if user.path else None
    try:
        status = ExecProvider(spec, base, cluster).run()
    except FileNotFoundError:
        hint = " ".join(str(spec.safe_get("installHint") or "").split())
        raise KubeconfigError(
            f"exec credential plugin {command!r} not found" + (f" ({hint})" if hint else "")
        ) from None
    except (ConfigException, OSError) as exc:
        message = _one_line(exc).removeprefix("exec: ")
        raise KubeconfigError(f"exec credential plugin {name!r} failed: {message}") from None
    credential: dict[str, Any] = {}
    if status.get("token"):
        credential["token"] = status["token"]
    elif status.get("clientCertificateData") and status.get("clientKeyData"):
        for key, data in (
            ("client-certificate-data", "clientCertificateData"),
            ("client-key-data", "clientKeyData"),
        ):
            credential[key] = base64.b64encode(str(status[data]).encode()).decode()
    else:
        raise KubeconfigError(f"exec credential plugin {name!r} returned neither a token nor a certificate")
    user.value.pop("exec")
    user.value.update(credential)
    if not status.get("expirationTimestamp"):
        return None
    try:
        expires_at: datetime = parse_rfc3339(status["expirationTimestamp"])
    except (ValueError, TypeError):
        raise KubeconfigError(f"exec credential plugin {name!r}: bad expirationTimestamp") from None
    return expires_at


def _header(configuration: Configuration) -> str | None:
    """The library's ``Authorization`` value: ``Bearer …`` (token, token file, exec, auth provider) or
    ``Basic …``."""
    value = configuration.api_key.get("BearerToken")
    return " ".join(str(value).split()) if value else None


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
