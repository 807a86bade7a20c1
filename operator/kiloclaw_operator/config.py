"""Operator configuration from the environment (DESIGN section 6); the CLI mirrors these variables."""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
from typing import Annotated, Any

from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ConfigError(Exception):
    """Configuration that cannot start the operator; the message is one line naming the variable."""


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# A namespace name, or a kopf glob (``*``, ``?``), optionally negated with ``!``.
_NAMESPACE_GLOB = re.compile(r"^!?[a-z0-9*?]([-a-z0-9*?]{0,61}[a-z0-9*?])?$")


def namespace_patterns(value: object) -> object:
    """``KILOCLAW_NAMESPACES`` as kopf namespace patterns.

    Entries are names or globs; ``!glob`` excludes. Negations apply to every inclusive entry (kopf applies a
    negation only within one comma pattern, so each inclusive entry becomes ``"glob, !neg1, !neg2"``); with
    negations alone, every namespace but those is watched. ``tenants-*,!tenants-b*`` → all ``tenants-*``
    but shard B's; ``!tenants-b*`` → every namespace but shard B's. Empty → all namespaces. A value with
    commas but no entry (``' , '``) is an error, not "all"."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return []
    entries = [item.strip() for item in value.split(",")]
    if not any(entries):
        raise ValueError(f"no namespace in {value!r} (leave it empty to watch all namespaces)")
    if not all(entries):
        raise ValueError(f"empty entry in {value!r}")
    bad = [e for e in entries if not _NAMESPACE_GLOB.match(e)]
    if bad:
        raise ValueError(f"not namespace names or globs: {', '.join(bad)}")
    exclusions = [e for e in entries if e.startswith("!")]
    inclusions = [e for e in entries if not e.startswith("!")]
    if not exclusions:
        return inclusions
    if not inclusions:
        return [", ".join(exclusions)]
    return [", ".join([inclusion, *exclusions]) for inclusion in inclusions]


def namespace_matches(namespace: str, patterns: list[str]) -> bool:
    """Whether kopf, given ``patterns`` (as ``namespace_patterns`` makes them: ``"glob"``, ``"glob, !neg…"``
    or ``"!neg, …"``), watches ``namespace``; no patterns: every namespace. For what the operator lists
    cluster-wide itself, so that it acts only where kopf would."""
    if not patterns:
        return True
    for pattern in patterns:
        globs = [part.strip() for part in pattern.split(",") if part.strip()]
        inclusions = [glob for glob in globs if not glob.startswith("!")]
        exclusions = [glob[1:] for glob in globs if glob.startswith("!")]
        included = all(fnmatch.fnmatchcase(namespace, glob) for glob in inclusions[:1])
        if included and not any(fnmatch.fnmatchcase(namespace, glob) for glob in exclusions):
            return True
    return False


def _busy_cadence(data: dict[str, Any]) -> float:
    """The default of a delay that is the busy cadence unless set on its own."""
    return float(data.get("poll_busy_seconds", 5))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", populate_by_name=True
    )

    fly_api_token: str = Field(default="", validation_alias=AliasChoices("FLY_API_TOKEN"), repr=False)
    fly_api_token_file: str | None = Field(default=None, validation_alias=AliasChoices("FLY_API_TOKEN_FILE"))
    fly_api_base_url: str = Field(
        default="https://api.machines.dev", validation_alias=AliasChoices("FLY_API_BASE_URL")
    )
    fly_org_slug: str | None = Field(default=None, validation_alias=AliasChoices("FLY_ORG_SLUG"))
    default_regions: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["iad", "ord", "cdg"],
        validation_alias=AliasChoices("KILOCLAW_DEFAULT_REGIONS"),
        min_length=1,
    )
    recovery_timeout_seconds: float = Field(
        default=600, gt=0, le=86400, validation_alias=AliasChoices("KILOCLAW_RECOVERY_TIMEOUT_SECONDS")
    )
    retention_seconds: float = Field(
        default=604800, ge=0, le=31536000, validation_alias=AliasChoices("KILOCLAW_RETENTION_SECONDS")
    )
    poll_running_seconds: float = Field(
        default=60, gt=0, le=3600, validation_alias=AliasChoices("KILOCLAW_POLL_RUNNING_SECONDS")
    )
    poll_busy_seconds: float = Field(
        default=5, gt=0, le=300, validation_alias=AliasChoices("KILOCLAW_POLL_BUSY_SECONDS")
    )
    poll_idle_seconds: float = Field(
        default=300, gt=0, le=86400, validation_alias=AliasChoices("KILOCLAW_POLL_IDLE_SECONDS")
    )
    retained_check_seconds: float = Field(
        default=60, gt=0, le=3600, validation_alias=AliasChoices("KILOCLAW_RETAINED_CHECK_SECONDS")
    )
    retry_backoff_min_seconds: float = Field(
        default=30, gt=0, le=3600, validation_alias=AliasChoices("KILOCLAW_RETRY_BACKOFF_MIN_SECONDS")
    )
    retry_backoff_max_seconds: float = Field(
        default=3600, gt=0, le=86400, validation_alias=AliasChoices("KILOCLAW_RETRY_BACKOFF_MAX_SECONDS")
    )
    wait_call_seconds: int = Field(
        default=60, gt=0, le=60, validation_alias=AliasChoices("KILOCLAW_WAIT_CALL_SECONDS")
    )
    # One setting, one meaning. These three default to the busy cadence (KILOCLAW_POLL_BUSY_SECONDS), as they
    # did when that setting doubled as each of them.
    #: First delay after an instance's failed pass; it doubles per failure, capped at the backoff maximum.
    failure_backoff_base_seconds: float = Field(
        default_factory=_busy_cadence,
        gt=0,
        le=300,
        validation_alias=AliasChoices("KILOCLAW_FAILURE_BACKOFF_BASE_SECONDS"),
    )
    #: How soon a driver looks again when it may not act: no body known yet, or the finalizer owns the object.
    recheck_seconds: float = Field(
        default_factory=_busy_cadence, gt=0, le=300, validation_alias=AliasChoices("KILOCLAW_RECHECK_SECONDS")
    )
    #: How soon a recovery retries creating the retained volume of its old volume after Kubernetes refused.
    retained_create_retry_seconds: float = Field(
        default_factory=_busy_cadence,
        gt=0,
        le=300,
        validation_alias=AliasChoices("KILOCLAW_RETAINED_CREATE_RETRY_SECONDS"),
    )
    #: How long a new retained volume may lack the provenance the operator writes right after creating it
    #: before it is reported Blocked (NotMintedByOperator); nothing on Fly is touched either way.
    retained_provenance_grace_seconds: float = Field(
        default=30, ge=0, le=3600, validation_alias=AliasChoices("KILOCLAW_RETAINED_PROVENANCE_GRACE_SECONDS")
    )
    #: Where the claims on a (flyApp, sandboxId) live (one Lease each, ownership.py): one namespace for every
    #: shard and replica, so a claim holds cluster-wide. Empty: the Lease namespace of the leader election.
    claims_namespace: str = Field(default="", validation_alias=AliasChoices("KILOCLAW_CLAIMS_NAMESPACE"))
    # The organisation feed (with FLY_ORG_SLUG): sweep cadence, window overlap (Fly's changes propagate
    # late), page size, when a silent feed counts as failed, the busy-phase fallback read, the safety audit.
    feed_interval_seconds: float = Field(
        default=2, gt=0, validation_alias=AliasChoices("KILOCLAW_FEED_INTERVAL_SECONDS")
    )
    feed_overlap_seconds: float = Field(
        default=10, ge=0, validation_alias=AliasChoices("KILOCLAW_FEED_OVERLAP_SECONDS")
    )
    feed_page_limit: int = Field(
        default=1000, ge=1, le=1000, validation_alias=AliasChoices("KILOCLAW_FEED_PAGE_LIMIT")
    )
    feed_stale_seconds: float = Field(
        default=60, gt=0, validation_alias=AliasChoices("KILOCLAW_FEED_STALE_SECONDS")
    )
    feed_busy_fallback_seconds: float = Field(
        default=30, gt=0, validation_alias=AliasChoices("KILOCLAW_FEED_BUSY_FALLBACK_SECONDS")
    )
    feed_fallback_concurrency: int = Field(
        default=16, ge=1, validation_alias=AliasChoices("KILOCLAW_FEED_FALLBACK_CONCURRENCY")
    )
    audit_seconds: float = Field(default=1800, gt=0, validation_alias=AliasChoices("KILOCLAW_AUDIT_SECONDS"))
    # How far back the first sweep after a start may reach (an instance observed earlier is read instead).
    feed_first_window_seconds: float = Field(
        default=86400, gt=0, validation_alias=AliasChoices("KILOCLAW_FEED_FIRST_WINDOW_SECONDS")
    )
    # After a machine create, how long the driver waits (no Fly call) for the feed to report it started, so
    # that its id and Running go into one status write (0: never wait; polling mode never waits). Generous:
    # Running comes from the same news either way, and a burst of creates delays the feed by seconds.
    start_settle_seconds: float = Field(
        default=10, ge=0, le=60, validation_alias=AliasChoices("KILOCLAW_START_SETTLE_SECONDS")
    )
    # Client-side pacing under Fly's rate limits (per machine and action; creates in flight).
    fly_action_rate: float = Field(
        default=0.9, gt=0, validation_alias=AliasChoices("KILOCLAW_FLY_ACTION_RATE")
    )
    fly_action_burst: int = Field(default=2, ge=1, validation_alias=AliasChoices("KILOCLAW_FLY_ACTION_BURST"))
    fly_read_rate: float = Field(default=4.5, gt=0, validation_alias=AliasChoices("KILOCLAW_FLY_READ_RATE"))
    fly_read_burst: int = Field(default=8, ge=1, validation_alias=AliasChoices("KILOCLAW_FLY_READ_BURST"))
    fly_max_concurrent_creates: int = Field(
        default=32, ge=1, validation_alias=AliasChoices("KILOCLAW_FLY_MAX_CONCURRENT_CREATES")
    )
    # Passes that provision (an instance in Pending or Provisioning) at once; the others wait before they read
    # their instance, holding nothing (at 10,000 new instances, thousands of passes queued at the clients'
    # limits, each with its models and requests, made most of the operator's peak memory).
    provisioning_concurrency: int = Field(
        default=128, ge=1, validation_alias=AliasChoices("KILOCLAW_PROVISIONING_CONCURRENCY")
    )
    # Passes over settled instances (Running, Stopped, Failed) at once; a pass asked for by news goes first
    # (driving.PassGate). A stop's handling leaves the bound as it begins.
    pass_concurrency: int = Field(
        default=128, ge=1, validation_alias=AliasChoices("KILOCLAW_PASS_CONCURRENCY")
    )
    # Objects per page of kopf's initial listing (a new leader lists every instance): one page of bodies,
    # managedFields and all, is in memory at once instead of the whole fleet's.
    list_chunk_size: int = Field(
        default=250, ge=1, le=100000, validation_alias=AliasChoices("KILOCLAW_LIST_CHUNK_SIZE")
    )
    # The Fly that really exists (DESIGN 3.9). A stop whose exit Fly marks as requested (a stop the operator
    # did not send: Fly's own graceful stop, e.g. a platform migration) gets this long to come back started
    # before a recovery begins; an instance waiting for its source (host down, no acceptable snapshot)
    # looks again this often.
    migration_grace_seconds: float = Field(
        default=30, ge=0, le=600, validation_alias=AliasChoices("KILOCLAW_MIGRATION_GRACE_SECONDS")
    )
    source_recheck_seconds: float = Field(
        default=60, gt=0, le=3600, validation_alias=AliasChoices("KILOCLAW_SOURCE_RECHECK_SECONDS")
    )
    # Every Fly call's total deadline (connect, send, headers and the whole body; a wait call gets its own
    # timeout on top) and the largest body read.
    fly_call_deadline_seconds: float = Field(
        default=45, gt=0, le=600, validation_alias=AliasChoices("KILOCLAW_FLY_CALL_DEADLINE_SECONDS")
    )
    fly_max_body_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, validation_alias=AliasChoices("KILOCLAW_FLY_MAX_BODY_BYTES")
    )
    # Mass failure (recovery budget and brake, README "Mass failure"): recoveries in flight at once and
    # begun per second; the brake counts confirmed unexpected stops in a sliding window: above the confirm
    # threshold each stop is re-read one more time before any destructive call, above the pause threshold
    # (a number, or a share of the instances this operator knows) new recoveries pause until re-armed.
    recovery_concurrency: int = Field(
        default=32, ge=1, le=10000, validation_alias=AliasChoices("KILOCLAW_RECOVERY_CONCURRENCY")
    )
    recovery_begin_rate: float = Field(
        default=20, gt=0, validation_alias=AliasChoices("KILOCLAW_RECOVERY_BEGIN_RATE")
    )
    # Recoveries that may begin at once before the rate paces them (a token bucket): a host's worth of
    # stopped machines begins within a second, a region's worth is paced (and braked).
    recovery_begin_burst: int = Field(
        default=32, ge=1, le=10000, validation_alias=AliasChoices("KILOCLAW_RECOVERY_BEGIN_BURST")
    )
    brake_window_seconds: float = Field(
        default=300, gt=0, le=86400, validation_alias=AliasChoices("KILOCLAW_BRAKE_WINDOW_SECONDS")
    )
    brake_pause_stops: int = Field(
        default=200, ge=1, validation_alias=AliasChoices("KILOCLAW_BRAKE_PAUSE_STOPS")
    )
    brake_pause_share: float = Field(
        default=0.2, gt=0, le=1, validation_alias=AliasChoices("KILOCLAW_BRAKE_PAUSE_SHARE")
    )
    brake_min_instances: int = Field(
        default=50, ge=1, validation_alias=AliasChoices("KILOCLAW_BRAKE_MIN_INSTANCES")
    )
    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("KILOCLAW_NAMESPACES")
    )
    metrics_port: int = Field(
        default=9090, ge=0, le=65535, validation_alias=AliasChoices("KILOCLAW_METRICS_PORT")
    )
    health_port: int = Field(
        default=8080, ge=0, le=65535, validation_alias=AliasChoices("KILOCLAW_HEALTH_PORT")
    )

    # Two replicas, one active (leadership.py): a coordination.k8s.io Lease in the operator's namespace.
    leader_election: bool = Field(default=True, validation_alias=AliasChoices("KILOCLAW_LEADER_ELECTION"))
    lease_name: str = Field(
        default="kiloclaw-operator",
        pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$",
        validation_alias=AliasChoices("KILOCLAW_LEASE_NAME"),
    )
    lease_namespace: str = Field(default="", validation_alias=AliasChoices("KILOCLAW_LEASE_NAMESPACE"))
    lease_identity: str = Field(default="", validation_alias=AliasChoices("KILOCLAW_LEASE_IDENTITY"))
    lease_duration_seconds: int = Field(
        default=8, ge=1, validation_alias=AliasChoices("KILOCLAW_LEASE_DURATION_SECONDS")
    )
    lease_renew_deadline_seconds: float = Field(
        default=5, gt=0, validation_alias=AliasChoices("KILOCLAW_LEASE_RENEW_DEADLINE_SECONDS")
    )
    lease_retry_period_seconds: float = Field(
        default=1, gt=0, validation_alias=AliasChoices("KILOCLAW_LEASE_RETRY_PERIOD_SECONDS")
    )
    # The Lease is renewed from a thread of its own; it stops renewing for an event loop that has not run for
    # this long (really stopped, not merely busy), so that a hung leader still hands over.
    loop_stall_seconds: float = Field(
        default=15, gt=0, validation_alias=AliasChoices("KILOCLAW_LOOP_STALL_SECONDS")
    )

    _split_regions = field_validator("default_regions", mode="before")(_split_csv)
    _namespace_patterns = field_validator("namespaces", mode="before")(namespace_patterns)

    @model_validator(mode="after")
    def _backoff_min_not_above_max(self) -> Settings:
        if self.retry_backoff_min_seconds > self.retry_backoff_max_seconds:
            raise ValueError(
                f"retry_backoff_min_seconds: {self.retry_backoff_min_seconds:g} is above "
                f"KILOCLAW_RETRY_BACKOFF_MAX_SECONDS ({self.retry_backoff_max_seconds:g})"
            )
        return self

    @field_validator("default_regions")
    @classmethod
    def _regions_are_fly_codes(cls, regions: list[str]) -> list[str]:
        bad = [r for r in regions if not (len(r) == 3 and r.isascii() and r.isalpha() and r.islower())]
        if bad:
            raise ValueError(f"not Fly region codes (three lower-case letters): {', '.join(bad)}")
        return regions

    @field_validator("lease_renew_deadline_seconds")
    @classmethod
    def _renew_deadline_within_lease(cls, deadline: float, info: ValidationInfo) -> float:
        # A leader that cannot renew must stop acting before a standby may take the lease over.
        duration = info.data.get("lease_duration_seconds")
        if duration is not None and deadline >= duration:
            raise ValueError("must be shorter than KILOCLAW_LEASE_DURATION_SECONDS")
        return deadline

    @field_validator("lease_retry_period_seconds")
    @classmethod
    def _retry_within_renew_deadline(cls, period: float, info: ValidationInfo) -> float:
        deadline = info.data.get("lease_renew_deadline_seconds")
        if deadline is not None and period >= deadline:
            raise ValueError("must be shorter than KILOCLAW_LEASE_RENEW_DEADLINE_SECONDS")
        return period

    @field_validator("fly_org_slug", "fly_api_token_file")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("fly_api_base_url")
    @classmethod
    def _base_url_is_http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url.rstrip("/")


_ENV_NAMES = {
    name: (field.validation_alias.choices[0] if isinstance(field.validation_alias, AliasChoices) else name)
    for name, field in Settings.model_fields.items()
}


def misspelled_variables(environ: dict[str, str] | os._Environ[str] | None = None) -> list[tuple[str, str]]:
    """(variable, the setting it is probably meant to be) for set variables that look like a typo of one of
    ours: silently ignoring ``KILOCLAW_POLL_RUNING_SECONDS`` would run with the default instead."""
    known = {str(name) for name in _ENV_NAMES.values()}
    found = []
    for name in sorted(environ if environ is not None else os.environ):
        upper = name.upper()
        if upper in known or not upper.startswith(("KILOCLAW_", "FLY_")):
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.9)
        if close:
            found.append((name, str(close[0])))
    return found


def load_settings(*, require_token: bool = True, **overrides: object) -> Settings:
    """Read the settings; any invalid value raises ConfigError naming the variable in one line."""
    typos = misspelled_variables()
    if typos:
        name, meant = typos[0]
        raise ConfigError(f"invalid configuration: {name}: unknown variable (did you mean {meant}?)")
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        message = str(first["msg"]).removeprefix("Value error, ")
        if not field and ": " in message:  # a model-level rule names its field first
            field, message = message.split(": ", 1)
        variable = _ENV_NAMES.get(field, field or "?")
        raise ConfigError(f"invalid configuration: {variable}: {message}") from None
    if settings.fly_api_token_file:
        try:
            with open(settings.fly_api_token_file, encoding="utf-8") as handle:
                from_file = handle.read().strip()
        except OSError as exc:
            raise ConfigError(
                f"invalid configuration: FLY_API_TOKEN_FILE: cannot read {settings.fly_api_token_file}: "
                f"{exc.strerror or exc}"
            ) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"invalid configuration: FLY_API_TOKEN_FILE: {settings.fly_api_token_file} is not UTF-8 text "
                f"(byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); it must hold the token only"
            ) from None
        if require_token and not from_file:
            raise ConfigError(
                f"invalid configuration: FLY_API_TOKEN_FILE: {settings.fly_api_token_file} is empty"
            )
    elif require_token and not settings.fly_api_token:
        raise ConfigError(
            "invalid configuration: FLY_API_TOKEN: required (the Fly Machines API token; "
            "or FLY_API_TOKEN_FILE, a file holding it)"
        )
    return settings
