"""The object store and its API-server semantics, free of HTTP.

Everything here runs under one ``threading.RLock`` and never awaits, so the HTTP handlers (in the server's
event loop) and the Python API used by tests (in other threads) see one consistent state. Stored objects are
never mutated once stored: every write builds a new dict, so responses and watch events can share them.

Semantics follow the Kubernetes API conventions and the CRD documentation:
- ``metadata.uid``/``creationTimestamp`` are set on create and immutable; ``resourceVersion`` comes from one
  global counter and changes on every real write; a write carrying a stale ``resourceVersion`` gets 409.
- ``metadata.generation`` starts at 1 and grows when anything but ``metadata`` changes — and, for versions
  with the status subresource, anything but ``metadata`` and ``status``; setting ``deletionTimestamp`` also
  bumps it, as the generic registry does.
- With the status subresource, ``/status`` writes change only ``.status``; writes to the main endpoint keep
  the stored ``.status`` (and create drops it).
- A write that changes nothing keeps the ``resourceVersion`` and emits no watch event.
- DELETE on an object with finalizers only sets ``deletionTimestamp`` (+ ``deletionGracePeriodSeconds: 0``);
  the update that removes the last finalizer deletes it (watchers see only ``DELETED``). New finalizers on
  an object being deleted are refused (422, "no new finalizers can be added if the object is being deleted").
- Watch history is kept per resource, like the API server's watch cache: the latest ``window_size`` events
  of each resource; a watch from an older ``resourceVersion`` gets ``410 Gone``, as after compaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import random
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kubesim import errors, metavalidation
from kubesim.resources import BUILTINS, CRD_GROUP, CRD_PLURAL, EVENTS, LEASES, NAMESPACES, ResourceType
from kubesim.resources import resource_type_from_crd as _resource_type_from_crd

ObjectKey = tuple[str, str]  # (namespace or "", name)
TypeKey = tuple[str, str]  # (group, plural)

_NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_IMMUTABLE_METADATA = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "resourceVersion",
    "name",
    "namespace",
)
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def now_timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class WatchEvent:
    resource_version: int
    type_key: TypeKey
    type: str
    object: dict[str, Any]
    # The object before a MODIFIED event: a filtered watch turns it into ADDED or DELETED when the object
    # starts or stops matching the watch's selectors, as the watch cache does.
    previous: dict[str, Any] | None = None


class Watcher:
    """One open watch: events for one resource type, delivered into the watcher's own event loop."""

    def __init__(self, type_key: TypeKey, loop: asyncio.AbstractEventLoop, start_version: int) -> None:
        self.type_key = type_key
        self.loop = loop
        self.start_version = start_version  # the store's resourceVersion when the watch began
        self.queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()

    def deliver(self, event: WatchEvent | None) -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.queue.put_nowait(event)
        else:
            # The loop may be closing while a test thread writes; the watch is over then anyway.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _schema_module() -> Any:
    """The CRD schema module (defaults + validation), written separately; absent means "accept as is"."""
    try:
        from kubesim import crdschema
    except ImportError:
        return None
    return crdschema


def clone(value: Any) -> Any:
    """A deep copy of JSON data; a JSON round trip is several times faster than ``copy.deepcopy``."""
    return json.loads(json.dumps(value, default=str))


_OBJECT_META_FIELDS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)


# Per-thread request context: the patched object of a patch (for its error shape) and the warnings a request
# collects (unknown fields), which the HTTP layer turns into Warning headers.
_REQUEST = threading.local()


def collect_warnings() -> list[str]:
    """Start collecting this thread's warnings; the returned list fills as the request runs."""
    warnings: list[str] = []
    _REQUEST.warnings = warnings
    return warnings


def current_warnings() -> list[str] | None:
    warnings: list[str] | None = getattr(_REQUEST, "warnings", None)
    return warnings


def stop_collecting_warnings() -> None:
    _REQUEST.warnings = None


_STRING_MAPS = ("labels", "annotations")
_STRINGS = ("name", "generateName", "namespace", "uid", "resourceVersion", "creationTimestamp")


def _has_generation(resource_type: ResourceType) -> bool:
    """Custom resources and CRDs track metadata.generation; Namespaces, Events and Leases do not."""
    return resource_type.custom or resource_type.key == (CRD_GROUP, CRD_PLURAL)


_MICRO_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}(Z|[+-][0-9]{2}:[0-9]{2})\Z"
)
_MICRO_TIME_LAYOUT = "2006-01-02T15:04:05.000000Z07:00"
_LEASE_SPEC = {
    "holderIdentity": "string",
    "leaseDurationSeconds": "int32",
    "acquireTime": "MicroTime",
    "renewTime": "MicroTime",
    "leaseTransitions": "int32",
    "strategy": "string",
    "preferredHolder": "string",
}


