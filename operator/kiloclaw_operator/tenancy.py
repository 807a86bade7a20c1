"""A namespace is a security boundary (DESIGN 3.8, SECURITY.md): what a namespace may use, and who holds a
``(flyApp, sandboxId)`` cluster-wide.

The binding. The cluster admin binds each namespace to the Fly apps, and the image repositories, its
instances may use, with two annotations on the Namespace:

    kiloclaw.kilo.ai/fly-apps: "acct-3f9a1c, acct-7b2e"
    kiloclaw.kilo.ai/image-repositories: "registry.fly.io/kiloclaw, registry.example.com/team/"

Why annotations on the Namespace: a Namespace is cluster-scoped, so the namespace-scoped rights tenants get
(admin/edit in their namespace) cannot change it; a ValidatingAdmissionPolicy reads it as ``namespaceObject``
with no parameter resource; it travels with the namespace (GitOps creates both together); and a list of names
does not fit a label value (63 characters, no commas). The same rule runs at admission
(deploy/base/tenancy.yaml) and here, before any Fly call, so an API server without the policy (an old
cluster, kubesim) or a binding removed later is still enforced.

A repository entry is a repository (``registry.fly.io/kiloclaw``: that repository, any tag or digest)
or, ending in ``/``, a prefix (``registry.example.com/team/``: every repository under it). No annotation
binds nothing.

The claims. One ``coordination.k8s.io`` Lease per ``(flyApp, sandboxId)``, in one namespace for every shard
and replica (``KILOCLAW_CLAIMS_NAMESPACE``), named by a hash of the pair: creating it is the atomic claim
(409 = someone holds it), its ``holderIdentity`` is the owner's uid. It is released when the owner's
finalizer has destroyed what it recorded; a claim whose holder no longer exists (a finalizer removed by
hand) is taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .kube import KubeClient, KubeConflict, KubeError, KubeNotFound
from .models import GROUP, InstanceSpec, ObjectRef
from .reasons import Reason

logger = logging.getLogger("kiloclaw.tenancy")

FLY_APPS_ANNOTATION = f"{GROUP}/fly-apps"
IMAGE_REPOSITORIES_ANNOTATION = f"{GROUP}/image-repositories"


def bound_list(value: str | None) -> list[str]:
    """An annotation's comma (or whitespace) separated list."""
    return [item for item in (value or "").replace(",", " ").split() if item]


def image_allowed(image: str, repositories: list[str]) -> bool:
    """Whether ``image`` is in one of ``repositories``: a repository matches itself with any tag or digest
    (``repo:tag``, ``repo@sha256:…``), never a longer name (``repo-evil``); an entry ending in ``/`` matches
    every repository under it."""
    for repository in repositories:
        if repository.endswith("/"):
            if image.startswith(repository) and len(image) > len(repository):
                return True
        elif image == repository or image.startswith((repository + ":", repository + "@")):
            return True
    return False


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    message: str


def binding_refusal(
    namespace: str, annotations: Mapping[str, str], spec: InstanceSpec, *, check_image: bool = True
) -> Refusal | None:
    """Why ``spec`` may not be acted on in ``namespace`` (None: it may). The message names only what the
    namespace itself holds (its app, its image, its own annotations)."""
    apps = bound_list(annotations.get(FLY_APPS_ANNOTATION))
    if spec.fly_app not in apps:
        return Refusal(
            Reason.APP_NOT_ALLOWED,
            f"Fly app {spec.fly_app} is not bound to namespace {namespace} (annotation "
            f"{FLY_APPS_ANNOTATION} on the Namespace, set by the cluster admin): nothing is sent to Fly",
        )
    if check_image and not image_allowed(
        spec.image, bound_list(annotations.get(IMAGE_REPOSITORIES_ANNOTATION))
    ):
        return Refusal(
            Reason.IMAGE_NOT_ALLOWED,
            f"image {spec.image} is not in a repository bound to namespace {namespace} (annotation "
            f"{IMAGE_REPOSITORIES_ANNOTATION} on the Namespace, set by the cluster admin): "
            "nothing is sent to Fly",
        )
    return None


