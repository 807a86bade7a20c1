"""The CRDs in crds/ and the examples in examples/, checked with kubesim.crdschema.

Every rule of the contract (DESIGN section 2) has a test that feeds a bad value and expects the API-server
style rejection; the examples must pass; the defaults must be the documented ones; and the CRDs must be
structural, described and shaped for ``kubectl get`` as designed.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Protocol

import httpx
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

import realcluster
from builders import instance_body, retained_body
from kiloclaw_operator import models
from kubesim import crdschema

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
EXAMPLES_DIR = ROOT / "examples"
KUBECTL = shutil.which("kubectl")

DELETE = object()  # marker for "remove this field" in with_fields


def _load(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict)
    return loaded


INSTANCE_CRD = _load(CRD_DIR / "kiloclawinstances.yaml")
RETAINED_CRD = _load(CRD_DIR / "kiloclawretainedvolumes.yaml")
INSTANCE_SCHEMA = crdschema.load_crd_schema(INSTANCE_CRD, "v1alpha1")
RETAINED_SCHEMA = crdschema.load_crd_schema(RETAINED_CRD, "v1alpha1")
SCHEMAS = {"KiloClawInstance": INSTANCE_SCHEMA, "KiloClawRetainedVolume": RETAINED_SCHEMA}


# ------------------------------------------------------------------------------------------------ builders


SANDBOX = "ki_0a1b2c3d4e5f4a5b8c9d0e1f2a3b4c5d"  # as real sandbox ids: ki_ and 32 hex digits
APP = "acct-3f9a1c"


def instance() -> dict[str, Any]:
    return instance_body("alice", "tenants", sandboxId=SANDBOX, userId="user-123", flyApp=APP)


def running_status() -> dict[str, Any]:
    return {
        "phase": "Running",
        "observedGeneration": 3,
        "machineId": "148e0f2b7d9089",
        "volumeId": "vol_5xk2r9w7q1m3p8zd",
        "region": "ord",
        "flyState": "started",
        "observedAt": "2026-11-25T12:00:00Z",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Running",
                "message": "machine started",
                "lastTransitionTime": "2026-11-25T12:00:00Z",
                "observedGeneration": 3,
            }
        ],
        "recovery": {
            "id": "01JDQ8Z6V4K7M2N9P3R5T8W1XY",
            "startedAt": "2026-11-25T12:00:00Z",
            "deadline": "2026-11-25T12:10:00Z",
            "step": "ReplacementVolumeCreated",
            "sourceMachineId": "148e0f2b7d9089",
            "sourceVolumeId": "vol_5xk2r9w7q1m3p8zd",
            "sourceRegion": "iad",
            "replacementVolumeId": "vol_9abc",
            "replacementMachineId": None,
            "source": "Snapshot",
            "snapshotId": "vs_2b9Xq",
            "snapshotCreatedAt": "2026-11-25T03:00:00Z",
        },
        "pendingCleanup": {"volumeId": "vol_old", "machineId": "91e2"},
        "lastRecovery": {
            "id": "01JDQ8Z6V4K7M2N9P3R5T8W1XX",
            "startedAt": "2026-11-24T12:00:00Z",
            "finishedAt": "2026-11-24T12:01:30Z",
            "outcome": "Succeeded",
            "message": "relocated to ord",
            "durationSeconds": 90.5,
            "retainedVolume": "alice-vol-5xk2",
            "source": "Snapshot",
            "snapshotId": "vs_1a8Wp",
            "dataLossSeconds": 32400.0,
        },
    }


def retained_volume() -> dict[str, Any]:
    return retained_body(
        "alice-vol-5xk2", "tenants", flyApp=APP, volumeId="vol_5xk2r9w7q1m3p8zd", sandboxId=SANDBOX
    )


def with_fields(obj: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of ``obj`` with dotted paths (``spec__guest__cpus``) set, or removed with ``DELETE``."""
    result = copy.deepcopy(obj)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = result
        for name in parents:
            node = node.setdefault(name, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return result


def errors_of(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """What kubesim's validation answers to a create (or an update from ``old``) of ``obj``."""
    schema = SCHEMAS[obj["kind"]]
    defaulted_old = crdschema.apply_defaults(schema, old) if old is not None else None
    return crdschema.validate(schema, crdschema.apply_defaults(schema, obj), defaulted_old)


class Server(Protocol):
    """An API server's answer to a create, an update or a status write, as a list of field errors."""

    name: str

    def errors(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]: ...

    def defaulted(self, obj: dict[str, Any]) -> dict[str, Any]: ...


class Kubesim:
    name = "kubesim"

    def errors(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
        if old is None and "status" in obj:  # a status write, as ApiServer does it
            schema = SCHEMAS[obj["kind"]]
            return crdschema.admit(schema, obj, None, "status").errors
        return errors_of(obj, old)

    def defaulted(self, obj: dict[str, Any]) -> dict[str, Any]:
        return crdschema.apply_defaults(SCHEMAS[obj["kind"]], obj)


PLURALS = {"KiloClawInstance": "kiloclawinstances", "KiloClawRetainedVolume": "kiloclawretainedvolumes"}


class ApiServer:
    """The real kube-apiserver (``--cluster``): creates are server-side dry runs; an update or a status write
    first creates the old object for real (under a unique name), then dry-runs the write against it."""

    name = "apiserver"

    def __init__(self, client: httpx.Client, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self._names = itertools.count(1)

    def _path(self, kind: str, name: str | None = None, sub: str | None = None) -> str:
        path = f"/apis/kiloclaw.kilo.ai/v1alpha1/namespaces/{self.namespace}/{PLURALS[kind]}"
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    @staticmethod
    def _field_errors(response: httpx.Response) -> list[str]:
        if response.status_code in (200, 201):
            return []
        body = response.json()
        assert response.status_code == 422, f"{response.status_code}: {body}"
        return [f"{cause.get('field', '<nil>')}: {cause['message']}" for cause in body["details"]["causes"]]

    def _in_namespace(self, obj: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        result = copy.deepcopy(obj)
        result["metadata"] = {**result.get("metadata", {}), "namespace": self.namespace}
        if name is not None:
            result["metadata"]["name"] = name
        return result

    def _create_for_real(self, obj: dict[str, Any]) -> dict[str, Any]:
        name = f"crd-case-{next(self._names)}"
        body = self._in_namespace({k: v for k, v in obj.items() if k != "status"}, name)
        response = self.client.post(self._path(obj["kind"]), json=body)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    def _delete(self, obj: dict[str, Any]) -> None:
        self.client.delete(self._path(obj["kind"], obj["metadata"]["name"]))

    def errors(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
        kind = obj["kind"]
        if old is None and "status" not in obj:
            response = self.client.post(
                self._path(kind), params={"dryRun": "All"}, json=self._in_namespace(obj)
            )
            return self._field_errors(response)
        stored = self._create_for_real(old if old is not None else obj)
        try:
            name = stored["metadata"]["name"]
            body = self._in_namespace(obj, name)
            body["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"]
            sub = "status" if "status" in obj and old is None else None
            response = self.client.put(self._path(kind, name, sub), params={"dryRun": "All"}, json=body)
            return self._field_errors(response)
        finally:
            self._delete(stored)

    def defaulted(self, obj: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post(
            self._path(obj["kind"]), params={"dryRun": "All"}, json=self._in_namespace(obj)
        )
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result


_api_server: ApiServer | None = None


@pytest.fixture(params=["kubesim", "apiserver"])
def server(request: pytest.FixtureRequest) -> Server:
    """Each rule case runs against kubesim and, with ``--cluster`` (``make e2e``), the real API server."""
    global _api_server
    if request.param == "kubesim":
        return Kubesim()
    if not request.config.getoption("--cluster"):
        pytest.skip("the real API server runs with --cluster (make cluster && make e2e)")
    if _api_server is None:
        try:
            access = realcluster.load_access()
        except realcluster.NoCluster as exc:
            pytest.skip(str(exc))
        client = access.client()
        applied = subprocess.run(
            ["kubectl", "apply", "--server-side", "--force-conflicts", "-k", str(CRD_DIR)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert applied.returncode == 0, applied.stderr
        for crd in ("kiloclawinstances", "kiloclawretainedvolumes"):
            waited = subprocess.run(
                ["kubectl", "wait", "--for=condition=Established", f"crd/{crd}.kiloclaw.kilo.ai"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert waited.returncode == 0, waited.stderr
        namespace = f"crd-rules-{os.getpid()}"
        # The schema's rules alone: exempt from the tenancy admission policies (deploy/admission), as a
        # cluster admin may exempt a namespace that runs no tenant.
        exempt = {"name": namespace, "labels": {"kiloclaw.kilo.ai/admission": "exempt"}}
        response = client.post("/api/v1/namespaces", json={"metadata": exempt})
        assert response.status_code in (201, 409), response.text
        _api_server = ApiServer(client, namespace)
    return _api_server


def assert_rejected(
    server: Server, obj: dict[str, Any], expected: str, old: dict[str, Any] | None = None
) -> None:
    errors = server.errors(obj, old)
    assert any(expected in error for error in errors), f"expected {expected!r} in {errors}"


def example_resources() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(EXAMPLES_DIR.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in SCHEMAS:
                found.append((f"{path.relative_to(EXAMPLES_DIR)}:{doc['metadata']['name']}", doc))
    return found


# ---------------------------------------------------------------------------------------------- examples


@pytest.mark.parametrize(("name", "resource"), example_resources(), ids=[n for n, _ in example_resources()])
def test_every_example_resource_is_accepted_after_defaulting(
    name: str, resource: dict[str, Any], server: Server
) -> None:
    assert server.errors(resource) == []


def test_examples_cover_the_full_and_the_minimal_instance_and_the_retained_volume() -> None:
    names = {name for name, _ in example_resources()}
    assert names == {
        "instance.yaml:alice",
        "instance-minimal.yaml:bob",
        "reference/retainedvolume.yaml:alice-vol-5xk2",
    }


def test_examples_kustomization_applies_the_namespace_and_instances_but_never_a_retained_volume() -> None:
    kustomization = _load(EXAMPLES_DIR / "kustomization.yaml")
    assert kustomization["resources"] == ["00-namespace.yaml", "instance.yaml", "instance-minimal.yaml"]
    assert "illustrative" in (EXAMPLES_DIR / "reference" / "retainedvolume.yaml").read_text().lower()


def test_kubectl_apply_of_the_examples_directory_never_creates_the_illustrative_retained_volume() -> None:
    """`kubectl apply -f examples/` reads the directory's own files only (not reference/), and the namespace
    sorts first so the instances find it."""
    top_level = sorted(EXAMPLES_DIR.glob("*.yaml"))
    kinds = [doc.get("kind") for path in top_level for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert "KiloClawRetainedVolume" not in kinds
    resources = [path.name for path in top_level if path.name != "kustomization.yaml"]
    assert resources[0] == "00-namespace.yaml"


def test_full_example_matches_the_design_sample_for_alice() -> None:
    alice = _load(EXAMPLES_DIR / "instance.yaml")
    assert alice["metadata"] == {"name": "alice", "namespace": "tenants"}
    assert alice["spec"]["regions"] == ["iad", "ord", "cdg"]
    assert alice["spec"]["env"] == {"TZ": "Europe/Berlin"}
    assert _load(EXAMPLES_DIR / "00-namespace.yaml")["metadata"]["name"] == "tenants"


def test_minimal_example_has_only_the_required_fields() -> None:
    bob = _load(EXAMPLES_DIR / "instance-minimal.yaml")
    assert set(bob["spec"]) == set(INSTANCE_SCHEMA["properties"]["spec"]["required"])


# ---------------------------------------------------------------------------------------------- defaults


def test_minimal_instance_gets_the_documented_defaults_and_no_regions(server: Server) -> None:
    spec = server.defaulted(instance())["spec"]
    assert spec["guest"] == {"cpuKind": "shared", "cpus": 1, "memoryMb": 2048}
    assert spec["volume"] == {"sizeGb": 10, "mountPath": "/root"}
    assert spec["state"] == "Running"
    assert spec["recovery"] == {"enabled": True, "maxDataLossSeconds": 93600}
    assert spec["env"] == {}
    assert "regions" not in spec  # the operator's configured default applies


def test_defaults_fill_the_missing_fields_of_a_partly_given_object(server: Server) -> None:
    obj = with_fields(instance(), spec__guest={"cpus": 2}, spec__volume={"sizeGb": 50})
    spec = server.defaulted(obj)["spec"]
    assert spec["guest"] == {"cpuKind": "shared", "cpus": 2, "memoryMb": 2048}
    assert spec["volume"] == {"sizeGb": 50, "mountPath": "/root"}


def test_defaults_never_override_given_values(server: Server) -> None:
    obj = with_fields(instance(), spec__state="Stopped", spec__recovery={"enabled": False})
    spec = server.defaulted(obj)["spec"]
    assert spec["state"] == "Stopped"
    assert spec["recovery"] == {"enabled": False, "maxDataLossSeconds": 93600}


def test_a_snapshot_policy_of_zero_never_restores_and_is_kept(server: Server) -> None:
    obj = with_fields(instance(), spec__recovery={"maxDataLossSeconds": 0})
    assert server.defaulted(obj)["spec"]["recovery"] == {"enabled": True, "maxDataLossSeconds": 0}


def test_a_null_field_that_is_not_nullable_takes_its_default(server: Server) -> None:
    spec = server.defaulted(with_fields(instance(), spec__state=None))["spec"]
    assert spec["state"] == "Running"


def test_retained_volume_defaults_to_no_early_delete_and_the_recovery_reason(server: Server) -> None:
    spec = server.defaulted(retained_volume())["spec"]
    assert spec["deleteNow"] is False
    assert spec["reason"] == "UnexpectedStopRecovery"


def test_crd_defaults_agree_with_the_operator_models(server: Server) -> None:
    spec = server.defaulted(instance())["spec"]
    assert models.InstanceSpec.model_validate(instance()["spec"]).dump() == spec


# --------------------------------------------------------------------------------------- spec rejections

INSTANCE_REJECTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("spec missing", {"spec": DELETE}, "spec: Required value"),
    ("sandboxId missing", {"spec__sandboxId": DELETE}, "spec.sandboxId: Required value"),
    ("userId missing", {"spec__userId": DELETE}, "spec.userId: Required value"),
    ("flyApp missing", {"spec__flyApp": DELETE}, "spec.flyApp: Required value"),
    ("image missing", {"spec__image": DELETE}, "spec.image: Required value"),
    ("sandboxId with a space", {"spec__sandboxId": "ki 1"}, "spec.sandboxId in body should match"),
    ("sandboxId with a dot", {"spec__sandboxId": "ki.1"}, "spec.sandboxId in body should match"),
    ("sandboxId of 65 chars", {"spec__sandboxId": "k" * 65}, "spec.sandboxId: Too long"),
    ("sandboxId empty", {"spec__sandboxId": ""}, "spec.sandboxId in body should"),
    ("flyApp upper case", {"spec__flyApp": "Acct-1"}, "spec.flyApp in body should match"),
    ("flyApp leading dash", {"spec__flyApp": "-acct"}, "spec.flyApp in body should match"),
    ("flyApp of 64 chars", {"spec__flyApp": "a" * 64}, "spec.flyApp: Too long"),
    ("userId empty", {"spec__userId": ""}, "spec.userId in body should be at least 1 chars long"),
    ("image empty", {"spec__image": ""}, "spec.image in body should be at least 1 chars long"),
    ("region upper case", {"spec__regions": ["IAD"]}, "spec.regions[0] in body should match '^[a-z]{3}$'"),
    ("region of four letters", {"spec__regions": ["iad1"]}, "spec.regions[0] in body should match"),
    ("region repeated", {"spec__regions": ["iad", "ord", "iad"]}, 'spec.regions[2]: Duplicate value: "iad"'),
    ("regions empty", {"spec__regions": []}, "spec.regions in body should have at least 1 items"),
    ("regions not a list", {"spec__regions": "iad"}, "spec.regions in body must be of type array"),
    (
        "cpuKind unknown",
        {"spec__guest": {"cpuKind": "dedicated"}},
        'spec.guest.cpuKind: Unsupported value: "dedi',
    ),
    (
        "cpus zero",
        {"spec__guest": {"cpus": 0}},
        "spec.guest.cpus in body should be greater than or equal to 1",
    ),
    ("cpus 17", {"spec__guest": {"cpus": 17}}, "spec.guest.cpus in body should be less than or equal to 16"),
    ("cpus a string", {"spec__guest": {"cpus": "2"}}, "spec.guest.cpus in body must be of type integer"),
    (
        "memoryMb 128",
        {"spec__guest": {"memoryMb": 128}},
        "spec.guest.memoryMb in body should be greater than",
    ),
    (
        "memoryMb too big",
        {"spec__guest": {"memoryMb": 131328}},
        "spec.guest.memoryMb in body should be less than",
    ),
    (
        "memoryMb odd",
        {"spec__guest": {"memoryMb": 1000}},
        "spec.guest.memoryMb in body should be a multiple of 256",
    ),
    (
        "sizeGb zero",
        {"spec__volume": {"sizeGb": 0}},
        "spec.volume.sizeGb in body should be greater than or equal to 1",
    ),
    (
        "sizeGb 501",
        {"spec__volume": {"sizeGb": 501}},
        "spec.volume.sizeGb in body should be less than or equal to 500",
    ),
    ("mountPath relative", {"spec__volume": {"mountPath": "root"}}, "mountPath must be an absolute path"),
    ("mountPath root", {"spec__volume": {"mountPath": "/"}}, "mountPath must not be the root directory"),
    ("state unknown", {"spec__state": "Paused"}, 'spec.state: Unsupported value: "Paused"'),
    ("recovery.enabled a string", {"spec__recovery": {"enabled": "yes"}}, "must be of type boolean"),
    (
        "maxDataLossSeconds negative",
        {"spec__recovery": {"maxDataLossSeconds": -1}},
        "spec.recovery.maxDataLossSeconds in body should be greater than or equal to 0",
    ),
    (
        "maxDataLossSeconds over 60 days",
        {"spec__recovery": {"maxDataLossSeconds": 5184001}},
        "spec.recovery.maxDataLossSeconds in body should be less than or equal to 5184000",
    ),
    (
        "maxDataLossSeconds a duration string",
        {"spec__recovery": {"maxDataLossSeconds": "26h"}},
        "spec.recovery.maxDataLossSeconds in body must be of type integer",
    ),
    ("env value a number", {"spec__env": {"PORT": 8080}}, "spec.env.PORT in body must be of type string"),
    ("env key starting with a digit", {"spec__env": {"1PORT": "1"}}, "env keys must be shell identifiers"),
    ("env key with a dash", {"spec__env": {"MY-VAR": "1"}}, "not starting with a digit): MY-VAR"),
    ("env key with a dot", {"spec__env": {"my.var": "1"}}, "env keys must be shell identifiers"),
    ("env key empty", {"spec__env": {"": "1"}}, "env keys must be shell identifiers"),
    ("env key KILOCLAW_ENC_", {"spec__env": {"KILOCLAW_ENC_TOKEN": "x"}}, "are reserved: KILOCLAW_ENC_TOKEN"),
    ("env key KILOCLAW_ENV_", {"spec__env": {"KILOCLAW_ENV_TOKEN": "x"}}, "KILOCLAW_ENV_ are reserved"),
    ("env key of 129 chars", {"spec__env": {"K" * 129: "x"}}, "env keys are at most 128 characters"),
    (
        "env over 32768 characters in all",
        {"spec__env": {f"K{i}": "v" * 4000 for i in range(9)}},
        "env keys and values together are at most 32768 characters",
    ),
    ("env value of 4097 chars", {"spec__env": {"K": "v" * 4097}}, "spec.env.K: Too long"),
    (
        "name of 64 chars",
        {"metadata__name": "a" * 64},
        "instance names are at most 63 characters",
    ),
]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [(changes, expected) for _, changes, expected in INSTANCE_REJECTIONS],
    ids=[name for name, _, _ in INSTANCE_REJECTIONS],
)
def test_instance_with_a_bad_field_is_rejected(
    changes: dict[str, Any], expected: str, server: Server
) -> None:
    assert_rejected(server, with_fields(instance(), **changes), expected)


def test_cel_rule_failures_read_like_kubernetes_field_errors(server: Server) -> None:
    errors = server.errors(with_fields(instance(), spec__env={"1A": "x"}))
    assert errors == [
        'spec.env: Invalid value: "object": env keys must be shell identifiers '
        "(letters, digits and underscores, not starting with a digit): 1A"
    ]


def test_env_keys_that_merely_resemble_reserved_prefixes_are_accepted(server: Server) -> None:
    env = {"KILOCLAW_TOKEN": "a", "_private": "b", "TZ": "Europe/Berlin", "kiloclaw_enc_x": "c"}
    assert server.errors(with_fields(instance(), spec__env=env)) == []


def test_sandbox_id_cannot_change_on_update(server: Server) -> None:
    old = instance()
    new = with_fields(old, spec__sandboxId="ki_other")
    assert server.errors(new, old) == ['spec.sandboxId: Invalid value: "string": sandboxId is immutable']


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"spec__userId": "user-other"}, 'spec.userId: Invalid value: "string": userId is immutable'),
        (
            {"spec__volume": {"mountPath": "/data"}},
            'spec.volume.mountPath: Invalid value: "string": mountPath is immutable',
        ),
    ],
    ids=["userId", "mountPath"],
)
def test_user_id_and_mount_path_cannot_change_on_update(
    changes: dict[str, Any], expected: str, server: Server
) -> None:
    old = instance()
    assert server.errors(with_fields(old, **changes), old) == [expected]


def test_env_at_every_limit_at_once_is_accepted(server: Server) -> None:
    """The largest env the schema admits: 32768 characters of keys and values, keys of 128 characters."""
    env = {f"{'K' * 124}{i:04d}": "v" * 3968 for i in range(7)}
    env["LAST"] = "v" * (32768 - sum(len(k) + len(v) for k, v in env.items()) - len("LAST"))
    assert sum(len(k) + len(v) for k, v in env.items()) == 32768
    assert server.errors(with_fields(instance(), metadata__name="a" * 63, spec__env=env)) == []


def test_the_largest_admissible_spec_leaves_room_for_kubectl_and_kopf_annotations() -> None:
    """kubectl's last-applied and kopf's last-handled annotations each copy the spec; all annotations of
    an object must stay under 256 KiB, so the largest admissible spec, twice, must fit with room to spare."""
    spec = instance()["spec"]
    spec |= {
        "sandboxId": "k" * 64,
        "userId": "u" * 128,
        "flyApp": "a" * 63,
        "image": "i" * _max_length(INSTANCE_SCHEMA["properties"]["spec"]["properties"]["image"]),
        "regions": ["abc"]
        * (INSTANCE_SCHEMA["properties"]["spec"]["properties"]["regions"].get("maxItems", 0)),
        "volume": {"sizeGb": 500, "mountPath": "/" + "m" * 254},
        "env": {f"K{i:03d}": "v" * 252 for i in range(128)},
    }
    size = len(json.dumps(spec))
    assert 2 * size < 200 * 1024, size


def _max_length(node: dict[str, Any]) -> int:
    length: int = node["maxLength"]
    return length


def test_fly_app_cannot_change_on_update(server: Server) -> None:
    old = instance()
    assert_rejected(server, with_fields(old, spec__flyApp="acct-other"), "flyApp is immutable", old)


def test_updates_that_keep_the_sandbox_id_are_accepted(server: Server) -> None:
    old = instance()
    new = with_fields(old, spec__image="registry.fly.io/kiloclaw:2026.12.0", spec__state="Stopped")
    assert server.errors(new, old) == []


def test_immutability_is_not_checked_on_create(server: Server) -> None:
    assert server.errors(with_fields(instance(), spec__sandboxId="anything_at_all")) == []


def test_type_errors_stop_cel_rules_from_running_like_the_api_server(server: Server) -> None:
    errors = server.errors(with_fields(instance(), spec__guest={"cpus": "x"}, spec__env={"1A": "x"}))
    assert not any("shell identifiers" in error for error in errors)
    assert any("some validation rules were not checked" in error for error in errors)


# ------------------------------------------------------------------------------------- status rejections


def test_a_complete_instance_status_is_accepted(server: Server) -> None:
    assert server.errors(with_fields(instance(), status=running_status())) == []


def test_status_fields_may_be_null_where_the_design_says_none(server: Server) -> None:
    status = with_fields(running_status(), machineId=None, recovery=None, lastRecovery__retainedVolume=None)
    assert server.errors(with_fields(instance(), status=status)) == []


STATUS_REJECTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("phase unknown", {"phase": "Crashed"}, 'status.phase: Unsupported value: "Crashed"'),
    (
        "step unknown",
        {"recovery__step": "VolumeForked"},
        'status.recovery.step: Unsupported value: "VolumeForked"',
    ),
    (
        "outcome unknown",
        {"lastRecovery__outcome": "Partial"},
        "status.lastRecovery.outcome: Unsupported value",
    ),
    (
        "observedAt not a time",
        {"observedAt": "yesterday"},
        'status.observedAt: Invalid value: "yesterday": observedAt in body must be of type date-time',
    ),
    (
        "deadline not a time",
        {"recovery__deadline": "soon"},
        "recovery.deadline in body must be of type date-time",
    ),
    ("recovery without id", {"recovery__id": DELETE}, "status.recovery.id: Required value"),
    ("recovery source unknown", {"recovery__source": "Backup"}, "status.recovery.source: Unsupported value"),
    (
        "snapshotCreatedAt not a time",
        {"recovery__snapshotCreatedAt": "last night"},
        "recovery.snapshotCreatedAt in body must be of type date-time",
    ),
    (
        "dataLossSeconds negative",
        {"lastRecovery__dataLossSeconds": -5},
        "status.lastRecovery.dataLossSeconds: Invalid value: -5",
    ),
    (
        "resumptions negative",
        {"recovery__resumptions": -1},
        "status.recovery.resumptions: Invalid value: -1: recovery.resumptions in body should be greater",
    ),
    (
        "negative generation",
        {"observedGeneration": -1},
        "status.observedGeneration: Invalid value: -1: observedGeneration in body should be greater",
    ),
    (
        "duration negative",
        {"lastRecovery__durationSeconds": -1},
        "status.lastRecovery.durationSeconds: Invalid value: -1: lastRecovery.durationSeconds in body",
    ),
]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [(changes, expected) for _, changes, expected in STATUS_REJECTIONS],
    ids=[name for name, _, _ in STATUS_REJECTIONS],
)
def test_instance_status_with_a_bad_field_is_rejected(
    changes: dict[str, Any], expected: str, server: Server
) -> None:
    assert_rejected(
        server, with_fields(instance(), status=with_fields(running_status(), **changes)), expected
    )


def test_two_conditions_of_the_same_type_are_rejected(server: Server) -> None:
    status = running_status()
    status["conditions"].append(dict(status["conditions"][0], status="False"))
    assert_rejected(
        server,
        with_fields(instance(), status=status),
        'status.conditions[1]: Duplicate value: {"type":"Ready"}',
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"status": "Maybe"}, 'status.conditions[0].status: Unsupported value: "Maybe"'),
        ({"reason": "not a reason"}, "conditions[0].reason in body should match"),
        ({"lastTransitionTime": DELETE}, "status.conditions[0].lastTransitionTime: Required value"),
        ({"type": DELETE}, "status.conditions[0].type: Required value"),
    ],
    ids=["status", "reason", "lastTransitionTime", "type"],
)
def test_conditions_must_have_the_metav1_condition_shape(
    changes: dict[str, Any], expected: str, server: Server
) -> None:
    status = running_status()
    status["conditions"][0] = with_fields(status["conditions"][0], **changes)
    assert_rejected(server, with_fields(instance(), status=status), expected)


def test_kopf_bookkeeping_in_status_survives_pruning() -> None:
    obj = with_fields(instance(), status__kopf={"progress": {"create": {"retries": 1}}}, status__bogus=1)
    pruned, removed = crdschema.prune_unknown_fields(INSTANCE_SCHEMA, obj)
    assert pruned["status"]["kopf"] == {"progress": {"create": {"retries": 1}}}
    assert removed == ["status.bogus"]


# ------------------------------------------------------------------------------ retained volume rejections

RETAINED_REJECTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("flyApp missing", {"spec__flyApp": DELETE}, "spec.flyApp: Required value"),
    ("volumeId missing", {"spec__volumeId": DELETE}, "spec.volumeId: Required value"),
    ("sandboxId missing", {"spec__sandboxId": DELETE}, "spec.sandboxId: Required value"),
    ("instanceName missing", {"spec__instanceName": DELETE}, "spec.instanceName: Required value"),
    ("region missing", {"spec__region": DELETE}, "spec.region: Required value"),
    ("retainUntil missing", {"spec__retainUntil": DELETE}, "spec.retainUntil: Required value"),
    (
        "retainUntil not a time",
        {"spec__retainUntil": "next week"},
        "spec.retainUntil in body must be of type date-time",
    ),
    ("region upper case", {"spec__region": "IAD"}, "spec.region in body should match"),
    ("sandboxId with a slash", {"spec__sandboxId": "ki/1"}, "spec.sandboxId in body should match"),
    ("deleteNow a string", {"spec__deleteNow": "true"}, "spec.deleteNow in body must be of type boolean"),
    ("phase unknown", {"status__phase": "Gone"}, 'status.phase: Unsupported value: "Gone"'),
    (
        "snapshotCount negative",
        {"status__snapshotCount": -1},
        "status.snapshotCount: Invalid value: -1: snapshotCount in body should be greater",
    ),
    (
        "nextAttemptAt not a time",
        {"status__nextAttemptAt": "later"},
        "nextAttemptAt in body must be of type date-time",
    ),
]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [(changes, expected) for _, changes, expected in RETAINED_REJECTIONS],
    ids=[name for name, _, _ in RETAINED_REJECTIONS],
)
def test_retained_volume_with_a_bad_field_is_rejected(
    changes: dict[str, Any], expected: str, server: Server
) -> None:
    assert_rejected(server, with_fields(retained_volume(), **changes), expected)