def _check_lease(lease: dict[str, Any]) -> None:
    """coordination.k8s.io/v1 Lease: Go types (int32, RFC 3339 with exactly six fractional digits for
    MicroTime) decode or the request is a 400; then durations > 0 and transitions >= 0 (422)."""

    def undecodable(problem: str) -> errors.ApiError:
        return errors.bad_request(f'Lease in version "v1" cannot be handled as a Lease: {problem}')

    spec = lease.get("spec")
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise undecodable(
            f"json: cannot unmarshal {_go_type(spec)} into Go struct field Lease.spec of type v1.LeaseSpec"
        )
    for key, kind in _LEASE_SPEC.items():
        value = spec.get(key)
        if value is None:
            continue
        if kind == "int32":
            if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
                raise undecodable(
                    f"json: cannot unmarshal {_go_type(value)} into Go struct field LeaseSpec.spec.{key} of "
                    "type int32"
                )
        elif not isinstance(value, str):
            raise undecodable(
                f"json: cannot unmarshal {_go_type(value)} into Go struct field LeaseSpec.spec.{key} of type "
                + ("string" if kind == "string" else "v1.MicroTime")
            )
        elif kind == "MicroTime" and value and not _is_micro_time(value):
            raise undecodable(f'parsing time "{value}" as "{_MICRO_TIME_LAYOUT}": cannot parse "{value}"')
    problems = []
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and duration <= 0:
        problems.append(f"spec.leaseDurationSeconds: Invalid value: {int(duration)}: must be greater than 0")
    transitions = spec.get("leaseTransitions")
    if transitions is not None and transitions < 0:
        problems.append(
            f"spec.leaseTransitions: Invalid value: {int(transitions)}: must be greater than or equal to 0"
        )
    if problems:
        raise errors.invalid_fields(
            "coordination.k8s.io", "Lease", lease["metadata"].get("name", ""), problems
        )


def _is_micro_time(value: str) -> bool:
    if _MICRO_TIME.match(value) is None:
        return False
    try:
        datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _default_crd(crd: dict[str, Any]) -> None:
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    if names.get("kind") and not names.get("listKind"):
        names["listKind"] = f"{names['kind']}List"
    if not names.get("singular") and names.get("kind"):
        names["singular"] = str(names["kind"]).lower()
    spec.setdefault("conversion", {"strategy": "None"})


def _check_crd_update(crd: dict[str, Any], old: dict[str, Any]) -> None:
    """Scope, kind, group and plural decide where objects are stored: the API server keeps them."""
    spec, old_spec = crd.get("spec") or {}, old.get("spec") or {}
    problems = [
        f"spec.{path}: Invalid value: {json.dumps(new)}: field is immutable"
        for path, new, before in (
            ("scope", spec.get("scope"), old_spec.get("scope")),
            ("names.kind", (spec.get("names") or {}).get("kind"), (old_spec.get("names") or {}).get("kind")),
            ("group", spec.get("group"), old_spec.get("group")),
            (
                "names.plural",
                (spec.get("names") or {}).get("plural"),
                (old_spec.get("names") or {}).get("plural"),
            ),
        )
        if new != before
    ]
    if problems:
        raise errors.invalid_fields(CRD_GROUP, "CustomResourceDefinition", crd["metadata"]["name"], problems)


def _check_event(event: dict[str, Any]) -> None:
    """core/v1 legacy Event validation: the involved object lives in the Event's namespace."""
    namespace = event["metadata"].get("namespace", "")
    involved = event.get("involvedObject")
    involved_namespace = str(involved.get("namespace") or "") if isinstance(involved, dict) else ""
    if event.get("eventTime"):
        wrong = not involved_namespace and namespace not in ("default", "kube-system")
    elif not involved_namespace:
        wrong = namespace not in ("", "default")
    else:
        wrong = namespace != involved_namespace
    if wrong:
        raise errors.invalid(
            "",
            "Event",
            event["metadata"].get("name", ""),
            [
                (
                    "involvedObject.namespace",
                    f"Invalid value: {json.dumps(involved_namespace)}: does not match event.namespace",
                )
            ],
        )


