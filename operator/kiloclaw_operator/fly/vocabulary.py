"""The operator's Fly vocabulary, in one place: machine and volume states and what they mean to us, the
metadata keys the operator writes on machines, and the volume-name rule. Nothing outside ``fly/`` spells a
Fly state or a metadata key.
"""

from __future__ import annotations

import hashlib

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
_NAME_DIGEST = 10


def _digest(sandbox_id: str) -> str:
    """A hash of the exact sandbox id (case and every character count)."""
    return hashlib.sha256(sandbox_id.encode()).hexdigest()[:_NAME_DIGEST]


def _volume_chars(text: str) -> str:
    return "".join(ch if ("a" <= ch <= "z" or "0" <= ch <= "9" or ch == "_") else "_" for ch in text.lower())


def volume_name(sandbox_id: str) -> str:
    """Fly volume name for a sandbox: ``kiloclaw_<first 10 of the sandbox id>_<hash of the whole id>``,
    lower-cased, ``[a-z0-9_]`` only, 30 characters at most (Fly's limit). The hash keeps sandboxes apart that
    the cut-down prefix would merge (``Alice-1`` and ``alice_1``, or two ids sharing their first characters).
    """
    return f"kiloclaw_{_volume_chars(sandbox_id)[:10]}_{_digest(sandbox_id)}"


def legacy_volume_name(sandbox_id: str) -> str:
    """The volume name before names carried a hash (``kiloclaw_<sandboxId>`` cut to 30): shared by sandboxes
    whose ids differ only in case, ``-``/``_`` or after their 21st character. Adopted only under the stricter
    rules of the reconciler and the recovery (see there)."""
    return _volume_chars(f"kiloclaw_{sandbox_id}")[:VOLUME_NAME_MAX]


def machine_name(sandbox_id: str) -> str:
    """Fly machine name for a sandbox: the sandbox id (its first 40 characters) and a hash of the whole id.
    Machines are never found by name (adoption needs our metadata and a mount of a recorded volume)."""
    return f"{sandbox_id[:40]}-{_digest(sandbox_id)}"
