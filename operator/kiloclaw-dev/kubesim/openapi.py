"""A minimal OpenAPI v3 surface: enough for ``kubectl apply`` to validate on the server side.

kubectl 1.32 decides between client-side and server-side field validation by looking, in
``/openapi/v3/apis/GROUP/VERSION``, for a PATCH operation tagged with the resource's
``x-kubernetes-group-version-kind`` that declares the ``fieldValidation`` query parameter. Declaring it makes
kubectl send ``?fieldValidation=Strict`` and leave validation to the server (which applies the CRD schema).
CRD schemas are published as components (so ``kubectl explain`` works); PATCH operations declare only JSON
and merge patches in their request bodies, as the real API server does for custom resources, so kubectl's
``apply`` sends merge patches rather than strategic ones.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubesim.resources import ResourceType


def _prefix(resource_type: ResourceType, version: str) -> str:
    return f"/apis/{resource_type.group}/{version}" if resource_type.group else f"/api/{version}"


def _group_versions(types: list[ResourceType]) -> dict[str, list[tuple[ResourceType, str]]]:
    result: dict[str, list[tuple[ResourceType, str]]] = {}
    for resource_type in types:
        for version in resource_type.versions:
            result.setdefault(_prefix(resource_type, version).lstrip("/"), []).append(
                (resource_type, version)
            )
    return result


_PATCH_BODY = {
    "content": {
        "application/json-patch+json": {"schema": {"type": "object"}},
        "application/merge-patch+json": {"schema": {"type": "object"}},
    },
    "required": True,
}


def _component_name(resource_type: ResourceType, version: str) -> str:
    """Kubernetes' naming: reversed group, version, kind (``ai.kilo.kiloclaw.v1alpha1.KiloClawInstance``)."""
    group = ".".join(reversed(resource_type.group.split("."))) if resource_type.group else "io.k8s.api.core"
    return f"{group}.{version}.{resource_type.kind}"


def _component(resource_type: ResourceType, version: str, gvk: dict[str, str]) -> dict[str, Any] | None:
    schema = resource_type.schemas.get(version)
    if schema is None:
        return None
    properties = {
        "apiVersion": {
            "type": "string",
            "description": "APIVersion defines the versioned schema of this object.",
        },
        "kind": {"type": "string", "description": "Kind is a string value representing the REST resource."},
        "metadata": {"type": "object", "description": "Standard object's metadata."},
        **schema.get("properties", {}),
    }
    return {**schema, "properties": properties, "x-kubernetes-group-version-kind": [gvk]}


def document(types: list[ResourceType], group_version_path: str) -> dict[str, Any] | None:
    """The OpenAPI document of one group/version (``api/v1`` or ``apis/G/V``), or None if unknown."""
    entries = _group_versions(types).get(group_version_path)
    if entries is None:
        return None
    parameters = [
        {"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
        for name in ("dryRun", "fieldManager", "fieldValidation", "force")
    ]
    paths: dict[str, Any] = {}
    components: dict[str, Any] = {}
    for resource_type, version in entries:
        gvk = {"group": resource_type.group, "version": version, "kind": resource_type.kind}
        scope = "/namespaces/{namespace}" if resource_type.namespaced else ""
        item_path = f"{_prefix(resource_type, version)}{scope}/{resource_type.plural}/{{name}}"
        collection_path = f"{_prefix(resource_type, version)}{scope}/{resource_type.plural}"

        def operation(
            verb: str, kind: str = resource_type.kind, extension: dict[str, str] = gvk
        ) -> dict[str, Any]:
            return {
                "operationId": f"{verb}{kind}",
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": extension,
                "parameters": parameters,
                "responses": {"200": {"description": "OK"}},
            }

        paths[collection_path] = {"post": operation("post"), "get": operation("list")}
        patch = {**operation("patch"), "requestBody": _PATCH_BODY}
        paths[item_path] = {
            "get": operation("get"),
            "put": operation("put"),
            "patch": patch,
            "delete": operation("delete"),
        }
        if resource_type.has_status(version):
            paths[f"{item_path}/status"] = {"patch": patch, "put": operation("put")}
        component = _component(resource_type, version, gvk)
        if component is not None:
            components[_component_name(resource_type, version)] = component
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": components},
    }


def root(types: list[ResourceType]) -> dict[str, Any]:
    """``/openapi/v3``: where each group/version's document lives; the hash changes with the content."""
    paths: dict[str, Any] = {}
    for group_version_path in sorted(_group_versions(types)):
        body = json.dumps(document(types, group_version_path), sort_keys=True).encode()
        digest = hashlib.sha256(body).hexdigest()[:32].upper()
        paths[group_version_path] = {"serverRelativeURL": f"/openapi/v3/{group_version_path}?hash={digest}"}
    return {"paths": paths}
