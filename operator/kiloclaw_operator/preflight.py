"""Checks ``kiloclaw-operator run`` makes before starting kopf, so that a missing cluster is one line and a
non-zero exit within seconds, not a minute of retries and tracebacks.

Fatal: no kubeconfig (outside a pod), the API server does not answer, it rejects the credentials. Not fatal:
the KiloClaw CRDs are missing — ``kubectl apply -k deploy/`` may start the operator before they are
established, and the operator serves them as soon as they appear — so that is one warning line.
"""

from __future__ import annotations

import os

import httpx

from .kube import connection_from_login, tls_context
from .kubeconfig import KubeconfigError, load_kubeconfig
from .models import GROUP, VERSION

SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
TIMEOUT_SECONDS = 5.0


class StartupError(Exception):
    """The operator cannot start; the message is one line saying what is missing."""


def check_cluster(timeout: float = TIMEOUT_SECONDS) -> str | None:
    """Raise StartupError when the cluster is unusable; return a warning line when the CRDs are missing."""
    if os.path.exists(SERVICE_ACCOUNT_TOKEN):
        return None  # in a pod: the service account, checked by kopf's own login
    try:
        login = load_kubeconfig()
    except KubeconfigError as exc:
        raise StartupError(str(exc)) from None
    conn = connection_from_login(login)
    headers = {"Accept": "application/json"}
    try:
        token = conn.tokens.token() if conn.tokens is not None else conn.token
    except KubeconfigError as exc:
        raise StartupError(str(exc)) from None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    auth = httpx.BasicAuth(conn.username, conn.password) if conn.username and conn.password else None
    where = f"the Kubernetes API at {login.server} (context {login.context})"
    try:
        with httpx.Client(
            base_url=login.server, headers=headers, auth=auth, verify=tls_context(conn), timeout=timeout
        ) as client:
            version = client.get("/version")
            if version.status_code == 401:
                raise StartupError(f"{where} rejects the credentials of the kubeconfig (401)")
            crds = client.get(f"/apis/{GROUP}/{VERSION}")
    except httpx.HTTPError as exc:
        raise StartupError(f"cannot reach {where}: {exc or type(exc).__name__}") from None
    if crds.status_code == 404:
        return (
            f"the KiloClaw CRDs ({GROUP}/{VERSION}) are not installed in context {login.context}: "
            "waiting for them (kubectl apply -k crds/)"
        )
    return None
