"""Operator configuration from the environment (DESIGN section 6); the CLI mirrors these variables."""

from __future__ import annotations

from typing import Annotated

from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REGION_PATTERN = r"^[a-z]{3}$"


class ConfigError(Exception):
    """Configuration that cannot start the operator; the message is one line naming the variable."""


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


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
        default=600, gt=0, validation_alias=AliasChoices("KILOCLAW_RECOVERY_TIMEOUT_SECONDS")
    )
    retention_seconds: float = Field(
        default=604800, ge=0, validation_alias=AliasChoices("KILOCLAW_RETENTION_SECONDS")
    )
    poll_running_seconds: float = Field(
        default=60, gt=0, validation_alias=AliasChoices("KILOCLAW_POLL_RUNNING_SECONDS")
    )
    poll_busy_seconds: float = Field(
        default=5, gt=0, validation_alias=AliasChoices("KILOCLAW_POLL_BUSY_SECONDS")
    )
    poll_idle_seconds: float = Field(
        default=300, gt=0, validation_alias=AliasChoices("KILOCLAW_POLL_IDLE_SECONDS")
    )
    retained_check_seconds: float = Field(
        default=60, gt=0, validation_alias=AliasChoices("KILOCLAW_RETAINED_CHECK_SECONDS")
    )
    retry_backoff_min_seconds: float = Field(
        default=30, gt=0, validation_alias=AliasChoices("KILOCLAW_RETRY_BACKOFF_MIN_SECONDS")
    )
    retry_backoff_max_seconds: float = Field(
        default=3600, gt=0, validation_alias=AliasChoices("KILOCLAW_RETRY_BACKOFF_MAX_SECONDS")
    )
    wait_call_seconds: int = Field(
        default=60, gt=0, le=60, validation_alias=AliasChoices("KILOCLAW_WAIT_CALL_SECONDS")
    )
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

    _split_regions = field_validator("default_regions", "namespaces", mode="before")(_split_csv)

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


def load_settings(*, require_token: bool = True, **overrides: object) -> Settings:
    """Read the settings; any invalid value raises ConfigError naming the variable in one line."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        variable = _ENV_NAMES.get(field, field)
        raise ConfigError(f"invalid configuration: {variable}: {first['msg']}") from None
    if settings.fly_api_token_file:
        try:
            with open(settings.fly_api_token_file, encoding="utf-8") as handle:
                from_file = handle.read().strip()
        except OSError as exc:
            raise ConfigError(
                f"invalid configuration: FLY_API_TOKEN_FILE: cannot read {settings.fly_api_token_file}: "
                f"{exc.strerror or exc}"
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
