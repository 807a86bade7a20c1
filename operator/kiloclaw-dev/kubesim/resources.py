"""Resource types the emulated API serves: a few built-ins plus whatever CRDs register."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kubesim import errors, structural

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUBRESOURCE_VERBS = ("get", "patch", "update")
CRD_GROUP = "apiextensions.k8s.io"
CRD_PLURAL = "customresourcedefinitions"


@dataclass
class ResourceType:
    """One resource (group + plural), served in one or more versions."""

    group: str
    versions: tuple[str, ...]
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_versions: frozenset[str] = frozenset()
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    printer_columns: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    storage_version: str = ""
    custom: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def preferred_version(self) -> str:
        return self.storage_version or self.versions[0]

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    def has_status(self, version: str) -> bool:
        return version in self.status_versions


NAMESPACES = ResourceType(
    group="",
    versions=("v1",),
    plural="namespaces",
    singular="namespace",
    kind="Namespace",
    namespaced=False,
    short_names=("ns",),
    status_versions=frozenset({"v1"}),
)
EVENTS = ResourceType(
    group="",
    versions=("v1",),
    plural="events",
    singular="event",
    kind="Event",
    namespaced=True,
    short_names=("ev",),
)
CRDS = ResourceType(
    group=CRD_GROUP,
    versions=("v1",),
    plural=CRD_PLURAL,
    singular="customresourcedefinition",
    kind="CustomResourceDefinition",
    namespaced=False,
    short_names=("crd", "crds"),
    categories=("api-extensions",),
    status_versions=frozenset({"v1"}),
)
# Leader election of the operator's replicas (kiloclaw_operator.leadership).
LEASES = ResourceType(
    group="coordination.k8s.io",
    versions=("v1",),
    plural="leases",
    singular="lease",
    kind="Lease",
    namespaced=True,
    # Only so that unknown fields are pruned (with a warning) or refused with Strict field validation, as
    # the Go decoder does; the Go types themselves are checked by the store (400 when they do not decode).
    schemas={
        "v1": {
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "properties": {
                        "holderIdentity": {"type": "string"},
                        "leaseDurationSeconds": {"type": "integer"},
                        "acquireTime": {"type": "string"},
                        "renewTime": {"type": "string"},
                        "leaseTransitions": {"type": "integer"},
                        "strategy": {"type": "string"},
                        "preferredHolder": {"type": "string"},
                    },
                }
            },
        }
    },
)
BUILTINS = (NAMESPACES, EVENTS, CRDS, LEASES)


def resource_type_from_crd(crd: dict[str, Any]) -> ResourceType:
    """Read an ``apiextensions.k8s.io/v1`` CRD; refuse (422) what the API server refuses, structural-schema
    violations included (see :mod:`kubesim.structural`)."""
    name = crd.get("metadata", {}).get("name", "")
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group = spec.get("group", "")
    plural = names.get("plural", "")
    kind = names.get("kind", "")
    problems: list[str] = []
    if not group:
        problems.append("spec.group: Required value")
    if not plural:
        problems.append("spec.names.plural: Required value")
    if not kind:
        problems.append("spec.names.kind: Required value")
    if name != f"{plural}.{group}":
        problems.append(f'metadata.name: Invalid value: "{name}": must be spec.names.plural+"."+spec.group')
    scope = spec.get("scope")
    if scope not in ("Namespaced", "Cluster"):
        problems.append(
            f'spec.scope: Unsupported value: "{scope or ""}": supported values: "Cluster", "Namespaced"'
        )
    versions = [version for version in spec.get("versions") or [] if isinstance(version, dict)]
    served = [version for version in versions if version.get("served", True)]
    storage = [version["name"] for version in versions if version.get("storage")]
    if not versions:
        problems.append(
            "spec.versions: Invalid value: null: must have exactly one version marked as storage version"
        )
    elif len(storage) != 1:
        problems.append(
            f"spec.versions: Invalid value: {json.dumps(storage)}: must have exactly one version marked as "
            "storage version"
        )
    problems.extend(structural.validate_crd_schemas(crd))
    if problems:
        raise errors.invalid_fields(CRD_GROUP, "CustomResourceDefinition", name, problems)
    return ResourceType(
        group=group,
        versions=tuple(version["name"] for version in served),
        plural=plural,
        singular=names.get("singular") or kind.lower(),
        kind=kind,
        namespaced=scope == "Namespaced",
        short_names=tuple(names.get("shortNames") or ()),
        categories=tuple(names.get("categories") or ()),
        status_versions=frozenset(
            version["name"] for version in served if "status" in (version.get("subresources") or {})
        ),
        schemas={
            version["name"]: version["schema"]["openAPIV3Schema"]
            for version in served
            if (version.get("schema") or {}).get("openAPIV3Schema")
        },
        printer_columns={
            version["name"]: list(version.get("additionalPrinterColumns") or []) for version in served
        },
        storage_version=storage[0],
        custom=True,
    )
