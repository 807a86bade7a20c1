"""The deploy/ manifests and the Dockerfile: they build, validate offline, and stay least-privilege and safe.

Also home of `missing_rbac` / `rbac_request`: the end-to-end suite feeds the emulated API's request log
through them, so an API call the operator starts making without a matching RBAC rule fails a test.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import kubernetes_validate
import pytest
import yaml

from kiloclaw_operator.config import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZATIONS = {"base": DEPLOY, "shard-b": DEPLOY / "overlays" / "shard-b"}
KUBERNETES_VERSION = "1.32"  # the kubectl on the build machines; the API the manifests must fit
OPERATOR_UID = 65532

# (verb, apiGroup, resource or "resource/subresource"); "" is the core group.
RbacCall = tuple[str, str, str]

# Every call the operator (kopf 1.45 standalone + kube.py) makes, as documented in deploy/base/rbac.yaml.
# The ClusterRole must grant exactly these: nothing missing, nothing extra.
OPERATOR_CALLS: frozenset[RbacCall] = frozenset(
    {
        *((verb, "kiloclaw.kilo.ai", "kiloclawinstances") for verb in ("get", "list", "watch", "patch")),
        ("patch", "kiloclaw.kilo.ai", "kiloclawinstances/status"),
        *(
            (verb, "kiloclaw.kilo.ai", "kiloclawretainedvolumes")
            for verb in ("get", "list", "watch", "create", "patch", "delete")
        ),
        ("patch", "kiloclaw.kilo.ai", "kiloclawretainedvolumes/status"),
        ("create", "", "events"),
        ("list", "apiextensions.k8s.io", "customresourcedefinitions"),
        ("watch", "apiextensions.k8s.io", "customresourcedefinitions"),
        ("list", "", "namespaces"),
        ("watch", "", "namespaces"),
        ("get", "", "namespaces"),  # the Fly app binding (tenancy.py)
    }
)
# Leader election (leadership.py) and the sandbox claims (tenancy.py), granted by a Role in the operator's
# namespace.
LEADER_ELECTION_CALLS: frozenset[RbacCall] = frozenset(
    (verb, "coordination.k8s.io", "leases") for verb in ("get", "list", "create", "update", "delete")
)


# --- RBAC evaluation (reusable by the end-to-end tests) -------------------------------------------------


def _grants(rule: Mapping[str, Any], call: RbacCall) -> bool:
    verb, group, resource = call

    def allows(field: str, value: str) -> bool:
        values = rule.get(field) or []
        return "*" in values or value in values

    if rule.get("nonResourceURLs"):
        return False
    if rule.get("resourceNames"):
        # Name-restricted rules never cover list/watch/create; the operator's calls are never name-bound.
        return False
    if not (allows("verbs", verb) and allows("apiGroups", group)):
        return False
    resources = rule.get("resources") or []
    if resource in resources or "*" in resources:
        return True
    # "*/status" grants the status subresource of every resource in the group.
    return "/" in resource and f"*/{resource.split('/', 1)[1]}" in resources


def missing_rbac(seen: set[RbacCall], rules: Iterable[Mapping[str, Any]]) -> set[RbacCall]:
    """The calls in `seen` that no rule grants, by Kubernetes RBAC semantics (union of rules, '*' matches)."""
    rule_list = list(rules)
    return {call for call in seen if not any(_grants(rule, call) for rule in rule_list)}


def operator_rbac_rules() -> list[dict[str, Any]]:
    """The rules of the operator's ClusterRole and of its leader-election Role, read from
    deploy/base/rbac.yaml (no kubectl needed). The Role only holds in the operator's namespace, which the
    request log's namespace-free calls cannot tell apart; test_deploy checks the Role's namespace.

    For the end-to-end suite: `assert missing_rbac(kube_api.rbac_verbs_seen, operator_rbac_rules()) == set()`.
    """
    documents = list(yaml.safe_load_all((DEPLOY / "base" / "rbac.yaml").read_text()))
    roles = [d for d in documents if d and d["kind"] in ("ClusterRole", "Role")]
    return [rule for role in roles for rule in role["rules"]]


_CORE_PREFIX = ("api", "v1")
_WRITE_VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update"}


def rbac_request(method: str, path: str, query: Mapping[str, str] | None = None) -> RbacCall | None:
    """Map one HTTP request to the Kubernetes API onto the RBAC call it needs, like the API server does.

    Returns None for non-resource requests (discovery: /api, /apis, /apis/GROUP/VERSION, /version,
    /openapi/...), which every authenticated user may make through the system:discovery role.
    """
    path, _, query_string = path.partition("?")
    query = {**dict(parse_qsl(query_string)), **(query or {})}
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 2 and tuple(parts[:2]) == _CORE_PREFIX:
        group, rest = "", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        return None
    watch_path = bool(rest) and rest[0] == "watch"
    if watch_path:
        rest = rest[1:]
    if not rest:
        return None
    # /namespaces/NS/RESOURCE... is namespaced; /namespaces and /namespaces/NAME[/status] address namespaces.
    if rest[0] == "namespaces" and len(rest) >= 3:
        rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) >= 2 else None
    subresource = rest[2] if len(rest) >= 3 else None
    target = f"{resource}/{subresource}" if subresource else resource
    method = method.upper()
    if method == "GET":
        watching = watch_path or query.get("watch") in ("true", "1")
        verb = "watch" if watching else ("get" if name else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    elif method in _WRITE_VERBS:
        verb = _WRITE_VERBS[method]
    else:
        return None
    return (verb, group, target)


# --- rendering ------------------------------------------------------------------------------------------


@functools.cache
def _render(kustomization: str) -> tuple[list[dict[str, Any]], str]:
    """(manifests, error): kubectl kustomize output of one kustomization, or why it did not build."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return [], "kubectl not on PATH"
    result = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZATIONS[kustomization])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        return [], f"kubectl kustomize {KUSTOMIZATIONS[kustomization]} failed: {result.stderr.strip()}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc], ""


