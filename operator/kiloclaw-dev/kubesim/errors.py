"""Kubernetes API errors, rendered as ``v1 Status`` objects exactly where the API server would."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An API failure with its HTTP code, Kubernetes ``reason`` and optional ``details``."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if not self.reason:  # an internal error without a reason, as the API server sends it
            del body["reason"]
        if self.details is not None:
            body["details"] = self.details
        return body


def not_found(group: str, plural: str, name: str) -> ApiError:
    qualified = f"{plural}.{group}" if group else plural
    return ApiError(
        404,
        "NotFound",
        f'{qualified} "{name}" not found',
        _details(name, group, plural),
    )


def already_exists(group: str, plural: str, name: str) -> ApiError:
    qualified = f"{plural}.{group}" if group else plural
    return ApiError(
        409,
        "AlreadyExists",
        f'{qualified} "{name}" already exists',
        _details(name, group, plural),
    )


def conflict(group: str, plural: str, name: str, why: str = "") -> ApiError:
    qualified = f"{plural}.{group}" if group else plural
    why = why or (
        "the object has been modified; please apply your changes to the latest version and try again"
    )
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qualified} "{name}": {why}',
        _details(name, group, plural),
    )


def _details(name: str, group: str, kind: str) -> dict[str, Any]:
    """``StatusDetails``: empty name and group are omitted, as Go's ``omitempty`` does."""
    details: dict[str, Any] = {}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    details["kind"] = kind
    return details


def invalid(group: str, kind: str, name: str, causes: list[tuple[str, str]]) -> ApiError:
    """422 Invalid; ``causes`` are (field, message) pairs, as in ``StatusDetails.causes``.

    The message reads like the API server's: one error as is, several in brackets, each shown once (the
    causes keep repetitions, as the real server's do)."""
    qualified = f"{kind}.{group}" if group else kind
    shown: list[str] = []
    for field, message in causes:
        line = f"{field}: {message}" if field else message
        if line not in shown:
            shown.append(line)
    summary = shown[0] if len(shown) == 1 else "[" + ", ".join(shown) + "]"
    details = _details(name, group, kind)
    details["causes"] = [
        {"reason": _cause_reason(message), "message": message, "field": field}
        if field
        else {"reason": _cause_reason(message), "message": message}
        for field, message in causes
    ]
    return ApiError(422, "Invalid", f'{qualified} "{name}" is invalid: {summary}', details)


def invalid_fields(group: str, kind: str, name: str, problems: list[str]) -> ApiError:
    """422 Invalid from ``"field: message"`` strings (what the schema and metadata validators return)."""
    causes: list[tuple[str, str]] = []
    for problem in problems:
        field, separator, message = problem.partition(": ")
        causes.append((field, message) if separator else ("", problem))
    return invalid(group, kind, name, causes)


def _cause_reason(message: str) -> str:
    """The ``StatusCause`` type Kubernetes derives from a field error's kind."""
    if message.startswith("Invalid value") and " must be of type " in message:
        return "FieldValueTypeInvalid"
    for prefix, reason in (
        ("Forbidden:", "FieldValueForbidden"),
        ("Required value", "FieldValueRequired"),
        ("Unsupported value", "FieldValueNotSupported"),
        ("Duplicate value", "FieldValueDuplicate"),
        ("Too long", "FieldValueTooLong"),
        ("Too many", "FieldValueTooMany"),
        ("Internal error", "InternalError"),
    ):
        if message.startswith(prefix):
            return reason
    return "FieldValueInvalid"


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def method_not_allowed(message: str) -> ApiError:
    return ApiError(405, "MethodNotAllowed", message)


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        415, "UnsupportedMediaType", f'the body of the request was in an unknown format: "{content_type}"'
    )


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)
