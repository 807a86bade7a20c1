"""In a pod the operator reaches the API server at the address the kubelet gives every container
(KUBERNETES_SERVICE_HOST/PORT), as client-go does, not at a DNS name only cluster DNS resolves. Found by
running the image (tests/e2e/test_image_e2e.py): kopf's ServiceAccount login says https://kubernetes.default.svc,
which a hostNetwork pod, or a cluster without DNS, cannot resolve."""

from __future__ import annotations

from kiloclaw_operator.kube import in_cluster_server

KOPF_DEFAULT = "https://kubernetes.default.svc"


def test_the_kubelets_service_host_and_port_are_the_api_servers_address() -> None:
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert in_cluster_server(KOPF_DEFAULT, environ) == "https://10.96.0.1:443"


def test_an_ipv6_service_host_is_bracketed() -> None:
    environ = {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1", "KUBERNETES_SERVICE_PORT": "6443"}
    assert in_cluster_server(KOPF_DEFAULT, environ) == "https://[fd00:10:96::1]:6443"


def test_without_the_kubelets_variables_the_login_default_stays() -> None:
    assert in_cluster_server(KOPF_DEFAULT, {}) == KOPF_DEFAULT
    assert in_cluster_server(KOPF_DEFAULT, {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}) == KOPF_DEFAULT
