"""The Fly Machines API: typed async client, payload models and the one error taxonomy."""

from .client import FlyClient, backoff_delay, parse_retry_after, set_log_context
from .errors import (
    AppNotFound,
    Capacity,
    Fatal,
    FlyError,
    HostUnavailable,
    NotFound,
    NotLeading,
    RateLimited,
    Transient,
    Unauthorized,
    classify,
)
from .models import (
    Guest,
    Machine,
    MachineConfig,
    MachineEvent,
    MachineSummaryConfig,
    Mount,
    OrgMachine,
    OrgMachinesPage,
    RestartPolicy,
    Snapshot,
    Volume,
)
from .pacing import Pacer, PacingLimits
from .vocabulary import volume_name

__all__ = [
    "AppNotFound",
    "Capacity",
    "Fatal",
    "FlyClient",
    "FlyError",
    "Guest",
    "HostUnavailable",
    "Machine",
    "MachineConfig",
    "MachineEvent",
    "MachineSummaryConfig",
    "Mount",
    "NotFound",
    "NotLeading",
    "OrgMachine",
    "OrgMachinesPage",
    "Pacer",
    "PacingLimits",
    "RateLimited",
    "RestartPolicy",
    "Snapshot",
    "Transient",
    "Unauthorized",
    "Volume",
    "backoff_delay",
    "classify",
    "parse_retry_after",
    "set_log_context",
    "volume_name",
]
