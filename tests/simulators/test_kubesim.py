"""kubesim against documented Kubernetes API-server behaviour, over real HTTP (and the real kubectl).

References: the API conventions (resourceVersion, generation, status), the CRD documentation (status
subresource, defaults and validation, printer columns), "Finalizers" and "Efficient detection of changes"
(watch, 410 Gone) in the Kubernetes documentation.

The API-semantics cases that a real kube-apiserver can answer too live in tests/simulators/test_parity.py (run
there against kubesim always, and against the real server with --cluster); this file keeps what only kubesim
has (its Python API, request log, watch window size) and cases not worth a real-server round trip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from kubesim import KubeSim
from test_parity import (
    BASE,
    GADGET_CRD,
    GROUP,
    PLURAL,
    VERSION,
    WIDGET_CRD,
    create,
    merge,
    url,
    wait_for,
    watch,
    widget,
)


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


# -- namespace deletion (kube-controller-manager's part; none runs next to the parity suite's server) --


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


# -- discovery and CRDs -------------------------------------------------------------------------------


def test_deleting_a_crd_removes_its_resource_and_objects(client: httpx.Client, sim: KubeSim) -> None:
    crd = json.loads(json.dumps(GADGET_CRD).replace("gadget", "doohickey").replace("Gadget", "Doohickey"))
    assert client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd).status_code == 201
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Doohickey", "metadata": {"name": "d1"}}
    assert client.post(f"{BASE}/doohickeys", json=body).status_code == 201
    response = client.delete(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/doohickeys.{GROUP}")
    assert response.status_code == 200
    assert "doohickeys" not in {resource["name"] for resource in client.get(BASE).json()["resources"]}
    assert client.get(f"{BASE}/doohickeys/d1").status_code == 404


# -- request log, Python API --------------------------------------------------------------------


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


def test_kubectl_create_of_a_resource_kubesim_does_not_serve_fails(
    kubectl: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
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
        "pwd",
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
