"""The HTTP face of the emulated API server, and :class:`KubeSim`, its Python handle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from aiohttp import web

from kubesim import errors, openapi, patching, protobuf, selectors, tables
from kubesim import store as store_module
from kubesim.errors import ApiError
from kubesim.resources import ALL_VERBS, SUBRESOURCE_VERBS, ResourceType
from kubesim.store import Store, WatchEvent, clone

logger = logging.getLogger("kubesim")

_SERVER_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-kubesim",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.23.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}


class RequestRecord(NamedTuple):
    """One resource request, in the terms RBAC rules use."""

    verb: str
    group: str
    version: str
    resource: str
    subresource: str
    namespace: str


class _Target(NamedTuple):
    resource_type: ResourceType
    version: str
    namespace: str | None
    name: str | None
    subresource: str | None


def _json(body: Any, status: int = 200, content_type: str = "application/json") -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status, content_type=content_type)


_OPTIONS_KIND = {
    "POST": "CreateOptions",
    "PUT": "UpdateOptions",
    "PATCH": "PatchOptions",
    "DELETE": "DeleteOptions",
}
_FIELD_VALIDATION = ("", "Ignore", "Strict", "Warn")


def _check_options(method: str, query: Any, has_body: bool) -> None:
    """The write options the API server validates: dryRun (only "All") and fieldValidation."""
    kind = _OPTIONS_KIND.get(method)
    if kind is None or (method == "DELETE" and has_body):  # then DeleteOptions come from the body
        return
    dry_run = query.getall("dryRun", [])
    if any(value != "All" for value in dry_run):
        shown = "[" + ", ".join(json.dumps(value) for value in dry_run) + "]"
        raise errors.invalid(
            "meta.k8s.io", kind, "", [("dryRun", f'Unsupported value: {shown}: supported values: "All"')]
        )
    field_validation = query.get("fieldValidation", "")
    if method != "DELETE" and field_validation not in _FIELD_VALIDATION:
        supported = ", ".join(json.dumps(value) for value in _FIELD_VALIDATION)
        raise errors.invalid(
            "meta.k8s.io",
            kind,
            "",
            [
                (
                    "fieldValidation",
                    f"Unsupported value: {json.dumps(field_validation)}: supported values: {supported}",
                )
            ],
        )


class _Pairs(dict[str, Any]):
    """A decoded JSON object that remembers the keys it saw more than once."""

    duplicates: list[str]


def _pairs(pairs: list[tuple[str, Any]]) -> _Pairs:
    result = _Pairs()
    result.duplicates = []
    for key, value in pairs:
        if key in result and key not in result.duplicates:
            result.duplicates.append(key)
        result[key] = value
    return result


def _duplicate_fields(raw: bytes) -> list[str]:
    """Paths of the keys a JSON document has twice (``spec.color``)."""
    if not raw:
        return []
    try:
        document = json.loads(raw, object_pairs_hook=_pairs)
    except ValueError:
        return []
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, _Pairs):
            found.extend(f"{path}.{key}" if path else key for key in node.duplicates)
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else key)
        elif isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, f"{path}[{index}]")

    walk(document, "")
    return found


def _require_resource_version(resource_type: ResourceType, name: str, body: Any) -> None:
    """Custom resources, CRDs and Leases refuse unconditional updates: a PUT carries the resourceVersion."""
    if not (resource_type.custom or resource_type.plural in ("customresourcedefinitions", "leases")):
        return
    metadata = body.get("metadata") if isinstance(body, dict) else None
    if isinstance(metadata, dict) and metadata.get("resourceVersion"):
        return
    qualified = f"{resource_type.plural}.{resource_type.group}"
    message = "Invalid value: 0: must be specified for an update"
    raise ApiError(
        422,
        "Invalid",
        f'{qualified} "{name}" is invalid: metadata.resourceVersion: {message}',
        {
            "name": name,
            "group": resource_type.group,
            "kind": resource_type.plural,
            "causes": [
                {"reason": "FieldValueInvalid", "message": message, "field": "metadata.resourceVersion"}
            ],
        },
    )


def _wants_table(request: web.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


class KubeSim:
    """An emulated Kubernetes API server on loopback (plain HTTP, any bearer token accepted).

    Run it in the caller's event loop (:meth:`start`/:meth:`stop`) or in its own thread
    (:meth:`start_in_thread`/:meth:`stop_thread`) so that a test or an operator can run in another loop.
    """

    def __init__(self, *, window_size: int = 10_000, request_log_size: int = 10_000) -> None:
        self.store = Store(window_size=window_size)
        # Appended from the server thread: snapshot it with list(...) (one atomic call) before iterating.
        self.request_log: deque[RequestRecord] = deque(maxlen=request_log_size)
        self.rbac_verbs_seen: set[tuple[str, str, str]] = set()
        self.rbac_verbs_by_agent: dict[str, frozenset[tuple[str, str, str]]] = {}
        self.internal_errors: list[
            str
        ] = []  # emulator bugs (answered with 500); tests can assert it stays empty
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        #: Seconds each watch event is held before it is sent. The real API server's echo of a write reaches
        #: watchers measurably later than the write's reply (its watch cache); a delay here makes that order
        #: of events — reply first, watch echo later — as visible as it is on a real cluster.
        self.watch_delay = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the emulated API server is not running")
        return self._url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Cancel handlers of disconnected clients: a watch waiting for events must end when its client leaves.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        bound_port = sockets[0].getsockname()[1] if sockets else port
        self._url = f"http://{host}:{bound_port}"
        return self._url

    async def stop(self) -> None:
        self.store.close_watchers()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._url = None

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> str:
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()

        self._thread_loop = loop
        self._thread = threading.Thread(target=run, name="kubesim", daemon=True)
        self._thread.start()
        started.wait()
        return asyncio.run_coroutine_threadsafe(self.start(host, port), loop).result()

    def stop_thread(self) -> None:
        loop, thread = self._thread_loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        self._thread_loop = self._thread = None

    # -- Python API (thread-safe) ----------------------------------------------------------------

    def load_crds(self, paths: Iterable[Path]) -> list[str]:
        """Register the CustomResourceDefinitions in these YAML files or directories; return their names."""
        names: list[str] = []
        for path in paths:
            files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
            for file in files:
                for document in clone(list(yaml.safe_load_all(file.read_text()))):
                    if isinstance(document, dict) and document.get("kind") == "CustomResourceDefinition":
                        names.append(self.store.apply_crd(document)["metadata"]["name"])
        return names

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kubesim", "cluster": {"server": self.url}}],
            "users": [{"name": "kubesim", "user": {"token": "kubesim"}}],
            "contexts": [
                {
                    "name": "kubesim",
                    "context": {"cluster": "kubesim", "user": "kubesim", "namespace": namespace},
                }
            ],
            "current-context": "kubesim",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def _type(self, group: str, version: str, plural: str) -> ResourceType:
        resource_type = self.store.find_type(group, version, plural)
        if resource_type is None:
            raise KeyError(f"unknown resource {plural}.{group}/{version}")
        return resource_type

    def get_object(
        self, group: str, version: str, plural: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        resource_type = self._type(group, version, plural)
        try:
            return clone(self.store.get(resource_type, version, namespace, name))
        except ApiError:
            return None

    def list_objects(
        self, group: str, version: str, plural: str, namespace: str | None = None, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        resource_type = self._type(group, version, plural)
        items, _ = self.store.list_items(
            resource_type, version, namespace, selectors.label_selector(label_selector)
        )
        return clone(items)

    def create_object(
        self, group: str, version: str, plural: str, body: dict[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        resource_type = self._type(group, version, plural)
        return clone(self.store.create(resource_type, version, namespace, body))

    def create_namespace(self, name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        """The namespace, created if missing; ``annotations`` are merged into it (``kubectl annotate``)."""
        if self.store.namespace_exists(name):
            if annotations:
                return self.annotate_namespace(name, annotations)
            existing = self.get_object("", "v1", "namespaces", None, name)
            assert existing is not None
            return existing
        metadata: dict[str, Any] = {"name": name}
        if annotations:
            metadata["annotations"] = dict(annotations)
        return self.create_object("", "v1", "namespaces", {"metadata": metadata})

    def annotate_namespace(self, name: str, annotations: dict[str, str]) -> dict[str, Any]:
        """Merge ``annotations`` into the namespace, as ``kubectl annotate --overwrite`` does."""
        resource_type = self._type("", "v1", "namespaces")

        def merged(obj: dict[str, Any]) -> dict[str, Any]:
            meta = dict(obj.get("metadata") or {})
            meta["annotations"] = {**(meta.get("annotations") or {}), **annotations}
            return {**obj, "metadata": meta}

        return clone(self.store.patch(resource_type, "v1", None, name, merged, None))

    # -- HTTP ------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._route(request)
        except ApiError as error:
            return _json(error.status(), status=error.code)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as error:
            # An emulator bug must be loud in test logs, yet reach the client as the Status a client expects.
            logger.exception("kubesim failed on %s %s", request.method, request.path_qs)
            self.internal_errors.append(f"{request.method} {request.path_qs}: {error!r}")
            return _json(ApiError(500, "InternalError", f"kubesim: {error!r}").status(), status=500)

    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [part for part in request.path.split("/") if part]
        if request.method not in ("GET", "HEAD") and (not parts or parts[0] not in ("api", "apis")):
            raise errors.method_not_allowed(f"{request.method} is not allowed on {request.path}")
        if not parts:
            return _json({"paths": self._root_paths()})
        head = parts[0]
        if head == "version":
            return _json(_SERVER_VERSION)
        if head in ("healthz", "livez", "readyz"):
            return web.Response(text="ok")
        if head == "openapi":
            return self._openapi(parts[1:])
        if head == "api":
            if len(parts) == 1:
                return _json({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
            group, version, rest = "", parts[1], parts[2:]
        elif head == "apis":
            if len(parts) == 1:
                return _json(self._api_group_list())
            if len(parts) == 2:
                return _json(self._api_group(parts[1]))
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise errors.ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return _json(self._api_resource_list(group, version))
        target = self._target(group, version, rest)
        return await self._serve(request, target)

    def _target(self, group: str, version: str, rest: list[str]) -> _Target:
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            candidate = self.store.find_type(group, version, rest[2])
            if candidate is not None and candidate.namespaced:
                namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise errors.ApiError(404, "NotFound", "the server could not find the requested resource")
        resource_type = self.store.find_type(group, version, rest[0])
        if resource_type is None:
            raise errors.ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if subresource is not None and (subresource != "status" or not resource_type.has_status(version)):
            raise errors.ApiError(404, "NotFound", "the server could not find the requested resource")
        if resource_type.namespaced is False:
            namespace = None
        return _Target(resource_type, version, namespace, name, subresource)

    def _record(self, verb: str, target: _Target, request: web.Request) -> None:
        resource_type = target.resource_type
        self.request_log.append(
            RequestRecord(
                verb,
                resource_type.group,
                target.version,
                resource_type.plural,
                target.subresource or "",
                target.namespace or "",
            )
        )
        rbac_resource = resource_type.plural + (f"/{target.subresource}" if target.subresource else "")
        seen = (verb, resource_type.group, rbac_resource)
        if seen not in self.rbac_verbs_seen:
            # Copy on write: readers in other threads may iterate the set they hold while requests arrive.
            self.rbac_verbs_seen = self.rbac_verbs_seen | {seen}
        # The client's product name ("kopf/1.45.2" -> "kopf"), so a test can tell whose calls need RBAC.
        agent = request.headers.get("User-Agent", "").split("/", 1)[0]
        by_agent = self.rbac_verbs_by_agent.get(agent, frozenset())
        if seen not in by_agent:
            self.rbac_verbs_by_agent = {**self.rbac_verbs_by_agent, agent: by_agent | {seen}}

    async def _serve(self, request: web.Request, target: _Target) -> web.StreamResponse:
        method = request.method
        query = request.query
        resource_type, version, namespace, name, subresource = target
        _check_options(method, query, request.can_read_body)
        strict = query.get("fieldValidation") == "Strict"
        dry_run = query.get("dryRun") == "All"
        if method in ("POST", "PUT", "PATCH"):
            warnings = store_module.collect_warnings()
            try:
                response = await self._write(request, target, strict=strict, dry_run=dry_run)
            finally:
                store_module.stop_collecting_warnings()
            if query.get("fieldValidation") != "Ignore":
                for warning in warnings:
                    response.headers.add("Warning", f"299 - {json.dumps(warning)}")
            return response
        if method in ("GET", "HEAD"):
            if name is not None:
                self._record("get", target, request)
                obj = self.store.get(resource_type, version, namespace, name)
                if _wants_table(request):
                    resource_version = int(obj["metadata"].get("resourceVersion") or 0) or None
                    return _json(
                        tables.table(
                            resource_type,
                            version,
                            [obj],
                            resource_version,
                            include_object=query.get("includeObject", ""),
                        )
                    )
                return _json(obj)
            predicate = self._predicate(query, resource_type)
            if query.get("watch") in ("true", "1", "True"):
                self._record("watch", target, request)
                return await self._watch(request, target, predicate)
            self._record("list", target, request)
            return self._list(request, target, predicate)
        if name is None:
            if method == "DELETE":
                self._record("deletecollection", target, request)
                items = self.store.delete_collection(
                    resource_type, version, namespace, self._predicate(query, resource_type)
                )
                return _json(self._list_body(resource_type, version, items, self.store.resource_version))
            raise errors.method_not_allowed(f"{method} is not allowed on a collection")
        if subresource is not None and method == "DELETE":
            raise errors.method_not_allowed("DELETE is not allowed on a subresource")
        if method == "DELETE":
            self._record("delete", target, request)
            options = await self._body(request, optional=True)
            preconditions = options.get("preconditions") if isinstance(options, dict) else None
            if isinstance(options, dict) and options:  # a body's DeleteOptions replace the query's
                dry_run = options.get("dryRun") == ["All"]
            return _json(
                self.store.delete(resource_type, version, namespace, name, preconditions, dry_run=dry_run)
            )
        raise errors.method_not_allowed(f"{method} is not allowed")

    async def _write(
        self, request: web.Request, target: _Target, *, strict: bool, dry_run: bool
    ) -> web.Response:
        """POST (create), PUT (update) and PATCH."""
        method = request.method
        resource_type, version, namespace, name, subresource = target
        if method == "POST":
            if name is not None:
                raise errors.method_not_allowed("POST is not allowed on a named object")
            self._record("create", target, request)
            body = await self._body(request)
            await self._check_duplicates(request, resource_type, version, strict)
            created = self.store.create(
                resource_type, version, namespace, body, strict=strict, dry_run=dry_run
            )
            return _json(created, status=201)
        if name is None:
            raise errors.method_not_allowed(f"{method} is not allowed on a collection")
        if method == "PUT":
            self._record("update", target, request)
            body = await self._body(request)
            await self._check_duplicates(request, resource_type, version, strict)
            _require_resource_version(resource_type, name, body)
            return _json(
                self.store.replace(
                    resource_type, version, namespace, name, body, subresource, strict=strict, dry_run=dry_run
                )
            )
        self._record("patch", target, request)
        apply_patch = await self._patch_function(request, resource_type)
        return _json(
            self.store.patch(
                resource_type,
                version,
                namespace,
                name,
                apply_patch,
                subresource,
                strict=strict,
                dry_run=dry_run,
            )
        )

    @staticmethod
    async def _check_duplicates(
        request: web.Request, resource_type: ResourceType, version: str, strict: bool
    ) -> None:
        """A JSON object with a key twice: last one wins, with a warning; with Strict validation, a 400."""
        content_type = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if not content_type.endswith("json"):
            return
        duplicates = _duplicate_fields(await request.read())
        if not duplicates:
            return
        problems = [f'duplicate field "{path}"' for path in duplicates]
        if strict:
            kind = resource_type.kind
            raise errors.bad_request(
                f'{kind} in version "{version}" cannot be handled as a {kind}: strict decoding error: '
                + ", ".join(problems)
            )
        warnings = store_module.current_warnings()
        if warnings is not None:
            warnings.extend(problems)

    @staticmethod
    async def _body(request: web.Request, *, optional: bool = False) -> Any:
        raw = await request.read()
        if not raw:
            if optional:
                return {}
            raise errors.bad_request("the request has no body")
        content_type = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if content_type == protobuf.CONTENT_TYPE:
            try:
                return protobuf.decode_namespace(raw)
            except (protobuf.ProtobufError, UnicodeDecodeError):
                raise errors.unsupported_media_type(content_type) from None
        try:
            if content_type in ("application/yaml", "application/x-yaml", "text/yaml"):
                return clone(yaml.safe_load(raw))  # YAML timestamps become strings, as in JSON
            if content_type.endswith("json") or content_type in ("", "text/plain", "*/*"):
                return json.loads(raw)
        except (ValueError, yaml.YAMLError) as error:
            raise errors.bad_request(f"the request body is not valid: {error}") from None
        raise errors.unsupported_media_type(content_type)

    @staticmethod
    async def _patch_function(
        request: web.Request, resource_type: ResourceType
    ) -> Callable[[dict[str, Any]], dict[str, Any]]:
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if resource_type.custom and content_type not in (patching.JSON_PATCH, patching.MERGE_PATCH):
            # Custom resources have no Go struct to carry patch strategies: no strategic merge patch.
            raise errors.ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: "
                f"{patching.JSON_PATCH}, {patching.MERGE_PATCH}",
            )
        raw = await request.read()
        try:
            patch = json.loads(raw) if raw else None
        except ValueError as error:
            raise errors.bad_request(f"the patch is not valid JSON: {error}") from None
        if content_type == patching.JSON_PATCH:

            def apply_json_patch(obj: dict[str, Any]) -> dict[str, Any]:
                try:
                    result: dict[str, Any] = patching.json_patch(obj, patch)
                except patching.PatchError as error:
                    raise ApiError(422, "Invalid", str(error)) from None
                return result

            return apply_json_patch
        if content_type in (patching.MERGE_PATCH, patching.STRATEGIC_MERGE_PATCH):
            if not isinstance(patch, dict):
                raise errors.bad_request("a merge patch must be a JSON object")
            if content_type == patching.STRATEGIC_MERGE_PATCH:
                patch = patching.strip_strategic_directives(patch)
            return lambda obj: patching.merge_patch(obj, patch)
        raise errors.unsupported_media_type(content_type)

    @staticmethod
    def _predicate(query: Any, resource_type: ResourceType) -> Callable[[dict[str, Any]], bool]:
        by_label = selectors.label_selector(query.get("labelSelector"))
        by_field = selectors.field_selector(
            query.get("fieldSelector"), selectors.supported_fields(resource_type.group, resource_type.plural)
        )
        return lambda obj: by_label(obj) and by_field(obj)

    @staticmethod
    def _list_body(
        resource_type: ResourceType, version: str, items: list[dict[str, Any]], resource_version: int
    ) -> dict[str, Any]:
        return {
            "apiVersion": resource_type.api_version(version),
            "kind": f"{resource_type.kind}List",
            "metadata": {"resourceVersion": str(resource_version)},
            "items": items,
        }

    def _list(
        self, request: web.Request, target: _Target, predicate: Callable[[dict[str, Any]], bool]
    ) -> web.Response:
        resource_type, version, namespace = target.resource_type, target.version, target.namespace
        query = request.query
        asked = query.get("resourceVersion", "")
        if asked:
            if not asked.isdigit():
                raise errors.bad_request(
                    f'invalid resource version: resourceVersion: Invalid value: "{asked}": '
                    f'strconv.ParseUint: parsing "{asked}": invalid syntax'
                )
            if int(asked) > self.store.resource_version:
                raise errors.ApiError(
                    504,
                    "Timeout",
                    f"Timeout: Too large resource version: {asked}, current: {self.store.resource_version}",
                    {
                        "causes": [
                            {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
                        ],
                        "retryAfterSeconds": 1,
                    },
                )
        items, resource_version = self.store.list_items(resource_type, version, namespace, predicate)
        # Chunking (limit/continue): the token is the offset; the list is re-read, which is good enough
        # for a store that is not paginated by snapshots.
        token = query.get("continue") or "0"
        if not token.isdigit():
            raise errors.bad_request(f"invalid continue token: continue key is not valid: {token!r}")
        offset = int(token)
        limit = int(query["limit"]) if query.get("limit", "").isdigit() and int(query["limit"]) > 0 else None
        remaining = 0
        if limit is not None:
            remaining = max(len(items) - offset - limit, 0)
            items = items[offset : offset + limit]
        elif offset:
            items = items[offset:]
        if _wants_table(request):
            body = tables.table(
                resource_type, version, items, resource_version, include_object=query.get("includeObject", "")
            )
        else:
            body = self._list_body(resource_type, version, items, resource_version)
        if remaining:
            body["metadata"]["continue"] = str(offset + len(items))
            body["metadata"]["remainingItemCount"] = remaining
        return _json(body)

    async def _watch(
        self, request: web.Request, target: _Target, predicate: Callable[[dict[str, Any]], bool]
    ) -> web.StreamResponse:
        query = request.query
        resource_type, version, namespace, name = (
            target.resource_type,
            target.version,
            target.namespace,
            target.name,
        )
        timeout: float | None = None
        if query.get("timeoutSeconds"):
            text = query["timeoutSeconds"]
            if not text.lstrip("-").isdigit():  # Go's strconv.ParseInt: whole seconds only
                raise errors.bad_request(f'strconv.ParseInt: parsing "{text}": invalid syntax')
            timeout = float(text)
        as_table = _wants_table(request)
        include_object = query.get("includeObject", "")
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        try:
            backlog, watcher = self.store.watch(
                resource_type, query.get("resourceVersion"), asyncio.get_running_loop()
            )
        except ApiError as error:
            if error.code != 410:
                raise
            # Like the real API server: the stream opens, then carries one ERROR event with the 410 Status.
            await response.prepare(request)
            await response.write(json.dumps({"type": "ERROR", "object": error.status()}).encode() + b"\n")
            await response.write_eof()
            return response
        first = True

        def encode(event: WatchEvent) -> bytes | None:
            nonlocal first
            obj = Store.as_version(resource_type, version, event.object)
            meta = obj["metadata"]
            if namespace and resource_type.namespaced and meta.get("namespace") != namespace:
                return None
            if name is not None and meta.get("name") != name:
                return None
            event_type = event.type
            if not predicate(obj):
                if event.previous is None or not predicate(event.previous):
                    return None
                # It stopped matching the selectors: the watch cache sends the previous content (which
                # matched) at this event's resourceVersion.
                event_type = "DELETED"
                previous = Store.as_version(resource_type, version, event.previous)
                obj = {
                    **previous,
                    "metadata": {**previous["metadata"], "resourceVersion": str(event.resource_version)},
                }
            elif event.previous is not None and not predicate(event.previous):
                event_type = "ADDED"  # it started matching the selectors
            if as_table:
                obj = tables.table(
                    resource_type,
                    version,
                    [obj],
                    event.resource_version,
                    include_object=include_object,
                    with_columns=first,
                )
                first = False
            return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"

        try:
            await response.prepare(request)
            async with asyncio.timeout(timeout):
                for event in backlog:
                    line = encode(event)
                    if line is not None:
                        await response.write(line)
                if query.get("sendInitialEvents") == "true" and query.get("resourceVersion") in (
                    None,
                    "",
                    "0",
                ):
                    # Streaming lists (KEP-3157): a bookmark marks the end of the initial ADDED events.
                    bookmark = {
                        "kind": resource_type.kind,
                        "apiVersion": resource_type.api_version(version),
                        "metadata": {
                            "resourceVersion": str(watcher.start_version),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    }
                    await response.write(
                        json.dumps({"type": "BOOKMARK", "object": bookmark}).encode() + b"\n"
                    )
                while True:
                    next_event = await watcher.queue.get()
                    if next_event is None:
                        break
                    if self.watch_delay:
                        await asyncio.sleep(self.watch_delay)
                    line = encode(next_event)
                    if line is not None:
                        await response.write(line)
        except (TimeoutError, ConnectionResetError):
            pass
        finally:
            self.store.unwatch(watcher)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    # -- discovery -------------------------------------------------------------------------------

    def _root_paths(self) -> list[str]:
        paths = {"/api", "/api/v1", "/apis", "/version", "/openapi/v3", "/healthz", "/livez", "/readyz"}
        for resource_type in self.store.types():
            if resource_type.group:
                paths.add(f"/apis/{resource_type.group}")
                paths.update(f"/apis/{resource_type.group}/{version}" for version in resource_type.versions)
        return sorted(paths)

    def _groups(self) -> dict[str, list[ResourceType]]:
        groups: dict[str, list[ResourceType]] = {}
        for resource_type in self.store.types():
            if resource_type.group:
                groups.setdefault(resource_type.group, []).append(resource_type)
        return groups

    @staticmethod
    def _group_body(group: str, types: list[ResourceType]) -> dict[str, Any]:
        versions: list[str] = []
        for resource_type in types:
            versions.extend(version for version in resource_type.versions if version not in versions)
        preferred = types[0].preferred_version
        return {
            "name": group,
            "versions": [{"groupVersion": f"{group}/{version}", "version": version} for version in versions],
            "preferredVersion": {"groupVersion": f"{group}/{preferred}", "version": preferred},
        }

    def _api_group_list(self) -> dict[str, Any]:
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [self._group_body(group, types) for group, types in sorted(self._groups().items())],
        }

    def _api_group(self, group: str) -> dict[str, Any]:
        types = self._groups().get(group)
        if not types:
            raise errors.ApiError(404, "NotFound", "the server could not find the requested resource")
        return {"kind": "APIGroup", "apiVersion": "v1", **self._group_body(group, types)}

    def _api_resource_list(self, group: str, version: str) -> dict[str, Any]:
        types = [
            resource_type
            for resource_type in self.store.types()
            if resource_type.group == group and version in resource_type.versions
        ]
        if not types:
            raise errors.ApiError(404, "NotFound", "the server could not find the requested resource")
        resources: list[dict[str, Any]] = []
        for resource_type in sorted(types, key=lambda resource_type: resource_type.plural):
            resources.append(
                {
                    "name": resource_type.plural,
                    "singularName": resource_type.singular,
                    "namespaced": resource_type.namespaced,
                    "kind": resource_type.kind,
                    "verbs": list(ALL_VERBS),
                    "shortNames": list(resource_type.short_names),
                    "categories": list(resource_type.categories),
                }
            )
            if resource_type.has_status(version):
                resources.append(
                    {
                        "name": f"{resource_type.plural}/status",
                        "singularName": "",
                        "namespaced": resource_type.namespaced,
                        "kind": resource_type.kind,
                        "verbs": list(SUBRESOURCE_VERBS),
                    }
                )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }

    def _openapi(self, parts: list[str]) -> web.Response:
        types = self.store.types()
        if parts == ["v3"]:
            return _json(openapi.root(types))
        if len(parts) >= 2 and parts[0] == "v3":
            body = openapi.document(types, "/".join(parts[1:]))
            if body is not None:
                return _json(body)
        raise errors.ApiError(404, "NotFound", "the server could not find the requested resource")
