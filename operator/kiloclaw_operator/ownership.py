"""Ownership across instances (DESIGN 3.6): one KiloClawInstance owns a ``(flyApp, sandboxId)``.

Pure functions over instance bodies; the driver calls ``claim_owner`` before an instance's first Fly call and
refuses a second claimant (``Stalled`` reason ``DuplicateSandbox``) before it touches Fly.

Why the rule is deterministic and race-free:
- a *claim* is a fact in the status, written before the instance's first Fly call: any phase other than
  ``Pending``, or any recorded Fly id. Once an instance holds a claim, no later claimant can win against
  it, whatever order the operator sees events in (a restart does not reshuffle owners);
- among instances without a claim, the oldest (``creationTimestamp``, then ``uid`` as the tie-break)
  wins, so the original beats a copy applied later even when the copy's event arrives first;
- the operator evaluates and records claims one at a time (one process-wide lock, an authoritative list
  from the API server, and the claiming status write confirmed before the lock is released), so two
  instances can never both see "no claimant" and both claim.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from .models import Instance, InstanceStatus, Phase


@dataclass(frozen=True)
class Owner:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


#: Phases that by themselves claim nothing: not acted on yet, or a refused claimant being deleted.
_UNCLAIMED_PHASES = frozenset({Phase.PENDING.value, Phase.DESTROYING.value})


def has_claim(status: InstanceStatus) -> bool:
    """Whether this status records a claim: the operator acted on the instance, or it holds Fly ids."""
    return status.phase.value not in _UNCLAIMED_PHASES or _holds_ids(status.model_dump(by_alias=True))


def holds_fly_ids(status: InstanceStatus) -> bool:
    """Whether the status names any Fly resource (current, recovery, pending cleanup)."""
    return _holds_ids(status.model_dump(by_alias=True))


def _holds_ids(status: Mapping[str, Any]) -> bool:
    pending = status.get("pendingCleanup") or {}
    return bool(
        status.get("volumeId")
        or status.get("machineId")
        or status.get("recovery")
        or pending.get("volumeId")
        or pending.get("machineId")
    )


def _body_has_claim(body: Mapping[str, Any]) -> bool:
    status = body.get("status") or {}
    return (status.get("phase") or Phase.PENDING.value) not in _UNCLAIMED_PHASES or _holds_ids(status)


class Peer(NamedTuple):
    """What ``claim_owner`` reads of one instance body: a tuple, not the body (the claim book keeps one per
    instance; a fleet's worth of bodies, or even of dicts cut down to these fields, would cost ~1 KB each)."""

    uid: str
    namespace: str
    name: str
    #: (creationTimestamp, uid): RFC 3339 timestamps in UTC ("...Z") sort as strings; the uid breaks ties.
    age: tuple[str, str]
    claimed: bool
    deleting: bool
    resource_version: float

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Peer:
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        try:
            rv = int(meta.get("resourceVersion") or 0)
        except (TypeError, ValueError):
            rv = 0
        return cls(
            uid=uid,
            namespace=sys.intern(str(meta.get("namespace", ""))),
            name=str(meta.get("name", "")),
            age=(str(meta.get("creationTimestamp") or ""), uid),
            claimed=_body_has_claim(body),
            deleting=bool(meta.get("deletionTimestamp")),
            resource_version=rv,
        )


def _pair(body: Mapping[str, Any]) -> tuple[str, str]:
    spec = body.get("spec") or {}
    return (str(spec.get("flyApp")), str(spec.get("sandboxId")))


def claim_owner(instance: Instance, peers: Iterable[Mapping[str, Any]]) -> Owner | None:
    """The instance that owns ``instance``'s ``(flyApp, sandboxId)`` if it is another one, else None.

    ``peers`` are instance bodies as listed from the API server (any namespace; ``instance`` itself may be
    among them). Claimants — even one being deleted, whose finalizer still needs its resources — win over
    instances without a claim, the oldest claimant first; without any claimant the oldest undeleted
    instance wins.
    """
    pair = (instance.spec.fly_app, instance.spec.sandbox_id)
    return _owner_among(instance, (Peer.of(body) for body in peers if _pair(body) == pair))


def _owner_among(instance: Instance, peers: Iterable[Peer]) -> Owner | None:
    """``claim_owner`` over the peers that name ``instance``'s pair."""
    contenders: list[tuple[bool, tuple[str, str], Owner | None]] = []
    listed_self = False
    for peer in peers:
        is_self = peer.uid == instance.ref.uid
        listed_self = listed_self or is_self
        if is_self:
            contenders.append((has_claim(instance.status), peer.age, None))
        elif peer.claimed or not peer.deleting:
            contenders.append((peer.claimed, peer.age, Owner(namespace=peer.namespace, name=peer.name)))
    if not listed_self:
        stamp = instance.created_at.strftime("%Y-%m-%dT%H:%M:%SZ") if instance.created_at else ""
        contenders.append((has_claim(instance.status), (stamp, instance.ref.uid), None))
    # Claimants first (False sorts before True, hence the negation), then by age.
    _, _, winner = min(contenders, key=lambda c: (not c[0], c[1]))
    return winner


class ClaimBook:
    """What ``claim_owner`` needs to know about every instance, without listing all of them for every claim
    (O(N) per claim, O(N²) for a fleet created at once; at 10,000 instances each list also stalls the event
    loop for seconds).

    Kept current from three sources: one authoritative list before the first claim after a start (every claim
    persisted before, by this process or an earlier leader, is known); every watch event (``seen``,
    ``forget``); and every claim this process writes (``record``, under the claims lock, before the lock is
    released). Claims are made only by the one active operator, one at a time, so no claim of a watched
    namespace can be missing from the book: two instances never both own a pair. The book may lag on an
    unclaimed contender whose watch event has not arrived yet; then "the oldest unclaimed instance wins" can
    pick the younger of two duplicates created within the same instant, and the other is refused: still one
    owner. A refusal is always confirmed by a fresh list (the owner in the book may have been deleted since).
    Kept per instance: a ``Peer`` (what ``claim_owner`` reads); the newest ``resourceVersion`` wins. Use
    ``owner`` only under the claims lock.
    """

    def __init__(self, instance_pages: Callable[[], AsyncIterator[list[dict[str, Any]]]]) -> None:
        # Listed a page at a time and kept as Peers: a whole list of a large fleet as bodies (10,000 of them,
        # ~7 KB each as Python objects on a real API server) would make the process's peak memory.
        self._pages = instance_pages
        self._by_pair: dict[tuple[str, str], dict[str, Peer]] = {}
        self._pair_of: dict[str, tuple[str, str]] = {}
        self._reserved: dict[str, tuple[tuple[str, str], Peer]] = {}
        self._listed = False
        self.lists = 0

    async def owner(self, instance: Instance, body: Mapping[str, Any]) -> Owner | None:
        """The other instance that owns ``instance``'s pair, if any (``body``: the claimant as last seen)."""
        if not self._listed:
            await self._refresh()
        self.seen(body)
        owner = _owner_among(instance, self._peers(instance))
        if owner is not None:
            await self._refresh()
            self.seen(body)
            owner = _owner_among(instance, self._peers(instance))
        return owner

    def reserve(self, body: Mapping[str, Any]) -> None:
        """Count the claimant as a claimant from now on, before its claim is written: the claims lock need not
        be held across the write (at 10,000 instances, claims one write at a time were the bottleneck).
        ``settle`` ends the reservation once the write is confirmed or failed; the claimant makes no Fly call
        before its claim is confirmed."""
        peer = Peer.of(body)._replace(claimed=True, resource_version=float("inf"))
        pair = _pair(body)
        self._reserved[peer.uid] = (pair, peer)
        self._put(pair, peer)

    def settle(self, body: Mapping[str, Any]) -> None:
        """The claim write of a reserved claimant is over: keep what the API server stored (``body``)."""
        uid = str((body.get("metadata") or {}).get("uid") or "")
        reserved = self._reserved.pop(uid, None)
        if reserved is not None:
            self._by_pair.get(reserved[0], {}).pop(uid, None)
            self._pair_of.pop(uid, None)
        self.seen(body)

    def record(self, body: Mapping[str, Any]) -> None:
        """A claim this process just wrote (the body as the API server stored it)."""
        self.seen(body)

    def seen(self, body: Mapping[str, Any]) -> None:
        """An instance body from the watch, a list or a write; an older ``resourceVersion`` never wins."""
        peer = Peer.of(body)
        if not peer.uid:
            return
        pair = _pair(body)
        known = self._by_pair.get(pair, {}).get(peer.uid)
        if known is not None and known.resource_version > peer.resource_version:
            return
        self._put(pair, peer)

    def _put(self, pair: tuple[str, str], peer: Peer) -> None:
        previous = self._pair_of.get(peer.uid)
        if previous is not None and previous != pair:
            self._by_pair.get(previous, {}).pop(peer.uid, None)
            if not self._by_pair.get(previous, True):
                del self._by_pair[previous]
        self._pair_of[peer.uid] = pair
        self._by_pair.setdefault(pair, {})[peer.uid] = peer

    def forget(self, body: Mapping[str, Any]) -> None:
        """The instance is gone from the API server."""
        uid = str((body.get("metadata") or {}).get("uid") or "")
        pair = self._pair_of.pop(uid, None)
        if pair is not None:
            peers = self._by_pair.get(pair, {})
            peers.pop(uid, None)
            if not peers:
                self._by_pair.pop(pair, None)

    def _peers(self, instance: Instance) -> Iterable[Peer]:
        return self._by_pair.get((instance.spec.fly_app, instance.spec.sandbox_id), {}).values()

    async def _refresh(self) -> None:
        self.lists += 1
        # Not listed until the last page is in: a list that fails half-way is redone by the next claim.
        self._listed = False
        self._by_pair = {}
        self._pair_of = {}
        async for page in self._pages():
            for body in page:
                self.seen(body)
        self._listed = True
        for pair, peer in self._reserved.values():
            self._put(pair, peer)


def duplicate_message(instance: Instance, owner: Owner) -> str:
    """The refusal as the claimant's namespace sees it: the owner is named only when it is in the same
    namespace (a message shown in one namespace names nothing of another)."""
    who = (
        f"instance {owner.name}"
        if owner.namespace == instance.ref.namespace
        else "an instance in another namespace"
    )
    return (
        f"sandbox {instance.spec.sandbox_id} in Fly app {instance.spec.fly_app} is owned by {who}; this "
        "instance touches nothing on Fly (delete it, or give it its own sandboxId)"
    )