class NamespaceBindings:
    """The annotations of each namespace, read from the API server and kept ``ttl`` seconds (every pass of
    every instance checks its binding; a fresh read is forced before a claim and before a destroy).

    Passes that find no current entry share one read in flight: a new leader's first passes (thousands in
    a few namespaces) make one read per namespace, not one each. A fresh read joins only a read that began
    after it was asked for."""

    def __init__(
        self,
        read: Callable[[str], Awaitable[dict[str, Any]]],
        clock: Callable[[], float],
        ttl: float = 10.0,
    ) -> None:
        self._read = read
        self._clock = clock
        self._ttl = ttl
        self._known: dict[str, tuple[float, dict[str, str]]] = {}
        self._reading: dict[str, tuple[float, asyncio.Future[dict[str, str] | None]]] = {}

    async def annotations(self, namespace: str, *, fresh: bool = False) -> dict[str, str]:
        asked = self._clock()
        while True:
            known = self._known.get(namespace)
            if known is not None and not fresh and self._clock() - known[0] < self._ttl:
                return known[1]
            reading = self._reading.get(namespace)
            if reading is None or (fresh and reading[0] < asked):
                break
            # The shared read failed if None: join the next one (another caller's), or read, and see an
            # error, itself.
            shared = await asyncio.shield(reading[1])
            if shared is not None:
                return shared
        now = self._clock()
        # None when the read fails: whoever joined it then reads for itself.
        future: asyncio.Future[dict[str, str] | None] = asyncio.get_running_loop().create_future()
        self._reading[namespace] = (now, future)
        annotations: dict[str, str] | None = None
        try:
            body = await self._read(namespace)
            annotations = {
                key: str(value)
                for key, value in ((body.get("metadata") or {}).get("annotations") or {}).items()
                if key in (FLY_APPS_ANNOTATION, IMAGE_REPOSITORIES_ANNOTATION)
            }
        finally:
            if self._reading.get(namespace, (0.0, None))[1] is future:
                del self._reading[namespace]
            future.set_result(annotations)
        assert annotations is not None  # the read raised otherwise
        self._known[namespace] = (now, annotations)
        return annotations


# --- claims ----------------------------------------------------------------------------------------------

CLAIM_PREFIX = "kiloclaw-claim-"
CLAIM_INSTANCE_ANNOTATION = f"{GROUP}/instance"


def claim_name(fly_app: str, sandbox_id: str) -> str:
    """The Lease that holds ``(fly_app, sandbox_id)``: a hash of the exact pair (case and every character
    count), so two sandboxes never share a claim and one sandbox never has two."""
    digest = hashlib.sha256(f"{fly_app}/{sandbox_id}".encode()).hexdigest()[:40]
    return f"{CLAIM_PREFIX}{digest}"


def claim_body(namespace: str, fly_app: str, sandbox_id: str, holder: tuple[str, str, str]) -> dict[str, Any]:
    """A new claim held by ``holder`` (namespace, name, uid)."""
    holder_namespace, holder_name, uid = holder
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": claim_name(fly_app, sandbox_id),
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "kiloclaw-operator", f"{GROUP}/claim": "sandbox"},
            "annotations": {
                CLAIM_INSTANCE_ANNOTATION: f"{holder_namespace}/{holder_name}",
                f"{GROUP}/fly-app": fly_app,
                f"{GROUP}/sandbox-id": sandbox_id,
            },
        },
        "spec": {"holderIdentity": uid},
    }


def claim_holder(lease: Mapping[str, Any]) -> tuple[str, str, str]:
    """(namespace, name, uid) of the instance a claim names."""
    meta = lease.get("metadata") or {}
    where = str((meta.get("annotations") or {}).get(CLAIM_INSTANCE_ANNOTATION) or "/")
    namespace, _, name = where.partition("/")
    return namespace, name, str((lease.get("spec") or {}).get("holderIdentity") or "")


@dataclass(frozen=True)
class ClaimHolder:
    """Another instance holds the claim (its namespace is named only to the operator's own logs)."""

    namespace: str
    name: str


async def create_claim(kube: KubeClient, claims_namespace: str, spec: InstanceSpec, ref: ObjectRef) -> bool:
    """A new instance's first claim: create the Lease, atomically (one request for the common case). True
    when it was created now, nobody holding it; False when a Lease exists (``acquire_claim`` reads whose)."""
    body = claim_body(claims_namespace, spec.fly_app, spec.sandbox_id, (ref.namespace, ref.name, ref.uid))
    try:
        await kube.create_lease(claims_namespace, body)
    except KubeConflict:
        return False
    return True