def rendered(kustomization: str) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: cannot build the kustomizations")
    manifests, error = _render(kustomization)
    assert not error, error
    return manifests


def _manifest_ids() -> Iterator[Any]:
    for kustomization in KUSTOMIZATIONS:
        manifests, _ = _render(kustomization)
        if not manifests:
            # kubectl missing or the build failed: one case that reports it.
            yield pytest.param(kustomization, -1, id=f"{kustomization}-build")
            continue
        for index, manifest in enumerate(manifests):
            ident = f"{kustomization}-{manifest.get('kind')}-{manifest.get('metadata', {}).get('name')}"
            yield pytest.param(kustomization, index, id=ident)


def only(manifests: Sequence[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def of_kind(manifests: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def env_of(container: Mapping[str, Any]) -> dict[str, Any]:
    return {item["name"]: item for item in container.get("env", [])}


def operator_container(deployment: Mapping[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return dict(containers[0])


# --- kustomize builds and schema validation -------------------------------------------------------------


@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_kustomization_builds_with_kubectl(kustomization: str) -> None:
    manifests = rendered(kustomization)
    kinds = {m["kind"] for m in manifests}
    assert {
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Service",
        "Deployment",
    } <= kinds
    crds = {m["metadata"]["name"] for m in of_kind(manifests, "CustomResourceDefinition")}
    assert crds == {"kiloclawinstances.kiloclaw.kilo.ai", "kiloclawretainedvolumes.kiloclaw.kilo.ai"}


@pytest.mark.parametrize(("kustomization", "index"), list(_manifest_ids()))
def test_rendered_manifest_validates_against_the_kubernetes_schema(kustomization: str, index: int) -> None:
    manifests = rendered(kustomization)
    manifest = manifests[index]
    try:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        pytest.skip(f"kubernetes-validate has no schema for {manifest['apiVersion']} {manifest['kind']}")
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{manifest['kind']} {manifest['metadata'].get('name')}: {exc.message}")


def test_every_namespaced_object_lands_in_the_operator_namespace() -> None:
    cluster_scoped = {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "FlowSchema",
    }
    for kustomization in KUSTOMIZATIONS:
        for manifest in rendered(kustomization):
            namespace = manifest["metadata"].get("namespace")
            if manifest["kind"] in cluster_scoped:
                assert namespace is None, manifest["metadata"]["name"]
            else:
                assert namespace == "kiloclaw-system", (manifest["kind"], manifest["metadata"]["name"])


def test_crds_are_protected_from_gitops_pruning() -> None:
    for crd in of_kind(rendered("base"), "CustomResourceDefinition"):
        annotations = crd["metadata"]["annotations"]
        assert annotations["argocd.argoproj.io/sync-options"] == "Prune=false,Delete=false"
        assert annotations["kustomize.toolkit.fluxcd.io/prune"] == "disabled"


# --- the Deployment -------------------------------------------------------------------------------------


def test_deployment_runs_two_non_root_replicas_with_a_locked_down_container() -> None:
    deployment = only(rendered("base"), "Deployment", "kiloclaw-operator")
    spec = deployment["spec"]
    # Two replicas, one active (leader election); a rollout replaces one pod at a time.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "kiloclaw-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == OPERATOR_UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("hostNetwork", False) is False
    container = operator_container(deployment)
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == OPERATOR_UID
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    # The read-only root filesystem needs a writable /tmp.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_deployment_elects_its_leader_on_a_lease_named_per_shard_with_the_pod_name_as_identity() -> None:
    container = operator_container(only(rendered("base"), "Deployment"))
    env = env_of(container)
    assert env["KILOCLAW_LEASE_NAME"]["value"] == "kiloclaw-operator"
    assert env["KILOCLAW_LEASE_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["KILOCLAW_LEASE_IDENTITY"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "KILOCLAW_LEADER_ELECTION" not in env, "on by default"


def test_pod_disruption_budget_keeps_one_replica_of_each_shard() -> None:
    manifests = rendered("shard-b")
    budgets = {pdb["metadata"]["name"]: pdb for pdb in of_kind(manifests, "PodDisruptionBudget")}
    deployments = {d["metadata"]["name"]: d for d in of_kind(manifests, "Deployment")}
    assert set(budgets) == set(deployments)
    for name, budget in budgets.items():
        assert budget["spec"]["minAvailable"] == 1
        assert budget["spec"]["selector"] == deployments[name]["spec"]["selector"]


def test_leader_election_role_grants_leases_only_in_the_operator_namespace() -> None:
    manifests = rendered("base")
    role = only(manifests, "Role", "kiloclaw-operator-leader-election")
    assert role["metadata"]["namespace"] == "kiloclaw-system"
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "list", "create", "update", "delete"],
        }
    ]
    binding = only(manifests, "RoleBinding", "kiloclaw-operator-leader-election")
    assert binding["metadata"]["namespace"] == "kiloclaw-system"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "kiloclaw-operator-leader-election",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kiloclaw-operator", "namespace": "kiloclaw-system"}
    ]
    assert not any(
        "coordination.k8s.io" in rule["apiGroups"]
        for rule in only(manifests, "ClusterRole", "kiloclaw-operator")["rules"]
    )


def test_deployment_sets_resource_requests_and_limits() -> None:
    container = operator_container(only(rendered("base"), "Deployment"))
    resources = container["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"cpu", "memory"}


def test_deployment_probes_kopf_health_endpoint_and_exposes_metrics() -> None:
    container = operator_container(only(rendered("base"), "Deployment"))
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = env_of(container)
    settings_defaults = Settings()
    assert int(env["KILOCLAW_HEALTH_PORT"]["value"]) == ports["health"] == settings_defaults.health_port
    assert int(env["KILOCLAW_METRICS_PORT"]["value"]) == ports["metrics"] == settings_defaults.metrics_port


def test_fly_token_is_a_file_mounted_from_the_secret_so_rotation_needs_no_restart() -> None:
    manifests = rendered("base")
    assert not of_kind(manifests, "Secret"), "the Fly token Secret is created by the user, never committed"
    deployment = only(manifests, "Deployment")
    container = operator_container(deployment)
    env = env_of(container)
    assert "FLY_API_TOKEN" not in env, "an environment variable would need a restart to rotate"
    token_file = env["FLY_API_TOKEN_FILE"]["value"]
    mount = next(m for m in container["volumeMounts"] if token_file.startswith(m["mountPath"] + "/"))
    assert mount.get("readOnly") is True and "subPath" not in mount, "subPath mounts never see updates"
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "kiloclaw-fly"
    assert volume["secret"]["items"] == [{"key": "token", "path": token_file.rsplit("/", 1)[1]}]


def test_deployment_environment_names_only_settings_the_operator_reads() -> None:
    known = {
        alias
        for field in Settings.model_fields.values()
        for alias in getattr(field.validation_alias, "choices", ())
        if isinstance(alias, str)
    }
    container = operator_container(only(rendered("base"), "Deployment"))
    # HOME is for the Python runtime on a read-only root filesystem, not an operator setting.
    assert set(env_of(container)) - {"HOME"} <= known
    assert env_of(container)["KILOCLAW_NAMESPACES"]["value"] == "", "the base serves all namespaces"


def test_metrics_service_selects_the_operator_pods_and_carries_scrape_annotations() -> None:
    manifests = rendered("base")
    service = only(manifests, "Service")
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9090"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = only(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# --- the shard overlay ----------------------------------------------------------------------------------


def test_shard_overlay_runs_two_operators_on_disjoint_namespace_sets() -> None:
    manifests = rendered("shard-b")
    deployments = {d["metadata"]["name"]: d for d in of_kind(manifests, "Deployment")}
    assert set(deployments) == {"kiloclaw-operator", "kiloclaw-operator-shard-b"}
    namespace_sets = {}
    for name, deployment in deployments.items():
        value = env_of(operator_container(deployment))["KILOCLAW_NAMESPACES"]["value"]
        namespace_sets[name] = {ns.strip() for ns in value.split(",") if ns.strip()}
        assert namespace_sets[name], f"{name} must list its namespaces (empty means all)"
        assert deployment["spec"]["replicas"] == 2
    leases = {
        name: env_of(operator_container(d))["KILOCLAW_LEASE_NAME"]["value"] for name, d in deployments.items()
    }
    assert len(set(leases.values())) == 2, f"each shard needs its own Lease: {leases}"
    assert not namespace_sets["kiloclaw-operator"] & namespace_sets["kiloclaw-operator-shard-b"]
    # Each Deployment selects only its own pods.
    selectors = [d["spec"]["selector"]["matchLabels"] for d in deployments.values()]
    for deployment, selector in zip(deployments.values(), selectors, strict=True):
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
        others = [d for d in deployments.values() if d is not deployment]
        for other in others:
            assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()
    # One ServiceAccount, one operator ClusterRole, one metrics Service for all shards.
    assert [
        r["metadata"]["name"]
        for r in of_kind(manifests, "ClusterRole")
        if "kiloclaw-operator" in r["metadata"]["name"]
    ] == ["kiloclaw-operator"]
    service_selector = only(manifests, "Service")["spec"]["selector"]
    for deployment in deployments.values():
        assert service_selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "kiloclaw-operator"


# --- RBAC -----------------------------------------------------------------------------------------------


def cluster_role_rules(manifests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(only(manifests, "ClusterRole", "kiloclaw-operator")["rules"])


def test_rbac_rules_use_no_wildcards() -> None:
    for role in of_kind(rendered("base"), "ClusterRole") + of_kind(rendered("base"), "Role"):
        for rule in role["rules"]:
            for field in ("verbs", "apiGroups", "resources", "nonResourceURLs"):
                assert not any("*" in value for value in rule.get(field, [])), (field, rule)


def test_rbac_grants_exactly_the_calls_the_operator_makes() -> None:
    manifests = rendered("base")
    rules = cluster_role_rules(manifests) + list(
        only(manifests, "Role", "kiloclaw-operator-leader-election")["rules"]
    )
    assert rules == operator_rbac_rules()
    assert missing_rbac(set(OPERATOR_CALLS | LEADER_ELECTION_CALLS), rules) == set()
    granted = {
        (verb, group, resource)
        for rule in rules
        for verb in rule["verbs"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert granted - OPERATOR_CALLS - LEADER_ELECTION_CALLS == set(), (
        "granted but not used: remove, or document the call"
    )


def test_rbac_binds_the_role_to_the_operator_service_account() -> None:
    manifests = rendered("base")
    binding = only(manifests, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "kiloclaw-operator",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kiloclaw-operator", "namespace": "kiloclaw-system"}
    ]


def test_missing_rbac_reports_calls_no_rule_grants() -> None:
    rules = [
        {"apiGroups": ["kiloclaw.kilo.ai"], "resources": ["kiloclawinstances"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        {"apiGroups": ["apps"], "resources": ["*"], "verbs": ["get"]},
        {"apiGroups": ["kiloclaw.kilo.ai"], "resources": ["*/status"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["kiloclaw-fly"], "verbs": ["get"]},
    ]
    seen = {
        ("get", "kiloclaw.kilo.ai", "kiloclawinstances"),
        ("watch", "kiloclaw.kilo.ai", "kiloclawinstances"),  # verb not granted
        ("patch", "kiloclaw.kilo.ai", "kiloclawinstances/status"),  # via */status
        ("patch", "kiloclaw.kilo.ai", "kiloclawinstances"),  # */status does not grant the main resource
        ("get", "kiloclaw.kilo.ai", "kiloclawinstances/status"),  # subresource needs its own rule
        ("create", "", "events"),
        ("create", "events.k8s.io", "events"),  # other group
        ("get", "apps", "deployments"),  # resource wildcard
        ("list", "", "secrets"),  # resourceNames rules never grant list
    }
    assert missing_rbac(seen, rules) == {
        ("watch", "kiloclaw.kilo.ai", "kiloclawinstances"),
        ("patch", "kiloclaw.kilo.ai", "kiloclawinstances"),
        ("get", "kiloclaw.kilo.ai", "kiloclawinstances/status"),
        ("create", "events.k8s.io", "events"),
        ("list", "", "secrets"),
    }


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        (
            "GET",
            "/apis/kiloclaw.kilo.ai/v1alpha1/kiloclawinstances",
            {},
            ("list", "kiloclaw.kilo.ai", "kiloclawinstances"),
        ),
        (
            "GET",
            "/apis/kiloclaw.kilo.ai/v1alpha1/namespaces/tenants/kiloclawinstances",
            {"watch": "true", "resourceVersion": "12"},
            ("watch", "kiloclaw.kilo.ai", "kiloclawinstances"),
        ),
        (
            "GET",
            "/apis/kiloclaw.kilo.ai/v1alpha1/watch/namespaces/tenants/kiloclawinstances",
            {},
            ("watch", "kiloclaw.kilo.ai", "kiloclawinstances"),
        ),
        (
            "GET",
            "/apis/kiloclaw.kilo.ai/v1alpha1/namespaces/tenants/kiloclawinstances/alice",
            {},
            ("get", "kiloclaw.kilo.ai", "kiloclawinstances"),
        ),
        (
            "PATCH",
            "/apis/kiloclaw.kilo.ai/v1alpha1/namespaces/tenants/kiloclawinstances/alice/status",
            {},
            ("patch", "kiloclaw.kilo.ai", "kiloclawinstances/status"),
        ),
        (
            "POST",
            "/apis/kiloclaw.kilo.ai/v1alpha1/namespaces/tenants/kiloclawretainedvolumes",
            {},
            ("create", "kiloclaw.kilo.ai", "kiloclawretainedvolumes"),
        ),
        (
            "DELETE",
            "/apis/kiloclaw.kilo.ai/v1alpha1/namespaces/tenants/kiloclawretainedvolumes/alice-vol-5xk2",
            {},
            ("delete", "kiloclaw.kilo.ai", "kiloclawretainedvolumes"),
        ),
        ("POST", "/api/v1/namespaces/tenants/events", {}, ("create", "", "events")),
        ("GET", "/api/v1/namespaces", {}, ("list", "", "namespaces")),
        ("GET", "/api/v1/namespaces", {"watch": "1"}, ("watch", "", "namespaces")),
        ("GET", "/api/v1/namespaces/tenants", {}, ("get", "", "namespaces")),
        ("PUT", "/api/v1/namespaces/tenants/configmaps/x", {}, ("update", "", "configmaps")),
        ("DELETE", "/api/v1/namespaces/tenants/configmaps", {}, ("deletecollection", "", "configmaps")),
        (
            "GET",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions?watch=true",
            {},
            ("watch", "apiextensions.k8s.io", "customresourcedefinitions"),
        ),
        ("GET", "/api", {}, None),
        ("GET", "/api/v1", {}, None),
        ("GET", "/apis", {}, None),
        ("GET", "/apis/kiloclaw.kilo.ai/v1alpha1", {}, None),
        ("GET", "/version", {}, None),
    ],
)
def test_rbac_request_maps_http_requests_to_rbac_calls(
    method: str, path: str, query: dict[str, str], expected: RbacCall | None
) -> None:
    assert rbac_request(method, path, query) == expected


# --- Dockerfile -----------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    instructions = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python_base() -> None:
    instructions = dockerfile_instructions()
    # FROM ${BASE}: the default of the BASE build argument is what users build on (the tests override it).
    defaults = dict(a.split("=", 1) for keyword, a in instructions if keyword == "ARG" and "=" in a)
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], args.split()[0])
        for keyword, args in instructions
        if keyword == "FROM"
    ]
    assert len(bases) >= 2, "build and runtime stages"
    for base in bases:
        # python:3.11.X-slim-<debian> pinned by digest: never "latest" nor a floating tag.
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?@sha256:[0-9a-f]{64}", base), base
    assert len(set(bases)) == 1, "the venv copied between stages needs the same interpreter"


def test_dockerfile_runs_as_the_numeric_non_root_user_the_deployment_expects() -> None:
    users = [args for keyword, args in final_stage(dockerfile_instructions()) if keyword == "USER"]
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) == OPERATOR_UID
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_dockerfile_entrypoint_is_the_operator_and_ports_match_the_deployment() -> None:
    runtime = final_stage(dockerfile_instructions())
    entrypoints = [args for keyword, args in runtime if keyword == "ENTRYPOINT"]
    assert entrypoints == ['["kiloclaw-operator", "run"]']
    exposed = {
        int(port.split("/")[0]) for keyword, args in runtime if keyword == "EXPOSE" for port in args.split()
    }
    assert exposed == {8080, 9090}
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^kiloclaw-operator = "kiloclaw_operator\.__main__:main"$', pyproject, re.MULTILINE)


def test_dockerfile_bakes_in_no_secrets_and_no_build_tools() -> None:
    instructions = dockerfile_instructions()
    secret_name = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|PRIVATE_KEY)", re.IGNORECASE)
    for keyword, args in instructions:
        if keyword in ("ENV", "ARG"):
            for assignment in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)(?:=|\s|$)", args):
                assert not secret_name.search(assignment), f"{keyword} {args}"
        if keyword in ("COPY", "ADD"):
            assert ".env" not in args.split() and "kubeconfig" not in args.lower(), args
    runtime_commands = " ".join(args for keyword, args in final_stage(instructions) if keyword == "RUN")
    for tool in ("gcc", "build-essential", "make", "apt-get install"):
        assert tool not in runtime_commands, f"{tool} in the runtime stage"


def test_dockerignore_sends_only_the_package_sources_to_the_build() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "ignore everything, then allow the build inputs"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "operator"}
    copied = {
        source.rstrip("/")
        for keyword, args in dockerfile_instructions()
        if keyword == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    }
    assert copied <= allowed


