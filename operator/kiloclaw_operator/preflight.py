"""Checks ``kiloclaw-operator run`` makes before starting kopf, so that a missing cluster is one line and a
non-zero exit within seconds, not a minute of retries and tracebacks.

Fatal: no kubeconfig (outside a pod), the API server does not answer, it rejects the credentials. Not fatal:
the KiloClaw CRDs are missing — ``kubectl apply -k deploy/`` may start the operator before they are
established, and the operator serves them as soon as they appear — so that is one warning line.
"""

from __future__ import annotations

import httpx

from .kube import client_settings, connection_from_login
from .kubeconfig import KubeconfigError, in_a_pod, load_kubeconfig
from .models import GROUP, VERSION

TIMEOUT_SECONDS = 5.0


class StartupError(Exception):
    """The operator cannot start; the message is one line saying what is missing."""


def check_cluster(timeout: float = TIMEOUT_SECONDS) -> str | None:
    """Raise StartupError when the cluster is unusable; return a warning line when the CRDs are missing."""
    if in_a_pod():
        return None  # in a pod: the service account, checked by the login itself
    try:
        login = load_kubeconfig()
        settings = client_settings(connection_from_login(login))
    except KubeconfigError as exc:
        raise StartupError(str(exc)) from None
    where = f"the Kubernetes API at {login.server} (context {login.context})"
    try:
        with httpx.Client(**settings, timeout=timeout) as client:
            version = client.get("/version")
            if version.status_code == 401:
                raise StartupError(f"{where} rejects the credentials of the kubeconfig (401)")
            crds = client.get(f"/apis/{GROUP}/{VERSION}")
    except KubeconfigError as exc:  # an exec plugin failing when asked again after a 401
        raise StartupError(str(exc)) from None
    except httpx.HTTPError as exc:
        raise StartupError(f"cannot reach {where}: {exc or type(exc).__name__}") from None
    if crds.status_code == 404:
        return (
            f"the KiloClaw CRDs ({GROUP}/{VERSION}) are not installed in context {login.context}: "
            "waiting for them (kubectl apply -k crds/)"
        )
    return None