@pytest.mark.parametrize(
    ("field", "value"),
    [("volumeId", "vol_other"), ("sandboxId", "ki_other"), ("flyApp", "acct-other")],
)
def test_retained_volume_identity_cannot_change_on_update(field: str, value: str, server: Server) -> None:
    old = retained_volume()
    new = with_fields(old, **{f"spec__{field}": value})
    assert server.errors(new, old) == [f'spec.{field}: Invalid value: "string": {field} is immutable']


def test_admin_can_set_delete_now_and_extend_retention(server: Server) -> None:
    old = retained_volume()
    new = with_fields(old, spec__deleteNow=True, spec__retainUntil="2026-12-09T12:00:00Z")
    assert server.errors(new, old) == []


def test_a_blocked_retained_volume_status_is_accepted(server: Server) -> None:
    status = {
        "phase": "Blocked",
        "snapshotCount": 2,
        "attachedMachineId": "148e",
        "lastError": "refusing to destroy attached machine 148e for volume v: expected sandbox a, found b",
        "nextAttemptAt": "2026-11-25T12:01:00Z",
        "attempts": 3,
        "conditions": [
            {
                "type": "Stalled",
                "status": "True",
                "reason": "OwnershipMismatch",
                "message": "refusing to destroy attached machine 148e",
                "lastTransitionTime": "2026-11-25T12:00:00Z",
            }
        ],
    }
    assert server.errors(with_fields(retained_volume(), status=status)) == []


