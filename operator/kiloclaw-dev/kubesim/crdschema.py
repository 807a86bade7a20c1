"""What the Kubernetes API server does with a CRD's structural schema, in pure Python.

On every create and update of a custom resource the API server prunes unknown fields, applies defaults,
validates against the OpenAPI v3 schema and then evaluates the CEL rules in ``x-kubernetes-validations``
(transition rules with ``oldSelf`` only on updates). The emulated API server in kubesim and the CRD tests both
need that behaviour, so it lives here, importing nothing of the operator.

Error strings follow the Kubernetes field-error format (``spec.sandboxId: Invalid value: "string": sandboxId
is immutable``) so that messages seen in tests read like the ones ``kubectl`` prints against a real cluster.

Supported: ``type``, ``nullable``, ``required``, ``enum``, ``pattern``, ``minLength``/``maxLength``,
``minimum``/``maximum`` (and the boolean ``exclusiveMinimum``/``exclusiveMaximum``), ``multipleOf``,
``minItems``/``maxItems``, ``minProperties``/``maxProperties``, ``format`` date-time and date,
``additionalProperties``, ``x-kubernetes-preserve-unknown-fields``, ``x-kubernetes-int-or-string``,
``x-kubernetes-embedded-resource``, ``x-kubernetes-list-type`` set/map uniqueness and
``x-kubernetes-validations`` (rule, message, messageExpression, reason, fieldPath).

Not modelled (documented differences from a real API server): the CEL cost budget, validation ratcheting
of unchanged invalid fields, ``optionalOldSelf`` and CEL optional types, formats other than date-time and
date, the ``allOf``/``anyOf``/``oneOf``/``not`` value validations, and the CEL library functions that
cel-python lacks and this module does not add (``url``, ``quantity``, ``ip``, ``cidr``, ``semver``,
``format``, two-variable comprehensions).
``pattern`` and the CEL regex functions (``matches``, ``find``, ``findAll``) follow Go's RE2 through
:mod:`kubesim.re2` (``$`` only at the very end, ASCII classes).
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import math
import operator
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import celpy
from celpy import celtypes

from kubesim import re2

Schema = dict[str, Any]

# Fields of the resource root that the API server handles itself and never prunes, defaults or CEL-hides.
_ROOT_FIELDS = ("apiVersion", "kind", "metadata")

# kube-openapi's strfmt.IsDateTime (v0.34): the text, lowercased, split at "t"; the part before the first "t"
# must be a full date, the part after it must match this (fraction separator: any character; zone required).
_TIME_OF_DAY = re.compile(r"([0-9]{2}):([0-9]{2}):([0-9]{2})(.[0-9]+)?(z|([+-][0-9]{2}:[0-9]{2}))\Z")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")


@dataclass
class Admission:
    """Result of putting an object through the API server's schema pipeline."""

    obj: dict[str, Any]
    errors: list[str] = field(default_factory=list)
    # Paths of fields the schema does not know; the API server drops them and kubectl warns about them.
    unknown_fields: list[str] = field(default_factory=list)


def load_crd_schema(crd: dict[str, Any], version: str) -> Schema:
    """The ``openAPIV3Schema`` of one served version of a CustomResourceDefinition."""
    for entry in crd.get("spec", {}).get("versions", []):
        if entry.get("name") == version:
            schema = entry.get("schema", {}).get("openAPIV3Schema")
            if not isinstance(schema, dict):
                raise ValueError(f"CRD {crd.get('metadata', {}).get('name')} version {version} has no schema")
            return schema
    raise ValueError(f"CRD {crd.get('metadata', {}).get('name')} has no version {version}")


def admit(
    schema: Schema, obj: dict[str, Any], old_obj: dict[str, Any] | None = None, subresource: str | None = None
) -> Admission:
    """Prune, default and validate ``obj`` as the API server does on create (or update, with ``old_obj``).

    A write to a subresource (``status``) is validated like the API server's status strategy does it: the
    field paths are the object's, but the "in body" part of each message is relative to the subresource.
    """
    pruned, unknown = prune_unknown_fields(schema, obj)
    defaulted = apply_defaults(schema, pruned)
    problems = validate(schema, defaulted, old_obj)
    if subresource:
        problems = [_relative_to(subresource, problem) for problem in problems]
    return Admission(obj=defaulted, errors=problems, unknown_fields=unknown)


