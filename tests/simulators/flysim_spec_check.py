"""Validate JSON bodies against the Fly Machines OpenAPI spec (copied from ../shared/fly into tests/data/).

The spec is generated from Go structs and does not mark pointer fields as nullable, although Fly sends
`null` for them; the fields listed in `_NULLABLE` are patched to `nullable: true` and nothing else is relaxed.
Besides schema validation, `check` asserts that every top-level key of an object is a declared property, so
a misspelt field name fails even though the spec's objects allow additional properties.
"""

from __future__ import annotations

import copy
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from openapi_schema_validator import OAS30Validator

# A copy of ../shared/fly/machines-openapi.json (see data/fly-machines-openapi.SOURCE.md), so the tests do not
# depend on where the repository is checked out.
SPEC_PATH = Path(
    os.environ.get(
        "FLY_OPENAPI_SPEC", Path(__file__).resolve().parents[1] / "data" / "fly-machines-openapi.json"
    )
)

_NULLABLE = {"Volume": ("attached_machine_id", "attached_alloc_id")}


@cache
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SPEC_PATH.read_text())
    patched = copy.deepcopy(loaded)
    for schema_name, fields in _NULLABLE.items():
        for field in fields:
            patched["components"]["schemas"][schema_name]["properties"][field]["nullable"] = True
    return patched


def schema(name: str) -> dict[str, Any]:
    component: dict[str, Any] = spec()["components"]["schemas"][name]
    return component


def check(body: Any, name: str, *, array: bool = False) -> None:
    """Raise a `jsonschema.ValidationError` (AssertionError for undeclared keys) unless `body` fits `name`."""
    ref: dict[str, Any] = {"$ref": f"#/components/schemas/{name}"}
    root = {"components": spec()["components"], **({"type": "array", "items": ref} if array else ref)}
    OAS30Validator(root).validate(body)
    declared = set(schema(name).get("properties", {}))
    for item in body if array else [body]:
        undeclared = set(item) - declared
        assert not undeclared, f"{name} has undeclared fields {sorted(undeclared)}"