# --------------------------------------------------------------------------------------- CRD structure


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    nodes = [(path or "<root>", schema)]
    for name, child in schema.get("properties", {}).items():
        nodes += _walk(child, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        nodes += _walk(schema["items"], f"{path}[*]")
    if isinstance(schema.get("additionalProperties"), dict):
        nodes += _walk(schema["additionalProperties"], f"{path}[*]")
    return nodes


BOTH = pytest.mark.parametrize("crd", [INSTANCE_CRD, RETAINED_CRD], ids=["instance", "retained"])


@BOTH
def test_crd_schema_is_structural(crd: dict[str, Any]) -> None:
    for path, node in _walk(crdschema.load_crd_schema(crd, "v1alpha1")):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict), path
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            assert set(node["x-kubernetes-list-map-keys"]) <= set(item.get("required", [])), path
        for forbidden in ("allOf", "anyOf", "oneOf", "not", "$ref"):
            assert forbidden not in node, path


@BOTH
def test_every_field_has_a_description_for_kubectl_explain(crd: dict[str, Any]) -> None:
    schema = crdschema.load_crd_schema(crd, "v1alpha1")
    undescribed = [path for path, node in _walk(schema) if not node.get("description") and path != "metadata"]
    assert undescribed == []


@BOTH
def test_root_metadata_schema_is_bare_as_the_real_api_server_requires(crd: dict[str, Any]) -> None:
    """apiextensions-apiserver refuses anything but name/generateName under the root metadata schema."""
    assert crdschema.load_crd_schema(crd, "v1alpha1")["properties"]["metadata"] == {"type": "object"}


