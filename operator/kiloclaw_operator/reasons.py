"""Every reason the operator writes: of its conditions (Ready, Reconciling, Stalled) and of its Events, on
instances and retained volumes. One vocabulary for the operator, the ``kubectl kiloclaw`` plugin and the
README's table (``tests/unit/test_reasons.py`` checks that the table is this module and that the code writes
no other reason: conditions and Events take a :class:`Reason`, so mypy refuses a bare string). Each member
carries where it appears and a one-line meaning. A phase is a reason too (Ready=False and Reconciling=True say
which phase the instance is in): :func:`of_phase`."""

from __future__ import annotations

from enum import Flag, StrEnum, auto

from .models import Phase


class Seen(Flag):
    """Where a reason appears (for the README's table)."""

    CONDITION = auto()  # reason of an instance's Ready / Reconciling / Stalled condition
    EVENT = auto()  # reason of an Event on an instance
    RETAINED = auto()  # reason of a retained volume's condition or Event, or its spec.reason

    def describe(self) -> str:
        parts = {Seen.CONDITION: "condition", Seen.EVENT: "Event", Seen.RETAINED: "retained volume"}
        return ", ".join(text for flag, text in parts.items() if flag in self)


class Reason(StrEnum):
    seen: Seen
    meaning: str

    def __new__(cls, value: str, seen: Seen, meaning: str) -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.seen = seen
        member.meaning = meaning
        return member

    # --- instance: Ready and Reconciling, derived from the phase (conditions.summarize) ---------------------
    PENDING = "Pending", Seen.CONDITION, "phase Pending: accepted, nothing created on Fly yet"
    PROVISIONING = "Provisioning", Seen.CONDITION, "phase Provisioning: creating the volume and the machine"
    STARTING = "Starting", Seen.CONDITION, "phase Starting: the machine is starting"
    RUNNING = (
        "Running",
        Seen.CONDITION,
        "Ready=True: the machine is started (Ready=False: started by phase only)",
    )
    STOPPING = "Stopping", Seen.CONDITION, "phase Stopping: the machine is stopping as the spec asks"
    STOPPED = (
        "Stopped",
        Seen.CONDITION,
        "Ready=True: stopped as the spec asks (Ready=False: stopped, not asked)",
    )
    RECOVERING = "Recovering", Seen.CONDITION, "phase Recovering: an unexpected-stop recovery is under way"
    DESTROYING = "Destroying", Seen.CONDITION, "phase Destroying: the instance is being deleted"
    FAILED = "Failed", Seen.CONDITION, "phase Failed"
    PROGRESSING = (
        "Progressing",
        Seen.CONDITION,
        "Reconciling=True: a spec generation not yet acted on; Stalled=False",
    )
    SETTLED = "Settled", Seen.CONDITION, "Reconciling=False: the spec is acted on and the phase settled"
    STALLED = "Stalled", Seen.CONDITION, "Reconciling=False: held by a Stalled=True condition"
    BUSY = "Busy", Seen.CONDITION, "Reconciling=True: a spec change waits until the busy phase settles"

    # --- instance: Stalled=True (those seen as Events: with a Warning Event of the same reason) -----------
    RECOVERY_FAILED = (
        "RecoveryFailed",
        Seen.CONDITION | Seen.EVENT,
        "a recovery failed, the source volume untouched (held until a spec change or the retry annotation)",
    )
    INVALID_SPEC = "InvalidSpec", Seen.CONDITION, "Fly rejected the spec (held until the spec changes)"
    FLY_UNAUTHORIZED = (
        "FlyUnauthorized",
        Seen.CONDITION | Seen.RETAINED,
        "Fly refused the operator's token (retried with backoff)",
    )
    DUPLICATE_SANDBOX = (
        "DuplicateSandbox",
        Seen.CONDITION | Seen.EVENT,
        "another instance owns this sandbox id: refused before any Fly call",
    )
    HOST_UNAVAILABLE = (
        "HostUnavailable",
        Seen.CONDITION | Seen.EVENT,
        "the machine's host is unreachable and recovery is disabled",
    )
    APP_NOT_FOUND = "AppNotFound", Seen.CONDITION | Seen.EVENT, "spec.flyApp does not exist in Fly"
    APP_NOT_ALLOWED = (
        "AppNotAllowed",
        Seen.CONDITION | Seen.EVENT,
        "the namespace's binding does not allow spec.flyApp: refused before any Fly call",
    )
    IMAGE_NOT_ALLOWED = (
        "ImageNotAllowed",
        Seen.CONDITION | Seen.EVENT,
        "the namespace's binding does not allow spec.image's repository: refused before any Fly call",
    )
    MACHINE_FAILED = (
        "MachineFailed",
        Seen.CONDITION | Seen.EVENT,
        "Fly says the machine failed (held until the retry annotation or a spec change)",
    )
    START_FAILED = (
        "StartFailed",
        Seen.CONDITION | Seen.EVENT,
        "the machine did not reach started (held until the retry annotation or a spec change)",
    )
    RECOVERY_DISABLED = (
        "RecoveryDisabled",
        Seen.CONDITION | Seen.EVENT,
        "the machine stopped unexpectedly and spec.recovery.enabled is false",
    )
    MACHINE_NOT_OWNED = (
        "MachineNotOwned",
        Seen.CONDITION | Seen.EVENT,
        "deletion waits: the recorded machine does not prove to be this instance's, nothing is destroyed",
    )
    WAITING_FOR_SOURCE = (
        "WaitingForSource",
        Seen.CONDITION | Seen.EVENT,
        "no recovery source yet (host down, no snapshot the policy accepts): not held, keeps looking",
    )
    RECOVERY_PAUSED = (
        "RecoveryPaused",
        Seen.CONDITION | Seen.EVENT,
        "the mass-failure brake paused new recoveries: not held, proceeds once re-armed",
    )

    # --- instance: Events only ------------------------------------------------------------------------------
    RECOVERY_STARTED = "RecoveryStarted", Seen.EVENT, "the machine stopped unexpectedly; a recovery begins"
    RECOVERY_SUCCEEDED = (
        "RecoverySucceeded",
        Seen.EVENT,
        "the sandbox runs on a replacement machine and volume",
    )
    RETAINED_VOLUME_CREATED = (
        "RetainedVolumeCreated",
        Seen.EVENT,
        "a recovery kept the old volume as a KiloClawRetainedVolume",
    )
    ACTION_DEFERRED = (
        "ActionDeferred",
        Seen.EVENT,
        "a spec change waits for the busy phase to settle (once per generation)",
    )
    MACHINE_RECREATED = (
        "MachineRecreated",
        Seen.EVENT,
        "the machine was destroyed outside the operator: a new one",
    )
    MACHINE_MIGRATED = (
        "MachineMigrated",
        Seen.EVENT,
        "Fly moved the machine to another volume or region: the status follows, no recovery",
    )

    # --- retained volumes -----------------------------------------------------------------------------------
    UNEXPECTED_STOP_RECOVERY = (
        "UnexpectedStopRecovery",
        Seen.RETAINED,
        "spec.reason: kept by an unexpected-stop recovery",
    )
    RETAINED = "Retained", Seen.RETAINED, "Ready=True: the volume exists and is kept until spec.retainUntil"
    VOLUME_NOT_FOUND = (
        "VolumeNotFound",
        Seen.CONDITION | Seen.EVENT | Seen.RETAINED,
        "the volume no longer exists in Fly: an instance's status.volumeId deleted outside the operator is "
        "Failed, nothing created in its place (held until the retry annotation or a spec change); a retained "
        "volume's Ready=False",
    )
    DELETING = "Deleting", Seen.RETAINED, "the volume's delete is under way"
    VOLUME_DELETED = "VolumeDeleted", Seen.RETAINED, "the volume is deleted in Fly; the resource goes next"
    DELETE_FAILED = "DeleteFailed", Seen.RETAINED, "a delete attempt failed; retried with backoff"
    OWNERSHIP_MISMATCH = (
        "OwnershipMismatch",
        Seen.RETAINED,
        "the volume does not match what the resource recorded: Blocked, never deleted",
    )
    VOLUME_IN_USE = (
        "VolumeInUse",
        Seen.RETAINED,
        "an instance still uses the volume: Blocked until it lets go",
    )
    FLY_REJECTED = "FlyRejected", Seen.RETAINED, "Fly refused the delete for good; a person must act"
    NOT_MINTED_BY_OPERATOR = (
        "NotMintedByOperator",
        Seen.RETAINED,
        "the resource was not created by the operator: Blocked, its volume is never deleted",
    )
    RETAINED_VOLUME_DELETED = "RetainedVolumeDeleted", Seen.RETAINED, "Event: the retained volume was deleted"
    RETAINED_VOLUME_DELETE_BLOCKED = (
        "RetainedVolumeDeleteBlocked",
        Seen.RETAINED,
        "Event: a safety check refused the delete (the message says which)",
    )


#: Stalled, but not held: the instance keeps looking and proceeds by itself.
WAITING = frozenset({Reason.WAITING_FOR_SOURCE, Reason.RECOVERY_PAUSED})
#: Stalls that refuse the instance before any Fly call.
REFUSALS = frozenset({Reason.DUPLICATE_SANDBOX, Reason.APP_NOT_ALLOWED, Reason.IMAGE_NOT_ALLOWED})
#: The Events that tell a recovery's story (the plugin's ``recoveries`` reads them).
RECOVERY_EVENTS = (Reason.RECOVERY_STARTED, Reason.RECOVERY_SUCCEEDED, Reason.RECOVERY_FAILED)


_BY_VALUE = {reason.value: reason for reason in Reason}


def of_phase(phase: Phase) -> Reason:
    """The reason that names ``phase`` (Ready=False, Reconciling=True)."""
    return _BY_VALUE[phase.value]


def markdown_table() -> str:
    """The README's table of reasons, generated from this module."""
    rows = ["| reason | where | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{reason.value}` | {reason.seen.describe()} | {reason.meaning} |" for reason in Reason]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
