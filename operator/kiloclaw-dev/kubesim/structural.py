"""The structural-schema rules the API server checks when a CRD is created or updated.

Ported (the cheap part) from k8s.io/apiextensions-apiserver v0.34: ``pkg/apiserver/schema/validation.go``
(structural invariants: types everywhere, ``items`` for arrays, nothing but ``name``/``generateName``
under the root ``metadata``, no ``additionalProperties`` at the root, ...) and
``pkg/apis/apiextensions/validation`` (``$ref``, ``uniqueItems``, ``additionalProperties`` next to
``properties``, ``x-kubernetes-*`` consistency, ``pattern`` must be RE2). Errors are ``"field: message"``
strings with the real server's field paths.

Not checked: ``allOf``/``anyOf``/``oneOf``/``not`` completeness, defaults against their schema, CEL rule
compilation and cost (crdschema compiles rules when they are first used).
"""

from __future__ import annotations

import json
from typing import Any

from kubesim import re2

Schema = dict[str, Any]
ROOT, ITEM, FIELD = "root", "item", "field"
_TYPES = ("array", "boolean", "integer", "number", "object", "string")
_EMPTY_TYPE_MESSAGE = {
    ROOT: "must not be empty at the root",
    ITEM: "must not be empty for specified array items",
    FIELD: "must not be empty for specified object fields",
}


def schema_path(crd: dict[str, Any]) -> list[tuple[str, Schema]]:
    """(path, openAPIV3Schema) of each version: ``spec.validation...`` when all versions share one schema (the
    API server then reports errors against the hoisted, version-independent schema)."""
    versions = (crd.get("spec") or {}).get("versions") or []
    schemas = [
        ((version.get("schema") or {}).get("openAPIV3Schema"), index)
        for index, version in enumerate(versions)
    ]
    present = [(schema, index) for schema, index in schemas if schema is not None]
    if not present:
        return []
    if len(present) == len(schemas) and all(_same(schema, present[0][0]) for schema, _ in present):
        return [("spec.validation.openAPIV3Schema", present[0][0])]
    return [(f"spec.versions[{index}].schema.openAPIV3Schema", schema) for schema, index in present]


def _same(left: Any, right: Any) -> bool:
    return json.dumps(left, sort_keys=True) == json.dumps(right, sort_keys=True)


