"""Parity: the same API-semantics cases, with the same assertions, against kubesim and a real kube-apiserver.

Every test takes the ``server`` fixture, parametrised over ``kubesim`` (always) and ``apiserver`` (with
``pytest --cluster``: the current kube context, normally the admin kubeconfig of ``make cluster``). A case
that passes on the real server and fails on kubesim is a kubesim bug (kubesim must be at least as strict); a
case that fails on the real server is a wrong belief about Kubernetes in this file.

The cases use small CRDs of their own (group ``parity.example.com``), applied on first use and left in place;
each test works in a namespace of its own. No kube-controller-manager runs next to the ``make cluster`` API
server, so deleted namespaces stay Terminating there; nothing here waits for a namespace to go.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kubesim import KubeSim

GROUP, VERSION, PLURAL, KIND = "parity.example.com", "v1", "widgets", "Widget"
BASE = f"/apis/{GROUP}/{VERSION}"
CRDS_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
KUBECTL = shutil.which("kubectl")

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {
            "plural": PLURAL,
            "singular": "widget",
            "kind": KIND,
            "shortNames": ["pwd"],
            "categories": ["paritytoys"],
        },
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {
                        "name": "Ready",
                        "type": "string",
                        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                    },
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["color"],
                                "properties": {
                                    "color": {
                                        "type": "string",
                                        "enum": ["red", "green", "blue"],
                                        "description": "The colour of the widget.",
                                    },
                                    "size": {"type": "integer", "default": 1, "minimum": 1},
                                    "tags": {"type": "array", "items": {"type": "string"}},
                                    "extra": {"type": "string"},
                                    "zone": {"type": "string", "pattern": "^[a-z]{3}$"},
                                    "due": {"type": "string", "format": "date-time"},
                                },
                            },
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    }
                },
            }
        ],
    },
}

# Cluster-scoped and without a status subresource: the other half of the generation rules.
GADGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"gadgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Cluster",
        "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}


@dataclass
class Server:
    name: str  # "kubesim" or "apiserver"
    client: httpx.Client
    kubeconfig: Path
    sim: KubeSim | None = None


def _cluster_http_client() -> tuple[httpx.Client, Path]:
    """A client for the current kube context (the admin kubeconfig of ``make cluster``)."""
    from realcluster import NoCluster, kubeconfig_path, load_access

    try:
        access = load_access()
    except NoCluster as exc:
        pytest.skip(f"no usable kubeconfig for --cluster: {exc}")
    client = access.client(timeout=15)
    try:
        client.get("/version").raise_for_status()
    except httpx.HTTPError as exc:
        client.close()
        pytest.skip(f"the current kube context ({access.server}) does not answer: {exc}")
    return client, kubeconfig_path()


def _apply_crd(client: httpx.Client, crd: dict[str, Any]) -> None:
    """Create or replace the CRD, then wait until it is Established and its resource is served."""
    name = crd["metadata"]["name"]
    existing = client.get(f"{CRDS_PATH}/{name}")
    if existing.status_code == 200:
        body = {**crd, "metadata": {**crd["metadata"], **_keep_version(existing.json())}}
        response = client.put(f"{CRDS_PATH}/{name}", json=body)
        assert response.status_code == 200, response.text
    else:
        response = client.post(CRDS_PATH, json=crd)
        assert response.status_code == 201, response.text

    def established() -> bool:
        # A CRD just created may answer "conditions": null until the establishing controller has run.
        conditions = (client.get(f"{CRDS_PATH}/{name}").json().get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    wait_for(established, within=20)
    plural = crd["spec"]["names"]["plural"]
    wait_for(lambda: client.get(f"{BASE}/{plural}").status_code == 200, within=20)


def _keep_version(obj: dict[str, Any]) -> dict[str, Any]:
    return {"resourceVersion": obj["metadata"]["resourceVersion"]}


@pytest.fixture(scope="module", params=["kubesim", "apiserver"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp(f"parity-{request.param}")
    if request.param == "kubesim":
        sim = KubeSim()
        sim.start_in_thread()
        client = httpx.Client(base_url=sim.url, timeout=15)
        kubeconfig = sim.write_kubeconfig(workdir / "kubeconfig")
        try:
            for crd in (WIDGET_CRD, GADGET_CRD):
                _apply_crd(client, crd)
            yield Server("kubesim", client, kubeconfig, sim)
        finally:
            client.close()
            sim.stop_thread()
        assert sim.internal_errors == []
        return
    if not request.config.getoption("--cluster"):
        pytest.skip("the real API server variant runs with --cluster (make cluster && make e2e)")
    client, kubeconfig = _cluster_http_client()
    try:
        for crd in (WIDGET_CRD, GADGET_CRD):
            _apply_crd(client, crd)
        yield Server("apiserver", client, kubeconfig)
    finally:
        client.close()


@pytest.fixture()
def client(server: Server) -> httpx.Client:
    return server.client


@pytest.fixture()
def namespace(server: Server) -> str:
    name = f"parity-{uuid.uuid4().hex[:10]}"
    # API semantics alone: exempt from the tenancy admission policies (deploy/admission; kubesim runs none).
    exempt = {"name": name, "labels": {"kiloclaw.kilo.ai/admission": "exempt"}}
    response = server.client.post("/api/v1/namespaces", json={"metadata": exempt})
    assert response.status_code == 201, response.text
    return name


# -- helpers -------------------------------------------------------------------------------------------------


def widget(name: str, color: str = "red", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {"color": color, **spec},
    }


def url(namespace: str, name: str = "", subresource: str = "") -> str:
    path = f"{BASE}/namespaces/{namespace}/{PLURAL}"
    return "/".join(part for part in (path, name, subresource) if part)


def create(client: httpx.Client, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(url(namespace), json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def merge(client: httpx.Client, path: str, patch: Any, **params: str) -> httpx.Response:
    return client.patch(
        path,
        params=params,
        content=json.dumps(patch),
        headers={"Content-Type": "application/merge-patch+json"},
    )


def json_patch(client: httpx.Client, path: str, operations: list[dict[str, Any]]) -> httpx.Response:
    return client.patch(
        path, content=json.dumps(operations), headers={"Content-Type": "application/json-patch+json"}
    )


def watch(client: httpx.Client, path: str, count: int | None = None, **params: Any) -> list[dict[str, Any]]:
    """Events of a watch: the first ``count`` of them, or all until the server ends it (timeoutSeconds)."""
    params = {"watch": "true", "timeoutSeconds": 5, **params}
    events: list[dict[str, Any]] = []
    with client.stream("GET", path, params=params) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("application/json")
        for line in response.iter_lines():
            if line.strip():
                events.append(json.loads(line))
            if count is not None and len(events) >= count:
                break
    return events


def wait_for(condition: Callable[[], Any], within: float = 5.0) -> Any:
    deadline = time.monotonic() + within
    value = condition()
    while not value and time.monotonic() < deadline:
        time.sleep(0.05)
        value = condition()
    assert value, f"condition not met within {within}s"
    return value


def causes(response: httpx.Response) -> list[tuple[str, str]]:
    """(field, reason) of each cause of a Status."""
    return [(c.get("field", ""), c["reason"]) for c in response.json()["details"].get("causes", [])]


def invalid(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    status: dict[str, Any] = response.json()
    assert status["kind"] == "Status" and status["reason"] == "Invalid" and status["code"] == 422
    return status


# -- metadata, resourceVersion, conflicts --------------------------------------------------------------------


def test_create_sets_uid_creation_timestamp_generation_and_a_growing_resource_version(
    client: httpx.Client, namespace: str
) -> None:
    first = create(client, namespace, widget("first"))
    second = create(client, namespace, widget("second"))
    meta = first["metadata"]
    assert uuid.UUID(meta["uid"])
    assert meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1
    assert meta["namespace"] == namespace
    assert int(second["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert first["apiVersion"] == f"{GROUP}/{VERSION}" and first["kind"] == KIND


def test_a_namespace_in_the_body_that_differs_from_the_url_is_400(
    client: httpx.Client, namespace: str
) -> None:
    assert create(client, namespace, widget("from-url"))["metadata"]["namespace"] == namespace
    body = widget("mismatch")
    body["metadata"]["namespace"] = "default"
    response = client.post(url(namespace), json=body)
    assert response.status_code == 400
    assert response.json()["reason"] == "BadRequest"
    assert "does not match the namespace" in response.json()["message"]


def test_generate_name_gets_a_five_character_suffix(client: httpx.Client, namespace: str) -> None:
    body = widget("")
    body["metadata"] = {"generateName": "gen-"}
    names = {create(client, namespace, body)["metadata"]["name"] for _ in range(3)}
    assert len(names) == 3
    assert all(name.startswith("gen-") and len(name) == len("gen-") + 5 for name in names)


def test_a_long_generate_name_is_cut_so_the_name_stays_within_63_characters(
    client: httpx.Client, namespace: str
) -> None:
    body = widget("")
    body["metadata"] = {"generateName": "g" * 70}
    created = create(client, namespace, body)
    assert created["metadata"]["name"].startswith("g" * 58) and len(created["metadata"]["name"]) == 63
    assert created["metadata"]["generateName"] == "g" * 70


def test_neither_name_nor_generate_name_is_422_required(client: httpx.Client, namespace: str) -> None:
    body = widget("")
    body["metadata"] = {}
    status = invalid(client.post(url(namespace), json=body))
    assert status["message"] == f'{KIND}.{GROUP} "" is invalid: metadata.name: Required value: name or ' + (
        "generateName is required"
    )
    assert "name" not in status["details"]
    assert causes(client.post(url(namespace), json=body)) == [("metadata.name", "FieldValueRequired")]


def test_creating_an_existing_name_is_409_already_exists(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("twice"))
    response = client.post(url(namespace), json=widget("twice"))
    assert response.status_code == 409
    status = response.json()
    assert status["kind"] == "Status" and status["status"] == "Failure"
    assert status["reason"] == "AlreadyExists" and status["code"] == 409
    assert status["message"] == f'{PLURAL}.{GROUP} "twice" already exists'


def test_creating_in_a_missing_namespace_is_404(client: httpx.Client) -> None:
    response = client.post(url("no-such-namespace"), json=widget("orphan"))
    assert response.status_code == 404
    assert response.json()["message"] == 'namespaces "no-such-namespace" not found'


def test_a_missing_object_is_404_with_a_not_found_status(client: httpx.Client, namespace: str) -> None:
    response = client.get(url(namespace, "ghost"))
    assert response.status_code == 404
    status = response.json()
    assert status["kind"] == "Status" and status["reason"] == "NotFound"
    assert status["message"] == f'{PLURAL}.{GROUP} "ghost" not found'
    assert status["details"] == {"name": "ghost", "group": GROUP, "kind": PLURAL}


def test_a_write_with_a_stale_resource_version_is_409_conflict(client: httpx.Client, namespace: str) -> None:
    created = create(client, namespace, widget("stale"))
    assert merge(client, url(namespace, "stale"), {"spec": {"size": 2}}).status_code == 200

    response = client.put(url(namespace, "stale"), json={**created, "spec": {"color": "blue"}})
    assert response.status_code == 409
    assert response.json()["reason"] == "Conflict"
    assert response.json()["message"] == (
        f'Operation cannot be fulfilled on {PLURAL}.{GROUP} "stale": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    stale_patch = {
        "metadata": {"resourceVersion": created["metadata"]["resourceVersion"]},
        "spec": {"size": 3},
    }
    assert merge(client, url(namespace, "stale"), stale_patch).status_code == 409


def test_put_replaces_the_spec_and_keeps_server_owned_metadata(client: httpx.Client, namespace: str) -> None:
    created = create(client, namespace, widget("replace", size=5, tags=["a"]))
    replacement = {**created, "spec": {"color": "green"}}
    replacement["metadata"] = {**created["metadata"], "uid": created["metadata"]["uid"], "generation": 99}
    response = client.put(url(namespace, "replace"), json=replacement)
    assert response.status_code == 200, response.text
    replaced = response.json()
    assert replaced["spec"] == {"color": "green", "size": 1}  # size defaulted again, tags gone
    assert replaced["metadata"]["uid"] == created["metadata"]["uid"]
    assert replaced["metadata"]["generation"] == 2


def test_put_of_a_custom_resource_without_resource_version_is_422(
    client: httpx.Client, namespace: str
) -> None:
    create(client, namespace, widget("unconditional"))
    status = invalid(client.put(url(namespace, "unconditional"), json=widget("unconditional", "blue")))
    assert status["message"] == (
        f'{PLURAL}.{GROUP} "unconditional" is invalid: metadata.resourceVersion: Invalid value: 0: '
        "must be specified for an update"
    )
    assert status["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "message": "Invalid value: 0: must be specified for an update",
            "field": "metadata.resourceVersion",
        }
    ]


def test_a_create_carrying_a_resource_version_is_refused(client: httpx.Client, namespace: str) -> None:
    body = widget("versioned")
    body["metadata"]["resourceVersion"] = "5"
    response = client.post(url(namespace), json=body)
    assert response.status_code == 500
    assert response.json()["message"] == "resourceVersion should not be set on objects to be created"


def test_an_update_carrying_another_uid_is_409(client: httpx.Client, namespace: str) -> None:
    created = create(client, namespace, widget("uid"))
    forged = {**created, "metadata": {**created["metadata"], "uid": "forged"}}
    response = client.put(url(namespace, "uid"), json=forged)
    assert response.status_code == 409 and response.json()["reason"] == "Conflict"
    assert (
        "Precondition failed: UID in precondition: forged, UID in object meta: " in response.json()["message"]
    )


def test_delete_preconditions_are_checked(client: httpx.Client, namespace: str) -> None:
    created = create(client, namespace, widget("precondition"))
    meta = created["metadata"]
    stale = client.request(
        "DELETE", url(namespace, "precondition"), json={"preconditions": {"resourceVersion": "1"}}
    )
    assert stale.status_code == 409 and stale.json()["message"] == (
        f'Operation cannot be fulfilled on {KIND}.{GROUP} "precondition": the ResourceVersion in the '
        f"precondition (1) does not match the ResourceVersion in record ({meta['resourceVersion']}). "
        "The object might have been modified"
    )
    other = client.request("DELETE", url(namespace, "precondition"), json={"preconditions": {"uid": "nope"}})
    assert (
        other.status_code == 409
        and "the UID in the precondition (nope) does not match" in (other.json()["message"])
    )
    exact = {"preconditions": {"uid": meta["uid"], "resourceVersion": meta["resourceVersion"]}}
    assert client.request("DELETE", url(namespace, "precondition"), json=exact).status_code == 200


def test_a_custom_resource_body_must_say_what_it_is(client: httpx.Client, namespace: str) -> None:
    untyped = client.post(url(namespace), json={"metadata": {"name": "untyped"}, "spec": {"color": "red"}})
    assert untyped.status_code == 400
    assert untyped.json()["message"].startswith(
        f"the object provided is unrecognized (must be of type {KIND}): Object 'Kind' is missing in"
    )
    elsewhere = client.post(
        url(namespace), json={**widget("elsewhere"), "apiVersion": "other.example.com/v1"}
    )
    assert elsewhere.status_code == 400 and elsewhere.json()["message"] == (
        "the API version in the data (other.example.com/v1) does not match the expected API version "
        f"({GROUP}/{VERSION})"
    )
    status = invalid(client.post(url(namespace), json={**widget("mistyped"), "kind": "Gadget"}))
    assert (
        status["message"]
        == f'Gadget.{GROUP} "mistyped" is invalid: kind: Invalid value: "Gadget": must be {KIND}'
    )


def test_metadata_of_the_wrong_json_type_is_400(client: httpx.Client, namespace: str) -> None:
    body = widget("typed")
    body["metadata"]["labels"] = ["a"]
    response = client.post(url(namespace), json=body)
    assert response.status_code == 400 and response.json()["message"] == (
        f'{KIND} in version "{VERSION}" cannot be handled as a {KIND}: json: cannot unmarshal array into Go '
        "struct field ObjectMeta.labels of type map[string]string"
    )
    body["metadata"]["labels"] = {"a": 1}
    response = client.post(url(namespace), json=body)
    assert response.status_code == 400 and response.json()["message"].endswith(
        "json: cannot unmarshal number into Go struct field ObjectMeta.labels of type string"
    )
    create(client, namespace, widget("typed"))
    patched = merge(client, url(namespace, "typed"), {"metadata": {"finalizers": "example.com/f"}})
    status = invalid(patched)  # after a patch: 422 on the field "patch", with the patched object in it
    assert [c["field"] for c in status["details"]["causes"]] == ["patch"]
    assert status["message"].startswith(' "" is invalid: patch: Invalid value: "{')
    assert status["message"].endswith(
        "json: cannot unmarshal string into Go struct field ObjectMeta.finalizers of type []string"
    )


def test_owner_references_need_api_version_kind_name_and_uid(client: httpx.Client, namespace: str) -> None:
    body = widget("owned")
    body["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner"}]
    status = invalid(client.post(url(namespace), json=body))
    assert status["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "message": 'Invalid value: "": must not be empty',
            "field": "metadata.ownerReferences.uid",
        }
    ]
    body["metadata"]["ownerReferences"][0]["uid"] = str(uuid.uuid4())
    assert create(client, namespace, body)["metadata"]["ownerReferences"][0]["name"] == "owner"


def test_malformed_selectors_and_continue_tokens_are_400(client: httpx.Client, namespace: str) -> None:
    for params in (
        {"labelSelector": "a===b"},
        {"labelSelector": "a in b"},
        {"labelSelector": "bad key=v"},
        {"labelSelector": "k=bad value"},
        {"fieldSelector": "spec.color=red"},
        {"limit": "1", "continue": "bogus"},
    ):
        response = client.get(url(namespace), params=params)
        assert response.status_code == 400, params
        assert response.json()["reason"] == "BadRequest", params


def test_type_errors_are_reported_alone_when_the_schema_has_no_rules(
    client: httpx.Client, namespace: str
) -> None:
    status = invalid(client.post(url(namespace), json=widget("floaty", size=1.5)))
    assert status["message"] == (
        f'{KIND}.{GROUP} "floaty" is invalid: spec.size: Invalid value: "number": '
        'spec.size in body must be of type integer: "number"'
    )
    assert causes(client.post(url(namespace), json=widget("floaty", size=1.5))) == [
        ("spec.size", "FieldValueTypeInvalid")
    ]


def test_unknown_and_duplicate_fields_are_warned_about_or_refused_as_field_validation_says(
    client: httpx.Client, namespace: str
) -> None:
    body = {**widget("warned", bogus=1), "top": 1}
    warned = client.post(url(namespace), json=body)
    assert warned.status_code == 201
    assert warned.headers.get_list("warning") == [
        '299 - "unknown field \\"spec.bogus\\""',
        '299 - "unknown field \\"top\\""',
    ]
    body["metadata"]["name"] = "ignored"
    ignored = client.post(url(namespace), params={"fieldValidation": "Ignore"}, json=body)
    assert ignored.status_code == 201 and ignored.headers.get_list("warning") == []
    duplicated = (
        f'{{"apiVersion":"{GROUP}/{VERSION}","kind":"{KIND}","metadata":{{"name":"twice-said"}},'
        '"spec":{"color":"red","color":"blue"}}'
    )
    headers = {"Content-Type": "application/json"}
    refused = client.post(
        url(namespace), params={"fieldValidation": "Strict"}, content=duplicated, headers=headers
    )
    assert refused.status_code == 400 and refused.json()["message"] == (
        f'{KIND} in version "{VERSION}" cannot be handled as a {KIND}: strict decoding error: '
        'duplicate field "spec.color"'
    )
    last_wins = client.post(url(namespace), content=duplicated, headers=headers)
    assert last_wins.status_code == 201 and last_wins.json()["spec"]["color"] == "blue"
    assert last_wins.headers.get_list("warning") == ['299 - "duplicate field \\"spec.color\\""']
    strict_patch = client.patch(
        url(namespace, "warned"),
        params={"fieldValidation": "Strict"},
        content=json.dumps({"spec": {"bogus": 2}}),
        headers={"Content-Type": "application/merge-patch+json"},
    )
    status = invalid(strict_patch)  # after a patch: a 422 on the field "patch"
    assert [c["field"] for c in status["details"]["causes"]] == ["patch"]
    assert status["message"].endswith('strict decoding error: unknown field "spec.bogus"')


def test_write_options_are_validated(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("optioned"))
    cases = [
        ("POST", url(namespace), {"dryRun": "Bogus"}, "CreateOptions", "dryRun"),
        ("PUT", url(namespace, "optioned"), {"dryRun": "Bogus"}, "UpdateOptions", "dryRun"),
        ("DELETE", url(namespace, "optioned"), {"dryRun": "Bogus"}, "DeleteOptions", "dryRun"),
        ("POST", url(namespace), {"fieldValidation": "Bogus"}, "CreateOptions", "fieldValidation"),
        ("PATCH", url(namespace, "optioned"), {"fieldValidation": "x"}, "PatchOptions", "fieldValidation"),
    ]
    for method, path, params, kind, field in cases:  # (a DELETE with a body takes its options from the body)
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        body = {"POST": json.dumps(widget("optioned")), "PUT": json.dumps(widget("optioned")), "PATCH": "{}"}
        response = client.request(method, path, params=params, content=body.get(method), headers=headers)
        status = invalid(response)
        assert status["message"].startswith(f'{kind}.meta.k8s.io "" is invalid: {field}: Unsupported value: ')
        assert causes(response) == [(field, "FieldValueNotSupported")]


def test_list_resource_versions_are_checked(client: httpx.Client, namespace: str) -> None:
    garbled = client.get(url(namespace), params={"resourceVersion": "abc"})
    assert garbled.status_code == 400 and garbled.json()["message"] == (
        'invalid resource version: resourceVersion: Invalid value: "abc": strconv.ParseUint: parsing "abc": '
        "invalid syntax"
    )
    future = client.get(
        url(namespace), params={"resourceVersion": "999999999", "resourceVersionMatch": "Exact"}
    )
    assert future.status_code == 504 and future.json()["reason"] == "Timeout"
    assert future.json()["message"].startswith("Timeout: Too large resource version: 999999999, current: ")
    watched = client.get(url(namespace), params={"watch": "1", "resourceVersion": "abc"})
    assert watched.status_code == 500


def test_an_event_must_be_in_the_namespace_of_its_object(client: httpx.Client, namespace: str) -> None:
    event = {
        "metadata": {"name": "elsewhere"},
        "involvedObject": {"kind": KIND, "name": "x", "namespace": "other"},
        "reason": "Tested",
    }
    status = invalid(client.post(f"/api/v1/namespaces/{namespace}/events", json=event))
    assert status["message"] == (
        'Event "elsewhere" is invalid: involvedObject.namespace: Invalid value: "other": does not match '
        "event.namespace"
    )
    del event["involvedObject"]["namespace"]
    assert causes(client.post(f"/api/v1/namespaces/{namespace}/events", json=event)) == [
        ("involvedObject.namespace", "FieldValueInvalid")
    ]


def test_a_crd_keeps_its_scope_kind_group_and_plural_and_gets_defaults(client: httpx.Client) -> None:
    crd = client.get(f"{CRDS_PATH}/gadgets.{GROUP}").json()
    assert crd["spec"]["names"]["listKind"] == "GadgetList"
    assert crd["spec"]["conversion"] == {"strategy": "None"}
    changed = {**crd, "spec": {**crd["spec"], "scope": "Namespaced"}}
    changed["spec"]["names"] = {**crd["spec"]["names"], "kind": "Gizmo"}
    status = invalid(client.put(f"{CRDS_PATH}/gadgets.{GROUP}", params={"dryRun": "All"}, json=changed))
    assert sorted(c["field"] for c in status["details"]["causes"]) == ["spec.names.kind", "spec.scope"]
    assert 'spec.scope: Invalid value: "Namespaced": field is immutable' in status["message"]


def test_a_status_write_names_the_status_itself_with_an_empty_path(
    client: httpx.Client, namespace: str
) -> None:
    create(client, namespace, widget("bad-status"))
    status = invalid(merge(client, url(namespace, "bad-status", "status"), {"status": "not an object"}))
    assert status["details"]["causes"] == [
        {
            "reason": "FieldValueTypeInvalid",
            "message": 'Invalid value: "string":  in body must be of type object: "string"',
            "field": "status",
        }
    ]


def test_leases_decode_into_go_types_and_are_validated(client: httpx.Client, namespace: str) -> None:
    leases = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    spec = {
        "holderIdentity": "replica-a",
        "leaseDurationSeconds": 15,
        "acquireTime": "2026-12-01T15:00:00.000000Z",
        "renewTime": "2026-12-01T15:00:00.123456+02:00",
        "leaseTransitions": 0,
    }

    def lease(name: str, **changes: Any) -> dict[str, Any]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name},
            "spec": {**spec, **changes},
        }

    created = client.post(leases, json=lease("leader"))
    assert created.status_code == 201, created.text
    assert "generation" not in created.json()["metadata"]
    for name, changes, code, field in (
        ("zero", {"leaseDurationSeconds": 0}, 422, "spec.leaseDurationSeconds"),
        ("negative", {"leaseTransitions": -1}, 422, "spec.leaseTransitions"),
    ):
        response = client.post(leases, json=lease(name, **changes))
        assert response.status_code == code and causes(response) == [(field, "FieldValueInvalid")]
    for name, changes in (
        ("seconds-only", {"renewTime": "2026-12-01T15:00:00Z"}),  # MicroTime: exactly six fractional digits
        ("millis", {"acquireTime": "2026-12-01T15:00:00.123Z"}),
        ("worded", {"renewTime": "yesterday"}),
        ("textual", {"leaseDurationSeconds": "15"}),
    ):
        response = client.post(leases, json=lease(name, **changes))
        assert response.status_code == 400, (name, response.text)
        assert response.json()["message"].startswith('Lease in version "v1" cannot be handled as a Lease: ')
    strict = client.post(leases, params={"fieldValidation": "Strict"}, json=lease("strict", bogus=1))
    assert strict.status_code == 400 and strict.json()["message"].endswith('unknown field "spec.bogus"')
    unconditional = client.put(f"{leases}/leader", json=lease("leader", holderIdentity="replica-b"))
    assert invalid(unconditional)["message"] == (
        'leases.coordination.k8s.io "leader" is invalid: metadata.resourceVersion: Invalid value: 0: '
        "must be specified for an update"
    )
    strategic = client.patch(
        f"{leases}/leader",
        content=json.dumps({"spec": {"holderIdentity": "replica-c"}}),
        headers={"Content-Type": "application/strategic-merge-patch+json"},
    )
    assert strategic.status_code == 200 and strategic.json()["spec"]["holderIdentity"] == "replica-c"


def test_only_custom_resources_and_crds_carry_a_generation(client: httpx.Client, namespace: str) -> None:
    namespace_object = client.get(f"/api/v1/namespaces/{namespace}").json()
    assert "generation" not in namespace_object["metadata"]
    labelled = merge(client, f"/api/v1/namespaces/{namespace}", {"metadata": {"labels": {"a": "b"}}}).json()
    assert "generation" not in labelled["metadata"]
    event = {"metadata": {"name": "e"}, "involvedObject": {"namespace": namespace}, "reason": "R"}
    posted = client.post(f"/api/v1/namespaces/{namespace}/events", json=event).json()
    assert "generation" not in posted["metadata"]
    assert create(client, namespace, widget("generational"))["metadata"]["generation"] == 1
    assert client.get(f"{CRDS_PATH}/{PLURAL}.{GROUP}").json()["metadata"]["generation"] >= 1


# -- custom-resource metadata validation ---------------------------------------------------------------------

DNS_SUBDOMAIN_ERROR = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)


@pytest.mark.parametrize("name", ["Upper", "ends-with-dot.", "-starts-with-dash", "under_score", "x" * 254])
def test_names_of_custom_resources_must_be_dns_subdomains(
    client: httpx.Client, namespace: str, name: str
) -> None:
    status = invalid(client.post(url(namespace), json=widget(name)))
    expected = "must be no more than 253 characters" if len(name) > 253 else DNS_SUBDOMAIN_ERROR
    assert status["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "message": f'Invalid value: "{name}": {expected}',
            "field": "metadata.name",
        }
    ]
    assert status[
        "message"
    ] == f'{KIND}.{GROUP} "{name}" is invalid: metadata.name: Invalid value: "{name}": ' + (expected)


def test_a_name_of_253_characters_with_dots_is_valid(client: httpx.Client, namespace: str) -> None:
    name = ".".join(["a" * 63] * 4)[:253]
    assert create(client, namespace, widget(name))["metadata"]["name"] == name


def test_labels_keys_and_values_are_validated(client: httpx.Client, namespace: str) -> None:
    body = widget("labelled")
    body["metadata"]["labels"] = {"ok": "v" * 64}
    status = invalid(client.post(url(namespace), json=body))
    assert status["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "message": f'Invalid value: "{"v" * 64}": must be no more than 63 characters',
            "field": "metadata.labels",
        }
    ]
    for labels in (
        {"a/b/c": "v"},
        {"-bad": "v"},
        {"Bad.Prefix/name": "v"},
        {"ok": "trailing-"},
        {"k" * 64: ""},
    ):
        body["metadata"]["labels"] = labels
        assert causes(client.post(url(namespace), json=body)) == [("metadata.labels", "FieldValueInvalid")]
    body["metadata"]["labels"] = {"example.com/ok": "v" * 63, "k" * 63: "", "a.b_c-d": "A.b_C-1"}
    assert create(client, namespace, body)["metadata"]["labels"]["example.com/ok"] == "v" * 63


def test_label_value_of_64_characters_is_refused_on_update_too(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("relabel"))
    response = merge(client, url(namespace, "relabel"), {"metadata": {"labels": {"x": "y" * 64}}})
    # The real server lists the cause three times on updates (three validation passes), once in the message.
    assert set(causes(response)) == {("metadata.labels", "FieldValueInvalid")}
    assert invalid(response)["message"] == (
        f'{KIND}.{GROUP} "relabel" is invalid: metadata.labels: Invalid value: "{"y" * 64}": '
        "must be no more than 63 characters"
    )


def test_annotations_may_total_256_kib(client: httpx.Client, namespace: str) -> None:
    body = widget("annotated")
    body["metadata"]["annotations"] = {"a": "x" * (256 * 1024)}
    status = invalid(client.post(url(namespace), json=body))
    assert status["details"]["causes"] == [
        {
            "reason": "FieldValueTooLong",
            "message": "Too long: may not be more than 262144 bytes",
            "field": "metadata.annotations",
        }
    ]
    body["metadata"]["annotations"] = {"a": "x" * (256 * 1024 - 1)}
    create(client, namespace, body)
    too_much = {"metadata": {"annotations": {"b": "y"}}}
    assert set(causes(merge(client, url(namespace, "annotated"), too_much))) == {
        ("metadata.annotations", "FieldValueTooLong")
    }
    body = widget("bad-annotation-key")
    body["metadata"]["annotations"] = {"no spaces": "v"}
    assert causes(client.post(url(namespace), json=body)) == [("metadata.annotations", "FieldValueInvalid")]


def test_finalizer_names_must_be_qualified_names(client: httpx.Client, namespace: str) -> None:
    body = widget("finalized")
    body["metadata"]["finalizers"] = ["example.com/ok", "not ok"]
    status = invalid(client.post(url(namespace), json=body))
    assert [c["field"] for c in status["details"]["causes"]] == ["metadata.finalizers"]
    assert 'Invalid value: "not ok": name part must consist of' in status["message"]
    create(client, namespace, widget("finalized"))
    refused = merge(client, url(namespace, "finalized"), {"metadata": {"finalizers": ["a/b/c"]}})
    assert causes(refused) == [("metadata.finalizers", "FieldValueInvalid")]


def test_generate_name_must_be_a_dns_subdomain_prefix(client: httpx.Client, namespace: str) -> None:
    body = widget("")
    body["metadata"] = {"generateName": "Gen-"}
    response = client.post(url(namespace), json=body)
    assert [field for field, _ in causes(response)] == ["metadata.generateName", "metadata.name"]
    body["metadata"] = {"generateName": "ok."}  # the generated name ends with the suffix: valid
    assert [field for field, _ in causes(client.post(url(namespace), json=body))] == ["metadata.generateName"]


def test_core_events_keep_lenient_names_but_namespaces_must_be_dns_labels(
    client: httpx.Client, namespace: str
) -> None:
    event = {
        "metadata": {"generateName": "alice-vol-exp."},
        "involvedObject": {"kind": KIND, "name": "alice-vol-exp", "namespace": namespace},
        "reason": "Tested",
        "message": "m",
        "type": "Normal",
    }
    response = client.post(f"/api/v1/namespaces/{namespace}/events", json=event)
    assert response.status_code == 201, response.text
    event["metadata"] = {"name": "Upper_Case.name"}
    assert client.post(f"/api/v1/namespaces/{namespace}/events", json=event).status_code == 201
    event["metadata"] = {"name": "x", "labels": {"bad key": "v"}}
    assert causes(client.post(f"/api/v1/namespaces/{namespace}/events", json=event)) == [
        ("metadata.labels", "FieldValueInvalid")
    ]
    status = invalid(client.post("/api/v1/namespaces", json={"metadata": {"name": "dotted.name"}}))
    assert status["message"] == (
        'Namespace "dotted.name" is invalid: metadata.name: Invalid value: "dotted.name": '
        "must not contain dots"
    )
    assert status["details"] == {
        "name": "dotted.name",
        "kind": "Namespace",
        "causes": [
            {
                "reason": "FieldValueInvalid",
                "message": 'Invalid value: "dotted.name": must not contain dots',
                "field": "metadata.name",
            }
        ],
    }


def test_several_errors_are_listed_in_brackets(client: httpx.Client, namespace: str) -> None:
    body = widget("several", "purple", size=0)
    status = invalid(client.post(url(namespace), json=body))
    # The real server's order of schema errors is Go's map order: random.
    assert status["message"].startswith(f'{KIND}.{GROUP} "several" is invalid: [spec.')
    assert status["message"].endswith("]") and ", spec." in status["message"]
    assert sorted(causes(client.post(url(namespace), json=body))) == [
        ("spec.color", "FieldValueNotSupported"),
        ("spec.size", "FieldValueInvalid"),
    ]


# -- schema: pruning, defaulting, validation -----------------------------------------------------------------


def test_crd_schema_defaults_are_applied_and_invalid_objects_are_422(
    client: httpx.Client, namespace: str
) -> None:
    created = create(client, namespace, widget("defaulted"))
    assert created["spec"]["size"] == 1
    status = invalid(client.post(url(namespace), json=widget("bad-color", "purple")))
    assert status["message"] == (
        f'{KIND}.{GROUP} "bad-color" is invalid: spec.color: Unsupported value: "purple": supported values: '
        '"red", "green", "blue"'
    )
    assert status["details"]["causes"] == [
        {
            "reason": "FieldValueNotSupported",
            "message": 'Unsupported value: "purple": supported values: "red", "green", "blue"',
            "field": "spec.color",
        }
    ]
    missing = invalid(client.post(url(namespace), json={**widget("no-spec"), "spec": {}}))
    assert [c["field"] for c in missing["details"]["causes"]] == ["spec.color"]
    too_small = invalid(merge(client, url(namespace, "defaulted"), {"spec": {"size": 0}}))
    assert too_small["details"]["causes"][0]["field"] == "spec.size"


def test_unknown_fields_are_pruned_or_refused_with_strict_field_validation(
    client: httpx.Client, namespace: str
) -> None:
    body = widget("pruned", colour="blue")
    body["extra"] = True
    created = create(client, namespace, body)
    assert "colour" not in created["spec"] and "extra" not in created
    body["metadata"]["name"] = "strict"
    response = client.post(url(namespace), params={"fieldValidation": "Strict"}, json=body)
    assert response.status_code == 400
    assert response.json()["reason"] == "BadRequest"
    assert response.json()["message"] == (
        f'{KIND} in version "{VERSION}" cannot be handled as a {KIND}: strict decoding error: '
        'unknown field "extra", unknown field "spec.colour"'
    )


def test_pattern_dollar_matches_only_at_the_very_end_as_in_re2(client: httpx.Client, namespace: str) -> None:
    status = invalid(client.post(url(namespace), json=widget("zone", zone="iad\n")))
    assert status["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "message": "Invalid value: \"iad\\n\": spec.zone in body should match '^[a-z]{3}$'",
            "field": "spec.zone",
        }
    ]
    assert create(client, namespace, widget("zone", zone="iad"))["spec"]["zone"] == "iad"


DATE_TIMES = [
    ("2026-11-25T12:00:00Z", True),
    ("2026-11-25t12:00:00z", True),
    ("2026-11-25T12:00:00.123456789123Z", True),
    ("2026-11-25T12:00:00,5Z", True),
    ("2026-11-25T12:00:00+02:00", True),
    ("2026-11-25T12:00:00-00:00", True),
    ("2026-11-25T12:00:00", False),
    ("2026-11-25 12:00:00Z", False),
    ("2026-11-25T12:00:00+0200", False),
    ("2026-11-25T12:00Z", False),
    ("2026-11-25T24:00:00Z", False),
    ("2026-11-25T12:00:60Z", False),
    ("2026-02-30T12:00:00Z", False),
    ("2026-11-25T12:00:00Z\n", False),
    ("2026-11-25", False),
]


def test_date_time_format_is_as_strict_as_kube_openapi(client: httpx.Client, namespace: str) -> None:
    verdicts = []
    for index, (value, _) in enumerate(DATE_TIMES):
        response = client.post(
            url(namespace), params={"dryRun": "All"}, json=widget(f"dt-{index}", due=value)
        )
        assert response.status_code in (201, 422), response.text
        if response.status_code == 422:
            shown = json.dumps(value)
            assert response.json()["details"]["causes"] == [
                {
                    "reason": "FieldValueTypeInvalid",
                    "message": f"Invalid value: {shown}: spec.due in body must be of type date-time: {shown}",
                    "field": "spec.due",
                }
            ]
        verdicts.append((value, response.status_code == 201))
    assert verdicts == DATE_TIMES


# -- patches -------------------------------------------------------------------------------------------------


def test_merge_patch_null_deletes_a_key_and_lists_are_replaced(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("merge", tags=["a", "b"], extra="x"))
    response = merge(client, url(namespace, "merge"), {"spec": {"extra": None, "tags": ["c"]}})
    assert response.status_code == 200
    assert response.json()["spec"] == {"color": "red", "size": 1, "tags": ["c"]}


def test_json_patch_with_a_failing_test_operation_is_422_and_changes_nothing(
    client: httpx.Client, namespace: str
) -> None:
    created = create(client, namespace, widget("jsonpatch"))
    response = json_patch(
        client,
        url(namespace, "jsonpatch"),
        [
            {"op": "test", "path": "/metadata/resourceVersion", "value": "not-the-version"},
            {"op": "add", "path": "/metadata/finalizers", "value": ["example.com/f"]},
        ],
    )
    invalid(response)
    after = client.get(url(namespace, "jsonpatch")).json()
    assert after["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert "finalizers" not in after["metadata"]


def test_json_patch_adds_a_finalizer_after_a_passing_resource_version_test_as_kopf_does(
    client: httpx.Client, namespace: str
) -> None:
    created = create(client, namespace, widget("kopf-style"))
    response = json_patch(
        client,
        url(namespace, "kopf-style"),
        [
            {
                "op": "test",
                "path": "/metadata/resourceVersion",
                "value": created["metadata"]["resourceVersion"],
            },
            {"op": "add", "path": "/metadata/finalizers", "value": ["example.com/f"]},
        ],
    )
    assert response.status_code == 200, response.text
    patched = response.json()
    assert patched["metadata"]["finalizers"] == ["example.com/f"]
    assert patched["metadata"]["generation"] == 1  # metadata-only change


def test_strategic_merge_patch_is_415_on_a_custom_resource_but_works_on_a_namespace(
    client: httpx.Client, namespace: str
) -> None:
    create(client, namespace, widget("strategic"))
    patch = json.dumps({"metadata": {"labels": {"a": "b"}}})
    headers = {"Content-Type": "application/strategic-merge-patch+json"}
    response = client.patch(url(namespace, "strategic"), content=patch, headers=headers)
    assert response.status_code == 415
    assert response.json()["reason"] == "UnsupportedMediaType"
    assert response.json()["message"].startswith("the body of the request was in an unknown format")
    labelled = client.patch(f"/api/v1/namespaces/{namespace}", content=patch, headers=headers)
    assert labelled.status_code == 200 and labelled.json()["metadata"]["labels"]["a"] == "b"


def test_an_unknown_patch_content_type_is_415(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("unknown-patch"))
    response = client.patch(
        url(namespace, "unknown-patch"), content="{}", headers={"Content-Type": "text/x-unknown"}
    )
    assert response.status_code == 415
    assert response.json()["reason"] == "UnsupportedMediaType"


def test_dry_run_requests_answer_as_if_but_store_nothing(client: httpx.Client, namespace: str) -> None:
    dry = client.post(url(namespace), params={"dryRun": "All"}, json=widget("dry"))
    assert dry.status_code == 201 and dry.json()["spec"]["size"] == 1
    assert client.get(url(namespace, "dry")).status_code == 404
    created = create(client, namespace, widget("dry"))
    patched = merge(client, url(namespace, "dry"), {"spec": {"size": 9}}, dryRun="All")
    assert patched.status_code == 200 and patched.json()["spec"]["size"] == 9
    stored = client.get(url(namespace, "dry")).json()
    assert stored["spec"] == created["spec"]
    assert stored["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert client.delete(url(namespace, "dry"), params={"dryRun": "All"}).status_code == 200
    assert client.get(url(namespace, "dry")).status_code == 200


# -- status subresource and generation -----------------------------------------------------------------------


def test_create_drops_status_when_the_status_subresource_is_enabled(
    client: httpx.Client, namespace: str
) -> None:
    created = create(client, namespace, {**widget("nostatus"), "status": {"phase": "Forged"}})
    assert "status" not in created


def test_status_writes_change_only_status_and_do_not_bump_generation(
    client: httpx.Client, namespace: str
) -> None:
    created = create(client, namespace, widget("status-split"))
    response = merge(
        client,
        url(namespace, "status-split", "status"),
        {"spec": {"color": "blue"}, "metadata": {"labels": {"x": "y"}}, "status": {"phase": "Running"}},
    )
    assert response.status_code == 200
    patched = response.json()
    assert patched["status"] == {"phase": "Running"}
    assert patched["spec"]["color"] == "red"
    assert "labels" not in patched["metadata"]
    assert patched["metadata"]["generation"] == 1
    assert int(patched["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])


def test_main_endpoint_ignores_status_and_bumps_generation_only_for_spec_changes(
    client: httpx.Client, namespace: str
) -> None:
    create(client, namespace, widget("gen"))
    merge(client, url(namespace, "gen", "status"), {"status": {"phase": "Running"}})

    ignored = merge(client, url(namespace, "gen"), {"status": {"phase": "Hacked"}}).json()
    assert ignored["status"] == {"phase": "Running"}
    assert ignored["metadata"]["generation"] == 1

    labelled = merge(client, url(namespace, "gen"), {"metadata": {"labels": {"team": "a"}}}).json()
    assert labelled["metadata"]["generation"] == 1

    changed = merge(client, url(namespace, "gen"), {"spec": {"size": 4}}).json()
    assert changed["metadata"]["generation"] == 2


def test_without_a_status_subresource_status_changes_bump_generation(client: httpx.Client) -> None:
    name = f"g-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Gadget",
        "metadata": {"name": name},
        "status": {"a": 1},
    }
    created = client.post(f"{BASE}/gadgets", json=body).json()
    assert created["status"] == {"a": 1}
    assert "namespace" not in created["metadata"]
    patched = merge(client, f"{BASE}/gadgets/{name}", {"status": {"a": 2}}).json()
    assert patched["metadata"]["generation"] == 2
    assert merge(client, f"{BASE}/gadgets/{name}/status", {}).status_code == 404
    assert client.delete(f"{BASE}/gadgets/{name}").status_code == 200


def test_a_no_op_patch_keeps_the_resource_version_and_emits_no_watch_event(
    client: httpx.Client, namespace: str
) -> None:
    created = create(client, namespace, widget("noop"))
    version = created["metadata"]["resourceVersion"]
    same = merge(client, url(namespace, "noop"), {"spec": {"color": "red"}}).json()
    assert same["metadata"]["resourceVersion"] == version
    merge(client, url(namespace, "noop"), {"spec": {"color": "green"}})
    events = watch(client, url(namespace), count=1, resourceVersion=version)
    assert [(event["type"], event["object"]["spec"]["color"]) for event in events] == [("MODIFIED", "green")]


# -- deletion and finalizers ---------------------------------------------------------------------------------


def test_delete_without_finalizers_removes_at_once(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("plain"))
    response = client.delete(url(namespace, "plain"))
    assert response.status_code == 200
    assert client.get(url(namespace, "plain")).status_code == 404
    assert client.delete(url(namespace, "plain")).status_code == 404


def test_finalizers_hold_deletion_until_the_last_one_is_removed(client: httpx.Client, namespace: str) -> None:
    body = widget("held")
    body["metadata"]["finalizers"] = ["example.com/a", "example.com/b"]
    created = create(client, namespace, body)

    response = client.delete(url(namespace, "held"))
    assert response.status_code == 200
    marked = response.json()
    assert marked["metadata"]["deletionTimestamp"]
    assert marked["metadata"]["deletionGracePeriodSeconds"] == 0
    assert marked["metadata"]["generation"] == 2
    assert client.get(url(namespace, "held")).status_code == 200
    again = client.delete(url(namespace, "held")).json()
    assert again["metadata"]["resourceVersion"] == marked["metadata"]["resourceVersion"]

    refused = merge(
        client, url(namespace, "held"), {"metadata": {"finalizers": ["example.com/a", "example.com/c"]}}
    )
    status = invalid(refused)
    assert status["details"]["causes"][0]["field"] == "metadata.finalizers"
    assert status["details"]["causes"][0]["reason"] == "FieldValueForbidden"
    assert (
        "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers "
        '[]string{"example.com/c"}' in status["message"]
    )

    one_left = merge(client, url(namespace, "held"), {"metadata": {"finalizers": ["example.com/b"]}})
    assert one_left.status_code == 200
    assert client.get(url(namespace, "held")).status_code == 200
    gone = merge(client, url(namespace, "held"), {"metadata": {"finalizers": None}})
    assert gone.status_code == 200
    assert client.get(url(namespace, "held")).status_code == 404

    events = watch(client, url(namespace), count=3, resourceVersion=created["metadata"]["resourceVersion"])
    assert [event["type"] for event in events] == ["MODIFIED", "MODIFIED", "DELETED"]
    # DELETED carries the last stored state (etcd's previous value), with the deletion's resourceVersion.
    assert events[-1]["object"]["metadata"]["finalizers"] == ["example.com/b"]
    assert int(events[-1]["object"]["metadata"]["resourceVersion"]) > int(
        events[-2]["object"]["metadata"]["resourceVersion"]
    )


def test_a_terminating_namespace_refuses_new_content(client: httpx.Client, namespace: str) -> None:
    held = widget("held-in-namespace")
    held["metadata"]["finalizers"] = ["example.com/f"]
    create(client, namespace, held)
    assert client.delete(f"/api/v1/namespaces/{namespace}").status_code == 200
    terminating = client.get(f"/api/v1/namespaces/{namespace}").json()
    assert terminating["status"]["phase"] == "Terminating" and terminating["metadata"]["deletionTimestamp"]
    refused = client.post(url(namespace), json=widget("late"))
    assert refused.status_code == 403 and refused.json()["reason"] == "Forbidden"
    assert refused.json()["message"] == (
        f'{PLURAL}.{GROUP} "late" is forbidden: unable to create new content in namespace {namespace} '
        "because it is being terminated"
    )
    merge(client, url(namespace, "held-in-namespace"), {"metadata": {"finalizers": None}})


# -- watch ---------------------------------------------------------------------------------------------------


def test_watch_from_a_resource_version_sends_only_newer_events(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("before"))
    listed = client.get(url(namespace)).json()
    create(client, namespace, widget("after"))
    events = watch(client, url(namespace), count=1, resourceVersion=listed["metadata"]["resourceVersion"])
    assert [(event["type"], event["object"]["metadata"]["name"]) for event in events] == [("ADDED", "after")]


def test_watch_ends_at_timeout_seconds_and_a_fractional_timeout_is_400(
    client: httpx.Client, namespace: str
) -> None:
    version = client.get(url(namespace)).json()["metadata"]["resourceVersion"]
    started = time.monotonic()
    assert watch(client, url(namespace), resourceVersion=version, timeoutSeconds=1) == []
    assert 0.9 <= time.monotonic() - started < 4
    response = client.get(url(namespace), params={"watch": "true", "timeoutSeconds": "0.5"})
    assert response.status_code == 400 and response.json()["reason"] == "BadRequest"


def test_watch_without_a_resource_version_starts_with_synthetic_added_events(
    client: httpx.Client, namespace: str
) -> None:
    create(client, namespace, widget("existing"))
    events = watch(client, url(namespace), count=1)
    assert [(event["type"], event["object"]["metadata"]["name"]) for event in events] == [
        ("ADDED", "existing")
    ]


def test_streaming_list_ends_its_initial_events_with_a_bookmark(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("streamed"))
    events = watch(
        client,
        url(namespace),
        count=2,
        sendInitialEvents="true",
        resourceVersionMatch="NotOlderThan",
        allowWatchBookmarks="true",
    )
    assert [event["type"] for event in events] == ["ADDED", "BOOKMARK"]
    bookmark = events[1]["object"]
    assert bookmark["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert int(bookmark["metadata"]["resourceVersion"]) >= int(
        events[0]["object"]["metadata"]["resourceVersion"]
    )


def test_watch_from_a_too_old_resource_version_gets_a_410_expired_event(
    client: httpx.Client, namespace: str
) -> None:
    events = watch(client, url(namespace), count=1, resourceVersion="1")
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert status["kind"] == "Status" and status["code"] == 410 and status["reason"] == "Expired"
    assert status["message"].startswith("too old resource version: 1 (")


def test_a_filtered_watch_sees_objects_entering_and_leaving_its_selector(
    client: httpx.Client, namespace: str
) -> None:
    created = create(client, namespace, widget("mover"))
    path = url(namespace, "mover")
    merge(client, path, {"metadata": {"labels": {"tier": "back"}}})
    merge(client, path, {"metadata": {"labels": {"tier": "back", "x": "y"}}})
    merge(client, path, {"metadata": {"labels": {"tier": "front"}}})
    events = watch(
        client,
        url(namespace),
        count=3,
        resourceVersion=created["metadata"]["resourceVersion"],
        labelSelector="tier=back",
    )
    assert [event["type"] for event in events] == ["ADDED", "MODIFIED", "DELETED"]
    # Leaving the selector: the previous content (which matched), at the event's resourceVersion.
    assert events[-1]["object"]["metadata"]["labels"] == {"tier": "back", "x": "y"}
    assert int(events[-1]["object"]["metadata"]["resourceVersion"]) > int(
        events[-2]["object"]["metadata"]["resourceVersion"]
    )


def test_watch_respects_label_and_field_selectors(client: httpx.Client, namespace: str) -> None:
    start = client.get(url(namespace)).json()["metadata"]["resourceVersion"]
    for name, tier in (("w-front", "front"), ("w-back", "back")):
        body = widget(name)
        body["metadata"]["labels"] = {"tier": tier}
        create(client, namespace, body)
    by_label = watch(client, url(namespace), count=1, resourceVersion=start, labelSelector="tier=back")
    assert [event["object"]["metadata"]["name"] for event in by_label] == ["w-back"]
    by_name = watch(
        client, f"{BASE}/{PLURAL}", count=1, resourceVersion=start, fieldSelector="metadata.name=w-front"
    )
    assert [event["object"]["metadata"]["name"] for event in by_name] == ["w-front"]


# -- lists and selectors -------------------------------------------------------------------------------------


def test_list_has_api_version_kind_and_a_resource_version(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("listed"))
    listing = client.get(url(namespace)).json()
    assert listing["apiVersion"] == f"{GROUP}/{VERSION}"
    assert listing["kind"] == f"{KIND}List"
    assert int(listing["metadata"]["resourceVersion"]) >= 1
    assert [item["metadata"]["name"] for item in listing["items"]] == ["listed"]


def test_label_selectors_support_equality_sets_and_existence(client: httpx.Client, namespace: str) -> None:
    for name, labels in (("l-a", {"env": "prod", "tier": "web"}), ("l-b", {"env": "dev"}), ("l-c", {})):
        body = widget(name)
        body["metadata"]["labels"] = labels
        create(client, namespace, body)

    def names(selector: str) -> list[str]:
        items = client.get(url(namespace), params={"labelSelector": selector}).json()["items"]
        return [item["metadata"]["name"] for item in items]

    assert names("env=prod") == ["l-a"]
    assert names("env==dev") == ["l-b"]
    assert names("env!=prod") == ["l-b", "l-c"]
    assert names("env in (prod, dev)") == ["l-a", "l-b"]
    assert names("env notin (prod)") == ["l-b", "l-c"]
    assert names("tier") == ["l-a"]
    assert names("!tier") == ["l-b", "l-c"]
    assert names("env=prod,tier=web") == ["l-a"]


def test_field_selectors_and_cluster_wide_lists(client: httpx.Client, namespace: str) -> None:
    other = f"parity-{uuid.uuid4().hex[:10]}"
    assert client.post("/api/v1/namespaces", json={"metadata": {"name": other}}).status_code == 201
    create(client, namespace, widget("same-name"))
    create(client, other, widget("same-name"))
    everywhere = client.get(f"{BASE}/{PLURAL}", params={"fieldSelector": "metadata.name=same-name"}).json()
    assert {namespace, other} <= {item["metadata"]["namespace"] for item in everywhere["items"]}
    only_other = client.get(
        f"{BASE}/{PLURAL}", params={"fieldSelector": f"metadata.namespace={other}"}
    ).json()
    assert [item["metadata"]["name"] for item in only_other["items"]] == ["same-name"]
    excluded = client.get(url(namespace), params={"fieldSelector": "metadata.name!=same-name"}).json()
    assert excluded["items"] == []
    unsupported = client.get(url(namespace), params={"fieldSelector": "spec.color=red"})
    assert unsupported.status_code == 400 and unsupported.json()["reason"] == "BadRequest"


def test_list_chunks_with_limit_and_continue(client: httpx.Client, namespace: str) -> None:
    for index in range(5):
        create(client, namespace, widget(f"chunk-{index}"))
    first = client.get(url(namespace), params={"limit": 2}).json()
    assert len(first["items"]) == 2 and first["metadata"]["remainingItemCount"] == 3
    names = [item["metadata"]["name"] for item in first["items"]]
    token = first["metadata"]["continue"]
    while token:
        page = client.get(url(namespace), params={"limit": 2, "continue": token}).json()
        names += [item["metadata"]["name"] for item in page["items"]]
        token = page["metadata"].get("continue")
    assert names == [f"chunk-{index}" for index in range(5)]


# -- discovery and CRDs --------------------------------------------------------------------------------------


def test_core_discovery_serves_namespaces_and_events(client: httpx.Client) -> None:
    assert client.get("/api").json()["versions"] == ["v1"]
    core = client.get("/api/v1").json()
    assert core["kind"] == "APIResourceList" and core["groupVersion"] == "v1"
    resources = {resource["name"]: resource for resource in core["resources"]}
    assert resources["namespaces"]["namespaced"] is False and resources["namespaces"]["kind"] == "Namespace"
    assert resources["events"]["namespaced"] is True and "create" in resources["events"]["verbs"]
    assert client.get("/api/v1/namespaces/default").json()["status"] == {"phase": "Active"}


def test_a_crd_makes_its_resource_discoverable_with_names_and_subresources(client: httpx.Client) -> None:
    groups = {group["name"]: group for group in client.get("/apis").json()["groups"]}
    assert groups[GROUP]["preferredVersion"] == {"groupVersion": f"{GROUP}/{VERSION}", "version": VERSION}
    assert client.get(f"/apis/{GROUP}").json()["kind"] == "APIGroup"
    listing = client.get(BASE).json()
    assert listing["groupVersion"] == f"{GROUP}/{VERSION}"
    resources = {resource["name"]: resource for resource in listing["resources"]}
    widgets = resources[PLURAL]
    assert widgets["kind"] == KIND and widgets["namespaced"] is True and widgets["singularName"] == "widget"
    assert widgets["shortNames"] == ["pwd"] and widgets["categories"] == ["paritytoys"]
    assert set(widgets["verbs"]) >= {"get", "list", "watch", "create", "update", "patch", "delete"}
    assert resources[f"{PLURAL}/status"]["verbs"] == ["get", "patch", "update"]
    assert "gadgets/status" not in resources and resources["gadgets"]["namespaced"] is False
    assert client.get(CRDS_PATH).json()["kind"] == "CustomResourceDefinitionList"
    crd = client.get(f"{CRDS_PATH}/{PLURAL}.{GROUP}").json()
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    assert crd["status"]["storedVersions"] == [VERSION]


def _crd_variant(name: str, **schema: Any) -> dict[str, Any]:
    """A copy of GADGET_CRD under another name, with the given openAPIV3Schema."""
    crd = json.loads(json.dumps(GADGET_CRD).replace("gadget", name).replace("Gadget", name.capitalize()))
    crd["spec"]["versions"][0]["schema"] = {"openAPIV3Schema": schema}
    return crd


def test_a_crd_whose_name_is_not_plural_dot_group_is_422(client: httpx.Client) -> None:
    crd = _crd_variant("misnamed", type="object")
    crd["metadata"]["name"] = f"wrong.{GROUP}"
    status = invalid(client.post(CRDS_PATH, params={"dryRun": "All"}, json=crd))
    assert ("metadata.name", "FieldValueInvalid") in [
        (c["field"], c["reason"]) for c in status["details"]["causes"]
    ]


def test_a_crd_with_a_description_on_the_root_metadata_schema_is_422(client: httpx.Client) -> None:
    crd = _crd_variant(
        "describedmeta",
        type="object",
        properties={"metadata": {"type": "object", "description": "Standard object metadata."}},
    )
    status = invalid(client.post(CRDS_PATH, params={"dryRun": "All"}, json=crd))
    assert status["message"] == (
        f'CustomResourceDefinition.apiextensions.k8s.io "describedmetas.{GROUP}" is invalid: '
        "spec.validation.openAPIV3Schema.properties[metadata]: Forbidden: must not specify anything other "
        "than name and generateName, but metadata is implicitly specified"
    )
    assert causes(client.post(CRDS_PATH, params={"dryRun": "All"}, json=crd)) == [
        ("spec.validation.openAPIV3Schema.properties[metadata]", "FieldValueForbidden")
    ]
    # name and generateName (and a bare type: object) are allowed
    fine = _crd_variant(
        "namedmeta",
        type="object",
        properties={
            "metadata": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 40}},
            }
        },
    )
    assert client.post(CRDS_PATH, params={"dryRun": "All"}, json=fine).status_code == 201


@pytest.mark.parametrize(
    ("schema", "field"),
    [
        (
            {"type": "object", "properties": {"spec": {"type": "object", "properties": {"a": {}}}}},
            "spec.validation.openAPIV3Schema.properties[spec].properties[a].type",
        ),
        (
            {"type": "object", "properties": {"spec": {"type": "array"}}},
            "spec.validation.openAPIV3Schema.properties[spec].items",
        ),
        ({"properties": {"spec": {"type": "object"}}}, "spec.validation.openAPIV3Schema.type"),
        ({"type": "string"}, "spec.validation.openAPIV3Schema.type"),
        (
            {"type": "object", "additionalProperties": {"type": "string"}},
            "spec.validation.openAPIV3Schema.additionalProperties",
        ),
        (
            {"type": "object", "properties": {"metadata": {"type": "string"}}},
            "spec.validation.openAPIV3Schema.properties[metadata].type",
        ),
        (
            {"type": "object", "properties": {"kind": {"type": "integer"}}},
            "spec.validation.openAPIV3Schema.properties[kind].type",
        ),
        (
            {"type": "object", "properties": {"spec": {"type": "strin"}}},
            "spec.validation.openAPIV3Schema.properties[spec].type",
        ),
        (
            {
                "type": "object",
                "properties": {"spec": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
            },
            "spec.validation.openAPIV3Schema.properties[spec].uniqueItems",
        ),
        (
            {"type": "object", "properties": {"spec": {"$ref": "#/definitions/x"}}},
            "spec.validation.openAPIV3Schema.properties[spec].$ref",
        ),
        (
            {
                "type": "object",
                "properties": {
                    "spec": {"x-kubernetes-int-or-string": True, "x-kubernetes-preserve-unknown-fields": True}
                },
            },
            "spec.validation.openAPIV3Schema.properties[spec].x-kubernetes-preserve-unknown-fields",
        ),
        (
            {
                "type": "object",
                "properties": {
                    "spec": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "map"}
                },
            },
            "spec.validation.openAPIV3Schema.properties[spec].x-kubernetes-list-map-keys",
        ),
        (
            {"type": "object", "x-kubernetes-preserve-unknown-fields": False},
            "spec.validation.openAPIV3Schema.x-kubernetes-preserve-unknown-fields",
        ),
        (
            {"type": "object", "properties": {"spec": {"type": "string", "pattern": "(?<=a)b"}}},
            "spec.validation.openAPIV3Schema.properties[spec].pattern",
        ),
        (
            {
                "type": "object",
                "properties": {
                    "spec": {
                        "type": "object",
                        "properties": {"a": {"type": "string", "pattern": "(unclosed"}},
                    }
                },
            },
            "spec.validation.openAPIV3Schema.properties[spec].properties[a].pattern",
        ),
        (
            {
                "type": "object",
                "properties": {
                    "spec": {
                        "type": "object",
                        "properties": {"a": {"type": "string"}},
                        "additionalProperties": {"type": "string"},
                    }
                },
            },
            "spec.validation.openAPIV3Schema.properties[spec].additionalProperties",
        ),
    ],
)
def test_structural_schema_violations_make_a_crd_422(
    client: httpx.Client, schema: dict[str, Any], field: str
) -> None:
    crd = _crd_variant("unstructured", **schema)
    status = invalid(client.post(CRDS_PATH, params={"dryRun": "All"}, json=crd))
    assert field in [c["field"] for c in status["details"]["causes"]], status["message"]


def test_events_can_be_posted_with_generate_name_and_selected_by_involved_object(
    client: httpx.Client, namespace: str
) -> None:
    event = {
        "metadata": {"generateName": "kopf-event-", "namespace": namespace},
        "type": "Normal",
        "reason": "Tested",
        "message": "hello",
        "involvedObject": {"kind": KIND, "name": "x", "namespace": namespace},
    }
    response = client.post(f"/api/v1/namespaces/{namespace}/events", json=event)
    assert response.status_code == 201, response.text
    assert response.json()["metadata"]["name"].startswith("kopf-event-")
    listing = client.get(
        f"/api/v1/namespaces/{namespace}/events", params={"fieldSelector": "involvedObject.name=x"}
    )
    assert [item["reason"] for item in listing.json()["items"]] == ["Tested"]


# -- tables --------------------------------------------------------------------------------------------------


def test_table_output_uses_the_crd_printer_columns(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("tabled", size=3))
    merge(
        client,
        url(namespace, "tabled", "status"),
        {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
    )
    table = client.get(url(namespace), headers={"Accept": TABLE}).json()
    assert table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1"
    assert [(c["name"], c["type"]) for c in table["columnDefinitions"]] == [
        ("Name", "string"),
        ("Phase", "string"),
        ("Ready", "string"),
        ("Size", "integer"),
        ("Age", "date"),
    ]
    cells = table["rows"][0]["cells"]
    assert cells[:4] == ["tabled", "Running", "True", 3]
    assert cells[4].endswith("s")  # the Age of a date column: a duration such as 0s
    assert table["rows"][0]["object"]["metadata"]["name"] == "tabled"
    single = client.get(url(namespace, "tabled"), headers={"Accept": TABLE}).json()
    assert single["kind"] == "Table" and single["rows"][0]["cells"][:4] == cells[:4]
    assert single["metadata"]["resourceVersion"] == single["rows"][0]["object"]["metadata"]["resourceVersion"]
    bare = client.get(url(namespace), headers={"Accept": TABLE}, params={"includeObject": "None"}).json()
    assert bare["rows"][0]["object"] is None and bare["rows"][0]["cells"][:4] == cells[:4]
    crds = client.get(CRDS_PATH, headers={"Accept": TABLE}).json()
    assert [(c["name"], c["type"]) for c in crds["columnDefinitions"]] == [
        ("Name", "string"),
        ("Created At", "date"),
    ]
    row = next(row for row in crds["rows"] if row["cells"][0] == f"{PLURAL}.{GROUP}")
    assert row["cells"][1] == row["object"]["metadata"]["creationTimestamp"]


def test_events_table_shows_what_kubectl_get_events_shows(client: httpx.Client, namespace: str) -> None:
    event = {
        "metadata": {"name": "e1"},
        "type": "Warning",
        "reason": "RecoveryFailed",
        "message": "no capacity",
        "involvedObject": {"kind": "KiloClawInstance", "name": "bob", "namespace": namespace},
    }
    assert client.post(f"/api/v1/namespaces/{namespace}/events", json=event).status_code == 201
    table = client.get(f"/api/v1/namespaces/{namespace}/events", headers={"Accept": TABLE}).json()
    columns = table["columnDefinitions"]
    shown = [index for index, column in enumerate(columns) if column["priority"] == 0]
    assert [columns[index]["name"] for index in shown] == ["Last Seen", "Type", "Reason", "Object", "Message"]
    cells = table["rows"][0]["cells"]
    assert [cells[index] for index in shown][1:] == [
        "Warning",
        "RecoveryFailed",
        "kiloclawinstance/bob",
        "no capacity",
    ]
    assert [(c["name"], c["type"], c["priority"]) for c in columns] == [
        ("Last Seen", "string", 0),
        ("Type", "string", 0),
        ("Reason", "string", 0),
        ("Object", "string", 0),
        ("Subobject", "string", 1),
        ("Source", "string", 1),
        ("Message", "string", 0),
        ("First Seen", "string", 1),
        ("Count", "string", 1),
        ("Name", "string", 1),
    ]


# -- kubectl -------------------------------------------------------------------------------------------------


@pytest.fixture()
def kubectl(
    server: Server, tmp_path: Path, namespace: str
) -> Callable[..., subprocess.CompletedProcess[str]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert KUBECTL is not None
        command = [
            KUBECTL,
            "--kubeconfig",
            str(server.kubeconfig),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--namespace",
            namespace,
            *args,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    return run


def test_kubectl_apply_get_patch_explain_and_delete(
    kubectl: Callable[..., subprocess.CompletedProcess[str]],
    tmp_path: Path,
    client: httpx.Client,
    namespace: str,
) -> None:
    manifest = tmp_path / "widget.yaml"
    manifest.write_text(yaml.safe_dump(widget("kubectl-widget", size=2)))
    assert "created" in kubectl("apply", "-f", str(manifest)).stdout
    manifest.write_text(yaml.safe_dump(widget("kubectl-widget", "blue", size=2)))
    assert "configured" in kubectl("apply", "-f", str(manifest)).stdout

    kubectl("patch", "pwd", "kubectl-widget", "--type", "merge", "-p", '{"spec":{"size":5}}')
    status_patch = '{"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}]}}'
    kubectl(
        "patch", "widget", "kubectl-widget", "--subresource=status", "--type", "merge", "-p", status_patch
    )
    stored = client.get(url(namespace, "kubectl-widget")).json()
    assert stored["spec"] == {"color": "blue", "size": 5}
    assert stored["status"]["phase"] == "Running"
    applied = stored["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
    assert json.loads(applied)["spec"] == {"color": "blue", "size": 2}

    table = kubectl("get", f"widgets.{GROUP}").stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "READY", "SIZE", "AGE"]
    assert table[1].split()[:4] == ["kubectl-widget", "Running", "True", "5"]
    assert kubectl("get", "paritytoys").stdout.splitlines()[1].split()[0] == "kubectl-widget"
    as_json = json.loads(kubectl("get", "pwd", "kubectl-widget", "-o", "json").stdout)
    assert as_json["metadata"]["uid"] == stored["metadata"]["uid"]

    invalid_patch = kubectl(
        "patch", "pwd", "kubectl-widget", "--type", "merge", "-p", '{"spec":{"color":"pink"}}', check=False
    )
    assert invalid_patch.returncode != 0
    assert 'spec.color: Unsupported value: "pink": supported values: "red", "green", "blue"' in (
        invalid_patch.stderr
    )
    unknown = kubectl("patch", "pwd", "kubectl-widget", "-p", '{"spec":{"size":6}}', check=False)
    assert unknown.returncode != 0  # kubectl's default patch type is strategic: refused for custom resources

    explained = kubectl("explain", f"widgets.{GROUP}.spec.color").stdout
    assert "FIELD: color <string>" in explained and "The colour of the widget." in explained

    kubectl("delete", "-f", str(manifest))
    assert client.get(url(namespace, "kubectl-widget")).status_code == 404
    assert "No resources found" in kubectl("get", f"widgets.{GROUP}").stderr


def test_kubectl_create_namespace_sends_protobuf_and_works(
    kubectl: Callable[..., subprocess.CompletedProcess[str]], client: httpx.Client
) -> None:
    name = f"imperative-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    kubectl("label", "namespace", name, "team=a")
    created = client.get(f"/api/v1/namespaces/{name}").json()
    assert created["metadata"]["labels"] == {"kubernetes.io/metadata.name": name, "team": "a"}
    assert "generateName" not in created["metadata"]
