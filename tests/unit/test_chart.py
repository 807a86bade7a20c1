"""The Helm chart (deploy/helm/kiloclaw-operator) against the kustomize base it must never drift from: for
the default values it renders exactly the objects ``kubectl kustomize deploy/`` renders, field by field, apart
from the labels and the keep policy that only Helm adds (and the Namespace, which Helm leaves to the admin,
see values.yaml). An object added to deploy/base without a template in the chart fails here, by name."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from charttools import (
    CHART,
    HELM_LABELS,
    NAMESPACE,
    Key,
    helm_or_skip,
    helm_template,
    kubectl_or_skip,
    kustomize,
    objects,
    run,
    without_helm_metadata,
)


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_or_skip()


@pytest.fixture(scope="module")
def kubectl() -> str:
    return kubectl_or_skip()


def assert_same_objects(chart: dict[Key, dict[str, Any]], base: dict[Key, dict[str, Any]]) -> None:
    missing = sorted(set(base) - set(chart))
    extra = sorted(set(chart) - set(base))
    assert not missing, f"in the kustomize base but not rendered by the chart (add a template): {missing}"
    assert not extra, f"rendered by the chart but not in the kustomize base: {extra}"
    for key, expected in base.items():
        actual = without_helm_metadata(chart[key])
        if actual != expected:
            diff = difflib.unified_diff(
                yaml.safe_dump(expected).splitlines(),
                yaml.safe_dump(actual).splitlines(),
                "kustomize",
                "helm",
                lineterm="",
            )
            raise AssertionError(f"{key} differs between kustomize and the chart:\n" + "\n".join(diff))


def test_helm_lint_passes_in_strict_mode(helm: Path) -> None:
    output = run(helm, "lint", "--strict", CHART)
    assert "1 chart(s) linted, 0 chart(s) failed" in output


def test_the_chart_with_default_values_renders_the_objects_of_the_kustomize_base(
    helm: Path, kubectl: str
) -> None:
    base = objects(kustomize(kubectl, "deploy"))
    namespace = base.pop(("v1", "Namespace", "", NAMESPACE))
    chart = objects(helm_template(helm))
    assert_same_objects(chart, base)
    # The Namespace, when the chart is asked for it, is the base's (plus the keep policy).
    with_namespace = objects(helm_template(helm, "namespace.create=true"))
    assert without_helm_metadata(with_namespace[("v1", "Namespace", "", NAMESPACE)]) == namespace


def test_the_chart_with_monitoring_renders_the_objects_of_the_monitored_overlay(
    helm: Path, kubectl: str
) -> None:
    base = objects(kustomize(kubectl, "deploy/overlays/monitored"))
    base.pop(("v1", "Namespace", "", NAMESPACE))
    chart = objects(helm_template(helm, "monitoring.enabled=true"))
    assert_same_objects(chart, base)


def test_every_object_the_chart_renders_carries_helms_labels_and_the_crds_are_kept_on_uninstall(
    helm: Path,
) -> None:
    chart = objects(helm_template(helm, "monitoring.enabled=true", "namespace.create=true"))
    for key, obj in chart.items():
        labels = obj["metadata"].get("labels") or {}
        assert set(HELM_LABELS) <= set(labels), (key, labels)
    crds = [obj for key, obj in chart.items() if key[1] == "CustomResourceDefinition"]
    assert {c["metadata"]["name"] for c in crds} == {
        "kiloclawinstances.kiloclaw.kilo.ai",
        "kiloclawretainedvolumes.kiloclaw.kilo.ai",
    }
    for obj in [*crds, chart[("v1", "Namespace", "", NAMESPACE)]]:
        assert obj["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    unkept = objects(helm_template(helm, "crds.keep=false"))
    assert not any(
        "helm.sh/resource-policy" in (o["metadata"].get("annotations") or {}) for o in unkept.values()
    )
    without_crds = objects(helm_template(helm, "crds.install=false"))
    assert not any(kind == "CustomResourceDefinition" for _, kind, _, _ in without_crds)


def test_values_reach_the_operator_and_a_second_release_names_every_object_apart(helm: Path) -> None:
    chart = objects(
        helm_template(
            helm,
            "operator.namespaces=team-b-*",
            "fly.orgSlug=acme",
            "image.digest=sha256:" + "a" * 64,
            "replicaCount=3",
            "podDisruptionBudget.minAvailable=2",
            release="shard-b",
            namespace="kiloclaw-shard-b",
        )
    )
    names = {(kind, name) for _, kind, _, name in chart}
    assert ("ClusterRole", "shard-b-kiloclaw-operator") in names
    assert ("Role", "shard-b-kiloclaw-operator-leader-election") in names
    deployment = chart[("apps/v1", "Deployment", "kiloclaw-shard-b", "shard-b-kiloclaw-operator")]
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    [container] = spec["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KILOCLAW_NAMESPACES"] == "team-b-*"
    assert env["FLY_ORG_SLUG"] == "acme"
    assert env["KILOCLAW_LEASE_NAME"] == "shard-b-kiloclaw-operator"
    assert container["image"] == "ghcr.io/kilo-org/kiloclaw-operator@sha256:" + "a" * 64
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "shard-b"
    binding = chart[("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "", "shard-b-kiloclaw-operator")]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "shard-b-kiloclaw-operator", "namespace": "kiloclaw-shard-b"}
    ]
    pdb = chart[("policy/v1", "PodDisruptionBudget", "kiloclaw-shard-b", "shard-b-kiloclaw-operator")]
    assert pdb["spec"]["minAvailable"] == 2


def test_the_chart_package_carries_the_crds_and_dashboard_it_links_to(helm: Path, tmp_path: Path) -> None:
    """files/ links to crds/ and deploy/monitoring/; a packaged chart (a chart repository's) holds copies."""
    run(helm, "package", CHART, "--destination", tmp_path)
    [package] = tmp_path.glob("kiloclaw-operator-*.tgz")
    rendered = objects(
        run(helm, "template", "kiloclaw-operator", package, "--set", "monitoring.enabled=true")
    )
    dashboard = rendered[("v1", "ConfigMap", "default", "kiloclaw-operator-dashboard")]
    assert json.loads(dashboard["data"]["kiloclaw-operator.json"])["panels"]
    assert any(k[1] == "CustomResourceDefinition" for k in rendered)


def test_the_retained_volume_policy_admits_the_releases_service_account_and_the_listed_extra_ones(
    helm: Path,
) -> None:
    def operator_only_rule(*sets: str, **release: str) -> str:
        chart = objects(helm_template(helm, *sets, **release))
        policy = chart[
            (
                "admissionregistration.k8s.io/v1",
                "ValidatingAdmissionPolicy",
                "",
                "kiloclaw-retained-volumes-operator-only",
            )
        ]
        expression: str = policy["spec"]["validations"][0]["expression"]
        return expression

    assert operator_only_rule(release="ops", namespace="platform") == (
        "request.userInfo.username in ['system:serviceaccount:platform:ops-kiloclaw-operator']"
    )
    shard = "system:serviceaccount:kiloclaw-shard-b:shard-b-kiloclaw-operator"
    assert operator_only_rule(f"tenancy.extraOperatorUsernames={{{shard}}}") == (
        f"request.userInfo.username in ['system:serviceaccount:kiloclaw-system:kiloclaw-operator', '{shard}']"
    )


def test_a_second_release_can_leave_the_cluster_wide_tenancy_objects_to_the_first(helm: Path) -> None:
    chart = objects(
        helm_template(
            helm,
            "tenancy.userRoles=false",
            "tenancy.admissionPolicies=false",
            release="shard-b",
            namespace="kiloclaw-shard-b",
        )
    )
    kinds = {(kind, name) for _, kind, _, name in chart}
    assert ("ClusterRole", "kiloclaw-edit") not in kinds
    assert not any(kind.startswith("ValidatingAdmissionPolicy") for kind, _ in kinds)
    assert ("ClusterRole", "shard-b-kiloclaw-operator") in kinds
