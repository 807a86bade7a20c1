"""The Helm chart on a real API server (``--cluster``; ``make cluster && make e2e``): every object it renders,
with default values and with monitoring, passes a server-side dry run with strict field validation, as
deploy/ does in tests/e2e/test_install.py. (``helm install``/``uninstall`` for real:
tests/e2e/test_image_e2e.py.)"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

import realcluster
from charttools import NAMESPACE, ROOT, helm_or_skip, helm_template, kubectl_or_skip


@pytest.fixture(scope="module")
def kubeconfig(request: pytest.FixtureRequest) -> Iterator[str]:
    if not request.config.getoption("--cluster"):
        pytest.skip("needs a real API server: --cluster (make cluster && make e2e)")
    kubectl_or_skip()
    try:
        realcluster.load_access()
    except realcluster.NoCluster as exc:
        pytest.skip(str(exc))
    yield str(realcluster.kubeconfig_path())


def kubectl(kubeconfig: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        env=dict(os.environ, KUBECONFIG=kubeconfig),
    )


@pytest.mark.parametrize("sets", [(), ("crds.keep=false", "fly.orgSlug=acme", "operator.namespaces=team-*")])
def test_the_chart_passes_server_side_validation(kubeconfig: str, sets: tuple[str, ...]) -> None:
    helm = helm_or_skip()
    namespace = kubectl(kubeconfig, "apply", "-f", str(ROOT / "deploy" / "base" / "namespace.yaml"))
    assert namespace.returncode == 0, namespace.stderr
    rendered = helm_template(helm, *sets, namespace=NAMESPACE)
    dry_run = kubectl(kubeconfig, "apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=rendered)
    assert dry_run.returncode == 0, dry_run.stderr
    for kind in ("deployment.apps/", "clusterrole.rbac.authorization.k8s.io/", "poddisruptionbudget.policy/"):
        assert kind in dry_run.stdout, dry_run.stdout


def test_with_monitoring_only_the_prometheus_operator_kinds_are_unknown_to_a_bare_server(
    kubeconfig: str,
) -> None:
    """PodMonitor and PrometheusRule need the Prometheus Operator's CRDs, which a bare cluster lacks: the
    dry run checks the dashboard ConfigMap and reports the two kinds as unknown, nothing else."""
    helm = helm_or_skip()
    rendered = helm_template(helm, "monitoring.enabled=true", "crds.install=false", namespace=NAMESPACE)
    dry_run = kubectl(kubeconfig, "apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=rendered)
    assert "configmap/kiloclaw-operator-dashboard" in dry_run.stdout, dry_run.stdout
    errors = [
        line
        for line in dry_run.stderr.splitlines()
        if line.strip() and not line.startswith("Warning:") and "ensure CRDs are installed first" not in line
    ]
    assert len(errors) == 2, dry_run.stderr
    assert all("no matches for kind" in line for line in errors), dry_run.stderr
    assert any('kind "PodMonitor"' in line for line in errors), dry_run.stderr
    assert any('kind "PrometheusRule"' in line for line in errors), dry_run.stderr