@BOTH
def test_defaults_in_the_crd_are_themselves_valid(crd: dict[str, Any]) -> None:
    for path, node in _walk(crdschema.load_crd_schema(crd, "v1alpha1")):
        if "default" in node:
            value = crdschema.apply_defaults(
                {"type": "object", "properties": {"v": node}}, {"v": node["default"]}
            )
            problems = crdschema.validate({"type": "object", "properties": {"v": node}}, value)
            assert problems == [], (path, problems)


@BOTH
def test_every_cel_rule_parses_and_has_a_message(crd: dict[str, Any]) -> None:
    schema = crdschema.load_crd_schema(crd, "v1alpha1")
    assert crdschema.compile_errors(schema) == []
    for path, node in _walk(schema):
        for rule in node.get("x-kubernetes-validations", []):
            assert rule.get("message"), path


@BOTH
def test_crd_is_namespaced_with_status_subresource_and_kiloclaw_category(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert spec["group"] == "kiloclaw.kilo.ai"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["categories"] == ["kiloclaw"]
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


@BOTH
def test_crd_manifest_is_a_valid_kubernetes_1_31_object_with_no_unknown_fields(crd: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(crd, "1.31", strict=True) == "1.31"


def _columns(crd: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [
        (column["name"], column["jsonPath"], column.get("priority", 0))
        for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]
    ]


def test_instance_names_and_printer_columns_are_as_designed() -> None:
    names = INSTANCE_CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "KiloClawInstance",
        "kiloclawinstances",
        ["kci"],
    )
    assert _columns(INSTANCE_CRD) == [
        ("Phase", ".status.phase", 0),
        ("Fly-State", ".status.flyState", 0),
        ("Region", ".status.region", 0),
        ("Machine", ".status.machineId", 0),
        ("Ready", '.status.conditions[?(@.type=="Ready")].status', 0),
        ("Age", ".metadata.creationTimestamp", 0),
        ("Sandbox", ".spec.sandboxId", 1),
        ("Volume", ".status.volumeId", 1),
        ("Last-Recovery", ".status.lastRecovery.outcome", 1),
    ]


def test_retained_volume_names_and_printer_columns_are_as_designed() -> None:
    names = RETAINED_CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "KiloClawRetainedVolume",
        "kiloclawretainedvolumes",
        ["kcrv"],
    )
    assert _columns(RETAINED_CRD) == [
        ("Instance", ".spec.instanceName", 0),
        ("Volume", ".spec.volumeId", 0),
        ("Region", ".spec.region", 0),
        ("Retain-Until", ".spec.retainUntil", 0),
        ("Phase", ".status.phase", 0),
        ("Age", ".metadata.creationTimestamp", 0),
    ]