# --- GitOps examples ------------------------------------------------------------------------------------


def test_gitops_examples_point_at_paths_that_exist() -> None:
    application_docs = list(yaml.safe_load_all((DEPLOY / "argocd" / "application.yaml").read_text()))
    flux_docs = list(yaml.safe_load_all((DEPLOY / "flux" / "kiloclaw.yaml").read_text()))
    paths = [doc["spec"]["source"]["path"] for doc in application_docs]
    paths += [doc["spec"]["path"] for doc in flux_docs if doc["kind"] == "Kustomization"]
    assert "deploy" in [p.removeprefix("./") for p in paths]
    for path in paths:
        assert (REPO / path).is_dir(), path
    kustomizations = {d["metadata"]["name"]: d for d in flux_docs if d["kind"] == "Kustomization"}
    assert kustomizations["kiloclaw-operator"]["spec"]["wait"] is True
    instances = kustomizations["kiloclaw-instances-tenants"]
    assert instances["spec"]["dependsOn"] == [{"name": "kiloclaw-operator"}]
    assert {check["kind"] for check in instances["spec"]["healthChecks"]} == {"KiloClawInstance"}


# --- user-facing roles and admission policies (SECURITY.md) ---------------------------------------------


def test_user_roles_are_aggregated_into_view_edit_and_admin() -> None:
    manifests = rendered("base")
    view = only(manifests, "ClusterRole", "kiloclaw-view")
    edit = only(manifests, "ClusterRole", "kiloclaw-edit")
    prefix = "rbac.authorization.k8s.io/aggregate-to-"
    assert {f"{prefix}view", f"{prefix}edit", f"{prefix}admin"} <= set(view["metadata"]["labels"])
    assert {f"{prefix}edit", f"{prefix}admin"} <= set(edit["metadata"]["labels"])
    assert f"{prefix}view" not in edit["metadata"]["labels"]


