"""Every metric named in DESIGN.md, owned by one object with its own registry.

An object, not module globals, so that each test (and each sidecar in one process) starts from zero.
Children used on the hot path are bound once here.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: methods kept as label values; anything else is counted as OTHER (bounded cardinality)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})

DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Metrics:
    """The sidecar's Prometheus metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # *_created series double the exposition without telling an operator anything
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.session_valid = Gauge(
            "sidecar_session_valid", "1 while a valid (unexpired) token is held, else 0", registry=r
        )
        self.token_expiry = Gauge(
            "sidecar_token_expiry_timestamp_seconds",
            "Unix time at which the current token expires (0 without a token)",
            registry=r,
        )
        self.session_started = Gauge(
            "sidecar_session_started_timestamp_seconds",
            "Unix time at which the current session was created by a login",
            registry=r,
        )
        self.last_refresh_success = Gauge(
            "sidecar_last_refresh_success_timestamp_seconds",
            "Unix time of the last successful token refresh or login",
            registry=r,
        )
        self.refreshes = Counter(
            "sidecar_token_refreshes_total",
            "Token refreshes by result; reason is the trigger on success, the error on failure",
            ["result", "reason"],
            registry=r,
        )
        self.logins = Counter(
            "sidecar_logins_total", "Logins with the configured credentials", ["result"], registry=r
        )
        self.upstream_requests = Counter(
            "sidecar_upstream_requests_total",
            "Requests answered to callers, by method and status code (proxy-made errors included)",
            ["method", "code"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "sidecar_upstream_request_duration_seconds",
            "Time from receiving a request to the end of its response",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "sidecar_requests_in_flight", "Requests being proxied right now", registry=r
        )
        self.reactive_refreshes = Counter(
            "sidecar_reactive_refreshes_total",
            "Refreshes caused by an upstream 401 on a token believed valid",
            registry=r,
        )
        self._request_children: dict[tuple[str, int], Counter] = {}
        self.observe_duration = self.upstream_duration.observe
        for result in ("success", "failure"):
            self.logins.labels(result=result)

    def count_request(self, method: str, status: int) -> None:
        """Count one answered request; label children are cached after first use."""
        key = (method if method in KNOWN_METHODS else "OTHER", status)
        child = self._request_children.get(key)
        if child is None:
            child = self.upstream_requests.labels(method=key[0], code=str(status))
            self._request_children[key] = child
        child.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return bytes(generate_latest(self.registry))
