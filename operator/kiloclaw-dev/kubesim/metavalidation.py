"""Object-metadata validation, as the API server does it on every create and update.

Ported from k8s.io/apimachinery (v0.34): ``pkg/util/validation`` (DNS-1123 names, qualified names, label
values) and ``pkg/api/validation/objectmeta.go`` (names, generateName, labels, annotations and their 256 KiB
total, finalizers). Messages are the Go ones word for word, so a kubesim 422 reads like a real one. Errors are
``"field: message"`` strings, like the schema errors of :mod:`kubesim.crdschema`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_QNAME_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_QNAME_RE = re.compile(rf"(?:{_QNAME_FMT})\Z")
_QNAME_MSG = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric "
    "character"
)
_LABEL_VALUE_FMT = f"({_QNAME_FMT})?"
_LABEL_VALUE_RE = re.compile(rf"(?:{_LABEL_VALUE_FMT})\Z")
_LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must "
    "start and end with an alphanumeric character"
)
_DNS_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL_RE = re.compile(rf"(?:{_DNS_LABEL_FMT})\Z")
_DNS_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start "
    "and end with an alphanumeric character"
)
_DNS_SUBDOMAIN_FMT = _DNS_LABEL_FMT + "(\\." + _DNS_LABEL_FMT + ")*"
_DNS_SUBDOMAIN_RE = re.compile(rf"(?:{_DNS_SUBDOMAIN_FMT})\Z")
_DNS_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
    "start and end with an alphanumeric character"
)
TOTAL_ANNOTATION_SIZE_LIMIT = 256 * 1024
MAX_GENERATED_NAME_LENGTH = 63 - 5  # names.SimpleNameGenerator: the random suffix has five characters

NameValidator = Callable[[str, bool], list[str]]


def _regex_error(message: str, fmt: str, *examples: str) -> str:
    if not examples:
        return f"{message} (regex used for validation is '{fmt}')"
    shown = " or ".join(f"'{example}', " for example in examples)
    return f"{message} (e.g. {shown}regex used for validation is '{fmt}')"


def _max_len_error(length: int) -> str:
    return f"must be no more than {length} characters"


def _quote(value: str) -> str:
    """Go's %q of a string, for the ASCII texts metadata holds (close to JSON's quoting)."""
    out = ['"']
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def is_dns1123_subdomain(value: str) -> list[str]:
    problems = []
    if len(value) > 253:
        problems.append(_max_len_error(253))
    if not _DNS_SUBDOMAIN_RE.match(value):
        problems.append(_regex_error(_DNS_SUBDOMAIN_MSG, _DNS_SUBDOMAIN_FMT, "example.com"))
    return problems


def is_dns1123_label(value: str) -> list[str]:
    problems = []
    if len(value) > 63:
        problems.append(_max_len_error(63))
    if not _DNS_LABEL_RE.match(value):
        if _DNS_SUBDOMAIN_RE.match(value):
            problems.append("must not contain dots")
        else:
            problems.append(_regex_error(_DNS_LABEL_MSG, _DNS_LABEL_FMT, "my-name", "123-abc"))
    return problems


def is_qualified_name(value: str) -> list[str]:
    problems: list[str] = []
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            problems.append("prefix part must be non-empty")
        else:
            problems.extend("prefix part " + problem for problem in is_dns1123_subdomain(prefix))
    else:
        return [
            "a qualified name "
            + _regex_error(_QNAME_MSG, _QNAME_FMT, "MyName", "my.name", "123-abc")
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        problems.append("name part must be non-empty")
    elif len(name) > 63:
        problems.append("name part " + _max_len_error(63))
    if not _QNAME_RE.match(name):
        problems.append("name part " + _regex_error(_QNAME_MSG, _QNAME_FMT, "MyName", "my.name", "123-abc"))
    return problems


def is_valid_label_value(value: str) -> list[str]:
    problems = []
    if len(value) > 63:
        problems.append(_max_len_error(63))
    if not _LABEL_VALUE_RE.match(value):
        problems.append(_regex_error(_LABEL_VALUE_MSG, _LABEL_VALUE_FMT, "MyValue", "my_value", "12345"))
    return problems


def _mask_trailing_dash(name: str) -> str:
    # Go: name[:len(name)-2] + "a" (sic: it drops the character before the dash too).
    if len(name) > 1 and name.endswith("-"):
        return name[:-2] + "a"
    return name


def name_is_dns_subdomain(name: str, prefix: bool) -> list[str]:
    return is_dns1123_subdomain(_mask_trailing_dash(name) if prefix else name)


def name_is_dns_label(name: str, prefix: bool) -> list[str]:
    return is_dns1123_label(_mask_trailing_dash(name) if prefix else name)


def name_is_path_segment(name: str, prefix: bool) -> list[str]:
    """``path.ValidatePathSegmentName``: all the API server checks of a core/v1 Event's name."""
    problems = []
    if not prefix and name in (".", ".."):
        problems.append(f"may not be '{name}'")
    problems.extend(f"may not contain '{char}'" for char in ("/", "%") if char in name)
    return problems


