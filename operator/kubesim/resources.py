"""Resource types the emulated API serves: a few built-ins plus whatever CRDs register."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubesim.errors import ApiError

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
BUILTINS = (NAMESPACES, EVENTS, CRDS)


def _invalid_crd(name: str, message: str) -> ApiError:
    return ApiError(
        422,
        "Invalid",
        f'CustomResourceDefinition.apiextensions.k8s.io "{name}" is invalid: {message}',
        {"name": name, "group": CRD_GROUP, "kind": "CustomResourceDefinition"},
    )


def resource_type_from_crd(crd: dict[str, Any]) -> ResourceType:
    """Read an ``apiextensions.k8s.io/v1`` CRD; refuse the structural mistakes Kubernetes refuses."""
    name = crd.get("metadata", {}).get("name", "")
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group = spec.get("group", "")
    plural = names.get("plural", "")
    kind = names.get("kind", "")
    if not group or not plural or not kind:
        raise _invalid_crd(name, "spec.group, spec.names.plural and spec.names.kind are required")
    if name != f"{plural}.{group}":
        raise _invalid_crd(
            name, f'metadata.name: Invalid value: "{name}": must be spec.names.plural+"."+spec.group'
        )
    scope = spec.get("scope")
    if scope not in ("Namespaced", "Cluster"):
        raise _invalid_crd(name, 'spec.scope: Unsupported value: must be "Namespaced" or "Cluster"')
    served = [version for version in spec.get("versions") or [] if version.get("served", True)]
    if not served:
        raise _invalid_crd(
            name, "spec.versions: Invalid value: must have exactly one version marked as storage"
        )
    storage = [version["name"] for version in spec.get("versions") or [] if version.get("storage")]
    if len(storage) != 1:
        raise _invalid_crd(
            name, "spec.versions: Invalid value: must have exactly one version marked as storage"
        )
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
