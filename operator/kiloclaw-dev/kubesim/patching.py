"""The three patch formats the API server accepts for JSON bodies.

- RFC 7386 JSON merge patch (``application/merge-patch+json``): objects merge recursively, ``null`` deletes,
  everything else (lists included) replaces.
- Strategic merge patch (``application/strategic-merge-patch+json``): for custom resources Kubernetes refuses
  it; here it is accepted for every resource and applied as a merge patch, after dropping the ``$``-directives
  (``$setElementOrder/…``, ``$retainKeys``, ``$patch``) that kubectl adds. None of our schemas declare list
  merge keys, so a merge patch gives the same result.
- RFC 6902 JSON patch (``application/json-patch+json``): any failing operation, a failed ``test`` included,
  makes the whole patch fail; the server answers 422.
"""

from __future__ import annotations

import copy
from typing import Any

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


class PatchError(Exception):
    """A JSON patch that cannot be applied (the server answers 422)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 merge patch; returns a new value and leaves ``target`` untouched."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: dict[str, Any] = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strip_strategic_directives(patch: Any) -> Any:
    if isinstance(patch, dict):
        return {
            key: strip_strategic_directives(value) for key, value in patch.items() if not key.startswith("$")
        }
    if isinstance(patch, list):
        return [strip_strategic_directives(item) for item in patch]
    return patch


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _split_pointer(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchError(f"invalid JSON pointer: {pointer!r}")
    return [_unescape(token) for token in pointer[1:].split("/")]


def _list_index(container: list[Any], token: str, *, for_insert: bool) -> int:
    if for_insert and token == "-":
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")):
        raise PatchError(f"invalid array index: {token!r}")
    index = int(token)
    limit = len(container) if for_insert else len(container) - 1
    if index > limit:
        raise PatchError(f"array index out of range: {index}")
    return index


def _resolve(document: Any, tokens: list[str]) -> Any:
    node = document
    for token in tokens:
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(f"path not found: /{'/'.join(tokens)}")
            node = node[token]
        elif isinstance(node, list):
            node = node[_list_index(node, token, for_insert=False)]
        else:
            raise PatchError(f"path not found: /{'/'.join(tokens)}")
    return node


def _add(document: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _resolve(document, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_list_index(parent, last, for_insert=True), value)
    else:
        raise PatchError(f"cannot add to a scalar at /{'/'.join(tokens)}")
    return document


def _remove(document: Any, tokens: list[str]) -> tuple[Any, Any]:
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent = _resolve(document, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"path not found: /{'/'.join(tokens)}")
        return document, parent.pop(last)
    if isinstance(parent, list):
        return document, parent.pop(_list_index(parent, last, for_insert=False))
    raise PatchError(f"path not found: /{'/'.join(tokens)}")


def json_patch(document: Any, operations: Any) -> Any:
    """Apply RFC 6902 operations to a copy of ``document``; raise :class:`PatchError` on any failure."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    result = copy.deepcopy(document)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise PatchError(f"malformed operation: {operation!r}")
        op = operation["op"]
        tokens = _split_pointer(operation["path"])
        if op == "add":
            result = _add(result, tokens, copy.deepcopy(operation.get("value")))
        elif op == "remove":
            result, _ = _remove(result, tokens)
        elif op == "replace":
            _resolve(result, tokens)
            result, _ = _remove(result, tokens) if tokens else (result, None)
            result = _add(result, tokens, copy.deepcopy(operation.get("value")))
        elif op == "move":
            source = _split_pointer(operation.get("from", ""))
            result, value = _remove(result, source)
            result = _add(result, tokens, value)
        elif op == "copy":
            source = _split_pointer(operation.get("from", ""))
            result = _add(result, tokens, copy.deepcopy(_resolve(result, source)))
        elif op == "test":
            actual = _resolve(result, tokens)
            if actual != operation.get("value"):
                raise PatchError(
                    f"testing value {operation['path']} failed: expected {operation.get('value')!r}, "
                    f"found {actual!r}"
                )
        else:
            raise PatchError(f"unknown operation: {op!r}")
    return result
