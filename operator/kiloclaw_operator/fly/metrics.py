"""Request metrics for the Fly API client, registered once in the default Prometheus registry.

Labels carry the templated route (`/apps/{app}/machines/{id}`), never ids, so cardinality stays bounded by
the number of endpoints.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

__all__ = ["CONNECTION_ERROR_CODE", "FLY_REQUESTS", "FLY_REQUEST_DURATION", "FLY_UNAUTHORIZED"]

# The `code` label value for requests that never got an HTTP response.
CONNECTION_ERROR_CODE = "error"


def _already_registered(name: str) -> Collector | None:
    """The collector registered under `name` by an earlier import of this module, if any.

    A re-import (importlib.reload, the module loaded under a second path) must not fail with
    "Duplicated timeseries in CollectorRegistry".
    """
    collectors: dict[str, Collector] = getattr(REGISTRY, "_names_to_collectors", {})
    return collectors.get(name)


_requests = _already_registered("kiloclaw_fly_requests_total")
FLY_REQUESTS: Counter = (
    _requests
    if isinstance(_requests, Counter)
    else Counter(
        "kiloclaw_fly_requests_total",
        "Requests made to the Fly Machines API, by templated route and HTTP status",
        labelnames=("method", "route", "code"),
    )
)

_duration = _already_registered("kiloclaw_fly_request_duration_seconds")
FLY_REQUEST_DURATION: Histogram = (
    _duration
    if isinstance(_duration, Histogram)
    else Histogram(
        "kiloclaw_fly_request_duration_seconds",
        "Duration of Fly Machines API requests (each attempt), by templated route",
        labelnames=("method", "route"),
        # The wait endpoint blocks for up to 60 s, so the buckets reach that far.
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    )
)

_unauthorized = _already_registered("kiloclaw_fly_unauthorized")
FLY_UNAUTHORIZED: Gauge = (
    _unauthorized
    if isinstance(_unauthorized, Gauge)
    else Gauge(
        "kiloclaw_fly_unauthorized",
        "1 while the Fly API rejects the operator's token (401): every instance is blocked; 0 otherwise",
    )
)
