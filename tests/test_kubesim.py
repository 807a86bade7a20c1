"""kubesim against documented Kubernetes API-server behaviour, over real HTTP (and the real kubectl).

References: the API conventions (resourceVersion, generation, status), the CRD documentation (status
subresource, defaults and validation, printer columns), "Finalizers" and "Efficient detection of changes"
(watch, 410 Gone) in the Kubernetes documentation.

The API-semantics cases that a real kube-apiserver can answer too live in tests/test_parity.py (run there
against kubesim always, and against the real server with --cluster); this file keeps what only kubesim has
(its Python API, request log, watch window size) and cases not worth a real-server round trip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kubesim import KubeSim

GROUP, VERSION, PLURAL, KIND = "example.com", "v1", "widgets", "Widget"
BASE = f"/apis/{GROUP}/{VERSION}"

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
            "shortNames": ["wd"],
            "categories": ["toys"],
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
                                    "color": {"type": "string", "enum": ["red", "green", "blue"]},
                                    "size": {"type": "integer", "default": 1, "minimum": 1},
                                    "tags": {"type": "array", "items": {"type": "string"}},
                                    "extra": {"type": "string"},
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

# A cluster-scoped resource without a status subresource, to check the other half of the generation rules.
GADGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"gadgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Cluster",
        "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
        "versions": [{"name": VERSION, "served": True, "storage": True}],
    },
}


@pytest.fixture(scope="module")
def sim() -> Iterator[KubeSim]:
    sim = KubeSim()
    sim.start_in_thread()
    with httpx.Client(base_url=sim.url) as client:
        for crd in (WIDGET_CRD, GADGET_CRD):
            response = client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd)
            assert response.status_code == 201, response.text
    yield sim
    sim.stop_thread()
    assert sim.internal_errors == []


@pytest.fixture()
def client(sim: KubeSim) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10) as client:
        yield client


@pytest.fixture()
def namespace(sim: KubeSim) -> str:
    name = f"ns-{uuid.uuid4().hex[:8]}"
    sim.create_namespace(name)
    return name


def widget(name: str, color: str = "red", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {"color": color, **spec},
    }


def create(client: httpx.Client, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"{BASE}/namespaces/{namespace}/{PLURAL}", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def url(namespace: str, name: str = "", subresource: str = "") -> str:
    path = f"{BASE}/namespaces/{namespace}/{PLURAL}"
    return "/".join(part for part in (path, name, subresource) if part)


def merge(client: httpx.Client, path: str, patch: Any) -> httpx.Response:
    return client.patch(
        path, content=json.dumps(patch), headers={"Content-Type": "application/merge-patch+json"}
    )


def json_patch(client: httpx.Client, path: str, operations: list[dict[str, Any]]) -> httpx.Response:
    return client.patch(
        path, content=json.dumps(operations), headers={"Content-Type": "application/json-patch+json"}
    )


def watch(client: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    """All events of a watch that the server ends (``timeoutSeconds``)."""
    events = []
    with client.stream("GET", path, params={"watch": "true", **params}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        for line in response.iter_lines():
            if line.strip():
                events.append(json.loads(line))
    return events


def wait_for(condition: Callable[[], Any], within: float = 5.0) -> Any:
    deadline = time.monotonic() + within
    value = condition()
    while not value and time.monotonic() < deadline:
        time.sleep(0.02)
        value = condition()
    assert value, f"condition not met within {within}s"
    return value


# -- metadata, resourceVersion, conflicts ----------------------------------------------------------


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


def test_namespace_is_taken_from_the_url_and_a_different_one_in_the_body_is_refused(
    client: httpx.Client, namespace: str
) -> None:
    created = create(client, namespace, widget("from-url"))
    assert created["metadata"]["namespace"] == namespace
    body = widget("mismatch")
    body["metadata"]["namespace"] = "default"
    response = client.post(url(namespace), json=body)
    assert response.status_code == 400
    assert response.json()["reason"] == "BadRequest"


def test_generate_name_gets_a_random_five_character_suffix(client: httpx.Client, namespace: str) -> None:
    body = widget("")
    body["metadata"] = {"generateName": "gen-"}
    names = {create(client, namespace, body)["metadata"]["name"] for _ in range(3)}
    assert len(names) == 3
    assert all(name.startswith("gen-") and len(name) == len("gen-") + 5 for name in names)


def test_creating_an_existing_name_is_409_already_exists(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("twice"))
    response = client.post(url(namespace), json=widget("twice"))
    assert response.status_code == 409
    status = response.json()
    assert status["kind"] == "Status" and status["status"] == "Failure"
    assert status["reason"] == "AlreadyExists" and status["code"] == 409


def test_creating_in_a_missing_namespace_is_404(client: httpx.Client) -> None:
    response = client.post(url("no-such-namespace"), json=widget("orphan"))
    assert response.status_code == 404
    assert response.json()["message"] == 'namespaces "no-such-namespace" not found'


def test_missing_object_is_404_not_found_status(client: httpx.Client, namespace: str) -> None:
    response = client.get(url(namespace, "ghost"))
    assert response.status_code == 404
    status = response.json()
    assert status["kind"] == "Status" and status["reason"] == "NotFound"
    assert status["message"] == f'{PLURAL}.{GROUP} "ghost" not found'
    assert status["details"] == {"name": "ghost", "group": GROUP, "kind": PLURAL}


def test_update_with_a_stale_resource_version_is_409_conflict(client: httpx.Client, namespace: str) -> None:
    created = create(client, namespace, widget("stale"))
    assert merge(client, url(namespace, "stale"), {"spec": {"size": 2}}).status_code == 200

    response = client.put(url(namespace, "stale"), json={**created, "spec": {"color": "blue"}})
    assert response.status_code == 409
    assert response.json()["reason"] == "Conflict"
    assert "the object has been modified" in response.json()["message"]

    stale_patch = {
        "metadata": {"resourceVersion": created["metadata"]["resourceVersion"]},
        "spec": {"size": 3},
    }
    assert merge(client, url(namespace, "stale"), stale_patch).status_code == 409


# -- patches ----------------------------------------------------------------------------------------


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
    assert response.status_code == 422
    assert response.json()["kind"] == "Status"
    assert client.get(url(namespace, "jsonpatch")).json() == created


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


def test_unknown_patch_content_type_is_415(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("apply"))
    response = client.patch(url(namespace, "apply"), content="{}", headers={"Content-Type": "text/x-unknown"})
    assert response.status_code == 415


def test_dry_run_requests_answer_as_if_but_store_nothing(client: httpx.Client, namespace: str) -> None:
    dry = client.post(url(namespace), params={"dryRun": "All"}, json=widget("dry"))
    assert dry.status_code == 201 and dry.json()["spec"]["size"] == 1
    assert client.get(url(namespace, "dry")).status_code == 404
    created = create(client, namespace, widget("dry"))
    patched = client.patch(
        url(namespace, "dry"),
        params={"dryRun": "All"},
        content=json.dumps({"spec": {"size": 9}}),
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert patched.status_code == 200 and patched.json()["spec"]["size"] == 9
    assert client.get(url(namespace, "dry")).json() == created
    assert client.delete(url(namespace, "dry"), params={"dryRun": "All"}).status_code == 200
    assert client.get(url(namespace, "dry")).status_code == 200


# -- status subresource and generation --------------------------------------------------------------


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
    assert client.patch(f"{BASE}/gadgets/{name}/status", json={}).status_code == 404


# -- deletion and finalizers ------------------------------------------------------------------------


def test_delete_without_finalizers_removes_at_once(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("plain"))
    response = client.delete(url(namespace, "plain"))
    assert response.status_code == 200
    assert client.get(url(namespace, "plain")).status_code == 404
    assert client.delete(url(namespace, "plain")).status_code == 404


def test_a_deleted_namespace_terminates_until_its_finalized_contents_are_gone(
    client: httpx.Client, namespace: str
) -> None:
    held = widget("held-in-namespace")
    held["metadata"]["finalizers"] = ["example.com/f"]
    create(client, namespace, held)
    create(client, namespace, widget("free-in-namespace"))

    response = client.delete(f"/api/v1/namespaces/{namespace}")
    assert response.status_code == 200
    terminating = client.get(f"/api/v1/namespaces/{namespace}").json()
    assert terminating["status"]["phase"] == "Terminating" and terminating["metadata"]["deletionTimestamp"]
    assert client.get(url(namespace, "free-in-namespace")).status_code == 404
    assert client.get(url(namespace, "held-in-namespace")).json()["metadata"]["deletionTimestamp"]
    refused = client.post(url(namespace), json=widget("late"))
    assert refused.status_code == 403 and refused.json()["reason"] == "Forbidden"
    assert "because it is being terminated" in refused.json()["message"]

    merge(client, url(namespace, "held-in-namespace"), {"metadata": {"finalizers": None}})
    assert client.get(f"/api/v1/namespaces/{namespace}").status_code == 404


def test_an_empty_namespace_is_deleted_at_once(client: httpx.Client, sim: KubeSim) -> None:
    sim.create_namespace("empty-one")
    assert client.delete("/api/v1/namespaces/empty-one").status_code == 200
    assert client.get("/api/v1/namespaces/empty-one").status_code == 404


# -- watch ------------------------------------------------------------------------------------------


def test_watch_from_a_resource_version_sends_only_newer_events_and_ends_at_timeout_seconds(
    client: httpx.Client, namespace: str
) -> None:
    create(client, namespace, widget("before"))
    listed = client.get(url(namespace)).json()
    create(client, namespace, widget("after"))
    started = time.monotonic()
    events = watch(
        client, url(namespace), resourceVersion=listed["metadata"]["resourceVersion"], timeoutSeconds=1
    )
    assert 0.9 <= time.monotonic() - started < 3
    assert [(event["type"], event["object"]["metadata"]["name"]) for event in events] == [("ADDED", "after")]


def test_watch_streams_live_events_as_they_happen(client: httpx.Client, sim: KubeSim, namespace: str) -> None:
    seen: list[tuple[str, str]] = []
    with client.stream("GET", url(namespace), params={"watch": "1", "timeoutSeconds": "5"}) as response:
        threading.Thread(
            target=lambda: sim.create_object(GROUP, VERSION, PLURAL, widget("live"), namespace)
        ).start()
        for line in response.iter_lines():
            event = json.loads(line)
            seen.append((event["type"], event["object"]["metadata"]["name"]))
            break
    assert seen == [("ADDED", "live")]


def test_watch_from_a_compacted_resource_version_gets_410_gone() -> None:
    small = KubeSim(window_size=3)
    small.start_in_thread()
    try:
        small.create_namespace("a")
        with httpx.Client(base_url=small.url) as client:
            first_version = client.get("/api/v1/namespaces").json()["metadata"]["resourceVersion"]
            for name in ("b", "c", "d", "e"):
                small.create_namespace(name)
            events = watch(client, "/api/v1/namespaces", resourceVersion=first_version, timeoutSeconds=5)
            assert len(events) == 1
            assert events[0]["type"] == "ERROR"
            assert events[0]["object"]["code"] == 410 and events[0]["object"]["reason"] == "Expired"
            recent = client.get("/api/v1/namespaces").json()["metadata"]["resourceVersion"]
            assert watch(client, "/api/v1/namespaces", resourceVersion=recent, timeoutSeconds=1) == []
    finally:
        small.stop_thread()


def test_events_of_other_resources_do_not_expire_a_quiet_resource_watch_window() -> None:
    small = KubeSim(window_size=3)
    small.start_in_thread()
    try:
        small.create_namespace("quiet")
        with httpx.Client(base_url=small.url) as client:
            version = client.get("/api/v1/namespaces").json()["metadata"]["resourceVersion"]
            for index in range(10):
                event = {
                    "metadata": {"name": f"e{index}"},
                    "reason": "Noise",
                    "involvedObject": {"namespace": "quiet"},
                }
                assert client.post("/api/v1/namespaces/quiet/events", json=event).status_code == 201
            assert watch(client, "/api/v1/namespaces", resourceVersion=version, timeoutSeconds=1) == []
    finally:
        small.stop_thread()


# -- lists and selectors ------------------------------------------------------------------------------


def test_list_has_api_version_kind_and_a_resource_version(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("listed"))
    listing = client.get(url(namespace)).json()
    assert listing["apiVersion"] == f"{GROUP}/{VERSION}"
    assert listing["kind"] == "WidgetList"
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


def test_field_selectors_and_cluster_wide_lists(client: httpx.Client, namespace: str, sim: KubeSim) -> None:
    other = f"ns-{uuid.uuid4().hex[:8]}"
    sim.create_namespace(other)
    create(client, namespace, widget("same-name"))
    create(client, other, widget("same-name"))
    everywhere = client.get(f"{BASE}/{PLURAL}", params={"fieldSelector": "metadata.name=same-name"}).json()
    assert {item["metadata"]["namespace"] for item in everywhere["items"]} == {namespace, other}
    only_other = client.get(
        f"{BASE}/{PLURAL}", params={"fieldSelector": f"metadata.namespace={other}"}
    ).json()
    assert [item["metadata"]["name"] for item in only_other["items"]] == ["same-name"]
    excluded = client.get(url(namespace), params={"fieldSelector": "metadata.name!=same-name"}).json()
    assert excluded["items"] == []


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


# -- discovery and CRDs -------------------------------------------------------------------------------


def test_core_discovery_says_group_version_v1_and_serves_namespaces_and_events(client: httpx.Client) -> None:
    assert client.get("/api").json()["versions"] == ["v1"]
    core = client.get("/api/v1").json()
    assert core["kind"] == "APIResourceList" and core["groupVersion"] == "v1"
    resources = {resource["name"]: resource for resource in core["resources"]}
    assert resources["namespaces"]["namespaced"] is False and resources["namespaces"]["kind"] == "Namespace"
    assert resources["events"]["namespaced"] is True and "create" in resources["events"]["verbs"]
    assert client.get("/api/v1/namespaces/default").json()["status"] == {"phase": "Active"}


def test_crd_makes_the_resource_discoverable_with_its_names_and_subresources(client: httpx.Client) -> None:
    groups = {group["name"]: group for group in client.get("/apis").json()["groups"]}
    assert groups[GROUP]["preferredVersion"] == {"groupVersion": f"{GROUP}/{VERSION}", "version": VERSION}
    assert client.get(f"/apis/{GROUP}").json()["kind"] == "APIGroup"
    listing = client.get(BASE).json()
    assert listing["groupVersion"] == f"{GROUP}/{VERSION}"
    resources = {resource["name"]: resource for resource in listing["resources"]}
    widgets = resources[PLURAL]
    assert widgets["kind"] == KIND and widgets["namespaced"] is True and widgets["singularName"] == "widget"
    assert widgets["shortNames"] == ["wd"] and widgets["categories"] == ["toys"]
    assert set(widgets["verbs"]) >= {"get", "list", "watch", "create", "update", "patch", "delete"}
    assert resources[f"{PLURAL}/status"]["verbs"] == ["get", "patch", "update"]
    assert "gadgets/status" not in resources and resources["gadgets"]["namespaced"] is False

    crds = client.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions").json()
    assert crds["kind"] == "CustomResourceDefinitionList"
    established = {
        item["metadata"]["name"]: {c["type"]: c["status"] for c in item["status"]["conditions"]}[
            "Established"
        ]
        for item in crds["items"]
    }
    assert established[f"{PLURAL}.{GROUP}"] == "True"


def test_deleting_a_crd_removes_its_resource_and_objects(client: httpx.Client, sim: KubeSim) -> None:
    crd = json.loads(json.dumps(GADGET_CRD).replace("gadget", "doohickey").replace("Gadget", "Doohickey"))
    assert client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd).status_code == 201
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Doohickey", "metadata": {"name": "d1"}}
    assert client.post(f"{BASE}/doohickeys", json=body).status_code == 201
    response = client.delete(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/doohickeys.{GROUP}")
    assert response.status_code == 200
    assert "doohickeys" not in {resource["name"] for resource in client.get(BASE).json()["resources"]}
    assert client.get(f"{BASE}/doohickeys/d1").status_code == 404


def test_malformed_crd_is_refused_with_422(client: httpx.Client) -> None:
    crd = json.loads(json.dumps(GADGET_CRD))
    crd["metadata"]["name"] = "wrong.example.com"
    response = client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd)
    assert response.status_code == 422


def test_crd_schema_defaults_are_applied_and_invalid_objects_are_422(
    client: httpx.Client, namespace: str
) -> None:
    created = create(client, namespace, widget("defaulted"))
    assert created["spec"]["size"] == 1
    response = client.post(url(namespace), json=widget("bad-color", "purple"))
    assert response.status_code == 422
    status = response.json()
    assert status["reason"] == "Invalid" and "spec.color" in status["message"]
    assert status["details"]["causes"]
    missing = {**widget("no-spec"), "spec": {}}
    assert client.post(url(namespace), json=missing).status_code == 422
    assert merge(client, url(namespace, "defaulted"), {"spec": {"size": 0}}).status_code == 422


def test_events_can_be_posted_with_generate_name_and_listed(client: httpx.Client, namespace: str) -> None:
    event = {
        "metadata": {"generateName": "kopf-event-", "namespace": namespace},
        "type": "Normal",
        "reason": "Tested",
        "message": "hello",
        "involvedObject": {"kind": KIND, "name": "x", "namespace": namespace},
    }
    response = client.post(f"/api/v1/namespaces/{namespace}/events", json=event)
    assert response.status_code == 201
    assert response.json()["metadata"]["name"].startswith("kopf-event-")
    listing = client.get(
        f"/api/v1/namespaces/{namespace}/events", params={"fieldSelector": "involvedObject.name=x"}
    )
    assert [item["reason"] for item in listing.json()["items"]] == ["Tested"]


# -- tables, request log, Python API --------------------------------------------------------------------


def test_table_output_uses_the_crd_printer_columns(client: httpx.Client, namespace: str) -> None:
    create(client, namespace, widget("tabled", size=3))
    merge(
        client,
        url(namespace, "tabled", "status"),
        {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
    )
    table = client.get(
        url(namespace), headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
    ).json()
    assert table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1"
    assert [column["name"] for column in table["columnDefinitions"]] == [
        "Name",
        "Phase",
        "Ready",
        "Size",
        "Age",
    ]
    cells = table["rows"][0]["cells"]
    assert cells[:4] == ["tabled", "Running", "True", 3]
    assert cells[4].endswith("s")
    assert table["rows"][0]["object"]["metadata"]["name"] == "tabled"


def test_request_log_records_rbac_verbs(client: httpx.Client, sim: KubeSim, namespace: str) -> None:
    create(client, namespace, widget("audited"))
    merge(client, url(namespace, "audited", "status"), {"status": {"phase": "x"}})
    client.get(url(namespace, "audited"))
    client.delete(url(namespace, "audited"))
    assert {
        ("create", GROUP, PLURAL),
        ("patch", GROUP, f"{PLURAL}/status"),
        ("get", GROUP, PLURAL),
        ("delete", GROUP, PLURAL),
    } <= sim.rbac_verbs_seen
    last = list(sim.request_log)[-1]
    assert (last.verb, last.group, last.version, last.resource, last.subresource, last.namespace) == (
        "delete",
        GROUP,
        VERSION,
        PLURAL,
        "",
        namespace,
    )


def test_python_api_reads_and_writes_the_same_state_as_http(sim: KubeSim, client: httpx.Client) -> None:
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    created = sim.create_namespace(namespace)
    assert created["status"]["phase"] == "Active"
    sim.create_object(GROUP, VERSION, PLURAL, widget("py"), namespace)
    assert client.get(url(namespace, "py")).status_code == 200
    fetched = sim.get_object(GROUP, VERSION, PLURAL, namespace, "py")
    assert fetched is not None and fetched["spec"]["size"] == 1
    fetched["spec"]["size"] = 100  # a copy: the store is not affected
    assert client.get(url(namespace, "py")).json()["spec"]["size"] == 1
    assert [item["metadata"]["name"] for item in sim.list_objects(GROUP, VERSION, PLURAL, namespace)] == [
        "py"
    ]
    assert sim.get_object(GROUP, VERSION, PLURAL, namespace, "nope") is None


def test_load_crds_registers_crds_from_yaml_files(tmp_path: Path) -> None:
    crd = json.loads(json.dumps(GADGET_CRD).replace("gadget", "sprocket").replace("Gadget", "Sprocket"))
    (tmp_path / "crds.yaml").write_text(
        yaml.safe_dump_all([crd, {"kind": "Namespace", "metadata": {"name": "n"}}])
    )
    sim = KubeSim()
    assert sim.load_crds([tmp_path]) == [f"sprockets.{GROUP}"]
    assert sim.load_crds([tmp_path / "crds.yaml"]) == [f"sprockets.{GROUP}"]  # idempotent, like apply
    assert sim.list_objects(GROUP, VERSION, "sprockets") == []


# -- kubectl ----------------------------------------------------------------------------------------------

KUBECTL = shutil.which("kubectl")


@pytest.fixture()
def kubectl(sim: KubeSim, tmp_path: Path, namespace: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    config = sim.write_kubeconfig(tmp_path / "kubeconfig", namespace=namespace)

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert KUBECTL is not None
        command = [KUBECTL, "--kubeconfig", str(config), "--cache-dir", str(tmp_path / "cache"), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    return run


def test_kubectl_apply_get_patch_and_delete_round_trip(
    kubectl: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path, sim: KubeSim, namespace: str
) -> None:
    manifest = tmp_path / "widget.yaml"
    manifest.write_text(yaml.safe_dump(widget("kubectl-widget", size=2)))
    assert "created" in kubectl("apply", "-f", str(manifest)).stdout
    manifest.write_text(yaml.safe_dump(widget("kubectl-widget", "blue", size=2)))
    assert "configured" in kubectl("apply", "-f", str(manifest)).stdout

    kubectl("patch", "wd", "kubectl-widget", "--type", "merge", "-p", '{"spec":{"size":5}}')
    status_patch = '{"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}]}}'
    kubectl(
        "patch", "widget", "kubectl-widget", "--subresource=status", "--type", "merge", "-p", status_patch
    )

    stored = sim.get_object(GROUP, VERSION, PLURAL, namespace, "kubectl-widget")
    assert stored is not None
    assert stored["spec"] == {"color": "blue", "size": 5}
    assert stored["status"]["phase"] == "Running"

    table = kubectl("get", "widgets").stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "READY", "SIZE", "AGE"]
    assert table[1].split()[:4] == ["kubectl-widget", "Running", "True", "5"]
    as_json = json.loads(kubectl("get", "wd", "kubectl-widget", "-o", "json").stdout)
    assert as_json["metadata"]["uid"] == stored["metadata"]["uid"]

    invalid = kubectl(
        "patch", "wd", "kubectl-widget", "--type", "merge", "-p", '{"spec":{"color":"pink"}}', check=False
    )
    assert invalid.returncode != 0 and "spec.color" in invalid.stderr

    explained = kubectl("explain", "widgets.spec.color").stdout
    assert "FIELD: color <string>" in explained and "red" in explained

    kubectl("delete", "-f", str(manifest))
    assert sim.get_object(GROUP, VERSION, PLURAL, namespace, "kubectl-widget") is None
    assert "No resources found" in kubectl("get", "widgets").stderr


def test_kubectl_create_namespace_sends_protobuf_and_works(
    kubectl: Callable[..., subprocess.CompletedProcess[str]], sim: KubeSim
) -> None:
    name = f"imperative-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    kubectl("label", "namespace", name, "team=a")
    created = sim.get_object("", "v1", "namespaces", None, name)
    assert created is not None
    assert created["metadata"]["labels"] == {"kubernetes.io/metadata.name": name, "team": "a"}
    assert "generateName" not in created["metadata"]
    refused = kubectl("create", "configmap", "unserved", check=False)
    assert refused.returncode != 0


def test_kubectl_get_watch_prints_new_objects(
    sim: KubeSim, tmp_path: Path, namespace: str, kubectl: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    assert KUBECTL is not None
    config = tmp_path / "kubeconfig"
    command = [
        KUBECTL,
        "--kubeconfig",
        str(config),
        "--cache-dir",
        str(tmp_path / "cache"),
        "get",
        "wd",
        "-w",
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            # The watch is registered once kubectl has listed; wait for it before creating.
            wait_for(
                lambda: any(
                    record.verb == "watch" and record.namespace == namespace
                    for record in list(sim.request_log)
                )
            )
            sim.create_object(GROUP, VERSION, PLURAL, widget("watched"), namespace)
            assert process.stdout is not None
            lines = [process.stdout.readline() for _ in range(2)]
        finally:
            process.terminate()
    assert lines[0].split()[:1] == ["NAME"]
    assert lines[1].split()[0] == "watched"
