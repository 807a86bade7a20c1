"""Operator configuration (DESIGN section 6): documented defaults, and an invalid value stops start-up with
one line naming the variable — from ``load_settings`` and from the ``kiloclaw-operator run`` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiloclaw_operator.config import ConfigError, Settings, load_settings, namespace_matches

VARIABLES = (
    "FLY_API_TOKEN",
    "FLY_API_TOKEN_FILE",
    "FLY_API_BASE_URL",
    "FLY_ORG_SLUG",
    "KILOCLAW_DEFAULT_REGIONS",
    "KILOCLAW_RECOVERY_TIMEOUT_SECONDS",
    "KILOCLAW_RETENTION_SECONDS",
    "KILOCLAW_POLL_RUNNING_SECONDS",
    "KILOCLAW_POLL_BUSY_SECONDS",
    "KILOCLAW_POLL_IDLE_SECONDS",
    "KILOCLAW_NAMESPACES",
    "KILOCLAW_METRICS_PORT",
    "KILOCLAW_HEALTH_PORT",
    "KILOCLAW_RETAINED_CHECK_SECONDS",
    "KILOCLAW_RETRY_BACKOFF_MIN_SECONDS",
    "KILOCLAW_RETRY_BACKOFF_MAX_SECONDS",
    "KILOCLAW_WAIT_CALL_SECONDS",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def test_defaults_are_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLY_API_TOKEN", "fo1_secret")
    settings = load_settings()
    assert settings.fly_api_token == "fo1_secret"
    assert settings.fly_api_base_url == "https://api.machines.dev"
    assert settings.fly_org_slug is None
    assert settings.default_regions == ["iad", "ord", "cdg"]
    assert settings.recovery_timeout_seconds == 600
    assert settings.retention_seconds == 604800
    assert settings.poll_running_seconds == 60
    assert settings.poll_busy_seconds == 5
    assert settings.poll_idle_seconds == 300
    assert settings.namespaces == []
    assert settings.metrics_port == 9090
    assert settings.health_port == 8080
    assert settings.retained_check_seconds == 60


def test_every_variable_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "FLY_API_TOKEN": "t",
        "FLY_API_BASE_URL": "http://127.0.0.1:4280/",
        "FLY_ORG_SLUG": "kilo",
        "KILOCLAW_DEFAULT_REGIONS": " ams , fra",
        "KILOCLAW_RECOVERY_TIMEOUT_SECONDS": "120",
        "KILOCLAW_RETENTION_SECONDS": "0",
        "KILOCLAW_POLL_RUNNING_SECONDS": "30",
        "KILOCLAW_POLL_BUSY_SECONDS": "0.5",
        "KILOCLAW_POLL_IDLE_SECONDS": "600",
        "KILOCLAW_NAMESPACES": "tenants,staging",
        "KILOCLAW_METRICS_PORT": "9100",
        "KILOCLAW_HEALTH_PORT": "8081",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.fly_api_base_url == "http://127.0.0.1:4280"
    assert settings.fly_org_slug == "kilo"
    assert settings.default_regions == ["ams", "fra"]
    assert settings.recovery_timeout_seconds == 120
    assert settings.retention_seconds == 0
    assert (settings.poll_running_seconds, settings.poll_busy_seconds, settings.poll_idle_seconds) == (
        30,
        0.5,
        600,
    )
    assert settings.namespaces == ["tenants", "staging"]
    assert (settings.metrics_port, settings.health_port) == (9100, 8081)


def test_blank_org_slug_means_no_org_feed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLY_ORG_SLUG", "")
    assert load_settings(require_token=False).fly_org_slug is None


def test_token_is_not_shown_in_the_settings_repr() -> None:
    assert "fo1_secret" not in repr(Settings(fly_api_token="fo1_secret"))


def test_missing_token_is_a_configuration_error_outside_dev() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "FLY_API_TOKEN" in str(caught.value)
    assert load_settings(require_token=False).fly_api_token == ""


def test_a_token_file_replaces_the_token_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("fo1_from_a_secret\n")
    monkeypatch.setenv("FLY_API_TOKEN_FILE", str(token))
    assert load_settings().fly_api_token_file == str(token)


def test_an_unreadable_or_empty_token_file_is_one_line_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLY_API_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith("invalid configuration: FLY_API_TOKEN_FILE: cannot read")
    (tmp_path / "empty").write_text("")
    monkeypatch.setenv("FLY_API_TOKEN_FILE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "FLY_API_TOKEN_FILE" in str(caught.value) and "\n" not in str(caught.value)


def test_a_token_file_that_is_not_utf8_is_one_line_naming_the_file_and_the_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_bytes(b"fo1_\xff\xfe")
    monkeypatch.setenv("FLY_API_TOKEN_FILE", str(token))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == (
        f"invalid configuration: FLY_API_TOKEN_FILE: {token} is not UTF-8 text (byte 0xff at offset 4); "
        "it must hold the token only"
    )


INVALID = [
    ("FLY_API_BASE_URL", "api.machines.dev"),
    ("KILOCLAW_DEFAULT_REGIONS", "IAD,ord"),
    ("KILOCLAW_DEFAULT_REGIONS", "iad,chicago"),
    ("KILOCLAW_DEFAULT_REGIONS", " , "),
    ("KILOCLAW_RECOVERY_TIMEOUT_SECONDS", "0"),
    ("KILOCLAW_RECOVERY_TIMEOUT_SECONDS", "ten minutes"),
    ("KILOCLAW_RETENTION_SECONDS", "-1"),
    ("KILOCLAW_POLL_RUNNING_SECONDS", "0"),
    ("KILOCLAW_POLL_BUSY_SECONDS", "-5"),
    ("KILOCLAW_POLL_IDLE_SECONDS", "often"),
    ("KILOCLAW_METRICS_PORT", "70000"),
    ("KILOCLAW_METRICS_PORT", "abc"),
    ("KILOCLAW_HEALTH_PORT", "-1"),
    ("KILOCLAW_RETAINED_CHECK_SECONDS", "0"),
    ("KILOCLAW_WAIT_CALL_SECONDS", "61"),
    # Above the documented maxima (README, Configuration).
    ("KILOCLAW_RETRY_BACKOFF_MIN_SECONDS", "5000"),
    ("KILOCLAW_RETRY_BACKOFF_MAX_SECONDS", "86401"),
    ("KILOCLAW_RECOVERY_TIMEOUT_SECONDS", "86401"),
    ("KILOCLAW_RETENTION_SECONDS", "31536001"),
    ("KILOCLAW_POLL_RUNNING_SECONDS", "3601"),
    ("KILOCLAW_POLL_BUSY_SECONDS", "301"),
    ("KILOCLAW_POLL_IDLE_SECONDS", "86401"),
    ("KILOCLAW_RETAINED_CHECK_SECONDS", "3601"),
    # Separators without a namespace are not "all namespaces"; names are DNS labels or globs.
    ("KILOCLAW_NAMESPACES", " , "),
    ("KILOCLAW_NAMESPACES", "tenants,,staging"),
    ("KILOCLAW_NAMESPACES", "Tenants"),
    ("KILOCLAW_NAMESPACES", "tenants b"),
]


@pytest.mark.parametrize(("variable", "value"), INVALID, ids=[f"{v}={x}" for v, x in INVALID])
def test_invalid_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv("FLY_API_TOKEN", "t")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert variable in message
    assert message.startswith(f"invalid configuration: {variable}: ")


ROOT = Path(__file__).resolve().parents[2]


def run_cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in VARIABLES and k != "KUBECONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "kiloclaw_operator", "run"],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"FLY_API_TOKEN": "t", "KILOCLAW_POLL_BUSY_SECONDS": "soon"}, "KILOCLAW_POLL_BUSY_SECONDS"),
        ({"FLY_API_TOKEN": "t", "KILOCLAW_DEFAULT_REGIONS": "Frankfurt"}, "KILOCLAW_DEFAULT_REGIONS"),
        ({}, "FLY_API_TOKEN"),
    ],
    ids=["bad-number", "bad-region", "missing-token"],
)
def test_cli_run_with_invalid_configuration_exits_2_with_one_line(env: dict[str, str], variable: str) -> None:
    result = run_cli(env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert lines[0].startswith("kiloclaw-operator: invalid configuration: ")


def test_a_backoff_minimum_above_the_maximum_is_rejected_naming_the_minimum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KILOCLAW_RETRY_BACKOFF_MIN_SECONDS", "120")
    monkeypatch.setenv("KILOCLAW_RETRY_BACKOFF_MAX_SECONDS", "60")
    with pytest.raises(ConfigError) as caught:
        load_settings(require_token=False)
    assert str(caught.value) == (
        "invalid configuration: KILOCLAW_RETRY_BACKOFF_MIN_SECONDS: 120 is above "
        "KILOCLAW_RETRY_BACKOFF_MAX_SECONDS (60)"
    )


def test_a_misspelled_variable_is_rejected_naming_it_and_the_one_meant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KILOCLAW_POLL_RUNING_SECONDS", "5")
    with pytest.raises(ConfigError) as caught:
        load_settings(require_token=False)
    assert str(caught.value) == (
        "invalid configuration: KILOCLAW_POLL_RUNING_SECONDS: unknown variable "
        "(did you mean KILOCLAW_POLL_RUNNING_SECONDS?)"
    )


def test_unrelated_kiloclaw_variables_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILOCLAW_DEV_KUBE_PORT", "6444")
    monkeypatch.setenv("KILOCLAW_CLUSTER_DIR", "/tmp/x")
    assert load_settings(require_token=False).namespaces == []


@pytest.mark.parametrize(
    ("value", "watched", "not_watched"),
    [
        ("tenants,staging", ["tenants", "staging"], ["tenants-b", "other"]),
        ("tenants-*", ["tenants-a", "tenants-b"], ["tenants", "other"]),
        ("tenants-*,!tenants-b*", ["tenants-a", "tenants-c"], ["tenants-b", "tenants-b-2", "other"]),
        ("!tenants-b*", ["tenants-a", "other", "default"], ["tenants-b", "tenants-b-2"]),
        ("a-*,b-*,!*-test", ["a-live", "b-live"], ["a-test", "b-test", "c-live"]),
    ],
)
def test_namespaces_accept_kopf_globs_and_negations_that_exclude_from_every_entry(
    monkeypatch: pytest.MonkeyPatch, value: str, watched: list[str], not_watched: list[str]
) -> None:
    from kopf._cogs.structs.references import match_namespace

    monkeypatch.setenv("KILOCLAW_NAMESPACES", value)
    patterns = load_settings(require_token=False).namespaces

    def is_watched(namespace: str) -> bool:
        return any(match_namespace(namespace, pattern) for pattern in patterns)  # type: ignore[arg-type]

    assert [ns for ns in watched if not is_watched(ns)] == []
    assert [ns for ns in not_watched if is_watched(ns)] == []


def test_the_shard_overlay_splits_every_namespace_between_exactly_two_operators() -> None:
    from kopf._cogs.structs.references import match_namespace

    from test_deploy import env_of, of_kind, operator_container, rendered

    shards = []
    for deployment in of_kind(rendered("shard-b"), "Deployment"):
        value = env_of(operator_container(deployment))["KILOCLAW_NAMESPACES"]["value"]
        shards.append(Settings(KILOCLAW_NAMESPACES=value).namespaces)
    assert len(shards) == 2
    for namespace in ("tenants-a", "tenants-b", "tenants-b-eu", "tenants-c", "new-team", "default"):
        owners = [
            i
            for i, patterns in enumerate(shards)
            if any(match_namespace(namespace, p) for p in patterns)  # type: ignore[arg-type]
        ]
        assert len(owners) == 1, f"{namespace} is watched by {len(owners)} shards"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "tenants",
        "tenants-*",
        "tenants-*,!tenants-b*",
        "!tenants-b*",
        "a-?,tenants-*,!*-x",
        "!kube-*,!default",
    ],
)
def test_the_operators_own_namespace_match_agrees_with_kopfs_for_every_pattern_form(value: str) -> None:
    from kopf._cogs.structs.references import match_namespace  # what kopf watches, to compare with

    patterns = Settings(namespaces=value).namespaces  # type: ignore[arg-type]
    names = [
        "tenants",
        "tenants-a1",
        "tenants-b1",
        "tenants-x",
        "a-1",
        "a-12",
        "kube-system",
        "default",
        "other",
    ]
    for name in names:
        kopf_watches = not patterns or any(match_namespace(name, pattern) for pattern in patterns)
        assert namespace_matches(name, patterns) is kopf_watches, (value, name)