def validate_crd_schemas(crd: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for path, schema in schema_path(crd):
        if not isinstance(schema, dict):
            problems.append(f"{path}: Required value: must be an object")
            continue
        _walk(schema, ROOT, path, problems)
    return sorted(problems)


def _quoted(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else json.dumps(value).lower()


def _walk(schema: Schema, level: str, path: str, problems: list[str]) -> None:
    schema_type = schema.get("type", "")
    int_or_string = bool(schema.get("x-kubernetes-int-or-string"))
    preserve = schema.get("x-kubernetes-preserve-unknown-fields")
    embedded = bool(schema.get("x-kubernetes-embedded-resource"))
    properties: dict[str, Any] = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    items = schema.get("items")

    if "$ref" in schema:
        problems.append(f"{path}.$ref: Forbidden: $ref is not supported")
    if schema_type and schema_type not in _TYPES:
        supported = ", ".join(f'"{name}"' for name in _TYPES)
        problems.append(f'{path}.type: Unsupported value: "{schema_type}": supported values: {supported}')
    if schema_type == "array" and items is None:
        problems.append(f"{path}.items: Required value: must be specified")
    if isinstance(items, dict):
        _walk(items, ITEM, f"{path}.items", problems)
    for key, child in properties.items():
        if isinstance(child, dict):
            _walk(child, FIELD, f"{path}.properties[{key}]", problems)
    if additional is not None:
        if level == ROOT:
            problems.append(f"{path}.additionalProperties: Forbidden: must not be used at the root")
        if properties and (additional is False or isinstance(additional, dict)):
            problems.append(
                f"{path}.additionalProperties: Forbidden: "
                "additionalProperties and properties are mutual exclusive"
            )
        if isinstance(additional, dict):
            _walk(additional, FIELD, f"{path}.additionalProperties", problems)

    if int_or_string and preserve:
        problems.append(
            f"{path}.x-kubernetes-preserve-unknown-fields: Invalid value: true: must be false if "
            "x-kubernetes-int-or-string is true"
        )
    if int_or_string and embedded:
        problems.append(
            f"{path}.x-kubernetes-embedded-resource: Invalid value: true: must be false if "
            "x-kubernetes-int-or-string is true"
        )
    if preserve is False:
        problems.append(
            f"{path}.x-kubernetes-preserve-unknown-fields: Invalid value: false: must be true or undefined"
        )
    if schema.get("uniqueItems") is True:
        problems.append(
            f"{path}.uniqueItems: Forbidden: uniqueItems cannot be set to true since the runtime complexity "
            "becomes quadratic"
        )
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        error = re2.validation_error(pattern)
        if error is not None:
            problems.append(
                f"{path}.pattern: Invalid value: {_quoted(pattern)}: must be a valid regular expression, but "
                f"isn't: {error}"
            )
    _list_type_rules(schema, path, problems)

    check_metadata = level == ROOT or embedded
    if embedded and schema_type != "object":
        if not schema_type:
            problems.append(
                f"{path}.type: Required value: must be object if x-kubernetes-embedded-resource is true"
            )
        else:
            problems.append(
                f'{path}.type: Invalid value: "{schema_type}": '
                "must be object if x-kubernetes-embedded-resource is true"
            )
    elif not schema_type and not int_or_string and not preserve:
        problems.append(f"{path}.type: Required value: {_EMPTY_TYPE_MESSAGE[level]}")
    if embedded and additional is not None:
        problems.append(
            f"{path}.additionalProperties: Forbidden: "
            "must not be used if x-kubernetes-embedded-resource is set"
        )
    if level == ROOT and schema_type and schema_type != "object":
        problems.append(f'{path}.type: Invalid value: "{schema_type}": must be object at the root')
    if check_metadata:
        for key in ("kind", "apiVersion"):
            child = properties.get(key)
            if isinstance(child, dict) and child.get("type", "") != "string":
                problems.append(
                    f'{path}.properties[{key}].type: Invalid value: "{child.get("type", "")}": must be string'
                )
    metadata = properties.get("metadata")
    if isinstance(metadata, dict):
        _metadata_rules(metadata, check_metadata, level, f"{path}.properties[metadata]", problems)
    if embedded and not preserve and not properties:
        problems.append(
            f"{path}.properties: Required value: must not be empty if x-kubernetes-embedded-resource is true "
            "without x-kubernetes-preserve-unknown-fields"
        )


def _metadata_rules(schema: Schema, check_metadata: bool, level: str, path: str, problems: list[str]) -> None:
    if check_metadata and schema.get("type", "") != "object":
        problems.append(f'{path}.type: Invalid value: "{schema.get("type", "")}": must be object')
    if level != ROOT:
        return
    properties = schema.get("properties")
    allowed_properties = (
        isinstance(properties, dict) and bool(properties) and set(properties) <= {"name", "generateName"}
    )
    others = [
        key
        for key in schema
        if key not in ("type", "default") and not (key == "properties" and allowed_properties)
    ]
    if others:
        problems.append(
            f"{path}: Forbidden: must not specify anything other than name and generateName, but metadata is "
            "implicitly specified"
        )


def _list_type_rules(schema: Schema, path: str, problems: list[str]) -> None:
    list_type = schema.get("x-kubernetes-list-type")
    keys = schema.get("x-kubernetes-list-map-keys") or []
    if list_type is not None and list_type not in ("atomic", "set", "map"):
        problems.append(
            f'{path}.x-kubernetes-list-type: Unsupported value: "{list_type}": '
            'supported values: "atomic", "set", "map"'
        )
    if keys and list_type is None:
        problems.append(
            f"{path}.x-kubernetes-list-type: Required value: "
            "must be map if x-kubernetes-list-map-keys is non-empty"
        )
    elif keys and list_type != "map":
        problems.append(
            f'{path}.x-kubernetes-list-type: Invalid value: "{list_type}": must be map if '
            "x-kubernetes-list-map-keys is non-empty"
        )
    if list_type != "map":
        return
    if not keys:
        problems.append(
            f"{path}.x-kubernetes-list-map-keys: Required value: "
            "must not be empty if x-kubernetes-list-type is map"
        )
    items = schema.get("items")
    if not isinstance(items, dict):
        problems.append(f"{path}.items: Required value: must have a schema if x-kubernetes-list-type is map")
        return
    if items.get("type", "") != "object":
        problems.append(
            f'{path}.items.type: Invalid value: "{items.get("type", "")}": must be object if parent array\'s '
            "x-kubernetes-list-type is map"
        )
        return
    item_properties = items.get("properties") or {}
    for key in keys:
        if key not in item_properties:
            problems.append(
                f"{path}.x-kubernetes-list-map-keys: Invalid value: {json.dumps(keys)}: "
                "entries must all be names of item properties"
            )