def test_the_edit_role_runs_instances_and_deletes_retained_volumes_but_never_mints_or_writes_status() -> None:
    manifests = rendered("base")
    for name in ("kiloclaw-view", "kiloclaw-edit"):
        rules = only(manifests, "ClusterRole", name)["rules"]
        forbidden = [("create", "kiloclaw.kilo.ai", "kiloclawretainedvolumes")] + [
            (verb, "kiloclaw.kilo.ai", sub)
            for sub in ("kiloclawinstances/status", "kiloclawretainedvolumes/status")
            for verb in ("update", "patch")
        ]
        for call in forbidden:
            assert not any(_grants(rule, call) for rule in rules), (name, call)
    edit = only(manifests, "ClusterRole", "kiloclaw-edit")["rules"]
    for call in (
        ("create", "kiloclaw.kilo.ai", "kiloclawinstances"),
        ("patch", "kiloclaw.kilo.ai", "kiloclawinstances"),
        ("delete", "kiloclaw.kilo.ai", "kiloclawinstances"),
        ("patch", "kiloclaw.kilo.ai", "kiloclawretainedvolumes"),
        ("delete", "kiloclaw.kilo.ai", "kiloclawretainedvolumes"),
    ):
        assert any(_grants(rule, call) for rule in edit), call