async def acquire_claim(
    kube: KubeClient, claims_namespace: str, spec: InstanceSpec, ref: ObjectRef
) -> ClaimHolder | None:
    """Hold the claim on ``spec``'s ``(flyApp, sandboxId)`` for the instance ``ref``: None once it is ours
    (created now, or already ours), else the live instance that holds it. A claim whose holder is gone, or
    was replaced by a new object of the same name (another uid), is deleted (precondition: as read) and taken.
    """
    name = claim_name(spec.fly_app, spec.sandbox_id)
    for _ in range(3):
        lease = await kube.get_lease(claims_namespace, name)
        if lease is None:
            if await create_claim(kube, claims_namespace, spec, ref):
                return None
            continue  # someone claimed it in between: read who
        namespace, holder_name, uid = claim_holder(lease)
        if uid == ref.uid:
            return None
        if await _holder_exists(kube, namespace, holder_name, uid):
            return ClaimHolder(namespace=namespace, name=holder_name)
        logger.warning(
            "claim %s names instance %s/%s (uid %s), which no longer exists: taking it over",
            name,
            namespace,
            holder_name,
            uid,
            extra={"namespace": ref.namespace, "instance": ref.name, "sandbox_id": spec.sandbox_id},
        )
        version = str((lease.get("metadata") or {}).get("resourceVersion") or "")
        with contextlib.suppress(KubeConflict, KubeNotFound):
            await kube.delete_lease(claims_namespace, name, resource_version=version)
    raise KubeConflict(409, f"claim {name} keeps changing; will retry")


CLAIM_LABEL_SELECTOR = f"{GROUP}/claim=sandbox"


class ClaimListing:
    """The claims already held when this process starts, from one paged listing of the claims namespace: a
    new leader confirms the claims of thousands of instances from ~one request per 500 claims instead of one
    read each. Taken the first time it is asked (one listing shared by every pass that asks meanwhile),
    trusted for ``ttl`` seconds (a new leader's first passes), then dropped: later confirmations read the
    claim itself. A listing proves what a read proves (who held the claim when the API server answered);
    anything it does not show as held by the asking instance is read as before."""

    def __init__(self, kube: KubeClient, clock: Callable[[], float], ttl: float = 120.0) -> None:
        self._kube = kube
        self._clock = clock
        self._ttl = ttl
        self._listing: asyncio.Task[tuple[float, dict[str, str]] | None] | None = None

    def start(self, namespace: str) -> None:
        """Begin the listing now (at start-up, beside the feed's first listing), if it has not begun."""
        if self._listing is None:
            self._listing = asyncio.get_running_loop().create_task(self._list(namespace))

    async def holds(self, namespace: str, spec: InstanceSpec, ref: ObjectRef) -> bool:
        """Whether the listing shows ``ref`` (by uid) holding the claim on ``spec``'s pair; False: unknown,
        also while the listing is still under way (``holds`` never waits: a pass of an instance that stopped
        while no operator ran must not queue behind a listing of every claim of every shard)."""
        self.start(namespace)
        assert self._listing is not None
        if not self._listing.done() or self._listing.cancelled():
            return False
        listed = self._listing.result()
        if listed is None:
            return False
        taken_at, holders = listed
        if self._clock() - taken_at > self._ttl:
            holders.clear()  # stale: its memory goes, later confirmations read the claim
            return False
        return bool(ref.uid) and holders.get(claim_name(spec.fly_app, spec.sandbox_id)) == ref.uid

    async def aclose(self) -> None:
        """Stop a listing still in flight (the operator stops; its client is closed next)."""
        if self._listing is not None and not self._listing.done():
            self._listing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listing

    async def _list(self, namespace: str) -> tuple[float, dict[str, str]] | None:
        taken_at = self._clock()
        holders: dict[str, str] = {}
        try:
            async for page in self._kube.lease_pages(namespace, CLAIM_LABEL_SELECTOR):
                for lease in page:
                    name = str((lease.get("metadata") or {}).get("name") or "")
                    holders[name] = claim_holder(lease)[2]
        except KubeError as exc:
            # E.g. an older Role without `list` on Leases: each instance reads its claim, as before.
            logger.warning("cannot list the claims in %s, reading each instead: %s", namespace, exc)
            return None
        return taken_at, holders


async def release_claim(kube: KubeClient, claims_namespace: str, spec: InstanceSpec, ref: ObjectRef) -> None:
    """Release the claim if ``ref`` holds it (never another holder's)."""
    name = claim_name(spec.fly_app, spec.sandbox_id)
    lease = await kube.get_lease(claims_namespace, name)
    if lease is None or claim_holder(lease)[2] != ref.uid:
        return
    version = str((lease.get("metadata") or {}).get("resourceVersion") or "")
    try:
        await kube.delete_lease(claims_namespace, name, resource_version=version)
    except KubeNotFound:
        return


async def _holder_exists(kube: KubeClient, namespace: str, name: str, uid: str) -> bool:
    if not namespace or not name:
        return False
    try:
        body = await kube.get_instance(namespace, name)
    except KubeNotFound:
        return False
    return str((body.get("metadata") or {}).get("uid") or "") == uid