def _relative_to(subresource: str, problem: str) -> str:
    field, _, message = problem.partition(": ")
    prefix = f"{subresource}."
    if field.startswith(prefix):
        message = message.replace(f"{field} in body", f"{field.removeprefix(prefix)} in body", 1)
    elif field == subresource:  # the subresource itself: the API server names it with an empty path
        message = message.replace(f"{field} in body", " in body", 1)
    return f"{field}: {message}"


# --------------------------------------------------------------------------------------------------- pruning


def prune_unknown_fields(schema: Schema, obj: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``obj`` without the fields the schema does not declare, and the paths of those fields."""
    result = copy.deepcopy(obj)
    removed: list[str] = []
    _prune(schema, result, "", removed, is_resource=True)
    return result, removed


def _prune(schema: Schema, value: Any, path: str, removed: list[str], *, is_resource: bool = False) -> None:
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return
        properties: dict[str, Schema] = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        keep_meta = is_resource or schema.get("x-kubernetes-embedded-resource", False)
        for key in list(value):
            if keep_meta and key in _ROOT_FIELDS:
                continue
            child_path = _join(path, key)
            if key in properties:
                _prune(properties[key], value[key], child_path, removed)
            elif isinstance(additional, dict):
                _prune(additional, value[key], _key(path, key), removed)
            elif additional is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                continue
            else:
                del value[key]
                removed.append(child_path)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _prune(schema["items"], item, f"{path}[{index}]", removed)


# ------------------------------------------------------------------------------------------------- defaulting


def apply_defaults(schema: Schema, obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` with structural defaults applied, as the API server does before validation.

    A missing property (or a null one that is not nullable) takes its ``default``; defaulting then recurses
    into every present value, including a freshly defaulted ``{}``, so nested defaults appear too. A null that
    is not nullable and has no default is dropped.
    """
    result = copy.deepcopy(obj)
    _default(schema, result, is_resource=True)
    return result


def _default(schema: Schema, value: Any, *, is_resource: bool = False) -> None:
    if isinstance(value, dict):
        properties: dict[str, Schema] = schema.get("properties", {})
        for key, prop in properties.items():
            if is_resource and key == "metadata":
                continue
            present = key in value
            if present and value[key] is None and not prop.get("nullable", False):
                if "default" in prop:
                    value[key] = copy.deepcopy(prop["default"])
                else:
                    del value[key]
            elif not present and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
            if key in value:
                _default(prop, value[key])
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            for key, item in value.items():
                if key not in properties:
                    _default(additional, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default(schema["items"], item)


# ------------------------------------------------------------------------------------------------- validation


def validate(schema: Schema, obj: dict[str, Any], old_obj: dict[str, Any] | None = None) -> list[str]:
    """Field errors of ``obj`` against the schema and its CEL rules; empty when the object is valid.

    Call it on the defaulted object (see ``apply_defaults``). With ``old_obj`` (an update) the transition
    rules, those that mention ``oldSelf``, are evaluated where the old object has a value at the same place.
    As in the API server, CEL rules are skipped when the object has type errors.
    """
    errors: list[str] = []
    type_errors = _validate_node(schema, obj, "", errors, is_resource=True)
    if type_errors and _has_rules(schema):  # the API server says so only when it has rules to skip
        errors.append(
            "<nil>: Invalid value: null: some validation rules were not checked because the object was "
            "invalid; correct the existing errors to complete validation"
        )
        return errors
    _validate_rules(schema, obj, old_obj, "", errors, is_resource=True)
    return errors


_HAS_RULES: dict[int, tuple[Schema, bool]] = {}


def _has_rules(schema: Schema) -> bool:
    """Whether any x-kubernetes-validations appear in the schema (memoised: validation is on the hot path)."""
    cached = _HAS_RULES.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    found = "x-kubernetes-validations" in json.dumps(schema)
    if len(_HAS_RULES) > 256:
        _HAS_RULES.clear()
    _HAS_RULES[id(schema)] = (schema, found)
    return found


def _validate_node(
    schema: Schema, value: Any, path: str, errors: list[str], *, is_resource: bool = False
) -> bool:
    """Append the OpenAPI errors of ``value``; return True when there was a type error (which blocks CEL)."""
    shown = path or "<root>"
    if value is None:
        if schema.get("nullable", False):
            return False
        expected = schema.get("type", "object")
        errors.append(f'{shown}: Invalid value: "null": {shown} in body must be of type {expected}: "null"')
        return True
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            errors.append(
                f'{shown}: Invalid value: "{_type_name(value)}": {shown} in body must be of type '
                f'integer-or-string: "{_type_name(value)}"'
            )
            return True
    elif "type" in schema and not _has_type(value, schema["type"]):
        actual = _type_name(value)
        expected = schema["type"]
        errors.append(
            f'{shown}: Invalid value: "{actual}": {shown} in body must be of type {expected}: "{actual}"'
        )
        return True

    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(_render(choice) for choice in schema["enum"])
        errors.append(f"{shown}: Unsupported value: {_render(value)}: supported values: {supported}")

    blocked = False
    if isinstance(value, str):
        _validate_string(schema, value, shown, errors)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        _validate_number(schema, value, shown, errors)
    elif isinstance(value, list):
        blocked = _validate_array(schema, value, path, errors)
    elif isinstance(value, dict):
        blocked = _validate_object(schema, value, path, errors, is_resource=is_resource)
    return blocked


def _validate_string(schema: Schema, value: str, path: str, errors: list[str]) -> None:
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(f"{path}: Too long: may not be more than {schema['maxLength']} bytes")
    if "minLength" in schema and len(value) < schema["minLength"]:
        errors.append(
            f"{path}: Invalid value: {_render(value)}: {path} in body should be at least "
            f"{schema['minLength']} chars long"
        )
    if "pattern" in schema and re2.search(schema["pattern"], value) is None:
        errors.append(
            f"{path}: Invalid value: {_render(value)}: {path} in body should match '{schema['pattern']}'"
        )
    fmt = schema.get("format")
    if fmt == "date-time" and not _is_date_time(value):
        shown = _render(value)
        errors.append(f"{path}: Invalid value: {shown}: {path} in body must be of type date-time: {shown}")
    elif fmt == "date" and not _is_date(value):
        errors.append(
            f"{path}: Invalid value: {_render(value)}: {path} in body must be of type date: {_render(value)}"
        )


def _validate_number(schema: Schema, value: float, path: str, errors: list[str]) -> None:
    shown = _render(value)
    if "minimum" in schema:
        low = schema["minimum"]
        if schema.get("exclusiveMinimum") is True and value <= low:
            errors.append(f"{path}: Invalid value: {shown}: {path} in body should be greater than {low}")
        elif value < low:
            errors.append(
                f"{path}: Invalid value: {shown}: {path} in body should be greater than or equal to {low}"
            )
    if "maximum" in schema:
        high = schema["maximum"]
        if schema.get("exclusiveMaximum") is True and value >= high:
            errors.append(f"{path}: Invalid value: {shown}: {path} in body should be less than {high}")
        elif value > high:
            errors.append(
                f"{path}: Invalid value: {shown}: {path} in body should be less than or equal to {high}"
            )
    if "multipleOf" in schema:
        factor = schema["multipleOf"]
        quotient = value / factor
        if not math.isclose(quotient, round(quotient), rel_tol=0, abs_tol=1e-9):
            errors.append(f"{path}: Invalid value: {shown}: {path} in body should be a multiple of {factor}")


def _validate_array(schema: Schema, value: list[Any], path: str, errors: list[str]) -> bool:
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(f"{path}: Too many: {len(value)}: must have at most {schema['maxItems']} items")
    if "minItems" in schema and len(value) < schema["minItems"]:
        least = schema["minItems"]
        errors.append(
            f"{path}: Invalid value: {len(value)}: {path} in body should have at least {least} items"
        )
    blocked = False
    items = schema.get("items")
    if isinstance(items, dict):
        for index, item in enumerate(value):
            blocked |= _validate_node(items, item, f"{path}[{index}]", errors)
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "set":
        seen: list[Any] = []
        for index, item in enumerate(value):
            if item in seen:
                errors.append(f"{path}[{index}]: Duplicate value: {_render(item)}")
            else:
                seen.append(item)
    elif list_type == "map":
        keys: list[str] = schema.get("x-kubernetes-list-map-keys", [])
        seen_keys: list[dict[str, Any]] = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                continue
            identity = {key: item.get(key) for key in keys}
            if identity in seen_keys:
                shown = json.dumps(identity, sort_keys=True, separators=(",", ":"))
                errors.append(f"{path}[{index}]: Duplicate value: {shown}")
            else:
                seen_keys.append(identity)
    return blocked


def _validate_object(
    schema: Schema, value: dict[str, Any], path: str, errors: list[str], *, is_resource: bool
) -> bool:
    shown = path or "<root>"
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        errors.append(f"{shown}: Too many: {len(value)}: must have at most {schema['maxProperties']} items")
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        errors.append(
            f"{shown}: Invalid value: {len(value)}: {shown} in body should have at least "
            f"{schema['minProperties']} properties"
        )
    for name in schema.get("required", []):
        if name not in value:
            errors.append(f"{_join(path, name)}: Required value")
    blocked = False
    properties: dict[str, Schema] = schema.get("properties", {})
    additional = schema.get("additionalProperties")
    for key, item in value.items():
        if (is_resource or schema.get("x-kubernetes-embedded-resource")) and key == "metadata":
            continue
        if key in properties:
            blocked |= _validate_node(properties[key], item, _join(path, key), errors)
        elif isinstance(additional, dict):
            # The OpenAPI validator joins map keys with a dot (spec.env.PORT); CEL paths use [key].
            blocked |= _validate_node(additional, item, _join(path, key), errors)
        elif additional is False:
            errors.append(
                f"{_join(path, key)}: Forbidden: {_join(path, key)} in body is a forbidden property"
            )
    return blocked


# ------------------------------------------------------------------------------------------------------- CEL


def _validate_rules(
    schema: Schema,
    value: Any,
    old: Any,
    path: str,
    errors: list[str],
    *,
    is_resource: bool = False,
) -> None:
    """Evaluate ``x-kubernetes-validations`` here, then below (old values correlated by name or key)."""
    if value is None:
        return
    for rule in schema.get("x-kubernetes-validations", []):
        message = _cached_rule_outcome(schema, rule, value, old, is_resource=is_resource)
        if message is not None:
            errors.append(_rule_error(schema, rule, path, message))

    if isinstance(value, dict):
        properties: dict[str, Schema] = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        old_map = old if isinstance(old, dict) else {}
        for key, item in value.items():
            if (is_resource or schema.get("x-kubernetes-embedded-resource")) and key == "metadata":
                continue
            if key in properties:
                _validate_rules(properties[key], item, old_map.get(key), _join(path, key), errors)
            elif isinstance(additional, dict):
                _validate_rules(additional, item, old_map.get(key), _key(path, key), errors)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        items: Schema = schema["items"]
        old_items = _correlate_list_items(schema, value, old)
        for index, item in enumerate(value):
            _validate_rules(items, item, old_items[index], f"{path}[{index}]", errors)


def _correlate_list_items(schema: Schema, value: list[Any], old: Any) -> list[Any]:
    """Old value of each item: only items of ``listType: map`` correlate (by their keys), as in Kubernetes."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(old, list):
        return [None] * len(value)
    keys: list[str] = schema.get("x-kubernetes-list-map-keys", [])

    def identity(item: Any) -> str:
        return (
            json.dumps({key: item.get(key) for key in keys}, sort_keys=True) if isinstance(item, dict) else ""
        )

    by_identity = {identity(item): item for item in old}
    return [by_identity.get(identity(item)) for item in value]


_OUTCOMES: dict[tuple[Any, ...], tuple[Schema, dict[str, Any], str | None]] = {}
_OUTCOMES_LIMIT = 8192
_OUTCOMES_LOCK = threading.Lock()


def _cached_rule_outcome(
    schema: Schema, rule: dict[str, Any], value: Any, old: Any, *, is_resource: bool
) -> str | None:
    """``_evaluate_rule`` memoised: rules are pure functions of (self, oldSelf), and cel-python takes about a
    millisecond per evaluation, while most writes (status updates above all) repeat the same spec values.
    """
    key = (
        id(schema),
        id(rule),
        is_resource,
        json.dumps(value, sort_keys=True, separators=(",", ":")),
        json.dumps(old, sort_keys=True, separators=(",", ":")),
    )
    cached = _OUTCOMES.get(key)
    # The entry keeps its schema and rule alive, so a matching id means the very same objects.
    if cached is not None and cached[0] is schema and cached[1] is rule:
        return cached[2]
    outcome = _evaluate_rule(schema, rule, value, old, is_resource=is_resource)
    with _OUTCOMES_LOCK:  # the emulated API server validates from several threads
        if len(_OUTCOMES) >= _OUTCOMES_LIMIT:
            _OUTCOMES.pop(next(iter(_OUTCOMES)))
        _OUTCOMES[key] = (schema, rule, outcome)
    return outcome


def _evaluate_rule(
    schema: Schema, rule: dict[str, Any], value: Any, old: Any, *, is_resource: bool
) -> str | None:
    """None when the rule holds (or does not apply); otherwise the message to report."""
    expression: str = rule["rule"]
    if rule.get("optionalOldSelf"):
        raise ValueError(f"optionalOldSelf is not supported by this emulation (rule: {expression})")
    transition = _mentions_old_self(expression)
    if transition and old is None:
        return None
    activation: dict[str, Any] = {"self": _to_cel(schema, value, is_resource=is_resource)}
    if transition:
        activation["oldSelf"] = _to_cel(schema, old, is_resource=is_resource)
    try:
        result = _program(expression).evaluate(activation)
    except celpy.CELEvalError as error:
        return f"{_cel_error_text(error)} evaluating rule: {expression}"
    if isinstance(result, celpy.CELEvalError):
        return f"{_cel_error_text(result)} evaluating rule: {expression}"
    if not isinstance(result, celtypes.BoolType | bool):
        return f"rule did not evaluate to a bool: {expression}"
    if bool(result):
        return None
    # As in the API server: messageExpression wins when it yields a usable one-line string; message is the
    # fallback.
    if "messageExpression" in rule:
        try:
            text = _program(rule["messageExpression"]).evaluate(activation)
        except celpy.CELEvalError:
            text = None
        if isinstance(text, str) and text.strip() and "\n" not in text:
            return str(text)
    if rule.get("message"):
        return str(rule["message"])
    return f"failed rule: {expression}"


def _rule_error(schema: Schema, rule: dict[str, Any], path: str, message: str) -> str:
    """A Kubernetes field error for a failed rule, honouring ``fieldPath`` and ``reason``."""
    where = path + rule.get("fieldPath", "") if rule.get("fieldPath") else path
    where = where.lstrip(".") or "<root>"
    reason = rule.get("reason", "FieldValueInvalid")
    if reason == "FieldValueForbidden":
        return f"{where}: Forbidden: {message}"
    if reason == "FieldValueRequired":
        return f"{where}: Required value: {message}"
    if reason == "FieldValueDuplicate":
        return f"{where}: Duplicate value: {message}"
    return f'{where}: Invalid value: "{schema.get("type", "object")}": {message}'


def _mentions_old_self(expression: str) -> bool:
    # Strip string literals first so that a message-like 'oldSelf' inside quotes does not count.
    code = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "''", expression)
    return re.search(r"\boldSelf\b", code) is not None


def _cel_error_text(error: celpy.CELEvalError) -> str:
    text = str(error.args[0]) if error.args else str(error)
    # celpy appends its whole activation (every variable and function) to "undeclared reference" errors.
    return text.split(" (in activation", 1)[0]


_ENVIRONMENT = celpy.Environment()
_PROGRAMS: dict[str, celpy.Runner] = {}


def _program(expression: str) -> celpy.Runner:
    """Compiled rule, cached: parsing dominates the cost of a CEL check and rules repeat on every request."""
    runner = _PROGRAMS.get(expression)
    if runner is None:
        runner = _ENVIRONMENT.program(_ENVIRONMENT.compile(expression), functions=_KUBERNETES_FUNCTIONS)
        _PROGRAMS[expression] = runner
    return runner


def compile_errors(schema: Schema) -> list[str]:
    """Rules (and message expressions) in the schema that cel-python cannot parse, with their location."""
    problems: list[str] = []

    def visit(node: Schema, path: str) -> None:
        for index, rule in enumerate(node.get("x-kubernetes-validations", [])):
            for key in ("rule", "messageExpression"):
                if key in rule:
                    try:
                        _program(rule[key])
                    except celpy.CELParseError as error:
                        problems.append(
                            f"{path or '<root>'}.x-kubernetes-validations[{index}].{key}: {error}"
                        )
        for name, child in node.get("properties", {}).items():
            visit(child, _join(path, name))
        if isinstance(node.get("additionalProperties"), dict):
            visit(node["additionalProperties"], f"{path}[*]")
        if isinstance(node.get("items"), dict):
            visit(node["items"], f"{path}[*]")

    visit(schema, "")
    return problems


def _to_cel(schema: Schema, value: Any, *, is_resource: bool = False) -> Any:
    """A JSON value as CEL sees it under this schema (date-time strings are timestamps, and so on)."""
    if value is None:
        return None
    if isinstance(value, dict):
        properties: dict[str, Schema] = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        converted: dict[Any, Any] = {}
        for key, item in value.items():
            if is_resource and key == "metadata":
                # Only name and generateName of the object's metadata are visible to rules.
                meta = {k: item[k] for k in ("name", "generateName") if isinstance(item, dict) and k in item}
                converted[celtypes.StringType(key)] = celtypes.MapType(
                    {celtypes.StringType(k): celtypes.StringType(v) for k, v in meta.items()}
                )
            elif key in properties:
                converted[celtypes.StringType(key)] = _to_cel(properties[key], item)
            elif isinstance(additional, dict):
                converted[celtypes.StringType(key)] = _to_cel(additional, item)
            elif is_resource and key in ("apiVersion", "kind"):
                converted[celtypes.StringType(key)] = celtypes.StringType(item)
        return celtypes.MapType(converted)
    if isinstance(value, list):
        items: Schema = schema["items"] if isinstance(schema.get("items"), dict) else {}
        return celtypes.ListType([_to_cel(items, item) for item in value])
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int) and schema.get("type") != "number":
        return celtypes.IntType(value)
    if isinstance(value, int | float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        fmt = schema.get("format")
        if fmt == "date-time" and _is_date_time(value):
            try:
                return celtypes.TimestampType(_parse_date_time(value))
            except ValueError:
                return celtypes.StringType(value)
        if fmt == "date" and _is_date(value):
            return celtypes.TimestampType(datetime.fromisoformat(value + "T00:00:00+00:00"))
        if fmt == "duration":
            return celtypes.DurationType(value)
        if fmt == "byte":
            return celtypes.BytesType(base64.b64decode(value))
        return celtypes.StringType(value)
    raise TypeError(f"not a JSON value: {value!r}")


# ----------------------------------------------------------------- Kubernetes CEL library (what celpy lacks)


def _cel_list(values: list[Any]) -> celtypes.ListType:
    return celtypes.ListType(values)


def _char_at(text: celtypes.StringType, index: celtypes.IntType) -> celtypes.StringType:
    if not 0 <= int(index) <= len(text):
        raise ValueError(f"index out of range: {int(index)}")
    return celtypes.StringType(text[int(index) : int(index) + 1])


def _index_of(target: Any, needle: Any, start: Any = None) -> celtypes.IntType:
    if isinstance(target, celtypes.ListType):
        for position, item in enumerate(target):
            if item == needle:
                return celtypes.IntType(position)
        return celtypes.IntType(-1)
    offset = int(start) if start is not None else 0
    if not 0 <= offset <= len(target):
        raise ValueError(f"index out of range: {offset}")
    return celtypes.IntType(str(target).find(str(needle), offset))


def _last_index_of(target: Any, needle: Any, end: Any = None) -> celtypes.IntType:
    if isinstance(target, celtypes.ListType):
        for position in range(len(target) - 1, -1, -1):
            if target[position] == needle:
                return celtypes.IntType(position)
        return celtypes.IntType(-1)
    if end is None:
        return celtypes.IntType(str(target).rfind(str(needle)))
    return celtypes.IntType(str(target).rfind(str(needle), 0, int(end) + len(needle)))


def _replace(text: Any, old: Any, new: Any, count: Any = None) -> celtypes.StringType:
    limit = -1 if count is None else int(count)
    return celtypes.StringType(str(text).replace(str(old), str(new), limit))


def _split(text: Any, separator: Any, count: Any = None) -> celtypes.ListType:
    limit = -1 if count is None else int(count)
    if limit == 0:
        return _cel_list([])
    parts = str(text).split(str(separator), limit - 1) if limit > 0 else str(text).split(str(separator))
    return _cel_list([celtypes.StringType(part) for part in parts])


def _substring(text: Any, start: Any, end: Any = None) -> celtypes.StringType:
    stop = len(text) if end is None else int(end)
    if not 0 <= int(start) <= stop <= len(text):
        raise ValueError(f"substring out of range: {int(start)}..{stop}")
    return celtypes.StringType(str(text)[int(start) : stop])


def _cel_join(values: Any, separator: Any = "") -> celtypes.StringType:
    return celtypes.StringType(str(separator).join(str(value) for value in values))


def _is_sorted(values: Any) -> celtypes.BoolType:
    items = list(values)
    return celtypes.BoolType(all(items[i] <= items[i + 1] for i in range(len(items) - 1)))


def _sum(values: Any) -> Any:
    items = list(values)
    return functools.reduce(operator.add, items) if items else celtypes.IntType(0)


def _minimum(values: Any) -> Any:
    items = list(values)
    if not items:
        raise ValueError("min called on an empty list")
    return min(items)


def _maximum(values: Any) -> Any:
    items = list(values)
    if not items:
        raise ValueError("max called on an empty list")
    return max(items)


def _find(text: Any, pattern: Any) -> celtypes.StringType:
    match = re2.search(str(pattern), str(text))
    return celtypes.StringType(match.group(0) if match else "")


def _find_all(text: Any, pattern: Any, limit: Any = None) -> celtypes.ListType:
    found = [celtypes.StringType(m.group(0)) for m in re2.compile_re2(str(pattern)).finditer(str(text))]
    return _cel_list(found if limit is None or int(limit) < 0 else found[: int(limit)])


def _lower_ascii(text: Any) -> celtypes.StringType:
    return celtypes.StringType("".join(ch.lower() if ch.isascii() else ch for ch in str(text)))


def _upper_ascii(text: Any) -> celtypes.StringType:
    return celtypes.StringType("".join(ch.upper() if ch.isascii() else ch for ch in str(text)))


def _trim(text: Any) -> celtypes.StringType:
    return celtypes.StringType(str(text).strip())


def _guarded(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn Python errors into CEL evaluation errors, as cel-go reports a failed function call."""

    def call(*args: Any) -> Any:
        try:
            return function(*args)
        except (ValueError, TypeError, IndexError) as error:
            return celpy.CELEvalError(str(error), type(error), None)

    return call


_LIBRARY: dict[str, Callable[..., Any]] = {
    "charAt": _char_at,
    "indexOf": _index_of,
    "lastIndexOf": _last_index_of,
    "lowerAscii": _lower_ascii,
    "upperAscii": _upper_ascii,
    "replace": _replace,
    "split": _split,
    "substring": _substring,
    "trim": _trim,
    "join": _cel_join,
    "isSorted": _is_sorted,
    "sum": _sum,
    "min": _minimum,
    "max": _maximum,
    "find": _find,
    "findAll": _find_all,
}
# Kubernetes' string, list and regex extension libraries, which cel-python does not ship.
_KUBERNETES_FUNCTIONS: dict[str, Callable[..., Any]] = {name: _guarded(fn) for name, fn in _LIBRARY.items()}


# --------------------------------------------------------------------------------------------------- helpers


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _key(path: str, key: str) -> str:
    return f"{path}[{key}]"


def _has_type(value: Any, expected: str) -> bool:
    if expected == "object":
        return isinstance(value, dict)
    if expected == "array":
        return isinstance(value, list)
    if expected == "string":
        return isinstance(value, str)
    if expected == "boolean":
        return isinstance(value, bool)
    if expected == "integer":
        if isinstance(value, bool):
            return False
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if expected == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return True


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _render(value: Any) -> str:
    """A value as Kubernetes shows it in field errors: strings quoted, numbers bare."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, sort_keys=True)


def _parse_date_time(value: str) -> datetime:
    """A date-time that ``_is_date_time`` accepts, as a timestamp."""
    day, rest = value.lower().split("t")[:2]
    match = _TIME_OF_DAY.match(rest)
    if match is None:
        raise ValueError(f"not a date-time: {value!r}")
    hours, minutes, seconds, fraction, zone = match.group(1, 2, 3, 4, 5)
    micros = (fraction[1:] + "000000")[:6] if fraction else "000000"
    offset = "+00:00" if zone == "z" else zone
    return datetime.fromisoformat(f"{day}T{hours}:{minutes}:{seconds}.{micros}{offset}")


def _is_date_time(value: str) -> bool:
    """kube-openapi's ``strfmt.IsDateTime``: the ``T`` and a zone (``Z`` or ``±hh:mm``) are required."""
    if len(value) < 4:
        return False
    parts = value.lower().split("t")
    if len(parts) < 2 or not _is_date(parts[0]):
        return False
    match = _TIME_OF_DAY.match(parts[1])
    if match is None:
        return False
    return match.group(1) <= "23" and match.group(2) <= "59" and match.group(3) <= "59"


def _is_date(value: str) -> bool:
    if _DATE.match(value) is None:
        return False
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True
