"""A login's credentials (kubeconfig.Credentials): loaded again when they expire and after a 401, once for
many requests refused together."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kiloclaw_operator.kubeconfig import Authorization, Credentials


class Loads:
    """A login that hands out a new token each time it is loaded."""

    def __init__(self, expires_in: timedelta | None = None) -> None:
        self.count = 0
        self.expires_in = expires_in

    def __call__(self) -> Authorization:
        self.count += 1
        expires = datetime.now(UTC) + self.expires_in if self.expires_in is not None else None
        return Authorization(f"Bearer token-{self.count}", expires)


def test_a_401_loads_the_login_again_once_for_every_request_refused_with_the_same_header() -> None:
    loads = Loads()
    credentials = Credentials(loads, loads())
    refused = credentials.header()
    for _ in range(3):  # three requests sent with token-1, all refused
        credentials.invalidate(refused)
        assert credentials.header() == "Bearer token-2"
    assert loads.count == 2


def test_a_credential_about_to_expire_is_loaded_again_before_it_is_sent() -> None:
    loads = Loads(expires_in=timedelta(seconds=30))  # inside the library's five-minute margin
    credentials = Credentials(loads, loads())
    assert credentials.cached() is None
    assert credentials.header() == "Bearer token-2"


def test_a_credential_without_expiry_is_kept_until_refused() -> None:
    loads = Loads()
    credentials = Credentials(loads, loads())
    assert [credentials.header() for _ in range(3)] == ["Bearer token-1"] * 3
    assert loads.count == 1