def _check_type_meta(resource_type: ResourceType, version: str, obj: dict[str, Any]) -> None:
    """A custom resource's body must say what it is (the unstructured decoder needs ``kind``)."""
    if not resource_type.custom:
        return
    kind = resource_type.kind
    if not obj.get("kind"):
        shown = json.dumps(obj, separators=(",", ":"))
        raise errors.bad_request(
            f"the object provided is unrecognized (must be of type {kind}): Object 'Kind' is missing in "
            f"'{shown}' ({shown[:30]} ...)"
        )
    expected = resource_type.api_version(version)
    if obj.get("apiVersion") and obj["apiVersion"] != expected:
        raise errors.bad_request(
            f"the API version in the data ({obj['apiVersion']}) does not match the expected API version "
            f"({expected})"
        )
    if obj["kind"] != kind:
        raise errors.invalid(
            resource_type.group,
            str(obj["kind"]),
            (obj.get("metadata") or {}).get("name", "") if isinstance(obj.get("metadata"), dict) else "",
            [("kind", f"Invalid value: {json.dumps(obj['kind'])}: must be {kind}")],
        )


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _check_metadata_types(
    resource_type: ResourceType, version: str, metadata: dict[str, Any], patched: dict[str, Any] | None = None
) -> None:
    """ObjectMeta decodes into Go types: a label that is not a string is a 400 (a 422 on the ``patch`` field
    after a patch), not a stored oddity."""
    kind = resource_type.kind

    def refuse(value: Any, field: str, go_type: str) -> None:
        problem = f"json: cannot unmarshal {_go_type(value)} into Go struct field ObjectMeta.{field} "
        problem += f"of type {go_type}"
        if patched is None:
            raise errors.bad_request(
                f'{kind} in version "{version}" cannot be handled as a {kind}: {problem}'
            )
        shown = json.dumps(json.dumps(patched, sort_keys=True, separators=(",", ":")))
        raise errors.invalid("", "", "", [("patch", f"Invalid value: {shown}: {problem}")])

    for key in _STRINGS:
        value = metadata.get(key)
        if value is not None and not isinstance(value, str):
            refuse(value, key, "string")
    for key in _STRING_MAPS:
        value = metadata.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            refuse(value, key, "map[string]string")
        for item in value.values():
            if item is not None and not isinstance(item, str):
                refuse(item, key, "string")
    finalizers = metadata.get("finalizers")
    if finalizers is not None:
        if not isinstance(finalizers, list):
            refuse(finalizers, "finalizers", "[]string")
        for item in finalizers:
            if not isinstance(item, str):
                refuse(item, "finalizers", "string")
    owners = metadata.get("ownerReferences")
    if owners is not None and (not isinstance(owners, list) or not all(isinstance(o, dict) for o in owners)):
        refuse(owners, "ownerReferences", "[]v1.OwnerReference")


def _unknown_metadata_fields(obj: dict[str, Any]) -> list[str]:
    metadata = obj.get("metadata")
    return (
        [f"metadata.{key}" for key in metadata if key not in _OBJECT_META_FIELDS]
        if isinstance(metadata, dict)
        else []
    )


def _name_validator(resource_type: ResourceType) -> metavalidation.NameValidator:
    if resource_type is NAMESPACES:
        return metavalidation.name_is_dns_label
    if resource_type is EVENTS:  # core/v1 Events keep their legacy, lenient name rules
        return metavalidation.name_is_path_segment
    return metavalidation.name_is_dns_subdomain


def _without(obj: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: value for key, value in obj.items() if key not in keys}