def test_enums_in_the_crd_match_the_operator_models() -> None:
    status = INSTANCE_SCHEMA["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == [phase.value for phase in models.Phase]
    assert status["recovery"]["properties"]["step"]["enum"] == [step.value for step in models.RecoveryStep]
    assert status["lastRecovery"]["properties"]["outcome"]["enum"] == [
        o.value for o in models.RecoveryOutcome
    ]
    retained_phase = RETAINED_SCHEMA["properties"]["status"]["properties"]["phase"]
    assert retained_phase["enum"] == [phase.value for phase in models.RetainedPhase]


def _wire_fields(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


@pytest.mark.parametrize(
    ("model", "schema_path"),
    [
        (models.InstanceSpec, ("KiloClawInstance", "spec")),
        (models.InstanceStatus, ("KiloClawInstance", "status")),
        (models.RecoveryStatus, ("KiloClawInstance", "status", "recovery")),
        (models.PendingCleanup, ("KiloClawInstance", "status", "pendingCleanup")),
        (models.LastRecovery, ("KiloClawInstance", "status", "lastRecovery")),
        (models.RetainedVolumeSpec, ("KiloClawRetainedVolume", "spec")),
        (models.RetainedVolumeStatus, ("KiloClawRetainedVolume", "status")),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else "",
)
def test_every_field_the_operator_writes_is_declared_so_the_api_server_keeps_it(
    model: type[BaseModel], schema_path: tuple[str, ...]
) -> None:
    kind, *names = schema_path
    node = SCHEMAS[kind]
    for name in names:
        node = node["properties"][name]
    assert _wire_fields(model) <= set(node["properties"])


# ------------------------------------------------------------------------------------ kustomize / kubectl


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_crds_kustomization_builds_both_crds() -> None:
    assert KUBECTL is not None
    built = subprocess.run([KUBECTL, "kustomize", str(CRD_DIR)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert sorted(doc["metadata"]["name"] for doc in docs) == [
        "kiloclawinstances.kiloclaw.kilo.ai",
        "kiloclawretainedvolumes.kiloclaw.kilo.ai",
    ]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_examples_kustomization_builds() -> None:
    assert KUBECTL is not None
    built = subprocess.run(
        [KUBECTL, "kustomize", str(EXAMPLES_DIR)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(built.stdout) if doc)
    assert kinds == ["KiloClawInstance", "KiloClawInstance", "Namespace"]


# ------------------------------------------------- kubesim.crdschema against documented API-server behaviour


def _object(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, **extra}


def test_load_crd_schema_refuses_a_version_the_crd_does_not_serve() -> None:
    with pytest.raises(ValueError, match="no version v1"):
        crdschema.load_crd_schema(INSTANCE_CRD, "v1")


def test_pruning_drops_unknown_fields_at_every_level_but_keeps_object_identity() -> None:
    schema = _object(
        {
            "spec": _object(
                {"a": {"type": "string"}, "m": {"type": "object", "additionalProperties": {"type": "string"}}}
            )
        }
    )
    obj = {
        "apiVersion": "x/v1",
        "kind": "X",
        "metadata": {"name": "n", "labels": {"a": "b"}},
        "spec": {"a": "1", "b": 2, "m": {"free": "form"}},
        "extra": True,
    }
    pruned, removed = crdschema.prune_unknown_fields(schema, obj)
    assert pruned == {
        "apiVersion": "x/v1",
        "kind": "X",
        "metadata": {"name": "n", "labels": {"a": "b"}},
        "spec": {"a": "1", "m": {"free": "form"}},
    }
    assert sorted(removed) == ["extra", "spec.b"]
    assert obj["extra"] is True  # the input is not modified


def test_admit_prunes_defaults_and_validates_in_the_api_server_order() -> None:
    admission = crdschema.admit(
        INSTANCE_SCHEMA, with_fields(instance(), spec__colour="blue", spec__state="Paused")
    )
    assert admission.unknown_fields == ["spec.colour"]
    assert "colour" not in admission.obj["spec"]
    assert admission.obj["spec"]["guest"]["cpus"] == 1
    assert admission.errors == [
        'spec.state: Unsupported value: "Paused": supported values: "Running", "Stopped"'
    ]


def test_a_non_nullable_null_without_default_is_dropped_by_defaulting_and_rejected_by_validation() -> None:
    schema = _object({"a": {"type": "string"}, "b": {"type": "string", "nullable": True}})
    assert crdschema.apply_defaults(schema, {"a": None, "b": None}) == {"b": None}
    assert crdschema.validate(schema, {"a": None}) == [
        'a: Invalid value: "null": a in body must be of type string: "null"'
    ]
    # With CEL rules in the schema, the API server adds that it skipped them.
    ruled = {**schema, "x-kubernetes-validations": [{"rule": "true"}]}
    assert crdschema.validate(ruled, {"a": None}) == [
        'a: Invalid value: "null": a in body must be of type string: "null"',
        "<nil>: Invalid value: null: some validation rules were not checked because the object was "
        "invalid; correct the existing errors to complete validation",
    ]


@pytest.mark.parametrize(
    ("value", "valid"),
    # Verdicts of kube-apiserver v1.34.4 (kube-openapi strfmt.IsDateTime), checked on the real server; the
    # parity suite (tests/simulators/test_parity.py) sends the same values to both servers.
    [
        ("2026-11-25T12:00:00Z", True),
        ("2026-11-25T12:00:00.123456Z", True),
        ("2026-11-25T12:00:00.123456789123Z", True),
        ("2026-11-25T12:00:00+02:00", True),
        ("2026-11-25T12:00:00-00:00", True),
        ("2026-11-25t12:00:00z", True),
        ("2026-11-25T12:00:00,5Z", True),
        ("2026-11-25T12:00:00", False),  # no zone
        ("2026-11-25 12:00:00Z", False),  # no T
        ("2026-11-25T12:00:00+0200", False),
        ("2026-11-25T12:00Z", False),
        ("2026-11-25T24:00:00Z", False),
        ("2026-11-25T12:00:60Z", False),
        ("2026-02-30T12:00:00Z", False),
        ("2026-13-01T00:00:00Z", False),
        ("2026-11-25T12:00:00Z\n", False),
        ("2026-11-25", False),
        ("tomorrow", False),
    ],
)
def test_date_time_format_follows_rfc3339_as_kube_openapi_reads_it(value: str, valid: bool) -> None:
    errors = crdschema.validate(_object({"t": {"type": "string", "format": "date-time"}}), {"t": value})
    assert (errors == []) is valid


@pytest.mark.parametrize(
    ("pattern", "value", "valid"),
    [
        ("^[a-z]{3}$", "iad", True),
        ("^[a-z]{3}$", "iad\n", False),  # RE2's $ is the very end; Python's also matches before a final \n
        ("^a[$]b$", "a$b", True),
        ("^\\d+$", "\u0663", False),  # RE2's \d is ASCII
        ("^[a-z]+\\z", "abc", True),
    ],
)
def test_pattern_follows_go_re2(pattern: str, value: str, valid: bool) -> None:
    errors = crdschema.validate(_object({"s": {"type": "string", "pattern": pattern}}), {"s": value})
    assert (errors == []) is valid


def test_date_time_values_become_cel_timestamps_in_every_accepted_spelling() -> None:
    schema = _object(
        {"t": {"type": "string", "format": "date-time"}},
        **{"x-kubernetes-validations": [{"rule": "self.t < timestamp('2026-11-25T12:00:01Z')"}]},
    )
    for value in ("2026-11-25t12:00:00z", "2026-11-25T12:00:00,5Z", "2026-11-25T14:00:00.999+02:00"):
        assert crdschema.validate(schema, {"t": value}) == [], value


def test_whole_floats_count_as_integers_like_json_numbers_do() -> None:
    schema = _object({"n": {"type": "integer"}})
    assert crdschema.validate(schema, {"n": 2.0}) == []
    assert crdschema.validate(schema, {"n": 2.5})[0].startswith('n: Invalid value: "number"')


def test_rule_without_message_reports_the_failed_rule() -> None:
    schema = _object({"n": {"type": "integer", "x-kubernetes-validations": [{"rule": "self > 1"}]}})
    assert crdschema.validate(schema, {"n": 1}) == ['n: Invalid value: "integer": failed rule: self > 1']


def test_message_expression_field_path_and_reason_shape_the_error() -> None:
    rule = {
        "rule": "self.min <= self.max",
        "messageExpression": "'min ' + string(self.min) + ' exceeds max ' + string(self.max)",
        "fieldPath": ".min",
        "reason": "FieldValueForbidden",
    }
    schema = _object(
        {
            "range": _object(
                {"min": {"type": "integer"}, "max": {"type": "integer"}},
                **{"x-kubernetes-validations": [rule]},
            )
        }
    )
    assert crdschema.validate(schema, {"range": {"min": 5, "max": 2}}) == [
        "range.min: Forbidden: min 5 exceeds max 2"
    ]


def test_evaluation_errors_are_reported_with_the_rule() -> None:
    schema = _object(
        {"o": _object({"a": {"type": "integer"}}, **{"x-kubernetes-validations": [{"rule": "self.a > 0"}]})}
    )
    [error] = crdschema.validate(schema, {"o": {}})
    assert error.startswith('o: Invalid value: "object": ') and error.endswith("evaluating rule: self.a > 0")


def test_transition_rules_run_only_where_an_old_value_exists() -> None:
    immutable = {
        "type": "string",
        "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "frozen"}],
    }
    schema = _object({"a": immutable, "b": immutable})
    assert crdschema.validate(schema, {"a": "2", "b": "2"}, {"a": "1"}) == [
        'a: Invalid value: "string": frozen'
    ]


def test_transition_rules_correlate_map_list_items_by_key_and_never_set_items() -> None:
    item = _object(
        {"name": {"type": "string"}, "size": {"type": "integer"}},
        required=["name"],
        **{"x-kubernetes-validations": [{"rule": "self.size >= oldSelf.size", "message": "cannot shrink"}]},
    )
    schema = _object(
        {
            "disks": {
                "type": "array",
                "items": item,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
            }
        }
    )
    old = {"disks": [{"name": "a", "size": 5}, {"name": "b", "size": 5}]}
    new = {"disks": [{"name": "b", "size": 9}, {"name": "a", "size": 1}, {"name": "c", "size": 1}]}
    assert crdschema.validate(schema, new, old) == ['disks[1]: Invalid value: "object": cannot shrink']
    as_set = {
        "type": "array",
        "items": {"type": "integer", "x-kubernetes-validations": [{"rule": "self >= oldSelf"}]},
    }
    assert crdschema.validate(_object({"s": as_set}), {"s": [1]}, {"s": [5]}) == []


def test_rules_see_date_times_as_timestamps() -> None:
    rule = {"rule": "self.until > self.since", "message": "until must be after since"}
    times = {"type": "string", "format": "date-time"}
    schema = _object({"w": _object({"since": times, "until": times}, **{"x-kubernetes-validations": [rule]})})
    assert crdschema.validate(
        schema, {"w": {"since": "2026-11-25T12:00:00Z", "until": "2026-11-25T13:00:00+02:00"}}
    ) == ['w: Invalid value: "object": until must be after since']


def test_rules_at_the_root_see_kind_and_name_but_not_other_metadata() -> None:
    rules = [
        {"rule": "self.kind == 'X' && self.metadata.name.startsWith('ki-')", "message": "bad name"},
        {"rule": "!has(self.metadata.labels)", "message": "labels leaked into CEL"},
    ]
    schema = _object({"spec": {"type": "object"}}, **{"x-kubernetes-validations": rules})
    obj = {"kind": "X", "metadata": {"name": "ki-a", "labels": {"a": "b"}}, "spec": {}}
    assert crdschema.validate(schema, obj) == []
    assert crdschema.validate(schema, with_fields(obj, metadata__name="other")) == [
        '<root>: Invalid value: "object": bad name'
    ]


@pytest.mark.parametrize(
    "rule",
    [
        "self.lowerAscii() == 'ab-cd'",
        "self.upperAscii() == 'AB-CD'",
        "self.split('-') == ['ab', 'CD']",
        "self.replace('-', '_') == 'ab_CD'",
        "self.substring(3) == 'CD' && self.substring(0, 2) == 'ab'",
        "self.indexOf('-') == 2 && self.lastIndexOf('C') == 3",
        "self.charAt(1) == 'b'",
        "' x '.trim() == 'x'",
        "self.find('[A-Z]+') == 'CD' && self.findAll('[a-zA-Z]') == ['a', 'b', 'C', 'D']",
        "['a', 'b'].join('-') == 'a-b' && ['a', 'b'].join() == 'ab'",
        "[1, 2, 3].isSorted() && [1, 2, 3].sum() == 6 && [3, 1].min() == 1 && [3, 1].max() == 3",
        "[1, 2, 3].indexOf(2) == 1",
    ],
)
def test_kubernetes_cel_library_functions_missing_from_cel_python_are_provided(rule: str) -> None:
    schema = _object({"s": {"type": "string", "x-kubernetes-validations": [{"rule": rule}]}})
    assert crdschema.validate(schema, {"s": "ab-CD"}) == []


def test_a_library_function_misused_is_an_evaluation_error_not_a_crash() -> None:
    schema = _object(
        {"s": {"type": "string", "x-kubernetes-validations": [{"rule": "self.substring(9) == ''"}]}}
    )
    [error] = crdschema.validate(schema, {"s": "ab"})
    assert error.startswith('s: Invalid value: "string": ') and "evaluating rule: self.substring(9)" in error


def test_a_function_cel_python_lacks_is_reported_as_an_undeclared_reference() -> None:
    schema = _object(
        {"q": {"type": "string", "x-kubernetes-validations": [{"rule": "quantity(self) != null"}]}}
    )
    assert crdschema.validate(schema, {"q": "1Gi"}) == [
        'q: Invalid value: "string": '
        "undeclared reference to 'quantity' evaluating rule: quantity(self) != null"
    ]


def test_memoised_rule_outcomes_still_depend_on_the_old_value() -> None:
    old, renamed = instance(), with_fields(instance(), spec__sandboxId="ki_other")
    for _ in range(2):
        assert errors_of(renamed, old) == ['spec.sandboxId: Invalid value: "string": sandboxId is immutable']
        assert errors_of(renamed, renamed) == []
        assert errors_of(renamed) == []