@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_every_install_ships_both_admission_policies_bound_to_deny(kustomization: str) -> None:
    manifests = rendered(kustomization)
    policies = {p["metadata"]["name"] for p in of_kind(manifests, "ValidatingAdmissionPolicy")}
    assert policies == {"kiloclaw-namespace-binding", "kiloclaw-retained-volumes-operator-only"}
    bindings = {b["spec"]["policyName"]: b for b in of_kind(manifests, "ValidatingAdmissionPolicyBinding")}
    assert set(bindings) == policies
    assert all(b["spec"]["validationActions"] == ["Deny"] for b in bindings.values())
    only_operator = only(manifests, "ValidatingAdmissionPolicy", "kiloclaw-retained-volumes-operator-only")
    (rule,) = only_operator["spec"]["validations"]
    service_account = only(manifests, "ServiceAccount")
    account = service_account["metadata"]
    assert f"system:serviceaccount:{account['namespace']}:{account['name']}" in rule["expression"]


@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_every_install_puts_the_operators_lease_requests_in_the_leader_election_priority_level(
    kustomization: str,
) -> None:
    """A renewal must not queue behind the operator's own burst of status writes (a 429 there lets the Lease
    lapse mid-burst): Lease updates in the operator's namespace (a leader's renewal is one conditional update)
    match a FlowSchema of `leader-election`; the claims' gets and creates do not crowd that level."""
    manifests = rendered(kustomization)
    schema = only(manifests, "FlowSchema", "kiloclaw-operator-leases")
    assert "namespace" not in schema["metadata"]  # cluster-scoped
    spec = schema["spec"]
    assert spec["priorityLevelConfiguration"]["name"] == "leader-election"
    assert 100 < spec["matchingPrecedence"] < 9000  # after the system's, before `service-accounts`
    (rule,) = spec["rules"]
    account = only(manifests, "ServiceAccount")["metadata"]
    assert rule["subjects"] == [
        {
            "kind": "ServiceAccount",
            "serviceAccount": {"name": account["name"], "namespace": account["namespace"]},
        }
    ]
    assert rule["resourceRules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["update"],
            "namespaces": [account["namespace"]],
        }
    ]
