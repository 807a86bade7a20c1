"""Label and field selectors, as ``?labelSelector=`` and ``?fieldSelector=`` of list and watch requests.

Label selectors support the full set-based grammar: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``,
``k notin (a,b)``, ``k`` (exists) and ``!k`` (does not exist). Field selectors support ``=``, ``==`` and
``!=`` on the field labels the API server supports for the resource (``metadata.name``,
``metadata.namespace`` and a few per-kind fields); any other is a 400, as on a real server.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from kubesim import metavalidation
from kubesim.errors import bad_request

Predicate = Callable[[dict[str, Any]], bool]

_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\((.*)\)\s*$")


def _split_terms(selector: str) -> list[str]:
    """Split on commas outside parentheses: ``a in (x,y),b`` has two terms."""
    terms: list[str] = []
    depth = 0
    current = ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [term.strip() for term in terms if term.strip()]


def _checked(term: str, key: str, values: list[str]) -> None:
    """Keys must be qualified names and values label values, as labels.Parse checks them."""
    for problem in metavalidation.is_qualified_name(key):
        raise bad_request(f'unable to parse requirement: key: Invalid value: "{key}": {problem}')
    for value in values:
        if value.startswith(("=", "!")):
            raise bad_request(f"unable to parse requirement: found '{value[0]}', expected: identifier")
        for problem in metavalidation.is_valid_label_value(value):
            raise bad_request(
                f'unable to parse requirement: values[0][{key}]: Invalid value: "{value}": {problem}'
            )


def _label_term(term: str) -> Callable[[dict[str, str]], bool]:
    match = _SET_RE.match(term)
    if match:
        key, operator, raw_values = match.groups()
        values = {value.strip() for value in raw_values.split(",") if value.strip()}
        _checked(term, key, sorted(values))
        if operator == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if re.match(r"^\s*[^\s!=(]+\s+(in|notin)\b", term):
        raise bad_request(f"unable to parse requirement: found '{term.split()[-1]}' expected: '('")
    for operator in ("!=", "==", "="):
        if operator in term:
            key, value = (part.strip() for part in term.split(operator, 1))
            if not key:
                raise bad_request(f"unable to parse requirement: {term!r}")
            _checked(term, key, [value])
            if operator == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
    if term.startswith("!"):
        key = term[1:].strip()
        _checked(term, key, [])
        return lambda labels: key not in labels
    if re.fullmatch(r"[A-Za-z0-9._/-]+", term):
        _checked(term, term, [])
        return lambda labels: term in labels
    raise bad_request(f"unable to parse requirement: {term!r}")


def label_selector(selector: str | None) -> Predicate:
    if not selector:
        return lambda obj: True
    terms = [_label_term(term) for term in _split_terms(selector)]

    def matches(obj: dict[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(term(labels) for term in terms)

    return matches


def _field_value(obj: dict[str, Any], path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, dict):
            return ""
        node = node.get(part)
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


_COMMON_FIELDS = frozenset({"metadata.name", "metadata.namespace"})
_FIELDS_BY_RESOURCE: dict[tuple[str, str], frozenset[str]] = {
    ("", "namespaces"): _COMMON_FIELDS | {"status.phase"},
    ("", "events"): _COMMON_FIELDS
    | {
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    },
}


def supported_fields(group: str, plural: str) -> frozenset[str]:
    """The field labels the API server can select on for this resource (custom resources: name, namespace)."""
    return _FIELDS_BY_RESOURCE.get((group, plural), _COMMON_FIELDS)


def field_selector(selector: str | None, supported: frozenset[str] | None = None) -> Predicate:
    if not selector:
        return lambda obj: True
    checks: list[tuple[str, bool, str]] = []
    for term in _split_terms(selector):
        for operator in ("!=", "==", "="):
            if operator in term:
                path, value = (part.strip() for part in term.split(operator, 1))
                if supported is not None and path not in supported:
                    raise bad_request(f"field label not supported: {path}")
                checks.append((path, operator != "!=", value))
                break
        else:
            raise bad_request(f"invalid field selector: {term!r}")

    def matches(obj: dict[str, Any]) -> bool:
        return all((_field_value(obj, path) == value) == equal for path, equal, value in checks)

    return matches
