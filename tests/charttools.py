"""Helm and kustomize renderings of the install, for the chart tests (tests/unit/test_chart.py, and the
real-server ones in tests/e2e/test_chart_e2e.py).

helm is built from its Go module by ``tests/helm/build.sh`` (cached under ~/.cache like the control plane);
the tests never build it (a cold build takes minutes): they skip, saying so, when it is not built yet.
``.ci/run`` builds it before ``make test``.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "kiloclaw-operator"
HELM_BUILD = ROOT / "tests" / "helm" / "build.sh"
KUBECTL = shutil.which("kubectl")
RELEASE = "kiloclaw-operator"
NAMESPACE = "kiloclaw-system"

# What Helm adds and kustomize does not (templates/_helpers.tpl, "kiloclaw.helmLabels"; the keep policy).
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/version")
HELM_ANNOTATIONS = ("helm.sh/resource-policy",)

Key = tuple[str, str, str, str]  # apiVersion, kind, namespace, name


def helm_or_skip() -> Path:
    if shutil.which("go") is None:
        pytest.skip("helm is built from its Go module and `go` is not on PATH")
    result = subprocess.run(
        [str(HELM_BUILD), "--path"], capture_output=True, text=True, timeout=60, check=True
    )
    helm = Path(result.stdout.strip())
    if not helm.is_file():
        pytest.skip(f"helm is not built yet ({helm}): run tests/helm/build.sh (minutes, once; .ci/run does)")
    return helm


def kubectl_or_skip() -> str:
    if KUBECTL is None:
        pytest.skip("kubectl (its built-in kustomize renders deploy/) is not installed")
    return KUBECTL


def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def helm_template(
    helm: Path, *sets: str, release: str = RELEASE, namespace: str = NAMESPACE, values: Path | None = None
) -> str:
    args: list[str | Path] = [helm, "template", release, CHART, "--namespace", namespace]
    for item in sets:
        args += ["--set", item]
    if values is not None:
        args += ["--values", values]
    return run(*args)


def kustomize(kubectl: str, directory: str) -> str:
    return run(kubectl, "kustomize", ROOT / directory)


def objects(rendered: str) -> dict[Key, dict[str, Any]]:
    """The objects of a multi-document rendering by identity; an object rendered twice is an error."""
    result: dict[Key, dict[str, Any]] = {}
    for doc in yaml.safe_load_all(rendered):
        if not doc:
            continue
        meta = doc["metadata"]
        key = (doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"])
        assert key not in result, f"{key} rendered twice"
        result[key] = doc
    return result


def without_helm_metadata(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as kustomize would render it: Helm's own labels and annotations removed."""
    obj = copy.deepcopy(obj)
    meta = obj["metadata"]
    for field, names in (("labels", HELM_LABELS), ("annotations", HELM_ANNOTATIONS)):
        values = meta.get(field) or {}
        for name in names:
            values.pop(name, None)
        if field in meta and not values:
            del meta[field]
    return obj
