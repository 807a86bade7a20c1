"""The monitoring component (deploy/monitoring/): it renders into the install, and Prometheus's own promtool
accepts its alerting rules, fires each alert on the series that mean trouble, and lints the metrics the
operator really serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from processes import (
    create_instance,
    free_port,
    operator_env,
    simulators,
    start_operator,
    stop,
    wait_for_metrics,
)
from promtool_binary import GoMissing, promtool

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
OVERLAY = REPO / "deploy" / "overlays" / "monitored"
ALERT_TESTS = Path(__file__).resolve().parents[1] / "monitoring" / "alerts_test.yaml"
KUBECTL = shutil.which("kubectl")

pytestmark = [
    pytest.mark.xdist_group("promtool"),  # one worker builds promtool (once per pin) and uses it
    pytest.mark.timeout(1800),  # a cold promtool build takes minutes on two busy cores
]


@pytest.fixture(scope="session")
def promtool_path() -> Path:
    try:
        return promtool()
    except GoMissing as exc:
        pytest.skip(str(exc))


def rule_groups() -> dict[str, Any]:
    rule: dict[str, Any] = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    spec: dict[str, Any] = rule["spec"]
    return spec


def run(
    command: list[str | Path], stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command], input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd
    )


# --- the component in the install ------------------------------------------------------------------------


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (.ci/run installs it)")
def test_the_monitored_overlay_adds_a_podmonitor_the_rules_and_the_dashboard_to_the_install() -> None:
    assert KUBECTL is not None
    result = run([KUBECTL, "kustomize", OVERLAY])
    assert result.returncode == 0, result.stderr
    manifests = {(m["kind"], m["metadata"]["name"]): m for m in yaml.safe_load_all(result.stdout) if m}
    monitor = manifests[("PodMonitor", "kiloclaw-operator")]
    deployment = manifests[("Deployment", "kiloclaw-operator")]
    pod = deployment["spec"]["template"]
    # The PodMonitor selects the operator pods and scrapes the port the container declares.
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    # The alerts' job label is what the PodMonitor's jobLabel produces.
    assert pod["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "kiloclaw-operator"
    exprs = [
        r["expr"]
        for g in manifests[("PrometheusRule", "kiloclaw-operator")]["spec"]["groups"]
        for r in g["rules"]
    ]
    assert any('up{job="kiloclaw-operator"}' in expr for expr in exprs)
    dashboard = manifests[("ConfigMap", "kiloclaw-operator-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kiloclaw-operator.json"])["uid"] == "kiloclaw-operator"
    for manifest in manifests.values():
        if manifest["kind"] not in (
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
            "FlowSchema",
        ):
            assert manifest["metadata"]["namespace"] == "kiloclaw-system", manifest["metadata"]["name"]


# --- promtool: rules ---------------------------------------------------------------------------------------


def test_promtool_accepts_the_alerting_rules(promtool_path: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule_groups()))
    result = run([promtool_path, "check", "rules", rules])
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = [r["alert"] for g in rule_groups()["groups"] for r in g["rules"]]
    assert f"SUCCESS: {len(alerts)} rules found" in result.stdout
    assert set(alerts) == {
        "KiloClawOperatorAbsent",
        "KiloClawRecoveryFailed",
        "KiloClawInstancesStalled",
        "KiloClawInstancesFailed",
        "KiloClawRetainedVolumeBlocked",
        "KiloClawFlyUnauthorized",
        "KiloClawFlyServerErrors",
    }


def test_each_alert_fires_on_trouble_and_stays_quiet_on_a_healthy_operator(
    promtool_path: Path, tmp_path: Path
) -> None:
    groups = rule_groups()
    for group in groups["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") != "KiloClawInstancesStalled":
                rule.pop("annotations", None)  # prose; promtool compares annotations exactly
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts_test.yaml")
    result = run([promtool_path, "test", "rules", "alerts_test.yaml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested == {r["alert"] for g in rule_groups()["groups"] for r in g["rules"]}


def dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_the_dashboards_queries_are_valid_promql(promtool_path: Path, tmp_path: Path) -> None:
    # promtool parses PromQL only inside rule files: each query becomes a recording rule.
    queries = [q.replace("$__rate_interval", "5m") for q in dashboard_queries()]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"q{i}", "expr": q} for i, q in enumerate(queries)]}
        ]
    }
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump(rules))
    result = run([promtool_path, "check", "rules", tmp_path / "dashboard.yaml"])
    assert result.returncode == 0, result.stdout + result.stderr


# --- promtool: the operator's real /metrics ---------------------------------------------------------------


@pytest.fixture(scope="module")
def operator_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/metrics of a `kiloclaw-operator run` process that has provisioned one instance (one for the module:
    the tests only read what it served)."""
    tmp_path = tmp_path_factory.mktemp("operator-metrics")
    with simulators("metrics") as (kube, fly):
        metrics_port = free_port()
        env = operator_env(
            kube.write_kubeconfig(tmp_path / "kubeconfig"),
            fly.base_url,
            KILOCLAW_METRICS_PORT=str(metrics_port),
        )
        process = start_operator(env, tmp_path / "operator.log")
        try:
            create_instance(kube, "metrics", "scraped", "acct-metrics")
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            yield wait_for_metrics(url, process, 'kiloclaw_instances{phase="Running"} 1.0')
        finally:
            stop(process)


@pytest.mark.slow  # an operator process
def test_promtool_lints_the_metrics_the_operator_serves_clean(
    promtool_path: Path, operator_metrics: str
) -> None:
    result = run([promtool_path, "check", "metrics"], stdin=operator_metrics)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


@pytest.mark.slow  # an operator process
def test_the_rules_and_the_dashboard_use_only_metrics_the_operator_serves(operator_metrics: str) -> None:
    served = {
        line.split()[2] for line in operator_metrics.splitlines() if line.startswith("# TYPE kiloclaw_")
    }
    histograms = {n for n in served if f"# TYPE {n} histogram" in operator_metrics}
    served |= {f"{h}_{suffix}" for h in histograms for suffix in ("bucket", "sum", "count")}
    used = set(re.findall(r"\bkiloclaw_[a-z_]+", json.dumps(rule_groups()) + " ".join(dashboard_queries())))
    assert used, "no kiloclaw metric in the rules or the dashboard"
    assert used <= served, f"not served by the operator: {sorted(used - served)}"
