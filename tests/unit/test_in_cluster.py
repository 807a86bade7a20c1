"""In a pod the operator reaches the API server at the address the kubelet gives every container
(KUBERNETES_SERVICE_HOST/PORT), as client-go does, not at a DNS name only cluster DNS resolves. Found by
running the image (tests/e2e/test_image_e2e.py): kopf's ServiceAccount login says https://kubernetes.default.svc,
which a hostNetwork pod, or a cluster without DNS, cannot resolve. The official client's in-cluster loader
reads the same variables; these cases pin that down."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiloclaw_operator.kubeconfig import KubeconfigError, load_in_cluster

CA = "-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n"


def _login(tmp_path: Path, environ: dict[str, str]) -> tuple[str, str | None]:
    (tmp_path / "token").write_text("projected-token")
    (tmp_path / "ca.crt").write_text(CA)
    login = load_in_cluster(str(tmp_path / "token"), str(tmp_path / "ca.crt"), environ)
    assert login.credentials is not None
    return login.server, login.credentials.header()


def test_the_kubelets_service_host_and_port_are_the_api_servers_address(tmp_path: Path) -> None:
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert _login(tmp_path, environ) == ("https://10.96.0.1:443", "bearer projected-token")


def test_an_ipv6_service_host_is_bracketed(tmp_path: Path) -> None:
    environ = {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1", "KUBERNETES_SERVICE_PORT": "6443"}
    assert _login(tmp_path, environ)[0] == "https://[fd00:10:96::1]:6443"


def test_without_the_kubelets_variables_the_in_cluster_login_says_so_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(KubeconfigError, match=r"^in-cluster login: Service host/port is not set\.$"):
        _login(tmp_path, {"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