class Store:
    def __init__(self, *, window_size: int = 10_000, max_events: int = 10_000) -> None:
        self.lock = threading.RLock()
        self._resource_version = 0
        self._types: dict[TypeKey, ResourceType] = {}
        self._objects: dict[TypeKey, dict[ObjectKey, dict[str, Any]]] = {}
        self._windows: dict[TypeKey, deque[WatchEvent]] = {}
        self._window_size = window_size
        self._expired_below: dict[TypeKey, int] = {}  # events with resourceVersion <= this are forgotten
        self._max_events = max_events
        self._watchers: dict[TypeKey, set[Watcher]] = {}
        for resource_type in BUILTINS:
            self._register(resource_type)
        for namespace in DEFAULT_NAMESPACES:
            self.create(NAMESPACES, "v1", None, {"metadata": {"name": namespace}})

    # -- resource types --------------------------------------------------------------------------

    def _register(self, resource_type: ResourceType) -> None:
        if resource_type.key not in self._types:
            # Like a new watch cache: a custom resource's history starts when its CRD is established.
            self._expired_below[resource_type.key] = self._resource_version
        self._types[resource_type.key] = resource_type
        self._objects.setdefault(resource_type.key, {})

    def types(self) -> list[ResourceType]:
        with self.lock:
            return list(self._types.values())

    def find_type(self, group: str, version: str, plural: str) -> ResourceType | None:
        with self.lock:
            resource_type = self._types.get((group, plural))
            if resource_type is None or version not in resource_type.versions:
                return None
            return resource_type

    @property
    def resource_version(self) -> int:
        return self._resource_version

    # -- reading ---------------------------------------------------------------------------------

    def get(
        self, resource_type: ResourceType, version: str, namespace: str | None, name: str
    ) -> dict[str, Any]:
        with self.lock:
            obj = self._objects[resource_type.key].get((self._scope(resource_type, namespace), name))
            if obj is None:
                raise errors.not_found(resource_type.group, resource_type.plural, name)
            return self.as_version(resource_type, version, obj)

    def list_items(
        self,
        resource_type: ResourceType,
        version: str,
        namespace: str | None,
        predicate: Callable[[dict[str, Any]], bool] = lambda obj: True,
    ) -> tuple[list[dict[str, Any]], int]:
        """Objects sorted by namespace/name (the order of the etcd keys), and the list's resourceVersion."""
        with self.lock:
            objects = self._objects[resource_type.key]
            items = [
                self.as_version(resource_type, version, obj)
                for (obj_namespace, _), obj in sorted(objects.items())
                if (not namespace or not resource_type.namespaced or obj_namespace == namespace)
            ]
            return [item for item in items if predicate(item)], self._resource_version

    def _check_namespace_open(self, resource_type: ResourceType, namespace: str, name: str) -> None:
        """Creation needs an existing namespace that is not being deleted (NamespaceLifecycle admission)."""
        found = self._objects[NAMESPACES.key].get(("", namespace))
        if found is None:
            raise errors.not_found("", "namespaces", namespace)
        if found["metadata"].get("deletionTimestamp"):
            qualified = (
                f"{resource_type.plural}.{resource_type.group}"
                if resource_type.group
                else resource_type.plural
            )
            raise errors.ApiError(
                403,
                "Forbidden",
                f'{qualified} "{name}" is forbidden: unable to create new content in namespace {namespace} '
                "because it is being terminated",
                {"name": name, "group": resource_type.group, "kind": resource_type.plural},
            )

    def namespace_exists(self, name: str) -> bool:
        with self.lock:
            return ("", name) in self._objects[NAMESPACES.key]

    # -- watching --------------------------------------------------------------------------------

    def watch(
        self,
        resource_type: ResourceType,
        since: str | None,
        loop: asyncio.AbstractEventLoop,
    ) -> tuple[list[WatchEvent], Watcher]:
        """Register a watcher; return the events it must see first (synthetic ADDED or replayed history)."""
        with self.lock:
            if since in (None, "", "0"):
                backlog = [
                    WatchEvent(int(obj["metadata"]["resourceVersion"]), resource_type.key, "ADDED", obj)
                    for _, obj in sorted(self._objects[resource_type.key].items())
                ]
            else:
                assert since is not None
                try:
                    start = int(since)
                except ValueError:
                    raise errors.ApiError(
                        500,
                        "",
                        f'resourceVersion: Invalid value: "{since}": strconv.ParseUint: parsing "{since}": '
                        "invalid syntax",
                    ) from None
                expired_below = self._expired_below.get(resource_type.key, 0)
                if start < expired_below:
                    raise errors.gone(f"too old resource version: {start} ({expired_below + 1})")
                window = self._windows.get(resource_type.key, ())
                backlog = [event for event in window if event.resource_version > start]
            watcher = Watcher(resource_type.key, loop, self._resource_version)
            self._watchers.setdefault(resource_type.key, set()).add(watcher)
            return backlog, watcher

    def unwatch(self, watcher: Watcher) -> None:
        with self.lock:
            self._watchers.get(watcher.type_key, set()).discard(watcher)

    def close_watchers(self) -> None:
        with self.lock:
            for watchers in self._watchers.values():
                for watcher in watchers:
                    watcher.deliver(None)

    def _emit(
        self,
        resource_type: ResourceType,
        event_type: str,
        obj: dict[str, Any],
        previous: dict[str, Any] | None = None,
    ) -> None:
        event = WatchEvent(
            int(obj["metadata"]["resourceVersion"]), resource_type.key, event_type, obj, previous
        )
        window = self._windows.setdefault(resource_type.key, deque())
        window.append(event)
        while len(window) > self._window_size:
            self._expired_below[resource_type.key] = window.popleft().resource_version
        for watcher in self._watchers.get(resource_type.key, ()):
            watcher.deliver(event)

    def _next_resource_version(self) -> str:
        self._resource_version += 1
        return str(self._resource_version)

    # -- writing ---------------------------------------------------------------------------------

    def create(
        self,
        resource_type: ResourceType,
        version: str,
        namespace: str | None,
        body: dict[str, Any],
        *,
        strict: bool = False,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise errors.bad_request("the body must be a JSON object")
        with self.lock:
            obj = clone(body)
            metadata = obj.setdefault("metadata", {})
            if not isinstance(metadata, dict):
                raise errors.bad_request("metadata must be an object")
            _check_type_meta(resource_type, version, obj)
            _check_metadata_types(resource_type, version, metadata)
            namespace = self._creation_namespace(resource_type, namespace, metadata)
            if metadata.get("resourceVersion"):
                raise errors.ApiError(500, "", "resourceVersion should not be set on objects to be created")
            name = metadata.get("name") or ""
            objects = self._objects[resource_type.key]
            if not name and metadata.get("generateName"):
                name = metadata["name"] = self._generate_name(
                    str(metadata["generateName"]), objects, namespace or ""
                )
            if resource_type.namespaced and name:
                self._check_namespace_open(resource_type, namespace or "", name)
            meta_problems = metavalidation.object_meta(metadata, _name_validator(resource_type))
            for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "selfLink"):
                metadata.pop(key, None)
            metadata["name"] = name
            if namespace:
                metadata["namespace"] = namespace
            metadata["uid"] = str(uuid.uuid4())
            metadata["creationTimestamp"] = now_timestamp()
            if _has_generation(resource_type):
                metadata["generation"] = 1
            obj["apiVersion"] = resource_type.api_version(version)
            obj["kind"] = resource_type.kind
            if resource_type.has_status(version):
                obj.pop("status", None)
            obj = self._prepare_builtin(resource_type, obj, meta_problems)
            obj = self._admit(resource_type, version, obj, None, strict, extra=meta_problems)
            if (namespace or "", name) in objects:
                raise errors.already_exists(resource_type.group, resource_type.plural, name)
            metadata = obj["metadata"]
            if dry_run:
                return self.as_version(resource_type, version, obj)
            metadata["resourceVersion"] = self._next_resource_version()
            if resource_type is EVENTS and len(objects) >= self._max_events:
                # Kubernetes expires Events after an hour; a bound on their number serves the same purpose.
                del objects[next(iter(objects))]
            objects[(namespace or "", name)] = obj
            self._emit(resource_type, "ADDED", obj)
            if resource_type.key == (CRD_GROUP, CRD_PLURAL):
                self._register(_resource_type_from_crd(obj))
            return self.as_version(resource_type, version, obj)

    def replace(
        self,
        resource_type: ResourceType,
        version: str,
        namespace: str | None,
        name: str,
        body: dict[str, Any],
        subresource: str | None,
        *,
        strict: bool = False,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise errors.bad_request("the body must be a JSON object")
        with self.lock:
            old = self._stored(resource_type, namespace, name)
            return self._update(resource_type, version, old, clone(body), subresource, strict, dry_run)

    def patch(
        self,
        resource_type: ResourceType,
        version: str,
        namespace: str | None,
        name: str,
        apply_patch: Callable[[dict[str, Any]], dict[str, Any]],
        subresource: str | None,
        *,
        strict: bool = False,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Patch under the lock: ``apply_patch`` maps the current object to the patched one (or raises)."""
        with self.lock:
            old = self._stored(resource_type, namespace, name)
            patched = apply_patch(self.as_version(resource_type, version, old))
            if not isinstance(patched, dict):
                raise errors.bad_request("the patched object must be a JSON object")
            if subresource is None and isinstance(patched.get("metadata"), dict):
                _check_metadata_types(resource_type, version, patched["metadata"], patched)
            # Merge patches share untouched subtrees with the stored object, which must stay immutable.
            _REQUEST.patched = patched
            try:
                return self._update(resource_type, version, old, clone(patched), subresource, strict, dry_run)
            finally:
                _REQUEST.patched = None

    def delete(
        self,
        resource_type: ResourceType,
        version: str,
        namespace: str | None,
        name: str,
        preconditions: dict[str, Any] | None = None,
        *,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        with self.lock:
            old = self._stored(resource_type, namespace, name)
            preconditions = preconditions or {}
            group, kind = resource_type.group, resource_type.kind
            if preconditions.get("uid") and preconditions["uid"] != old["metadata"]["uid"]:
                raise errors.conflict(
                    group,
                    kind,
                    name,
                    f"the UID in the precondition ({preconditions['uid']}) does not match the UID in record "
                    f"({old['metadata']['uid']}). The object might have been deleted and then recreated",
                )
            expected_version = preconditions.get("resourceVersion")
            if expected_version and expected_version != old["metadata"]["resourceVersion"]:
                raise errors.conflict(
                    group,
                    kind,
                    name,
                    f"the ResourceVersion in the precondition ({expected_version}) does not match the "
                    f"ResourceVersion in record ({old['metadata']['resourceVersion']}). "
                    "The object might have been modified",
                )
            if dry_run:
                return self.as_version(resource_type, version, old)
            return self.as_version(resource_type, version, self._delete(resource_type, old))

    def delete_collection(
        self,
        resource_type: ResourceType,
        version: str,
        namespace: str | None,
        predicate: Callable[[dict[str, Any]], bool],
    ) -> list[dict[str, Any]]:
        with self.lock:
            items, _ = self.list_items(resource_type, version, namespace, predicate)
            for item in items:
                old = self._stored(resource_type, item["metadata"].get("namespace"), item["metadata"]["name"])
                self._delete(resource_type, old)
            return items

    # -- internals -------------------------------------------------------------------------------

    @staticmethod
    def _scope(resource_type: ResourceType, namespace: str | None) -> str:
        return (namespace or "") if resource_type.namespaced else ""

    def _stored(self, resource_type: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self._objects[resource_type.key].get((self._scope(resource_type, namespace), name))
        if obj is None:
            raise errors.not_found(resource_type.group, resource_type.plural, name)
        return obj

    @staticmethod
    def as_version(resource_type: ResourceType, version: str, obj: dict[str, Any]) -> dict[str, Any]:
        api_version = resource_type.api_version(version)
        if obj.get("apiVersion") == api_version:
            return obj
        return {**obj, "apiVersion": api_version}

    @staticmethod
    def _creation_namespace(
        resource_type: ResourceType, namespace: str | None, metadata: dict[str, Any]
    ) -> str | None:
        if not resource_type.namespaced:
            metadata.pop("namespace", None)
            return None
        body_namespace = metadata.get("namespace")
        if namespace and body_namespace and body_namespace != namespace:
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        namespace = namespace or body_namespace
        if not namespace:
            raise errors.bad_request("a namespace is required to create a namespaced object")
        return str(namespace)

    @staticmethod
    def _generate_name(prefix: str, objects: dict[ObjectKey, dict[str, Any]], namespace: str) -> str:
        prefix = prefix[: metavalidation.MAX_GENERATED_NAME_LENGTH]
        while True:
            name = prefix + "".join(random.choices(_NAME_SUFFIX_ALPHABET, k=5))
            if (namespace, name) not in objects:
                return name

    @staticmethod
    def _prepare_builtin(
        resource_type: ResourceType, obj: dict[str, Any], meta_problems: list[str]
    ) -> dict[str, Any]:
        if meta_problems and resource_type.key == (CRD_GROUP, CRD_PLURAL):
            raise errors.invalid_fields(
                CRD_GROUP, resource_type.kind, obj["metadata"].get("name", ""), meta_problems
            )
        if resource_type is NAMESPACES:
            name = obj["metadata"]["name"]
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj["status"] = {"phase": "Active"}
        elif resource_type is EVENTS:
            _check_event(obj)
        elif resource_type is LEASES:
            _check_lease(obj)
        elif resource_type.key == (CRD_GROUP, CRD_PLURAL):
            resource_type_from = _resource_type_from_crd(obj)  # refuses malformed CRDs with 422
            _default_crd(obj)
            obj["status"] = {
                "acceptedNames": obj["spec"]["names"],
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": ""},
                    {
                        "type": "Established",
                        "status": "True",
                        "reason": "InitialNamesAccepted",
                        "message": "",
                    },
                ],
                "storedVersions": [resource_type_from.storage_version],
            }
        return obj

    def _admit(
        self,
        resource_type: ResourceType,
        version: str,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        strict: bool,
        subresource: str | None = None,
        *,
        extra: list[str] | None = None,
    ) -> dict[str, Any]:
        """Prune unknown fields, apply the CRD schema's defaults, then validate; errors are 422 Invalid,
        together with the ``extra`` (metadata) problems found before.

        With ``fieldValidation=Strict`` (what kubectl sends) unknown fields are a 400 instead of being pruned.
        """
        name = obj.get("metadata", {}).get("name", "")
        problems = list(extra or ())
        schema = resource_type.schemas.get(version)
        module = _schema_module() if schema else None
        if module is not None:
            admission = module.admit(schema, obj, old, subresource)
            unknown = sorted(admission.unknown_fields + _unknown_metadata_fields(obj))
            if strict and unknown:
                kind = resource_type.kind
                problem = "strict decoding error: " + ", ".join(f'unknown field "{path}"' for path in unknown)
                patched = getattr(_REQUEST, "patched", None)
                if (
                    patched is not None
                ):  # after a patch: a 422 on the field "patch", as the API server says it
                    shown = json.dumps(json.dumps(patched, sort_keys=True, separators=(",", ":")))
                    raise errors.invalid("", "", "", [("patch", f"Invalid value: {shown}: {problem}")])
                raise errors.bad_request(
                    f'{kind} in version "{version}" cannot be handled as a {kind}: {problem}'
                )
            warnings = getattr(_REQUEST, "warnings", None)
            if warnings is not None:
                warnings.extend(f'unknown field "{path}"' for path in unknown)
            problems += admission.errors
            obj = admission.obj
        if problems:
            raise errors.invalid_fields(resource_type.group, resource_type.kind, name, problems)
        return obj

    def _update(
        self,
        resource_type: ResourceType,
        version: str,
        old: dict[str, Any],
        new: dict[str, Any],
        subresource: str | None,
        strict: bool,
        dry_run: bool,
    ) -> dict[str, Any]:
        old_meta = old["metadata"]
        name = old_meta["name"]
        new_meta = new.get("metadata")
        if new_meta is None:
            new_meta = new["metadata"] = {}
        if not isinstance(new_meta, dict):
            raise errors.bad_request("metadata must be an object")
        if new_meta.get("name") and new_meta["name"] != name:
            raise errors.bad_request(
                f"the name of the object ({new_meta['name']}) does not match the name on the URL ({name})"
            )
        if resource_type.namespaced and new_meta.get("namespace") not in (
            None,
            "",
            old_meta.get("namespace"),
        ):
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        claimed_version = new_meta.get("resourceVersion")
        if claimed_version and str(claimed_version) != old_meta["resourceVersion"]:
            raise errors.conflict(resource_type.group, resource_type.plural, name)
        if new_meta.get("uid") and new_meta["uid"] != old_meta["uid"] and subresource is None:
            key = "/".join(
                part
                for part in (
                    "/registry",
                    resource_type.group,
                    resource_type.plural,
                    old_meta.get("namespace"),
                    name,
                )
                if part
            )
            raise errors.conflict(
                resource_type.group,
                resource_type.plural,
                name,
                f"StorageError: invalid object, Code: 4, Key: {key}, ResourceVersion: 0, AdditionalErrorMsg: "
                f"Precondition failed: UID in precondition: {new_meta['uid']}, UID in object meta: "
                f"{old_meta['uid']}",
            )
        if subresource is None:
            _check_metadata_types(resource_type, version, new_meta)

        with_status = resource_type.has_status(version)
        if subresource == "status":
            # Stored objects are immutable, so sharing their subtrees is safe; only metadata is written below.
            result = {**old, "metadata": dict(old["metadata"])}
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
        else:
            result = new
            if with_status:
                if "status" in old:
                    result["status"] = old["status"]
                else:
                    result.pop("status", None)
            for key in _IMMUTABLE_METADATA:
                if key in old_meta:
                    new_meta[key] = old_meta[key]
                else:
                    new_meta.pop(key, None)
        result["apiVersion"] = resource_type.api_version(version)
        result["kind"] = resource_type.kind

        if old_meta.get("deletionTimestamp"):
            added = set(result["metadata"].get("finalizers") or ()) - set(old_meta.get("finalizers") or ())
            if added:
                raise errors.invalid(
                    resource_type.group,
                    resource_type.kind,
                    name,
                    [
                        (
                            "metadata.finalizers",
                            "Forbidden: no new finalizers can be added if the object is being deleted, "
                            "found new finalizers []string{"
                            + ", ".join(f'"{finalizer}"' for finalizer in sorted(added))
                            + "}",
                        )
                    ],
                )
        if resource_type.key == (CRD_GROUP, CRD_PLURAL) and subresource != "status":
            _resource_type_from_crd(result)  # refuses malformed CRDs with 422 before storing
            _check_crd_update(result, old)
            _default_crd(result)
        if resource_type is LEASES:
            _check_lease(result)

        meta_problems = metavalidation.object_meta_update(result["metadata"], _name_validator(resource_type))
        result = self._admit(resource_type, version, result, old, strict, subresource, extra=meta_problems)
        if result == self.as_version(resource_type, version, old):
            return old  # no-op: same resourceVersion, no watch event

        ignored = ("metadata", "status") if with_status else ("metadata",)
        changed = _without(result, *ignored, "apiVersion") != _without(old, *ignored, "apiVersion")
        if changed and "generation" in old_meta:
            result["metadata"]["generation"] = int(old_meta["generation"]) + 1
        if dry_run:
            return result
        result["metadata"]["resourceVersion"] = self._next_resource_version()

        object_key = (old_meta.get("namespace", ""), name)
        if result["metadata"].get("deletionTimestamp") and not result["metadata"].get("finalizers"):
            del self._objects[resource_type.key][object_key]
            # Watchers see the last stored state (etcd's previous value) at the deletion's resourceVersion.
            gone = {**old, "metadata": {**old_meta, "resourceVersion": result["metadata"]["resourceVersion"]}}
            self._emit(resource_type, "DELETED", gone)
            self._after_removal(resource_type, gone)
            return result
        self._objects[resource_type.key][object_key] = result
        self._emit(resource_type, "MODIFIED", result, old)
        if resource_type.key == (CRD_GROUP, CRD_PLURAL):
            self._register(_resource_type_from_crd(result))
        return result

    def _delete(self, resource_type: ResourceType, old: dict[str, Any]) -> dict[str, Any]:
        old_meta = old["metadata"]
        key = (old_meta.get("namespace", ""), old_meta["name"])
        if resource_type is NAMESPACES and not old_meta.get("finalizers"):
            return self._terminate_namespace(old)
        if old_meta.get("finalizers"):
            if old_meta.get("deletionTimestamp"):
                return old
            marked = {
                **old,
                "metadata": {
                    **old_meta,
                    "deletionTimestamp": now_timestamp(),
                    "deletionGracePeriodSeconds": 0,
                    "resourceVersion": self._next_resource_version(),
                },
            }
            if "generation" in old_meta:
                marked["metadata"]["generation"] = int(old_meta["generation"]) + 1
            self._objects[resource_type.key][key] = marked
            self._emit(resource_type, "MODIFIED", marked, old)
            return marked
        removed = {**old, "metadata": {**old_meta, "resourceVersion": self._next_resource_version()}}
        del self._objects[resource_type.key][key]
        self._emit(resource_type, "DELETED", removed)
        self._after_removal(resource_type, removed)
        return removed

    def _terminate_namespace(self, old: dict[str, Any]) -> dict[str, Any]:
        """A deleted namespace is Terminating while its contents are deleted, and goes when it is empty."""
        name = old["metadata"]["name"]
        if old["metadata"].get("deletionTimestamp"):
            return old
        marked = {
            **old,
            "metadata": {
                **old["metadata"],
                "deletionTimestamp": now_timestamp(),
                "deletionGracePeriodSeconds": 0,
                "resourceVersion": self._next_resource_version(),
            },
            "status": {"phase": "Terminating"},
        }
        self._objects[NAMESPACES.key][("", name)] = marked
        self._emit(NAMESPACES, "MODIFIED", marked, old)
        for other_type in list(self._types.values()):
            if other_type.namespaced:
                for (obj_namespace, _), obj in list(self._objects[other_type.key].items()):
                    if obj_namespace == name:
                        self._delete(other_type, obj)
        return self._remove_namespace_if_done(name) or marked

    def _remove_namespace_if_done(self, name: str) -> dict[str, Any] | None:
        namespace = self._objects[NAMESPACES.key].get(("", name))
        if namespace is None or not namespace["metadata"].get("deletionTimestamp"):
            return None
        for other_type in self._types.values():
            if other_type.namespaced and any(key[0] == name for key in self._objects[other_type.key]):
                return None
        removed = {
            **namespace,
            "metadata": {**namespace["metadata"], "resourceVersion": self._next_resource_version()},
        }
        del self._objects[NAMESPACES.key][("", name)]
        self._emit(NAMESPACES, "DELETED", removed)
        return removed

    def _after_removal(self, resource_type: ResourceType, removed: dict[str, Any]) -> None:
        """Cascade what Kubernetes cascades: a terminating namespace, a CRD's custom resources."""
        if resource_type.namespaced:
            self._remove_namespace_if_done(removed["metadata"].get("namespace", ""))
        elif resource_type.key == (CRD_GROUP, CRD_PLURAL):
            spec = removed.get("spec", {})
            type_key = (spec.get("group", ""), spec.get("names", {}).get("plural", ""))
            dropped = self._types.pop(type_key, None)
            for obj in self._objects.pop(type_key, {}).values():
                if dropped is not None:
                    gone = {
                        **obj,
                        "metadata": {**obj["metadata"], "resourceVersion": self._next_resource_version()},
                    }
                    self._emit(dropped, "DELETED", gone)

    # -- bulk helpers for the Python API ---------------------------------------------------------

    def apply_crd(self, crd: dict[str, Any]) -> dict[str, Any]:
        """Create the CRD or replace the stored one (what ``kubectl apply`` would do)."""
        crds = self._types[(CRD_GROUP, CRD_PLURAL)]
        with self.lock:
            name = crd.get("metadata", {}).get("name", "")
            if ("", name) in self._objects[crds.key]:
                return self.replace(crds, "v1", None, name, crd, None)
            return self.create(crds, "v1", None, crd)

    def all_objects(self, resource_type: ResourceType) -> Iterable[dict[str, Any]]:
        with self.lock:
            return list(self._objects[resource_type.key].values())
