"""The operator's Fly vocabulary, in one place: machine and volume states and what they mean to us, the
metadata keys the operator writes on machines, and the volume-name rule. Nothing outside ``fly/`` spells a
Fly state or a metadata key.
"""

from __future__ import annotations

# --- machine states (`Machine.state`) -----------------------------------------------------------------------

CREATED = "created"
STARTING = "starting"
STARTED = "started"
STOPPING = "stopping"
STOPPED = "stopped"
SUSPENDING = "suspending"
SUSPENDED = "suspended"
FAILED = "failed"
REPLACING = "replacing"
UPDATING = "updating"
LAUNCH_FAILED = "launch_failed"
DESTROYING = "destroying"
DESTROYED = "destroyed"

#: Machine states that are on their way somewhere; they never trigger anything by themselves.
TRANSIENT_MACHINE_STATES = frozenset(
    {CREATED, STARTING, STOPPING, REPLACING, DESTROYING, UPDATING, LAUNCH_FAILED, SUSPENDING}
)

#: A machine Fly is getting rid of, or has got rid of: never adopted, never counted as someone's live machine.
GONE_MACHINE_STATES = frozenset({DESTROYING, DESTROYED})

# --- volume states (`Volume.state`) -------------------------------------------------------------------------

VOLUME_PENDING_DESTROY = "pending_destroy"

#: A volume Fly is getting rid of, or has got rid of: nothing is retained or adopted any more.
GONE_VOLUME_STATES = frozenset({DESTROYED, DESTROYING, VOLUME_PENDING_DESTROY})

# --- hosts (`host_status` on machines and volumes) ---------------------------------------------------------

HOST_OK = "ok"
HOST_UNKNOWN = "unknown"
HOST_UNREACHABLE = "unreachable"

# --- machine events -----------------------------------------------------------------------------------------

EVENT_EXIT = "exit"

# --- metadata keys the operator writes on its machines ------------------------------------------------------

METADATA_USER_ID = "kiloclaw_user_id"
METADATA_SANDBOX_ID = "kiloclaw_sandbox_id"
METADATA_RECOVERY_ID = "kiloclaw_recovery_id"

# --- names --------------------------------------------------------------------------------------------------

VOLUME_NAME_MAX = 30


def volume_name(sandbox_id: str) -> str:
    """Fly volume name for a sandbox: ``kiloclaw_<sandboxId>``, lower-cased, [a-z0-9_] only, ≤ 30 chars."""
    raw = f"kiloclaw_{sandbox_id}".lower()
    name = "".join(ch if ("a" <= ch <= "z" or "0" <= ch <= "9" or ch == "_") else "_" for ch in raw)
    return name[:VOLUME_NAME_MAX]
