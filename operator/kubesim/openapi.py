"""A minimal OpenAPI v3 surface: enough for ``kubectl apply`` to validate on the server side.

kubectl 1.32 decides between client-side and server-side field validation by looking, in
``/openapi/v3/apis/GROUP/VERSION``, for a PATCH operation tagged with the resource's
``x-kubernetes-group-version-kind`` that declares the ``fieldValidation`` query parameter. Declaring it makes
kubectl send ``?fieldValidation=Strict`` and leave validation to the server (which applies the CRD schema).
No component schemas are published, so kubectl falls back to JSON merge patches for custom resources.
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
        paths[item_path] = {
            "get": operation("get"),
            "put": operation("put"),
            "patch": operation("patch"),
            "delete": operation("delete"),
        }
        if resource_type.has_status(version):
            paths[f"{item_path}/status"] = {"patch": operation("patch"), "put": operation("put")}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }


def root(types: list[ResourceType]) -> dict[str, Any]:
    """``/openapi/v3``: where each group/version's document lives; the hash changes with the content."""
    paths: dict[str, Any] = {}
    for group_version_path in sorted(_group_versions(types)):
        body = json.dumps(document(types, group_version_path), sort_keys=True).encode()
        digest = hashlib.sha256(body).hexdigest()[:32].upper()
        paths[group_version_path] = {"serverRelativeURL": f"/openapi/v3/{group_version_path}?hash={digest}"}
    return {"paths": paths}