def _invalid(field: str, value: str, message: str) -> str:
    return f"{field}: Invalid value: {_quote(value)}: {message}"


def _strings(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def labels_and_annotations(metadata: dict[str, Any]) -> list[str]:
    """``ValidateLabels`` and ``ValidateAnnotations`` (the checks an update repeats)."""
    problems: list[str] = []
    for key, value in _strings(metadata.get("labels")).items():
        problems.extend(_invalid("metadata.labels", key, message) for message in is_qualified_name(key))
        problems.extend(
            _invalid("metadata.labels", value, message) for message in is_valid_label_value(value)
        )
    annotations = _strings(metadata.get("annotations"))
    for key in annotations:
        problems.extend(
            _invalid("metadata.annotations", key, message) for message in is_qualified_name(key.lower())
        )
    if sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items()) > TOTAL_ANNOTATION_SIZE_LIMIT:
        problems.append(
            f"metadata.annotations: Too long: may not be more than {TOTAL_ANNOTATION_SIZE_LIMIT} bytes"
        )
    return problems


def finalizers(metadata: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    values = metadata.get("finalizers") or []
    for finalizer in values if isinstance(values, list) else []:
        problems.extend(
            _invalid("metadata.finalizers", str(finalizer), message)
            for message in is_qualified_name(str(finalizer))
        )
    if "orphan" in values and "foregroundDeletion" in values:
        problems.append(
            "metadata.finalizers: Invalid value: "
            + "[]string{"
            + ", ".join(_quote(str(value)) for value in values)
            + "}: finalizer orphan and foregroundDeletion cannot be both set"
        )
    return problems


def object_meta(metadata: dict[str, Any], name_validator: NameValidator) -> list[str]:
    """``ValidateObjectMetaAccessor``: name (or generateName), labels, annotations, finalizers."""
    problems: list[str] = []
    generate_name = str(metadata.get("generateName") or "")
    if generate_name:
        problems.extend(
            _invalid("metadata.generateName", generate_name, message)
            for message in name_validator(generate_name, True)
        )
    name = str(metadata.get("name") or "")
    if not name:
        problems.append("metadata.name: Required value: name or generateName is required")
    else:
        problems.extend(_invalid("metadata.name", name, message) for message in name_validator(name, False))
    problems.extend(labels_and_annotations(metadata))
    problems.extend(owner_references(metadata))
    problems.extend(finalizers(metadata))
    return problems


def owner_references(metadata: dict[str, Any]) -> list[str]:
    """``ValidateOwnerReferences``: apiVersion (with a version), kind, name, uid; one controller at most."""
    problems: list[str] = []
    references = metadata.get("ownerReferences") or []
    controller = ""
    field = "metadata.ownerReferences"
    for reference in references if isinstance(references, list) else []:
        if not isinstance(reference, dict):
            continue
        api_version = str(reference.get("apiVersion") or "")
        if not api_version or api_version.endswith("/"):
            problems.append(
                f"{field}.apiVersion: Invalid value: {_quote(api_version)}: version must not be empty"
            )
        for key in ("kind", "name", "uid"):
            if not reference.get(key):
                problems.append(f'{field}.{key}: Invalid value: "": must not be empty')
        if reference.get("controller") is True:
            current = f"{reference.get('kind', '')}/{reference.get('name', '')}"
            if controller:
                problems.append(
                    f'{field}: Invalid value: "": Only one reference can have Controller set to true. Found '
                    f'"true" in references for {controller} and {current}'
                )
            else:
                controller = current
    return problems


def object_meta_update(metadata: dict[str, Any], name_validator: NameValidator) -> list[str]:
    """What an update answers: the common-fields pass and then, twice more, labels and annotations (the real
    server lists those causes three times; its message shows each once)."""
    repeated = labels_and_annotations(metadata) + owner_references(metadata)
    return object_meta(metadata, name_validator) + repeated + repeated
