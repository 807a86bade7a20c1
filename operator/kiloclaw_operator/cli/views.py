"""What the plugin shows, as plain data built from Kubernetes objects (dicts) and the current time.

The same data is printed for people (``render``) and for scripts (``-o json|yaml``). Nothing here talks to
the API, so every view can be built by hand in a test.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from ..models import GROUP
from ..reasons import RECOVERY_EVENTS, Reason

RETAINED_LABEL = f"{GROUP}/instance"
_RECOVERY_ID = re.compile(r"recovery (\S+?)(?:[\s:]|$)")
# Annotations that carry a copy of the spec (and so the env values): never shown in a report.
SPEC_COPY_ANNOTATIONS = (
    "kubectl.kubernetes.io/last-applied-configuration",
    f"{GROUP}/last-handled-configuration",
)
REDACTED = "<redacted>"


def parse_time(value: Any) -> datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def duration(seconds: float) -> str:
    """``1d2h``, ``5m12s``, ``40s``: kubectl's age style, two units at most."""
    seconds = int(abs(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def relative(value: Any, now: datetime) -> str:
    """``5m ago`` / ``in 3m20s`` for a timestamp, or ``-``."""
    when = parse_time(value)
    if when is None:
        return "-"
    delta = (when - now).total_seconds()
    return f"in {duration(delta)}" if delta > 0 else f"{duration(delta)} ago"


def _meta(body: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = body.get("metadata") or {}
    return meta


def _status(body: dict[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = body.get("status") or {}
    return status


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in _status(body).get("conditions") or []:
        if cond.get("type") == type_:
            result: dict[str, Any] = cond
            return result
    return {}


def attention(instance: dict[str, Any], retained: list[dict[str, Any]]) -> list[str]:
    """Why an instance needs a person, in short words (empty: nothing to do)."""
    reasons: list[str] = []
    status = _status(instance)
    if status.get("phase") == "Failed":
        reasons.append("Failed")
    stalled = condition(instance, "Stalled")
    if stalled.get("status") == "True":
        reasons.append(f"Stalled: {stalled.get('reason', '?')}")
    if status.get("pendingCleanup"):
        reasons.append("PendingCleanup")
    blocked = [r for r in retained if _status(r).get("phase") == "Blocked"]
    if blocked:
        reasons.append(f"RetainedVolumeBlocked ({len(blocked)})")
    return reasons


def retained_for(instance: dict[str, Any], retained: list[dict[str, Any]]) -> list[dict[str, Any]]:
    meta = _meta(instance)
    return [
        r
        for r in retained
        if _meta(r).get("namespace") == meta.get("namespace")
        and ((_meta(r).get("labels") or {}).get(RETAINED_LABEL) == meta.get("name"))
    ]


def event_time(event: dict[str, Any]) -> datetime:
    for key in ("lastTimestamp", "eventTime", "firstTimestamp"):
        when = parse_time(event.get(key))
        if when is not None:
            return when
    return parse_time(_meta(event).get("creationTimestamp")) or datetime.min.replace(tzinfo=UTC)


def event_order(event: dict[str, Any]) -> tuple[datetime, int]:
    """Oldest first. The API server keeps whole seconds of an Event's timestamps, so events of one second are
    ordered as the server stored them (resourceVersion): a list returns them by name, which generateName
    makes random."""
    stored = str(_meta(event).get("resourceVersion") or "")
    return event_time(event), int(stored) if stored.isdigit() else 0


def events_about(events: list[dict[str, Any]], namespace: str, names: set[str]) -> list[dict[str, Any]]:
    """Events whose object is one of ``names`` in ``namespace``, oldest first."""
    chosen = [
        e
        for e in events
        if (e.get("involvedObject") or {}).get("name") in names
        and (e.get("involvedObject") or {}).get("namespace", _meta(e).get("namespace")) == namespace
    ]
    return sorted(chosen, key=event_order)


def event_row(event: dict[str, Any], now: datetime) -> dict[str, Any]:
    obj = event.get("involvedObject") or {}
    return {
        "time": event_time(event).isoformat().replace("+00:00", "Z"),
        "age": duration((now - event_time(event)).total_seconds()),
        "type": event.get("type", ""),
        "reason": event.get("reason", ""),
        "object": f"{obj.get('kind', '')}/{obj.get('name', '')}",
        "count": event.get("count") or 1,
        "message": event.get("message", ""),
    }


def retained_row(body: dict[str, Any], now: datetime) -> dict[str, Any]:
    meta, spec, status = _meta(body), body.get("spec") or {}, _status(body)
    stalled = condition(body, "Stalled")
    blocked_why = stalled.get("message") if stalled.get("status") == "True" else None
    return {
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "instance": (meta.get("labels") or {}).get(RETAINED_LABEL) or spec.get("instanceName"),
        "volumeId": spec.get("volumeId"),
        "region": spec.get("region"),
        "phase": status.get("phase", "Retained"),
        "retainUntil": spec.get("retainUntil"),
        "timeLeft": relative(spec.get("retainUntil"), now),
        "deleteNow": bool(spec.get("deleteNow")),
        "deleting": bool(meta.get("deletionTimestamp")),
        "snapshotCount": status.get("snapshotCount"),
        "whyBlocked": blocked_why or (status.get("lastError") if status.get("phase") == "Blocked" else None),
        "blockedReason": stalled.get("reason") if stalled.get("status") == "True" else None,
        "lastError": status.get("lastError"),
        "nextAttemptAt": status.get("nextAttemptAt"),
        "nextAttempt": relative(status.get("nextAttemptAt"), now) if status.get("nextAttemptAt") else None,
        "recoveryId": spec.get("recoveryId"),
    }


def instance_row(body: dict[str, Any], retained: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
    meta, status = _meta(body), _status(body)
    ready = condition(body, "Ready")
    last = status.get("lastRecovery") or {}
    recovering = status.get("recovery") or {}
    if recovering:
        recovery = f"in flight ({recovering.get('step', '?')})"
    elif last:
        recovery = f"{last.get('outcome', '?')} {relative(last.get('finishedAt'), now)}"
        if last.get("source") == "Snapshot" and isinstance(last.get("dataLossSeconds"), int | float):
            recovery += f" (snapshot, lost ≤ {duration(float(last['dataLossSeconds']))})"
    else:
        recovery = "-"
    return {
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "phase": status.get("phase", "Pending"),
        "flyState": status.get("flyState"),
        "region": status.get("region"),
        "ready": ready.get("status", "Unknown"),
        "recovery": recovery,
        "age": duration((now - (parse_time(meta.get("creationTimestamp")) or now)).total_seconds()),
        "attention": attention(body, retained_for(body, retained)),
    }


def _source_region(last: dict[str, Any], retained: list[dict[str, Any]], events: list[dict[str, Any]]) -> Any:
    """Where the last recovery started: its retained volume's region (the old volume's), when there is one."""
    name = last.get("retainedVolume")
    for body in retained:
        spec = body.get("spec") or {}
        if _meta(body).get("name") == name or (last.get("id") and spec.get("recoveryId") == last.get("id")):
            return spec.get("region")
    return None


def status_card(
    instance: dict[str, Any], retained: list[dict[str, Any]], events: list[dict[str, Any]], now: datetime
) -> dict[str, Any]:
    """The admin's card for one instance (``kubectl kiloclaw status NAME``)."""
    meta, spec, status = _meta(instance), instance.get("spec") or {}, _status(instance)
    mine = retained_for(instance, retained)
    card: dict[str, Any] = {
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "sandboxId": spec.get("sandboxId"),
        "flyApp": spec.get("flyApp"),
        "desiredState": spec.get("state", "Running"),
        "recoveryEnabled": (spec.get("recovery") or {}).get("enabled", True),
        "phase": status.get("phase", "Pending"),
        "generation": meta.get("generation"),
        "observedGeneration": status.get("observedGeneration"),
        "deleting": bool(meta.get("deletionTimestamp")),
        "attention": attention(instance, mine),
        "conditions": [
            {
                "type": c.get("type"),
                "status": c.get("status"),
                "reason": c.get("reason"),
                "message": c.get("message", ""),
                "since": relative(c.get("lastTransitionTime"), now),
            }
            for c in status.get("conditions") or []
        ],
        "fly": {
            "state": status.get("flyState"),
            "observedAt": status.get("observedAt"),
            "region": status.get("region"),
            "machineId": status.get("machineId"),
            "volumeId": status.get("volumeId"),
        },
        "recovery": None,
        "lastRecovery": None,
        "pendingCleanup": status.get("pendingCleanup") or None,
        "retainedVolumes": [retained_row(r, now) for r in mine],
        "events": [],
    }
    if status.get("recovery"):
        rec = status["recovery"]
        deadline = parse_time(rec.get("deadline"))
        card["recovery"] = {
            **rec,
            "started": relative(rec.get("startedAt"), now),
            "deadlineIn": (
                ("overdue by " + duration((now - deadline).total_seconds()))
                if deadline and deadline < now
                else relative(rec.get("deadline"), now)
            ),
        }
    if status.get("lastRecovery"):
        last = status["lastRecovery"]
        card["lastRecovery"] = {
            **last,
            "fromRegion": _source_region(last, mine, events)
            or (status.get("region") if last.get("outcome") == "Failed" else None),
            "toRegion": status.get("region") if last.get("outcome") == "Succeeded" else None,
            "finished": relative(last.get("finishedAt"), now),
        }
    names = {str(meta.get("name"))} | {str(_meta(r).get("name")) for r in mine}
    card["events"] = [event_row(e, now) for e in events_about(events, str(meta.get("namespace")), names)]
    return card


def recoveries(
    instances: list[dict[str, Any]], events: list[dict[str, Any]], now: datetime
) -> list[dict[str, Any]]:
    """Recent recovery attempts across instances: from each status (in flight, last) and from the Events
    (older attempts), newest first, one row per recovery id."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}

    def row(namespace: str, name: str, rid: str) -> dict[str, Any]:
        return rows.setdefault(
            (namespace, name, rid),
            {
                "namespace": namespace,
                "instance": name,
                "id": rid,
                "outcome": None,
                "startedAt": None,
                "finishedAt": None,
                "durationSeconds": None,
                "step": None,
                "message": "",
            },
        )

    for event in sorted(events, key=event_order):
        if event.get("reason") not in RECOVERY_EVENTS:
            continue
        obj = event.get("involvedObject") or {}
        match = _RECOVERY_ID.search(event.get("message", ""))
        if not match:
            continue
        entry = row(
            str(obj.get("namespace") or _meta(event).get("namespace")), str(obj.get("name")), match[1]
        )
        when = event_time(event).isoformat().replace("+00:00", "Z")
        if event["reason"] == Reason.RECOVERY_STARTED:
            entry["startedAt"] = entry["startedAt"] or when
        else:
            entry["outcome"] = "Succeeded" if event["reason"] == Reason.RECOVERY_SUCCEEDED else "Failed"
            entry["finishedAt"] = when
            entry["message"] = event.get("message", "")
    for body in instances:
        meta, status = _meta(body), _status(body)
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        last = status.get("lastRecovery") or {}
        if last.get("id"):
            entry = row(namespace, name, last["id"])
            entry.update(
                outcome=last.get("outcome"),
                startedAt=last.get("startedAt"),
                finishedAt=last.get("finishedAt"),
                durationSeconds=last.get("durationSeconds"),
                message=last.get("message", ""),
            )
        rec = status.get("recovery") or {}
        if rec.get("id"):
            entry = row(namespace, name, rec["id"])
            entry.update(outcome="InFlight", startedAt=rec.get("startedAt"), step=rec.get("step"))
            entry["deadline"] = rec.get("deadline")
    result = list(rows.values())
    for entry in result:
        if entry["durationSeconds"] is None and entry["startedAt"] and entry["finishedAt"]:
            started, finished = parse_time(entry["startedAt"]), parse_time(entry["finishedAt"])
            if started and finished:
                entry["durationSeconds"] = round((finished - started).total_seconds(), 1)
        entry["outcome"] = entry["outcome"] or "Unknown"
        entry["age"] = relative(entry["startedAt"], now)
    result.sort(key=lambda e: parse_time(e["startedAt"]) or datetime.min.replace(tzinfo=UTC), reverse=True)
    return result


def redact_object(body: dict[str, Any]) -> dict[str, Any]:
    """A copy fit for a bug report: env values, spec copies in annotations and managedFields removed."""
    copy: dict[str, Any] = {k: v for k, v in body.items()}
    meta = dict(_meta(body))
    meta.pop("managedFields", None)
    annotations = dict(meta.get("annotations") or {})
    for key in SPEC_COPY_ANNOTATIONS:
        if key in annotations:
            annotations[key] = REDACTED
    if annotations:
        meta["annotations"] = annotations
    copy["metadata"] = meta
    spec = dict(body.get("spec") or {})
    if isinstance(spec.get("env"), dict):
        spec["env"] = {key: REDACTED for key in spec["env"]}
    if spec:
        copy["spec"] = spec
    return copy
