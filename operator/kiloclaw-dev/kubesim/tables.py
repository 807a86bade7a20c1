"""Server-side printing: ``meta.k8s.io/v1 Table`` responses, so ``kubectl get`` shows printer columns.

kubectl asks for tables with ``Accept: application/json;as=Table;v=v1;g=meta.k8s.io``. Custom resources get
a Name column, then the CRD's ``additionalPrinterColumns`` (or Age when there are none); ``date`` cells are
rendered as a human age, as the CRD table convertor does. The JSONPath subset covers what printer columns
use: ``.a.b``, ``.a[0]``, ``.a[*]``, ``['key']`` and filters like ``[?(@.type=="Ready")]``.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from kubesim.resources import CRD_GROUP, CRD_PLURAL, EVENTS, NAMESPACES, ResourceType

_TOKEN_RE = re.compile(
    r"""\.(?P<key>[A-Za-z0-9_\-/]+)"""
    r"""|\[(?P<index>\d+|\*)\]"""
    r"""|\[['"](?P<quoted>[^'"]+)['"]\]"""
    r"""|\[\?\(@\.(?P<filter_path>[A-Za-z0-9_.\-]+)\s*==\s*['"](?P<filter_value>[^'"]*)['"]\)\]"""
)


def jsonpath(obj: Any, expression: str) -> list[Any]:
    """All values the expression selects (an empty list when a step is missing)."""
    expression = expression.strip()
    if expression.startswith("{") and expression.endswith("}"):
        expression = expression[1:-1]
    if expression.startswith("$"):
        expression = expression[1:]
    nodes = [obj]
    position = 0
    while position < len(expression):
        match = _TOKEN_RE.match(expression, position)
        if match is None:
            return []
        position = match.end()
        selected: list[Any] = []
        for node in nodes:
            key = match.group("key") or match.group("quoted")
            if key is not None:
                if isinstance(node, dict) and key in node:
                    selected.append(node[key])
            elif match.group("index") is not None:
                if isinstance(node, list):
                    if match.group("index") == "*":
                        selected.extend(node)
                    elif int(match.group("index")) < len(node):
                        selected.append(node[int(match.group("index"))])
                elif isinstance(node, dict) and match.group("index") == "*":
                    selected.extend(node.values())
            else:
                path = match.group("filter_path").split(".")
                for item in node if isinstance(node, list) else []:
                    value: Any = item
                    for part in path:
                        value = value.get(part) if isinstance(value, dict) else None
                    if value is not None and str(value) == match.group("filter_value"):
                        selected.append(item)
        nodes = selected
    return nodes


def human_duration(seconds: float) -> str:
    """Kubernetes' ``duration.HumanDuration``: the AGE column format."""
    if seconds < -1:
        return "<invalid>"
    total = max(int(seconds), 0)
    minutes, hours, days = total // 60, total // 3600, total // 86400
    if total < 120:
        return f"{total}s"
    if minutes < 10:
        rest = total % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{days}d{rest}h" if rest else f"{days}d"
    if hours < 24 * 365 * 2:
        return f"{days}d"
    years = days // 365
    if years < 8:
        rest = days % 365
        return f"{years}y{rest}d" if rest else f"{years}y"
    return f"{years}y"


def _age(timestamp: Any) -> str | None:
    if not isinstance(timestamp, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return human_duration((datetime.datetime.now(datetime.UTC) - moment).total_seconds())


def _event_object(obj: dict[str, Any]) -> str:
    involved = obj.get("involvedObject") or {}
    return f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}"


def _event_source(obj: dict[str, Any]) -> str:
    source = obj.get("source") or {}
    component = str(source.get("component") or obj.get("reportingComponent") or "")
    host = str(source.get("host") or "")
    return f"{component}, {host}" if component and host else component or host


def _columns(resource_type: ResourceType, version: str) -> list[dict[str, Any]]:
    """Column definitions plus, per column, how to compute its cell (``jsonPath`` or ``compute``)."""
    name: dict[str, Any] = {
        "name": "Name",
        "type": "string",
        "format": "name",
        "description": "Name of the object",
        "jsonPath": ".metadata.name",
    }
    age = {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
        "description": "Time since the object was created",
    }
    if resource_type is EVENTS:
        # What `kubectl get events` shows against a real cluster; the name only with -o wide.
        columns: list[dict[str, Any]] = [
            {"name": "Last Seen", "type": "string", "jsonPath": ".lastTimestamp", "age": True},
            {"name": "Type", "type": "string", "jsonPath": ".type"},
            {"name": "Reason", "type": "string", "jsonPath": ".reason"},
            {"name": "Object", "type": "string", "compute": _event_object},
            {"name": "Subobject", "type": "string", "jsonPath": ".involvedObject.fieldPath", "priority": 1},
            {"name": "Source", "type": "string", "compute": _event_source, "priority": 1},
            {"name": "Message", "type": "string", "jsonPath": ".message"},
            {
                "name": "First Seen",
                "type": "string",
                "jsonPath": ".firstTimestamp",
                "priority": 1,
                "age": True,
            },
            {"name": "Count", "type": "string", "compute": lambda obj: obj.get("count"), "priority": 1},
            {**name, "priority": 1},
        ]
    elif resource_type.key == (CRD_GROUP, CRD_PLURAL):
        columns = [
            name,
            {"name": "Created At", "type": "date", "jsonPath": ".metadata.creationTimestamp", "raw": True},
        ]
    else:
        columns = list(resource_type.printer_columns.get(version) or [])
        if resource_type is NAMESPACES:
            columns = [{"name": "Status", "type": "string", "jsonPath": ".status.phase"}, age]
        columns = [name, *(columns or [age])]
    return [
        {
            "name": column["name"],
            "type": column.get("type", "string"),
            "format": column.get("format", ""),
            "description": column.get("description", ""),
            "priority": column.get("priority", 0),
            "jsonPath": column.get("jsonPath", ""),
            "compute": column.get("compute"),
            "raw": column.get("raw", False),
            "age": column.get("age", False),
        }
        for column in columns
    ]


def _cell(column: dict[str, Any], obj: dict[str, Any]) -> Any:
    if column["compute"] is not None:
        return column["compute"](obj)
    values = jsonpath(obj, column["jsonPath"])
    if not values or values[0] is None:
        return None
    value = values[0]
    if (column["type"] == "date" and not column["raw"]) or column["age"]:
        return _age(value)
    if column["type"] == "string" and not isinstance(value, str):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return value


def _row(columns: list[dict[str, Any]], obj: dict[str, Any], include_object: str) -> dict[str, Any]:
    cells = [_cell(column, obj) for column in columns]
    if include_object == "None":
        return {"cells": cells, "object": None}
    if include_object == "Object":
        row_object: dict[str, Any] = obj
    else:
        row_object = {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj["metadata"],
        }
    return {"cells": cells, "object": row_object}


def table(
    resource_type: ResourceType,
    version: str,
    objects: list[dict[str, Any]],
    resource_version: int | None,
    *,
    include_object: str = "Metadata",
    with_columns: bool = True,
) -> dict[str, Any]:
    columns = _columns(resource_type, version)
    metadata: dict[str, Any] = {}
    if resource_version is not None:
        metadata["resourceVersion"] = str(resource_version)
    result: dict[str, Any] = {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "rows": [_row(columns, obj, include_object) for obj in objects],
    }
    if with_columns:
        result["columnDefinitions"] = [
            {key: value for key, value in column.items() if key not in ("jsonPath", "compute", "raw", "age")}
            for column in columns
        ]
    return result
