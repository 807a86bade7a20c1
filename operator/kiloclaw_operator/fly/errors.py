"""The one error taxonomy for the Fly Machines API.

Everything outside the `fly` package branches on these types, never on status codes or message text: the
status and body are interpreted exactly once, here.
"""

from __future__ import annotations

import re

__all__ = [
    "AppNotFound",
    "Capacity",
    "Fatal",
    "FlyError",
    "HostUnavailable",
    "NotFound",
    "RateLimited",
    "Transient",
    "Unauthorized",
    "classify",
]

# Statuses Fly uses when a placement fails for lack of room; only with one of the phrases below does such a
# response mean "try another region" rather than "your request is wrong".
_CAPACITY_STATUSES = frozenset({400, 403, 409, 412})
_CAPACITY_PHRASES = (
    "no capacity",
    "insufficient resources",
    "insufficient memory",
    "over the allowed quota",
)
_CAPACITY_CODE = "insufficient_capacity"


class FlyError(Exception):
    """A failed Fly API call.

    `route` is the templated path (`/apps/{app}/machines/{id}`), so errors group well in logs; `message` is
    the server's explanation (or the connection failure), never the bearer token.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        method: str | None = None,
        route: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.method = method
        self.route = route

    def __str__(self) -> str:
        where = f"{self.method} {self.route}" if self.method and self.route else (self.route or "fly")
        status = f" {self.status}" if self.status is not None else ""
        return f"{where}{status}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, method={self.method!r}, "
            f"route={self.route!r}, message={self.message!r})"
        )


class NotFound(FlyError):
    """The machine, volume or app does not exist (404). Callers decide whether that is fine."""


class AppNotFound(NotFound):
    """The Fly app itself does not exist (or the token cannot see it): 404 whose body says "app not found".
    Nothing of the instance can exist there; only a spec change (another app) or an admin can help."""


_APP_NOT_FOUND_PHRASES = ("app not found", "could not find app", "app does not exist")


class Capacity(FlyError):
    """The region cannot place the request right now; another region may."""


class RateLimited(FlyError):
    """429 after the client's own retries; `retry_after` is the server's hint in seconds, when it gave one."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        method: str | None = None,
        route: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, method=method, route=route)
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, retry_after={self.retry_after!r})"


class Transient(FlyError):
    """5xx, 408, connection failures and timeouts: the same call may succeed later."""


class NotLeading(Transient):
    """A changing call refused before it was sent: this process no longer knows itself the leader (its Lease
    was not renewed within the renew deadline), and a standby may be acting already. Nothing reached Fly; the
    process is about to exit, and the new leader repeats the step."""


class Unauthorized(FlyError):
    """The token is missing, wrong or lacks access (401/403): a person must fix the credentials."""


class Fatal(FlyError):
    """Fly rejected the request itself (other 4xx): retrying the same call cannot succeed."""


class HostUnavailable(Fatal):
    """The machine's (or volume's) host is unreachable (412 failed_precondition): the machine cannot start
    there again, but the sandbox can move elsewhere — not a fault of the spec."""


#: A 412 naming an unreachable host: the machine's ("machine host is unreachable"), or the volume's that a
#: create or fork needs ("host of volume 'vol_…' is unreachable", "host of source volume … is unreachable").
_HOST_UNAVAILABLE = re.compile(r"\bhost\b[^\"]*?\b(?:unreachable|unavailable)\b")


def is_capacity_error(status: int | None, body_text: str) -> bool:
    """True when a response says the region is out of room (see DESIGN.md 3.3 step 4)."""
    text = body_text.lower()
    if _CAPACITY_CODE in text:
        return True
    return status in _CAPACITY_STATUSES and any(phrase in text for phrase in _CAPACITY_PHRASES)


def classify(status: int | None, body_text: str) -> type[FlyError]:
    """Map an HTTP status (None for a connection failure) and response body to the error type to raise."""
    if status is None:
        return Transient
    if is_capacity_error(status, body_text):
        return Capacity
    if status == 404:
        text = body_text.lower()
        return AppNotFound if any(phrase in text for phrase in _APP_NOT_FOUND_PHRASES) else NotFound
    if status in (401, 403):
        return Unauthorized
    if status == 429:
        return RateLimited
    if status == 408 or status >= 500:
        return Transient
    if status == 412 and _HOST_UNAVAILABLE.search(body_text.lower()):
        return HostUnavailable
    return Fatal
