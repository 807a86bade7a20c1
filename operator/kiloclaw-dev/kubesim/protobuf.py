"""Just enough of the Kubernetes protobuf encoding for ``kubectl create namespace NAME``.

kubectl sends typed built-ins as ``application/vnd.kubernetes.protobuf``: the magic ``k8s\\0``, then a
``runtime.Unknown`` (field 1 TypeMeta, field 2 the raw object). For a Namespace everything a client sets is in
``ObjectMeta`` (name, generateName, labels, annotations, finalizers), so only that is decoded; other kinds
would lose their fields and are refused (415), as is anything malformed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

CONTENT_TYPE = "application/vnd.kubernetes.protobuf"
_MAGIC = b"k8s\x00"


class ProtobufError(ValueError):
    """A body this decoder cannot read."""


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise ProtobufError("truncated varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == 0:
            value, position = _varint(data, position)
        elif wire_type == 2:
            length, position = _varint(data, position)
            value = data[position : position + length]
            if len(value) != length:
                raise ProtobufError("truncated field")
            position += length
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value = data[position : position + size]
            position += size
        else:
            raise ProtobufError(f"unsupported wire type {wire_type}")
        yield number, value


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise ProtobufError("expected a string")
    return value.decode()


def _map_entry(value: int | bytes) -> tuple[str, str]:
    if not isinstance(value, bytes):
        raise ProtobufError("expected a map entry")
    entry = {number: _text(item) for number, item in _fields(value)}
    return entry.get(1, ""), entry.get(2, "")


def _object_meta(data: bytes) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for number, value in _fields(data):
        if number in (1, 2, 3):
            # proto2 sends empty optional strings; JSON omits them.
            if text := _text(value):
                metadata[{1: "name", 2: "generateName", 3: "namespace"}[number]] = text
        elif number in (11, 12):
            key, text = _map_entry(value)
            metadata.setdefault("labels" if number == 11 else "annotations", {})[key] = text
        elif number == 14:
            metadata.setdefault("finalizers", []).append(_text(value))
    return metadata


def decode_namespace(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded Namespace (metadata only)."""
    if not body.startswith(_MAGIC):
        raise ProtobufError("missing the k8s protobuf magic")
    type_meta: dict[str, str] = {}
    raw = b""
    for number, value in _fields(body[len(_MAGIC) :]):
        if number == 1 and isinstance(value, bytes):
            type_meta = {
                {1: "apiVersion", 2: "kind"}[inner]: _text(text)
                for inner, text in _fields(value)
                if inner in (1, 2)
            }
        elif number == 2 and isinstance(value, bytes):
            raw = value
    if type_meta.get("kind") != "Namespace" or type_meta.get("apiVersion") != "v1":
        raise ProtobufError(f"only v1 Namespace is decoded, not {type_meta}")
    metadata: dict[str, Any] = {}
    for number, value in _fields(raw):
        if number == 1 and isinstance(value, bytes):
            metadata = _object_meta(value)
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata}
