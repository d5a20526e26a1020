"""Every metric named in DESIGN.md, owned by one object with its own registry.

An object, not module globals, so that each test (and each sidecar in one process) starts from zero.
Children used on the hot path are bound once here.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from sidecar import __version__

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
        self.login_failures = Counter(
            "sidecar_login_failures_total",
            "Failed logins by reason (the error code, e.g. missing_access_token, http_503)",
            ["reason"],
            registry=r,
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
        self.token_validation_failures = Counter(
            "sidecar_token_validation_failures_total",
            "New access tokens refused by identity.validate, by the check that failed",
            ["reason"],
            registry=r,
        )
        self.build_info = Gauge(
            "sidecar_build_info",
            "Always 1; the labels name the running sidecar's version and Python",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(version=__version__, python=platform.python_version()).set(1)
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

    def in_flight_now(self) -> float:
        """Requests being proxied right now (the gauge's value)."""
        return float(next(iter(self.in_flight.collect())).samples[0].value)

    def snapshot(self) -> dict[str, Any]:
        """The per-request metrics as plain data, for a worker to report to its supervisor."""
        requests = [
            [s.labels["method"], s.labels["code"], s.value]
            for s in next(iter(self.upstream_requests.collect())).samples
            if s.name.endswith("_total")
        ]
        buckets: list[list[Any]] = []
        total = 0.0
        for s in next(iter(self.upstream_duration.collect())).samples:
            if s.name.endswith("_bucket"):
                buckets.append([s.labels["le"], s.value])
            elif s.name.endswith("_sum"):
                total = s.value
        return {
            "requests": requests,
            "buckets": buckets,
            "sum": total,
            "in_flight": self.in_flight_now(),
        }

    def take_requests_from_workers(self) -> WorkerTotals:
        """Supervisor mode: the per-request metrics become the sum of the workers' reports."""
        for own in (self.upstream_requests, self.upstream_duration, self.in_flight):
            self.registry.unregister(own)
        totals = WorkerTotals()
        self.registry.register(totals)
        return totals

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return bytes(generate_latest(self.registry))


class WorkerTotals:
    """A collector summing the per-request metrics that workers report (``Metrics.snapshot``).

    A worker's last report is kept after it exits, so counters never go backwards when a worker
    is replaced; the in-flight gauge counts live workers only.
    """

    def __init__(self) -> None:
        self.reports: dict[int, dict[str, Any]] = {}
        self.live: set[int] = set()

    def update(self, worker: int, report: dict[str, Any]) -> None:
        self.reports[worker] = report
        self.live.add(worker)

    def gone(self, worker: int) -> None:
        self.live.discard(worker)

    def collect(self) -> Iterator[Metric]:
        requests: dict[tuple[str, str], float] = {}
        buckets: dict[str, float] = {}
        total = 0.0
        in_flight = 0.0
        for worker, report in self.reports.items():
            for method, code, value in report["requests"]:
                requests[(method, code)] = requests.get((method, code), 0.0) + value
            for le, value in report["buckets"]:
                buckets[le] = buckets.get(le, 0.0) + value
            total += report["sum"]
            if worker in self.live:
                in_flight += report["in_flight"]
        family = CounterMetricFamily(
            "sidecar_upstream_requests",
            "Requests answered to callers, by method and status code (proxy-made errors included)",
            labels=["method", "code"],
        )
        for (method, code), value in sorted(requests.items()):
            family.add_metric([method, code], value)
        yield family
        ordered = [f"{b:g}" for b in DURATION_BUCKETS] + ["+Inf"]
        yield HistogramMetricFamily(
            "sidecar_upstream_request_duration_seconds",
            "Time from receiving a request to the end of its response",
            buckets=[(le, buckets.get(_le_key(le), 0.0)) for le in ordered],
            sum_value=total,
        )
        yield GaugeMetricFamily(
            "sidecar_requests_in_flight", "Requests being proxied right now", value=in_flight
        )


def _le_key(le: str) -> str:
    """prometheus_client renders bucket bounds as floats ("0.005", "1.0", "+Inf")."""
    return le if le == "+Inf" else str(float(le))
